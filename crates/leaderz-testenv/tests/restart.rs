//! kube-apiserver and etcd stop and start one at a time, keeping etcd's data, ports and
//! certificates: what the fault-injection suite relies on.

#![allow(clippy::unwrap_used)] // tests: a panic is the failure report

use std::time::Duration;

use k8s_openapi::api::core::v1::ConfigMap;
use kube::Api;
use kube::api::{ObjectMeta, PostParams};
use leaderz_testenv::{ControlPlane, StartOptions};

#[tokio::test]
async fn apiserver_and_etcd_restart_separately_and_keep_the_data() {
    let mut cp = ControlPlane::start(StartOptions::default()).await.unwrap();
    let ns = cp.new_namespace("restart").await.unwrap();
    let maps: Api<ConfigMap> = Api::namespaced(cp.admin_client().unwrap(), &ns);
    let map = ConfigMap {
        metadata: ObjectMeta {
            name: Some("kept".into()),
            ..ObjectMeta::default()
        },
        data: Some([("k".to_owned(), "v".to_owned())].into()),
        ..ConfigMap::default()
    };
    maps.create(&PostParams::default(), &map).await.unwrap();
    let apiserver_pid = cp.apiserver_pid();
    let etcd_pid = cp.etcd_pid();

    // etcd down: the API server stays up but cannot serve the object.
    cp.stop_etcd();
    assert!(!cp.etcd_running() && cp.apiserver_running());
    let read = tokio::time::timeout(Duration::from_secs(20), maps.get("kept")).await;
    assert!(
        !matches!(read, Ok(Ok(_))),
        "read served with etcd down: {read:?}"
    );
    cp.start_etcd().await.unwrap();
    assert_ne!(cp.etcd_pid(), etcd_pid, "etcd is a new process");
    assert_eq!(
        cp.apiserver_pid(),
        apiserver_pid,
        "kube-apiserver kept running"
    );
    let kept = retry(|| maps.get("kept")).await;
    assert_eq!(kept.data.unwrap()["k"], "v");

    // kube-apiserver down: connections are refused; etcd keeps running.
    cp.stop_apiserver();
    assert!(cp.etcd_running() && !cp.apiserver_running());
    assert!(maps.get("kept").await.is_err());
    cp.start_apiserver().await.unwrap();
    assert_ne!(cp.apiserver_pid(), apiserver_pid);
    let fresh: Api<ConfigMap> = Api::namespaced(cp.admin_client().unwrap(), &ns);
    assert_eq!(fresh.get("kept").await.unwrap().data.unwrap()["k"], "v");
    // A client made before the restart works again too (same URL and serving CA).
    retry(|| maps.get("kept")).await;
    cp.check_running().unwrap();
}

/// Retries `call` for up to 30 s: the API server reconnects to a restarted etcd by itself.
async fn retry<T, F, Fut>(mut call: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = kube::Result<T>>,
{
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        match call().await {
            Ok(v) => return v,
            Err(e) if tokio::time::Instant::now() < deadline => {
                eprintln!("not yet: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => panic!("still failing after 30 s: {e}"),
        }
    }
}
