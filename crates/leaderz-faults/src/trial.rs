//! One trial: a fresh namespace and Lease, candidates behind their own proxies running as
//! a ServiceAccount with only `kube/role.yaml`'s rights, a schedule of faults, recovery,
//! a graceful stop of everyone, and the checker's verdict.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use anyhow::{Context as _, bail};
use k8s_openapi::api::authorization::v1::ResourceAttributes;
use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::api::rbac::v1::{Role, RoleBinding};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use kube::Api;
use kube::api::{DeleteParams, PostParams};
use leaderz_testenv::ControlPlane;
use nix::sys::signal::{Signal, kill, killpg};
use nix::unistd::Pid;
use rand::rngs::SmallRng;
use rand::{Rng as _, SeedableRng as _};
use serde::Serialize;
use tokio::io::{AsyncBufReadExt as _, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::Mutex as AsyncMutex;
use tokio::time::{Instant, sleep, sleep_until, timeout};

use crate::check::{CandidateRecord, FaultRecord, Kind, Timings, TrialData, Verdict, check};
use crate::history::LeaseRecorder;
use crate::ledger::Ledger;
use crate::now_ns;
use crate::proxy::{FaultProxy, Mode};
use crate::worker::read_log;

/// The Lease every trial contends for: the one `kube/role.yaml` grants.
pub const LEASE: &str = "my-lock";
/// The ServiceAccount `kube/rolebinding.yaml` binds.
const SERVICE_ACCOUNT: &str = "leaderz-example";

/// The programs a trial runs.
#[derive(Clone, Debug)]
pub struct Binaries {
    /// The `leaderz` binary under test.
    pub leaderz: PathBuf,
    /// `leaderz-faults-worker`.
    pub worker: PathBuf,
    /// The client-go candidate (`interop/build.sh`), for mixed fleets.
    pub clientgo: Option<PathBuf>,
    /// `libfaketimeMT.so.1`, for clock-rate skew.
    pub libfaketime: Option<PathBuf>,
}

/// Who a fault hits, resolved when it is injected.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub enum Target {
    /// The Lease's holder then (else any live candidate).
    Leader,
    /// One live candidate that does not hold the Lease then.
    Follower,
    /// Every live candidate that does not hold the Lease then.
    Followers,
    /// Candidate number `n` (in start order).
    Candidate(usize),
}

/// A network fault on candidates' proxies.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub enum NetFault {
    /// Nothing flows; healed normally (held bytes then flow).
    Blackhole,
    /// Nothing flows; healed half-open (connections from before stay silent forever).
    HalfOpen,
    /// Added latency each way.
    Latency(Duration),
    /// Connections reset, new ones too.
    Reset,
}

/// What an admin writes into the Lease.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub enum Garbage {
    /// A holder nobody runs, with control characters, duration 1 s, no times, the token
    /// raised by one.
    StrangeHolder,
    /// Released (`""`) but with a huge `leaseDurationSeconds` and a renewTime in 2099.
    ReleasedFarFuture,
    /// `leaseTransitions: 2147483647` (the next token overflows); repaired by the admin
    /// 2 s later with a released record that continues the last token.
    MaxTransitions,
}

/// One fault.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub enum Fault {
    /// A proxy fault on `target` for `duration`.
    Net {
        /// Who.
        target: Target,
        /// What.
        fault: NetFault,
        /// For how long.
        duration: Duration,
    },
    /// SIGSTOP of `leaderz` and its work (both process groups), SIGCONT after `duration`.
    Pause {
        /// Who.
        target: Target,
        /// For how long.
        duration: Duration,
    },
    /// SIGKILL of the `leaderz` process only (as the OOM killer does).
    Kill {
        /// Who.
        target: Target,
    },
    /// SIGTERM to the candidate: a graceful stop; the lease must be taken over promptly.
    Term {
        /// Who.
        target: Target,
    },
    /// kube-apiserver killed, started again after `down`.
    ApiserverRestart {
        /// How long it stays down.
        down: Duration,
    },
    /// etcd killed (data kept), started again after `down`.
    EtcdRestart {
        /// How long it stays down.
        down: Duration,
    },
    /// An admin deletes the Lease.
    DeleteLease,
    /// An admin writes garbage into the Lease.
    Garbage(Garbage),
    /// The candidates' RoleBinding deleted, re-created after `duration`.
    RevokeRbac {
        /// For how long.
        duration: Duration,
    },
}

