//! Regression tests for the engine defects listed in issue 12, each named after the
//! defect it guards. In-memory lock, paused tokio time: exact timings, no sleeping.
//! (Defect 1 and 10 are in `engine.rs`; 6 and 8 are unit tests next to the code; 9, 11
//! and 14's binary side belong to the `leaderz` binary's tests.)

#![allow(clippy::unwrap_used)] // tests: a panic is the failure report

mod common;

use std::time::Duration;

use common::{Faults, FaultyLock};
use leaderz::{Callbacks, ElectionConfig, Elector, LeaderRecord, MemoryLock, Metrics};
use tokio::time::{Instant, sleep, timeout};
use tokio_util::sync::CancellationToken;

fn config(id: &str) -> ElectionConfig {
    ElectionConfig::new(id)
}

fn secs(s: u64) -> Duration {
    Duration::from_secs(s)
}

fn ms(m: u64) -> Duration {
    Duration::from_millis(m)
}

/// Defect 2: shutting down while a taking write is in flight must not leave the lease
/// held by a stopped process: the take is resolved and, if it landed, released.
#[tokio::test(start_paused = true)]
async fn shutdown_during_an_in_flight_take_releases_what_landed() {
    let mem = MemoryLock::new("l");
    mem.force(Some(LeaderRecord {
        lease_duration_seconds: Some(1),
        ..Default::default()
    }));
    let faulty = FaultyLock::new(mem.clone(), 1);
    faulty.set(Faults {
        // The take lands 1 s after it is sent and is answered 1 s later.
        write_delay: Some((secs(1), secs(1))),
        ..Faults::default()
    });
    let a = Elector::new(faulty.clone(), config("a")).unwrap().spawn();
    sleep(ms(500)).await; // the take is in flight
    assert_eq!(mem.peek().unwrap().record.holder_identity, "");
    a.shutdown().await.unwrap();
    let rec = mem.peek().unwrap().record;
    assert_eq!(
        rec.holder_identity, "",
        "the stopped process must not hold the lease: {rec:?}"
    );
    assert_eq!(rec.lease_transitions, 1, "it was taken, then released");
}

/// Defect 3: 401/403 after a good start are an outage: the leader steps down at once,
/// everyone keeps campaigning, and leadership returns when access does.
#[tokio::test(start_paused = true)]
async fn access_refused_after_start_is_ridden_out() {
    for code in [403, 401] {
        let mem = MemoryLock::new("l");
        let faulty = FaultyLock::new(mem.clone(), 2);
        let a = Elector::new(faulty.clone(), config("a")).unwrap().spawn();
        let term = a.acquired().await.unwrap();
        sleep(ms(500)).await;
        faulty.set(Faults {
            refuse: Some(code),
            ..Faults::default()
        });
        let refused_at = Instant::now();
        term.cancelled().await;
        assert_eq!(
            refused_at.elapsed(),
            ms(1500),
            "{code}: steps down at the first refused renewal"
        );
        drop(term);
        sleep(secs(60)).await;
        assert!(!a.is_leader());
        faulty.set(Faults::default());
        let healed = Instant::now();
        let term = timeout(secs(30), a.acquired())
            .await
            .expect("leads again once access is back")
            .unwrap();
        assert!(
            healed.elapsed() <= secs(10),
            "{code}: back after {:?}",
            healed.elapsed()
        );
        assert_eq!(term.fencing_token(), 1);
        drop(term);
        a.shutdown().await.unwrap();
    }
}

/// Defect 3, the part that stays: a refusal while the election starts is still a
/// clear, fatal error.
#[tokio::test(start_paused = true)]
async fn access_refused_at_start_is_fatal() {
    let faulty = FaultyLock::new(MemoryLock::new("l"), 3);
    faulty.set(Faults {
        refuse: Some(403),
        ..Faults::default()
    });
    let mut a = Elector::new(faulty, config("a")).unwrap().spawn();
    let err = timeout(secs(1), a.join()).await.unwrap().unwrap_err();
    assert!(
        err.to_string().starts_with("forbidden: grant `get`"),
        "{err}"
    );
}

