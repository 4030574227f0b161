//! The original story on real pods: `kube/` applied unmodified to a one-node cluster
//! (kubelet, containerd, the project's own image), then the leader pod deleted, the
//! leader's container crashed, a rolling update, a scale to zero and back, and the
//! sidecar pattern. One shared cluster for this test binary; one test at a time on it
//! (timings are measured), each in its own namespace.
//!
//! Where the cluster cannot run (not root, no containerd) each test prints one line saying
//! why and returns; `LEADERZ_REQUIRE_NODE=1` (CI) makes that a failure instead.

#![allow(clippy::unwrap_used)] // tests: a panic is the failure report
#![allow(clippy::disallowed_types)] // wall-clock figures are the point here

use std::{collections::BTreeMap, net::SocketAddr, path::Path, process::Command, time::Duration};

use anyhow::{Context as _, Result, bail, ensure};
use k8s_openapi::api::{
    apps::v1::Deployment,
    core::v1::{Event, Pod},
};
use kube::{
    Api, Client,
    api::{DeleteParams, ListParams},
};
use leaderz_cluster::{
    Cluster, KUBERNETES_SERVICE_IP,
    observe::{LeaseWatch, LogLine, PodLogs},
    shared_or_skip,
};
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    sync::Mutex,
    time::{Instant, sleep},
};

/// One test at a time on the shared node: they measure handover times.
static ONE_AT_A_TIME: Mutex<()> = Mutex::const_new(());

const APP: &str = "app.kubernetes.io/name=leaderz-example";
const SIDECAR_APP: &str = "app.kubernetes.io/name=leaderz-sidecar-example";
/// The example app's default lease duration (kube/deployment.yaml does not set one).
const LEASE_DURATION: Duration = Duration::from_secs(15);

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

/// A namespace with one of `kube/`'s manifest sets applied, unmodified, and watchers on
/// its Lease and its pods' logs.
struct Story {
    ns: String,
    client: Client,
    selector: &'static str,
    deployment: &'static str,
    lease: LeaseWatch,
    logs: PodLogs,
}

impl Story {
    async fn apply(cluster: &'static Cluster, dir: &str) -> Result<Self> {
        let (selector, deployment, lease) = match dir {
            "" => (APP, "leaderz-example", "my-lock"),
            _ => (SIDECAR_APP, "leaderz-sidecar-example", "sidecar-lock"),
        };
        let ns = cluster.control_plane().new_namespace("pods").await?;
        let client = cluster.control_plane().admin_client()?;
        let story = Self {
            lease: LeaseWatch::start(client.clone(), &ns, lease),
            logs: PodLogs::start(client.clone(), &ns, selector),
            ns,
            client,
            selector,
            deployment,
        };
        let path = kube_dir(dir);
        let applied = kubectl(
            cluster,
            &["apply", "-n", &story.ns, "-f", path.to_str().unwrap()],
        )?;
        ensure!(applied.contains("deployment.apps/"), "{applied}");
        story.wait_ready(3).await?;
        Ok(story)
    }

    /// Deletes the namespace (the controller-manager removes its pods), so the next test
    /// has the node to itself.
    async fn finish(self) -> Result<()> {
        kubectl_ns_delete(&self.ns)?;
        Ok(())
    }

    fn pods(&self) -> Api<Pod> {
        Api::namespaced(self.client.clone(), &self.ns)
    }

    async fn running_pods(&self) -> Result<Vec<Pod>> {
        let list = self
            .pods()
            .list(&ListParams::default().labels(self.selector))
            .await?;
        Ok(list
            .items
            .into_iter()
            .filter(|p| p.metadata.deletion_timestamp.is_none())
            .collect())
    }

