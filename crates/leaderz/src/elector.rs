//! The tokio driver: carries out the [`Machine`]'s actions and feeds it their outcomes.
//!
//! Every decision lives in [`crate::machine`]; this module only does I/O. One task per
//! elector runs [`drive`]: it sends the machine's lock requests (each bounded by the
//! deadline the machine gives it), keeps the watch stream, hands out and ends [`Term`]s,
//! sleeps until the machine's next timer, and publishes who leads and the status.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use futures::stream::BoxStream;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::{Instant, sleep_until, timeout, timeout_at};
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, info, info_span};

use crate::client::{Priority, Ticket, TicketState};
use crate::config::{ConfigError, ElectionConfig};
use crate::handle::{Command, ElectionHandle, Status};
use crate::lock::{Lock, LockError, LockEvent, Versioned};
use crate::machine::{Action, Answer, Input, Machine, Op, Request};
use crate::metrics::Metrics;
use crate::term::{Term, TermControl, TermInfo};

/// Why an election stopped with an error.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ElectionError {
    /// The configuration was refused.
    #[error("invalid election config: {0}")]
    Config(#[from] ConfigError),
    /// The lock refused us as the election started, in a way retrying cannot fix (RBAC,
    /// credentials, a missing namespace). Refusals after the start are ridden out.
    #[error(transparent)]
    Lock(#[from] LockError),
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
    observed: Option<(Versioned, Instant)>,
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
            observed: None,
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

    /// Starts from `v`, which this process first saw in this form at `observed_at`
    /// (see [`Machine::with_observed`]). Crate-only: the shard set passes what its own
    /// watch of the shard Leases saw; an instant from anywhere else could end a term
    /// early.
    #[must_use]
    pub(crate) fn observed(mut self, v: Versioned, observed_at: Instant) -> Self {
        self.observed = Some((v, observed_at));
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
        // futures' channel: tokio's allocates a block of 32 slots at once (1.5 KiB per
        // election, for a command that rarely comes).
        let (command_tx, command_rx) = futures::channel::mpsc::unbounded();
        let span = info_span!("leader_election", lease = %name, identity = %self.config.identity);
        let mut machine = Machine::build(self.config.clone(), name, Instant::now());
        if let Some(seed) = self.seed {
            machine = machine.with_seed(seed);
        }
        if let Some(metrics) = self.metrics {
            machine = machine.with_metrics(metrics);
        }
        if let Some((v, at)) = self.observed {
            machine = machine.with_observed(v, at);
        } else if let Some(at) = self.lock.known_absent() {
            machine = machine.with_absent(at);
        }
        let driver = Driver {
            lock: self.lock,
            config: self.config,
            leader: leader_tx,
            term: term_tx,
            status: status_tx,
        };
        // Boxed: an async fn keeps its arguments twice (as arguments and as locals), and
        // the machine is 2.1 KiB.
        let task = tokio::spawn(
            Box::new(driver)
                .drive(Box::new(machine), shutdown.clone(), command_rx)
                .instrument(span),
        );
        ElectionHandle::new(shutdown, task, leader_rx, term_rx, status_rx, command_tx)
    }
}

type Pending<T> = Pin<Box<dyn Future<Output = T> + Send>>;
/// What became of a lock request.
#[allow(clippy::large_enum_variant)] // returned once, never stored
enum Outcome {
    /// Its answer, and when it left the process if the client said so.
    Answered(Result<Answer, LockError>, Option<Instant>),
    /// Never left: it still waited for its place at its `send_by` or its deadline, or
    /// was refused its place for being past `send_by`.
    Unsent,
}
type Events = BoxStream<'static, Result<LockEvent, LockError>>;

enum WatchSlot {
    Closed,
    Opening(Pending<Result<Events, LockError>>),
    Open(Events),
}

struct Driver<L> {
    lock: Arc<L>,
    config: ElectionConfig,
    leader: watch::Sender<Option<String>>,
    term: watch::Sender<Option<Term>>,
    status: watch::Sender<Status>,
}

impl<L: Lock> Driver<L> {
    async fn drive(
        self: Box<Self>,
        mut m: Box<Machine>,
        shutdown: CancellationToken,
        mut commands: futures::channel::mpsc::UnboundedReceiver<Command>,
    ) -> Result<(), crate::ElectionError> {
        let mut request: Option<Pending<Outcome>> = None;
        // What the client says of the outstanding request (sent yet, or waiting).
        let mut ticket: Option<Arc<Ticket>> = None;
        let mut watch = WatchSlot::Closed;
        // The current term, and a term that ended but whose work has not stopped yet.
        let mut term: Option<TermControl> = None;
        let mut ended: Option<TermControl> = None;
        let mut announcement: Option<JoinHandle<()>> = None;
        let mut shutdown_seen = false;
        // Coordinated mode: the LeaseCandidate, kept until the election stops (or this
        // task is aborted: the guard stops it then too).
        let candidate_stop = CancellationToken::new();
        let _withdraw_on_abort = candidate_stop.clone().drop_guard();
        let mut candidate: Option<JoinHandle<Result<(), LockError>>> =
            self.config.coordinated.clone().map(|c| {
                let lock = self.lock.clone();
                let identity = self.config.identity.clone();
                let stop = candidate_stop.clone();
                tokio::spawn(async move { lock.keep_candidate(&identity, &c, stop).await })
            });
        let mut stopped = None;
        loop {
            while let Some(action) = m.poll_action() {
                match action {
                    Action::Send(req) => {
                        let t = Ticket::deferring(req.priority);
                        request = Some(self.execute(req, t.clone()));
                        ticket = Some(t);
                    }
                    Action::Watch {
                        after,
                        timeout,
                        open_by,
                    } => {
                        let lock = self.lock.clone();
                        watch = WatchSlot::Opening(Box::pin(async move {
                            let limit = open_by.saturating_duration_since(Instant::now());
                            match timeout_at(open_by, lock.watch(&after, timeout)).await {
                                Ok(r) => r,
                                Err(_) => Err(LockError::Timeout(limit)),
                            }
                        }));
                    }
                    Action::Unwatch => watch = WatchSlot::Closed,
                    Action::StartTerm {
                        token,
                        started_at,
                        deadline,
                    } => {
                        let control = TermControl::new(
                            TermInfo {
                                identity: self.config.identity.clone(),
                                lock: self.lock.describe(),
                                fencing_token: i64::from(token),
                                started_at,
                            },
                            deadline,
                        );
                        self.term.send_replace(control.term());
                        term = Some(control);
                    }
                    Action::ExtendTerm(deadline) => {
                        if let Some(t) = &term {
                            t.set_deadline(deadline);
                        }
                    }
                    Action::EndTerm => {
                        // Take the term off the channel before cancelling it, so that
                        // nobody is handed a term that has already ended.
                        self.term.send_replace(None);
                        if let Some(mut t) = term.take() {
                            t.end();
                            ended = Some(t);
                        }
                        // A renewal of the ended term that still waits for a place in
                        // the client (under load; deferred, or queued) is dropped unsent,
                        // so that the release need not wait for it to go out and come
                        // back.
                        withdraw_unsent(&mut request, &mut ticket, &mut m);
                    }
                    Action::Withdraw => withdraw_unsent(&mut request, &mut ticket, &mut m),
                    Action::Announce { leading } => {
                        let lock = self.lock.clone();
                        let identity = self.config.identity.clone();
                        let limit = self.config.request_timeout;
                        // Deferred while the client is busy (see `execute`), so that a
                        // thousand announcements waiting for a place are not held built.
                        let ticket = Ticket::deferring(Priority::Background);
                        announcement = Some(tokio::spawn(async move {
                            let announce = async {
                                let attempt =
                                    || Box::pin(ticket.scope(lock.announce(&identity, leading)));
                                attempt().await;
                                if ticket.deferred() && ticket.admitted().await.is_ok() {
                                    attempt().await;
                                }
                            };
                            let _ = timeout(limit, announce).await;
                        }));
                    }
                    Action::Stop(result) => {
                        stopped = Some(result);
                        break;
                    }
                }
            }
            // Out of the action loop first: an `Action` is 464 bytes, too much to keep
            // in every elector task's state for the awaits below.
            if let Some(result) = stopped {
                self.publish(&m);
                self.leader.send_if_modified(|l| l.take().is_some());
                // Withdraw the LeaseCandidate (bounded: it deletes with a timeout).
                candidate_stop.cancel();
                if let Some(c) = candidate.take() {
                    let _ = c.await;
                }
                // Let the "stopped leading" event out before the process exits.
                if let Some(a) = announcement {
                    let _ = a.await;
                }
                if let Err(e) = &result {
                    debug!(error = %e, "leader election stopped");
                }
                return result;
            }
            self.publish(&m);
            // A finished announcement's task is freed only with its handle: drop it (a
            // few KiB per election, which counts with thousands in a process).
            if announcement.as_ref().is_some_and(JoinHandle::is_finished) {
                announcement = None;
            }
            let wake = m.poll_timeout();
            let input = tokio::select! {
                biased;
                _ = shutdown.cancelled(), if !shutdown_seen => {
                    shutdown_seen = true;
                    Input::Shutdown
                }
                outcome = poll_pending(&mut request) => {
                    request = None;
                    ticket = None;
                    match outcome {
                        Outcome::Answered(reply, sent) => {
                            if let Some(at) = sent {
                                m.handle(Input::Sent(at), Instant::now());
                            }
                            Input::Reply(reply)
                        }
                        Outcome::Unsent => Input::Unsent,
                    }
                }
                input = next_watch(&mut watch) => input,
                Some(command) = commands.next() => {
                    match command {
                        Command::HandOver { to, reply } => {
                            let _ = reply.send(m.hand_over(to, Instant::now()));
                        }
                    }
                    continue;
                }
                () = work_stopped(&mut ended) => {
                    ended = None;
                    Input::WorkStopped
                }
                done = poll_task(&mut candidate) => {
                    candidate = None;
                    match done {
                        Ok(Ok(())) => continue,
                        Ok(Err(e)) => Input::Failed(e),
                        Err(e) => Input::Failed(LockError::Transport(Box::new(e))),
                    }
                }
                () = sleep_until_some(wake) => Input::Tick,
            };
            m.handle(input, Instant::now());
        }
    }

    /// A lock request, answered with `Timeout` when it has been in flight for its
    /// timeout or until its deadline; with when it left the process, if it did and the
    /// client said so. `Unsent` if it never left: still waiting for its place at its
    /// deadline, or at its `send_by` (see [`Request::send_by`]).
    ///
    /// When the client has no place for it at once, the request is not kept, built,
    /// while it waits (with 10 000 elections in a process that was most of its memory):
    /// the client fails it unsent, it waits for its place here, and is built again.
    fn execute(&self, req: Request, ticket: Arc<Ticket>) -> Pending<Outcome> {
        let lock = self.lock.clone();
        let Request {
            op,
            deadline,
            timeout,
            mut send_by,
            ..
        } = req;
        let fresh_for = self.config.retry_period;
        Box::pin(async move {
            ticket.begin();
            let start = Instant::now();
            if deadline <= start {
                // Too late already (a starved runtime): do not send what cannot be
                // answered in time, only to be cancelled.
                return Outcome::Answered(Err(LockError::Timeout(Duration::ZERO)), None);
            }
            // Each attempt is boxed: only one that is under way takes its memory.
            type Call<'a> = Pin<Box<dyn Future<Output = Result<Answer, LockError>> + Send + 'a>>;
            let attempt = || -> Call<'_> {
                Box::pin(ticket.scope(async {
                    match &op {
                        Op::Get => lock.get().await.map(Answer::Read),
                        Op::Create(record) => lock.create(record).await.map(Answer::Wrote),
                        Op::Update(current, record) => {
                            lock.update(current, record).await.map(Answer::Wrote)
                        }
                    }
                }))
            };
            let mut call = attempt();
            let mut limit = (start + timeout).min(deadline);
            ticket.set_send_by(send_by);
            let mut polled = false;
            loop {
                // At `send_by`, a request that has not left (not yet tried, or waiting for
                // its place; not one the client may have sent without telling) goes on
                // only while the lock knows the Lease absent as of a retry period ago or
                // later (a shared watch that has shown everything up to then).
                let now = Instant::now();
                if let Some(by) = send_by
                    && now >= by
                    && (!polled || ticket.state() == TicketState::Queued)
                {
                    match lock.known_absent().map(|t| t + fresh_for) {
                        Some(later) if later > now => {
                            send_by = Some(later);
                            ticket.set_send_by(send_by);
                        }
                        _ => return Outcome::Unsent,
                    }
                }
                // Until it has left, also wake at `send_by`.
                let wake = match send_by {
                    Some(by) if by > now && ticket.sent().is_none() => limit.min(by),
                    _ => limit,
                };
                tokio::select! {
                    biased;
                    r = &mut call => {
                        // Refused at its place for leaving too late: it never left.
                        if ticket.state() == TicketState::TooLate {
                            return Outcome::Unsent;
                        }
                        // Only if nothing left: a lock that sent again after it was
                        // deferred (against the contract) is not run a second time.
                        if r.is_err() && ticket.sent().is_none() && ticket.deferred() {
                            // The client had no place for it: wait for one, then send it.
                            call = Box::pin(async {
                                match ticket.admitted().await {
                                    Ok(()) => attempt().await,
                                    Err(e) => Err(LockError::Transport(Box::new(e))),
                                }
                            });
                            polled = true;
                            continue;
                        }
                        return Outcome::Answered(r, ticket.sent());
                    }
                    () = sleep_until(wake) => {}
                }
                polled = true;
                if Instant::now() < limit {
                    continue;
                }
                // Time spent waiting in the client to be sent does not count against
                // the timeout; the deadline bounds both. While it waits, look again a
                // timeout later, so that once it has left its timeout still ends on time.
                let next = match ticket.state() {
                    TicketState::Queued => (limit + timeout).min(deadline),
                    TicketState::Sent(at) => (at + timeout).min(deadline),
                    TicketState::Unseen | TicketState::TooLate => limit,
                };
                if next <= limit {
                    // Given up while it still waited for its place: it never left.
                    if ticket.state() == TicketState::Queued {
                        return Outcome::Unsent;
                    }
                    return Outcome::Answered(
                        Err(LockError::Timeout(limit - start)),
                        ticket.sent(),
                    );
                }
                limit = next;
            }
        })
    }

    /// Publishes who leads and the status, each only when it changed.
    fn publish(&self, m: &Machine) {
        let leader = m.leader(Instant::now()).map(str::to_owned);
        self.leader.send_if_modified(|current| {
            if *current == leader {
                return false;
            }
            info!(leader = leader.as_deref().unwrap_or("<none>"), "new leader");
            *current = leader;
            true
        });
        self.status.send_if_modified(|s| {
            if s == m.status() {
                return false;
            }
            s.clone_from(m.status());
            true
        });
    }
}

