//! The figures of many trials, per fault and overall, as Markdown.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use crate::check::{Kind, Timings};
use crate::trial::TrialOutcome;

/// Figures summed over trials.
#[derive(Clone, Debug, Default)]
pub struct Tally {
    /// Trials.
    pub trials: usize,
    /// Trials in which this was the only fault.
    pub alone: usize,
    /// Trials with a broken promise.
    pub failed: usize,
    /// Unexpected overlaps (pairs of terms).
    pub overlaps: usize,
    /// Overlaps the design expected (beyond-bound clock rates, an admin's release).
    pub expected_overlaps: usize,
    /// A SIGSTOPped leader's work writing after SIGCONT (fencing's job).
    pub paused_overlaps: usize,
    /// Stale writes accepted where no overlap was expected (must be 0).
    pub stale_accepted: usize,
    /// Stale writes accepted where the design expected them.
    pub expected_stale_accepted: usize,
    /// Stale writes the ledger rejected.
    pub stale_rejected: usize,
    /// Overlaps and stale writes of client-go candidates (client-go's own step-down).
    pub clientgo_findings: usize,
    /// Worst (c) lateness of a leaderz term (ms).
    pub worst_lateness_ms: Option<f64>,
    /// Step-downs not judged: the admin's watch may have lost the last renewal.
    pub unverifiable_stops: usize,
    /// Worst (d) leaderless time (ms).
    pub worst_leaderless_ms: Option<f64>,
    /// Worst graceful handover (ms).
    pub worst_handover_ms: Option<f64>,
}

fn max(a: Option<f64>, b: Option<f64>) -> Option<f64> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.max(b)),
        (a, b) => a.or(b),
    }
}

impl Tally {
    fn add(&mut self, o: &TrialOutcome, alone: bool) {
        let f = &o.verdict.figures;
        self.trials += 1;
        self.alone += usize::from(alone);
        self.failed += usize::from(o.verdict.failed());
        self.overlaps += f.overlaps;
        self.stale_accepted += f.stale_accepted;
        self.expected_overlaps += f.expected_overlaps;
        self.expected_stale_accepted += f.expected_stale_accepted;
        self.paused_overlaps += f.paused_overlaps;
        self.stale_rejected += f.stale_rejected;
        self.clientgo_findings += o.verdict.clientgo.len();
        self.unverifiable_stops += f.unverifiable_stops;
        self.worst_lateness_ms = max(
            self.worst_lateness_ms,
            f.lateness_ms.iter().copied().reduce(f64::max),
        );
        self.worst_leaderless_ms = max(self.worst_leaderless_ms, f.leaderless_ms);
        self.worst_handover_ms = max(
            self.worst_handover_ms,
            f.handover_ms.iter().copied().reduce(f64::max),
        );
    }
}

/// The labels a trial is counted under: each fault's kind, plus the fleet's and the clock's.
pub fn labels(o: &TrialOutcome) -> Vec<String> {
    let mut labels: Vec<String> = o.spec.steps.iter().map(|s| s.fault.kind()).collect();
    if let Some(rate) = o.spec.candidates.iter().find_map(|c| c.rate) {
        let side = if o.spec.beyond_bound {
            "beyond"
        } else {
            "inside"
        };
        labels.push(format!("clock-rate x{rate} ({side} the bound)"));
    }
    if o.spec.candidates.iter().any(|c| c.kind == Kind::ClientGo) {
        labels.push("mixed fleet (client-go)".into());
    }
    labels.sort();
    labels.dedup();
    labels
}

/// Sums `outcomes` per label and overall.
pub fn tally(outcomes: &[TrialOutcome]) -> (BTreeMap<String, Tally>, Tally) {
    let mut per: BTreeMap<String, Tally> = BTreeMap::new();
    let mut all = Tally::default();
    for o in outcomes {
        let alone = o.spec.steps.len() == 1;
        for label in labels(o) {
            per.entry(label).or_default().add(o, alone);
        }
        all.add(o, alone);
    }
    (per, all)
}

fn fmt_ms(v: Option<f64>) -> String {
    v.map_or_else(|| "–".to_owned(), |v| format!("{v:.0}"))
}

