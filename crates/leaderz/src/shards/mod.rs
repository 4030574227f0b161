//! Sharded leases: `S` shards shared out among the live members of a set, one owner per
//! shard at a time, each shard's ownership a leadership term on a Lease of its own.
//!
//! ```no_run
//! use leaderz::ElectionConfig;
//! use leaderz::shards::{KubeStore, ShardSet, ShardSetConfig};
//!
//! # async fn doc() -> Result<(), Box<dyn std::error::Error>> {
//! let client = kube::Client::try_default().await?;
//! let config = ShardSetConfig::new("tenants", 64, ElectionConfig::new(std::env::var("POD_NAME")?));
//! let mut set = ShardSet::new(KubeStore::new(client, "default"), config)?.spawn();
//! set.run_per_shard(|shard, term| async move {
//!     loop {
//!         println!("shard {shard}: working with fencing token {}", term.fencing_token());
//!         tokio::time::sleep(std::time::Duration::from_secs(1)).await;
//!     }
//! })
//! .await?;
//! # Ok(()) }
//! ```
//!
//! # How it works
//!
//! - **Presence.** Every member runs an ordinary election on a Lease of its own,
//!   `<name>-member-<identity>` (labelled `leaderz.io/shard-set=<name>`,
//!   `leaderz.io/shard-role=member`); nobody else contends for it, so it is a heartbeat
//!   with the engine's renewals, step-down and release. A member counts itself in while
//!   it holds that term. It lists and watches the member Leases by label and counts
//!   another member alive while its member Lease has a holder and has not expired by the
//!   engine's rule (on the local clock, from when this process first saw that record:
//!   [`Observed::expires_at`](crate::Observed::expires_at)).
//! - **Assignment.** Every member computes the same owners from the same live members:
//!   balanced rendezvous hashing ([`assign`]), ⌈S/M⌉ or ⌊S/M⌋ shards each.
//! - **Ownership.** A member runs an elector only on the shard Leases `<name>-<i>` it is
//!   assigned; owning shard `i` is leading Lease `<name>-<i>`, with a [`Term`] and a
//!   fencing token of its own. The Leases, not the assignment, keep two members from
//!   owning a shard at once: while two members' views differ, both may campaign, and
//!   one wins.
//! - **Handing over.** A shard a member is no longer assigned has its elector shut down:
//!   the term ends, its work drops the [`Term`], and only then is the Lease released;
//!   the new owner, already campaigning and watching the Lease, takes it at once. A
//!   member that leaves ([`ShardSetHandle::shutdown`]) first releases its member Lease, so
//!   that the others start campaigning, then hands over every shard, then deletes its
//!   member Lease.
//! - **Following the shard Leases.** Every member also lists and watches the shard
//!   Leases by label (`leaderz.io/shard-role=shard`), keeping each record with the
//!   instant it first saw it in that form. When it starts an elector on a shard, the
//!   elector starts from that observation ([`Machine::with_observed`]): its first read
//!   still decides, but the same record on that read keeps the earlier instant (a
//!   changed one is news). This is the engine's own rule, "expiry counts from when this
//!   process first saw the record", applied to what this process saw before the elector
//!   existed; the elector behaves as one started at that instant would.
//! - **Crashes.** A crashed member's member Lease expires in the others' eyes a lease
//!   duration after they saw its last renewal, which came before the crash; its shards'
//!   Leases expire a lease duration after the others saw *their* last renewals, which
//!   also came before the crash. So when the survivors start campaigning for its shards
//!   the shards' Leases have expired (or are about to) in their eyes, and each is taken
//!   at once: a crashed member's shards are owned again within a lease duration + a
//!   retry period of the crash (measured: 2.8–3.2 s with a 3 s lease duration). Without
//!   the observation a new owner would wait a lease duration from its own first read,
//!   two lease durations in all. A member that leaves gracefully hands over in
//!   milliseconds.
//! - **Forgetting.** Member Leases that have been released or expired for
//!   [`ShardSetConfig::forget_after`] are deleted (if unchanged since), so that members
//!   that start later do not wait a lease duration for long-gone members to expire.
//!
//! # What it guarantees, and what not
//!
//! - Never two owners of a shard at once, on the same terms as one Lease (see the crate
//!   docs): the Lease's step-down rules, plus fencing tokens for a paused process.
//! - Every shard owned again within a lease duration + a retry period after a member
//!   change: a join or a graceful leave (visible at once), a crash or a cut (the
//!   departed member's Leases expire within a lease duration of it, see *Crashes*);
//!   when the members' views agree, each of the `M` live members owns ⌈S/M⌉ or ⌊S/M⌋
//!   shards. A member that joins while a crashed member's Lease is still around (until
//!   [`ShardSetConfig::forget_after`]) counts that member alive for a lease duration,
//!   since it has never seen it renew: shards the others hand it may stay unowned until
//!   then. A member restarted under a crashed member's identity waits for its own old
//!   member Lease to expire (a lease duration after it first read it; if the Lease is
//!   forgotten meanwhile, a lease duration after the deletion): up to two lease
//!   durations before it joins.
//! - The observations are this process's own, and only ever make an elector act as if
//!   it had been started when the record was first seen here: a late, lost or stale
//!   event makes a record look younger (a later instant), never older. One thing an
//!   elector that watched the Lease itself all along would know and the observation
//!   does not carry: a holder replaced by another without a release keeps, in the
//!   engine's eyes, the replaced holder's longer lease duration ([`Observed::carried`]);
//!   an elector started from an observation knows only the record it was given, as one
//!   started at that instant would. This matters only when members use different lease
//!   durations (give every member the same) or someone else overwrote the record.
//! - A member cut off from the API server loses its member term and its shards' terms
//!   at their deadlines (the renew deadline after their last renewals); the others see
//!   its member Lease expire and take its shards as their Leases expire. A member whose
//!   member-Lease watch is broken sees the others expire and campaigns for their shards
//!   too; their Leases are held, so it only follows until its watch recovers.
//! - API load: besides renewing its shards and its member Lease every retry period,
//!   each member receives every shard Lease's renewals through its watch of the shard
//!   Leases: S / retry_period events per second per member (one watch request each).
//!
//! [`Machine::with_observed`]: crate::machine::Machine::with_observed
//! [`Observed::carried`]: crate::Observed::carried