impl Fault {
    /// A short name for reports.
    pub fn kind(&self) -> String {
        match self {
            Fault::Net { fault, .. } => match fault {
                NetFault::Blackhole => "blackhole".into(),
                NetFault::HalfOpen => "half-open".into(),
                NetFault::Latency(_) => "latency".into(),
                NetFault::Reset => "reset".into(),
            },
            Fault::Pause { .. } => "sigstop".into(),
            Fault::Kill { .. } => "sigkill".into(),
            Fault::Term { .. } => "sigterm".into(),
            Fault::ApiserverRestart { .. } => "apiserver-restart".into(),
            Fault::EtcdRestart { .. } => "etcd-restart".into(),
            Fault::DeleteLease => "lease-deleted".into(),
            Fault::Garbage(g) => match g {
                Garbage::StrangeHolder => "garbage-holder".into(),
                Garbage::ReleasedFarFuture => "garbage-times".into(),
                Garbage::MaxTransitions => "garbage-max-transitions".into(),
            },
            Fault::RevokeRbac { .. } => "rbac-revoked".into(),
        }
    }
}

/// A fault at an offset from the moment the first leader was seen.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct Step {
    /// When.
    pub at: Duration,
    /// What.
    pub fault: Fault,
}

/// One candidate to start.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct CandidateSpec {
    /// leaderz or client-go.
    pub kind: Kind,
    /// A faketime clock rate (`None`: the real clock).
    pub rate: Option<f64>,
    /// Start only once a leader exists (to decide who leads first).
    pub after_leader: bool,
}

impl CandidateSpec {
    /// A leaderz candidate on the real clock.
    pub fn leaderz() -> Self {
        Self {
            kind: Kind::Leaderz,
            rate: None,
            after_leader: false,
        }
    }

    /// A client-go candidate.
    pub fn clientgo() -> Self {
        Self {
            kind: Kind::ClientGo,
            rate: None,
            after_leader: false,
        }
    }

    /// This candidate's clock runs `rate` times as fast (libfaketime).
    #[must_use]
    pub fn rate(mut self, rate: f64) -> Self {
        self.rate = Some(rate);
        self
    }

    /// Starts once a leader exists.
    #[must_use]
    pub fn after_leader(mut self) -> Self {
        self.after_leader = true;
        self
    }
}

/// A whole trial.
#[derive(Clone, Debug, Serialize)]
pub struct TrialSpec {
    /// Its name (also the ledger resource and the namespace prefix).
    pub name: String,
    /// The candidates, in start order.
    pub candidates: Vec<CandidateSpec>,
    /// The faults.
    pub steps: Vec<Step>,
    /// A clock rate is beyond the documented bound: overlaps are expected.
    pub beyond_bound: bool,
    /// Seed for resolving targets.
    pub seed: u64,
}

impl TrialSpec {
    /// Three leaderz candidates and these faults.
    pub fn new(name: impl Into<String>, steps: Vec<Step>) -> Self {
        Self {
            name: name.into(),
            candidates: vec![CandidateSpec::leaderz(); 3],
            steps,
            beyond_bound: false,
            seed: 0,
        }
    }

    /// A one-line description.
    pub fn describe(&self) -> String {
        let fleet: Vec<String> = self
            .candidates
            .iter()
            .map(|c| match (c.kind, c.rate) {
                (Kind::Leaderz, None) => "lz".to_owned(),
                (Kind::Leaderz, Some(r)) => format!("lz@x{r}"),
                (Kind::ClientGo, _) => "cg".to_owned(),
            })
            .collect();
        let steps: Vec<String> = self
            .steps
            .iter()
            .map(|s| format!("{:.1}s {:?}", s.at.as_secs_f64(), s.fault))
            .collect();
        format!("[{}] {}", fleet.join(","), steps.join("; "))
    }
}

/// The result of one trial.
#[derive(Debug, Serialize)]
pub struct TrialOutcome {
    /// What ran.
    pub spec: TrialSpec,
    /// What was recorded.
    pub data: TrialData,
    /// The checker's verdict.
    pub verdict: Verdict,
}

