//! `leaderz watch`: a line each time a Lease's holder or transitions change, or its
//! strategy, preferred holder, pending handoff or candidates.
//!
//! A single-object watch (`fieldSelector=metadata.name=NAME`, which RBAC can limit to
//! the Lease's `resourceNames`), reopened when the server ends it, and restarted from
//! the current state after `410 Gone`. The Lease's LeaseCandidates are watched alongside
//! (kube-runtime's watcher on the namespace's candidates, filtered by `spec.leaseName`
//! here) when the API server serves them and the caller may list and watch them;
//! otherwise the lines say why not.

use std::time::Duration;

use futures::stream::BoxStream;
use futures::{StreamExt, TryStreamExt};
use jiff::Timestamp;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::coordination::v1beta1::LeaseCandidate;
use kube::api::{WatchEvent, WatchParams};
use kube::runtime::reflector::{self, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client};
use serde::Serialize;
use tokio::time::timeout;
use tracing::{debug, warn};

use crate::candidates::{self, CandidateKey, CandidateView, Listing};
use crate::cli::{Output, WatchArgs};
use crate::cluster;
use crate::error::CliError;
use crate::leases::{API_TIMEOUT, HandoffView, LeaseView, api_error, call, is_fatal, time_cell};
use crate::signals::Signals;
use crate::text::printable;

/// How long the server keeps one watch open.
const WATCH_TIMEOUT_SECS: u32 = 290;
/// The longest pause between attempts after the watch failed.
const MAX_BACKOFF: Duration = Duration::from_secs(30);

