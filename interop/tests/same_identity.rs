//! What holds when a client-go candidate is started with the identity of a leaderz
//! leader (a misconfiguration: identities must be unique), against the real control
//! plane.
//!
//! client-go takes a Lease that names its own identity as its own and leads at once
//! (client-go's `tryAcquireOrRenew`: "the lease is mine"). leaderz notices the write it
//! did not make at its next renewal, steps down and says "another process uses identity
//! …", and does not lead again while the other process renews. So the two lead together
//! for at most a retry period (plus a round trip) — which is why identities must be
//! unique when client-go candidates share the Lease. (Between leaderz processes a
//! duplicate identity is safe: a leaderz process never takes a record it did not write
//! as its own; see the engine tests.)

#![allow(clippy::unwrap_used)] // tests: a panic is the failure report

use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use leaderz_testenv::ControlPlane;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tokio::time::{sleep, timeout};

const RETRY_PERIOD_MS: u64 = 500;

/// (timestamp ns, event) lines of one candidate process.
type Events = Arc<Mutex<Vec<(u64, String)>>>;

fn spawn(program: &str, ns: &str, kubeconfig: &str) -> (Child, Events) {
    let mut child = Command::new(program)
        .args(["--id", "dup", "--namespace", ns, "--lease", "dup"])
        .args([
            "--lease-duration",
            "3s",
            "--renew-deadline",
            "2s",
            "--retry-period",
            "500ms",
        ])
        .env("KUBECONFIG", kubeconfig)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let events: Events = Arc::default();
    let sink = events.clone();
    tokio::spawn(async move {
        let mut lines = BufReader::new(stdout).lines();
        while let Ok(Some(line)) = lines.next_line().await {
            if let Ok(v) = serde_json::from_str::<serde_json::Value>(&line) {
                sink.lock().unwrap().push((
                    v["ts_ns"].as_u64().unwrap_or(0),
                    v["event"].as_str().unwrap_or_default().to_owned(),
                ));
            }
        }
    });
    (child, events)
}

fn first(events: &Events, event: &str) -> Option<u64> {
    events
        .lock()
        .unwrap()
        .iter()
        .find(|(_, e)| e == event)
        .map(|(t, _)| *t)
}

async fn wait_for(events: &Events, event: &str) -> u64 {
    timeout(Duration::from_secs(30), async {
        loop {
            if let Some(t) = first(events, event) {
                return t;
            }
            sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .unwrap_or_else(|_| panic!("no `{event}` within 30 s"))
}

fn build_go_candidate() -> String {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/build.sh");
    let out = std::process::Command::new("bash")
        .arg(script)
        .stderr(Stdio::inherit())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "building the client-go candidate failed"
    );
    String::from_utf8(out.stdout).unwrap().trim().to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_go_candidate_with_a_leaderz_leaders_identity_leads_alone_within_a_retry_period() {
    let go = build_go_candidate();
    let cp = ControlPlane::shared().unwrap();
    let ns = cp.new_namespace("dup").await.unwrap();
    let kubeconfig = cp.kubeconfig_path().display().to_string();

    let (_lz, lz_events) = spawn(env!("CARGO_BIN_EXE_leaderz-candidate"), &ns, &kubeconfig);
    wait_for(&lz_events, "started_leading").await;
    sleep(Duration::from_secs(2)).await;

    let (_cg, cg_events) = spawn(&go, &ns, &kubeconfig);
    let cg_started = wait_for(&cg_events, "started_leading").await;
    let lz_stopped = wait_for(&lz_events, "stopped_leading").await;
    let overlap_ms = lz_stopped.saturating_sub(cg_started) as f64 / 1e6;
    println!(
        "client-go with the same identity led at once; leaderz stepped down {overlap_ms:.0} ms later"
    );
    assert!(
        overlap_ms <= (RETRY_PERIOD_MS + 500) as f64,
        "both led for {overlap_ms:.0} ms: more than a retry period and a round trip"
    );

    // leaderz does not lead again while the other process keeps renewing.
    sleep(Duration::from_secs(8)).await;
    let again = lz_events
        .lock()
        .unwrap()
        .iter()
        .filter(|(_, e)| e == "started_leading")
        .count();
    assert_eq!(
        again, 1,
        "leaderz led again next to the client-go candidate"
    );
    assert_eq!(first(&cg_events, "stopped_leading"), None);
}
