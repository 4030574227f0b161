//! Project chores: `cargo xtask demo` (the README's first command), `cargo xtask cluster`
//! (a one-node Kubernetes cluster in the foreground) and `cargo xtask controlplane` (a
//! local kube-apiserver + etcd in the foreground).

mod demo;
mod pods;

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
    /// The story on real pods: a one-node cluster, `kubectl apply -f kube/`, delete the
    /// leader pod, crash the next one; then clean up. Where pods cannot run (not root, no
    /// containerd), the same story with local processes, and one line saying why.
    Demo(demo::Options),
    /// Start a one-node Kubernetes cluster (in namespaces of its own; needs root and
    /// containerd), load the images, print `export KUBECONFIG=...`; Ctrl-C stops it.
    Cluster,
    /// Build the static binaries and write the OCI image archives (the app image and the
    /// sandbox image) into target/leaderz-images/, for `ctr images import`.
    Images,
    /// Start the local control plane in the foreground and print `export KUBECONFIG=...`;
    /// Ctrl-C stops it.
    Controlplane,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    match Cli::parse().task {
        Task::Demo(options) => {
            let why_not = if options.local {
                Some("--local".to_owned())
            } else {
                leaderz_cluster::unavailable_reason()
            };
            match why_not {
                None => pods::run(options).await,
                Some(reason) => {
                    println!("demo: running the replicas as local processes, not pods ({reason})");
                    demo::run(options).await
                }
            }
        }
        Task::Cluster => Ok(leaderz_cluster::run_foreground().await?),
        Task::Images => {
            let prepared = leaderz_cluster::prepare().await?;
            for archive in &prepared.archives {
                println!("{}", archive.display());
            }
            eprintln!(
                "images written in {:.1}s (Go binaries {:.1}s)",
                prepared.images.as_secs_f64(),
                prepared.binaries.as_secs_f64()
            );
            Ok(())
        }
        Task::Controlplane => {
            leaderz_testenv::run_foreground(leaderz_testenv::StartOptions::default()).await?;
            Ok(())
        }
    }
}
