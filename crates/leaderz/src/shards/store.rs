//! Where a shard set's Leases live: the Kubernetes API ([`KubeStore`]) or memory
//! ([`MemoryStore`], for tests and simulations).

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::{Arc, Mutex, PoisonError};

use futures::StreamExt;
use futures::stream::BoxStream;
use k8s_openapi::api::coordination::v1::Lease;
use kube::api::{DeleteParams, Preconditions};
use kube::runtime::WatchStreamExt;
use kube::runtime::watcher::{self, Event};
use kube::{Api, Client};
use tokio::sync::{broadcast, watch};

use crate::lock::{LeaseLock, Lock, LockError, LockEvent, MemoryLock, Versioned, versioned};
use crate::record::LeaderRecord;

/// Labels of a Lease.
pub type Labels = BTreeMap<String, String>;

/// A change among the Leases a [`ShardStore::leases`] stream follows.
#[derive(Debug)]
#[non_exhaustive]
pub enum LeaseEvent {
    /// Every such Lease there is, after a (re)list: the ones not listed are gone.
    Listed(Vec<(String, Versioned)>),
    /// A Lease was created or changed.
    Changed(String, Versioned),
    /// A Lease was deleted.
    Deleted(String),
    /// Listing or watching failed; the stream tries again by itself (with a backoff).
    Failed(LockError),
}

/// Where a shard set keeps its Leases: a [`Lock`] per Lease, and a list-and-watch of
/// Leases by label (the members', and the shards').
pub trait ShardStore: Send + Sync + 'static {
    /// The lock on one Lease.
    type Lock: Lock;

    /// A lock on Lease `name` that carries `labels`.
    fn lock(&self, name: &str, labels: &Labels) -> Self::Lock;

    /// The Leases that carry every label of `selector`: first a [`LeaseEvent::Listed`],
    /// then changes, and a new `Listed` whenever the watch had to start over. The
    /// stream does not end; it retries failures by itself. A shard set follows its
    /// member Leases with one, and its shard Leases with another (what it saw of a shard
    /// Lease, and when, starts the elector it runs on that shard).
    fn leases(&self, selector: &Labels) -> BoxStream<'static, LeaseEvent>;

    /// Deletes Lease `name` if it is still at `version` ([`LockError::Conflict`] if it
    /// changed, [`LockError::NotFound`] if it is gone).
    fn forget(
        &self,
        name: &str,
        version: &str,
    ) -> impl Future<Output = Result<(), LockError>> + Send;

    /// Where the Leases are, for logs: `namespace` or `memory`.
    fn describe(&self) -> String;
}

/// The Leases of a shard set in one Kubernetes namespace.
///
/// Needs, in that namespace: `get`, `create`, `update` and `watch` on the shard and
/// member Leases, `list` and `watch` on Leases (the members and the shard Leases are
/// followed by label), and
/// `delete` to forget departed members (see `kube/shards/role.yaml`).
#[derive(Clone)]
pub struct KubeStore {
    client: Client,
    namespace: String,
}

impl std::fmt::Debug for KubeStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KubeStore")
            .field("namespace", &self.namespace)
            .finish_non_exhaustive()
    }
}

impl KubeStore {
    /// The Leases in `namespace`.
    pub fn new(client: Client, namespace: &str) -> Self {
        Self {
            client,
            namespace: namespace.to_owned(),
        }
    }

    fn api(&self) -> Api<Lease> {
        Api::namespaced(self.client.clone(), &self.namespace)
    }
}

fn selector_text(selector: &Labels) -> String {
    selector
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(",")
}

/// Maps an API error of `verb` on the Leases a stream follows.
fn api_error(verb: &'static str, namespace: &str, what: &str, err: kube::Error) -> LockError {
    match err {
        kube::Error::Api(status) => match status.code {
            403 => LockError::Forbidden {
                verb,
                namespace: namespace.to_owned(),
                name: what.to_owned(),
                message: status.message,
            },
            401 => LockError::Unauthorized(status.message),
            404 => LockError::NotFound,
            409 => LockError::Conflict,
            code => LockError::Api {
                code,
                reason: status.reason,
                message: status.message,
            },
        },
        other => LockError::Transport(Box::new(other)),
    }
}

