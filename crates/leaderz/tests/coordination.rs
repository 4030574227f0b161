//! Planned handover (`leaderz.io/handoff`), preferred holders and coordinated mode, on
//! the in-memory lock with paused time. A fake controller plays kube-apiserver's
//! coordinated-election controller: it writes the holder it elects, and asks a holder
//! to step down by setting `preferredHolder`.

#![allow(clippy::unwrap_used)] // tests: a panic is the failure report

mod common;

use std::time::Duration;

use common::Ledger;
use leaderz::config::Coordinated;
use leaderz::machine::HandOverError;
use leaderz::record::{Handoff, HandoffState};
use leaderz::{ElectionConfig, Elector, LeaderRecord, MemoryLock};
use tokio::task::JoinHandle;
use tokio::time::{Instant, sleep, timeout};
use tokio_util::sync::CancellationToken;

fn secs(s: u64) -> Duration {
    Duration::from_secs(s)
}

/// A candidate process whose work records its terms in a ledger.
struct Candidate {
    stop: CancellationToken,
    crash: CancellationToken,
    task: JoinHandle<()>,
}

impl Candidate {
    fn start(lock: &MemoryLock, config: ElectionConfig, who: usize, ledger: &Ledger) -> Self {
        common::init_tracing();
        let h = Elector::new(lock.clone(), config).unwrap().spawn();
        let stop = h.shutdown_token();
        let crash = CancellationToken::new();
        let (ledger, c) = (ledger.clone(), crash.clone());
        let task = tokio::spawn(async move {
            loop {
                let term = tokio::select! {
                    _ = c.cancelled() => { h.abort(); return; }
                    t = h.acquired() => match t { Ok(t) => t, Err(_) => return },
                };
                let idx = ledger.start(who, term.fencing_token());
                tokio::select! {
                    _ = c.cancelled() => { ledger.end(idx); h.abort(); return; }
                    () = term.cancelled() => {}
                }
                ledger.end(idx);
                drop(term);
            }
        });
        Self { stop, crash, task }
    }

    async fn shutdown(self) {
        self.stop.cancel();
        self.task.await.unwrap();
    }

    async fn crash(self) {
        self.crash.cancel();
        self.task.await.unwrap();
    }
}

/// The identity of candidate `i`.
fn id(i: usize) -> String {
    format!("c{i}")
}

/// Writes `edit` of the current record, as another client would (keeping the version
/// semantics of a compare-and-swap by reading first).
fn edit(lock: &MemoryLock, edit: impl FnOnce(&mut LeaderRecord)) {
    let mut rec = lock.peek().unwrap().record;
    edit(&mut rec);
    lock.force(Some(rec));
}

async fn wait_holder(lock: &MemoryLock, who: &str) -> Instant {
    timeout(secs(60), async {
        loop {
            if lock
                .peek()
                .is_some_and(|v| v.record.holder_identity == who && v.record.handoff.is_none())
            {
                return Instant::now();
            }
            sleep(Duration::from_millis(1)).await;
        }
    })
    .await
    .unwrap_or_else(|_| panic!("{who} never held the lease"))
}

#[tokio::test(start_paused = true)]
async fn a_handoff_moves_leadership_to_the_named_candidate_without_a_gap() {
    let lock = MemoryLock::new("l");
    let ledger = Ledger::default();
    let a = Candidate::start(&lock, ElectionConfig::new(id(0)), 0, &ledger);
    sleep(secs(1)).await;
    let b = Candidate::start(&lock, ElectionConfig::new(id(1)), 1, &ledger);
    let c = Candidate::start(&lock, ElectionConfig::new(id(2)), 2, &ledger);
    sleep(secs(3)).await;
    let token = lock.peek().unwrap().record.lease_transitions;
    edit(&lock, |r| {
        r.handoff = Some(Handoff::request(Some(id(2)), "h1"))
    });
    let requested = Instant::now();
    wait_holder(&lock, &id(2)).await;
    // The holder noticed at its next renewal (within a retry period); c accepted at once.
    assert!(
        requested.elapsed() <= Duration::from_millis(2100),
        "{:?}",
        requested.elapsed()
    );
    ledger.check("handoff");
    let terms = ledger.terms();
    let (old, new) = (&terms[terms.len() - 2], &terms[terms.len() - 1]);
    assert_eq!((old.who, new.who), (0, 2));
    // No gap: the new term started the moment the old one's work had stopped.
    assert_eq!(new.start, old.end.unwrap());
    assert_eq!(new.token, i64::from(token) + 1);
    for x in [a, b, c] {
        x.shutdown().await;
    }
}