/// What a trial runs against.
pub struct Env<'a> {
    /// The control plane (owned: it is restarted).
    pub cp: &'a mut ControlPlane,
    /// The programs.
    pub bins: &'a Binaries,
    /// Where kubeconfigs and logs go.
    pub workdir: &'a Path,
    /// The election's timing.
    pub timings: Timings,
}

struct Candidate {
    spec: CandidateSpec,
    id: String,
    child: Child,
    pid: i32,
    proxy: FaultProxy,
    record: CandidateRecord,
    stderr: Arc<Mutex<Vec<String>>>,
    alive: bool,
}

struct Fleet {
    candidates: Vec<Candidate>,
    worker_log: PathBuf,
}

impl Fleet {
    /// Candidates still running and not asked to stop.
    fn live(&self) -> impl Iterator<Item = (usize, &Candidate)> {
        self.candidates.iter().enumerate().filter(|(_, c)| {
            c.alive && c.record.killed_ns.is_none() && c.record.terminated_ns.is_none()
        })
    }

    /// Candidates `target` names now.
    fn resolve(&self, target: Target, holder: Option<&str>, rng: &mut SmallRng) -> Vec<usize> {
        let live: Vec<usize> = self.live().map(|(i, _)| i).collect();
        let leader = holder.and_then(|h| self.live().find(|(_, c)| c.id == h).map(|(i, _)| i));
        let followers: Vec<usize> = live
            .iter()
            .copied()
            .filter(|i| Some(*i) != leader)
            .collect();
        let any = |v: &[usize], rng: &mut SmallRng| {
            if v.is_empty() {
                Vec::new()
            } else {
                vec![v[rng.random_range(0..v.len())]]
            }
        };
        match target {
            Target::Leader => leader.map_or_else(|| any(&live, rng), |l| vec![l]),
            Target::Follower => any(&followers, rng),
            Target::Followers => followers,
            Target::Candidate(n) => live.into_iter().filter(|&i| i == n).collect(),
        }
    }

    /// Process groups of candidate `i`: `leaderz` (or the Go program) and its live work.
    fn groups(&self, i: usize) -> Vec<Pid> {
        let c = &self.candidates[i];
        let mut groups = vec![Pid::from_raw(c.pid)];
        if c.spec.kind == Kind::Leaderz {
            let events = read_log(&self.worker_log);
            let ended: Vec<u32> = events
                .iter()
                .filter(|e| e.is_stop())
                .map(|e| e.pid)
                .collect();
            for e in events
                .iter()
                .filter(|e| e.event == "started" && e.identity == c.id)
            {
                if !ended.contains(&e.pid)
                    && let Ok(group) = i32::try_from(e.group())
                {
                    groups.push(Pid::from_raw(group));
                }
            }
        }
        groups
    }
}

