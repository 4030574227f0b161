//! The cluster leaves nothing behind, not even when its process is SIGKILLed with pods
//! running: no process (pods, shims, containerd, kubelet, control plane), no namespace,
//! no cgroup, no file; and the host's network and paths were never touched.

#![allow(clippy::unwrap_used)] // tests: a panic is the failure report

use std::{
    io::{BufRead as _, BufReader},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{Mutex, mpsc},
    thread,
    time::Duration,
};

use anyhow::{Context as _, Result, bail, ensure};

/// The first run builds the Go components and the static images.
const STARTUP_TIMEOUT: Duration = Duration::from_secs(40 * 60);
const GONE_TIMEOUT: Duration = Duration::from_secs(20);
/// One cluster at a time in this binary.
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

/// Paths the kubelet, containerd and CNI write to when nothing isolates them.
const HOST_PATHS: [&str; 7] = [
    "/var/lib/kubelet",
    "/var/lib/cni",
    "/var/lib/containerd",
    "/run/containerd",
    "/var/log/containers",
    "/var/log/pods",
    "/var/run/netns",
];

fn skip(test: &str) -> bool {
    match leaderz_cluster::unavailable_reason() {
        Some(reason) if std::env::var(leaderz_cluster::REQUIRE_ENV).as_deref() != Ok("1") => {
            use std::io::Write as _;
            let _ = writeln!(std::io::stderr(), "{test}: SKIPPED: {reason}");
            true
        }
        Some(reason) => panic!("{test}: {}=1 but {reason}", leaderz_cluster::REQUIRE_ENV),
        None => false,
    }
}

/// What the host looks like where the cluster must not leave a mark.
#[derive(Debug, PartialEq)]
struct HostState {
    paths: Vec<(String, bool)>,
    links: String,
    routes: String,
    iptables: String,
    ip_forward: String,
}

fn run(program: &str, args: &[&str]) -> String {
    Command::new(program)
        .args(args)
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default()
}

fn host_state() -> HostState {
    HostState {
        paths: HOST_PATHS
            .iter()
            .map(|p| ((*p).to_owned(), Path::new(p).exists()))
            .collect(),
        links: run("ip", &["-o", "link", "show"]),
        routes: run("ip", &["route", "show", "table", "all"]),
        // Without its "# Generated ... on <date>" comments.
        iptables: run("iptables-save", &[])
            .lines()
            .filter(|l| !l.starts_with('#'))
            .collect::<Vec<_>>()
            .join("\n"),
        ip_forward: std::fs::read_to_string("/proc/sys/net/ipv4/ip_forward").unwrap_or_default(),
    }
}

/// A process, identified by pid and start time (pids get reused).
#[derive(Debug, Clone, Copy)]
struct Proc {
    pid: u32,
    start_time: u64,
}

impl Proc {
    fn is_running(self) -> bool {
        leaderz_testenv::process::proc_stat(self.pid)
            .is_some_and(|s| s.start_time == self.start_time && s.state != 'Z')
    }
}

/// The foreground cluster, started and ready; killed if the test fails half-way.
struct Foreground {
    child: Child,
    init: u32,
    pid_ns: String,
    dirs: Vec<PathBuf>,
    cgroups: Vec<PathBuf>,
    kubeconfig: PathBuf,
}

