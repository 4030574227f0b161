//! Simulation of shard sets on the in-memory store, on paused time: members join, leave
//! gracefully, crash, and are cut off from the store (a network partition) and healed,
//! sometimes faster than the set can settle. Checked on every run:
//!
//! - **safety**: per shard, the intervals in which some member's work held the shard's
//!   term never overlap (ordered by time, then by the order in which they happened at
//!   the same instant), every term ends no later than its deadline, and fencing tokens
//!   rise from one term to the next;
//! - **liveness**: after each change that is given time to settle, every shard is owned
//!   again, by the member [`assign`] names for the live members, within a lease duration
//!   plus 1.2 retry periods (the jitter) after the change became visible: at once for a
//!   join or a graceful leave, a lease duration after a crash or a cut (when the
//!   survivors see the member Lease expire), after a heal once the healed member can
//!   retake its member Lease (its backoff: up to half a lease duration), and a lease
//!   duration after a join or heal while a departed member's Lease lingers (see
//!   [`visible_by`]); a change that comes before the previous one settled is judged from
//!   the last;
//! - **balance**: settled, each of `M` live members owns ⌈S/M⌉ or ⌊S/M⌋ shards.
//!
//! Runs `SHARDS_SIM_SEEDS` seeds (default 24, ≈ 15 s in a debug build);
//! `SHARDS_SIM_SEED=<n>` replays one (`SHARDS_SIM_TRACE=1` prints each change). S is 1, 7,
//! 16 or 64; members come from a pool of 6.

#![allow(clippy::unwrap_used)] // tests: a panic is the failure report

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use leaderz::ElectionConfig;
use leaderz::shards::{MemoryStore, ShardSet, ShardSetConfig, ShardSetHandle, assign};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use tokio::task::JoinHandle;
use tokio::time::{Instant, sleep};

const POOL: usize = 6;
const SET: &str = "sim";
const LD: Duration = Duration::from_secs(3);
const RP: Duration = Duration::from_millis(500);

fn config(identity: &str, shards: u32) -> ShardSetConfig {
    let election = ElectionConfig::new(identity)
        .lease_duration(LD)
        .renew_deadline(Duration::from_secs(2))
        .retry_period(RP)
        .request_timeout(Duration::from_secs(1));
    ShardSetConfig::new(SET, shards, election)
}

/// A point in the simulation: paused time, then the order of events at that instant.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct At(Instant, u64);

static SEQ: AtomicU64 = AtomicU64::new(0);

fn at() -> At {
    At(Instant::now(), SEQ.fetch_add(1, Ordering::SeqCst))
}

#[derive(Clone, Debug)]
struct Interval {
    shard: u32,
    member: String,
    token: i64,
    start: At,
    end: Option<At>,
}

#[derive(Clone, Default)]
struct Ledger(Arc<Mutex<Vec<Interval>>>);

impl Ledger {
    fn start(&self, shard: u32, member: &str, token: i64) -> usize {
        let mut l = self.0.lock().unwrap();
        l.push(Interval {
            shard,
            member: member.to_owned(),
            token,
            start: at(),
            end: None,
        });
        l.len() - 1
    }

    fn end(&self, idx: usize) {
        let mut l = self.0.lock().unwrap();
        if l[idx].end.is_none() {
            l[idx].end = Some(at());
        }
    }

    /// The open intervals: who owns each shard now.
    fn owners(&self) -> BTreeMap<u32, Vec<String>> {
        let mut out: BTreeMap<u32, Vec<String>> = BTreeMap::new();
        for i in self.0.lock().unwrap().iter().filter(|i| i.end.is_none()) {
            out.entry(i.shard).or_default().push(i.member.clone());
        }
        out
    }