    /// `n` pods Running and Ready (none terminating) and the Deployment agreeing.
    async fn wait_ready(&self, n: usize) -> Result<()> {
        let deployments: Api<Deployment> = Api::namespaced(self.client.clone(), &self.ns);
        let deadline = Instant::now() + Duration::from_secs(180);
        loop {
            let pods = self.running_pods().await?;
            let all = self
                .pods()
                .list(&ListParams::default().labels(self.selector))
                .await?
                .items
                .len();
            let ready = pods.iter().filter(|p| is_ready(p)).count();
            let status = deployments.get_status(self.deployment).await?.status;
            let available = status.and_then(|s| s.ready_replicas).unwrap_or(0);
            if ready == n && all == n && available == i32::try_from(n)? {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "{ready}/{n} pods ready ({all} pods, deployment says {available}) after 180 s"
                );
            }
            sleep(Duration::from_millis(100)).await;
        }
    }

    async fn holder(&self) -> Result<String> {
        Ok(self
            .lease
            .wait_for("a holder", Duration::from_secs(60), |h| h.is_some())
            .await?
            .holder)
    }

    /// The app container's id of `pod`.
    async fn container_id(&self, pod: &str, container: &str) -> Result<String> {
        self.pods()
            .get(pod)
            .await?
            .status
            .and_then(|s| s.container_statuses)
            .and_then(|c| c.into_iter().find(|c| c.name == container))
            .and_then(|c| c.container_id)
            .context("no container id")
    }

    /// No pod logged a 403 ("forbidden", kube's `code: 403`): the Role is enough.
    /// (Not a bare "403": timestamps contain it.)
    fn assert_no_forbidden(&self) {
        for line in self.logs.lines() {
            let text = line.text.to_lowercase();
            assert!(
                !text.contains("forbidden") && !text.contains("code: 403"),
                "{}: {}",
                line.pod,
                line.text
            );
        }
    }

    /// Leadership intervals per pod from the pods' own logs: from "started leading" to
    /// "stopped working" (the work's drop guard), open-ended while still leading.
    fn terms(&self) -> Vec<(String, jiff::Timestamp, Option<jiff::Timestamp>)> {
        let mut terms = Vec::new();
        for (pod, lines) in self.logs.by_pod() {
            let mut open: Option<jiff::Timestamp> = None;
            for line in lines.iter().filter(|l| l.container == "app") {
                if line.text.contains("started leading") {
                    open = Some(line.app_time());
                } else if line.text.contains("stopped working")
                    && let Some(start) = open.take()
                {
                    terms.push((pod.clone(), start, Some(line.app_time())));
                }
            }
            if let Some(start) = open {
                terms.push((pod, start, None));
            }
        }
        terms.sort_by_key(|t| t.1);
        terms
    }
}

fn kubectl_ns_delete(ns: &str) -> Result<()> {
    let cluster = Cluster::shared()?;
    kubectl(cluster, &["delete", "namespace", ns, "--wait=false"]).map(drop)
}

fn is_ready(pod: &Pod) -> bool {
    let status = pod.status.as_ref();
    status.and_then(|s| s.phase.as_deref()) == Some("Running")
        && status
            .and_then(|s| s.conditions.as_ref())
            .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i]
}

fn ms(d: Duration) -> String {
    format!("{:.0} ms", d.as_secs_f64() * 1000.0)
}

/// A field of `/proc/<pid>/status`.
fn proc_status(pid: u32, field: &str) -> Option<String> {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix(field).map(|v| v.trim().to_owned()))
}

