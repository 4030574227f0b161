//! The demo without pods (where the one-node cluster cannot run: not root, no
//! containerd): the original write-up's user story on a local control plane, as local
//! processes: apply kube/'s RBAC, start 3 replicas of the example app as the
//! ServiceAccount, see one lead, kill it, see another take over.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, bail};
use k8s_openapi::api::coordination::v1::Lease;
use kube::Api;
use leaderz_testenv::{ControlPlane, StartOptions};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use tokio::process::{Child, Command};
use tokio::time::{Instant, sleep};

const NAMESPACE: &str = "default";
const LEASE: &str = "my-lock";
const SERVICE_ACCOUNT: &str = "leaderz-example";
const REPLICAS: usize = 3;
/// Shorter than the defaults (15 s / 10 s / 2 s) so the demo's failover is quick.
const TIMINGS: [(&str, &str); 3] = [
    ("LEASE_DURATION", "5s"),
    ("RENEW_DEADLINE", "3s"),
    ("RETRY_PERIOD", "1s"),
];

/// Options of `cargo xtask demo`.
#[derive(Debug, clap::Args)]
pub(crate) struct Options {
    /// Non-interactive (also set by `CI`): no pauses for reading; same steps.
    #[arg(long, env = "CI", value_parser = clap::builder::BoolishValueParser::new(), default_value_t = false)]
    pub(crate) ci: bool,
    /// Run the replicas as local processes even where real pods could run.
    #[arg(long)]
    pub(crate) local: bool,
}

pub(crate) fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_default()
}

pub(crate) fn step(msg: &str) {
    println!("\n==> {msg}");
}

struct Replica {
    name: String,
    child: Child,
    log: PathBuf,
    worked: usize,
    last_work: Option<Instant>,
}

impl Replica {
    fn pid(&self) -> Option<Pid> {
        self.child
            .id()
            .and_then(|id| i32::try_from(id).ok())
            .map(Pid::from_raw)
    }

    fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Whether the replica logged "working..." within the last 1.5 s (it logs one a second
    /// while leading).
    fn working(&mut self) -> bool {
        let total = std::fs::read_to_string(&self.log)
            .map(|s| s.matches("working...").count())
            .unwrap_or(0);
        if total > self.worked {
            self.worked = total;
            self.last_work = Some(Instant::now());
        }
        self.last_work
            .is_some_and(|t| t.elapsed() < Duration::from_millis(1500))
    }
}

pub(crate) async fn run(options: Options) -> anyhow::Result<()> {
    let started = Instant::now();
    step(
        "starting a local kube-apiserver + etcd (the first run builds them from Go modules: a few minutes, once)",
    );
    let cp = ControlPlane::start(StartOptions::default())
        .await
        .context("starting the control plane")?;
    println!(
        "control plane ready in {:.1}s at {}",
        cp.startup_duration().as_secs_f64(),
        cp.server_url()
    );
    let admin_kubeconfig = cp.kubeconfig_path().to_path_buf();

    step("kubectl apply: kube/'s ServiceAccount, Role and RoleBinding");
    let root = workspace_root();
    let mut apply = std::process::Command::new("kubectl");
    apply
        .arg("--kubeconfig")
        .arg(&admin_kubeconfig)
        .args(["apply", "-n", NAMESPACE]);
    for file in ["serviceaccount.yaml", "role.yaml", "rolebinding.yaml"] {
        apply.arg("-f").arg(root.join("kube").join(file));
    }
    let status = apply.status().context("running kubectl")?;
    if !status.success() {
        bail!("kubectl apply failed ({status})");
    }

    step("a token for the ServiceAccount (TokenRequest), as a pod would have");
    let credentials = cp
        .service_account_credentials(NAMESPACE, SERVICE_ACCOUNT, Duration::from_secs(3600))
        .await
        .context("requesting a ServiceAccount token")?;
    let dir = cp.data_dir().join("demo");
    std::fs::create_dir_all(&dir)?;
    let sa_kubeconfig = dir.join("kubeconfig-serviceaccount");
    cp.write_kubeconfig(&sa_kubeconfig, &credentials)?;
    println!(
        "kubeconfig for system:serviceaccount:{NAMESPACE}:{SERVICE_ACCOUNT}: {}",
        sa_kubeconfig.display()
    );

    step("building the example app");
    let status = std::process::Command::new(env!("CARGO"))
        .current_dir(&root)
        .args([
            "build",
            "--quiet",
            "-p",
            "leaderz-examples",
            "--bin",
            "leaderz-example",
        ])
        .status()
        .context("running cargo build")?;
    if !status.success() {
        bail!("building the example app failed ({status})");
    }
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("target"));
    let binary = target.join("debug").join("leaderz-example");