    fn check(&self, context: &str) -> usize {
        let all = self.0.lock().unwrap().clone();
        let mut by_shard: BTreeMap<u32, Vec<Interval>> = BTreeMap::new();
        for i in all {
            by_shard.entry(i.shard).or_default().push(i);
        }
        let mut n = 0;
        for (shard, mut terms) in by_shard {
            terms.sort_by_key(|t| t.start);
            n += terms.len();
            for pair in terms.windows(2) {
                let (a, b) = (&pair[0], &pair[1]);
                let a_end = a
                    .end
                    .unwrap_or(At(Instant::now() + Duration::from_secs(1 << 30), 0));
                assert!(
                    a_end <= b.start,
                    "{context}: shard {shard} had two owners: {a:?} and {b:?}"
                );
                assert!(
                    b.token > a.token,
                    "{context}: shard {shard}'s fencing token did not rise: {a:?} then {b:?}"
                );
            }
        }
        n
    }
}

/// The work of one member: records an interval per shard term, from the moment it has
/// the term until it sees the term end (which must be no later than its deadline).
fn worker(handle: &ShardSetHandle, member: String, ledger: Ledger) -> JoinHandle<()> {
    let mut owned = handle.owned();
    tokio::spawn(async move {
        let mut seen: BTreeMap<u32, i64> = BTreeMap::new();
        loop {
            let new: Vec<_> = owned
                .borrow_and_update()
                .iter()
                .filter(|(s, t)| t.is_active() && seen.get(s) != Some(&t.fencing_token()))
                .map(|(s, t)| (*s, t.clone()))
                .collect();
            for (shard, term) in new {
                seen.insert(shard, term.fencing_token());
                let idx = ledger.start(shard, &member, term.fencing_token());
                let ledger = ledger.clone();
                let member = member.clone();
                tokio::spawn(async move {
                    term.cancelled().await;
                    let late = Instant::now().checked_duration_since(term.deadline());
                    assert!(
                        late.is_none_or(|d| d.is_zero()),
                        "{member}: shard {shard}'s term ended {late:?} after its deadline"
                    );
                    ledger.end(idx);
                    drop(term);
                });
            }
            if owned.changed().await.is_err() {
                return;
            }
        }
    })
}

struct Member {
    identity: String,
    store: MemoryStore,
    handle: Option<ShardSetHandle>,
    worker: Option<JoinHandle<()>>,
    cut: bool,
}

impl Member {
    fn running(&self) -> bool {
        self.handle.is_some()
    }

