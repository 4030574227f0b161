//! LeaseCandidates (coordinated leader election, `coordination.k8s.io/v1beta1`) as
//! `status` and `watch` show them, and why they cannot be shown: most API servers do not
//! serve them (the `CoordinatedLeaderElection` gate is off by default), and a reader may
//! not be allowed to list them. Neither is an error for `status` or `watch`.

use std::collections::BTreeMap;

use k8s_openapi::api::coordination::v1beta1::LeaseCandidate;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use kube::api::ListParams;
use kube::{Api, Client};
use serde::Serialize;
use tokio::time::timeout;

use crate::error::chain;
use crate::leases::API_TIMEOUT;
use crate::text::printable;

/// What of a candidate `watch` prints a line for: name, binary version, emulation
/// version and strategy (not its renewal times).
pub(crate) type CandidateKey = (String, String, Option<String>, String);

/// One LeaseCandidate, with its fields named as in the object.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct CandidateView {
    /// The candidate's name (the identity it campaigns with).
    pub(crate) name: String,
    /// The Lease it is a candidate for (the field the listing is grouped by; the view
    /// of that Lease already names it).
    #[serde(skip)]
    pub(crate) lease_name: String,
    pub(crate) binary_version: String,
    pub(crate) emulation_version: Option<String>,
    pub(crate) strategy: String,
    pub(crate) renew_time: Option<MicroTime>,
    pub(crate) ping_time: Option<MicroTime>,
}

impl CandidateView {
    /// The view of `c`.
    pub(crate) fn new(c: &LeaseCandidate) -> Self {
        let spec = c.spec.clone().unwrap_or_default();
        Self {
            name: c.metadata.name.clone().unwrap_or_default(),
            lease_name: spec.lease_name,
            binary_version: spec.binary_version,
            emulation_version: spec.emulation_version,
            strategy: spec.strategy,
            renew_time: spec.renew_time,
            ping_time: spec.ping_time,
        }
    }

    /// What identifies the candidate and its offer, without the times that change on
    /// every ping (for `watch`, which prints changes).
    pub(crate) fn key(&self) -> CandidateKey {
        (
            self.name.clone(),
            self.binary_version.clone(),
            self.emulation_version.clone(),
            self.strategy.clone(),
        )
    }
}

/// The candidates of a namespace's Leases, or why they could not be listed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Listing {
    /// Listed: the candidates, by Lease name, each sorted by name.
    Listed(BTreeMap<String, Vec<CandidateView>>),
    /// Not listed, and why, in words for people (`status` and `watch` say it and go on).
    Unavailable(String),
}

impl Listing {
    /// The listing of `items`.
    pub(crate) fn of(items: &[LeaseCandidate]) -> Self {
        let mut by_lease: BTreeMap<String, Vec<CandidateView>> = BTreeMap::new();
        for c in items {
            let view = CandidateView::new(c);
            by_lease
                .entry(view.lease_name.clone())
                .or_default()
                .push(view);
        }
        for list in by_lease.values_mut() {
            list.sort_by(|a, b| a.name.cmp(&b.name));
        }
        Listing::Listed(by_lease)
    }

    /// The candidates of Lease `lease`: `Ok` (possibly empty) if listed, else why not.
    pub(crate) fn of_lease(&self, lease: &str) -> Result<Vec<CandidateView>, String> {
        match self {
            Listing::Listed(by_lease) => Ok(by_lease.get(lease).cloned().unwrap_or_default()),
            Listing::Unavailable(why) => Err(why.clone()),
        }
    }
}

/// Lists the LeaseCandidates in `namespace` (of Lease `lease` only, if given).
/// Never fails: a refusal or an API that is not served is a [`Listing::Unavailable`].
///
/// The filter by Lease is done here: kube-apiserver (1.34) indexes `spec.leaseName`
/// but does not accept it as a field selector on `coordination.k8s.io/v1beta1`.
pub(crate) async fn list(client: Client, namespace: &str, lease: Option<&str>) -> Listing {
    let api: Api<LeaseCandidate> = Api::namespaced(client, namespace);
    match timeout(API_TIMEOUT, api.list(&ListParams::default())).await {
        Ok(Ok(list)) => Listing::of(&of_lease(list.items, lease)),
        Ok(Err(e)) => Listing::Unavailable(unavailable(&e, namespace)),
        Err(_) => Listing::Unavailable(format!(
            "the API server did not answer a list of leasecandidates within {API_TIMEOUT:?}"
        )),
    }
}

/// The candidates among `items` that are for Lease `lease` (all, if none given).
pub(crate) fn of_lease(items: Vec<LeaseCandidate>, lease: Option<&str>) -> Vec<LeaseCandidate> {
    items
        .into_iter()
        .filter(|c| lease.is_none_or(|l| c.spec.as_ref().is_some_and(|s| s.lease_name == l)))
        .collect()
}