#[tokio::test]
async fn kube_dir_runs_three_ready_non_root_pods_with_one_holder() -> Result<()> {
    let Some(cluster) = shared_or_skip("kube_dir_runs_three_ready_non_root_pods_with_one_holder")
    else {
        return Ok(());
    };
    let _one = ONE_AT_A_TIME.lock().await;
    let t = cluster.timings();
    println!(
        "cluster: start to ready {:.1}s (Go binaries {:.1}s, images {:.1}s)",
        t.start_to_ready.as_secs_f64(),
        t.binaries.as_secs_f64(),
        t.images.as_secs_f64()
    );
    let story = Story::apply(cluster, "").await?;
    let holder = story.holder().await?;
    let pods = story.running_pods().await?;
    let names: Vec<String> = pods
        .iter()
        .filter_map(|p| p.metadata.name.clone())
        .collect();
    assert_eq!(names.len(), 3, "{names:?}");
    assert!(
        names.contains(&holder),
        "holder {holder} is not one of {names:?}"
    );

    // `kubectl describe lease my-lock` names the holding pod.
    let described = kubectl(cluster, &["describe", "lease", "my-lock", "-n", &story.ns])?;
    let identity = described
        .lines()
        .find_map(|l| l.trim().strip_prefix("Holder Identity:"))
        .map(str::trim)
        .context("no Holder Identity")?;
    assert_eq!(identity, holder, "{described}");

    // Exactly one pod works, over a few seconds, and the holder stays put.
    sleep(Duration::from_secs(4)).await;
    assert_eq!(story.lease.holder().as_deref(), Some(holder.as_str()));
    let since = jiff::Timestamp::now() - jiff::SignedDuration::from_secs(3);
    let working: Vec<String> = story
        .logs
        .by_pod()
        .into_iter()
        .filter(|(_, lines)| {
            lines
                .iter()
                .any(|l| l.text.contains("working...") && l.app_time() > since)
        })
        .map(|(pod, _)| pod)
        .collect();
    assert_eq!(
        working,
        std::slice::from_ref(&holder),
        "exactly the holder works"
    );
    story.assert_no_forbidden();

    // Probes pass: every pod Ready, no restarts, no Unhealthy events.
    for pod in &pods {
        let statuses = pod
            .status
            .as_ref()
            .unwrap()
            .container_statuses
            .as_ref()
            .unwrap();
        assert!(
            statuses.iter().all(|c| c.ready && c.restart_count == 0),
            "{statuses:?}"
        );
    }
    // No probe failure, except readiness before a pod first saw the Lease (`/readyz`
    // answers 503 until then; on a loaded node the first probe can come first).
    let became_ready: BTreeMap<String, k8s_openapi::jiff::Timestamp> = pods
        .iter()
        .filter_map(|p| {
            let ready = p
                .status
                .as_ref()?
                .conditions
                .as_ref()?
                .iter()
                .find(|c| c.type_ == "Ready" && c.status == "True")?;
            Some((
                p.metadata.name.clone()?,
                ready.last_transition_time.as_ref()?.0,
            ))
        })
        .collect();
    let events: Api<Event> = Api::namespaced(story.client.clone(), &story.ns);
    let unhealthy: Vec<String> = events
        .list(&ListParams::default())
        .await?
        .items
        .into_iter()
        .filter(|e| e.reason.as_deref() == Some("Unhealthy"))
        .filter(|e| {
            let before_ready = e.message.as_deref().is_some_and(|m| {
                m.starts_with("Readiness probe failed") && m.contains("statuscode: 503")
            }) && e
                .involved_object
                .name
                .as_ref()
                .and_then(|n| became_ready.get(n))
                .zip(e.last_timestamp.as_ref())
                .is_some_and(|(ready, last)| last.0 <= *ready);
            !before_ready
        })
        .filter_map(|e| e.message)
        .collect();
    assert!(unhealthy.is_empty(), "probe failures: {unhealthy:?}");

    let memory = cluster.memory_report();
    let total: u64 = memory.iter().map(|m| m.2).sum();
    println!(
        "node memory with 3 pods: {} MiB in all: {}",
        total >> 20,
        memory
            .iter()
            .map(|(name, n, rss)| format!("{name} x{n} {} MiB", rss >> 20))
            .collect::<Vec<_>>()
            .join(", ")
    );

    // The containers' processes, seen from the host: non-root, read-only root filesystem,
    // and given the in-cluster path (the `kubernetes` Service, a mounted token).
    let apps: Vec<u32> = cluster
        .processes()
        .into_iter()
        .filter(|p| p.name == "leaderz-example")
        .map(|p| p.pid)
        .collect();
    assert!(apps.len() >= 3, "app processes: {apps:?}");
    for pid in apps {
        let uid = proc_status(pid, "Uid:").unwrap_or_default();
        assert!(
            uid.split_whitespace().all(|id| id == "65532"),
            "pid {pid} uid {uid}"
        );
        let mountinfo = std::fs::read_to_string(format!("/proc/{pid}/mountinfo"))?;
        let root = mountinfo
            .lines()
            .find(|l| l.split_whitespace().nth(4) == Some("/"))
            .context("no root mount")?;
        let options = root.split_whitespace().nth(5).unwrap_or_default();
        assert!(
            options.split(',').any(|o| o == "ro"),
            "root mounted {options}"
        );
        assert!(
            mountinfo.contains("/var/run/secrets/kubernetes.io/serviceaccount"),
            "no ServiceAccount token mounted"
        );
        let environ = std::fs::read(format!("/proc/{pid}/environ"))?;
        let environ = String::from_utf8_lossy(&environ);
        assert!(
            environ.contains(&format!("KUBERNETES_SERVICE_HOST={KUBERNETES_SERVICE_IP}")),
            "not pointed at the kubernetes Service"
        );
    }
    story.finish().await
}

