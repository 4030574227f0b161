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
