//! The invariant checker: what one trial recorded (the Lease's history, the ledger's
//! writes, the workers' logs, the candidates' fates and the faults) against the promises,
//! with the measured figures.
//!
//! - (a) the Lease's history shows one holder at a time and never a lower
//!   `leaseTransitions`: every new term raises it, no token serves two terms;
//! - (b) the ledger never accepted a write with a token lower than one it had accepted,
//!   and no two writers' accepted writes interleave;
//! - (c) a leaderz leader stops its work no later than its last successful renewal's send
//!   time + renew_deadline (its `renewTime`, in its own clock under faketime), plus the
//!   signal's delivery, reported as "lateness";
//! - (d) after the last fault healed, a leader exists again within lease_duration +
//!   retry_period;
//! - (e) no candidate panicked or exited unexpectedly, no work outlived a SIGKILLed
//!   `leaderz`, and every stale write (after a SIGSTOP or anywhere) was rejected.
//!
//! Beyond those: "overlap" (a term's work still writing after a later term's work began
//! writing; excused where fencing is the only defence: a SIGSTOPped leader, or a clock
//! rate beyond the documented bound), "release" (a holder released its term only after
//! its work stopped) and "handover" (a graceful release taken over within
//! [`Timings::handover_bound`]).

use std::collections::{BTreeMap, HashSet};
use std::fmt;
use std::time::Duration;

use serde::Serialize;

use crate::history::LeaseVersion;
use crate::ledger::Write;
use crate::worker::WorkerEvent;

/// The election's timing, shared by every candidate of a trial.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct Timings {
    /// `--lease-duration`.
    pub lease_duration: Duration,
    /// `--renew-deadline`.
    pub renew_deadline: Duration,
    /// `--retry-period`.
    pub retry_period: Duration,
    /// How late a stop may come after the deadline for the signal's delivery and the
    /// worker's logging of it (invariant (c)).
    pub stop_slack: Duration,
    /// How soon after a graceful release another candidate must have taken the lease:
    /// the engine's bound for a follower whose watch silently died (a half-open
    /// connection) — it notices when the holder's next renewal is overdue, 2 renewal
    /// intervals + 1 s after the last one it saw, and checks with one read — plus slack.
    pub handover_bound: Duration,
    /// Slack on (d) for the recorder's watch delivery.
    pub observe_slack: Duration,
}

impl Default for Timings {
    fn default() -> Self {
        Self {
            lease_duration: Duration::from_secs(3),
            renew_deadline: Duration::from_secs(2),
            retry_period: Duration::from_millis(500),
            // Measured signal delivery: median 0.5 ms, p99 8 ms on a quiet machine; a
            // loaded 2-core CI machine has shown 105 ms (scheduling).
            stop_slack: Duration::from_millis(250),
            handover_bound: Duration::from_millis(2 * 500 + 1000 + 500),
            observe_slack: Duration::from_millis(100),
        }
    }
}

/// Which implementation a candidate runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub enum Kind {
    /// `leaderz run -- leaderz-faults-worker`.
    Leaderz,
    /// `clientgo-candidate --ledger` (client-go's `tools/leaderelection`).
    ClientGo,
}

/// What happened to one candidate process.
#[derive(Clone, Debug, Default, Serialize)]
pub struct CandidateRecord {
    /// Its identity.
    pub id: String,
    /// leaderz or client-go.
    pub kind: Option<Kind>,
    /// Its clock rate under faketime (1.0 without).
    pub rate: f64,
    /// When it was spawned (Unix ns): faketime's reference instant.
    pub spawned_ns: u64,
    /// SIGSTOP..SIGCONT intervals (Unix ns).
    pub paused: Vec<(u64, u64)>,
    /// When the test SIGKILLed it.
    pub killed_ns: Option<u64>,
    /// When the test sent it SIGTERM (a fault or the end of the trial).
    pub terminated_ns: Option<u64>,
    /// When it exited and how (`exit N` / `signal N`); `None` if it had not.
    pub exit: Option<(u64, String)>,
    /// Whether the exit was a clean `exit 0`.
    pub exit_ok: bool,
    /// Lines of its stderr that show a panic.
    pub panics: Vec<String>,
    /// The last lines of its stderr.
    pub stderr_tail: Vec<String>,
}

/// One injected fault: what, to whom, when it started and when it healed (Unix ns).
#[derive(Clone, Debug, Serialize)]
pub struct FaultRecord {
    /// The fault's kind, e.g. `blackhole`, `apiserver-restart`.
    pub kind: String,
    /// The candidate it hit, if one.
    pub target: Option<String>,
    /// When it began.
    pub start_ns: u64,
    /// When it healed (equal to `start_ns` for instant faults).
    pub heal_ns: u64,
}

