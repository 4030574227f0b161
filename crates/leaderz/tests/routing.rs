//! Traffic to the leader (`leaderz::routing`) against a real kube-apiserver + etcd: the
//! pod label and the EndpointSlice follow the Lease's holder, are taken back after the
//! work stopped and before the release, are taken over from a crashed leader, stale ones
//! are cleared at startup, and the shipped Roles in `kube/label-pod/` and
//! `kube/leader-endpoints/` are enough (and a verb less is named).
//!
//! Orderings are judged on the objects' resourceVersions: one etcd numbers every write
//! of the cluster in one sequence, so merging the watched histories of the Lease, the pods
//! and the slice by resourceVersion gives the order in which the writes happened.

#![allow(clippy::unwrap_used)] // tests: a panic is the failure report

mod tap;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use http::Method;
use k8s_openapi::api::authorization::v1::ResourceAttributes;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::api::rbac::v1::{Role, RoleBinding};
use kube::api::{Patch, PatchParams, PostParams};
use kube::runtime::watcher;
use kube::{Api, Client};
use leaderz::routing::{
    HOLDER_ANNOTATION, LEASE_ANNOTATION, LeaderEndpoints, PodLabel, RouteError, Routes,
    TOKEN_ANNOTATION,
};
use leaderz::{ElectionConfig, ElectionHandle, Elector, LeaseLock};
use leaderz_testenv::ControlPlane;
use tokio::task::JoinHandle;
use tokio::time::{Instant, sleep, timeout};

const LEASE: &str = "my-lock";
const KEY: &str = "leaderz.io/role";
const VALUE: &str = "leader";
/// The Service (and slice) name the shipped Role names.
const SERVICE: &str = "leaderz-leader";
/// How long a candidate's work takes to stop after its term ended.
const WORK_STOPS_IN: Duration = Duration::from_millis(300);

fn config(id: &str) -> ElectionConfig {
    ElectionConfig::new(id)
        .lease_duration(Duration::from_secs(3))
        .renew_deadline(Duration::from_secs(2))
        .retry_period(Duration::from_millis(500))
        .request_timeout(Duration::from_secs(2))
}

fn ip(id: &str) -> String {
    // Documentation addresses (TEST-NET-1): only written into objects, never contacted.
    format!("192.0.2.{}", id.as_bytes()[0] - b'a' + 1)
}

async fn create_pod(client: &Client, ns: &str, name: &str) {
    let pod: Pod = serde_json::from_value(serde_json::json!({
        "metadata": { "name": name },
        "spec": { "containers": [{ "name": "app", "image": "leaderz:0.1.0" }] },
    }))
    .unwrap();
    Api::<Pod>::namespaced(client.clone(), ns)
        .create(&PostParams::default(), &pod)
        .await
        .unwrap();
}

async fn create_service(client: &Client, ns: &str) {
    let service: Service = serde_yaml::from_str(
        &std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../kube/leader-endpoints/service.yaml"
        ))
        .unwrap(),
    )
    .unwrap();
    Api::<Service>::namespaced(client.clone(), ns)
        .create(&PostParams::default(), &service)
        .await
        .unwrap();
}

fn routes_for(client: &Client, ns: &str, id: &str, label: bool, slice: bool) -> Routes {
    let mut routes = Routes::new().call_timeout(Duration::from_secs(2));
    if label {
        routes = routes.label_pod(PodLabel::new(client.clone(), ns, id, KEY, VALUE).unwrap());
    }
    if slice {
        routes = routes.leader_endpoints(
            LeaderEndpoints::new(client.clone(), ns, SERVICE, id, &ip(id)).unwrap(),
        );
    }
    routes
}

/// What the work saw as it stopped: whether its route was still in place (it must be:
/// the route goes only after the work stopped; had it gone before, this read, made
/// after the work stopped, would show it gone).
#[derive(Clone, Debug)]
struct WorkStopped {
    id: String,
    still_routed: bool,
}

/// A candidate: an elector, and a task that for each term routes traffic here, lets the
/// "work" run until the term ends, takes `WORK_STOPS_IN` to stop it, reads whether its
/// route is still in place, and only then drops the routing and the term.
///
/// Each candidate runs on a runtime of its own, so that a crash can take every one of its
/// tasks at once (the routing task included), as a process's death does.
struct Candidate {
    id: String,
    handle: ElectionHandle,
    task: JoinHandle<()>,
    runtime: tokio::runtime::Runtime,
}

impl Candidate {
    /// Starts candidate `id` acting as `who` (admin credentials when `None`).
    async fn start(
        who: Option<&leaderz_testenv::Credentials>,
        ns: &str,
        id: &str,
        label: bool,
        slice: bool,
        stops: Arc<Mutex<Vec<WorkStopped>>>,
    ) -> Self {
        let cp = ControlPlane::shared().unwrap();
        let credentials = who.cloned().unwrap_or_else(|| cp.admin_credentials());
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        // A client of its own, made on its runtime: its connections die with it. (The
        // runtime is entered only where nothing is awaited: other tasks of the test's
        // runtime must not spawn onto it.)
        let client = {
            let _inside = runtime.enter();
            cp.client(&credentials).unwrap()
        };
        let routes = routes_for(&client, ns, id, label, slice);
        let prepare = routes.clone();
        let me = id.to_owned();
        runtime
            .spawn(async move { prepare.prepare(&me).await })
            .await
            .unwrap()
            .unwrap();
        // The test's own reads go as admin (the candidate may be a restricted identity).
        let admin = cp.admin_client().unwrap();
        let pods: Api<Pod> = Api::namespaced(admin.clone(), ns);
        let slices: Api<EndpointSlice> = Api::namespaced(admin, ns);
        let me = id.to_owned();
        let _inside = runtime.enter();
        let handle = Elector::new(LeaseLock::new(client.clone(), ns, LEASE), config(id))
            .unwrap()
            .spawn();
        let mut terms = handle.terms();
        let task = tokio::spawn(async move {
            while let Ok(term) = terms.acquired().await {
                let routed = routes.route(&term);
                term.cancelled().await;
                sleep(WORK_STOPS_IN).await;
                let label_on = !label || labelled(&pods.get(&me).await.unwrap());
                let slice_on = !slice
                    || slices
                        .get_opt(SERVICE)
                        .await
                        .unwrap()
                        .is_some_and(|s| s.endpoints.iter().any(|e| e.addresses == [ip(&me)]));
                stops.lock().unwrap().push(WorkStopped {
                    id: me.clone(),
                    still_routed: label_on && slice_on,
                });
                // Dropped, not finished, and the term with it: the routing task's own
                // clone of the term is all that holds the release back.
                drop(routed);
                drop(term);
            }
        });
        drop(_inside);
        Self {
            id: id.to_owned(),
            handle,
            task,
            runtime,
        }
    }

