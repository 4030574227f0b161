//! Results: the raw CSV, and `RESULTS.md` (tables per scenario, the machine, the
//! versions, the command, and leaderz against its targets). A hand-written analysis
//! between the `analysis` markers of an existing `RESULTS.md` is kept.

use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::path::Path;

use anyhow::{Context, Result};

use crate::apimetrics::Rates;
use crate::peers::Spec;
use crate::scenarios::{Cost, Many, Options, Steady, Takeovers};

const ANALYSIS_BEGIN: &str = "<!-- analysis:begin (kept when the benchmark rewrites this file) -->";
const ANALYSIS_END: &str = "<!-- analysis:end -->";

/// Everything measured for one peer.
#[derive(Debug, Clone)]
pub(crate) struct PeerResult {
    pub(crate) spec: Spec,
    pub(crate) version: String,
    /// Why it could not run, if it could not.
    pub(crate) unavailable: Option<String>,
    pub(crate) steady: Vec<Steady>,
    pub(crate) takeovers: Option<Takeovers>,
    pub(crate) errors: Vec<String>,
}

impl PeerResult {
    fn steady_at(&self, n: usize) -> Option<&Steady> {
        self.steady.iter().find(|s| s.n == n && s.problem.is_none())
    }

    /// Lease requests/s of a lone candidate (the leader).
    fn leader_rate(&self) -> Option<f64> {
        self.steady_at(1).map(Steady::total)
    }

    /// Per follower: (requests at N − requests at 1) / (N − 1).
    fn per_follower(&self, n: usize) -> Option<f64> {
        let one = self.leader_rate()?;
        let at = self.steady_at(n)?;
        (n > 1).then(|| (at.total() - one) / (n - 1) as f64)
    }
}

/// The machine and the versions the run used.
#[derive(Debug, Clone, Default)]
pub(crate) struct Environment {
    pub(crate) nproc: usize,
    pub(crate) free_g: String,
    pub(crate) cpu_model: String,
    pub(crate) kernel: String,
    pub(crate) load_start: String,
    pub(crate) load_end: String,
    pub(crate) kubernetes: String,
    pub(crate) etcd: String,
    pub(crate) go: String,
    pub(crate) rustc: String,
}

/// One run's results.
#[derive(Debug, Clone)]
pub(crate) struct Report {
    pub(crate) env: Environment,
    pub(crate) command: String,
    pub(crate) started_utc: String,
    pub(crate) run_secs: f64,
    pub(crate) opts: Options,
    pub(crate) quick: bool,
    pub(crate) baseline: Rates,
    pub(crate) baseline_watches: f64,
    pub(crate) peers: Vec<PeerResult>,
    pub(crate) many: Vec<(String, Many)>,
    /// RSS of `leaderz serve` (MiB), leading one Lease.
    pub(crate) serve_rss: Option<f64>,
    /// `leaderz-candidate`, static as the image ships it, leading alone (MiB).
    pub(crate) static_candidate_rss: Option<f64>,
    /// `leaderz serve`, static as the image ships it (MiB).
    pub(crate) static_serve_rss: Option<f64>,
    /// The chart's path as the report links it, if a chart was drawn.
    pub(crate) chart: Option<String>,
    pub(crate) csv: String,
}

/// p-quantile (0..=1) with linear interpolation between closest ranks.
pub(crate) fn quantile(values: &[f64], p: f64) -> Option<f64> {
    let mut v: Vec<f64> = values.iter().copied().filter(|x| x.is_finite()).collect();
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    let rank = p * (v.len() - 1) as f64;
    let (lo, hi) = (rank.floor() as usize, rank.ceil() as usize);
    Some(v[lo] + (v[hi] - v[lo]) * (rank - lo as f64))
}

fn ok_values(values: &[Option<f64>]) -> Vec<f64> {
    values.iter().flatten().copied().collect()
}

fn fmt(v: Option<f64>, digits: usize) -> String {
    match v {
        // No "-0.000" for a value that rounds to zero.
        Some(v) if v.abs() < 0.5 * 10f64.powi(-(digits as i32)) => format!("{:.digits$}", 0.0),
        Some(v) => format!("{v:.digits$}"),
        None => "-".to_owned(),
    }
}

fn mean(values: impl Iterator<Item = f64>) -> Option<f64> {
    let v: Vec<f64> = values.collect();
    (!v.is_empty()).then(|| v.iter().sum::<f64>() / v.len() as f64)
}

fn max(values: impl Iterator<Item = f64>) -> Option<f64> {
    values.reduce(f64::max)
}

