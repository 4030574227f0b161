//! Deterministic simulation of many candidates, each driven directly through the
//! election state machine (`leaderz::machine::Machine`): no runtime, no real time, and a
//! clock of its own for every candidate, running at its own rate.
//!
//! The world: one Lease (a compare-and-swap register with versions and watches), five
//! candidates with different lease durations (half of them with a renew interval longer
//! than their retry period), and every fault the model has — latency,
//! requests failing before or after they apply (lost answers, or a write that landed
//! answered with the conflict its client's retry met), hangs, writes landing long
//! after their caller gave up, refused requests (401/403 episodes), refused, ending and
//! stalling watches, requests that wait in the client before they are sent (an
//! admission queue under load: the elector is told when they left, and counts a write's
//! term from then), crashes and restarts, graceful stops with slow work, electors
//! paused while their work keeps running, Lease deletion, garbage written by an admin,
//! resourceVersions going backwards (an etcd restore), planned handovers requested to a
//! random candidate or to any, and a controller preferring another holder.
//!
//! Checked on every run:
//! - **no overlap**: the intervals in which each term's work may act (from the term's
//!   start until it is cancelled, its deadline passes on its own clock, or its process
//!   dies) never overlap, in global time — with clock rates within the documented bound
//!   `lease_duration / renew_deadline`;
//! - **rising tokens**: fencing tokens rise with every term;
//! - **deadlines**: every term's deadline is the send time (asked, or left the queue)
//!   of one of its process's writes that landed, plus `renew_deadline`; it is never extended after it passed; an elector
//!   that is not paused cancels its term no later than that deadline;
//! - **release after the work stopped**: a release is written only after that term's
//!   work dropped its term;
//! - **one request at a time**, and **liveness**: once faults heal, someone leads again
//!   within a bound, and exactly one leads at the end.
//!
//! `MSIM_SEED=n` replays one seed; `MSIM_SEEDS=n` sets how many run (default 300);
//! `MSIM_BASE=n` the first seed (default random).

#![allow(clippy::unwrap_used, clippy::disallowed_types)] // tests: a panic is the failure report

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use leaderz::machine::{Action, Answer, Input, Machine, Op, Request};
use leaderz::record::Handoff;
use leaderz::{ElectionConfig, LeaderRecord, LockError, LockEvent, Versioned};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use tokio::time::Instant;

type Ns = u64;
const MS: Ns = 1_000_000;
const SEC: Ns = 1_000_000_000;

fn ns(d: Duration) -> Ns {
    u64::try_from(d.as_nanos()).unwrap()
}

/// A candidate's clock: its local time is global time × rate.
#[derive(Clone, Copy, Debug)]
struct Clock {
    rate: f64,
}

impl Clock {
    fn local(self, g: Ns) -> Ns {
        (g as f64 * self.rate) as Ns
    }

    /// The first global instant at which local time has reached `l`.
    fn global(self, l: Ns) -> Ns {
        let mut g = (l as f64 / self.rate).ceil() as Ns;
        while self.local(g) < l {
            g += 1;
        }
        while g > 0 && self.local(g - 1) >= l {
            g -= 1;
        }
        g
    }
}

/// What can go wrong with one candidate's API calls.
#[derive(Clone, Debug, Default)]
struct Faults {
    max_latency: Ns,
    fail_before: f64,
    fail_after: f64,
    hang: bool,
    stall: f64,
    forbid_watch: bool,
    watch_ends: bool,
    stall_watch: bool,
    refuse: bool,
    /// Requests wait in the client up to this long before they are sent (a leaderz
    /// client's admission queue under load), and the elector is told when they left.
    max_queue: Ns,
}

#[derive(Debug)]
struct SimWatch {
    generation: u64,
    open: bool,
    after: String,
    last_delivery: Ns,
}

#[derive(Debug)]
struct Inflight {
    seq: u64,
    /// When it leaves the client's queue (global time).
    left_at: Ns,
}

/// When a request was sent (local time): when the elector asked, and when it left the
/// client's queue. A term may be counted from either.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
struct Sent {
    asked: Ns,
    left: Ns,
}

impl Sent {
    fn is(&self, t: Ns) -> bool {
        t == self.asked || t == self.left
    }
}

struct Node {
    identity: String,
    config: ElectionConfig,
    clock: Clock,
    machine: Option<Machine>,
    incarnation: u64,
    faults: Faults,
    inflight: Option<Inflight>,
    req_seq: u64,
    /// A request dropped while it waited in the client (`Action::Withdraw`, or an
    /// ended term's renewal): it never leaves.
    withdrawn: std::collections::HashSet<u64>,
    watch: Option<SimWatch>,
    watch_gen: u64,
    tick_gen: u64,
    paused_until: Option<Ns>,
    backlog: Vec<Input>,
    /// Feeding the backlog after a pause: the elector is catching up.
    catching_up: bool,
    term: Option<usize>,
    work_lag: Ns,
    /// (local send times, record) of this incarnation's writes that landed.
    landed: Vec<(Sent, LeaderRecord)>,
    /// Sent times of this incarnation's creates that landed, and the highest count it
    /// had seen when it sent them.
    created: Vec<(Sent, Option<i32>)>,
    /// The highest leaseTransitions this incarnation has seen, and what it was when
    /// each request was sent.
    max_seen: Option<i32>,
    max_seen_at: HashMap<Ns, Option<i32>>,
    /// This incarnation has seen the Lease (a process that never did re-creates a
    /// deleted Lease at once, a documented limit the scenario steers clear of).
    seen_lease: bool,
    /// The version of the last record fed to its machine.
    seen_version: Option<String>,
}

#[derive(Debug, Clone)]
struct TermRec {
    node: usize,
    incarnation: u64,
    token: i32,
    start: Ns,
    deadline_local: Ns,
    clock: Clock,
    cancelled: Option<Ns>,
    died: Option<Ns>,
    work_stopped: Option<Ns>,
    /// Started by re-creating a deleted Lease, and the highest count its process had
    /// seen before: the Lease's own count is gone with it, so the token can only rise
    /// above what that process saw (a documented limit).
    recreated: Option<Option<i32>>,
}