#[tokio::test]
async fn deleting_the_leader_pod_hands_over_after_it_stopped_its_work() -> Result<()> {
    const TRIALS: usize = 8;
    let Some(cluster) =
        shared_or_skip("deleting_the_leader_pod_hands_over_after_it_stopped_its_work")
    else {
        return Ok(());
    };
    let _one = ONE_AT_A_TIME.lock().await;
    let story = Story::apply(cluster, "").await?;
    let mut handovers = Vec::new();
    for trial in 1..=TRIALS {
        story.wait_ready(3).await?;
        let old = story.holder().await?;
        let deleted = Instant::now();
        let deleted_wall = jiff::Timestamp::now();
        story.pods().delete(&old, &DeleteParams::default()).await?;
        let new = story
            .lease
            .wait_for(
                "a new holder after the delete",
                Duration::from_secs(60),
                |h| h.is_some_and(|h| h != old),
            )
            .await?;
        let handover = new.seen_at.duration_since(deleted);
        println!(
            "trial {trial}: delete {old} -> {} leads after {}",
            new.holder,
            ms(handover)
        );
        handovers.push(handover);

        // The deleted pod got SIGTERM from the kubelet, stopped its work, and only then
        // released: the release (holder "") was written after its "stopped working".
        let deadline = Instant::now() + Duration::from_secs(10);
        let lines: Vec<LogLine> = loop {
            let lines = story.logs.of(&old);
            if lines.iter().any(|l| l.text.contains("stopped working")) || Instant::now() > deadline
            {
                break lines;
            }
            sleep(Duration::from_millis(50)).await;
        };
        let text = |needle: &str| lines.iter().position(|l| l.text.contains(needle));
        let sigterm = text("SIGTERM").context("the deleted pod never logged SIGTERM")?;
        let stopped = text("stopped working").context("no `stopped working`")?;
        assert!(sigterm < stopped, "{lines:#?}");
        let stopped_at = lines[stopped].app_time();
        assert!(
            !lines[stopped..]
                .iter()
                .any(|l| l.text.contains("working...")),
            "worked after stopping: {lines:#?}"
        );
        let release = story
            .lease
            .history()
            .into_iter()
            .find(|v| v.holder.is_empty() && v.seen_at >= deleted)
            .context("the leader did not release the lease (no holder \"\" version seen)")?;
        let released_at = release.renew_time.context("release without renewTime")?;
        assert!(
            stopped_at <= released_at,
            "released at {released_at} before the work stopped at {stopped_at}"
        );
        let since_delete = |t: jiff::Timestamp| ms(t.duration_since(deleted_wall).unsigned_abs());
        println!(
            "  SIGTERM logged +{}, work stopped +{}, released +{}, taken +{}",
            since_delete(lines[sigterm].app_time()),
            since_delete(stopped_at),
            since_delete(released_at),
            new.acquire_time.map_or("?".to_owned(), since_delete)
        );
        // leaderz's part: from the SIGTERM to the new holder's taking write (measured
        // 15-80 ms). The kubelet's part before it (delete to SIGTERM) varies up to ~2 s.
        let taken = new
            .acquire_time
            .context("the new holder wrote no acquireTime")?;
        let sigterm_to_taken = taken.duration_since(lines[sigterm].app_time());
        assert!(
            sigterm_to_taken < jiff::SignedDuration::from_secs(1),
            "SIGTERM to the new holder took {sigterm_to_taken}"
        );
    }
    handovers.sort();
    println!(
        "handover after kubectl delete pod <leader>, {TRIALS} trials: p50 {} max {} (all: {})",
        ms(percentile(&handovers, 0.5)),
        ms(percentile(&handovers, 1.0)),
        handovers
            .iter()
            .map(|d| ms(*d))
            .collect::<Vec<_>>()
            .join(", ")
    );
    // A release is taken over at once; without one, a follower would wait the full
    // lease duration (15 s) after the last renewal it saw.
    assert!(
        percentile(&handovers, 1.0) < Duration::from_secs(10),
        "{handovers:?}"
    );
    story.assert_no_forbidden();
    story.finish().await
}

