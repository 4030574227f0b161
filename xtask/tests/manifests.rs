//! `kubectl apply -f kube/` against the real API server: every manifest is accepted,
//! with strict server-side field validation, and the names agree across files.

#![allow(clippy::unwrap_used)] // tests: a panic is the failure report

use std::process::Command;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::rbac::v1::{Role, RoleBinding};
use kube::Api;
use leaderz_testenv::ControlPlane;

#[tokio::test]
async fn kubectl_apply_kube_dir_is_accepted_and_consistent() {
    let cp = ControlPlane::shared().unwrap();
    let ns = cp.new_namespace("manifests").await.unwrap();
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../kube");
    let out = Command::new("kubectl")
        .arg("--kubeconfig")
        .arg(cp.kubeconfig_path())
        .args(["apply", "--validate=strict", "-n", &ns, "-f", dir])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for kind in [
        "serviceaccount/",
        "role.rbac.authorization.k8s.io/",
        "rolebinding.rbac.authorization.k8s.io/",
        "deployment.apps/",
    ] {
        assert!(stdout.contains(kind), "{kind} not applied: {stdout}");
    }

    // The original write-up bound its Role to a ServiceAccount its Deployment did not
    // use; here the binding, the Role and the Deployment must agree.
    let client = cp.admin_client().unwrap();
    let deployment = Api::<Deployment>::namespaced(client.clone(), &ns)
        .get("leaderz-example")
        .await
        .unwrap();
    let pod = deployment.spec.unwrap().template.spec.unwrap();
    let sa = pod.service_account_name.unwrap();
    let bindings = Api::<RoleBinding>::namespaced(client.clone(), &ns)
        .list(&Default::default())
        .await
        .unwrap();
    let binding = bindings
        .items
        .iter()
        .find(|b| {
            b.subjects
                .iter()
                .flatten()
                .any(|s| s.kind == "ServiceAccount" && s.name == sa)
        })
        .expect("a RoleBinding for the Deployment's ServiceAccount");
    let role = Api::<Role>::namespaced(client, &ns)
        .get(&binding.role_ref.name)
        .await
        .unwrap();
    let leases: Vec<_> = role
        .rules
        .unwrap()
        .into_iter()
        .filter(|r| r.resources.iter().flatten().any(|x| x == "leases"))
        .collect();
    let named = leases
        .iter()
        .find(|r| r.resource_names.is_some())
        .expect("a rule limited to the lease name");
    let lease_env = pod.containers[0]
        .env
        .iter()
        .flatten()
        .find(|e| e.name == "LEASE_NAME")
        .and_then(|e| e.value.clone())
        .unwrap();
    assert_eq!(
        named.resource_names.as_deref(),
        Some(&[lease_env][..]),
        "the Role must name the Deployment's lease"
    );

    // Identity and namespace come from the downward API.
    let env = pod.containers[0].env.clone().unwrap();
    let field = |name: &str| {
        env.iter()
            .find(|e| e.name == name)
            .and_then(|e| e.value_from.as_ref())
            .and_then(|v| v.field_ref.as_ref())
            .map(|f| f.field_path.clone())
    };
    assert_eq!(field("POD_NAME").as_deref(), Some("metadata.name"));
    assert_eq!(
        field("POD_NAMESPACE").as_deref(),
        Some("metadata.namespace")
    );
}

/// The optional sets for traffic to the leader, on top of `kube/`: each directory is
/// accepted with strict validation, and the Deployment of `kube/traffic/`, the Roles'
/// bindings and the Services agree (the ServiceAccount, the label the Service selects,
/// the Service named in the Role and in `--leader-endpoints`, POD_IP from the pod).
#[tokio::test]
async fn the_traffic_manifests_are_accepted_and_consistent() {
    use k8s_openapi::api::core::v1::Service;
    let cp = ControlPlane::shared().unwrap();
    let ns = cp.new_namespace("traffic-manifests").await.unwrap();
    let kube = concat!(env!("CARGO_MANIFEST_DIR"), "/../kube");
    // The base set without its Deployment (kube/traffic/ replaces it), then each set.
    let mut files = vec![
        format!("{kube}/serviceaccount.yaml"),
        format!("{kube}/role.yaml"),
        format!("{kube}/rolebinding.yaml"),
    ];
    files.extend(["label-pod", "leader-endpoints", "traffic"].map(|d| format!("{kube}/{d}")));
    for file in &files {
        let out = Command::new("kubectl")
            .arg("--kubeconfig")
            .arg(cp.kubeconfig_path())
            .args(["apply", "--validate=strict", "-n", &ns, "-f", file])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{file}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    let client = cp.admin_client().unwrap();
    let deployment = Api::<Deployment>::namespaced(client.clone(), &ns)
        .get("leaderz-traffic-example")
        .await
        .unwrap();
    let template = deployment.spec.unwrap().template;
    let pod_labels = template.metadata.unwrap().labels.unwrap();
    let pod = template.spec.unwrap();
    let sa = pod.service_account_name.clone().unwrap();
    let container = &pod.containers[0];
    let args = container.args.clone().unwrap();
    let flag = |name: &str| {
        args.iter()
            .find_map(|a| a.strip_prefix(&format!("--{name}=")))
            .unwrap_or_else(|| panic!("kube/traffic/ runs without --{name}"))
            .to_owned()
    };

    // Both optional Roles are bound to the Deployment's ServiceAccount.
    let bindings = Api::<RoleBinding>::namespaced(client.clone(), &ns);
    for name in ["leaderz-label-pod", "leaderz-leader-endpoints"] {
        let binding = bindings.get(name).await.unwrap();
        assert_eq!(binding.role_ref.name, name);
        assert!(
            binding
                .subjects
                .iter()
                .flatten()
                .any(|s| s.kind == "ServiceAccount" && s.name == sa),
            "{name} is not bound to {sa}"
        );
    }

    // The label Service selects the Deployment's pods that carry --label-pod.
    let services = Api::<Service>::namespaced(client.clone(), &ns);
    let selector = services
        .get("leaderz-leader-label")
        .await
        .unwrap()
        .spec
        .unwrap()
        .selector
        .unwrap();
    let label = flag("label-pod");
    let (key, value) = label.split_once('=').unwrap();
    let mut leader_labels = pod_labels.clone();
    leader_labels.insert(key.to_owned(), value.to_owned());
    assert!(
        selector
            .iter()
            .all(|(k, v)| leader_labels.get(k) == Some(v)),
        "the label Service selects {selector:?}, the leader's pod has {leader_labels:?}"
    );
    assert!(
        selector.get(key) == Some(&value.to_owned()),
        "the label Service does not select {label}"
    );

    // --leader-endpoints names the selector-less Service, which the Role names too.
    let service_name = flag("leader-endpoints");
    let service = services.get(&service_name).await.unwrap().spec.unwrap();
    assert!(service.selector.unwrap_or_default().is_empty());
    let role = Api::<Role>::namespaced(client, &ns)
        .get("leaderz-leader-endpoints")
        .await
        .unwrap();
    for rule in role.rules.unwrap() {
        if let Some(names) = &rule.resource_names {
            assert_eq!(names, std::slice::from_ref(&service_name), "{rule:?}");
        }
    }
    let pod_ip = container
        .env
        .iter()
        .flatten()
        .find(|e| e.name == "POD_IP")
        .and_then(|e| e.value_from.as_ref())
        .and_then(|v| v.field_ref.as_ref())
        .map(|f| f.field_path.clone());
    assert_eq!(pod_ip.as_deref(), Some("status.podIP"));
}
