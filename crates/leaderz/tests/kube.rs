//! The library against a real kube-apiserver + etcd (started by leaderz-testenv,
//! shared by every test in this file). Timings are short (3 s / 2 s / 0.5 s) so the
//! tests are quick; measured handover times are printed.

#![allow(clippy::unwrap_used)] // tests: a panic is the failure report

use std::time::Duration;

use k8s_openapi::api::authorization::v1::ResourceAttributes;
use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::api::rbac::v1::{Role, RoleBinding};
use kube::api::{ObjectMeta, PostParams};
use kube::{Api, Client};
use leaderz::{
    ElectionConfig, ElectionError, ElectionHandle, Elector, HealthError, LeaseLock, LockError,
};
use leaderz_testenv::ControlPlane;
use tokio::time::{Instant, sleep, timeout};

const LEASE: &str = "my-lock";

fn config(id: &str) -> ElectionConfig {
    ElectionConfig::new(id)
        .lease_duration(Duration::from_secs(3))
        .renew_deadline(Duration::from_secs(2))
        .retry_period(Duration::from_millis(500))
        .request_timeout(Duration::from_secs(2))
}

fn spawn(client: Client, ns: &str, id: &str) -> ElectionHandle {
    Elector::new(LeaseLock::new(client, ns, LEASE), config(id))
        .unwrap()
        .spawn()
}

async fn lease(client: &Client, ns: &str) -> Lease {
    Api::<Lease>::namespaced(client.clone(), ns)
        .get(LEASE)
        .await
        .unwrap()
}

fn spec(l: &Lease) -> LeaseSpec {
    l.spec.clone().unwrap_or_default()
}

