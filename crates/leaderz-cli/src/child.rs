//! The command `leaderz run` supervises: started in a process group of its own, signalled
//! as a group, and its exit status mapped to an exit code.

use std::ffi::{OsStr, OsString};
use std::os::unix::process::ExitStatusExt;
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use leaderz::Term;
use nix::errno::Errno;
use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use tokio::process::Command;
use tokio::time::{Instant, sleep_until};
use tracing::{info, warn};

use crate::error::CliError;
use crate::signals::Signals;
use crate::supervise::{self, WhileStopped};
use crate::text::printable;

/// A running command, leader of its own process group.
#[derive(Debug)]
pub(crate) struct Child {
    inner: tokio::process::Child,
    /// The process group: the child's pid (it leads the group).
    group: Pid,
    program: String,
    /// Whether the child has been reaped (its pid may then be reused).
    reaped: bool,
}

/// When a command being stopped gets SIGKILL.
#[derive(Clone, Copy, Debug)]
pub(crate) struct KillLimit<'a> {
    /// How long after the first signal (`--grace`).
    pub(crate) grace: Duration,
    /// The term the command works for, and how long after the term's
    /// [deadline](Term::deadline) the command may still run once the term has ended:
    /// SIGKILL comes then even if the grace period lasts longer.
    pub(crate) term: Option<(&'a Term, Duration)>,
}

impl KillLimit<'_> {
    /// Just the grace period.
    #[cfg(test)]
    fn grace(grace: Duration) -> Self {
        Self { grace, term: None }
    }

    /// When to send SIGKILL given the end of the grace period, and whether that is
    /// earlier than the grace period (the term ended).
    fn kill_at(&self, grace_end: Instant) -> (Instant, bool) {
        match self.term {
            Some((term, slack)) if !term.is_active() => {
                let cap = term.deadline() + slack;
                if cap < grace_end {
                    (cap, true)
                } else {
                    (grace_end, false)
                }
            }
            _ => (grace_end, false),
        }
    }

    /// Completes when the term ends (never if there is none, or it has ended).
    async fn term_ends(&self) {
        match self.term {
            Some((term, _)) if term.is_active() => term.cancelled().await,
            _ => std::future::pending().await,
        }
    }
}

impl Child {
    /// Starts `command` (program and arguments) under a [supervisor](crate::supervise)
    /// that leads a new process group and kills it if leaderz dies (and acts as
    /// `while_stopped` says if leaderz is stopped); `env` is added to
    /// leaderz's environment; stdin, stdout and stderr are inherited. The pid (and
    /// process group) of the result is the supervisor's; its exit code is the command's.
    ///
    /// Call it on the main thread: the supervisor is told when the thread that started
    /// it exits, and `leaderz` runs its single-threaded runtime on the main thread,
    /// which lives as long as the process.
    pub(crate) fn spawn(
        command: &[OsString],
        env: &[(&str, String)],
        while_stopped: WhileStopped,
    ) -> Result<Self, CliError> {
        let program = command
            .first()
            .ok_or_else(|| CliError::Usage("no command given after `--`".into()))?;
        Self::start(supervise::command(command, while_stopped), program, env)
    }

    /// Starts `command` itself, without a supervisor (for tests of the signalling,
    /// which cannot start the `leaderz` executable).
    #[cfg(test)]
    fn spawn_unsupervised(command: &[OsString], env: &[(&str, String)]) -> Self {
        let mut cmd = Command::new(&command[0]);
        cmd.args(&command[1..]);
        Self::start(cmd, &command[0], env).unwrap()
    }

