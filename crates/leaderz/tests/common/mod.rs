//! Test support for the in-memory engine tests: a fault-injecting lock and a ledger
//! of leadership terms that checks they never overlap.
#![allow(dead_code, unreachable_pub, missing_docs)]
#![allow(clippy::unwrap_used)] // tests: a panic is the failure report

use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use futures::stream::BoxStream;
use leaderz::{LeaderRecord, Lock, LockError, LockEvent, MemoryLock, Versioned};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use tokio::sync::oneshot;
use tokio::time::Instant;

/// What can go wrong with one candidate's API calls.
#[derive(Clone, Debug, Default)]
pub struct Faults {
    /// Each call's latency before the server applies it, and after: up to this long.
    pub max_latency: Duration,
    /// Probability that a call fails before reaching the server.
    pub fail_before: f64,
    /// Probability that a call is applied but its answer is lost (the caller sees an error).
    pub fail_after: f64,
    /// Every call hangs until the caller gives up (a black-holed connection).
    pub hang: bool,
    /// Watch requests are refused with 403.
    pub forbid_watch: bool,
    /// Probability that a call takes far longer than any timeout (yet may still apply).
    pub stall: f64,
    /// Watches open but end at once without an event.
    pub watch_ends: bool,
    /// Writes (create, update) are applied but their answers are lost.
    pub lose_write_answers: bool,
    /// Every call (watches too) is refused with this HTTP status (401 or 403): RBAC
    /// revoked, or credentials refused.
    pub refuse: Option<u16>,
    /// Writes (create, update) are refused with 403, as RBAC without `create`/`update`.
    pub refuse_writes: bool,
    /// Writes take exactly this long before they are applied, and this long after.
    pub write_delay: Option<(Duration, Duration)>,
    /// Opening a watch hangs (other calls work).
    pub hang_watch: bool,
    /// Watches from a version below this fail with 410 Gone (etcd compacted them).
    pub compacted: Option<u64>,
}

/// A lock that reaches the shared [`MemoryLock`] through injected faults. Calls are
/// carried out by a detached task, so a write the caller gave up on may still land
/// later, as a real request can.
#[derive(Clone)]
pub struct FaultyLock {
    inner: MemoryLock,
    faults: Arc<Mutex<Faults>>,
    rng: Arc<Mutex<SmallRng>>,
    calls: Arc<std::sync::atomic::AtomicU64>,
    /// Bumped to end every open watch (as a server restart does).
    epoch: Arc<tokio::sync::watch::Sender<u64>>,
    /// While true, open watches deliver nothing (a half-open connection).
    stalled: Arc<tokio::sync::watch::Sender<bool>>,
}

impl FaultyLock {
    pub fn new(inner: MemoryLock, seed: u64) -> Self {
        Self {
            inner,
            faults: Arc::default(),
            rng: Arc::new(Mutex::new(SmallRng::seed_from_u64(seed))),
            calls: Arc::default(),
            epoch: Arc::new(tokio::sync::watch::Sender::new(0)),
            stalled: Arc::new(tokio::sync::watch::Sender::new(false)),
        }
    }

    /// Ends every open watch, as an API server restart does.
    pub fn end_watches(&self) {
        self.epoch.send_modify(|e| *e += 1);
    }

    /// Open watches stay open but deliver nothing (true), or resume (false).
    pub fn stall_watches(&self, stall: bool) {
        self.stalled.send_replace(stall);
    }

    /// How many calls (get, create, update, watch) were made so far.
    pub fn calls(&self) -> u64 {
        self.calls.load(std::sync::atomic::Ordering::SeqCst)
    }

    pub fn set(&self, f: Faults) {
        *self.faults.lock().unwrap() = f;
    }

    pub fn faults(&self) -> Faults {
        self.faults.lock().unwrap().clone()
    }