/// Runs one trial and checks it.
pub async fn run_trial(env: Env<'_>, spec: TrialSpec) -> anyhow::Result<TrialOutcome> {
    let Env {
        cp,
        bins,
        workdir,
        timings,
    } = env;
    let ledger = &Ledger::start().await?;
    let mut rng = SmallRng::seed_from_u64(spec.seed);
    let resource = format!("{}-{:08x}", spec.name, rng.random::<u32>());
    let dir = workdir.join(&resource);
    std::fs::create_dir_all(&dir)?;
    let ns = cp.new_namespace(&spec.name).await?;
    let admin = cp.admin_client()?;
    let leases: Api<Lease> = Api::namespaced(admin.clone(), &ns);
    let (role, binding) = rbac()?;
    Api::<Role>::namespaced(admin.clone(), &ns)
        .create(&PostParams::default(), &role)
        .await
        .context("creating the Role of kube/role.yaml")?;
    let bindings: Api<RoleBinding> = Api::namespaced(admin.clone(), &ns);
    bindings
        .create(&PostParams::default(), &binding)
        .await
        .context("creating the RoleBinding of kube/rolebinding.yaml")?;
    let credentials = cp
        .service_account_credentials(&ns, SERVICE_ACCOUNT, Duration::from_secs(3600))
        .await?;
    let sa_client = cp.client(&credentials)?;
    wait_allowed(&sa_client, &ns).await?;
    let upstream: std::net::SocketAddr = cp
        .server_url()
        .trim_start_matches("https://")
        .parse()
        .context("the API server's address")?;

    let recorder = LeaseRecorder::start(leases.clone(), LEASE).await;
    let worker_log = dir.join("workers.jsonl");
    let mut fleet = Fleet {
        candidates: Vec::new(),
        worker_log: worker_log.clone(),
    };
    let mut admin_versions = std::collections::HashSet::new();

    let mut late = Vec::new();
    for (n, c) in spec.candidates.iter().enumerate() {
        if c.after_leader {
            late.push((n, *c));
            continue;
        }
        let candidate = start_candidate(
            n,
            *c,
            &ns,
            &resource,
            cp,
            &credentials,
            upstream,
            ledger,
            bins,
            &dir,
            &worker_log,
            timings,
        )
        .await?;
        fleet.candidates.push(candidate);
    }
    let led = wait_for_leader(&recorder, Duration::from_secs(20)).await;
    if !led {
        bail!("no leader within 20 s of starting the candidates");
    }
    for (n, c) in late {
        sleep(Duration::from_millis(300)).await;
        let candidate = start_candidate(
            n,
            c,
            &ns,
            &resource,
            cp,
            &credentials,
            upstream,
            ledger,
            bins,
            &dir,
            &worker_log,
            timings,
        )
        .await?;
        fleet.candidates.push(candidate);
    }
    // Let the election settle: followers watching, the leader renewing.
    sleep(Duration::from_millis(700)).await;

    // ---- the schedule ----------------------------------------------------------------
    let t0 = Instant::now();
    let fleet = AsyncMutex::new(fleet);
    let cp = AsyncMutex::new(cp);
    let rng = Mutex::new(rng);
    let faults: Mutex<Vec<FaultRecord>> = Mutex::new(Vec::new());
    let releases: Mutex<Vec<u64>> = Mutex::new(Vec::new());
    let admin_written: Mutex<Vec<String>> = Mutex::new(Vec::new());
    let steps = spec.steps.iter().map(|step| {
        let (fleet, cp, rng, faults, releases, recorder, leases, bindings, admin_written) = (
            &fleet,
            &cp,
            &rng,
            &faults,
            &releases,
            &recorder,
            &leases,
            &bindings,
            &admin_written,
        );
        let binding = binding.clone();
        let sa_client = sa_client.clone();
        let ns = ns.clone();
        async move {
            sleep_until(t0 + step.at).await;
            let start_ns = now_ns();
            let holder = recorder
                .latest()
                .map(|v| v.holder)
                .filter(|h| !h.is_empty());
            let mut target_name = None;
            let heal_ns = match step.fault {
                Fault::Net {
                    target,
                    fault,
                    duration,
                } => {
                    let hit = {
                        let fleet = fleet.lock().await;
                        let mut rng = rng.lock().unwrap_or_else(PoisonError::into_inner);
                        let hit = fleet.resolve(target, holder.as_deref(), &mut rng);
                        let mode = match fault {
                            NetFault::Blackhole | NetFault::HalfOpen => Mode::Blackhole,
                            NetFault::Latency(d) => Mode::Latency(d),
                            NetFault::Reset => Mode::Reset,
                        };
                        for &i in &hit {
                            fleet.candidates[i].proxy.set_mode(mode);
                        }
                        target_name = Some(names(&fleet, &hit));
                        hit
                    };
                    sleep(duration).await;
                    let fleet = fleet.lock().await;
                    for &i in &hit {
                        if fault == NetFault::HalfOpen {
                            fleet.candidates[i].proxy.heal_half_open();
                        } else {
                            fleet.candidates[i].proxy.heal();
                        }
                    }
                    now_ns()
                }
                Fault::Pause { target, duration } => {
                    let (hit, groups) = {
                        let fleet = fleet.lock().await;
                        let mut rng = rng.lock().unwrap_or_else(PoisonError::into_inner);
                        let hit = fleet.resolve(target, holder.as_deref(), &mut rng);
                        let groups: Vec<Pid> = hit.iter().flat_map(|&i| fleet.groups(i)).collect();
                        target_name = Some(names(&fleet, &hit));
                        (hit, groups)
                    };
                    for g in &groups {
                        let _ = killpg(*g, Signal::SIGSTOP);
                    }
                    let stopped = now_ns();
                    sleep(duration).await;
                    // The work first, as a scheduler may well resume it: it may then write
                    // before `leaderz` (or it) notices the term is over, and fencing must
                    // refuse those writes.
                    for g in groups.iter().rev() {
                        let _ = killpg(*g, Signal::SIGCONT);
                        sleep(Duration::from_millis(10)).await;
                    }
                    let resumed = now_ns();
                    let mut fleet = fleet.lock().await;
                    for &i in &hit {
                        fleet.candidates[i].record.paused.push((stopped, resumed));
                    }
                    resumed
                }
                Fault::Kill { target } | Fault::Term { target } => {
                    let mut fleet = fleet.lock().await;
                    let hit = {
                        let mut rng = rng.lock().unwrap_or_else(PoisonError::into_inner);
                        fleet.resolve(target, holder.as_deref(), &mut rng)
                    };
                    target_name = Some(names(&fleet, &hit));
                    // A fast handover is expected from a watching leaderz follower, not
                    // from client-go's polling.
                    let leaderz_follower = fleet
                        .live()
                        .any(|(i, c)| c.spec.kind == Kind::Leaderz && !hit.contains(&i));
                    let at = now_ns();
                    for &i in &hit {
                        let c = &mut fleet.candidates[i];
                        if matches!(step.fault, Fault::Kill { .. }) {
                            let _ = kill(Pid::from_raw(c.pid), Signal::SIGKILL);
                            c.record.killed_ns = Some(at);
                        } else {
                            let _ = kill(Pid::from_raw(c.pid), Signal::SIGTERM);
                            c.record.terminated_ns = Some(at);
                            if leaderz_follower && holder.as_deref() == Some(c.id.as_str()) {
                                releases
                                    .lock()
                                    .unwrap_or_else(PoisonError::into_inner)
                                    .push(at);
                            }
                        }
                    }
                    at
                }
                Fault::ApiserverRestart { down } => {
                    cp.lock().await.stop_apiserver();
                    sleep(down).await;
                    let mut cp = cp.lock().await;
                    if let Err(e) = cp.start_apiserver().await {
                        tracing::error!(error = %e, "kube-apiserver did not come back");
                    }
                    now_ns()
                }
                Fault::EtcdRestart { down } => {
                    cp.lock().await.stop_etcd();
                    sleep(down).await;
                    if let Err(e) = cp.lock().await.start_etcd().await {
                        tracing::error!(error = %e, "etcd did not come back");
                    }
                    // Healed when the API server serves again.
                    let deadline = Instant::now() + Duration::from_secs(30);
                    while Instant::now() < deadline {
                        if matches!(
                            timeout(Duration::from_secs(1), leases.get_opt(LEASE)).await,
                            Ok(Ok(_))
                        ) {
                            break;
                        }
                        sleep(Duration::from_millis(20)).await;
                    }
                    now_ns()
                }
                Fault::DeleteLease => {
                    let _ = leases.delete(LEASE, &DeleteParams::default()).await;
                    now_ns()
                }
                Fault::Garbage(garbage) => {
                    let written = write_garbage(leases, garbage, &recorder.versions()).await;
                    if let Some(rv) = written {
                        admin_written
                            .lock()
                            .unwrap_or_else(PoisonError::into_inner)
                            .push(rv);
                    }
                    if garbage == Garbage::MaxTransitions {
                        // Nobody can start a term now; the admin repairs it after a while,
                        // continuing the last candidate token.
                        sleep(Duration::from_secs(2)).await;
                        let last = recorder
                            .versions()
                            .iter()
                            .filter(|v| v.transitions < i32::MAX)
                            .map(|v| v.transitions)
                            .max()
                            .unwrap_or(0);
                        if let Some(rv) = write_released(leases, last).await {
                            admin_written
                                .lock()
                                .unwrap_or_else(PoisonError::into_inner)
                                .push(rv);
                        }
                    }
                    now_ns()
                }
                Fault::RevokeRbac { duration } => {
                    let _ = bindings
                        .delete(&binding_name(&binding), &DeleteParams::default())
                        .await;
                    sleep(duration).await;
                    let mut fresh = binding.clone();
                    fresh.metadata.resource_version = None;
                    let _ = bindings.create(&PostParams::default(), &fresh).await;
                    let _ = wait_allowed(&sa_client, &ns).await;
                    now_ns()
                }
            };
            faults
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .push(FaultRecord {
                    kind: step.fault.kind(),
                    target: target_name,
                    start_ns,
                    heal_ns,
                });
        }
    });
    futures::future::join_all(steps).await;

    // ---- recovery, then everyone stops ---------------------------------------------------
    let recovery = timings.lease_duration + timings.retry_period + Duration::from_millis(1500);
    sleep(recovery).await;
    let mut fleet = fleet.into_inner();
    stop_all(&mut fleet).await;
    sleep(Duration::from_millis(300)).await;
    for e in read_log(&fleet.worker_log) {
        if let Ok(group) = i32::try_from(e.group()) {
            let _ = killpg(Pid::from_raw(group), Signal::SIGKILL);
        }
    }
    let history = recorder.versions();
    let history_gaps = recorder.gaps();
    drop(recorder);

    admin_versions.extend(
        admin_written
            .into_inner()
            .unwrap_or_else(PoisonError::into_inner),
    );
    let data = TrialData {
        name: spec.name.clone(),
        timings: Some(timings),
        history,
        history_gaps,
        admin_versions,
        writes: ledger.writes(&resource),
        workers: read_log(&worker_log),
        candidates: fleet.candidates.iter().map(|c| c.record.clone()).collect(),
        faults: faults.into_inner().unwrap_or_else(PoisonError::into_inner),
        beyond_bound: spec.beyond_bound,
        releases: releases
            .into_inner()
            .unwrap_or_else(PoisonError::into_inner),
    };
    let verdict = check(&data);
    // Keep the raw record next to the logs for a look afterwards.
    let _ = std::fs::write(
        dir.join("trial.json"),
        serde_json::to_vec_pretty(
            &serde_json::json!({ "spec": &spec, "data": &data, "verdict": &verdict }),
        )?,
    );
    Ok(TrialOutcome {
        spec,
        data,
        verdict,
    })
}

