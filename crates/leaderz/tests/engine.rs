//! The engine on the in-memory lock, on paused tokio time: no real sleeps, exact timings.

#![allow(clippy::unwrap_used)] // tests: a panic is the failure report

mod common;

use std::time::Duration;

use common::{Faults, FaultyLock, init_tracing};
use leaderz::{Callbacks, ElectionConfig, Elector, LeaderRecord, MemoryLock};
use tokio::time::{Instant, sleep};
use tokio_util::sync::CancellationToken;

fn config(id: &str) -> ElectionConfig {
    ElectionConfig::new(id)
}

fn secs(s: u64) -> Duration {
    Duration::from_secs(s)
}

#[tokio::test(start_paused = true)]
async fn lone_candidate_creates_the_lease_like_client_go() {
    let lock = MemoryLock::new("l");
    let h = Elector::new(lock.clone(), config("a")).unwrap().spawn();
    let term = h.acquired().await.unwrap();
    assert_eq!(term.identity(), "a");
    assert_eq!(term.fencing_token(), 0);
    let rec = lock.peek().unwrap().record;
    assert_eq!(rec.holder_identity, "a");
    assert_eq!(rec.lease_duration_seconds, Some(15));
    assert_eq!(rec.lease_transitions, 0);
    assert_eq!(rec.acquire_time, rec.renew_time);
    assert_eq!(*h.leader().borrow(), Some("a".to_owned()));
}

#[tokio::test(start_paused = true)]
async fn three_candidates_one_leader() {
    let lock = MemoryLock::new("l");
    let hs: Vec<_> = ["a", "b", "c"]
        .iter()
        .map(|id| Elector::new(lock.clone(), config(id)).unwrap().spawn())
        .collect();
    sleep(secs(60)).await;
    let leaders: Vec<_> = hs.iter().filter(|h| h.is_leader()).collect();
    assert_eq!(leaders.len(), 1);
    let holder = lock.peek().unwrap().record.holder_identity;
    for h in &hs {
        assert_eq!(h.leader().borrow().as_deref(), Some(holder.as_str()));
    }
}

#[tokio::test(start_paused = true)]
async fn leader_renews_once_per_retry_period_and_followers_stay_quiet() {
    let lock = MemoryLock::new("l");
    let a = Elector::new(lock.clone(), config("a")).unwrap().spawn();
    a.acquired().await.unwrap();
    let b = Elector::new(lock.clone(), config("b")).unwrap().spawn();
    sleep(Duration::from_millis(100)).await;
    let v0: u64 = lock.peek().unwrap().version.parse().unwrap();
    sleep(secs(20)).await;
    let v1: u64 = lock.peek().unwrap().version.parse().unwrap();
    // One write per 2 s retry period, nothing else writes.
    assert_eq!(v1 - v0, 10, "writes in 20 s");
    assert!(b.status().borrow().watching, "follower should be watching");
    assert!(!b.is_leader());
}

#[tokio::test(start_paused = true)]
async fn graceful_release_hands_over_at_once() {
    init_tracing();
    let lock = MemoryLock::new("l");
    let a = Elector::new(lock.clone(), config("a")).unwrap().spawn();
    let term_a = a.acquired().await.unwrap();
    let b = Elector::new(lock.clone(), config("b")).unwrap().spawn();
    sleep(secs(5)).await;
    let t0 = Instant::now();
    drop(term_a);
    a.shutdown().await.unwrap();
    let term_b = b.acquired().await.unwrap();
    // Paused time: the release is seen through the watch with no time passing.
    assert_eq!(t0.elapsed(), Duration::ZERO);
    assert_eq!(term_b.fencing_token(), 1);
    let rec = lock.peek().unwrap().record;
    assert_eq!(rec.holder_identity, "b");
    assert_eq!(rec.lease_transitions, 1);
}

#[tokio::test(start_paused = true)]
async fn release_writes_client_go_release_record() {
    let lock = MemoryLock::new("l");
    let a = Elector::new(lock.clone(), config("a")).unwrap().spawn();
    a.acquired().await.unwrap();
    a.shutdown().await.unwrap();
    let rec = lock.peek().unwrap().record;
    assert_eq!(rec.holder_identity, "");
    assert_eq!(rec.lease_duration_seconds, Some(1));
    assert_eq!(rec.lease_transitions, 0);
}

