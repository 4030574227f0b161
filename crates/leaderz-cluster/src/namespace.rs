//! The node's namespaces: network, mount and PID, held by an init that dies with this process.
//!
//! `setpriv --pdeathsig SIGKILL -- unshare --net --mount --pid --fork --kill-child
//! --mount-proc -- sh -c <setup; exec pause>`: `unshare` dies with this process (parent-death
//! signal), its child — the init, PID 1 of the new PID namespace — dies with `unshare`
//! (`--kill-child`), and when a PID namespace's init dies the kernel kills every process in
//! it, containerd's double-forked shims and the pods included. Nothing started inside can
//! outlive this process, however it ends.
//!
//! The setup script gives the namespace private `tmpfs` mounts on `/run`, `/var/lib` and
//! `/var/log` (where containerd, the kubelet and CNI write outside their configured
//! directories), brings up `lo` and puts the node's address on it. The host's network
//! (interfaces, routes, iptables, sysctls) is never touched: everything network-related
//! happens in the new network namespace, which has no route out.

use std::{
    ffi::OsString,
    fs,
    net::Ipv4Addr,
    path::{Path, PathBuf},
    process::Stdio,
    time::Duration,
};

use leaderz_testenv::process::{Server, proc_stat};
use tokio::time::Instant;

use crate::error::{Error, Result};

/// Mounted as private `tmpfs` inside the node's mount namespace.
pub(crate) const PRIVATE_DIRS: [&str; 3] = ["/run", "/var/lib", "/var/log"];

const SETUP: &str = r#"set -eu
pause="$1"; ready="$2"; node_ip="$3"; shift 3
for dir in "$@"; do mount -t tmpfs -o mode=0755 leaderz-node "$dir"; done
ip link set lo up
ip addr add "$node_ip/32" dev lo
: > "$ready"
exec "$pause""#;

/// The node's namespaces and their init.
#[derive(Debug)]
pub(crate) struct NodeNamespace {
    /// `unshare` (host PID); killing it kills everything inside.
    unshare: Server,
    /// The init's host PID: the target of `nsenter`.
    init_pid: u32,
    /// `pid:[inode]` of the namespace, to find its processes from the host.
    pid_ns: String,
}

