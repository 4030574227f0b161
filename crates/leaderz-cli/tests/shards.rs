//! `leaderz run --shards 64` against a real kube-apiserver + etcd: members going
//! 1 → 3 → 5 → 4 → 2 → 4 → 3 → 2, leaving by SIGTERM (graceful) and by SIGKILL of the
//! member and its command together (a crashed pod; three of them). Each member's command is the fault suite's shard
//! worker, which writes to a fenced ledger per shard with that shard's fencing token.
//!
//! Checked: per shard, the writes of different terms never interleave (no two owners at
//! once, as the work saw it) and every accepted write carries a token no lower than the
//! ones before; after every change, every shard Lease is held by the member the balanced
//! assignment names for the live members, within the bound: a lease duration + a retry
//! period after a SIGKILL (the crashed member's Lease and its shards' Leases expire a
//! lease duration after the survivors saw their last renewals, which came before the
//! kill), a lease duration + 1.2 retry periods after a join or a graceful leave (plus 2 s
//! for a loaded machine; and a lease duration more for joins while a crashed member's
//! Lease lingers). Measured: the time to settle after each change (after a SIGKILL: from
//! the kill, as the test's 50 ms polls of the Leases saw it), and the API requests per
//! second per member at rest. Timings 3 s / 2 s / 500 ms.
//!
//! Every member acts as a ServiceAccount bound only by `kube/shards/role.yaml`.
//!
//! The control plane is this file's alone, so the API server's request counters at rest
//! are this test's.

#![allow(clippy::unwrap_used)] // tests: a panic is the failure report

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use k8s_openapi::api::authorization::v1::ResourceAttributes;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::ServiceAccount;
use k8s_openapi::api::rbac::v1::{Role, RoleBinding};
use kube::Api;
use kube::api::{ListParams, PostParams};
use leaderz::shards::assign;
use leaderz_faults::ledger::{Ledger, Write};
use leaderz_testenv::ControlPlane;
use nix::sys::signal::{Signal, kill, killpg};
use nix::unistd::Pid;
use serde::Deserialize as _;
use tokio::process::{Child, Command};
use tokio::time::{Instant, sleep};

const SET: &str = "jobs";
const SHARDS: u32 = 64;
const LD: Duration = Duration::from_secs(3);
const RP: Duration = Duration::from_millis(500);

fn cp() -> &'static ControlPlane {
    ControlPlane::shared().unwrap()
}

struct Member {
    id: String,
    child: Child,
}

/// Applies `kube/shards/role.yaml` (Role, RoleBinding, ServiceAccount `leaderz-shards`)
/// in `ns` and writes a kubeconfig acting as that ServiceAccount: every member runs with
/// only what the shipped Role grants.
async fn restricted_kubeconfig(ns: &str, dir: &Path) -> PathBuf {
    let admin = cp().admin_client().unwrap();
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../../kube/shards/role.yaml");
    let text = std::fs::read_to_string(path).unwrap();
    let pp = PostParams::default();
    for doc in serde_yaml::Deserializer::from_str(&text) {
        let value = serde_yaml::Value::deserialize(doc).unwrap();
        match value["kind"].as_str().unwrap() {
            "Role" => {
                let role: Role = serde_yaml::from_value(value).unwrap();
                Api::<Role>::namespaced(admin.clone(), ns)
                    .create(&pp, &role)
                    .await
                    .unwrap();
            }
            "RoleBinding" => {
                let b: RoleBinding = serde_yaml::from_value(value).unwrap();
                Api::<RoleBinding>::namespaced(admin.clone(), ns)
                    .create(&pp, &b)
                    .await
                    .unwrap();
            }
            "ServiceAccount" => {
                let sa: ServiceAccount = serde_yaml::from_value(value).unwrap();
                Api::<ServiceAccount>::namespaced(admin.clone(), ns)
                    .create(&pp, &sa)
                    .await
                    .unwrap();
            }
            other => panic!("unexpected {other} in kube/shards/role.yaml"),
        }
    }
    let credentials = cp()
        .service_account_credentials(ns, "leaderz-shards", Duration::from_secs(3600))
        .await
        .unwrap();
    let client = kube::Client::try_from(cp().config(&credentials).unwrap()).unwrap();
    let attributes = ResourceAttributes {
        group: Some("coordination.k8s.io".into()),
        resource: Some("leases".into()),
        verb: Some("create".into()),
        namespace: Some(ns.into()),
        ..Default::default()
    };
    leaderz_testenv::wait_until_allowed(&client, attributes, Duration::from_secs(10))
        .await
        .unwrap();
    let kubeconfig = dir.join("kubeconfig-leaderz-shards");
    cp().write_kubeconfig(&kubeconfig, &credentials).unwrap();
    kubeconfig
}

