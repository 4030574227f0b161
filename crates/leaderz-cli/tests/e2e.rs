//! The `leaderz` binary against a real kube-apiserver + etcd (leaderz-testenv, shared by
//! every test in this file), configured only through `KUBECONFIG`, flags and `LEADERZ_*`
//! variables, as a user would. Timings are short (3 s / 2 s / 500 ms).

#![allow(clippy::unwrap_used)] // tests: a panic is the failure report

mod common;

use std::path::{Path, PathBuf};
use std::process::ExitStatus;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{TIMINGS, leaderz};
use jiff::Timestamp;
use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use kube::Api;
use kube::api::{ListParams, ObjectMeta, PostParams};
use leaderz_testenv::ControlPlane;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::process::{Child, Command};
use tokio::time::{Instant, sleep, timeout};

const RENEW_DEADLINE: Duration = Duration::from_secs(2);

fn cp() -> &'static ControlPlane {
    ControlPlane::shared().unwrap()
}

fn admin_kubeconfig() -> PathBuf {
    cp().kubeconfig_path().to_owned()
}

/// A running `leaderz` whose stderr lines are collected.
struct Running {
    child: Child,
    stderr: Arc<Mutex<Vec<String>>>,
    reader: Option<tokio::task::JoinHandle<()>>,
}

impl Running {
    fn start(mut cmd: Command) -> Self {
        let mut child = cmd.spawn().unwrap();
        let stderr = Arc::new(Mutex::new(Vec::new()));
        let lines = stderr.clone();
        let mut reader = BufReader::new(child.stderr.take().unwrap()).lines();
        let reader = tokio::spawn(async move {
            while let Ok(Some(line)) = reader.next_line().await {
                eprintln!("  leaderz: {line}");
                lines.lock().unwrap().push(line);
            }
        });
        Self {
            child,
            stderr,
            reader: Some(reader),
        }
    }

    fn pid(&self) -> Pid {
        Pid::from_raw(i32::try_from(self.child.id().unwrap()).unwrap())
    }

    fn signal(&self, signal: Signal) {
        kill(self.pid(), signal).unwrap();
    }

    /// Waits for leaderz to exit and for its last stderr line to be read.
    async fn wait(&mut self, within: Duration) -> ExitStatus {
        let status = timeout(within, self.child.wait())
            .await
            .expect("leaderz did not exit in time")
            .unwrap();
        if let Some(reader) = self.reader.take() {
            reader.await.unwrap();
        }
        status
    }

    /// Waits for a stderr line containing `needle` and returns it.
    async fn line_with(&self, needle: &str, within: Duration) -> String {
        let found = timeout(within, async {
            loop {
                let hit = self
                    .stderr
                    .lock()
                    .unwrap()
                    .iter()
                    .find(|l| l.contains(needle))
                    .cloned();
                if let Some(line) = hit {
                    return line;
                }
                sleep(Duration::from_millis(20)).await;
            }
        })
        .await;
        found.unwrap_or_else(|_| panic!("no stderr line with {needle:?}"))
    }
}

