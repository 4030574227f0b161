//! `leaderz-bench`: leaderz side by side with client-go and the Rust leader-election
//! crates, on one local kube-apiserver + etcd, in one run.
//!
//! ```sh
//! cargo run --release -p leaderz-bench -- --out bench/results          # full run
//! cargo run --release -p leaderz-bench -- --quick --out /tmp/bench    # smoke run
//! ```
//!
//! Builds every peer's candidate program (leaderz's and client-go's interop candidates,
//! the crates under `bench/peers/`), starts the control plane, then per peer measures
//! steady-state API load and process cost at 1, 3, 10 and 30 candidates, handover after
//! SIGTERM and failover after SIGKILL of the leader; then many leases in one process
//! for leaderz and client-go. Writes `<out>/results.csv`, `<out>/chart.png` (with
//! matplotlib) and `RESULTS.md` beside `<out>`.

mod apimetrics;
mod fleet;
mod lease;
mod peers;
mod report;
mod scenarios;

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use anyhow::{Context, Result};
use clap::Parser;
use leaderz_testenv::{ControlPlane, StartOptions};
use tokio::time::Instant;

use crate::peers::{Paths, Peer, SPECS};
use crate::report::{Environment, PeerResult, Report};
use crate::scenarios::{Bench, Options};

/// Side-by-side benchmark of leaderz, client-go and the Rust leader-election crates.
#[derive(Debug, Parser)]
struct Args {
    /// A smoke run: 3 trials, N = 1, 3, 10, short windows, 100 leases.
    #[arg(long)]
    quick: bool,
    /// Where results.csv, chart.png and the logs go.
    #[arg(long, default_value = "bench/results")]
    out: PathBuf,
    /// The Markdown report (default: RESULTS.md beside --out).
    #[arg(long)]
    report: Option<PathBuf>,
    /// Only these peers (comma-separated names, e.g. leaderz,client-go).
    #[arg(long, value_delimiter = ',')]
    peers: Vec<String>,
    /// Takeover trials of each kind per peer (default 20; quick 3).
    #[arg(long)]
    trials: Option<usize>,
    /// Fleet sizes for the steady-state scenario (default 3,10,30; quick 3,10).
    #[arg(long, value_delimiter = ',')]
    sizes: Vec<usize>,
    /// Steady-state window (default 20s; quick 10s). A multiple of 10 s holds a fixed
    /// number of the API server's own lease renewals (every 10 s).
    #[arg(long, value_parser = humantime::parse_duration)]
    window: Option<Duration>,
    /// From "a leader exists" to the window (default 10s; quick 4s).
    #[arg(long, value_parser = humantime::parse_duration)]
    settle: Option<Duration>,
    /// Lease counts of the many-leases scenario, 0 to skip (default 100,1000,3000,10000;
    /// quick 100).
    #[arg(long, value_delimiter = ',')]
    many: Vec<usize>,
    /// The many-leases window over which losses, CPU and requests are counted (default
    /// 120s; quick 20s).
    #[arg(long, value_parser = humantime::parse_duration)]
    many_window: Option<Duration>,
    /// Lease duration, renew deadline and retry period of the many-leases scenario.
    #[arg(long, value_delimiter = ',', default_value = "15s,10s,2s")]
    many_timings: Vec<String>,
    /// Also run leaderz's many-leases program with this renew interval (the lighter
    /// leader, `ElectionConfig::renew_interval`) at these lease counts; `0` skips it.
    #[arg(long, default_value = "7s")]
    many_renew_interval: String,
    /// Lease counts of the lighter-leader runs (default: those of --many from 3000 up).
    #[arg(long, value_delimiter = ',')]
    many_light: Vec<usize>,
    /// Do not draw the chart.
    #[arg(long)]
    no_plot: bool,
}