fn start(ns: &str, id: &str, ledger: &Ledger, dir: &Path) -> Member {
    let log = std::fs::File::create(dir.join(format!("{id}.log"))).unwrap();
    let child = Command::new(env!("CARGO_BIN_EXE_leaderz"))
        .args(["run", "--lease", SET, "-n", ns, "--identity", id])
        .args(["--shards", &SHARDS.to_string()])
        .args(["--lease-duration", "3s", "--renew-deadline", "2s"])
        .args(["--retry-period", "500ms", "--grace", "2s"])
        .arg("--shards-file")
        .arg(dir.join(format!("{id}.shards.json")))
        .arg("--")
        .arg(leaderz_faults::shard_worker_binary().unwrap())
        .args(["--ledger", &ledger.url(), "--prefix", SET])
        // Work takes a while to stop: a lost shard must stay held until it has.
        .args(["--stop-delay", "300ms"])
        .arg("--log")
        .arg(dir.join(format!("{id}.jsonl")))
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("KUBECONFIG", dir.join("kubeconfig-leaderz-shards"))
        .env("LEADERZ_LOG_LEVEL", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    Member {
        id: id.to_owned(),
        child,
    }
}

fn pid(child: &Child) -> i32 {
    i32::try_from(child.id().unwrap()).unwrap()
}

/// The children of process `pid` (every thread's).
fn children(pid: i32) -> Vec<i32> {
    let mut out = Vec::new();
    if let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) {
        for task in tasks.flatten() {
            let list = std::fs::read_to_string(task.path().join("children")).unwrap_or_default();
            out.extend(
                list.split_whitespace()
                    .filter_map(|p| p.parse::<i32>().ok()),
            );
        }
    }
    out
}