impl Drop for Foreground {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_foreground() -> Result<Foreground> {
    let mut child = Command::new(env!("CARGO_BIN_EXE_leaderz-cluster"))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()?;
    let stdout = child.stdout.take().context("no stdout")?;
    let (lines, received) = mpsc::channel();
    thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            println!("leaderz-cluster: {line}");
            if lines.send(line).is_err() {
                break;
            }
        }
    });
    let (mut init, mut pid_ns, mut dirs, mut cgroups) = (None, None, Vec::new(), Vec::new());
    let kubeconfig = loop {
        let line = match received.recv_timeout(STARTUP_TIMEOUT) {
            Ok(line) => line,
            Err(err) => {
                let _ = child.kill();
                let status = child.wait()?;
                bail!("leaderz-cluster printed no kubeconfig ({err}; it {status})");
            }
        };
        if let Some(rest) = line.strip_prefix("init: pid ") {
            let (pid, ns) = rest.split_once(", ").context("bad init line")?;
            init = Some(pid.parse::<u32>()?);
            pid_ns = Some(ns.to_owned());
        } else if let Some(dir) = line.strip_prefix("logs: ") {
            dirs.push(PathBuf::from(dir));
        } else if let Some(list) = line.strip_prefix("cgroups: ") {
            cgroups = list.split_whitespace().map(PathBuf::from).collect();
        } else if let Some(path) = line.strip_prefix("export KUBECONFIG=") {
            break PathBuf::from(path);
        }
    };
    dirs.push(kubeconfig.parent().context("kubeconfig dir")?.to_owned());
    Ok(Foreground {
        child,
        init: init.context("no init line")?,
        pid_ns: pid_ns.context("no init line")?,
        dirs,
        cgroups,
        kubeconfig,
    })
}

