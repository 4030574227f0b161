//! Project chores: `cargo xtask demo` (the README's first command) and
//! `cargo xtask controlplane` (a local kube-apiserver + etcd in the foreground).

mod demo;

use clap::{Parser, Subcommand};

/// leaderz project tasks.
#[derive(Debug, Parser)]
#[command(name = "cargo xtask")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Debug, Subcommand)]
enum Task {
    /// Start a local control plane, run 3 replicas of the example app as the kube/
    /// ServiceAccount, kill the leader and show the failover, then clean up.
    Demo(demo::Options),
    /// Start the local control plane in the foreground and print `export KUBECONFIG=...`;
    /// Ctrl-C stops it.
    Controlplane,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    match Cli::parse().task {
        Task::Demo(options) => demo::run(options).await,
        Task::Controlplane => {
            leaderz_testenv::run_foreground(leaderz_testenv::StartOptions::default()).await?;
            Ok(())
        }
    }
}
