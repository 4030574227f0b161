//! Leases as `status` and `watch` show them: the fields `kubectl describe lease` shows,
//! plus an estimate of when the holder's lease expires, a pending handoff and the
//! Lease's candidates (coordinated leader election).

use std::time::Duration;

use jiff::Timestamp;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use leaderz::LeaderRecord;
use leaderz::record::{Handoff, HandoffState};
use serde::Serialize;
use tokio::time::timeout;

use crate::candidates::{CandidateView, Listing};
use crate::error::{CliError, chain};
use crate::text::printable;

/// How long one API call of `status` or `watch` may take.
pub(crate) const API_TIMEOUT: Duration = Duration::from_secs(10);

/// One Lease, with its fields named as in the Lease.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct LeaseView {
    pub(crate) name: String,
    pub(crate) namespace: String,
    pub(crate) holder_identity: Option<String>,
    pub(crate) lease_duration_seconds: Option<i32>,
    pub(crate) acquire_time: Option<MicroTime>,
    pub(crate) renew_time: Option<MicroTime>,
    pub(crate) lease_transitions: Option<i32>,
    /// `renewTime + leaseDurationSeconds - now` on this machine's wall clock: an
    /// estimate (clocks differ between machines; electors judge expiry on their own
    /// monotonic clocks). `null` when nobody holds the Lease.
    pub(crate) expires_in_seconds: Option<f64>,
    /// `spec.strategy`: set by a coordinated-election controller.
    pub(crate) strategy: Option<String>,
    /// `spec.preferredHolder`: whom the strategy wants to hold the Lease.
    pub(crate) preferred_holder: Option<String>,
    /// A planned handover in progress (`leaderz handoff`), from the Lease's
    /// `leaderz.io/handoff` annotation.
    pub(crate) handoff: Option<HandoffView>,
    /// The Lease's LeaseCandidates, when they could be listed.
    pub(crate) candidates: Option<Vec<CandidateView>>,
    /// Why the candidates could not be listed (not served, forbidden), else `null`.
    pub(crate) candidates_unavailable: Option<String>,
}

/// A pending [`Handoff`], as `status`, `watch` and `handoff` show it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct HandoffView {
    /// `requested`, `accepted` or `transferred`.
    pub(crate) state: HandoffState,
    /// The candidate it is for (`null`: a request to any candidate).
    pub(crate) to: Option<String>,
    /// The request's id.
    pub(crate) id: String,
    /// When it was requested, if `leaderz handoff` made the id (it starts with the time).
    pub(crate) requested_at: Option<String>,
}

impl HandoffView {
    /// The view of `h`.
    pub(crate) fn new(h: &Handoff) -> Self {
        Self {
            state: h.state,
            to: h.to.clone(),
            id: h.id.clone(),
            requested_at: crate::handoff::requested_at(&h.id)
                .map(|t| t.strftime("%Y-%m-%dT%H:%M:%S%.3fZ").to_string()),
        }
    }

    /// For people: `accepted by pod-b (id …)`.
    pub(crate) fn cell(&self) -> String {
        let to = self.to.as_deref().map(printable);
        let what = match (self.state, to) {
            (HandoffState::Requested, None) => "requested for any candidate".to_owned(),
            (HandoffState::Requested, Some(to)) => format!("requested for {to}"),
            (HandoffState::Accepted, Some(to)) => format!("accepted by {to}"),
            (HandoffState::Transferred, Some(to)) => format!("transferred to {to}"),
            (state, to) => {
                let state = serde_json::to_value(state).unwrap_or_default();
                let state = state.as_str().unwrap_or("unknown");
                match to {
                    Some(to) => format!("{state} ({to})"),
                    None => state.to_owned(),
                }
            }
        };
        format!("{what} (id {})", printable(&self.id))
    }
}

impl LeaseView {
    /// The view of `lease` at wall-clock time `now`.
    pub(crate) fn new(lease: &Lease, now: Timestamp) -> Self {
        let spec = lease.spec.clone().unwrap_or_default();
        let held = spec
            .holder_identity
            .as_deref()
            .is_some_and(|h| !h.is_empty());
        let expires_in_seconds = match (held, &spec.renew_time, spec.lease_duration_seconds) {
            (true, Some(renew), Some(secs)) => Some(expires_in(renew.0, secs, now)),
            _ => None,
        };
        let record = LeaderRecord::from_lease(lease);
        Self {
            name: lease.metadata.name.clone().unwrap_or_default(),
            namespace: lease.metadata.namespace.clone().unwrap_or_default(),
            holder_identity: spec.holder_identity,
            lease_duration_seconds: spec.lease_duration_seconds,
            acquire_time: spec.acquire_time,
            renew_time: spec.renew_time,
            lease_transitions: spec.lease_transitions,
            expires_in_seconds,
            strategy: spec.strategy.filter(|s| !s.is_empty()),
            preferred_holder: spec.preferred_holder.filter(|p| !p.is_empty()),
            handoff: record.handoff.as_ref().map(HandoffView::new),
            candidates: None,
            candidates_unavailable: None,
        }
    }

