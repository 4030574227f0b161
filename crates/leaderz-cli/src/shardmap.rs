//! `leaderz status --shards SET`: a shard set's members and who owns each shard, from
//! its Leases.

use std::collections::BTreeMap;

use jiff::Timestamp;
use k8s_openapi::api::coordination::v1::Lease;
use leaderz::shards::{COUNT_LABEL, ROLE_LABEL, ROLE_MEMBER, ROLE_SHARD, SET_LABEL, SHARD_LABEL};
use serde::Serialize;

use crate::leases::LeaseView;
use crate::text::printable;

/// One shard set as its Leases show it.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct ShardMap {
    pub(crate) name: String,
    pub(crate) namespace: String,
    /// The number of shards, as the members' Leases say (the highest, if they differ).
    pub(crate) shards: Option<u32>,
    /// Member Leases that have a holder and have not expired (estimated on this
    /// machine's clock).
    pub(crate) members: Vec<Member>,
    /// Every shard Lease, by shard.
    pub(crate) owners: Vec<ShardOwner>,
}

/// A live member.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct Member {
    pub(crate) identity: String,
    pub(crate) lease: String,
    /// How many shards it holds now.
    pub(crate) owns: usize,
    pub(crate) expires_in_seconds: Option<f64>,
}

/// A shard and its holder.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct ShardOwner {
    pub(crate) shard: u32,
    /// `null` when nobody holds it (released, or expired by the estimate).
    pub(crate) holder_identity: Option<String>,
    /// The fencing token of the holder's term.
    pub(crate) lease_transitions: Option<i32>,
    pub(crate) expires_in_seconds: Option<f64>,
}

fn label<'a>(lease: &'a Lease, key: &str) -> Option<&'a str> {
    lease.metadata.labels.as_ref()?.get(key).map(String::as_str)
}

fn live_holder(view: &LeaseView) -> Option<String> {
    view.holder_identity
        .clone()
        .filter(|h| !h.is_empty() && view.expires_in_seconds.is_some_and(|s| s > 0.0))
}

impl ShardMap {
    /// The map of set `name` from the Leases labelled with it.
    pub(crate) fn new(name: &str, namespace: &str, leases: &[Lease], now: Timestamp) -> Self {
        let of_set = || leases.iter().filter(|l| label(l, SET_LABEL) == Some(name));
        let mut owners: Vec<ShardOwner> = of_set()
            .filter(|l| label(l, ROLE_LABEL) == Some(ROLE_SHARD))
            .filter_map(|l| {
                let shard = label(l, SHARD_LABEL)?.parse().ok()?;
                let view = LeaseView::new(l, now);
                let holder = live_holder(&view);
                Some(ShardOwner {
                    shard,
                    expires_in_seconds: holder.as_ref().and(view.expires_in_seconds),
                    lease_transitions: view.lease_transitions,
                    holder_identity: holder,
                })
            })
            .collect();
        owners.sort_by_key(|o| o.shard);
        let mut counts: BTreeMap<&str, usize> = BTreeMap::new();
        for o in &owners {
            if let Some(h) = &o.holder_identity {
                *counts.entry(h.as_str()).or_default() += 1;
            }
        }
        let member_leases: Vec<&Lease> = of_set()
            .filter(|l| label(l, ROLE_LABEL) == Some(ROLE_MEMBER))
            .collect();
        let shards = member_leases
            .iter()
            .filter_map(|l| label(l, COUNT_LABEL)?.parse().ok())
            .max();
        let mut members: Vec<Member> = member_leases
            .iter()
            .filter_map(|l| {
                let view = LeaseView::new(l, now);
                let identity = live_holder(&view)?;
                Some(Member {
                    owns: counts.get(identity.as_str()).copied().unwrap_or(0),
                    identity,
                    lease: view.name.clone(),
                    expires_in_seconds: view.expires_in_seconds,
                })
            })
            .collect();
        members.sort_by(|a, b| a.identity.cmp(&b.identity));
        Self {
            name: name.to_owned(),
            namespace: namespace.to_owned(),
            shards,
            members,
            owners,
        }
    }

    /// The names of the shard sets among `leases`.
    pub(crate) fn sets(leases: &[Lease]) -> Vec<String> {
        let mut sets: Vec<String> = leases
            .iter()
            .filter_map(|l| label(l, SET_LABEL).map(str::to_owned))
            .collect();
        sets.sort();
        sets.dedup();
        sets
    }

    fn unowned(&self) -> usize {
        let known = self.shards.map_or(self.owners.len(), |s| s as usize);
        let owned = self
            .owners
            .iter()
            .filter(|o| o.holder_identity.is_some())
            .count();
        known.saturating_sub(owned)
    }