/// Waits until `file` contains `needle`; returns how long it took.
async fn file_contains(file: &Path, needle: &str, within: Duration) -> Duration {
    let start = Instant::now();
    timeout(within, async {
        loop {
            let text = std::fs::read_to_string(file).unwrap_or_default();
            if text.contains(needle) {
                return start.elapsed();
            }
            sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .unwrap_or_else(|_| {
        let text = std::fs::read_to_string(file).unwrap_or_default();
        panic!(
            "{} never contained {needle:?}; it has {text:?}",
            file.display()
        )
    })
}

async fn leases(ns: &str) -> Api<Lease> {
    Api::namespaced(cp().admin_client().unwrap(), ns)
}

async fn holder(ns: &str, name: &str) -> Option<String> {
    leases(ns)
        .await
        .get_opt(name)
        .await
        .unwrap()
        .and_then(|l| l.spec)
        .and_then(|s| s.holder_identity)
}

/// Waits until the Lease's holder is `want`.
async fn holder_becomes(ns: &str, name: &str, want: &str) {
    timeout(Duration::from_secs(20), async {
        while holder(ns, name).await.as_deref() != Some(want) {
            sleep(Duration::from_millis(50)).await;
        }
    })
    .await
    .unwrap_or_else(|_| panic!("the holder of {ns}/{name} never became {want:?}"));
}

/// As an administrator would: overwrite the holder (a proper update on the version read,
/// read again if the holder renewed meanwhile). Returns the replaced record's renewTime.
async fn steal(ns: &str, name: &str, thief: &str) -> Timestamp {
    let api = leases(ns).await;
    loop {
        let mut lease = api.get(name).await.unwrap();
        let spec = lease.spec.get_or_insert_with(LeaseSpec::default);
        let renewed = spec.renew_time.as_ref().map(|t| t.0);
        spec.holder_identity = Some(thief.into());
        spec.renew_time = Some(MicroTime(Timestamp::now()));
        match api.replace(name, &PostParams::default(), &lease).await {
            Ok(_) => return renewed.unwrap_or_default(),
            Err(kube::Error::Api(s)) if s.code == 409 => continue,
            Err(e) => panic!("cannot update lease {ns}/{name}: {e}"),
        }
    }
}

/// A plain HTTP/1.1 GET: status code, headers and body.
async fn http_get(addr: &str, path: &str) -> (u16, String, String) {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).await.unwrap();
    let (head, body) = response.split_once("\r\n\r\n").unwrap();
    let code = head.split_whitespace().nth(1).unwrap().parse().unwrap();
    (code, head.to_owned(), body.to_owned())
}

#[tokio::test]
async fn run_starts_the_command_while_leading_and_stops_it_on_loss() {
    let ns = cp().new_namespace("run").await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mark = dir.path().join("mark");
    let script = format!(
        r#"echo "start $LEADERZ_FENCING_TOKEN $LEADERZ_IDENTITY $LEADERZ_LEASE $LEADERZ_NAMESPACE" >> {m}
trap 'echo term >> {m}; exit 3' TERM
while :; do sleep 0.05; done"#,
        m = mark.display()
    );
    let mut args = vec!["run", "--lease", "job", "-n", &ns, "--identity", "a"];
    args.extend(TIMINGS);
    args.extend(["--", "sh", "-c", &script]);
    let mut leaderz = Running::start(leaderz(&admin_kubeconfig(), &args));

    file_contains(
        &mark,
        &format!("start 0 a job {ns}"),
        Duration::from_secs(20),
    )
    .await;
    assert_eq!(holder(&ns, "job").await.as_deref(), Some("a"));

    // An administrator gives the lease to someone else: the command is told at once.
    steal(&ns, "job", "intruder").await;
    let took = file_contains(&mark, "term", Duration::from_secs(10)).await;
    eprintln!("SIGTERM reached the command {took:?} after the lease was taken");
    assert!(took < RENEW_DEADLINE, "took {took:?}");

    // The intruder never renews: leaderz takes the lease back, with a higher token.
    file_contains(
        &mark,
        &format!("start 1 a job {ns}"),
        Duration::from_secs(20),
    )
    .await;
    holder_becomes(&ns, "job", "a").await;

    // SIGTERM to leaderz: forwarded to the command, whose code becomes leaderz's; released.
    leaderz.signal(Signal::SIGTERM);
    let status = leaderz.wait(Duration::from_secs(15)).await;
    assert_eq!(status.code(), Some(3));
    let text = std::fs::read_to_string(&mark).unwrap();
    assert_eq!(text.matches("term").count(), 2, "{text}");
    assert_eq!(holder(&ns, "job").await.as_deref(), Some(""));
}

#[tokio::test]
async fn run_exits_with_the_commands_code_and_releases() {
    let ns = cp().new_namespace("run-exit").await.unwrap();
    for (script, want) in [("exit 7", 7), ("kill -9 $$", 137), ("true", 0)] {
        let mut args = vec!["run", "--lease", "once", "-n", &ns, "--identity", "a"];
        args.extend(TIMINGS);
        args.extend(["--", "sh", "-c", script]);
        let mut leaderz = Running::start(leaderz(&admin_kubeconfig(), &args));
        let status = leaderz.wait(Duration::from_secs(20)).await;
        assert_eq!(status.code(), Some(want), "{script}");
        // Released at once, so a successor need not wait for the lease to expire.
        assert_eq!(holder(&ns, "once").await.as_deref(), Some(""), "{script}");
    }
}

#[tokio::test]
async fn run_exit_on_loss_kills_a_stubborn_command_after_grace() {
    let ns = cp().new_namespace("run-loss").await.unwrap();
    let mut args = vec!["run", "--lease", "l", "-n", &ns, "--identity", "a"];
    args.extend(TIMINGS);
    args.extend(["--grace", "500ms", "--exit-on-loss"]);
    args.extend(["--", "sh", "-c", "trap '' TERM; sleep 60"]);
    let mut leaderz = Running::start(leaderz(&admin_kubeconfig(), &args));
    leaderz
        .line_with("started the command", Duration::from_secs(20))
        .await;
    steal(&ns, "l", "intruder").await;
    let status = leaderz.wait(Duration::from_secs(10)).await;
    assert_eq!(status.code(), Some(1));
    let stderr = leaderz.stderr.lock().unwrap().clone();
    assert!(
        stderr.iter().any(|l| l.contains("sending SIGKILL")),
        "{stderr:#?}"
    );
    assert_eq!(
        stderr.last().unwrap(),
        "error: lost leadership of lease `l` (exiting as --exit-on-loss asks)"
    );
    // Not released: it was not ours any more.
    assert_eq!(holder(&ns, "l").await.as_deref(), Some("intruder"));
}

#[tokio::test]
async fn serve_answers_who_leads() {
    let ns = cp().new_namespace("serve").await.unwrap();
    // Lease and identity from the environment, as a pod spec would set them.
    let mut args = vec!["serve", "--http", "127.0.0.1:0"];
    args.extend(TIMINGS);
    let mut cmd = leaderz(&admin_kubeconfig(), &args);
    cmd.env("LEADERZ_LEASE", "side")
        .env("POD_NAME", "pod-1")
        .env("POD_NAMESPACE", &ns);
    let mut leaderz = Running::start(cmd);
    let line = leaderz
        .line_with("serving HTTP", Duration::from_secs(20))
        .await;
    let addr = line.rsplit("addr=").next().unwrap().trim().to_owned();
    holder_becomes(&ns, "side", "pod-1").await;

    let (code, _, body) = http_get(&addr, "/").await;
    assert_eq!(code, 200);
    let body: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(body["name"].as_str(), holder(&ns, "side").await.as_deref());

    let (code, _, body) = http_get(&addr, "/status").await;
    assert_eq!(code, 200);
    let status: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(status["is_leader"], true);
    assert_eq!(status["namespace"].as_str(), Some(ns.as_str()));
    assert_eq!(status["fencing_token"], 0);

    let (code, head, body) = http_get(&addr, "/metrics").await;
    assert_eq!(code, 200);
    assert!(head.contains("application/openmetrics-text"), "{head}");
    let series = "leader_election_master_status{name=\"side\"} 1";
    assert!(body.contains(series), "{body}");
    assert_eq!(http_get(&addr, "/healthz").await.0, 200);
    assert_eq!(http_get(&addr, "/readyz").await.0, 200);

    leaderz.signal(Signal::SIGTERM);
    assert_eq!(leaderz.wait(Duration::from_secs(10)).await.code(), Some(0));
    assert_eq!(holder(&ns, "side").await.as_deref(), Some(""));
}

#[tokio::test]
async fn status_json_matches_the_lease() {
    let ns = cp().new_namespace("status").await.unwrap();
    let renew = Timestamp::now();
    let lease = Lease {
        metadata: ObjectMeta {
            name: Some("held".into()),
            ..Default::default()
        },
        spec: Some(LeaseSpec {
            holder_identity: Some("pod-x".into()),
            lease_duration_seconds: Some(30),
            acquire_time: Some(MicroTime(renew)),
            renew_time: Some(MicroTime(renew)),
            lease_transitions: Some(4),
            ..Default::default()
        }),
    };
    let created = leases(&ns)
        .await
        .create(&PostParams::default(), &lease)
        .await
        .unwrap();
    let spec = serde_json::to_value(created.spec.unwrap()).unwrap();

    let out = leaderz(
        &admin_kubeconfig(),
        &["status", "held", "-n", &ns, "-o", "json"],
    )
    .output()
    .await
    .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let json: Value = serde_json::from_slice(&out.stdout).unwrap();
    for field in [
        "holderIdentity",
        "leaseDurationSeconds",
        "acquireTime",
        "renewTime",
        "leaseTransitions",
    ] {
        assert_eq!(json[field], spec[field], "{field}");
    }
    assert_eq!(json["name"], "held");
    let expires = json["expiresInSeconds"].as_f64().unwrap();
    assert!(expires > 20.0 && expires <= 30.0, "{expires}");

    // All Leases of the namespace: an array; and the table names the holder.
    let out = leaderz(&admin_kubeconfig(), &["status", "-n", &ns, "-o", "json"])
        .output()
        .await
        .unwrap();
    let mut all: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(all.as_array().unwrap().len(), 1);
    let mut one = json.clone();
    // Moments apart: the estimate moved.
    assert!(all[0]["expiresInSeconds"].take().as_f64().unwrap() <= expires);
    one["expiresInSeconds"].take();
    assert_eq!(all[0], one);
    let out = leaderz(&admin_kubeconfig(), &["status", "-n", &ns])
        .output()
        .await
        .unwrap();
    let table = String::from_utf8(out.stdout).unwrap();
    assert!(table.starts_with("NAME "), "{table}");
    assert!(
        table.contains("pod-x") && table.contains("EXPIRES IN (EST.)"),
        "{table}"
    );

    let out = leaderz(&admin_kubeconfig(), &["status", "missing", "-n", &ns])
        .output()
        .await
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        String::from_utf8(out.stderr).unwrap(),
        format!("error: lease `missing` not found in namespace `{ns}`\n")
    );
}

#[tokio::test]
async fn watch_prints_holder_changes() {
    let ns = cp().new_namespace("watch").await.unwrap();
    let mut cmd = leaderz(
        &admin_kubeconfig(),
        &["watch", "w", "-n", &ns, "-o", "json"],
    );
    let mut watch = cmd.spawn().unwrap();
    let mut lines = BufReader::new(watch.stdout.take().unwrap()).lines();
    let mut next = async || -> Value {
        let line = timeout(Duration::from_secs(10), lines.next_line())
            .await
            .expect("no line from leaderz watch")
            .unwrap()
            .unwrap();
        serde_json::from_str(&line).unwrap()
    };
    assert_eq!(next().await["exists"], false);

    let mut lease = Lease {
        metadata: ObjectMeta {
            name: Some("w".into()),
            ..Default::default()
        },
        spec: Some(LeaseSpec {
            holder_identity: Some("a".into()),
            lease_transitions: Some(0),
            ..Default::default()
        }),
    };
    lease = leases(&ns)
        .await
        .create(&PostParams::default(), &lease)
        .await
        .unwrap();
    let line = next().await;
    assert_eq!(
        (line["exists"].clone(), line["holderIdentity"].clone()),
        (true.into(), "a".into())
    );

    // A change that is not a new holder or transition prints nothing; a new holder does.
    lease.spec.as_mut().unwrap().renew_time = Some(MicroTime(Timestamp::now()));
    lease = leases(&ns)
        .await
        .replace("w", &PostParams::default(), &lease)
        .await
        .unwrap();
    let spec = lease.spec.as_mut().unwrap();
    spec.holder_identity = Some("b".into());
    spec.lease_transitions = Some(1);
    leases(&ns)
        .await
        .replace("w", &PostParams::default(), &lease)
        .await
        .unwrap();
    let line = next().await;
    assert_eq!(line["holderIdentity"], "b");
    assert_eq!(line["leaseTransitions"], 1);

    kill(
        Pid::from_raw(i32::try_from(watch.id().unwrap()).unwrap()),
        Signal::SIGINT,
    )
    .unwrap();
    let status = timeout(Duration::from_secs(5), watch.wait())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(status.code(), Some(0));
}

/// A kubeconfig for a user with no permissions at all.
fn nobody_kubeconfig(dir: &Path) -> PathBuf {
    let path = dir.join("nobody.kubeconfig");
    let credentials = cp().user_credentials("nobody", &[]).unwrap();
    cp().write_kubeconfig(&path, &credentials).unwrap();
    path
}

/// The admin kubeconfig pointing at a port where nothing listens.
fn unreachable_kubeconfig(dir: &Path) -> PathBuf {
    let path = dir.join("unreachable.kubeconfig");
    let yaml = std::fs::read_to_string(cp().kubeconfig_path()).unwrap();
    let yaml = yaml.replace(cp().server_url(), "https://127.0.0.1:1");
    std::fs::write(&path, yaml).unwrap();
    path
}

#[tokio::test]
async fn bad_input_fails_with_one_line_and_writes_nothing() {
    let ns = cp().new_namespace("bad").await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mark = dir.path().join("started");
    let touch = format!("touch {}", mark.display());
    let admin = admin_kubeconfig();
    let nobody = nobody_kubeconfig(dir.path());
    let unreachable = unreachable_kubeconfig(dir.path());

    // (kubeconfig, extra flags, expected exit code, expected start of the line)
    let cases: Vec<(&Path, Vec<&str>, i32, &str)> = vec![
        (
            &admin,
            vec!["--lease-duration", "2s", "--renew-deadline", "2s"],
            2,
            "error: lease duration (2s) must be greater than renew deadline (2s)",
        ),
        (
            &admin,
            vec!["--renew-deadline", "1s", "--retry-period", "1s"],
            2,
            "error: renew deadline (1s) must be greater than 1.2 x retry period (1s)",
        ),
        (
            &admin,
            vec!["--lease-duration", "2500ms", "--renew-deadline", "1s"],
            2,
            "error: lease duration must be a whole number of seconds",
        ),
        (
            &admin,
            vec!["--identity", ""],
            2,
            "error: identity must not be empty",
        ),
        (
            &admin,
            vec!["--identity", "a\nb"],
            2,
            "error: invalid identity `a\\nb` (from --identity): it contains the control character \\u{a}",
        ),
        (
            &admin,
            vec!["--identity", "\u{1b}[31mred"],
            2,
            "error: invalid identity `\\u{1b}[31mred` (from --identity)",
        ),
        (
            &admin,
            vec!["--lease-duration", "soon"],
            2,
            "error: invalid value 'soon'",
        ),
        (
            &unreachable,
            vec![],
            1,
            "error: cannot reach the Kubernetes API server at https://127.0.0.1:1/: ",
        ),
        (
            &admin,
            vec!["-n", "no-such-namespace"],
            1,
            "error: namespace `no-such-namespace` does not exist: create it or pick another with --namespace",
        ),
        (
            &nobody,
            vec![],
            1,
            "error: forbidden: grant `get` on `leases.coordination.k8s.io` in namespace",
        ),
    ];
    for (kubeconfig, flags, code, want) in cases {
        for sub in ["run", "serve"] {
            let mut args = vec![sub, "--lease", "bad"];
            args.extend(&flags);
            if sub == "serve" {
                args.extend(["--http", "127.0.0.1:0"]);
            } else {
                args.extend(["--", "sh", "-c", &touch]);
            }
            let out = leaderz(kubeconfig, &args)
                .env("POD_NAME", "me")
                .env("POD_NAMESPACE", &ns)
                .output()
                .await
                .unwrap();
            let stderr = String::from_utf8(out.stderr).unwrap();
            assert_eq!(out.status.code(), Some(code), "{sub} {flags:?}: {stderr}");
            assert_eq!(stderr.lines().count(), 1, "{sub} {flags:?}: {stderr}");
            assert!(stderr.starts_with(want), "{sub} {flags:?}: {stderr}");
        }
    }
    assert!(!mark.exists(), "the command was started");
    let written = leases(&ns)
        .await
        .list(&ListParams::default())
        .await
        .unwrap();
    assert!(written.items.is_empty(), "{:?}", written.items);
}

/// `--label-pod` and `--leader-endpoints` without what they need from the pod's
/// environment exit 2 before any API call (the kubeconfig points nowhere, so a call
/// would fail with 1); a missing Service or pod exits 1 before campaigning.
#[tokio::test]
async fn routing_flags_without_their_pod_environment_exit_2_before_any_api_call() {
    let ns = cp().new_namespace("bad-routes").await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let unreachable = unreachable_kubeconfig(dir.path());
    // (flags, POD_NAME, POD_IP, expected start of the line)
    type Case<'a> = (Vec<&'a str>, Option<&'a str>, Option<&'a str>, &'a str);
    let cases: Vec<Case<'_>> = vec![
        (
            vec!["--label-pod", "leaderz.io/role=leader"],
            None,
            None,
            "error: --label-pod needs this pod's name in POD_NAME: set it from the downward API",
        ),
        (
            vec!["--leader-endpoints", "leaderz-leader"],
            None,
            Some("10.0.0.1"),
            "error: --leader-endpoints needs this pod's name in POD_NAME",
        ),
        (
            vec!["--leader-endpoints", "leaderz-leader"],
            Some("me"),
            None,
            "error: --leader-endpoints needs this pod's IP in POD_IP: set it from the downward API (env valueFrom fieldRef fieldPath: status.podIP)",
        ),
        (
            vec!["--leader-endpoints", "leaderz-leader"],
            Some("me"),
            Some("not-an-ip"),
            "error: POD_IP `not-an-ip` is not an IP address",
        ),
        (
            vec!["--label-pod", "role"],
            Some("me"),
            None,
            "error: --label-pod: label `role` must be KEY=VALUE",
        ),
        (
            vec!["--label-pod", "role=not ok"],
            Some("me"),
            None,
            "error: --label-pod: label value `not ok` is not valid",
        ),
    ];
    for (flags, pod, ip, want) in cases {
        for sub in ["run", "serve"] {
            let mut args = vec![sub, "--lease", "bad"];
            args.extend(&flags);
            if sub == "serve" {
                args.extend(["--http", "127.0.0.1:0"]);
            } else {
                args.extend(["--", "true"]);
            }
            let mut cmd = leaderz(&unreachable, &args);
            cmd.env("POD_NAMESPACE", &ns);
            if let Some(pod) = pod {
                cmd.env("POD_NAME", pod);
            }
            if let Some(ip) = ip {
                cmd.env("POD_IP", ip);
            }
            let out = cmd.output().await.unwrap();
            let stderr = String::from_utf8(out.stderr).unwrap();
            assert_eq!(out.status.code(), Some(2), "{sub} {flags:?}: {stderr}");
            assert_eq!(stderr.lines().count(), 1, "{sub} {flags:?}: {stderr}");
            assert!(stderr.starts_with(want), "{sub} {flags:?}: {stderr}");
        }
    }
    // Reachable, but the Service or the pod does not exist: 1, nothing written.
    let admin = admin_kubeconfig();
    let cases: [(&[&str], &str); 2] = [
        (
            &["--leader-endpoints", "no-such-service"],
            "error: service `no-such-service` not found in namespace",
        ),
        (
            &["--label-pod", "leaderz.io/role=leader"],
            "error: pod `me` not found in namespace",
        ),
    ];
    for (flags, want) in cases {
        let mut args = vec!["serve", "--lease", "bad", "--http", "127.0.0.1:0"];
        args.extend(flags);
        let out = leaderz(&admin, &args)
            .env("POD_NAMESPACE", &ns)
            .env("POD_NAME", "me")
            .env("POD_IP", "192.0.2.1")
            .output()
            .await
            .unwrap();
        let stderr = String::from_utf8(out.stderr).unwrap();
        assert_eq!(out.status.code(), Some(1), "{flags:?}: {stderr}");
        assert_eq!(stderr.lines().count(), 1, "{flags:?}: {stderr}");
        assert!(stderr.starts_with(want), "{flags:?}: {stderr}");
    }
    let written = leases(&ns)
        .await
        .list(&ListParams::default())
        .await
        .unwrap();
    assert!(written.items.is_empty(), "{:?}", written.items);
}

