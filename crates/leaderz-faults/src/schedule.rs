//! Seeded fault schedules, alone and mixed: trial `i` of seed `s` is always the same
//! schedule, so a soak replays by its seed.

use std::time::Duration;

use rand::rngs::SmallRng;
use rand::{Rng as _, SeedableRng as _};

use crate::check::Timings;
use crate::trial::{CandidateSpec, Fault, Garbage, NetFault, Step, Target, TrialSpec};

/// The seed of trial `index` of a run seeded `seed`.
pub fn trial_seed(seed: u64, index: u64) -> u64 {
    seed ^ index.wrapping_add(1).wrapping_mul(0x9E37_79B9_7F4A_7C15)
}

fn secs(rng: &mut SmallRng, from: f64, to: f64) -> Duration {
    Duration::from_secs_f64(rng.random_range(from..to))
}

/// A clock-skew trial: two leaderz candidates, one under faketime at `rate`; the one on
/// the real clock leads first when `rate > 1` (a fast follower), else the skewed one does
/// (a slow leader). The leader is blackholed for 4 s. `rate` beyond the documented bound
/// (lease_duration / renew_deadline, either way) makes overlaps expected.
pub fn skew_trial(name: &str, rate: f64, timings: Timings) -> TrialSpec {
    let bound = timings.lease_duration.as_secs_f64() / timings.renew_deadline.as_secs_f64();
    let candidates = if rate > 1.0 {
        vec![
            CandidateSpec::leaderz(),
            CandidateSpec::leaderz().rate(rate).after_leader(),
        ]
    } else {
        vec![
            CandidateSpec::leaderz().rate(rate),
            CandidateSpec::leaderz().after_leader(),
        ]
    };
    let mut spec = TrialSpec::new(
        name,
        vec![Step {
            at: Duration::from_millis(300),
            fault: Fault::Net {
                target: Target::Leader,
                fault: NetFault::Blackhole,
                duration: Duration::from_secs(4),
            },
        }],
    );
    spec.candidates = candidates;
    spec.beyond_bound = rate > bound || rate < 1.0 / bound;
    spec
}

/// A follower's watch killed half-open, then the leader stops gracefully 0.5 s after the
/// heal: how soon is the release taken over?
pub fn half_open_trial(name: &str, blackhole: Duration) -> TrialSpec {
    TrialSpec::new(
        name,
        vec![
            Step {
                at: Duration::ZERO,
                fault: Fault::Net {
                    target: Target::Followers,
                    fault: NetFault::HalfOpen,
                    duration: blackhole,
                },
            },
            Step {
                at: blackhole + Duration::from_millis(500),
                fault: Fault::Term {
                    target: Target::Leader,
                },
            },
        ],
    )
}

