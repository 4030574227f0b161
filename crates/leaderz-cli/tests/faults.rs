//! The fault-injection suite (issue 12, section 3): `leaderz run` candidates whose work
//! writes to a fenced ledger, each behind its own fault-injecting proxy, against a real
//! kube-apiserver + etcd that the suite also restarts; invariants (a)–(e) checked on every
//! trial (see `leaderz_faults::check`). Timings 3 s / 2 s / 500 ms.
//!
//! One control plane for the whole file, owned (it is restarted), and one trial at a time.
//!
//! The soak: `FAULT_SEED=<n> FAULT_SOAK_MINUTES=30 FAULT_RESULTS=faults/RESULTS.md
//! cargo test -p leaderz-cli --test faults seeded -- --nocapture` (see `faults/README.md`).

#![allow(clippy::unwrap_used)] // tests: a panic is the failure report

use std::path::PathBuf;
use std::sync::OnceLock;
use std::time::Duration;

use leaderz_faults::check::Timings;
use leaderz_faults::report;
use leaderz_faults::schedule::{half_open_trial, random_trial, skew_trial};
use leaderz_faults::trial::{
    Binaries, CandidateSpec, Env, Fault, Garbage, NetFault, Step, Target, TrialOutcome, TrialSpec,
    run_trial,
};
use leaderz_testenv::{ControlPlane, StartOptions};
use tokio::sync::Mutex;

/// The control plane of this file: owned, since trials restart its servers.
static CONTROL_PLANE: Mutex<Option<ControlPlane>> = Mutex::const_new(None);

fn binaries() -> &'static Binaries {
    static BINS: OnceLock<Binaries> = OnceLock::new();
    BINS.get_or_init(|| Binaries {
        leaderz: PathBuf::from(env!("CARGO_BIN_EXE_leaderz")),
        worker: leaderz_faults::worker_binary().unwrap(),
        clientgo: Some(leaderz_faults::clientgo_binary().unwrap()),
        libfaketime: leaderz_faults::libfaketime(),
    })
}

fn workdir() -> PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
            .join("faults")
            .join(format!("run-{}", leaderz_faults::now_ns()));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    })
    .clone()
}

/// Runs trials one at a time on the shared control plane, printing each verdict.
async fn run(specs: Vec<TrialSpec>) -> Vec<TrialOutcome> {
    let mut outcomes = Vec::new();
    for spec in specs {
        outcomes.push(try_run(spec).await.unwrap());
    }
    outcomes
}

/// Runs one trial on the shared control plane and prints its verdict.
async fn try_run(spec: TrialSpec) -> anyhow::Result<TrialOutcome> {
    let bins = tokio::task::spawn_blocking(binaries).await?;
    let mut guard = CONTROL_PLANE.lock().await;
    if guard.is_none() {
        *guard = Some(ControlPlane::start(StartOptions::default()).await?);
    }
    let cp = guard.as_mut().unwrap();
    // A trial that failed half-way may have left a server down.
    if !cp.etcd_running() {
        cp.start_etcd().await?;
    }
    if !cp.apiserver_running() {
        cp.start_apiserver().await?;
    }
    eprintln!(
        "trial {} (seed {}): {}",
        spec.name,
        spec.seed,
        spec.describe()
    );
    let env = Env {
        cp,
        bins,
        workdir: &workdir(),
        timings: Timings::default(),
    };
    let outcome = run_trial(env, spec).await?;
    print_outcome(&outcome);
    Ok(outcome)
}

fn print_outcome(o: &TrialOutcome) {
    let f = &o.verdict.figures;
    eprintln!(
        "  {} terms, {} writes accepted, {} stale rejected, {} stale accepted, {} overlaps; \
         lateness ms {:?}; leaderless {:?} ms; handover ms {:?}",
        f.terms,
        f.accepted,
        f.stale_rejected,
        f.stale_accepted,
        f.overlaps,
        f.lateness_ms.iter().map(|v| v.round()).collect::<Vec<_>>(),
        f.leaderless_ms.map(f64::round),
        f.handover_ms.iter().map(|v| v.round()).collect::<Vec<_>>(),
    );
    for finding in &o.verdict.findings {
        eprintln!("  FINDING {finding}");
    }
    for finding in &o.verdict.expected {
        eprintln!("  expected {finding}");
    }
    for finding in &o.verdict.clientgo {
        eprintln!("  client-go {finding}");
    }
}

/// Fails listing every broken promise of every trial.
fn assert_kept(outcomes: &[TrialOutcome]) {
    let broken: Vec<String> = outcomes
        .iter()
        .filter(|o| o.verdict.failed())
        .map(|o| {
            let findings: Vec<String> =
                o.verdict.findings.iter().map(ToString::to_string).collect();
            format!(
                "{} (seed {}): {}\n    {}",
                o.spec.name,
                o.spec.seed,
                o.spec.describe(),
                findings.join("\n    ")
            )
        })
        .collect();
    assert!(broken.is_empty(), "promises broken:\n{}", broken.join("\n"));
}

