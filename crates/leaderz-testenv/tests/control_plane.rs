//! Against the shared control plane: optimistic concurrency on Leases, RBAC enforcement,
//! identities, and kubectl with the generated kubeconfigs.

use std::time::Duration;

use anyhow::{Context as _, Result, bail};
use k8s_openapi::{
    api::{
        authentication::v1::SelfSubjectReview,
        authorization::v1::ResourceAttributes,
        coordination::v1::{Lease, LeaseSpec},
        core::v1::Secret,
        rbac::v1::{PolicyRule, Role, RoleBinding, RoleRef, Subject},
    },
    apimachinery::pkg::apis::meta::v1::ObjectMeta,
};
use kube::{
    Api, Client,
    api::{ListParams, PostParams},
};
use leaderz_testenv::{ControlPlane, wait_until_allowed};

fn lease(name: &str, holder: &str) -> Lease {
    Lease {
        metadata: ObjectMeta {
            name: Some(name.to_owned()),
            ..ObjectMeta::default()
        },
        spec: Some(LeaseSpec {
            holder_identity: Some(holder.to_owned()),
            lease_duration_seconds: Some(15),
            ..LeaseSpec::default()
        }),
    }
}

fn holder(lease: &Lease) -> Option<&str> {
    lease.spec.as_ref()?.holder_identity.as_deref()
}

fn set_holder(lease: &mut Lease, holder: &str) {
    lease
        .spec
        .get_or_insert_with(LeaseSpec::default)
        .holder_identity = Some(holder.to_owned());
}

/// The status code and reason of an API error, or the error itself if it is another kind.
fn api_status<T: std::fmt::Debug>(result: kube::Result<T>) -> Result<(u16, String)> {
    match result {
        Err(kube::Error::Api(status)) => Ok((status.code, status.reason.clone())),
        other => bail!("expected an API error status, got {other:?}"),
    }
}

#[tokio::test]
async fn stale_lease_replace_is_a_typed_409_conflict() -> Result<()> {
    let cp = ControlPlane::shared()?;
    let ns = cp.new_namespace("lease-conflict").await?;
    let leases: Api<Lease> = Api::namespaced(cp.admin_client()?, &ns);
    let pp = PostParams::default();

    leases.create(&pp, &lease("lock", "a")).await?;
    let read = leases.get("lock").await?;
    assert_eq!(holder(&read), Some("a"));

    let mut update = read.clone();
    set_holder(&mut update, "b");
    let updated = leases.replace("lock", &pp, &update).await?;
    assert_ne!(
        updated.metadata.resource_version,
        read.metadata.resource_version
    );
    assert_eq!(holder(&leases.get("lock").await?), Some("b"));

    // `read` still carries the resourceVersion from before the update.
    let mut stale = read;
    set_holder(&mut stale, "c");
    let (code, reason) = api_status(leases.replace("lock", &pp, &stale).await)?;
    assert_eq!((code, reason.as_str()), (409, "Conflict"));
    assert_eq!(
        holder(&leases.get("lock").await?),
        Some("b"),
        "the stale write must not land"
    );
    Ok(())
}

/// Grants ServiceAccount `ns/account` exactly what an elector needs on Leases in `ns`.
async fn grant_lease_role(cp: &ControlPlane, ns: &str, account: &str) -> Result<()> {
    let admin = cp.admin_client()?;
    let pp = PostParams::default();
    let role = Role {
        metadata: ObjectMeta {
            name: Some("lease-elector".to_owned()),
            ..ObjectMeta::default()
        },
        rules: Some(vec![PolicyRule {
            api_groups: Some(vec!["coordination.k8s.io".to_owned()]),
            resources: Some(vec!["leases".to_owned()]),
            verbs: ["get", "create", "update", "watch"]
                .map(String::from)
                .to_vec(),
            ..PolicyRule::default()
        }]),
    };
    Api::<Role>::namespaced(admin.clone(), ns)
        .create(&pp, &role)
        .await?;
    let binding = RoleBinding {
        metadata: ObjectMeta {
            name: Some("lease-elector".to_owned()),
            ..ObjectMeta::default()
        },
        role_ref: RoleRef {
            api_group: "rbac.authorization.k8s.io".to_owned(),
            kind: "Role".to_owned(),
            name: "lease-elector".to_owned(),
        },
        subjects: Some(vec![Subject {
            kind: "ServiceAccount".to_owned(),
            name: account.to_owned(),
            namespace: Some(ns.to_owned()),
            ..Subject::default()
        }]),
    };
    Api::<RoleBinding>::namespaced(admin, ns)
        .create(&pp, &binding)
        .await?;
    Ok(())
}

fn lease_access(ns: &str, verb: &str) -> ResourceAttributes {
    ResourceAttributes {
        group: Some("coordination.k8s.io".to_owned()),
        resource: Some("leases".to_owned()),
        verb: Some(verb.to_owned()),
        namespace: Some(ns.to_owned()),
        ..ResourceAttributes::default()
    }
}

