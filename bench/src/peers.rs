//! The peers under test: what each is, how its candidate program is built, and what
//! each could and could not do with the benchmark's timings (LD 3 s, RD 2 s, RP 500 ms).

use std::path::{Path, PathBuf};
use std::process::Stdio;

use anyhow::{Context, Result, bail};

/// The timings every candidate is given (each peer uses what its crate allows).
pub(crate) const TIMING_FLAGS: [&str; 6] = [
    "--lease-duration",
    "3s",
    "--renew-deadline",
    "2s",
    "--retry-period",
    "500ms",
];

/// The lease duration subtracted from failover times (every peer writes 3 s).
pub(crate) const LEASE_DURATION_SECS: f64 = 3.0;

/// How a peer's candidate program is obtained.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Source {
    /// `leaderz-candidate` of the `leaderz-interop` package in this workspace.
    Leaderz,
    /// `interop/build.sh` (client-go tools/leaderelection, cached Go build).
    ClientGo,
    /// A crate under `bench/peers/<dir>` (its own workspace and target directory).
    Crate(&'static str),
}

/// One peer's fixed description.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Spec {
    pub(crate) name: &'static str,
    pub(crate) source: Source,
    /// The crate (or module) whose version is reported, as named in its lockfile.
    pub(crate) package: &'static str,
    /// The Lease must exist before the candidates start (kubert).
    pub(crate) needs_lease: bool,
    /// The timings it actually runs with.
    pub(crate) timings: &'static str,
    /// How it stops on SIGTERM.
    pub(crate) release: &'static str,
    /// How followers learn that the lease is free.
    pub(crate) followers: &'static str,
}

/// Every peer, leaderz first.
pub(crate) const SPECS: [Spec; 6] = [
    Spec {
        name: "leaderz",
        source: Source::Leaderz,
        package: "leaderz",
        needs_lease: false,
        timings: "LD 3 s, RD 2 s, RP 500 ms",
        release: "stops the work, then releases (holder \"\")",
        followers: "single-object watch; act on a release at once, on expiry at the instant",
    },
    Spec {
        name: "client-go",
        source: Source::ClientGo,
        package: "k8s.io/client-go",
        needs_lease: false,
        timings: "LD 3 s, RD 2 s, RP 500 ms",
        release: "ReleaseOnCancel: holder \"\", duration 1 s",
        followers: "poll (GET) every 0.5-1.1 s (RP x jitter 1.2)",
    },
    Spec {
        name: "kube-lease-manager",
        source: Source::Crate("kube-lease-manager"),
        package: "kube-lease-manager",
        needs_lease: false,
        timings: "duration 3 s, grace 2 s: renews every 1 s (whole seconds only)",
        release: "closing its watch channel releases (holder null)",
        followers: "sleep until renewTime + duration (their wall clock), then GET",
    },
    Spec {
        name: "kube-leader-election",
        source: Source::Crate("kube-leader-election"),
        package: "kube-leader-election",
        needs_lease: false,
        timings: "TTL 3 s; our loop calls try_acquire_or_renew every 500 ms, renew deadline 2 s",
        release: "step_down (holder \"\", duration 1 s)",
        followers: "GET every 500 ms (the crate has no loop: the app polls)",
    },
    Spec {
        name: "kube-coordinate",
        source: Source::Crate("kube-coordinate"),
        package: "kube-coordinate",
        needs_lease: false,
        timings: "LD 3 s, RD 2 s, RP 1 s (durations must be >= 1 s); the leader renews every RD, RP only paces retries after errors",
        release: "none: shutdown stops the task, the lease expires",
        followers: "watch (kube-runtime watcher); try LD + 0-1.2 x LD (jitter) after the last change seen",
    },
    Spec {
        name: "kubert-lease",
        source: Source::Crate("kubert-lease"),
        package: "kubert",
        needs_lease: true,
        timings: "LD 3 s, renew grace 2.5 s: renews every 500 ms",
        release: "dropping the receiver vacates (holder null)",
        followers: "sleep until renewTime + LD (their wall clock), then write",
    },
];

/// A peer whose candidate program is ready.
#[derive(Debug, Clone)]
pub(crate) struct Peer {
    pub(crate) spec: Spec,
    pub(crate) program: PathBuf,
}

/// Paths the benchmark needs.
#[derive(Debug, Clone)]
pub(crate) struct Paths {
    /// The workspace root.
    pub(crate) root: PathBuf,
    /// `bench/`.
    pub(crate) bench: PathBuf,
    /// The workspace's release output directory (`target/release`).
    pub(crate) release_dir: PathBuf,
    /// Where build logs go.
    pub(crate) logs: PathBuf,
}

impl Paths {
    /// From this crate's manifest directory and the running executable.
    pub(crate) fn discover(logs: PathBuf) -> Result<Self> {
        let bench = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
        let root = bench
            .parent()
            .context("bench/ has no parent directory")?
            .to_path_buf();
        let exe = std::env::current_exe().context("locating the running executable")?;
        let profile_dir = exe.parent().context("the executable has no directory")?;
        let target = profile_dir
            .parent()
            .context("the executable is not in a target directory")?;
        Ok(Self {
            root,
            bench,
            release_dir: target.join("release"),
            logs,
        })
    }
}

fn cargo() -> String {
    std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned())
}

/// Runs `command`, its output into `log`; fails with the log's tail.
fn run_logged(mut command: std::process::Command, log: &Path, what: &str) -> Result<String> {
    let output = command
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running {what}"))?;
    let mut text = String::from_utf8_lossy(&output.stderr).into_owned();
    text.push_str(&String::from_utf8_lossy(&output.stdout));
    std::fs::write(log, &text).with_context(|| format!("writing {}", log.display()))?;
    if !output.status.success() {
        let tail: Vec<&str> = text.lines().rev().take(15).collect();
        let tail: Vec<&str> = tail.into_iter().rev().collect();
        bail!(
            "{what} failed ({}), log {}:\n{}",
            output.status,
            log.display(),
            tail.join("\n")
        );
    }
    Ok(String::from_utf8_lossy(&output.stdout).trim().to_owned())
}