#[tokio::test]
async fn a_crashed_leader_is_replaced_after_the_lease_duration_and_rejoins_as_follower()
-> Result<()> {
    let Some(cluster) = shared_or_skip("a_crashed_leader_is_replaced_after_the_lease_duration")
    else {
        return Ok(());
    };
    let _one = ONE_AT_A_TIME.lock().await;
    let story = Story::apply(cluster, "").await?;
    let old = story.holder().await?;
    let container = story.container_id(&old, "app").await?;
    cluster.kill_container(&container).await?;
    let killed = Instant::now();
    let new = story
        .lease
        .wait_for(
            "a takeover after the crash",
            LEASE_DURATION + Duration::from_secs(30),
            |h| h.is_some_and(|h| h != old),
        )
        .await?;
    let failover = new.seen_at.duration_since(killed);
    println!(
        "crash failover: kill -9 of {old}'s container -> {} leads after {:.2}s (lease duration {}s)",
        new.holder,
        failover.as_secs_f64(),
        LEASE_DURATION.as_secs()
    );
    // The last renewal was at most a retry period (2 s) before the kill; followers wait
    // the lease duration from when they saw it.
    assert!(
        failover >= LEASE_DURATION - Duration::from_secs(3)
            && failover < LEASE_DURATION + Duration::from_secs(10),
        "{failover:?}"
    );

    // The kubelet restarts the container; it comes back as a follower.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let pod = story.pods().get(&old).await?;
        let app = pod
            .status
            .as_ref()
            .and_then(|s| s.container_statuses.as_ref())
            .and_then(|c| c.iter().find(|c| c.name == "app"));
        if app.is_some_and(|c| c.restart_count >= 1 && c.ready) {
            break;
        }
        ensure!(Instant::now() < deadline, "{old} did not come back ready");
        sleep(Duration::from_millis(200)).await;
    }
    sleep(Duration::from_secs(3)).await;
    let restarted = story
        .pods()
        .logs(
            &old,
            &kube::api::LogParams {
                container: Some("app".to_owned()),
                ..Default::default()
            },
        )
        .await?;
    let restarted = leaderz_cluster::observe::strip_ansi(&restarted);
    assert!(!restarted.contains("started leading"), "{restarted}");
    assert!(
        restarted.contains("new leader") && restarted.contains(&new.holder),
        "the restarted container does not follow {}: {restarted}",
        new.holder
    );
    assert_eq!(story.lease.holder().as_deref(), Some(new.holder.as_str()));
    story.assert_no_forbidden();
    story.finish().await
}