// ---- CSV ----------------------------------------------------------------------

/// Writes the raw results: `peer,scenario,param,value,unit` (an empty value: a trial
/// with no result).
pub(crate) fn write_csv(path: &Path, report: &Report) -> Result<()> {
    let mut out = String::from("peer,scenario,param,value,unit\n");
    let mut row = |peer: &str, scenario: &str, param: &str, value: Option<f64>, unit: &str| {
        let value = value.map(|v| format!("{v:.4}")).unwrap_or_default();
        let _ = writeln!(out, "{peer},{scenario},{param},{value},{unit}");
    };
    for (verb, rate) in &report.baseline {
        row(
            "apiserver",
            "baseline",
            &format!("verb={verb}"),
            Some(*rate),
            "req/s",
        );
    }
    for p in &report.peers {
        let name = p.spec.name;
        if let Some(t) = &p.takeovers {
            for (i, v) in t.handover_ms.iter().enumerate() {
                row(name, "handover", &format!("trial={}", i + 1), *v, "ms");
            }
            for (i, v) in t.failover_overhead_ms.iter().enumerate() {
                row(
                    name,
                    "failover_overhead",
                    &format!("trial={}", i + 1),
                    *v,
                    "ms",
                );
            }
            for (i, v) in t.failover_after_expiry_ms.iter().enumerate() {
                row(
                    name,
                    "failover_after_expiry",
                    &format!("trial={}", i + 1),
                    *v,
                    "ms",
                );
            }
            for (i, v) in t.exit_ms.iter().enumerate() {
                row(
                    name,
                    "exit_after_sigterm",
                    &format!("trial={}", i + 1),
                    Some(*v),
                    "ms",
                );
            }
        }
        for s in p.steady.iter().filter(|s| s.problem.is_none()) {
            let n = s.n;
            for (verb, rate) in &s.rates {
                row(
                    name,
                    "requests",
                    &format!("n={n};verb={verb}"),
                    Some(*rate),
                    "req/s",
                );
            }
            row(
                name,
                "requests_total",
                &format!("n={n}"),
                Some(s.total()),
                "req/s",
            );
            row(
                name,
                "requests_per_follower",
                &format!("n={n}"),
                p.per_follower(n),
                "req/s",
            );
            row(
                name,
                "open_watches",
                &format!("n={n}"),
                Some(s.open_watches),
                "count",
            );
            let costs = [
                ("leader", s.leader),
                ("follower_mean", mean_cost(&s.followers)),
                ("follower_max", max_cost(&s.followers)),
                ("apiserver", s.apiserver),
                ("etcd", s.etcd),
            ];
            for (who, c) in costs {
                row(
                    name,
                    &format!("cpu_{who}"),
                    &format!("n={n}"),
                    c.map(|c| c.cpu_pct),
                    "%core",
                );
                row(
                    name,
                    &format!("rss_{who}"),
                    &format!("n={n}"),
                    c.map(|c| c.rss_mib),
                    "MiB",
                );
            }
        }
    }
    if let Some(rss) = report.static_candidate_rss {
        row("leaderz", "static_candidate_rss", "n=1", Some(rss), "MiB");
    }
    if let Some(rss) = report.static_serve_rss {
        row("leaderz", "static_serve_rss", "n=1", Some(rss), "MiB");
    }
    if let Some(rss) = report.serve_rss {
        row("leaderz", "serve_rss", "n=1", Some(rss), "MiB");
    }
    for (name, m) in &report.many {
        let n = m.n;
        for (verb, rate) in &m.rates {
            row(
                name,
                "many_requests",
                &format!("n={n};verb={verb}"),
                Some(*rate),
                "req/s",
            );
        }
        let total: f64 = m.rates.values().sum();
        row(
            name,
            "many_requests_total",
            &format!("n={n}"),
            Some(total),
            "req/s",
        );
        row(name, "many_ramp", &format!("n={n}"), m.ramp_secs, "s");
        row(
            name,
            "many_cpu",
            &format!("n={n}"),
            m.process.map(|c| c.cpu_pct),
            "%core",
        );
        row(
            name,
            "many_rss",
            &format!("n={n}"),
            m.process.map(|c| c.rss_mib),
            "MiB",
        );
        row(
            name,
            "many_cpu_apiserver",
            &format!("n={n}"),
            m.apiserver.map(|c| c.cpu_pct),
            "%core",
        );
        row(
            name,
            "many_cpu_etcd",
            &format!("n={n}"),
            m.etcd.map(|c| c.cpu_pct),
            "%core",
        );
        row(
            name,
            "many_sockets",
            &format!("n={n}"),
            m.sockets.map(|s| s as f64),
            "count",
        );
        row(
            name,
            "many_peak_sockets",
            &format!("n={n}"),
            m.peak_sockets.map(|s| s as f64),
            "count",
        );
        row(
            name,
            "many_watches_ended_unresponsive",
            &format!("n={n}"),
            Some(m.terminated_watchers),
            "count",
        );
        row(
            name,
            "many_lost",
            &format!("n={n}"),
            Some(m.lost as f64),
            "count",
        );
    }
    std::fs::write(path, out).with_context(|| format!("writing {}", path.display()))
}