#[tokio::test(start_paused = true)]
async fn crash_hands_over_after_the_lease_duration() {
    let lock = MemoryLock::new("l");
    let a = Elector::new(lock.clone(), config("a")).unwrap().spawn();
    a.acquired().await.unwrap();
    let b = Elector::new(lock.clone(), config("b")).unwrap().spawn();
    let start = Instant::now();
    // Renewals come every 2 s: the last one before the crash is at t=2s, seen by b at once.
    sleep(Duration::from_millis(2500)).await;
    a.abort();
    let renewed_at = start + secs(2);
    b.acquired().await.unwrap();
    let waited = renewed_at.elapsed();
    // b observed the last renewal (t=2s) at once and waits exactly the lease duration.
    assert_eq!(waited, secs(15), "takeover after {waited:?}");
}

#[tokio::test(start_paused = true)]
async fn leader_steps_down_at_renew_deadline_when_the_api_hangs() {
    let mem = MemoryLock::new("l");
    let faulty = FaultyLock::new(mem.clone(), 1);
    let a = Elector::new(faulty.clone(), config("a")).unwrap().spawn();
    let term = a.acquired().await.unwrap();
    let started = term.info().started_at;
    sleep(secs(3)).await; // one renewal at t=2s
    let deadline = term.deadline();
    assert_eq!(deadline, started + secs(2) + secs(10));
    faulty.set(Faults {
        hang: true,
        ..Faults::default()
    });
    term.cancelled().await;
    // Cancelled exactly at send time of the last successful renewal + renew deadline.
    assert_eq!(Instant::now(), deadline);
    // A follower that saw that renewal could take over only 5 s later.
    let rec = mem.peek().unwrap().record;
    assert_eq!(rec.holder_identity, "a");
}

#[tokio::test(start_paused = true)]
async fn follower_takes_over_exactly_at_expiry_when_leader_is_partitioned() {
    let mem = MemoryLock::new("l");
    let faulty = FaultyLock::new(mem.clone(), 2);
    let a = Elector::new(faulty.clone(), config("a")).unwrap().spawn();
    let term_a = a.acquired().await.unwrap();
    let t0 = Instant::now();
    let b = Elector::new(mem.clone(), config("b")).unwrap().spawn();
    sleep(Duration::from_millis(1000)).await;
    faulty.set(Faults {
        hang: true,
        ..Faults::default()
    });
    // a's last write: the take at t=0; b saw it at t=0 and takes over at exactly 15 s,
    // not a moment sooner or later.
    let term_b = b.acquired().await.unwrap();
    assert_eq!(term_b.info().started_at, t0 + secs(15));
    let a_end = term_a.deadline();
    assert!(!term_a.is_active());
    assert_eq!(a_end, t0 + secs(10), "a's term ended at its renew deadline");
    assert_eq!(term_b.fencing_token(), 1);
}

#[tokio::test(start_paused = true)]
async fn no_release_when_the_work_does_not_stop() {
    let lock = MemoryLock::new("l");
    let a = Elector::new(lock.clone(), config("a").shutdown_grace(secs(3)))
        .unwrap()
        .spawn();
    let _stuck_term = a.acquired().await.unwrap();
    let t0 = Instant::now();
    a.shutdown().await.unwrap();
    assert_eq!(t0.elapsed(), secs(3));
    assert_eq!(
        lock.peek().unwrap().record.holder_identity,
        "a",
        "must not release"
    );
}

/// The release comes only after the work dropped its term: right before it does, the
/// lease must still be ours.
#[tokio::test(start_paused = true)]
async fn release_waits_for_the_work_to_stop() {
    let lock = MemoryLock::new("l");
    let a = Elector::new(lock.clone(), config("a")).unwrap().spawn();
    let term = a.acquired().await.unwrap();
    let probe = lock.clone();
    let work = tokio::spawn(async move {
        term.cancelled().await;
        sleep(secs(2)).await; // cleanup
        let holder = probe.peek().unwrap().record.holder_identity;
        drop(term);
        holder
    });
    a.shutdown().await.unwrap();
    assert_eq!(
        work.await.unwrap(),
        "a",
        "the lease was released before the work dropped its term"
    );
    assert_eq!(lock.peek().unwrap().record.holder_identity, "");
}

