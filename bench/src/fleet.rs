//! Candidate processes: start them, stop them (SIGTERM or SIGKILL), and read their CPU
//! time and memory from `/proc`.

use std::fs::{File, OpenOptions};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, Result};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use tokio::process::{Child, Command};
use tokio::time::{Instant, timeout};

/// How to start candidates of one peer in one namespace: the program and the flags
/// every candidate shares. Their stdout (JSON event lines) and stderr go to log files.
#[derive(Debug, Clone)]
pub(crate) struct Launcher {
    pub(crate) program: PathBuf,
    pub(crate) args: Vec<String>,
    pub(crate) kubeconfig: PathBuf,
    pub(crate) events_log: PathBuf,
    pub(crate) stderr_log: PathBuf,
}

/// One running candidate process.
#[derive(Debug)]
pub(crate) struct Candidate {
    pub(crate) id: String,
    pub(crate) pid: u32,
    child: Child,
}

fn append(path: &Path) -> Result<File> {
    OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .with_context(|| format!("opening {}", path.display()))
}

impl Launcher {
    /// Starts one candidate with identity `id` (`--id id` followed by the shared flags).
    pub(crate) fn spawn(&self, id: &str) -> Result<Candidate> {
        let child = Command::new(&self.program)
            .arg("--id")
            .arg(id)
            .args(&self.args)
            .env("KUBECONFIG", &self.kubeconfig)
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(append(&self.events_log)?)
            .stderr(append(&self.stderr_log)?)
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("starting {}", self.program.display()))?;
        let pid = child.id().context("the candidate exited at once")?;
        Ok(Candidate {
            id: id.to_owned(),
            pid,
            child,
        })
    }
}

/// How a stop went.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Stopped {
    /// From the signal to the process's exit.
    pub(crate) took: Duration,
    /// It did not exit after SIGTERM within the grace and was killed.
    pub(crate) killed: bool,
}

impl Candidate {
    /// Sends `signal` to the process.
    pub(crate) fn signal(&self, signal: Signal) -> Result<()> {
        let pid = i32::try_from(self.pid).context("pid out of range")?;
        kill(Pid::from_raw(pid), signal).with_context(|| format!("{signal} to {}", self.id))
    }

    /// Waits for the process to exit after a signal already sent; SIGKILLs it after
    /// `grace`.
    pub(crate) async fn reap(mut self, sent: Instant, grace: Duration) -> Result<Stopped> {
        let left = grace.saturating_sub(sent.elapsed());
        if timeout(left, self.child.wait()).await.is_ok() {
            return Ok(Stopped {
                took: sent.elapsed(),
                killed: false,
            });
        }
        self.child.start_kill().ok();
        self.child
            .wait()
            .await
            .context("reaping a killed candidate")?;
        Ok(Stopped {
            took: sent.elapsed(),
            killed: true,
        })
    }

    /// SIGTERM, then SIGKILL after `grace`.
    pub(crate) async fn stop(self, grace: Duration) -> Result<Stopped> {
        let sent = Instant::now();
        // Already gone is fine: reaping tells.
        self.signal(Signal::SIGTERM).ok();
        self.reap(sent, grace).await
    }

    /// Whether the process has exited on its own (crashed or gave up).
    pub(crate) fn exited(&mut self) -> Option<String> {
        match self.child.try_wait() {
            Ok(Some(status)) => Some(status.to_string()),
            Ok(None) => None,
            Err(e) => Some(e.to_string()),
        }
    }
}

/// Stops every candidate at once (SIGTERM, SIGKILL after `grace`).
pub(crate) async fn stop_all(candidates: Vec<Candidate>, grace: Duration) -> Result<()> {
    let stops = candidates.into_iter().map(|c| c.stop(grace));
    for stopped in futures::future::join_all(stops).await {
        stopped?;
    }
    Ok(())
}

/// CPU time and memory of one process, from `/proc`.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct ProcSample {
    /// utime + stime, in seconds.
    pub(crate) cpu_secs: f64,
    /// VmRSS in MiB.
    pub(crate) rss_mib: f64,
}

/// Clock ticks per second for `/proc/<pid>/stat` (from `getconf CLK_TCK`, else 100).
pub(crate) fn clock_ticks() -> f64 {
    std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(100.0)
}

/// Reads `pid`'s utime + stime and VmRSS; `None` if it is gone.
pub(crate) fn sample(pid: u32, ticks: f64) -> Option<ProcSample> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name, which is in parentheses and may hold spaces.
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // fields[0] is field 3 (state): utime is field 14, stime field 15.
    let utime: f64 = fields.get(11)?.parse().ok()?;
    let stime: f64 = fields.get(12)?.parse().ok()?;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let rss_kib: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())?;
    Some(ProcSample {
        cpu_secs: schedstat_secs(pid).unwrap_or((utime + stime) / ticks),
        rss_mib: rss_kib / 1024.0,
    })
}

/// Time on CPU of all of `pid`'s threads from `/proc/<pid>/task/*/schedstat` (in ns,
/// so finer than the 10 ms ticks of `stat`; a thread that exits takes its time along,
/// which the candidates' long-lived threads do not).
fn schedstat_secs(pid: u32) -> Option<f64> {
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task")).ok()?;
    let mut total_ns = 0u64;
    let mut any = false;
    for task in tasks.flatten() {
        let Ok(text) = std::fs::read_to_string(task.path().join("schedstat")) else {
            continue;
        };
        if let Some(ns) = text
            .split_whitespace()
            .next()
            .and_then(|v| v.parse::<u64>().ok())
        {
            total_ns += ns;
            any = true;
        }
    }
    any.then(|| total_ns as f64 / 1e9)
}

/// How many established TCP connections `pid` has to `port` on the local machine (its
/// connections to the API server): its socket inodes matched against `/proc/net/tcp{,6}`.
pub(crate) fn api_connections(pid: u32, port: u16) -> Option<usize> {
    let dir = std::fs::read_dir(format!("/proc/{pid}/fd")).ok()?;
    let inodes: std::collections::HashSet<String> = dir
        .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
        .filter_map(|target| {
            let t = target.to_string_lossy();
            Some(t.strip_prefix("socket:[")?.strip_suffix(']')?.to_owned())
        })
        .collect();
    let mut count = 0;
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let Ok(text) = std::fs::read_to_string(table) else {
            continue;
        };
        // "sl local_address rem_address st ... inode": ports in hex, state 01 = ESTABLISHED.
        for line in text.lines().skip(1) {
            let cols: Vec<&str> = line.split_whitespace().collect();
            let Some(remote) = cols.get(2) else { continue };
            let remote_port = remote
                .rsplit(':')
                .next()
                .and_then(|p| u16::from_str_radix(p, 16).ok());
            if remote_port == Some(port)
                && cols.get(3) == Some(&"01")
                && cols.get(9).is_some_and(|i| inodes.contains(*i))
            {
                count += 1;
            }
        }
    }
    Some(count)
}