fn mean_cost(costs: &[Cost]) -> Option<Cost> {
    Some(Cost {
        cpu_pct: mean(costs.iter().map(|c| c.cpu_pct))?,
        rss_mib: mean(costs.iter().map(|c| c.rss_mib))?,
    })
}

fn max_cost(costs: &[Cost]) -> Option<Cost> {
    Some(Cost {
        cpu_pct: max(costs.iter().map(|c| c.cpu_pct))?,
        rss_mib: max(costs.iter().map(|c| c.rss_mib))?,
    })
}

// ---- RESULTS.md ---------------------------------------------------------------

/// Writes `RESULTS.md`, keeping the analysis section of the file it replaces.
pub(crate) fn write_markdown(path: &Path, report: &Report) -> Result<()> {
    let analysis = std::fs::read_to_string(path)
        .ok()
        .and_then(|old| {
            let start = old.find(ANALYSIS_BEGIN)? + ANALYSIS_BEGIN.len();
            let end = old[start..].find(ANALYSIS_END)? + start;
            Some(old[start..end].trim().to_owned())
        })
        .filter(|a| !a.is_empty())
        .unwrap_or_else(|| "(No analysis written yet.)".to_owned());
    let text = markdown(report, &analysis);
    std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))
}

fn verbs(rates: impl Iterator<Item = Rates>) -> Vec<String> {
    let mut all = BTreeSet::new();
    for r in rates {
        all.extend(r.into_keys());
    }
    all.into_iter().collect()
}