    step(&format!(
        "starting {REPLICAS} replicas (POD_NAME=leaderz-example-N, lease {LEASE}, {})",
        TIMINGS.map(|(k, v)| format!("{k}={v}")).join(" ")
    ));
    let mut replicas = Vec::new();
    for i in 0..REPLICAS {
        let name = format!("leaderz-example-{i}");
        let log = dir.join(format!("{name}.log"));
        let out = std::fs::File::create(&log)?;
        let child = Command::new(&binary)
            .env("POD_NAME", &name)
            .env("POD_NAMESPACE", NAMESPACE)
            .env("LEASE_NAME", LEASE)
            .env("KUBECONFIG", &sa_kubeconfig)
            .env("RUST_LOG", "info")
            .envs(TIMINGS)
            .stdout(Stdio::from(out.try_clone()?))
            .stderr(Stdio::from(out))
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("starting {}", binary.display()))?;
        replicas.push(Replica {
            name,
            child,
            log,
            worked: 0,
            last_work: None,
        });
    }
    let admin = cp.admin_client()?;
    let leases: Api<Lease> = Api::namespaced(admin, NAMESPACE);

    let first = view_until(
        &leases,
        &mut replicas,
        started,
        Duration::from_secs(30),
        |h| h.is_some(),
    )
    .await?;
    let Some(first) = first else {
        bail!("no replica became leader within 30 s")
    };
    view_for(
        &leases,
        &mut replicas,
        started,
        Duration::from_secs(if options.ci { 3 } else { 5 }),
    )
    .await?;
    describe(&admin_kubeconfig)?;

    step(&format!(
        "kill -9 {first} (the leader): no release; the others wait out the lease"
    ));
    let victim = replicas
        .iter_mut()
        .find(|r| r.name == first)
        .context("leader is not one of ours")?;
    if let Some(pid) = victim.pid() {
        kill(pid, Signal::SIGKILL)?;
    }
    let killed = Instant::now();
    let second = view_until(
        &leases,
        &mut replicas,
        started,
        Duration::from_secs(30),
        |h| h.is_some_and(|h| h != first),
    )
    .await?;
    let Some(second) = second else {
        bail!("no failover within 30 s")
    };
    println!(
        "failover: {second} took over {:.2}s after the kill (lease duration 5s)",
        killed.elapsed().as_secs_f64()
    );
    describe(&admin_kubeconfig)?;

    step(&format!(
        "SIGTERM {second} (the new leader): it stops its work and releases the lease"
    ));
    let leader = replicas
        .iter_mut()
        .find(|r| r.name == second)
        .context("leader is not one of ours")?;
    if let Some(pid) = leader.pid() {
        kill(pid, Signal::SIGTERM)?;
    }
    let termed = Instant::now();
    let third = view_until(
        &leases,
        &mut replicas,
        started,
        Duration::from_secs(30),
        |h| h.is_some_and(|h| h != second && !h.is_empty()),
    )
    .await?;
    let Some(third) = third else {
        bail!("no handover within 30 s")
    };
    println!(
        "graceful handover: {third} took over {:.0} ms after SIGTERM",
        termed.elapsed().as_secs_f64() * 1000.0
    );
    view_for(&leases, &mut replicas, started, Duration::from_secs(2)).await?;

    step("cleaning up: stopping the replicas and the control plane");
    for r in &mut replicas {
        if r.alive()
            && let Some(pid) = r.pid()
        {
            let _ = kill(pid, Signal::SIGTERM);
        }
    }
    for r in &mut replicas {
        let _ = tokio::time::timeout(Duration::from_secs(10), r.child.wait()).await;
    }
    drop(cp);
    println!(
        "\ndemo finished in {:.1}s: one leader at a time, failover after a crash, handover on SIGTERM",
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// Prints the compact view every half second until `done(holder)` or `limit`; returns
/// the holder then.
async fn view_until(
    leases: &Api<Lease>,
    replicas: &mut [Replica],
    t0: Instant,
    limit: Duration,
    done: impl Fn(Option<&str>) -> bool,
) -> anyhow::Result<Option<String>> {
    let until = Instant::now() + limit;
    let mut last_line = String::new();
    while Instant::now() < until {
        let holder = show(leases, replicas, t0, &mut last_line).await?;
        if done(holder.as_deref()) {
            return Ok(holder);
        }
        sleep(Duration::from_millis(100)).await;
    }
    Ok(None)
}

async fn view_for(
    leases: &Api<Lease>,
    replicas: &mut [Replica],
    t0: Instant,
    d: Duration,
) -> anyhow::Result<()> {
    let until = Instant::now() + d;
    let mut last_line = String::new();
    while Instant::now() < until {
        show(leases, replicas, t0, &mut last_line).await?;
        sleep(Duration::from_millis(1000)).await;
    }
    Ok(())
}

/// One line: time, holder, transitions, and each replica's state (● up, ★ working, ✗ gone).
async fn show(
    leases: &Api<Lease>,
    replicas: &mut [Replica],
    t0: Instant,
    last_line: &mut String,
) -> anyhow::Result<Option<String>> {
    let lease = leases.get_opt(LEASE).await.context("reading the lease")?;
    let spec = lease.and_then(|l| l.spec).unwrap_or_default();
    let holder = spec.holder_identity.clone().filter(|h| !h.is_empty());
    let mut states = BTreeMap::new();
    for r in replicas.iter_mut() {
        let state = if !r.alive() {
            "✗ gone"
        } else if r.working() {
            "★ working"
        } else {
            "● standby"
        };
        states.insert(r.name.clone(), state);
    }
    let replicas_view: Vec<String> = states
        .iter()
        .map(|(n, s)| format!("{}:{s}", n.trim_start_matches("leaderz-example-")))
        .collect();
    let line = format!(
        "holder={:<18} transitions={} | {}",
        holder.as_deref().unwrap_or("<none>"),
        spec.lease_transitions.unwrap_or(0),
        replicas_view.join("  ")
    );
    if line != *last_line {
        println!("{:>6.1}s  {line}", t0.elapsed().as_secs_f64());
        line.clone_into(last_line);
    }
    Ok(holder)
}

pub(crate) fn describe(kubeconfig: &Path) -> anyhow::Result<()> {
    println!("$ kubectl describe lease {LEASE}");
    let out = std::process::Command::new("kubectl")
        .arg("--kubeconfig")
        .arg(kubeconfig)
        .args(["describe", "lease", LEASE, "-n", NAMESPACE])
        .output()
        .context("running kubectl describe")?;
    let text = String::from_utf8_lossy(&out.stdout);
    for line in text.lines().filter(|l| {
        [
            "Name:",
            "Holder Identity:",
            "Lease Duration Seconds:",
            "Lease Transitions:",
            "Renew Time:",
        ]
        .iter()
        .any(|k| l.trim_start().starts_with(k))
    }) {
        println!("    {line}");
    }
    if !out.status.success() {
        bail!(
            "kubectl describe failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}