/// Builds this workspace's release binaries the benchmark runs: `leaderz-candidate`
/// and `leaderz-many`.
pub(crate) fn build_workspace_bins(paths: &Paths) -> Result<()> {
    let mut command = std::process::Command::new(cargo());
    command.current_dir(&paths.root).args([
        "build",
        "--release",
        "-p",
        "leaderz-interop",
        "--bin",
        "leaderz-candidate",
        "-p",
        "leaderz-bench",
        "--bin",
        "leaderz-many",
        "-p",
        "leaderz-cli",
        "--bin",
        "leaderz",
    ]);
    run_logged(
        command,
        &paths.logs.join("build-leaderz.log"),
        "cargo build (leaderz)",
    )?;
    Ok(())
}

/// Builds `leaderz-candidate` and `leaderz` as the image ships them: static
/// (`+crt-static` on the gnu target), same release profile. Returns their directory.
pub(crate) fn build_static_bins(paths: &Paths) -> Result<PathBuf> {
    let target = "x86_64-unknown-linux-gnu";
    let mut command = std::process::Command::new(cargo());
    command
        .current_dir(&paths.root)
        .args(["build", "--release", "--target", target])
        .args(["-p", "leaderz-interop", "--bin", "leaderz-candidate"])
        .args(["-p", "leaderz-cli", "--bin", "leaderz"])
        .env("RUSTFLAGS", "-C target-feature=+crt-static")
        .env_remove("CARGO_ENCODED_RUSTFLAGS");
    run_logged(
        command,
        &paths.logs.join("build-leaderz-static.log"),
        "cargo build (leaderz, static)",
    )?;
    let dir = paths
        .release_dir
        .parent()
        .context("no target directory")?
        .join(target)
        .join("release");
    Ok(dir)
}

/// Runs a cached-Go-build script (`interop/build.sh`, `bench/build-go.sh`) and returns
/// the path it prints.
pub(crate) fn build_go(paths: &Paths, script: &Path, log_name: &str) -> Result<PathBuf> {
    let mut command = std::process::Command::new("bash");
    command.arg(script);
    let out = run_logged(
        command,
        &paths.logs.join(log_name),
        &script.display().to_string(),
    )?;
    Ok(PathBuf::from(out))
}

/// Builds (or finds, if up to date) the candidate program of `spec`.
pub(crate) fn build(paths: &Paths, spec: &Spec) -> Result<PathBuf> {
    match spec.source {
        Source::Leaderz => {
            let program = paths.release_dir.join("leaderz-candidate");
            if !program.exists() {
                bail!("{} is missing after the build", program.display());
            }
            Ok(program)
        }
        Source::ClientGo => build_go(
            paths,
            &paths.root.join("interop/build.sh"),
            "build-client-go.log",
        ),
        Source::Crate(dir) => {
            let manifest = paths.bench.join("peers").join(dir).join("Cargo.toml");
            let mut command = std::process::Command::new(cargo());
            command
                .args(["build", "--release", "--manifest-path"])
                .arg(&manifest)
                // Each peer is its own workspace with its own target/ (gitignored).
                .env_remove("CARGO_TARGET_DIR");
            run_logged(
                command,
                &paths.logs.join(format!("build-{dir}.log")),
                &format!("cargo build ({dir})"),
            )?;
            let program = paths
                .bench
                .join("peers")
                .join(dir)
                .join("target/release")
                .join(format!("peer-{dir}"));
            if !program.exists() {
                bail!("{} is missing after the build", program.display());
            }
            Ok(program)
        }
    }
}

/// The version of `package` in the lockfile that builds `spec`'s program, with the
/// kube version beside it, e.g. `0.13.1 (kube 5.0.0)`.
pub(crate) fn versions(paths: &Paths, spec: &Spec) -> String {
    match spec.source {
        Source::ClientGo => {
            let go_mod =
                std::fs::read_to_string(paths.root.join("interop/clientgo-candidate/go.mod"))
                    .unwrap_or_default();
            go_mod
                .lines()
                .find_map(|l| l.trim().strip_prefix("k8s.io/client-go "))
                .map(|v| v.trim().to_owned())
                .unwrap_or_else(|| "?".to_owned())
        }
        Source::Leaderz => {
            let lock = paths.root.join("Cargo.lock");
            format!(
                "{} (kube {})",
                locked(&lock, "leaderz").unwrap_or_else(|| "?".to_owned()),
                locked(&lock, "kube").unwrap_or_else(|| "?".to_owned())
            )
        }
        Source::Crate(dir) => {
            let lock = paths.bench.join("peers").join(dir).join("Cargo.lock");
            format!(
                "{} (kube {})",
                locked(&lock, spec.package).unwrap_or_else(|| "?".to_owned()),
                locked(&lock, "kube-client").unwrap_or_else(|| "?".to_owned())
            )
        }
    }
}

/// The version of `package` in Cargo lockfile `lock` (the first, if several).
fn locked(lock: &Path, package: &str) -> Option<String> {
    let text = std::fs::read_to_string(lock).ok()?;
    let needle = format!("name = \"{package}\"");
    let mut lines = text.lines();
    while let Some(line) = lines.next() {
        if line.trim() == needle {
            let version = lines.next()?.trim().strip_prefix("version = \"")?;
            return Some(version.trim_end_matches('"').to_owned());
        }
    }
    None
}