    fn plan(&self) -> Plan {
        let f = self.faults();
        let mut rng = self.rng.lock().unwrap();
        let mut lat = || {
            if f.max_latency.is_zero() {
                Duration::ZERO
            } else {
                f.max_latency.mul_f64(rng.random::<f64>())
            }
        };
        let before = lat();
        let after = lat();
        let stall = rng.random::<f64>() < f.stall;
        Plan {
            write_delay: None,
            before: if stall {
                before + Duration::from_secs(30)
            } else {
                before
            },
            after,
            fail_before: rng.random::<f64>() < f.fail_before,
            fail_after: rng.random::<f64>() < f.fail_after,
            hang: f.hang,
        }
    }

    async fn call<T: Send + 'static>(
        &self,
        op: impl FnOnce(MemoryLock) -> Result<T, LockError> + Send + 'static,
    ) -> Result<T, LockError> {
        self.calls.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let mut plan = self.plan();
        if plan.hang {
            return std::future::pending().await;
        }
        if let Some(code) = self.faults().refuse {
            tokio::time::sleep(plan.before).await;
            return Err(refused(code));
        }
        if let Some((before, after)) = plan.write_delay {
            plan.before = before;
            plan.after = after;
        }
        let (tx, rx) = oneshot::channel();
        let inner = self.inner.clone();
        tokio::spawn(async move {
            tokio::time::sleep(plan.before).await;
            if plan.fail_before {
                let _ = tx.send(Err(unavailable()));
                return;
            }
            let result = op(inner);
            tokio::time::sleep(plan.after).await;
            let _ = tx.send(if plan.fail_after {
                Err(unavailable())
            } else {
                result
            });
        });
        rx.await.unwrap_or_else(|_| Err(unavailable()))
    }
}

impl FaultyLock {
    /// A write: like [`FaultyLock::call`], with the fixed write delay if one is set.
    async fn write_call(
        &self,
        op: impl FnOnce(MemoryLock) -> Result<Versioned, LockError> + Send + 'static,
    ) -> Result<Versioned, LockError> {
        if self.faults().refuse_writes {
            // Refused after a moment (everything else answers sooner).
            tokio::time::sleep(Duration::from_millis(100)).await;
            return Err(LockError::Forbidden {
                verb: "create",
                namespace: "test".into(),
                name: "lock".into(),
                message: "injected".into(),
            });
        }
        match self.faults().write_delay {
            None => self.call(op).await,
            Some(delay) => self.call_delayed(delay, op).await,
        }
    }

    async fn call_delayed(
        &self,
        (before, after): (Duration, Duration),
        op: impl FnOnce(MemoryLock) -> Result<Versioned, LockError> + Send + 'static,
    ) -> Result<Versioned, LockError> {
        self.calls.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let (tx, rx) = oneshot::channel();
        let inner = self.inner.clone();
        tokio::spawn(async move {
            tokio::time::sleep(before).await;
            let result = op(inner);
            tokio::time::sleep(after).await;
            let _ = tx.send(result);
        });
        rx.await.unwrap_or_else(|_| Err(unavailable()))
    }
}

struct Plan {
    write_delay: Option<(Duration, Duration)>,
    before: Duration,
    after: Duration,
    fail_before: bool,
    fail_after: bool,
    hang: bool,
}

fn refused(code: u16) -> LockError {
    if code == 401 {
        LockError::Unauthorized("injected".into())
    } else {
        LockError::Forbidden {
            verb: "get",
            namespace: "test".into(),
            name: "lock".into(),
            message: "injected".into(),
        }
    }
}

fn unavailable() -> LockError {
    LockError::Api {
        code: 503,
        reason: "ServiceUnavailable".into(),
        message: "injected".into(),
    }
}

/// Runs a MemoryLock operation synchronously (it never waits).
fn now<T>(fut: impl std::future::Future<Output = T>) -> T {
    futures::executor::block_on(fut)
}

impl Lock for FaultyLock {
    async fn get(&self) -> Result<Option<Versioned>, LockError> {
        self.call(|l| now(l.get())).await
    }

    async fn create(&self, record: &LeaderRecord) -> Result<Versioned, LockError> {
        let record = record.clone();
        let lose = self.faults().lose_write_answers;
        let r = self.write_call(move |l| now(l.create(&record))).await;
        if lose { Err(unavailable()) } else { r }
    }