/// Watches until SIGTERM/SIGINT (exit 0) or an error retrying cannot fix.
pub(crate) async fn watch(args: WatchArgs) -> Result<u8, CliError> {
    let name = args.name;
    cluster::check_lease_name(&name)?;
    let config = cluster::load_config().await?;
    let namespace = cluster::namespace(args.namespace.namespace.as_deref(), &config)?;
    let client = cluster::connect(config).await?;
    let api: Api<Lease> = Api::namespaced(client.clone(), &namespace);
    let mut signals = Signals::install()?;
    let mut printer = Printer::new(args.output.format, &name, &namespace);

    let current = call("get", &namespace, api.get_opt(&name)).await?;
    let mut candidates = CandidateWatch::start(client, &namespace, &name).await;
    printer.show(current.as_ref(), &candidates.listing);
    let mut lease = current;
    // Empty: start from the current state (the server sends it as ADDED).
    let mut version = lease
        .as_ref()
        .and_then(|l| l.metadata.resource_version.clone())
        .unwrap_or_default();
    let params = WatchParams::default()
        .fields(&format!("metadata.name={name}"))
        .timeout(WATCH_TIMEOUT_SECS);
    let mut backoff = Duration::from_secs(1);
    loop {
        let opened = tokio::select! {
            _ = signals.recv() => return Ok(0),
            r = timeout(API_TIMEOUT, api.watch(&params, &version)) => r,
        };
        let stream = match opened {
            Ok(Ok(stream)) => Ok(stream.boxed()),
            Ok(Err(kube::Error::Api(status))) if status.code == 410 => {
                debug!("the version is too old (410 Gone); watching from the current state");
                version.clear();
                continue;
            }
            Ok(Err(e)) if is_fatal(&e) => return Err(api_error("watch", &namespace, e)),
            Ok(Err(e)) => Err(api_error("watch", &namespace, e).to_string()),
            Err(_) => Err(format!("no answer within {API_TIMEOUT:?}")),
        };
        let mut stream = match stream {
            Ok(stream) => stream,
            Err(e) => {
                warn!(error = %e, retry_in = ?backoff, "cannot watch the lease");
                tokio::select! {
                    _ = signals.recv() => return Ok(0),
                    () = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(MAX_BACKOFF);
                continue;
            }
        };
        loop {
            let event = tokio::select! {
                _ = signals.recv() => return Ok(0),
                event = stream.next() => event,
                changed = candidates.changed() => {
                    if changed {
                        printer.show(lease.as_ref(), &candidates.listing);
                    }
                    continue;
                }
            };
            match event {
                None => {
                    debug!("the server ended the watch; watching again");
                    break;
                }
                Some(Ok(WatchEvent::Added(l) | WatchEvent::Modified(l))) => {
                    backoff = Duration::from_secs(1);
                    version = l.metadata.resource_version.clone().unwrap_or_default();
                    printer.show(Some(&l), &candidates.listing);
                    lease = Some(l);
                }
                Some(Ok(WatchEvent::Deleted(l))) => {
                    version = l.metadata.resource_version.unwrap_or_default();
                    printer.show(None, &candidates.listing);
                    lease = None;
                }
                Some(Ok(WatchEvent::Bookmark(b))) => version = b.metadata.resource_version,
                Some(Ok(WatchEvent::Error(status))) if status.code == 410 => {
                    debug!("watch expired (410 Gone); restarting from the current state");
                    version.clear();
                    break;
                }
                Some(Ok(WatchEvent::Error(status))) => {
                    warn!(code = status.code, message = %status.message, "the watch failed; watching again");
                    break;
                }
                Some(Err(e)) if is_fatal(&e) => return Err(api_error("watch", &namespace, e)),
                Some(Err(kube::Error::Api(status))) if status.code == 410 => {
                    version.clear();
                    break;
                }
                Some(Err(e)) => {
                    warn!(error = %e, "the watch failed; watching again");
                    break;
                }
            }
        }
    }
}

/// The reflector's events, of which only the errors matter (the store has the state).
type WatcherStream = BoxStream<'static, Result<(), watcher::Error>>;

/// The Lease's candidates: listed once, then kept up to date by a watcher while the
/// API server serves them and the caller may list and watch them.
struct CandidateWatch {
    listing: Listing,
    namespace: String,
    lease: String,
    store: Option<(Store<LeaseCandidate>, WatcherStream)>,
}

impl CandidateWatch {
    async fn start(client: Client, namespace: &str, lease: &str) -> Self {
        let listing = candidates::list(client.clone(), namespace, Some(lease)).await;
        let store = matches!(listing, Listing::Listed(_)).then(|| {
            let api: Api<LeaseCandidate> = Api::namespaced(client, namespace);
            let (reader, writer) = reflector::store();
            let stream = reflector::reflector(writer, watcher(api, watcher::Config::default()))
                .default_backoff()
                .map_ok(|_| ())
                .boxed();
            (reader, stream)
        });
        Self {
            listing,
            namespace: namespace.to_owned(),
            lease: lease.to_owned(),
            store,
        }
    }

    /// Waits for the next change the watcher reports (never, if it is not running);
    /// whether the listing changed.
    async fn changed(&mut self) -> bool {
        let Some((reader, stream)) = &mut self.store else {
            return std::future::pending().await;
        };
        let listing = match stream.next().await {
            Some(Ok(())) => {
                let items: Vec<LeaseCandidate> =
                    reader.state().iter().map(|c| (**c).clone()).collect();
                Listing::of(&candidates::of_lease(items, Some(&self.lease)))
            }
            Some(Err(e)) => {
                let inner = match &e {
                    watcher::Error::InitialListFailed(e)
                    | watcher::Error::WatchStartFailed(e)
                    | watcher::Error::WatchFailed(e) => Some(e),
                    _ => None,
                };
                match inner {
                    Some(k @ kube::Error::Api(s)) if s.code == 403 || s.code == 404 => {
                        // Refused (or no longer served): say so, and stop watching them.
                        let why = candidates::unavailable(k, &self.namespace);
                        self.store = None;
                        Listing::Unavailable(why)
                    }
                    _ => {
                        debug!(error = %e, "the watch of lease candidates failed; retrying");
                        return false;
                    }
                }
            }
            None => {
                self.store = None;
                return false;
            }
        };
        let changed = key_of(&listing) != key_of(&self.listing);
        self.listing = listing;
        changed
    }
}

/// What of a listing `watch` prints a line for: who the candidates are and what they
/// offer, or why they cannot be shown (not their renewal times).
fn key_of(listing: &Listing) -> Result<Vec<CandidateKey>, String> {
    match listing {
        Listing::Listed(by_lease) => Ok(by_lease
            .values()
            .flatten()
            .map(CandidateView::key)
            .collect()),
        Listing::Unavailable(why) => Err(why.clone()),
    }
}

/// What a printed line depends on: whether the Lease exists, its holder, transitions,
/// strategy, preferred holder and handoff, and the candidates.
type Key = (
    Option<(
        Option<String>,
        Option<i32>,
        Option<String>,
        Option<String>,
        Option<HandoffView>,
    )>,
    Result<Vec<CandidateKey>, String>,
);

/// Prints a line when what matters differs from the last line printed.
struct Printer {
    format: Output,
    name: String,
    namespace: String,
    last: Option<Key>,
}

/// A `watch -o json` line.
#[derive(Serialize)]
struct JsonLine<'a> {
    /// When this process saw the change (wall clock).
    time: String,
    /// Whether the Lease exists.
    exists: bool,
    #[serde(flatten)]
    lease: &'a LeaseView,
}