/// The soak's results as Markdown: the command, the overall figures against their
/// bounds, a table per fault, and every failed trial with its seed.
pub fn markdown(
    outcomes: &[TrialOutcome],
    timings: Timings,
    command: &str,
    minutes: f64,
) -> String {
    let (per, all) = tally(outcomes);
    let rd = timings.renew_deadline.as_millis();
    let bound = (timings.lease_duration + timings.retry_period).as_millis();
    let mut md = String::new();
    let _ = writeln!(md, "# Fault-injection soak: results\n");
    let _ = writeln!(
        md,
        "`{command}` — {} trials in {minutes:.1} min against a real kube-apiserver 1.34 + etcd 3.6 \
         (lease {:?}, renew deadline {:?}, retry period {:?}).\n",
        outcomes.len(),
        timings.lease_duration,
        timings.renew_deadline,
        timings.retry_period
    );
    let _ = writeln!(md, "| figure | value | bound |\n|---|---|---|");
    let _ = writeln!(
        md,
        "| trials (failed) | {} ({}) | 0 failed |",
        all.trials, all.failed
    );
    let _ = writeln!(
        md,
        "| overlaps found (leaderz work writing after a later term's work began) | {} | 0 |",
        all.overlaps
    );
    let _ = writeln!(
        md,
        "| stale writes accepted (a leaderz term's, after its end was visible in the Lease) | {} | 0 |",
        all.stale_accepted
    );
    let _ = writeln!(
        md,
        "| stale writes rejected by the ledger | {} | – |",
        all.stale_rejected
    );
    let _ = writeln!(
        md,
        "| worst step-down lateness after last renewal + renew_deadline (ms) | {} | ≤ {} (signal delivery) |",
        fmt_ms(all.worst_lateness_ms),
        timings.stop_slack.as_millis()
    );
    let _ = writeln!(
        md,
        "| step-downs not judged (the admin's watch lost versions across an API server restart; in time against the end of that gap) | {} | – |",
        all.unverifiable_stops
    );
    let _ = writeln!(
        md,
        "| worst leaderless time after a heal (ms) | {} | ≤ {bound} (lease_duration + retry_period) |",
        fmt_ms(all.worst_leaderless_ms)
    );
    let _ = writeln!(
        md,
        "| worst handover after a graceful release (ms) | {} | ≤ {} |",
        fmt_ms(all.worst_handover_ms),
        timings.handover_bound.as_millis()
    );
    let _ = writeln!(
        md,
        "| overlaps of a SIGSTOPped leader's work after SIGCONT (its stale writes: fencing's job) | {} | – |",
        all.paused_overlaps
    );
    let _ = writeln!(
        md,
        "| overlaps / stale writes accepted, expected: clock rates beyond the bound, or an admin released a live leader's Lease | {} / {} | – |",
        all.expected_overlaps, all.expected_stale_accepted
    );
    let _ = writeln!(
        md,
        "\nLateness is measured from the `renewTime` the leader wrote (its send time, in its own \
         clock under faketime) + renew_deadline ({rd} ms) to the worker's log of SIGTERM.\n"
    );
    let _ = writeln!(md, "## Per fault\n");
    let _ = writeln!(
        md,
        "| fault | trials (alone) | failed | overlaps | stale accepted | stale rejected | worst lateness ms | worst leaderless ms | worst handover ms |\n|---|---|---|---|---|---|---|---|---|"
    );
    for (label, t) in &per {
        let overlaps = if t.expected_overlaps > 0 {
            format!("{} (+{} expected)", t.overlaps, t.expected_overlaps)
        } else {
            t.overlaps.to_string()
        };
        let stale = if t.expected_stale_accepted > 0 {
            format!(
                "{} (+{} expected)",
                t.stale_accepted, t.expected_stale_accepted
            )
        } else {
            t.stale_accepted.to_string()
        };
        let _ = writeln!(
            md,
            "| {label} | {} ({}) | {} | {overlaps} | {stale} | {} | {} | {} | {} |",
            t.trials,
            t.alone,
            t.failed,
            t.stale_rejected,
            fmt_ms(t.worst_lateness_ms),
            fmt_ms(t.worst_leaderless_ms),
            fmt_ms(t.worst_handover_ms)
        );
    }
    let _ = writeln!(
        md,
        "\nOverlaps and stale writes whose late writer was a client-go candidate (client-go's \
         own step-down, reported and not counted above): {}.",
        all.clientgo_findings
    );
    for o in outcomes.iter().filter(|o| !o.verdict.clientgo.is_empty()) {
        let _ = writeln!(
            md,
            "- `{}` seed {}: {}",
            o.spec.name,
            o.spec.seed,
            o.spec.describe()
        );
        for f in o.verdict.clientgo.iter().take(3) {
            let _ = writeln!(md, "  - {f}");
        }
    }
    let failed: Vec<&TrialOutcome> = outcomes.iter().filter(|o| o.verdict.failed()).collect();
    let _ = writeln!(md, "\n## Failed trials ({})\n", failed.len());
    for o in failed {
        let _ = writeln!(
            md,
            "- `{}` seed {}: {}",
            o.spec.name,
            o.spec.seed,
            o.spec.describe()
        );
        for f in o.verdict.findings.iter().take(4) {
            let _ = writeln!(md, "  - {f}");
        }
        if o.verdict.findings.len() > 4 {
            let _ = writeln!(md, "  - … {} more", o.verdict.findings.len() - 4);
        }
    }
    md
}
