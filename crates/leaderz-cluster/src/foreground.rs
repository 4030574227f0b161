//! The cluster in the foreground, for people: `cargo xtask cluster` and `leaderz-cluster`.

use std::time::Duration;

use tokio::signal::unix::{SignalKind, signal};

use crate::{Cluster, error::Error, error::Result};

/// Starts a cluster, prints how to use it, and runs until Ctrl-C or SIGTERM; then tears it
/// down and says how long that took.
///
/// Prints to stdout, one fact per line:
///
/// ```text
/// cluster ready in 9.8s (Go binaries 0.1s, images 1.2s, start to ready 8.5s)
/// images: docker.io/library/leaderz:0.1.0 localhost/leaderz-pause:0.1.0
/// init: pid 1234, pid:[4026532281]
/// rss: kube-apiserver=262MiB kube-controller=113MiB ...
/// export KUBECONFIG=/tmp/leaderz-testenv-1230-5f2a9c1e/kubeconfig
/// ```
///
/// Killing the process any other way kills the whole node too.
pub async fn run_foreground() -> Result<()> {
    let mut terminate =
        signal(SignalKind::terminate()).map_err(Error::io("listening for SIGTERM"))?;
    let cluster = tokio::select! {
        started = Cluster::start() => started?,
        interrupted = tokio::signal::ctrl_c() => {
            eprintln!("interrupted during startup");
            return interrupted.map_err(Error::io("listening for Ctrl-C"));
        }
        _ = terminate.recv() => {
            eprintln!("terminated during startup");
            return Ok(());
        }
    };
    let t = cluster.timings();
    println!(
        "cluster ready in {:.1}s (Go binaries {:.1}s, images {:.1}s, start to ready {:.1}s)",
        (t.binaries + t.images + t.start_to_ready).as_secs_f64(),
        t.binaries.as_secs_f64(),
        t.images.as_secs_f64(),
        t.start_to_ready.as_secs_f64()
    );
    println!("images: {}", cluster.images().join(" "));
    println!(
        "init: pid {}, {}",
        cluster.init_pid(),
        cluster.pid_namespace()
    );
    println!("rss: {}", rss_line(&cluster));
    println!("logs: {}", cluster.data_dir().display());
    let cgroups: Vec<String> = cluster
        .cgroup_dirs()
        .iter()
        .map(|d| d.display().to_string())
        .collect();
    println!("cgroups: {}", cgroups.join(" "));
    println!("export KUBECONFIG={}", cluster.kubeconfig_path().display());
    eprintln!(
        "Try: kubectl apply -f kube/ && kubectl logs -f -l app.kubernetes.io/name=leaderz-example --prefix\n\
         Ctrl-C stops it."
    );

    let mut health = tokio::time::interval(Duration::from_secs(1));
    let outcome = loop {
        tokio::select! {
            interrupted = tokio::signal::ctrl_c() => {
                break interrupted.map_err(Error::io("listening for Ctrl-C"));
            }
            _ = terminate.recv() => break Ok(()),
            _ = health.tick() => {
                if let Err(err) = cluster.check_components() {
                    break Err(err);
                }
            }
        }
    };
    let took = cluster.stop()?;
    println!("torn down in {:.2}s", took.as_secs_f64());
    outcome
}

/// `name=NMiB` per command name (with a count where several run), largest first, and the
/// total.
pub(crate) fn rss_line(cluster: &Cluster) -> String {
    let report = cluster.memory_report();
    let total: u64 = report.iter().map(|r| r.2).sum();
    let mut parts: Vec<String> = report
        .iter()
        .map(|(name, count, rss)| {
            if *count > 1 {
                format!("{name}(x{count})={}MiB", rss >> 20)
            } else {
                format!("{name}={}MiB", rss >> 20)
            }
        })
        .collect();
    parts.push(format!("total={}MiB", total >> 20));
    parts.join(" ")
}