fn markdown(r: &Report, analysis: &str) -> String {
    let mut md = String::new();
    let w = &mut md;
    let o = &r.opts;
    let _ = writeln!(w, "# Benchmark: leaderz side by side\n");
    let _ = writeln!(
        w,
        "Generated by `leaderz-bench` on {} ({:.0} min run){}. Every peer ran against the same \
         local kube-apiserver + etcd in one run, each in its own namespace, with \
         lease duration 3 s, renew deadline 2 s, retry period 500 ms where the peer allows \
         (see [Peers](#peers)). Raw numbers: [`{}`]({}).\n",
        r.started_utc,
        r.run_secs / 60.0,
        if r.quick { ", **quick mode**" } else { "" },
        r.csv,
        r.csv,
    );
    let _ = writeln!(w, "```sh\n{}\n```\n", r.command);
    if let Some(chart) = &r.chart {
        let _ = writeln!(w, "![benchmark chart]({chart})\n");
    }

    // Summary.
    let _ = writeln!(w, "## Summary\n");
    let _ = writeln!(
        w,
        "| peer | handover p50 / p99 / max (ms) | failover over LD p50 / p99 / max (ms) | leader req/s | per follower req/s (N={}) | RSS leader / follower (MiB) | CPU leader (% core) |",
        o.sizes.iter().max().copied().unwrap_or(1)
    );
    let _ = writeln!(w, "|---|---|---|---|---|---|---|");
    let nmax = o.sizes.iter().max().copied().unwrap_or(1);
    let n3 = o.sizes.iter().min().copied().unwrap_or(1);
    for p in &r.peers {
        if let Some(why) = &p.unavailable {
            let _ = writeln!(w, "| {} | not run: {why} | | | | | |", p.spec.name);
            continue;
        }
        let (h, f) = match &p.takeovers {
            Some(t) => (
                triple(&ok_values(&t.handover_ms)),
                triple(&ok_values(&t.failover_overhead_ms)),
            ),
            None => ("-".to_owned(), "-".to_owned()),
        };
        let at = p.steady_at(n3);
        let _ = writeln!(
            w,
            "| {} | {h} | {f} | {} | {} | {} / {} | {} |",
            p.spec.name,
            fmt(p.leader_rate(), 2),
            fmt(p.per_follower(nmax), 3),
            fmt(at.and_then(|s| s.leader).map(|c| c.rss_mib), 1),
            fmt(
                at.and_then(|s| mean_cost(&s.followers)).map(|c| c.rss_mib),
                1
            ),
            fmt(p.steady_at(1).and_then(|s| s.leader).map(|c| c.cpu_pct), 2),
        );
    }
    let _ = writeln!(
        w,
        "\nRSS at N={n3}; leader CPU with no followers (N=1). p99 of {} trials is interpolated \
         between the two highest values: read it as \"about the max\".\n",
        o.trials
    );

    // Targets.
    let _ = writeln!(w, "## leaderz against its targets\n");
    targets(w, r);

    // Handover.
    let _ = writeln!(w, "## a. Handover after a graceful stop\n");
    let _ = writeln!(
        w,
        "3 candidates. SIGTERM to the leader, then the time until the benchmark's watch on the \
         Lease (as the admin) shows a new non-empty holder. After a random 0-2 s the stopped \
         candidate is replaced by a new one (new identity), and the next trial starts {:?} + a \
         random 0-2 s later, so that no timer keeps a fixed phase to the leader's renewals. \
         {} trials.\n",
        o.rest, o.trials
    );
    let _ = writeln!(
        w,
        "| peer | ok / trials | p50 (ms) | p99 (ms) | max (ms) | leader's exit after SIGTERM, p50 (ms) |"
    );
    let _ = writeln!(w, "|---|---|---|---|---|---|");
    for p in &r.peers {
        let Some(t) = &p.takeovers else { continue };
        let v = ok_values(&t.handover_ms);
        let _ = writeln!(
            w,
            "| {} | {} / {} | {} | {} | {} | {} |",
            p.spec.name,
            v.len(),
            t.handover_ms.len(),
            fmt(quantile(&v, 0.5), 0),
            fmt(quantile(&v, 0.99), 0),
            fmt(max(v.iter().copied()), 0),
            fmt(quantile(&t.exit_ms, 0.5), 0),
        );
    }

    // Failover.
    let _ = writeln!(
        w,
        "\n## b. Failover after a crash (SIGKILL), minus the lease duration\n"
    );
    let _ = writeln!(
        w,
        "Same fleet. SIGKILL to the leader, then the time until a new holder shows, minus the \
         3 s lease duration. The kill lands up to one renewal interval after the leader's last \
         renewal, so a peer that takes over exactly at expiry scores between −interval and 0; \
         what is above that is the peer's own delay. The last columns time the same takeover \
         from the expiry of the killed leader's last renewal as the benchmark's watch saw it \
         arrive (+ 3 s; a renewal in flight at the kill lands after it and counts): how late \
         after the exact expiry the new holder came. {} trials.\n",
        o.trials
    );
    let _ = writeln!(
        w,
        "| peer | ok / trials | over LD p50 (ms) | p99 (ms) | max (ms) | after expiry p50 (ms) | p99 (ms) | max (ms) |"
    );
    let _ = writeln!(w, "|---|---|---|---|---|---|---|---|");
    for p in &r.peers {
        let Some(t) = &p.takeovers else { continue };
        let v = ok_values(&t.failover_overhead_ms);
        let e = ok_values(&t.failover_after_expiry_ms);
        let _ = writeln!(
            w,
            "| {} | {} / {} | {} | {} | {} | {} | {} | {} |",
            p.spec.name,
            v.len(),
            t.failover_overhead_ms.len(),
            fmt(quantile(&v, 0.5), 0),
            fmt(quantile(&v, 0.99), 0),
            fmt(max(v.iter().copied()), 0),
            fmt(quantile(&e, 0.5), 0),
            fmt(quantile(&e, 0.99), 0),
            fmt(max(e.iter().copied()), 0),
        );
    }

    // Requests.
    let all_verbs = verbs(
        r.peers
            .iter()
            .flat_map(|p| p.steady.iter().map(|s| s.rates.clone())),
    );
    let _ = writeln!(w, "\n## c. API requests on Leases in steady state\n");
    let _ = writeln!(
        w,
        "From the API server's own `apiserver_request_total{{resource=\"leases\"}}`, over a {:?} \
         window that starts {:?} after a leader exists; the API server's own lease traffic \
         (measured with no candidate running, over {:?}: {}) is subtracted. A WATCH is counted \
         when it ends; \"open watches\" is `apiserver_longrunning_requests` at the end of the \
         window. N=1 is the leader alone; per follower = (total at N − total at 1) / (N − 1).\n",
        o.window,
        o.settle,
        o.window.max(std::time::Duration::from_secs(30)),
        rates_inline(&r.baseline),
    );
    let mut header = String::from("| peer | N | total req/s |");
    let mut rule = String::from("|---|---|---|");
    for v in &all_verbs {
        let _ = write!(header, " {v} |");
        rule.push_str("---|");
    }
    header.push_str(" open watches | per follower req/s |");
    rule.push_str("---|---|");
    let _ = writeln!(w, "{header}\n{rule}");
    for p in &r.peers {
        for s in &p.steady {
            if let Some(problem) = &s.problem {
                let _ = writeln!(w, "| {} | {} | {problem} |", p.spec.name, s.n);
                continue;
            }
            let mut line = format!("| {} | {} | {:.2} |", p.spec.name, s.n, s.total());
            for v in &all_verbs {
                let _ = write!(line, " {} |", fmt(s.rates.get(v).copied(), 2));
            }
            let _ = write!(
                line,
                " {:.0} | {} |",
                s.open_watches,
                fmt(p.per_follower(s.n), 3)
            );
            let _ = writeln!(w, "{line}");
        }
    }

    // Cost.
    let _ = writeln!(w, "\n## d. CPU and memory per candidate process\n");
    let _ = writeln!(
        w,
        "From `/proc/<pid>`: CPU = time on CPU of all threads (`task/*/schedstat`) over the \
         same window, in % of one core; \
         RSS = VmRSS at its end. Followers: mean (max). The API server's and etcd's CPU over \
         the window are shown for the load each peer puts on the control plane.\n"
    );
    let _ = writeln!(
        w,
        "| peer | N | leader CPU % | leader RSS MiB | follower CPU % | follower RSS MiB | kube-apiserver CPU % | etcd CPU % | exited early |"
    );
    let _ = writeln!(w, "|---|---|---|---|---|---|---|---|---|");
    for p in &r.peers {
        for s in p.steady.iter().filter(|s| s.problem.is_none()) {
            let (fm, fx) = (mean_cost(&s.followers), max_cost(&s.followers));
            let _ = writeln!(
                w,
                "| {} | {} | {} | {} | {} ({}) | {} ({}) | {} | {} | {} |",
                p.spec.name,
                s.n,
                fmt(s.leader.map(|c| c.cpu_pct), 2),
                fmt(s.leader.map(|c| c.rss_mib), 1),
                fmt(fm.map(|c| c.cpu_pct), 2),
                fmt(fx.map(|c| c.cpu_pct), 2),
                fmt(fm.map(|c| c.rss_mib), 1),
                fmt(fx.map(|c| c.rss_mib), 1),
                fmt(s.apiserver.map(|c| c.cpu_pct), 1),
                fmt(s.etcd.map(|c| c.cpu_pct), 1),
                if s.exited.is_empty() {
                    "-".to_owned()
                } else {
                    s.exited.join("; ")
                },
            );
        }
    }

    // Many.
    let _ = writeln!(w, "\n## e. Many leases in one process\n");
    let _ = writeln!(
        w,
        "One process runs N electors (N = {}), each the only candidate on its own Lease, \
         sharing one client; timings LD {}, RD {}, RP {}: N / 2 s renewals per second asked \
         of the API server. leaderz: `bench/src/bin/leaderz-many.rs` (`leaderz::client`: \
         HTTP/2; one shared watch on the namespace's Leases); `leaderz-renew-<d>`: the same, \
         renewing every <d> instead of every retry period (`ElectionConfig::renew_interval`, \
         the lighter leader); client-go: `bench/clientgo-many` (N LeaderElectors as goroutines on one \
         clientset, client-side rate limit lifted). Ramp = start to every elector leading; then \
         {:?} settle and a {:?} window: losses count over both, requests and CPU over the \
         window. Connections = the process's TCP connections to the API server at the end \
         of the window (peak: the most seen at once, sampled every second from the start). \
         Watches ended as unresponsive: `apiserver_terminated_watchers_total{{resource=\"leases\"}}` \
         over the window, watches kube-apiserver closed because its watch cache could not hand \
         them an event in time (a watcher without an index has a 100-event buffer and at most \
         100 ms of waiting); a client resumes from its last resourceVersion (no relist).\n",
        o.many
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(", "),
        o.many_timings[0],
        o.many_timings[1],
        o.many_timings[2],
        o.settle,
        o.many_window
    );
    if let Some(chart) = &r.chart {
        let scaling = match chart.rsplit_once('/') {
            Some((dir, _)) => format!("{dir}/scaling.png"),
            None => "scaling.png".to_owned(),
        };
        let _ = writeln!(w, "![many leases in one process]({scaling})\n");
    }
    let many_verbs = verbs(r.many.iter().map(|(_, m)| m.rates.clone()));
    let mut header = String::from("| program | leases | ramp (s) | total req/s |");
    let mut rule = String::from("|---|---|---|---|");
    for v in &many_verbs {
        let _ = write!(header, " {v} |");
        rule.push_str("---|");
    }
    header.push_str(
        " open watches | watches ended as unresponsive | RSS MiB | CPU % | connections (peak) | kube-apiserver CPU % | etcd CPU % | losses |",
    );
    rule.push_str("---|---|---|---|---|---|---|---|");
    let _ = writeln!(w, "{header}\n{rule}");
    let mut many: Vec<&(String, Many)> = r.many.iter().collect();
    many.sort_by_key(|(name, m)| (m.n, name.clone()));
    for (name, m) in many {
        if let Some(problem) = &m.problem {
            let _ = writeln!(w, "| {name} | {} | {problem} |", m.n);
            continue;
        }
        let mut line = format!(
            "| {name} | {} | {} | {:.1} |",
            m.n,
            fmt(m.ramp_secs, 1),
            m.rates.values().sum::<f64>()
        );
        for v in &many_verbs {
            let _ = write!(line, " {} |", fmt(m.rates.get(v).copied(), 1));
        }
        let _ = write!(
            line,
            " {:.0} | {:.0} | {} | {} | {} ({}) | {} | {} | {} |",
            m.open_watches - r.baseline_watches,
            m.terminated_watchers,
            fmt(m.process.map(|c| c.rss_mib), 1),
            fmt(m.process.map(|c| c.cpu_pct), 1),
            m.sockets.map_or_else(|| "-".to_owned(), |s| s.to_string()),
            m.peak_sockets
                .map_or_else(|| "-".to_owned(), |s| s.to_string()),
            fmt(m.apiserver.map(|c| c.cpu_pct), 1),
            fmt(m.etcd.map(|c| c.cpu_pct), 1),
            m.lost
        );
        let _ = writeln!(w, "{line}");
    }

    // Peers.
    let _ = writeln!(w, "\n## Peers\n");
    let _ = writeln!(
        w,
        "| peer | version | timings used | on SIGTERM | followers | problems seen |"
    );
    let _ = writeln!(w, "|---|---|---|---|---|---|");
    for p in &r.peers {
        let mut problems: Vec<String> = p.errors.clone();
        if let Some(why) = &p.unavailable {
            problems.insert(0, format!("not run: {why}"));
        }
        if let Some(t) = &p.takeovers {
            problems.extend(t.problems.iter().cloned());
        }
        for s in &p.steady {
            if let Some(problem) = &s.problem {
                problems.push(format!("N={}: {problem}", s.n));
            }
            for e in &s.exited {
                problems.push(format!("N={}: exited early: {e}", s.n));
            }
        }
        let problems = if problems.is_empty() {
            "-".to_owned()
        } else {
            problems.join("<br>").replace('|', "\\|")
        };
        let _ = writeln!(
            w,
            "| {} | {} | {} | {} | {} | {problems} |",
            p.spec.name, p.version, p.spec.timings, p.spec.release, p.spec.followers
        );
    }

    // Machine.
    let e = &r.env;
    let _ = writeln!(w, "\n## Machine and versions\n");
    let _ = writeln!(w, "- CPU: {} ({} cores, `nproc`)", e.cpu_model, e.nproc);
    let _ = writeln!(
        w,
        "- Memory (`free -g`):\n\n```\n{}\n```\n",
        e.free_g.trim_end()
    );
    let _ = writeln!(w, "- Kernel: {}", e.kernel);
    let _ = writeln!(
        w,
        "- Load average (1/5/15 min) at start: {}; at end: {} (other work on the machine \
         during the run shows here)",
        e.load_start, e.load_end
    );
    let _ = writeln!(w, "- Kubernetes (kube-apiserver): {}", e.kubernetes);
    let _ = writeln!(w, "- etcd: {}", e.etcd);
    let _ = writeln!(w, "- Go: {}", e.go);
    let _ = writeln!(w, "- rustc: {}", e.rustc);
    for p in &r.peers {
        let _ = writeln!(w, "- {}: {}", p.spec.name, p.version);
    }
    let _ = writeln!(
        w,
        "\nThe chart needs matplotlib (`python3 -m pip install matplotlib`, once); the \
         benchmark draws it when matplotlib is installed. To redraw it from the CSV: \
         `python3 bench/plot.py bench/results/results.csv bench/results/chart.png`.\n"
    );

    let _ = writeln!(
        w,
        "## Analysis\n\n{ANALYSIS_BEGIN}\n{analysis}\n{ANALYSIS_END}"
    );
    md
}

