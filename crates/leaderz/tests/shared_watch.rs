//! `SharedLeaseWatch` against a real kube-apiserver: many followers in one process on
//! one watch, each told of its own Lease only, caught up when it starts behind, told of
//! deletions, and falling back to polling without `list`.

#![allow(clippy::unwrap_used)] // tests: a panic is the failure report

use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::api::rbac::v1::{Role, RoleBinding};
use kube::api::{DeleteParams, ObjectMeta, PostParams};
use kube::{Api, Client};
use leaderz::lock::SharedLeaseWatch;
use leaderz::{ElectionConfig, ElectionHandle, Elector, LeaseLock, Lock, LockEvent};
use leaderz_testenv::ControlPlane;
use tokio::time::{Instant, sleep, timeout};

/// Followers wait a whole 30 s lease duration unless a watch tells them of a release.
fn slow(id: &str) -> ElectionConfig {
    ElectionConfig::new(id)
        .lease_duration(Duration::from_secs(30))
        .renew_deadline(Duration::from_secs(20))
        .retry_period(Duration::from_secs(2))
        .request_timeout(Duration::from_secs(5))
}

async fn until(what: &str, limit: Duration, mut done: impl FnMut() -> bool) {
    timeout(limit, async {
        while !done() {
            sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .unwrap_or_else(|_| panic!("{what} within {limit:?}"));
}

/// `apiserver_longrunning_requests` for WATCHes on leases, by scope: `namespace` (a
/// namespace-wide watch) and `resource` (a single-object watch).
async fn lease_watches(client: &Client) -> (f64, f64) {
    let req = http::Request::get("/metrics").body(Vec::new()).unwrap();
    let text = client.request_text(req).await.unwrap();
    let (mut namespace, mut resource) = (0.0, 0.0);
    for line in text.lines() {
        if !line.starts_with("apiserver_longrunning_requests{")
            || !line.contains("resource=\"leases\"")
            || !line.contains("verb=\"WATCH\"")
        {
            continue;
        }
        let value: f64 = line.rsplit(' ').next().unwrap().parse().unwrap();
        if line.contains("scope=\"namespace\"") {
            namespace += value;
        } else if line.contains("scope=\"resource\"") {
            resource += value;
        }
    }
    (namespace, resource)
}

#[tokio::test]
async fn followers_of_many_leases_share_one_watch_and_see_each_release_at_once() {
    const N: usize = 20;
    let cp = ControlPlane::shared().unwrap();
    let admin = cp.admin_client().unwrap();
    let ns = cp.new_namespace("shared").await.unwrap();
    let leaders: Vec<ElectionHandle> = (0..N)
        .map(|i| {
            let lock = LeaseLock::new(admin.clone(), &ns, &format!("shard-{i}"));
            Elector::new(lock, slow(&format!("leader-{i}")))
                .unwrap()
                .spawn()
        })
        .collect();
    until("every leader leads", Duration::from_secs(30), || {
        leaders.iter().all(ElectionHandle::is_leader)
    })
    .await;

    let watches_before = lease_watches(&admin).await;
    let client = leaderz::client::from_config(cp.config(&cp.admin_credentials()).unwrap()).unwrap();
    let shared = SharedLeaseWatch::new(client, &ns);
    let followers: Vec<ElectionHandle> = (0..N)
        .map(|i| {
            Elector::new(
                shared.lock(&format!("shard-{i}")),
                slow(&format!("follower-{i}")),
            )
            .unwrap()
            .spawn()
        })
        .collect();
    until(
        "every follower watches and knows its leader",
        Duration::from_secs(30),
        || {
            followers.iter().enumerate().all(|(i, f)| {
                f.status().borrow().watching
                    && f.leader().borrow().as_deref() == Some(&*format!("leader-{i}"))
            })
        },
    )
    .await;
    let watches = lease_watches(&admin).await;
    // (Other tests in this binary may hold namespace-wide watches of their own, but no
    // single-object ones.)
    assert!(
        watches.0 - watches_before.0 >= 1.0 && watches.1 - watches_before.1 == 0.0,
        "{N} followers: a namespace-wide watch and no single-object watches \
         (namespace, resource) before {watches_before:?}, after {watches:?}"
    );

    // Every leader releases; every follower must see its own release and take over long
    // before the 30 s lease duration (only the watch can tell it that soon).
    let released = Instant::now();
    futures::future::join_all(leaders.into_iter().map(ElectionHandle::shutdown)).await;
    until(
        "every follower takes over after the release",
        Duration::from_secs(10),
        || followers.iter().all(ElectionHandle::is_leader),
    )
    .await;
    println!(
        "{N} takeovers through one shared watch within {:?} of the releases",
        released.elapsed()
    );
    for f in followers {
        f.shutdown().await.unwrap();
    }
}

fn lease(name: &str, holder: &str) -> Lease {
    Lease {
        metadata: ObjectMeta {
            name: Some(name.to_owned()),
            ..Default::default()
        },
        spec: Some(LeaseSpec {
            holder_identity: Some(holder.to_owned()),
            lease_duration_seconds: Some(30),
            ..Default::default()
        }),
    }
}

fn holder(event: &LockEvent) -> Option<String> {
    match event {
        LockEvent::Changed(v) => Some(v.record.holder_identity.clone()),
        LockEvent::Deleted => None,
    }
}

#[tokio::test]
async fn a_lock_that_starts_behind_is_caught_up_and_sees_only_its_own_lease() {
    let cp = ControlPlane::shared().unwrap();
    let admin = cp.admin_client().unwrap();
    let ns = cp.new_namespace("catchup").await.unwrap();
    let api: Api<Lease> = Api::namespaced(admin.clone(), &ns);
    let shared = SharedLeaseWatch::new(admin.clone(), &ns);
    let (x, y) = (shared.lock("x"), shared.lock("y"));
    api.create(&PostParams::default(), &lease("x", "a"))
        .await
        .unwrap();
    api.create(&PostParams::default(), &lease("y", "a"))
        .await
        .unwrap();
    let first = x.get().await.unwrap().unwrap();

    // Start the shared watch through `y`, then change `x` behind `x`'s back.
    let mut ys = y.watch("", Duration::from_secs(60)).await.unwrap();
    let mut changed = lease("x", "b");
    changed.metadata.resource_version = Some(first.version.clone());
    api.replace("x", &PostParams::default(), &changed)
        .await
        .unwrap();
    sleep(Duration::from_millis(500)).await;

    // `x` watching after the version it read learns of "b" at once.
    let mut xs = x
        .watch(&first.version, Duration::from_secs(60))
        .await
        .unwrap();
    let event = timeout(Duration::from_secs(2), xs.next())
        .await
        .expect("no catch-up event")
        .unwrap()
        .unwrap();
    assert_eq!(holder(&event), Some("b".to_owned()));

    // Deletion reaches `x`, and nothing of `x` reaches `y`'s stream.
    api.delete("x", &DeleteParams::default()).await.unwrap();
    let event = timeout(Duration::from_secs(2), xs.next())
        .await
        .expect("no deletion event")
        .unwrap()
        .unwrap();
    assert_eq!(event, LockEvent::Deleted);
    // (`y` watched from "now", knowing nothing: it was told of its own Lease's state.)
    while let Ok(Some(event)) = timeout(Duration::from_millis(500), ys.next()).await {
        let name = match event.unwrap() {
            LockEvent::Changed(v) => v.lease.and_then(|l| l.metadata.name.clone()),
            LockEvent::Deleted => None,
        };
        assert_eq!(
            name.as_deref(),
            Some("y"),
            "y was sent an event of another Lease"
        );
    }

    // A lock already up to date is not sent an old state again.
    let current = y.get().await.unwrap().unwrap();
    let mut fresh = y
        .watch(&current.version, Duration::from_secs(60))
        .await
        .unwrap();
    assert!(
        timeout(Duration::from_millis(500), fresh.next())
            .await
            .is_err(),
        "an up-to-date lock was sent the state it already has"
    );
    // Its stream ends when asked, as a server-side watch would.
    let mut short = y
        .watch(&current.version, Duration::from_secs(1))
        .await
        .unwrap();
    let ended = timeout(Duration::from_secs(5), short.next()).await;
    assert!(matches!(ended, Ok(None)), "{ended:?}");
}

#[tokio::test]
async fn without_list_permission_elections_poll_and_say_why() {
    let cp = ControlPlane::shared().unwrap();
    let admin = cp.admin_client().unwrap();
    let ns = cp.new_namespace("nolist").await.unwrap();
    // The shipped Role (no `list`), for the one Lease.
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../../kube/role.yaml");
    let mut role: Role = serde_yaml::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    role.metadata.namespace = Some(ns.clone());
    Api::<Role>::namespaced(admin.clone(), &ns)
        .create(&PostParams::default(), &role)
        .await
        .unwrap();
    let binding: RoleBinding = serde_json::from_value(serde_json::json!({
        "metadata": { "name": "candidate" },
        "roleRef": { "apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "leaderz-example" },
        "subjects": [{ "kind": "User", "name": "candidate", "apiGroup": "rbac.authorization.k8s.io" }],
    }))
    .unwrap();
    Api::<RoleBinding>::namespaced(admin.clone(), &ns)
        .create(&PostParams::default(), &binding)
        .await
        .unwrap();
    let user = cp.user_client("candidate", &[]).unwrap();
    let attributes = k8s_openapi::api::authorization::v1::ResourceAttributes {
        group: Some("coordination.k8s.io".into()),
        resource: Some("leases".into()),
        verb: Some("update".into()),
        name: Some("my-lock".into()),
        namespace: Some(ns.clone()),
        ..Default::default()
    };
    leaderz_testenv::wait_until_allowed(&user, attributes, Duration::from_secs(10))
        .await
        .unwrap();

    let quick = |id: &str| {
        ElectionConfig::new(id)
            .lease_duration(Duration::from_secs(3))
            .renew_deadline(Duration::from_secs(2))
            .retry_period(Duration::from_millis(500))
    };
    let leader = Elector::new(LeaseLock::new(admin.clone(), &ns, "my-lock"), quick("a"))
        .unwrap()
        .spawn();
    leader.acquired().await.unwrap();
    let shared = SharedLeaseWatch::new(user, &ns);
    let follower = Elector::new(shared.lock("my-lock"), quick("b"))
        .unwrap()
        .spawn();
    until(
        "the follower falls back to polling",
        Duration::from_secs(20),
        || follower.status().borrow().polling.is_some(),
    )
    .await;
    let why = follower.status().borrow().polling.clone().unwrap();
    assert!(why.contains("`list`"), "{why}");
    leader.shutdown().await.unwrap();
    timeout(Duration::from_secs(5), follower.acquired())
        .await
        .expect("the polling follower takes over")
        .unwrap();
    follower.shutdown().await.unwrap();
}

/// An election started once the shared watch has listed creates a Lease the list did not
/// show without reading it first: with `get` refused, it still leads, where an election
/// without the watch (which reads first) is refused at the start.
#[tokio::test]
async fn an_election_on_a_listed_watch_creates_an_absent_lease_without_reading_first() {
    let cp = ControlPlane::shared().unwrap();
    let admin = cp.admin_client().unwrap();
    let ns = cp.new_namespace("noget").await.unwrap();
    let role: Role = serde_json::from_value(serde_json::json!({
        "metadata": { "name": "no-get" },
        "rules": [{
            "apiGroups": ["coordination.k8s.io"],
            "resources": ["leases"],
            "verbs": ["create", "update", "list", "watch"],
        }],
    }))
    .unwrap();
    Api::<Role>::namespaced(admin.clone(), &ns)
        .create(&PostParams::default(), &role)
        .await
        .unwrap();
    let binding: RoleBinding = serde_json::from_value(serde_json::json!({
        "metadata": { "name": "no-get" },
        "roleRef": { "apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "no-get" },
        "subjects": [{ "kind": "User", "name": "no-get", "apiGroup": "rbac.authorization.k8s.io" }],
    }))
    .unwrap();
    Api::<RoleBinding>::namespaced(admin.clone(), &ns)
        .create(&PostParams::default(), &binding)
        .await
        .unwrap();
    let user = cp.user_client("no-get", &[]).unwrap();
    let attributes = k8s_openapi::api::authorization::v1::ResourceAttributes {
        group: Some("coordination.k8s.io".into()),
        resource: Some("leases".into()),
        verb: Some("list".into()),
        namespace: Some(ns.clone()),
        ..Default::default()
    };
    leaderz_testenv::wait_until_allowed(&user, attributes, Duration::from_secs(10))
        .await
        .unwrap();

    // Without the watch: the first read is refused, and the election stops.
    let reads_first = Elector::new(LeaseLock::new(user.clone(), &ns, "read-first"), slow("a"))
        .unwrap()
        .spawn();
    let refused = timeout(Duration::from_secs(10), reads_first.acquired())
        .await
        .expect("refused at once");
    assert!(refused.is_err());
    let why = reads_first.shutdown().await.unwrap_err().to_string();
    assert!(why.contains("`get`"), "{why}");

    let shared = SharedLeaseWatch::new(user, &ns);
    shared.ready().await.unwrap();
    let creates = Elector::new(shared.lock("created"), slow("b"))
        .unwrap()
        .spawn();
    timeout(Duration::from_secs(10), creates.acquired())
        .await
        .expect("leads at once")
        .unwrap();
    let lease = Api::<Lease>::namespaced(admin, &ns)
        .get("created")
        .await
        .unwrap();
    assert_eq!(
        lease.spec.unwrap().holder_identity.as_deref(),
        Some("b"),
        "the Lease names its creator"
    );
    creates.shutdown().await.unwrap();
}
