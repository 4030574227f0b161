//! `leaderz watch`: a line each time a Lease's holder or transitions change.
//!
//! A single-object watch (`fieldSelector=metadata.name=NAME`, which RBAC can limit to
//! the Lease's `resourceNames`), reopened when the server ends it, and restarted from
//! the current state after `410 Gone`.

use std::time::Duration;

use futures::StreamExt;
use jiff::Timestamp;
use k8s_openapi::api::coordination::v1::Lease;
use kube::Api;
use kube::api::{WatchEvent, WatchParams};
use serde::Serialize;
use tokio::time::timeout;
use tracing::{debug, warn};

use crate::cli::{Output, WatchArgs};
use crate::cluster;
use crate::error::CliError;
use crate::leases::{API_TIMEOUT, LeaseView, api_error, call, is_fatal, time_cell};
use crate::signals::Signals;

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
    let api: Api<Lease> = Api::namespaced(cluster::connect(config).await?, &namespace);
    let mut signals = Signals::install()?;
    let mut printer = Printer::new(args.output.format, &name, &namespace);

    let current = call("get", &namespace, api.get_opt(&name)).await?;
    printer.show(current.as_ref());
    // Empty: start from the current state (the server sends it as ADDED).
    let mut version = current
        .and_then(|l| l.metadata.resource_version)
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
            };
            match event {
                None => {
                    debug!("the server ended the watch; watching again");
                    break;
                }
                Some(Ok(WatchEvent::Added(lease) | WatchEvent::Modified(lease))) => {
                    backoff = Duration::from_secs(1);
                    version = lease.metadata.resource_version.clone().unwrap_or_default();
                    printer.show(Some(&lease));
                }
                Some(Ok(WatchEvent::Deleted(lease))) => {
                    version = lease.metadata.resource_version.unwrap_or_default();
                    printer.show(None);
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

/// Prints a line when what matters (whether the Lease exists, its holder, its
/// transitions) differs from the last line printed.
struct Printer {
    format: Output,
    name: String,
    namespace: String,
    last: Option<Option<(Option<String>, Option<i32>)>>,
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

    fn show(&mut self, lease: Option<&Lease>) {
        if let Some(line) = self.line(lease, Timestamp::now()) {
            println!("{line}");
        }
    }

    /// The line to print for `lease` at `now`, if it differs from the last one.
    fn line(&mut self, lease: Option<&Lease>, now: Timestamp) -> Option<String> {
        let view = match lease {
            Some(l) => LeaseView::new(l, now),
            None => LeaseView::absent(&self.name, &self.namespace),
        };
        let key = lease.map(|_| (view.holder_identity.clone(), view.lease_transitions));
        let first = self.last.is_none();
        if self.last.as_ref() == Some(&key) {
            return None;
        }
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
                    "{time:<20}   {holder:<30}   {transitions:<11}   {}",
                    time_cell(view.acquire_time.as_ref())
                );
                if first {
                    format!(
                        "{:<20}   {:<30}   {:<11}   ACQUIRED\n{row}",
                        "TIME", "HOLDER", "TRANSITIONS"
                    )
                } else {
                    row
                }
            }
        })
    }
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

    #[test]
    fn prints_only_holder_and_transition_changes() {
        let now: Timestamp = "2025-01-02T03:04:05Z".parse().unwrap();
        let mut p = Printer::new(Output::Table, "l", "ns");
        let first = p.line(None, now).unwrap();
        assert_eq!(first.lines().count(), 2, "{first}");
        assert!(first.starts_with("TIME"), "{first}");
        assert!(first.contains("<no lease>"), "{first}");
        let a = lease("a", 0, "2025-01-02T03:04:05Z");
        assert!(p.line(Some(&a), now).unwrap().contains(" a "));
        // A renewal changes neither holder nor transitions.
        let renewed = lease("a", 0, "2025-01-02T03:04:07Z");
        assert_eq!(p.line(Some(&renewed), now), None);
        let released = lease("", 0, "2025-01-02T03:04:08Z");
        assert!(p.line(Some(&released), now).unwrap().contains("<none>"));
        let b = lease("b", 1, "2025-01-02T03:04:09Z");
        let line = p.line(Some(&b), now).unwrap();
        assert_eq!(line.lines().count(), 1);
        assert!(line.contains(" b ") && line.contains(" 1 "), "{line}");
        assert!(p.line(None, now).unwrap().contains("<no lease>"));
    }

    #[test]
    fn json_lines_are_the_status_fields_plus_time_and_existence() {
        let now: Timestamp = "2025-01-02T03:04:05Z".parse().unwrap();
        let mut p = Printer::new(Output::Json, "l", "ns");
        let line: Value = serde_json::from_str(&p.line(None, now).unwrap()).unwrap();
        assert_eq!(line["exists"], false);
        assert_eq!(line["holderIdentity"], Value::Null);
        let a = lease("a", 2, "2025-01-02T03:04:00Z");
        let line: Value = serde_json::from_str(&p.line(Some(&a), now).unwrap()).unwrap();
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
            })
        );
    }
}