/// `leaderz serve --label-pod` on a pod: the label is on while it leads, and on SIGTERM
/// it is removed before the Lease is released.
#[tokio::test]
async fn serve_labels_its_pod_while_leading_and_removes_the_label_before_releasing() {
    use k8s_openapi::api::core::v1::Pod;
    let ns = cp().new_namespace("serve-label").await.unwrap();
    let pods: Api<Pod> = Api::namespaced(cp().admin_client().unwrap(), &ns);
    let pod: Pod = serde_json::from_value(serde_json::json!({
        "metadata": { "name": "pod-1" },
        "spec": { "containers": [{ "name": "app", "image": "leaderz:0.1.0" }] },
    }))
    .unwrap();
    pods.create(&PostParams::default(), &pod).await.unwrap();
    let labelled = |p: &Pod| {
        p.metadata
            .labels
            .as_ref()
            .and_then(|l| l.get("leaderz.io/role"))
            .is_some_and(|v| v == "leader")
    };
    let mut args = vec!["serve", "--lease", "side", "--http", "127.0.0.1:0"];
    args.extend(TIMINGS);
    args.extend(["--label-pod", "leaderz.io/role=leader"]);
    let mut cmd = leaderz(&admin_kubeconfig(), &args);
    cmd.env("POD_NAME", "pod-1").env("POD_NAMESPACE", &ns);
    let mut leaderz = Running::start(cmd);
    holder_becomes(&ns, "side", "pod-1").await;
    timeout(Duration::from_secs(10), async {
        while !labelled(&pods.get("pod-1").await.unwrap()) {
            sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("the leader's pod was not labelled");
    leaderz.signal(Signal::SIGTERM);
    assert_eq!(leaderz.wait(Duration::from_secs(20)).await.code(), Some(0));
    let pod = pods.get("pod-1").await.unwrap();
    assert!(!labelled(&pod), "the label outlived leaderz");
    let lease = leases(&ns).await.get("side").await.unwrap();
    assert_eq!(lease.spec.unwrap().holder_identity.as_deref(), Some(""));
    let (label_gone, released): (u64, u64) = (
        pod.metadata.resource_version.unwrap().parse().unwrap(),
        lease.metadata.resource_version.unwrap().parse().unwrap(),
    );
    assert!(
        label_gone < released,
        "released (v{released}) before the label was removed (v{label_gone})"
    );
}

/// Pids of the processes in group `pgid` that have not exited (zombies excluded), from
/// /proc.
fn live_group_members(pgid: i32) -> Vec<i32> {
    let mut out = Vec::new();
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return out;
    };
    for entry in dir.flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        // pid (comm) state ppid pgrp ...; comm may contain spaces and parentheses.
        let Some((_, rest)) = stat.rsplit_once(')') else {
            continue;
        };
        let fields: Vec<&str> = rest.split_whitespace().collect();
        let pgrp = fields.get(2).and_then(|g| g.parse::<i32>().ok());
        if pgrp == Some(pgid) && !matches!(fields.first(), Some(&"Z" | &"X")) {
            out.push(pid);
        }
    }
    out
}

/// Waits until group `pgid` has no live member; returns how long that took. If it
/// does not happen `within`, kills the group (not to leave it running) and fails.
async fn group_gone(pgid: i32, within: Duration) -> Duration {
    let start = Instant::now();
    while !live_group_members(pgid).is_empty() {
        if start.elapsed() > within {
            let members = live_group_members(pgid);
            let _ = nix::sys::signal::killpg(Pid::from_raw(pgid), Signal::SIGKILL);
            panic!("process group {pgid} still has {members:?} after {within:?}");
        }
        sleep(Duration::from_millis(1)).await;
    }
    start.elapsed()
}

/// SIGKILLs a process group when dropped, so that a failing test leaves nothing running.
struct KillGroupOnDrop(i32);

impl KillGroupOnDrop {
    /// The group is gone: its id may be reused, so do not signal it.
    fn disarm(self) {
        std::mem::forget(self);
    }
}

impl Drop for KillGroupOnDrop {
    fn drop(&mut self) {
        let _ = nix::sys::signal::killpg(Pid::from_raw(self.0), Signal::SIGKILL);
    }
}

/// The pid logged with "leading: started the command" (the command's process group).
async fn command_group(leaderz: &Running) -> i32 {
    let line = leaderz
        .line_with("started the command", Duration::from_secs(20))
        .await;
    let pid = line.split("pid=").nth(1).unwrap();
    pid.split(|c: char| !c.is_ascii_digit())
        .next()
        .unwrap()
        .parse()
        .unwrap()
}

/// Asserts that `file` stops growing (whoever wrote it is gone).
async fn stops_growing(file: &Path) {
    let len = || std::fs::metadata(file).map(|m| m.len()).unwrap_or(0);
    let before = len();
    sleep(Duration::from_millis(200)).await;
    assert_eq!(len(), before, "{} is still being written", file.display());
}

/// How many of the timestamps (`date +%s.%N` lines) in `files` are later than `after`,
/// and how much later the last one is.
fn writes_after(files: &[&Path], after: Timestamp) -> (usize, Duration) {
    let after = after.as_nanosecond();
    let mut count = 0;
    let mut last = 0;
    for file in files {
        for line in std::fs::read_to_string(file).unwrap().lines() {
            let Some((secs, nanos)) = line.split_once('.') else {
                continue;
            };
            let (Ok(secs), Ok(nanos)) = (secs.parse::<i128>(), nanos.parse::<i128>()) else {
                continue;
            };
            let at = secs * 1_000_000_000 + nanos;
            if at > after {
                count += 1;
                last = last.max(at - after);
            }
        }
    }
    (count, Duration::from_nanos(u64::try_from(last).unwrap()))
}

/// A shell script for a command that keeps working: it and a background job it starts
/// (same process group) append timestamps to `out` and `out.bg`.
fn busy_script(out: &Path) -> String {
    format!(
        "(while :; do date +%s.%N >> {o}.bg; sleep 0.01; done) & while :; do date +%s.%N >> {o}; sleep 0.01; done",
        o = out.display()
    )
}

/// Defect 9 (issue 12): the OOM killer SIGKILLs just `leaderz`; its command, and
/// everything the command started, must die with it instead of working on unsupervised.
#[tokio::test]
async fn run_command_dies_with_a_sigkilled_leaderz() {
    const TRIALS: usize = 5;
    const BOUND: Duration = Duration::from_secs(1);
    let ns = cp().new_namespace("run-sigkill").await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut took = Vec::new();
    for trial in 0..TRIALS {
        let lease = format!("k{trial}");
        let out = dir.path().join(format!("work{trial}"));
        let script = busy_script(&out);
        let mut args = vec!["run", "--lease", &lease, "-n", &ns, "--identity", "a"];
        args.extend(TIMINGS);
        args.extend(["--", "sh", "-c", &script]);
        let mut leaderz = Running::start(leaderz(&admin_kubeconfig(), &args));
        let group = command_group(&leaderz).await;
        let guard = KillGroupOnDrop(group);
        file_contains(&out, ".", Duration::from_secs(10)).await;
        file_contains(&out.with_extension("bg"), ".", Duration::from_secs(10)).await;
        // The supervisor, the shell and its background job at least.
        let members = live_group_members(group);
        assert!(members.len() >= 3, "{members:?}");

        let killed_at = Timestamp::now();
        leaderz.signal(Signal::SIGKILL);
        let gone = group_gone(group, Duration::from_secs(10)).await;
        guard.disarm();
        let status = leaderz.wait(Duration::from_secs(5)).await;
        assert_eq!(
            std::os::unix::process::ExitStatusExt::signal(&status),
            Some(9)
        );
        stops_growing(&out).await;
        stops_growing(&out.with_extension("bg")).await;
        // No release after a SIGKILL: the lease is left to expire.
        assert_eq!(holder(&ns, &lease).await.as_deref(), Some("a"));
        let (late, last) = writes_after(&[&out, &out.with_extension("bg")], killed_at);
        eprintln!(
            "trial {trial}: the command's group of {} was gone {gone:?} after SIGKILL; {late} writes after it, the last {last:?} after it",
            members.len()
        );
        assert!(last < BOUND, "{last:?}");
        took.push(gone);
    }
    took.sort();
    eprintln!(
        "command group gone after leaderz was SIGKILLed, {TRIALS} trials: min {:?}, median {:?}, max {:?}",
        took[0],
        took[TRIALS / 2],
        took[TRIALS - 1]
    );
    assert!(took[TRIALS - 1] < BOUND, "{took:?}");
}

/// A stopped leaderz (SIGSTOP, Ctrl-Z, a debugger) can neither renew nor stop its
/// command; the supervisor stops the command before another candidate may take over.
#[tokio::test]
async fn run_command_is_stopped_while_leaderz_is_stopped() {
    let ns = cp().new_namespace("run-sigstop").await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("work");
    let script = busy_script(&out);
    let mut args = vec!["run", "--lease", "stop", "-n", &ns, "--identity", "a"];
    args.extend(TIMINGS);
    args.extend(["--", "sh", "-c", &script]);
    let mut leaderz = Running::start(leaderz(&admin_kubeconfig(), &args));
    let group = command_group(&leaderz).await;
    let guard = KillGroupOnDrop(group);
    file_contains(&out, ".", Duration::from_secs(10)).await;
    sleep(Duration::from_secs(1)).await;

    leaderz.signal(Signal::SIGSTOP);
    let gone = group_gone(group, Duration::from_secs(10)).await;
    guard.disarm();
    let at = Timestamp::now();
    stops_growing(&out).await;
    let spec = leases(&ns).await.get("stop").await.unwrap().spec.unwrap();
    assert_eq!(spec.holder_identity.as_deref(), Some("a"));
    let last_renewal = spec.renew_time.unwrap().0;
    let since_renewal = at.duration_since(last_renewal).unsigned_abs();
    eprintln!(
        "the command was gone {gone:?} after leaderz was stopped, {since_renewal:?} after its last renewal"
    );
    // Lease duration 3 s: a follower that saw the last renewal may take over 3 s after it.
    assert!(since_renewal < Duration::from_secs(3), "{since_renewal:?}");

    // Continued, leaderz finds the command ended by SIGTERM, and exits as it did.
    leaderz.signal(Signal::SIGCONT);
    let status = leaderz.wait(Duration::from_secs(10)).await;
    assert_eq!(status.code(), Some(143));
    let stderr = leaderz.stderr.lock().unwrap().clone();
    assert!(
        stderr
            .iter()
            .any(|l| l.starts_with("leaderz has been stopped for")),
        "{stderr:#?}"
    );
}

/// The kernel sends the parent-death signal when the *thread* that started the
/// supervisor exits. The supervisor must tell that from the death of leaderz and let
/// the command run on.
#[tokio::test]
async fn the_command_outlives_the_thread_that_started_it() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("work");
    let script = busy_script(&out);
    let work = out.clone();
    let thread = std::thread::spawn(move || {
        use std::os::unix::process::CommandExt;
        let supervisor = std::process::Command::new(env!("CARGO_BIN_EXE_leaderz"))
            .args(["__leaderz-supervise", &std::process::id().to_string()])
            .args(["60000", "60000"])
            .args(["--", "sh", "-c", &script])
            .process_group(0)
            .spawn()
            .unwrap();
        // The supervisor asks for the signal before it starts the command: once the
        // command works, this thread's exit is signalled.
        while std::fs::metadata(&work).map_or(0, |m| m.len()) == 0 {
            std::thread::sleep(Duration::from_millis(5));
        }
        supervisor
    });
    let mut supervisor = thread.join().unwrap();
    let group = i32::try_from(supervisor.id()).unwrap();
    let guard = KillGroupOnDrop(group);
    // The thread has exited (and with it the supervisor got its SIGTERM): still working.
    sleep(Duration::from_millis(500)).await;
    assert!(
        supervisor.try_wait().unwrap().is_none(),
        "the supervisor exited"
    );
    assert!(live_group_members(group).len() >= 3);
    let len = std::fs::metadata(&out).unwrap().len();
    sleep(Duration::from_millis(200)).await;
    assert!(
        std::fs::metadata(&out).unwrap().len() > len,
        "the command stopped"
    );

    drop(guard);
    supervisor.wait().unwrap();
}