/// Graceful: SIGTERM to leaderz, which stops the command and hands every shard over.
async fn stop(mut m: Member) {
    kill(Pid::from_raw(pid(&m.child)), Signal::SIGTERM).unwrap();
    let status = tokio::time::timeout(Duration::from_secs(20), m.child.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(status.success(), "{} exited with {status}", m.id);
}

/// A crashed pod: SIGKILL to the command's process group and to leaderz at once.
async fn crash(mut m: Member) {
    let leaderz = pid(&m.child);
    for child in children(leaderz) {
        let _ = killpg(Pid::from_raw(child), Signal::SIGKILL);
    }
    kill(Pid::from_raw(leaderz), Signal::SIGKILL).unwrap();
    m.child.wait().await.unwrap();
}

/// The holder of each shard Lease that has one.
async fn holders(api: &Api<Lease>) -> BTreeMap<u32, String> {
    let selector = "leaderz.io/shard-set=jobs,leaderz.io/shard-role=shard";
    let list = api
        .list(&ListParams::default().labels(selector))
        .await
        .unwrap();
    let mut out = BTreeMap::new();
    for lease in list.items {
        let Some(shard) = lease
            .metadata
            .labels
            .as_ref()
            .and_then(|l| l.get("leaderz.io/shard"))
            .and_then(|s| s.parse().ok())
        else {
            continue;
        };
        let Some(holder) = lease
            .spec
            .and_then(|s| s.holder_identity)
            .filter(|h| !h.is_empty())
        else {
            continue;
        };
        out.insert(shard, holder);
    }
    out
}

/// Waits until every shard is held by the member the assignment names for `live`;
/// returns how long that took. Panics after `bound`.
async fn settle(api: &Api<Lease>, live: &[&str], bound: Duration, what: &str) -> Duration {
    settle_since(api, live, Instant::now(), bound, what).await
}

/// [`settle`], timed from `began`.
async fn settle_since(
    api: &Api<Lease>,
    live: &[&str],
    began: Instant,
    bound: Duration,
    what: &str,
) -> Duration {
    let want: BTreeMap<u32, String> = assign(SET, SHARDS, live)
        .into_iter()
        .enumerate()
        .map(|(s, o)| (u32::try_from(s).unwrap(), o.unwrap()))
        .collect();
    loop {
        let got = holders(api).await;
        if got == want {
            let took = began.elapsed();
            println!(
                "{what}: {} members settled in {took:?} (bound {bound:?})",
                live.len()
            );
            return took;
        }
        assert!(
            began.elapsed() <= bound,
            "{what}: not settled after {:?} (bound {bound:?}); {} shards differ",
            began.elapsed(),
            (0..SHARDS).filter(|s| got.get(s) != want.get(s)).count()
        );
        sleep(Duration::from_millis(50)).await;
    }
}

/// Per shard: the terms' writes never interleave, and accepted tokens never fall.
fn check_ledger(ledger: &Ledger) -> usize {
    let mut total = 0;
    for shard in 0..SHARDS {
        let writes: Vec<Write> = ledger.writes(&format!("{SET}-{shard}"));
        total += writes.len();
        let mut spans: BTreeMap<i64, (u64, u64, String)> = BTreeMap::new();
        for w in &writes {
            let span = spans.entry(w.request.token).or_insert((
                w.request.sent_ns,
                w.received_ns,
                w.request.identity.clone(),
            ));
            span.0 = span.0.min(w.request.sent_ns);
            span.1 = span.1.max(w.received_ns);
            assert_eq!(
                span.2, w.request.identity,
                "shard {shard}: one token, two members"
            );
            assert!(w.accepted, "shard {shard}: a stale write was sent: {w:?}");
        }
        let spans: Vec<_> = spans.into_iter().collect();
        for pair in spans.windows(2) {
            let ((t1, (_, end1, who1)), (t2, (start2, _, who2))) = (&pair[0], &pair[1]);
            assert!(
                end1 < start2,
                "shard {shard}: token {t1} of {who1} still wrote after token {t2} of {who2} began"
            );
        }
    }
    total
}

/// Lease requests the API server has served so far (every verb).
async fn lease_requests() -> f64 {
    let client = cp().admin_client().unwrap();
    let request = http::Request::get("/metrics").body(Vec::new()).unwrap();
    let text = client.request_text(request).await.unwrap();
    text.lines()
        .filter(|l| l.starts_with("apiserver_request_total{") && l.contains("resource=\"leases\""))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sixty_four_shards_one_owner_each_through_joins_leaves_and_crashes() {
    let ns = cp().new_namespace("shards").await.unwrap();
    let api: Api<Lease> = Api::namespaced(cp().admin_client().unwrap(), &ns);
    let ledger = Ledger::start().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path().to_owned();
    restricted_kubeconfig(&ns, &dir).await;
    let join_bound = LD + RP.mul_f64(1.2) + Duration::from_secs(2);
    // From the SIGKILL, with no allowance: the claim itself.
    let crash_bound = LD + RP;
    let mut crashes = Vec::new();
    let s = |m: &Member| m.id.clone();

    // 1 member.
    let mut members: Vec<Member> = vec![start(&ns, "m0", &ledger, &dir)];
    settle(&api, &["m0"], join_bound, "start").await;

    // 1 → 3.
    members.push(start(&ns, "m1", &ledger, &dir));
    members.push(start(&ns, "m2", &ledger, &dir));
    settle(&api, &["m0", "m1", "m2"], join_bound, "1 → 3 (joins)").await;

    // 3 → 5.
    members.push(start(&ns, "m3", &ledger, &dir));
    members.push(start(&ns, "m4", &ledger, &dir));
    settle(
        &api,
        &["m0", "m1", "m2", "m3", "m4"],
        join_bound,
        "3 → 5 (joins)",
    )
    .await;

    // `leaderz status --shards` shows the shard map as the Leases hold it.
    let out = Command::new(env!("CARGO_BIN_EXE_leaderz"))
        .args(["status", "--shards", SET, "-n", &ns])
        .env_clear()
        .env("KUBECONFIG", cp().kubeconfig_path())
        .output()
        .await
        .unwrap();
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    let summary = text.lines().next().unwrap();
    println!("leaderz status --shards {SET}: {summary}");
    assert!(
        summary.starts_with("shard set jobs: 64 shards, 5 members ("),
        "{text}"
    );
    assert!(summary.ends_with(", 0 unowned"), "{text}");
    let live = ["m0", "m1", "m2", "m3", "m4"];
    for (member, owned) in leaderz::shards::by_member(&assign(SET, SHARDS, &live)) {
        assert!(
            summary.contains(&format!("{member} {}", owned.len())),
            "{member}: {text}"
        );
    }
    assert_eq!(
        text.lines()
            .filter(|l| l.starts_with(|c: char| c.is_ascii_digit()))
            .count(),
        64,
        "{text}"
    );

    // At rest with 5 members: API requests per second per member.
    sleep(Duration::from_secs(2)).await;
    let (r0, t0) = (lease_requests().await, Instant::now());
    sleep(Duration::from_secs(10)).await;
    let rate = (lease_requests().await - r0) / t0.elapsed().as_secs_f64();
    println!(
        "at rest, 5 members × {SHARDS} shards: {rate:.1} Lease requests/s, {:.2} per member",
        rate / 5.0
    );

    // 5 → 4: one graceful leave (the time to rebalance 64 shards after a graceful leave).
    let m4 = members.pop().unwrap();
    let leave_at = Instant::now();
    stop(m4).await;
    let took = settle(
        &api,
        &["m0", "m1", "m2", "m3"],
        join_bound,
        "5 → 4 (graceful)",
    )
    .await;
    println!(
        "rebalanced after a graceful leave: {:?} from SIGTERM ({took:?} after leaderz exited)",
        leave_at.elapsed()
    );

    // 4 → 2: one graceful leave and one crash at once.
    let m3 = members.pop().unwrap();
    let m2 = members.pop().unwrap();
    stop(m3).await;
    let killed = Instant::now();
    crash(m2).await;
    let took = settle_since(
        &api,
        &["m0", "m1"],
        killed,
        crash_bound,
        "4 → 2 (graceful, then SIGKILL)",
    )
    .await;
    crashes.push(took);

    // 2 → 4: two joins, while a crash's Lease is still around (it is forgotten 10 lease
    // durations after it expired): the joiners count it alive for a lease duration.
    members.push(start(&ns, "m5", &ledger, &dir));
    members.push(start(&ns, "m6", &ledger, &dir));
    let live: Vec<String> = members.iter().map(s).collect();
    let live: Vec<&str> = live.iter().map(String::as_str).collect();
    settle(&api, &live, join_bound + LD, "2 → 4 (joins)").await;

    // Crashes at 4 and then at 3: survivors take its shards within the crash bound.
    for what in ["4 → 3 (SIGKILL)", "3 → 2 (SIGKILL)"] {
        let victim = members.pop().unwrap();
        let killed = Instant::now();
        crash(victim).await;
        let live: Vec<String> = members.iter().map(s).collect();
        let live: Vec<&str> = live.iter().map(String::as_str).collect();
        crashes.push(settle_since(&api, &live, killed, crash_bound, what).await);
        // Back to settled and stable before the next kill.
        sleep(Duration::from_secs(1)).await;
    }
    println!("rebalanced after a SIGKILL, from the kill: {crashes:?} (bound {crash_bound:?})");

    for m in members {
        stop(m).await;
    }
    // Every shard was released on the way out.
    assert!(
        holders(&api).await.is_empty(),
        "shards still held after every member left"
    );
    let writes = check_ledger(&ledger);
    println!("fenced ledger: {writes} writes over {SHARDS} shards, no two terms interleaved");
    assert!(writes > 1000, "only {writes} writes");
}
