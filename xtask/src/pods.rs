//! The demo on real pods: the original write-up's story on a one-node cluster started
//! here (leaderz-cluster): `kubectl apply -f kube/`, 3/3 ready, `kubectl describe lease
//! my-lock` names a pod, the pods' logs, `kubectl delete pod <leader>` (the kubelet sends
//! SIGTERM, the pod stops its work and releases, another leads within milliseconds), and a
//! `kill -9` of the leader's container (takeover after the lease duration).

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context as _, bail};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Pod;
use kube::Api;
use leaderz_cluster::{
    Cluster,
    observe::{LeaseWatch, PodLogs},
};
use tokio::io::{AsyncBufReadExt as _, BufReader};
use tokio::time::{Instant, sleep};

use crate::demo::{Options, describe, step, workspace_root};

const NAMESPACE: &str = "default";
const LEASE: &str = "my-lock";
const SELECTOR: &str = "app.kubernetes.io/name=leaderz-example";
/// The example app's default lease duration (kube/deployment.yaml does not set one).
const LEASE_DURATION: Duration = Duration::from_secs(15);

pub(crate) async fn run(options: Options) -> anyhow::Result<()> {
    let started = Instant::now();
    step(
        "starting a one-node Kubernetes cluster in namespaces of its own (the first run builds the Go components and the static images: minutes, once)",
    );
    let cluster = Cluster::start().await.context("starting the cluster")?;
    let t = cluster.timings();
    println!(
        "cluster ready: node Ready in {:.1}s (binaries {:.1}s, images {:.1}s); images loaded: {}",
        t.start_to_ready.as_secs_f64(),
        t.binaries.as_secs_f64(),
        t.images.as_secs_f64(),
        cluster.images().join(", ")
    );
    println!("export KUBECONFIG={}", cluster.kubeconfig_path().display());
    let outcome = story(&cluster, &options).await;
    step("tearing the cluster down");
    let took = cluster.stop().context("tearing down")?;
    println!("torn down in {:.2}s", took.as_secs_f64());
    outcome?;
    println!(
        "\ndemo finished in {:.1}s: real pods, one leader at a time, a handover on pod deletion, a failover after a crash",
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

async fn story(cluster: &Cluster, options: &Options) -> anyhow::Result<()> {
    let kubeconfig = cluster.kubeconfig_path();
    let client = cluster.control_plane().admin_client()?;
    let lease = LeaseWatch::start(client.clone(), NAMESPACE, LEASE);
    let logs = PodLogs::start(client.clone(), NAMESPACE, SELECTOR);

    step("kubectl apply -f kube/");
    kubectl(
        kubeconfig,
        &["apply", "-n", NAMESPACE, "-f"],
        Some(&workspace_root().join("kube")),
    )?;

    step("waiting for the Deployment: 3/3 ready");
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), NAMESPACE);
    let mut last = String::new();
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let status = deployments
            .get_status("leaderz-example")
            .await?
            .status
            .unwrap_or_default();
        let line = format!("ready {}/3", status.ready_replicas.unwrap_or(0));
        if line != last {
            println!("  {line}");
            last = line;
        }
        if status.ready_replicas == Some(3) {
            break;
        }
        if Instant::now() > deadline {
            bail!("the Deployment was not 3/3 ready within 120 s");
        }
        sleep(Duration::from_millis(200)).await;
    }
    let first = lease
        .wait_for("a holder", Duration::from_secs(60), |h| h.is_some())
        .await?
        .holder;
    describe(kubeconfig)?;

    step("kubectl logs -f -l app.kubernetes.io/name=leaderz-example --prefix (a few seconds)");
    tail_logs(
        kubeconfig,
        Duration::from_secs(if options.ci { 3 } else { 6 }),
    )
    .await?;

    step(&format!(
        "kubectl delete pod {first} (the leader): the kubelet sends SIGTERM, it stops its work and releases"
    ));
    let deleted = Instant::now();
    kubectl(
        kubeconfig,
        &["delete", "pod", "-n", NAMESPACE, "--wait=false", &first],
        None,
    )?;
    let second = lease
        .wait_for("a new holder", Duration::from_secs(60), |h| {
            h.is_some_and(|h| h != first)
        })
        .await?;
    println!(
        "graceful handover: {} took over {:.0} ms after `kubectl delete pod` (kubectl's own start included)",
        second.holder,
        second.seen_at.duration_since(deleted).as_secs_f64() * 1000.0
    );
    sleep(Duration::from_secs(1)).await;
    println!("what {first} logged at the end:");
    for line in logs.of(&first).iter().rev().take(5).rev() {
        println!("  [{first}] {}", line.text);
    }

    let second = second.holder;
    step(&format!(
        "kill -9 of {second}'s container (a crash, through containerd): no release; the others wait out the lease ({}s)",
        LEASE_DURATION.as_secs()
    ));
    let pods: Api<Pod> = Api::namespaced(client, NAMESPACE);
    let container = pods
        .get(&second)
        .await?
        .status
        .and_then(|s| s.container_statuses)
        .and_then(|c| c.into_iter().find(|c| c.name == "app"))
        .and_then(|c| c.container_id)
        .context("the leader's container has no id")?;
    cluster.kill_container(&container).await?;
    let killed = Instant::now();
    let third = lease
        .wait_for(
            "a takeover after the crash",
            LEASE_DURATION + Duration::from_secs(30),
            |h| h.is_some_and(|h| h != second),
        )
        .await?;
    println!(
        "failover: {} took over {:.2}s after the kill (lease duration {}s)",
        third.holder,
        third.seen_at.duration_since(killed).as_secs_f64(),
        LEASE_DURATION.as_secs()
    );
    describe(kubeconfig)?;
    let restarts = pods
        .get(&second)
        .await?
        .status
        .and_then(|s| s.container_statuses)
        .and_then(|c| c.into_iter().find(|c| c.name == "app"))
        .map_or(0, |c| c.restart_count);
    let holder = lease.holder().unwrap_or_default();
    if restarts >= 1 && holder != second {
        println!("{second}'s container restarted {restarts} time(s); {holder} still leads");
    } else {
        println!("{second}'s container: {restarts} restart(s) so far; holder {holder}");
    }
    Ok(())
}

/// Runs kubectl with the cluster's kubeconfig; its output goes to ours.
fn kubectl(kubeconfig: &Path, args: &[&str], file: Option<&Path>) -> anyhow::Result<()> {
    let mut command = std::process::Command::new("kubectl");
    command.arg("--kubeconfig").arg(kubeconfig).args(args);
    if let Some(file) = file {
        command.arg(file);
    }
    let status = command.status().context("running kubectl")?;
    if !status.success() {
        bail!("kubectl {} failed ({status})", args.join(" "));
    }
    Ok(())
}

/// `kubectl logs -f -l ... --prefix` for `how_long`, indented.
async fn tail_logs(kubeconfig: &Path, how_long: Duration) -> anyhow::Result<()> {
    let mut child = tokio::process::Command::new("kubectl")
        .arg("--kubeconfig")
        .arg(kubeconfig)
        .args([
            "logs", "-f", "-n", NAMESPACE, "-l", SELECTOR, "--prefix", "--tail=4",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .context("running kubectl logs")?;
    let stdout = child.stdout.take().context("no stdout")?;
    let mut lines = BufReader::new(stdout).lines();
    let until = Instant::now() + how_long;
    while let Ok(Ok(Some(line))) = tokio::time::timeout_at(until, lines.next_line()).await {
        println!("  {}", leaderz_cluster::observe::strip_ansi(&line));
    }
    let _ = child.kill().await;
    Ok(())
}