impl TermRec {
    /// When the work stops acting: cancelled, past its deadline on its own clock, or dead.
    fn act_end(&self) -> Ns {
        let mut end = self.clock.global(self.deadline_local);
        for t in [self.cancelled, self.died].into_iter().flatten() {
            end = end.min(t);
        }
        end
    }
}

#[derive(Debug)]
struct StoreWrite {
    at: Ns,
    by: Option<(usize, u64)>,
    record: Option<LeaderRecord>,
}

#[derive(Default)]
struct Store {
    current: Option<Versioned>,
    next: u64,
    writes: Vec<StoreWrite>,
    /// Versions handed out so far. After a restore versions go back, but never repeat:
    /// a restore that repeats them (etcd restored without `--bump-revision`) breaks
    /// compare-and-swap for every client, a documented limit.
    used: std::collections::HashSet<u64>,
}

impl Store {
    fn bump(&mut self) -> String {
        self.next += 1;
        while !self.used.insert(self.next) {
            self.next += 1;
        }
        self.next.to_string()
    }

    fn set(&mut self, at: Ns, by: Option<(usize, u64)>, record: Option<LeaderRecord>) {
        self.current = record.clone().map(|record| Versioned {
            record,
            version: self.bump(),
            lease: None,
        });
        self.writes.push(StoreWrite { at, by, record });
    }
}

#[allow(clippy::large_enum_variant)]
enum Ev {
    Tick {
        node: usize,
        inc: u64,
        generation: u64,
    },
    Apply {
        node: usize,
        inc: u64,
        seq: u64,
        op: Op,
        sent: Sent,
        reply_after: Option<(Ns, bool, Option<Ns>)>,
    },
    Reply {
        node: usize,
        inc: u64,
        seq: u64,
        result: Result<Answer, LockError>,
        /// When it left the client's queue, if it waited there (local time).
        left: Option<Ns>,
    },
    /// Dropped unsent at its `send_by`, still queued.
    Unsent {
        node: usize,
        inc: u64,
        seq: u64,
    },
    WatchOpened {
        node: usize,
        inc: u64,
        generation: u64,
        result: Result<(), LockError>,
    },
    WatchEvent {
        node: usize,
        inc: u64,
        generation: u64,
        event: LockEvent,
    },
    WatchEnd {
        node: usize,
        inc: u64,
        generation: u64,
    },
    WorkStop {
        node: usize,
        inc: u64,
        term: usize,
    },
    Resume {
        node: usize,
        inc: u64,
    },
}

struct Sim {
    base: Instant,
    now: Ns,
    wall: Arc<AtomicU64>,
    seq: u64,
    queue: BinaryHeap<Reverse<(Ns, u64)>>,
    events: HashMap<u64, Ev>,
    store: Store,
    nodes: Vec<Node>,
    terms: Vec<TermRec>,
    rng: SmallRng,
    violations: Vec<String>,
}

fn unavailable() -> LockError {
    LockError::Api {
        code: 503,
        reason: "ServiceUnavailable".into(),
        message: "injected".into(),
    }
}

fn forbidden(verb: &'static str) -> LockError {
    LockError::Forbidden {
        verb,
        namespace: "sim".into(),
        name: "lock".into(),
        message: "injected".into(),
    }
}

impl Sim {
    fn new(seed: u64, configs: Vec<(ElectionConfig, f64)>) -> Self {
        let nodes = configs
            .into_iter()
            .map(|(config, rate)| Node {
                identity: config.identity.clone(),
                config,
                clock: Clock { rate },
                machine: None,
                incarnation: 0,
                faults: Faults::default(),
                inflight: None,
                req_seq: 0,
                withdrawn: std::collections::HashSet::new(),
                watch: None,
                watch_gen: 0,
                tick_gen: 0,
                paused_until: None,
                backlog: Vec::new(),
                catching_up: false,
                term: None,
                work_lag: 0,
                landed: Vec::new(),
                created: Vec::new(),
                max_seen: None,
                max_seen_at: HashMap::new(),
                seen_lease: false,
                seen_version: None,
            })
            .collect();
        Self {
            base: Instant::now(),
            now: 0,
            wall: Arc::new(AtomicU64::new(0)),
            seq: 0,
            queue: BinaryHeap::new(),
            events: HashMap::new(),
            store: Store::default(),
            nodes,
            terms: Vec::new(),
            rng: SmallRng::seed_from_u64(seed),
            violations: Vec::new(),
        }
    }

    fn at(&mut self, t: Ns, ev: Ev) {
        self.seq += 1;
        self.queue.push(Reverse((t.max(self.now), self.seq)));
        self.events.insert(self.seq, ev);
    }

    fn local_instant(&self, i: usize) -> Instant {
        self.base + Duration::from_nanos(self.nodes[i].clock.local(self.now))
    }

    fn local_ns(&self, t: Instant) -> Ns {
        ns(t.saturating_duration_since(self.base))
    }

    fn trace(&self, what: impl FnOnce() -> String) {
        if std::env::var_os("MSIM_TRACE").is_some() {
            println!("{:>10.6} {}", self.now as f64 / 1e9, what());
        }
    }

    fn violation(&mut self, what: String) {
        self.violations
            .push(format!("t={:.3}s: {what}", self.now as f64 / 1e9));
    }

    fn latency(&mut self, i: usize) -> Ns {
        let max = self.nodes[i].faults.max_latency;
        if max == 0 {
            0
        } else {
            self.rng.random_range(0..=max)
        }
    }

    // ---- running ----------------------------------------------------------------------

    /// Processes events until global time `until`.
    fn run_until(&mut self, until: Ns) {
        while let Some(Reverse((t, seq))) = self.queue.peek().copied() {
            if t > until {
                break;
            }
            self.queue.pop();
            self.now = t;
            self.wall.store(t, Ordering::SeqCst);
            let ev = self.events.remove(&seq).unwrap();
            self.dispatch(ev);
        }
        self.now = until;
        self.wall.store(until, Ordering::SeqCst);
    }