mod assign;
mod store;

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use futures::stream::{BoxStream, FuturesUnordered};
use tokio::sync::{mpsc, watch};
use tokio::task::{JoinHandle, JoinSet};
use tokio::time::{Instant, sleep_until, timeout};
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, info, info_span, warn};

pub use assign::{assign, by_member, weight};
pub use store::{KubeStore, Labels, LeaseEvent, MemoryStore, MemoryStoreLock, ShardStore};

use crate::config::{ConfigError, ElectionConfig};
use crate::elector::{ElectionError, Elector};
use crate::handle::{ElectionHandle, Stopped};
use crate::lock::{LockError, Versioned};
use crate::record::Observed;
use crate::term::{Term, TermInfo};

/// The label naming a Lease's shard set.
pub const SET_LABEL: &str = "leaderz.io/shard-set";
/// The label saying whether a Lease is a shard's ([`ROLE_SHARD`]) or a member's
/// ([`ROLE_MEMBER`]).
pub const ROLE_LABEL: &str = "leaderz.io/shard-role";
/// [`ROLE_LABEL`] of a member Lease.
pub const ROLE_MEMBER: &str = "member";
/// [`ROLE_LABEL`] of a shard Lease.
pub const ROLE_SHARD: &str = "shard";
/// The label carrying a shard Lease's shard number.
pub const SHARD_LABEL: &str = "leaderz.io/shard";
/// The label on a member Lease carrying the number of shards that member uses (every
/// member of a set must use the same).
pub const COUNT_LABEL: &str = "leaderz.io/shard-count";

/// The most shards a set may have (the assignment sorts shards × members pairs).
pub const MAX_SHARDS: u32 = 10_000;

/// The Lease of shard `shard` of set `set`: `<set>-<shard>`.
pub fn shard_lease_name(set: &str, shard: u32) -> String {
    format!("{set}-{shard}")
}

/// The member Lease of `identity` in set `set`: `<set>-member-<identity>` when that is
/// a valid object name, else `<set>-member-` and 16 hex digits of the identity's
/// SHA-256.
pub fn member_lease_name(set: &str, identity: &str) -> String {
    let plain = format!("{set}-member-{identity}");
    if crate::config::is_object_name(&plain) {
        return plain;
    }
    use sha2::{Digest, Sha256};
    let digest = Sha256::digest(identity.as_bytes());
    let hex: String = digest[..8].iter().map(|b| format!("{b:02x}")).collect();
    format!("{set}-member-{hex}")
}

/// The members' Leases of a set carry these labels.
pub fn member_selector(set: &str) -> Labels {
    Labels::from([
        (SET_LABEL.to_owned(), set.to_owned()),
        (ROLE_LABEL.to_owned(), ROLE_MEMBER.to_owned()),
    ])
}

/// The shard Leases of a set carry these labels.
pub fn shard_selector(set: &str) -> Labels {
    Labels::from([
        (SET_LABEL.to_owned(), set.to_owned()),
        (ROLE_LABEL.to_owned(), ROLE_SHARD.to_owned()),
    ])
}

fn shard_labels(set: &str, shard: u32) -> Labels {
    Labels::from([
        (SET_LABEL.to_owned(), set.to_owned()),
        (ROLE_LABEL.to_owned(), ROLE_SHARD.to_owned()),
        (SHARD_LABEL.to_owned(), shard.to_string()),
    ])
}