    /// This view with the Lease's candidates from `listing`.
    pub(crate) fn with_candidates(mut self, listing: &Listing) -> Self {
        match listing.of_lease(&self.name) {
            Ok(c) => {
                self.candidates = Some(c);
                self.candidates_unavailable = None;
            }
            Err(why) => {
                self.candidates = None;
                self.candidates_unavailable = Some(why);
            }
        }
        self
    }

    /// A Lease that does not exist (for `watch`).
    pub(crate) fn absent(name: &str, namespace: &str) -> Self {
        Self {
            name: name.to_owned(),
            namespace: namespace.to_owned(),
            holder_identity: None,
            lease_duration_seconds: None,
            acquire_time: None,
            renew_time: None,
            lease_transitions: None,
            expires_in_seconds: None,
            strategy: None,
            preferred_holder: None,
            handoff: None,
            candidates: None,
            candidates_unavailable: None,
        }
    }

    /// The holder for people: `<none>` after a release. Anyone who may write the Lease
    /// chooses it, so control characters are escaped (`\n`, `\u{1b}`).
    pub(crate) fn holder_cell(&self) -> String {
        match self.holder_identity.as_deref() {
            Some(h) if !h.is_empty() => printable(h).into_owned(),
            _ => "<none>".to_owned(),
        }
    }
}

/// Seconds from `now` until `renew + duration_seconds` (negative once past), to the ms.
fn expires_in(renew: Timestamp, duration_seconds: i32, now: Timestamp) -> f64 {
    let micros =
        renew.as_microsecond() + i64::from(duration_seconds) * 1_000_000 - now.as_microsecond();
    (micros as f64 / 1000.0).round() / 1000.0
}

/// A timestamp for people: UTC, to the second.
pub(crate) fn time_cell(t: Option<&MicroTime>) -> String {
    t.map_or_else(
        || "-".to_owned(),
        |t| t.0.strftime("%Y-%m-%dT%H:%M:%SZ").to_string(),
    )
}

fn opt_cell<T: ToString>(v: Option<T>, suffix: &str) -> String {
    v.map_or_else(|| "-".to_owned(), |v| format!("{}{suffix}", v.to_string()))
}

fn expires_cell(secs: Option<f64>) -> String {
    match secs {
        None => "-".to_owned(),
        Some(s) if s < 0.0 => "expired".to_owned(),
        Some(s) => format!("{s:.1}s"),
    }
}

/// Leases as a table with a header, as `kubectl get` prints. The columns STRATEGY,
/// PREFERRED HOLDER and HANDOFF appear only when some Lease has one.
pub(crate) fn table(views: &[LeaseView]) -> String {
    let mut header = vec![
        "NAME",
        "HOLDER",
        "DURATION",
        "ACQUIRED",
        "RENEWED",
        "TRANSITIONS",
        "EXPIRES IN (EST.)",
    ];
    let show_strategy = views.iter().any(|v| v.strategy.is_some());
    let show_preferred = views.iter().any(|v| v.preferred_holder.is_some());
    let show_handoff = views.iter().any(|v| v.handoff.is_some());
    for (show, name) in [
        (show_strategy, "STRATEGY"),
        (show_preferred, "PREFERRED HOLDER"),
        (show_handoff, "HANDOFF"),
    ] {
        if show {
            header.push(name);
        }
    }
    let rows: Vec<Vec<String>> = views
        .iter()
        .map(|v| {
            let mut row = vec![
                v.name.clone(),
                v.holder_cell(),
                opt_cell(v.lease_duration_seconds, "s"),
                time_cell(v.acquire_time.as_ref()),
                time_cell(v.renew_time.as_ref()),
                opt_cell(v.lease_transitions, ""),
                expires_cell(v.expires_in_seconds),
            ];
            let text = |t: &Option<String>| {
                t.as_deref()
                    .map_or_else(|| "-".to_owned(), |t| printable(t).into_owned())
            };
            if show_strategy {
                row.push(text(&v.strategy));
            }
            if show_preferred {
                row.push(text(&v.preferred_holder));
            }
            if show_handoff {
                row.push(
                    v.handoff
                        .as_ref()
                        .map_or_else(|| "-".to_owned(), HandoffView::cell),
                );
            }
            row
        })
        .collect();
    columns(&header, &rows)
}