/// Waits until exactly one of `handles` leads and returns its index.
async fn one_leader(handles: &[ElectionHandle]) -> usize {
    timeout(Duration::from_secs(20), async {
        loop {
            let leaders: Vec<usize> = (0..handles.len())
                .filter(|&i| handles[i].is_leader())
                .collect();
            if leaders.len() == 1 {
                return leaders[0];
            }
            assert!(leaders.len() <= 1, "two leaders: {leaders:?}");
            sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("no leader within 20 s")
}

#[tokio::test]
async fn three_candidates_elect_exactly_one_leader() {
    let cp = ControlPlane::shared().unwrap();
    let ns = cp.new_namespace("three").await.unwrap();
    let hs: Vec<_> = ["a", "b", "c"]
        .iter()
        .map(|id| spawn(cp.admin_client().unwrap(), &ns, id))
        .collect();
    let first = one_leader(&hs).await;
    // It stays exactly one over several renewals.
    for _ in 0..30 {
        sleep(Duration::from_millis(100)).await;
        let n = hs.iter().filter(|h| h.is_leader()).count();
        assert_eq!(n, 1);
        assert!(hs[first].is_leader());
    }
    let l = lease(&cp.admin_client().unwrap(), &ns).await;
    let s = spec(&l);
    assert_eq!(s.holder_identity.as_deref(), Some(["a", "b", "c"][first]));
    assert_eq!(s.lease_duration_seconds, Some(3));
    assert_eq!(s.lease_transitions, Some(0));
    for h in &hs {
        assert_eq!(h.leader().borrow().as_deref(), Some(["a", "b", "c"][first]));
    }
}

#[tokio::test]
async fn graceful_release_hands_over_within_one_second() {
    let cp = ControlPlane::shared().unwrap();
    let ns = cp.new_namespace("graceful").await.unwrap();
    let a = spawn(cp.admin_client().unwrap(), &ns, "a");
    a.acquired().await.unwrap();
    let b = spawn(cp.admin_client().unwrap(), &ns, "b");
    // Let b observe and open its watch.
    timeout(Duration::from_secs(10), async {
        while !b.status().borrow().watching {
            sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .unwrap();
    let t0 = Instant::now();
    a.shutdown().await.unwrap();
    let term = timeout(Duration::from_secs(5), b.acquired())
        .await
        .unwrap()
        .unwrap();
    let handover = t0.elapsed();
    println!("graceful handover (release start to new term): {handover:?}");
    assert!(
        handover < Duration::from_secs(1),
        "handover took {handover:?}"
    );
    assert_eq!(term.fencing_token(), 1);
    let s = spec(&lease(&cp.admin_client().unwrap(), &ns).await);
    assert_eq!(s.holder_identity.as_deref(), Some("b"));
    assert_eq!(s.lease_transitions, Some(1));
}

/// The library's planned handover against the real API server: the leader asks, the
/// named follower (not the other) leads next with the next token; the old term ended
/// before the new one started.
#[tokio::test]
async fn the_leader_hands_over_to_the_named_candidate() {
    let cp = ControlPlane::shared().unwrap();
    let ns = cp.new_namespace("hand-over").await.unwrap();
    let a = spawn(cp.admin_client().unwrap(), &ns, "a");
    let term = a.acquired().await.unwrap();
    let b = spawn(cp.admin_client().unwrap(), &ns, "b");
    let c = spawn(cp.admin_client().unwrap(), &ns, "c");
    timeout(Duration::from_secs(10), async {
        while !(b.status().borrow().watching && c.status().borrow().watching) {
            sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .unwrap();
    let t0 = Instant::now();
    a.hand_over(Some("c")).await.unwrap();
    term.cancelled().await;
    let ended = Instant::now();
    drop(term);
    let next = timeout(Duration::from_secs(5), c.acquired())
        .await
        .unwrap()
        .unwrap();
    let started = Instant::now();
    println!(
        "hand_over: asked to old term ended {:?}, old work stopped to new term {:?}",
        ended - t0,
        started - ended
    );
    assert_eq!(next.fencing_token(), 1);
    assert!(!b.is_leader());
    let s = spec(&lease(&cp.admin_client().unwrap(), &ns).await);
    assert_eq!(s.holder_identity.as_deref(), Some("c"));
    assert_eq!(s.lease_transitions, Some(1));
}

#[tokio::test]
async fn crash_hands_over_after_about_the_lease_duration() {
    let cp = ControlPlane::shared().unwrap();
    let ns = cp.new_namespace("crash").await.unwrap();
    let a = spawn(cp.admin_client().unwrap(), &ns, "a");
    a.acquired().await.unwrap();
    let b = spawn(cp.admin_client().unwrap(), &ns, "b");
    sleep(Duration::from_secs(2)).await;
    let before = spec(&lease(&cp.admin_client().unwrap(), &ns).await).renew_time;
    let t0 = Instant::now();
    a.abort();
    timeout(Duration::from_secs(10), b.acquired())
        .await
        .unwrap()
        .unwrap();
    let failover = t0.elapsed();
    println!(
        "crash failover (kill to new term): {failover:?}, lease duration 3s, last renewal {before:?}"
    );
    // The last renewal was at most one retry period before the kill.
    assert!(
        failover >= Duration::from_millis(2400),
        "took over too early: {failover:?}"
    );
    assert!(
        failover <= Duration::from_millis(4000),
        "took over too late: {failover:?}"
    );
}

#[tokio::test]
async fn two_candidates_racing_for_an_empty_lease_one_wins() {
    let cp = ControlPlane::shared().unwrap();
    let admin = cp.admin_client().unwrap();
    let ns = cp.new_namespace("race").await.unwrap();
    // A released lease: holder "", as client-go leaves it.
    let released = Lease {
        metadata: ObjectMeta {
            name: Some(LEASE.into()),
            ..Default::default()
        },
        spec: Some(LeaseSpec {
            holder_identity: Some(String::new()),
            lease_duration_seconds: Some(1),
            lease_transitions: Some(7),
            ..Default::default()
        }),
    };
    Api::<Lease>::namespaced(admin.clone(), &ns)
        .create(&PostParams::default(), &released)
        .await
        .unwrap();
    for round in 0..5 {
        let hs = [
            spawn(cp.admin_client().unwrap(), &ns, "x"),
            spawn(cp.admin_client().unwrap(), &ns, "y"),
        ];
        let winner = one_leader(&hs).await;
        sleep(Duration::from_millis(300)).await;
        assert_eq!(hs.iter().filter(|h| h.is_leader()).count(), 1);
        let s = spec(&lease(&admin, &ns).await);
        assert_eq!(s.holder_identity.as_deref(), Some(["x", "y"][winner]));
        // Each round starts from a released lease: exactly one transition per round.
        assert_eq!(s.lease_transitions, Some(8 + round));
        // The loser first (it holds nothing), then the winner releases: had the winner
        // gone first, the loser would take the released lease (a second transition).
        let [h0, h1] = hs;
        let (winner, loser) = if winner == 0 { (h0, h1) } else { (h1, h0) };
        loser.shutdown().await.unwrap();
        winner.shutdown().await.unwrap();
        assert_eq!(
            spec(&lease(&admin, &ns).await).holder_identity.as_deref(),
            Some("")
        );
    }
}

#[tokio::test]
async fn garbage_lease_written_by_admin_is_handled_by_the_documented_rules() {
    let cp = ControlPlane::shared().unwrap();
    let admin = cp.admin_client().unwrap();
    let ns = cp.new_namespace("garbage").await.unwrap();
    let api = Api::<Lease>::namespaced(admin.clone(), &ns);

    // 1. No spec at all: free to take, transitions start from 0.
    let bare = Lease {
        metadata: ObjectMeta {
            name: Some(LEASE.into()),
            ..Default::default()
        },
        spec: None,
    };
    api.create(&PostParams::default(), &bare).await.unwrap();
    let h = spawn(cp.admin_client().unwrap(), &ns, "a");
    let term = timeout(Duration::from_secs(5), h.acquired())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(term.fencing_token(), 1);
    drop(term);
    h.shutdown().await.unwrap();

    // 2. A holder with a 1 s duration (shorter than ours) and no times: we wait our
    //    own lease duration (3 s) from when we saw it, never less.
    let mut l = api.get(LEASE).await.unwrap();
    l.spec = Some(LeaseSpec {
        holder_identity: Some("ghost".into()),
        lease_duration_seconds: Some(1),
        lease_transitions: Some(3),
        ..Default::default()
    });
    api.replace(LEASE, &PostParams::default(), &l)
        .await
        .unwrap();
    let t0 = Instant::now();
    let h = spawn(cp.admin_client().unwrap(), &ns, "a");
    let term = timeout(Duration::from_secs(10), h.acquired())
        .await
        .unwrap()
        .unwrap();
    let waited = t0.elapsed();
    println!("garbage 1 s lease taken after {waited:?} (own lease duration 3 s)");
    assert!(
        waited >= Duration::from_secs(3),
        "took over after {waited:?}"
    );
    assert_eq!(term.fencing_token(), 4);
    drop(term);
    h.shutdown().await.unwrap();

    // 3. leaseTransitions at its maximum: the elector keeps running, says what fixes it
    //    (status, health), and writes nothing; deleting the Lease fixes it.
    let mut l = api.get(LEASE).await.unwrap();
    l.spec = Some(LeaseSpec {
        holder_identity: Some(String::new()),
        lease_transitions: Some(i32::MAX),
        ..Default::default()
    });
    api.replace(LEASE, &PostParams::default(), &l)
        .await
        .unwrap();
    let h = spawn(cp.admin_client().unwrap(), &ns, "a");
    let mut status = h.status();
    let problem = timeout(
        Duration::from_secs(5),
        status.wait_for(|s| s.problem.is_some()),
    )
    .await
    .unwrap()
    .unwrap()
    .problem
    .clone()
    .unwrap();
    assert!(problem.contains("delete the Lease"), "{problem}");
    let health = h.check_health(Duration::from_secs(3), Duration::from_secs(1));
    assert!(
        matches!(&health, Err(HealthError::Problem(p)) if p == &problem),
        "{health:?}"
    );
    sleep(Duration::from_secs(1)).await;
    assert!(!h.is_leader());
    assert_eq!(
        spec(&api.get(LEASE).await.unwrap()).lease_transitions,
        Some(i32::MAX),
        "nothing written"
    );
    api.delete(LEASE, &Default::default()).await.unwrap();
    let term = timeout(Duration::from_secs(10), h.acquired())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        term.fencing_token(),
        0,
        "deleting the Lease reset the count"
    );
    drop(term);
    h.shutdown().await.unwrap();
}

/// Applies kube/role.yaml (the Role the manifests ship) in `ns`, optionally without
/// `watch`, binds it to ServiceAccount `sa`, and waits until RBAC lets `sa_client` in.
async fn grant_shipped_role(
    cp: &ControlPlane,
    ns: &str,
    sa: &str,
    sa_client: &Client,
    without_watch: bool,
) {
    let admin = cp.admin_client().unwrap();
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../../kube/role.yaml");
    let mut role: Role = serde_yaml::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    role.metadata.namespace = Some(ns.into());
    if without_watch {
        for rule in role.rules.iter_mut().flatten() {
            rule.verbs.retain(|v| v != "watch");
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
    let attributes = ResourceAttributes {
        group: Some("coordination.k8s.io".into()),
        resource: Some("leases".into()),
        verb: Some("update".into()),
        name: Some(LEASE.into()),
        namespace: Some(ns.into()),
        ..Default::default()
    };
    leaderz_testenv::wait_until_allowed(sa_client, attributes, Duration::from_secs(10))
        .await
        .unwrap();
}

#[tokio::test]
async fn service_account_with_only_the_shipped_role_can_elect() {
    let cp = ControlPlane::shared().unwrap();
    let ns = cp.new_namespace("rbac").await.unwrap();
    let sa = cp
        .service_account_client(&ns, "leaderz-example")
        .await
        .unwrap();
    grant_shipped_role(cp, &ns, "leaderz-example", &sa, false).await;
    let a = spawn(sa.clone(), &ns, "a");
    a.acquired().await.unwrap();
    let b = spawn(sa.clone(), &ns, "b");
    timeout(Duration::from_secs(10), async {
        while !b.status().borrow().watching {
            sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .expect("the shipped Role must allow the single-object watch");
    a.shutdown().await.unwrap();
    timeout(Duration::from_secs(5), b.acquired())
        .await
        .unwrap()
        .unwrap();

    // The same Role does not cover a Lease with another name: a clear, fatal error.
    let mut other = Elector::new(LeaseLock::new(sa.clone(), &ns, "not-my-lock"), config("c"))
        .unwrap()
        .spawn();
    let err = timeout(Duration::from_secs(10), other.join())
        .await
        .unwrap()
        .unwrap_err();
    let msg = err.to_string();
    assert!(
        matches!(
            err,
            ElectionError::Lock(LockError::Forbidden { verb: "get", .. })
        ),
        "{msg}"
    );
    assert!(
        msg.contains(&format!(
            "grant `get` on `leases.coordination.k8s.io` in namespace `{ns}` (lease `not-my-lock`)"
        )),
        "{msg}"
    );
}

#[tokio::test]
async fn identity_without_watch_still_elects_by_polling() {
    let cp = ControlPlane::shared().unwrap();
    let ns = cp.new_namespace("nowatch").await.unwrap();
    let sa = cp.service_account_client(&ns, "poller").await.unwrap();
    grant_shipped_role(cp, &ns, "poller", &sa, true).await;
    let a = spawn(sa.clone(), &ns, "a");
    a.acquired().await.unwrap();
    let b = spawn(sa.clone(), &ns, "b");
    sleep(Duration::from_secs(1)).await;
    assert!(!b.status().borrow().watching, "watch must be refused");
    assert!(!b.is_leader());
    let t0 = Instant::now();
    a.shutdown().await.unwrap();
    timeout(Duration::from_secs(5), b.acquired())
        .await
        .unwrap()
        .unwrap();
    println!("handover by polling: {:?}", t0.elapsed());
}

#[tokio::test]
async fn forbidden_get_is_a_fatal_error_naming_the_grant() {
    let cp = ControlPlane::shared().unwrap();
    let ns = cp.new_namespace("denied").await.unwrap();
    let nobody = cp.user_client("nobody", &[]).unwrap();
    let mut h = spawn(nobody, &ns, "a");
    let err = timeout(Duration::from_secs(10), h.join())
        .await
        .unwrap()
        .unwrap_err();
    let msg = err.to_string();
    assert!(
        msg.contains(&format!(
            "grant `get` on `leases.coordination.k8s.io` in namespace `{ns}`"
        )),
        "{msg}"
    );
}

#[tokio::test]
async fn events_on_the_lease_say_who_became_leader_and_who_stopped() {
    use k8s_openapi::api::events::v1::Event;
    let cp = ControlPlane::shared().unwrap();
    let ns = cp.new_namespace("events").await.unwrap();
    let lock = LeaseLock::new(cp.admin_client().unwrap(), &ns, LEASE)
        .with_events(cp.admin_client().unwrap(), "leaderz-test");
    let h = Elector::new(lock, config("pod-a")).unwrap().spawn();
    h.acquired().await.unwrap();
    h.shutdown().await.unwrap();
    let events: Api<Event> = Api::namespaced(cp.admin_client().unwrap(), &ns);
    let notes = timeout(Duration::from_secs(10), async {
        loop {
            let list = events.list(&Default::default()).await.unwrap();
            let notes: Vec<String> = list
                .items
                .iter()
                .filter(|e| e.reason.as_deref() == Some("LeaderElection"))
                .filter(|e| e.regarding.as_ref().and_then(|r| r.kind.as_deref()) == Some("Lease"))
                .filter_map(|e| e.note.clone())
                .collect();
            if notes.len() >= 2 {
                return notes;
            }
            sleep(Duration::from_millis(100)).await;
        }
    })
    .await
    .expect("two LeaderElection events");
    assert!(
        notes.contains(&"pod-a became leader".to_owned()),
        "{notes:?}"
    );
    assert!(
        notes.contains(&"pod-a stopped leading".to_owned()),
        "{notes:?}"
    );
}