/// Drops the outstanding request if it has not left: not yet begun (built but not yet
/// polled), or waiting for a place in the client (queued, or deferred); and tells the
/// machine it was never sent.
fn withdraw_unsent(
    request: &mut Option<Pending<Outcome>>,
    ticket: &mut Option<Arc<Ticket>>,
    m: &mut Machine,
) {
    if request.is_some() && ticket.as_ref().is_some_and(|t| !t.may_have_left()) {
        *request = None;
        *ticket = None;
        m.handle(Input::Unsent, Instant::now());
    }
}

async fn poll_pending<T>(pending: &mut Option<Pending<T>>) -> T {
    match pending {
        Some(p) => p.await,
        None => std::future::pending().await,
    }
}

/// The next event of the watch: opened, an event, or its end.
async fn next_watch(slot: &mut WatchSlot) -> Input {
    match slot {
        WatchSlot::Closed => std::future::pending().await,
        WatchSlot::Opening(opening) => match opening.await {
            Ok(stream) => {
                *slot = WatchSlot::Open(stream);
                Input::WatchOpened(Ok(()))
            }
            Err(e) => {
                *slot = WatchSlot::Closed;
                Input::WatchOpened(Err(e))
            }
        },
        WatchSlot::Open(stream) => match stream.next().await {
            Some(Ok(event)) => Input::WatchEvent(event),
            Some(Err(e)) => {
                *slot = WatchSlot::Closed;
                Input::WatchEnded(Some(e))
            }
            None => {
                *slot = WatchSlot::Closed;
                Input::WatchEnded(None)
            }
        },
    }
}

