//! `leaderz run --coordinated` against a kube-apiserver with coordinated leader
//! election on (`--feature-gates=CoordinatedLeaderElection=true
//! --runtime-config=coordination.k8s.io/v1beta1=true`; a control plane of its own, since
//! the other test files' has the gate off): the candidates run as a ServiceAccount that
//! holds only `kube/role.yaml` and `kube/coordinated/role.yaml`; the controller elects
//! the oldest emulation version and moves leadership when an older one joins; `status`
//! and `watch` show the candidates; `handoff` refuses a Lease the controller runs.

#![allow(clippy::unwrap_used)] // tests: a panic is the failure report

mod common;

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use common::TIMINGS;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::coordination::v1beta1::LeaseCandidate;
use k8s_openapi::api::rbac::v1::{Role, RoleBinding};
use kube::Api;
use kube::api::{ListParams, PostParams};
use leaderz_testenv::{ControlPlane, StartOptions};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tokio::time::{Instant, sleep, timeout};

/// How long kube-apiserver's controller waits for pinged candidates to answer.
const ELECTION_DURATION: Duration = Duration::from_secs(5);

fn cp() -> &'static ControlPlane {
    static CP: OnceLock<ControlPlane> = OnceLock::new();
    CP.get_or_init(|| {
        ControlPlane::start_blocking(
            StartOptions::default()
                .apiserver_arg("--feature-gates=CoordinatedLeaderElection=true")
                .apiserver_arg("--runtime-config=coordination.k8s.io/v1beta1=true"),
        )
        .unwrap()
    })
}

/// `leaderz ARGS`; the LeaseCandidate's troubles (a refused watch) are logged at debug.
fn leaderz(kubeconfig: &Path, args: &[&str]) -> Command {
    common::leaderz_with_log(kubeconfig, args, "info,leaderz::lock=debug")
}

/// A `leaderz run --coordinated` candidate; its command logs `start ID TIME` and, on
/// SIGTERM, `stop ID TIME` to a shared log.
struct Candidate {
    id: String,
    child: Child,
    stderr: Arc<Mutex<Vec<String>>>,
}

impl Candidate {
    fn start(kubeconfig: &Path, ns: &str, id: &str, emulation: &str, log: &Path) -> Self {
        let script = format!(
            r#"echo "start $LEADERZ_IDENTITY $(date +%s.%N)" >> {l}
trap 'echo "stop $LEADERZ_IDENTITY $(date +%s.%N)" >> {l}; exit 0' TERM
while :; do sleep 0.02; done"#,
            l = log.display()
        );
        let mut args = vec!["run", "--lease", "my-lock", "-n", ns, "--identity", id];
        args.extend(TIMINGS);
        args.extend([
            "--coordinated",
            "--binary-version",
            "1.34.0",
            "--emulation-version",
            emulation,
        ]);
        args.extend(["--", "sh", "-c", &script]);
        let mut child = leaderz(kubeconfig, &args).spawn().unwrap();
        let stderr = Arc::new(Mutex::new(Vec::new()));
        let lines = stderr.clone();
        let mut reader = BufReader::new(child.stderr.take().unwrap()).lines();
        let who = id.to_owned();
        tokio::spawn(async move {
            while let Ok(Some(line)) = reader.next_line().await {
                eprintln!("  {who}: {line}");
                lines.lock().unwrap().push(line);
            }
        });
        Self {
            id: id.to_owned(),
            child,
            stderr,
        }
    }

    /// SIGTERM; waits for the exit code.
    async fn stop(mut self) -> Option<i32> {
        let pid = Pid::from_raw(i32::try_from(self.child.id().unwrap()).unwrap());
        kill(pid, Signal::SIGTERM).unwrap();
        let status = timeout(Duration::from_secs(20), self.child.wait())
            .await
            .unwrap()
            .unwrap();
        status.code()
    }
}

/// The stderr lines that say something was refused or failed.
fn troubles(stderr: &[String]) -> Vec<String> {
    stderr
        .iter()
        .filter(|l| {
            let l = l.to_lowercase();
            l.contains("forbidden")
                || l.contains("cannot")
                || l.contains("could not")
                || l.contains(" warn ")
                || l.contains(" error ")
        })
        // A lost term's command is stopped with a warning: that is the point.
        .filter(|l| !l.contains("lost leadership: stopping the command"))
        .cloned()
        .collect()
}

/// (id, start ns, stop ns or none) of every term in the log, by start.
fn terms(log: &Path) -> Vec<(String, i128, Option<i128>)> {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let mut out: Vec<(String, i128, Option<i128>)> = Vec::new();
    for line in text.lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        let (secs, nanos) = f[2].split_once('.').unwrap();
        let at = secs.parse::<i128>().unwrap() * 1_000_000_000 + nanos.parse::<i128>().unwrap();
        if f[0] == "start" {
            out.push((f[1].to_owned(), at, None));
        } else if let Some(t) = out.iter_mut().rev().find(|t| t.0 == f[1] && t.2.is_none()) {
            t.2 = Some(at);
        }
    }
    out.sort_by_key(|t| t.1);
    out
}

