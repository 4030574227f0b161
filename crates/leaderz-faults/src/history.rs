//! The Lease's history as an admin sees it: a watch on one Lease recording every version
//! (and every deletion) with the wall-clock time it arrived.
//!
//! The watch survives API server and etcd restarts: it resumes from the last version it
//! saw, and after `410 Gone` starts again from a fresh list. Versions written between the
//! watch breaking and that list are lost to it (a restarted API server's watch cache
//! starts at the current version): such windows are recorded as [gaps](LeaseRecorder::gaps).

use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use futures::StreamExt as _;
use k8s_openapi::api::coordination::v1::Lease;
use kube::Api;
use kube::api::{ListParams, WatchEvent, WatchParams};
use serde::Serialize;
use tokio_util::sync::CancellationToken;

use crate::now_ns;

/// One version of the Lease, or its deletion.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct LeaseVersion {
    /// When the recorder received it (Unix ns, wall clock).
    pub received_ns: u64,
    /// Its resourceVersion.
    pub resource_version: String,
    /// The Lease was deleted (the other fields are its last contents).
    pub deleted: bool,
    /// `spec.holderIdentity` (`""` when absent).
    pub holder: String,
    /// `spec.leaseTransitions` (0 when absent).
    pub transitions: i32,
    /// `spec.leaseDurationSeconds`.
    pub duration_seconds: Option<i32>,
    /// `spec.renewTime` (Unix ns, the writer's wall clock).
    pub renew_ns: Option<i64>,
    /// `spec.acquireTime` (Unix ns, the writer's wall clock).
    pub acquire_ns: Option<i64>,
}

impl LeaseVersion {
    fn of(lease: &Lease, deleted: bool) -> Self {
        let spec = lease.spec.clone().unwrap_or_default();
        let ns = |t: Option<k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime>| {
            t.and_then(|t| i64::try_from(t.0.as_nanosecond()).ok())
        };
        Self {
            received_ns: now_ns(),
            resource_version: lease.metadata.resource_version.clone().unwrap_or_default(),
            deleted,
            holder: spec.holder_identity.unwrap_or_default(),
            transitions: spec.lease_transitions.unwrap_or(0),
            duration_seconds: spec.lease_duration_seconds,
            renew_ns: ns(spec.renew_time),
            acquire_ns: ns(spec.acquire_time),
        }
    }
}

/// Records one Lease's versions until dropped.
#[derive(Debug)]
pub struct LeaseRecorder {
    versions: Arc<Mutex<Vec<LeaseVersion>>>,
    gaps: Arc<Mutex<Vec<(u64, u64)>>>,
    stop: CancellationToken,
}

impl LeaseRecorder {
    /// Starts watching Lease `name` through `api` (an admin's). Returns once the watch is
    /// established (or after 10 s of trying).
    pub async fn start(api: Api<Lease>, name: &str) -> Self {
        let versions = Arc::new(Mutex::new(Vec::new()));
        let gaps = Arc::new(Mutex::new(Vec::new()));
        let stop = CancellationToken::new();
        let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
        tokio::spawn(record(
            api,
            name.to_owned(),
            (versions.clone(), gaps.clone()),
            stop.clone(),
            ready_tx,
        ));
        let _ = tokio::time::timeout(Duration::from_secs(10), ready_rx).await;
        Self {
            versions,
            gaps,
            stop,
        }
    }

    /// Windows (Unix ns, from the watch breaking to the fresh list after `410 Gone`) in
    /// which versions may have been written that the recorder never received.
    pub fn gaps(&self) -> Vec<(u64, u64)> {
        self.gaps
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Every version recorded so far, in arrival order.
    pub fn versions(&self) -> Vec<LeaseVersion> {
        self.versions
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// The latest version, if any.
    pub fn latest(&self) -> Option<LeaseVersion> {
        self.versions
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .last()
            .cloned()
    }
}

impl Drop for LeaseRecorder {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

#[allow(clippy::type_complexity)]
async fn record(
    api: Api<Lease>,
    name: String,
    (versions, gaps): (Arc<Mutex<Vec<LeaseVersion>>>, Arc<Mutex<Vec<(u64, u64)>>>),
    stop: CancellationToken,
    ready: tokio::sync::oneshot::Sender<()>,
) {
    let mut ready = Some(ready);
    // When the watch last broke without having delivered anything since.
    let mut broke_at: Option<u64> = None;
    // A 410 made us list afresh: versions since `broke_at` may be lost.
    let mut lost_since: Option<u64> = None;
    let push = |v: LeaseVersion| {
        let mut all = versions.lock().unwrap_or_else(PoisonError::into_inner);
        // A version seen again (a re-list after a restart) is not a new version.
        if !all
            .iter()
            .rev()
            .take(8)
            .any(|o| o.resource_version == v.resource_version && o.deleted == v.deleted)
        {
            all.push(v);
        }
    };
    let selector = format!("metadata.name={name}");
    let mut from: Option<String> = None;
    while !stop.is_cancelled() {
        let version = match &from {
            Some(v) => v.clone(),
            None => {
                let params = ListParams::default().fields(&selector);
                let listed = tokio::select! {
                    () = stop.cancelled() => return,
                    l = api.list(&params) => l,
                };
                match listed {
                    Ok(list) => {
                        if let Some(since) = lost_since.take() {
                            gaps.lock()
                                .unwrap_or_else(PoisonError::into_inner)
                                .push((since, now_ns()));
                        }
                        for lease in &list.items {
                            push(LeaseVersion::of(lease, false));
                        }
                        list.metadata.resource_version.unwrap_or_default()
                    }
                    Err(_) => {
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                }
            }
        };
        let params = WatchParams::default().fields(&selector).timeout(290);
        let stream = tokio::select! {
            () = stop.cancelled() => return,
            s = api.watch(&params, &version) => s,
        };
        let stream = match stream {
            Ok(s) => s,
            Err(kube::Error::Api(e)) if e.code == 410 => {
                lost_since = Some(broke_at.unwrap_or_else(now_ns));
                from = None;
                continue;
            }
            Err(_) => {
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        if let Some(ready) = ready.take() {
            let _ = ready.send(());
        }
        let mut stream = stream.boxed();
        from = Some(version);
        loop {
            let event = tokio::select! {
                () = stop.cancelled() => return,
                e = stream.next() => e,
            };
            match event {
                Some(Ok(WatchEvent::Added(l) | WatchEvent::Modified(l))) => {
                    broke_at = None;
                    from.clone_from(&l.metadata.resource_version);
                    push(LeaseVersion::of(&l, false));
                }
                Some(Ok(WatchEvent::Deleted(l))) => {
                    broke_at = None;
                    from.clone_from(&l.metadata.resource_version);
                    push(LeaseVersion::of(&l, true));
                }
                Some(Ok(WatchEvent::Bookmark(b))) => {
                    from = Some(b.metadata.resource_version);
                }
                Some(Ok(WatchEvent::Error(e))) if e.code == 410 => {
                    lost_since = Some(broke_at.unwrap_or_else(now_ns));
                    from = None;
                    break;
                }
                Some(Ok(WatchEvent::Error(_)) | Err(_)) | None => {
                    broke_at.get_or_insert_with(now_ns);
                    break;
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
