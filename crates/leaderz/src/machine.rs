//! Every decision of an election, apart from I/O: a state machine that takes events and
//! returns actions.
//!
//! This is where leaderz decides when to read, take, renew, step down and release, and
//! with which record. It does no I/O and never reads a clock: the caller passes the time
//! with every event, carries out the [`Action`]s (lock requests, watches, terms) and feeds
//! their outcomes back as [`Input`]s. The tokio driver behind [`Elector::spawn`](crate::Elector::spawn) is one
//! such caller; the simulation tests are another (they give every candidate a clock of its
//! own, running at its own rate). Expiry itself is decided in
//! [`Observed::expires_at`](crate::record::Observed::expires_at).
//!
//! ```
//! use leaderz::machine::{Action, Answer, Input, Machine, Op};
//! use leaderz::ElectionConfig;
//! use tokio::time::Instant;
//!
//! let now = Instant::now();
//! let mut m = Machine::new(ElectionConfig::new("pod-a"), "default/my-lock", now).unwrap();
//! // The first thing a candidate does is read the lock.
//! let Some(Action::Send(request)) = m.poll_action() else { panic!() };
//! assert!(matches!(request.op, Op::Get));
//! // The Lease does not exist: the machine watches for it and creates it.
//! m.handle(Input::Reply(Ok(Answer::Read(None))), now);
//! assert!(matches!(m.poll_action(), Some(Action::Watch { .. })));
//! let Some(Action::Send(request)) = m.poll_action() else { panic!() };
//! let Op::Create(record) = &request.op else { panic!() };
//! assert_eq!(record.holder_identity, "pod-a");
//! ```
//!
//! # The rules, in one place
//!
//! - **One request at a time.** The machine never has more than one lock request
//!   outstanding, and every request carries the deadline by which the caller must answer
//!   it (with [`LockError::Timeout`] if need be). A write whose answer is lost may still
//!   land later; the machine remembers what it wrote so that it recognises its own
//!   records whenever they show up.
//! - **Taking.** A follower takes a record that has no holder, whose holder's lease has
//!   expired on the local clock, or that is one of this process's own writes (then no
//!   other process can be leading on it). Every new term raises `leaseTransitions`, from
//!   the highest value this process has seen on the Lease.
//! - **Leading.** The term starts at the send time of the taking write and ends no later
//!   than the send time of the last successful write + `renew_deadline`. A write
//!   answered after that deadline never starts or extends a term.
//! - **Deletion.** A deleted Lease is re-created with `leaseTransitions` continuing from
//!   the last record seen, once no term can still run on it: a whole lease duration
//!   after learning of the deletion (and not before the last record seen expired); at
//!   once by the leader that found it deleted. A process that never saw the Lease
//!   creates it at once.
//! - **Access.** Refusals (401/403, missing namespace) stop the election only while it
//!   starts (before the Lease has first been read or written); afterwards they are an
//!   outage: a leader steps down, everyone backs off and keeps trying.
//! - **Watching.** Followers watch; a watch that ends at once repeatedly, is refused or
//!   fails is replaced by polling every `retry_period`, and watching is tried again
//!   later with a backoff. A watch that misses an expected renewal is checked with one
//!   read, and re-opened if it turns out to be behind.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use tokio::time::Instant;
use tracing::{debug, info, warn};

use crate::client::Priority;
use crate::config::{ConfigError, ElectionConfig};
use crate::elector::ElectionError;
use crate::handle::Status;
use crate::lock::{LockError, LockEvent, Versioned};
use crate::metrics::Metrics;
use crate::record::{Handoff, HandoffState, LeaderRecord, Observed, TakeoverError, now_micros};
use crate::term::TermInfo;

/// How long the API server keeps one watch open (`timeoutSeconds`). A watch still open
/// 30 s after this without having ended is taken for dead.
pub const WATCH_TIMEOUT: Duration = Duration::from_secs(290);

/// See [`WATCH_TIMEOUT`].
const WATCH_SLACK: Duration = Duration::from_secs(30);

/// Watches that end within a retry period of opening, this many times in a row, make
/// the follower poll for a while instead.
const SHORT_WATCHES_BEFORE_POLLING: u32 = 3;

/// After falling back to polling, watching is tried again after this long, doubling up
/// to [`WATCH_RETRY_MAX`].
const WATCH_RETRY_MIN: Duration = Duration::from_secs(30);
const WATCH_RETRY_MAX: Duration = Duration::from_secs(300);

/// A follower about to take an expired record reads it once more first; it sends that
/// read this long (at most; a quarter of the retry period if less) before the expiry,
/// so that the take goes out at the expiry instant instead of a read's round trip later.
const CONFIRM_AHEAD: Duration = Duration::from_millis(100);

/// How many of its own recent writes a process remembers to recognise them later.
const OWN_WRITES: usize = 8;

/// A record this process sent to the API server: what [`Machine::wrote`] recognises it
/// by (not the whole record: a machine per election keeps eight of these).
#[derive(Debug, Clone)]
struct OwnWrite {
    holder_identity: String,
    lease_transitions: i32,
    renew_time: Option<jiff::Timestamp>,
    /// Answered with a conflict or "not found" (it most likely did not land).
    refused: bool,
}

impl OwnWrite {
    fn of(record: &LeaderRecord) -> Self {
        Self {
            holder_identity: record.holder_identity.clone(),
            lease_transitions: record.lease_transitions,
            renew_time: record.renew_time,
            refused: false,
        }
    }

    fn is(&self, record: &LeaderRecord) -> bool {
        self.holder_identity == record.holder_identity
            && self.lease_transitions == record.lease_transitions
            && self.renew_time == record.renew_time
    }
}

/// Something that happened, fed to [`Machine::handle`].
#[derive(Debug)]
#[non_exhaustive]
pub enum Input {
    /// Time passed: the caller reached [`Machine::poll_timeout`].
    Tick,
    /// The answer to the outstanding [`Request`].
    Reply(Result<Answer, LockError>),
    /// The outstanding [`Request`] left this process at this instant (its first attempt,
    /// if the client retried it): later than the [`Action::Send`] was taken when the
    /// client queued it. The API server handled the request after it, so a write's term
    /// is counted from it and a read is as fresh as it. Optional; give it before the
    /// [`Input::Reply`].
    Sent(Instant),
    /// The outstanding [`Request`] was dropped while it still waited in the client, so
    /// it was never sent and cannot land: at its [`Request::send_by`], at its deadline,
    /// on [`Action::Withdraw`], or when its term has ended ([`Action::EndTerm`]), so
    /// that the release does not wait for it.
    Unsent,
    /// The watch asked for by [`Action::Watch`] is open, or could not be opened.
    WatchOpened(Result<(), LockError>),
    /// The open watch delivered an event.
    WatchEvent(LockEvent),
    /// The open watch ended: by the server (`None`) or with an error.
    WatchEnded(Option<LockError>),
    /// Stop the election: end the term, wait for the work, release, stop.
    Shutdown,
    /// Every handle on the last term has been dropped: its work has stopped.
    WorkStopped,
    /// Something the election depends on failed for good (coordinated mode: the
    /// `LeaseCandidate` cannot be published): stop with this error.
    Failed(LockError),
}

/// A successful answer to a [`Request`].
#[derive(Debug)]
#[non_exhaustive]
pub enum Answer {
    /// The answer to [`Op::Get`]: the record, or `None` if the Lease does not exist.
    Read(Option<Versioned>),
    /// The answer to [`Op::Create`] or [`Op::Update`]: the record as written.
    Wrote(Versioned),
}

/// What the caller must do, taken from [`Machine::poll_action`].
#[derive(Debug)]
#[non_exhaustive]
#[allow(clippy::large_enum_variant)] // taken at once, never stored in bulk
pub enum Action {
    /// Carry out a lock request and feed its outcome back as [`Input::Reply`].
    Send(Request),
    /// Open a watch on the lock after version `after` (empty: from now), asking the
    /// server to end it after `timeout`; answer with [`Input::WatchOpened`] by `open_by`.
    Watch {
        /// The version the watch starts after.
        after: String,
        /// How long the server should keep the watch open.
        timeout: Duration,
        /// When to give up opening it (answer `WatchOpened(Err(Timeout))`).
        open_by: Instant,
    },
    /// Close the watch; deliver nothing more from it.
    Unwatch,
    /// A term starts: hand the work a term with this fencing token and deadline.
    StartTerm {
        /// The fencing token (`leaseTransitions`).
        token: i32,
        /// When the taking write was sent.
        started_at: Instant,
        /// When the term ends unless extended.
        deadline: Instant,
    },
    /// The term's deadline moved (a successful renewal).
    ExtendTerm(Instant),
    /// Drop the outstanding request if it still waits in the client, and report
    /// [`Input::Unsent`] (a take decided before a shutdown: there is no point sending
    /// it now). Nothing if it has left, or the caller cannot tell.
    Withdraw,
    /// The term ended: cancel it, and report [`Input::WorkStopped`] once its work has
    /// dropped every handle.
    EndTerm,
    /// Tell the world (e.g. Events on the Lease) that this process started or stopped
    /// leading; best effort.
    Announce {
        /// Started (`true`) or stopped leading.
        leading: bool,
    },
    /// The election is over.
    Stop(Result<(), ElectionError>),
}

/// A lock request and when the caller must have answered it.
///
/// A caller that sends at once answers [`LockError::Timeout`] at `deadline` or `timeout`
/// after the action was taken, whichever is sooner. A caller whose client queues
/// requests in the process (a leaderz client under load: see
/// [`Priority`]) may wait up to `deadline` for the request to
/// leave, then gives it `timeout` in flight (still at most until `deadline`), and reports
/// when it left with [`Input::Sent`].
#[derive(Debug)]
#[non_exhaustive]
pub struct Request {
    /// What to do.
    pub op: Op,
    /// When to give up and answer [`LockError::Timeout`], however long the request
    /// waited to be sent.
    pub deadline: Instant,
    /// How long the request may be in flight once sent.
    pub timeout: Duration,
    /// Its order among requests that wait to be sent.
    pub priority: Priority,
    /// If it still waits in the client at this instant, drop it and report
    /// [`Input::Unsent`]: a create of a Lease that a read found absent must leave
    /// within a retry period of that read (what the read showed may no longer hold).
    pub send_by: Option<Instant>,
}

/// A lock operation (see [`Lock`](crate::Lock)).
#[derive(Debug)]
#[non_exhaustive]
#[allow(clippy::large_enum_variant)] // handed on at once, never stored in bulk
pub enum Op {
    /// [`Lock::get`](crate::Lock::get).
    Get,
    /// [`Lock::create`](crate::Lock::create) with this record.
    Create(LeaderRecord),
    /// [`Lock::update`](crate::Lock::update) of this version with this record.
    Update(Versioned, LeaderRecord),
}

/// What the outstanding request is for.
#[derive(Debug)]
enum Purpose {
    /// A follower's read (also to check the watch or to resolve a conflict).
    Read,
    /// A follower's taking write.
    Take,
    /// The leader's renewal on its cached version.
    Renew,
    /// The leader's read after a failed renewal (client-go's slow path).
    RenewRead,
    /// The leader's renewal on the version just read.
    RenewWrite,
    /// Shutting down: did a taking write whose answer was lost land?
    ResolveRead,
    /// Giving the lease up: the read before the write.
    GiveRead,
    /// Giving the lease up: the release or transfer.
    GiveWrite,
    /// A follower accepting a handoff request addressed to it.
    Accept,
    /// Coordinated mode: a follower giving back an assignment the controller took back
    /// (it now prefers someone else) before the follower took it.
    Decline,
}

#[derive(Debug)]
struct Inflight {
    purpose: Purpose,
    sent_at: Instant,
    /// The role the request was sent in has ended: only its record still counts.
    orphaned: bool,
    /// The record this request writes, if it writes one.
    writes: Option<LeaderRecord>,
}

#[derive(Debug)]
enum Role {
    Follower,
    Leader(Leading),
    /// A term ended; its work has not stopped yet. No campaigning until it has; then
    /// the lease is given up as `then` says, if at all.
    Draining {
        since: Instant,
        overdue: bool,
        then: Option<Giving>,
    },
    /// The term ended and its work stopped: giving the lease up (released, or
    /// transferred to a handoff's candidate), if it is still ours: written on the
    /// version of our own last write, or on a fresh read that shows it is still ours.
    Giving(Giving),
    ShuttingDown(Closing),
    Stopped,
}

/// Giving up the lease of term `token` after its work stopped.
#[derive(Debug)]
struct Giving {
    token: i32,
    to: GiveTo,
    /// Then stop (a shutdown), or campaign again.
    stop_after: bool,
    until: Instant,
    retry_at: Option<Instant>,
    /// The version to write on: the Lease as just read (and found still ours), or our
    /// own last write (a write on it lands only if nobody wrote since). `None`: read.
    current: Option<Versioned>,
}

/// Whom the lease is given to.
#[derive(Debug, Clone, PartialEq)]
enum GiveTo {
    /// Released: holder "", for whoever takes it first (or the controller assigns).
    Nobody,
    /// Transferred to the candidate that accepted handoff request `id`.
    Candidate { to: String, id: String },
}

