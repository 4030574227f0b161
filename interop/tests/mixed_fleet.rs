//! A mixed fleet on one Lease: 2 leaderz and 2 client-go candidates (client-go's own
//! `tools/leaderelection`, built from Go modules), with random graceful stops and
//! kills for `INTEROP_SECS` (default 120) seconds against the real control plane.
//!
//! Checks: the Lease's history, watched by the test, has one holder at a time and a
//! `leaseTransitions` that rises by one with each new holder; no two candidates'
//! leading intervals overlap; a lease released by either side is taken promptly by
//! the other side.

#![allow(clippy::unwrap_used)] // tests: a panic is the failure report

use std::collections::BTreeMap;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures::StreamExt;
use k8s_openapi::api::coordination::v1::Lease;
use kube::Api;
use kube::api::{WatchEvent, WatchParams};
use leaderz_testenv::ControlPlane;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tokio::time::sleep;

const LEASE: &str = "mixed";
const TIMINGS: [&str; 6] = [
    "--lease-duration",
    "3s",
    "--renew-deadline",
    "2s",
    "--retry-period",
    "500ms",
];

fn now_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Side {
    Leaderz,
    ClientGo,
}

#[derive(Clone, Debug)]
struct Event {
    ts: u64,
    id: String,
    event: String,
}

struct Candidate {
    id: String,
    side: Side,
    child: Child,
}

struct Fleet {
    ns: String,
    kubeconfig: String,
    go_binary: String,
    events: Arc<Mutex<Vec<Event>>>,
    /// When each process was SIGKILLed, by id.
    killed: BTreeMap<String, u64>,
    generation: usize,
}

impl Fleet {
    async fn start(&mut self, side: Side, slot: usize) -> Candidate {
        self.generation += 1;
        let (prefix, program) = match side {
            Side::Leaderz => ("lz", env!("CARGO_BIN_EXE_leaderz-candidate").to_owned()),
            Side::ClientGo => ("cg", self.go_binary.clone()),
        };
        let id = format!("{prefix}{slot}-{}", self.generation);
        let mut child = Command::new(program)
            .args(["--id", &id, "--namespace", &self.ns, "--lease", LEASE])
            .args(TIMINGS)
            .env("KUBECONFIG", &self.kubeconfig)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let events = self.events.clone();
        tokio::spawn(async move {
            let mut lines = BufReader::new(stdout).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                let Ok(v) = serde_json::from_str::<serde_json::Value>(&line) else {
                    continue;
                };
                events.lock().unwrap().push(Event {
                    ts: v["ts_ns"].as_u64().unwrap_or(0),
                    id: v["id"].as_str().unwrap_or_default().to_owned(),
                    event: v["event"].as_str().unwrap_or_default().to_owned(),
                });
            }
        });
        Candidate { id, side, child }
    }

    async fn stop(&mut self, c: &mut Candidate, graceful: bool) {
        let pid = Pid::from_raw(c.child.id().unwrap() as i32);
        if graceful {
            kill(pid, Signal::SIGTERM).unwrap();
        } else {
            self.killed.insert(c.id.clone(), now_ns());
            kill(pid, Signal::SIGKILL).unwrap();
        }
        let status = tokio::time::timeout(Duration::from_secs(15), c.child.wait()).await;
        assert!(status.is_ok(), "{} did not exit after SIGTERM", c.id);
    }
}

/// (time, holder, transitions) for every version of the Lease.
type History = Arc<Mutex<Vec<(u64, String, i32)>>>;

