//! Traffic to the leader on real pods: `kube/traffic/` (three `leaderz serve` replicas
//! with `--label-pod` and `--leader-endpoints`) applied unmodified with its RBAC files,
//! and both Services polled from the pod network through kube-proxy (a new connection
//! every ~15 ms each) across 10 handovers: `kubectl delete pod <leader>` and a SIGKILL of
//! the leader's container. Every answer names the pod that gave it and whether that pod
//! leads; they are compared with the Lease's history.
//!
//! Where the cluster cannot run (not root, no containerd) the test prints one line saying
//! why and returns; `LEADERZ_REQUIRE_NODE=1` (CI) makes that a failure instead.

#![allow(clippy::unwrap_used)] // tests: a panic is the failure report

use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context as _, Result, bail, ensure};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Pod, Service};
use kube::api::{DeleteParams, ListParams};
use kube::{Api, Client};
use leaderz_cluster::observe::{LeaseVersion, LeaseWatch};
use leaderz_cluster::{Cluster, SERVICE_RANGE, shared_or_skip};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::time::{Instant, sleep, timeout};

const APP: &str = "app.kubernetes.io/name=leaderz-traffic-example";
const DEPLOYMENT: &str = "leaderz-traffic-example";
const LABEL_SERVICE: &str = "leaderz-leader-label";
const SLICE_SERVICE: &str = "leaderz-leader";
/// The Deployment's lease duration (the default: kube/traffic/ does not set one).
const LEASE_DURATION: Duration = Duration::from_secs(15);
/// How long one request may take before it counts as reaching nobody.
const REQUEST_LIMIT: Duration = Duration::from_millis(300);
/// Pause between two requests of one poller.
const POLL_EVERY: Duration = Duration::from_millis(15);

/// Tells the pollers to stop.
#[derive(Clone, Default)]
struct Stop(Arc<AtomicBool>);

impl Stop {
    fn stop(&self) {
        self.0.store(true, Ordering::Relaxed);
    }
    fn stopped(&self) -> bool {
        self.0.load(Ordering::Relaxed)
    }
}

fn kube_dir(sub: &str) -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../kube")
        .join(sub)
}

fn kubectl(cluster: &Cluster, args: &[&str]) -> Result<String> {
    let out = Command::new("kubectl")
        .arg("--kubeconfig")
        .arg(cluster.kubeconfig_path())
        .args(args)
        .output()
        .context("running kubectl")?;
    ensure!(
        out.status.success(),
        "kubectl {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// One request through a Service.
#[derive(Clone, Debug)]
struct Sample {
    sent: Instant,
    received: Instant,
    /// The answering pod and whether it said it leads; `None`: no answer (refused,
    /// timed out, or not 200).
    answer: Option<(String, bool)>,
    /// Why there was no answer.
    error: Option<String>,
}

/// `GET /status` through `addr` from the pod network: the answering pod and whether it
/// leads, or why there was no answer.
async fn ask(cluster: &Cluster, addr: SocketAddr) -> Result<(String, bool), String> {
    let call = async {
        let mut stream = cluster
            .connect(addr)
            .await
            .map_err(|e| format!("connect: {e}"))?;
        stream
            .write_all(b"GET /status HTTP/1.0\r\nHost: leader\r\n\r\n")
            .await
            .map_err(|e| format!("write: {e}"))?;
        let mut response = String::new();
        stream
            .read_to_string(&mut response)
            .await
            .map_err(|e| format!("read: {e}"))?;
        let (head, body) = response
            .split_once("\r\n\r\n")
            .ok_or_else(|| format!("no HTTP answer: {response:?}"))?;
        if !head.starts_with("HTTP/1.1 200") && !head.starts_with("HTTP/1.0 200") {
            return Err(head.to_owned());
        }
        let status: serde_json::Value =
            serde_json::from_str(body).map_err(|e| format!("{e}: {body}"))?;
        let identity = status["identity"].as_str().ok_or("no identity")?.to_owned();
        Ok((
            identity,
            status["is_leader"].as_bool().ok_or("no is_leader")?,
        ))
    };
    timeout(REQUEST_LIMIT, call)
        .await
        .unwrap_or_else(|_| Err("timed out".to_owned()))
}

/// Polls `addr` until `stop`, recording every request.
fn poll(cluster: &'static Cluster, addr: SocketAddr, stop: Stop) -> Arc<Mutex<Vec<Sample>>> {
    let samples = Arc::new(Mutex::new(Vec::new()));
    let kept = samples.clone();
    tokio::spawn(async move {
        while !stop.stopped() {
            let sent = Instant::now();
            let result = ask(cluster, addr).await;
            kept.lock().unwrap().push(Sample {
                sent,
                received: Instant::now(),
                error: result.as_ref().err().cloned(),
                answer: result.ok(),
            });
            sleep(POLL_EVERY).await;
        }
    });
    samples
}

/// Who held the Lease at `at`, by the test's watch ("" when released or before).
fn holder_at(history: &[LeaseVersion], at: Instant) -> String {
    history
        .iter()
        .rev()
        .find(|v| v.seen_at <= at)
        .map(|v| v.holder.clone())
        .unwrap_or_default()
}

/// What the answers of one Service say, judged against the Lease's history.
#[derive(Debug, Default)]
struct Verdict {
    requests: usize,
    /// Answered by the holder.
    by_leader: usize,
    /// Answered by a pod that held no term, while no other pod held the Lease either
    /// (a leader stepping down, before its release).
    by_stepping_down: usize,
    /// Answered by a pod while another pod held the Lease throughout the request.
    by_non_leader: Vec<String>,
    /// No answer, by why.
    unanswered: std::collections::BTreeMap<String, usize>,
}

fn judge(samples: &[Sample], history: &[LeaseVersion]) -> Verdict {
    let mut v = Verdict {
        requests: samples.len(),
        ..Verdict::default()
    };
    for s in samples {
        let Some((pod, leads)) = &s.answer else {
            let why: String = s
                .error
                .clone()
                .unwrap_or_default()
                .chars()
                .take(48)
                .collect();
            *v.unanswered.entry(why).or_default() += 1;
            continue;
        };
        let (first, last) = (holder_at(history, s.sent), holder_at(history, s.received));
        let other = |h: &str| !h.is_empty() && h != pod;
        if other(&first) && other(&last) {
            v.by_non_leader.push(format!(
                "{pod} (leads: {leads}) answered while {first}/{last} held the Lease"
            ));
        } else if *leads {
            v.by_leader += 1;
        } else {
            v.by_stepping_down += 1;
        }
    }
    v
}

/// The time the Service reached nobody around a handover from `old` to `new`: from the
/// last answer before the first answer of `new` to that first answer.
fn gap(samples: &[Sample], new: &str, after: Instant) -> Option<Duration> {
    let first = samples
        .iter()
        .position(|s| s.sent >= after && s.answer.as_ref().is_some_and(|a| a.0 == new))?;
    let last_before = samples[..first].iter().rev().find(|s| s.answer.is_some())?;
    Some(
        samples[first]
            .sent
            .saturating_duration_since(last_before.received),
    )
}

async fn wait_ready(client: &Client, ns: &str) -> Result<()> {
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), ns);
    let deadline = Instant::now() + Duration::from_secs(180);
    loop {
        let list = pods.list(&ListParams::default().labels(APP)).await?.items;
        let ready = list
            .iter()
            .filter(|p| {
                p.metadata.deletion_timestamp.is_none()
                    && p.status
                        .as_ref()
                        .and_then(|s| s.conditions.as_ref())
                        .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
            })
            .count();
        let available = deployments
            .get_status(DEPLOYMENT)
            .await?
            .status
            .and_then(|s| s.ready_replicas)
            .unwrap_or(0);
        if ready == 3 && list.len() == 3 && available == 3 {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("{ready}/3 pods ready ({} pods) after 180 s", list.len());
        }
        sleep(Duration::from_millis(100)).await;
    }
}