    /// Counts as live once settled: running and not cut off.
    fn live(&self) -> bool {
        self.running() && !self.cut
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Change {
    Join,
    Leave,
    Crash,
    Cut,
    Heal,
}

impl Change {
    /// How long after the change it becomes visible to the others, at most.
    fn visible_after(self) -> Duration {
        match self {
            Change::Join | Change::Leave => Duration::ZERO,
            Change::Crash | Change::Cut => LD,
            // The healed member retakes its member Lease after its backoff (at most 4
            // retry periods, or half the lease duration).
            Change::Heal => LD / 2,
        }
    }
}

/// When every change in `pending` (since the last settled state, in order) is visible
/// to every live member. A crash or cut is visible a lease duration after it. A member
/// that joins (or heals, and lists again) while a departed member's Lease is still
/// around (it is deleted [`ShardSetConfig::forget_after`], 10 lease durations, after it
/// expired) first sees that Lease then, and counts it alive for a lease duration: the
/// engine judges expiry by when it saw a record, never by the writer's clock.
fn visible_by(pending: &[(Instant, Change)], departures: &[Instant]) -> Instant {
    let mut by = pending.first().map_or_else(Instant::now, |p| p.0);
    for &(t, change) in pending {
        let mut at = t + change.visible_after();
        let lingering = departures.iter().any(|&d| d <= t && t < d + LD * 11 + RP);
        if matches!(change, Change::Join | Change::Heal) && lingering {
            at = t + LD;
        }
        by = by.max(at);
    }
    by
}

#[derive(Default)]
struct Figures {
    settled: BTreeMap<&'static str, Vec<Duration>>,
    moved: usize,
    lost_or_gained: usize,
}

fn name(c: Change) -> &'static str {
    match c {
        Change::Join => "join",
        Change::Leave => "graceful leave",
        Change::Crash => "crash",
        Change::Cut => "cut off",
        Change::Heal => "healed",
    }
}

/// Whether every shard has exactly the owner the assignment names for the live members.
fn settled(ledger: &Ledger, shards: u32, live: &[String]) -> bool {
    let want = assign(SET, shards, live);
    let owners = ledger.owners();
    (0..shards).all(|s| {
        let got = owners.get(&s).map(Vec::as_slice).unwrap_or_default();
        match &want[s as usize] {
            Some(w) => got.len() == 1 && got[0] == *w,
            None => got.is_empty(),
        }
    })
}

fn live_ids(members: &[Member]) -> Vec<String> {
    members
        .iter()
        .filter(|m| m.live())
        .map(|m| m.identity.clone())
        .collect()
}

fn spawn(m: &mut Member, shards: u32, seed: u64, ledger: &Ledger) {
    let handle = ShardSet::new(m.store.clone(), config(&m.identity, shards))
        .unwrap()
        .jitter_seed(seed)
        .spawn();
    m.worker = Some(worker(&handle, m.identity.clone(), ledger.clone()));
    m.handle = Some(handle);
}

fn simulate(seed: u64, figures: &mut Figures) -> usize {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build()
        .unwrap();
    rt.block_on(async {
        let mut rng = SmallRng::seed_from_u64(seed);
        let shards = [1, 7, 16, 64][rng.random_range(0..4)];
        let store = MemoryStore::new();
        let ledger = Ledger::default();
        let mut members: Vec<Member> = (0..POOL)
            .map(|i| Member {
                identity: format!("m{i}"),
                store: store.connect(),
                handle: None,
                worker: None,
                cut: false,
            })
            .collect();
        let context = format!("seed {seed} (S={shards})");
        let initial = rng.random_range(1..=3);
        for m in members.iter_mut().take(initial) {
            spawn(m, shards, rng.random(), &ledger);
        }
        let changes = rng.random_range(4..10);
        let mut pending: Vec<(Instant, Change)> = Vec::new();
        let mut departures: Vec<Instant> = Vec::new();
        for step in 0..changes {
            let before = live_ids(&members);
            let i = rng.random_range(0..POOL);
            let m = &mut members[i];
            let change = match (m.running(), m.cut, rng.random_range(0..10)) {
                (false, _, _) => Change::Join,
                (true, true, _) => Change::Heal,
                (true, false, 0..=3) => Change::Leave,
                (true, false, 4..=6) => Change::Crash,
                (true, false, _) => Change::Cut,
            };
            if std::env::var_os("SHARDS_SIM_TRACE").is_some() {
                eprintln!("{context}: step {step} at {:?}: {} of {}", Instant::now(), name(change), m.identity);
            }
            if matches!(change, Change::Crash | Change::Cut) {
                departures.push(Instant::now());
            }
            match change {
                Change::Join => spawn(m, shards, rng.random(), &ledger),
                Change::Leave => {
                    m.handle.take().unwrap().shutdown().await.unwrap();
                    m.worker.take().unwrap().await.unwrap();
                }
                Change::Crash => {
                    m.handle.take().unwrap().abort();
                    m.store.cut(false);
                    m.cut = false;
                    m.worker.take().unwrap().await.unwrap();
                }
                Change::Cut => {
                    m.store.cut(true);
                    m.cut = true;
                }
                Change::Heal => {
                    m.store.cut(false);
                    m.cut = false;
                }
            }
            let after = live_ids(&members);
            if before != after && !before.is_empty() && !after.is_empty() {
                let a = assign(SET, shards, &before);
                let b = assign(SET, shards, &after);
                figures.moved += a.iter().zip(&b).filter(|(x, y)| x != y).count();
                let share = |ids: &[String], set: &[Option<String>], who: &str| {
                    let _ = ids;
                    set.iter().filter(|o| o.as_deref() == Some(who)).count()
                };
                let who = &members[i].identity;
                figures.lost_or_gained += share(&before, &a, who).max(share(&after, &b, who));
            }
            // Sometimes the next change comes before this one has settled.
            let hurry = step + 1 < changes && rng.random_bool(0.3);
            if hurry {
                pending.push((Instant::now(), change));
                sleep(Duration::from_millis(rng.random_range(0..3000))).await;
                continue;
            }
            // Each change since the last settled state becomes visible to every live
            // member by `visible`; the shards are owned a lease duration plus a
            // (jittered: up to 1.2 ×) retry period after the last of them.
            pending.push((Instant::now(), change));
            let visible = visible_by(&pending, &departures);
            pending.clear();
            let began = Instant::now();
            let bound = visible.saturating_duration_since(began) + LD + RP.mul_f64(1.2);
            let live = live_ids(&members);
            loop {
                let owners = ledger.owners();
                if let Some((shard, who)) = owners.iter().find(|(_, who)| who.len() > 1) {
                    panic!("{context}: step {step}: shard {shard} has two owners now: {who:?}");
                }
                if settled(&ledger, shards, &live) {
                    break;
                }
                let waited = began.elapsed();
                assert!(
                    waited <= bound,
                    "{context}: step {step}, {} of {}: not settled {waited:?} after the change (bound {bound:?}); live {live:?}, owners {:?}",
                    name(change),
                    members[i].identity,
                    ledger.owners()
                );
                sleep(Duration::from_millis(10)).await;
            }
            figures
                .settled
                .entry(name(change))
                .or_default()
                .push(began.elapsed());
            // Settled is stable: nothing moves while nothing changes.
            sleep(Duration::from_millis(rng.random_range(0..5000))).await;
            assert!(
                settled(&ledger, shards, &live),
                "{context}: step {step}: ownership moved while nothing changed: {:?}",
                ledger.owners()
            );
            let per = leaderz::shards::by_member(&assign(SET, shards, &live));
            let n = live.len();
            if let Some(floor) = (shards as usize).checked_div(n) {
                for (who, owned) in &per {
                    assert!(
                        owned.len() == floor || owned.len() == floor + 1,
                        "{context}: {who} owns {} of {shards} shards among {n} members",
                        owned.len()
                    );
                }
            }
        }
        for m in &mut members {
            if let Some(h) = m.handle.take() {
                m.store.cut(false);
                h.shutdown().await.unwrap();
                m.worker.take().unwrap().await.unwrap();
            }
        }
        assert!(
            ledger.owners().is_empty(),
            "{context}: terms still open after everyone left"
        );
        ledger.check(&context)
    })
}

#[test]
fn shards_have_one_owner_and_settle_balanced_within_the_bound() {
    let mut figures = Figures::default();
    if let Ok(seed) = std::env::var("SHARDS_SIM_SEED") {
        let seed: u64 = seed.parse().expect("SHARDS_SIM_SEED must be a number");
        let terms = simulate(seed, &mut figures);
        println!("seed {seed}: {terms} shard terms, no overlap");
        return;
    }
    let seeds: u64 = std::env::var("SHARDS_SIM_SEEDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(24);
    let base: u64 = std::env::var("SHARDS_SIM_BASE")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(rand::random);
    #[allow(clippy::disallowed_types)] // the run's real duration, for the report
    let began = std::time::Instant::now();
    let mut terms = 0;
    for seed in base..base + seeds {
        match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            simulate(seed, &mut figures)
        })) {
            Ok(n) => terms += n,
            Err(e) => {
                eprintln!("shard simulation failed; replay with SHARDS_SIM_SEED={seed}");
                std::panic::resume_unwind(e);
            }
        }
    }
    println!(
        "shard simulation: {seeds} seeds from {base}, {terms} shard terms, never two owners, {:.1}s",
        began.elapsed().as_secs_f64()
    );
    for (change, times) in &mut figures.settled {
        times.sort();
        let p50 = times[times.len() / 2];
        let max = times[times.len() - 1];
        println!(
            "  settled after a {change}: {} times, p50 {p50:?}, max {max:?}",
            times.len()
        );
    }
    println!(
        "  shards moved by the assignment: {} for {} lost or gained by the changing member",
        figures.moved, figures.lost_or_gained
    );
}
