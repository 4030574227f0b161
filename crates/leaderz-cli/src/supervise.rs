//! The supervisor between `leaderz run` and its command: it makes the command's whole
//! process group die with leaderz, even when leaderz is SIGKILLed (the OOM killer kills
//! just the one process).
//!
//! `leaderz run` starts its own executable (`/proc/self/exe`) in this hidden mode as the
//! leader of a new process group; the supervisor starts the command in that group, waits
//! for it and exits with its code (128+N if signal N killed it, as shells report it).
//!
//! - **Parent death.** The supervisor asks the kernel for SIGTERM when its parent dies
//!   (`PR_SET_PDEATHSIG`, a safe call), then checks that its parent is still the leaderz
//!   that started it, closing the race in which leaderz died before the request. When
//!   SIGTERM comes and its parent is gone, it SIGKILLs its process group: the command and
//!   everything the command started there.
//! - **Other SIGTERMs.** leaderz stops the command by signalling the group, supervisor
//!   included; the supervisor outlives SIGTERM and SIGINT (the command got them too) and
//!   exits once the command has, with the command's code. A SIGKILL of the group ends it
//!   along with the command.
//! - **Why not `exec` the command after the request.** The death signal would then reach
//!   only the command itself, not what it started: a wrapper script that runs its worker
//!   without `exec` would leave the worker running. The request is also dropped when a
//!   set-user-ID program is executed. Killing the group needs a process that survives the
//!   signal and outlives leaderz; this is it.
//! - **A stopped leaderz.** SIGSTOP, Ctrl-Z (SIGTSTP reaches leaderz's process group,
//!   not the command's) or a debugger stop leaderz, which then can neither renew nor stop
//!   the command. The supervisor looks every 100 ms; once leaderz has been stopped for
//!   as long as leaderz would still have led (it assumes the last renewal came at most a
//!   retry period before the stop, which holds while renewals succeed), it SIGTERMs the
//!   group, and SIGKILLs it before another candidate may take over; see
//!   [`crate::run`]. When leaderz continues it finds the command exited.
//! - **Threads.** The kernel sends the death signal when the *thread* that started the
//!   supervisor exits, not only the process. `leaderz run` starts it from the main thread,
//!   which lives as long as leaderz (see [`crate::child::Child::spawn`]); should another
//!   thread ever start it, the check of the parent pid turns a thread's exit into a
//!   no-op, and the signal comes again when the process dies.

use std::ffi::OsString;
use std::io::Write;
use std::os::unix::process::CommandExt;
use std::time::Duration;

use nix::sys::prctl;
use nix::sys::signal::{Signal, killpg};
use nix::unistd::{Pid, getpgrp, getppid};
use tokio::signal::unix::{SignalKind, signal};
use tokio::time::{Instant, MissedTickBehavior, interval};

use crate::child::exit_code;
use crate::error::{EXIT_CANNOT_EXECUTE, EXIT_FAILURE, EXIT_USAGE};
use crate::exec::{self, NotRunnable};

/// `argv[1]` of the supervisor mode. Not a subcommand: it is not for people.
pub(crate) const MODE: &str = "__leaderz-supervise";

/// How often the supervisor looks whether leaderz is stopped.
const STOPPED_POLL: Duration = Duration::from_millis(100);

/// What the supervisor does while leaderz is stopped (SIGSTOP, Ctrl-Z, a debugger), when
/// leaderz can neither renew nor stop the command: what leaderz would have done.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct WhileStopped {
    /// SIGTERM to the group once leaderz has been seen stopped this long.
    pub(crate) term_after: Duration,
    /// SIGKILL to the group once leaderz has been seen stopped this long.
    pub(crate) kill_after: Duration,
}

/// A command that runs `command` (program and arguments) under a supervisor whose
/// parent is this process. The caller puts it in a new process group.
pub(crate) fn command(command: &[OsString], stopped: WhileStopped) -> tokio::process::Command {
    // The running executable, even if its file was replaced or deleted since it started.
    let mut std = std::process::Command::new("/proc/self/exe");
    std.arg0("leaderz")
        .arg(MODE)
        .arg(std::process::id().to_string())
        .arg(stopped.term_after.as_millis().to_string())
        .arg(stopped.kill_after.as_millis().to_string())
        .arg("--")
        .args(command);
    tokio::process::Command::from(std)
}