#[derive(Debug)]
struct Leading {
    token: i32,
    /// Our record as last written, at its version.
    current: Versioned,
    /// The send time of the last successful write: the term ends RD later.
    last_ok: Instant,
    next_renew: Instant,
    /// A handoff this leader asked for itself ([`Machine::hand_over`]).
    handing: Option<Handing>,
}

/// A handoff request of the leader's own, written with its renewals until a candidate
/// accepts it or `withdraw_at` passes.
#[derive(Debug)]
struct Handing {
    request: Handoff,
    withdraw_at: Instant,
}

/// Why [`Machine::hand_over`] refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum HandOverError {
    /// Only the leader can hand its lease over.
    #[error("this process does not lead: only the leader can hand the lease over")]
    NotLeading,
    /// A handoff is pending already.
    #[error("a handoff is pending already (request {0})")]
    Pending(String),
    /// The Lease is run by coordinated election: its controller picks the holder.
    #[error("the lease is run by coordinated leader election: its controller picks the holder")]
    Coordinated,
    /// The target is this process.
    #[error("cannot hand the lease over to ourselves")]
    ToSelf,
    /// The election has stopped.
    #[error("the election has stopped")]
    Stopped,
}

#[derive(Debug)]
enum Closing {
    /// A taking write was outstanding at shutdown: find out whether it landed.
    Resolving {
        until: Instant,
        retry_at: Option<Instant>,
    },
    /// The term was ended; waiting for the work to stop. `last`: our record as last
    /// written, which the release replaces unless it changed since.
    WaitingForWork {
        token: i32,
        until: Instant,
        last: Box<Versioned>,
    },
}

/// A taking write whose outcome is not known yet.
#[derive(Debug, Clone)]
struct PendingTake {
    record: LeaderRecord,
    sent_at: Instant,
}

#[derive(Debug)]
enum Watch {
    /// Not open. `retry_at`: not before then.
    Closed {
        retry_at: Option<Instant>,
    },
    Opening {
        after: String,
    },
    Open(OpenWatch),
    /// Watching failed or was refused: poll instead, and try again at `retry_at`.
    Polling {
        retry_at: Instant,
    },
}

#[derive(Debug)]
struct OpenWatch {
    opened_at: Instant,
    /// The last version the watch delivered (or started after).
    version: String,
    /// A read was made to check this watch since its last event.
    checked: bool,
    /// When the last such read was made.
    checked_at: Option<Instant>,
}

/// A streak of failed API calls (an outage), logged once when it starts and once when
/// it ends.
#[derive(Debug)]
struct Outage {
    since: Instant,
    failures: u32,
}

/// The election state machine. See the [module docs](self).
#[derive(Debug)]
pub struct Machine {
    config: ElectionConfig,
    name: String,
    metrics: Option<Metrics>,
    rng: SmallRng,
    role: Role,
    inflight: Option<Inflight>,
    actions: VecDeque<Action>,

    /// The latest record seen, and when it was first seen in this form.
    observed: Option<Observed>,
    /// The Lease is known not to exist (a 404, or a deletion event).
    absent: bool,
    /// The last record observed before the Lease was found deleted.
    tombstone: Option<Box<Observed>>,
    /// When we learned that the Lease was deleted, and whether we learned it as leader.
    absent_since: Option<(Instant, bool)>,
    /// While the Lease was absent, a read or the watch failed: we do not know whether it
    /// came back in between.
    absence_unsure: bool,
    /// When the last read that found the Lease absent was sent.
    absent_read_sent: Option<Instant>,
    /// The longest lease duration any record on this Lease has had (as read).
    longest_duration: Duration,
    /// The highest `leaseTransitions` seen on this Lease.
    highest_token: Option<i32>,
    /// Records this process wrote recently, answered or not.
    own_writes: VecDeque<OwnWrite>,
    pending_take: Option<Box<PendingTake>>,
    /// The observed record was read (not inferred) in this step: act on it at once.
    just_read: bool,
    /// The version the last successful read showed, and when that read was sent.
    confirmed: Option<(String, Instant)>,
    /// The observed record may be out of date: read before acting on it.
    stale: bool,
    /// When the next poll is due (while not watching).
    read_due: Option<Instant>,
    /// When the observed record last changed, and the holder's renewal interval as the
    /// watch showed it (to notice a watch that stopped delivering).
    last_change_at: Option<Instant>,
    renew_gap: Option<Duration>,
    /// Not before this instant (pacing after failures).
    not_before: Option<Instant>,
    /// Consecutive failed follower attempts (for the backoff).
    failures: u32,
    /// The Lease has been read or written successfully at least once.
    started: bool,
    outage: Option<Outage>,

    watch: Watch,
    short_watches: u32,
    watch_retry: Duration,
    /// A version whose record cannot be taken (its transitions are exhausted).
    blocked_version: Option<String>,
    /// The version whose garbage was last reported (once per version).
    reported_version: Option<String>,
    /// The holder last warned about as using our identity.
    clash_reported: Option<String>,
    /// The id of the handoff request this process accepted last.
    accepted: Option<String>,
    /// Coordinated mode: the observed record assigns the lease to us; when the holder it
    /// replaced (if any) is over in our eyes, so that we may start.
    assigned_safe_at: Option<Instant>,
    status: Status,
    /// The time of the last step: timers at or before it have been acted on.
    now: Instant,
    /// The wall clock, read only to fill the record's MicroTime fields.
    wall: WallClock,
}

/// Where the machine reads wall-clock time for `acquireTime`/`renewTime` (never to
/// judge expiry). The system clock by default; simulations give their own.
#[derive(Clone)]
struct WallClock(Arc<dyn Fn() -> jiff::Timestamp + Send + Sync>);

impl std::fmt::Debug for WallClock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("WallClock")
    }
}

impl Machine {
    /// A machine for `config` (validated here) on the lock described by `name` (for logs,
    /// metrics and [`TermInfo::lock`]). Its first action is a read of the lock.
    pub fn new(
        config: ElectionConfig,
        name: impl Into<String>,
        now: Instant,
    ) -> Result<Self, ConfigError> {
        config.validate()?;
        Ok(Self::build(config, name.into(), now))
    }

    /// [`Machine::new`] for a configuration that has been validated already.
    pub(crate) fn build(config: ElectionConfig, name: String, now: Instant) -> Self {
        let mut m = Self {
            rng: SmallRng::from_os_rng(),
            config,
            name,
            metrics: None,
            role: Role::Follower,
            inflight: None,
            actions: VecDeque::new(),
            observed: None,
            absent: false,
            tombstone: None,
            absent_since: None,
            absence_unsure: false,
            absent_read_sent: None,
            longest_duration: Duration::ZERO,
            highest_token: None,
            own_writes: VecDeque::new(),
            pending_take: None,
            just_read: false,
            confirmed: None,
            stale: true,
            read_due: None,
            last_change_at: None,
            renew_gap: None,
            not_before: None,
            failures: 0,
            started: false,
            outage: None,
            watch: Watch::Closed { retry_at: None },
            short_watches: 0,
            watch_retry: WATCH_RETRY_MIN,
            blocked_version: None,
            reported_version: None,
            clash_reported: None,
            accepted: None,
            assigned_safe_at: None,
            status: Status::default(),
            now,
            wall: WallClock(Arc::new(now_micros)),
        };
        m.step(now);
        m
    }

    /// Seeds the jitter, so that a simulation replays exactly.
    #[must_use]
    pub fn with_seed(mut self, seed: u64) -> Self {
        self.rng = SmallRng::seed_from_u64(seed);
        self
    }

    /// Starts from a record this process saw before the machine existed: `v`, first
    /// seen in this form at `observed_at` (a shard set, for one, watches the Leases its
    /// members may campaign for before it runs an election on one). The machine treats
    /// it exactly as if it had read `v` itself at that instant: its first action is
    /// still a read; the same record on that read keeps `observed_at` (and so expires a
    /// lease duration after it, not after the read), a different one is news, seen now.
    ///
    /// `observed_at` must be when *this process* first saw that record (the expiry
    /// rule, [`Observed::expires_at`]); an instant taken from anything else (the
    /// record's `renewTime`, another process) could make the machine take over while
    /// the holder still leads. Instants after the machine's start are read as its
    /// start. Call it before feeding any input; a machine that has seen the lock
    /// already keeps what it saw.
    ///
    /// ```
    /// use std::time::Duration;
    /// use leaderz::machine::{Action, Answer, Input, Machine, Op};
    /// use leaderz::{ElectionConfig, LeaderRecord, Versioned};
    /// use tokio::time::Instant;
    ///
    /// let seen_at = Instant::now();
    /// let held = Versioned {
    ///     record: LeaderRecord { holder_identity: "pod-b".into(), lease_duration_seconds: Some(15), ..Default::default() },
    ///     version: "7".into(),
    ///     lease: None,
    /// };
    /// let start = seen_at + Duration::from_secs(12);
    /// let mut m = Machine::new(ElectionConfig::new("pod-a"), "default/my-lock", start)
    ///     .unwrap()
    ///     .with_observed(held.clone(), seen_at);
    /// let Some(Action::Send(read)) = m.poll_action() else { panic!() };
    /// assert!(matches!(read.op, Op::Get));
    /// m.handle(Input::Reply(Ok(Answer::Read(Some(held)))), start);
    /// assert!(matches!(m.poll_action(), Some(Action::Watch { .. })));
    /// m.handle(Input::WatchOpened(Ok(())), start);
    /// // Still pod-b's record: it counts as seen at `seen_at`, so it expires 15 s after
    /// // that, not after the read. The machine wakes just before that instant (to read
    /// // the record once more and take over at it), well before start + 15 s.
    /// assert_eq!(m.status().observed.as_ref().unwrap().observed_at, seen_at);
    /// let wake = m.poll_timeout().unwrap();
    /// assert!(wake > start && wake <= seen_at + Duration::from_secs(15));
    /// ```
    #[must_use]
    pub fn with_observed(mut self, v: Versioned, observed_at: Instant) -> Self {
        if self.observed.is_some() || self.absent || self.started {
            return self;
        }
        self.observe(v, observed_at.min(self.now));
        // Read before acting on it (the read was asked for when the machine was built).
        self.stale = true;
        self.status.observed = self.observed.clone();
        self
    }

    /// Starts knowing that the Lease does not exist, as of a read sent at `read_sent_at`
    /// (a shared watch's last list, see [`crate::lock::Lock::known_absent`]): instead
    /// of reading first, the machine creates it at once, as it would after a read that
    /// found nothing then. Ignored unless the machine has just been built and nothing
    /// else is known.
    ///
    /// Safe however stale the knowledge: a Lease that exists makes the create fail
    /// (and the machine reads), and one that was led and deleted meanwhile is no
    /// different from what a read just before the create would show. The rule that a
    /// create leaves within a retry period of a read that found the Lease absent still
    /// holds: an older `read_sent_at` makes the machine read first, and a create still
    /// waiting in the client after that is dropped ([`Request::send_by`]).
    #[must_use]
    pub fn with_absent(mut self, read_sent_at: Instant) -> Self {
        let first_read = matches!(
            self.inflight,
            Some(Inflight {
                purpose: Purpose::Read,
                ..
            })
        ) && self.actions.len() == 1
            && matches!(self.actions.front(), Some(Action::Send(_)));
        if !first_read
            || self.observed.is_some()
            || self.absent
            || self.started
            || read_sent_at > self.now
        {
            return self;
        }
        // Withdraw the first read (not handed out yet), and act as if it had found
        // nothing.
        self.actions.clear();
        self.inflight = None;
        let now = self.now;
        self.observe_absent(false, now);
        self.absent_read_sent = Some(read_sent_at);
        self.read_due = Some(now + self.jitter(self.config.retry_period));
        self.step(now);
        self
    }

    /// Reads wall-clock time (for the record's MicroTime fields only) from `clock`
    /// instead of the system clock, e.g. to simulate a clock that steps.
    #[must_use]
    pub fn with_wall_clock(
        mut self,
        clock: impl Fn() -> jiff::Timestamp + Send + Sync + 'static,
    ) -> Self {
        self.wall = WallClock(Arc::new(clock));
        self
    }

    /// Reports to these metrics.
    #[must_use]
    pub fn with_metrics(mut self, metrics: Metrics) -> Self {
        metrics.init(&self.metric_name());
        self.metrics = Some(metrics);
        self
    }

    /// The next action to carry out, if any.
    pub fn poll_action(&mut self) -> Option<Action> {
        let action = self.actions.pop_front();
        if action.is_none() && self.actions.capacity() > 0 {
            // Actions are large (a request carries two records) and come a few at a
            // time: give the queue's memory back between steps instead of keeping it
            // for the election's lifetime.
            self.actions = VecDeque::new();
        }
        action
    }