/// Defect 3, found by the binary's tests: a refused create after a 404 is a start-up
/// refusal even when the watch (which proves nothing about writing) opened first.
#[tokio::test(start_paused = true)]
async fn a_refused_first_create_is_fatal_even_after_a_watch_opened() {
    let faulty = FaultyLock::new(MemoryLock::new("l"), 10);
    faulty.set(Faults {
        refuse_writes: true,
        max_latency: ms(5),
        ..Faults::default()
    });
    let mut a = Elector::new(faulty, config("a")).unwrap().spawn();
    let err = timeout(secs(1), a.join()).await.unwrap().unwrap_err();
    assert!(
        err.to_string().starts_with("forbidden: grant `create`"),
        "{err}"
    );
}

/// Defect 4: a take whose answer is lost must be recognised as ours when it lands,
/// even after reads in between showed the record it was based on (and a second take
/// lost the race to it) — not waited out like someone else's lease.
#[tokio::test(start_paused = true)]
async fn a_late_landing_take_is_recognised_after_reads_of_its_base() {
    let mem = MemoryLock::new("l");
    mem.force(Some(LeaderRecord {
        lease_duration_seconds: Some(1),
        ..Default::default()
    }));
    let faulty = FaultyLock::new(mem.clone(), 4);
    // The first take lands at 6 s and is answered long after the 1 s request timeout.
    faulty.set(Faults {
        write_delay: Some((secs(6), secs(60))),
        ..Faults::default()
    });
    let t0 = Instant::now();
    let b = Elector::new(faulty.clone(), config("b").request_timeout(secs(1)))
        .unwrap()
        .spawn();
    sleep(ms(10)).await;
    // The retry (after a read of the base record at ~3 s) lands after the first one:
    // it conflicts, and its answer is lost too.
    faulty.set(Faults {
        write_delay: Some((secs(3), secs(60))),
        ..Faults::default()
    });
    sleep(secs(4)).await;
    faulty.set(Faults::default());
    let term = timeout(secs(30), b.acquired()).await.unwrap().unwrap();
    let led = t0.elapsed();
    assert!(
        led <= secs(10),
        "led after {led:?}: its own landed write was waited out"
    );
    assert!(term.fencing_token() >= 1);
}

/// Defect 5: after falling back to polling, the follower watches again later.
#[tokio::test(start_paused = true)]
async fn polling_is_not_forever() {
    let mem = MemoryLock::new("l");
    let a = Elector::new(mem.clone(), config("a")).unwrap().spawn();
    a.acquired().await.unwrap();
    let faulty = FaultyLock::new(mem.clone(), 5);
    faulty.set(Faults {
        watch_ends: true,
        ..Faults::default()
    });
    let b = Elector::new(faulty.clone(), config("b")).unwrap().spawn();
    sleep(secs(20)).await;
    let polling = b.status().borrow().polling.clone();
    assert!(polling.is_some(), "polls while the watch keeps ending");
    faulty.set(Faults::default());
    sleep(secs(40)).await;
    let s = b.status().borrow().clone();
    assert!(s.watching && s.polling.is_none(), "{s:?}");
    // And the watch works: a release is taken at once.
    let t0 = Instant::now();
    a.shutdown().await.unwrap();
    b.acquired().await.unwrap();
    assert_eq!(t0.elapsed(), Duration::ZERO);
}

/// Defect 5: a watch from a compacted version (410 Gone) starts again from a fresh
/// read instead of failing for ever.
#[tokio::test(start_paused = true)]
async fn gone_watch_restarts_from_a_fresh_read() {
    let mem = MemoryLock::new("l");
    let a = Elector::new(mem.clone(), config("a")).unwrap().spawn();
    a.acquired().await.unwrap();
    let faulty = FaultyLock::new(mem.clone(), 6);
    let b = Elector::new(faulty.clone(), config("b")).unwrap().spawn();
    sleep(secs(1)).await;
    assert!(b.status().borrow().watching);
    // b's watch falls behind (a renews meanwhile), etcd compacts, the watch ends.
    faulty.stall_watches(true);
    sleep(ms(4100)).await;
    let current: u64 = mem.peek().unwrap().version.parse().unwrap();
    faulty.set(Faults {
        compacted: Some(current),
        ..Faults::default()
    });
    faulty.end_watches();
    faulty.stall_watches(false);
    sleep(secs(10)).await;
    let s = b.status().borrow().clone();
    assert!(s.watching && s.polling.is_none(), "{s:?}");
    let t0 = Instant::now();
    a.shutdown().await.unwrap();
    b.acquired().await.unwrap();
    assert_eq!(
        t0.elapsed(),
        Duration::ZERO,
        "the new watch shows the release"
    );
}