fn triple(v: &[f64]) -> String {
    format!(
        "{} / {} / {}",
        fmt(quantile(v, 0.5), 0),
        fmt(quantile(v, 0.99), 0),
        fmt(max(v.iter().copied()), 0)
    )
}

fn rates_inline(rates: &Rates) -> String {
    if rates.is_empty() {
        return "none".to_owned();
    }
    rates
        .iter()
        .map(|(v, r)| format!("{v} {r:.2}/s"))
        .collect::<Vec<_>>()
        .join(", ")
}

fn verdict(met: Option<bool>) -> &'static str {
    match met {
        Some(true) => "**met**",
        Some(false) => "**missed**",
        None => "not measured",
    }
}

fn targets(w: &mut String, r: &Report) {
    let Some(lz) = r.peers.iter().find(|p| p.spec.name == "leaderz") else {
        return;
    };
    let t = lz.takeovers.clone().unwrap_or_default();
    let handover = ok_values(&t.handover_ms);
    let failover = ok_values(&t.failover_overhead_ms);
    let h99 = quantile(&handover, 0.99).filter(|_| handover.len() == t.handover_ms.len());
    let f99 = quantile(&failover, 0.99).filter(|_| failover.len() == t.failover_overhead_ms.len());
    let followers: Vec<(usize, f64)> = r
        .opts
        .sizes
        .iter()
        .filter_map(|&n| lz.per_follower(n).map(|f| (n, f)))
        .collect();
    let worst_follower = max(followers.iter().map(|(_, f)| *f));
    // One request per retry period; one request more or less at either edge of the window
    // and the baseline's own noise are within measurement error.
    let window = r.opts.window.as_secs_f64().max(1.0);
    let leader_limit = 1.0 / 0.5 + 2.0 / window;
    let leader = lz.leader_rate();
    let leader_gets = lz
        .steady_at(1)
        .and_then(|s| s.rates.get("GET").copied())
        .unwrap_or(0.0);
    let rss = max(lz.steady.iter().flat_map(|s| {
        s.leader
            .iter()
            .chain(s.followers.iter())
            .map(|c| c.rss_mib)
            .collect::<Vec<_>>()
    }));
    let followers_text = followers
        .iter()
        .map(|(n, f)| format!("N={n}: {f:.3}"))
        .collect::<Vec<_>>()
        .join(", ");
    let expiry = ok_values(&t.failover_after_expiry_ms);
    let e99 = quantile(&expiry, 0.99).filter(|_| expiry.len() == t.failover_after_expiry_ms.len());
    let _ = writeln!(w, "| target | measured | verdict |");
    let _ = writeln!(w, "|---|---|---|");
    let _ = writeln!(
        w,
        "| handover after a graceful stop p99 ≤ 10 ms | p99 {} ms ({} of {} trials took over) | {} |",
        fmt(quantile(&handover, 0.99), 1),
        handover.len(),
        t.handover_ms.len(),
        verdict(h99.map(|v| v <= 10.0))
    );
    let _ = writeln!(
        w,
        "| takeover after a crash p99 ≤ 10 ms after the exact expiry | p99 {} ms ({} of {} trials) | {} |",
        fmt(quantile(&expiry, 0.99), 1),
        expiry.len(),
        t.failover_after_expiry_ms.len(),
        verdict(e99.map(|v| v <= 10.0))
    );
    let _ = writeln!(
        w,
        "| failover within the lease duration of the crash (p99 over LD ≤ 0) | p99 {} ms | {} |",
        fmt(quantile(&failover, 0.99), 0),
        verdict(f99.map(|v| v <= 0.0))
    );
    let _ = writeln!(
        w,
        "| followers in steady state: 0 requests/s (< 0.05/s each) | per follower req/s: {followers_text} | {} |",
        verdict(worst_follower.map(|f| f < 0.05))
    );
    let _ = writeln!(
        w,
        "| leader at most 1 request per renew interval (2/s at 500 ms) | {} req/s alone ({leader_gets:.2} GET/s); limit {leader_limit:.2} with ±1 request per window | {} |",
        fmt(leader, 2),
        verdict(leader.map(|l| l <= leader_limit))
    );
    let _ = writeln!(
        w,
        "| RSS ≤ 6 MiB for the minimal library process | static as the image ships it: {} MiB; dynamically linked as the table above: max {} MiB over all leaderz candidates (`leaderz-candidate`: the library in a minimal process) | {} |",
        fmt(r.static_candidate_rss, 1),
        fmt(rss, 1),
        verdict(r.static_candidate_rss.or(rss).map(|m| m <= 6.0))
    );
    let _ = writeln!(
        w,
        "| `leaderz serve` RSS ≤ 8 MiB | static as the image ships it: {} MiB; dynamically linked: {} MiB (leading, after answering `/` and `/metrics`) | {} |",
        fmt(r.static_serve_rss, 1),
        fmt(r.serve_rss, 1),
        verdict(r.static_serve_rss.or(r.serve_rss).map(|m| m <= 8.0))
    );
    many_targets(w, r);
    let _ = writeln!(w);
}