/// Defect 11 (issue 12): a command that cannot be executed fails as a shell would
/// (127 not found, 126 not executable), with one line, before anything is written.
#[tokio::test]
async fn run_refuses_a_command_it_cannot_execute_before_writing() {
    use std::os::unix::fs::PermissionsExt;
    let ns = cp().new_namespace("run-noexec").await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let plain = dir.path().join("plain");
    std::fs::write(&plain, "#!/bin/sh\necho ran\n").unwrap();
    std::fs::set_permissions(&plain, std::fs::Permissions::from_mode(0o644)).unwrap();
    let (plain, here) = (
        plain.display().to_string(),
        dir.path().display().to_string(),
    );
    let cases = [
        (
            "/no/such/binary",
            127,
            "cannot run `/no/such/binary`: no such file".to_owned(),
        ),
        (
            "leaderz-no-such-command",
            127,
            "cannot run `leaderz-no-such-command`: command not found in PATH".to_owned(),
        ),
        (
            plain.as_str(),
            126,
            format!("cannot run `{plain}`: permission denied (the file is not executable)"),
        ),
        (
            here.as_str(),
            126,
            format!("cannot run `{here}`: it is a directory"),
        ),
    ];
    for (program, code, message) in cases {
        let mut args = vec!["run", "--lease", "never", "-n", &ns, "--identity", "a"];
        args.extend(TIMINGS);
        args.extend(["--", program, "arg"]);
        let out = leaderz(&admin_kubeconfig(), &args).output().await.unwrap();
        let stderr = String::from_utf8(out.stderr).unwrap();
        assert_eq!(out.status.code(), Some(code), "{program}: {stderr}");
        assert_eq!(stderr, format!("error: {message}\n"), "{program}");
    }
    let written = leases(&ns)
        .await
        .list(&ListParams::default())
        .await
        .unwrap();
    assert!(written.items.is_empty(), "{:?}", written.items);
}