/// Defect 7: resourceVersions are opaque. After an etcd restore moves them backwards,
/// followers keep following (and see a release at once).
#[tokio::test(start_paused = true)]
async fn versions_going_backwards_do_not_wedge_followers() {
    let mem = MemoryLock::new("l");
    let a = Elector::new(mem.clone(), config("a")).unwrap().spawn();
    a.acquired().await.unwrap();
    let b = Elector::new(mem.clone(), config("b")).unwrap().spawn();
    sleep(secs(21)).await; // ~10 renewals: versions ~12
    let rec = mem.peek().unwrap().record;
    mem.restore(Some(rec), 2);
    sleep(secs(5)).await; // a renews from the restored version on
    assert!(a.is_leader(), "a's slow path renews on the restored record");
    let t0 = Instant::now();
    a.shutdown().await.unwrap();
    timeout(secs(3), b.acquired())
        .await
        .expect("b sees the release")
        .unwrap();
    assert_eq!(t0.elapsed(), Duration::ZERO);
}

/// Defect 12: a leader that finds its lease written under its identity by someone else
/// (a client-go candidate with the same identity re-takes it as its own) steps down,
/// loudly, at its next renewal.
#[tokio::test(start_paused = true)]
async fn a_leader_steps_down_when_another_process_uses_its_identity() {
    let lock = MemoryLock::new("l");
    let a = Elector::new(lock.clone(), config("a")).unwrap().spawn();
    let term = a.acquired().await.unwrap();
    sleep(ms(500)).await;
    // What client-go does with a lease naming its own identity: renew it as its own.
    let mut rec = lock.peek().unwrap().record;
    rec.renew_time = Some("2031-01-01T00:00:00.123456Z".parse().unwrap());
    lock.force(Some(rec));
    let t0 = Instant::now();
    term.cancelled().await;
    assert_eq!(t0.elapsed(), ms(1500), "at the next renewal");
    let problem = a.status().borrow().problem.clone().unwrap();
    assert!(
        problem.contains("another process uses identity a"),
        "{problem}"
    );
    drop(term);
    // It does not take the lease back while the other process's record is valid.
    sleep(secs(10)).await;
    assert!(!a.is_leader());
}

/// Defect 13: a watch that stops delivering (a half-open connection) is noticed when
/// the holder's next renewal fails to show up, not only at the lease's expiry.
#[tokio::test(start_paused = true)]
async fn a_silent_watch_is_noticed_within_two_renewal_intervals() {
    let mem = MemoryLock::new("l");
    let a = Elector::new(mem.clone(), config("a")).unwrap().spawn();
    a.acquired().await.unwrap();
    let faulty = FaultyLock::new(mem.clone(), 7);
    let b = Elector::new(faulty.clone(), config("b")).unwrap().spawn();
    sleep(ms(10_100)).await; // b saw the renewals at 2, 4, 6, 8, 10 s
    faulty.stall_watches(true);
    sleep(secs(1)).await;
    a.shutdown().await.unwrap(); // released at 11.1 s; b's watch shows nothing
    let released = Instant::now();
    b.acquired().await.unwrap();
    // Expected a renewal by 10 + 2×2 + 1 = 15 s: checked then with one read.
    assert_eq!(released.elapsed(), ms(3900), "noticed at 15 s");
}