/// One fault drawn at random; `avoid_restarts` keeps a second control-plane restart out
/// of a trial that has one.
fn random_fault(
    rng: &mut SmallRng,
    timings: Timings,
    allow_restart: bool,
    allow_exit: bool,
) -> Fault {
    let lease = timings.lease_duration.as_secs_f64();
    loop {
        let target = match rng.random_range(0..20) {
            0..12 => Target::Leader,
            12..17 => Target::Follower,
            _ => Target::Followers,
        };
        let pick = rng.random_range(0..13);
        let fault = match pick {
            0 => Fault::Net {
                target,
                fault: NetFault::Blackhole,
                duration: secs(rng, 0.5, 6.0),
            },
            1 => Fault::Net {
                target,
                fault: NetFault::Latency(secs(rng, 0.1, 0.9)),
                duration: secs(rng, 1.0, 5.0),
            },
            2 => Fault::Net {
                target,
                fault: NetFault::Reset,
                duration: secs(rng, 0.2, 3.0),
            },
            3 => Fault::Net {
                target,
                fault: NetFault::HalfOpen,
                duration: secs(rng, 0.5, 4.0),
            },
            4 => Fault::Pause {
                target: if target == Target::Followers {
                    Target::Leader
                } else {
                    target
                },
                duration: secs(rng, lease + 0.3, lease + 2.5),
            },
            5 if allow_exit => Fault::Kill {
                target: if target == Target::Followers {
                    Target::Leader
                } else {
                    target
                },
            },
            6 if allow_exit => Fault::Term {
                target: if target == Target::Followers {
                    Target::Leader
                } else {
                    target
                },
            },
            7 if allow_restart => Fault::ApiserverRestart {
                down: secs(rng, 0.3, 5.0),
            },
            8 if allow_restart => Fault::EtcdRestart {
                down: secs(rng, 0.3, 5.0),
            },
            9 => Fault::DeleteLease,
            10 => Fault::Garbage(match rng.random_range(0..3) {
                0 => Garbage::StrangeHolder,
                1 => Garbage::ReleasedFarFuture,
                _ => Garbage::MaxTransitions,
            }),
            11 => Fault::RevokeRbac {
                duration: secs(rng, 0.5, 6.0),
            },
            12 => Fault::Net {
                target,
                fault: NetFault::Blackhole,
                duration: secs(rng, lease, lease + 3.0),
            },
            _ => continue,
        };
        return fault;
    }
}

/// Trial `index` of the run seeded `seed`: 1 to 3 faults (alone or mixed) on 3 leaderz
/// candidates, on a mixed fleet with client-go candidates (1 in 4), or a clock-skew trial
/// (1 in 10, inside or just beyond the bound).
pub fn random_trial(seed: u64, index: u64, timings: Timings) -> TrialSpec {
    let trial_seed = trial_seed(seed, index);
    let mut rng = SmallRng::seed_from_u64(trial_seed);
    let name = format!("soak-{index}");
    let roll = rng.random_range(0..20);
    let mut spec = if roll < 2 {
        let rate = [1.35, 1.7, 0.75, 0.6][rng.random_range(0..4)];
        skew_trial(&name, rate, timings)
    } else {
        let faults = match rng.random_range(0..10) {
            0..6 => 1,
            6..9 => 2,
            _ => 3,
        };
        let mut steps = Vec::new();
        let mut at = secs(&mut rng, 0.0, 1.0);
        let (mut restarted, mut exited) = (false, false);
        for _ in 0..faults {
            let fault = random_fault(&mut rng, timings, !restarted, !exited);
            restarted |= matches!(
                fault,
                Fault::ApiserverRestart { .. } | Fault::EtcdRestart { .. }
            );
            exited |= matches!(fault, Fault::Kill { .. } | Fault::Term { .. });
            steps.push(Step { at, fault });
            at += secs(&mut rng, 0.2, 4.0);
        }
        let mut spec = TrialSpec::new(&name, steps);
        if roll >= 15 {
            // A mixed fleet: one or two of the three are client-go.
            spec.candidates[2] = CandidateSpec::clientgo();
            if rng.random_bool(0.5) {
                spec.candidates[0] = CandidateSpec::clientgo();
            }
        }
        spec
    };
    spec.seed = trial_seed;
    spec
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedules_replay_by_seed_and_vary_by_index() {
        let t = Timings::default();
        let a = random_trial(42, 7, t).describe();
        assert_eq!(a, random_trial(42, 7, t).describe());
        let distinct: std::collections::HashSet<String> =
            (0..50).map(|i| random_trial(42, i, t).describe()).collect();
        assert!(distinct.len() > 45);
    }

    #[test]
    fn skew_bound_is_lease_over_renew_deadline_both_ways() {
        let t = Timings::default();
        assert!(!skew_trial("x", 1.35, t).beyond_bound);
        assert!(skew_trial("x", 1.7, t).beyond_bound);
        assert!(!skew_trial("x", 0.75, t).beyond_bound);
        assert!(skew_trial("x", 0.6, t).beyond_bound);
    }
}