/// A command that was fine when leaderz started but is gone (or no longer executable)
/// when it comes to lead: the supervisor says so with a shell's code, and leaderz exits
/// with it after releasing the lease.
#[tokio::test]
async fn run_reports_a_command_that_changed_while_waiting_to_lead() {
    use std::os::unix::fs::PermissionsExt;
    let ns = cp().new_namespace("run-vanish").await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    for (case, code) in [("removed", 127), ("chmod -x", 126)] {
        let lease = if code == 127 { "gone" } else { "noexec" };
        let script = dir.path().join(lease);
        std::fs::write(&script, "#!/bin/sh\nexit 0\n").unwrap();
        std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
        // Someone else holds the lease.
        let held = Lease {
            metadata: ObjectMeta {
                name: Some(lease.into()),
                ..Default::default()
            },
            spec: Some(LeaseSpec {
                holder_identity: Some("other".into()),
                lease_duration_seconds: Some(30),
                renew_time: Some(MicroTime(Timestamp::now())),
                lease_transitions: Some(0),
                ..Default::default()
            }),
        };
        leases(&ns)
            .await
            .create(&PostParams::default(), &held)
            .await
            .unwrap();
        let path = script.display().to_string();
        let mut args = vec!["run", "--lease", lease, "-n", &ns, "--identity", "a"];
        args.extend(TIMINGS);
        args.extend(["--", &path]);
        let mut leaderz = Running::start(leaderz(&admin_kubeconfig(), &args));
        leaderz
            .line_with("new leader leader=\"other\"", Duration::from_secs(20))
            .await;
        if code == 127 {
            std::fs::remove_file(&script).unwrap();
        } else {
            std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o644)).unwrap();
        }
        steal(&ns, lease, "").await;
        let status = leaderz.wait(Duration::from_secs(20)).await;
        assert_eq!(status.code(), Some(code), "{case}");
        let stderr = leaderz.stderr.lock().unwrap().clone();
        let reason = if code == 127 {
            "no such file"
        } else {
            "permission denied (the file is not executable)"
        };
        let line = format!("error: cannot run `{path}`: {reason}");
        assert!(stderr.contains(&line), "{case}: {stderr:#?}");
        // It led (the supervisor was started), and released on the way out.
        assert!(stderr.iter().any(|l| l.contains("became leader")), "{case}");
        assert_eq!(holder(&ns, lease).await.as_deref(), Some(""), "{case}");
    }
}