fn watch_error(namespace: &str, what: &str, err: watcher::Error) -> LockError {
    match err {
        watcher::Error::InitialListFailed(e) => api_error("list", namespace, what, e),
        watcher::Error::WatchStartFailed(e) | watcher::Error::WatchFailed(e) => {
            api_error("watch", namespace, what, e)
        }
        watcher::Error::WatchError(status) if status.code == 403 => LockError::Forbidden {
            verb: "watch",
            namespace: namespace.to_owned(),
            name: what.to_owned(),
            message: status.message,
        },
        watcher::Error::WatchError(status) => LockError::Api {
            code: status.code,
            reason: status.reason,
            message: status.message,
        },
        other => LockError::Transport(Box::new(other)),
    }
}

fn named(lease: Lease) -> (String, Versioned) {
    let name = lease.metadata.name.clone().unwrap_or_default();
    (name, versioned(lease))
}

impl ShardStore for KubeStore {
    type Lock = LeaseLock;

    fn lock(&self, name: &str, labels: &Labels) -> LeaseLock {
        LeaseLock::new(self.client.clone(), &self.namespace, name).with_labels(labels.clone())
    }

    fn leases(&self, selector: &Labels) -> BoxStream<'static, LeaseEvent> {
        let selector = selector_text(selector);
        let what = format!("every Lease labelled {selector}");
        let namespace = self.namespace.clone();
        let config = watcher::Config::default().labels(&selector);
        let mut buffer: Vec<(String, Versioned)> = Vec::new();
        watcher::watcher(self.api(), config)
            .default_backoff()
            .filter_map(move |event| {
                let out = match event {
                    Ok(Event::Init) => {
                        buffer.clear();
                        None
                    }
                    Ok(Event::InitApply(lease)) => {
                        buffer.push(named(lease));
                        None
                    }
                    Ok(Event::InitDone) => Some(LeaseEvent::Listed(std::mem::take(&mut buffer))),
                    Ok(Event::Apply(lease)) => {
                        let (name, v) = named(lease);
                        Some(LeaseEvent::Changed(name, v))
                    }
                    Ok(Event::Delete(lease)) => {
                        Some(LeaseEvent::Deleted(lease.metadata.name.unwrap_or_default()))
                    }
                    Err(e) => Some(LeaseEvent::Failed(watch_error(&namespace, &what, e))),
                };
                futures::future::ready(out)
            })
            .boxed()
    }

    async fn forget(&self, name: &str, version: &str) -> Result<(), LockError> {
        let params = DeleteParams {
            preconditions: Some(Preconditions {
                resource_version: Some(version.to_owned()),
                uid: None,
            }),
            ..DeleteParams::default()
        };
        match self.api().delete(name, &params).await {
            Ok(_) => Ok(()),
            Err(e) => Err(api_error("delete", &self.namespace, name, e)),
        }
    }

    fn describe(&self) -> String {
        self.namespace.clone()
    }
}

/// A shard set's Leases in memory, for tests and simulations on paused time. Each
/// [`connect`](MemoryStore::connect)ion is one member's view of the same Leases, with a
/// link that can be [`cut`](MemoryStore::cut) (a network partition of that member).
///
/// ```
/// use leaderz::shards::MemoryStore;
///
/// let store = MemoryStore::new();
/// let a = store.connect();
/// a.cut(true); // a's calls hang and its watches end until a.cut(false)
/// ```
#[derive(Clone, Debug)]
pub struct MemoryStore {
    shared: Arc<Shared>,
    link: Arc<watch::Sender<bool>>,
}