fn names(fleet: &Fleet, hit: &[usize]) -> String {
    hit.iter()
        .map(|&i| fleet.candidates[i].id.clone())
        .collect::<Vec<_>>()
        .join(",")
}

fn binding_name(binding: &RoleBinding) -> String {
    binding.metadata.name.clone().unwrap_or_default()
}

/// The Role and RoleBinding of `kube/`.
fn rbac() -> anyhow::Result<(Role, RoleBinding)> {
    let kube = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../kube");
    let role: Role = serde_yaml::from_str(&std::fs::read_to_string(kube.join("role.yaml"))?)?;
    let binding: RoleBinding =
        serde_yaml::from_str(&std::fs::read_to_string(kube.join("rolebinding.yaml"))?)?;
    Ok((role, binding))
}

/// Waits until the ServiceAccount may update the Lease (RBAC takes a moment).
async fn wait_allowed(client: &kube::Client, ns: &str) -> anyhow::Result<()> {
    leaderz_testenv::wait_until_allowed(
        client,
        ResourceAttributes {
            group: Some("coordination.k8s.io".into()),
            resource: Some("leases".into()),
            verb: Some("update".into()),
            name: Some(LEASE.into()),
            namespace: Some(ns.into()),
            ..ResourceAttributes::default()
        },
        Duration::from_secs(20),
    )
    .await?;
    Ok(())
}

