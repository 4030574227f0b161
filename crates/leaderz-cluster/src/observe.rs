//! Watching the story from outside: who holds a Lease (every version, as it happens) and
//! every line every pod logs (followed from the moment a pod's container runs, kept after
//! the pod is gone). Used by the pod tests and `cargo xtask demo`.

use std::{
    collections::{BTreeMap, HashSet},
    sync::{Arc, Mutex, PoisonError},
    time::Duration,
};

use futures::{AsyncBufReadExt as _, StreamExt as _, TryStreamExt as _};
use k8s_openapi::api::{coordination::v1::Lease, core::v1::Pod};
use kube::{
    Api, Client,
    api::LogParams,
    runtime::{WatchStreamExt as _, watcher},
};
use tokio::{sync::watch, task::JoinHandle, time::Instant};

use crate::error::{Error, Result};

/// One version of a Lease, as seen by the watch.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct LeaseVersion {
    /// `spec.holderIdentity` (`""` after a release).
    pub holder: String,
    /// `spec.leaseTransitions`.
    pub transitions: i32,
    /// `spec.renewTime` (written by the holder), if set.
    pub renew_time: Option<jiff::Timestamp>,
    /// `spec.acquireTime`, if set.
    pub acquire_time: Option<jiff::Timestamp>,
    /// When this process saw it (monotonic).
    pub seen_at: Instant,
}

/// Follows one Lease with a watch and keeps every version seen.
#[derive(Debug)]
pub struct LeaseWatch {
    current: watch::Receiver<Option<LeaseVersion>>,
    history: Arc<Mutex<Vec<LeaseVersion>>>,
    task: JoinHandle<()>,
}

fn micro_time(
    t: Option<&k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime>,
) -> Option<jiff::Timestamp> {
    t.map(|t| t.0)
}

impl LeaseWatch {
    /// Starts watching Lease `namespace/name` (it need not exist yet).
    pub fn start(client: Client, namespace: &str, name: &str) -> Self {
        let api: Api<Lease> = Api::namespaced(client, namespace);
        let (send, current) = watch::channel(None);
        let history = Arc::new(Mutex::new(Vec::new()));
        let kept = Arc::clone(&history);
        let config = watcher::Config::default().fields(&format!("metadata.name={name}"));
        let task = tokio::spawn(async move {
            let mut events = watcher(api, config)
                .default_backoff()
                .applied_objects()
                .boxed();
            while let Some(event) = events.next().await {
                let Ok(lease) = event else { continue };
                let spec = lease.spec.unwrap_or_default();
                let version = LeaseVersion {
                    holder: spec.holder_identity.unwrap_or_default(),
                    transitions: spec.lease_transitions.unwrap_or(0),
                    renew_time: micro_time(spec.renew_time.as_ref()),
                    acquire_time: micro_time(spec.acquire_time.as_ref()),
                    seen_at: Instant::now(),
                };
                kept.lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .push(version.clone());
                send.send_replace(Some(version));
            }
        });
        Self {
            current,
            history,
            task,
        }
    }

    /// The holder now (`None` before the Lease exists or while it is released).
    pub fn holder(&self) -> Option<String> {
        self.current
            .borrow()
            .as_ref()
            .map(|v| v.holder.clone())
            .filter(|h| !h.is_empty())
    }