/// Waits until `samples` has an answer from `pod` sent after `after`.
async fn answered_by(
    samples: &Mutex<Vec<Sample>>,
    pod: &str,
    after: Instant,
    what: &str,
) -> Result<()> {
    let deadline = Instant::now() + LEASE_DURATION + Duration::from_secs(30);
    loop {
        let hit = samples
            .lock()
            .unwrap()
            .iter()
            .any(|s| s.sent >= after && s.answer.as_ref().is_some_and(|a| a.0 == pod));
        if hit {
            return Ok(());
        }
        if Instant::now() >= deadline {
            let last: Vec<Sample> = samples
                .lock()
                .unwrap()
                .iter()
                .rev()
                .take(3)
                .cloned()
                .collect();
            bail!("{what} never answered from {pod}; last requests: {last:?}");
        }
        sleep(Duration::from_millis(20)).await;
    }
}

fn ms(d: Duration) -> String {
    format!("{:.0} ms", d.as_secs_f64() * 1000.0)
}

#[tokio::test]
async fn both_services_reach_only_the_leader_across_ten_handovers() -> Result<()> {
    let Some(cluster) = shared_or_skip("both_services_reach_only_the_leader_across_ten_handovers")
    else {
        return Ok(());
    };
    let ns = cluster.control_plane().new_namespace("traffic").await?;
    let client = cluster.control_plane().admin_client()?;
    for part in [
        "serviceaccount.yaml",
        "role.yaml",
        "rolebinding.yaml",
        "label-pod",
        "leader-endpoints",
        "traffic",
    ] {
        let path = kube_dir(part);
        kubectl(cluster, &["apply", "-n", &ns, "-f", path.to_str().unwrap()])?;
    }
    let lease = LeaseWatch::start(client.clone(), &ns, "my-lock");
    wait_ready(&client, &ns).await?;
    let services: Api<Service> = Api::namespaced(client.clone(), &ns);
    let addr = |svc: Service| -> Result<SocketAddr> {
        let ip = svc
            .spec
            .and_then(|s| s.cluster_ip)
            .context("no ClusterIP")?;
        Ok(SocketAddr::new(ip.parse()?, 80))
    };
    let label_addr = addr(services.get(LABEL_SERVICE).await?)?;
    let slice_addr = addr(services.get(SLICE_SERVICE).await?)?;
    let diagnose = async |cluster: &Cluster| {
        for args in [
            &["get", "pods", "-o", "wide", "--show-labels"][..],
            &["get", "endpointslices", "-o", "yaml"][..],
            &["logs", "-l", APP, "--prefix", "--tail", "30"][..],
        ] {
            let mut full = vec!["-n", ns.as_str()];
            full.extend(args);
            println!(
                "{}",
                kubectl(cluster, &full).unwrap_or_else(|e| e.to_string())
            );
        }
    };
    // The node's own network namespace has no route to the Service range (pods have one
    // through their default route): give it one over the pod bridge, so that its
    // connections to ClusterIPs reach kube-proxy's rules as a pod's do.
    if let Err(e) = cluster
        .run_in_node("ip", &["route", "replace", SERVICE_RANGE, "dev", "cni0"])
        .await
    {
        bail!("routing the Service range in the node: {e}");
    }
    let stop = Stop::default();
    let by_label = poll(cluster, label_addr, stop.clone());
    let by_slice = poll(cluster, slice_addr, stop.clone());
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns);

    // G: graceful (kubectl delete pod), C: crash (SIGKILL of the container).
    let plan = "GGCGGCGGCG";
    let mut rows = Vec::new();
    for (trial, kind) in plan.chars().enumerate() {
        wait_ready(&client, &ns).await?;
        let old = lease
            .wait_for("a holder", Duration::from_secs(60), |h| h.is_some())
            .await?
            .holder;
        let steady = Instant::now();
        let both = async {
            answered_by(&by_label, &old, steady, "the label Service").await?;
            answered_by(&by_slice, &old, steady, "the EndpointSlice Service").await
        };
        if let Err(e) = both.await {
            diagnose(cluster).await;
            return Err(e);
        }
        let began = Instant::now();
        if kind == 'G' {
            pods.delete(&old, &DeleteParams::default()).await?;
        } else {
            let container = pods
                .get(&old)
                .await?
                .status
                .and_then(|s| s.container_statuses)
                .and_then(|c| c.into_iter().find(|c| c.name == "leaderz"))
                .and_then(|c| c.container_id)
                .context("no container id")?;
            cluster.kill_container(&container).await?;
        }
        let new = lease
            .wait_for(
                "a new holder",
                LEASE_DURATION + Duration::from_secs(30),
                |h| h.is_some_and(|h| h != old),
            )
            .await?;
        let handover = new.seen_at.duration_since(began);
        answered_by(&by_label, &new.holder, began, "the label Service").await?;
        answered_by(&by_slice, &new.holder, began, "the EndpointSlice Service").await?;
        let label_gap = gap(&by_label.lock().unwrap(), &new.holder, began);
        let slice_gap = gap(&by_slice.lock().unwrap(), &new.holder, began);
        println!(
            "trial {trial} ({}): {old} -> {} holds after {}; nobody answered: label Service {}, EndpointSlice Service {}",
            if kind == 'G' { "delete pod" } else { "SIGKILL" },
            new.holder,
            ms(handover),
            label_gap.map_or("?".into(), ms),
            slice_gap.map_or("?".into(), ms),
        );
        rows.push((kind, label_gap, slice_gap));
    }
    sleep(Duration::from_secs(1)).await;
    stop.stop();
    sleep(Duration::from_millis(400)).await;

    let history = lease.history();
    let mut failures = Vec::new();
    for (name, samples) in [("label", &by_label), ("EndpointSlice", &by_slice)] {
        let samples = samples.lock().unwrap().clone();
        let v = judge(&samples, &history);
        println!(
            "{name} Service: {} requests: {} answered by the leader, {} by a leader stepping down before its release, {} by a non-leader while another pod led, unanswered: {:?}",
            v.requests,
            v.by_leader,
            v.by_stepping_down,
            v.by_non_leader.len(),
            v.unanswered
        );
        for kind in ['G', 'C'] {
            let mut gaps: Vec<Duration> = rows
                .iter()
                .filter(|r| r.0 == kind)
                .filter_map(|r| if name == "label" { r.1 } else { r.2 })
                .collect();
            gaps.sort();
            if let (Some(min), Some(max)) = (gaps.first(), gaps.last()) {
                println!(
                    "  {name} Service reached nobody after {}: {} to {} (median {})",
                    if kind == 'G' {
                        "kubectl delete pod"
                    } else {
                        "SIGKILL"
                    },
                    ms(*min),
                    ms(*max),
                    ms(gaps[gaps.len() / 2])
                );
            }
        }
        for line in &v.by_non_leader {
            println!("  {line}");
        }
        if !v.by_non_leader.is_empty() {
            failures.push(format!(
                "{name}: {} answers from a non-leader",
                v.by_non_leader.len()
            ));
        }
    }
    ensure!(failures.is_empty(), "{failures:?}");
    kubectl(cluster, &["delete", "namespace", &ns, "--wait=false"])?;
    Ok(())
}