    /// A crash: every task of the candidate vanishes at once, nothing is cleaned up.
    fn crash(self) {
        self.runtime.shutdown_background();
    }

    async fn shutdown(self) {
        self.handle.shutdown().await.unwrap();
        let _ = timeout(Duration::from_secs(10), self.task).await;
        self.runtime.shutdown_background();
    }
}

fn rv(meta: &kube::api::ObjectMeta) -> u64 {
    meta.resource_version.as_deref().unwrap().parse().unwrap()
}

fn labelled(pod: &Pod) -> bool {
    pod.metadata
        .labels
        .as_ref()
        .and_then(|l| l.get(KEY))
        .is_some_and(|v| v == VALUE)
}

/// One write, as the watches saw it.
#[derive(Clone, Debug)]
enum Seen {
    Holder(String),
    Pod { name: String, labelled: bool },
    Slice { ips: Vec<String>, holder: String },
}

/// The histories of the Lease, the pods and the slice of a namespace.
#[derive(Clone, Default)]
struct Recorder(Arc<Mutex<BTreeMap<u64, (Seen, Instant)>>>);

impl Recorder {
    fn start(client: &Client, ns: &str) -> (Self, Vec<JoinHandle<()>>) {
        let rec = Self::default();
        let cfg = watcher::Config::default;
        let mut tasks = Vec::new();
        let r = rec.clone();
        let leases: Api<Lease> = Api::namespaced(client.clone(), ns);
        tasks.push(tokio::spawn(async move {
            let mut s = watcher::watcher(leases, cfg()).boxed();
            while let Some(Ok(e)) = s.next().await {
                if let watcher::Event::Apply(l) | watcher::Event::InitApply(l) = e {
                    let holder = l.spec.and_then(|s| s.holder_identity).unwrap_or_default();
                    r.put(rv(&l.metadata), Seen::Holder(holder));
                }
            }
        }));
        let r = rec.clone();
        let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
        tasks.push(tokio::spawn(async move {
            let mut s = watcher::watcher(pods, cfg()).boxed();
            while let Some(Ok(e)) = s.next().await {
                if let watcher::Event::Apply(p) | watcher::Event::InitApply(p) = e {
                    let seen = Seen::Pod {
                        name: p.metadata.name.clone().unwrap(),
                        labelled: labelled(&p),
                    };
                    r.put(rv(&p.metadata), seen);
                }
            }
        }));
        let r = rec.clone();
        let slices: Api<EndpointSlice> = Api::namespaced(client.clone(), ns);
        tasks.push(tokio::spawn(async move {
            let mut s = watcher::watcher(slices, cfg()).boxed();
            while let Some(Ok(e)) = s.next().await {
                if let watcher::Event::Apply(s) | watcher::Event::InitApply(s) = e {
                    let holder = s
                        .metadata
                        .annotations
                        .as_ref()
                        .and_then(|a| a.get(HOLDER_ANNOTATION).cloned())
                        .unwrap_or_default();
                    let ips = s
                        .endpoints
                        .iter()
                        .flat_map(|e| e.addresses.clone())
                        .collect();
                    r.put(rv(&s.metadata), Seen::Slice { ips, holder });
                }
            }
        }));
        (rec, tasks)
    }

    fn put(&self, version: u64, seen: Seen) {
        self.0
            .lock()
            .unwrap()
            .entry(version)
            .or_insert((seen, Instant::now()));
    }

    fn history(&self) -> Vec<(u64, Seen, Instant)> {
        self.0
            .lock()
            .unwrap()
            .iter()
            .map(|(v, (s, t))| (*v, s.clone(), *t))
            .collect()
    }

    async fn wait_for(&self, what: &str, f: impl Fn(&State) -> bool) {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if f(&State::replay(&self.history()).0) {
                return;
            }
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            sleep(Duration::from_millis(10)).await;
        }
    }
}

/// The state after a prefix of the history.
#[derive(Clone, Debug, Default)]
struct State {
    holder: String,
    labelled: BTreeSet<String>,
    slice: Vec<String>,
    slice_holder: String,
}

/// A moment at which traffic pointed at someone other than the holder.
#[derive(Debug)]
struct Stray {
    version: u64,
    at: Instant,
    holder: String,
    /// Who was pointed at although not holding.
    pointed: BTreeSet<String>,
}