async fn watch_lease(api: Api<Lease>, history: History) {
    let mut version = "0".to_owned();
    loop {
        let params = WatchParams::default()
            .fields(&format!("metadata.name={LEASE}"))
            .timeout(60);
        let Ok(stream) = api.watch(&params, &version).await else {
            sleep(Duration::from_millis(100)).await;
            continue;
        };
        let mut stream = stream.boxed();
        while let Some(Ok(ev)) = stream.next().await {
            if let WatchEvent::Added(l) | WatchEvent::Modified(l) = ev {
                version = l.metadata.resource_version.clone().unwrap_or_default();
                let spec = l.spec.unwrap_or_default();
                history.lock().unwrap().push((
                    now_ns(),
                    spec.holder_identity.unwrap_or_default(),
                    spec.lease_transitions.unwrap_or(0),
                ));
            }
        }
    }
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
async fn leaderz_and_client_go_share_a_lease_safely() {
    let secs: u64 = std::env::var("INTEROP_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(120);
    let seed: u64 = std::env::var("INTEROP_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(rand::random);
    println!("mixed fleet: {secs}s, seed {seed} (replay the choices with INTEROP_SEED={seed})");
    let mut rng = SmallRng::seed_from_u64(seed);

    let cp = ControlPlane::shared().unwrap();
    let ns = cp.new_namespace("mixed").await.unwrap();
    let mut fleet = Fleet {
        ns: ns.clone(),
        kubeconfig: cp.kubeconfig_path().display().to_string(),
        go_binary: build_go_candidate(),
        events: Arc::default(),
        killed: BTreeMap::new(),
        generation: 0,
    };
    let history: History = Arc::default();
    let api: Api<Lease> = Api::namespaced(cp.admin_client().unwrap(), &ns);
    let watcher = tokio::spawn(watch_lease(api.clone(), history.clone()));

    let slots = [
        (Side::Leaderz, 0),
        (Side::Leaderz, 1),
        (Side::ClientGo, 0),
        (Side::ClientGo, 1),
    ];
    let mut running = Vec::new();
    for (side, slot) in slots {
        running.push(Some(fleet.start(side, slot).await));
    }

    let started = tokio::time::Instant::now();
    let (mut kills, mut graceful, mut cross) = (0, 0, 0);
    while started.elapsed() < Duration::from_secs(secs) {
        sleep(Duration::from_millis(rng.random_range(2500..5000))).await;
        let holder = history
            .lock()
            .unwrap()
            .last()
            .map(|h| h.1.clone())
            .unwrap_or_default();
        let Some(leader_idx) = running
            .iter()
            .position(|c| c.as_ref().is_some_and(|c| c.id == holder))
        else {
            continue;
        };
        let leader_side = running[leader_idx].as_ref().unwrap().side;
        let mut stopped = vec![leader_idx];
        // The first two actions are cross-side handovers, so that both directions
        // are always exercised; after that, chance decides.
        let action = if kills + graceful < 2 {
            0
        } else {
            rng.random_range(0..3)
        };
        match action {
            0 => {
                // A handover to the other side: stop the leader's same-side peer first
                // (a follower: no lease change), then the leader, gracefully.
                let peer = (0..running.len())
                    .find(|&i| {
                        i != leader_idx
                            && running[i].as_ref().is_some_and(|c| c.side == leader_side)
                    })
                    .unwrap();
                let mut c = running[peer].take().unwrap();
                fleet.stop(&mut c, true).await;
                stopped.push(peer);
                let mut c = running[leader_idx].take().unwrap();
                fleet.stop(&mut c, true).await;
                cross += 1;
                graceful += 1;
            }
            1 => {
                let mut c = running[leader_idx].take().unwrap();
                fleet.stop(&mut c, true).await;
                graceful += 1;
            }
            _ => {
                let mut c = running[leader_idx].take().unwrap();
                fleet.stop(&mut c, false).await;
                kills += 1;
            }
        }
        // Let the others take over before the stopped ones come back.
        sleep(Duration::from_millis(rng.random_range(500..4000))).await;
        for i in stopped {
            let (side, slot) = slots[i];
            running[i] = Some(fleet.start(side, slot).await);
        }
    }
    for c in running.iter_mut().flatten() {
        fleet.stop(c, true).await;
    }
    sleep(Duration::from_millis(500)).await;
    watcher.abort();
    let end = now_ns();

    // 1. The Lease's history: transitions rise by exactly one with each new holder.
    let history = history.lock().unwrap().clone();
    let mut handovers = 0;
    for w in history.windows(2) {
        let ((_, h0, t0), (_, h1, t1)) = (&w[0], &w[1]);
        if h1 != h0 && !h1.is_empty() {
            handovers += 1;
            assert_eq!(
                *t1,
                t0 + 1,
                "new holder {h1} after {h0:?} must raise transitions by one: {t0} -> {t1}"
            );
        } else {
            assert_eq!(
                t1, t0,
                "transitions changed without a new holder ({h0:?} -> {h1:?})"
            );
        }
    }
    let first = history.first().unwrap();
    let last = history.last().unwrap();
    assert_eq!(
        last.2 - first.2,
        handovers,
        "leaseTransitions must count the handovers"
    );

    // 2. Leading intervals never overlap.
    let events = fleet.events.lock().unwrap().clone();
    let mut intervals: Vec<(u64, u64, String)> = Vec::new();
    let mut open: BTreeMap<String, u64> = BTreeMap::new();
    for e in &events {
        match e.event.as_str() {
            "started_leading" => {
                open.insert(e.id.clone(), e.ts);
            }
            "stopped_leading" => {
                if let Some(s) = open.remove(&e.id) {
                    intervals.push((s, e.ts, e.id.clone()));
                }
            }
            _ => {}
        }
    }
    for (id, s) in open {
        let stop = fleet.killed.get(&id).copied().unwrap_or(end);
        intervals.push((s, stop, id));
    }
    intervals.sort();
    for w in intervals.windows(2) {
        assert!(
            w[1].0 >= w[0].1,
            "overlapping terms: {:?} and {:?}",
            w[0],
            w[1]
        );
    }

    // 3. Releases are taken promptly, by either side.
    let side_of = |id: &str| {
        if id.starts_with("lz") {
            "leaderz"
        } else {
            "client-go"
        }
    };
    let mut takes: Vec<(String, String, f64)> = Vec::new();
    for w in history.windows(2) {
        let ((t0, h0, _), (t1, h1, _)) = (&w[0], &w[1]);
        if h0.is_empty() && !h1.is_empty() {
            // Who released: the holder before the empty record.
            let releaser = history
                .iter()
                .rev()
                .skip_while(|h| h.0 > *t0)
                .find(|h| !h.1.is_empty())
                .map(|h| h.1.clone());
            if let Some(r) = releaser {
                takes.push((
                    side_of(&r).to_owned(),
                    side_of(h1).to_owned(),
                    (t1 - t0) as f64 / 1e9,
                ));
            }
        }
    }
    for (from, to, s) in &takes {
        // client-go polls every 1-2.2 x retry period (0.5 s); leaderz watches.
        let bound = if to == "leaderz" { 1.0 } else { 1.5 };
        assert!(
            *s <= bound,
            "release by {from} taken by {to} after {s:.3}s (bound {bound}s)"
        );
    }
    let lz_to_cg = takes
        .iter()
        .filter(|t| t.0 == "leaderz" && t.1 == "client-go")
        .count();
    let cg_to_lz = takes
        .iter()
        .filter(|t| t.0 == "client-go" && t.1 == "leaderz")
        .count();
    let summary = |from: &str, to: &str| {
        let v: Vec<f64> = takes
            .iter()
            .filter(|t| t.0 == from && t.1 == to)
            .map(|t| t.2 * 1000.0)
            .collect();
        let max = v.iter().cloned().fold(0.0, f64::max);
        format!("{} (max {max:.0} ms)", v.len())
    };
    println!(
        "mixed fleet: {} lease versions, {handovers} handovers, {} terms, {kills} kills, {graceful} graceful stops ({cross} forced cross-side); \
         releases taken: leaderz->client-go {}, client-go->leaderz {}, leaderz->leaderz {}, client-go->client-go {}",
        history.len(),
        intervals.len(),
        summary("leaderz", "client-go"),
        summary("client-go", "leaderz"),
        summary("leaderz", "leaderz"),
        summary("client-go", "client-go"),
    );
    assert!(
        lz_to_cg > 0 && cg_to_lz > 0,
        "both sides must take a lease the other released: {takes:?}"
    );
    assert!(
        intervals.iter().any(|i| i.2.starts_with("lz"))
            && intervals.iter().any(|i| i.2.starts_with("cg"))
    );
}
