//! The control plane in the foreground, for people: `leaderz-controlplane` and the xtask.

use std::time::Duration;

use tokio::signal::unix::{SignalKind, signal};

use crate::{ControlPlane, StartOptions, error::Error, error::Result, process};

/// Starts a control plane, prints how to use it, and runs until Ctrl-C or SIGTERM; then
/// kills the servers and removes the temporary directory.
///
/// Prints to stdout, one fact per line:
///
/// ```text
/// control plane ready in 7.3s at https://127.0.0.1:41234
/// pids: etcd=1234 kube-apiserver=1240
/// rss: etcd=38MiB kube-apiserver=310MiB
/// export KUBECONFIG=/tmp/leaderz-testenv-1230-5f2a9c1e/kubeconfig
/// ```
///
/// Fails if startup fails or a server exits on its own.
///
/// ```no_run
/// # async fn demo() -> leaderz_testenv::Result<()> {
/// leaderz_testenv::run_foreground(leaderz_testenv::StartOptions::default()).await
/// # }
/// ```
pub async fn run_foreground(options: StartOptions) -> Result<()> {
    let mut terminate =
        signal(SignalKind::terminate()).map_err(Error::io("listening for SIGTERM"))?;
    // A signal during startup abandons it; dropping the half-started control plane stops
    // whatever already runs.
    let mut control_plane = tokio::select! {
        started = ControlPlane::start(options) => started?,
        interrupted = tokio::signal::ctrl_c() => {
            eprintln!("interrupted during startup");
            return interrupted.map_err(Error::io("listening for Ctrl-C"));
        }
        _ = terminate.recv() => {
            eprintln!("terminated during startup");
            return Ok(());
        }
    };
    let mib = |pid| process::rss_bytes(pid).map_or("?".to_owned(), |b| format!("{}MiB", b >> 20));
    println!(
        "control plane ready in {:.1}s at {}",
        control_plane.startup_duration().as_secs_f64(),
        control_plane.server_url()
    );
    println!(
        "pids: etcd={} kube-apiserver={}",
        control_plane.etcd_pid(),
        control_plane.apiserver_pid()
    );
    println!(
        "rss: etcd={} kube-apiserver={}",
        mib(control_plane.etcd_pid()),
        mib(control_plane.apiserver_pid())
    );
    println!(
        "export KUBECONFIG={}",
        control_plane.kubeconfig_path().display()
    );
    eprintln!("Ctrl-C stops it.");

    let mut health = tokio::time::interval(Duration::from_secs(1));
    let outcome = loop {
        tokio::select! {
            interrupted = tokio::signal::ctrl_c() => {
                break interrupted.map_err(Error::io("listening for Ctrl-C"));
            }
            _ = terminate.recv() => break Ok(()),
            _ = health.tick() => {
                if let Err(err) = control_plane.check_running() {
                    break Err(err);
                }
            }
        }
    };
    let dir = control_plane.data_dir().to_owned();
    drop(control_plane);
    eprintln!("stopped; removed {}", dir.display());
    outcome
}