fn check_no_overlap(log: &Path) {
    let t = terms(log);
    for w in t.windows(2) {
        let end = w[0]
            .2
            .unwrap_or_else(|| panic!("{} never stopped: {t:?}", w[0].0));
        assert!(
            w[1].1 > end,
            "{} started before {} stopped: {t:?}",
            w[1].0,
            w[0].0
        );
    }
}

async fn wait_for<T>(within: Duration, what: &str, mut check: impl AsyncFnMut() -> Option<T>) -> T {
    let found = timeout(within, async {
        loop {
            if let Some(v) = check().await {
                return v;
            }
            sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    found.unwrap_or_else(|_| panic!("{what} did not happen within {within:?}"))
}

/// Creates the shipped Role + RoleBinding from `dir` in `ns`.
async fn apply(ns: &str, dir: &str) {
    let admin = cp().admin_client().unwrap();
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/../../kube/");
    let read = |f: &str| std::fs::read_to_string(format!("{root}{dir}{f}")).unwrap();
    let mut role: Role = serde_yaml::from_str(&read("role.yaml")).unwrap();
    role.metadata.namespace = Some(ns.into());
    Api::<Role>::namespaced(admin.clone(), ns)
        .create(&PostParams::default(), &role)
        .await
        .unwrap();
    let mut binding: RoleBinding = serde_yaml::from_str(&read("rolebinding.yaml")).unwrap();
    binding.metadata.namespace = Some(ns.into());
    Api::<RoleBinding>::namespaced(admin, ns)
        .create(&PostParams::default(), &binding)
        .await
        .unwrap();
}

/// A kubeconfig for the example's ServiceAccount, once RBAC lets it create candidates.
async fn service_account(ns: &str, dir: &Path) -> PathBuf {
    let sa = cp()
        .service_account_credentials(ns, "leaderz-example", Duration::from_secs(3600))
        .await
        .unwrap();
    let path = dir.join("sa.kubeconfig");
    cp().write_kubeconfig(&path, &sa).unwrap();
    let client = cp().client(&sa).unwrap();
    for (resource, verb) in [("leasecandidates", "create"), ("leases", "update")] {
        let attributes = k8s_openapi::api::authorization::v1::ResourceAttributes {
            group: Some("coordination.k8s.io".into()),
            resource: Some(resource.into()),
            verb: Some(verb.into()),
            name: Some("my-lock".into()),
            namespace: Some(ns.into()),
            ..Default::default()
        };
        leaderz_testenv::wait_until_allowed(&client, attributes, Duration::from_secs(10))
            .await
            .unwrap();
    }
    path
}

/// The issue's story through the binary, as a ServiceAccount with only the shipped
/// Roles: two candidates emulating 1.34 → the controller elects one; a candidate
/// emulating 1.33 joins → the holder stops its command and steps down, the new one
/// leads; no overlap; the candidates answer the controller's pings (update), watch
/// their LeaseCandidate, and delete it on the way out, with nothing refused.
#[tokio::test]
async fn coordinated_candidates_need_only_the_shipped_roles() {
    let ns = cp().new_namespace("coordinated").await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("work.log");
    apply(&ns, "").await;
    apply(&ns, "coordinated/").await;
    let sa = service_account(&ns, dir.path()).await;
    let admin = cp().kubeconfig_path().to_owned();
    let client = cp().admin_client().unwrap();
    let leases: Api<Lease> = Api::namespaced(client.clone(), &ns);
    let candidates: Api<LeaseCandidate> = Api::namespaced(client, &ns);

    // `leaderz watch` from the start, as an administrator: it sees the candidates.
    let mut watch = leaderz(&admin, &["watch", "my-lock", "-n", &ns, "-o", "json"])
        .spawn()
        .unwrap();
    let watched = Arc::new(Mutex::new(Vec::<Value>::new()));
    let sink = watched.clone();
    let mut lines = BufReader::new(watch.stdout.take().unwrap()).lines();
    tokio::spawn(async move {
        while let Ok(Some(line)) = lines.next_line().await {
            sink.lock()
                .unwrap()
                .push(serde_json::from_str(&line).unwrap());
        }
    });

    // Different versions: kube-apiserver 1.34 breaks ties by creationTimestamp, at
    // whole seconds, then by list order, so two equal candidates created within the
    // same second make it flap between them. c-b (the older emulation version) first:
    // started together, the controller may name c-a before it sees c-b's candidate and
    // then prefer c-b, and c-a (which does not take a record naming it that prefers
    // someone else) warns of a duplicate identity while that record expires.
    let mut fleet = vec![Candidate::start(&sa, &ns, "c-b", "1.33.5", &log)];
    wait_for(Duration::from_secs(30), "c-b leading", async || {
        terms(&log)
            .last()
            .is_some_and(|t| t.0 == "c-b")
            .then_some(())
    })
    .await;
    fleet.push(Candidate::start(&sa, &ns, "c-a", "1.34.0", &log));
    wait_for(Duration::from_secs(30), "c-a's candidate", async || {
        candidates.get_opt("c-a").await.unwrap().map(|_| ())
    })
    .await;
    let lease = leases.get("my-lock").await.unwrap().spec.unwrap();
    assert_eq!(lease.holder_identity.as_deref(), Some("c-b"));
    assert_eq!(lease.strategy.as_deref(), Some("OldestEmulationVersion"));

    // Past the controller's election window, so that it pings the two (they must
    // update their candidates to answer) when a better one joins.
    sleep(ELECTION_DURATION + Duration::from_secs(1)).await;
    let joined = Instant::now();
    fleet.push(Candidate::start(&sa, &ns, "c-old", "1.33.0", &log));
    wait_for(Duration::from_secs(30), "c-old leading", async || {
        terms(&log).iter().any(|t| t.0 == "c-old").then_some(())
    })
    .await;
    let moved = joined.elapsed();
    let t = terms(&log);
    let (old, new) = (&t[t.len() - 2], &t[t.len() - 1]);
    let gap = Duration::from_nanos(u64::try_from(new.1 - old.2.unwrap()).unwrap());
    println!(
        "coordinated: a better candidate joined -> its command started {moved:?} later; {} stopped {gap:?} before it started",
        old.0
    );
    check_no_overlap(&log);
    assert_eq!(old.0, "c-b");
    for id in ["c-a", "c-b"] {
        let pinged = candidates.get(id).await.unwrap().spec.unwrap();
        assert!(
            pinged.ping_time.is_some()
                && pinged.renew_time.unwrap().0 >= pinged.ping_time.unwrap().0,
            "{id} answered the controller's ping"
        );
    }

    // `status` shows the candidates, the strategy; `handoff` refuses.
    let out = leaderz(&admin, &["status", "my-lock", "-n", &ns, "-o", "json"])
        .output()
        .await
        .unwrap();
    let json: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(json["candidatesUnavailable"], Value::Null, "{json:#}");
    assert_eq!(json["holderIdentity"], "c-old");
    assert_eq!(json["strategy"], "OldestEmulationVersion");
    let shown: Vec<(String, String)> = json["candidates"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            (
                c["name"].as_str().unwrap().to_owned(),
                c["emulationVersion"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    assert_eq!(
        shown,
        [
            ("c-a".to_owned(), "1.34.0".to_owned()),
            ("c-b".into(), "1.33.5".into()),
            ("c-old".into(), "1.33.0".into())
        ]
    );
    assert_eq!(json["candidatesUnavailable"], Value::Null);
    let out = leaderz(&admin, &["status", "-n", &ns])
        .output()
        .await
        .unwrap();
    let table = String::from_utf8(out.stdout).unwrap();
    assert!(
        table.contains("\nLEASE     CANDIDATE   BINARY   EMULATION   STRATEGY                 RENEWED\nmy-lock   c-a         1.34.0   1.34.0      OldestEmulationVersion   "),
        "{table}"
    );
    let out = leaderz(&admin, &["handoff", "my-lock", "-n", &ns, "--to", "c-a"])
        .output()
        .await
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        String::from_utf8(out.stderr)
            .unwrap()
            .lines()
            .last()
            .unwrap(),
        "error: lease `my-lock` is run by coordinated leader election (strategy OldestEmulationVersion): its controller picks the holder, and candidates do not accept handoffs on it"
    );

    for c in fleet {
        let (id, stderr) = (c.id.clone(), c.stderr.clone());
        assert_eq!(c.stop().await, Some(0), "{id}");
        let troubles = troubles(&stderr.lock().unwrap());
        assert!(troubles.is_empty(), "{id}: {troubles:#?}");
    }
    let left = candidates.list(&ListParams::default()).await.unwrap();
    let left: Vec<_> = left.items.iter().map(|c| c.metadata.name.clone()).collect();
    assert!(left.is_empty(), "candidates left behind: {left:?}");

    // The watch saw the three candidates and the move to c-old.
    let seen = watched.lock().unwrap().clone();
    assert!(
        seen.iter()
            .any(|l| l["candidates"].as_array().is_some_and(|c| c.len() == 3)),
        "{seen:#?}"
    );
    assert!(
        seen.iter().any(|l| l["holderIdentity"] == "c-old"),
        "{seen:#?}"
    );
    wait_for(
        Duration::from_secs(10),
        "watch seeing no candidates",
        async || {
            let seen = watched.lock().unwrap();
            seen.last()?["candidates"]
                .as_array()?
                .is_empty()
                .then_some(())
        },
    )
    .await;
    watch.start_kill().unwrap();
    watch.wait().await.unwrap();
}
