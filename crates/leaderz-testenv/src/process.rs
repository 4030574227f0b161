//! Server processes that cannot outlive the test process, their data directory, and its sweep.
//!
//! Public so that harnesses built on this crate (the one-node cluster in `leaderz-cluster`)
//! supervise their processes the same way.
//!
//! Three mechanisms, each covering what the others cannot:
//! - Every server is started as `setpriv --pdeathsig SIGKILL -- <binary>`, so the kernel
//!   kills it when its parent dies, however the parent dies (panic, abort, SIGKILL). The
//!   parent-death signal fires when the *thread* that forked the child exits, so all servers
//!   are forked by one spawner thread that lives as long as the process.
//! - A small `sh` [`Cleaner`] reads a pipe whose write end only this process holds; when the
//!   process is gone the read sees end-of-file and the cleaner removes what it was given
//!   (the data directory; the cluster's cgroups). That covers the shared control plane,
//!   which lives in a `static` and is never dropped.
//! - At startup, directories of earlier runs whose owner is dead are swept, in case a
//!   cleaner was killed too.

use std::{
    ffi::OsString,
    fs::{self, File},
    io,
    os::unix::process::CommandExt as _,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{Mutex, PoisonError, mpsc},
    thread,
};

use tokio::sync::oneshot;

use crate::error::{Error, Result};

/// Data directories are `$TMPDIR/<prefix><pid>-<random>`; the control plane's prefix.
pub(crate) const DIR_PREFIX: &str = "leaderz-testenv-";
/// Holds `<pid> <start time>` of the owning process, to tell a reused pid from the owner.
const OWNER_FILE: &str = "owner";

/// A request to the spawner thread.
struct SpawnRequest {
    command: Command,
    reply: oneshot::Sender<io::Result<Child>>,
}

/// Spawns `command` from the process-long spawner thread (see the module docs).
async fn spawn_from_spawner_thread(command: Command) -> io::Result<Child> {
    static SPAWNER: Mutex<Option<mpsc::Sender<SpawnRequest>>> = Mutex::new(None);

    let sender = {
        let mut spawner = SPAWNER.lock().unwrap_or_else(PoisonError::into_inner);
        match &*spawner {
            Some(sender) => sender.clone(),
            None => {
                let (sender, requests) = mpsc::channel::<SpawnRequest>();
                // The sender lives in a static, so `requests` never ends and this thread
                // blocks in `recv` for the rest of the process: children's parent-death
                // signal is tied to this thread's exit.
                thread::Builder::new()
                    .name("leaderz-testenv-spawner".to_owned())
                    .spawn(move || {
                        for SpawnRequest { mut command, reply } in requests {
                            // If the requester gave up meanwhile, nobody else would stop
                            // the child.
                            if let Err(Ok(mut child)) = reply.send(command.spawn()) {
                                let _ = child.kill();
                                let _ = child.wait();
                            }
                        }
                    })?;
                *spawner = Some(sender.clone());
                sender
            }
        }
    };
    let (reply, answer) = oneshot::channel();
    let gone = || io::Error::other("the leaderz-testenv spawner thread is gone");
    sender
        .send(SpawnRequest { command, reply })
        .map_err(|_| gone())?;
    answer.await.map_err(|_| gone())?
}

/// A running server process (etcd, kube-apiserver, a node component), with its output in a
/// log file, killed when this process dies (see the module docs) or when dropped.
#[derive(Debug)]
pub struct Server {
    name: &'static str,
    child: Child,
    log: PathBuf,
    stopped: bool,
    /// How it was started, to start it again the same way ([`Server::respawn`]).
    prefix: Vec<OsString>,
    binary: PathBuf,
    args: Vec<OsString>,
}

impl Server {
    /// Starts `binary args` with stdout and stderr in `log`, killed when this process dies.
    pub async fn spawn(
        name: &'static str,
        binary: &Path,
        args: Vec<OsString>,
        log: PathBuf,
    ) -> Result<Self> {
        Self::spawn_with_prefix(name, &[], binary, args, log).await
    }

    /// Like [`spawn`](Self::spawn), with `prefix` run first: `setpriv --pdeathsig SIGKILL --
    /// <prefix...> <binary> <args...>`. The prefix must exec or supervise the rest so that
    /// killing it kills the server, e.g. `nsenter --target <pid> --net --mount --pid --
    /// setpriv --pdeathsig SIGKILL --` to start the server inside another process's
    /// namespaces.
    pub async fn spawn_with_prefix(
        name: &'static str,
        prefix: &[OsString],
        binary: &Path,
        args: Vec<OsString>,
        log: PathBuf,
    ) -> Result<Self> {
        let out = File::create(&log).map_err(Error::io(format!("creating {}", log.display())))?;
        let child = spawn_server(name, prefix, binary, &args, out).await?;
        Ok(Self {
            name,
            child,
            log,
            stopped: false,
            prefix: prefix.to_vec(),
            binary: binary.to_owned(),
            args,
        })
    }

