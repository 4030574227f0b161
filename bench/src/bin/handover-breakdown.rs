//! Where the milliseconds of a handover go: one control plane with an audit log, three
//! candidates (each with a client certificate of its own, so that the audit log names
//! the sender of every request), the leader stopped by SIGTERM (or SIGKILL with
//! `--kill`) over and over, and per trial the time line from the signal to the
//! benchmark's watch showing the new holder:
//!
//! ```sh
//! cargo build --release -p leaderz-interop -p leaderz-bench
//! target/release/handover-breakdown --trials 20            # graceful handovers
//! target/release/handover-breakdown --trials 20 --kill     # takeovers after expiry
//! target/release/handover-breakdown --candidate interop/clientgo-candidate/clientgo-candidate
//! ```
//!
//! Every time comes from one clock (the machine's wall clock): the signal as sent here,
//! each Lease request as kube-apiserver's audit log stamps it (received, and the
//! response complete), the followers' `new_leader` event lines (when a follower's
//! election published that nobody holds the Lease: the release reached it), and the
//! benchmark's own watch on the Lease. The audit log runs in batch mode, so writing it
//! does not delay the requests it records.

use std::collections::HashMap;
use std::io::{BufRead, BufReader as StdBufReader};
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, bail};
use clap::Parser;
use futures::TryStreamExt;
use k8s_openapi::api::coordination::v1::Lease;
use kube::Api;
use kube::api::{ListParams, WatchEvent, WatchParams};
use leaderz_testenv::{ControlPlane, StartOptions};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::watch;
use tokio::time::{sleep, timeout};

/// Where the milliseconds of a handover go (see the module docs).
#[derive(Debug, Parser)]
struct Args {
    /// Handovers to time.
    #[arg(long, default_value_t = 20)]
    trials: usize,
    /// SIGKILL the leader instead of SIGTERM: time the takeover after expiry.
    #[arg(long)]
    kill: bool,
    /// The candidate program (the interop candidates' flags).
    #[arg(long, default_value = "target/release/leaderz-candidate")]
    candidate: PathBuf,
    /// Lease duration, renew deadline, retry period.
    #[arg(long, value_delimiter = ',', default_value = "3s,2s,500ms")]
    timings: Vec<String>,
}

const LEASE: &str = "breakdown";

fn wall_ns() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_nanos()).unwrap_or(i64::MAX))
}

/// One candidate process and what its event lines said, with their times.
struct Candidate {
    child: Child,
    events: Arc<Mutex<Vec<(i64, String, String)>>>,
}

async fn start_candidate(
    args: &Args,
    cp: &ControlPlane,
    dir: &std::path::Path,
    ns: &str,
    id: &str,
) -> Result<Candidate> {
    let kubeconfig = dir.join(format!("{id}.kubeconfig"));
    cp.write_kubeconfig(&kubeconfig, &cp.user_credentials(id, &["system:masters"])?)?;
    let [ld, rd, rp] = [&args.timings[0], &args.timings[1], &args.timings[2]];
    let mut child = Command::new(&args.candidate)
        .args(["--id", id, "--namespace", ns, "--lease", LEASE])
        .args(["--lease-duration", ld, "--renew-deadline", rd])
        .args(["--retry-period", rp])
        .env("KUBECONFIG", &kubeconfig)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("starting {}", args.candidate.display()))?;
    let stdout = child.stdout.take().context("no stdout")?;
    let events = Arc::new(Mutex::new(Vec::new()));
    let sink = events.clone();
    tokio::spawn(async move {
        let mut lines = BufReader::new(stdout).lines();
        while let Ok(Some(line)) = lines.next_line().await {
            let Ok(v) = serde_json::from_str::<serde_json::Value>(&line) else {
                continue;
            };
            let ts = v["ts_ns"].as_i64().unwrap_or(0);
            let event = v["event"].as_str().unwrap_or_default().to_owned();
            let leader = v["leader"].as_str().unwrap_or_default().to_owned();
            sink.lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .push((ts, event, leader));
        }
    });
    Ok(Candidate { child, events })
}