#[tokio::test]
async fn a_rolling_update_never_has_two_leaders() -> Result<()> {
    let Some(cluster) = shared_or_skip("a_rolling_update_never_has_two_leaders") else {
        return Ok(());
    };
    let _one = ONE_AT_A_TIME.lock().await;
    let story = Story::apply(cluster, "").await?;
    story.holder().await?;
    let before: Vec<String> = story
        .running_pods()
        .await?
        .into_iter()
        .filter_map(|p| p.metadata.name)
        .collect();
    let began = Instant::now();
    kubectl(
        cluster,
        &[
            "rollout",
            "restart",
            "deployment/leaderz-example",
            "-n",
            &story.ns,
        ],
    )?;
    kubectl(
        cluster,
        &[
            "rollout",
            "status",
            "deployment/leaderz-example",
            "-n",
            &story.ns,
            "--timeout=300s",
        ],
    )?;
    story.wait_ready(3).await?;
    let after = story.holder().await?;
    println!("rollout finished in {:.1}s", began.elapsed().as_secs_f64());
    assert!(!before.contains(&after), "an old pod still leads: {after}");
    sleep(Duration::from_secs(2)).await;

    // Leadership intervals from the pods' own logs: none overlaps the next.
    let terms = story.terms();
    println!("terms (pod, start, end):");
    for (pod, start, end) in &terms {
        println!("  {pod} {start} -> {end:?}");
    }
    ensure!(
        terms.len() >= 2,
        "the rollout moved no leadership: {terms:?}"
    );
    let mut gaps = Vec::new();
    for pair in terms.windows(2) {
        let (prev, next) = (&pair[0], &pair[1]);
        let prev_end = prev
            .2
            .with_context(|| format!("{} still leads while {} does", prev.0, next.0))?;
        assert!(
            prev_end <= next.1,
            "two leaders: {} until {prev_end}, {} from {}",
            prev.0,
            next.0,
            next.1
        );
        gaps.push(next.1.duration_since(prev_end).unsigned_abs());
    }
    assert!(
        terms.iter().filter(|t| t.2.is_none()).count() <= 1,
        "{terms:?}"
    );
    // And no pod works outside its own terms.
    for (pod, lines) in story.logs.by_pod() {
        for line in lines.iter().filter(|l| l.text.contains("working...")) {
            let at = line.app_time();
            let inside = terms.iter().any(|(p, start, end)| {
                *p == pod && *start <= at && end.is_none_or(|end| at <= end)
            });
            assert!(inside, "{pod} worked at {at} outside its terms {terms:?}");
        }
    }
    // The Lease history agrees: one holder at a time, the last one leads.
    let holders: Vec<String> = story
        .lease
        .history()
        .into_iter()
        .map(|v| v.holder)
        .filter(|h| !h.is_empty())
        .fold(Vec::new(), |mut seq, h| {
            if seq.last() != Some(&h) {
                seq.push(h);
            }
            seq
        });
    let from_logs: Vec<String> = terms.iter().map(|t| t.0.clone()).collect();
    assert_eq!(
        holders.last(),
        from_logs.last(),
        "{holders:?} vs {from_logs:?}"
    );
    println!(
        "rollout: {} leadership changes, leaderless gaps {}",
        gaps.len(),
        gaps.iter().map(|d| ms(*d)).collect::<Vec<_>>().join(", ")
    );
    story.assert_no_forbidden();
    story.finish().await
}