#[tokio::test(start_paused = true)]
async fn a_handoff_to_anyone_goes_to_a_follower() {
    let lock = MemoryLock::new("l");
    let ledger = Ledger::default();
    let a = Candidate::start(&lock, ElectionConfig::new(id(0)), 0, &ledger);
    sleep(secs(1)).await;
    let b = Candidate::start(&lock, ElectionConfig::new(id(1)), 1, &ledger);
    sleep(secs(1)).await;
    edit(&lock, |r| r.handoff = Some(Handoff::request(None, "h2")));
    wait_holder(&lock, &id(1)).await;
    ledger.check("handoff to anyone");
    a.shutdown().await;
    b.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn a_handoff_nobody_accepts_changes_nothing() {
    let lock = MemoryLock::new("l");
    let ledger = Ledger::default();
    let a = Candidate::start(&lock, ElectionConfig::new(id(0)), 0, &ledger);
    sleep(secs(1)).await;
    let b = Candidate::start(&lock, ElectionConfig::new(id(1)), 1, &ledger);
    sleep(secs(1)).await;
    edit(&lock, |r| {
        r.handoff = Some(Handoff::request(Some("zed".into()), "h3"))
    });
    sleep(secs(30)).await;
    let rec = lock.peek().unwrap().record;
    assert_eq!(rec.holder_identity, id(0), "the holder keeps leading");
    assert_eq!(
        rec.handoff.map(|h| h.state),
        Some(HandoffState::Requested),
        "the request stays until withdrawn"
    );
    assert_eq!(ledger.terms().len(), 1);
    a.shutdown().await;
    b.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn a_handoff_whose_target_dies_falls_back_to_an_ordinary_election() {
    let lock = MemoryLock::new("l");
    let ledger = Ledger::default();
    let a = Candidate::start(&lock, ElectionConfig::new(id(0)), 0, &ledger);
    sleep(secs(1)).await;
    let b = Candidate::start(&lock, ElectionConfig::new(id(1)), 1, &ledger);
    let c = Candidate::start(&lock, ElectionConfig::new(id(2)), 2, &ledger);
    sleep(secs(1)).await;
    edit(&lock, |r| {
        r.handoff = Some(Handoff::request(Some(id(2)), "h4"))
    });
    // c accepts at once; then it dies before the holder transfers (at its next renewal).
    timeout(secs(1), async {
        while lock
            .peek()
            .and_then(|v| v.record.handoff)
            .is_none_or(|h| h.state != HandoffState::Accepted)
        {
            sleep(Duration::from_millis(1)).await;
        }
    })
    .await
    .unwrap();
    c.crash().await;
    timeout(secs(3), async {
        while lock.peek().unwrap().record.holder_identity != id(2) {
            sleep(Duration::from_millis(1)).await;
        }
    })
    .await
    .unwrap();
    let transferred = Instant::now();
    // Nobody confirms: the transferred record expires like any other, and someone else
    // takes over.
    let took = timeout(secs(60), async {
        loop {
            let rec = lock.peek().unwrap().record;
            if rec.holder_identity != id(2) && rec.holder().is_some() {
                return Instant::now();
            }
            sleep(Duration::from_millis(1)).await;
        }
    })
    .await
    .unwrap();
    let after = took - transferred;
    assert!(
        after >= secs(15) && after <= secs(15) + secs(2),
        "taken over {after:?} after the transfer (lease duration 15 s)"
    );
    ledger.check("dead target");
    a.shutdown().await;
    b.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn a_preferred_holder_is_honoured_in_ordinary_mode() {
    let lock = MemoryLock::new("l");
    let ledger = Ledger::default();
    let a = Candidate::start(&lock, ElectionConfig::new(id(0)), 0, &ledger);
    sleep(secs(1)).await;
    let b = Candidate::start(&lock, ElectionConfig::new(id(1)), 1, &ledger);
    let c = Candidate::start(&lock, ElectionConfig::new(id(2)), 2, &ledger);
    sleep(secs(1)).await;
    // A (third-party) strategy prefers c.
    edit(&lock, |r| {
        r.strategy = Some("example.com/mine".into());
        r.preferred_holder = Some(id(2));
    });
    // a steps down and releases; b leaves the released lease to c; c takes it.
    wait_holder(&lock, &id(2)).await;
    let rec = lock.peek().unwrap().record;
    assert_eq!(rec.strategy.as_deref(), Some("example.com/mine"), "kept");
    assert_eq!(rec.preferred_holder, None, "fulfilled");
    ledger.check("preferred holder");
    assert!(ledger.terms().iter().all(|t| t.who != 1), "b never led");
    for x in [a, b, c] {
        x.shutdown().await;
    }
}

#[tokio::test(start_paused = true)]
async fn coordinated_candidates_lead_only_when_the_controller_names_them() {
    let lock = MemoryLock::new("l");
    let ledger = Ledger::default();
    let coordinated = |i| ElectionConfig::new(id(i)).coordinated(Coordinated::new("1.34.0"));
    let cands: Vec<_> = (0..3)
        .map(|i| Candidate::start(&lock, coordinated(i), i, &ledger))
        .collect();
    sleep(secs(30)).await;
    assert!(
        lock.peek().is_none(),
        "nobody creates the Lease on their own"
    );
    assert!(ledger.terms().is_empty());

    // The controller elects c1.
    lock.force(Some(LeaderRecord {
        holder_identity: id(1),
        lease_duration_seconds: Some(5),
        renew_time: Some(jiff::Timestamp::now()),
        strategy: Some("OldestEmulationVersion".into()),
        ..Default::default()
    }));
    wait_holder(&lock, &id(1)).await;
    sleep(secs(1)).await;
    let terms = ledger.terms();
    assert_eq!(terms.len(), 1);
    assert_eq!(terms[0].who, 1);
    let rec = lock.peek().unwrap().record;
    assert_eq!(
        rec.lease_duration_seconds,
        Some(15),
        "renewed with its own duration"
    );
    assert_eq!(
        rec.strategy.as_deref(),
        Some("OldestEmulationVersion"),
        "kept"
    );

    // A better candidate: the controller asks c1 to step down in favour of c2. c1 stops
    // its work, then releases; the controller names c2.
    edit(&lock, |r| r.preferred_holder = Some(id(2)));
    timeout(secs(15), async {
        while lock.peek().unwrap().record.holder().is_some() {
            sleep(Duration::from_millis(1)).await;
        }
    })
    .await
    .expect("c1 releases after stepping down");
    let released = Instant::now();
    assert_eq!(ledger.terms()[0].end.map(|e| e <= released), Some(true));
    // As kube-apiserver's controller writes an assignment: no acquireTime.
    edit(&lock, |r| {
        r.holder_identity = id(2);
        r.preferred_holder = None;
        r.lease_duration_seconds = Some(5);
        r.renew_time = Some(jiff::Timestamp::now());
        r.acquire_time = None;
    });
    let named = Instant::now();
    timeout(secs(5), async {
        while ledger.terms().last().is_none_or(|t| t.who != 2) {
            sleep(Duration::from_millis(1)).await;
        }
    })
    .await
    .expect("c2 leads once the controller names it");
    assert!(
        named.elapsed() <= Duration::from_millis(2),
        "at once (it watches)"
    );
    ledger.check("coordinated");
    for c in cands {
        c.shutdown().await;
    }
}

/// The leader hands its lease over through its own handle (the library's planned
/// handover): the named candidate leads next, with the next token, without a gap; a
/// request nobody accepts is withdrawn after a lease duration and the leader keeps
/// leading; a follower cannot ask.
#[tokio::test(start_paused = true)]
async fn the_leader_hands_over_through_its_handle() {
    let lock = MemoryLock::new("l");
    let ledger = Ledger::default();
    let a = Elector::new(lock.clone(), ElectionConfig::new(id(0)))
        .unwrap()
        .spawn();
    let term = a.acquired().await.unwrap();
    let first = ledger.start(0, term.fencing_token());
    let b = Candidate::start(&lock, ElectionConfig::new(id(1)), 1, &ledger);
    let c = Candidate::start(&lock, ElectionConfig::new(id(2)), 2, &ledger);
    sleep(secs(3)).await;

    // Nobody of that name: withdrawn after a lease duration, still ours.
    assert_eq!(a.hand_over(Some(&id(0))).await, Err(HandOverError::ToSelf));
    let asked = Instant::now();
    let id_zz = a.hand_over(Some("zz")).await.unwrap();
    assert_eq!(
        a.hand_over(None).await,
        Err(HandOverError::Pending(id_zz.clone()))
    );
    sleep(Duration::from_millis(10)).await;
    let rec = lock.peek().unwrap().record;
    assert_eq!(rec.handoff.map(|h| h.id), Some(id_zz), "published at once");
    timeout(secs(20), async {
        while lock.peek().unwrap().record.handoff.is_some() {
            sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .expect("withdrawn");
    let withdrawn = asked.elapsed();
    assert!(
        withdrawn >= secs(15) && withdrawn <= secs(17),
        "withdrawn after a lease duration (+ a renewal): {withdrawn:?}"
    );
    assert!(term.is_active() && a.is_leader());

    // To c2: it leads next, at once after our work stopped.
    let token = lock.peek().unwrap().record.lease_transitions;
    let asked = Instant::now();
    a.hand_over(Some(&id(2))).await.unwrap();
    term.cancelled().await;
    ledger.end(first);
    drop(term);
    wait_holder(&lock, &id(2)).await;
    assert!(
        asked.elapsed() <= Duration::from_millis(2100),
        "{:?}",
        asked.elapsed()
    );
    ledger.check("hand_over");
    let terms = ledger.terms();
    let (old, new) = (&terms[terms.len() - 2], &terms[terms.len() - 1]);
    assert_eq!((old.who, new.who), (0, 2));
    assert_eq!(new.start, old.end.unwrap());
    assert_eq!(new.token, i64::from(token) + 1);

    // A follower cannot ask.
    sleep(secs(1)).await;
    assert_eq!(a.hand_over(None).await, Err(HandOverError::NotLeading));
    a.shutdown().await.unwrap();
    for x in [b, c] {
        x.shutdown().await;
    }
}