/// The benchmark's watch: (arrival, holder) of every holder change.
fn watch_holder(api: Api<Lease>) -> watch::Receiver<(i64, String)> {
    let (tx, rx) = watch::channel((0, String::new()));
    tokio::spawn(async move {
        let selector = format!("metadata.name={LEASE}");
        loop {
            let Ok(list) = api.list(&ListParams::default().fields(&selector)).await else {
                sleep(Duration::from_millis(100)).await;
                continue;
            };
            let version = list.metadata.resource_version.unwrap_or_default();
            let params = WatchParams::default().fields(&selector).timeout(290);
            let Ok(stream) = api.watch(&params, &version).await else {
                continue;
            };
            let mut stream = std::pin::pin!(stream);
            while let Ok(Some(event)) = stream.try_next().await {
                if let WatchEvent::Added(l) | WatchEvent::Modified(l) = event {
                    let holder = l.spec.and_then(|s| s.holder_identity).unwrap_or_default();
                    tx.send_if_modified(|seen| {
                        if seen.1 == holder {
                            return false;
                        }
                        *seen = (wall_ns(), holder);
                        true
                    });
                }
            }
        }
    });
    rx
}

/// A Lease request as the audit log recorded it.
#[derive(Debug, Clone)]
struct Audited {
    user: String,
    verb: String,
    received_ns: i64,
    done_ns: i64,
    code: i64,
    /// For writes: the holder the request wrote.
    holder: Option<String>,
}

fn parse_time(s: &str) -> Option<i64> {
    let ts: jiff::Timestamp = s.parse().ok()?;
    i64::try_from(ts.as_nanosecond()).ok()
}

fn read_audit(path: &std::path::Path, ns: &str) -> Result<Vec<Audited>> {
    let file = std::fs::File::open(path).context("opening the audit log")?;
    let mut out = Vec::new();
    for line in StdBufReader::new(file).lines() {
        let line = line?;
        let Ok(v) = serde_json::from_str::<serde_json::Value>(&line) else {
            continue;
        };
        if v["stage"] != "ResponseComplete"
            || v["objectRef"]["namespace"] != ns
            || v["objectRef"]["resource"] != "leases"
        {
            continue;
        }
        let verb = v["verb"].as_str().unwrap_or_default().to_owned();
        if !matches!(verb.as_str(), "get" | "update" | "create") {
            continue;
        }
        let (Some(received_ns), Some(done_ns)) = (
            v["requestReceivedTimestamp"].as_str().and_then(parse_time),
            v["stageTimestamp"].as_str().and_then(parse_time),
        ) else {
            continue;
        };
        out.push(Audited {
            user: v["user"]["username"]
                .as_str()
                .unwrap_or_default()
                .to_owned(),
            verb,
            received_ns,
            done_ns,
            code: v["responseStatus"]["code"].as_i64().unwrap_or(0),
            holder: v["requestObject"]["spec"]["holderIdentity"]
                .as_str()
                .map(str::to_owned),
        });
    }
    out.sort_by_key(|a| a.received_ns);
    Ok(out)
}

/// One trial's time line, in nanoseconds of the wall clock.
#[derive(Debug, Default)]
struct Trial {
    signal: i64,
    /// The old leader's requests after the signal (release, with any read before it).
    release_reads: Vec<Audited>,
    release: Option<Audited>,
    /// When the new holder's follower said nobody holds it (the release reached it).
    follower_saw_release: Option<i64>,
    /// The new holder's requests from the signal to its taking write.
    take_reads: Vec<Audited>,
    take: Option<Audited>,
    /// The benchmark's watch showing the new holder.
    seen: i64,
    /// The old leader's last renewal before the signal, done + the lease duration: when
    /// the followers' clocks say its lease expires (they saw it a little later still).
    expiry: Option<i64>,
}