/// A shard set's name, size and timing.
///
/// ```
/// use leaderz::ElectionConfig;
/// use leaderz::shards::ShardSetConfig;
///
/// let config = ShardSetConfig::new("tenants", 64, ElectionConfig::new("pod-a"));
/// assert!(config.validate().is_ok());
/// ```
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub struct ShardSetConfig {
    /// The set's name: its Leases are `<name>-<i>` and `<name>-member-<identity>`, and
    /// the label `leaderz.io/shard-set` carries it. A DNS label of at most 50 characters.
    pub name: String,
    /// How many shards (`S`), numbered `0..S`.
    pub shards: u32,
    /// This member's identity and the timing of every election it runs (its member Lease
    /// and each shard's). Every member of a set should use the same timing.
    pub election: ElectionConfig,
    /// Member Leases released or expired this long are deleted (if unchanged since).
    /// Default: 10 lease durations.
    pub forget_after: Duration,
}

impl ShardSetConfig {
    /// Set `name` of `shards` shards, with this member's identity and timing.
    #[must_use]
    pub fn new(name: impl Into<String>, shards: u32, election: ElectionConfig) -> Self {
        let forget_after = election.lease_duration * 10;
        Self {
            name: name.into(),
            shards,
            election,
            forget_after,
        }
    }

    /// Sets [`ShardSetConfig::forget_after`].
    #[must_use]
    pub fn forget_after(mut self, d: Duration) -> Self {
        self.forget_after = d;
        self
    }

    /// Checks the name, the shard count and the election config.
    pub fn validate(&self) -> Result<(), ShardSetError> {
        let n = &self.name;
        let label = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-';
        let edge =
            |c: Option<char>| c.is_some_and(|c| c.is_ascii_lowercase() || c.is_ascii_digit());
        if n.is_empty()
            || n.len() > 50
            || !n.chars().all(label)
            || !edge(n.chars().next())
            || !edge(n.chars().last())
        {
            return Err(ShardSetError::InvalidName(n.clone()));
        }
        if self.shards == 0 || self.shards > MAX_SHARDS {
            return Err(ShardSetError::ShardCount(self.shards));
        }
        self.election.validate()?;
        Ok(())
    }
}

/// Why a [`ShardSetConfig`] was refused.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum ShardSetError {
    /// The name cannot be part of Lease names and a label value.
    #[error(
        "shard set name `{0}` must be 1 to 50 lowercase letters, digits and `-`, starting and ending with a letter or digit"
    )]
    InvalidName(String),
    /// Zero shards, or more than [`MAX_SHARDS`].
    #[error("a shard set has 1 to {MAX_SHARDS} shards (got {0})")]
    ShardCount(u32),
    /// The election config was refused.
    #[error(transparent)]
    Config(#[from] ConfigError),
}

/// The shards this member owns now, each with its term. Holding a clone of a [`Term`]
/// keeps that shard's elector from handing it over; drop it when its work has stopped.
pub type Owned = BTreeMap<u32, Term>;

/// What a member knows about its set right now.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct ShardStatus {
    /// The set's name.
    pub name: String,
    /// This member's identity.
    pub identity: String,
    /// How many shards the set has.
    pub shards: u32,
    /// This member holds its member Lease (it counts itself in).
    pub joined: bool,
    /// The member Leases have been listed at least once.
    pub synced: bool,
    /// The live members as this member sees them (itself included while joined).
    pub members: Vec<String>,
    /// The shards assigned to this member.
    pub assigned: Vec<u32>,
    /// The shards this member owns now, with their fencing tokens.
    pub owned: BTreeMap<u32, i64>,
    /// Shards being handed over (their work stopping, then the release).
    pub handing_over: Vec<u32>,
    /// The last failure to list or watch the members, cleared by the next list.
    pub last_error: Option<String>,
}

/// A configured shard set, ready to join.
#[derive(Debug)]
pub struct ShardSet<S> {
    store: Arc<S>,
    config: ShardSetConfig,
    seed: Option<u64>,
}

impl<S: ShardStore> ShardSet<S> {
    /// Member `config.election.identity` of set `config.name`, on the Leases of `store`.
    pub fn new(store: S, config: ShardSetConfig) -> Result<Self, ShardSetError> {
        config.validate()?;
        Ok(Self {
            store: Arc::new(store),
            config,
            seed: None,
        })
    }

    /// Seeds the electors' jitter, for simulations that replay. Leave it unset otherwise.
    #[must_use]
    pub fn jitter_seed(mut self, seed: u64) -> Self {
        self.seed = Some(seed);
        self
    }