/// What an administrator (or anyone allowed to write Leases) may put in holderIdentity.
const EVIL_HOLDER: &str = "evil\nholder \u{1b}[31mred\u{1b}[0m";
/// How leaderz prints it outside JSON.
const EVIL_HOLDER_SHOWN: &str = "evil\\nholder \\u{1b}[31mred\\u{1b}[0m";

/// Defect 14 (issue 12), the binary's side: a holder written by someone else is printed
/// on one line, without raw control characters, by `status` (table), `watch` (lines)
/// and the logs; JSON carries the exact value.
#[tokio::test]
async fn status_watch_and_logs_escape_a_hostile_holder() {
    let ns = cp().new_namespace("evil").await.unwrap();
    let lease = Lease {
        metadata: ObjectMeta {
            name: Some("evil".into()),
            ..Default::default()
        },
        spec: Some(LeaseSpec {
            holder_identity: Some(EVIL_HOLDER.into()),
            lease_duration_seconds: Some(30),
            renew_time: Some(MicroTime(Timestamp::now())),
            lease_transitions: Some(0),
            ..Default::default()
        }),
    };
    leases(&ns)
        .await
        .create(&PostParams::default(), &lease)
        .await
        .unwrap();
    let clean = |text: &str, lines: usize| {
        assert_eq!(text.lines().count(), lines, "{text:?}");
        assert!(!text.contains('\u{1b}'), "{text:?}");
        assert!(text.contains(EVIL_HOLDER_SHOWN), "{text:?}");
    };

    for args in [vec!["status", "evil", "-n", &ns], vec!["status", "-n", &ns]] {
        let out = leaderz(&admin_kubeconfig(), &args).output().await.unwrap();
        assert!(out.status.success(), "{args:?}");
        let text = String::from_utf8(out.stdout).unwrap();
        // The Lease table (header and one row), then what status says about the
        // candidates (here: the API is not served), after a blank line.
        let (leases, candidates) = text.split_once("\n\n").unwrap();
        clean(&format!("{leases}\n"), 2);
        assert!(
            candidates.starts_with("Lease candidates: not served"),
            "{text:?}"
        );
    }
    let out = leaderz(
        &admin_kubeconfig(),
        &["status", "evil", "-n", &ns, "-o", "json"],
    )
    .output()
    .await
    .unwrap();
    let json: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(json["holderIdentity"], EVIL_HOLDER);

    for format in ["table", "json"] {
        let mut watch = leaderz(
            &admin_kubeconfig(),
            &["watch", "evil", "-n", &ns, "-o", format],
        )
        .spawn()
        .unwrap();
        let mut lines = BufReader::new(watch.stdout.take().unwrap()).lines();
        let mut next = async || {
            timeout(Duration::from_secs(10), lines.next_line())
                .await
                .expect("no line from leaderz watch")
                .unwrap()
                .unwrap()
        };
        if format == "table" {
            assert!(next().await.starts_with("TIME"));
            clean(&next().await, 1);
        } else {
            let line: Value = serde_json::from_str(&next().await).unwrap();
            assert_eq!(line["holderIdentity"], EVIL_HOLDER);
        }
        watch.start_kill().unwrap();
        watch.wait().await.unwrap();
    }

    // A candidate logs who leads: on one line.
    let mut args = vec!["serve", "--lease", "evil", "-n", &ns, "--identity", "a"];
    args.extend(["--http", "127.0.0.1:0"]);
    args.extend(TIMINGS);
    let mut serve = Running::start(leaderz(&admin_kubeconfig(), &args));
    let line = serve.line_with("new leader", Duration::from_secs(20)).await;
    clean(&line, 1);
    serve.signal(Signal::SIGTERM);
    serve.wait(Duration::from_secs(10)).await;
    let stderr = serve.stderr.lock().unwrap().clone();
    assert!(
        !stderr.iter().any(|l| l.starts_with("holder")),
        "{stderr:#?}"
    );
}