fn ms(ns: i64) -> String {
    format!("{:.1}", ns as f64 / 1e6)
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    if args.timings.len() != 3 {
        bail!("--timings takes three durations, e.g. 3s,2s,500ms");
    }
    let dir = tempdir()?;
    let policy = dir.join("audit-policy.yaml");
    std::fs::write(
        &policy,
        "apiVersion: audit.k8s.io/v1\nkind: Policy\nomitStages: [RequestReceived, ResponseStarted]\n\
         rules:\n- level: Request\n  resources: [{group: coordination.k8s.io, resources: [leases]}]\n\
         - level: None\n",
    )?;
    let audit = dir.join("audit.log");
    let cp = ControlPlane::start(
        StartOptions::default()
            .apiserver_arg(format!("--audit-policy-file={}", policy.display()))
            .apiserver_arg(format!("--audit-log-path={}", audit.display()))
            .apiserver_arg("--audit-log-mode=batch")
            .apiserver_arg("--audit-log-batch-max-wait=1s"),
    )
    .await?;
    let ns = cp.new_namespace("breakdown").await?;
    let admin = cp.admin_client()?;
    let api: Api<Lease> = Api::namespaced(admin, &ns);
    let mut seen = watch_holder(api.clone());

    let mut next = 0;
    let mut fleet: HashMap<String, Candidate> = HashMap::new();
    for _ in 0..3 {
        let id = format!("c{next}");
        next += 1;
        fleet.insert(
            id.clone(),
            start_candidate(&args, &cp, &dir, &ns, &id).await?,
        );
    }
    let mut trials = Vec::new();
    for n in 0..args.trials {
        // A leader, and a quiet moment at a random phase of its renewals.
        let leader = timeout(Duration::from_secs(30), seen.wait_for(|s| !s.1.is_empty()))
            .await
            .context("no leader within 30 s")??
            .1
            .clone();
        sleep(Duration::from_millis(1500 + rand::random_range(0..1000))).await;
        let old = fleet.remove(&leader).context("the leader is not ours")?;
        let pid = Pid::from_raw(i32::try_from(old.child.id().context("exited")?)?);
        let signal = wall_ns();
        kill(
            pid,
            if args.kill {
                Signal::SIGKILL
            } else {
                Signal::SIGTERM
            },
        )?;
        let changed = timeout(
            Duration::from_secs(30),
            seen.wait_for(|s| !s.1.is_empty() && s.1 != leader),
        )
        .await
        .context("no new holder within 30 s")??
        .clone();
        let mut trial = Trial {
            signal,
            seen: changed.0,
            ..Trial::default()
        };
        if let Some(c) = fleet.get(&changed.1) {
            trial.follower_saw_release = c
                .events
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .iter()
                .filter(|(ts, event, leader)| {
                    *ts >= signal && event == "new_leader" && leader.is_empty()
                })
                .map(|(ts, ..)| *ts)
                .next();
        }
        trials.push((trial, leader.clone(), changed.1.clone()));
        let mut old = old;
        let _ = old.child.wait().await;
        drop(old);
        eprintln!("trial {n}: {leader} -> {}", changed.1);
        let id = format!("c{next}");
        next += 1;
        fleet.insert(
            id.clone(),
            start_candidate(&args, &cp, &dir, &ns, &id).await?,
        );
    }
    // Let the audit log's last batch out.
    sleep(Duration::from_secs(3)).await;
    let audited = read_audit(&audit, &ns)?;
    let mut rows = Vec::new();
    let lease_ns = humantime::parse_duration(&args.timings[0])
        .map(|d| i64::try_from(d.as_nanos()).unwrap_or(i64::MAX))
        .context("--timings: the lease duration")?;
    for (mut trial, old, new) in trials {
        trial.expiry = audited
            .iter()
            .filter(|a| {
                a.user == old
                    && a.verb == "update"
                    && a.code < 300
                    && a.holder.as_deref() == Some(old.as_str())
                    && a.done_ns < trial.signal
            })
            .map(|a| a.done_ns + lease_ns)
            .next_back();
        for a in audited
            .iter()
            .filter(|a| a.received_ns >= trial.signal && a.received_ns <= trial.seen)
        {
            let writes = a.verb != "get";
            if a.user == old && trial.release.is_none() {
                if writes && a.holder.as_deref() == Some("") {
                    trial.release = Some(a.clone());
                } else if !writes {
                    trial.release_reads.push(a.clone());
                }
            } else if a.user == new && trial.take.is_none() {
                if writes && a.holder.as_deref() == Some(new.as_str()) && a.code < 300 {
                    trial.take = Some(a.clone());
                } else {
                    trial.take_reads.push(a.clone());
                }
            }
        }
        rows.push(trial);
    }
    print_report(&args, &rows);
    drop(fleet);
    Ok(())
}