/// Everything one trial recorded.
#[derive(Clone, Debug, Default, Serialize)]
pub struct TrialData {
    /// The trial's name.
    pub name: String,
    /// Its timing.
    pub timings: Option<Timings>,
    /// The Lease's versions, as an admin's watch received them.
    pub history: Vec<LeaseVersion>,
    /// Windows in which the admin's watch may have missed versions (Unix ns; see
    /// [`LeaseRecorder::gaps`](crate::history::LeaseRecorder::gaps)).
    pub history_gaps: Vec<(u64, u64)>,
    /// resourceVersions written by the test's admin (garbage, repairs): not a candidate's.
    pub admin_versions: HashSet<String>,
    /// The ledger's writes for this trial's resource.
    pub writes: Vec<Write>,
    /// The workers' log lines.
    pub workers: Vec<WorkerEvent>,
    /// The candidates.
    pub candidates: Vec<CandidateRecord>,
    /// The faults.
    pub faults: Vec<FaultRecord>,
    /// Whether clock rates beyond the bound make overlaps expected.
    pub beyond_bound: bool,
    /// Graceful releases after which a fast handover is expected (Unix ns of the SIGTERM).
    pub releases: Vec<u64>,
}

/// A broken promise.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Finding {
    /// `a`..`e`, `overlap`, `release` or `handover`.
    pub invariant: &'static str,
    /// What happened, with times relative to the trial's first Lease version.
    pub detail: String,
}

impl fmt::Display for Finding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "({}) {}", self.invariant, self.detail)
    }
}

/// The figures one trial measured.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Figures {
    /// Writes the ledger accepted.
    pub accepted: usize,
    /// Writes the ledger rejected (a lower token than one it had accepted): stale writes
    /// fencing stopped.
    pub stale_rejected: usize,
    /// Writes the ledger accepted from a leaderz term that had already ended in the Lease
    /// (another candidate's term, or its own release, was visible before): violations.
    pub stale_accepted: usize,
    /// The same where the trial made them expected (see [`Verdict::expected`]).
    pub expected_stale_accepted: usize,
    /// The same for client-go terms.
    pub clientgo_stale_accepted: usize,
    /// Pairs of terms whose work overlapped, a leaderz term writing late: violations.
    pub overlaps: usize,
    /// The longest of those (ms).
    pub max_overlap_ms: f64,
    /// Overlaps the trial made expected (see [`Verdict::expected`]).
    pub expected_overlaps: usize,
    /// Overlaps whose late writer was client-go.
    pub clientgo_overlaps: usize,
    /// Overlaps of a SIGSTOPped leader's work after SIGCONT (fencing's job).
    pub paused_overlaps: usize,
    /// (c) for every ended leaderz term: stop time − (last renewal + renew_deadline), ms,
    /// in the candidate's own clock. Negative: early.
    pub lateness_ms: Vec<f64>,
    /// The same for client-go terms, measured for comparison only (client-go's deadline
    /// counts from the start of its renew round).
    pub clientgo_lateness_ms: Vec<f64>,
    /// Step-downs that looked late against the last renewal the admin's watch saw, but
    /// whose later renewals may have been lost to it (a gap across an API server
    /// restart), and which were in time against the end of that gap: not judged.
    pub unverifiable_stops: usize,
    /// (d): from the last heal to the first write of a leader (ms).
    pub leaderless_ms: Option<f64>,
    /// Graceful release to the next holder (ms).
    pub handover_ms: Vec<f64>,
    /// Terms (distinct fencing tokens) in the Lease's history.
    pub terms: usize,
}

/// The verdict on one trial.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Verdict {
    /// Broken promises.
    pub findings: Vec<Finding>,
    /// Findings the trial's design makes expected: overlap and its consequences, which
    /// fencing must absorb, with clock rates beyond the bound or after an admin released
    /// a live leader's Lease.
    pub expected: Vec<Finding>,
    /// Overlaps and stale writes whose late writer is a client-go candidate: client-go's
    /// own step-down, not leaderz's promise (reported, not failed).
    pub clientgo: Vec<Finding>,
    /// What was measured.
    pub figures: Figures,
}

impl Verdict {
    /// Whether any promise broke.
    pub fn failed(&self) -> bool {
        !self.findings.is_empty()
    }
}

fn ms(ns: i128) -> f64 {
    ns as f64 / 1e6
}

/// A writer: one term's process (identity, token, pid).
type WriterKey = (String, i64, u32);

/// One term in the Lease's history: consecutive versions of one holder and token.
struct Segment<'a> {
    holder: &'a str,
    token: i32,
    versions: Vec<&'a LeaseVersion>,
}