    fn alive(&self, i: usize, inc: u64) -> bool {
        self.nodes[i].incarnation == inc && self.nodes[i].machine.is_some()
    }

    fn dispatch(&mut self, ev: Ev) {
        match ev {
            Ev::Tick {
                node,
                inc,
                generation,
            } => {
                if self.alive(node, inc)
                    && self.nodes[node].tick_gen == generation
                    && self.nodes[node].paused_until.is_none()
                {
                    self.feed(node, Input::Tick);
                }
            }
            Ev::Apply {
                node,
                inc,
                seq,
                op,
                sent,
                reply_after,
            } => self.apply(node, inc, seq, op, sent, reply_after),
            Ev::Reply {
                node,
                inc,
                seq,
                result,
                left,
            } => {
                if self.answered(node, inc, seq) {
                    if let Some(left) = left {
                        self.feed(node, Input::Sent(self.base + Duration::from_nanos(left)));
                    }
                    self.feed(node, Input::Reply(result));
                }
            }
            Ev::Unsent { node, inc, seq } => {
                if self.answered(node, inc, seq) {
                    self.feed(node, Input::Unsent);
                }
            }
            Ev::WatchOpened {
                node,
                inc,
                generation,
                result,
            } => {
                if !self.alive(node, inc) || !self.watch_is(node, generation) {
                    return;
                }
                let ok = result.is_ok();
                if ok {
                    let w = self.nodes[node].watch.as_mut().unwrap();
                    w.open = true;
                    w.last_delivery = self.now;
                } else {
                    self.nodes[node].watch = None;
                }
                self.feed(node, Input::WatchOpened(result));
                if ok && self.watch_is(node, generation) {
                    if self.nodes[node].faults.watch_ends {
                        self.at(
                            self.now,
                            Ev::WatchEnd {
                                node,
                                inc,
                                generation,
                            },
                        );
                    } else {
                        // Report the current state if it differs from where it started.
                        let after = self.nodes[node].watch.as_ref().unwrap().after.clone();
                        let current = self.store.current.clone();
                        let changed = match &current {
                            Some(v) => v.version != after,
                            None => !after.is_empty(),
                        };
                        if changed {
                            let event = match current {
                                Some(v) => LockEvent::Changed(v),
                                None => LockEvent::Deleted,
                            };
                            self.send_watch_event(node, event);
                        }
                        let timeout = ns(leaderz::machine::WATCH_TIMEOUT);
                        self.at(
                            self.now + timeout,
                            Ev::WatchEnd {
                                node,
                                inc,
                                generation,
                            },
                        );
                    }
                }
            }
            Ev::WatchEvent {
                node,
                inc,
                generation,
                event,
            } => {
                if self.alive(node, inc) && self.watch_is(node, generation) {
                    self.feed(node, Input::WatchEvent(event));
                }
            }
            Ev::WatchEnd {
                node,
                inc,
                generation,
            } => {
                if self.alive(node, inc) && self.watch_is(node, generation) {
                    self.nodes[node].watch = None;
                    self.feed(node, Input::WatchEnded(None));
                }
            }
            Ev::WorkStop { node, inc, term } => {
                self.terms[term].work_stopped = Some(self.now);
                if self.alive(node, inc) {
                    self.feed(node, Input::WorkStopped);
                }
            }
            Ev::Resume { node, inc } => {
                if self.nodes[node].incarnation != inc {
                    return;
                }
                self.nodes[node].paused_until = None;
                if self.nodes[node].machine.is_none() {
                    return;
                }
                let backlog = std::mem::take(&mut self.nodes[node].backlog);
                self.nodes[node].catching_up = true;
                for input in backlog {
                    self.feed(node, input);
                }
                self.feed(node, Input::Tick);
                self.nodes[node].catching_up = false;
            }
        }
    }

    fn watch_is(&self, i: usize, generation: u64) -> bool {
        self.nodes[i]
            .watch
            .as_ref()
            .is_some_and(|w| w.generation == generation)
    }

    fn feed(&mut self, i: usize, input: Input) {
        self.trace(|| format!("node {i} <- {input:?}"));
        if self.nodes[i].paused_until.is_some() {
            self.nodes[i].backlog.push(input);
            return;
        }
        if let Input::Reply(Ok(Answer::Read(Some(v)) | Answer::Wrote(v)))
        | Input::WatchEvent(LockEvent::Changed(v)) = &input
        {
            let node = &mut self.nodes[i];
            node.seen_lease = true;
            node.seen_version = Some(v.version.clone());
            let t = v.record.lease_transitions;
            node.max_seen = Some(node.max_seen.map_or(t, |m| m.max(t)));
        }
        let now = self.local_instant(i);
        let Some(m) = self.nodes[i].machine.as_mut() else {
            return;
        };
        m.handle(input, now);
        self.actions(i);
    }

    fn actions(&mut self, i: usize) {
        loop {
            let Some(m) = self.nodes[i].machine.as_mut() else {
                return;
            };
            let Some(action) = m.poll_action() else { break };
            self.act(i, action);
        }
        self.schedule_tick(i);
    }

    fn schedule_tick(&mut self, i: usize) {
        let Some(m) = self.nodes[i].machine.as_ref() else {
            return;
        };
        if let Some(t) = m.poll_timeout() {
            let g = self.nodes[i].clock.global(self.local_ns(t));
            self.nodes[i].tick_gen += 1;
            let (inc, generation) = (self.nodes[i].incarnation, self.nodes[i].tick_gen);
            self.at(
                g,
                Ev::Tick {
                    node: i,
                    inc,
                    generation,
                },
            );
        }
    }