    /// When to feed [`Input::Tick`] next, if nothing else happens first.
    pub fn poll_timeout(&self) -> Option<Instant> {
        let mut at: Option<Instant> = None;
        // Timers at or before the last step were acted on then (or cannot be yet):
        // waking for them again would spin.
        let last = self.now;
        let mut add = |t: Option<Instant>| {
            if let Some(t) = t.filter(|&t| t > last) {
                at = Some(at.map_or(t, |a| a.min(t)));
            }
        };
        match &self.role {
            Role::Leader(l) => {
                add(Some(l.last_ok + self.config.renew_deadline));
                if self.inflight.is_none() {
                    add(Some(l.next_renew));
                }
            }
            Role::Draining { since, overdue, .. } => {
                if !overdue {
                    add(Some(*since + self.config.shutdown_grace));
                }
            }
            Role::Giving(g) => {
                add(Some(g.until));
                add(g.retry_at);
            }
            Role::Follower => {
                if self.inflight.is_none() {
                    add(self.not_before);
                    if self.absent || !matches!(self.watch, Watch::Open(_)) {
                        add(self.read_due);
                    }
                    add(self.observed_expiry());
                    add(self.confirm_at());
                    add(self.tombstone_expiry());
                    add(self.assigned_safe_at);
                    add(self.watch_check_at());
                }
            }
            Role::ShuttingDown(c) => match c {
                Closing::Resolving { until, retry_at } => {
                    add(Some(*until));
                    add(*retry_at);
                }
                Closing::WaitingForWork { until, .. } => add(Some(*until)),
            },
            Role::Stopped => return None,
        }
        match &self.watch {
            Watch::Closed { retry_at } => add(*retry_at),
            Watch::Polling { retry_at, .. } => add(Some(*retry_at)),
            Watch::Open(w) => add(Some(w.opened_at + WATCH_TIMEOUT + WATCH_SLACK)),
            Watch::Opening { .. } => {}
        }
        at
    }

    /// Who leads as this process sees it at `now`: itself while it holds a term, else the
    /// observed holder while its lease is valid, else nobody.
    pub fn leader(&self, now: Instant) -> Option<&str> {
        if matches!(self.role, Role::Leader(_)) {
            return Some(&self.config.identity);
        }
        self.observed
            .as_ref()
            .filter(|o| self.is_held(o, now) && !self.is_own(&o.record))
            .and_then(|o| o.record.holder())
    }

    /// What the machine knows, for status pages and health checks.
    pub fn status(&self) -> &Status {
        &self.status
    }

    /// Whether the election is over.
    pub fn is_stopped(&self) -> bool {
        matches!(self.role, Role::Stopped)
    }

    /// Feeds one event in at `now`; then take the resulting actions with
    /// [`poll_action`](Self::poll_action).
    pub fn handle(&mut self, input: Input, now: Instant) {
        if self.is_stopped() {
            return;
        }
        match input {
            Input::Tick => {}
            Input::Reply(reply) => self.on_reply(reply, now),
            Input::Sent(at) => self.on_sent(at, now),
            Input::Unsent => self.on_unsent(now),
            Input::WatchOpened(result) => self.on_watch_opened(result, now),
            Input::WatchEvent(event) => self.on_watch_event(event, now),
            Input::WatchEnded(error) => self.on_watch_ended(error, now),
            Input::Shutdown => self.on_shutdown(now),
            Input::WorkStopped => self.on_work_stopped(now),
            Input::Failed(e) => self.fatal(e),
        }
        self.step(now);
    }

    // ---- the step: act on the current state at `now` --------------------------------

    fn step(&mut self, now: Instant) {
        // A role that ends within a step (giving the lease up runs out of time, a term
        // ends) hands over to the next one at once: step again, so that the new role
        // acts (or sets its timers) now rather than waiting for an input that may never
        // come.
        for _ in 0..4 {
            let before = std::mem::discriminant(&self.role);
            self.step_once(now);
            if std::mem::discriminant(&self.role) == before {
                break;
            }
        }
    }

    fn step_once(&mut self, now: Instant) {
        self.now = now;
        self.watch_step(now);
        match &mut self.role {
            Role::Leader(l) => {
                if now >= l.last_ok + self.config.renew_deadline {
                    let rd = self.config.renew_deadline;
                    self.lose(
                        format!("no successful renewal within the renew deadline ({rd:?})"),
                        now,
                    );
                } else if self.inflight.is_none() && now >= l.next_renew {
                    self.send_renewal(now);
                }
            }
            Role::Giving(_) => self.giving_step(now),
            Role::Draining { since, overdue, .. } => {
                if !*overdue && now >= *since + self.config.shutdown_grace {
                    *overdue = true;
                    warn!(
                        grace = ?self.config.shutdown_grace,
                        "the last term's work has not dropped its Term; not campaigning until it does"
                    );
                    self.status.work_overdue = true;
                }
            }
            Role::Follower => self.campaign(now),
            Role::ShuttingDown(_) => self.closing_step(now),
            Role::Stopped => {}
        }
        self.just_read = false;
        self.status.observed = self.observed.clone();
    }

    /// The follower's decision: read, take, or wait.
    fn campaign(&mut self, now: Instant) {
        if self.inflight.is_some() || self.not_before.is_some_and(|t| now < t) {
            return;
        }
        self.not_before = None;
        let watching = matches!(self.watch, Watch::Open(_));
        let poll_due = !watching && self.read_due.is_none_or(|t| now >= t);
        if self.absent && !self.stale {
            // Keep looking while we wait, watch or not (a watch on a Lease that does
            // not exist shows no renewals to tell that it still works): if the Lease
            // comes back (and goes again), the wait starts over.
            if self.read_due.is_none_or(|t| now >= t) {
                self.send(Purpose::Read, Op::Get, now);
                return;
            }
            // In coordinated mode the controller creates it.
            if self.config.coordinated.is_some() || self.tombstone_expiry().is_some_and(|t| now < t)
            {
                return;
            }
            // Create only on a fresh look: a Lease re-created and deleted again since an
            // old one (a slow answer, a paused process) could still have a leader. The
            // create must also leave while the look is fresh (`send_by`).
            if self
                .absent_read_sent
                .is_none_or(|t| now >= t + self.config.retry_period)
            {
                self.send(Purpose::Read, Op::Get, now);
                return;
            }
            let token = self.create_token();
            let record = self.taking_record(token, None);
            self.send_take(None, record, now);
            return;
        }
        let check_watch = self.watch_check_at().is_some_and(|t| now >= t);
        if check_watch && let Watch::Open(w) = &mut self.watch {
            w.checked = true;
            w.checked_at = Some(now);
        }
        if self.observed.is_none() || self.stale || check_watch || poll_due {
            self.send(Purpose::Read, Op::Get, now);
            return;
        }
        let Some(observed) = &self.observed else {
            return;
        };
        if let Some(accept) = self.handoff_to_accept(&observed.record) {
            let base = Versioned {
                record: observed.record.clone(),
                version: observed.version.clone(),
                lease: observed.lease.clone(),
            };
            // Known as ours from the moment it is sent: if the answer is lost but the
            // write landed, the holder's transfer to us names this id (nobody else writes
            // an acceptance in our name).
            self.accepted = Some(accept.id.clone());
            let mut record = base.record.clone();
            record.handoff = Some(accept);
            self.send(Purpose::Accept, Op::Update(base, record), now);
            return;
        }
        if self.is_withdrawn_assignment(&observed.record) {
            // We never led under it: give it back at once, so that the preferred
            // candidate need not wait for it to expire.
            let base = Versioned {
                record: observed.record.clone(),
                version: observed.version.clone(),
                lease: observed.lease.clone(),
            };
            let record = LeaderRecord {
                holder_identity: String::new(),
                ..base.record.clone()
            };
            info!("the controller named us and then preferred another; giving the lease back");
            self.send(Purpose::Decline, Op::Update(base, record), now);
            return;
        }
        if !self.can_take(observed, now) {
            // Shortly before the holder's lease expires, read it once more (see below);
            // the read checks the watch too.
            if self.confirm_at().is_some_and(|t| now >= t) {
                if let Watch::Open(w) = &mut self.watch {
                    w.checked = true;
                    w.checked_at = Some(now);
                }
                self.send(Purpose::Read, Op::Get, now);
            }
            return;
        }
        let given_to_us =
            self.is_transfer_to_us(&observed.record) || self.is_assigned_to_us(&observed.record);
        let expired =
            observed.record.holder().is_some() && !self.is_own(&observed.record) && !given_to_us;
        // Expired on what we saw some time ago: look again first. (Even with a watch
        // open: it may have stopped delivering, and after an etcd restore the version we
        // saw may now name other contents.) A read sent shortly before the expiry that
        // showed this version will do: it was sent at most `confirm_ahead` ago.
        let confirmed = expired && watching && self.confirmed_for(observed);
        if !self.just_read && !confirmed && (expired || !watching) {
            self.send(Purpose::Read, Op::Get, now);
            return;
        }
        if self.blocked_version.as_ref() == Some(&observed.version) {
            return;
        }
        let base = Versioned {
            record: observed.record.clone(),
            version: observed.version.clone(),
            lease: observed.lease.clone(),
        };
        match self.take_token(&base.record) {
            Ok(token) => {
                let record = self.taking_record(token, Some(&base.record));
                self.send_take(Some(base), record, now);
            }
            Err(e) => {
                self.blocked_version = Some(base.version.clone());
                warn!(error = %e, "cannot take the lease");
                self.count("transitions_exhausted");
                self.status.problem = Some(e.to_string());
            }
        }
    }

    /// Whether a follower may take `observed` at `now`.
    fn can_take(&self, observed: &Observed, now: Instant) -> bool {
        let r = &observed.record;
        let identity = &self.config.identity;
        // Handed to us: by a handoff's transfer (the holder wrote it after its work
        // stopped), or by the coordinated controller (once the holder it replaced is
        // over in our own eyes: the controller judges expiry by its wall clock).
        if self.is_transfer_to_us(r) {
            return true;
        }
        if self.is_assigned_to_us(r) {
            return self.assigned_safe_at.is_none_or(|t| now >= t);
        }
        if self.is_own(r) && !r.prefers_other_than(identity) {
            return true;
        }
        // In coordinated mode, never on our own.
        if self.config.coordinated.is_some() {
            return false;
        }
        // A strategy that prefers someone else: that one's until the record expires,
        // even when released (after that, anyone's).
        if r.prefers_other_than(identity) {
            let (own, max) = (self.config.lease_duration, self.config.max_record_duration);
            return now >= observed.expires_at(own, max);
        }
        r.holder().is_none() || !self.is_held(observed, now)
    }

    /// The record was transferred to us by a handoff we accepted.
    fn is_transfer_to_us(&self, r: &LeaderRecord) -> bool {
        r.holder_identity == self.config.identity
            && r.handoff.as_ref().is_some_and(|h| {
                h.state == HandoffState::Transferred
                    && h.to.as_deref() == Some(&self.config.identity)
                    && self.accepted.as_deref() == Some(h.id.as_str())
            })
    }

    /// Coordinated mode: the controller names us as the holder (and nobody else is
    /// preferred), in a record we did not write. The controller writes an assignment
    /// without `acquireTime` (every candidate's own write has one): a renewal by another
    /// process under our identity is not an assignment.
    fn is_assigned_to_us(&self, r: &LeaderRecord) -> bool {
        self.controller_wrote(r)
            && r.holder_identity == self.config.identity
            && !r.prefers_other_than(&self.config.identity)
            && !self.is_own(r)
    }

    /// Coordinated mode: the controller named us and then, before we took the lease,
    /// preferred someone else.
    fn is_withdrawn_assignment(&self, r: &LeaderRecord) -> bool {
        self.controller_wrote(r)
            && r.holder_identity == self.config.identity
            && r.prefers_other_than(&self.config.identity)
            && !self.is_own(r)
    }

    /// Coordinated mode: the record is the controller's assignment (a strategy, and no
    /// `acquireTime`, which every candidate writes).
    fn controller_wrote(&self, r: &LeaderRecord) -> bool {
        self.config.coordinated.is_some()
            && r.acquire_time.is_none()
            && r.strategy.as_deref().is_some_and(|s| !s.is_empty())
    }

    /// When an assignment `new` (seen at `now`) may be started, given the record it
    /// replaced: at once after a release, our own record or an absent Lease; after the
    /// replaced holder's record expired in our eyes; and, when we never saw what it
    /// replaced, after the assignment's own duration.
    fn assignment_safe_at(&self, new: &LeaderRecord, carried: Duration, now: Instant) -> Instant {
        let (own, max) = (self.config.lease_duration, self.config.max_record_duration);
        match &self.observed {
            Some(o) if same_but_handoff(&o.record, new) => self.assigned_safe_at.unwrap_or(now),
            // After a release or our own record, at once — unless the count moved: a
            // term came and went unseen in between.
            Some(o) if o.record.holder().is_none() || self.is_own(&o.record) => {
                if new.lease_transitions == o.record.lease_transitions {
                    now
                } else {
                    now + new.effective_duration(own, max)
                }
            }
            Some(o) => o.expires_at(own, max),
            None if self.absent => now + carried,
            None => now + new.effective_duration(own, max),
        }
    }

    /// A handoff request we should accept: addressed to us (or to anyone) on a lease
    /// someone else holds, not yet accepted, and not under a coordinated strategy.
    fn handoff_to_accept(&self, r: &LeaderRecord) -> Option<Handoff> {
        let h = r.handoff.as_ref()?;
        let identity = &self.config.identity;
        let for_us = h.to.as_deref().is_none_or(|to| to == identity);
        let held_by_other = r.holder().is_some_and(|holder| holder != identity);
        let coordinated = r.strategy.as_deref().is_some_and(|s| !s.is_empty());
        (h.state == HandoffState::Requested
            && for_us
            && held_by_other
            && !coordinated
            && self.config.coordinated.is_none())
        .then(|| h.step(HandoffState::Accepted, identity))
    }

