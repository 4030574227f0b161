//! `leaderz-controlplane` leaves nothing behind: not when SIGKILLed, not when stopped.

use std::{
    io::{BufRead as _, BufReader},
    path::PathBuf,
    process::{Child, Command, Stdio},
    sync::mpsc,
    thread,
    time::Duration,
};

use anyhow::{Context as _, Result, bail, ensure};

/// Generous: on a machine without the cached binaries, build.sh builds them first.
const STARTUP_TIMEOUT: Duration = Duration::from_secs(30 * 60);
const GONE_TIMEOUT: Duration = Duration::from_secs(10);

/// A server process, identified by pid and start time (pids get reused).
#[derive(Debug, Clone, Copy)]
struct Proc {
    pid: u32,
    start_time: u64,
}

impl Proc {
    fn new(pid: u32) -> Result<Self> {
        let start_time = stat(pid)
            .with_context(|| format!("pid {pid} is not running"))?
            .1;
        Ok(Self { pid, start_time })
    }

    /// Still running: same process, not a zombie (a zombie is dead, awaiting its reaper).
    fn is_running(self) -> bool {
        stat(self.pid).is_some_and(|(state, start)| start == self.start_time && state != 'Z')
    }

    fn cmdline(self) -> String {
        std::fs::read(format!("/proc/{}/cmdline", self.pid))
            .map(|b| String::from_utf8_lossy(&b).replace('\0', " "))
            .unwrap_or_default()
    }
}

/// State and start time from `/proc/<pid>/stat`.
fn stat(pid: u32) -> Option<(char, u64)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let mut fields = stat.rsplit_once(')')?.1.split_whitespace();
    let state = fields.next()?.chars().next()?;
    Some((state, fields.nth(18)?.parse().ok()?))
}

/// The foreground command, started and ready.
struct Foreground {
    child: Child,
    etcd: Proc,
    apiserver: Proc,
    dir: PathBuf,
}

fn start_foreground() -> Result<Foreground> {
    let mut child = Command::new(env!("CARGO_BIN_EXE_leaderz-controlplane"))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()?;
    let stdout = child.stdout.take().context("no stdout")?;
    let (lines, received) = mpsc::channel();
    thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if lines.send(line).is_err() {
                break;
            }
        }
    });
    let mut pids = None;
    let dir = loop {
        let line = match received.recv_timeout(STARTUP_TIMEOUT) {
            Ok(line) => line,
            Err(err) => {
                let _ = child.kill();
                let status = child.wait()?;
                bail!("leaderz-controlplane printed no kubeconfig ({err}; it {status})");
            }
        };
        if let Some(rest) = line.strip_prefix("pids: ") {
            let find = |key: &str| -> Result<u32> {
                rest.split_whitespace()
                    .find_map(|kv| kv.strip_prefix(key))
                    .with_context(|| format!("no {key} in {line:?}"))?
                    .parse()
                    .with_context(|| format!("bad pid in {line:?}"))
            };
            pids = Some((find("etcd=")?, find("kube-apiserver=")?));
        } else if let Some(kubeconfig) = line.strip_prefix("export KUBECONFIG=") {
            break PathBuf::from(kubeconfig)
                .parent()
                .context("kubeconfig without a directory")?
                .to_owned();
        }
    };
    let (etcd, apiserver) = pids.context("no pids line before the kubeconfig line")?;
    let (etcd, apiserver) = (Proc::new(etcd)?, Proc::new(apiserver)?);
    ensure!(etcd.cmdline().contains("etcd"), "{}", etcd.cmdline());
    ensure!(
        apiserver.cmdline().contains("kube-apiserver"),
        "{}",
        apiserver.cmdline()
    );
    ensure!(
        dir.join("kubeconfig").is_file(),
        "{} has no kubeconfig",
        dir.display()
    );
    Ok(Foreground {
        child,
        etcd,
        apiserver,
        dir,
    })
}

/// Polls until the servers are gone and the directory is removed, or fails saying which is
/// not.
fn assert_nothing_left(fg: &Foreground) -> Result<()> {
    let step = Duration::from_millis(100);
    for _ in 0..(GONE_TIMEOUT.as_millis() / step.as_millis()) {
        if !fg.etcd.is_running() && !fg.apiserver.is_running() && !fg.dir.exists() {
            return Ok(());
        }
        thread::sleep(step);
    }
    bail!(
        "after {GONE_TIMEOUT:?}: etcd running={}, kube-apiserver running={}, {} exists={}",
        fg.etcd.is_running(),
        fg.apiserver.is_running(),
        fg.dir.display(),
        fg.dir.exists()
    )
}

#[test]
fn sigkill_of_the_foreground_command_kills_its_servers_and_removes_its_files() -> Result<()> {
    let mut fg = start_foreground()?;
    ensure!(fg.etcd.is_running() && fg.apiserver.is_running());
    fg.child.kill()?; // SIGKILL: no handler, no destructor runs.
    fg.child.wait()?;
    assert_nothing_left(&fg)
}

#[test]
fn sigterm_stops_the_foreground_command_cleanly() -> Result<()> {
    let mut fg = start_foreground()?;
    let kill = Command::new("kill")
        .args(["-TERM", &fg.child.id().to_string()])
        .status()?;
    ensure!(kill.success(), "kill -TERM failed");
    let mut status = None;
    for _ in 0..100 {
        status = fg.child.try_wait()?;
        if status.is_some() {
            break;
        }
        thread::sleep(Duration::from_millis(100));
    }
    let Some(status) = status else {
        fg.child.kill()?;
        bail!("leaderz-controlplane did not exit within 10s of SIGTERM");
    };
    ensure!(
        status.success(),
        "leaderz-controlplane {status} after SIGTERM"
    );
    assert_nothing_left(&fg)
}
