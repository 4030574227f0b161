//! Fault injection for leaderz on real processes: the evidence that its safety promises hold
//! under real faults.
//!
//! - [`proxy`]: a TCP proxy per candidate with switchable faults (blackhole, latency,
//!   resets, half-open heal);
//! - [`ledger`]: the fenced ledger, the judge of overlap;
//! - [`worker`]: the work `leaderz run` supervises (binary `leaderz-faults-worker`);
//! - [`shard_worker`]: the work `leaderz run --shards` supervises
//!   (binary `leaderz-faults-shard-worker`);
//! - [`history`]: the Lease's history, recorded by an admin's watch;
//! - [`check`]: the invariants (a)–(e) of issue 12 and the measured figures;
//! - [`trial`]: one trial (candidates, a fault schedule, recovery, verdict);
//! - [`schedule`]: seeded schedules, alone and mixed, for the soak;
//! - [`report`]: the soak's figures as Markdown.
//!
//! The suite itself is `crates/leaderz-cli/tests/faults.rs` (it needs the `leaderz` binary
//! of the same build).

pub mod check;
pub mod history;
pub mod ledger;
pub mod proxy;
pub mod report;
pub mod schedule;
pub mod shard_worker;
pub mod trial;
pub mod worker;

use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{Context as _, bail};

/// Wall-clock now, Unix ns: the clock every process of a trial shares (workers, ledger,
/// recorder), faketime aside.
pub fn now_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
}

/// The workspace's root directory.
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// `leaderz-faults-worker` next to the running executable (`target/<profile>/`), built
/// with cargo first if it is missing or older than this crate's sources.
pub fn worker_binary() -> anyhow::Result<PathBuf> {
    binary("leaderz-faults-worker")
}

/// `leaderz-faults-shard-worker`, as [`worker_binary`] finds or builds it.
pub fn shard_worker_binary() -> anyhow::Result<PathBuf> {
    binary("leaderz-faults-shard-worker")
}

fn binary(name: &str) -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe()?;
    // target/<profile>/deps/<test> → target/<profile>
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .context("locating the target directory")?
        .to_owned();
    let worker = profile_dir.join(name);
    let built = std::fs::metadata(&worker).and_then(|m| m.modified()).ok();
    let newest_source = newest_mtime(&Path::new(env!("CARGO_MANIFEST_DIR")).join("src"));
    if built.is_some() && built >= newest_source {
        return Ok(worker);
    }
    let mut cargo = std::process::Command::new(std::env::var_os("CARGO").unwrap_or("cargo".into()));
    cargo
        .args(["build", "-p", "leaderz-faults", "--bin", name])
        .current_dir(workspace_root());
    if profile_dir.file_name().is_some_and(|n| n == "release") {
        cargo.arg("--release");
    }
    let status = cargo
        .status()
        .with_context(|| format!("running cargo build for {name}"))?;
    if !status.success() || !worker.is_file() {
        bail!("could not build {name} ({status})");
    }
    Ok(worker)
}

fn newest_mtime(dir: &Path) -> Option<SystemTime> {
    let mut newest = None;
    for entry in std::fs::read_dir(dir).ok()?.flatten() {
        let path = entry.path();
        let t = if path.is_dir() {
            newest_mtime(&path)
        } else {
            entry.metadata().and_then(|m| m.modified()).ok()
        };
        newest = newest.max(t);
    }
    newest
}

/// The client-go candidate, built (once, cached) by `interop/build.sh`.
pub fn clientgo_binary() -> anyhow::Result<PathBuf> {
    let script = workspace_root().join("interop/build.sh");
    let out = std::process::Command::new("bash")
        .arg(&script)
        .stderr(std::process::Stdio::inherit())
        .output()
        .context("running interop/build.sh")?;
    if !out.status.success() {
        bail!("interop/build.sh failed ({})", out.status);
    }
    let path = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    Ok(PathBuf::from(path))
}

/// `libfaketimeMT.so.1` of the Debian package `faketime`, if installed.
pub fn libfaketime() -> Option<PathBuf> {
    [
        "/usr/lib/x86_64-linux-gnu/faketime/libfaketimeMT.so.1",
        "/usr/lib/aarch64-linux-gnu/faketime/libfaketimeMT.so.1",
        "/usr/lib/faketime/libfaketimeMT.so.1",
        "/usr/local/lib/faketime/libfaketimeMT.so.1",
    ]
    .iter()
    .map(PathBuf::from)
    .find(|p| p.is_file())
}