async fn poll_task<T>(task: &mut Option<JoinHandle<T>>) -> Result<T, tokio::task::JoinError> {
    match task {
        Some(t) => t.await,
        None => std::future::pending().await,
    }
}

async fn work_stopped(ended: &mut Option<TermControl>) {
    match ended {
        Some(t) => t.work_stopped().await,
        None => std::future::pending().await,
    }
}

async fn sleep_until_some(at: Option<Instant>) {
    match at {
        Some(at) => sleep_until(at).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;
    use crate::client::Gate;
    use crate::lock::MemoryLock;
    use crate::record::LeaderRecord;

    /// A lock whose creates go through an admission gate (as a leaderz client's
    /// requests do), and that notes when each read and create was made.
    struct Gated {
        inner: MemoryLock,
        gate: Arc<Gate>,
        log: Log,
        /// Vouches that the Lease is absent as of now (as a shared watch that keeps
        /// showing every change does).
        vouch: bool,
    }

    impl Lock for Gated {
        async fn get(&self) -> Result<Option<Versioned>, LockError> {
            self.log.lock().unwrap().push(("get", Instant::now()));
            self.inner.get().await
        }

        async fn create(&self, record: &LeaderRecord) -> Result<Versioned, LockError> {
            let _permit = self.gate.enter().await.map_err(LockError::Transport)?;
            self.log.lock().unwrap().push(("create", Instant::now()));
            self.inner.create(record).await
        }

        async fn update(
            &self,
            current: &Versioned,
            record: &LeaderRecord,
        ) -> Result<Versioned, LockError> {
            self.inner.update(current, record).await
        }

        async fn watch(
            &self,
            version: &str,
            timeout: Duration,
        ) -> Result<BoxStream<'static, Result<LockEvent, LockError>>, LockError> {
            self.inner.watch(version, timeout).await
        }

        fn describe(&self) -> String {
            self.inner.describe()
        }

        fn known_absent(&self) -> Option<Instant> {
            (self.vouch && self.inner.peek().is_none()).then(Instant::now)
        }
    }

    type Log = Arc<Mutex<Vec<(&'static str, Instant)>>>;

    /// A gated lock on a Lease that does not exist, with the gate's one place held (drop
    /// the second item to free it), and its log.
    async fn full_gate(vouch: bool) -> (Gated, impl Sized, Log) {
        let gate = Gate::new(1);
        let held = gate.enter().await.unwrap();
        let log = Log::default();
        let lock = Gated {
            inner: MemoryLock::new("l"),
            gate,
            log: log.clone(),
            vouch,
        };
        (lock, held, log)
    }

    /// A create that waits in the client for longer than a retry period after the read
    /// that found the Lease absent is dropped unsent, and the Lease read again: what the
    /// read showed may no longer hold (created, led and deleted meanwhile).
    #[tokio::test(start_paused = true)]
    async fn a_create_held_in_the_client_past_its_read_s_freshness_reads_again() {
        let (lock, held, log) = full_gate(false).await;
        let config = ElectionConfig::new("a");
        let retry = config.retry_period;
        let handle = Elector::new(lock, config).unwrap().spawn();
        // The gate stays full for three and a half retry periods.
        tokio::time::sleep(retry * 7 / 2).await;
        assert!(!handle.is_leader());
        drop(held);
        let mut leader = handle.leader();
        tokio::time::timeout(retry * 3, leader.wait_for(|l| l.as_deref() == Some("a")))
            .await
            .expect("leads once the gate has room")
            .unwrap();
        let log = log.lock().unwrap().clone();
        let (create, created_at) = log.last().copied().unwrap();
        assert_eq!(create, "create", "{log:?}");
        let (_, read_at) = log[..log.len() - 1]
            .iter()
            .rev()
            .find(|(op, _)| *op == "get")
            .copied()
            .unwrap();
        assert!(
            created_at - read_at < retry,
            "created {:?} after the read that found it absent: {log:?}",
            created_at - read_at
        );
        assert_eq!(log.iter().filter(|(op, _)| *op == "create").count(), 1);
    }

    /// A lock that still vouches for the absence when the create has waited a retry
    /// period (a shared watch that has shown every change until now) keeps it waiting
    /// in its place: no read, one create.
    #[tokio::test(start_paused = true)]
    async fn a_create_waits_on_while_the_lock_vouches_for_the_absence() {
        let (lock, held, log) = full_gate(true).await;
        let config = ElectionConfig::new("a");
        let retry = config.retry_period;
        let handle = Elector::new(lock, config).unwrap().spawn();
        tokio::time::sleep(retry * 7 / 2).await;
        drop(held);
        let mut leader = handle.leader();
        tokio::time::timeout(retry, leader.wait_for(|l| l.as_deref() == Some("a")))
            .await
            .expect("leads once the gate has room")
            .unwrap();
        let ops: Vec<_> = log.lock().unwrap().iter().map(|(op, _)| *op).collect();
        assert_eq!(
            ops,
            ["create"],
            "created on the lock's word, without reading"
        );
    }

    /// A take still waiting for a place in the client at shutdown is dropped: the
    /// elector stops at once, without sending it (and then releasing what it took).
    #[tokio::test(start_paused = true)]
    async fn a_take_still_waiting_in_the_client_at_shutdown_is_not_sent() {
        let (lock, held, log) = full_gate(false).await;
        let handle = Elector::new(lock, ElectionConfig::new("a"))
            .unwrap()
            .spawn();
        tokio::time::sleep(Duration::from_millis(500)).await;
        let stopping = Instant::now();
        handle.shutdown_token().cancel();
        let mut handle = handle;
        tokio::time::timeout(Duration::from_secs(1), handle.join())
            .await
            .expect("stops at once")
            .unwrap();
        assert!(stopping.elapsed() < Duration::from_millis(100));
        drop(held);
        tokio::task::yield_now().await;
        let log = log.lock().unwrap().clone();
        assert!(log.iter().all(|(op, _)| *op == "get"), "{log:?}");
    }
}