fn options(args: &Args) -> Result<Options> {
    let q = args.quick;
    let mut sizes = if args.sizes.is_empty() {
        if q { vec![3, 10] } else { vec![3, 10, 30] }
    } else {
        args.sizes.clone()
    };
    sizes.retain(|&n| n > 1);
    sizes.sort_unstable();
    sizes.dedup();
    let timings: [String; 3] =
        args.many_timings.clone().try_into().map_err(|_| {
            anyhow::anyhow!("--many-timings takes three durations, e.g. 15s,10s,2s")
        })?;
    Ok(Options {
        trials: args.trials.unwrap_or(if q { 3 } else { 20 }),
        sizes,
        settle: args
            .settle
            .unwrap_or(Duration::from_secs(if q { 4 } else { 10 })),
        window: args
            .window
            .unwrap_or(Duration::from_secs(if q { 10 } else { 20 })),
        rest: Duration::from_secs(2),
        many: if args.many.is_empty() {
            if q {
                vec![100]
            } else {
                vec![100, 1000, 3000, 10000]
            }
        } else {
            args.many.iter().copied().filter(|&n| n > 0).collect()
        },
        many_window: args
            .many_window
            .unwrap_or(Duration::from_secs(if q { 20 } else { 120 })),
        many_timings: timings,
        many_renew_interval: (args.many_renew_interval != "0")
            .then(|| args.many_renew_interval.clone()),
        many_light: args.many_light.clone(),
    })
}

fn command_output(program: &str, args: &[&str]) -> String {
    std::process::Command::new(program)
        .args(args)
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| {
            let mut s = String::from_utf8_lossy(&o.stdout).into_owned();
            if s.trim().is_empty() {
                s = String::from_utf8_lossy(&o.stderr).into_owned();
            }
            s.trim_end().to_owned()
        })
        .unwrap_or_else(|| "?".to_owned())
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "?".to_owned())
}

async fn environment(cp: &ControlPlane) -> Environment {
    let kubernetes = match cp.admin_client() {
        Ok(client) => client
            .apiserver_version()
            .await
            .map(|v| v.git_version)
            .unwrap_or_else(|_| "?".to_owned()),
        Err(_) => "?".to_owned(),
    };
    let etcd = std::fs::read_link(format!("/proc/{}/exe", cp.etcd_pid()))
        .map(|exe| {
            command_output(&exe.display().to_string(), &["--version"])
                .lines()
                .next()
                .unwrap_or("?")
                .to_owned()
        })
        .unwrap_or_else(|_| "?".to_owned());
    Environment {
        nproc: std::thread::available_parallelism().map_or(0, |n| n.get()),
        free_g: command_output("free", &["-g"]),
        cpu_model: std::fs::read_to_string("/proc/cpuinfo")
            .ok()
            .and_then(|c| {
                c.lines()
                    .find_map(|l| l.strip_prefix("model name"))
                    .map(|l| l.trim_start_matches([' ', '\t', ':']).to_owned())
            })
            .unwrap_or_else(|| "?".to_owned()),
        kernel: std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .map(|s| s.trim().to_owned())
            .unwrap_or_else(|_| "?".to_owned()),
        load_start: loadavg(),
        load_end: String::new(),
        kubernetes,
        etcd,
        go: command_output("go", &["version"]),
        rustc: command_output("rustc", &["--version"]),
    }
}

/// `path` as seen from `base` when it lies under it, else as given.
fn relative(path: &Path, base: &Path) -> String {
    let abs = |p: &Path| std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf());
    abs(path)
        .strip_prefix(abs(base))
        .map(|p| p.display().to_string())
        .unwrap_or_else(|_| path.display().to_string())
}

fn utc_now() -> String {
    let secs = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    command_output(
        "date",
        &["-u", "-d", &format!("@{secs}"), "+%Y-%m-%d %H:%M UTC"],
    )
}

