//! One watch over many Leases, shared by their locks.
//!
//! A follower watches its Lease with a single-object watch: one long-running request per
//! election. A process that follows many Leases (a shard set, one election per shard)
//! would hold as many watches. [`SharedLeaseWatch`] holds one instead — on every Lease of
//! a namespace, optionally only those with given labels — and hands each lock made with
//! [`SharedLeaseWatch::lock`] the events of its own Lease.
//!
//! RBAC: besides what every lock needs (`get`, `create`, `update` on its Leases), the
//! shared watch needs **`list` and `watch` on `leases.coordination.k8s.io` in the
//! namespace** — for all Leases there: a label selector narrows what is sent, not what
//! must be granted. If they are denied, each election falls back to polling (and says
//! why in its status), as it does when its own watch is denied. A watch that fails
//! after its first list is retried (kube's backoff) and resumes where it stopped, or
//! lists again; meanwhile its elections stay subscribed and learn nothing new, and
//! each notices that its Lease's renewals stopped showing as any watching election
//! does (it reads the Lease when the holder's next renewal is overdue).
//!
//! How it keeps each election's view right:
//! - the watch is kube-runtime's `watcher` (list, then watch; re-listed after a `410
//!   Gone` or an error, with backoff); after every (re-)list, each lock is told of its
//!   Lease's changes (or deletion) since the previous one;
//! - a lock that starts watching after version `v` is given the Lease's latest state at
//!   once if the shared watch has already delivered something newer than `v` (it saw `v`
//!   earlier, or — versions being opaque — cannot tell and `v` does not compare as an
//!   older integer); what it has not delivered yet arrives as it comes;
//! - a lock's stream ends after the timeout it asked for, as a server-side watch would;
//!   a lock that does not keep up with its events (64 behind) has its stream ended, and
//!   watches anew.
//!
//! - an election started once the watch has listed ([`SharedLeaseWatch::ready`]) on a
//!   Lease the list did not show creates it at once, without reading first (see
//!   [`Lock::known_absent`](super::Lock::known_absent)); not with a label selector,
//!   which hides Leases without the labels.
//!
//! A stale event never makes an election unsafe: it can only make the election wait
//! longer, or try a write that the API server refuses (the write names the version read).

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use futures::StreamExt;
use futures::stream::BoxStream;
use k8s_openapi::api::coordination::v1::Lease;
use kube::runtime::watcher::{self, Event};
use kube::runtime::{WatchStreamExt, watcher as watch_leases};
use kube::{Api, Client};
// futures' channel, not tokio's: tokio's allocates 32 slots at once (2 KiB per lock
// subscribed, 20 MiB for 10 000 elections), futures' one node per event.
use futures::channel::mpsc;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tracing::{debug, warn};

use super::lease::versioned;
use super::{LeaseLock, LockError, LockEvent, Versioned};

/// Events a lock may fall behind by before its stream is ended (one more, in fact: a
/// futures channel keeps a place per sender).
const SUBSCRIBER_BUFFER: usize = 64;

/// Versions remembered per Lease, to tell that a lock's version is older than ours. Few:
/// past them, versions are compared as integers, which holds for etcd's except across a
/// restore (they move back: a lock may then miss a catch-up event, and waits for the next
/// event or its own read; a delay, never a wrong write, which names the version read),
/// and a watch on 10 000 Leases keeps this many strings for each.
const VERSIONS_KEPT: usize = 4;

/// How long a deletion is remembered for locks that are not subscribed when it is
/// learned of (longer than any lock goes between two watches). Forgotten at the next
/// relist after that, or the next deletion learned a [`SWEEP_EVERY`] after the last
/// sweep (a watch resumes from its last version and may go days without a relist).
const DELETIONS_KEPT: Duration = Duration::from_secs(600);

/// How often deletions learned from the watch sweep the ones long gone.
const SWEEP_EVERY: Duration = Duration::from_secs(60);

/// Own writes noted to date what the watch has shown ([`State::marks`]): at most one
/// per this long, and this many waiting to be shown.
const MARK_EVERY: Duration = Duration::from_millis(100);
const MARKS_KEPT: usize = 64;