    fn act(&mut self, i: usize, action: Action) {
        let inc = self.nodes[i].incarnation;
        let local_now = self.nodes[i].clock.local(self.now);
        self.trace(|| format!("node {i} (local {:.6}): {action:?}", local_now as f64 / 1e9));
        match action {
            Action::Send(req) => self.send(i, req),
            Action::Watch { after, open_by, .. } => {
                self.nodes[i].watch_gen += 1;
                let generation = self.nodes[i].watch_gen;
                self.nodes[i].watch = Some(SimWatch {
                    generation,
                    open: false,
                    after,
                    last_delivery: self.now,
                });
                let f = self.nodes[i].faults.clone();
                let lat = self.latency(i);
                let open_by = self.nodes[i].clock.global(self.local_ns(open_by));
                let (when, result) = if f.hang {
                    (open_by, Err(LockError::Timeout(Duration::from_secs(5))))
                } else if f.refuse || f.forbid_watch {
                    (self.now + lat, Err(forbidden("watch")))
                } else {
                    (self.now + lat, Ok(()))
                };
                self.at(
                    when.min(open_by),
                    Ev::WatchOpened {
                        node: i,
                        inc,
                        generation,
                        result,
                    },
                );
            }
            Action::Unwatch => self.nodes[i].watch = None,
            Action::StartTerm {
                token,
                started_at,
                deadline,
            } => {
                let (start_local, deadline_local) =
                    (self.local_ns(started_at), self.local_ns(deadline));
                let rd = ns(self.nodes[i].config.renew_deadline);
                if deadline_local != start_local + rd {
                    self.violation(format!(
                        "node {i}: term deadline is not its start + renew_deadline"
                    ));
                }
                let identity = self.nodes[i].identity.clone();
                let from_landed_write = self.nodes[i].landed.iter().any(|(sent, r)| {
                    sent.is(start_local)
                        && r.holder_identity == identity
                        && r.lease_transitions == token
                });
                if !from_landed_write {
                    self.violation(format!(
                        "node {i}: term {token} started at a time that is not the send time of a write of ours that landed"
                    ));
                }
                if self.nodes[i].term.is_some() {
                    self.violation(format!("node {i}: a term started while one was active"));
                }
                let recreated = self.nodes[i]
                    .created
                    .iter()
                    .find(|(sent, _)| sent.is(start_local))
                    .map(|(_, seen)| *seen);
                if let Some(Some(seen)) = recreated
                    && token <= seen
                {
                    self.violation(format!(
                        "node {i}: re-created the Lease with token {token}, not above the {seen} it saw"
                    ));
                }
                self.terms.push(TermRec {
                    node: i,
                    incarnation: inc,
                    token,
                    start: self.now,
                    deadline_local,
                    clock: self.nodes[i].clock,
                    cancelled: None,
                    died: None,
                    work_stopped: None,
                    recreated,
                });
                self.nodes[i].term = Some(self.terms.len() - 1);
            }
            Action::ExtendTerm(deadline) => {
                let Some(t) = self.nodes[i].term else {
                    self.violation(format!("node {i}: extended a term it does not hold"));
                    return;
                };
                let deadline_local = self.local_ns(deadline);
                if local_now >= self.terms[t].deadline_local {
                    self.violation(format!("node {i}: term extended after its deadline"));
                }
                let rd = ns(self.nodes[i].config.renew_deadline);
                let sent = deadline_local.saturating_sub(rd);
                if !self.nodes[i].landed.iter().any(|(s, _)| s.is(sent)) {
                    self.violation(format!(
                        "node {i}: term extended to a deadline that no landed write's send time explains"
                    ));
                }
                if deadline_local < self.terms[t].deadline_local {
                    self.violation(format!("node {i}: term deadline moved backwards"));
                }
                self.terms[t].deadline_local = deadline_local;
            }
            Action::Withdraw => self.withdraw(i),
            Action::EndTerm => {
                let Some(t) = self.nodes[i].term.take() else {
                    self.violation(format!("node {i}: ended a term it does not hold"));
                    return;
                };
                self.terms[t].cancelled = Some(self.now);
                // (A clock's rounding may put local time a few ns past an instant.)
                if !self.nodes[i].catching_up && local_now > self.terms[t].deadline_local + 2 {
                    self.violation(format!(
                        "node {i}: term {} cancelled {}ns after its deadline",
                        self.terms[t].token,
                        local_now - self.terms[t].deadline_local
                    ));
                }
                let lag = self.nodes[i].work_lag;
                self.at(
                    self.now + lag,
                    Ev::WorkStop {
                        node: i,
                        inc,
                        term: t,
                    },
                );
                // The elector drops a renewal of the ended term still queued.
                self.withdraw(i);
            }
            Action::Announce { .. } => {}
            Action::Stop(result) => {
                if let Some(t) = self.nodes[i].term.take() {
                    self.violation(format!("node {i}: stopped while term {t} was active"));
                }
                if let Err(e) = result
                    && !matches!(e, leaderz::ElectionError::Lock(ref l) if l.is_fatal())
                {
                    self.violation(format!("node {i}: stopped with {e}"));
                }
                self.nodes[i].machine = None;
                self.nodes[i].watch = None;
            }
            _ => self.violation(format!("node {i}: unknown action")),
        }
    }

    /// Whether request `seq` of incarnation `inc` is the node's outstanding one; if so,
    /// it is outstanding no more.
    fn answered(&mut self, node: usize, inc: u64, seq: u64) -> bool {
        let outstanding = self.alive(node, inc)
            && self.nodes[node]
                .inflight
                .as_ref()
                .is_some_and(|f| f.seq == seq);
        if outstanding {
            self.nodes[node].inflight = None;
        }
        outstanding
    }

    /// Drops the outstanding request if it still waits in the client's queue, as the
    /// elector does, and tells the machine.
    fn withdraw(&mut self, i: usize) {
        let Some(f) = &self.nodes[i].inflight else {
            return;
        };
        if self.now >= f.left_at {
            return;
        }
        let seq = f.seq;
        self.nodes[i].withdrawn.insert(seq);
        self.nodes[i].inflight = None;
        self.feed(i, Input::Unsent);
    }

