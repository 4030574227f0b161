//! The measurements: handover after SIGTERM and failover after SIGKILL (timed by the
//! benchmark's own watch on the Lease), steady-state API load and per-process cost at
//! N candidates, and many leases in one process.

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, Result};
use k8s_openapi::api::coordination::v1::Lease;
use kube::{Api, Client};
use leaderz_testenv::ControlPlane;
use nix::sys::signal::Signal;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Command;
use tokio::sync::mpsc;
use tokio::time::{Instant, sleep, sleep_until, timeout};

use crate::apimetrics::{self, Rates};
use crate::fleet::{self, Candidate, Launcher, ProcSample};
use crate::lease::{self, LeaseWatch};
use crate::peers::{LEASE_DURATION_SECS, Peer, TIMING_FLAGS};

/// The Lease every single-lease scenario uses (each peer in its own namespace).
const LEASE: &str = "bench";
/// How long a candidate may take to exit after SIGTERM before it is killed.
const STOP_GRACE: Duration = Duration::from_secs(10);
/// How long to wait for a (new) holder before calling a trial failed.
const TAKEOVER_LIMIT: Duration = Duration::from_secs(20);

/// Knobs of one run.
#[derive(Debug, Clone)]
pub(crate) struct Options {
    /// Trials of each takeover kind (graceful, kill) per peer.
    pub(crate) trials: usize,
    /// Fleet sizes of the steady-state scenario (1 is always measured first).
    pub(crate) sizes: Vec<usize>,
    /// From "a leader exists" to the start of a steady-state window.
    pub(crate) settle: Duration,
    /// The steady-state window.
    pub(crate) window: Duration,
    /// After a restart, before the next takeover trial.
    pub(crate) rest: Duration,
    /// Lease counts of the many-leases scenario (one run per count and program).
    pub(crate) many: Vec<usize>,
    /// The many-leases window: leadership losses, CPU and requests are counted over it.
    pub(crate) many_window: Duration,
    /// `--lease-duration`, `--renew-deadline`, `--retry-period` of the many-leases scenario.
    pub(crate) many_timings: [String; 3],
    /// leaderz's lighter leader: also run leaderz-many renewing this often.
    pub(crate) many_renew_interval: Option<String>,
    /// Lease counts of the lighter-leader runs (empty: those of `many` from 3000 up).
    pub(crate) many_light: Vec<usize>,
}

/// The shared state of a run.
pub(crate) struct Bench {
    pub(crate) cp: ControlPlane,
    pub(crate) admin: Client,
    pub(crate) opts: Options,
    pub(crate) logs: PathBuf,
    pub(crate) ticks: f64,
    /// Lease requests/s with no candidate running (the API server's own leases).
    pub(crate) baseline: Rates,
}

/// CPU (percent of one core) and RSS (MiB) of one process over a window.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Cost {
    pub(crate) cpu_pct: f64,
    pub(crate) rss_mib: f64,
}

fn cost(before: Option<ProcSample>, after: Option<ProcSample>, window: Duration) -> Option<Cost> {
    let (before, after) = (before?, after?);
    Some(Cost {
        cpu_pct: 100.0 * (after.cpu_secs - before.cpu_secs) / window.as_secs_f64(),
        rss_mib: after.rss_mib,
    })
}

/// One steady-state measurement of N candidates on one Lease.
#[derive(Debug, Clone, Default)]
pub(crate) struct Steady {
    pub(crate) n: usize,
    /// Lease requests/s by verb, the baseline subtracted.
    pub(crate) rates: Rates,
    /// Watches on Leases open at the end of the window (the baseline's subtracted).
    pub(crate) open_watches: f64,
    pub(crate) leader: Option<Cost>,
    pub(crate) followers: Vec<Cost>,
    pub(crate) apiserver: Option<Cost>,
    pub(crate) etcd: Option<Cost>,
    /// Candidates that exited on their own, with how.
    pub(crate) exited: Vec<String>,
    /// Why the measurement is missing or doubtful.
    pub(crate) problem: Option<String>,
}