/// The many-leases targets, at the largest lease count leaderz ran: for leaderz renewing
/// every retry period, and for each lighter-leader variant (`leaderz-renew-*`).
fn many_targets(w: &mut String, r: &Report) {
    let mut names: Vec<&str> = r
        .many
        .iter()
        .map(|(p, _)| p.as_str())
        .filter(|p| *p == "leaderz" || p.starts_with("leaderz-renew-"))
        .collect();
    names.sort_unstable();
    names.dedup();
    for name in names {
        many_targets_of(w, r, name);
    }
}

fn many_targets_of(w: &mut String, r: &Report, name: &str) {
    let at = |name: &str, n: usize| {
        r.many
            .iter()
            .find(|(p, m)| p == name && m.n == n && m.problem.is_none())
            .map(|(_, m)| m)
    };
    let Some(n) = r
        .many
        .iter()
        .filter(|(p, _)| p == name)
        .map(|(_, m)| m.n)
        .max()
    else {
        return;
    };
    let lz = at(name, n);
    let cg = at("client-go", n);
    let lz_problem = r
        .many
        .iter()
        .find(|(p, m)| p == name && m.n == n)
        .and_then(|(_, m)| m.problem.clone());
    let n = format!("{name}, {n}");
    if let Some(problem) = lz_problem {
        let _ = writeln!(w, "| {n} leases in one process | {problem} | **missed** |");
        return;
    }
    let Some(lz) = lz else { return };
    let _ = writeln!(
        w,
        "| {n} leases: ≤ 16 connections to the API server | {} at the end (peak {}) | {} |",
        lz.sockets.map_or_else(|| "-".to_owned(), |s| s.to_string()),
        lz.peak_sockets
            .map_or_else(|| "-".to_owned(), |s| s.to_string()),
        verdict(lz.sockets.map(|s| s <= 16))
    );
    let _ = writeln!(
        w,
        "| {n} leases: RSS ≤ 150 MiB | {} MiB | {} |",
        fmt(lz.process.map(|c| c.rss_mib), 1),
        verdict(lz.process.map(|c| c.rss_mib <= 150.0))
    );
    let _ = writeln!(
        w,
        "| {n} leases: no leadership lost over the {:?} window | {} losses | {} |",
        r.opts.settle + r.opts.many_window,
        lz.lost,
        verdict(Some(lz.lost == 0))
    );
    let _ = writeln!(
        w,
        "| {n} leases: ramp to all leading ≤ 10 s | {} s | {} |",
        fmt(lz.ramp_secs, 1),
        verdict(lz.ramp_secs.map(|s| s <= 10.0))
    );
    let below = |ours: Option<f64>, theirs: Option<f64>| match (ours, theirs) {
        (Some(a), Some(b)) => Some(a < b),
        _ => None,
    };
    let _ = writeln!(
        w,
        "| {n} leases: process CPU below client-go's | {} % vs {} % | {} |",
        fmt(lz.process.map(|c| c.cpu_pct), 1),
        fmt(cg.and_then(|m| m.process).map(|c| c.cpu_pct), 1),
        verdict(below(
            lz.process.map(|c| c.cpu_pct),
            cg.and_then(|m| m.process).map(|c| c.cpu_pct)
        ))
    );
    let _ = writeln!(
        w,
        "| {n} leases: kube-apiserver CPU below client-go's | {} % vs {} % | {} |",
        fmt(lz.apiserver.map(|c| c.cpu_pct), 1),
        fmt(cg.and_then(|m| m.apiserver).map(|c| c.cpu_pct), 1),
        verdict(below(
            lz.apiserver.map(|c| c.cpu_pct),
            cg.and_then(|m| m.apiserver).map(|c| c.cpu_pct)
        ))
    );
}