/// A lost term's command that ignores SIGTERM gets SIGKILL before another candidate may
/// take over (its last renewal + the lease duration), however long `--grace` is.
#[tokio::test]
async fn run_kills_a_stubborn_command_before_another_candidate_may_lead() {
    let ns = cp().new_namespace("run-cap").await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("work");
    let script = format!(
        "trap '' TERM; while :; do date +%s.%N >> {}; sleep 0.01; done",
        out.display()
    );
    let mut args = vec!["run", "--lease", "cap", "-n", &ns, "--identity", "a"];
    args.extend(TIMINGS);
    args.extend([
        "--grace",
        "60s",
        "--exit-on-loss",
        "--",
        "sh",
        "-c",
        &script,
    ]);
    let mut leaderz = Running::start(leaderz(&admin_kubeconfig(), &args));
    let group = command_group(&leaderz).await;
    let guard = KillGroupOnDrop(group);
    file_contains(&out, ".", Duration::from_secs(10)).await;
    // Let a few renewals happen, then take the lease away.
    sleep(Duration::from_secs(1)).await;
    let last_renewal = steal(&ns, "cap", "intruder").await;
    let gone = group_gone(group, Duration::from_secs(10)).await;
    guard.disarm();
    let at = Timestamp::now();
    stops_growing(&out).await;
    let since_renewal = at.duration_since(last_renewal).unsigned_abs();
    eprintln!(
        "the command was gone {gone:?} after the steal, {since_renewal:?} after the last renewal"
    );
    // Lease duration 3 s: a follower that saw the last renewal may take over 3 s after it.
    assert!(since_renewal < Duration::from_secs(3), "{since_renewal:?}");
    assert_eq!(leaderz.wait(Duration::from_secs(10)).await.code(), Some(1));
    let stderr = leaderz.stderr.lock().unwrap().clone();
    assert!(
        stderr
            .iter()
            .any(|l| l.contains("sending SIGKILL before the grace period ends")),
        "{stderr:#?}"
    );
}