/// Stands for the version of a deletion the shared watch learned of without one (a
/// relist that no longer shows the Lease); never a resourceVersion.
const DELETED: &str = "deleted";

/// One watch on the Leases of a namespace, shared by the [`LeaseLock`]s made from it.
///
/// RBAC: besides what every lock needs (`get`, `create`, `update` on its Leases), the
/// shared watch needs **`list` and `watch` on `leases.coordination.k8s.io` in the
/// namespace** (a label selector narrows what is sent, not what must be granted). If they
/// are denied, each election falls back to polling and says why in its status.
///
/// ```no_run
/// # async fn doc(client: kube::Client) -> Result<(), Box<dyn std::error::Error>> {
/// use leaderz::lock::SharedLeaseWatch;
/// use leaderz::{ElectionConfig, Elector};
///
/// let leases = SharedLeaseWatch::new(client, "shards");
/// let handles: Vec<_> = (0..64)
///     .map(|shard| {
///         let lock = leases.lock(&format!("shard-{shard}"));
///         Ok(Elector::new(lock, ElectionConfig::new("pod-a"))?.spawn())
///     })
///     .collect::<Result<_, leaderz::ConfigError>>()?;
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct SharedLeaseWatch {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for SharedLeaseWatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SharedLeaseWatch")
            .field("namespace", &self.inner.namespace)
            .field("labels", &self.inner.labels)
            .finish()
    }
}

struct Inner {
    client: Client,
    namespace: String,
    labels: Option<String>,
    hub: Arc<Hub>,
    /// The watching task, started by the first lock that watches.
    task: OnceLock<JoinHandle<()>>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        if let Some(task) = self.task.get() {
            task.abort();
        }
    }
}

impl SharedLeaseWatch {
    /// A watch on every Lease in `namespace`. Nothing is sent until a lock made from it
    /// starts watching.
    pub fn new(client: Client, namespace: &str) -> Self {
        Self {
            inner: Arc::new(Inner {
                client,
                namespace: namespace.to_owned(),
                labels: None,
                hub: Arc::new(Hub::new()),
                task: OnceLock::new(),
            }),
        }
    }

    /// Only the Leases matching this label selector (e.g. `app=shards`). Leases that
    /// do not match are never seen: their elections then notice nothing but what they
    /// read themselves. Create the Leases with the labels (see
    /// [`LeaseLock::with_labels`]).
    #[must_use]
    pub fn labels(self, selector: &str) -> Self {
        Self {
            inner: Arc::new(Inner {
                client: self.inner.client.clone(),
                namespace: self.inner.namespace.clone(),
                labels: Some(selector.to_owned()),
                hub: Arc::new(Hub::new()),
                task: OnceLock::new(),
            }),
        }
    }

    /// A lock on Lease `name` in this watch's namespace, watching through it.
    pub fn lock(&self, name: &str) -> LeaseLock {
        let mut lock = LeaseLock::new(self.inner.client.clone(), &self.inner.namespace, name);
        lock.shared = Some(self.clone());
        lock
    }

    /// The namespace watched.
    pub fn namespace(&self) -> &str {
        &self.inner.namespace
    }

    fn start(&self) {
        self.inner.task.get_or_init(|| {
            let api: Api<Lease> = Api::namespaced(self.inner.client.clone(), &self.inner.namespace);
            let mut config = watcher::Config::default();
            if let Some(labels) = &self.inner.labels {
                config = config.labels(labels);
            }
            tokio::spawn(run(self.inner.hub.clone(), api, config))
        });
    }

    /// Starts the watch (if no lock has yet) and waits for its first list. Elections
    /// started after it begin with what the watch knows: one whose Lease does not exist
    /// creates it at once instead of reading first (see [`Lock::known_absent`]), which
    /// halves what 10 000 new elections ask of the API server.
    ///
    /// Fails as soon as the watch fails, for whatever reason (RBAC refused `list` or
    /// `watch`, the namespace is missing, the API server is unreachable); the watch
    /// itself goes on retrying, and elections on it work either way (they read).
    ///
    /// [`Lock::known_absent`]: super::Lock::known_absent
    pub async fn ready(&self) -> Result<(), LockError> {
        self.listed("*").await
    }

