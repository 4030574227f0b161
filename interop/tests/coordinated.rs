//! Coordinated leader election (KEP-4355) against a real kube-apiserver: with the
//! `CoordinatedLeaderElection` feature gate on, the controller inside kube-apiserver
//! elects among the candidates' `LeaseCandidate`s (lowest emulation version first) and
//! asks a holder to step down for a better candidate; leaderz and client-go candidates
//! (`Coordinated: true`) take part side by side. With the gate off, leaderz's coordinated
//! mode fails fast and says which flags the API server needs.

#![allow(clippy::unwrap_used)] // tests: a panic is the failure report

use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use leaderz_testenv::{ControlPlane, StartOptions};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tokio::time::{Instant, sleep, timeout};

/// (timestamp ns, event) of one candidate process.
type Events = Arc<Mutex<Vec<(u64, String)>>>;

struct Candidate {
    id: String,
    events: Events,
    _child: Child,
}

fn now_ns() -> u64 {
    u64::try_from(
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_nanos(),
    )
    .unwrap()
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

fn spawn(program: &str, id: &str, emulation: &str, ns: &str, kubeconfig: &str) -> Candidate {
    let mut child = Command::new(program)
        .args(["--id", id, "--namespace", ns, "--lease", "cle"])
        .args(["--lease-duration", "3s", "--renew-deadline", "2s"])
        .args(["--retry-period", "500ms", "--coordinated"])
        .args([
            "--binary-version",
            "1.34.0",
            "--emulation-version",
            emulation,
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
    Candidate {
        id: id.to_owned(),
        events,
        _child: child,
    }
}

/// Leading intervals of every candidate: (id, start, end or now).
fn intervals(cands: &[&Candidate]) -> Vec<(String, u64, u64)> {
    let mut out = Vec::new();
    for c in cands {
        let mut start = None;
        for (ts, e) in c.events.lock().unwrap().iter() {
            match e.as_str() {
                "started_leading" => start = Some(*ts),
                "stopped_leading" => {
                    if let Some(s) = start.take() {
                        out.push((c.id.clone(), s, *ts));
                    }
                }
                _ => {}
            }
        }
        if let Some(s) = start {
            out.push((c.id.clone(), s, now_ns()));
        }
    }
    out.sort_by_key(|i| i.1);
    out
}

fn assert_no_overlap(cands: &[&Candidate]) {
    let iv = intervals(cands);
    for w in iv.windows(2) {
        assert!(
            w[1].1 >= w[0].2,
            "{} led until {} but {} started at {}",
            w[0].0,
            w[0].2,
            w[1].0,
            w[1].1
        );
    }
}

/// Who led, in order.
fn leaders(cands: &[&Candidate]) -> Vec<String> {
    intervals(cands).into_iter().map(|i| i.0).collect()
}

/// Each leader emulates an older version than the one before it: the controller only
/// ever moved leadership to a better candidate.
fn assert_improving(order: &[String]) {
    let version = |id: &str| match id {
        "lz-c" => 34,
        "lz-a" => 33,
        "lz-b" => 32,
        "lz-d" => 31,
        "cg-e" => 30,
        other => panic!("unknown candidate {other}"),
    };
    for w in order.windows(2) {
        assert!(
            version(&w[1]) < version(&w[0]),
            "leadership moved from {} to a candidate no better, {} (leaders: {order:?})",
            w[0],
            w[1]
        );
    }
}

/// Waits until `c` leads; the time it took.
async fn leads(c: &Candidate, within: Duration) -> Duration {
    let t0 = Instant::now();
    timeout(within, async {
        loop {
            let leading = {
                let ev = c.events.lock().unwrap();
                let started = ev.iter().filter(|(_, e)| e == "started_leading").count();
                let stopped = ev.iter().filter(|(_, e)| e == "stopped_leading").count();
                started > stopped
            };
            if leading {
                return;
            }
            sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .unwrap_or_else(|_| panic!("{} did not lead within {within:?}", c.id));
    t0.elapsed()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_controller_elects_the_oldest_emulation_version_and_moves_to_a_better_one() {
    let go = build_go_candidate();
    let lz = env!("CARGO_BIN_EXE_leaderz-candidate");
    let cp = ControlPlane::start(
        StartOptions::default()
            .apiserver_arg("--feature-gates=CoordinatedLeaderElection=true")
            .apiserver_arg("--runtime-config=coordination.k8s.io/v1beta1=true"),
    )
    .await
    .unwrap();
    let ns = cp.new_namespace("cle").await.unwrap();
    let kubeconfig = cp.kubeconfig_path().display().to_string();

    // Three leaderz candidates: the controller elects the one that emulates 1.32.
    let a = spawn(lz, "lz-a", "1.33.0", &ns, &kubeconfig);
    let b = spawn(lz, "lz-b", "1.32.0", &ns, &kubeconfig);
    let c = spawn(lz, "lz-c", "1.34.0", &ns, &kubeconfig);
    let first = leads(&b, Duration::from_secs(60)).await;
    sleep(Duration::from_secs(2)).await;
    assert_no_overlap(&[&a, &b, &c]);
    // The controller may elect before every candidate has registered (lz-a's
    // LeaseCandidate first, say, on a loaded machine); it then moves to a better one.
    // Every move must be to a better candidate, and lz-b must end up leading.
    let early = leaders(&[&a, &b, &c]);
    assert_improving(&early);
    assert_eq!(early.last().map(String::as_str), Some("lz-b"));
    println!(
        "coordinated: the controller elected lz-b (1.32) {first:.1?} after the start (leaders: {early:?})"
    );

    // A better (older) leaderz candidate joins: the controller asks lz-b to step down.
    let d = spawn(lz, "lz-d", "1.31.0", &ns, &kubeconfig);
    let moved = leads(&d, Duration::from_secs(60)).await;
    println!("coordinated: leadership moved to lz-d (1.31) {moved:.1?} after it joined");

    // A better client-go candidate (Coordinated: true) joins too.
    let e = spawn(&go, "cg-e", "1.30.0", &ns, &kubeconfig);
    let moved = leads(&e, Duration::from_secs(60)).await;
    println!("coordinated: leadership moved to client-go cg-e (1.30) {moved:.1?} after it joined");
    sleep(Duration::from_secs(2)).await;
    assert_no_overlap(&[&a, &b, &c, &d, &e]);
    let iv = intervals(&[&a, &b, &c, &d, &e]);
    let order = leaders(&[&a, &b, &c, &d, &e]);
    assert_improving(&order);
    assert_eq!(order[early.len() - 1..], ["lz-b", "lz-d", "cg-e"]);
    // The handover gaps (the old leader stopped its work before the new one started).
    for w in iv.windows(2) {
        println!(
            "coordinated: {} stopped -> {} started: {:.0} ms",
            w[0].0,
            w[1].0,
            (w[1].1 - w[0].2) as f64 / 1e6
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn coordinated_mode_fails_fast_without_the_feature_gate() {
    let cp = ControlPlane::shared().unwrap();
    let ns = cp.new_namespace("no-cle").await.unwrap();
    let started = Instant::now();
    let out = timeout(
        Duration::from_secs(30),
        Command::new(env!("CARGO_BIN_EXE_leaderz-candidate"))
            .args([
                "--id",
                "lz-x",
                "--namespace",
                &ns,
                "--lease",
                "cle",
                "--coordinated",
            ])
            .env("KUBECONFIG", cp.kubeconfig_path())
            .env("RUST_LOG", "off")
            .stdout(Stdio::null())
            .output(),
    )
    .await
    .expect("it must not hang")
    .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("--feature-gates=CoordinatedLeaderElection=true")
            && stderr.contains("--runtime-config=coordination.k8s.io/v1beta1=true"),
        "{stderr}"
    );
    println!(
        "coordinated mode without the gate failed in {:?}: {}",
        started.elapsed(),
        stderr.trim()
    );
}