/// Runs the supervisor on the arguments after [`MODE`]:
/// `PARENT_PID TERM_AFTER_MS KILL_AFTER_MS -- PROGRAM ARGS...`. Returns the exit code.
pub(crate) fn main(args: &[OsString]) -> u8 {
    let number = |s: &OsString| s.to_str().and_then(|s| s.parse::<u64>().ok());
    let parsed = match args {
        [parent, term, kill, dashes, command @ ..] if dashes == "--" && !command.is_empty() => {
            match (
                number(parent).and_then(|p| i32::try_from(p).ok()),
                number(term),
                number(kill),
            ) {
                (Some(parent), Some(term), Some(kill)) => Some((
                    Pid::from_raw(parent),
                    WhileStopped {
                        term_after: Duration::from_millis(term),
                        kill_after: Duration::from_millis(kill),
                    },
                    command,
                )),
                _ => None,
            }
        }
        _ => None,
    };
    let Some((parent, stopped, command)) = parsed else {
        say(format_args!(
            "error: `leaderz {MODE}` is started by `leaderz run`, not by hand"
        ));
        return EXIT_USAGE;
    };
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            say(format_args!(
                "error: leaderz cannot supervise the command: {e}"
            ));
            return EXIT_CANNOT_EXECUTE;
        }
    };
    runtime.block_on(supervise(parent, stopped, command))
}

async fn supervise(parent: Pid, while_stopped: WhileStopped, command: &[OsString]) -> u8 {
    // Handlers first: from here on SIGTERM and SIGINT do not end this process, nor does
    // SIGHUP (`run --shards` tells the command's group that its shards changed). A
    // handler, not SIG_IGN: an ignored signal stays ignored in the command after exec.
    let handlers = signal(SignalKind::terminate()).and_then(|term| {
        let int = signal(SignalKind::interrupt())?;
        let hup = signal(SignalKind::hangup())?;
        Ok((term, int, hup))
    });
    let (mut term, mut int, mut hup) = match handlers {
        Ok(handlers) => handlers,
        Err(e) => {
            say(format_args!(
                "error: leaderz cannot supervise the command: cannot handle signals: {e}"
            ));
            return EXIT_CANNOT_EXECUTE;
        }
    };
    if let Err(e) = prctl::set_pdeathsig(Signal::SIGTERM) {
        say(format_args!(
            "error: leaderz cannot make the command die with it: prctl(PR_SET_PDEATHSIG): {e}"
        ));
        return EXIT_CANNOT_EXECUTE;
    }
    if getppid() != parent {
        // leaderz died before the request above: nobody would stop the command.
        say(format_args!(
            "leaderz exited before the command started; not starting it"
        ));
        return EXIT_FAILURE;
    }

    let (program, args) = (&command[0], &command[1..]);
    // Checked by leaderz before it campaigned; checked again, for a shell's message and
    // exit code if the file went away or changed while leaderz waited to lead.
    let path = match exec::find(program) {
        Ok(path) => path,
        Err(e) => {
            say(format_args!("error: {e}"));
            return e.exit_code();
        }
    };
    let mut child = tokio::process::Command::new(path);
    child.arg0(program).args(args);
    let mut child = match child.spawn() {
        Ok(child) => child,
        Err(e) => {
            let e = NotRunnable::spawn_failed(program, e);
            say(format_args!("error: {e}"));
            return e.exit_code();
        }
    };
    let mut poll = interval(STOPPED_POLL);
    poll.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut stopped_since: Option<Instant> = None;
    let mut terminated = false;
    loop {
        tokio::select! {
            status = child.wait() => {
                return match status {
                    Ok(status) => exit_code(status),
                    Err(e) => {
                        say(format_args!("error: leaderz cannot wait for the command: {e}"));
                        kill_group();
                        EXIT_FAILURE
                    }
                };
            }
            Some(()) = term.recv() => {
                if getppid() != parent {
                    say(format_args!(
                        "leaderz has exited: killing the command's process group"
                    ));
                    kill_group();
                }
                // Otherwise leaderz signalled the group: the command has it too.
            }
            Some(()) = int.recv() => {}
            Some(()) = hup.recv() => {}
            _ = poll.tick() => {
                if !is_stopped(parent) {
                    stopped_since = None;
                    terminated = false;
                    continue;
                }
                let stopped = stopped_since.get_or_insert_with(Instant::now).elapsed();
                if stopped >= while_stopped.kill_after {
                    say(format_args!(
                        "leaderz has been stopped for {stopped:?} and cannot stop the command: killing its process group"
                    ));
                    kill_group();
                } else if stopped >= while_stopped.term_after && !terminated {
                    say(format_args!(
                        "leaderz has been stopped for {stopped:?}; its term is ending: sending SIGTERM to the command's process group"
                    ));
                    terminated = true;
                    let _ = killpg(getpgrp(), Signal::SIGTERM);
                }
            }
        }
    }
}

/// Whether `pid` is stopped (by a signal or a tracer), from `/proc/PID/stat`.
fn is_stopped(pid: Pid) -> bool {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    // pid (comm) state ...; comm may contain spaces and parentheses.
    stat.rsplit_once(')')
        .and_then(|(_, rest)| rest.split_whitespace().next())
        .is_some_and(|state| matches!(state, "T" | "t"))
}

/// SIGKILLs this process's group: the command, what it started, and this process.
fn kill_group() {
    let _ = killpg(getpgrp(), Signal::SIGKILL);
}

/// One line on stderr (leaderz's): best effort, as nobody may be reading any more.
fn say(message: std::fmt::Arguments<'_>) {
    let _ = writeln!(std::io::stderr(), "{message}");
}