impl State {
    /// Replays `history`; returns the final state and every moment at which a label or
    /// the slice pointed at a pod that did not hold the Lease.
    fn replay(history: &[(u64, Seen, Instant)]) -> (Self, Vec<Stray>) {
        let mut s = State::default();
        let mut strays = Vec::new();
        for (version, seen, at) in history {
            match seen {
                Seen::Holder(h) => s.holder.clone_from(h),
                Seen::Pod { name, labelled } => {
                    if *labelled {
                        s.labelled.insert(name.clone());
                    } else {
                        s.labelled.remove(name);
                    }
                }
                Seen::Slice { ips, holder } => {
                    s.slice.clone_from(ips);
                    s.slice_holder.clone_from(holder);
                }
            }
            let mut pointed: BTreeSet<String> = s
                .labelled
                .iter()
                .filter(|p| **p != s.holder)
                .cloned()
                .collect();
            if !s.slice.is_empty() && s.slice != [ip_of(&s.holder)] {
                pointed.insert(format!("slice:{}", s.slice.join(",")));
            }
            if !pointed.is_empty() {
                strays.push(Stray {
                    version: *version,
                    at: *at,
                    holder: s.holder.clone(),
                    pointed,
                });
            }
        }
        (s, strays)
    }
}

fn ip_of(holder: &str) -> String {
    if holder.is_empty() {
        String::new()
    } else {
        ip(holder)
    }
}