    /// Joins the set on the current tokio runtime. Dropping the handle leaves it (in the
    /// background, handing every shard over); [`ShardSetHandle::shutdown`] waits for that.
    pub fn spawn(self) -> ShardSetHandle {
        let shutdown = CancellationToken::new();
        let crash = CancellationToken::new();
        let (owned_tx, owned_rx) = watch::channel(Owned::new());
        let status = ShardStatus {
            name: self.config.name.clone(),
            identity: self.config.election.identity.clone(),
            shards: self.config.shards,
            ..ShardStatus::default()
        };
        let (status_tx, status_rx) = watch::channel(status);
        let (ended_tx, ended_rx) = mpsc::unbounded_channel();
        let span = info_span!("shard_set", set = %self.config.name, identity = %self.config.election.identity);
        let driver = Driver {
            member_lease: member_lease_name(&self.config.name, &self.config.election.identity),
            store: self.store,
            config: self.config,
            seed: self.seed,
            member_term: None,
            view: View::default(),
            shard_view: View::default(),
            synced: false,
            last_error: None,
            running: BTreeMap::new(),
            stopping: BTreeMap::new(),
            owned: owned_tx,
            status: status_tx,
            ended_tx,
            ended_rx,
            forgetting: JoinSet::new(),
            forgotten: BTreeSet::new(),
            assigned: Vec::new(),
            cache: None,
            mismatched: BTreeSet::new(),
        };
        let task = tokio::spawn(driver.run(shutdown.clone(), crash.clone()).instrument(span));
        ShardSetHandle {
            owned: owned_rx,
            status: status_rx,
            shutdown,
            crash,
            task: Some(task),
        }
    }
}

/// A member of a running shard set. Dropping it leaves the set (handing every shard
/// over in the background); [`ShardSetHandle::shutdown`] does the same and waits.
#[derive(Debug)]
pub struct ShardSetHandle {
    owned: watch::Receiver<Owned>,
    status: watch::Receiver<ShardStatus>,
    shutdown: CancellationToken,
    crash: CancellationToken,
    task: Option<JoinHandle<Result<(), ElectionError>>>,
}

impl ShardSetHandle {
    /// The shards this member owns, with their terms, as they change. Do not keep a
    /// borrow of it across an await, and drop clones of a [`Term`] once its work stopped.
    pub fn owned(&self) -> watch::Receiver<Owned> {
        self.owned.clone()
    }

    /// The shards this member owns now, and the facts of their terms.
    pub fn shards(&self) -> BTreeMap<u32, TermInfo> {
        self.owned
            .borrow()
            .iter()
            .filter(|(_, t)| t.is_active())
            .map(|(s, t)| (*s, t.info().clone()))
            .collect()
    }

    /// What this member knows about the set.
    pub fn status(&self) -> watch::Receiver<ShardStatus> {
        self.status.clone()
    }

    /// A token that makes the member leave when cancelled (as dropping the handle does).
    pub fn shutdown_token(&self) -> CancellationToken {
        self.shutdown.clone()
    }

    /// Runs `work(shard, term)` for every shard while this member owns it, and drops
    /// (aborts) it when the shard's term ends. Returns when the member has left the set:
    /// `Ok` after a shutdown, the error if it failed (e.g. RBAC denied).
    pub async fn run_per_shard<F, Fut>(&mut self, mut work: F) -> Result<(), ElectionError>
    where
        F: FnMut(u32, Term) -> Fut,
        Fut: Future<Output = ()>,
    {
        let mut owned = self.owned.clone();
        let mut started: BTreeMap<u32, i64> = BTreeMap::new();
        let mut running = FuturesUnordered::new();
        loop {
            let new: Vec<(u32, Term)> = owned
                .borrow_and_update()
                .iter()
                .filter(|(s, t)| t.is_active() && started.get(s) != Some(&t.fencing_token()))
                .map(|(s, t)| (*s, t.clone()))
                .collect();
            for (shard, term) in new {
                let token = term.token();
                let fencing = term.fencing_token();
                started.insert(shard, fencing);
                let job = work(shard, term);
                running.push(Box::pin(async move {
                    tokio::select! {
                        () = job => token.cancelled().await,
                        () = token.cancelled() => {}
                    }
                    (shard, fencing)
                }));
            }
            tokio::select! {
                changed = owned.changed() => {
                    if changed.is_err() {
                        break;
                    }
                }
                Some((shard, fencing)) = running.next(), if !running.is_empty() => {
                    if started.get(&shard) == Some(&fencing) {
                        started.remove(&shard);
                    }
                }
            }
        }
        drop(running);
        self.join().await
    }

    /// Leaves the set: releases the member Lease, hands every shard over (its work
    /// stops, then the release), deletes the member Lease, and returns how it ended.
    pub async fn shutdown(mut self) -> Result<(), ElectionError> {
        self.shutdown.cancel();
        self.join().await
    }

    /// Waits for the member to stop by itself (a fatal error) without stopping it.
    pub async fn join(&mut self) -> Result<(), ElectionError> {
        let Some(task) = self.task.as_mut() else {
            return Ok(());
        };
        let result = match task.await {
            Ok(r) => r,
            Err(e) => Err(ElectionError::Task(e.to_string())),
        };
        self.task = None;
        result
    }

    /// Stops every elector of this member at once, as a crash would: nothing is
    /// released, and the terms end as the electors are dropped. For simulations.
    #[doc(hidden)]
    pub fn abort(mut self) {
        self.crash.cancel();
        self.task = None;
    }
}

