//! `leaderz-cluster`: the one-node cluster in the foreground.
//!
//! Prints `export KUBECONFIG=...` when ready; Ctrl-C (or SIGTERM) tears it down. Killing
//! this process any other way kills the whole node too (its PID namespace dies with it).

use std::process::ExitCode;

#[tokio::main]
async fn main() -> ExitCode {
    if std::env::args().len() > 1 {
        eprintln!(
            "usage: leaderz-cluster\n\n\
             Starts a one-node Kubernetes cluster in namespaces of its own (needs root,\n\
             containerd, runc, the CNI plugins) and prints `export KUBECONFIG=...`;\n\
             Ctrl-C stops it."
        );
        return ExitCode::from(2);
    }
    match leaderz_cluster::run_foreground().await {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("leaderz-cluster: {}", leaderz_cluster::error_chain(&err));
            ExitCode::FAILURE
        }
    }
}