/// Applies kube/ and waits until 3 pods run, so that shims and pods exist.
fn run_pods(fg: &Foreground) -> Result<()> {
    let kube = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../kube");
    let kubectl = |args: &[&str]| {
        Command::new("kubectl")
            .arg("--kubeconfig")
            .arg(&fg.kubeconfig)
            .args(args)
            .output()
    };
    let out = kubectl(&["apply", "-f", kube.to_str().unwrap()])?;
    ensure!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // `kubectl wait` fails at once if no pod exists yet: wait for the Deployment instead.
    let out = kubectl(&[
        "rollout",
        "status",
        "deployment/leaderz-example",
        "--timeout=120s",
    ])?;
    ensure!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

/// Every process of the node: in its PID namespace or descending from one that is.
fn node_processes(fg: &Foreground) -> Vec<Proc> {
    let init = fg.init;
    let all: Vec<(u32, u32, u64)> = std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter_map(|pid| {
            let stat = leaderz_testenv::process::proc_stat(pid)?;
            Some((pid, stat.ppid, stat.start_time))
        })
        .collect();
    let mut found: Vec<(u32, u64)> = all
        .iter()
        .filter(|(pid, _, _)| {
            *pid == init
                || std::fs::read_link(format!("/proc/{pid}/ns/pid"))
                    .is_ok_and(|ns| ns.to_string_lossy() == fg.pid_ns)
        })
        .map(|(pid, _, start)| (*pid, *start))
        .collect();
    loop {
        let more: Vec<(u32, u64)> = all
            .iter()
            .filter(|(pid, ppid, _)| {
                !found.iter().any(|f| f.0 == *pid) && found.iter().any(|f| f.0 == *ppid)
            })
            .map(|(pid, _, start)| (*pid, *start))
            .collect();
        if more.is_empty() {
            break;
        }
        found.extend(more);
    }
    found
        .into_iter()
        .map(|(pid, start_time)| Proc { pid, start_time })
        .collect()
}

/// Whether any process on the host is in the namespace `ns` (`net:[...]`, `mnt:[...]`).
fn namespace_in_use(kind: &str, ns: &str) -> bool {
    std::fs::read_dir("/proc").unwrap().flatten().any(|e| {
        std::fs::read_link(e.path().join("ns").join(kind))
            .is_ok_and(|link| link.to_string_lossy() == ns)
    })
}

fn assert_nothing_left(
    fg: &Foreground,
    procs: &[Proc],
    namespaces: &[(String, String)],
) -> Result<()> {
    let step = Duration::from_millis(100);
    let mut left = String::new();
    for _ in 0..(GONE_TIMEOUT.as_millis() / step.as_millis()) {
        let running: Vec<u32> = procs
            .iter()
            .filter(|p| p.is_running())
            .map(|p| p.pid)
            .collect();
        let ns: Vec<&String> = namespaces
            .iter()
            .filter(|(kind, ns)| namespace_in_use(kind, ns))
            .map(|(_, ns)| ns)
            .collect();
        let dirs: Vec<&PathBuf> = fg.dirs.iter().filter(|d| d.exists()).collect();
        let cgroups: Vec<&PathBuf> = fg.cgroups.iter().filter(|d| d.exists()).collect();
        if running.is_empty() && ns.is_empty() && dirs.is_empty() && cgroups.is_empty() {
            return Ok(());
        }
        left =
            format!("processes {running:?}, namespaces {ns:?}, dirs {dirs:?}, cgroups {cgroups:?}");
        thread::sleep(step);
    }
    bail!("after {GONE_TIMEOUT:?} still there: {left}")
}

fn check(stop: impl FnOnce(&mut Child) -> Result<()>, test: &str) -> Result<()> {
    let _one = ONE_AT_A_TIME
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let before = host_state();
    let mut fg = start_foreground()?;
    run_pods(&fg)?;
    let procs = node_processes(&fg);
    let names: Vec<String> = procs
        .iter()
        .filter_map(|p| std::fs::read_to_string(format!("/proc/{}/comm", p.pid)).ok())
        .map(|n| n.trim().to_owned())
        .collect();
    for needed in [
        "kubelet",
        "containerd",
        "containerd-shim",
        "leaderz-example",
        "kube-apiserver",
        "etcd",
    ] {
        ensure!(
            names.iter().any(|n| n.starts_with(needed)),
            "no {needed} among the node's processes {names:?}"
        );
    }
    ensure!(!fg.cgroups.is_empty() && fg.cgroups.iter().all(|d| d.exists()));
    let namespaces: Vec<(String, String)> = ["net", "mnt", "pid"]
        .iter()
        .map(|kind| {
            let ns = std::fs::read_link(format!("/proc/{}/ns/{kind}", fg.init))
                .map(|l| l.to_string_lossy().into_owned())
                .unwrap_or_default();
            ((*kind).to_owned(), ns)
        })
        .collect();
    // The host saw nothing of the running cluster: its bridge, routes, iptables rules,
    // sysctls and state directories are all inside the namespaces.
    assert_eq!(host_state(), before, "the running cluster changed the host");
    println!(
        "{test}: {} node processes ({}) ",
        procs.len(),
        names.join(" ")
    );

    stop(&mut fg.child)?;
    assert_nothing_left(&fg, &procs, &namespaces)?;
    assert_eq!(host_state(), before, "the host changed");
    Ok(())
}

#[test]
fn sigkill_of_the_cluster_process_leaves_no_process_namespace_cgroup_or_file() -> Result<()> {
    const TEST: &str = "sigkill_of_the_cluster_process_leaves_nothing";
    if skip(TEST) {
        return Ok(());
    }
    check(
        |child| {
            child.kill()?; // SIGKILL: no handler, no destructor runs.
            child.wait()?;
            Ok(())
        },
        TEST,
    )
}

#[test]
fn sigterm_tears_the_cluster_down_cleanly() -> Result<()> {
    const TEST: &str = "sigterm_tears_the_cluster_down_cleanly";
    if skip(TEST) {
        return Ok(());
    }
    check(
        |child| {
            let kill = Command::new("kill")
                .args(["-TERM", &child.id().to_string()])
                .status()?;
            ensure!(kill.success(), "kill -TERM failed");
            for _ in 0..300 {
                if let Some(status) = child.try_wait()? {
                    ensure!(status.success(), "leaderz-cluster {status} after SIGTERM");
                    return Ok(());
                }
                thread::sleep(Duration::from_millis(100));
            }
            child.kill()?;
            bail!("leaderz-cluster did not exit within 30 s of SIGTERM")
        },
        TEST,
    )
}