async fn wait_for_leader(recorder: &LeaseRecorder, within: Duration) -> bool {
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        if recorder.latest().is_some_and(|v| !v.holder.is_empty()) {
            return true;
        }
        sleep(Duration::from_millis(20)).await;
    }
    false
}

#[allow(clippy::too_many_arguments)]
async fn start_candidate(
    n: usize,
    spec: CandidateSpec,
    ns: &str,
    resource: &str,
    cp: &ControlPlane,
    credentials: &leaderz_testenv::Credentials,
    upstream: std::net::SocketAddr,
    ledger: &Ledger,
    bins: &Binaries,
    dir: &Path,
    worker_log: &Path,
    timings: Timings,
) -> anyhow::Result<Candidate> {
    let proxy = FaultProxy::start(upstream).await?;
    let prefix = match spec.kind {
        Kind::Leaderz => "lz",
        Kind::ClientGo => "cg",
    };
    let id = format!("{prefix}-{n}");
    let mut kubeconfig = cp.kubeconfig(credentials);
    for cluster in &mut kubeconfig.clusters {
        if let Some(c) = cluster.cluster.as_mut() {
            c.server = Some(format!("https://{}", proxy.addr()));
        }
    }
    let kubeconfig_path = dir.join(format!("{id}.kubeconfig"));
    std::fs::write(&kubeconfig_path, serde_yaml::to_string(&kubeconfig)?)?;
    let secs = |d: Duration| format!("{}ms", d.as_millis());
    let mut cmd = match spec.kind {
        Kind::Leaderz => {
            let mut cmd = Command::new(&bins.leaderz);
            cmd.args(["run", "--lease", LEASE, "-n", ns, "--identity", &id])
                .args(["--lease-duration", &secs(timings.lease_duration)])
                .args(["--renew-deadline", &secs(timings.renew_deadline)])
                .args(["--retry-period", &secs(timings.retry_period)])
                .args(["--grace", "1s", "--"]);
            if spec.rate.is_some() {
                // The work runs on the real clock.
                cmd.args(["env", "-u", "LD_PRELOAD", "-u", "FAKETIME"]);
            }
            cmd.arg(&bins.worker)
                .args(["--ledger", &ledger.url(), "--resource", resource])
                .arg("--log")
                .arg(worker_log)
                .env("LEADERZ_LOG_LEVEL", "info");
            cmd
        }
        Kind::ClientGo => {
            let Some(program) = &bins.clientgo else {
                bail!("a client-go candidate was asked for but interop/build.sh gave no program");
            };
            let mut cmd = Command::new(program);
            cmd.args(["--id", &id, "--namespace", ns, "--lease", LEASE])
                .arg("--kubeconfig")
                .arg(&kubeconfig_path)
                .args(["--lease-duration", &secs(timings.lease_duration)])
                .args(["--renew-deadline", &secs(timings.renew_deadline)])
                .args(["--retry-period", &secs(timings.retry_period)])
                .args(["--ledger", &ledger.url(), "--ledger-resource", resource])
                .arg("--worker-log")
                .arg(worker_log);
            cmd
        }
    };
    if let Some(rate) = spec.rate {
        let Some(lib) = &bins.libfaketime else {
            bail!("clock-rate skew needs libfaketime (Debian package `faketime`)");
        };
        cmd.env("LD_PRELOAD", lib)
            .env("FAKETIME", format!("+0 x{rate}"))
            .env("FAKETIME_NO_CACHE", "1");
    }
    cmd.env("KUBECONFIG", &kubeconfig_path)
        .env_remove("POD_NAME")
        .env_remove("POD_NAMESPACE")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .process_group(0)
        .kill_on_drop(true);
    let spawned_ns = now_ns();
    let mut child = cmd
        .spawn()
        .with_context(|| format!("starting candidate {id}"))?;
    let pid = child
        .id()
        .and_then(|p| i32::try_from(p).ok())
        .context("the candidate exited at once")?;
    let stderr = Arc::new(Mutex::new(Vec::new()));
    let lines = stderr.clone();
    let log_path = dir.join(format!("{id}.log"));
    if let Some(err) = child.stderr.take() {
        tokio::spawn(async move {
            let mut reader = BufReader::new(err).lines();
            let mut file = tokio::fs::File::create(&log_path).await.ok();
            while let Ok(Some(line)) = reader.next_line().await {
                if let Some(f) = file.as_mut() {
                    use tokio::io::AsyncWriteExt as _;
                    let _ = f.write_all(format!("{line}\n").as_bytes()).await;
                }
                lines
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .push(line);
            }
        });
    }
    Ok(Candidate {
        spec,
        record: CandidateRecord {
            id: id.clone(),
            kind: Some(spec.kind),
            rate: spec.rate.unwrap_or(1.0),
            spawned_ns,
            ..CandidateRecord::default()
        },
        id,
        child,
        pid,
        proxy,
        stderr,
        alive: true,
    })
}

