//! The benchmark's own view of a Lease, as the admin: a watch that timestamps every
//! change of holder on arrival, plus one-shot reads.

use std::time::Duration;

use anyhow::{Context, Result};
use futures::TryStreamExt;
use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use kube::Api;
use kube::api::{ListParams, ObjectMeta, PostParams, WatchEvent, WatchParams};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::{Instant, sleep, timeout};

/// What the watch last saw.
#[derive(Debug, Clone)]
pub(crate) struct Seen {
    /// `spec.holderIdentity`; empty when released, vacated or absent.
    pub(crate) holder: String,
    /// When the watch event that set this holder arrived.
    pub(crate) at: Instant,
    /// When the latest new version of the Lease (e.g. a renewal) arrived.
    pub(crate) renewed_at: Instant,
    /// The latest non-empty holder and when the latest version it held arrived.
    pub(crate) last_held: (String, Instant),
    /// The non-empty holder before that one and when the last version it held arrived:
    /// after a crash, the killed leader's last renewal (which may have landed after the
    /// kill: a renewal in flight then still counts), also when a peer's takeover first
    /// clears the holder and then writes its own.
    pub(crate) previous_held: (String, Instant),
}

/// A running watch on one Lease; stops when dropped.
#[derive(Debug)]
pub(crate) struct LeaseWatch {
    seen: watch::Receiver<Seen>,
    task: JoinHandle<()>,
}

impl Drop for LeaseWatch {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn holder_of(lease: &Lease) -> String {
    lease
        .spec
        .as_ref()
        .and_then(|s| s.holder_identity.clone())
        .unwrap_or_default()
}

impl LeaseWatch {
    /// Starts watching Lease `name` through `api` (list, then watch from the list's
    /// version; again from a fresh list whenever the watch ends).
    pub(crate) fn spawn(api: Api<Lease>, name: &str) -> Self {
        let (tx, seen) = watch::channel(Seen {
            holder: String::new(),
            at: Instant::now(),
            renewed_at: Instant::now(),
            last_held: (String::new(), Instant::now()),
            previous_held: (String::new(), Instant::now()),
        });
        let selector = format!("metadata.name={name}");
        let task = tokio::spawn(async move {
            let mut last_version = String::new();
            let mut update = |holder: String, version: Option<String>| {
                let version = version.unwrap_or_default();
                if !version.is_empty() && version == last_version {
                    return; // a relist showing what we saw already
                }
                last_version = version;
                let now = Instant::now();
                tx.send_modify(|s| {
                    if !holder.is_empty() {
                        if s.last_held.0 != holder {
                            s.previous_held =
                                std::mem::replace(&mut s.last_held, (holder.clone(), now));
                        }
                        s.last_held.1 = now;
                    }
                    if s.holder != holder {
                        s.holder = holder;
                        s.at = now;
                    }
                    s.renewed_at = now;
                });
            };
            loop {
                let list = match api.list(&ListParams::default().fields(&selector)).await {
                    Ok(list) => list,
                    Err(_) => {
                        sleep(Duration::from_millis(200)).await;
                        continue;
                    }
                };
                match list.items.first() {
                    Some(l) => update(holder_of(l), l.metadata.resource_version.clone()),
                    None => update(String::new(), None),
                }
                let version = list.metadata.resource_version.unwrap_or_default();
                let params = WatchParams::default().fields(&selector).timeout(290);
                let Ok(stream) = api.watch(&params, &version).await else {
                    sleep(Duration::from_millis(200)).await;
                    continue;
                };
                let mut stream = std::pin::pin!(stream);
                while let Ok(Some(event)) = stream.try_next().await {
                    match event {
                        WatchEvent::Added(l) | WatchEvent::Modified(l) => {
                            update(holder_of(&l), l.metadata.resource_version.clone());
                        }
                        WatchEvent::Deleted(_) => update(String::new(), None),
                        WatchEvent::Bookmark(_) => {}
                        WatchEvent::Error(_) => break,
                    }
                }
            }
        });
        Self { seen, task }
    }

    /// What the watch shows now.
    pub(crate) fn current(&self) -> Seen {
        self.seen.borrow().clone()
    }

    /// Waits until what the watch shows satisfies `ready`; `None` after `limit`.
    pub(crate) async fn wait_for(
        &mut self,
        limit: Duration,
        ready: impl FnMut(&Seen) -> bool,
    ) -> Option<Seen> {
        match timeout(limit, self.seen.wait_for(ready)).await {
            Ok(Ok(seen)) => Some(seen.clone()),
            _ => None,
        }
    }
}

/// The holder of Lease `name` now (one GET), empty if none or absent.
pub(crate) async fn holder(api: &Api<Lease>, name: &str) -> Result<String> {
    Ok(api
        .get_opt(name)
        .await
        .context("reading the Lease")?
        .map(|l| holder_of(&l))
        .unwrap_or_default())
}

/// Polls (GET every 250 ms) until Lease `name` has a holder that `ok` accepts.
pub(crate) async fn wait_for_holder(
    api: &Api<Lease>,
    name: &str,
    limit: Duration,
    ok: impl Fn(&str) -> bool,
) -> Option<String> {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if let Ok(h) = holder(api, name).await
            && !h.is_empty()
            && ok(&h)
        {
            return Some(h);
        }
        sleep(Duration::from_millis(250)).await;
    }
    None
}

/// Creates Lease `name` with an empty spec (kubert's `LeaseManager::init` needs one).
pub(crate) async fn create_empty(api: &Api<Lease>, name: &str) -> Result<()> {
    let lease = Lease {
        metadata: ObjectMeta {
            name: Some(name.to_owned()),
            ..ObjectMeta::default()
        },
        spec: Some(LeaseSpec::default()),
    };
    api.create(&PostParams::default(), &lease)
        .await
        .context("creating the Lease")?;
    Ok(())
}