#[tokio::test(start_paused = true)]
async fn polling_fallback_when_watch_is_forbidden() {
    let mem = MemoryLock::new("l");
    let a = Elector::new(mem.clone(), config("a")).unwrap().spawn();
    a.acquired().await.unwrap();
    let faulty = FaultyLock::new(mem.clone(), 3);
    faulty.set(Faults {
        forbid_watch: true,
        ..Faults::default()
    });
    let b = Elector::new(faulty, config("b")).unwrap().spawn();
    sleep(secs(1)).await;
    assert!(!b.status().borrow().watching);
    let t0 = Instant::now();
    a.shutdown().await.unwrap();
    b.acquired().await.unwrap();
    // Seen at the next poll: within 1.2 x retry period.
    assert!(
        t0.elapsed() <= Duration::from_millis(2400),
        "{:?}",
        t0.elapsed()
    );
}

#[tokio::test(start_paused = true)]
async fn leader_changes_are_deduplicated_and_none_is_explicit() {
    let lock = MemoryLock::new("l");
    let b = Elector::new(lock.clone(), config("b").release_on_cancel(true))
        .unwrap()
        .spawn();
    b.acquired().await.unwrap();
    let a = Elector::new(lock.clone(), config("a")).unwrap().spawn();
    let mut leader = a.leader();
    let seen = tokio::spawn(async move {
        let mut seen = vec![leader.borrow_and_update().clone()];
        while leader.changed().await.is_ok() {
            seen.push(leader.borrow_and_update().clone());
        }
        seen
    });
    sleep(secs(10)).await;
    b.shutdown().await.unwrap();
    sleep(secs(10)).await;
    a.shutdown().await.unwrap();
    let seen = seen.await.unwrap();
    assert!(
        seen.windows(2).all(|w| w[0] != w[1]),
        "duplicates in {seen:?}"
    );
    assert!(
        seen.contains(&Some("b".to_owned())) && seen.contains(&Some("a".to_owned())),
        "{seen:?}"
    );
    assert_eq!(seen.last(), Some(&None));
}

#[tokio::test(start_paused = true)]
async fn restarted_process_with_the_same_identity_waits_for_expiry() {
    // A crashed "a" left the lease held; a new "a" must not assume it still holds it.
    let lock = MemoryLock::new("l");
    let old = Elector::new(lock.clone(), config("a")).unwrap().spawn();
    let old_term = old.acquired().await.unwrap();
    old.abort();
    let t0 = Instant::now();
    let new = Elector::new(lock.clone(), config("a")).unwrap().spawn();
    let term = new.acquired().await.unwrap();
    assert_eq!(t0.elapsed(), secs(15));
    assert_eq!(
        term.fencing_token(),
        old_term.fencing_token() + 1,
        "a new term is a new token"
    );
}

#[tokio::test(start_paused = true)]
async fn garbage_records_are_read_safely() {
    let own = secs(15);
    for (what, rec, wait) in [
        (
            "zero duration",
            LeaderRecord {
                holder_identity: "x".into(),
                lease_duration_seconds: Some(0),
                ..Default::default()
            },
            own,
        ),
        (
            "negative duration",
            LeaderRecord {
                holder_identity: "x".into(),
                lease_duration_seconds: Some(-3),
                ..Default::default()
            },
            own,
        ),
        (
            "no duration",
            LeaderRecord {
                holder_identity: "x".into(),
                ..Default::default()
            },
            own,
        ),
        (
            "shorter than ours",
            LeaderRecord {
                holder_identity: "x".into(),
                lease_duration_seconds: Some(1),
                ..Default::default()
            },
            own,
        ),
        (
            "longer than ours",
            LeaderRecord {
                holder_identity: "x".into(),
                lease_duration_seconds: Some(40),
                ..Default::default()
            },
            secs(40),
        ),
        (
            "huge",
            LeaderRecord {
                holder_identity: "x".into(),
                lease_duration_seconds: Some(i32::MAX),
                ..Default::default()
            },
            secs(3600),
        ),
        (
            "absurd transitions",
            LeaderRecord {
                holder_identity: "x".into(),
                lease_duration_seconds: Some(15),
                lease_transitions: -40,
                ..Default::default()
            },
            own,
        ),
        (
            "empty holder",
            LeaderRecord {
                lease_duration_seconds: Some(999),
                ..Default::default()
            },
            Duration::ZERO,
        ),
    ] {
        let lock = MemoryLock::new("l");
        lock.force(Some(rec));
        let t0 = Instant::now();
        let h = Elector::new(lock.clone(), config("a")).unwrap().spawn();
        h.acquired().await.unwrap();
        assert_eq!(t0.elapsed(), wait, "{what}");
        h.abort();
    }
}