    /// Starts the watch if need be and waits for its first list (errors name Lease
    /// `name`).
    async fn listed(&self, name: &str) -> Result<(), LockError> {
        self.start();
        let mut phase = self.inner.hub.phase.subscribe();
        loop {
            match &*phase.borrow_and_update() {
                Phase::Ready => return Ok(()),
                Phase::Failed(failure) => {
                    return Err(failure.error(&self.inner.namespace, name));
                }
                Phase::Starting => {}
            }
            if phase.changed().await.is_err() {
                return Err(LockError::Transport(
                    "the shared Lease watch stopped".into(),
                ));
            }
        }
    }

    /// When Lease `name` is known not to exist, not seen by the watch since: as of the
    /// last list (a consistent list, kube's default, sent at the instant returned), or
    /// later, as of a write of one of its locks asked for at the instant returned that
    /// the watch has since shown (every change made before that write has been shown,
    /// in order). A watch that stalls or fails shows nothing more, so the instant stops
    /// moving: the knowledge ages as a read's would.
    /// `None` if the watch has not listed yet, knows of the Lease (even deleted: the
    /// election then reads it first, as one without the shared watch would), or sees
    /// only Leases with some labels (a Lease without them exists unseen).
    pub(super) fn known_absent(&self, name: &str) -> Option<Instant> {
        if self.inner.labels.is_some() || !matches!(*self.inner.hub.phase.borrow(), Phase::Ready) {
            return None;
        }
        self.inner.hub.lock().absent_as_of(name)
    }

    /// A lock's write landed at `version`, asked for at `asked`: once the watch shows
    /// that version (or a later one), every change made before `asked` has been shown,
    /// and a Lease it has not shown is known absent as of `asked`.
    pub(super) fn wrote(&self, version: &str, asked: Instant) {
        self.inner.hub.lock().note_write(version, asked);
    }

    /// Changes of Lease `name` after `version`, ending after `timeout`.
    pub(super) async fn subscribe(
        &self,
        name: &str,
        version: &str,
        timeout: Duration,
    ) -> Result<BoxStream<'static, Result<LockEvent, LockError>>, LockError> {
        self.listed(name).await?;
        let hub = &self.inner.hub;
        let (mut tx, rx) = mpsc::channel(SUBSCRIBER_BUFFER);
        {
            let mut state = hub.lock();
            if let Some(first) = state.catch_up(name, version) {
                // The channel is new and empty: this cannot fail.
                let _ = tx.try_send(Ok(first));
            }
            let subscribers = state.subscribers.entry(name.to_owned()).or_default();
            subscribers.retain(|s| !s.is_closed());
            subscribers.push(tx);
        }
        Ok(rx.take_until(tokio::time::sleep(timeout)).boxed())
    }
}

/// Where the watching task leaves what it saw, and the locks' subscriptions.
struct Hub {
    state: Mutex<State>,
    phase: tokio::sync::watch::Sender<Phase>,
}

#[derive(Clone)]
enum Phase {
    /// The first list has not finished.
    Starting,
    Ready,
    /// The first list failed (and is being retried).
    Failed(Arc<Failure>),
}

/// Why the shared watch could not start.
struct Failure {
    code: Option<u16>,
    reason: String,
    message: String,
}

impl Failure {
    fn from_error(e: &watcher::Error) -> Self {
        let api = match e {
            watcher::Error::InitialListFailed(kube::Error::Api(s))
            | watcher::Error::WatchStartFailed(kube::Error::Api(s))
            | watcher::Error::WatchFailed(kube::Error::Api(s)) => Some(s.as_ref()),
            watcher::Error::WatchError(s) => Some(s.as_ref()),
            _ => None,
        };
        match api {
            Some(status) => Failure {
                code: Some(status.code),
                reason: status.reason.clone(),
                message: status.message.clone(),
            },
            None => Failure {
                code: None,
                reason: String::new(),
                message: e.to_string(),
            },
        }
    }

    fn error(&self, namespace: &str, name: &str) -> LockError {
        match self.code {
            Some(403) => LockError::Forbidden {
                verb: "list",
                namespace: namespace.to_owned(),
                name: name.to_owned(),
                message: format!(
                    "a shared Lease watch needs `list` and `watch` on leases in the namespace: {}",
                    self.message
                ),
            },
            Some(401) => LockError::Unauthorized(self.message.clone()),
            Some(code) => LockError::Api {
                code,
                reason: self.reason.clone(),
                message: self.message.clone(),
            },
            None => LockError::Transport(self.message.clone().into()),
        }
    }
}