    fn send(&mut self, i: usize, req: Request) {
        if self.nodes[i].inflight.is_some() {
            self.violation(format!(
                "node {i}: a second request while one is outstanding"
            ));
        }
        let inc = self.nodes[i].incarnation;
        self.nodes[i].req_seq += 1;
        let seq = self.nodes[i].req_seq;
        let clock = self.nodes[i].clock;
        let f = self.nodes[i].faults.clone();
        let deadline = clock.global(self.local_ns(req.deadline));
        let queued = if f.max_queue > 0 && self.rng.random_bool(0.5) {
            self.rng.random_range(0..=f.max_queue)
        } else {
            0
        };
        self.nodes[i].inflight = Some(Inflight {
            seq,
            left_at: self.now + queued,
        });
        // Still queued at its `send_by` (a create whose read is no longer fresh): the
        // elector drops it unsent.
        if let Some(by) = req.send_by {
            let by = clock.global(self.local_ns(by));
            if queued > 0 && self.now + queued >= by {
                self.at(by.max(self.now), Ev::Unsent { node: i, inc, seq });
                return;
            }
        }
        let reply = |result, left| Ev::Reply {
            node: i,
            inc,
            seq,
            result,
            left,
        };
        let asked_local = clock.local(self.now);
        let left_at = self.now + queued;
        if left_at >= deadline {
            // Never sent: given up while it waited.
            let waited = Duration::from_nanos(clock.local(deadline).saturating_sub(asked_local));
            self.at(deadline, reply(Err(LockError::Timeout(waited)), None));
            return;
        }
        let send_local = clock.local(left_at);
        let left = (queued > 0).then_some(send_local);
        let sent = Sent {
            asked: asked_local,
            left: send_local,
        };
        let seen = self.nodes[i].max_seen;
        self.nodes[i].max_seen_at.insert(send_local, seen);
        // In flight for at most the request timeout from when it left.
        let deadline = deadline.min(clock.global(send_local + ns(req.timeout)));
        let timeout = Duration::from_nanos(clock.local(deadline).saturating_sub(send_local));
        if f.hang {
            self.at(deadline, reply(Err(LockError::Timeout(timeout)), left));
            return;
        }
        let lat1 = self.latency(i);
        let lat2 = self.latency(i);
        if f.refuse {
            let when = (left_at + lat1).min(deadline);
            self.at(when, reply(Err(forbidden("update")), left));
            return;
        }
        if self.rng.random_bool(f.fail_before) {
            if left_at + lat1 > deadline {
                self.at(deadline, reply(Err(LockError::Timeout(timeout)), left));
            } else {
                self.at(left_at + lat1, reply(Err(unavailable()), left));
            }
            return;
        }
        let stall = if self.rng.random_bool(f.stall) {
            30 * SEC
        } else {
            0
        };
        let apply_at = left_at + lat1 + stall;
        let lost = self.rng.random_bool(f.fail_after);
        let reply_after = if apply_at + lat2 > deadline {
            self.at(deadline, reply(Err(LockError::Timeout(timeout)), left));
            None
        } else {
            Some((lat2, lost, left))
        };
        self.at(
            apply_at,
            Ev::Apply {
                node: i,
                inc,
                seq,
                op: req.op,
                sent,
                reply_after,
            },
        );
    }

    fn apply(
        &mut self,
        i: usize,
        inc: u64,
        seq: u64,
        op: Op,
        sent: Sent,
        reply_after: Option<(Ns, bool, Option<Ns>)>,
    ) {
        if self.nodes[i].incarnation == inc && self.nodes[i].withdrawn.remove(&seq) {
            return;
        }
        let by = Some((i, inc));
        let is_create = matches!(op, Op::Create(_));
        let result = match op {
            Op::Get => Ok(Answer::Read(self.store.current.clone())),
            Op::Create(record) => {
                if self.store.current.is_some() {
                    Err(LockError::AlreadyExists)
                } else {
                    self.write(by, Some(record.clone()));
                    if self.nodes[i].incarnation == inc {
                        self.nodes[i].landed.push((sent, record));
                        let seen = self.nodes[i].max_seen_at.get(&sent.left).copied().flatten();
                        self.nodes[i].created.push((sent, seen));
                    }
                    Ok(Answer::Wrote(self.store.current.clone().unwrap()))
                }
            }
            Op::Update(current, record) => match &self.store.current {
                None => Err(LockError::NotFound),
                Some(c) if c.version != current.version => Err(LockError::Conflict),
                Some(_) => {
                    self.write(by, Some(record.clone()));
                    if self.nodes[i].incarnation == inc {
                        self.nodes[i].landed.push((sent, record));
                    }
                    Ok(Answer::Wrote(self.store.current.clone().unwrap()))
                }
            },
            _ => Err(unavailable()),
        };
        if let Some((lat2, lost, left)) = reply_after {
            // A lost answer to a write that landed may also come back as the answer to
            // a client's retry of it (kube's default client retries a 503/504), which
            // meets the version the first attempt made.
            let retried =
                lost && matches!(result, Ok(Answer::Wrote(_))) && self.rng.random_bool(0.5);
            let result = match (lost, retried, is_create) {
                (true, true, true) => Err(LockError::AlreadyExists),
                (true, true, false) => Err(LockError::Conflict),
                (true, false, _) => Err(unavailable()),
                (false, ..) => result,
            };
            self.at(
                self.now + lat2,
                Ev::Reply {
                    node: i,
                    inc,
                    seq,
                    result,
                    left,
                },
            );
        }
    }

    /// A write to the store, seen by every open watch.
    fn write(&mut self, by: Option<(usize, u64)>, record: Option<LeaderRecord>) {
        self.trace(|| format!("STORE by {by:?}: {record:?}"));
        self.store.set(self.now, by, record);
        for n in 0..self.nodes.len() {
            let open = self.nodes[n].watch.as_ref().is_some_and(|w| w.open);
            if open && self.nodes[n].machine.is_some() {
                let event = match self.store.current.clone() {
                    Some(v) => LockEvent::Changed(v),
                    None => LockEvent::Deleted,
                };
                self.send_watch_event(n, event);
            }
        }
    }