/// Defect 10: garbage must never stop the election. An exhausted `leaseTransitions`
/// keeps the candidate running, reported, and writing nothing, until it is fixed.
#[tokio::test(start_paused = true)]
async fn exhausted_transitions_are_reported_and_the_elector_keeps_running() {
    let lock = MemoryLock::new("l");
    lock.force(Some(LeaderRecord {
        lease_transitions: i32::MAX,
        ..Default::default()
    }));
    let before = lock.peek().unwrap().version;
    let h = Elector::new(lock.clone(), config("a")).unwrap().spawn();
    sleep(secs(30)).await;
    let problem = h.status().borrow().problem.clone().expect("reported");
    assert!(problem.contains("delete the Lease"), "{problem}");
    assert!(!h.is_leader());
    assert_eq!(lock.peek().unwrap().version, before, "nothing written");
    // An admin fixes the record: the candidate takes it at once.
    lock.force(Some(LeaderRecord {
        lease_transitions: 41,
        ..Default::default()
    }));
    let term = tokio::time::timeout(secs(1), h.acquired())
        .await
        .expect("takes the fixed lease")
        .unwrap();
    assert_eq!(term.fencing_token(), 42);
    assert_eq!(h.status().borrow().problem, None);
}

/// Defect 1: a deleted Lease is re-created only after the last observed record
/// expired, with the token continuing; the leader ends its term at its next renewal.
#[tokio::test(start_paused = true)]
async fn deleted_lease_is_recreated_after_the_last_record_expired_with_the_next_token() {
    let lock = MemoryLock::new("l");
    let a = Elector::new(lock.clone(), config("a")).unwrap().spawn();
    let term_a = a.acquired().await.unwrap();
    let b = Elector::new(lock.clone(), config("b")).unwrap().spawn();
    sleep(Duration::from_millis(2500)).await;
    // a renewed at t=2 s; b saw it then.
    let renewed_at = Instant::now() - Duration::from_millis(500);
    lock.force(None);
    // a notices at its next renewal (t=4 s) and ends its term at once.
    term_a.cancelled().await;
    assert_eq!(
        renewed_at.elapsed(),
        secs(2),
        "a's term ended at its next renewal"
    );
    drop(term_a);
    // Whoever re-creates the Lease does so with the next token: a may at once (the
    // record was its own, its term has ended); b only after a's last record expired.
    let term = tokio::select! {
        t = a.acquired() => t.unwrap(),
        t = b.acquired() => t.unwrap(),
    };
    assert_eq!(term.fencing_token(), 1, "the token continues");
    assert_eq!(term.identity(), "a");
    drop(term);
    b.abort();
}

/// Defect 1, follower side: a follower never re-creates a deleted Lease before the
/// holder it last saw has expired, nor before a whole lease duration has passed since
/// the deletion (someone it did not see may have taken the Lease before it).
#[tokio::test(start_paused = true)]
async fn follower_waits_out_the_deleted_holder_before_recreating() {
    let lock = MemoryLock::new("l");
    lock.force(Some(LeaderRecord {
        holder_identity: "x".into(),
        lease_duration_seconds: Some(15),
        lease_transitions: 6,
        ..Default::default()
    }));
    let b = Elector::new(lock.clone(), config("b")).unwrap().spawn();
    sleep(secs(1)).await; // b saw x's record at t=0
    lock.force(None);
    let deleted_at = Instant::now();
    let term = b.acquired().await.unwrap();
    assert_eq!(
        deleted_at.elapsed(),
        secs(15),
        "a lease duration after the deletion"
    );
    assert_eq!(term.fencing_token(), 7);
}

#[tokio::test(start_paused = true)]
async fn overwritten_holder_ends_the_term_at_the_next_renewal() {
    let lock = MemoryLock::new("l");
    let a = Elector::new(lock.clone(), config("a")).unwrap().spawn();
    let term = a.acquired().await.unwrap();
    sleep(Duration::from_millis(500)).await;
    let mut rec = lock.peek().unwrap().record;
    rec.holder_identity = "intruder".into();
    lock.force(Some(rec));
    let t0 = Instant::now();
    term.cancelled().await;
    assert_eq!(
        t0.elapsed(),
        Duration::from_millis(1500),
        "at the next renewal"
    );
}