impl Drop for ShardSetHandle {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// Leases as this process saw them, by name: each record with the instant this process
/// first saw it in that form (the engine's expiry rule, [`Observed::expires_at`]).
/// Whatever is learned from an event is learned when the event arrives, so a late event
/// only makes a record look younger than it is.
#[derive(Debug, Default)]
struct View {
    leases: BTreeMap<String, Observed>,
}

impl View {
    fn see(&mut self, name: String, v: Versioned, now: Instant) {
        // The time is kept only while the record is the same in every field: stricter
        // than the engine (which ignores a handoff annotation coming or going), so never
        // an earlier time than an elector of ours would have.
        let observed_at = match self.leases.get(&name) {
            Some(old) if old.record == v.record => old.observed_at,
            _ => now,
        };
        // `carried` stays zero: what a process that first saw the record then would
        // hold (see `Driver::start`).
        self.leases.insert(
            name,
            Observed {
                record: v.record,
                version: v.version,
                observed_at,
                lease: v.lease,
                carried: Duration::ZERO,
            },
        );
    }

    fn replace(&mut self, list: Vec<(String, Versioned)>, now: Instant) {
        let names: BTreeSet<String> = list.iter().map(|(n, _)| n.clone()).collect();
        self.leases.retain(|n, _| names.contains(n));
        for (name, v) in list {
            self.see(name, v, now);
        }
    }

    fn expires_at(seen: &Observed, config: &ElectionConfig) -> Instant {
        seen.expires_at(config.lease_duration, config.max_record_duration)
    }

    /// The holders of member Leases that are held and unexpired at `now`, other than
    /// the Lease `own`.
    fn alive(&self, now: Instant, own: &str, config: &ElectionConfig) -> BTreeSet<String> {
        self.leases
            .iter()
            .filter(|(name, _)| name.as_str() != own)
            .filter(|(_, s)| s.record.holder().is_some() && now < Self::expires_at(s, config))
            .map(|(_, s)| s.record.holder_identity.clone())
            .collect()
    }

    /// The next instant a live member Lease (other than `own`) expires.
    fn next_expiry(&self, now: Instant, own: &str, config: &ElectionConfig) -> Option<Instant> {
        self.leases
            .iter()
            .filter(|(name, s)| name.as_str() != own && s.record.holder().is_some())
            .map(|(_, s)| Self::expires_at(s, config))
            .filter(|at| *at > now)
            .min()
    }

    /// When each member Lease (other than `own`) stopped counting: released or expired.
    fn dead_since(&self, own: &str, config: &ElectionConfig) -> Vec<(String, String, Instant)> {
        self.leases
            .iter()
            .filter(|(name, _)| name.as_str() != own)
            .map(|(name, s)| {
                let since = if s.record.holder().is_some() {
                    Self::expires_at(s, config)
                } else {
                    s.observed_at
                };
                (name.clone(), s.version.clone(), since)
            })
            .collect()
    }
}

/// A shard's elector.
struct Running {
    handle: ElectionHandle,
    publisher: JoinHandle<()>,
}

struct Driver<S: ShardStore> {
    store: Arc<S>,
    config: ShardSetConfig,
    seed: Option<u64>,
    member_lease: String,
    member_term: Option<Term>,
    view: View,
    /// The shard Leases as this member saw them: what starts each shard's elector.
    shard_view: View,
    synced: bool,
    last_error: Option<String>,
    /// Electors of the shards this member campaigns for.
    running: BTreeMap<u32, Running>,
    /// Electors being shut down (work stopping, then the release).
    stopping: BTreeMap<u32, Running>,
    owned: watch::Sender<Owned>,
    status: watch::Sender<ShardStatus>,
    /// Shards whose elector ended (shut down, or stopped by itself).
    ended_tx: mpsc::UnboundedSender<u32>,
    ended_rx: mpsc::UnboundedReceiver<u32>,
    forgetting: JoinSet<()>,
    /// Member Leases (name, version) this member tried to delete.
    forgotten: BTreeSet<(String, String)>,
    assigned: Vec<u32>,
    /// The live members the assignment was last computed for, and our shards then.
    cache: Option<(Vec<String>, Vec<u32>)>,
    /// Member Leases warned about for using another number of shards.
    mismatched: BTreeSet<String>,
}

async fn acquired(handle: Option<&ElectionHandle>) -> Result<Term, Stopped> {
    match handle {
        Some(h) => h.acquired().await,
        None => std::future::pending().await,
    }
}

async fn ended(term: Option<&Term>) {
    match term {
        Some(t) => t.cancelled().await,
        None => std::future::pending().await,
    }
}

async fn next_event(
    stream: &mut BoxStream<'static, LeaseEvent>,
    open: &mut bool,
) -> Option<LeaseEvent> {
    if !*open {
        return std::future::pending().await;
    }
    let event = stream.next().await;
    if event.is_none() {
        *open = false;
    }
    event
}

async fn sleep_until_some(at: Option<Instant>) {
    match at {
        Some(at) => sleep_until(at).await,
        None => std::future::pending().await,
    }
}

impl<S: ShardStore> Driver<S> {
    async fn run(
        mut self,
        shutdown: CancellationToken,
        crash: CancellationToken,
    ) -> Result<(), ElectionError> {
        let member_lock = self.store.lock(&self.member_lease, &self.member_labels());
        let mut member = Some(self.elector(member_lock, 0, None)?);
        let mut members = self.store.leases(&member_selector(&self.config.name));
        let mut members_open = true;
        let mut shards = self.store.leases(&shard_selector(&self.config.name));
        let mut shards_open = true;
        let mut owned_changes = self.owned.subscribe();
        loop {
            let now = Instant::now();
            self.reconcile(now);
            self.forget_departed(now);
            self.publish(now);
            let wake = self.next_wake(now);
            tokio::select! {
                biased;
                () = crash.cancelled() => {
                    self.crash(member);
                    return Ok(());
                }
                () = shutdown.cancelled() => {
                    return self.leave(member).await;
                }
                term = acquired(member.as_ref()), if self.member_term.is_none() => match term {
                    Ok(term) => {
                        info!(fencing_token = term.fencing_token(), "joined the shard set");
                        self.member_term = Some(term);
                    }
                    Err(Stopped) => {
                        // The member elector stopped by itself: a fatal error.
                        let result = match member.take() {
                            Some(mut m) => m.join().await,
                            None => Ok(()),
                        };
                        self.stop_all().await;
                        return result;
                    }
                },
                () = ended(self.member_term.as_ref()) => {
                    warn!("lost the member Lease: handing every shard over until it is back");
                    self.member_term = None;
                }
                event = next_event(&mut members, &mut members_open) => {
                    if let Some(event) = event
                        && let Err(e) = self.on_member_event(event)
                    {
                        if let Some(m) = member.take() {
                            let _ = m.shutdown().await;
                        }
                        self.stop_all().await;
                        return Err(ElectionError::Lock(e));
                    }
                }
                Some(event) = next_event(&mut shards, &mut shards_open) => {
                    self.on_shard_event(event);
                }
                Some(shard) = self.ended_rx.recv() => {
                    if let Err(e) = self.on_ended(shard).await {
                        if let Some(m) = member.take() {
                            let _ = m.shutdown().await;
                        }
                        self.stop_all().await;
                        return Err(e);
                    }
                }
                Some(_) = self.forgetting.join_next(), if !self.forgetting.is_empty() => {}
                changed = owned_changes.changed() => {
                    // Only to publish the owned shards; the sender lives as long as we do.
                    let _ = changed;
                }
                () = sleep_until_some(wake) => {}
            }
        }
    }