    fn send_watch_event(&mut self, n: usize, event: LockEvent) {
        if self.nodes[n].faults.stall_watch {
            return; // a half-open connection: nothing arrives, nothing ends
        }
        let lat = self.latency(n);
        let inc = self.nodes[n].incarnation;
        let w = self.nodes[n].watch.as_mut().unwrap();
        let when = (self.now + lat).max(w.last_delivery);
        w.last_delivery = when;
        let generation = w.generation;
        self.at(
            when,
            Ev::WatchEvent {
                node: n,
                inc,
                generation,
                event,
            },
        );
    }

    // ---- the scenario's controls ------------------------------------------------------

    fn start(&mut self, i: usize, seed: u64) {
        let node = &mut self.nodes[i];
        node.incarnation += 1;
        node.inflight = None;
        node.watch = None;
        node.paused_until = None;
        node.backlog.clear();
        node.term = None;
        node.landed.clear();
        node.created.clear();
        node.withdrawn.clear();
        node.max_seen = None;
        node.max_seen_at.clear();
        node.seen_lease = false;
        node.seen_version = None;
        let now = self.base + Duration::from_nanos(node.clock.local(self.now));
        let wall = self.wall.clone();
        let m = Machine::new(node.config.clone(), "sim/lock", now)
            .unwrap()
            .with_seed(seed)
            .with_wall_clock(move || {
                // 2030-01-01 + global time: the same wall clock for everyone.
                let ns = wall.load(Ordering::SeqCst);
                jiff::Timestamp::from_nanosecond(1_893_456_000_000_000_000 + i128::from(ns))
                    .unwrap()
            });
        node.machine = Some(m);
        self.actions(i);
    }

    fn crash(&mut self, i: usize) {
        if let Some(t) = self.nodes[i].term.take() {
            self.terms[t].died = Some(self.now);
            self.terms[t].work_stopped = Some(self.now);
        }
        // A term whose work was still stopping dies with the process too.
        let inc = self.nodes[i].incarnation;
        for t in &mut self.terms {
            if t.node == i && t.incarnation == inc && t.work_stopped.is_none() {
                t.work_stopped = Some(self.now);
                t.died.get_or_insert(self.now);
            }
        }
        let node = &mut self.nodes[i];
        node.machine = None;
        node.incarnation += 1;
        node.watch = None;
        node.inflight = None;
        node.paused_until = None;
        node.backlog.clear();
    }

    fn shutdown(&mut self, i: usize, work_lag: Ns) {
        self.nodes[i].work_lag = work_lag;
        self.feed(i, Input::Shutdown);
    }

    fn pause(&mut self, i: usize, d: Ns) {
        if self.nodes[i].machine.is_none() || self.nodes[i].paused_until.is_some() {
            return;
        }
        self.nodes[i].paused_until = Some(self.now + d);
        let inc = self.nodes[i].incarnation;
        self.at(self.now + d, Ev::Resume { node: i, inc });
    }

    fn running(&self, i: usize) -> bool {
        self.nodes[i].machine.is_some()
    }

    // ---- the checks ---------------------------------------------------------------------

    fn check(&mut self) {
        let mut terms: Vec<&TermRec> = self.terms.iter().collect();
        terms.sort_by_key(|t| t.start);
        let mut latest: Option<&TermRec> = None;
        let mut problems = Vec::new();
        for t in terms {
            if let Some(prev) = latest {
                if t.start < prev.act_end() {
                    problems.push(format!(
                        "overlap: node {} term {} may act until {:.3}s; node {} term {} started at {:.3}s",
                        prev.node,
                        prev.token,
                        prev.act_end() as f64 / 1e9,
                        t.node,
                        t.token,
                        t.start as f64 / 1e9
                    ));
                }
                if t.token <= prev.token && t.recreated.is_none() {
                    problems.push(format!(
                        "token did not rise: node {} term {} after node {} term {}",
                        t.node, t.token, prev.node, prev.token
                    ));
                }
            }
            if latest.is_none_or(|l| t.act_end() > l.act_end()) {
                latest = Some(t);
            }
        }
        // Releases come after the released term's work stopped.
        for w in &self.store.writes {
            let (Some((node, inc)), Some(record)) = (w.by, &w.record) else {
                continue;
            };
            if record.holder().is_some() {
                continue;
            }
            let term = self.terms.iter().find(|t| {
                t.node == node && t.incarnation == inc && t.token == record.lease_transitions
            });
            if let Some(t) = term
                && t.work_stopped.is_none_or(|s| s > w.at)
            {
                problems.push(format!(
                    "node {node} released term {} at {:.3}s before its work stopped",
                    t.token,
                    w.at as f64 / 1e9
                ));
            }
        }
        self.violations.extend(problems);
    }

    /// The global time at which some term is active, at or after `from`.
    fn leader_at_or_after(&self, from: Ns) -> Option<Ns> {
        self.terms
            .iter()
            .filter(|t| t.act_end() > from)
            .map(|t| t.start.max(from))
            .min()
    }
}

fn config(i: usize, rng: &mut SmallRng) -> ElectionConfig {
    // Different lease durations per candidate, renew deadline 2/3 of it, retry period
    // a fifth of the deadline.
    let ld = rng.random_range(3..=15u64);
    let rd = Duration::from_millis(ld * 2000 / 3);
    let c = ElectionConfig::new(format!("c{i}"))
        .lease_duration(Duration::from_secs(ld))
        .renew_deadline(rd)
        .retry_period(rd / 5)
        .request_timeout(Duration::from_secs(2))
        .shutdown_grace(Duration::from_secs(10));
    // Half the candidates renew less often than they retry (up to the limit).
    if rng.random_bool(0.5) {
        c.renew_interval(rd.mul_f64(rng.random_range(0.2..0.75)))
    } else {
        c
    }
}