#[tokio::test(start_paused = true)]
async fn callbacks_fire_in_client_go_order() {
    use std::sync::{Arc, Mutex};
    let lock = MemoryLock::new("l");
    let log = Arc::new(Mutex::new(Vec::<String>::new()));
    let (l1, l2, l3) = (log.clone(), log.clone(), log.clone());
    let callbacks = Callbacks::new(move |term| {
        let l1 = l1.clone();
        async move {
            l1.lock()
                .unwrap()
                .push(format!("started {}", term.fencing_token()));
            term.cancelled().await;
            l1.lock().unwrap().push("work done".into());
        }
    })
    .on_stopped_leading(move || l2.lock().unwrap().push("stopped".into()))
    .on_new_leader(move |who| l3.lock().unwrap().push(format!("leader {who:?}")));
    let stop = CancellationToken::new();
    let run = tokio::spawn(
        Elector::new(lock.clone(), config("a"))
            .unwrap()
            .run(callbacks, stop.clone()),
    );
    sleep(secs(5)).await;
    stop.cancel();
    run.await.unwrap().unwrap();
    let log = log.lock().unwrap().clone();
    assert!(log.contains(&"leader Some(\"a\")".to_owned()), "{log:?}");
    assert!(log.contains(&"started 0".to_owned()), "{log:?}");
    let done = log.iter().position(|l| l == "work done").unwrap();
    let stopped = log.iter().position(|l| l == "stopped").unwrap();
    assert!(done < stopped, "{log:?}");
    assert_eq!(
        lock.peek().unwrap().record.holder_identity,
        "",
        "released after the work"
    );
}

/// A callback that keeps only its term's token (dropping the term at once) is still
/// waited for: the lease is released only after its clean-up ran.
#[tokio::test(start_paused = true)]
async fn a_callback_that_drops_its_term_is_waited_for_before_the_release() {
    use std::sync::{Arc, Mutex};
    let lock = MemoryLock::new("l");
    let holder_at_cleanup = Arc::new(Mutex::new(None::<String>));
    let seen = holder_at_cleanup.clone();
    let watched = lock.clone();
    let callbacks = Callbacks::new(move |term| {
        let token = term.token();
        drop(term);
        let (seen, watched) = (seen.clone(), watched.clone());
        async move {
            token.cancelled().await;
            sleep(Duration::from_millis(500)).await;
            *seen.lock().unwrap() = Some(watched.peek().unwrap().record.holder_identity);
        }
    });
    let stop = CancellationToken::new();
    let run = tokio::spawn(
        Elector::new(lock.clone(), config("a"))
            .unwrap()
            .run(callbacks, stop.clone()),
    );
    sleep(secs(3)).await;
    stop.cancel();
    run.await.unwrap().unwrap();
    assert_eq!(
        holder_at_cleanup.lock().unwrap().as_deref(),
        Some("a"),
        "still ours while the clean-up ran"
    );
    assert_eq!(lock.peek().unwrap().record.holder_identity, "", "released");
}

/// Dropping `run` (a `select!` that chose another branch) aborts a callback that
/// ignores its term, and the elector, shutting down in the background, then releases.
#[tokio::test(start_paused = true)]
async fn dropping_run_aborts_the_work_and_releases() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};
    struct Alive(Arc<AtomicBool>);
    impl Drop for Alive {
        fn drop(&mut self) {
            self.0.store(false, Ordering::SeqCst);
        }
    }
    let lock = MemoryLock::new("l");
    let alive = Arc::new(AtomicBool::new(false));
    let flag = alive.clone();
    let callbacks = Callbacks::new(move |_term| {
        let flag = flag.clone();
        async move {
            flag.store(true, Ordering::SeqCst);
            let _alive = Alive(flag);
            std::future::pending::<()>().await;
        }
    });
    let run = Elector::new(lock.clone(), config("a"))
        .unwrap()
        .run(callbacks, CancellationToken::new());
    let working = async {
        sleep(secs(2)).await;
        assert!(alive.load(Ordering::SeqCst), "leading, and the work runs");
    };
    tokio::select! {
        _ = run => panic!("run ended by itself"),
        () = working => {}
    }
    // An aborted task ends when the runtime next gets to it.
    sleep(Duration::from_millis(10)).await;
    assert!(!alive.load(Ordering::SeqCst), "the work outlived `run`");
    sleep(secs(1)).await;
    assert_eq!(lock.peek().unwrap().record.holder_identity, "", "released");
}

