//! The election engine: campaign, lead, step down, release.
//!
//! One task per elector runs [`Engine::run`]. As a follower it reads the lock, takes
//! it when it is free or expired, and otherwise waits for a watch event, the observed
//! record's expiry instant, or (without a watch) a jittered poll. As leader it renews
//! every `retry_period` with one update on the cached version and ends the term at
//! `send time of the last successful renewal + renew_deadline` at the latest. Every
//! lock call is bounded in time. This is the only place the Lease is written.

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use futures::stream::BoxStream;
use k8s_openapi::api::coordination::v1::Lease;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use tokio::sync::watch;
use tokio::time::{Instant, sleep, sleep_until, timeout};
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, info, info_span, warn};

use crate::config::{ConfigError, ElectionConfig};
use crate::handle::{ElectionHandle, Status};
use crate::lock::{Lock, LockError, LockEvent, Versioned};
use crate::metrics::Metrics;
use crate::record::{LeaderRecord, Observed, TakeoverError, now_micros};
use crate::term::{Term, TermControl, TermInfo};

/// Why an election stopped with an error.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ElectionError {
    /// The configuration was refused.
    #[error("invalid election config: {0}")]
    Config(#[from] ConfigError),
    /// The lock refused us in a way retrying cannot fix (RBAC, credentials).
    #[error(transparent)]
    Lock(#[from] LockError),
    /// The Lease cannot be taken over (see [`TakeoverError`]).
    #[error(transparent)]
    Takeover(#[from] TakeoverError),
    /// The elector task panicked or was aborted.
    #[error("the elector task failed: {0}")]
    Task(String),
}

/// A configured election on one lock, ready to be started.
///
/// ```no_run
/// # async fn doc(client: kube::Client) -> Result<(), Box<dyn std::error::Error>> {
/// use leaderz::{ElectionConfig, Elector, LeaseLock};
///
/// let lock = LeaseLock::new(client, "default", "my-lock");
/// let handle = Elector::new(lock, ElectionConfig::new("pod-a"))?.spawn();
/// let term = handle.acquired().await?;
/// println!("leading with fencing token {}", term.fencing_token());
/// term.cancelled().await; // leadership lost
/// # Ok(()) }
/// ```
#[derive(Debug)]
pub struct Elector<L> {
    lock: Arc<L>,
    config: ElectionConfig,
    metrics: Option<Metrics>,
    seed: Option<u64>,
}

impl<L: Lock> Elector<L> {
    /// An election on `lock` with `config`, which is validated here.
    pub fn new(lock: L, config: ElectionConfig) -> Result<Self, ConfigError> {
        config.validate()?;
        Ok(Self {
            lock: Arc::new(lock),
            config,
            metrics: None,
            seed: None,
        })
    }

    /// Reports to these metrics (see [`Metrics`]).
    #[must_use]
    pub fn metrics(mut self, metrics: Metrics) -> Self {
        self.metrics = Some(metrics);
        self
    }

    /// Seeds the jitter so that simulations replay exactly. Leave it unset otherwise.
    #[must_use]
    pub fn jitter_seed(mut self, seed: u64) -> Self {
        self.seed = Some(seed);
        self
    }

    /// Starts the election on the current tokio runtime and returns its handle.
    /// Dropping the handle (or calling [`ElectionHandle::shutdown`]) ends it.
    pub fn spawn(self) -> ElectionHandle {
        let shutdown = CancellationToken::new();
        let name = self.lock.describe();
        let (leader_tx, leader_rx) = watch::channel(None);
        let (term_tx, term_rx) = watch::channel(None);
        let (status_tx, status_rx) = watch::channel(Status::default());
        if let Some(m) = &self.metrics {
            m.init(&name);
        }
        let span = info_span!("leader_election", lease = %name, identity = %self.config.identity);
        let engine = Engine {
            rng: match self.seed {
                Some(seed) => SmallRng::seed_from_u64(seed),
                None => SmallRng::from_os_rng(),
            },
            lock: self.lock,
            config: self.config,
            metrics: self.metrics,
            name,
            observed: None,
            observed_lease: None,
            pending_take: None,
            watch_missed_a_write: false,
            watch_mode: WatchMode::On,
            leader: leader_tx,
            term: term_tx,
            status: status_tx,
        };
        let task = tokio::spawn(engine.run(shutdown.clone()).instrument(span));
        ElectionHandle::new(shutdown, task, leader_rx, term_rx, status_rx)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum WatchMode {
    On,
    /// Watching failed with a fatal error (e.g. RBAC lacks `watch`): poll instead.
    FellBack,
}

/// The lease was taken: our record and when the taking write was sent.
struct Acquired {
    current: Versioned,
    sent_at: Instant,
}

/// How a term ended.
enum TermEnd {
    Lost(String),
    Shutdown,
    Fatal(ElectionError),
}

/// Why a renewal failed.
enum RenewError {
    /// Someone else holds the lease now, or it is gone.
    Lost(String),
    Lock(LockError),
}

struct Engine<L> {
    lock: Arc<L>,
    config: ElectionConfig,
    metrics: Option<Metrics>,
    name: String,
    rng: SmallRng,
    observed: Option<Observed>,
    /// The Lease object behind `observed`, kept so updates preserve its metadata.
    observed_lease: Option<Arc<Lease>>,
    /// A taking write whose answer was lost, and when it was sent.
    pending_take: Option<(LeaderRecord, Instant)>,
    /// An update based on what the watch showed conflicted: the watch is behind.
    watch_missed_a_write: bool,
    watch_mode: WatchMode,
    leader: watch::Sender<Option<String>>,
    term: watch::Sender<Option<Term>>,
    status: watch::Sender<Status>,
}

type Events = BoxStream<'static, Result<LockEvent, LockError>>;

impl<L: Lock> Engine<L> {
    async fn run(mut self, shutdown: CancellationToken) -> Result<(), ElectionError> {
        let result = self.elect(&shutdown).await;
        self.leader
            .send_if_modified(|leader| leader.take().is_some());
        if let Err(e) = &result {
            // Returned through `join()`; whoever gets it reports it.
            debug!(error = %e, "leader election stopped");
        }
        result
    }

    async fn elect(&mut self, shutdown: &CancellationToken) -> Result<(), ElectionError> {
        loop {
            let Some(acquired) = self.campaign(shutdown).await? else {
                return Ok(());
            };
            let token = acquired.current.record.lease_transitions;
            if Instant::now() >= acquired.sent_at + self.config.renew_deadline {
                // The taking write was answered too late to lead safely on it.
                warn!(
                    term = token,
                    "the lease was taken but the answer came after the renew deadline; not leading"
                );
                continue;
            }
            let (end, mut control) = self
                .lead(acquired, shutdown)
                .instrument(info_span!("term", term = token))
                .await;
            // Take the term off the channel before cancelling it, so that nobody is
            // handed a term that has already ended.
            self.term.send_replace(None);
            control.end();
            self.set_leading(false);
            let announced = self.announce(false);
            match end {
                TermEnd::Lost(reason) => {
                    warn!(%reason, term = token, "stopped leading");
                    self.observed = None;
                    self.publish();
                    // Never campaign while the last term's work still runs.
                    let overdue = sleep(self.config.shutdown_grace);
                    tokio::pin!(overdue);
                    loop {
                        tokio::select! {
                            biased;
                            _ = shutdown.cancelled() => return Ok(()),
                            () = control.work_stopped() => break,
                            () = &mut overdue, if !self.status.borrow().work_overdue => {
                                warn!(
                                    grace = ?self.config.shutdown_grace,
                                    "the last term's work has not dropped its Term; not campaigning until it does"
                                );
                                self.status.send_modify(|s| s.work_overdue = true);
                            }
                        }
                    }
                    self.status.send_modify(|s| s.work_overdue = false);
                }
                TermEnd::Shutdown => {
                    info!(term = token, "shutting down: waiting for the work to stop");
                    let stopped = timeout(self.config.shutdown_grace, control.work_stopped())
                        .await
                        .is_ok();
                    if !stopped {
                        warn!(
                            grace = ?self.config.shutdown_grace,
                            "the work did not stop in time: not releasing; the lease will expire"
                        );
                    } else if self.config.release_on_cancel {
                        self.release(token).await;
                    }
                    // Let the "stopped leading" event out before the process exits.
                    let _ = announced.await;
                    return Ok(());
                }
                TermEnd::Fatal(e) => {
                    let _ = timeout(self.config.shutdown_grace, control.work_stopped()).await;
                    return Err(e);
                }
            }
        }
    }

    // ---- follower ----------------------------------------------------------------

    /// Campaigns until the lease is ours (`Some`) or shutdown (`None`).
    async fn campaign(
        &mut self,
        shutdown: &CancellationToken,
    ) -> Result<Option<Acquired>, ElectionError> {
        let mut events: Option<Events> = None;
        let mut watch_opened = Instant::now();
        // Watches that failed or ended soon after opening, in a row.
        let mut short_watches = 0u32;
        // What to do next: read the lock first (a GET), or act on what we observed.
        let mut attempt = Some(Read::Get);
        let mut retry_at: Option<Instant> = None;
        loop {
            if let Some(read) = attempt.take() {
                retry_at = None;
                let result = tokio::select! {
                    biased;
                    _ = shutdown.cancelled() => return Ok(None),
                    r = self.try_acquire(read) => r,
                };
                match result {
                    Ok(Some(acquired)) => return Ok(Some(acquired)),
                    Ok(None) => {
                        if !self.watching() {
                            retry_at = Some(Instant::now() + self.jitter(self.config.retry_period));
                        }
                    }
                    Err(AcquireError::Takeover(e)) => return Err(e.into()),
                    Err(AcquireError::Lock(e)) if e.is_fatal() => return Err(e.into()),
                    Err(AcquireError::Lock(e)) => {
                        self.note_error("acquire", &e);
                        retry_at = Some(Instant::now() + self.jitter(self.config.retry_period));
                    }
                }
                if std::mem::take(&mut self.watch_missed_a_write) {
                    // The watch did not show a write that happened: start it again.
                    debug!("the watch missed a write; re-watching");
                    events = None;
                }
                self.publish();
            }

            if self.watching()
                && events.is_none()
                && let Some(version) = self.observed.as_ref().map(|o| o.version.clone())
            {
                match self.bounded(None, self.lock.watch(&version)).await {
                    Ok(stream) => {
                        debug!(%version, "watching the lease");
                        events = Some(stream);
                        watch_opened = Instant::now();
                        self.status.send_modify(|s| s.watching = true);
                    }
                    Err(e) => self.watch_failed(&e, &mut retry_at),
                }
            }

            // An expiry already past is not a reason to hurry: retry_at paces retries.
            let now = Instant::now();
            let expiry = self
                .observed
                .as_ref()
                .filter(|o| o.record.holder().is_some())
                .map(|o| o.expires_at(self.config.lease_duration, self.config.max_record_duration))
                .filter(|&e| e > now);
            let wake = match (expiry, retry_at) {
                (Some(a), Some(b)) => a.min(b),
                (Some(a), None) => a,
                (None, Some(b)) => b,
                // Nothing to wait for but a watch: still re-read now and then.
                (None, None) => now + self.jitter(self.config.retry_period),
            };

            tokio::select! {
                biased;
                _ = shutdown.cancelled() => return Ok(None),
                event = next_event(&mut events) => match event {
                    Some(Ok(LockEvent::Changed(v))) => {
                        short_watches = 0;
                        self.observe(v);
                        if !self.is_held(Instant::now()) || self.is_pending_take() {
                            // Released (or our own lost reply): act at once on it.
                            attempt = Some(Read::Observed);
                        }
                        self.publish();
                    }
                    Some(Ok(LockEvent::Deleted)) => {
                        self.observed = None;
                        events = None;
                        attempt = Some(Read::Get);
                    }
                    ended => {
                        // The watch failed or the server ended it. A long-lived watch is
                        // simply renewed; one that keeps ending at once is paced, and
                        // after a few in a row we poll instead.
                        events = None;
                        self.status.send_modify(|s| s.watching = false);
                        if let Some(Err(e)) = &ended {
                            self.watch_failed(e, &mut retry_at);
                        }
                        if watch_opened.elapsed() >= self.config.retry_period {
                            short_watches = 0;
                            attempt = Some(Read::Get);
                        } else {
                            short_watches += 1;
                            if short_watches >= 3 && self.watch_mode == WatchMode::On {
                                warn!("the watch keeps ending at once; falling back to polling every retry period");
                                self.watch_mode = WatchMode::FellBack;
                            }
                            if retry_at.is_none() {
                                retry_at = Some(Instant::now() + self.jitter(self.config.retry_period));
                            }
                        }
                    }
                },
                () = sleep_until(wake) => {
                    // At the expiry instant the watch has shown us every renewal, so the
                    // observed version is current; without a watch, read it again.
                    attempt = Some(if self.watching() && events.is_some() { Read::Observed } else { Read::Get });
                }
            }
        }
    }

    fn watching(&self) -> bool {
        self.config.watch && self.watch_mode == WatchMode::On
    }

    fn watch_failed(&mut self, e: &LockError, retry_at: &mut Option<Instant>) {
        if e.is_fatal() {
            warn!(error = %e, "cannot watch the lease; falling back to polling every retry period");
            self.watch_mode = WatchMode::FellBack;
            self.status.send_modify(|s| s.watching = false);
        } else {
            self.note_error("watch", e);
        }
        if retry_at.is_none() {
            *retry_at = Some(Instant::now() + self.jitter(self.config.retry_period));
        }
    }

    /// One attempt to take the lease. `Ok(None)`: someone else validly holds it.
    async fn try_acquire(&mut self, read: Read) -> Result<Option<Acquired>, AcquireError> {
        let mut read = read;
        loop {
            if read == Read::Get || self.observed.is_none() {
                match self.bounded(None, self.lock.get()).await? {
                    Some(v) => self.observe(v),
                    None => return self.try_create().await,
                }
            }
            if let Some(acquired) = self.landed_take() {
                return Ok(Some(acquired));
            }
            if self.is_held(Instant::now()) {
                return Ok(None);
            }
            let Some(observed) = self.observed.clone() else {
                continue;
            };
            let current = Versioned {
                record: observed.record.clone(),
                version: observed.version.clone(),
                lease: self.observed_lease.clone(),
            };
            let record = self.taking_record(current.record.next_transitions()?);
            let sent_at = Instant::now();
            let limit = Some(sent_at + self.config.renew_deadline);
            match self
                .bounded(limit, self.lock.update(&current, &record))
                .await
            {
                Ok(v) => {
                    self.pending_take = None;
                    self.observe(v.clone());
                    return Ok(Some(Acquired {
                        current: v,
                        sent_at,
                    }));
                }
                Err(LockError::Conflict) if read == Read::Observed => {
                    // Someone wrote after what the watch showed: the watch is behind.
                    self.count_error(&LockError::Conflict);
                    self.watch_missed_a_write = true;
                    read = Read::Get;
                }
                Err(LockError::Conflict) => {
                    // Lost the race; the winner's record arrives by watch or next read.
                    self.count_error(&LockError::Conflict);
                    return Ok(None);
                }
                Err(LockError::NotFound) => return self.try_create().await,
                Err(e) => {
                    self.remember_take(&e, record, sent_at);
                    return Err(e.into());
                }
            }
        }
    }

    async fn try_create(&mut self) -> Result<Option<Acquired>, AcquireError> {
        let record = self.taking_record(0);
        let sent_at = Instant::now();
        let limit = Some(sent_at + self.config.renew_deadline);
        match self.bounded(limit, self.lock.create(&record)).await {
            Ok(v) => {
                self.pending_take = None;
                self.observe(v.clone());
                Ok(Some(Acquired {
                    current: v,
                    sent_at,
                }))
            }
            Err(LockError::AlreadyExists) => {
                self.count_error(&LockError::AlreadyExists);
                self.observed = None;
                Ok(None)
            }
            Err(e) => {
                self.remember_take(&e, record, sent_at);
                Err(e.into())
            }
        }
    }

    /// The record that starts a term: us, now, with `transitions`. client-go's
    /// non-coordinated writes clear `preferredHolder` and `strategy`; so do we.
    fn taking_record(&self, transitions: i32) -> LeaderRecord {
        let at = now_micros();
        LeaderRecord {
            holder_identity: self.config.identity.clone(),
            lease_duration_seconds: Some(self.config.lease_duration_seconds()),
            acquire_time: Some(at),
            renew_time: Some(at),
            lease_transitions: transitions,
            preferred_holder: None,
            strategy: None,
        }
    }

    /// A taking write whose answer we did not get may still have landed: remember it,
    /// so that finding our own record later starts the term instead of waiting for it
    /// to expire like anyone else's.
    fn remember_take(&mut self, e: &LockError, record: LeaderRecord, sent_at: Instant) {
        if !e.is_fatal() {
            self.pending_take = Some((record, sent_at));
        }
    }

    fn is_pending_take(&self) -> bool {
        matches!((&self.pending_take, &self.observed), (Some((r, _)), Some(o)) if *r == o.record)
    }

    /// The term our unanswered taking write started, if the observed record is that write.
    fn landed_take(&mut self) -> Option<Acquired> {
        if !self.is_pending_take() {
            return None;
        }
        let (_, sent_at) = self.pending_take.take()?;
        let observed = self.observed.as_ref()?;
        info!("our taking write landed although its answer was lost");
        Some(Acquired {
            current: Versioned {
                record: observed.record.clone(),
                version: observed.version.clone(),
                lease: self.observed_lease.clone(),
            },
            sent_at,
        })
    }

    // ---- leader --------------------------------------------------------------------

    async fn lead(
        &mut self,
        acquired: Acquired,
        shutdown: &CancellationToken,
    ) -> (TermEnd, TermControl) {
        let Acquired {
            mut current,
            sent_at,
        } = acquired;
        let token = current.record.lease_transitions;
        let mut deadline = sent_at + self.config.renew_deadline;
        let control = TermControl::new(
            TermInfo {
                identity: self.config.identity.clone(),
                lock: self.name.clone(),
                fencing_token: i64::from(token),
                started_at: sent_at,
            },
            deadline,
        );
        info!(term = token, "became leader");
        self.term.send_replace(control.term());
        self.status.send_modify(|s| {
            s.term = Some(TermInfo::clone(&control.info));
            s.last_renewed = Some(sent_at);
        });
        self.set_leading(true);
        self.publish();
        drop(self.announce(true));

        let mut next = sent_at + self.config.retry_period;
        loop {
            tokio::select! {
                biased;
                _ = shutdown.cancelled() => return (TermEnd::Shutdown, control),
                () = sleep_until(deadline) => return (TermEnd::Lost(format!("no successful renewal within the renew deadline ({:?})", self.config.renew_deadline)), control),
                () = sleep_until(next) => {}
            }
            let sent = Instant::now();
            let renewed = tokio::select! {
                biased;
                _ = shutdown.cancelled() => return (TermEnd::Shutdown, control),
                () = sleep_until(deadline) => return (TermEnd::Lost(format!("no successful renewal within the renew deadline ({:?})", self.config.renew_deadline)), control),
                r = self.renew(&current, token, deadline) => r,
            };
            match renewed {
                Ok(v) => {
                    current = v;
                    deadline = sent + self.config.renew_deadline;
                    control.set_deadline(deadline);
                    next = sent + self.config.retry_period;
                    if let Some(m) = &self.metrics {
                        m.renewed(&self.name, sent.elapsed().as_secs_f64());
                    }
                    self.status.send_modify(|s| {
                        s.last_renewed = Some(sent);
                        s.last_error = None;
                    });
                }
                Err(RenewError::Lost(why)) => return (TermEnd::Lost(why), control),
                Err(RenewError::Lock(e)) if e.is_fatal() => {
                    return (TermEnd::Fatal(e.into()), control);
                }
                Err(RenewError::Lock(e)) => {
                    self.note_error("renew", &e);
                    next = Instant::now() + self.config.retry_period;
                }
            }
        }
    }

    /// Renews: one update on the cached version; if that fails, read and update again
    /// (client-go's slow path) as long as the lease is still this term's.
    async fn renew(
        &mut self,
        current: &Versioned,
        token: i32,
        deadline: Instant,
    ) -> Result<Versioned, RenewError> {
        let identity = self.config.identity.clone();
        let seconds = self.config.lease_duration_seconds();
        let renewed = |from: &LeaderRecord| LeaderRecord {
            holder_identity: identity.clone(),
            lease_duration_seconds: Some(seconds),
            acquire_time: from.acquire_time,
            renew_time: Some(later_than(from.renew_time)),
            lease_transitions: token,
            // client-go's non-coordinated writes clear both.
            preferred_holder: None,
            strategy: None,
        };
        let record = renewed(&current.record);
        match self
            .bounded(Some(deadline), self.lock.update(current, &record))
            .await
        {
            Ok(v) => {
                self.observe(v.clone());
                return Ok(v);
            }
            Err(e) if e.is_fatal() => return Err(RenewError::Lock(e)),
            Err(e) => {
                debug!(error = %e, "fast-path renewal failed; reading the lease");
                self.count_error(&e);
            }
        }
        if let Some(m) = &self.metrics {
            m.slowpath(&self.name);
        }
        let fresh = match self.bounded(Some(deadline), self.lock.get()).await {
            Ok(Some(v)) => v,
            Ok(None) => return Err(RenewError::Lost("the lease was deleted".into())),
            Err(e) => return Err(RenewError::Lock(e)),
        };
        self.observe(fresh.clone());
        if !self.is_ours(&fresh.record, token) {
            let holder = fresh.record.holder().unwrap_or("nobody").to_owned();
            return Err(RenewError::Lost(format!(
                "the lease is now held by {holder}"
            )));
        }
        let record = renewed(&fresh.record);
        match self
            .bounded(Some(deadline), self.lock.update(&fresh, &record))
            .await
        {
            Ok(v) => {
                self.observe(v.clone());
                Ok(v)
            }
            Err(e) => Err(RenewError::Lock(e)),
        }
    }

    /// Whether `record` belongs to this process's term `token`. The transitions count
    /// tells our term from an earlier one under the same identity.
    fn is_ours(&self, record: &LeaderRecord, token: i32) -> bool {
        record.holder_identity == self.config.identity && record.lease_transitions == token
    }

    /// Gives the lease up after the work stopped: only if a fresh read shows it is
    /// still this term's; holder "", duration 1 s, transitions kept; bounded in time.
    async fn release(&mut self, token: i32) {
        let until = Instant::now() + self.config.renew_deadline;
        loop {
            if Instant::now() >= until {
                warn!("could not release the lease in time; it will expire");
                return;
            }
            let attempt: Result<bool, LockError> = async {
                let Some(fresh) = self.bounded(Some(until), self.lock.get()).await? else {
                    return Ok(false);
                };
                if !self.is_ours(&fresh.record, token) {
                    return Ok(false);
                }
                let at = now_micros();
                let record = LeaderRecord {
                    holder_identity: String::new(),
                    lease_duration_seconds: Some(1),
                    acquire_time: Some(at),
                    renew_time: Some(at),
                    lease_transitions: fresh.record.lease_transitions,
                    preferred_holder: None,
                    strategy: None,
                };
                let v = self
                    .bounded(Some(until), self.lock.update(&fresh, &record))
                    .await?;
                self.observe(v);
                Ok(true)
            }
            .await;
            match attempt {
                Ok(true) => {
                    info!(term = token, "released the lease");
                    self.publish();
                    return;
                }
                Ok(false) => {
                    debug!("the lease is no longer ours; nothing to release");
                    return;
                }
                Err(LockError::Conflict) => continue,
                Err(e) if e.is_fatal() => {
                    warn!(error = %e, "cannot release the lease");
                    return;
                }
                Err(e) => {
                    self.note_error("release", &e);
                    let pause = (self.config.retry_period / 4)
                        .min(until.saturating_duration_since(Instant::now()));
                    tokio::time::sleep(pause).await;
                }
            }
        }
    }

    // ---- shared helpers ------------------------------------------------------------

    /// Runs one lock call with a time limit: the request timeout, or less if `deadline`
    /// comes sooner.
    async fn bounded<T>(
        &self,
        deadline: Option<Instant>,
        call: impl Future<Output = Result<T, LockError>>,
    ) -> Result<T, LockError> {
        let mut limit = self.config.request_timeout;
        if let Some(d) = deadline {
            limit = limit.min(d.saturating_duration_since(Instant::now()));
        }
        match timeout(limit, call).await {
            Ok(r) => r,
            Err(_) => Err(LockError::Timeout(limit)),
        }
    }

    /// Records what we saw. As in client-go, the observation time resets only when the
    /// record itself changes (every renewal changes `renewTime`), so edits to labels or
    /// annotations do not keep a dead holder's lease alive.
    fn observe(&mut self, v: Versioned) {
        let now = Instant::now();
        let observed_at = match &self.observed {
            Some(o) if is_older(&v.version, &o.version) => return,
            Some(o) if o.record == v.record => o.observed_at,
            _ => now,
        };
        if self
            .pending_take
            .as_ref()
            .is_some_and(|(r, _)| *r != v.record)
        {
            // Someone else's write came after ours: ours is no longer pending.
            self.pending_take = None;
        }
        self.observed_lease = v.lease;
        self.observed = Some(Observed {
            record: v.record,
            version: v.version,
            observed_at,
        });
        let observed = self.observed.clone();
        self.status.send_modify(|s| s.observed = observed);
    }

    fn is_held(&self, now: Instant) -> bool {
        self.observed.as_ref().is_some_and(|o| {
            o.is_held_at(
                now,
                self.config.lease_duration,
                self.config.max_record_duration,
            )
        })
    }

    /// Publishes who leads, deduplicated: us while we hold a term, else the observed
    /// holder while its record is valid, else nobody.
    fn publish(&self) {
        let leader = if self.term.borrow().is_some() {
            Some(self.config.identity.clone())
        } else if self.is_held(Instant::now()) {
            self.observed
                .as_ref()
                .and_then(|o| o.record.holder().map(str::to_owned))
        } else {
            None
        };
        self.leader.send_if_modified(|current| {
            if *current == leader {
                return false;
            }
            info!(leader = leader.as_deref().unwrap_or("<none>"), "new leader");
            *current = leader;
            true
        });
    }

    fn set_leading(&self, leading: bool) {
        if let Some(m) = &self.metrics {
            m.set_leading(&self.name, leading);
        }
        if !leading {
            self.status.send_modify(|s| s.term = None);
        }
    }

    /// Announces a leadership change in the background (bounded in time), so that a
    /// slow Events API never delays the election.
    fn announce(&self, leading: bool) -> tokio::task::JoinHandle<()> {
        let lock = self.lock.clone();
        let identity = self.config.identity.clone();
        let limit = self.config.request_timeout;
        tokio::spawn(async move {
            let _ = timeout(limit, lock.announce(&identity, leading)).await;
        })
    }

    fn count_error(&self, e: &LockError) {
        if let Some(m) = &self.metrics {
            m.api_error(&self.name, e.kind());
        }
    }

    fn note_error(&self, what: &str, e: &LockError) {
        self.count_error(e);
        warn!(error = %e, "{what} failed");
        let msg = format!("{what}: {e}");
        self.status.send_modify(|s| s.last_error = Some(msg));
    }

    fn jitter(&mut self, d: Duration) -> Duration {
        d.mul_f64(1.0 + self.rng.random::<f64>() * 0.2)
    }
}

/// Now at MicroTime resolution, but strictly after `previous`: every renewal must
/// change the record, since followers reset their expiry clock only on a change.
fn later_than(previous: Option<jiff::Timestamp>) -> jiff::Timestamp {
    let now = now_micros();
    match previous {
        Some(p) if p >= now => p
            .checked_add(jiff::SignedDuration::from_micros(1))
            .unwrap_or(now),
        _ => now,
    }
}

/// Whether version `a` is older than `b`. Versions are opaque, but the API server's
/// are integers in practice; when both parse, a late, older event is ignored.
fn is_older(a: &str, b: &str) -> bool {
    matches!((a.parse::<u64>(), b.parse::<u64>()), (Ok(a), Ok(b)) if a < b)
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Read {
    /// Read the lock first.
    Get,
    /// Act on the observed record (just delivered by the watch).
    Observed,
}

enum AcquireError {
    Lock(LockError),
    Takeover(TakeoverError),
}

impl From<LockError> for AcquireError {
    fn from(e: LockError) -> Self {
        AcquireError::Lock(e)
    }
}

impl From<TakeoverError> for AcquireError {
    fn from(e: TakeoverError) -> Self {
        AcquireError::Takeover(e)
    }
}

async fn next_event(events: &mut Option<Events>) -> Option<Result<LockEvent, LockError>> {
    match events {
        Some(stream) => stream.next().await,
        None => std::future::pending().await,
    }
}