    fn member_labels(&self) -> Labels {
        let mut labels = member_selector(&self.config.name);
        labels.insert(COUNT_LABEL.to_owned(), self.config.shards.to_string());
        labels
    }

    fn elector<L: crate::Lock>(
        &self,
        lock: L,
        salt: u64,
        seen: Option<(Versioned, Instant)>,
    ) -> Result<ElectionHandle, ElectionError> {
        let mut elector = Elector::new(lock, self.config.election.clone())?;
        if let Some(seed) = self.seed {
            elector = elector.jitter_seed(seed ^ salt.wrapping_mul(0x9E37_79B9_7F4A_7C15));
        }
        if let Some((v, at)) = seen {
            elector = elector.observed(v, at);
        }
        Ok(elector.spawn())
    }

    fn joined(&self) -> bool {
        self.member_term.as_ref().is_some_and(Term::is_active)
    }

    /// The live members as this member sees them.
    fn members(&self, now: Instant) -> BTreeSet<String> {
        let mut alive = self
            .view
            .alive(now, &self.member_lease, &self.config.election);
        alive.remove(&self.config.election.identity);
        if self.joined() {
            alive.insert(self.config.election.identity.clone());
        }
        alive
    }

    /// The shards assigned to this member now (the assignment is computed again only
    /// when the live members change).
    fn desired(&mut self, now: Instant) -> Vec<u32> {
        if !self.joined() || !self.synced {
            return Vec::new();
        }
        let members: Vec<String> = self.members(now).into_iter().collect();
        if let Some((cached, mine)) = &self.cache
            && *cached == members
        {
            return mine.clone();
        }
        let me = &self.config.election.identity;
        let mine: Vec<u32> = assign(&self.config.name, self.config.shards, &members)
            .iter()
            .enumerate()
            .filter(|(_, owner)| owner.as_ref() == Some(me))
            .filter_map(|(shard, _)| u32::try_from(shard).ok())
            .collect();
        self.cache = Some((members, mine.clone()));
        mine
    }