impl Steady {
    /// All lease requests/s (net of the baseline).
    pub(crate) fn total(&self) -> f64 {
        self.rates.values().sum()
    }
}

/// Takeover times of one peer; `None` where no new holder came within the limit.
#[derive(Debug, Clone, Default)]
pub(crate) struct Takeovers {
    /// SIGTERM of the leader → a new holder seen, in ms.
    pub(crate) handover_ms: Vec<Option<f64>>,
    /// SIGKILL of the leader → a new holder seen, minus the lease duration, in ms.
    pub(crate) failover_overhead_ms: Vec<Option<f64>>,
    /// The same takeover measured from the expiry of the last renewal the benchmark's
    /// watch saw (its arrival + the lease duration), in ms: how late after the exact
    /// expiry the new holder came.
    pub(crate) failover_after_expiry_ms: Vec<Option<f64>>,
    /// How long the stopped leaders took to exit after SIGTERM, in ms.
    pub(crate) exit_ms: Vec<f64>,
    pub(crate) problems: Vec<String>,
}

/// The many-leases measurement of one peer.
#[derive(Debug, Clone, Default)]
pub(crate) struct Many {
    pub(crate) n: usize,
    /// From start to every elector leading.
    pub(crate) ramp_secs: Option<f64>,
    pub(crate) rates: Rates,
    pub(crate) open_watches: f64,
    /// Watches on Leases the API server ended as unresponsive during the window.
    pub(crate) terminated_watchers: f64,
    pub(crate) process: Option<Cost>,
    pub(crate) apiserver: Option<Cost>,
    pub(crate) etcd: Option<Cost>,
    /// Leadership losses reported during the settle and window.
    pub(crate) lost: usize,
    /// The process's TCP connections to the API server at the end of the window.
    pub(crate) sockets: Option<usize>,
    /// The most of them seen at once (sampled every second from the start).
    pub(crate) peak_sockets: Option<usize>,
    pub(crate) problem: Option<String>,
}

/// A short identity prefix per peer (Lease holders are easier to read).
fn short(peer: &Peer) -> &'static str {
    match peer.spec.name {
        "leaderz" => "lz",
        "client-go" => "cg",
        "kube-lease-manager" => "klm",
        "kube-leader-election" => "kle",
        "kube-coordinate" => "kc",
        "kubert-lease" => "kb",
        _ => "x",
    }
}

impl Bench {
    /// The API server's port on 127.0.0.1.
    fn api_port(&self) -> u16 {
        self.cp
            .server_url()
            .rsplit(':')
            .next()
            .and_then(|p| p.parse().ok())
            .unwrap_or(0)
    }

    fn leases(&self, ns: &str) -> Api<Lease> {
        Api::namespaced(self.admin.clone(), ns)
    }

    fn launcher(&self, peer: &Peer, ns: &str) -> Launcher {
        let mut args = vec![
            "--namespace".to_owned(),
            ns.to_owned(),
            "--lease".to_owned(),
            LEASE.to_owned(),
        ];
        args.extend(TIMING_FLAGS.iter().map(|s| (*s).to_owned()));
        Launcher {
            program: peer.program.clone(),
            args,
            kubeconfig: self.cp.kubeconfig_path().to_path_buf(),
            events_log: self.logs.join(format!("{}.events.jsonl", peer.spec.name)),
            stderr_log: self.logs.join(format!("{}.stderr.log", peer.spec.name)),
        }
    }

    async fn namespace(&self, peer: &Peer, what: &str) -> Result<(String, Api<Lease>)> {
        let ns = self
            .cp
            .new_namespace(&format!("{}-{what}", short(peer)))
            .await
            .context("creating a namespace")?;
        let api = self.leases(&ns);
        if peer.spec.needs_lease {
            lease::create_empty(&api, LEASE).await?;
        }
        Ok((ns, api))
    }