/// What `status` prints after the Lease table: the candidates of the Leases shown, or
/// why they cannot be shown (once, for all Leases), or nothing when there are none.
pub(crate) fn candidates_section(views: &[LeaseView]) -> String {
    if let Some(why) = views.iter().find_map(|v| v.candidates_unavailable.as_ref()) {
        return format!("\nLease candidates: {why}\n");
    }
    let all: Vec<&CandidateView> = views
        .iter()
        .flat_map(|v| v.candidates.iter().flatten())
        .collect();
    if all.is_empty() {
        return String::new();
    }
    format!("\n{}", crate::candidates::table(&all))
}

/// Aligned columns under a header, as `kubectl get` prints them; the last column is
/// not padded.
pub(crate) fn columns(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    let mut line = |cells: &[&str]| {
        let mut text = String::new();
        for (i, cell) in cells.iter().enumerate() {
            if i + 1 == cells.len() {
                text.push_str(cell);
            } else {
                text.push_str(&format!("{cell:<width$}   ", width = widths[i]));
            }
        }
        out.push_str(text.trim_end());
        out.push('\n');
    };
    line(header);
    for row in rows {
        line(&row.iter().map(String::as_str).collect::<Vec<_>>());
    }
    out
}

/// Runs a Lease API call with a time limit, turning failures into one line that says
/// what to do.
pub(crate) async fn call<T>(
    verb: &str,
    namespace: &str,
    request: impl Future<Output = Result<T, kube::Error>>,
) -> Result<T, CliError> {
    match timeout(API_TIMEOUT, request).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(api_error(verb, namespace, e)),
        Err(_) => Err(CliError::Api(format!(
            "the API server did not answer a {verb} of leases in namespace `{namespace}` within {API_TIMEOUT:?}"
        ))),
    }
}

/// Whether retrying cannot help (RBAC, credentials).
pub(crate) fn is_fatal(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(s) if s.code == 401 || s.code == 403)
}