/// Waits until one of `candidates` leads and returns its index.
async fn leader(candidates: &[Candidate]) -> usize {
    timeout(Duration::from_secs(20), async {
        loop {
            if let Some(i) = candidates.iter().position(|c| c.handle.is_leader()) {
                return i;
            }
            sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .expect("no leader within 20 s")
}

/// For a graceful step-down of `id` (whose term ended after `from`): the version at
/// which its label went / its slice was emptied, and the release that followed.
fn step_down_versions(history: &[(u64, Seen, Instant)], id: &str, from: u64) -> (u64, u64) {
    let mut removed = None;
    let mut release = None;
    for (v, seen, _) in history.iter().filter(|(v, _, _)| *v > from) {
        match seen {
            Seen::Pod {
                name,
                labelled: false,
            } if name == id && removed.is_none() => {
                removed = Some(*v);
            }
            Seen::Slice { ips, holder } if ips.is_empty() && holder == id && removed.is_none() => {
                removed = Some(*v);
            }
            Seen::Holder(h) if h.is_empty() && release.is_none() => release = Some(*v),
            _ => {}
        }
    }
    (
        removed.unwrap_or_else(|| panic!("{id}'s route was never taken back after {from}")),
        release.unwrap_or_else(|| panic!("{id} never released after {from}")),
    )
}

/// Three candidates; `graceful` handovers by shutdown (each followed by a new
/// candidate), then a crash of the leader. Checks, on the merged history: traffic never
/// points at a non-holder except a crashed leader's until its successor takes it over;
/// each graceful step-down took the route back after the work stopped and before the
/// release. Prints the windows.
async fn handovers(label: bool, slice: bool, what: &str) {
    let cp = ControlPlane::shared().unwrap();
    let ns = cp.new_namespace(what).await.unwrap();
    let client = cp.admin_client().unwrap();
    let names = ["a", "b", "c", "d", "e", "f", "g"];
    for name in names {
        create_pod(&client, &ns, name).await;
    }
    if slice {
        create_service(&client, &ns).await;
    }
    let (rec, watchers) = Recorder::start(&client, &ns);
    sleep(Duration::from_millis(300)).await;
    let stops = Arc::new(Mutex::new(Vec::new()));
    let mut next = names.iter();
    let mut candidates = Vec::new();
    for _ in 0..3 {
        let id = next.next().unwrap();
        candidates.push(Candidate::start(None, &ns, id, label, slice, stops.clone()).await);
    }
    let mut gaps = Vec::new();
    for round in 0..3 {
        let i = leader(&candidates).await;
        let id = candidates[i].id.clone();
        let pointed =
            |s: &State| (!label || s.labelled.contains(&id)) && (!slice || s.slice == [ip(&id)]);
        rec.wait_for(&format!("traffic to {id}"), pointed).await;
        let before = rec.history().last().unwrap().0;
        let stopping = Instant::now();
        candidates.remove(i).shutdown().await;
        let took = stopping.elapsed();
        let j = leader(&candidates).await;
        let new = candidates[j].id.clone();
        let pointed_new =
            |s: &State| (!label || s.labelled.contains(&new)) && (!slice || s.slice == [ip(&new)]);
        rec.wait_for(&format!("traffic to {new}"), pointed_new)
            .await;
        let history = rec.history();
        let (removed, released) = step_down_versions(&history, &id, before);
        let stop = stops
            .lock()
            .unwrap()
            .iter()
            .find(|s| s.id == id)
            .cloned()
            .unwrap();
        assert!(
            stop.still_routed,
            "{id}'s route was taken back before its work stopped"
        );
        assert!(
            removed < released,
            "{id}: released (version {released}) before its route was taken back (version {removed})"
        );
        // The gap: from the route taken back to the new leader's route in place.
        let at = |v: u64| history.iter().find(|h| h.0 == v).unwrap().2;
        let back = history
            .iter()
            .filter(|(v, _, _)| *v > released)
            .find(|(_, seen, _)| match seen {
                Seen::Pod { name, labelled } => *labelled && *name == new,
                Seen::Slice { ips, .. } => *ips == [ip(&new)],
                Seen::Holder(_) => false,
            })
            .unwrap();
        let gap = back.2.duration_since(at(removed));
        println!(
            "{what} round {round}: {id} -> {new}: work stopped < route taken back (v{removed}) < released (v{released}) < {new}'s route (v{}); shutdown took {took:?}; nobody pointed at for {gap:?}",
            back.0
        );
        gaps.push(gap);
        let id = next.next().unwrap();
        candidates.push(Candidate::start(None, &ns, id, label, slice, stops.clone()).await);
    }

    // A crash: the leader vanishes with its route in place; the next leader takes the
    // route over (the slice: its first write; the label: it takes it off the crashed pod).
    let i = leader(&candidates).await;
    let crashed = candidates[i].id.clone();
    let pointed = |s: &State| {
        (!label || s.labelled.contains(&crashed)) && (!slice || s.slice == [ip(&crashed)])
    };
    rec.wait_for(&format!("traffic to {crashed}"), pointed)
        .await;
    candidates.remove(i).crash();
    let crashed_at = Instant::now();
    let j = leader(&candidates).await;
    let new = candidates[j].id.clone();
    let over = |s: &State| {
        (!label || (s.labelled.contains(&new) && !s.labelled.contains(&crashed)))
            && (!slice || s.slice == [ip(&new)])
    };
    rec.wait_for(&format!("{new} taking traffic over from {crashed}"), over)
        .await;
    println!(
        "{what}: crash of {crashed}: {new} leads and has traffic {:?} after the crash",
        crashed_at.elapsed()
    );

    for c in candidates {
        c.shutdown().await;
    }
    sleep(Duration::from_millis(300)).await;
    for w in watchers {
        w.abort();
    }

    // Never pointed at a non-holder, except the crashed leader between its successor's
    // taking write and the successor's route.
    let history = rec.history();
    let (end, strays) = State::replay(&history);
    let taken = history
        .iter()
        .find(|(_, s, _)| matches!(s, Seen::Holder(h) if *h == new))
        .map(|h| h.0)
        .unwrap();
    let mut crash_window: Option<(Instant, Instant)> = None;
    for stray in &strays {
        let only_crashed = stray
            .pointed
            .iter()
            .all(|p| *p == crashed || *p == format!("slice:{}", ip(&crashed)));
        assert!(
            only_crashed && stray.holder == new && stray.version >= taken,
            "traffic pointed at {:?} while {:?} held the Lease (version {}); history: {history:#?}",
            stray.pointed,
            stray.holder,
            stray.version
        );
        let w = crash_window.get_or_insert((stray.at, stray.at));
        w.1 = stray.at;
    }
    if let Some((from, to)) = crash_window {
        let until_fixed = history
            .iter()
            .find(|(v, _, t)| *v > taken && *t > to)
            .map_or(Duration::ZERO, |h| h.2.duration_since(from));
        println!(
            "{what}: the crashed {crashed} was pointed at while {new} held the Lease for {until_fixed:?} (from {new}'s taking write to its route)"
        );
    }
    assert!(end.labelled.is_empty() && end.slice.is_empty(), "{end:?}");
    gaps.sort();
    println!("{what}: graceful gaps (route taken back -> next route in place): {gaps:?}");
}

#[tokio::test]
async fn the_pod_label_follows_the_holder_and_goes_after_the_work_before_the_release() {
    handovers(true, false, "label").await;
}

#[tokio::test]
async fn the_endpoint_slice_follows_the_holder_and_is_emptied_after_the_work_before_the_release() {
    handovers(false, true, "slice").await;
}

#[tokio::test]
async fn stale_routes_of_a_previous_container_are_cleared_before_campaigning() {
    let cp = ControlPlane::shared().unwrap();
    let ns = cp.new_namespace("stale").await.unwrap();
    let client = cp.admin_client().unwrap();
    create_pod(&client, &ns, "a").await;
    create_pod(&client, &ns, "b").await;
    create_service(&client, &ns).await;
    // What a crashed leader `a` left: its label and a slice pointing at it (term 7), and
    // b carries a label too (b's own, untouched by a).
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns);
    let stamp = serde_json::json!({ "metadata": {
        "labels": { KEY: VALUE },
        "annotations": { HOLDER_ANNOTATION: "a", TOKEN_ANNOTATION: "7" },
    }});
    for p in ["a", "b"] {
        pods.patch(p, &PatchParams::default(), &Patch::Merge(&stamp))
            .await
            .unwrap();
    }
    let slice: EndpointSlice = serde_json::from_value(serde_json::json!({
        "metadata": { "name": SERVICE, "labels": { "kubernetes.io/service-name": SERVICE },
                      "annotations": { HOLDER_ANNOTATION: "a", TOKEN_ANNOTATION: "7" } },
        "addressType": "IPv4",
        "endpoints": [{ "addresses": [ip("a")] }],
    }))
    .unwrap();
    let slices: Api<EndpointSlice> = Api::namespaced(client.clone(), &ns);
    slices.create(&PostParams::default(), &slice).await.unwrap();

    // b starting does not touch a's routes.
    routes_for(&client, &ns, "b", true, true)
        .prepare("b")
        .await
        .unwrap();
    assert!(
        !labelled(&pods.get("b").await.unwrap()),
        "b's own stale label is cleared"
    );
    assert!(labelled(&pods.get("a").await.unwrap()));
    assert_eq!(slices.get(SERVICE).await.unwrap().endpoints.len(), 1);
    // a's restarted container clears both before it campaigns.
    routes_for(&client, &ns, "a", true, true)
        .prepare("a")
        .await
        .unwrap();
    assert!(!labelled(&pods.get("a").await.unwrap()));
    assert!(slices.get(SERVICE).await.unwrap().endpoints.is_empty());
}

/// A leader never overwrites a slice stamped with a newer term (a deposed leader's late
/// write), and a leader that steps down never empties its successor's slice.
#[tokio::test]
async fn an_old_term_never_overwrites_or_empties_a_newer_terms_slice() {
    let cp = ControlPlane::shared().unwrap();
    let ns = cp.new_namespace("fenced").await.unwrap();
    let client = cp.admin_client().unwrap();
    create_pod(&client, &ns, "a").await;
    create_service(&client, &ns).await;
    let slices: Api<EndpointSlice> = Api::namespaced(client.clone(), &ns);
    let lease = format!("{ns}/{LEASE}");
    let newer = |token: &str| {
        serde_json::json!({
            "metadata": { "name": SERVICE, "labels": { "kubernetes.io/service-name": SERVICE },
                          "annotations": { HOLDER_ANNOTATION: "z", TOKEN_ANNOTATION: token,
                                           "leaderz.io/lease": lease } },
            "addressType": "IPv4",
            "endpoints": [{ "addresses": ["192.0.2.26"] }],
        })
    };
    // A slice of term 5 of `z`; `a` takes the Lease with token 0: it must not overwrite.
    let slice: EndpointSlice = serde_json::from_value(newer("5")).unwrap();
    slices.create(&PostParams::default(), &slice).await.unwrap();
    let stops = Arc::new(Mutex::new(Vec::new()));
    let a = Candidate::start(None, &ns, "a", false, true, stops.clone()).await;
    leader(std::slice::from_ref(&a)).await;
    sleep(Duration::from_secs(1)).await;
    let s = slices.get(SERVICE).await.unwrap();
    assert_eq!(
        s.endpoints[0].addresses,
        ["192.0.2.26"],
        "a newer term's slice was overwritten"
    );
    // And stepping down, a leaves z's slice alone.
    a.shutdown().await;
    let s = slices.get(SERVICE).await.unwrap();
    assert_eq!(
        s.endpoints[0].addresses,
        ["192.0.2.26"],
        "a emptied another term's slice"
    );

    // An older term's slice (token below a's next term) is taken over.
    let mut old: EndpointSlice = serde_json::from_value(newer("0")).unwrap();
    old.metadata.resource_version = s.metadata.resource_version.clone();
    slices
        .replace(SERVICE, &PostParams::default(), &old)
        .await
        .unwrap();
    let a = Candidate::start(None, &ns, "a", false, true, stops).await;
    leader(std::slice::from_ref(&a)).await;
    timeout(Duration::from_secs(5), async {
        while slices.get(SERVICE).await.unwrap().endpoints[0].addresses != [ip("a")] {
            sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("the leader did not take over an older term's slice");
    a.shutdown().await;
}

/// Applies a Role file from `kube/` in `ns`, without `drop_verb`, bound to `sa`.
async fn grant(cp: &ControlPlane, ns: &str, file: &str, sa: &str, drop_verb: Option<&str>) {
    let admin = cp.admin_client().unwrap();
    let path = format!("{}/../../kube/{file}", env!("CARGO_MANIFEST_DIR"));
    let mut role: Role = serde_yaml::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    role.metadata.namespace = Some(ns.into());
    if let Some(verb) = drop_verb {
        for rule in role.rules.iter_mut().flatten() {
            rule.verbs.retain(|v| v != verb);
        }
        if let Some(rules) = &mut role.rules {
            rules.retain(|r| !r.verbs.is_empty());
        }
    }
    let role_name = role.metadata.name.clone().unwrap();
    Api::<Role>::namespaced(admin.clone(), ns)
        .create(&PostParams::default(), &role)
        .await
        .unwrap();
    let binding: RoleBinding = serde_json::from_value(serde_json::json!({
        "metadata": { "name": format!("{role_name}-{sa}") },
        "roleRef": { "apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": role_name },
        "subjects": [{ "kind": "ServiceAccount", "name": sa, "namespace": ns }],
    }))
    .unwrap();
    Api::<RoleBinding>::namespaced(admin, ns)
        .create(&PostParams::default(), &binding)
        .await
        .unwrap();
}

async fn wait_allowed(client: &Client, ns: &str, group: &str, resource: &str, verb: &str) {
    let attributes = ResourceAttributes {
        group: Some(group.into()),
        resource: Some(resource.into()),
        verb: Some(verb.into()),
        namespace: Some(ns.into()),
        ..Default::default()
    };
    leaderz_testenv::wait_until_allowed(client, attributes, Duration::from_secs(10))
        .await
        .unwrap();
}

/// The ServiceAccount with only `kube/role.yaml` and the feature's Role: the routes work
/// (a leader labels its pod / points the slice), and with a verb less `prepare` names it.
#[tokio::test]
async fn the_shipped_roles_are_enough_and_a_missing_verb_is_named() {
    let cp = ControlPlane::shared().unwrap();
    let admin = cp.admin_client().unwrap();
    for (file, label, slice, verbs) in [
        (
            "label-pod/role.yaml",
            true,
            false,
            &["get", "patch", "list"][..],
        ),
        (
            "leader-endpoints/role.yaml",
            false,
            true,
            &["get", "update", "create"][..],
        ),
    ] {
        // The whole Role: the feature works for a restricted identity.
        let ns = cp.new_namespace("rbac-routes").await.unwrap();
        let creds = cp
            .service_account_credentials(&ns, "leaderz-example", Duration::from_secs(3600))
            .await
            .unwrap();
        let sa = cp.client(&creds).unwrap();
        grant(cp, &ns, "role.yaml", "leaderz-example", None).await;
        grant(cp, &ns, file, "leaderz-example", None).await;
        wait_allowed(&sa, &ns, "coordination.k8s.io", "leases", "create").await;
        if label {
            wait_allowed(&sa, &ns, "", "pods", "patch").await;
        } else {
            wait_allowed(&sa, &ns, "discovery.k8s.io", "endpointslices", "create").await;
        }
        create_pod(&admin, &ns, "a").await;
        create_pod(&admin, &ns, "b").await;
        create_service(&admin, &ns).await;
        let stops = Arc::new(Mutex::new(Vec::new()));
        let a = Candidate::start(Some(&creds), &ns, "a", label, slice, stops.clone()).await;
        leader(std::slice::from_ref(&a)).await;
        let pods: Api<Pod> = Api::namespaced(admin.clone(), &ns);
        let slices: Api<EndpointSlice> = Api::namespaced(admin.clone(), &ns);
        timeout(Duration::from_secs(10), async {
            loop {
                let done = if label {
                    labelled(&pods.get("a").await.unwrap())
                } else {
                    slices.get_opt(SERVICE).await.unwrap().is_some_and(|s| {
                        s.endpoints
                            .first()
                            .is_some_and(|e| e.addresses == [ip("a")])
                    })
                };
                if done {
                    break;
                }
                sleep(Duration::from_millis(20)).await;
            }
        })
        .await
        .unwrap_or_else(|_| panic!("{file}: the restricted identity could not route"));
        // `b` (the label Role has `list`): after a crash of `a`, b takes the label off it.
        let b = Candidate::start(Some(&creds), &ns, "b", label, slice, stops.clone()).await;
        a.crash();
        leader(std::slice::from_ref(&b)).await;
        if label {
            timeout(Duration::from_secs(10), async {
                while labelled(&pods.get("a").await.unwrap()) {
                    sleep(Duration::from_millis(20)).await;
                }
            })
            .await
            .expect("the new leader did not take the label off the crashed pod");
        }
        b.shutdown().await;
        println!("{file}: enough for a restricted identity");

        // Each verb less: `prepare` refuses before campaigning, naming the grant.
        for verb in verbs {
            let ns = cp.new_namespace("rbac-less").await.unwrap();
            let sa = cp
                .service_account_client(&ns, "leaderz-example")
                .await
                .unwrap();
            grant(cp, &ns, "role.yaml", "leaderz-example", None).await;
            grant(cp, &ns, file, "leaderz-example", Some(verb)).await;
            wait_allowed(&sa, &ns, "coordination.k8s.io", "leases", "create").await;
            create_pod(&admin, &ns, "a").await;
            create_service(&admin, &ns).await;
            let routes = routes_for(&sa, &ns, "a", label, slice);
            let result = routes.prepare("a").await;
            if *verb == "list" {
                // Optional: a warning, and the rest works.
                result.unwrap();
                continue;
            }
            let err = result.unwrap_err();
            let msg = err.to_string();
            println!("{file} without `{verb}`: {msg}");
            assert!(matches!(err, RouteError::Forbidden { .. }), "{msg}");
            assert!(
                msg.contains(&format!("grant `{verb}` on `"))
                    && msg.contains(&format!("in namespace `{ns}`"))
                    && msg.contains(&format!("(see kube/{file})")),
                "{msg}"
            );
        }
    }
}

/// Creates Lease `name`, held by nobody, with `leaseTransitions` = `transitions`: the
/// next term's fencing token is `transitions + 1`.
async fn vacant_lease(client: &Client, ns: &str, name: &str, transitions: i32) {
    let lease: Lease = serde_json::from_value(serde_json::json!({
        "metadata": { "name": name },
        "spec": { "holderIdentity": "", "leaseDurationSeconds": 1, "leaseTransitions": transitions },
    }))
    .unwrap();
    Api::<Lease>::namespaced(client.clone(), ns)
        .create(&PostParams::default(), &lease)
        .await
        .unwrap();
}

/// Labels pod `name` KEY=VALUE as a leaderz term would, with `stamp` (holder, token,
/// lease), or without a stamp (by hand).
async fn label_by_hand(client: &Client, ns: &str, name: &str, stamp: Option<(&str, i64, &str)>) {
    let annotations = match stamp {
        Some((holder, token, lease)) => serde_json::json!({
            HOLDER_ANNOTATION: holder, TOKEN_ANNOTATION: token.to_string(), LEASE_ANNOTATION: lease,
        }),
        None => serde_json::json!({}),
    };
    let patch = serde_json::json!({ "metadata": {
        "labels": { KEY: VALUE }, "annotations": annotations,
    }});
    Api::<Pod>::namespaced(client.clone(), ns)
        .patch(name, &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .unwrap();
}

/// A candidate of `lease` that routes each term with `routes` (the work waits for the
/// term to end). Returns the token that stops it and its task.
fn campaign(
    client: &Client,
    ns: &str,
    lease: &str,
    id: &str,
    routes: Routes,
) -> (tokio_util::sync::CancellationToken, JoinHandle<()>) {
    let mut handle = Elector::new(LeaseLock::new(client.clone(), ns, lease), config(id))
        .unwrap()
        .spawn();
    let stop = handle.shutdown_token();
    let task = tokio::spawn(async move {
        leaderz::routing::run_while_leading(&mut handle, &routes, |term| async move {
            term.cancelled().await;
        })
        .await
        .unwrap();
    });
    (stop, task)
}

async fn until(what: &str, within: Duration, mut f: impl AsyncFnMut() -> bool) {
    timeout(within, async {
        while !f().await {
            sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .unwrap_or_else(|_| panic!("timed out waiting for {what}"));
}

/// Review finding 1 (a new leader stripped the leader label from OTHER elections'
/// pods): two elections in one namespace use the same label; a term of one takes the
/// label off a pod of an older term of its OWN Lease only, and leaves the other
/// election's pod, a pod labelled by hand, and a newer term's pod alone.
#[tokio::test]
async fn a_new_term_never_takes_the_label_from_another_elections_pod() {
    let cp = ControlPlane::shared().unwrap();
    let ns = cp.new_namespace("two-elections").await.unwrap();
    let client = cp.admin_client().unwrap();
    for p in ["a", "b", "c", "d", "e"] {
        create_pod(&client, &ns, p).await;
    }
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns);
    // Lease "one": a's term will have token 6.
    vacant_lease(&client, &ns, "one", 5).await;
    let one = format!("{ns}/one");
    // b leads Lease "two" with the same label.
    let (stop_b, task_b) = campaign(
        &client,
        &ns,
        "two",
        "b",
        routes_for(&client, &ns, "b", true, false),
    );
    until("b labelled", Duration::from_secs(10), async || {
        labelled(&pods.get("b").await.unwrap())
    })
    .await;
    // c: labelled by hand. d: an older term of Lease one (a crashed leader's). e: a
    // newer term of Lease one.
    label_by_hand(&client, &ns, "c", None).await;
    label_by_hand(&client, &ns, "d", Some(("d", 3, &one))).await;
    label_by_hand(&client, &ns, "e", Some(("e", 9, &one))).await;
    let version = |p: &Pod| p.metadata.resource_version.clone().unwrap();
    let before: Vec<String> = [
        pods.get("b").await.unwrap(),
        pods.get("c").await.unwrap(),
        pods.get("e").await.unwrap(),
    ]
    .iter()
    .map(version)
    .collect();

    // Two terms of a on Lease one: each sweeps the label's pods.
    for round in 0..2 {
        let (stop_a, task_a) = campaign(
            &client,
            &ns,
            "one",
            "a",
            routes_for(&client, &ns, "a", true, false),
        );
        until("a labelled, d not", Duration::from_secs(10), async || {
            labelled(&pods.get("a").await.unwrap()) && !labelled(&pods.get("d").await.unwrap())
        })
        .await;
        // The sweep goes b, c, d, e in name order: it is past e by now or soon.
        sleep(Duration::from_millis(500)).await;
        for (name, was) in ["b", "c", "e"].iter().zip(&before) {
            let pod = pods.get(name).await.unwrap();
            assert!(
                labelled(&pod),
                "round {round}: a's term took the label off {name}"
            );
            assert_eq!(&version(&pod), was, "round {round}: a's term wrote {name}");
        }
        stop_a.cancel();
        task_a.await.unwrap();
        assert!(!labelled(&pods.get("a").await.unwrap()));
    }
    stop_b.cancel();
    task_b.await.unwrap();
}

/// Review finding 5 (a 404 patching ANOTHER pod was reported as our pod missing and
/// aborted the sweep): a labelled pod of an older term is deleted between the listing
/// and the patch; the sweep carries on with the next pod in the same pass (one listing).
#[tokio::test]
async fn a_pod_deleted_during_the_sweep_is_gone_not_an_error() {
    let cp = ControlPlane::shared().unwrap();
    let ns = cp.new_namespace("sweep-404").await.unwrap();
    let client = cp.admin_client().unwrap();
    for p in ["a", "x", "y"] {
        create_pod(&client, &ns, p).await;
    }
    vacant_lease(&client, &ns, LEASE, 5).await;
    let lease = format!("{ns}/{LEASE}");
    label_by_hand(&client, &ns, "x", Some(("x", 2, &lease))).await;
    label_by_hand(&client, &ns, "y", Some(("y", 3, &lease))).await;
    let (tapped, tap) = tap::Tap::client(cp.config(&cp.admin_credentials()).unwrap());
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns);
    let deleter = pods.clone();
    tap.before(
        Method::PATCH,
        &format!("/api/v1/namespaces/{ns}/pods/x"),
        async move || {
            let now = kube::api::DeleteParams::default().grace_period(0);
            deleter.delete("x", &now).await.unwrap();
            while deleter.get_opt("x").await.unwrap().is_some() {
                sleep(Duration::from_millis(10)).await;
            }
        },
    );
    let (stop, task) = campaign(
        &client,
        &ns,
        LEASE,
        "a",
        routes_for(&tapped, &ns, "a", true, false),
    );
    until(
        "y's stale label removed",
        Duration::from_secs(10),
        async || !labelled(&pods.get("y").await.unwrap()),
    )
    .await;
    assert!(pods.get_opt("x").await.unwrap().is_none());
    // A retry would list again (after 200 ms).
    sleep(Duration::from_millis(800)).await;
    let listings = tap.count(&format!("GET /api/v1/namespaces/{ns}/pods?"));
    assert_eq!(
        listings, 1,
        "the sweep failed on the deleted pod and was retried"
    );
    stop.cancel();
    task.await.unwrap();
}

/// Review finding 2 (a late-landing "set route" write outlived the clean-up): a write of
/// the term's start gets no answer (or a 503) — the API server may still apply it — the
/// term ends, the step-down finds nothing pointing here yet; then the write reaches the
/// API server. It must fail (409): the step-down wrote on the version it read (or took
/// the slice's name first), so nothing points at the old leader after its term.
/// Cases: the label's patch unanswered; the slice's create unanswered while the label's
/// patch is refused outright (the label's error must not hide the slice's unknown
/// outcome); the slice's replace answered with a 503.
#[tokio::test]
async fn a_label_write_whose_answer_was_lost_cannot_land_after_the_step_down() {
    lost_answer("label unanswered").await;
}

/// Review finding 2, the slice's create (see
/// [`a_label_write_whose_answer_was_lost_cannot_land_after_the_step_down`]), with the
/// label side failing otherwise at the same time.
#[tokio::test]
async fn a_slice_create_whose_answer_was_lost_cannot_land_after_the_step_down() {
    lost_answer("create unanswered, label refused").await;
}

/// Review finding 2, the slice's replace answered with a 503 (see
/// [`a_label_write_whose_answer_was_lost_cannot_land_after_the_step_down`]).
#[tokio::test]
async fn a_slice_replace_answered_503_cannot_land_after_the_step_down() {
    lost_answer("replace 503").await;
}

async fn lost_answer(case: &str) {
    let cp = ControlPlane::shared().unwrap();
    let admin = cp.admin_client().unwrap();
    {
        let ns = cp.new_namespace("lost-answer").await.unwrap();
        create_pod(&admin, &ns, "a").await;
        create_service(&admin, &ns).await;
        let pods: Api<Pod> = Api::namespaced(admin.clone(), &ns);
        let slices: Api<EndpointSlice> = Api::namespaced(admin.clone(), &ns);
        let (tapped, tap) = tap::Tap::client(cp.config(&cp.admin_credentials()).unwrap());
        let pod_path = format!("/api/v1/namespaces/{ns}/pods/a");
        let slices_path = format!("/apis/discovery.k8s.io/v1/namespaces/{ns}/endpointslices");
        let (label, slice) = match case {
            "label unanswered" => {
                tap.lose(Method::PATCH, &pod_path, tap::Lost::Silence);
                (true, false)
            }
            "create unanswered, label refused" => {
                tap.lose(Method::PATCH, &pod_path, tap::Lost::Status(422));
                tap.lose(Method::POST, &slices_path, tap::Lost::Silence);
                (true, true)
            }
            _ => {
                // An emptied slice of an earlier term: the leader replaces it.
                let lease = format!("{ns}/{LEASE}");
                let old: EndpointSlice = serde_json::from_value(serde_json::json!({
                    "metadata": { "name": SERVICE, "labels": { "kubernetes.io/service-name": SERVICE },
                                  "annotations": { HOLDER_ANNOTATION: "z", TOKEN_ANNOTATION: "0",
                                                   LEASE_ANNOTATION: lease } },
                    "addressType": "IPv4",
                    "endpoints": [],
                }))
                .unwrap();
                slices.create(&PostParams::default(), &old).await.unwrap();
                tap.lose(
                    Method::PUT,
                    &format!("{slices_path}/{SERVICE}"),
                    tap::Lost::Status(503),
                );
                (false, true)
            }
        };
        let routes =
            routes_for(&tapped, &ns, "a", label, slice).call_timeout(Duration::from_secs(1));
        let handle = Elector::new(LeaseLock::new(admin.clone(), &ns, LEASE), config("a"))
            .unwrap()
            .spawn();
        let term = handle.acquired().await.unwrap();
        let routed = routes.route(&term);
        let mut held = Vec::new();
        let wanted = usize::from(label) + usize::from(slice);
        while held.len() < wanted {
            held.push(timeout(Duration::from_secs(10), tap.held()).await.unwrap());
        }
        // The term ends (and the work stops) while the writes are unanswered.
        drop(term);
        let stopping = tokio::spawn(handle.shutdown());
        sleep(Duration::from_millis(100)).await;
        drop(routed);
        for h in &mut held {
            h.answer();
        }
        timeout(Duration::from_secs(20), stopping)
            .await
            .unwrap_or_else(|_| panic!("{case}: the step-down did not finish"))
            .unwrap()
            .unwrap();
        let released = Api::<Lease>::namespaced(admin.clone(), &ns)
            .get(LEASE)
            .await
            .unwrap();
        assert_eq!(
            released.spec.unwrap().holder_identity.as_deref(),
            Some(""),
            "{case}: not released"
        );
        // Now the lost writes reach the API server (not the one refused with a 422:
        // that one was refused).
        for h in held {
            let what = h.what.clone();
            if what.starts_with("PATCH") && case.contains("label refused") {
                continue;
            }
            let status = h.land().await;
            println!("{case}: {what} landed late: {status}");
            assert_eq!(status, 409, "{case}: {what} landed after the step-down");
        }
        assert!(
            !labelled(&pods.get("a").await.unwrap()),
            "{case}: the old leader's pod is labelled after its term"
        );
        if let Some(s) = slices.get_opt(SERVICE).await.unwrap() {
            assert!(
                s.endpoints.is_empty(),
                "{case}: the slice points at the old leader after its term: {:?}",
                s.endpoints
            );
        }
    }
}

/// `run_while_leading` and `Routes::follow` waited for ever for a clean-up that could
/// not be written, even after the elector had stopped without releasing (its shutdown
/// grace ran out): they return when the elector ends, and the Lease is not released.
#[tokio::test]
async fn the_library_helpers_return_when_the_elector_gives_up_on_the_clean_up() {
    let cp = ControlPlane::shared().unwrap();
    let admin = cp.admin_client().unwrap();
    for helper in ["run_while_leading", "follow"] {
        let ns = cp.new_namespace("gives-up").await.unwrap();
        create_pod(&admin, &ns, "a").await;
        let pods: Api<Pod> = Api::namespaced(admin.clone(), &ns);
        let (tapped, tap) = tap::Tap::client(cp.config(&cp.admin_credentials()).unwrap());
        let routes =
            routes_for(&tapped, &ns, "a", true, false).call_timeout(Duration::from_secs(1));
        let config = config("a").shutdown_grace(Duration::from_secs(1));
        let mut handle = Elector::new(LeaseLock::new(admin.clone(), &ns, LEASE), config)
            .unwrap()
            .spawn();
        let stop = handle.shutdown_token();
        let task = match helper {
            "run_while_leading" => tokio::spawn(async move {
                leaderz::routing::run_while_leading(&mut handle, &routes, |term| async move {
                    term.cancelled().await;
                })
                .await
                .unwrap();
            }),
            _ => {
                let terms = handle.terms();
                tokio::spawn(async move {
                    routes.follow(terms).await;
                    drop(handle);
                })
            }
        };
        until("a labelled", Duration::from_secs(10), async || {
            labelled(&pods.get("a").await.unwrap())
        })
        .await;
        // The label can no longer be taken back.
        tap.refuse(
            Method::PATCH,
            &format!("/api/v1/namespaces/{ns}/pods/a"),
            403,
        );
        stop.cancel();
        timeout(Duration::from_secs(5), task)
            .await
            .unwrap_or_else(|_| panic!("{helper} did not return after the elector stopped"))
            .unwrap();
        let lease = Api::<Lease>::namespaced(admin.clone(), &ns)
            .get(LEASE)
            .await
            .unwrap();
        assert_eq!(
            lease.spec.unwrap().holder_identity.as_deref(),
            Some("a"),
            "{helper}: released while the label still pointed here"
        );
        assert!(labelled(&pods.get("a").await.unwrap()));
    }
}