    fn on_accepted(&mut self, reply: Result<Answer, LockError>, now: Instant) {
        match reply {
            Ok(Answer::Wrote(v)) => {
                if let Some(h) = &v.record.handoff {
                    info!(id = %h.id, "accepted a handoff request; waiting for the holder");
                    self.accepted = Some(h.id.clone());
                }
                self.observe(v, now);
            }
            Ok(_) => {}
            Err(LockError::Conflict | LockError::NotFound) => self.stale = true,
            Err(e) => {
                self.api_failed("accept", &e, now);
                self.stale = true;
                self.back_off(now);
            }
        }
    }

    // ---- requests -------------------------------------------------------------------

    fn send(&mut self, purpose: Purpose, op: Op, now: Instant) {
        self.send_until(purpose, op, now, None);
    }

    /// Sends a request that may wait to be sent until `limit` (default: a renew
    /// deadline), and is in flight for at most the request timeout.
    fn send_until(&mut self, purpose: Purpose, op: Op, now: Instant, limit: Option<Instant>) {
        // Created only on a fresh look (see `campaign`), sent only while it is fresh.
        let send_by = match &op {
            Op::Create(_) => self.absent_read_sent.map(|t| t + self.config.retry_period),
            _ => None,
        };
        let deadline = limit.unwrap_or(now + self.config.renew_deadline);
        let priority = match (&purpose, &self.role) {
            (Purpose::Renew | Purpose::RenewRead | Purpose::RenewWrite, Role::Leader(l)) => {
                Priority::Renewal {
                    urgent_at: self.urgent_at(l).max(now),
                }
            }
            (Purpose::Read, _) => Priority::Read,
            _ => Priority::Normal,
        };
        let writes = match &op {
            Op::Create(r) | Op::Update(_, r) => Some(r.clone()),
            Op::Get => None,
        };
        if let Some(r) = &writes {
            self.remember_write(r);
        }
        self.inflight = Some(Inflight {
            purpose,
            sent_at: now,
            orphaned: false,
            writes,
        });
        self.actions.push_back(Action::Send(Request {
            op,
            deadline,
            timeout: self.request_timeout(),
            priority,
            send_by,
        }));
    }

    /// When a renewal waiting to be sent goes before everything else: a retry period
    /// before the renew deadline. Until then it lets other requests go first, so that
    /// under load leaders renew as late as that (10 000 leaders with 10 s / 2 s ask
    /// 1250 renewals/s instead of 5000) and new candidates still get a share; from
    /// then on it waits only for the requests in flight, and has most of a retry period
    /// to be answered.
    fn urgent_at(&self, l: &Leading) -> Instant {
        let room = self.config.retry_period;
        (l.last_ok + self.config.renew_deadline)
            .checked_sub(room)
            .unwrap_or(l.last_ok)
    }

    /// The outstanding request was dropped before it was sent.
    fn on_unsent(&mut self, now: Instant) {
        match &self.inflight {
            Some(inflight) if inflight.orphaned => {
                // Nothing of it can land, nothing is learned: the way is free.
                debug!("a request of the ended term was dropped before it was sent");
                self.inflight = None;
            }
            Some(Inflight {
                purpose: Purpose::Take,
                ..
            }) => {
                // Dropped before it left (its read no longer fresh, its deadline, or a
                // shutdown): it cannot land; look again (or, shutting down, there is
                // nothing to resolve).
                debug!("a take was dropped before it was sent");
                self.inflight = None;
                self.pending_take = None;
                if matches!(self.role, Role::ShuttingDown(Closing::Resolving { .. })) {
                    self.stop(Ok(()));
                }
            }
            Some(_) => self.on_reply(Err(LockError::Timeout(Duration::ZERO)), now),
            None => {}
        }
    }

    /// The outstanding request left the process at `at`. Every send time is used as the
    /// earliest instant the API server can have handled the request (a write's term is
    /// counted from it, a read is as fresh as it), and `at` is a tighter such bound than
    /// when the request was asked for.
    fn on_sent(&mut self, at: Instant, now: Instant) {
        let Some(inflight) = &mut self.inflight else {
            return;
        };
        let at = at.min(now);
        if at <= inflight.sent_at {
            return;
        }
        if let Purpose::Take = inflight.purpose
            && let Some(p) = &mut self.pending_take
            && inflight.writes.as_ref() == Some(&p.record)
        {
            p.sent_at = at;
        }
        inflight.sent_at = at;
    }

    fn send_take(&mut self, base: Option<Versioned>, record: LeaderRecord, now: Instant) {
        // Boxed, as is the tombstone: rarely there, and a machine per election counts
        // with thousands of elections in a process.
        self.pending_take = Some(Box::new(PendingTake {
            record: record.clone(),
            sent_at: now,
        }));
        let limit = Some(now + self.config.renew_deadline);
        let op = match base {
            Some(base) => Op::Update(base, record),
            None => Op::Create(record),
        };
        self.send_until(Purpose::Take, op, now, limit);
    }

    fn send_renewal(&mut self, now: Instant) {
        let Role::Leader(l) = &self.role else { return };
        let record = self.renewed(&l.current.record, l.token);
        let op = Op::Update(l.current.clone(), record);
        self.send_for_term(Purpose::Renew, op, now);
    }

    /// Sends a leader's call (a renewal, or the slow path's read and write), due by the
    /// term's deadline — unless less than [`renew_floor`](Self::renew_floor) is left: an
    /// answer could not come in time to count, and under overload such calls only add
    /// load. The term then ends at its deadline.
    fn send_for_term(&mut self, purpose: Purpose, op: Op, now: Instant) {
        let Role::Leader(l) = &self.role else { return };
        let limit = l.last_ok + self.config.renew_deadline;
        if limit < now + self.renew_floor() {
            debug!("too close to the renew deadline to renew; the term ends at it");
            return;
        }
        self.send_until(purpose, op, now, Some(limit));
    }

    /// The leader asks to hand its lease over to `to` (none: any leaderz candidate):
    /// the request goes out with a renewal at once; a candidate that watches the Lease
    /// accepts it, and the leader then ends its term, waits for its work to stop and
    /// transfers the Lease to that candidate (see [`Handoff`]). If no candidate accepts
    /// within a lease duration the request is withdrawn and this process keeps leading.
    /// Returns the request's id.
    pub fn hand_over(&mut self, to: Option<String>, now: Instant) -> Result<String, HandOverError> {
        let wall = self.wall_now();
        let suffix: u32 = self.rng.random();
        let identity = &self.config.identity;
        let Role::Leader(l) = &mut self.role else {
            return Err(HandOverError::NotLeading);
        };
        if to.as_deref() == Some(identity.as_str()) {
            return Err(HandOverError::ToSelf);
        }
        if l.current
            .record
            .strategy
            .as_deref()
            .is_some_and(|s| !s.is_empty())
        {
            return Err(HandOverError::Coordinated);
        }
        if let Some(h) = l.handing.as_ref().map(|h| &h.request).or(l
            .current
            .record
            .handoff
            .as_ref())
        {
            return Err(HandOverError::Pending(h.id.clone()));
        }
        let id = format!("{}-{suffix:x}", wall.strftime("%Y-%m-%dT%H:%M:%S%.6fZ"));
        info!(to = to.as_deref().unwrap_or("any candidate"), %id, "handing the lease over");
        l.handing = Some(Handing {
            request: Handoff::request(to, id.clone()),
            withdraw_at: now + self.config.lease_duration,
        });
        l.next_renew = now;
        self.step(now);
        Ok(id)
    }

    fn remember_write(&mut self, record: &LeaderRecord) {
        if self.own_writes.len() == OWN_WRITES {
            // Refused writes go first: a write whose outcome is unknown may be the
            // record on the Lease now.
            let oldest = self.own_writes.iter().position(|w| w.refused).unwrap_or(0);
            self.own_writes.remove(oldest);
        }
        self.own_writes.push_back(OwnWrite::of(record));
    }

    /// A write the API server refused (a conflict, or no such Lease) usually never
    /// landed, but not always: a client that retries a write after a 503 or 504 (kube's
    /// default client does) turns a write that landed on the first attempt into a 409
    /// on the second. So it is still recognised as ours, but it is the first forgotten
    /// when memory is short, so that refusals cannot push out a write whose answer was
    /// lost.
    fn refused_write(&mut self, record: &LeaderRecord) {
        if let Some(w) = self.own_writes.iter_mut().find(|w| w.is(record)) {
            w.refused = true;
        }
    }

    fn is_own(&self, record: &LeaderRecord) -> bool {
        record.holder_identity == self.config.identity && self.wrote(record)
    }

    /// Whether this process wrote `record`: one of our writes with the same holder,
    /// count and renewal time. (Fields someone else edited since — a handoff annotation,
    /// a preferred holder, a duration — do not make it someone else's; another process
    /// writing under our name writes its own renewal time.)
    fn wrote(&self, record: &LeaderRecord) -> bool {
        self.own_writes.iter().any(|w| w.is(record))
    }

    // ---- replies --------------------------------------------------------------------

    fn on_reply(&mut self, reply: Result<Answer, LockError>, now: Instant) {
        let Some(inflight) = self.inflight.take() else {
            debug!("an answer without a request; ignored");
            return;
        };
        let reply = match reply {
            Ok(answer) => {
                // A 404 on the first read is not yet proof of access: the create follows.
                let proof = !matches!(answer, Answer::Read(None));
                self.api_ok(proof, now);
                Ok(answer)
            }
            Err(e) => {
                if self.refused_at_start(&e, &inflight.purpose) {
                    self.fatal(e);
                    return;
                }
                if let (
                    LockError::Conflict | LockError::AlreadyExists | LockError::NotFound,
                    Some(w),
                ) = (&e, &inflight.writes)
                {
                    self.refused_write(w);
                }
                Err(e)
            }
        };
        if inflight.orphaned {
            // Only what it tells about the record still counts.
            match reply {
                Ok(Answer::Wrote(v)) => {
                    self.landed_while_giving_up(&v);
                    self.observe(v, now);
                }
                Ok(Answer::Read(Some(v))) => self.observe(v, now),
                Ok(Answer::Read(None)) => self.observe_absent(false, now),
                Err(e) => self.api_failed("request", &e, now),
            }
            return;
        }
        match inflight.purpose {
            Purpose::Read => self.on_read(reply, inflight.sent_at, now),
            Purpose::Take if matches!(self.role, Role::ShuttingDown(Closing::Resolving { .. })) => {
                self.on_take_resolved(reply, now);
            }
            Purpose::Take => self.on_take(reply, now),
            Purpose::Renew => self.on_renewed(reply, inflight.sent_at, true, now),
            Purpose::RenewWrite => self.on_renewed(reply, inflight.sent_at, false, now),
            Purpose::RenewRead => self.on_renew_read(reply, now),
            Purpose::ResolveRead => self.on_resolve_read(reply, now),
            Purpose::GiveRead => self.on_give_read(reply, now),
            Purpose::GiveWrite => self.on_given(reply, now),
            Purpose::Accept => self.on_accepted(reply, now),
            Purpose::Decline => match reply {
                Ok(Answer::Wrote(v)) => self.observe(v, now),
                Ok(_) | Err(LockError::Conflict | LockError::NotFound) => self.stale = true,
                Err(e) => {
                    self.api_failed("decline", &e, now);
                    self.stale = true;
                    self.back_off(now);
                }
            },
        }
    }

    /// A renewal of the ended term, still in flight when it ended, landed: the release
    /// is written on its version (else it would meet a 409 and read first).
    fn landed_while_giving_up(&mut self, v: &Versioned) {
        if v.record.holder_identity != self.config.identity || !self.wrote(&v.record) {
            return;
        }
        let ours = |token: i32| v.record.lease_transitions == token;
        match &mut self.role {
            Role::Giving(g) if g.current.is_some() && ours(g.token) => {
                g.current = Some(v.clone());
            }
            Role::ShuttingDown(Closing::WaitingForWork { token, last, .. }) if ours(*token) => {
                **last = v.clone();
            }
            _ => {}
        }
    }

    fn on_read(&mut self, reply: Result<Answer, LockError>, sent_at: Instant, now: Instant) {
        match reply {
            Ok(Answer::Read(Some(v))) => {
                self.stale = false;
                self.just_read = true;
                self.confirmed = Some((v.version.clone(), sent_at));
                self.failures = 0;
                self.read_due = Some(now + self.jitter(self.config.retry_period));
                let behind = match &self.watch {
                    Watch::Open(w) => w.version != v.version,
                    _ => false,
                };
                self.observe(v, now);
                if behind {
                    // The watch has not shown what the read did: it is behind or dead.
                    debug!("the watch missed a write; watching anew");
                    self.restart_watch(now);
                }
                self.landed_take(now);
            }
            Ok(Answer::Read(None)) => {
                self.stale = false;
                self.failures = 0;
                self.read_due = Some(now + self.jitter(self.config.retry_period));
                self.observe_absent(false, now);
                self.absent_read_sent = Some(sent_at);
            }
            Ok(Answer::Wrote(_)) => debug!("a write answer to a read; ignored"),
            Err(e) => {
                self.absence_unsure |= self.absent;
                self.api_failed("read", &e, now);
                self.back_off(now);
            }
        }
    }