impl Printer {
    fn new(format: Output, name: &str, namespace: &str) -> Self {
        Self {
            format,
            name: name.to_owned(),
            namespace: namespace.to_owned(),
            last: None,
        }
    }

    fn show(&mut self, lease: Option<&Lease>, candidates: &Listing) {
        if let Some(line) = self.line(lease, candidates, Timestamp::now()) {
            println!("{line}");
        }
    }

    /// The line to print for `lease` at `now`, if it differs from the last one.
    fn line(
        &mut self,
        lease: Option<&Lease>,
        candidates: &Listing,
        now: Timestamp,
    ) -> Option<String> {
        let view = match lease {
            Some(l) => LeaseView::new(l, now),
            None => LeaseView::absent(&self.name, &self.namespace),
        }
        .with_candidates(candidates);
        let key = (
            lease.map(|_| {
                (
                    view.holder_identity.clone(),
                    view.lease_transitions,
                    view.strategy.clone(),
                    view.preferred_holder.clone(),
                    view.handoff.clone(),
                )
            }),
            key_of(candidates),
        );
        let first = self.last.is_none();
        if self.last.as_ref() == Some(&key) {
            return None;
        }
        let candidates_changed = self.last.as_ref().is_none_or(|last| last.1 != key.1);
        self.last = Some(key);
        let time = now.strftime("%Y-%m-%dT%H:%M:%SZ").to_string();
        Some(match self.format {
            Output::Json => serde_json::to_string(&JsonLine {
                time,
                exists: lease.is_some(),
                lease: &view,
            })
            .unwrap_or_default(),
            Output::Table => {
                let holder = if lease.is_some() {
                    view.holder_cell()
                } else {
                    "<no lease>".to_owned()
                };
                let transitions = view
                    .lease_transitions
                    .map_or_else(|| "-".to_owned(), |t| t.to_string());
                let row = format!(
                    "{time:<20}   {holder:<30}   {transitions:<11}   {:<20}   {}",
                    time_cell(view.acquire_time.as_ref()),
                    details(&view, candidates_changed)
                );
                let row = row.trim_end().to_owned();
                if first {
                    format!(
                        "{:<20}   {:<30}   {:<11}   {:<20}   DETAILS\n{row}",
                        "TIME", "HOLDER", "TRANSITIONS", "ACQUIRED"
                    )
                } else {
                    row
                }
            }
        })
    }
}

