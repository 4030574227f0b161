//! `leaderz run`: run a command only while leading.
//!
//! The command starts when a term starts and holds the [`Term`] while it runs; the term
//! is dropped only once the command has exited and the rest of its process group has
//! been sent SIGKILL, so the library neither campaigns again nor releases the Lease while
//! any of it may still run. A lost term's command gets SIGTERM, and SIGKILL at the latest
//! shortly before another candidate may take over; if leaderz itself dies, the command's
//! [supervisor](crate::supervise) kills the group.

use std::time::Duration;

use leaderz::Term;
use leaderz::routing::Routed;
use nix::sys::signal::Signal;
use tokio::time::{Instant, sleep_until};
use tracing::{info, warn};

use crate::child::{Child, KillLimit, exit_code};
use crate::cli::RunArgs;
use crate::election::{Election, ElectionInfo};
use crate::error::CliError;
use crate::exec;
use crate::http;
use crate::signals::Signals;
use crate::supervise::WhileStopped;

/// How long after SIGKILL the command may take to be reaped before the library calls its
/// work overdue.
pub(crate) const KILL_SLACK: Duration = Duration::from_secs(5);

/// How long before another candidate may take the lease over a lost term's command gets
/// SIGKILL at the latest (less if the lease duration is barely above the renew deadline).
const TAKEOVER_MARGIN: Duration = Duration::from_millis(500);

/// How long after a lost term's deadline its command may still run.
///
/// The deadline is the term's last successful renewal (its send time) plus the renew
/// deadline; a follower that saw that renewal waits a lease duration from then, so it
/// cannot take over before `deadline + (lease_duration - renew_deadline)` on a clock
/// that runs at ours. SIGKILL comes shortly before that, however long `--grace` is.
pub(crate) fn takeover_slack(lease_duration: Duration, renew_deadline: Duration) -> Duration {
    let gap = lease_duration.saturating_sub(renew_deadline);
    gap - TAKEOVER_MARGIN.min(gap / 2)
}

/// What the supervisor does while leaderz is stopped (SIGSTOP, Ctrl-Z, a debugger).
///
/// The leader renews every renew interval (the retry period unless set), so the last
/// renewal came at most that long before the stop (if renewals were succeeding), and the
/// term's deadline is at least `renew_deadline - renew_interval` after the stop: SIGTERM
/// then, as leaderz would, and
/// SIGKILL `slack` later, before another candidate may take over. The supervisor sees
/// the stop up to 100 ms late, which the takeover margin covers.
pub(crate) fn while_stopped(
    renew_deadline: Duration,
    renew_every: Duration,
    slack: Duration,
) -> WhileStopped {
    let term_after = renew_deadline.saturating_sub(renew_every);
    WhileStopped {
        term_after,
        kill_after: term_after + slack,
    }
}

/// Runs `leaderz run`; returns the exit code.
pub(crate) async fn run(args: RunArgs) -> Result<u8, CliError> {
    if let Some(shards) = args.shards {
        return crate::shards::run(args, shards).await;
    }
    // A command that cannot be executed fails like a shell would, before anything is
    // written (the supervisor checks again when it starts it).
    if let Some(program) = args.command.first() {
        exec::find(program)?;
    }
    let mut signals = Signals::install()?;
    let listener = match &args.http {
        Some(addr) => Some(http::bind(addr).await?),
        None => None,
    };
    // The library warns (and /healthz fails) when a lost term's work outlives this; the
    // command gets `grace` and then SIGKILL, so only a command SIGKILL cannot end does.
    // Pointing traffic away comes after the command stopped, before the release.
    let allowance = crate::election::routing_allowance(&args.routes);
    let overdue = args.grace + KILL_SLACK + allowance;
    let mut election =
        Election::start(&args.election, &args.routes, |c| c.shutdown_grace(overdue)).await?;
    let slack = takeover_slack(args.election.lease_duration, args.election.renew_deadline);
    let while_stopped = while_stopped(
        args.election.renew_deadline,
        args.election
            .renew_interval
            .unwrap_or(args.election.retry_period),
        slack,
    );
    if let Some(listener) = listener {
        http::spawn(listener, http::AppState::for_election(&election));
    }

    loop {
        let term = tokio::select! {
            biased;
            signal = signals.recv() => {
                info!(%signal, "not leading: shutting down");
                election.shutdown().await?;
                return Ok(0);
            }
            term = election.handle.acquired() => match term {
                Ok(term) => term,
                Err(_stopped) => return Err(election.stop_reason().await),
            },
        };

        // On the main thread (this runtime's only one): see `Child::spawn`.
        let env = child_env(&election.info, &term);
        let mut child = match Child::spawn(&args.command, &env, while_stopped) {
            Ok(child) => child,
            Err(e) => {
                drop(term);
                if let Err(shutdown) = election.shutdown().await {
                    warn!(error = %shutdown, "the elector stopped with an error");
                }
                return Err(e);
            }
        };
        info!(
            pid = child.pid(),
            fencing_token = term.fencing_token(),
            "leading: started the command"
        );
        // Traffic to this pod (--label-pod, --leader-endpoints) alongside the command;
        // pointed away once it has stopped, and only then is the term dropped.
        let routed = election.routes.route(&term);

        let token = term.token();
        let limit = KillLimit {
            grace: args.grace,
            term: Some((&term, slack)),
        };
        tokio::select! {
            biased;
            status = child.wait() => {
                child.kill_leftovers();
                let code = exit_code(status);
                info!(code, "the command exited: releasing the lease");
                let away = routes_away(routed, &mut signals, true, allowance).await;
                drop(term);
                if away.written {
                    finish(election).await;
                } else {
                    election.abandon();
                }
                return Ok(code);
            }
            () = token.cancelled() => {
                warn!("lost leadership: stopping the command");
                let (status, signal) = child.stop(Signal::SIGTERM, limit, &mut signals, 0).await;
                // Until traffic points away the process does not campaign again; asked to
                // stop meanwhile, it waits `allowance` more at most.
                let away = routes_away(routed, &mut signals, signal.is_some(), allowance).await;
                drop(term);
                if !away.written {
                    election.abandon();
                    return Ok(exit_code(status));
                }
                if let Some(signal) = signal.or(away.signal) {
                    info!(%signal, "asked to stop while stopping the command: shutting down");
                    finish(election).await;
                    return Ok(exit_code(status));
                }
                if args.exit_on_loss {
                    // A fatal election error (RBAC revoked, ...) says more than "lost".
                    election.shutdown().await?;
                    return Err(CliError::LostLeadership(args.election.lease));
                }
                info!(code = exit_code(status), "the command stopped: campaigning again");
            }
            signal = signals.recv() => {
                info!(%signal, "forwarding to the command, then releasing the lease");
                let (status, _) = child.stop(signal, limit, &mut signals, 1).await;
                let away = routes_away(routed, &mut signals, true, allowance).await;
                drop(term);
                if away.written {
                    finish(election).await;
                } else {
                    election.abandon();
                }
                return Ok(exit_code(status));
            }
        }
    }
}