    fn on_take(&mut self, reply: Result<Answer, LockError>, now: Instant) {
        match reply {
            Ok(Answer::Wrote(v)) => {
                self.failures = 0;
                self.observe(v, now);
                self.landed_take(now);
            }
            Ok(Answer::Read(_)) => debug!("a read answer to a write; ignored"),
            Err(LockError::Conflict | LockError::AlreadyExists) => {
                // Lost the race, or what we saw was out of date.
                self.count("conflict");
                self.pending_take = None;
                self.stale = true;
                self.absent = false;
            }
            Err(LockError::NotFound) => {
                // Deleted since we read it.
                self.pending_take = None;
                self.observe_absent(false, now);
            }
            Err(e) => {
                // The write may still land: keep `pending_take` so that we recognise it.
                self.api_failed("take", &e, now);
                self.stale = true;
                self.back_off(now);
            }
        }
    }

    /// If the observed record is our outstanding taking write, start the term on it (or,
    /// answered too late to lead on, leave it to be taken again as our own record).
    fn landed_take(&mut self, now: Instant) {
        let (Some(pending), Some(observed)) = (&self.pending_take, &self.observed) else {
            return;
        };
        if pending.record != observed.record || !matches!(self.role, Role::Follower) {
            return;
        }
        let pending = pending.clone();
        self.pending_take = None;
        if now >= pending.sent_at + self.config.renew_deadline {
            // Our record, but too late to lead on. Nobody else leads on it either (it
            // names us): take it again now, as our own record.
            warn!(
                "the lease was taken but the answer came after the renew deadline; taking it again"
            );
            self.just_read = true;
            return;
        }
        let current = Versioned {
            record: observed.record.clone(),
            version: observed.version.clone(),
            lease: observed.lease.clone(),
        };
        self.lead(current, pending.sent_at);
    }

    fn on_renewed(
        &mut self,
        reply: Result<Answer, LockError>,
        sent_at: Instant,
        fast: bool,
        now: Instant,
    ) {
        match reply {
            Ok(Answer::Wrote(v)) => {
                self.observe(v.clone(), now);
                let Role::Leader(l) = &mut self.role else {
                    return;
                };
                if now >= l.last_ok + self.config.renew_deadline {
                    // The term's deadline passed before the answer came: it has ended
                    // (the step ends it); a term is never extended after its deadline.
                    return;
                }
                // Our handoff request, past its time, is off the Lease now: forget it.
                if l.handing.as_ref().is_some_and(|h| {
                    now >= h.withdraw_at
                        && v.record
                            .handoff
                            .as_ref()
                            .is_none_or(|x| x.id != h.request.id)
                }) {
                    info!("no candidate accepted the handoff; withdrew it");
                    l.handing = None;
                }
                l.current = v;
                l.last_ok = sent_at;
                l.next_renew = sent_at + self.config.renew_every();
                let deadline = sent_at + self.config.renew_deadline;
                self.actions.push_back(Action::ExtendTerm(deadline));
                if let Some(m) = &self.metrics {
                    m.renewed(&self.metric_name(), (now - sent_at).as_secs_f64());
                }
                self.status.last_renewed = Some(sent_at);
                self.status.last_error = None;
            }
            Ok(Answer::Read(_)) => {}
            Err(LockError::NotFound) => {
                // While we lead nobody else can have written it: we know its last record.
                self.observe_absent(true, now);
                self.lose("the lease was deleted".into(), now);
            }
            Err(e) if e.is_fatal() => {
                self.api_failed("renew", &e, now);
                self.lose(format!("the API server refused the renewal: {e}"), now);
            }
            Err(e) if !fast => {
                self.api_failed("renew", &e, now);
                if let Role::Leader(l) = &mut self.role {
                    l.next_renew = now + self.config.retry_period;
                }
            }
            Err(e) => {
                // client-go's slow path: read, and renew on what we read if still ours.
                debug!(error = %e, "renewal failed; reading the lease");
                self.count(e.kind());
                if let Some(m) = &self.metrics {
                    m.slowpath(&self.metric_name());
                }
                self.send_for_term(Purpose::RenewRead, Op::Get, now);
            }
        }
    }

    fn on_renew_read(&mut self, reply: Result<Answer, LockError>, now: Instant) {
        let Role::Leader(l) = &self.role else { return };
        let token = l.token;
        match reply {
            Ok(Answer::Read(Some(v))) => {
                self.observe(v.clone(), now);
                let ours = v.record.holder_identity == self.config.identity
                    && v.record.lease_transitions == token;
                // Ours, or ours with other fields edited (an admin changing its duration,
                // say): the renewal time is still one we wrote. Another process renewing
                // under our name writes its own renewal time. (Only read with `ours`: the
                // token is the record's.)
                let renewed_by_us = self.wrote(&v.record);
                let identity = self.config.identity.clone();
                let accepted = v
                    .record
                    .handoff
                    .as_ref()
                    .and_then(|h| match (&h.to, h.state) {
                        (Some(to), HandoffState::Accepted) if *to != identity => {
                            Some(GiveTo::Candidate {
                                to: to.clone(),
                                id: h.id.clone(),
                            })
                        }
                        _ => None,
                    });
                if ours && renewed_by_us && v.record.prefers_other_than(&identity) {
                    let preferred = v.record.preferred_holder.clone().unwrap_or_default();
                    self.lose_then(
                        format!("the lease's strategy prefers {preferred}"),
                        Some(GiveTo::Nobody),
                        now,
                    );
                } else if let (true, true, Some(to)) = (ours, renewed_by_us, accepted) {
                    let GiveTo::Candidate { to: target, .. } = &to else {
                        return;
                    };
                    let reason = format!("handing over to {target}, which accepted");
                    self.lose_then(reason, Some(to), now);
                } else if ours && renewed_by_us {
                    let record = self.renewed(&v.record, token);
                    self.send_for_term(Purpose::RenewWrite, Op::Update(v, record), now);
                } else if ours {
                    let msg = format!(
                        "another process uses identity {}: it wrote the lease under our name; stepping down",
                        self.config.identity
                    );
                    tracing::error!("{msg}");
                    self.count("identity_clash");
                    self.status.problem = Some(msg.clone());
                    self.lose(msg, now);
                } else {
                    let holder = v.record.holder().unwrap_or("nobody").to_owned();
                    self.lose(format!("the lease is now held by {holder}"), now);
                }
            }
            Ok(Answer::Read(None)) => {
                self.observe_absent(true, now);
                self.lose("the lease was deleted".into(), now);
            }
            Ok(Answer::Wrote(_)) => {}
            Err(e) => {
                self.api_failed("renew", &e, now);
                if e.is_fatal() {
                    self.lose(format!("the API server refused the renewal: {e}"), now);
                } else if let Role::Leader(l) = &mut self.role {
                    l.next_renew = now + self.config.retry_period;
                }
            }
        }
    }

    // ---- leading ----------------------------------------------------------------------

    fn lead(&mut self, current: Versioned, sent_at: Instant) {
        let token = current.record.lease_transitions;
        let deadline = sent_at + self.config.renew_deadline;
        info!(term = token, "became leader");
        self.failures = 0;
        self.blocked_version = None;
        self.status.problem = None;
        self.role = Role::Leader(Leading {
            token,
            current,
            last_ok: sent_at,
            next_renew: sent_at + self.config.renew_every(),
            handing: None,
        });
        self.actions.push_back(Action::StartTerm {
            token,
            started_at: sent_at,
            deadline,
        });
        self.actions.push_back(Action::Announce { leading: true });
        self.status.term = Some(TermInfo {
            identity: self.config.identity.clone(),
            lock: self.name.clone(),
            fencing_token: i64::from(token),
            started_at: sent_at,
        });
        self.status.last_renewed = Some(sent_at);
        if let Some(m) = &self.metrics {
            m.set_leading(&self.metric_name(), true);
        }
    }

    /// Ends the term (the work is told at once) and waits for the work to stop.
    fn lose(&mut self, reason: String, now: Instant) {
        self.lose_then(reason, None, now);
    }

    /// [`lose`](Self::lose), then give the lease to `to` once the work has stopped.
    fn lose_then(&mut self, reason: String, to: Option<GiveTo>, now: Instant) {
        let Role::Leader(l) = &self.role else { return };
        let token = l.token;
        if to.is_some() {
            info!(%reason, term = token, "stepping down");
        } else {
            warn!(%reason, term = token, "stopped leading");
        }
        self.end_term();
        self.role = Role::Draining {
            since: now,
            overdue: false,
            then: to.map(|to| Giving {
                token,
                to,
                stop_after: false,
                until: now,
                retry_at: None,
                current: None,
            }),
        };
    }

    fn end_term(&mut self) {
        if let Some(inflight) = &mut self.inflight {
            inflight.orphaned = true;
        }
        self.actions.push_back(Action::EndTerm);
        self.actions.push_back(Action::Announce { leading: false });
        self.status.term = None;
        self.stale = true;
        if let Some(m) = &self.metrics {
            m.set_leading(&self.metric_name(), false);
        }
    }

    fn on_work_stopped(&mut self, now: Instant) {
        self.status.work_overdue = false;
        match &mut self.role {
            Role::Draining { then, .. } => match then.take() {
                Some(mut giving) => {
                    giving.until = now + self.config.renew_deadline;
                    self.role = Role::Giving(giving);
                }
                None => self.role = Role::Follower,
            },
            Role::ShuttingDown(Closing::WaitingForWork { token, last, .. }) => {
                let token = *token;
                if self.config.release_on_cancel {
                    // Release on the version of our last write, without reading first:
                    // the write names that version, so it lands only if nobody wrote the
                    // Lease since (else 409, and the release reads and checks).
                    let last = Versioned::clone(last);
                    self.role = Role::Giving(Giving {
                        token,
                        to: GiveTo::Nobody,
                        stop_after: true,
                        until: now + self.config.renew_deadline,
                        retry_at: None,
                        current: Some(last),
                    });
                } else {
                    self.stop(Ok(()));
                }
            }
            _ => {}
        }
    }

    // ---- shutting down -------------------------------------------------------------------

    fn on_shutdown(&mut self, now: Instant) {
        match &self.role {
            Role::Leader(l) => {
                let token = l.token;
                let last = Box::new(l.current.clone());
                info!(term = token, "shutting down: waiting for the work to stop");
                self.end_term();
                self.role = Role::ShuttingDown(Closing::WaitingForWork {
                    token,
                    until: now + self.config.shutdown_grace,
                    last,
                });
            }
            Role::Follower
                if self
                    .inflight
                    .as_ref()
                    .is_some_and(|i| matches!(i.purpose, Purpose::Take)) =>
            {
                // The taking write may land: find out, and release it if it did. If it
                // still waits in the client it is dropped, and there is nothing to find.
                self.role = Role::ShuttingDown(Closing::Resolving {
                    until: now + self.config.renew_deadline,
                    retry_at: None,
                });
                self.actions.push_back(Action::Withdraw);
            }
            Role::Follower if self.pending_take.is_some() && self.config.release_on_cancel => {
                // A taking write whose answer was lost may have landed: read (once the
                // outstanding request, if any, is answered) and release it if it did.
                if let Some(inflight) = &mut self.inflight {
                    inflight.orphaned = true;
                }
                self.role = Role::ShuttingDown(Closing::Resolving {
                    until: now + self.config.renew_deadline,
                    retry_at: Some(now),
                });
            }
            // Finish giving the lease up, then stop.
            Role::Giving(_) => {
                if let Role::Giving(g) = &mut self.role {
                    g.stop_after = true;
                }
            }
            Role::ShuttingDown(_) | Role::Stopped => {}
            Role::Follower | Role::Draining { .. } => self.stop(Ok(())),
        }
    }

    fn closing_step(&mut self, now: Instant) {
        let Role::ShuttingDown(closing) = &mut self.role else {
            return;
        };
        match closing {
            Closing::Resolving { until, retry_at } => {
                if now >= *until {
                    warn!(
                        "could not find out whether our last taking write landed; the lease will expire"
                    );
                    self.stop(Ok(()));
                } else if self.inflight.is_none() && retry_at.is_some_and(|t| now >= t) {
                    *retry_at = None;
                    let until = *until;
                    self.send_until(Purpose::ResolveRead, Op::Get, now, Some(until));
                }
            }
            Closing::WaitingForWork { until, .. } => {
                if now >= *until {
                    warn!(
                        grace = ?self.config.shutdown_grace,
                        "the work did not stop in time: not releasing; the lease will expire"
                    );
                    self.stop(Ok(()));
                }
            }
        }
    }

    /// Shutting down with a taking write outstanding: its answer arrived.
    fn on_take_resolved(&mut self, reply: Result<Answer, LockError>, now: Instant) {
        match reply {
            Ok(Answer::Wrote(v)) => {
                self.observe(v.clone(), now);
                self.release_untaken(v, now);
            }
            Err(LockError::NotFound) => self.stop(Ok(())),
            // A 409 may answer a retry of a write that landed (kube's client retries
            // writes after a 503 or 504): look, as after any answer that leaves the
            // outcome unknown.
            Err(_) if self.config.release_on_cancel => {
                let until = match &self.role {
                    Role::ShuttingDown(Closing::Resolving { until, .. }) => Some(*until),
                    _ => None,
                };
                self.send_until(Purpose::ResolveRead, Op::Get, now, until);
            }
            _ => self.stop(Ok(())),
        }
    }