#[tokio::test(start_paused = true)]
async fn run_while_leading_aborts_the_work_on_loss() {
    let mem = MemoryLock::new("l");
    let faulty = FaultyLock::new(mem.clone(), 4);
    let mut a = Elector::new(faulty.clone(), config("a")).unwrap().spawn();
    let start = Instant::now();
    let ticks = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let t = ticks.clone();
    let runner = async {
        a.run_while_leading(|_term| {
            let t = t.clone();
            async move {
                loop {
                    t.lock().unwrap().push(start.elapsed());
                    sleep(Duration::from_millis(600)).await;
                }
            }
        })
        .await
        .unwrap();
    };
    let scenario = async {
        sleep(Duration::from_millis(4500)).await;
        // The last successful renewal is at t=4s: the term ends at 14 s.
        faulty.set(Faults {
            hang: true,
            ..Faults::default()
        });
        sleep(secs(20)).await;
        ticks.lock().unwrap().clone()
    };
    let ticks = tokio::select! { () = runner => panic!("runner ended"), t = scenario => t };
    // Ticks every 0.6 s from 0 to 13.8 s, none after the 14 s deadline.
    assert_eq!(ticks.len(), 24, "{ticks:?}");
    assert_eq!(ticks.last(), Some(&Duration::from_millis(13_800)));
}

// ---- regressions found in review ----------------------------------------------------

/// Review S1: an elector task that dies while leading must not leave the work
/// believing it still leads.
#[tokio::test(start_paused = true)]
async fn a_dead_elector_task_ends_the_term() {
    let lock = MemoryLock::new("l");
    let a = Elector::new(lock.clone(), config("a")).unwrap().spawn();
    let term = a.acquired().await.unwrap();
    a.abort();
    tokio::time::timeout(secs(1), term.cancelled())
        .await
        .expect("term must end with its elector");
}

/// Review L1: writes that fail at once on an expired lease are paced by the retry
/// period, not retried in a hot loop.
#[tokio::test(start_paused = true)]
async fn failing_writes_on_an_expired_lease_are_paced() {
    let mem = MemoryLock::new("l");
    mem.force(Some(LeaderRecord {
        holder_identity: "dead".into(),
        lease_duration_seconds: Some(15),
        ..Default::default()
    }));
    let faulty = FaultyLock::new(mem.clone(), 5);
    let b = Elector::new(faulty.clone(), config("b")).unwrap().spawn();
    sleep(secs(1)).await; // b has read the record: it expires at 15 s
    faulty.set(Faults {
        fail_before: 1.0,
        // Each failure takes a moment, so a hot loop shows up as a call count.
        max_latency: Duration::from_millis(1),
        ..Faults::default()
    });
    sleep(secs(14)).await; // expired now, and every call fails at once
    let before = faulty.calls();
    sleep(secs(20)).await;
    let calls = faulty.calls() - before;
    // At most a read and a write (plus a watch) per 2 s retry period.
    assert!(calls <= 30, "{calls} calls in 20 s");
    assert!(!b.is_leader());
}

/// Review L2: a watch that ends at once is not reopened in a hot loop; after a few
/// the follower polls instead, and still takes over.
#[tokio::test(start_paused = true)]
async fn a_watch_that_keeps_ending_falls_back_to_polling() {
    let mem = MemoryLock::new("l");
    let a = Elector::new(mem.clone(), config("a")).unwrap().spawn();
    a.acquired().await.unwrap();
    let faulty = FaultyLock::new(mem.clone(), 6);
    faulty.set(Faults {
        watch_ends: true,
        // Each call takes a moment, so a hot loop shows up as a call count.
        max_latency: Duration::from_millis(1),
        ..Faults::default()
    });
    let b = Elector::new(faulty.clone(), config("b")).unwrap().spawn();
    sleep(secs(20)).await;
    let calls = faulty.calls();
    assert!(calls <= 30, "{calls} calls in 20 s");
    a.shutdown().await.unwrap();
    tokio::time::timeout(Duration::from_millis(2500), b.acquired())
        .await
        .expect("polling takes over")
        .unwrap();
}