fn at(ms: u64, fault: Fault) -> Step {
    Step {
        at: Duration::from_millis(ms),
        fault,
    }
}

fn net(target: Target, fault: NetFault, ms: u64) -> Fault {
    Fault::Net {
        target,
        fault,
        duration: Duration::from_millis(ms),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn network_faults_on_the_leader() {
    let outcomes = run(vec![
        TrialSpec::new(
            "blackhole",
            vec![at(300, net(Target::Leader, NetFault::Blackhole, 4000))],
        ),
        TrialSpec::new(
            "latency",
            vec![at(
                300,
                net(
                    Target::Leader,
                    NetFault::Latency(Duration::from_millis(700)),
                    3000,
                ),
            )],
        ),
        TrialSpec::new(
            "resets",
            vec![at(300, net(Target::Leader, NetFault::Reset, 1500))],
        ),
    ])
    .await;
    // A blackholed leader lost its lease: a second term started.
    assert!(outcomes[0].verdict.figures.terms >= 2);
    assert!(!outcomes[0].verdict.figures.lateness_ms.is_empty());
    assert_kept(&outcomes);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn half_open_watches_do_not_delay_a_handover() {
    let outcomes = run(vec![half_open_trial(
        "half-open",
        Duration::from_millis(1500),
    )])
    .await;
    assert_eq!(outcomes[0].verdict.figures.handover_ms.len(), 1);
    assert_kept(&outcomes);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leader_paused_longer_than_the_lease_is_fenced() {
    let outcomes = run(vec![TrialSpec::new(
        "sigstop",
        vec![at(
            300,
            Fault::Pause {
                target: Target::Leader,
                duration: Duration::from_millis(4500),
            },
        )],
    )])
    .await;
    let f = &outcomes[0].verdict.figures;
    // The paused worker resumed and wrote with its old token: the ledger refused it.
    assert!(f.stale_rejected > 0, "no stale write after SIGCONT: {f:?}");
    assert_kept(&outcomes);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_and_stopped_leaders() {
    let outcomes = run(vec![
        TrialSpec::new(
            "sigkill",
            vec![at(
                300,
                Fault::Kill {
                    target: Target::Leader,
                },
            )],
        ),
        TrialSpec::new(
            "sigterm",
            vec![at(
                300,
                Fault::Term {
                    target: Target::Leader,
                },
            )],
        ),
    ])
    .await;
    assert_eq!(outcomes[1].verdict.figures.handover_ms.len(), 1);
    assert_kept(&outcomes);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn apiserver_and_etcd_restarts() {
    let outcomes = run(vec![
        TrialSpec::new(
            "apiserver-restart",
            vec![at(
                300,
                Fault::ApiserverRestart {
                    down: Duration::from_millis(3500),
                },
            )],
        ),
        TrialSpec::new(
            "etcd-restart",
            vec![at(
                300,
                Fault::EtcdRestart {
                    down: Duration::from_millis(2500),
                },
            )],
        ),
    ])
    .await;
    assert_kept(&outcomes);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_deletes_the_lease_mid_election() {
    let outcomes = run(vec![TrialSpec::new(
        "lease-deleted",
        vec![at(300, Fault::DeleteLease)],
    )])
    .await;
    assert_kept(&outcomes);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_writes_garbage_into_the_lease() {
    let outcomes = run(vec![
        TrialSpec::new(
            "garbage-holder",
            vec![at(300, Fault::Garbage(Garbage::StrangeHolder))],
        ),
        TrialSpec::new(
            "garbage-max-transitions",
            vec![at(300, Fault::Garbage(Garbage::MaxTransitions))],
        ),
    ])
    .await;
    assert_kept(&outcomes);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rbac_revoked_then_restored() {
    let outcomes = run(vec![TrialSpec::new(
        "rbac-revoked",
        vec![at(
            300,
            Fault::RevokeRbac {
                duration: Duration::from_millis(4000),
            },
        )],
    )])
    .await;
    assert_kept(&outcomes);
}

/// Clock rates skewed with libfaketime: inside the bound (lease_duration / renew_deadline
/// = 1.5) nothing overlaps; just beyond it the checker must find the overlap.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clock_rate_skew_inside_and_beyond_the_bound() {
    let timings = Timings::default();
    let outcomes = run(vec![
        skew_trial("skew-inside", 1.35, timings),
        skew_trial("skew-beyond", 1.7, timings),
    ])
    .await;
    // faketime really speeds up the skewed leaderz: it took over after lease_duration of
    // its own clock, 3 s / 1.7 = 1.76 s of real time after the last renewal it saw, and
    // then renewed every 500 ms / 1.7 = 294 ms.
    let beyond = &outcomes[1];
    let (takeover, interval) = skewed_timing(beyond, "lz-1");
    eprintln!(
        "x1.7: takeover {takeover:.0} ms after the last renewal seen; renewal interval {interval:.0} ms"
    );
    assert!(
        (1550.0..2000.0).contains(&takeover),
        "takeover {takeover} ms"
    );
    assert!((250.0..340.0).contains(&interval), "interval {interval} ms");
    assert!(
        !beyond.verdict.expected.is_empty(),
        "a clock 1.7 times as fast must produce an overlap the checker finds"
    );
    assert_kept(&outcomes);
}

/// (ms from the old leader's last renewal to `id`'s first record, median ms between `id`'s
/// renewals), from the Lease history's receive times.
fn skewed_timing(o: &TrialOutcome, id: &str) -> (f64, f64) {
    let h = &o.data.history;
    let first = h.iter().position(|v| v.holder == id).unwrap();
    let before = h[..first]
        .iter()
        .rev()
        .find(|v| !v.holder.is_empty())
        .unwrap();
    let takeover = (h[first].received_ns - before.received_ns) as f64 / 1e6;
    let mut gaps: Vec<f64> = h[first..]
        .windows(2)
        .filter(|w| w[0].holder == id && w[1].holder == id)
        .map(|w| (w[1].received_ns - w[0].received_ns) as f64 / 1e6)
        .collect();
    gaps.sort_by(f64::total_cmp);
    (takeover, gaps[gaps.len() / 2])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mixed_fleet_with_clientgo_candidates() {
    let mut spec = TrialSpec::new(
        "mixed-fleet",
        vec![
            at(300, net(Target::Leader, NetFault::Blackhole, 3500)),
            at(
                5000,
                Fault::Term {
                    target: Target::Leader,
                },
            ),
        ],
    );
    // leaderz leads first; client-go takes over from it, then hands back. (A cut-off
    // client-go leader is in the soak: client-go's release() can clobber a newer
    // holder's lease, see faults/README.md.)
    spec.candidates = vec![
        CandidateSpec::leaderz(),
        CandidateSpec::clientgo(),
        CandidateSpec::clientgo(),
    ];
    let outcomes = run(vec![spec]).await;
    assert_kept(&outcomes);
}

/// Seeded schedules, alone and mixed. By default 3 trials of `FAULT_SEED` (default 12);
/// with `FAULT_SOAK_MINUTES` it runs trials until that time is up (the soak), and with
/// `FAULT_RESULTS` it writes the figures there as Markdown.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn seeded_fault_schedules() {
    let env = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
    let seed: u64 = env("FAULT_SEED").map_or(12, |s| s.parse().unwrap());
    let minutes: Option<f64> = env("FAULT_SOAK_MINUTES").map(|m| m.parse().unwrap());
    let first: u64 = env("FAULT_FIRST_TRIAL").map_or(0, |s| s.parse().unwrap());
    let timings = Timings::default();
    let results = env("FAULT_RESULTS").map(|p| leaderz_faults::workspace_root().join(p));
    let command = format!(
        "FAULT_SEED={seed}{} cargo test -p leaderz-cli --test faults seeded -- --nocapture",
        minutes.map_or(String::new(), |m| format!(" FAULT_SOAK_MINUTES={m}"))
    );
    #[allow(clippy::disallowed_types)] // the soak's length is real wall time
    let started = std::time::Instant::now();
    let mut outcomes = Vec::new();
    let mut errors = Vec::new();
    let mut index = first;
    loop {
        let done = match minutes {
            Some(m) => started.elapsed().as_secs_f64() >= m * 60.0,
            None => index >= first + 3,
        };
        if done {
            break;
        }
        let spec = random_trial(seed, index, timings);
        let name = spec.name.clone();
        match try_run(spec).await {
            Ok(outcome) => outcomes.push(outcome),
            // A trial the harness could not run (not a verdict on leaderz): noted, and the
            // soak goes on.
            Err(e) => {
                eprintln!("  trial {name} could not run: {e:#}");
                errors.push(format!("{name}: {e:#}"));
            }
        }
        index += 1;
        // Written after every trial, so that an interrupted soak keeps its figures.
        let elapsed = started.elapsed().as_secs_f64() / 60.0;
        let mut md = report::markdown(&outcomes, timings, &command, elapsed);
        if !errors.is_empty() {
            md.push_str(&format!(
                "\n## Trials that could not run ({})\n\n- {}\n",
                errors.len(),
                errors.join("\n- ")
            ));
        }
        match &results {
            Some(path) => std::fs::write(path, &md).unwrap(),
            None if minutes.is_none() && index >= first + 3 => eprintln!("{md}"),
            None => {}
        }
    }
    assert!(errors.is_empty(), "trials that could not run: {errors:#?}");
    assert_kept(&outcomes);
}