    fn on_resolve_read(&mut self, reply: Result<Answer, LockError>, now: Instant) {
        match reply {
            Ok(Answer::Read(Some(v))) => {
                self.observe(v.clone(), now);
                // Ours by what only our write has (holder, transitions, renew time): a
                // handoff annotation or a `preferredHolder` written on top since does not
                // make it someone else's.
                let landed = self
                    .pending_take
                    .as_ref()
                    .is_some_and(|p| OwnWrite::of(&p.record).is(&v.record));
                if landed {
                    self.release_untaken(v, now);
                } else {
                    self.stop(Ok(()));
                }
            }
            Ok(_) => self.stop(Ok(())),
            Err(e) => {
                self.api_failed("read", &e, now);
                // Try again while the time allows (the closing step stops us at `until`).
                let pause = self.config.retry_period / 4;
                if let Role::ShuttingDown(Closing::Resolving { retry_at, .. }) = &mut self.role {
                    *retry_at = Some(now + pause);
                }
            }
        }
    }

    /// Our taking write landed while shutting down; no term was started on it. Give it
    /// back at once, if configured to release.
    fn release_untaken(&mut self, v: Versioned, now: Instant) {
        self.pending_take = None;
        if !self.config.release_on_cancel {
            self.stop(Ok(()));
            return;
        }
        info!("our taking write landed as we shut down: releasing it");
        self.role = Role::Giving(Giving {
            token: v.record.lease_transitions,
            to: GiveTo::Nobody,
            stop_after: true,
            until: now + self.config.renew_deadline,
            retry_at: None,
            current: Some(v),
        });
    }

    // ---- giving the lease up: release, or transfer to a handoff's candidate ------------

    /// Writes the lease away if it is still this term's (on our last write's version, or
    /// after a read that shows it); bounded in time.
    fn giving_step(&mut self, now: Instant) {
        let at = self.wall_now();
        let lease_seconds = self.config.lease_duration_seconds();
        let Role::Giving(g) = &mut self.role else {
            return;
        };
        if now >= g.until {
            warn!("could not give the lease up in time; it will expire");
            self.given_up();
            return;
        }
        if self.inflight.is_some() || g.retry_at.is_some_and(|t| now < t) {
            return;
        }
        g.retry_at = None;
        let until = g.until;
        match g.current.take() {
            None => self.send_until(Purpose::GiveRead, Op::Get, now, Some(until)),
            Some(fresh) => {
                let base = &fresh.record;
                // A transfer gives the next token; with none left, release instead (the
                // next holder's take then reports the exhausted count).
                let nobody = GiveTo::Nobody;
                let to = if base.lease_transitions == i32::MAX {
                    &nobody
                } else {
                    &g.to
                };
                let record = match to {
                    GiveTo::Nobody => LeaderRecord {
                        holder_identity: String::new(),
                        lease_duration_seconds: Some(1),
                        acquire_time: Some(at),
                        renew_time: Some(at),
                        lease_transitions: base.lease_transitions,
                        preferred_holder: base.preferred_holder.clone(),
                        strategy: base.strategy.clone(),
                        handoff: None,
                    },
                    GiveTo::Candidate { to, id } => LeaderRecord {
                        holder_identity: to.clone(),
                        lease_duration_seconds: Some(lease_seconds),
                        acquire_time: Some(at),
                        renew_time: Some(at),
                        // The new holder's term: the next token.
                        lease_transitions: base.lease_transitions + 1,
                        preferred_holder: None,
                        strategy: base.strategy.clone(),
                        handoff: Some(Handoff {
                            state: HandoffState::Transferred,
                            to: Some(to.clone()),
                            id: id.clone(),
                        }),
                    },
                };
                self.send_until(
                    Purpose::GiveWrite,
                    Op::Update(fresh, record),
                    now,
                    Some(until),
                );
            }
        }
    }

    fn on_give_read(&mut self, reply: Result<Answer, LockError>, now: Instant) {
        match reply {
            Ok(Answer::Read(Some(v))) => {
                self.observe(v.clone(), now);
                let identity = self.config.identity.clone();
                let Role::Giving(g) = &self.role else {
                    return;
                };
                // Ours only if we wrote it: another process renewing under our identity
                // (a client-go peer) writes its own renewal time, and is not ours to
                // release.
                let ours = v.record.holder_identity == identity
                    && v.record.lease_transitions == g.token
                    && self.wrote(&v.record);
                let Role::Giving(g) = &mut self.role else {
                    return;
                };
                if !ours {
                    debug!("the lease is no longer ours; nothing to give up");
                    self.given_up();
                    return;
                }
                if let GiveTo::Candidate { id, .. } = &g.to {
                    let still_accepted = v
                        .record
                        .handoff
                        .as_ref()
                        .is_some_and(|h| h.state == HandoffState::Accepted && &h.id == id);
                    if !still_accepted {
                        info!("the handoff was withdrawn; releasing the lease instead");
                        g.to = GiveTo::Nobody;
                    }
                }
                g.current = Some(v);
            }
            Ok(_) => self.given_up(),
            Err(e) => {
                self.api_failed("release", &e, now);
                self.give_retry(now);
            }
        }
    }

    fn on_given(&mut self, reply: Result<Answer, LockError>, now: Instant) {
        match reply {
            Ok(Answer::Wrote(v)) => {
                let token = v.record.lease_transitions;
                match v.record.holder() {
                    Some(to) => info!(term = token, to, "handed the lease over"),
                    None => info!(term = token, "released the lease"),
                }
                self.observe(v, now);
                self.given_up();
            }
            Ok(_) => self.given_up(),
            Err(LockError::Conflict) => {
                // Read again at once: a late write of ours, or someone else's.
            }
            Err(LockError::NotFound) => self.given_up(),
            Err(e) => {
                self.api_failed("release", &e, now);
                self.give_retry(now);
            }
        }
    }

    fn give_retry(&mut self, now: Instant) {
        let pause = self.config.retry_period / 4;
        if let Role::Giving(g) = &mut self.role {
            g.retry_at = Some(now + pause);
        }
    }

    /// Done giving the lease up (or it was no longer ours): stop, or campaign again.
    fn given_up(&mut self) {
        let Role::Giving(g) = &self.role else { return };
        if g.stop_after {
            self.stop(Ok(()));
        } else {
            self.stale = true;
            self.role = Role::Follower;
        }
    }

    fn stop(&mut self, result: Result<(), ElectionError>) {
        if let Some(inflight) = &mut self.inflight {
            inflight.orphaned = true;
        }
        if !matches!(self.watch, Watch::Closed { .. } | Watch::Polling { .. }) {
            self.actions.push_back(Action::Unwatch);
        }
        self.watch = Watch::Closed { retry_at: None };
        self.role = Role::Stopped;
        self.status.watching = false;
        self.actions.push_back(Action::Stop(result));
    }

    fn fatal(&mut self, e: LockError) {
        if matches!(self.role, Role::Leader(_)) {
            self.end_term();
        }
        self.stop(Err(ElectionError::Lock(e)));
    }

    // ---- watching -----------------------------------------------------------------------

    fn watch_wanted(&self) -> bool {
        self.config.watch && matches!(self.role, Role::Follower | Role::Draining { .. })
    }

    fn watch_step(&mut self, now: Instant) {
        if !self.watch_wanted() {
            if matches!(self.watch, Watch::Open(_) | Watch::Opening { .. }) {
                self.actions.push_back(Action::Unwatch);
                self.watch = Watch::Closed { retry_at: None };
                self.status.watching = false;
            }
            return;
        }
        match &self.watch {
            Watch::Open(w) if now >= w.opened_at + WATCH_TIMEOUT + WATCH_SLACK => {
                warn!("the watch outlived its server-side timeout without ending; watching anew");
                self.restart_watch(now);
                self.stale = true;
            }
            Watch::Polling { retry_at, .. } if now >= *retry_at => {
                debug!("trying to watch again");
                self.watch = Watch::Closed { retry_at: None };
                self.open_watch(now);
            }
            Watch::Closed { retry_at } if retry_at.is_none_or(|t| now >= t) => {
                self.open_watch(now);
            }
            _ => {}
        }
    }

    fn open_watch(&mut self, now: Instant) {
        // Start after what we know; nothing known yet: read first.
        let after = if self.absent && !self.stale {
            String::new()
        } else {
            match &self.observed {
                Some(o) if !self.stale => o.version.clone(),
                _ => return,
            }
        };
        self.actions.push_back(Action::Watch {
            after: after.clone(),
            timeout: WATCH_TIMEOUT,
            open_by: now + self.request_timeout(),
        });
        self.watch = Watch::Opening { after };
    }

    /// Closes the watch and opens it again after the next read.
    fn restart_watch(&mut self, _now: Instant) {
        if matches!(self.watch, Watch::Open(_) | Watch::Opening { .. }) {
            self.actions.push_back(Action::Unwatch);
        }
        self.watch = Watch::Closed { retry_at: None };
        self.status.watching = false;
    }

    fn on_watch_opened(&mut self, result: Result<(), LockError>, now: Instant) {
        let Watch::Opening { after } = &self.watch else {
            return;
        };
        match result {
            Ok(()) => {
                debug!(version = %after, "watching the lease");
                self.watch = Watch::Open(OpenWatch {
                    opened_at: now,
                    version: after.clone(),
                    checked: false,
                    checked_at: None,
                });
                self.status.watching = true;
                self.status.polling = None;
                if let Some(m) = &self.metrics {
                    m.set_watching(&self.metric_name(), true);
                }
                // (A watch proves nothing about reading or writing the Lease itself.)
                self.api_ok(false, now);
            }
            Err(e) => self.watch_failed(e, now),
        }
    }

    fn on_watch_event(&mut self, event: LockEvent, now: Instant) {
        let Watch::Open(w) = &mut self.watch else {
            return;
        };
        match event {
            LockEvent::Changed(v) => {
                w.version = v.version.clone();
                w.checked = false;
                // The holder's renewal interval, as the watch shows it.
                if let (Some(o), Some(last)) = (&self.observed, self.last_change_at)
                    && o.record != v.record
                    && o.record.holder_identity == v.record.holder_identity
                {
                    self.renew_gap = Some(now - last);
                }
                self.short_watches = 0;
                self.observe(v, now);
                self.landed_take(now);
            }
            LockEvent::Deleted => self.observe_absent(false, now),
        }
    }

    fn on_watch_ended(&mut self, error: Option<LockError>, now: Instant) {
        let Watch::Open(w) = &self.watch else {
            return;
        };
        let lived = now - w.opened_at;
        self.status.watching = false;
        match error {
            Some(e) => self.watch_failed(e, now),
            None if lived >= self.config.retry_period => {
                // The server ended a healthy watch: continue where it left off.
                self.short_watches = 0;
                self.watch = Watch::Closed { retry_at: None };
            }
            None => self.short_watch(now, "the watch keeps ending at once".into()),
        }
    }

    fn watch_failed(&mut self, e: LockError, now: Instant) {
        self.status.watching = false;
        self.absence_unsure |= self.absent;
        if e.is_gone() {
            // Our version is too old to watch from: read afresh, then watch from there.
            debug!("the watch's version is gone; reading afresh");
            self.watch = Watch::Closed { retry_at: None };
            self.stale = true;
            return;
        }
        self.count(e.kind());
        if e.is_fatal() {
            self.fall_back(now, format!("cannot watch the lease: {e}"));
        } else {
            debug!(error = %e, "the watch failed");
            self.short_watch(now, format!("the watch keeps failing: {e}"));
        }
    }

    fn short_watch(&mut self, now: Instant, reason: String) {
        self.short_watches += 1;
        if self.short_watches >= SHORT_WATCHES_BEFORE_POLLING {
            self.fall_back(now, reason);
        } else {
            let retry_at = now + self.jitter(self.config.retry_period);
            self.watch = Watch::Closed {
                retry_at: Some(retry_at),
            };
        }
    }

    fn fall_back(&mut self, now: Instant, reason: String) {
        let retry = self.watch_retry;
        self.watch_retry = (self.watch_retry * 2).min(WATCH_RETRY_MAX);
        self.short_watches = 0;
        warn!(%reason, retry_in = ?retry, "polling every retry period instead of watching");
        self.status.polling = Some(reason);
        self.watch = Watch::Polling {
            retry_at: now + retry,
        };
        if let Some(m) = &self.metrics {
            m.set_watching(&self.metric_name(), false);
        }
    }

    /// When an open watch should have shown the holder's next renewal, if it is due one.
    fn watch_check_at(&self) -> Option<Instant> {
        let Watch::Open(w) = &self.watch else {
            return None;
        };
        let observed = self.observed.as_ref()?;
        // Coordinated mode, nobody holding (released, or a record expired in our eyes):
        // the next event is the controller's assignment, which a dead watch would hide
        // until it is replaced. Look once per lease duration.
        let idle = observed.record.holder().is_none()
            || self.observed_expiry().is_some_and(|e| self.now >= e);
        if self.config.coordinated.is_some() && idle {
            let last = self.last_change_at.unwrap_or(w.opened_at);
            let since = last.max(w.opened_at).max(w.checked_at.unwrap_or(last));
            return Some(since + self.config.lease_duration);
        }
        if w.checked {
            return None;
        }
        // Until the watch has shown two renewals, expect the holder to renew as often as
        // we would.
        let gap = self.renew_gap.unwrap_or_else(|| self.config.renew_every());
        let last = self.last_change_at?;
        observed.record.holder()?;
        let expected = last.max(w.opened_at) + gap * 2 + Duration::from_secs(1);
        // At the latest when the read ahead of the expiry is due: that read checks the
        // watch too.
        let ahead = self
            .observed_expiry()
            .map(|e| e.checked_sub(self.confirm_ahead()).unwrap_or(e));
        Some(expected.min(ahead.unwrap_or(expected)))
    }