impl NodeNamespace {
    /// Creates the namespaces; returns once the init runs `pause` and the setup is done.
    pub(crate) async fn create(pause: &Path, node_ip: Ipv4Addr, dir: &Path) -> Result<Self> {
        let ready = dir.join("namespace-ready");
        let mut args: Vec<OsString> = [
            "--net",
            "--mount",
            "--pid",
            "--fork",
            "--kill-child",
            "--mount-proc",
            "--propagation",
            "private",
            "--",
            "sh",
            "-c",
            SETUP,
            "leaderz-node-init",
        ]
        .into_iter()
        .map(OsString::from)
        .collect();
        args.push(pause.into());
        args.push(ready.clone().into());
        args.push(node_ip.to_string().into());
        args.extend(PRIVATE_DIRS.map(OsString::from));
        let mut unshare = Server::spawn(
            "node namespace (unshare)",
            Path::new("unshare"),
            args,
            dir.join("namespace.log"),
        )
        .await?;

        let deadline = Instant::now() + Duration::from_secs(10);
        let init_pid = loop {
            if let Err(err) = unshare.check_running() {
                return Err(Error::Component {
                    component: "node namespace (unshare)",
                    problem: err.to_string(),
                    log: unshare.log_path().to_owned(),
                    tail: unshare.log_tail(),
                });
            }
            if ready.exists()
                && let Some(pid) = child_of(unshare.pid())
            {
                break pid;
            }
            if Instant::now() >= deadline {
                return Err(Error::Timeout {
                    what: "setting up the node's namespaces".to_owned(),
                    timeout: Duration::from_secs(10),
                    detail: format!(": {}", unshare.log_tail()),
                });
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        let pid_ns = fs::read_link(format!("/proc/{init_pid}/ns/pid"))
            .map_err(Error::io("reading the node's PID namespace"))?
            .to_string_lossy()
            .into_owned();
        tracing::debug!(init_pid, pid_ns, "node namespaces ready");
        Ok(Self {
            unshare,
            init_pid,
            pid_ns,
        })
    }

    /// The init's host PID.
    pub(crate) fn init_pid(&self) -> u32 {
        self.init_pid
    }

    /// `/proc/<init>/ns/net`: for `setns` into the node's network namespace.
    pub(crate) fn netns_path(&self) -> PathBuf {
        PathBuf::from(format!("/proc/{}/ns/net", self.init_pid))
    }

    /// A path inside the node's mount namespace, as seen from the host
    /// (`/proc/<init>/root/...`).
    pub(crate) fn host_view(&self, path: &str) -> PathBuf {
        PathBuf::from(format!(
            "/proc/{}/root/{}",
            self.init_pid,
            path.trim_start_matches('/')
        ))
    }

    /// The prefix that starts a command inside the node's namespaces, killed if `nsenter`
    /// is: `nsenter --target <init> --net --mount --pid -- setpriv --pdeathsig SIGKILL --`.
    pub(crate) fn enter_prefix(&self) -> Vec<OsString> {
        [
            "nsenter".to_owned(),
            "--target".to_owned(),
            self.init_pid.to_string(),
            "--net".to_owned(),
            "--mount".to_owned(),
            "--pid".to_owned(),
            "--".to_owned(),
            "setpriv".to_owned(),
            "--pdeathsig".to_owned(),
            "SIGKILL".to_owned(),
            "--".to_owned(),
        ]
        .into_iter()
        .map(OsString::from)
        .collect()
    }

    /// Runs `program args` inside the node's namespaces to completion; its stdout on
    /// success.
    pub(crate) async fn run(&self, program: &str, args: &[&str]) -> Result<String> {
        let prefix = self.enter_prefix();
        let output = tokio::process::Command::new(&prefix[0])
            .args(&prefix[1..])
            .arg(program)
            .args(args)
            .stdin(Stdio::null())
            .kill_on_drop(true)
            .output()
            .await
            .map_err(Error::io(format!(
                "running `{program}` in the node (nsenter)"
            )))?;
        if output.status.success() {
            Ok(String::from_utf8_lossy(&output.stdout).into_owned())
        } else {
            Err(Error::Command {
                command: format!("{program} {}", args.join(" ")),
                status: output.status.to_string(),
                stderr: String::from_utf8_lossy(&output.stderr).trim().to_owned(),
            })
        }
    }

    /// Host PIDs of every process in the node's PID namespace or below it (pods), the init
    /// included.
    pub(crate) fn processes(&self) -> Vec<u32> {
        processes_in(&self.pid_ns, self.init_pid)
    }

    /// `pid:[inode]` of the node's PID namespace.
    pub(crate) fn pid_ns(&self) -> &str {
        &self.pid_ns
    }

    /// Kills the init (and so everything inside) and waits until no process of the
    /// namespace is left. Blocks (briefly: the kernel kills them at once).
    pub(crate) fn destroy(&mut self) -> Result<()> {
        self.unshare.stop();
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let left = self.processes();
            if left.is_empty() {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(Error::Timeout {
                    what: "the node's processes to exit".to_owned(),
                    timeout: Duration::from_secs(20),
                    detail: format!(": still running: {left:?}"),
                });
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// The first child of `parent` found in `/proc`.
fn child_of(parent: u32) -> Option<u32> {
    fs::read_dir("/proc")
        .ok()?
        .flatten()
        .filter_map(|entry| entry.file_name().to_str()?.parse::<u32>().ok())
        .find(|&pid| proc_stat(pid).is_some_and(|stat| stat.ppid == parent))
}

/// Host PIDs of the processes in PID namespace `pid_ns` (as `/proc/<pid>/ns/pid` reads) or
/// in namespaces below it, found by ancestry from `init`.
pub(crate) fn processes_in(pid_ns: &str, init: u32) -> Vec<u32> {
    let Ok(entries) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    let all: Vec<(u32, u32)> = entries
        .flatten()
        .filter_map(|entry| entry.file_name().to_str()?.parse::<u32>().ok())
        .filter_map(|pid| proc_stat(pid).map(|stat| (pid, stat.ppid)))
        .collect();
    let in_ns = |pid: u32| {
        fs::read_link(format!("/proc/{pid}/ns/pid")).is_ok_and(|ns| ns.as_os_str() == pid_ns)
    };
    // Pods live in PID namespaces of their own below the node's; they descend from a
    // process of the node's namespace (a shim), so collect by ancestry too.
    let mut found: Vec<u32> = all
        .iter()
        .filter(|(pid, _)| *pid == init || in_ns(*pid))
        .map(|(pid, _)| *pid)
        .collect();
    loop {
        let more: Vec<u32> = all
            .iter()
            .filter(|(pid, ppid)| !found.contains(pid) && found.contains(ppid))
            .map(|(pid, _)| *pid)
            .collect();
        if more.is_empty() {
            break;
        }
        found.extend(more);
    }
    found.sort_unstable();
    found
}