fn step(started: Instant, what: &str) {
    println!(
        "[{:>6.1} min] {what}",
        started.elapsed().as_secs_f64() / 60.0
    );
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<()> {
    let args = Args::parse();
    let opts = options(&args)?;
    let started = Instant::now();
    let started_utc = utc_now();
    let command = format!(
        "cargo run --release -p leaderz-bench -- {}",
        std::env::args().skip(1).collect::<Vec<_>>().join(" ")
    );
    let out = args.out.clone();
    let logs = out.join("logs");
    if logs.exists() {
        std::fs::remove_dir_all(&logs).with_context(|| format!("clearing {}", logs.display()))?;
    }
    std::fs::create_dir_all(&logs).with_context(|| format!("creating {}", logs.display()))?;
    let report_path = args.report.clone().unwrap_or_else(|| {
        out.parent()
            .map_or_else(|| PathBuf::from("RESULTS.md"), |p| p.join("RESULTS.md"))
    });
    let paths = Paths::discover(logs.clone())?;
    let specs: Vec<_> = SPECS
        .iter()
        .filter(|s| args.peers.is_empty() || args.peers.iter().any(|p| p == s.name))
        .copied()
        .collect();

    // Build.
    step(
        started,
        "building leaderz's candidate and leaderz-many (release)",
    );
    peers::build_workspace_bins(&paths)?;
    let mut results = Vec::new();
    let mut ready = Vec::new();
    for spec in &specs {
        step(started, &format!("building {}", spec.name));
        let version = peers::versions(&paths, spec);
        match peers::build(&paths, spec) {
            Ok(program) => {
                ready.push(Peer {
                    spec: *spec,
                    program,
                });
                results.push(PeerResult {
                    spec: *spec,
                    version: peers::versions(&paths, spec),
                    unavailable: None,
                    steady: Vec::new(),
                    takeovers: None,
                    errors: Vec::new(),
                });
            }
            Err(e) => {
                println!("  {} cannot be built: {e:#}", spec.name);
                results.push(PeerResult {
                    spec: *spec,
                    version,
                    unavailable: Some(format!("build failed: {}", first_line(&e))),
                    steady: Vec::new(),
                    takeovers: None,
                    errors: Vec::new(),
                });
            }
        }
    }
    let clientgo_many = if !opts.many.is_empty() {
        match peers::build_go(
            &paths,
            &paths.bench.join("build-go.sh"),
            "build-clientgo-many.log",
        ) {
            Ok(p) => Some(p),
            Err(e) => {
                println!("  the client-go many-leases program cannot be built: {e:#}");
                None
            }
        }
    } else {
        None
    };

    // Control plane.
    step(started, "starting kube-apiserver + etcd");
    let cp = ControlPlane::start(StartOptions::default())
        .await
        .context("starting the control plane")?;
    let admin = cp.admin_client().context("the admin client")?;
    let mut env = environment(&cp).await;
    let mut bench = Bench {
        cp,
        admin,
        opts: opts.clone(),
        logs: logs.clone(),
        ticks: fleet::clock_ticks(),
        baseline: Default::default(),
    };
    let baseline_window = opts.window.max(Duration::from_secs(30));
    step(
        started,
        &format!("baseline: the API server's own lease requests over {baseline_window:?}"),
    );
    let (baseline, baseline_watches) = bench.measure_baseline(baseline_window).await?;
    println!("  {baseline:?}, {baseline_watches} open lease watches");
    bench.baseline = baseline.clone();

    let csv_path = out.join("results.csv");
    let report_dir = report_path
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_default();
    let mut report = Report {
        env: env.clone(),
        command,
        started_utc,
        run_secs: 0.0,
        opts: opts.clone(),
        quick: args.quick,
        baseline,
        baseline_watches,
        peers: results,
        many: Vec::new(),
        serve_rss: None,
        static_candidate_rss: None,
        static_serve_rss: None,
        chart: None,
        csv: relative(&csv_path, &report_dir),
    };

    // Per peer.
    for peer in &ready {
        let index = report
            .peers
            .iter()
            .position(|p| p.spec.name == peer.spec.name)
            .context("a peer without a result slot")?;
        let mut sizes = vec![1];
        sizes.extend(&opts.sizes);
        for n in sizes {
            step(
                started,
                &format!("{}: steady state, {n} candidate(s)", peer.spec.name),
            );
            match bench.steady(peer, n, baseline_watches).await {
                Ok(s) => {
                    println!(
                        "  {:.2} lease req/s {:?}; leader {:?}; {} followers{}",
                        s.total(),
                        s.rates,
                        s.leader,
                        s.followers.len(),
                        s.problem
                            .as_ref()
                            .map(|p| format!("; PROBLEM: {p}"))
                            .unwrap_or_default()
                    );
                    report.peers[index].steady.push(s);
                }
                Err(e) => {
                    println!("  failed: {e:#}");
                    report.peers[index]
                        .errors
                        .push(format!("steady N={n}: {}", first_line(&e)));
                }
            }
        }
        step(
            started,
            &format!(
                "{}: handover and failover, {} trials each",
                peer.spec.name, opts.trials
            ),
        );
        match bench.takeovers(peer, opts.trials).await {
            Ok(t) => report.peers[index].takeovers = Some(t),
            Err(e) => {
                println!("  failed: {e:#}");
                report.peers[index]
                    .errors
                    .push(format!("takeovers: {}", first_line(&e)));
            }
        }
        if peer.spec.name == "leaderz" {
            step(started, "leaderz serve: RSS of the sidecar binary");
            match bench.serve_rss(&paths.release_dir.join("leaderz")).await {
                Ok(rss) => {
                    println!("  {rss:.1} MiB");
                    report.serve_rss = Some(rss);
                }
                Err(e) => println!("  failed: {e:#}"),
            }
            step(started, "leaderz as the image ships it (static): RSS");
            match peers::build_static_bins(&paths) {
                Ok(dir) => {
                    match bench.candidate_rss(&dir.join("leaderz-candidate")).await {
                        Ok(rss) => {
                            println!("  leaderz-candidate {rss:.1} MiB");
                            report.static_candidate_rss = Some(rss);
                        }
                        Err(e) => println!("  failed: {e:#}"),
                    }
                    match bench.serve_rss(&dir.join("leaderz")).await {
                        Ok(rss) => {
                            println!("  leaderz serve {rss:.1} MiB");
                            report.static_serve_rss = Some(rss);
                        }
                        Err(e) => println!("  failed: {e:#}"),
                    }
                }
                Err(e) => println!("  no static build: {e:#}"),
            }
        }
        report.run_secs = started.elapsed().as_secs_f64();
        report::write_csv(&csv_path, &report)?;
    }

    // Many leases in one process.
    if !opts.many.is_empty() {
        let mut programs = Vec::new();
        if ready.iter().any(|p| p.spec.name == "leaderz") {
            programs.push(("leaderz", paths.release_dir.join("leaderz-many")));
        }
        if let Some(p) = clientgo_many
            && ready.iter().any(|p| p.spec.name == "client-go")
        {
            programs.push(("client-go", p));
        }
        // The lighter leader: leaderz renewing every `many_renew_interval`.
        let light = opts.many_renew_interval.as_ref().map(|every| {
            let counts = if opts.many_light.is_empty() {
                opts.many.iter().copied().filter(|&n| n >= 3000).collect()
            } else {
                opts.many_light.clone()
            };
            (format!("leaderz-renew-{every}"), every.clone(), counts)
        });
        let mut runs: Vec<(usize, String, PathBuf, Vec<String>)> = Vec::new();
        for &n in &opts.many {
            for (name, program) in &programs {
                runs.push((n, (*name).to_owned(), program.clone(), Vec::new()));
            }
            if let Some((name, every, counts)) = &light
                && counts.contains(&n)
                && ready.iter().any(|p| p.spec.name == "leaderz")
            {
                runs.push((
                    n,
                    name.clone(),
                    paths.release_dir.join("leaderz-many"),
                    vec!["--renew-interval".to_owned(), every.clone()],
                ));
            }
        }
        for (n, name, program, extra) in &runs {
            let n = *n;
            {
                step(started, &format!("{name}: {n} leases in one process"));
                match bench.many(name, program, n, extra).await {
                    Ok(m) => {
                        println!(
                            "  ramp {:?} s, {:.1} lease req/s {:?}, process {:?}, \
                             connections {:?} (peak {:?}), losses {}{}",
                            m.ramp_secs,
                            m.rates.values().sum::<f64>(),
                            m.rates,
                            m.process,
                            m.sockets,
                            m.peak_sockets,
                            m.lost,
                            m.problem
                                .as_ref()
                                .map(|p| format!("; PROBLEM: {p}"))
                                .unwrap_or_default()
                        );
                        report.many.push((name.clone(), m));
                    }
                    Err(e) => println!("  failed: {e:#}"),
                }
                report.run_secs = started.elapsed().as_secs_f64();
                report::write_csv(&csv_path, &report)?;
            }
        }
    }

    // Results.
    env.load_end = loadavg();
    report.env = env;
    report.run_secs = started.elapsed().as_secs_f64();
    report::write_csv(&csv_path, &report)?;
    let chart = out.join("chart.png");
    if !args.no_plot {
        step(started, "drawing the chart");
        let status = std::process::Command::new("python3")
            .arg(paths.bench.join("plot.py"))
            .arg(&csv_path)
            .arg(&chart)
            .status();
        match status {
            Ok(s) if s.success() => report.chart = Some(relative(&chart, &report_dir)),
            _ => println!(
                "  no chart: `python3 -m pip install matplotlib`, then \
                 `python3 bench/plot.py {} {}`",
                csv_path.display(),
                chart.display()
            ),
        }
    }
    report::write_markdown(&report_path, &report)?;
    step(
        started,
        &format!("done: {}, {}", csv_path.display(), report_path.display()),
    );
    Ok(())
}

fn first_line(e: &anyhow::Error) -> String {
    format!("{e:#}")
        .lines()
        .next()
        .unwrap_or_default()
        .to_owned()
}