/// Review L4: edits that leave the record alone (labels, annotations) do not keep a
/// dead holder's lease alive.
#[tokio::test(start_paused = true)]
async fn metadata_only_changes_do_not_extend_the_lease() {
    let lock = MemoryLock::new("l");
    let dead = LeaderRecord {
        holder_identity: "dead".into(),
        lease_duration_seconds: Some(15),
        renew_time: Some("2020-01-01T00:00:00Z".parse().unwrap()),
        ..Default::default()
    };
    lock.force(Some(dead.clone()));
    let t0 = Instant::now();
    let b = Elector::new(lock.clone(), config("b")).unwrap().spawn();
    let toucher = {
        let lock = lock.clone();
        tokio::spawn(async move {
            loop {
                sleep(secs(4)).await;
                // Same record, new version: what a label edit looks like.
                if lock.peek().is_some_and(|v| v.record == dead) {
                    lock.force(Some(dead.clone()));
                }
            }
        })
    };
    b.acquired().await.unwrap();
    assert_eq!(t0.elapsed(), secs(15));
    toucher.abort();
}

/// Review L7: when the answer to our taking write is lost but the write landed, the
/// candidate recognises its own record and leads, instead of waiting out its own lease.
#[tokio::test(start_paused = true)]
async fn a_lost_answer_to_the_taking_write_still_starts_the_term() {
    let mem = MemoryLock::new("l");
    let faulty = FaultyLock::new(mem.clone(), 7);
    faulty.set(Faults {
        lose_write_answers: true,
        ..Faults::default()
    });
    let a = Elector::new(faulty.clone(), config("a")).unwrap().spawn();
    sleep(Duration::from_millis(100)).await;
    assert_eq!(
        mem.peek().unwrap().record.holder_identity,
        "a",
        "the create landed"
    );
    faulty.set(Faults::default());
    let t0 = Instant::now();
    let term = a.acquired().await.unwrap();
    assert!(
        t0.elapsed() <= Duration::from_millis(2400),
        "led after {:?}",
        t0.elapsed()
    );
    assert_eq!(term.fencing_token(), 0);
    // The term counts from when the lost write was sent, before the answer was lost.
    assert!(term.info().started_at < t0, "{:?}", term.info());
}

/// Review A1: `acquired()` never hands out a term that has already ended.
#[tokio::test(start_paused = true)]
async fn acquired_never_returns_an_ended_term() {
    let mem = MemoryLock::new("l");
    let faulty = FaultyLock::new(mem.clone(), 8);
    let a = Elector::new(faulty.clone(), config("a")).unwrap().spawn();
    let term = a.acquired().await.unwrap();
    faulty.set(Faults {
        hang: true,
        ..Faults::default()
    });
    term.cancelled().await;
    assert!(!a.is_leader());
    assert!(a.current_term().is_none());
    let again = tokio::time::timeout(secs(1), a.acquired()).await;
    assert!(again.is_err(), "must wait for a new term");
}

/// Issue 9: with a renew interval the leader writes once per interval while renewals
/// succeed, and retries a failed one every retry period until the deadline.
#[tokio::test(start_paused = true)]
async fn renew_interval_spaces_renewals_and_failures_are_retried_sooner() {
    let mem = MemoryLock::new("l");
    let faulty = FaultyLock::new(mem.clone(), 9);
    let a = Elector::new(faulty.clone(), config("a").renew_interval(secs(6)))
        .unwrap()
        .spawn();
    let term = a.acquired().await.unwrap();
    let t0 = Instant::now();
    let v0: u64 = mem.peek().unwrap().version.parse().unwrap();
    sleep(secs(60) - Duration::from_millis(1)).await;
    let v1: u64 = mem.peek().unwrap().version.parse().unwrap();
    assert_eq!(v1 - v0, 9, "one write per 6 s interval");
    // The renewal at 60 s fails; the retry 2 s later (not 6 s) succeeds.
    faulty.set(Faults {
        fail_before: 1.0,
        ..Faults::default()
    });
    sleep(Duration::from_millis(1001)).await; // 61 s: the attempt at 60 s failed
    assert_eq!(term.deadline(), t0 + secs(54) + secs(10));
    faulty.set(Faults::default());
    sleep(Duration::from_millis(1001)).await; // 62 s
    assert_eq!(term.deadline(), t0 + secs(62) + secs(10), "renewed at 62 s");
    assert!(term.is_active());
}