    // ---- observing ----------------------------------------------------------------------

    /// Records a record we saw. The observation time resets only when the record itself
    /// changes (as in client-go), so edits to labels or annotations do not keep a dead
    /// holder's lease alive. Versions are opaque: any version is news.
    fn observe(&mut self, v: Versioned, now: Instant) {
        let (own, max) = (self.config.lease_duration, self.config.max_record_duration);
        // A handoff annotation coming or going is not a renewal: it keeps the time.
        let same = same_but_handoff;
        let changed = self
            .observed
            .as_ref()
            .is_none_or(|o| !same(&o.record, &v.record));
        if changed {
            if self
                .observed
                .as_ref()
                .is_none_or(|o| o.record.holder_identity != v.record.holder_identity)
            {
                self.renew_gap = None;
            }
            self.last_change_at = Some(now);
        }
        let (observed_at, carried) = match &self.observed {
            Some(o) if same(&o.record, &v.record) => (o.observed_at, o.carried),
            // A holder replaced by another without a release, or its record edited
            // without a renewal (an admin, garbage): the holder we saw may still lead
            // for as long as the duration we saw allows. Only a renewal by the holder
            // itself (a new renewTime) speaks for its duration.
            Some(o)
                if o.record.holder().is_some()
                    && v.record.holder().is_some()
                    && (o.record.holder_identity != v.record.holder_identity
                        || o.record.renew_time == v.record.renew_time) =>
            {
                (now, o.duration(own, max))
            }
            _ => (now, Duration::ZERO),
        };
        // Back after a deletion: whoever led the deleted Lease may lead until the wait
        // for re-creating it is over; this record (someone else's re-creation, or an
        // admin's) is valid at least that long.
        let carried = match self.tombstone_expiry() {
            Some(t) => carried.max(t.saturating_duration_since(now)),
            None => carried,
        };
        self.assigned_safe_at = self
            .is_assigned_to_us(&v.record)
            .then(|| self.assignment_safe_at(&v.record, carried, now));
        self.absent = false;
        self.tombstone = None;
        self.absent_since = None;
        let t = v.record.lease_transitions;
        self.highest_token = Some(self.highest_token.map_or(t, |h| h.max(t)));
        if v.record.holder().is_some() {
            let d = v.record.effective_duration(own, max);
            self.longest_duration = self.longest_duration.max(d);
        }
        if self.blocked_version.as_ref() != Some(&v.version) {
            self.blocked_version = None;
            if matches!(self.role, Role::Follower)
                && self
                    .status
                    .problem
                    .as_deref()
                    .is_some_and(|p| p.contains("leaseTransitions"))
            {
                self.status.problem = None;
            }
        }
        self.report_garbage(&v);
        self.report_clash(&v.record);
        self.observed = Some(Observed {
            record: v.record,
            version: v.version,
            observed_at,
            lease: v.lease,
            carried,
        });
    }

    /// The Lease does not exist (a 404 or a deletion event). `leading`: we found out as
    /// its leader (nobody else can have written it since our last write).
    fn observe_absent(&mut self, leading: bool, now: Instant) {
        if let Some(o) = self.observed.take() {
            info!(
                holder = o.record.holder().unwrap_or("nobody"),
                "the lease was deleted"
            );
            self.tombstone = Some(Box::new(o));
            self.absent_since = Some((now, leading));
        } else if self.absence_unsure && self.tombstone.is_some() {
            // We could not look for a while: it may have been re-created, led on and
            // deleted again meanwhile. Wait as if we had just learned of a deletion.
            self.absent_since = Some((now, false));
        }
        self.absence_unsure = false;
        self.absent = true;
        self.stale = false;
    }

    /// When a deleted Lease may be re-created (`None`: at once).
    ///
    /// - Never seen before: at once (nothing is known; see the README's limits).
    /// - Found deleted by its leader (us): at once (within a retry period of finding
    ///   out); nobody else wrote it after us.
    /// - Otherwise: once the last record we saw has expired, and a whole lease duration
    ///   (the longest seen on this Lease) after we learned of the deletion — someone may
    ///   have taken the Lease after what we saw and lead until the deletion; their term
    ///   ends within `renew_deadline` of their last renewal, which came before the
    ///   deletion. (Waiting from the deletion costs at most a retry period more than
    ///   waiting out the last record.)
    fn tombstone_expiry(&self) -> Option<Instant> {
        if !self.absent {
            return None;
        }
        let t = self.tombstone.as_ref()?;
        let (learned, leading) = self.absent_since?;
        // Only right after finding out: a process that finds the Lease gone and then
        // drains (blind) for a while may meet a Lease that others re-created (after
        // their wait) and deleted again meanwhile.
        if leading && self.now <= learned + self.config.retry_period {
            return None;
        }
        let (own, max) = (self.config.lease_duration, self.config.max_record_duration);
        // Whoever may have taken it unseen could have any candidate's duration: wait the
        // longest one seen on this Lease.
        let unknown = learned + t.duration(own, max).max(self.longest_duration);
        let held = t.record.holder().is_some() && !self.is_own(&t.record);
        let expiry = held.then(|| t.expires_at(own, max));
        Some(expiry.map_or(unknown, |e| e.max(unknown)))
    }

    /// When the observed holder's lease expires, if someone else holds it (or a
    /// strategy prefers someone else).
    fn observed_expiry(&self) -> Option<Instant> {
        let o = self.observed.as_ref()?;
        if o.record.holder().is_none() && !o.record.prefers_other_than(&self.config.identity) {
            return None;
        }
        // Our own record is ours to take at once — unless it prefers someone else: then
        // it is theirs until it expires, and we need to wake then.
        if self.is_own(&o.record) && !o.record.prefers_other_than(&self.config.identity) {
            return None;
        }
        Some(o.expires_at(self.config.lease_duration, self.config.max_record_duration))
    }

    /// How long before an expiry the follower reads the record once more.
    fn confirm_ahead(&self) -> Duration {
        (self.config.retry_period / 4).min(CONFIRM_AHEAD)
    }

    /// A read sent no earlier than `confirm_ahead` before `o` expires showed its version.
    fn confirmed_for(&self, o: &Observed) -> bool {
        let expiry = o.expires_at(self.config.lease_duration, self.config.max_record_duration);
        self.confirmed.as_ref().is_some_and(|(version, sent)| {
            *version == o.version && *sent + self.confirm_ahead() >= expiry
        })
    }

    /// When a watching follower reads the observed record once more before taking it at
    /// its expiry (`None`: no such read is due).
    fn confirm_at(&self) -> Option<Instant> {
        if self.config.coordinated.is_some() || !matches!(self.watch, Watch::Open(_)) {
            return None;
        }
        let expiry = self.observed_expiry()?;
        if self
            .observed
            .as_ref()
            .is_some_and(|o| self.confirmed_for(o))
        {
            return None;
        }
        Some(expiry.checked_sub(self.confirm_ahead()).unwrap_or(expiry))
    }

    fn is_held(&self, o: &Observed, now: Instant) -> bool {
        o.is_held_at(
            now,
            self.config.lease_duration,
            self.config.max_record_duration,
        )
    }

    fn report_garbage(&mut self, v: &Versioned) {
        if self.reported_version.as_ref() == Some(&v.version) {
            return;
        }
        if let Some(problem) = v.record.oddity(self.config.max_record_duration) {
            self.reported_version = Some(v.version.clone());
            warn!(holder = %v.record.holder_identity, "{problem}");
        }
    }

    fn report_clash(&mut self, record: &LeaderRecord) {
        let clash = record.holder_identity == self.config.identity
            && !self.wrote(record)
            && !self.is_transfer_to_us(record)
            && !self.controller_wrote(record)
            && !matches!(self.role, Role::Leader(_));
        if !clash {
            if record.holder_identity != self.config.identity {
                self.clash_reported = None;
            }
            return;
        }
        if self.clash_reported.is_none() && self.started {
            warn!(
                identity = %self.config.identity,
                "the lease names our identity but this process did not write it: another process uses identity {} (or an earlier run did); waiting for it to expire",
                self.config.identity
            );
            self.clash_reported = Some(record.holder_identity.clone());
        }
    }

    // ---- records ------------------------------------------------------------------------

    /// The token of a new term taken over from `base`: one above the highest seen.
    fn take_token(&self, base: &LeaderRecord) -> Result<i32, TakeoverError> {
        // A transfer already raised the count for our term.
        if self.is_transfer_to_us(base) {
            return Ok(base.lease_transitions);
        }
        let highest = self
            .highest_token
            .map_or(base.lease_transitions, |h| h.max(base.lease_transitions));
        highest
            .checked_add(1)
            .or_else(|| base.lease_transitions.checked_add(1))
            .ok_or(TakeoverError::TransitionsExhausted)
    }

    /// The token for re-creating the Lease: continuing from the last record seen, or 0
    /// if nothing was ever seen (or the count is exhausted: deleting the Lease resets it).
    fn create_token(&self) -> i32 {
        let last = self
            .tombstone
            .as_ref()
            .map(|t| t.record.lease_transitions)
            .into_iter()
            .chain(self.highest_token)
            .max();
        match last {
            None => 0,
            Some(t) => t.checked_add(1).unwrap_or_else(|| {
                warn!("leaseTransitions was exhausted; the re-created Lease starts again at 0");
                0
            }),
        }
    }

    /// The record that starts a term on `base` (none: a new Lease): us, now, with
    /// `token`. The `strategy` a coordinated controller set is kept (client-go's
    /// non-coordinated writes clear it, which fights the controller); `preferredHolder`
    /// is cleared (we take only when it is us, or after it went unused for a lease
    /// duration), and so is a handoff (it is done, or stale).
    fn taking_record(&self, token: i32, base: Option<&LeaderRecord>) -> LeaderRecord {
        let at = self.wall_now();
        LeaderRecord {
            holder_identity: self.config.identity.clone(),
            lease_duration_seconds: Some(self.config.lease_duration_seconds()),
            acquire_time: Some(at),
            renew_time: Some(at),
            lease_transitions: token,
            preferred_holder: None,
            strategy: base.and_then(|b| b.strategy.clone()),
            handoff: None,
        }
    }

    /// The renewal of `from`: renewTime now (a different value than before, so that
    /// followers see a change), everything else kept as read — strategy, preferred
    /// holder and a pending handoff too.
    fn renewed(&self, from: &LeaderRecord, token: i32) -> LeaderRecord {
        // Our own handoff request rides on the renewals until a candidate accepts it;
        // unanswered by `withdraw_at`, every renewal takes it off again until one that
        // did so succeeds (`on_renewed` forgets it then).
        let mut handoff = from.handoff.clone();
        if let Role::Leader(Leading {
            handing: Some(h), ..
        }) = &self.role
        {
            let ours = handoff
                .as_ref()
                .is_some_and(|x| x.id == h.request.id && x.state == HandoffState::Requested);
            if self.now >= h.withdraw_at {
                if ours {
                    handoff = None;
                }
            } else if handoff.is_none() {
                handoff = Some(h.request.clone());
            }
        }
        LeaderRecord {
            holder_identity: self.config.identity.clone(),
            lease_duration_seconds: Some(self.config.lease_duration_seconds()),
            acquire_time: from.acquire_time,
            renew_time: Some(renew_time(from.renew_time, self.wall_now())),
            lease_transitions: token,
            preferred_holder: from.preferred_holder.clone(),
            strategy: from.strategy.clone(),
            handoff,
        }
    }

    // ---- access and errors ----------------------------------------------------------------

    /// A refusal while the election starts is a configuration error: stop and say what to
    /// grant. (Afterwards it is an outage, ridden out.)
    fn refused_at_start(&self, e: &LockError, purpose: &Purpose) -> bool {
        !self.started && e.is_fatal() && matches!(purpose, Purpose::Read | Purpose::Take)
    }

    fn api_ok(&mut self, proof: bool, now: Instant) {
        self.started |= proof;
        if let Some(outage) = self.outage.take() {
            info!(
                failures = outage.failures,
                lasted = ?(now - outage.since),
                "the API server answers again"
            );
            self.status.last_error = None;
        }
    }

    /// Counts a failed call; logs the first of a streak (an outage) as a warning, the
    /// rest at debug level.
    fn api_failed(&mut self, what: &str, e: &LockError, now: Instant) {
        self.count(e.kind());
        let msg = format!("{what}: {e}");
        match &mut self.outage {
            Some(o) => {
                o.failures += 1;
                debug!(error = %e, "{what} failed");
            }
            None => {
                warn!(error = %e, "{what} failed; retrying (further failures are logged at debug level until it recovers)");
                self.outage = Some(Outage {
                    since: now,
                    failures: 1,
                });
            }
        }
        self.status.last_error = Some(msg);
    }