/// SIGCONT (in case), then SIGTERM to every live candidate; waits for each to exit and
/// records how.
async fn stop_all(fleet: &mut Fleet) {
    let groups: Vec<Pid> = (0..fleet.candidates.len())
        .flat_map(|i| fleet.groups(i))
        .collect();
    for g in groups {
        let _ = killpg(g, Signal::SIGCONT);
    }
    for c in &mut fleet.candidates {
        // Exits seen before the end of the trial.
        if let Ok(Some(status)) = c.child.try_wait() {
            note_exit(c, status);
        }
    }
    let now = now_ns();
    for c in fleet.candidates.iter_mut().filter(|c| c.alive) {
        let _ = kill(Pid::from_raw(c.pid), Signal::SIGTERM);
        c.record.terminated_ns.get_or_insert(now);
    }
    for c in &mut fleet.candidates {
        if !c.alive {
            continue;
        }
        match timeout(Duration::from_secs(8), c.child.wait()).await {
            Ok(Ok(status)) => note_exit(c, status),
            _ => {
                let _ = c.child.start_kill();
                let _ = c.child.wait().await;
                c.alive = false;
                c.record.exit = Some((now_ns(), "did not exit within 8 s of SIGTERM".into()));
            }
        }
    }
    for c in &mut fleet.candidates {
        let lines = c
            .stderr
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        c.record.panics = lines
            .iter()
            .filter(|l| l.contains("panicked"))
            .cloned()
            .collect();
        c.record.stderr_tail = lines.iter().rev().take(3).rev().cloned().collect();
    }
}