#[derive(Debug, Default)]
struct WriterStats {
    first_ns: u64,
    last_ns: u64,
    accepted: usize,
}

/// Checks one trial.
pub fn check(data: &TrialData) -> Verdict {
    let timings = data.timings.unwrap_or_default();
    let mut v = Verdict::default();
    let origin = data
        .history
        .first()
        .map(|h| h.received_ns)
        .or_else(|| data.candidates.iter().map(|c| c.spawned_ns).min())
        .unwrap_or(0);
    let rel = |ns: u64| {
        format!(
            "+{:.3}s",
            (i128::from(ns) - i128::from(origin)) as f64 / 1e9
        )
    };
    let paused = |id: &str, from: u64, to: u64| {
        data.candidates
            .iter()
            .any(|c| c.id == id && c.paused.iter().any(|&(s, e)| s <= to && e >= from))
    };
    let killed = |id: &str, before: u64| {
        data.candidates
            .iter()
            .any(|c| c.id == id && c.killed_ns.is_some_and(|k| k <= before))
    };
    let candidate = |id: &str| data.candidates.iter().find(|c| c.id == id);
    let is_clientgo = |id: &str| candidate(id).is_some_and(|c| c.kind == Some(Kind::ClientGo));

    // ---- (a) the Lease's history ---------------------------------------------------
    let by_candidates: Vec<&LeaseVersion> = data
        .history
        .iter()
        .filter(|h| !h.deleted && !data.admin_versions.contains(&h.resource_version))
        .collect();
    // Terms: runs of versions with the same holder and token, broken by anything else
    // (another record, a release, a deletion, an admin's write).
    let mut segments: Vec<Segment<'_>> = Vec::new();
    let mut highest: Option<(i32, &LeaseVersion)> = None;
    // Reported once per drop, not for every version below the highest.
    let mut below = false;
    let mut open = false;
    for h in &data.history {
        let by_admin = data.admin_versions.contains(&h.resource_version);
        if h.deleted || by_admin || h.holder.is_empty() {
            open = false;
            if h.deleted || by_admin {
                continue;
            }
        }
        if let Some((t, prev)) = highest
            && h.transitions < t
            && !below
        {
            below = true;
            let finding = Finding {
                invariant: "a",
                detail: format!(
                    "leaseTransitions went down from {t} (holder `{}`) to {} (holder `{}`) at {} (once per drop)",
                    prev.holder,
                    h.transitions,
                    h.holder,
                    rel(h.received_ns)
                ),
            };
            // client-go re-creates a deleted Lease from 0 (leaderz continues the count).
            if is_clientgo(&h.holder) {
                v.clientgo.push(finding);
            } else {
                v.findings.push(finding);
            }
        }
        if highest.is_none_or(|(t, _)| h.transitions >= t) {
            highest = Some((h.transitions, h));
            below = false;
        }
        if h.holder.is_empty() {
            continue;
        }
        if open
            && let Some(last) = segments.last_mut()
            && last.holder == h.holder
            && last.token == h.transitions
        {
            last.versions.push(h);
            continue;
        }
        if let Some(earlier) = segments.iter().find(|seg| seg.token == h.transitions) {
            let what = if earlier.holder == h.holder {
                "began a second term"
            } else {
                "was taken by a second holder"
            };
            let finding = Finding {
                invariant: "a",
                detail: format!(
                    "token {} {what}: `{}` after `{}`, at {}",
                    h.transitions,
                    h.holder,
                    earlier.holder,
                    rel(h.received_ns)
                ),
            };
            if is_clientgo(&h.holder) {
                v.clientgo.push(finding);
            } else {
                v.findings.push(finding);
            }
        }
        segments.push(Segment {
            holder: &h.holder,
            token: h.transitions,
            versions: vec![h],
        });
        open = true;
    }
    v.figures.terms = segments.len();
    // Terms an admin released for their holder (garbage with an empty holder): a follower
    // may take over at once, and the holder learns of it only at its next renewal, so an
    // overlap up to a retry period is not the elector's to prevent.
    let released_by_admin: HashSet<(String, i64)> = data
        .history
        .iter()
        .enumerate()
        .filter(|(_, h)| h.holder.is_empty() && data.admin_versions.contains(&h.resource_version))
        .filter_map(|(n, _)| {
            data.history[..n]
                .iter()
                .rev()
                .find(|p| !p.deleted)
                .filter(|p| !p.holder.is_empty())
                .map(|p| (p.holder.clone(), i64::from(p.transitions)))
        })
        .collect();
    let third_party = |id: &str, token: i64| released_by_admin.contains(&(id.to_owned(), token));
    // Terms of a leaderz holder released by a client-go candidate: client-go's release
    // after it was cut off and reconnected can clear a newer holder's record (seen with
    // client-go v0.34.4). Recognised by a release (not the admin's) of a leaderz term
    // within a few seconds after a client-go candidate that had led before healed.
    let clientgo_heals: Vec<u64> = data
        .faults
        .iter()
        .filter(|f| {
            f.target
                .as_deref()
                .is_some_and(|id| is_clientgo(id) && segments.iter().any(|s| s.holder == id))
        })
        .map(|f| f.heal_ns)
        .collect();
    let window_ns = (timings.renew_deadline + timings.lease_duration).as_nanos() as u64;
    let released_by_clientgo: HashSet<(String, i64)> = data
        .history
        .iter()
        .enumerate()
        .filter(|(_, h)| h.holder.is_empty() && !data.admin_versions.contains(&h.resource_version))
        .filter(|(_, h)| {
            clientgo_heals
                .iter()
                .any(|heal| *heal <= h.received_ns && h.received_ns <= heal + window_ns)
        })
        .filter_map(|(n, _)| {
            data.history[..n]
                .iter()
                .rev()
                .find(|p| !p.deleted)
                .filter(|p| !p.holder.is_empty() && !is_clientgo(&p.holder))
                .map(|p| (p.holder.clone(), i64::from(p.transitions)))
        })
        .collect();
    let clientgo_released =
        |id: &str, token: i64| released_by_clientgo.contains(&(id.to_owned(), token));

    // Tokens a client-go candidate took again (it re-creates a deleted Lease from 0):
    // fencing cannot tell such a term from the earlier one, so what follows from it is
    // client-go's doing.
    let reused_by_clientgo: HashSet<i64> = segments
        .iter()
        .enumerate()
        .filter(|(i, seg)| {
            is_clientgo(seg.holder)
                && segments[..*i].iter().any(|e| {
                    e.token >= seg.token && (e.holder != seg.holder || e.token != seg.token)
                })
        })
        .map(|(_, seg)| i64::from(seg.token))
        .collect();

    // ---- (b) the ledger -----------------------------------------------------------
    let mut writers: BTreeMap<WriterKey, WriterStats> = BTreeMap::new();
    let mut highest_accepted: Option<i64> = None;
    let mut accepted_order: Vec<WriterKey> = Vec::new();
    let mut left: HashSet<WriterKey> = HashSet::new();
    // (writer that came back, writer it interrupted) → (times, first time).
    let mut interleavings: BTreeMap<(WriterKey, WriterKey), (usize, u64)> = BTreeMap::new();
    for w in &data.writes {
        let key = (w.request.identity.clone(), w.request.token, w.request.pid);
        let stats = writers.entry(key.clone()).or_insert(WriterStats {
            first_ns: w.received_ns,
            ..WriterStats::default()
        });
        stats.last_ns = w.received_ns;
        if !w.accepted {
            v.figures.stale_rejected += 1;
            continue;
        }
        stats.accepted += 1;
        v.figures.accepted += 1;
        if let Some(h) = highest_accepted
            && w.request.token < h
        {
            v.findings.push(Finding {
                invariant: "b",
                detail: format!(
                    "the ledger accepted token {} after token {h} at {}",
                    w.request.token,
                    rel(w.received_ns)
                ),
            });
        }
        highest_accepted =
            Some(highest_accepted.map_or(w.request.token, |h| h.max(w.request.token)));
        if accepted_order.last() != Some(&key) {
            if left.contains(&key)
                && let Some(prev) = accepted_order.last()
            {
                let e = interleavings
                    .entry((key.clone(), prev.clone()))
                    .or_insert((0, w.received_ns));
                e.0 += 1;
            }
            if let Some(prev) = accepted_order.last() {
                left.insert(prev.clone());
            }
            accepted_order.push(key);
        }
    }
    for ((back, other), (times, first)) in interleavings {
        let reused = back.1 == other.1 && reused_by_clientgo.contains(&back.1);
        let findings = if reused {
            &mut v.clientgo
        } else {
            &mut v.findings
        };
        findings.push(Finding {
            invariant: "b",
            detail: format!(
                "accepted writes interleave: `{}` (token {}) was accepted again {times} times after `{}` (token {}) had been, the first at {}",
                back.0,
                back.1,
                other.0,
                other.1,
                rel(first)
            ),
        });
    }

    // ---- overlap: a term's work writing after a later term's work began -------------
    let ordered: Vec<(&WriterKey, &WriterStats)> = {
        let mut o: Vec<_> = writers.iter().collect();
        o.sort_by_key(|(_, s)| s.first_ns);
        o
    };
    for (i, (a, sa)) in ordered.iter().enumerate() {
        for (b, sb) in &ordered[i + 1..] {
            if sa.last_ns <= sb.first_ns {
                continue;
            }
            let overlap = ms(i128::from(sa.last_ns) - i128::from(sb.first_ns));
            // A paused leader resumes and writes before it notices: only fencing can stop
            // that (its stale writes are counted below).
            let excused = paused(&a.0, sa.first_ns, sa.last_ns);
            let finding = Finding {
                invariant: "overlap",
                detail: format!(
                    "`{}` (token {}) still wrote {overlap:.1} ms after `{}` (token {}) began, until {}",
                    a.0,
                    a.1,
                    b.0,
                    b.1,
                    rel(sa.last_ns)
                ),
            };
            if data.beyond_bound || third_party(&a.0, a.1) {
                v.figures.expected_overlaps += 1;
                v.expected.push(finding);
            } else if is_clientgo(&a.0) || clientgo_released(&a.0, a.1) {
                v.figures.clientgo_overlaps += 1;
                v.clientgo.push(finding);
            } else if excused {
                v.figures.paused_overlaps += 1;
            } else {
                v.figures.overlaps += 1;
                v.figures.max_overlap_ms = v.figures.max_overlap_ms.max(overlap);
                v.findings.push(finding);
            }
        }
    }

    // ---- stale writes accepted: after the term ended in the Lease ----------------------
    for ((identity, token, _), _) in &ordered {
        let Ok(token32) = i32::try_from(*token) else {
            continue;
        };
        let Some(first) = by_candidates
            .iter()
            .position(|h| h.holder == *identity && h.transitions == token32)
        else {
            continue;
        };
        let ended = by_candidates[first..].iter().find(|h| {
            let someone_else =
                !h.holder.is_empty() && (h.holder != *identity || h.transitions != token32);
            let released = h.holder.is_empty() && h.transitions == token32;
            someone_else || released
        });
        let Some(ended) = ended else { continue };
        let stale: Vec<&Write> = data
            .writes
            .iter()
            .filter(|w| {
                w.accepted
                    && w.request.identity == *identity
                    && w.request.token == *token
                    && w.received_ns > ended.received_ns
            })
            .collect();
        if stale.is_empty() {
            continue;
        }
        let finding = Finding {
            invariant: "e",
            detail: format!(
                "{} stale writes of `{identity}` (token {token}) accepted after its term ended in the Lease at {} (holder now `{}`, token {}), the last at {}",
                stale.len(),
                rel(ended.received_ns),
                ended.holder,
                ended.transitions,
                rel(stale.last().map_or(0, |w| w.received_ns)),
            ),
        };
        if data.beyond_bound || third_party(identity, *token) {
            v.figures.expected_stale_accepted += stale.len();
            v.expected.push(finding);
        } else if is_clientgo(identity)
            || (is_clientgo(&ended.holder)
                && reused_by_clientgo.contains(&i64::from(ended.transitions)))
            || (ended.holder.is_empty() && clientgo_released(identity, *token))
        {
            v.figures.clientgo_stale_accepted += stale.len();
            v.clientgo.push(finding);
        } else {
            v.figures.stale_accepted += stale.len();
            v.findings.push(finding);
        }
    }

    // ---- (c) step-down in time ------------------------------------------------------
    let mut started: Vec<&WorkerEvent> = data
        .workers
        .iter()
        .filter(|e| e.event == "started")
        .collect();
    started.sort_by_key(|e| e.ts_ns);
    for s in started {
        let Some(c) = candidate(&s.identity) else {
            continue;
        };
        let Ok(token32) = i32::try_from(s.token) else {
            continue;
        };
        let stop = data
            .workers
            .iter()
            .filter(|e| e.pid == s.pid && e.is_stop())
            .map(|e| e.ts_ns)
            .min()
            .or_else(|| {
                writers
                    .iter()
                    .filter(|((i, t, p), _)| *i == s.identity && *t == s.token && *p == s.pid)
                    .map(|(_, st)| st.last_ns)
                    .max()
            });
        let Some(stop) = stop else { continue };
        if paused(&c.id, s.ts_ns, stop) || killed(&c.id, stop) {
            continue;
        }
        // The term this work belongs to: the last one of its holder and token that began
        // before the work started; its renewals that arrived before the work stopped.
        let last_renewal = segments
            .iter()
            .rfind(|seg| {
                seg.holder == s.identity
                    && seg.token == token32
                    && seg
                        .versions
                        .first()
                        .is_some_and(|f| f.received_ns <= s.ts_ns)
            })
            .and_then(|seg| {
                seg.versions
                    .iter()
                    .filter(|h| h.received_ns <= stop)
                    .filter_map(|h| h.renew_ns)
                    .max()
            });
        let Some(last_renewal) = last_renewal else {
            continue;
        };
        let last_seen = segments
            .iter()
            .flat_map(|seg| seg.versions.iter())
            .filter(|h| h.renew_ns == Some(last_renewal))
            .map(|h| h.received_ns)
            .max()
            .unwrap_or(0);
        // renewTime is the writer's wall clock; under faketime it runs `rate` times as fast
        // from the moment the process started.
        let rate = if c.rate > 0.0 { c.rate } else { 1.0 };
        let spawned = i128::from(c.spawned_ns);
        let renewal_real = spawned + ((i128::from(last_renewal) - spawned) as f64 / rate) as i128;
        let own_elapsed = (i128::from(stop) - renewal_real) as f64 * rate;
        let lateness = (own_elapsed - timings.renew_deadline.as_nanos() as f64) / 1e6;
        match c.kind {
            Some(Kind::ClientGo) => v.figures.clientgo_lateness_ms.push(lateness),
            _ => {
                // A renewal after the last one seen may have been lost to the admin's
                // watch: in time against the end of that gap, it cannot be judged.
                let deadline_ns = timings.renew_deadline.as_nanos() as u64;
                let slack_ns = timings.stop_slack.as_nanos() as u64;
                let unseen = data.history_gaps.iter().any(|&(from, to)| {
                    from + slack_ns >= last_seen
                        && from <= stop
                        && stop <= to + deadline_ns + slack_ns
                });
                if lateness > timings.stop_slack.as_secs_f64() * 1e3 && unseen {
                    v.figures.unverifiable_stops += 1;
                    continue;
                }
                v.figures.lateness_ms.push(lateness);
                if lateness > timings.stop_slack.as_secs_f64() * 1e3 {
                    v.findings.push(Finding {
                        invariant: "c",
                        detail: format!(
                            "`{}` (token {}) stopped its work {lateness:.1} ms after last renewal + renew_deadline (renewal at {}, stop at {}, clock rate {rate})",
                            s.identity,
                            s.token,
                            rel(u64::try_from(renewal_real).unwrap_or(0)),
                            rel(stop)
                        ),
                    });
                }
            }
        }
    }

    // ---- release only after the work stopped -------------------------------------------
    for (n, h) in data.history.iter().enumerate() {
        let released =
            !h.deleted && h.holder.is_empty() && !data.admin_versions.contains(&h.resource_version);
        let Some(prev) = n.checked_sub(1).map(|p| &data.history[p]) else {
            continue;
        };
        if !released || prev.holder.is_empty() || prev.deleted || prev.transitions != h.transitions
        {
            continue;
        }
        // `prev.holder` released its term `h.transitions`: its work must have stopped.
        let still: Vec<&WorkerEvent> = data
            .workers
            .iter()
            .filter(|e| {
                e.event == "started"
                    && e.identity == prev.holder
                    && i64::from(h.transitions) == e.token
                    && e.ts_ns < h.received_ns
            })
            .filter(|e| {
                let stopped = data
                    .workers
                    .iter()
                    .filter(|x| x.pid == e.pid && x.is_stop())
                    .map(|x| x.ts_ns)
                    .min();
                let last_write = writers
                    .iter()
                    .filter(|((i, t, p), _)| *i == e.identity && *t == e.token && *p == e.pid)
                    .map(|(_, st)| st.last_ns)
                    .max();
                // Stopped: its log says so; failing that (SIGKILLed), its last write.
                stopped.or(last_write).is_none_or(|t| t > h.received_ns)
                    || last_write.is_some_and(|t| t > h.received_ns)
            })
            .collect();
        for e in still {
            let finding = Finding {
                invariant: "release",
                detail: format!(
                    "`{}` released token {} at {} while its work (pid {}) still ran",
                    prev.holder,
                    h.transitions,
                    rel(h.received_ns),
                    e.pid
                ),
            };
            if is_clientgo(&prev.holder)
                || clientgo_released(&prev.holder, i64::from(h.transitions))
            {
                v.clientgo.push(finding);
            } else {
                v.findings.push(finding);
            }
        }
    }

    // ---- (d) a leader again after the last heal ------------------------------------------
    if let Some(heal) = data.faults.iter().map(|f| f.heal_ns).max() {
        let first = by_candidates
            .iter()
            .find(|h| h.received_ns > heal && !h.holder.is_empty());
        let bound = timings.lease_duration + timings.retry_period;
        match first {
            Some(h) => {
                let leaderless = ms(i128::from(h.received_ns) - i128::from(heal));
                v.figures.leaderless_ms = Some(leaderless);
                if leaderless > (bound + timings.observe_slack).as_secs_f64() * 1e3 {
                    v.findings.push(Finding {
                        invariant: "d",
                        detail: format!(
                            "no leader for {leaderless:.0} ms after the last heal at {} (bound {bound:?})",
                            rel(heal)
                        ),
                    });
                }
            }
            None => v.findings.push(Finding {
                invariant: "d",
                detail: format!("no leader at all after the last heal at {}", rel(heal)),
            }),
        }
    }

    // ---- handover after graceful releases -------------------------------------------------
    for &sent in &data.releases {
        // The release the SIGTERM caused: the work gets `--grace` (1 s) to stop.
        let window = sent
            + u64::try_from((timings.renew_deadline + Duration::from_secs(1)).as_nanos())
                .unwrap_or(u64::MAX);
        let release = by_candidates
            .iter()
            .find(|h| h.received_ns > sent && h.received_ns <= window && h.holder.is_empty());
        let Some(release) = release else { continue };
        let next = by_candidates
            .iter()
            .find(|h| h.received_ns > release.received_ns && !h.holder.is_empty());
        let Some(next) = next else {
            v.findings.push(Finding {
                invariant: "handover",
                detail: format!(
                    "nobody took the lease released at {}",
                    rel(release.received_ns)
                ),
            });
            continue;
        };
        let handover = ms(i128::from(next.received_ns) - i128::from(release.received_ns));
        v.figures.handover_ms.push(handover);
        if handover > timings.handover_bound.as_secs_f64() * 1e3 {
            v.findings.push(Finding {
                invariant: "handover",
                detail: format!(
                    "the lease released at {} was taken only {handover:.0} ms later by `{}` (bound {:?})",
                    rel(release.received_ns),
                    next.holder,
                    timings.handover_bound
                ),
            });
        }
    }

    // ---- (e) processes -------------------------------------------------------------------
    for c in &data.candidates {
        for line in &c.panics {
            v.findings.push(Finding {
                invariant: "e",
                detail: format!("`{}` panicked: {line}", c.id),
            });
        }
        if let Some((at, how)) = &c.exit {
            let asked = c.killed_ns.is_some() || c.terminated_ns.is_some_and(|t| t <= *at);
            if !asked {
                v.findings.push(Finding {
                    invariant: "e",
                    detail: format!(
                        "`{}` exited unexpectedly ({how}) at {}; its last lines: {}",
                        c.id,
                        rel(*at),
                        c.stderr_tail.join(" | ")
                    ),
                });
            } else if c.killed_ns.is_none() && !c.exit_ok {
                v.findings.push(Finding {
                    invariant: "e",
                    detail: format!(
                        "`{}` exited with {how} after SIGTERM; its last lines: {}",
                        c.id,
                        c.stderr_tail.join(" | ")
                    ),
                });
            }
        }
        if let Some(killed) = c.killed_ns {
            let after: Vec<&Write> = data
                .writes
                .iter()
                .filter(|w| w.request.identity == c.id && w.received_ns > killed + 100_000_000)
                .collect();
            if !after.is_empty() {
                let accepted = after.iter().filter(|w| w.accepted).count();
                v.findings.push(Finding {
                    invariant: "e",
                    detail: format!(
                        "the work of `{}` outlived its SIGKILLed leaderz: {} writes ({accepted} accepted) after the kill at {}, the last at {}",
                        c.id,
                        after.len(),
                        rel(killed),
                        rel(after.last().map_or(0, |w| w.received_ns))
                    ),
                });
            }
        }
    }
    v
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use crate::ledger::WriteRequest;

    const MS: u64 = 1_000_000;

    fn version(
        at_ms: u64,
        rv: u32,
        holder: &str,
        token: i32,
        renew_ms: Option<u64>,
    ) -> LeaseVersion {
        LeaseVersion {
            received_ns: at_ms * MS,
            resource_version: rv.to_string(),
            deleted: false,
            holder: holder.into(),
            transitions: token,
            duration_seconds: Some(3),
            renew_ns: renew_ms.map(|m| i64::try_from(m * MS).unwrap()),
            acquire_ns: None,
        }
    }

    fn write(at_ms: u64, identity: &str, token: i64, accepted: bool) -> Write {
        Write {
            request: WriteRequest {
                resource: "r".into(),
                identity: identity.into(),
                token,
                pid: u32::from(identity.as_bytes()[identity.len() - 1]),
                seq: 0,
                sent_ns: at_ms * MS,
            },
            received_ns: at_ms * MS,
            accepted,
        }
    }

    fn worker(event: &str, at_ms: u64, identity: &str, token: i64) -> WorkerEvent {
        WorkerEvent {
            event: event.into(),
            ts_ns: at_ms * MS,
            identity: identity.into(),
            token,
            pid: u32::from(identity.as_bytes()[identity.len() - 1]),
            pgid: None,
            sent: 0,
        }
    }

    fn candidate(id: &str, rate: f64) -> CandidateRecord {
        CandidateRecord {
            id: id.into(),
            kind: Some(Kind::Leaderz),
            rate,
            spawned_ns: 0,
            ..CandidateRecord::default()
        }
    }

    /// a leads from 1000 ms (renewing at 1000 and 1500), is cut off, stops at `a_stop`; b
    /// takes over at 4600 ms with token 1.
    fn handover(a_stop: u64, a_rate: f64) -> TrialData {
        let mut writes: Vec<Write> = (1010..a_stop)
            .step_by(5)
            .map(|t| write(t, "a", 0, true))
            .collect();
        writes.extend((4610..5000).step_by(5).map(|t| write(t, "b", 1, true)));
        writes.sort_by_key(|w| w.received_ns);
        TrialData {
            timings: Some(Timings::default()),
            history: vec![
                version(1000, 1, "a", 0, Some(1000)),
                version(1500, 2, "a", 0, Some(1500)),
                version(4600, 3, "b", 1, Some(4600)),
            ],
            writes,
            workers: vec![
                worker("started", 1005, "a", 0),
                worker("sigterm", a_stop, "a", 0),
                worker("started", 4605, "b", 1),
            ],
            candidates: vec![candidate("a", a_rate), candidate("b", 1.0)],
            ..TrialData::default()
        }
    }

    #[test]
    fn a_late_looking_stop_across_a_history_gap_is_not_judged_but_one_past_it_is() {
        // a's last seen renewal at 1500 (deadline 3500); the watch lost versions from
        // 1600 to 2000 (a renewal may have landed then): a stop at 3800 is in time
        // against the gap's end.
        let mut data = handover(3800, 1.0);
        data.history_gaps = vec![(1600 * 1_000_000, 2000 * 1_000_000)];
        let v = check(&data);
        assert!(!v.failed(), "{:?}", v.findings);
        assert_eq!(v.figures.unverifiable_stops, 1);
        // Past the gap's end + renew_deadline: a finding still.
        let mut data = handover(4500, 1.0);
        data.history_gaps = vec![(1600 * 1_000_000, 2000 * 1_000_000)];
        let v = check(&data);
        assert!(v.findings.iter().any(|f| f.invariant == "c"), "{v:?}");
        // No gap: the 3800 stop is late.
        let v = check(&handover(3800, 1.0));
        assert!(v.findings.iter().any(|f| f.invariant == "c"), "{v:?}");
    }

    #[test]
    fn a_timely_step_down_passes_and_its_lateness_is_measured() {
        let v = check(&handover(3500, 1.0));
        assert!(!v.failed(), "{:?}", v.findings);
        assert_eq!(v.figures.lateness_ms[0], 0.0);
        assert_eq!(v.figures.terms, 2);
    }

    #[test]
    fn a_late_step_down_fails_c_and_an_overlap_is_found() {
        let v = check(&handover(4800, 1.0));
        let kinds: Vec<&str> = v.findings.iter().map(|f| f.invariant).collect();
        assert!(kinds.contains(&"c"), "{kinds:?}");
        assert!(kinds.contains(&"overlap"), "{kinds:?}");
        assert!(kinds.contains(&"e"), "stale writes accepted: {kinds:?}");
        assert_eq!(v.figures.overlaps, 1);
    }

    #[test]
    fn lateness_is_judged_in_the_candidates_own_clock() {
        // At rate 0.8 its 2 s deadline is 2.5 s of real time after the renewal: on time.
        let mut data = handover(4000, 0.8);
        // Its renewTime is in its own clock: 1500 ms real is 1200 ms there.
        data.history[1].renew_ns = Some(1_200 * 1_000_000);
        let v = check(&data);
        assert!(!v.failed(), "{:?}", v.findings);
        assert!(
            v.figures.lateness_ms[0].abs() < 1.0,
            "{:?}",
            v.figures.lateness_ms
        );
    }

    #[test]
    fn a_token_going_down_or_serving_two_terms_fails_a() {
        let mut data = handover(3500, 1.0);
        data.history[2].transitions = 0;
        data.writes
            .iter_mut()
            .filter(|w| w.request.identity == "b")
            .for_each(|w| w.request.token = 0);
        let v = check(&data);
        assert!(
            v.findings
                .iter()
                .any(|f| f.invariant == "a" && f.detail.contains("second holder"))
        );
        data.history.push(version(5000, 4, "a", -1, Some(5000)));
        let v = check(&data);
        assert!(
            v.findings
                .iter()
                .any(|f| f.invariant == "a" && f.detail.contains("went down"))
        );
    }
}