/// The DETAILS column: strategy, preferred holder and handoff where there are any, and,
/// if `candidates` (on the first line, and when they changed), the candidates or why
/// they cannot be shown.
fn details(view: &LeaseView, candidates: bool) -> String {
    let mut parts = Vec::new();
    if let Some(s) = &view.strategy {
        parts.push(format!("strategy {}", printable(s)));
    }
    if let Some(p) = &view.preferred_holder {
        parts.push(format!("preferred holder {}", printable(p)));
    }
    if let Some(h) = &view.handoff {
        parts.push(format!("handoff {}", h.cell()));
    }
    match (&view.candidates, &view.candidates_unavailable) {
        _ if !candidates => {}
        (Some(c), _) if c.is_empty() => parts.push("no candidates".to_owned()),
        (Some(c), _) => {
            let names: Vec<String> = c
                .iter()
                .map(|c| {
                    format!(
                        "{} ({})",
                        printable(&c.name),
                        printable(c.emulation_version.as_deref().unwrap_or(&c.binary_version))
                    )
                })
                .collect();
            parts.push(format!("candidates {}", names.join(", ")));
        }
        (None, Some(why)) => parts.push(format!("candidates {why}")),
        _ => {}
    }
    parts.join("; ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::coordination::v1::LeaseSpec;
    use serde_json::{Value, json};

    fn lease(holder: &str, transitions: i32, renew: &str) -> Lease {
        Lease {
            metadata: kube::api::ObjectMeta {
                name: Some("l".into()),
                namespace: Some("ns".into()),
                ..Default::default()
            },
            spec: Some(LeaseSpec {
                holder_identity: Some(holder.into()),
                lease_transitions: Some(transitions),
                renew_time: Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime(
                    renew.parse().unwrap(),
                )),
                lease_duration_seconds: Some(15),
                ..Default::default()
            }),
        }
    }

    fn none() -> Listing {
        Listing::of(&[])
    }

    #[test]
    fn prints_only_holder_and_transition_changes() {
        let now: Timestamp = "2025-01-02T03:04:05Z".parse().unwrap();
        let mut p = Printer::new(Output::Table, "l", "ns");
        let first = p.line(None, &none(), now).unwrap();
        assert_eq!(first.lines().count(), 2, "{first}");
        assert!(first.starts_with("TIME"), "{first}");
        assert!(first.contains("<no lease>"), "{first}");
        let a = lease("a", 0, "2025-01-02T03:04:05Z");
        assert!(p.line(Some(&a), &none(), now).unwrap().contains(" a "));
        // A renewal changes neither holder nor transitions.
        let renewed = lease("a", 0, "2025-01-02T03:04:07Z");
        assert_eq!(p.line(Some(&renewed), &none(), now), None);
        let released = lease("", 0, "2025-01-02T03:04:08Z");
        assert!(
            p.line(Some(&released), &none(), now)
                .unwrap()
                .contains("<none>")
        );
        let b = lease("b", 1, "2025-01-02T03:04:09Z");
        let line = p.line(Some(&b), &none(), now).unwrap();
        assert_eq!(line.lines().count(), 1);
        assert!(line.contains(" b ") && line.contains(" 1 "), "{line}");
        assert!(p.line(None, &none(), now).unwrap().contains("<no lease>"));
    }

    #[test]
    fn prints_strategy_preferred_holder_handoff_and_candidate_changes() {
        use crate::candidates::tests::candidate;
        use leaderz::record::{HANDOFF_ANNOTATION, Handoff, HandoffState};
        let now: Timestamp = "2025-01-02T03:04:05Z".parse().unwrap();
        let mut p = Printer::new(Output::Table, "l", "ns");
        let mut a = lease("a", 0, "2025-01-02T03:04:05Z");
        let first = p.line(Some(&a), &none(), now).unwrap();
        assert!(first.ends_with("no candidates"), "{first}");
        let h = Handoff::request(Some("b".into()), "h1");
        a.metadata.annotations = Some([(HANDOFF_ANNOTATION.into(), h.to_annotation())].into());
        let line = p.line(Some(&a), &none(), now).unwrap();
        assert!(line.ends_with("handoff requested for b (id h1)"), "{line}");
        let h = h.step(HandoffState::Accepted, "b");
        a.metadata.annotations = Some([(HANDOFF_ANNOTATION.into(), h.to_annotation())].into());
        let line = p.line(Some(&a), &none(), now).unwrap();
        assert!(line.ends_with("handoff accepted by b (id h1)"), "{line}");
        // A candidate joins: printed with its emulation version.
        let joined = Listing::of(&[candidate("c", "l", "1.33.0")]);
        let line = p.line(Some(&a), &joined, now).unwrap();
        assert!(line.ends_with("; candidates c (1.33.0)"), "{line}");
        // Its renewal (a ping) is not news.
        let mut renewed = candidate("c", "l", "1.33.0");
        renewed.spec.as_mut().unwrap().renew_time = None;
        assert_eq!(p.line(Some(&a), &Listing::of(&[renewed]), now), None);
        let spec = a.spec.as_mut().unwrap();
        spec.strategy = Some("OldestEmulationVersion".into());
        spec.preferred_holder = Some("c".into());
        let line = p.line(Some(&a), &joined, now).unwrap();
        assert!(
            line.contains(
                "strategy OldestEmulationVersion; preferred holder c; handoff accepted by b"
            ),
            "{line}"
        );
        // Candidates are named again only when they change.
        assert!(!line.contains("candidates"), "{line}");
        let gone = Listing::Unavailable(crate::candidates::NOT_SERVED.into());
        let line = p.line(Some(&a), &gone, now).unwrap();
        assert!(
            line.ends_with(&format!("candidates {}", crate::candidates::NOT_SERVED)),
            "{line}"
        );
    }

    #[test]
    fn json_lines_are_the_status_fields_plus_time_and_existence() {
        let now: Timestamp = "2025-01-02T03:04:05Z".parse().unwrap();
        let mut p = Printer::new(Output::Json, "l", "ns");
        let line: Value = serde_json::from_str(&p.line(None, &none(), now).unwrap()).unwrap();
        assert_eq!(line["exists"], false);
        assert_eq!(line["holderIdentity"], Value::Null);
        let a = lease("a", 2, "2025-01-02T03:04:00Z");
        let line: Value = serde_json::from_str(&p.line(Some(&a), &none(), now).unwrap()).unwrap();
        assert_eq!(
            line,
            json!({
                "time": "2025-01-02T03:04:05Z",
                "exists": true,
                "name": "l",
                "namespace": "ns",
                "holderIdentity": "a",
                "leaseDurationSeconds": 15,
                "acquireTime": null,
                "renewTime": "2025-01-02T03:04:00.000000Z",
                "leaseTransitions": 2,
                "expiresInSeconds": 10.0,
                "strategy": null,
                "preferredHolder": null,
                "handoff": null,
                "candidates": [],
                "candidatesUnavailable": null,
            })
        );
    }
}