/// Why LeaseCandidates could not be listed or watched, in words for people.
pub(crate) fn unavailable(e: &kube::Error, namespace: &str) -> String {
    match e {
        kube::Error::Api(s) if s.code == 404 => NOT_SERVED.to_owned(),
        kube::Error::Api(s) if s.code == 403 => format!(
            "not shown: listing them is forbidden (grant `list` and `watch` on `leasecandidates.coordination.k8s.io` in namespace `{namespace}`)"
        ),
        other => format!("cannot list them: {}", chain(other)),
    }
}

/// What a server without coordinated leader election answers, in words.
pub(crate) const NOT_SERVED: &str = "not served by this API server (coordination.k8s.io/v1beta1 LeaseCandidates: coordinated leader election is off)";

/// The candidates of the Leases in `views` as a table (LEASE, CANDIDATE, versions,
/// strategy, renewed), or an empty string if there are none.
pub(crate) fn table(candidates: &[&CandidateView]) -> String {
    if candidates.is_empty() {
        return String::new();
    }
    let header = [
        "LEASE",
        "CANDIDATE",
        "BINARY",
        "EMULATION",
        "STRATEGY",
        "RENEWED",
    ];
    let rows: Vec<Vec<String>> = candidates
        .iter()
        .map(|c| {
            vec![
                c.lease_name.clone(),
                printable(&c.name).into_owned(),
                printable(&c.binary_version).into_owned(),
                printable(c.emulation_version.as_deref().unwrap_or("-")).into_owned(),
                printable(&c.strategy).into_owned(),
                crate::leases::time_cell(c.renew_time.as_ref()),
            ]
        })
        .collect();
    crate::leases::columns(&header, &rows)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use k8s_openapi::api::coordination::v1beta1::LeaseCandidateSpec;
    use kube::api::ObjectMeta;

    pub(crate) fn candidate(name: &str, lease: &str, emulation: &str) -> LeaseCandidate {
        LeaseCandidate {
            metadata: ObjectMeta {
                name: Some(name.into()),
                ..Default::default()
            },
            spec: Some(LeaseCandidateSpec {
                lease_name: lease.into(),
                binary_version: "1.34.0".into(),
                emulation_version: Some(emulation.into()),
                strategy: "OldestEmulationVersion".into(),
                renew_time: Some(MicroTime("2025-01-02T03:04:05Z".parse().unwrap())),
                ping_time: None,
            }),
        }
    }

    #[test]
    fn candidates_are_grouped_by_lease_and_sorted() {
        let listing = Listing::of(&[
            candidate("b", "l1", "1.33.0"),
            candidate("a", "l1", "1.34.0"),
            candidate("c", "l2", "1.34.0"),
        ]);
        let l1 = listing.of_lease("l1").unwrap();
        assert_eq!(
            l1.iter().map(|c| c.name.as_str()).collect::<Vec<_>>(),
            ["a", "b"]
        );
        assert_eq!(listing.of_lease("none").unwrap(), vec![]);
        let why = Listing::Unavailable(NOT_SERVED.into());
        assert_eq!(why.of_lease("l1").unwrap_err(), NOT_SERVED);
        let json = serde_json::to_value(&l1[1]).unwrap();
        assert_eq!(
            json,
            serde_json::json!({
                "name": "b",
                "binaryVersion": "1.34.0",
                "emulationVersion": "1.33.0",
                "strategy": "OldestEmulationVersion",
                "renewTime": "2025-01-02T03:04:05.000000Z",
                "pingTime": null,
            })
        );
    }

    #[test]
    fn refusals_and_missing_apis_are_said_plainly() {
        let status = |code| {
            kube::Error::Api(
                kube::core::Status::failure(
                    "the server could not find the requested resource",
                    "NotFound",
                )
                .with_code(code)
                .boxed(),
            )
        };
        assert_eq!(unavailable(&status(404), "ns"), NOT_SERVED);
        assert!(unavailable(&status(403), "ns").contains(
            "grant `list` and `watch` on `leasecandidates.coordination.k8s.io` in namespace `ns`"
        ));
    }

    #[test]
    fn the_table_names_lease_and_versions() {
        let listing = Listing::of(&[candidate("pod-a", "my-lock", "1.33.0")]);
        let views = listing.of_lease("my-lock").unwrap();
        let text = table(&views.iter().collect::<Vec<_>>());
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(
            lines,
            [
                "LEASE     CANDIDATE   BINARY   EMULATION   STRATEGY                 RENEWED",
                "my-lock   pod-a       1.34.0   1.33.0      OldestEmulationVersion   2025-01-02T03:04:05Z",
            ]
        );
        assert_eq!(table(&[]), "");
    }
}