fn note_exit(c: &mut Candidate, status: std::process::ExitStatus) {
    use std::os::unix::process::ExitStatusExt as _;
    if !c.alive {
        return;
    }
    c.alive = false;
    let how = match (status.code(), status.signal()) {
        (Some(code), _) => format!("exit {code}"),
        (None, Some(sig)) => format!("signal {sig}"),
        _ => "unknown".into(),
    };
    c.record.exit_ok = status.code() == Some(0);
    c.record.exit = Some((now_ns(), how));
}

/// Writes `garbage` over the Lease as an admin; returns the resourceVersion written.
async fn write_garbage(
    leases: &Api<Lease>,
    garbage: Garbage,
    seen: &[crate::history::LeaseVersion],
) -> Option<String> {
    let last = seen
        .iter()
        .filter(|v| !v.deleted)
        .map(|v| v.transitions)
        .max()
        .unwrap_or(0);
    for _ in 0..10 {
        let Ok(Some(mut lease)) = leases.get_opt(LEASE).await else {
            sleep(Duration::from_millis(50)).await;
            continue;
        };
        lease.spec = Some(match garbage {
            Garbage::StrangeHolder => LeaseSpec {
                holder_identity: Some("garbage\u{7}holder\twith tabs".into()),
                lease_duration_seconds: Some(1),
                lease_transitions: Some(last.saturating_add(1)),
                ..LeaseSpec::default()
            },
            Garbage::ReleasedFarFuture => LeaseSpec {
                holder_identity: Some(String::new()),
                lease_duration_seconds: Some(i32::MAX),
                renew_time: Some(MicroTime(
                    jiff::Timestamp::from_second(4_070_908_800).unwrap_or_default(),
                )),
                acquire_time: Some(MicroTime(jiff::Timestamp::UNIX_EPOCH)),
                lease_transitions: Some(last),
                ..LeaseSpec::default()
            },
            Garbage::MaxTransitions => LeaseSpec {
                holder_identity: Some(String::new()),
                lease_duration_seconds: Some(1),
                lease_transitions: Some(i32::MAX),
                ..LeaseSpec::default()
            },
        });
        match leases.replace(LEASE, &PostParams::default(), &lease).await {
            Ok(l) => return l.metadata.resource_version,
            Err(_) => sleep(Duration::from_millis(20)).await,
        }
    }
    None
}

/// An admin's repair: a released record continuing token `transitions`.
async fn write_released(leases: &Api<Lease>, transitions: i32) -> Option<String> {
    for _ in 0..10 {
        let Ok(Some(mut lease)) = leases.get_opt(LEASE).await else {
            sleep(Duration::from_millis(50)).await;
            continue;
        };
        let now = MicroTime(jiff::Timestamp::now());
        lease.spec = Some(LeaseSpec {
            holder_identity: Some(String::new()),
            lease_duration_seconds: Some(1),
            acquire_time: Some(now.clone()),
            renew_time: Some(now),
            lease_transitions: Some(transitions),
            ..LeaseSpec::default()
        });
        match leases.replace(LEASE, &PostParams::default(), &lease).await {
            Ok(l) => return l.metadata.resource_version,
            Err(_) => sleep(Duration::from_millis(20)).await,
        }
    }
    None
}