    /// One line: `shard set jobs: 64 shards, 3 members (a 22, b 21, c 21), 0 unowned`.
    pub(crate) fn summary(&self) -> String {
        let members: Vec<String> = self
            .members
            .iter()
            .map(|m| format!("{} {}", printable(&m.identity), m.owns))
            .collect();
        format!(
            "shard set {}: {} shards, {} members ({}), {} unowned",
            self.name,
            self.shards
                .map_or_else(|| "?".to_owned(), |s| s.to_string()),
            self.members.len(),
            members.join(", "),
            self.unowned()
        )
    }

    /// The summary, the members and every shard, for people.
    pub(crate) fn table(&self) -> String {
        let mut out = format!("{}\n\nMEMBER", self.summary());
        let width = self
            .members
            .iter()
            .map(|m| printable(&m.identity).chars().count())
            .chain(self.owners.iter().filter_map(|o| {
                o.holder_identity
                    .as_ref()
                    .map(|h| printable(h).chars().count())
            }))
            .max()
            .unwrap_or(6)
            .max(6);
        out.push_str(&" ".repeat(width - 6 + 3));
        out.push_str("SHARDS\n");
        for m in &self.members {
            out.push_str(&format!(
                "{:<width$}   {}\n",
                printable(&m.identity),
                m.owns
            ));
        }
        out.push_str(&format!("\nSHARD   {:<width$}   TOKEN\n", "HOLDER"));
        for o in &self.owners {
            let holder = o
                .holder_identity
                .as_deref()
                .map_or_else(|| "<none>".to_owned(), |h| printable(h).into_owned());
            let token = o
                .lease_transitions
                .map_or_else(|| "-".to_owned(), |t| t.to_string());
            out.push_str(&format!("{:<5}   {holder:<width$}   {token}\n", o.shard));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use k8s_openapi::api::coordination::v1::LeaseSpec;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
    use kube::api::ObjectMeta;

    fn lease(name: &str, labels: &[(&str, &str)], holder: &str, transitions: i32) -> Lease {
        Lease {
            metadata: ObjectMeta {
                name: Some(name.into()),
                namespace: Some("ns".into()),
                labels: Some(
                    labels
                        .iter()
                        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                        .collect(),
                ),
                ..Default::default()
            },
            spec: Some(LeaseSpec {
                holder_identity: Some(holder.into()),
                lease_duration_seconds: Some(15),
                renew_time: Some(MicroTime("2025-01-02T03:04:05Z".parse().unwrap())),
                lease_transitions: Some(transitions),
                ..Default::default()
            }),
        }
    }

    #[test]
    fn members_shards_and_the_unowned_from_the_leases() {
        let member = |id: &str| {
            lease(
                &format!("jobs-member-{id}"),
                &[
                    (SET_LABEL, "jobs"),
                    (ROLE_LABEL, ROLE_MEMBER),
                    (COUNT_LABEL, "3"),
                ],
                id,
                0,
            )
        };
        let shard = |i: &str, holder: &str, t| {
            lease(
                &format!("jobs-{i}"),
                &[
                    (SET_LABEL, "jobs"),
                    (ROLE_LABEL, ROLE_SHARD),
                    (SHARD_LABEL, i),
                ],
                holder,
                t,
            )
        };
        let leases = vec![
            member("a"),
            member("b"),
            shard("0", "a", 4),
            shard("1", "b", 2),
            shard("2", "", 7),
            lease("other", &[], "x", 0),
        ];
        let now = "2025-01-02T03:04:10Z".parse().unwrap();
        assert_eq!(ShardMap::sets(&leases), vec!["jobs".to_owned()]);
        let map = ShardMap::new("jobs", "ns", &leases, now);
        assert_eq!(map.shards, Some(3));
        assert_eq!(map.members.len(), 2);
        assert_eq!((map.members[0].owns, map.members[1].owns), (1, 1));
        assert_eq!(map.owners[2].holder_identity, None);
        assert_eq!(map.owners[2].lease_transitions, Some(7));
        assert_eq!(
            map.summary(),
            "shard set jobs: 3 shards, 2 members (a 1, b 1), 1 unowned"
        );
        let table = map.table();
        assert!(table.contains("\n0       a        4\n"), "{table}");
        assert!(table.contains("\n2       <none>   7\n"), "{table}");
        // Long expired: nobody counts.
        let later = "2025-01-02T03:05:00Z".parse().unwrap();
        let map = ShardMap::new("jobs", "ns", &leases, later);
        assert!(map.members.is_empty());
        assert_eq!(map.unowned(), 3);
    }
}