    async fn update(
        &self,
        current: &Versioned,
        record: &LeaderRecord,
    ) -> Result<Versioned, LockError> {
        let (current, record) = (current.clone(), record.clone());
        let lose = self.faults().lose_write_answers;
        let r = self
            .write_call(move |l| now(l.update(&current, &record)))
            .await;
        if lose { Err(unavailable()) } else { r }
    }

    async fn watch(
        &self,
        version: &str,
        timeout: Duration,
    ) -> Result<BoxStream<'static, Result<LockEvent, LockError>>, LockError> {
        self.calls.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let f = self.faults();
        if let Some(code) = f.refuse {
            return Err(refused(code));
        }
        if f.hang_watch {
            return std::future::pending().await;
        }
        if let Some(c) = f.compacted
            && version.parse::<u64>().is_ok_and(|v| v < c)
        {
            return Err(LockError::Gone("injected: compacted".into()));
        }
        if f.watch_ends {
            return Ok(futures::stream::empty().boxed());
        }
        if f.forbid_watch {
            return Err(LockError::Forbidden {
                verb: "watch",
                namespace: "test".into(),
                name: "lock".into(),
                message: "injected".into(),
            });
        }
        if f.hang {
            return std::future::pending().await;
        }
        let stream = self.inner.watch(version, timeout).await?;
        // Deliver events late, in order; hold them while stalled; end on a restart.
        let max = f.max_latency;
        let rng = self.rng.clone();
        let stalled = self.stalled.subscribe();
        let mut epoch = self.epoch.subscribe();
        epoch.borrow_and_update();
        let restarted = async move {
            let _ = epoch.changed().await;
        };
        Ok(stream
            .then(move |ev| {
                let d = if max.is_zero() {
                    Duration::ZERO
                } else {
                    max.mul_f64(rng.lock().unwrap().random::<f64>())
                };
                let mut stalled = stalled.clone();
                async move {
                    tokio::time::sleep(d).await;
                    let _ = stalled.wait_for(|s| !s).await;
                    ev
                }
            })
            .take_until(restarted)
            .boxed())
    }

    fn describe(&self) -> String {
        self.inner.describe()
    }
}

/// Leadership terms as the work saw them: who, and from when to when.
#[derive(Clone, Default)]
pub struct Ledger {
    terms: Arc<Mutex<Vec<Interval>>>,
}

#[derive(Clone, Debug)]
pub struct Interval {
    pub who: usize,
    pub token: i64,
    pub start: Instant,
    pub end: Option<Instant>,
}

impl Ledger {
    pub fn start(&self, who: usize, token: i64) -> usize {
        let mut t = self.terms.lock().unwrap();
        t.push(Interval {
            who,
            token,
            start: Instant::now(),
            end: None,
        });
        t.len() - 1
    }

    /// Ends term `idx` now, which must be no later than its `deadline`.
    pub fn end_by(&self, idx: usize, deadline: Instant) {
        let now = Instant::now();
        assert!(
            now <= deadline,
            "term {idx} was cancelled {:?} after its deadline",
            now - deadline
        );
        self.end(idx);
    }

    pub fn end(&self, idx: usize) {
        let mut t = self.terms.lock().unwrap();
        if t[idx].end.is_none() {
            t[idx].end = Some(Instant::now());
        }
    }

    pub fn terms(&self) -> Vec<Interval> {
        self.terms.lock().unwrap().clone()
    }

    /// Panics with the two terms if any two overlap, or if tokens do not rise.
    pub fn check(&self, context: &str) {
        let mut terms = self.terms();
        let far = Instant::now() + Duration::from_secs(1_000_000);
        terms.sort_by_key(|t| t.start);
        for pair in terms.windows(2) {
            let (a, b) = (&pair[0], &pair[1]);
            let a_end = a.end.unwrap_or(far);
            assert!(
                b.start >= a_end,
                "{context}: overlapping terms: {a:?} and {b:?} (overlap {:?})",
                a_end - b.start
            );
            assert!(
                b.token > a.token,
                "{context}: fencing token did not rise: {a:?} then {b:?}"
            );
        }
    }
}

/// Installs a test subscriber once (RUST_LOG controls it).
pub fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
}