#[derive(Default)]
struct State {
    leases: HashMap<String, Entry>,
    subscribers: HashMap<String, Vec<mpsc::Sender<Result<LockEvent, LockError>>>>,
    /// Leases listed since the watch (re)started, until the list is complete.
    relisting: Option<HashMap<String, Versioned>>,
    /// When the list under way was asked for (just before: kube's watcher says `Init`
    /// first), and when the last complete one was.
    listing_from: Option<Instant>,
    listed_from: Option<Instant>,
    /// When deletions long gone were last forgotten.
    swept_at: Option<Instant>,
    /// Writes of the locks on this watch that it has not shown yet: version, and when
    /// the write was asked for. Once the watch shows a version at least as new, it has
    /// shown every change made before that instant ([`State::shown_until`]).
    marks: VecDeque<(u64, Instant)>,
    /// Every change made before this instant has been shown by the watch.
    shown_until: Option<Instant>,
    /// The newest version the watch has shown (0: none, or none that parses).
    newest_shown: u64,
}

/// What the shared watch knows of one Lease.
#[derive(Default)]
struct Entry {
    /// Its latest state; `None` once deleted.
    current: Option<Versioned>,
    /// The versions it was seen at, latest last.
    seen: VecDeque<String>,
    /// When it was found deleted (kept a while, for locks that subscribe again later).
    gone_at: Option<Instant>,
}

impl Entry {
    fn saw(&mut self, version: &str) {
        if self.seen.back().is_some_and(|v| v == version) {
            return;
        }
        if self.seen.len() == VERSIONS_KEPT {
            self.seen.pop_front();
        }
        self.seen.push_back(version.to_owned());
    }

    /// Marks the deletion as the latest change, after every version seen (at the
    /// deletion's own version when known), so that a lock that last saw the Lease
    /// before it learns of it.
    fn gone(&mut self, version: Option<&str>) {
        self.gone_at = Some(Instant::now());
        self.saw(version.unwrap_or(DELETED));
    }

    /// Whether `version` is older than what this entry holds (or held when deleted).
    fn is_past(&self, version: &str) -> bool {
        let latest = self.seen.back().map(String::as_str).unwrap_or_default();
        if latest == version {
            return false;
        }
        if self.seen.iter().any(|v| v == version) {
            return true;
        }
        // Not seen here: compare as integers with our latest real version if both are
        // (etcd's are). Otherwise take ours as the newer — unless ours is a deletion
        // known without a version: a version we never saw may then be the Lease
        // re-created, which this watch has not seen yet.
        let real = self.seen.iter().rev().find(|v| *v != DELETED);
        match (version.parse::<u64>(), real.map(|v| v.parse::<u64>())) {
            (Ok(theirs), Some(Ok(ours))) => theirs < ours,
            _ => latest != DELETED,
        }
    }
}