fn random_faults(rng: &mut SmallRng) -> Faults {
    match rng.random_range(0..10) {
        0 | 1 => Faults::default(),
        2 => Faults {
            max_latency: rng.random_range(1..3000) * MS,
            ..Faults::default()
        },
        3 => Faults {
            max_latency: rng.random_range(1..500) * MS,
            fail_before: rng.random_range(0.0..0.5),
            fail_after: rng.random_range(0.0..0.5),
            ..Faults::default()
        },
        4 => Faults {
            hang: true,
            ..Faults::default()
        },
        5 => Faults {
            forbid_watch: true,
            max_latency: 200 * MS,
            ..Faults::default()
        },
        6 => Faults {
            stall: rng.random_range(0.0..0.3),
            max_latency: 100 * MS,
            ..Faults::default()
        },
        7 => Faults {
            watch_ends: true,
            max_latency: 50 * MS,
            ..Faults::default()
        },
        8 => Faults {
            stall_watch: true,
            max_latency: 50 * MS,
            ..Faults::default()
        },
        _ => Faults {
            refuse: true,
            max_latency: 50 * MS,
            ..Faults::default()
        },
    }
}

const NODES: usize = 5;
const STEPS: usize = 40;

/// Runs one random history; returns (terms, worst time from healing to a leader).
fn simulate(seed: u64, max_rate: f64) -> Result<(usize, Ns), String> {
    let mut rng = SmallRng::seed_from_u64(seed);
    let configs = (0..NODES)
        .map(|i| {
            let c = config(i, &mut rng);
            let rate = rng.random_range(1.0..=max_rate);
            (c, rate)
        })
        .collect();
    let mut sim = Sim::new(seed, configs);
    for i in 0..NODES {
        sim.start(i, rng.random());
    }
    // Client-side queueing is drawn apart, so that older seeds still replay the same
    // histories without it.
    let mut queueing = SmallRng::seed_from_u64(seed ^ 0x9e37_79b9_7f4a_7c15);
    let mut last_delete = 0;
    for _ in 0..STEPS {
        let t = sim.now + rng.random_range(0..8000) * MS;
        sim.run_until(t);
        let i = rng.random_range(0..NODES);
        match rng.random_range(0..23) {
            0..=2 if sim.running(i) => sim.crash(i),
            3..=5 if sim.running(i) => {
                let lag = rng.random_range(0..15_000) * MS;
                sim.shutdown(i, lag);
            }
            // A new process (same identity) starts; not while the Lease is deleted or
            // holds an admin's garbage: one that never saw the real holder re-creates it
            // at once, or trusts the garbage (documented limits).
            _ if !sim.running(i)
                && sim.store.current.is_some()
                && sim.store.writes.last().is_some_and(|w| w.by.is_some()) =>
            {
                sim.start(i, rng.random());
            }
            6 => sim.pause(i, rng.random_range(1000..40_000) * MS),
            // An admin deletes the Lease, now and then (not again within twice the
            // longest lease duration: deleting a re-created Lease again while a
            // candidate cannot see it is a documented limit).
            7 if sim.store.current.is_some()
                && sim.now >= last_delete + 30 * SEC
                && (0..NODES).all(|n| !sim.running(n) || sim.nodes[n].seen_lease) =>
            {
                last_delete = sim.now;
                sim.write(None, None);
            }
            // An admin writes garbage — only while every running candidate has seen the
            // Lease: one that never saw it trusts whatever the garbage says (a holder or
            // a duration shorter than the real holder's), a documented limit.
            8 if (0..NODES).all(|n| !sim.running(n) || sim.nodes[n].seen_lease) => {
                // An admin writes garbage (never lowering the count below what the
                // Lease ever had: tokens must rise).
                let t = sim
                    .store
                    .writes
                    .iter()
                    .filter_map(|w| w.record.as_ref())
                    .map(|r| r.lease_transitions)
                    .max()
                    .unwrap_or(0);
                // A ghost replacing the holder: only while every running candidate saw
                // the record it replaces. One that missed it (its watch stalled over a
                // take) judges the ghost by the holder before, whose duration may be
                // shorter than the real holder's: the documented limit again.
                let current = sim.store.current.as_ref().map(|v| v.version.clone());
                let all_saw_current =
                    (0..NODES).all(|n| !sim.running(n) || sim.nodes[n].seen_version == current);
                let kind = rng.random_range(0..3);
                if kind != 1 && !all_saw_current {
                    continue;
                }
                let record = match kind {
                    0 => LeaderRecord {
                        holder_identity: "ghost".into(),
                        lease_duration_seconds: Some(rng.random_range(-5..30)),
                        lease_transitions: t + 1,
                        ..Default::default()
                    },
                    // The current record with its duration edited, longer. (Shortening
                    // it by hand can fool a follower that missed the holder's last
                    // renewal before the edit, and clearing holderIdentity releases the
                    // lease by force while its holder leads: documented limits.)
                    1 => match sim.store.current.clone() {
                        Some(v) => LeaderRecord {
                            lease_duration_seconds: Some(
                                v.record.lease_duration_seconds.unwrap_or(0).max(1)
                                    + rng.random_range(0..15),
                            ),
                            ..v.record
                        },
                        None => LeaderRecord {
                            holder_identity: "ghost".into(),
                            lease_transitions: t + 1,
                            ..Default::default()
                        },
                    },
                    _ => LeaderRecord {
                        holder_identity: "ghost".into(),
                        lease_transitions: t + 1,
                        ..Default::default()
                    },
                };
                sim.write(None, Some(record));
            }
            10 | 11 => {
                // Someone asks for a planned handover, to a random candidate or to any.
                if let Some(v) = sim.store.current.clone()
                    && v.record.holder().is_some()
                {
                    let to = rng
                        .random_bool(0.7)
                        .then(|| format!("c{}", rng.random_range(0..NODES)));
                    let id = format!("h{}", rng.random::<u32>());
                    let record = LeaderRecord {
                        handoff: Some(Handoff::request(to, id)),
                        ..v.record
                    };
                    sim.write(None, Some(record));
                }
            }
            12 => {
                // A controller prefers another holder (a strategy with a preferred holder).
                if let Some(v) = sim.store.current.clone()
                    && v.record.holder().is_some()
                {
                    let record = LeaderRecord {
                        strategy: Some("example.com/strategy".into()),
                        preferred_holder: Some(format!("c{}", rng.random_range(0..NODES))),
                        ..v.record
                    };
                    sim.write(None, Some(record));
                }
            }
            9 => {
                // An etcd restore: the same record, at an older version.
                if let Some(v) = sim.store.current.clone() {
                    sim.store.next = sim.store.next.saturating_sub(rng.random_range(1..20));
                    sim.write(None, Some(v.record));
                }
            }
            _ => {
                sim.nodes[i].faults = random_faults(&mut rng);
                if queueing.random_bool(0.3) {
                    sim.nodes[i].faults.max_queue = queueing.random_range(1..=12_000) * MS;
                }
            }
        }
    }
    // Heal everything: someone must lead again, within a bound, and one at the end.
    for i in 0..NODES {
        sim.nodes[i].faults = Faults::default();
        if let Some(until) = sim.nodes[i].paused_until {
            sim.run_until(until.max(sim.now));
        }
    }
    let healed = sim.now;
    sim.run_until(healed + 90 * SEC);
    sim.check();
    let running = (0..NODES).filter(|&i| sim.running(i)).count();
    let leading: Vec<usize> = (0..NODES)
        .filter(|&i| sim.nodes[i].term.is_some())
        .collect();
    let mut worst = 0;
    if running > 0 {
        if leading.len() != 1 {
            sim.violation(format!("liveness: {} leaders at the end", leading.len()));
        }
        // The longest any candidate may wait after healing: the longest lease duration
        // (a holder that just renewed, then died) on the slowest clock, plus a backoff
        // (4 retry periods, jittered), plus the slowest request.
        // (Garbage may name longer durations than anyone's own: those count too.)
        let longest_record = sim
            .store
            .writes
            .iter()
            .filter_map(|w| w.record.as_ref()?.lease_duration_seconds)
            .filter_map(|d| u64::try_from(d).ok())
            .max()
            .unwrap_or(0)
            * SEC;
        let bound = sim
            .nodes
            .iter()
            .map(|n| {
                let c = &n.config;
                let ld = ns(c.lease_duration).max(longest_record);
                (ld + ns(c.retry_period) * 5 + ns(c.request_timeout)) as f64 / n.clock.rate.min(1.0)
            })
            .fold(0.0, f64::max) as Ns
            + 2 * SEC;
        match sim.leader_at_or_after(healed) {
            Some(t) => {
                worst = t - healed;
                if worst > bound {
                    sim.violation(format!(
                        "liveness: no leader until {:.1}s after healing (bound {:.1}s)",
                        worst as f64 / 1e9,
                        bound as f64 / 1e9
                    ));
                }
            }
            None => sim.violation("liveness: nobody led after healing".into()),
        }
    }
    if sim.violations.is_empty() {
        Ok((sim.terms.len(), worst))
    } else {
        Err(sim.violations.join("\n"))
    }
}