    /// Starts the process again with the same prefix, binary, arguments and log file
    /// (appended to), after [`stop`](Self::stop). Does nothing if it is running.
    pub async fn respawn(&mut self) -> Result<()> {
        if !self.stopped {
            return Ok(());
        }
        let out = fs::OpenOptions::new()
            .append(true)
            .open(&self.log)
            .map_err(Error::io(format!("opening {}", self.log.display())))?;
        self.child = spawn_server(self.name, &self.prefix, &self.binary, &self.args, out).await?;
        self.stopped = false;
        Ok(())
    }

    /// The process id of the process started (the prefix's, if there is one).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Fails with [`Error::Exited`] if the process has exited.
    pub fn check_running(&mut self) -> Result<()> {
        let status = match self.child.try_wait() {
            Ok(None) => return Ok(()),
            Ok(Some(status)) => status.to_string(),
            Err(err) => format!("its status is unknown: {err}"),
        };
        Err(Error::Exited {
            component: self.name,
            status,
            log: self.log.clone(),
            tail: self.log_tail(),
        })
    }

    /// The last lines of the log.
    pub fn log_tail(&self) -> String {
        log_tail(&self.log, 40)
    }

    /// The log file.
    pub fn log_path(&self) -> &Path {
        &self.log
    }

    /// The name it was started with, e.g. `etcd`.
    pub fn name(&self) -> &'static str {
        self.name
    }

    /// Whether [`stop`](Self::stop) was called since it was last started.
    pub fn is_stopped(&self) -> bool {
        self.stopped
    }

    /// Kills the process and reaps it. Idempotent.
    pub fn stop(&mut self) {
        if std::mem::replace(&mut self.stopped, true) {
            return;
        }
        // Fails only if it was reaped already; either way it is gone after `wait`.
        let _ = self.child.kill();
        let _ = self.child.wait();
        tracing::debug!(name = self.name, pid = self.child.id(), "stopped");
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Starts `<prefix...> binary args` under a parent-death signal with stdout and stderr
/// in `out`.
async fn spawn_server(
    name: &'static str,
    prefix: &[OsString],
    binary: &Path,
    args: &[OsString],
    out: File,
) -> Result<Child> {
    let err = out
        .try_clone()
        .map_err(Error::io(format!("opening the log of {name}")))?;
    let mut command = Command::new("setpriv");
    command
        .args(["--pdeathsig", "SIGKILL", "--"])
        .args(prefix)
        .arg(binary)
        .args(args)
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        // Its own process group: a Ctrl-C in the terminal goes to the foreground
        // command, which then stops the servers in order.
        .process_group(0);
    let child = spawn_from_spawner_thread(command)
        .await
        .map_err(|source| Error::Io {
            context: format!(
                "starting {name} through `setpriv` (from util-linux; install it if it is missing)"
            ),
            source,
        })?;
    tracing::debug!(name, pid = child.id(), "started");
    Ok(child)
}

/// A temporary directory (certificates, etcd's data, kubeconfigs, logs) that does not
/// outlive this process.
///
/// Removed on drop, and by a [`Cleaner`] when this process dies without dropping it, and
/// failing that by the next run's sweep.
#[derive(Debug)]
pub struct DataDir {
    path: PathBuf,
    cleaner: Option<Cleaner>,
}

impl DataDir {
    /// Creates `$TMPDIR/<prefix><pid>-<random>`, first sweeping the directories with the
    /// same prefix of dead earlier runs. `prefix` ends with `-` by convention, e.g.
    /// `leaderz-testenv-`.
    pub fn create(prefix: &str) -> Result<Self> {
        sweep_stale_dirs(&std::env::temp_dir(), prefix);
        let pid = std::process::id();
        let path = loop {
            let path =
                std::env::temp_dir().join(format!("{prefix}{pid}-{:08x}", rand::random::<u32>()));
            match fs::create_dir(&path) {
                Ok(()) => break path,
                Err(err) if err.kind() == io::ErrorKind::AlreadyExists => continue,
                Err(err) => {
                    return Err(Error::io(format!("creating {}", path.display()))(err));
                }
            }
        };
        let mut dir = Self {
            path,
            cleaner: None,
        };
        let start_time = proc_stat(pid).map_or(0, |stat| stat.start_time);
        dir.write(OWNER_FILE, format!("{pid} {start_time}\n"))?;
        dir.cleaner = Some(dir.spawn_cleaner()?);
        Ok(dir)
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Writes `contents` to `name` inside the directory, readable by the owner only.
    pub fn write(&self, name: &str, contents: impl AsRef<[u8]>) -> Result<PathBuf> {
        let path = self.path.join(name);
        write_private(&path, contents.as_ref())?;
        Ok(path)
    }

    /// A [`Cleaner`] that waits a moment for the servers' parent-death signal, then removes
    /// the directory.
    fn spawn_cleaner(&self) -> Result<Cleaner> {
        Cleaner::spawn(
            "leaderz-testenv-cleaner",
            r#"sleep 1
rm -rf -- "$1" 2>/dev/null || { sleep 2; rm -rf -- "$1"; }"#,
            &[self.path.as_os_str().to_owned()],
        )
    }
}

impl Drop for DataDir {
    fn drop(&mut self) {
        if let Err(err) = fs::remove_dir_all(&self.path) {
            tracing::warn!(dir = %self.path.display(), %err, "could not remove the data directory");
        }
        if let Some(cleaner) = self.cleaner.take() {
            cleaner.disarm();
        }
    }
}

/// An `sh` script that runs once this process is gone, however it ends: it first reads a
/// pipe whose write end only this process holds, and end-of-file means the process died.
///
/// For what must not outlive a test process but is not a process: directories, cgroups.
/// [`disarm`](Self::disarm) it once the normal teardown has done the work.
#[derive(Debug)]
pub struct Cleaner {
    child: Child,
}

impl Cleaner {
    /// Starts `sh -c '<wait for end-of-file>; <script>' <name> <args...>`: in `script`,
    /// `$1`... are `args`. `name` is what `ps` shows for it.
    pub fn spawn(name: &str, script: &str, args: &[OsString]) -> Result<Self> {
        let script = format!("while read -r _; do :; done\n{script}");
        let child = Command::new("sh")
            .arg("-c")
            .arg(script)
            .arg(name)
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .process_group(0)
            .spawn()
            .map_err(Error::io(format!("starting the cleaner `{name}` (`sh`)")))?;
        Ok(Self { child })
    }

    /// Stops the cleaner without running its script.
    pub fn disarm(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Writes a file readable by its owner only (it may hold private keys).
pub fn write_private(path: &Path, contents: &[u8]) -> Result<()> {
    use std::{io::Write as _, os::unix::fs::OpenOptionsExt as _};
    let context = || format!("writing {}", path.display());
    fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .and_then(|mut file| file.write_all(contents))
        .map_err(|source| Error::Io {
            context: context(),
            source,
        })
}

/// Removes data directories `<prefix><pid>-...` under `tmp` whose owning process is gone.
fn sweep_stale_dirs(tmp: &Path, prefix: &str) {
    let Ok(entries) = fs::read_dir(tmp) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(pid) = name
            .to_str()
            .and_then(|name| name.strip_prefix(prefix))
            .and_then(|rest| rest.split('-').next())
            .and_then(|pid| pid.parse::<u32>().ok())
        else {
            continue;
        };
        let path = entry.path();
        if !owner_is_alive(&path, pid) {
            match fs::remove_dir_all(&path) {
                Ok(()) => tracing::debug!(dir = %path.display(), "swept a stale data directory"),
                Err(err) => {
                    tracing::debug!(dir = %path.display(), %err, "could not sweep a stale data directory");
                }
            }
        }
    }
}

/// Whether the process that created `dir` (named after `pid`) still runs. When unsure
/// (the directory is being created right now), says yes.
fn owner_is_alive(dir: &Path, pid: u32) -> bool {
    let Some(stat) = proc_stat(pid) else {
        return false;
    };
    if stat.state == 'Z' {
        return false;
    }
    let Ok(owner) = fs::read_to_string(dir.join(OWNER_FILE)) else {
        return true;
    };
    let recorded = owner
        .split_whitespace()
        .nth(1)
        .and_then(|t| t.parse::<u64>().ok());
    // A different start time means the pid was reused by an unrelated process.
    recorded.is_none_or(|t| t == stat.start_time)
}

/// The fields of `/proc/<pid>/stat` this crate needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct ProcStat {
    /// `R`, `S`, `D`, `Z`, ...
    pub state: char,
    /// The parent's process id.
    pub ppid: u32,
    /// Start time in clock ticks after boot: with the pid, identifies a process.
    pub start_time: u64,
}

/// Reads `/proc/<pid>/stat`; `None` if there is no such process.
pub fn proc_stat(pid: u32) -> Option<ProcStat> {
    parse_proc_stat(&fs::read_to_string(format!("/proc/{pid}/stat")).ok()?)
}

fn parse_proc_stat(stat: &str) -> Option<ProcStat> {
    // `pid (comm) state ppid ...`; comm may hold spaces and parentheses, so split at the
    // last `)`. After it, field 3 (state) is first, field 4 (ppid) second and field 22
    // (starttime) 20th.
    let (_, rest) = stat.rsplit_once(')')?;
    let mut fields = rest.split_whitespace();
    let state = fields.next()?.chars().next()?;
    let ppid = fields.next()?.parse().ok()?;
    let start_time = fields.nth(17)?.parse().ok()?;
    Some(ProcStat {
        state,
        ppid,
        start_time,
    })
}

/// Resident set size of `pid` in bytes, from `/proc/<pid>/status`.
pub fn rss_bytes(pid: u32) -> Option<u64> {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kib: u64 = status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    Some(kib * 1024)
}

/// `n` distinct free TCP ports on 127.0.0.1. Another process may take one before the
/// server binds it; the caller retries on "address already in use".
pub(crate) fn free_ports(n: usize) -> Result<Vec<u16>> {
    let listeners = (0..n)
        .map(|_| std::net::TcpListener::bind(("127.0.0.1", 0)))
        .collect::<io::Result<Vec<_>>>()
        .map_err(Error::io("choosing free ports on 127.0.0.1"))?;
    listeners
        .iter()
        .map(|l| l.local_addr().map(|a| a.port()))
        .collect::<io::Result<_>>()
        .map_err(Error::io("choosing free ports on 127.0.0.1"))
}

/// The last `lines` lines of a log file (or why it cannot be read).
pub fn log_tail(path: &Path, lines: usize) -> String {
    match fs::read(path) {
        Ok(bytes) => {
            let text = String::from_utf8_lossy(&bytes);
            let all: Vec<&str> = text.lines().collect();
            all[all.len().saturating_sub(lines)..].join("\n")
        }
        Err(err) => format!("(cannot read {}: {err})", path.display()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_proc_stat_with_awkward_command_names() {
        let line = "4242 (a (b) c) S 1 4242 4242 0 -1 4194560 100 0 0 0 1 2 0 0 20 0 1 0 \
                    98765 1000 50 18446744073709551615";
        assert_eq!(
            parse_proc_stat(line),
            Some(ProcStat {
                state: 'S',
                ppid: 1,
                start_time: 98765
            })
        );
        assert_eq!(parse_proc_stat("garbage"), None);
    }

    #[test]
    fn own_process_is_alive_and_has_rss() {
        let me = std::process::id();
        assert!(proc_stat(me).is_some_and(|s| s.state != 'Z'));
        assert!(rss_bytes(me).is_some_and(|rss| rss > 0));
    }

    #[test]
    fn sweep_removes_dirs_of_dead_or_reused_pids_only() {
        let tmp = std::env::temp_dir().join(format!("leaderz-sweep-test-{}", std::process::id()));
        fs::create_dir_all(&tmp).unwrap();
        let me = std::process::id();
        let my_start = proc_stat(me).unwrap().start_time;
        // pid_max is at most 2^22, so this pid cannot exist.
        let dead = tmp.join(format!("{DIR_PREFIX}4294967295-00000001"));
        let reused = tmp.join(format!("{DIR_PREFIX}{me}-00000002"));
        let alive = tmp.join(format!("{DIR_PREFIX}{me}-00000003"));
        let unrelated = tmp.join("something-else-1");
        for d in [&dead, &reused, &alive, &unrelated] {
            fs::create_dir_all(d).unwrap();
        }
        fs::write(reused.join(OWNER_FILE), format!("{me} {}\n", my_start + 1)).unwrap();
        fs::write(alive.join(OWNER_FILE), format!("{me} {my_start}\n")).unwrap();

        sweep_stale_dirs(&tmp, DIR_PREFIX);

        assert!(!dead.exists());
        assert!(!reused.exists());
        assert!(alive.exists());
        assert!(unrelated.exists());
        fs::remove_dir_all(&tmp).unwrap();
    }

    #[test]
    fn log_tail_keeps_the_last_lines() {
        let path = std::env::temp_dir().join(format!("leaderz-tail-test-{}", std::process::id()));
        fs::write(&path, "1\n2\n3\n4\n").unwrap();
        assert_eq!(log_tail(&path, 2), "3\n4");
        assert_eq!(log_tail(&path, 10), "1\n2\n3\n4");
        fs::remove_file(&path).unwrap();
        assert!(log_tail(&path, 2).starts_with("(cannot read"));
    }

    #[test]
    fn free_ports_are_distinct() {
        let ports = free_ports(3).unwrap();
        assert_eq!(ports.len(), 3);
        assert!(ports[0] != ports[1] && ports[1] != ports[2] && ports[0] != ports[2]);
    }
}