#[derive(Debug)]
struct Shared {
    locks: Mutex<BTreeMap<String, Entry>>,
    /// The name of every Lease written or deleted, as it happens.
    changes: broadcast::Sender<String>,
}

/// Changes a [`MemoryStore::leases`] stream may fall behind by before it lists again.
const CHANGES_BUFFER: usize = 4096;

#[derive(Clone, Debug)]
struct Entry {
    lock: MemoryLock,
    labels: Labels,
}

impl Default for MemoryStore {
    fn default() -> Self {
        Self::new()
    }
}

impl MemoryStore {
    /// An empty store, and a first connection to it.
    pub fn new() -> Self {
        Self {
            shared: Arc::new(Shared {
                locks: Mutex::new(BTreeMap::new()),
                changes: broadcast::Sender::new(CHANGES_BUFFER),
            }),
            link: Arc::new(watch::Sender::new(false)),
        }
    }

    /// Another connection to the same Leases, with a link of its own.
    pub fn connect(&self) -> Self {
        Self {
            shared: self.shared.clone(),
            link: Arc::new(watch::Sender::new(false)),
        }
    }

    /// Cuts this connection's link (`true`): its calls hang until the link is healed and
    /// then fail, its watches end, its [`leases`](ShardStore::leases) streams stop
    /// changing (and list again once healed). `false` heals it.
    pub fn cut(&self, cut: bool) {
        self.link.send_replace(cut);
    }

    /// The record of Lease `name` now, if it exists.
    pub fn peek(&self, name: &str) -> Option<Versioned> {
        self.entry(name).and_then(|e| e.lock.peek())
    }

    /// The names of every Lease ever made in this store (deleted ones too).
    pub fn names(&self) -> Vec<String> {
        self.shared
            .locks
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .keys()
            .cloned()
            .collect()
    }

    fn entry(&self, name: &str) -> Option<Entry> {
        self.shared
            .locks
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(name)
            .cloned()
    }

    fn list(&self, selector: &Labels) -> Vec<(String, Versioned)> {
        let locks = self
            .shared
            .locks
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        locks
            .iter()
            .filter(|(_, e)| selects(selector, &e.labels))
            .filter_map(|(name, e)| e.lock.peek().map(|v| (name.clone(), v)))
            .collect()
    }

    fn changed(&self, name: &str) {
        // Nobody listening is fine.
        let _ = self.shared.changes.send(name.to_owned());
    }
}

fn selects(selector: &Labels, labels: &Labels) -> bool {
    selector.iter().all(|(k, v)| labels.get(k) == Some(v))
}

/// Waits while `link` is cut; `Err` if it was (the call is lost).
async fn through(link: &watch::Sender<bool>) -> Result<(), LockError> {
    if !*link.borrow() {
        return Ok(());
    }
    let mut rx = link.subscribe();
    let _ = rx.wait_for(|cut| !*cut).await;
    Err(LockError::Transport("the link to the store was cut".into()))
}

/// The [`Lock`] of a [`MemoryStore`].
#[derive(Clone, Debug)]
pub struct MemoryStoreLock {
    inner: MemoryLock,
    name: Arc<str>,
    store: MemoryStore,
}

impl MemoryStoreLock {
    fn changed(&self) {
        self.store.changed(&self.name);
    }
}

impl Lock for MemoryStoreLock {
    async fn get(&self) -> Result<Option<Versioned>, LockError> {
        through(&self.store.link).await?;
        self.inner.get().await
    }

    async fn create(&self, record: &LeaderRecord) -> Result<Versioned, LockError> {
        through(&self.store.link).await?;
        let out = self.inner.create(record).await;
        self.changed();
        out
    }

    async fn update(
        &self,
        current: &Versioned,
        record: &LeaderRecord,
    ) -> Result<Versioned, LockError> {
        through(&self.store.link).await?;
        let out = self.inner.update(current, record).await;
        self.changed();
        out
    }