    /// Paces the follower's next attempt after a failure: the retry period, doubling with
    /// each failure in a row, up to the smaller of 4 retry periods and half the lease
    /// duration; jittered.
    fn back_off(&mut self, now: Instant) {
        self.failures = self.failures.saturating_add(1);
        let rp = self.config.retry_period;
        let cap = (rp * 4).min(self.config.lease_duration / 2).max(rp);
        let exp = self.failures.saturating_sub(1).min(8);
        let wait = (rp * 2u32.pow(exp)).min(cap);
        self.not_before = Some(now + self.jitter(wait));
    }

    /// The time limit of one call: the configured request timeout, but at most half the
    /// renew deadline — a call slower than that is failing in effect, and waiting longer
    /// on a silently dead connection would only delay the retry on a new one.
    /// The least time a renewal must have before the term's deadline to be worth sending
    /// (a twentieth of the retry period). Under overload, renewals sent at the very end
    /// of a failing term only add load: they cannot be answered in time.
    fn renew_floor(&self) -> Duration {
        self.config.retry_period / 20
    }

    fn request_timeout(&self) -> Duration {
        self.config
            .request_timeout
            .min(self.config.renew_deadline / 2)
    }

    fn count(&self, kind: &str) {
        if let Some(m) = &self.metrics {
            m.api_error(&self.metric_name(), kind);
        }
    }

    fn metric_name(&self) -> String {
        // client-go's `name` label is the lock's name, not namespace/name.
        self.name
            .rsplit('/')
            .next()
            .unwrap_or(&self.name)
            .to_owned()
    }

    /// Wall-clock now, at MicroTime's resolution.
    fn wall_now(&self) -> jiff::Timestamp {
        let t = (self.wall.0)();
        jiff::Timestamp::from_microsecond(t.as_microsecond()).unwrap_or(t)
    }

    fn jitter(&mut self, d: Duration) -> Duration {
        d.mul_f64(1.0 + self.rng.random::<f64>() * 0.2)
    }
}

/// Whether two records are the same but for the handoff annotation.
fn same_but_handoff(a: &LeaderRecord, b: &LeaderRecord) -> bool {
    a.holder_identity == b.holder_identity
        && a.lease_duration_seconds == b.lease_duration_seconds
        && a.acquire_time == b.acquire_time
        && a.renew_time == b.renew_time
        && a.lease_transitions == b.lease_transitions
        && a.preferred_holder == b.preferred_holder
        && a.strategy == b.strategy
}

/// The renewTime to write: now, unless that equals the previous value (then one
/// microsecond later), so that every renewal changes the record. A clock that stepped
/// back still writes now: followers look for a change, not for time moving forward.
fn renew_time(previous: Option<jiff::Timestamp>, now: jiff::Timestamp) -> jiff::Timestamp {
    match previous {
        Some(p) if p == now => p
            .checked_add(jiff::SignedDuration::from_micros(1))
            .unwrap_or(now),
        _ => now,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    fn take_send(m: &mut Machine) -> Request {
        loop {
            match m.poll_action() {
                Some(Action::Send(r)) => return r,
                Some(_) => {}
                None => panic!("no request"),
            }
        }
    }

    /// Defect 8: a leader whose wall clock stepped back writes the new time, not the
    /// previous one plus a microsecond (client-go followers compare whole seconds and
    /// would see no change for as long as the step).
    #[test]
    fn a_renewal_after_the_wall_clock_stepped_back_writes_the_new_time() {
        let wall: Arc<Mutex<jiff::Timestamp>> =
            Arc::new(Mutex::new("2030-01-01T01:00:00Z".parse().unwrap()));
        let w = wall.clone();
        let t0 = Instant::now();
        let mut m = Machine::new(ElectionConfig::new("a"), "ns/l", t0)
            .unwrap()
            .with_wall_clock(move || *w.lock().unwrap());
        assert!(matches!(take_send(&mut m).op, Op::Get));
        m.handle(Input::Reply(Ok(Answer::Read(None))), t0);
        let Op::Create(record) = take_send(&mut m).op else {
            panic!("expected a create")
        };
        let v1 = Versioned {
            record,
            version: "1".into(),
            lease: None,
        };
        m.handle(Input::Reply(Ok(Answer::Wrote(v1))), t0);
        assert!(m.leader(t0) == Some("a"));
        // The clock steps back an hour.
        let stepped: jiff::Timestamp = "2030-01-01T00:00:00Z".parse().unwrap();
        *wall.lock().unwrap() = stepped;
        m.handle(Input::Tick, t0 + Duration::from_secs(2));
        let Op::Update(_, renewal) = take_send(&mut m).op else {
            panic!("expected a renewal")
        };
        assert_eq!(renewal.renew_time, Some(stepped));
    }

    /// A create may leave only within a retry period of the read that found the Lease
    /// absent (the admission queue can hold it for seconds, and the Lease can be
    /// created, led and deleted meanwhile). Dropped unsent at that instant, it leads to
    /// a new read, not to a term or a failure.
    #[test]
    fn a_create_is_sent_only_while_its_absence_read_is_fresh() {
        let t0 = Instant::now() + Duration::from_secs(60);
        let config = ElectionConfig::new("a");
        let retry = config.retry_period;
        let mut m = Machine::new(config, "ns/l", t0).unwrap();
        assert!(matches!(take_send(&mut m).op, Op::Get));
        let read_sent = t0 + Duration::from_millis(10);
        m.handle(Input::Sent(read_sent), read_sent);
        m.handle(
            Input::Reply(Ok(Answer::Read(None))),
            t0 + Duration::from_millis(20),
        );
        let create = take_send(&mut m);
        assert!(matches!(create.op, Op::Create(_)));
        assert_eq!(create.send_by, Some(read_sent + retry));
        // Still queued at `send_by`: dropped.
        let by = read_sent + retry;
        m.handle(Input::Unsent, by);
        assert!(m.leader(by).is_none());
        assert!(m.status().last_error.is_none(), "not a failure");
        m.handle(Input::Tick, by);
        let next = take_send(&mut m);
        assert!(matches!(next.op, Op::Get), "reads again: {next:?}");
        assert_eq!(next.send_by, None);
    }

    /// A Lease known absent from a recent list is created at once; from an old one it
    /// is read first; and a create refused because it exists after all leads to a read.
    #[test]
    fn a_lease_known_absent_is_created_without_reading_first() {
        let t0 = Instant::now() + Duration::from_secs(60);
        let new = || Machine::new(ElectionConfig::new("a"), "ns/l", t0).unwrap();
        let mut m = new().with_absent(t0 - Duration::from_secs(1));
        assert!(matches!(take_send(&mut m).op, Op::Create(_)));
        assert!(m.poll_action().is_none(), "one request at a time");
        m.handle(Input::Reply(Err(LockError::AlreadyExists)), t0);
        m.handle(Input::Tick, t0 + Duration::from_secs(3));
        assert!(matches!(take_send(&mut m).op, Op::Get));

        let mut m = new().with_absent(t0 - Duration::from_secs(3));
        assert!(
            matches!(take_send(&mut m).op, Op::Get),
            "a stale list is no look"
        );
        assert!(m.poll_action().is_none());

        let mut m = new()
            .with_observed(held_by("b", "1", "2030-01-01T00:00:00Z"), t0)
            .with_absent(t0);
        assert!(
            matches!(take_send(&mut m).op, Op::Get),
            "a record seen wins"
        );
    }

    fn held_by(holder: &str, version: &str, renewed: &str) -> Versioned {
        Versioned {
            record: LeaderRecord {
                holder_identity: holder.into(),
                lease_duration_seconds: Some(15),
                acquire_time: Some("2030-01-01T00:00:00Z".parse().unwrap()),
                renew_time: Some(renewed.parse().unwrap()),
                lease_transitions: 4,
                ..Default::default()
            },
            version: version.into(),
            lease: None,
        }
    }

    /// A follower (15 s / 10 s / 2 s) started at `start`, seeded with `seed` if given,
    /// whose first read shows `first`, watching from then on.
    fn follower(seed: Option<(Versioned, Instant)>, start: Instant, first: Versioned) -> Machine {
        let mut m = Machine::new(ElectionConfig::new("a"), "ns/l", start).unwrap();
        if let Some((v, at)) = seed {
            m = m.with_observed(v, at);
        }
        assert!(matches!(take_send(&mut m).op, Op::Get));
        m.handle(Input::Reply(Ok(Answer::Read(Some(first)))), start);
        assert!(matches!(m.poll_action(), Some(Action::Watch { .. })));
        m.handle(Input::WatchOpened(Ok(())), start);
        assert!(m.poll_action().is_none());
        m
    }

    /// Issue 11: a shard set's new owner of a crashed member's shard waited a lease
    /// duration from its elector's first read of the shard's Lease, on top of the lease
    /// duration it took to see the member's own Lease expire (2 lease durations in all).
    /// Seeded with the set's earlier observation of the same record, the machine takes
    /// over a lease duration after that observation.
    #[test]
    fn a_seeded_follower_takes_over_a_lease_duration_after_the_seed() {
        let seen = Instant::now();
        let start = seen + Duration::from_secs(12);
        let r = held_by("b", "7", "2030-01-01T00:00:05Z");
        let mut m = follower(Some((r.clone(), seen)), start, r.clone());
        let expiry = seen + Duration::from_secs(15);
        // (Unseeded, the next timer is the watch check at start + 2 × 2 s + 1 s = seen + 17 s,
        // and the record expires at start + 15 s.) First: one read shortly before the
        // expiry (the watch may have died).
        let ahead = expiry - CONFIRM_AHEAD;
        assert_eq!(m.poll_timeout(), Some(ahead));
        m.handle(Input::Tick, ahead);
        assert!(matches!(take_send(&mut m).op, Op::Get));
        m.handle(Input::Reply(Ok(Answer::Read(Some(r)))), ahead);
        assert_eq!(m.poll_timeout(), Some(expiry));
        assert_eq!(m.leader(expiry - Duration::from_millis(1)), Some("b"));
        assert_eq!(m.leader(expiry), None);
        // At the expiry instant: the take.
        m.handle(Input::Tick, expiry);
        let op = take_send(&mut m).op;
        let Op::Update(base, record) = op else {
            panic!("expected a take: {op:?}")
        };
        assert_eq!(base.version, "7");
        assert_eq!(record.holder_identity, "a");
        assert_eq!(record.lease_transitions, 5);
    }

    /// The seed is only what this process saw: a different record on the first read (a
    /// renewal since) is news, seen at the read.
    #[test]
    fn a_renewal_since_the_seed_is_news_at_the_first_read() {
        let seen = Instant::now();
        let start = seen + Duration::from_secs(12);
        let old = held_by("b", "7", "2030-01-01T00:00:05Z");
        let renewed = held_by("b", "8", "2030-01-01T00:00:07Z");
        let mut m = follower(Some((old, seen)), start, renewed);
        let observed = m.status().observed.clone().unwrap();
        assert_eq!(observed.version, "8");
        assert_eq!(observed.observed_at, start);
        let at = seen + Duration::from_secs(15);
        m.handle(Input::Tick, at);
        assert!(m.poll_action().is_none(), "acted at the seed's expiry");
        assert_eq!(m.leader(at), Some("b"));
        assert!(m.poll_timeout().is_some_and(|t| t > at));
    }

    /// A seeded machine whose first read finds the Lease deleted waits as one that saw
    /// the record does (a lease duration after learning of the deletion, and the token
    /// continues), where an unseeded one creates it at once with token 0.
    #[test]
    fn a_seeded_follower_that_finds_the_lease_deleted_waits_as_one_that_saw_it() {
        let seen = Instant::now();
        let start = seen + Duration::from_secs(1);
        let r = held_by("b", "7", "2030-01-01T00:00:05Z");
        let mut m = Machine::new(ElectionConfig::new("a"), "ns/l", start)
            .unwrap()
            .with_observed(r, seen);
        assert!(matches!(take_send(&mut m).op, Op::Get));
        let mut now = start;
        m.handle(Input::Reply(Ok(Answer::Read(None))), now);
        loop {
            while let Some(action) = m.poll_action() {
                match action {
                    Action::Send(Request { op: Op::Get, .. }) => {
                        m.handle(Input::Reply(Ok(Answer::Read(None))), now);
                    }
                    Action::Send(Request {
                        op: Op::Create(record),
                        ..
                    }) => {
                        assert!(
                            now >= start + Duration::from_secs(15),
                            "re-created {:?} after learning of the deletion",
                            now - start
                        );
                        assert_eq!(record.lease_transitions, 5);
                        return;
                    }
                    Action::Watch { .. } => m.handle(Input::WatchOpened(Ok(())), now),
                    other => panic!("{other:?}"),
                }
            }
            now = m.poll_timeout().unwrap();
            m.handle(Input::Tick, now);
        }
    }

    #[test]
    fn renew_time_is_now_even_when_the_clock_stepped_back() {
        let prev: jiff::Timestamp = "2030-01-01T00:00:10Z".parse().unwrap();
        let now: jiff::Timestamp = "2030-01-01T00:00:00Z".parse().unwrap();
        assert_eq!(renew_time(Some(prev), now), now);
        assert_eq!(
            renew_time(Some(now), now),
            "2030-01-01T00:00:00.000001Z"
                .parse::<jiff::Timestamp>()
                .unwrap()
        );
        assert_eq!(renew_time(None, now), now);
    }
}