    /// Every version seen so far, in order.
    pub fn history(&self) -> Vec<LeaseVersion> {
        self.history
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Waits until the holder satisfies `done` (`None`: nobody holds it); returns that
    /// version.
    pub async fn wait_for(
        &self,
        what: &str,
        timeout: Duration,
        mut done: impl FnMut(Option<&str>) -> bool,
    ) -> Result<LeaseVersion> {
        let mut current = self.current.clone();
        let waited = tokio::time::timeout(timeout, async {
            loop {
                if let Some(version) = current.borrow_and_update().as_ref() {
                    let holder = Some(version.holder.as_str()).filter(|h| !h.is_empty());
                    if done(holder) {
                        return Some(version.clone());
                    }
                }
                if current.changed().await.is_err() {
                    return None;
                }
            }
        })
        .await;
        match waited {
            Ok(Some(version)) => Ok(version),
            _ => Err(Error::Timeout {
                what: what.to_owned(),
                timeout,
                detail: format!(": holder now {:?}", self.holder()),
            }),
        }
    }
}

impl Drop for LeaseWatch {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// One line a container logged.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct LogLine {
    /// The pod.
    pub pod: String,
    /// The container.
    pub container: String,
    /// The runtime's timestamp of the line.
    pub at: jiff::Timestamp,
    /// The line, without the timestamp and without terminal colours.
    pub text: String,
}

/// Follows the logs of every container of every pod matching a label selector, from the
/// moment each container runs; keeps the lines after the pods are gone.
#[derive(Debug)]
pub struct PodLogs {
    lines: Arc<Mutex<Vec<LogLine>>>,
    task: JoinHandle<()>,
}

impl PodLogs {
    /// Starts following pods matching `selector` in `namespace`.
    pub fn start(client: Client, namespace: &str, selector: &str) -> Self {
        let pods: Api<Pod> = Api::namespaced(client, namespace);
        let lines = Arc::new(Mutex::new(Vec::new()));
        let kept = Arc::clone(&lines);
        let config = watcher::Config::default().labels(selector);
        let task = tokio::spawn(async move {
            // (pod, container, container id): one follower per container instance.
            let mut following: HashSet<(String, String, String)> = HashSet::new();
            let mut followers = Vec::new();
            let mut events = watcher(pods.clone(), config)
                .default_backoff()
                .applied_objects()
                .boxed();
            while let Some(event) = events.next().await {
                let Ok(pod) = event else { continue };
                let Some(name) = pod.metadata.name.clone() else {
                    continue;
                };
                let status = pod.status.unwrap_or_default();
                let statuses = status
                    .init_container_statuses
                    .unwrap_or_default()
                    .into_iter()
                    .chain(status.container_statuses.unwrap_or_default());
                for container in statuses {
                    let running = container
                        .state
                        .as_ref()
                        .is_some_and(|s| s.running.is_some());
                    let Some(id) = container.container_id.filter(|_| running) else {
                        continue;
                    };
                    if !following.insert((name.clone(), container.name.clone(), id)) {
                        continue;
                    }
                    followers.push(tokio::spawn(follow(
                        pods.clone(),
                        name.clone(),
                        container.name,
                        Arc::clone(&kept),
                    )));
                }
            }
            for follower in followers {
                follower.abort();
            }
        });
        Self { lines, task }
    }

    /// Every line so far, in the order they arrived (per container: in order).
    pub fn lines(&self) -> Vec<LogLine> {
        self.lines
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// The lines of one pod (all its containers), ordered by timestamp.
    pub fn of(&self, pod: &str) -> Vec<LogLine> {
        let mut lines: Vec<LogLine> = self.lines().into_iter().filter(|l| l.pod == pod).collect();
        lines.sort_by_key(|l| l.at);
        lines
    }

    /// Every pod seen logging, with its lines ordered by timestamp.
    pub fn by_pod(&self) -> BTreeMap<String, Vec<LogLine>> {
        let mut by_pod: BTreeMap<String, Vec<LogLine>> = BTreeMap::new();
        for line in self.lines() {
            by_pod.entry(line.pod.clone()).or_default().push(line);
        }
        for lines in by_pod.values_mut() {
            lines.sort_by_key(|l| l.at);
        }
        by_pod
    }
}

impl LogLine {
    /// When the app says the line happened: the timestamp `tracing`'s formatter writes
    /// first on the line (the app's own clock, at the event), else the runtime's (when
    /// containerd read the line, later under load).
    pub fn app_time(&self) -> jiff::Timestamp {
        self.text
            .split_whitespace()
            .next()
            .and_then(|first| first.parse().ok())
            .unwrap_or(self.at)
    }
}

impl Drop for PodLogs {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Follows one container's log (timestamps on) until it ends, keeping each line.
async fn follow(pods: Api<Pod>, pod: String, container: String, into: Arc<Mutex<Vec<LogLine>>>) {
    let params = LogParams {
        container: Some(container.clone()),
        follow: true,
        timestamps: true,
        ..LogParams::default()
    };
    let Ok(stream) = pods.log_stream(&pod, &params).await else {
        return;
    };
    let mut lines = stream.lines();
    while let Ok(Some(line)) = lines.try_next().await {
        let Some((at, text)) = line.split_once(' ') else {
            continue;
        };
        let Ok(at) = at.parse::<jiff::Timestamp>() else {
            continue;
        };
        into.lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(LogLine {
                pod: pod.clone(),
                container: container.clone(),
                at,
                text: strip_ansi(text),
            });
    }
}

/// `text` without ANSI escape sequences (`ESC [ ... letter`).
pub fn strip_ansi(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_apps_own_timestamp_is_preferred() {
        let at: jiff::Timestamp = "2026-01-01T00:00:01Z".parse().unwrap();
        let line = |text: &str| LogLine {
            pod: "p".into(),
            container: "c".into(),
            at,
            text: text.into(),
        };
        assert_eq!(
            line("2026-01-01T00:00:00.5Z  INFO x: working...").app_time(),
            "2026-01-01T00:00:00.5Z".parse::<jiff::Timestamp>().unwrap()
        );
        assert_eq!(line("no timestamp here").app_time(), at);
    }

    #[test]
    fn ansi_colours_are_stripped() {
        assert_eq!(
            strip_ansi("\u{1b}[2m2026\u{1b}[0m \u{1b}[32m INFO\u{1b}[0m working..."),
            "2026  INFO working..."
        );
        assert_eq!(strip_ansi("plain"), "plain");
    }
}