    async fn watch(
        &self,
        version: &str,
        timeout: std::time::Duration,
    ) -> Result<BoxStream<'static, Result<LockEvent, LockError>>, LockError> {
        through(&self.store.link).await?;
        let stream = self.inner.watch(version, timeout).await?;
        let mut link = self.store.link.subscribe();
        let cut = async move {
            let _ = link.wait_for(|cut| *cut).await;
        };
        Ok(stream.take_until(cut).boxed())
    }

    fn describe(&self) -> String {
        self.inner.describe()
    }
}

impl ShardStore for MemoryStore {
    type Lock = MemoryStoreLock;

    fn lock(&self, name: &str, labels: &Labels) -> MemoryStoreLock {
        let entry = {
            let mut locks = self
                .shared
                .locks
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            locks
                .entry(name.to_owned())
                .or_insert_with(|| Entry {
                    lock: MemoryLock::new(name),
                    labels: labels.clone(),
                })
                .clone()
        };
        MemoryStoreLock {
            inner: entry.lock,
            name: name.into(),
            store: self.clone(),
        }
    }

    /// Lists at once, then reports each change of a matching Lease as it happens (a
    /// change that is overtaken before the stream gets to it is reported as the later
    /// state, as a watch may coalesce). While the link is cut nothing is reported; once
    /// healed, or if the stream fell behind, it lists again.
    fn leases(&self, selector: &Labels) -> BoxStream<'static, LeaseEvent> {
        struct Follow {
            store: MemoryStore,
            selector: Labels,
            changes: broadcast::Receiver<String>,
            link: watch::Receiver<bool>,
            /// The version last reported for each Lease; `None`: list next.
            sent: Option<BTreeMap<String, String>>,
        }
        let follow = Follow {
            store: self.clone(),
            selector: selector.clone(),
            changes: self.shared.changes.subscribe(),
            link: self.link.subscribe(),
            sent: None,
        };
        futures::stream::unfold(follow, |mut f| async move {
            loop {
                if *f.link.borrow_and_update() {
                    f.link.wait_for(|cut| !*cut).await.ok()?;
                    f.sent = None;
                    continue;
                }
                let Some(sent) = f.sent.as_mut() else {
                    // Changes from now on come after the list.
                    f.changes = f.changes.resubscribe();
                    let list = f.store.list(&f.selector);
                    f.sent = Some(
                        list.iter()
                            .map(|(n, v)| (n.clone(), v.version.clone()))
                            .collect(),
                    );
                    return Some((LeaseEvent::Listed(list), f));
                };
                let name = tokio::select! {
                    biased;
                    _ = f.link.changed() => continue,
                    change = f.changes.recv() => match change {
                        Ok(name) => name,
                        Err(broadcast::error::RecvError::Lagged(_)) => {
                            f.sent = None;
                            continue;
                        }
                        Err(broadcast::error::RecvError::Closed) => return None,
                    },
                };
                let Some(entry) = f.store.entry(&name) else {
                    continue;
                };
                if !selects(&f.selector, &entry.labels) {
                    continue;
                }
                match entry.lock.peek() {
                    Some(v) => {
                        if sent.get(&name) == Some(&v.version) {
                            continue;
                        }
                        sent.insert(name.clone(), v.version.clone());
                        return Some((LeaseEvent::Changed(name, v), f));
                    }
                    None => {
                        if sent.remove(&name).is_none() {
                            continue;
                        }
                        return Some((LeaseEvent::Deleted(name), f));
                    }
                }
            }
        })
        .boxed()
    }

    async fn forget(&self, name: &str, version: &str) -> Result<(), LockError> {
        through(&self.link).await?;
        let entry = self.entry(name).ok_or(LockError::NotFound)?;
        match entry.lock.peek() {
            None => Err(LockError::NotFound),
            Some(v) if v.version != version => Err(LockError::Conflict),
            Some(_) => {
                entry.lock.force(None);
                self.changed(name);
                Ok(())
            }
        }
    }

    fn describe(&self) -> String {
        "memory".to_owned()
    }
}