#[tokio::test]
async fn rbac_limits_a_service_account_to_its_lease_role() -> Result<()> {
    let cp = ControlPlane::shared()?;
    let ns = cp.new_namespace("rbac").await?;
    let elsewhere = cp.new_namespace("rbac-elsewhere").await?;
    let client = cp.service_account_client(&ns, "elector").await?;
    grant_lease_role(cp, &ns, "elector").await?;
    wait_until_allowed(
        &client,
        lease_access(&ns, "update"),
        Duration::from_secs(10),
    )
    .await?;

    let pp = PostParams::default();
    let leases: Api<Lease> = Api::namespaced(client.clone(), &ns);
    let mut mine = leases.create(&pp, &lease("lock", "elector-0")).await?;
    set_holder(&mut mine, "elector-1");
    let mine = leases.replace("lock", &pp, &mine).await?;
    assert_eq!(holder(&mine), Some("elector-1"));

    let secrets: Api<Secret> = Api::namespaced(client.clone(), &ns);
    let (code, reason) = api_status(secrets.list(&ListParams::default()).await)?;
    assert_eq!(
        (code, reason.as_str()),
        (403, "Forbidden"),
        "reading Secrets"
    );

    let (code, _) = api_status(leases.delete("lock", &Default::default()).await)?;
    assert_eq!(code, 403, "delete is not in the Role");

    let foreign: Api<Lease> = Api::namespaced(client, &elsewhere);
    let (code, reason) = api_status(foreign.create(&pp, &lease("lock", "elector-0")).await)?;
    assert_eq!(
        (code, reason.as_str()),
        (403, "Forbidden"),
        "writing a Lease elsewhere"
    );
    Ok(())
}

async fn who_am_i(client: Client) -> Result<(String, Vec<String>)> {
    let review = Api::<SelfSubjectReview>::all(client)
        .create(&PostParams::default(), &SelfSubjectReview::default())
        .await?;
    let user = review
        .status
        .and_then(|s| s.user_info)
        .context("SelfSubjectReview without user info")?;
    Ok((
        user.username.unwrap_or_default(),
        user.groups.unwrap_or_default(),
    ))
}

#[tokio::test]
async fn each_identity_authenticates_as_itself() -> Result<()> {
    let cp = ControlPlane::shared()?;

    let (user, groups) = who_am_i(cp.admin_client()?).await?;
    assert_eq!(user, "admin");
    assert!(groups.contains(&"system:masters".to_owned()), "{groups:?}");

    // Several groups: one O attribute each.
    let (user, groups) = who_am_i(cp.user_client("alice", &["team-a", "team-b"])?).await?;
    assert_eq!(user, "alice");
    assert_eq!(groups, ["team-a", "team-b", "system:authenticated"]);

    let ns = cp.new_namespace("identity").await?;
    let (user, groups) = who_am_i(cp.service_account_client(&ns, "bot").await?).await?;
    assert_eq!(user, format!("system:serviceaccount:{ns}:bot"));
    assert!(
        groups.contains(&format!("system:serviceaccounts:{ns}")),
        "{groups:?}"
    );

    // A user without bindings is authenticated but not authorized.
    let nobody: Api<Lease> = Api::namespaced(cp.user_client("nobody", &[])?, &ns);
    let (code, _) = api_status(nobody.list(&ListParams::default()).await)?;
    assert_eq!(code, 403);

    assert!(
        cp.service_account_token(&ns, "bot", Duration::from_secs(60))
            .await
            .is_err(),
        "the API server's minimum token lifetime is 10 minutes"
    );
    Ok(())
}

async fn kubectl(kubeconfig: &std::path::Path, args: &[&str]) -> Result<std::process::Output> {
    tokio::process::Command::new("kubectl")
        .arg("--kubeconfig")
        .arg(kubeconfig)
        .args(args)
        .output()
        .await
        .context("running kubectl (is it on PATH?)")
}

#[tokio::test]
async fn kubectl_works_with_the_generated_kubeconfigs() -> Result<()> {
    let cp = ControlPlane::shared()?;
    let ns = cp.new_namespace("kubectl").await?;
    Api::<Lease>::namespaced(cp.admin_client()?, &ns)
        .create(&PostParams::default(), &lease("seen-by-kubectl", "a"))
        .await?;

    let out = kubectl(cp.kubeconfig_path(), &["get", "leases", "-A"]).await?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "kubectl failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout
            .lines()
            .any(|l| l.contains(&ns) && l.contains("seen-by-kubectl")),
        "{stdout}"
    );

    // A ServiceAccount's kubeconfig carries its token and its permissions, no more.
    grant_lease_role(cp, &ns, "kubectl-bot").await?;
    let path = cp.data_dir().join(format!("{ns}.kubeconfig"));
    let credentials = cp
        .service_account_credentials(&ns, "kubectl-bot", Duration::from_secs(3600))
        .await?;
    cp.write_kubeconfig(&path, &credentials)?;
    wait_until_allowed(
        &cp.client(&credentials)?,
        lease_access(&ns, "get"),
        Duration::from_secs(10),
    )
    .await?;
    let out = kubectl(&path, &["get", "lease", "seen-by-kubectl", "-n", &ns]).await?;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = kubectl(&path, &["get", "secrets", "-n", &ns]).await?;
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("Forbidden"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}