#[tokio::test]
async fn scaling_to_zero_releases_the_lease_and_back_to_three_takes_it() -> Result<()> {
    let Some(cluster) = shared_or_skip("scaling_to_zero_releases_the_lease") else {
        return Ok(());
    };
    let _one = ONE_AT_A_TIME.lock().await;
    let story = Story::apply(cluster, "").await?;
    let old = story.holder().await?;
    kubectl(
        cluster,
        &[
            "scale",
            "deployment/leaderz-example",
            "--replicas=0",
            "-n",
            &story.ns,
        ],
    )?;
    let released = story
        .lease
        .wait_for(
            "the release on the way down",
            Duration::from_secs(60),
            |h| h.is_none(),
        )
        .await?;
    assert!(released.renew_time.is_some());
    let deadline = Instant::now() + Duration::from_secs(60);
    while !story
        .pods()
        .list(&ListParams::default().labels(APP))
        .await?
        .items
        .is_empty()
    {
        ensure!(Instant::now() < deadline, "pods left after scaling to 0");
        sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(story.lease.holder(), None, "released and nobody took it");
    println!("scaled to 0: {old} released the lease");

    kubectl(
        cluster,
        &[
            "scale",
            "deployment/leaderz-example",
            "--replicas=3",
            "-n",
            &story.ns,
        ],
    )?;
    story.wait_ready(3).await?;
    let new = story.holder().await?;
    let names: Vec<String> = story
        .running_pods()
        .await?
        .into_iter()
        .filter_map(|p| p.metadata.name)
        .collect();
    assert!(names.contains(&new) && new != old, "{new} among {names:?}");
    println!("scaled to 3: {new} took the lease");
    story.finish().await
}

/// `GET /` on `addr`, from inside the pod network.
async fn get_root(cluster: &Cluster, addr: SocketAddr) -> Result<serde_json::Value> {
    let mut stream = cluster.connect(addr).await?;
    stream
        .write_all(format!("GET / HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes())
        .await?;
    let mut response = String::new();
    stream.read_to_string(&mut response).await?;
    let (head, body) = response.split_once("\r\n\r\n").context("no HTTP body")?;
    ensure!(
        head.starts_with("HTTP/1.0 200") || head.starts_with("HTTP/1.1 200"),
        "{head}"
    );
    Ok(serde_json::from_str(body)?)
}

#[tokio::test]
async fn the_sidecar_says_who_leads_to_its_app_and_to_the_pod_network() -> Result<()> {
    let Some(cluster) = shared_or_skip("the_sidecar_says_who_leads") else {
        return Ok(());
    };
    let _one = ONE_AT_A_TIME.lock().await;
    let story = Story::apply(cluster, "sidecar").await?;
    let holder = story.holder().await?;
    let pods = story.running_pods().await?;
    let mut answers = BTreeMap::new();
    for pod in &pods {
        let spec = pod.spec.as_ref().unwrap();
        let sidecar = &spec.init_containers.as_ref().unwrap()[0];
        assert_eq!(
            sidecar.restart_policy.as_deref(),
            Some("Always"),
            "a native sidecar"
        );
        let ip = pod
            .status
            .as_ref()
            .unwrap()
            .pod_ip
            .clone()
            .context("no pod IP")?;
        let answer = get_root(cluster, SocketAddr::new(ip.parse()?, 4040)).await?;
        answers.insert(pod.metadata.name.clone().unwrap(), answer["name"].clone());
    }
    println!("GET / on each pod's sidecar: {answers:?}");
    assert!(answers.values().all(|name| *name == holder), "{answers:?}");

    // The holder's app container works; the others' follow.
    sleep(Duration::from_secs(3)).await;
    for (pod, lines) in story.logs.by_pod() {
        let app: Vec<&LogLine> = lines.iter().filter(|l| l.container == "app").collect();
        let works = app.iter().any(|l| l.text.contains("working..."));
        assert_eq!(works, pod == holder, "{pod}: {app:#?}");
    }
    story.assert_no_forbidden();
    story.finish().await
}