/// Defect 15: opening a watch does not hold up shutdown, nor a takeover at expiry.
#[tokio::test(start_paused = true)]
async fn a_hanging_watch_open_holds_up_neither_shutdown_nor_takeover() {
    let mem = MemoryLock::new("l");
    let a = Elector::new(mem.clone(), config("a")).unwrap().spawn();
    a.acquired().await.unwrap();
    let faulty = FaultyLock::new(mem.clone(), 8);
    let b = Elector::new(faulty.clone(), config("b")).unwrap().spawn();
    sleep(ms(2500)).await; // b saw a's renewal at 2 s: expires at 17 s
    a.abort();
    sleep(secs(14)).await; // 16.5 s
    faulty.set(Faults {
        hang_watch: true,
        ..Faults::default()
    });
    faulty.end_watches(); // b re-opens; the open hangs
    let start = Instant::now();
    b.acquired().await.unwrap();
    assert_eq!(start.elapsed(), ms(500), "took over at the expiry instant");

    let c = Elector::new(faulty.clone(), config("c")).unwrap().spawn();
    sleep(secs(1)).await; // c's watch open hangs
    let t0 = Instant::now();
    c.shutdown().await.unwrap();
    assert_eq!(t0.elapsed(), Duration::ZERO, "shutdown is not held up");
}

/// Defect 15: callbacks stop waiting for work that ignores its ended term when the
/// caller asks to shut down.
#[tokio::test(start_paused = true)]
async fn callbacks_honour_shutdown_after_a_loss() {
    let mem = MemoryLock::new("l");
    let faulty = FaultyLock::new(mem.clone(), 9);
    let callbacks = Callbacks::new(|term| async move {
        term.cancelled().await;
        // Ignores the end of its term for a long time.
        sleep(secs(3600)).await;
        drop(term);
    });
    let stop = CancellationToken::new();
    let run = tokio::spawn(
        Elector::new(faulty.clone(), config("a"))
            .unwrap()
            .run(callbacks, stop.clone()),
    );
    sleep(secs(3)).await;
    faulty.set(Faults {
        hang: true,
        ..Faults::default()
    });
    sleep(secs(15)).await; // the term ended at 12 s; the work goes on
    let t0 = Instant::now();
    stop.cancel();
    timeout(secs(1), run)
        .await
        .expect("run returns promptly")
        .unwrap()
        .unwrap();
    assert_eq!(t0.elapsed(), Duration::ZERO);
}

/// Defect 15: the metrics' `name` label is the lease's name, as client-go's
/// `config.Name` is (not namespace/name).
#[tokio::test(start_paused = true)]
async fn metrics_name_label_is_the_lease_name() {
    let mut registry = prometheus_client::registry::Registry::default();
    let metrics = Metrics::new(&mut registry);
    let a = Elector::new(MemoryLock::new("my-lock"), config("a"))
        .unwrap()
        .metrics(metrics)
        .spawn();
    a.acquired().await.unwrap();
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
    assert!(
        text.contains("leader_election_master_status{name=\"my-lock\"} 1"),
        "{text}"
    );
}

/// Defect 15: a garbage record is reported once per version, not on every look at it.
#[test]
fn garbage_is_reported_once_per_version() {
    use std::sync::{Arc, Mutex};
    #[derive(Clone, Default)]
    struct Buf(Arc<Mutex<Vec<u8>>>);
    impl std::io::Write for Buf {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let buf = Buf::default();
    let writer = buf.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_writer(move || writer.clone())
        .with_max_level(tracing::Level::WARN)
        .finish();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build()
        .unwrap();
    tracing::subscriber::with_default(subscriber, || {
        rt.block_on(async {
            let mem = MemoryLock::new("l");
            mem.force(Some(LeaderRecord {
                holder_identity: "x".into(),
                lease_duration_seconds: Some(i32::MAX),
                ..Default::default()
            }));
            // Polling (no watch): the record is looked at on every poll.
            let b = Elector::new(mem.clone(), config("b").watch(false))
                .unwrap()
                .spawn();
            sleep(secs(60)).await;
            b.abort();
        });
    });
    let logs = String::from_utf8(buf.0.lock().unwrap().clone()).unwrap();
    let n = logs.matches("capping it").count();
    assert_eq!(n, 1, "{logs}");
}