    fn start(mut cmd: Command, program: &OsStr, env: &[(&str, String)]) -> Result<Self, CliError> {
        let name = program.to_string_lossy().into_owned();
        cmd.envs(env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::inherit())
            .process_group(0)
            // A safety net if leaderz unwinds: Drop also kills the whole group.
            .kill_on_drop(true);
        let inner = cmd.spawn().map_err(|cause| CliError::Spawn {
            program: name.clone(),
            cause,
        })?;
        let pid = inner.id().and_then(|id| i32::try_from(id).ok());
        let Some(pid) = pid else {
            return Err(CliError::Io(format!(
                "`{}` exited before it could be supervised",
                printable(&name)
            )));
        };
        Ok(Self {
            inner,
            group: Pid::from_raw(pid),
            program: name,
            reaped: false,
        })
    }

    /// The child's pid (also its process group id).
    pub(crate) fn pid(&self) -> i32 {
        self.group.as_raw()
    }

    /// Waits for the child to exit and reaps it.
    pub(crate) async fn wait(&mut self) -> ExitStatus {
        let status = match self.inner.wait().await {
            Ok(status) => status,
            Err(e) => {
                // Cannot happen for a child we spawned; make sure it is gone anyway.
                warn!(error = %e, program = %self.program, "cannot wait for the command; killing it");
                self.signal(Signal::SIGKILL);
                ExitStatus::from_raw(Signal::SIGKILL as i32)
            }
        };
        self.reaped = true;
        status
    }

    /// Sends `signal` to the child's process group. A group that is already gone is fine.
    pub(crate) fn signal(&self, signal: Signal) {
        match killpg(self.group, signal) {
            Ok(()) | Err(Errno::ESRCH) => {}
            Err(e) => warn!(error = %e, %signal, "cannot signal the command's process group"),
        }
    }

    /// Stops the command: `first` to its group, then SIGKILL when `limit` says (or at
    /// once on a further SIGTERM/SIGINT to leaderz, if `signals_seen` already counts
    /// one). Returns its exit status and the first signal leaderz received meanwhile, if
    /// any. When it returns, the child has exited and the rest of its group has been sent
    /// SIGKILL.
    pub(crate) async fn stop(
        &mut self,
        first: Signal,
        limit: KillLimit<'_>,
        signals: &mut Signals,
        mut signals_seen: usize,
    ) -> (ExitStatus, Option<Signal>) {
        info!(signal = %first, pid = self.pid(), grace = ?limit.grace, "stopping the command");
        self.signal(first);
        let grace_end = Instant::now() + limit.grace;
        let mut received = None;
        let status = loop {
            let (kill_at, early) = limit.kill_at(grace_end);
            tokio::select! {
                biased;
                status = self.wait() => break status,
                () = sleep_until(kill_at) => {
                    if early {
                        warn!(
                            grace = ?limit.grace,
                            "the command has not exited and another candidate may soon take the lease over: sending SIGKILL before the grace period ends"
                        );
                    } else {
                        warn!(grace = ?limit.grace, "the command did not exit within the grace period: sending SIGKILL");
                    }
                    self.signal(Signal::SIGKILL);
                    break self.wait().await;
                }
                // The term ended meanwhile: the limit may have moved closer.
                () = limit.term_ends() => {}
                signal = signals.recv() => {
                    received.get_or_insert(signal);
                    signals_seen += 1;
                    if signals_seen > 1 {
                        warn!(%signal, "asked again to stop: sending SIGKILL");
                        self.signal(Signal::SIGKILL);
                        break self.wait().await;
                    }
                }
            }
        };
        self.kill_leftovers();
        (status, received)
    }

    /// After the child exited: kills whatever it left running in its process group, so no
    /// work of the term outlives it.
    ///
    /// The group id is the dead child's pid. Linux does not reuse a pid while a process
    /// group of that id has members, so this reaches only the child's group, unless the
    /// group was empty and the pid was reused in the microseconds since the child was
    /// reaped (a pid wrap-around).
    pub(crate) fn kill_leftovers(&self) {
        if killpg(self.group, Signal::SIGKILL).is_ok() {
            warn!(
                pgid = self.pid(),
                "sent SIGKILL to processes the command left in its process group"
            );
        }
    }
}