/// Applies the Role in `kube/{file}` in `ns`, bound to user `user`; returns the binding's
/// name.
async fn grant_user(ns: &str, file: &str, user: &str) -> String {
    use k8s_openapi::api::rbac::v1::{Role, RoleBinding};
    let admin = cp().admin_client().unwrap();
    let path = format!("{}/../../kube/{file}", env!("CARGO_MANIFEST_DIR"));
    let mut role: Role = serde_yaml::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    role.metadata.namespace = Some(ns.into());
    let name = role.metadata.name.clone().unwrap();
    Api::<Role>::namespaced(admin.clone(), ns)
        .create(&PostParams::default(), &role)
        .await
        .unwrap();
    let binding: RoleBinding = serde_json::from_value(serde_json::json!({
        "metadata": { "name": name },
        "roleRef": { "apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": name },
        "subjects": [{ "apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": user }],
    }))
    .unwrap();
    Api::<RoleBinding>::namespaced(admin, ns)
        .create(&PostParams::default(), &binding)
        .await
        .unwrap();
    name
}

/// Whether `client` may `verb` pods in `ns` (a SelfSubjectAccessReview).
async fn may_pods(client: &kube::Client, ns: &str, verb: &str) -> bool {
    use k8s_openapi::api::authorization::v1::{
        ResourceAttributes, SelfSubjectAccessReview, SelfSubjectAccessReviewSpec,
    };
    let review = SelfSubjectAccessReview {
        spec: SelfSubjectAccessReviewSpec {
            resource_attributes: Some(ResourceAttributes {
                verb: Some(verb.into()),
                resource: Some("pods".into()),
                namespace: Some(ns.into()),
                ..Default::default()
            }),
            ..Default::default()
        },
        ..Default::default()
    };
    Api::<SelfSubjectAccessReview>::all(client.clone())
        .create(&PostParams::default(), &review)
        .await
        .unwrap()
        .status
        .is_some_and(|s| s.allowed)
}

/// Review finding 3 (`leaderz run` hung for ever on SIGTERM when traffic could not be
/// pointed away): leaderz leads with `--label-pod`, then loses `patch` on pods, then gets
/// SIGTERM. It must exit within the routing allowance (2 × the 5 s call timeout, no
/// drain) — at once on a second signal — WITHOUT releasing the Lease (the label still
/// points at its pod, so the Lease is left to expire), and say what it left behind.
/// `run` and `serve`.
#[tokio::test]
async fn a_route_that_cannot_be_taken_back_bounds_the_exit_and_the_lease_is_not_released() {
    use k8s_openapi::api::core::v1::Pod;
    use k8s_openapi::api::rbac::v1::RoleBinding;
    const ALLOWANCE: Duration = Duration::from_secs(10);
    let dir = tempfile::tempdir().unwrap();
    let labelled = |p: &Pod| {
        p.metadata
            .labels
            .as_ref()
            .and_then(|l| l.get("leaderz.io/role"))
            .is_some_and(|v| v == "leader")
    };
    for (sub, second_signal) in [("run", false), ("run", true), ("serve", false)] {
        let ns = cp().new_namespace("stuck-route").await.unwrap();
        let user = format!("router-{sub}-{second_signal}");
        let creds = cp().user_credentials(&user, &[]).unwrap();
        let kubeconfig = dir.path().join(format!("{user}.kubeconfig"));
        cp().write_kubeconfig(&kubeconfig, &creds).unwrap();
        let as_user = cp().client(&creds).unwrap();
        grant_user(&ns, "role.yaml", &user).await;
        let label_binding = grant_user(&ns, "label-pod/role.yaml", &user).await;
        let admin = cp().admin_client().unwrap();
        let pods: Api<Pod> = Api::namespaced(admin.clone(), &ns);
        let pod: Pod = serde_json::from_value(serde_json::json!({
            "metadata": { "name": "pod-1" },
            "spec": { "containers": [{ "name": "app", "image": "leaderz:0.1.0" }] },
        }))
        .unwrap();
        pods.create(&PostParams::default(), &pod).await.unwrap();
        timeout(Duration::from_secs(10), async {
            while !may_pods(&as_user, &ns, "patch").await {
                sleep(Duration::from_millis(50)).await;
            }
        })
        .await
        .unwrap();

        let mut args = vec![sub, "--lease", "my-lock"];
        args.extend(TIMINGS);
        args.extend(["--label-pod", "leaderz.io/role=leader"]);
        if sub == "serve" {
            args.extend(["--http", "127.0.0.1:0"]);
        } else {
            args.extend(["--", "sleep", "300"]);
        }
        let mut cmd = leaderz(&kubeconfig, &args);
        cmd.env("POD_NAME", "pod-1").env("POD_NAMESPACE", &ns);
        let mut leaderz = Running::start(cmd);
        holder_becomes(&ns, "my-lock", "pod-1").await;
        timeout(Duration::from_secs(10), async {
            while !labelled(&pods.get("pod-1").await.unwrap()) {
                sleep(Duration::from_millis(20)).await;
            }
        })
        .await
        .expect("the leader's pod was not labelled");
        let transitions = |l: &Lease| l.spec.as_ref().and_then(|s| s.lease_transitions);
        let before = transitions(&leases(&ns).await.get("my-lock").await.unwrap());

        // `patch` on pods revoked: the label cannot be taken back.
        Api::<RoleBinding>::namespaced(admin.clone(), &ns)
            .delete(&label_binding, &Default::default())
            .await
            .unwrap();
        timeout(Duration::from_secs(10), async {
            while may_pods(&as_user, &ns, "patch").await {
                sleep(Duration::from_millis(50)).await;
            }
        })
        .await
        .unwrap();
        let asked = Instant::now();
        leaderz.signal(Signal::SIGTERM);
        let within = if second_signal {
            sleep(Duration::from_secs(1)).await;
            leaderz.signal(Signal::SIGTERM);
            Duration::from_secs(4)
        } else {
            ALLOWANCE + Duration::from_secs(4)
        };
        let status = leaderz.wait(within).await;
        let took = asked.elapsed();
        println!(
            "{sub} (second signal: {second_signal}): exited {status:?} {took:?} after SIGTERM"
        );
        leaderz
            .line_with("not releasing the lease", Duration::ZERO)
            .await;
        let lease = leases(&ns).await.get("my-lock").await.unwrap();
        assert_eq!(
            lease.spec.as_ref().unwrap().holder_identity.as_deref(),
            Some("pod-1"),
            "{sub}: released although the label still points at its pod"
        );
        assert_eq!(transitions(&lease), before);
        assert!(
            labelled(&pods.get("pod-1").await.unwrap()),
            "{sub}: the label went (the grant was revoked?)"
        );
        if !second_signal {
            assert!(
                took >= ALLOWANCE - Duration::from_millis(500),
                "{sub}: gave up after {took:?}, before the allowance"
            );
        }
    }
}