fn print_report(args: &Args, rows: &[Trial]) {
    println!(
        "{} of {} ({}), timings {}; ms from the {}:",
        if args.kill {
            "takeover after SIGKILL"
        } else {
            "handover after SIGTERM"
        },
        args.candidate.display(),
        rows.len(),
        args.timings.join("/"),
        if args.kill {
            "signal"
        } else {
            "signal (SIGTERM)"
        },
    );
    println!(
        "| trial | old leader's reads (server ms) | release received | release done | follower saw it | new holder's reads (server ms) | take received | take done | watch saw holder |"
    );
    println!("|---|---|---|---|---|---|---|---|---|");
    let rel = |t: &Trial, ns: i64| ms(ns - t.signal);
    let reads = |t: &Trial, r: &[Audited]| {
        r.iter()
            .map(|a| {
                format!(
                    "{} {}@{}+{}",
                    a.verb,
                    a.code,
                    rel(t, a.received_ns),
                    ms(a.done_ns - a.received_ns)
                )
            })
            .collect::<Vec<_>>()
            .join(", ")
    };
    for (i, t) in rows.iter().enumerate() {
        let opt = |a: &Option<Audited>, f: fn(&Audited) -> i64| {
            a.as_ref().map_or("-".to_owned(), |a| rel(t, f(a)))
        };
        println!(
            "| {i} | {} | {} | {} | {} | {} | {} | {} | {} |",
            reads(t, &t.release_reads),
            opt(&t.release, |a| a.received_ns),
            opt(&t.release, |a| a.done_ns),
            t.follower_saw_release
                .map_or("-".to_owned(), |ns| rel(t, ns)),
            reads(t, &t.take_reads),
            opt(&t.take, |a| a.received_ns),
            opt(&t.take, |a| a.done_ns),
            rel(t, t.seen),
        );
    }
    // Medians of each step.
    let median = |mut v: Vec<i64>| -> String {
        if v.is_empty() {
            return "-".to_owned();
        }
        v.sort_unstable();
        ms(v[v.len() / 2])
    };
    let steps: Vec<(&str, Vec<i64>)> = vec![
        (
            "signal → release received (the old leader's own path)",
            rows.iter()
                .filter_map(|t| t.release.as_ref().map(|a| a.received_ns - t.signal))
                .collect(),
        ),
        (
            "release in the API server",
            rows.iter()
                .filter_map(|t| t.release.as_ref().map(|a| a.done_ns - a.received_ns))
                .collect(),
        ),
        (
            "release done → take received (watch event, decision, request)",
            rows.iter()
                .filter_map(|t| Some(t.take.as_ref()?.received_ns - t.release.as_ref()?.done_ns))
                .collect(),
        ),
        (
            "the old leader's lease expired (its last renewal done + LD) → take received",
            rows.iter()
                .filter_map(|t| Some(t.take.as_ref()?.received_ns - t.expiry?))
                .collect(),
        ),
        (
            "take in the API server",
            rows.iter()
                .filter_map(|t| t.take.as_ref().map(|a| a.done_ns - a.received_ns))
                .collect(),
        ),
        (
            "take done → the benchmark's watch shows it",
            rows.iter()
                .filter_map(|t| t.take.as_ref().map(|a| t.seen - a.done_ns))
                .collect(),
        ),
        (
            "signal → the benchmark's watch shows the new holder",
            rows.iter().map(|t| t.seen - t.signal).collect(),
        ),
    ];
    println!();
    println!("| step | median ms | n |");
    println!("|---|---|---|");
    for (name, v) in steps {
        let n = v.len();
        println!("| {name} | {} | {n} |", median(v));
    }
}

fn tempdir() -> Result<PathBuf> {
    let dir = std::env::temp_dir().join(format!("handover-breakdown-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}