impl Drop for Child {
    fn drop(&mut self) {
        if !self.reaped {
            self.signal(Signal::SIGKILL);
        }
    }
}

/// The exit code for a child's exit status, as shells report it: its code, or 128+N
/// if signal N killed it.
pub(crate) fn exit_code(status: ExitStatus) -> u8 {
    if let Some(code) = status.code() {
        return u8::try_from(code & 0xff).unwrap_or(1);
    }
    match status.signal() {
        Some(signal) => u8::try_from(128 + signal).unwrap_or(255),
        None => 1,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_codes_as_shells_report_them() {
        // Raw wait statuses: code << 8 for an exit, the signal number for a kill.
        assert_eq!(exit_code(ExitStatus::from_raw(0)), 0);
        assert_eq!(exit_code(ExitStatus::from_raw(3 << 8)), 3);
        assert_eq!(exit_code(ExitStatus::from_raw(255 << 8)), 255);
        assert_eq!(exit_code(ExitStatus::from_raw(15)), 143);
        assert_eq!(exit_code(ExitStatus::from_raw(9)), 137);
        assert_eq!(exit_code(ExitStatus::from_raw(2)), 130);
    }

    #[tokio::test]
    async fn child_gets_env_and_its_code_is_kept() {
        let cmd =
            ["sh", "-c", "test \"$LEADERZ_FENCING_TOKEN\" = 7 && exit 42"].map(OsString::from);
        let mut child = Child::spawn_unsupervised(&cmd, &[("LEADERZ_FENCING_TOKEN", "7".into())]);
        assert_eq!(exit_code(child.wait().await), 42);
    }

    #[tokio::test]
    async fn stop_signals_the_whole_group_and_kills_after_grace() {
        let mut signals = Signals::install().unwrap();
        // The shell ignores SIGTERM; its background sleep is in the same group.
        let cmd = ["sh", "-c", "trap '' TERM; sleep 30 & wait"].map(OsString::from);
        let mut child = Child::spawn_unsupervised(&cmd, &[]);
        tokio::time::sleep(Duration::from_millis(200)).await;
        let group = child.group;
        let (status, received) = child
            .stop(
                Signal::SIGTERM,
                KillLimit::grace(Duration::from_millis(300)),
                &mut signals,
                0,
            )
            .await;
        assert_eq!(exit_code(status), 137);
        assert_eq!(received, None);
        // Nothing is left running in the group (the orphaned sleep may linger as a
        // zombie until init reaps it).
        assert!(live_members(group.as_raw()).is_empty());
    }

    /// Pids of the processes in group `pgid` that are not zombies, from /proc.
    fn live_members(pgid: i32) -> Vec<i32> {
        let mut out = Vec::new();
        for entry in std::fs::read_dir("/proc").unwrap().flatten() {
            let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
                continue;
            };
            // pid (comm) state ppid pgrp ...; comm may contain spaces.
            let Some(rest) = stat.rsplit_once(')').map(|(_, r)| r) else {
                continue;
            };
            let fields: Vec<&str> = rest.split_whitespace().collect();
            if fields.get(2) == Some(&pgid.to_string().as_str()) && fields[0] != "Z" {
                out.push(entry.file_name().to_string_lossy().parse().unwrap_or(0));
            }
        }
        out
    }

    #[tokio::test]
    async fn a_child_that_handles_sigterm_exits_with_its_own_code() {
        let mut signals = Signals::install().unwrap();
        let cmd = [
            "sh",
            "-c",
            "trap 'exit 7' TERM; while :; do sleep 0.05; done",
        ]
        .map(OsString::from);
        let mut child = Child::spawn_unsupervised(&cmd, &[]);
        tokio::time::sleep(Duration::from_millis(200)).await;
        let (status, _) = child
            .stop(
                Signal::SIGTERM,
                KillLimit::grace(Duration::from_secs(10)),
                &mut signals,
                0,
            )
            .await;
        assert_eq!(exit_code(status), 7);
    }
}