    /// Starts electors for the shards assigned to us, and shuts down the others'.
    fn reconcile(&mut self, now: Instant) {
        let want = self.desired(now);
        if want != self.assigned {
            let before: BTreeSet<u32> = self.assigned.iter().copied().collect();
            let after: BTreeSet<u32> = want.iter().copied().collect();
            info!(
                assigned = after.len(),
                gained = after.difference(&before).count(),
                lost = before.difference(&after).count(),
                members = self.members(now).len(),
                "assignment changed"
            );
            self.assigned = want.clone();
        }
        let keep: BTreeSet<u32> = want.iter().copied().collect();
        let drop: Vec<u32> = self
            .running
            .keys()
            .filter(|s| !keep.contains(s))
            .copied()
            .collect();
        for shard in drop {
            self.stop(shard);
        }
        for shard in want {
            if !self.running.contains_key(&shard) && !self.stopping.contains_key(&shard) {
                self.start(shard);
            }
        }
    }

    /// Starts campaigning for `shard`. The elector starts from what this member last saw
    /// of the shard's Lease, and when it first saw that record: a crashed member's
    /// shard is then taken a lease duration after its last renewal was seen here, not a
    /// lease duration after the new owner's first read (which comes only once the
    /// crashed member's own Lease has expired, itself a lease duration). The engine
    /// treats it as its own first look; only this process's own instant is passed, so
    /// the expiry rule is the engine's: the elector behaves as one started when the
    /// record was first seen here would (that process would know nothing older either).
    fn start(&mut self, shard: u32) {
        let name = shard_lease_name(&self.config.name, shard);
        let lock = self
            .store
            .lock(&name, &shard_labels(&self.config.name, shard));
        let seen = self.shard_view.leases.get(&name).map(|o| {
            let v = Versioned {
                record: o.record.clone(),
                version: o.version.clone(),
                lease: o.lease.clone(),
            };
            (v, o.observed_at)
        });
        let handle = match self.elector(lock, u64::from(shard) + 1, seen) {
            Ok(h) => h,
            Err(e) => {
                warn!(shard, error = %e, "cannot start the shard's elector");
                return;
            }
        };
        debug!(shard, "campaigning");
        let mut terms = handle.terms();
        let owned = self.owned.clone();
        let ended = self.ended_tx.clone();
        let publisher = tokio::spawn(async move {
            while let Ok(term) = terms.acquired().await {
                let token = term.token();
                let fencing = term.fencing_token();
                debug!(shard, fencing_token = fencing, "owns the shard");
                owned.send_modify(|o| {
                    o.insert(shard, term);
                });
                token.cancelled().await;
                owned.send_if_modified(|o| {
                    if o.get(&shard).is_some_and(|t| t.fencing_token() == fencing) {
                        o.remove(&shard);
                        return true;
                    }
                    false
                });
            }
            let _ = ended.send(shard);
        });
        self.running.insert(shard, Running { handle, publisher });
    }

    /// Hands shard `shard` over: its elector ends the term, waits for the work to drop
    /// its [`Term`], releases, and stops.
    fn stop(&mut self, shard: u32) {
        if let Some(r) = self.running.remove(&shard) {
            debug!(shard, "handing over");
            r.handle.shutdown_token().cancel();
            self.stopping.insert(shard, r);
        }
    }

    /// A shard's elector ended. `Err` if it ended by itself with an error.
    async fn on_ended(&mut self, shard: u32) -> Result<(), ElectionError> {
        if let Some(mut r) = self.stopping.remove(&shard) {
            if let Err(e) = r.handle.join().await {
                warn!(shard, error = %e, "the shard's elector stopped with an error");
            }
            return Ok(());
        }
        if let Some(mut r) = self.running.remove(&shard) {
            return match r.handle.join().await {
                Ok(()) => Ok(()),
                Err(e) => {
                    warn!(shard, error = %e, "the shard's elector failed");
                    Err(e)
                }
            };
        }
        Ok(())
    }

    /// Warns once per member Lease that says it uses another number of shards: the
    /// members would then compute different assignments.
    fn check_count(&mut self, name: &str, v: &Versioned) {
        let count = v
            .lease
            .as_ref()
            .and_then(|l| l.metadata.labels.as_ref())
            .and_then(|l| l.get(COUNT_LABEL))
            .cloned();
        if let Some(count) = count
            && count != self.config.shards.to_string()
            && self.mismatched.insert(name.to_owned())
        {
            warn!(
                lease = name,
                theirs = %count,
                ours = self.config.shards,
                "a member of this shard set uses another number of shards: give every member the same"
            );
        }
    }

    fn on_member_event(&mut self, event: LeaseEvent) -> Result<(), LockError> {
        let now = Instant::now();
        match event {
            LeaseEvent::Listed(list) => {
                for (name, v) in &list {
                    self.check_count(name, v);
                }
                self.view.replace(list, now);
                self.synced = true;
                self.last_error = None;
            }
            LeaseEvent::Changed(name, v) => {
                self.check_count(&name, &v);
                self.view.see(name, v, now);
            }
            LeaseEvent::Deleted(name) => {
                self.view.leases.remove(&name);
            }
            LeaseEvent::Failed(e) => {
                if !self.synced && e.is_fatal() {
                    return Err(e);
                }
                if self.last_error.is_none() {
                    warn!(error = %e, "listing or watching the members failed; retrying");
                }
                self.last_error = Some(e.to_string());
            }
        }
        Ok(())
    }