    fn sample_servers(&self) -> (Option<ProcSample>, Option<ProcSample>) {
        (
            fleet::sample(self.cp.apiserver_pid(), self.ticks),
            fleet::sample(self.cp.etcd_pid(), self.ticks),
        )
    }

    /// `leaderz serve` (the sidecar binary) leading one Lease: its RSS once it has led for
    /// `settle` and answered `/` and `/metrics`.
    pub(crate) async fn serve_rss(&self, program: &std::path::Path) -> Result<f64> {
        let ns = self
            .cp
            .new_namespace("lz-serve")
            .await
            .context("creating a namespace")?;
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let mut child = Command::new(program)
            .args([
                "serve",
                "--lease",
                LEASE,
                "--namespace",
                &ns,
                "--identity",
                "serve-0",
            ])
            .args(["--http", &format!("127.0.0.1:{port}")])
            .args(TIMING_FLAGS)
            .env("KUBECONFIG", self.cp.kubeconfig_path())
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("starting {}", program.display()))?;
        let pid = child.id().context("leaderz serve exited at once")?;
        let api = self.leases(&ns);
        lease::wait_for_holder(&api, LEASE, Duration::from_secs(30), |h| h == "serve-0")
            .await
            .context("leaderz serve did not lead within 30 s")?;
        sleep(self.opts.settle).await;
        for path in ["/", "/metrics"] {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
            s.write_all(format!("GET {path} HTTP/1.0\r\n\r\n").as_bytes())
                .await?;
            let mut sink = Vec::new();
            timeout(Duration::from_secs(5), s.read_to_end(&mut sink)).await??;
        }
        sleep(Duration::from_secs(1)).await;
        let rss = fleet::sample(pid, self.ticks)
            .map(|s| s.rss_mib)
            .context("leaderz serve exited")?;
        let pid = nix::unistd::Pid::from_raw(i32::try_from(pid)?);
        nix::sys::signal::kill(pid, Signal::SIGTERM).ok();
        if timeout(STOP_GRACE, child.wait()).await.is_err() {
            child.start_kill().ok();
        }
        Ok(rss)
    }

    /// RSS of one `leaderz-candidate` (`program`) leading alone, after `settle`.
    pub(crate) async fn candidate_rss(&self, program: &std::path::Path) -> Result<f64> {
        let ns = self
            .cp
            .new_namespace("lz-rss")
            .await
            .context("creating a namespace")?;
        let mut child = Command::new(program)
            .args(["--id", "rss-0", "--namespace", &ns, "--lease", LEASE])
            .args(TIMING_FLAGS)
            .env("KUBECONFIG", self.cp.kubeconfig_path())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("starting {}", program.display()))?;
        let pid = child.id().context("the candidate exited at once")?;
        let api = self.leases(&ns);
        lease::wait_for_holder(&api, LEASE, Duration::from_secs(30), |h| h == "rss-0")
            .await
            .context("the candidate did not lead within 30 s")?;
        sleep(self.opts.settle).await;
        let rss = fleet::sample(pid, self.ticks)
            .map(|s| s.rss_mib)
            .context("the candidate exited")?;
        let pid = nix::unistd::Pid::from_raw(i32::try_from(pid)?);
        nix::sys::signal::kill(pid, Signal::SIGTERM).ok();
        if timeout(STOP_GRACE, child.wait()).await.is_err() {
            child.start_kill().ok();
        }
        Ok(rss)
    }

    /// Lease requests/s with nothing of ours running, over `window`.
    pub(crate) async fn measure_baseline(&self, window: Duration) -> Result<(Rates, f64)> {
        let before = apimetrics::scrape(&self.admin).await?;
        sleep(window).await;
        let after = apimetrics::scrape(&self.admin).await?;
        Ok((apimetrics::rates(&before, &after), after.open_watches))
    }

    /// N candidates of `peer` on one Lease: once a leader exists, wait `settle`, then
    /// count the API server's lease requests and sample every process over `window`.
    pub(crate) async fn steady(&self, peer: &Peer, n: usize, base_watches: f64) -> Result<Steady> {
        let (ns, api) = self.namespace(peer, &format!("n{n}")).await?;
        let launcher = self.launcher(peer, &ns);
        let mut candidates = Vec::with_capacity(n);
        for i in 0..n {
            candidates.push(launcher.spawn(&format!("{}-{i}", short(peer)))?);
        }
        let ids: Vec<String> = candidates.iter().map(|c| c.id.clone()).collect();
        let mut result = Steady {
            n,
            ..Steady::default()
        };
        if lease::wait_for_holder(&api, LEASE, Duration::from_secs(60), |h| {
            ids.iter().any(|id| id == h)
        })
        .await
        .is_none()
        {
            result.problem = Some("no leader within 60 s".to_owned());
            fleet::stop_all(candidates, STOP_GRACE).await?;
            return Ok(result);
        }
        sleep(self.opts.settle).await;

        let before = apimetrics::scrape(&self.admin).await?;
        let procs_before: Vec<_> = candidates
            .iter()
            .map(|c| fleet::sample(c.pid, self.ticks))
            .collect();
        let (api_before, etcd_before) = self.sample_servers();
        let started = Instant::now();
        sleep(self.opts.window).await;
        let after = apimetrics::scrape(&self.admin).await?;
        let procs_after: Vec<_> = candidates
            .iter()
            .map(|c| fleet::sample(c.pid, self.ticks))
            .collect();
        let (api_after, etcd_after) = self.sample_servers();
        let window = started.elapsed();

        let holder = lease::holder(&api, LEASE).await.unwrap_or_default();
        result.rates = apimetrics::net(&apimetrics::rates(&before, &after), &self.baseline);
        result.open_watches = after.open_watches - base_watches;
        result.apiserver = cost(api_before, api_after, window);
        result.etcd = cost(etcd_before, etcd_after, window);
        for (i, c) in candidates.iter().enumerate() {
            let Some(cost) = cost(procs_before[i], procs_after[i], window) else {
                continue;
            };
            if c.id == holder {
                result.leader = Some(cost);
            } else {
                result.followers.push(cost);
            }
        }
        for c in &mut candidates {
            if let Some(how) = c.exited() {
                result.exited.push(format!("{}: {how}", c.id));
            }
        }
        if result.leader.is_none() {
            result.problem = Some(format!(
                "no live candidate held the lease after the window (holder {holder:?})"
            ));
        }
        fleet::stop_all(candidates, STOP_GRACE).await?;
        Ok(result)
    }

    /// Three candidates of `peer`; `trials` times SIGTERM the leader, then `trials` times
    /// SIGKILL it, timing each until the watch shows a new holder. The stopped candidate
    /// is replaced by a new one (a new identity) before the next trial.
    pub(crate) async fn takeovers(&self, peer: &Peer, trials: usize) -> Result<Takeovers> {
        let (ns, api) = self.namespace(peer, "takeover").await?;
        let launcher = self.launcher(peer, &ns);
        let mut generation = 0usize;
        let mut next_id = |slot: usize| {
            generation += 1;
            format!("{}-{slot}-{generation}", short(peer))
        };
        let mut fleet: Vec<(usize, Candidate)> = Vec::new();
        for slot in 0..3 {
            fleet.push((slot, launcher.spawn(&next_id(slot))?));
        }
        let mut watch = LeaseWatch::spawn(api, LEASE);
        let mut out = Takeovers::default();
        let mut rested_at = Instant::now() + self.opts.rest;

        for kill in [false, true] {
            let (label, signal) = if kill {
                ("failover (SIGKILL) over LD (after expiry)", Signal::SIGKILL)
            } else {
                ("handover (SIGTERM)", Signal::SIGTERM)
            };
            print!("    {label}:");
            for trial in 1..=trials {
                sleep_until(rested_at).await;
                let ids: Vec<String> = fleet.iter().map(|(_, c)| c.id.clone()).collect();
                let Some(seen) = watch
                    .wait_for(TAKEOVER_LIMIT, |s| ids.contains(&s.holder))
                    .await
                else {
                    let holder = watch.current().holder;
                    out.problems.push(format!(
                        "{label} trial {trial}: no live candidate held the lease (holder {holder:?})"
                    ));
                    record(&mut out, kill, None);
                    print!(" -");
                    rested_at = Instant::now() + self.opts.rest;
                    continue;
                };
                let Some(index) = fleet.iter().position(|(_, c)| c.id == seen.holder) else {
                    continue;
                };
                let (slot, victim) = fleet.remove(index);
                let old = victim.id.clone();
                let sent = Instant::now();
                victim.signal(signal)?;
                // Reap concurrently, so the exit time is the process's own.
                let (new, stopped) = tokio::join!(
                    watch.wait_for(TAKEOVER_LIMIT, |s| !s.holder.is_empty() && s.holder != old),
                    victim.reap(sent, STOP_GRACE),
                );
                let stopped = stopped?;
                let value = new.as_ref().map(|s| {
                    let ms = s.at.duration_since(sent).as_secs_f64() * 1000.0;
                    if kill {
                        ms - LEASE_DURATION_SECS * 1000.0
                    } else {
                        ms
                    }
                });
                if value.is_none() {
                    out.problems.push(format!(
                        "{label} trial {trial}: no new holder within {TAKEOVER_LIMIT:?}"
                    ));
                }
                record(&mut out, kill, value);
                if kill {
                    // From the killed leader's last renewal as the watch saw it arrive,
                    // which can be one sent just before the kill and landing after it.
                    out.failover_after_expiry_ms
                        .push(new.as_ref().and_then(|s| {
                            let (holder, renewed_at) = &s.previous_held;
                            (*holder == old).then(|| {
                                let expiry =
                                    *renewed_at + Duration::from_secs_f64(LEASE_DURATION_SECS);
                                (s.at.duration_since(expiry).as_secs_f64()
                                    - expiry.duration_since(s.at).as_secs_f64())
                                    * 1000.0
                            })
                        }));
                }
                match (
                    value,
                    out.failover_after_expiry_ms.last().copied().flatten(),
                ) {
                    (Some(ms), Some(late)) if kill => print!(" {ms:.0}({late:+.0})"),
                    (Some(ms), _) => print!(" {ms:.0}"),
                    (None, _) => print!(" timeout"),
                }
                flush();
                if !kill {
                    out.exit_ms.push(stopped.took.as_secs_f64() * 1000.0);
                    if stopped.killed {
                        out.problems.push(format!(
                            "{label} trial {trial}: {old} did not exit within {STOP_GRACE:?} of SIGTERM"
                        ));
                    }
                }
                // Random delays, so that neither the replacement's timers nor the next
                // kill keep a fixed phase to the new leader's renewals.
                sleep(jitter()).await;
                fleet.push((slot, launcher.spawn(&next_id(slot))?));
                rested_at = Instant::now() + self.opts.rest + jitter();
            }
            println!(" ms");
        }
        drop(watch);
        fleet::stop_all(fleet.into_iter().map(|(_, c)| c).collect(), STOP_GRACE).await?;
        Ok(out)
    }

    /// `program` (leaderz-many or clientgo-many) running `n` electors, one per Lease, in
    /// one process: once all lead, wait `settle`, then measure over `many_window`.
    pub(crate) async fn many(
        &self,
        name: &str,
        program: &std::path::Path,
        n: usize,
        extra: &[String],
    ) -> Result<Many> {
        let ns = self
            .cp
            .new_namespace(&format!("many-{name}-{n}"))
            .await
            .context("creating a namespace")?;
        let [ld, rd, rp] = &self.opts.many_timings;
        let stderr = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.logs.join(format!("many-{name}-{n}.stderr.log")))
            .context("opening the many-leases log")?;
        let mut child = Command::new(program)
            .args(["--count", &n.to_string(), "--namespace", &ns])
            .args(["--lease-duration", ld, "--renew-deadline", rd])
            .args(["--retry-period", rp])
            .args(extra)
            .env("KUBECONFIG", self.cp.kubeconfig_path())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(stderr)
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("starting {}", program.display()))?;
        let pid = child
            .id()
            .context("the many-leases program exited at once")?;
        let stdout = child.stdout.take().context("no stdout pipe")?;
        let (tx, mut events) = mpsc::unbounded_channel::<String>();
        tokio::spawn(async move {
            let mut lines = BufReader::new(stdout).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                let event = serde_json::from_str::<serde_json::Value>(&line)
                    .ok()
                    .and_then(|v| v["event"].as_str().map(str::to_owned))
                    .unwrap_or_default();
                if tx.send(event).is_err() {
                    break;
                }
            }
        });

        let mut result = Many {
            n,
            ..Many::default()
        };
        let started = Instant::now();
        // Connections to the API server, sampled every second while this runs.
        let api_port = self.api_port();
        let peak = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let sampler = {
            let peak = peak.clone();
            tokio::spawn(async move {
                loop {
                    if let Some(n) = fleet::api_connections(pid, api_port) {
                        peak.fetch_max(n, std::sync::atomic::Ordering::Relaxed);
                    }
                    sleep(Duration::from_secs(1)).await;
                }
            })
        };
        let ramp_limit = Duration::from_secs(120);
        let all_leading = timeout(ramp_limit, async {
            while let Some(event) = events.recv().await {
                if event == "all_leading" {
                    return true;
                }
            }
            false
        })
        .await;
        if all_leading != Ok(true) {
            result.problem = Some(format!("not every elector led within {ramp_limit:?}"));
        } else {
            result.ramp_secs = Some(started.elapsed().as_secs_f64());
            sleep(self.opts.settle).await;
            let before = apimetrics::scrape(&self.admin).await?;
            let proc_before = fleet::sample(pid, self.ticks);
            let (api_before, etcd_before) = self.sample_servers();
            let window_start = Instant::now();
            sleep(self.opts.many_window).await;
            let after = apimetrics::scrape(&self.admin).await?;
            let proc_after = fleet::sample(pid, self.ticks);
            result.sockets = fleet::api_connections(pid, api_port);
            let (api_after, etcd_after) = self.sample_servers();
            let window = window_start.elapsed();
            result.rates = apimetrics::net(&apimetrics::rates(&before, &after), &self.baseline);
            result.open_watches = after.open_watches;
            result.terminated_watchers = after.terminated_watchers - before.terminated_watchers;
            result.process = cost(proc_before, proc_after, window);
            result.apiserver = cost(api_before, api_after, window);
            result.etcd = cost(etcd_before, etcd_after, window);
            while let Ok(event) = events.try_recv() {
                if event == "lost" {
                    result.lost += 1;
                }
            }
        }
        sampler.abort();
        result.peak_sockets = Some(peak.load(std::sync::atomic::Ordering::Relaxed));
        let pid = nix::unistd::Pid::from_raw(i32::try_from(pid).context("pid out of range")?);
        nix::sys::signal::kill(pid, Signal::SIGTERM).ok();
        if timeout(Duration::from_secs(60), child.wait())
            .await
            .is_err()
        {
            child.start_kill().ok();
            child.wait().await.ok();
        }
        Ok(result)
    }
}

/// Uniform in [0, 2 s): longer than any peer's renewal interval.
fn jitter() -> Duration {
    Duration::from_secs_f64(rand::random_range(0.0..2.0))
}

fn record(out: &mut Takeovers, kill: bool, value: Option<f64>) {
    if kill {
        out.failover_overhead_ms.push(value);
    } else {
        out.handover_ms.push(value);
    }
}

fn flush() {
    use std::io::Write;
    std::io::stdout().flush().ok();
}
