//! What the `leaderz` binary's end-to-end test files share: the short timings and the
//! way a test starts `leaderz` (as a user would: a clean environment, `KUBECONFIG`).

#![allow(dead_code)] // each test file uses its own part

use std::path::Path;
use std::process::Stdio;

use tokio::process::Command;

/// Short timings for tests: 3 s lease, 2 s renew deadline, 500 ms retry period.
pub(crate) const TIMINGS: [&str; 6] = [
    "--lease-duration",
    "3s",
    "--renew-deadline",
    "2s",
    "--retry-period",
    "500ms",
];

/// `leaderz ARGS` with a clean environment (only `PATH`), `kubeconfig`, logs at
/// `log_level`, stdout and stderr piped, killed when dropped.
pub(crate) fn leaderz_with_log(kubeconfig: &Path, args: &[&str], log_level: &str) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_leaderz"));
    cmd.args(args)
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("KUBECONFIG", kubeconfig)
        .env("LEADERZ_LOG_LEVEL", log_level)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    cmd
}

/// [`leaderz_with_log`] at `info`.
pub(crate) fn leaderz(kubeconfig: &Path, args: &[&str]) -> Command {
    leaderz_with_log(kubeconfig, args, "info")
}