fn seeds(default: u64) -> impl Iterator<Item = u64> {
    if let Ok(seed) = std::env::var("MSIM_SEED") {
        let seed: u64 = seed.parse().expect("MSIM_SEED must be a number");
        return seed..seed + 1;
    }
    let n: u64 = std::env::var("MSIM_SEEDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default);
    let base: u64 = std::env::var("MSIM_BASE")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(rand::random);
    base..base + n
}

/// The documented bound: a follower's clock may run up to `lease_duration /
/// renew_deadline` (here 1.5) times as fast as the leader's. Rates within [1, 1.45].
#[test]
fn no_overlap_with_every_fault_and_clock_rates_within_the_bound() {
    let started = std::time::Instant::now();
    let (mut runs, mut terms, mut worst) = (0, 0, 0);
    for seed in seeds(300) {
        match simulate(seed, 1.45) {
            Ok((t, w)) => {
                runs += 1;
                terms += t;
                worst = worst.max(w);
            }
            Err(v) => panic!("seed {seed} (replay with MSIM_SEED={seed}):\n{v}"),
        }
    }
    println!(
        "machine simulation: {runs} runs, {terms} terms, no violation; worst time to a leader after healing {:.1}s; {:.1}s",
        worst as f64 / 1e9,
        started.elapsed().as_secs_f64()
    );
}

/// Two candidates, the leader cut off from the API, the follower's clock running at
/// `rate` times the leader's. Returns the violations found.
fn skewed_takeover(seed: u64, rate: f64) -> Vec<String> {
    let mut rng = SmallRng::seed_from_u64(seed);
    let c = |i: usize| {
        ElectionConfig::new(format!("c{i}"))
            .lease_duration(Duration::from_secs(15))
            .renew_deadline(Duration::from_secs(10))
            .retry_period(Duration::from_secs(2))
    };
    let mut sim = Sim::new(seed, vec![(c(0), 1.0), (c(1), rate)]);
    sim.start(0, rng.random());
    sim.run_until(SEC);
    sim.start(1, rng.random());
    sim.nodes[1].faults.max_latency = 20 * MS;
    sim.run_until(rng.random_range(3000..20_000) * MS);
    sim.nodes[0].faults.hang = true;
    sim.run_until(sim.now + 60 * SEC);
    sim.check();
    sim.violations
}

/// The bound is tight: just beyond it (a follower clock 1.6 times as fast as the
/// leader's, bound 1.5), a cut-off leader's term overlaps its successor's; just within
/// it (1.45), never.
#[test]
fn clock_rate_skew_beyond_the_bound_is_caught_and_within_it_is_safe() {
    let mut beyond = 0;
    for seed in 0..50 {
        assert_eq!(
            skewed_takeover(seed, 1.45),
            Vec::<String>::new(),
            "seed {seed}"
        );
        if !skewed_takeover(seed, 1.6).is_empty() {
            beyond += 1;
        }
    }
    println!("rate 1.6 (beyond the bound): overlap in {beyond} of 50 runs");
    assert!(beyond > 0, "a skew beyond the bound must show overlap");
}