/// How waiting for traffic to be pointed away ended (see [`routes_away`]).
struct Away {
    /// Whether it was written (the routing task has dropped its term).
    written: bool,
    /// A signal that came meanwhile.
    signal: Option<Signal>,
}

/// Waits for `routed`'s clean-up after the command stopped: while `stopping` (asked to
/// stop, or the command exited) for `allowance` at most, and not past a further SIGTERM
/// or SIGINT; otherwise until written, or until a signal makes it `stopping`. Whatever
/// it returns, the routing task goes on holding its clone of the term until its
/// clean-up is written, so the Lease is not released before that (see
/// [`Election::abandon`] for a clean-up that never gets through).
async fn routes_away(
    routed: Routed,
    signals: &mut Signals,
    stopping: bool,
    allowance: Duration,
) -> Away {
    let finished = routed.finish();
    tokio::pin!(finished);
    let mut deadline = stopping.then(|| Instant::now() + allowance);
    let mut signal = None;
    loop {
        tokio::select! {
            biased;
            () = &mut finished => return Away { written: true, signal },
            () = sleep_until(deadline.unwrap_or_else(Instant::now)), if deadline.is_some() => {
                warn!(?allowance, "traffic was not pointed away in time");
                return Away { written: false, signal };
            }
            s = signals.recv() => {
                if deadline.is_some() {
                    warn!(signal = %s, "asked again to stop: not waiting for traffic to be pointed away");
                    return Away { written: false, signal: signal.or(Some(s)) };
                }
                info!(signal = %s, ?allowance, "asked to stop: waiting at most this long for traffic to be pointed away");
                deadline = Some(Instant::now() + allowance);
                signal = Some(s);
            }
        }
    }
}

/// Shuts the election down (releasing the Lease if still held) after the command has
/// stopped; the command's exit code wins over an elector error, which is logged.
async fn finish(election: Election) {
    if let Err(e) = election.shutdown().await {
        warn!(error = %e, "the elector stopped with an error");
    }
}

/// The command's extra environment: who leads what, and the term's fencing token.
fn child_env(info: &ElectionInfo, term: &Term) -> Vec<(&'static str, String)> {
    vec![
        ("LEADERZ_IDENTITY", term.identity().to_owned()),
        ("LEADERZ_LEASE", info.lease.clone()),
        ("LEADERZ_NAMESPACE", info.namespace.clone()),
        ("LEADERZ_FENCING_TOKEN", term.fencing_token().to_string()),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lost_command_is_killed_shortly_before_a_takeover() {
        let s = |lease, renew| {
            takeover_slack(Duration::from_millis(lease), Duration::from_millis(renew))
        };
        // client-go's defaults: followers may take over 5 s after the deadline.
        assert_eq!(s(15_000, 10_000), Duration::from_millis(4_500));
        assert_eq!(s(3_000, 2_000), Duration::from_millis(500));
        // A thin margin is halved rather than used up.
        assert_eq!(s(3_000, 2_900), Duration::from_millis(50));
        assert_eq!(s(3_000, 3_000), Duration::ZERO);
    }

    #[test]
    fn a_stopped_leaderz_has_its_command_stopped_as_it_would_have() {
        let ms = Duration::from_millis;
        let w = while_stopped(ms(10_000), ms(2_000), ms(4_500));
        assert_eq!((w.term_after, w.kill_after), (ms(8_000), ms(12_500)));
        let w = while_stopped(ms(2_000), ms(500), ms(500));
        assert_eq!((w.term_after, w.kill_after), (ms(1_500), ms(2_000)));
    }
}