impl Hub {
    fn new() -> Self {
        Self {
            state: Mutex::new(State::default()),
            phase: tokio::sync::watch::Sender::new(Phase::Starting),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn apply(&self, v: Versioned) {
        let Some(name) = lease_name(&v) else { return };
        let mut state = self.lock();
        state.shown(&v.version);
        let entry = state.leases.entry(name.clone()).or_default();
        if entry
            .current
            .as_ref()
            .is_some_and(|c| c.version == v.version)
        {
            return;
        }
        entry.saw(&v.version);
        entry.current = Some(v.clone());
        state.deliver(&name, LockEvent::Changed(v));
    }

    /// Lease `name` was deleted, at `version` if known (a relist that no longer shows
    /// it does not say when).
    fn delete(&self, name: &str, version: Option<&str>) {
        let mut state = self.lock();
        if let Some(version) = version {
            state.shown(version);
        }
        let Some(entry) = state.leases.get_mut(name) else {
            return;
        };
        if entry.current.take().is_some() {
            entry.gone(version);
            state.deliver(name, LockEvent::Deleted);
        }
        if state.swept_at.is_none_or(|at| at.elapsed() >= SWEEP_EVERY) {
            state.forget_old_deletions();
        }
    }

    /// A (re-)list finished: tell each lock what changed since the previous one.
    fn relisted(&self) {
        let mut state = self.lock();
        let Some(listed) = state.relisting.take() else {
            return;
        };
        state.listed_from = state.listing_from.take();
        let gone: Vec<String> = state
            .leases
            .iter()
            .filter(|(name, e)| e.current.is_some() && !listed.contains_key(*name))
            .map(|(name, _)| name.clone())
            .collect();
        for name in gone {
            if let Some(e) = state.leases.get_mut(&name) {
                e.current = None;
                e.gone(None);
            }
            state.deliver(&name, LockEvent::Deleted);
        }
        for (name, v) in listed {
            let entry = state.leases.entry(name.clone()).or_default();
            if entry
                .current
                .as_ref()
                .is_some_and(|c| c.version == v.version)
            {
                continue;
            }
            entry.saw(&v.version);
            entry.current = Some(v.clone());
            state.deliver(&name, LockEvent::Changed(v));
        }
        state.forget_old_deletions();
    }
}

impl State {
    /// See [`SharedLeaseWatch::known_absent`] (this, once the watch has listed).
    fn absent_as_of(&self, name: &str) -> Option<Instant> {
        if self.leases.contains_key(name) {
            return None;
        }
        self.listed_from.max(self.shown_until)
    }

    /// See [`SharedLeaseWatch::wrote`].
    fn note_write(&mut self, version: &str, asked: Instant) {
        let Ok(version) = version.parse::<u64>() else {
            return;
        };
        // Its own event often comes before its answer: already shown.
        if version <= self.newest_shown {
            self.shown_until = self.shown_until.max(Some(asked));
            return;
        }
        if self.marks.len() >= MARKS_KEPT
            || self
                .marks
                .back()
                .is_some_and(|(_, at)| asked < *at + MARK_EVERY)
        {
            return;
        }
        self.marks.push_back((version, asked));
    }

    /// The watch showed a change at `version`: every noted write at or below it has
    /// been shown, and so has every change made before it was asked for.
    fn shown(&mut self, version: &str) {
        let Ok(version) = version.parse::<u64>() else {
            return;
        };
        if version < self.newest_shown {
            // Versions went back (an etcd restore): what they dated no longer holds.
            self.forget_marks();
        }
        self.newest_shown = self.newest_shown.max(version);
        while let Some(&(v, asked)) = self.marks.front()
            && v <= version
        {
            self.marks.pop_front();
            self.shown_until = self.shown_until.max(Some(asked));
        }
    }

    /// Forgets what the watch's versions dated (at a relist, an error, or versions
    /// going back): knowledge of absence falls back to the last list's.
    fn forget_marks(&mut self) {
        self.marks.clear();
        self.newest_shown = 0;
        self.shown_until = None;
    }

    /// Forgets Leases deleted long ago that nobody listens to. Not at once: a lock
    /// between two watches (its stream ended, it reads, it watches again) must still be
    /// told of the deletion when it subscribes again.
    fn forget_old_deletions(&mut self) {
        let Self {
            leases,
            subscribers,
            swept_at,
            ..
        } = self;
        *swept_at = Some(Instant::now());
        // Locks gone since their Lease's last event.
        subscribers.retain(|_, txs| {
            txs.retain(|tx| !tx.is_closed());
            !txs.is_empty()
        });
        leases.retain(|name, e| {
            e.current.is_some()
                || subscribers.contains_key(name)
                || e.gone_at.is_some_and(|at| at.elapsed() < DELETIONS_KEPT)
        });
    }

    /// What a lock that starts watching `name` after `version` must be told first.
    fn catch_up(&self, name: &str, version: &str) -> Option<LockEvent> {
        let entry = self.leases.get(name)?;
        match &entry.current {
            Some(current) if current.version != version && entry.is_past(version) => {
                Some(LockEvent::Changed(current.clone()))
            }
            None if !version.is_empty() && entry.is_past(version) => Some(LockEvent::Deleted),
            _ => None,
        }
    }

    fn deliver(&mut self, name: &str, event: LockEvent) {
        let Some(subscribers) = self.subscribers.get_mut(name) else {
            return;
        };
        subscribers.retain_mut(|tx| match tx.try_send(Ok(event.clone())) {
            Ok(()) => true,
            Err(e) if e.is_full() => {
                debug!(
                    lease = name,
                    "a lock fell behind the shared watch; ending its stream"
                );
                false
            }
            Err(_) => false,
        });
        if subscribers.is_empty() {
            self.subscribers.remove(name);
        }
    }
}

fn lease_name(v: &Versioned) -> Option<String> {
    v.lease.as_ref().and_then(|l| l.metadata.name.clone())
}

/// The watching task: feeds what kube-runtime's watcher sees into the hub.
async fn run(hub: Arc<Hub>, api: Api<Lease>, config: watcher::Config) {
    let mut events = watch_leases(api, config).default_backoff().boxed();
    let mut failing = false;
    while let Some(event) = events.next().await {
        match event {
            Ok(event) => {
                if failing {
                    debug!("the shared Lease watch works again");
                    failing = false;
                }
                match event {
                    Event::Init => {
                        let mut state = hub.lock();
                        state.relisting = Some(HashMap::new());
                        state.listing_from = Some(Instant::now());
                        state.forget_marks();
                    }
                    Event::InitApply(lease) => {
                        let v = versioned(lease);
                        if let (Some(name), Some(listed)) =
                            (lease_name(&v), hub.lock().relisting.as_mut())
                        {
                            listed.insert(name, v);
                        }
                    }
                    Event::InitDone => {
                        hub.relisted();
                        hub.phase.send_replace(Phase::Ready);
                    }
                    Event::Apply(lease) => hub.apply(versioned(lease)),
                    Event::Delete(lease) => {
                        if let Some(name) = &lease.metadata.name {
                            hub.delete(name, lease.metadata.resource_version.as_deref());
                        }
                    }
                }
            }
            Err(e) => {
                hub.lock().forget_marks();
                if !failing {
                    warn!(error = %e, "the shared Lease watch failed; retrying");
                    failing = true;
                }
                hub.phase.send_if_modified(|phase| match phase {
                    Phase::Ready => false,
                    _ => {
                        *phase = Phase::Failed(Arc::new(Failure::from_error(&e)));
                        true
                    }
                });
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

    use super::*;

    fn lease(name: &str, version: &str) -> Versioned {
        versioned(Lease {
            metadata: ObjectMeta {
                name: Some(name.into()),
                resource_version: Some(version.into()),
                ..Default::default()
            },
            spec: None,
        })
    }

    fn catch_up(hub: &Hub, version: &str) -> Option<LockEvent> {
        hub.lock().catch_up("a", version)
    }

    /// A lock that read the Lease at the last version before its deletion and
    /// subscribes after the watch saw the deletion is told of it.
    #[test]
    fn a_lock_that_last_saw_the_lease_before_its_deletion_learns_of_it() {
        let hub = Hub::new();
        hub.apply(lease("a", "100"));
        assert!(catch_up(&hub, "100").is_none(), "up to date");
        hub.delete("a", Some("101"));
        assert!(matches!(catch_up(&hub, "100"), Some(LockEvent::Deleted)));
        assert!(catch_up(&hub, "101").is_none(), "knows of the deletion");
        // A relist that no longer shows it (no version for the deletion); a lock
        // listens, so the hub keeps what it knows of the Lease.
        let (tx, _rx) = mpsc::channel(SUBSCRIBER_BUFFER);
        hub.lock().subscribers.insert("a".into(), vec![tx]);
        hub.apply(lease("a", "200"));
        hub.lock().relisting = Some(HashMap::new());
        hub.relisted();
        assert!(matches!(catch_up(&hub, "200"), Some(LockEvent::Deleted)));
        // A lock that read it re-created before the watch saw that is not told it is gone.
        assert!(catch_up(&hub, "250").is_none());
        // Re-created: the new record.
        hub.apply(lease("a", "300"));
        assert!(matches!(catch_up(&hub, "200"), Some(LockEvent::Changed(v)) if v.version == "300"));
    }

    /// A relist that no longer shows a Lease while its lock is between two watches (not
    /// subscribed) still tells the lock of the deletion when it subscribes again.
    #[tokio::test(start_paused = true)]
    async fn a_deletion_learned_while_nobody_listens_is_told_to_the_lock_that_comes_back() {
        let hub = Hub::new();
        hub.apply(lease("a", "100"));
        hub.lock().relisting = Some(HashMap::new());
        hub.relisted();
        assert!(matches!(catch_up(&hub, "100"), Some(LockEvent::Deleted)));
        // Forgotten once long gone, at the next relist.
        tokio::time::advance(DELETIONS_KEPT).await;
        hub.lock().relisting = Some(HashMap::new());
        hub.relisted();
        assert!(hub.lock().leases.is_empty());
    }

    /// A write of a lock, once the watch shows its version (or a later one), dates
    /// what the watch has shown: a Lease it has not shown is known absent as of when
    /// that write was asked for. Until then, and after the watch stops showing
    /// anything, the instant does not move.
    #[tokio::test(start_paused = true)]
    async fn writes_shown_by_the_watch_date_what_it_knows_absent() {
        let hub = Hub::new();
        let absent = |name| hub.lock().absent_as_of(name);
        let listed = Instant::now();
        hub.lock().listed_from = Some(listed);
        assert_eq!(absent("x"), Some(listed));
        tokio::time::advance(Duration::from_secs(1)).await;
        let asked = Instant::now();
        hub.lock().note_write("120", asked);
        tokio::time::advance(Duration::from_secs(1)).await;
        assert_eq!(absent("x"), Some(listed), "not shown yet");
        hub.apply(lease("other", "119"));
        assert_eq!(absent("x"), Some(listed), "an older change");
        hub.apply(lease("other", "121"));
        assert_eq!(absent("x"), Some(asked));
        assert_eq!(absent("other"), None, "seen");
        // Nothing shown after a later write: the instant stays.
        tokio::time::advance(Duration::from_secs(1)).await;
        hub.lock().note_write("130", Instant::now());
        tokio::time::advance(Duration::from_secs(5)).await;
        assert_eq!(absent("x"), Some(asked));
        // A write whose own event came before its answer: shown already.
        hub.apply(lease("other", "140"));
        let asked = Instant::now();
        hub.lock().note_write("140", asked);
        assert_eq!(absent("x"), Some(asked));
        // Versions going back (an etcd restore) void what they dated.
        hub.apply(lease("other", "5"));
        assert_eq!(absent("x"), Some(listed));
    }

    /// A lock gone since its Lease's deletion (its stream dropped, nothing more sent to
    /// it) does not keep the deletion remembered for ever.
    #[tokio::test(start_paused = true)]
    async fn a_deletion_is_forgotten_once_its_lock_has_gone() {
        let hub = Hub::new();
        hub.apply(lease("a", "100"));
        let (tx, rx) = mpsc::channel(SUBSCRIBER_BUFFER);
        hub.lock().subscribers.insert("a".into(), vec![tx]);
        hub.delete("a", Some("101"));
        drop(rx);
        tokio::time::advance(DELETIONS_KEPT).await;
        hub.apply(lease("b", "102"));
        hub.delete("b", Some("103"));
        assert!(!hub.lock().leases.contains_key("a"));
        assert!(hub.lock().subscribers.is_empty());
    }

    /// Deletions learned from a watch that never relists are forgotten too, once long
    /// gone: Leases come and go for as long as the process runs.
    #[tokio::test(start_paused = true)]
    async fn deletions_are_forgotten_without_a_relist() {
        let hub = Hub::new();
        for round in 0..30u64 {
            for i in 0..100u64 {
                let name = format!("l-{round}-{i}");
                hub.apply(lease(&name, &(round * 1000 + i * 2).to_string()));
                hub.delete(&name, Some(&(round * 1000 + i * 2 + 1).to_string()));
            }
            tokio::time::advance(Duration::from_secs(60)).await;
        }
        // 3000 deleted in 30 minutes; those of the last ten minutes (and one sweep) kept.
        let kept = hub.lock().leases.len();
        assert!(kept <= 1200, "{kept} deleted Leases still remembered");
        assert!(kept >= 1000, "recent deletions are kept: {kept}");
    }
}