    /// What this member sees of the shard Leases (only to start electors from). A
    /// failure leaves the view as it was: an old record is news to the elector's own
    /// first read, never a reason to act sooner.
    fn on_shard_event(&mut self, event: LeaseEvent) {
        let now = Instant::now();
        match event {
            LeaseEvent::Listed(list) => self.shard_view.replace(list, now),
            LeaseEvent::Changed(name, v) => self.shard_view.see(name, v, now),
            LeaseEvent::Deleted(name) => {
                self.shard_view.leases.remove(&name);
            }
            LeaseEvent::Failed(e) => {
                debug!(error = %e, "following the shard Leases failed; retrying")
            }
        }
    }

    /// Deletes member Leases that have not counted for `forget_after`.
    fn forget_departed(&mut self, now: Instant) {
        let after = self.config.forget_after;
        for (name, version, since) in self
            .view
            .dead_since(&self.member_lease, &self.config.election)
        {
            if now < since + after || !self.forgotten.insert((name.clone(), version.clone())) {
                continue;
            }
            let store = self.store.clone();
            let limit = self.config.election.request_timeout;
            self.forgetting.spawn(async move {
                match timeout(limit, store.forget(&name, &version)).await {
                    Ok(Ok(())) => info!(lease = %name, "deleted a departed member's Lease"),
                    Ok(Err(e)) => debug!(lease = %name, error = %e, "did not delete a departed member's Lease"),
                    Err(_) => debug!(lease = %name, "deleting a departed member's Lease timed out"),
                }
            });
        }
    }

    /// The next instant something changes by itself: a member expiring, or a departed
    /// member's Lease due to be forgotten.
    fn next_wake(&self, now: Instant) -> Option<Instant> {
        let expiry = self
            .view
            .next_expiry(now, &self.member_lease, &self.config.election);
        let forget = self
            .view
            .dead_since(&self.member_lease, &self.config.election)
            .into_iter()
            .filter(|(n, v, _)| !self.forgotten.contains(&(n.clone(), v.clone())))
            .map(|(_, _, since)| since + self.config.forget_after)
            .filter(|at| *at > now)
            .min();
        [expiry, forget].into_iter().flatten().min()
    }

    fn publish(&self, now: Instant) {
        let owned: BTreeMap<u32, i64> = self
            .owned
            .borrow()
            .iter()
            .map(|(s, t)| (*s, t.fencing_token()))
            .collect();
        let status = ShardStatus {
            name: self.config.name.clone(),
            identity: self.config.election.identity.clone(),
            shards: self.config.shards,
            joined: self.joined(),
            synced: self.synced,
            members: self.members(now).into_iter().collect(),
            assigned: self.assigned.clone(),
            owned,
            handing_over: self.stopping.keys().copied().collect(),
            last_error: self.last_error.clone(),
        };
        self.status.send_if_modified(|s| {
            if *s == status {
                return false;
            }
            *s = status;
            true
        });
    }

    /// Shuts every shard's elector down and waits for them (work stops, then release).
    async fn stop_all(&mut self) {
        let shards: Vec<u32> = self.running.keys().copied().collect();
        for shard in shards {
            self.stop(shard);
        }
        self.publish(Instant::now());
        while !self.stopping.is_empty() {
            let Some(shard) = self.ended_rx.recv().await else {
                break;
            };
            let _ = self.on_ended(shard).await;
        }
    }

    /// Leaves the set: the member Lease first (so that the others start campaigning for
    /// our shards while we still hold them), then every shard, then the member Lease is
    /// deleted.
    async fn leave(mut self, member: Option<ElectionHandle>) -> Result<(), ElectionError> {
        info!("leaving the shard set");
        drop(self.member_term.take());
        let mut result = Ok(());
        let mut last = None;
        if let Some(m) = member {
            let status = m.status();
            result = m.shutdown().await;
            last = status.borrow().observed.clone();
        }
        self.stop_all().await;
        if let Some(o) = last.filter(|o| o.record.holder().is_none()) {
            let limit = self.config.election.request_timeout;
            match timeout(limit, self.store.forget(&self.member_lease, &o.version)).await {
                Ok(Ok(())) => debug!("deleted our member Lease"),
                Ok(Err(e)) => debug!(error = %e, "did not delete our member Lease"),
                Err(_) => debug!("deleting our member Lease timed out"),
            }
        }
        self.publish(Instant::now());
        info!("left the shard set");
        result
    }

    /// Stops every elector at once, releasing nothing (a simulated crash).
    fn crash(&mut self, member: Option<ElectionHandle>) {
        if let Some(m) = member {
            m.abort();
        }
        self.member_term = None;
        for (_, r) in std::mem::take(&mut self.running)
            .into_iter()
            .chain(std::mem::take(&mut self.stopping))
        {
            r.handle.abort();
            r.publisher.abort();
        }
        self.owned.send_replace(Owned::new());
        self.forgetting.abort_all();
    }
}
