//! The worker writes to the fenced ledger with its term's token, logs when it started and
//! when it got SIGTERM, and exits 0 on SIGTERM. (Also makes `cargo test --workspace` build
//! the worker binary that the fault suite runs.)

#![allow(clippy::unwrap_used)] // tests: a panic is the failure report

use std::time::Duration;

use leaderz_faults::ledger::{Ledger, WriteRequest};
use leaderz_faults::worker::read_log;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use tokio::process::Command;

#[tokio::test]
async fn writes_with_its_token_logs_and_exits_on_sigterm() {
    let ledger = Ledger::start().await.unwrap();
    let dir = std::env::temp_dir().join(format!("leaderz-faults-worker-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let log = dir.join("workers.jsonl");
    // A higher token was accepted before: this worker's writes are stale.
    assert!(ledger.submit(WriteRequest {
        resource: "r".into(),
        identity: "other".into(),
        token: 9,
        pid: 1,
        seq: 0,
        sent_ns: 0,
    }));
    let mut child = Command::new(env!("CARGO_BIN_EXE_leaderz-faults-worker"))
        .args([
            "--ledger",
            &ledger.url(),
            "--resource",
            "r",
            "--interval",
            "5ms",
        ])
        .arg("--log")
        .arg(&log)
        .env("LEADERZ_IDENTITY", "lz-0")
        .env("LEADERZ_FENCING_TOKEN", "7")
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    kill(
        Pid::from_raw(i32::try_from(child.id().unwrap()).unwrap()),
        Signal::SIGTERM,
    )
    .unwrap();
    let status = tokio::time::timeout(Duration::from_secs(5), child.wait())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(status.code(), Some(0));

    let writes = ledger.writes("r");
    let mine: Vec<_> = writes
        .iter()
        .filter(|w| w.request.identity == "lz-0")
        .collect();
    assert!(mine.len() >= 10, "{} writes in 300 ms", mine.len());
    assert!(mine.iter().all(|w| w.request.token == 7 && !w.accepted));
    let events = read_log(&log);
    let kinds: Vec<&str> = events.iter().map(|e| e.event.as_str()).collect();
    assert_eq!(kinds, ["started", "sigterm"]);
    assert!(events.iter().all(|e| e.identity == "lz-0" && e.token == 7));
    // Nothing was written after it logged SIGTERM.
    let last_sent = mine.iter().map(|w| w.request.sent_ns).max().unwrap();
    assert!(last_sent <= events[1].ts_ns);
    std::fs::remove_dir_all(&dir).unwrap();
}
