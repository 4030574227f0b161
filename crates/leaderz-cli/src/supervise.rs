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
//! - **Threads.** The kernel sends the death signal when the *thread* that started the
//!   supervisor exits, not only the process. `leaderz run` starts it from the main thread,
//!   which lives as long as leaderz (see [`crate::child::Child::spawn`]); should another
//!   thread ever start it, the check of the parent pid turns a thread's exit into a
//!   no-op, and the signal comes again when the process dies.

use std::ffi::OsString;
use std::io::Write;
use std::os::unix::process::CommandExt;

use nix::sys::prctl;
use nix::sys::signal::{Signal, killpg};
use nix::unistd::{Pid, getpgrp, getppid};
use tokio::signal::unix::{SignalKind, signal};

use crate::child::exit_code;
use crate::error::{EXIT_CANNOT_EXECUTE, EXIT_FAILURE, EXIT_USAGE};
use crate::exec::{self, NotRunnable};

/// `argv[1]` of the supervisor mode. Not a subcommand: it is not for people.
pub(crate) const MODE: &str = "__leaderz-supervise";

/// A command that runs `command` (program and arguments) under a supervisor whose
/// parent is this process. The caller puts it in a new process group.
pub(crate) fn command(command: &[OsString]) -> tokio::process::Command {
    // The running executable, even if its file was replaced or deleted since it started.
    let mut std = std::process::Command::new("/proc/self/exe");
    std.arg0("leaderz")
        .arg(MODE)
        .arg(std::process::id().to_string())
        .arg("--")
        .args(command);
    tokio::process::Command::from(std)
}

/// Runs the supervisor on the arguments after [`MODE`]: `PARENT_PID -- PROGRAM ARGS...`.
/// Returns the exit code.
pub(crate) fn main(args: &[OsString]) -> u8 {
    let parsed = match args {
        [parent, dashes, command @ ..] if dashes == "--" && !command.is_empty() => parent
            .to_str()
            .and_then(|p| p.parse::<i32>().ok())
            .map(|p| (Pid::from_raw(p), command)),
        _ => None,
    };
    let Some((parent, command)) = parsed else {
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
    runtime.block_on(supervise(parent, command))
}

async fn supervise(parent: Pid, command: &[OsString]) -> u8 {
    // Handlers first: from here on SIGTERM and SIGINT do not end this process.
    let handlers = signal(SignalKind::terminate()).and_then(|term| {
        let int = signal(SignalKind::interrupt())?;
        Ok((term, int))
    });
    let (mut term, mut int) = match handlers {
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
        }
    }
}

/// SIGKILLs this process's group: the command, what it started, and this process.
fn kill_group() {
    let _ = killpg(getpgrp(), Signal::SIGKILL);
}

/// One line on stderr (leaderz's): best effort, as nobody may be reading any more.
fn say(message: std::fmt::Arguments<'_>) {
    let _ = writeln!(std::io::stderr(), "{message}");
}