pub(crate) fn api_error(verb: &str, namespace: &str, e: kube::Error) -> CliError {
    match e {
        kube::Error::Api(s) if s.code == 403 => CliError::Api(format!(
            "forbidden: grant `{verb}` on `leases.coordination.k8s.io` in namespace `{namespace}`: {}",
            s.message
        )),
        kube::Error::Api(s) if s.code == 401 => CliError::Api(format!(
            "unauthorized: the API server refused our credentials: {}",
            s.message
        )),
        other => CliError::Api(format!(
            "cannot {verb} leases in namespace `{namespace}`: {}",
            chain(&other)
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::coordination::v1::LeaseSpec;
    use kube::api::ObjectMeta;
    use serde_json::{Value, json};

    fn ts(s: &str) -> Timestamp {
        s.parse().unwrap()
    }

    fn lease(holder: &str) -> Lease {
        Lease {
            metadata: ObjectMeta {
                name: Some("my-lock".into()),
                namespace: Some("ns".into()),
                ..Default::default()
            },
            spec: Some(LeaseSpec {
                holder_identity: Some(holder.into()),
                lease_duration_seconds: Some(15),
                acquire_time: Some(MicroTime(ts("2025-01-02T03:04:00.123456Z"))),
                renew_time: Some(MicroTime(ts("2025-01-02T03:04:05.500000Z"))),
                lease_transitions: Some(3),
                ..Default::default()
            }),
        }
    }

    #[test]
    fn json_names_fields_as_the_lease_does() {
        let view = LeaseView::new(&lease("pod-a"), ts("2025-01-02T03:04:10Z"));
        assert_eq!(
            serde_json::to_value(&view).unwrap(),
            json!({
                "name": "my-lock",
                "namespace": "ns",
                "holderIdentity": "pod-a",
                "leaseDurationSeconds": 15,
                "acquireTime": "2025-01-02T03:04:00.123456Z",
                "renewTime": "2025-01-02T03:04:05.500000Z",
                "leaseTransitions": 3,
                "expiresInSeconds": 10.5,
                "strategy": null,
                "preferredHolder": null,
                "handoff": null,
                "candidates": null,
                "candidatesUnavailable": null,
            })
        );
    }

    #[test]
    fn strategy_preferred_holder_handoff_and_candidates_are_shown() {
        let now = ts("2025-01-02T03:04:10Z");
        let mut l = lease("pod-a");
        let spec = l.spec.as_mut().unwrap();
        spec.strategy = Some("OldestEmulationVersion".into());
        spec.preferred_holder = Some("pod-c".into());
        let h = Handoff::request(Some("pod-b".into()), "2025-01-02T03:04:09.250000Z-1f")
            .step(HandoffState::Accepted, "pod-b");
        l.metadata.annotations = Some(
            [(
                leaderz::record::HANDOFF_ANNOTATION.to_owned(),
                h.to_annotation(),
            )]
            .into(),
        );
        let listing = Listing::of(&[crate::candidates::tests::candidate(
            "pod-c", "my-lock", "1.33.0",
        )]);
        let view = LeaseView::new(&l, now).with_candidates(&listing);
        let json = serde_json::to_value(&view).unwrap();
        assert_eq!(json["strategy"], "OldestEmulationVersion");
        assert_eq!(json["preferredHolder"], "pod-c");
        assert_eq!(
            json["handoff"],
            json!({
                "state": "accepted",
                "to": "pod-b",
                "id": "2025-01-02T03:04:09.250000Z-1f",
                "requestedAt": "2025-01-02T03:04:09.250Z",
            })
        );
        assert_eq!(json["candidates"][0]["name"], "pod-c");
        assert_eq!(json["candidatesUnavailable"], Value::Null);

        let text = table(std::slice::from_ref(&view));
        let lines: Vec<&str> = text.lines().collect();
        assert!(
            lines[0].ends_with(
                "EXPIRES IN (EST.)   STRATEGY                 PREFERRED HOLDER   HANDOFF"
            ),
            "{text}"
        );
        assert!(
            lines[1].ends_with(
                "10.5s               OldestEmulationVersion   pod-c              accepted by pod-b (id 2025-01-02T03:04:09.250000Z-1f)"
            ),
            "{text}"
        );
        let section = candidates_section(std::slice::from_ref(&view));
        assert!(section.starts_with("\nLEASE "), "{section}");
        assert!(section.contains("pod-c"), "{section}");

        // Not served: said once, plainly, instead of a table.
        let missing = Listing::Unavailable(crate::candidates::NOT_SERVED.into());
        let view = LeaseView::new(&l, now).with_candidates(&missing);
        let json = serde_json::to_value(&view).unwrap();
        assert_eq!(json["candidates"], Value::Null);
        assert_eq!(json["candidatesUnavailable"], crate::candidates::NOT_SERVED);
        assert_eq!(
            candidates_section(&[view.clone(), view]),
            format!("\nLease candidates: {}\n", crate::candidates::NOT_SERVED)
        );
    }

    #[test]
    fn expiry_is_an_estimate_that_can_be_past() {
        let now = ts("2025-01-02T03:04:30Z");
        let view = LeaseView::new(&lease("pod-a"), now);
        assert_eq!(view.expires_in_seconds, Some(-9.5));
        assert_eq!(expires_cell(view.expires_in_seconds), "expired");
        assert_eq!(expires_cell(Some(10.46)), "10.5s");
        // Released: nobody holds it, nothing expires.
        let view = LeaseView::new(&lease(""), now);
        assert_eq!(view.expires_in_seconds, None);
        assert_eq!(view.holder_cell(), "<none>");
    }

    #[test]
    fn table_is_aligned_with_a_header() {
        let now = ts("2025-01-02T03:04:10Z");
        let mut other = lease("");
        other.metadata.name = Some("b".into());
        let text = table(&[
            LeaseView::new(&lease("pod-a"), now),
            LeaseView::new(&other, now),
        ]);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 3, "{text}");
        assert_eq!(
            lines[0],
            "NAME      HOLDER   DURATION   ACQUIRED               RENEWED                TRANSITIONS   EXPIRES IN (EST.)"
        );
        assert_eq!(
            lines[1],
            "my-lock   pod-a    15s        2025-01-02T03:04:00Z   2025-01-02T03:04:05Z   3             10.5s"
        );
        assert_eq!(
            lines[2],
            "b         <none>   15s        2025-01-02T03:04:00Z   2025-01-02T03:04:05Z   3             -"
        );
    }
}
