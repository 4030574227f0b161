//! Where the cluster is and who we are: kubeconfig, namespace and identity defaults,
//! name checks, and the reachability check done before anything is written.

use std::time::Duration;

use kube::Client;
use tokio::time::timeout;

use crate::error::{CliError, chain};
use crate::text::printable;

/// The namespace file of a pod's service account.
const SERVICE_ACCOUNT_NAMESPACE: &str = "/var/run/secrets/kubernetes.io/serviceaccount/namespace";

/// How long the API server may take to answer the reachability check.
const REACHABILITY_TIMEOUT: Duration = Duration::from_secs(5);

/// Reads the client configuration as `kube::Client::try_default` does: `$KUBECONFIG`,
/// `~/.kube/config`, else the pod's service account. Makes no API call.
pub(crate) async fn load_config() -> Result<kube::Config, CliError> {
    kube::Config::infer()
        .await
        .map_err(|e| CliError::KubeConfig(chain(&e)))
}

/// The namespace to use: the flag, else `$POD_NAMESPACE`, else the service-account
/// namespace file, else the kubeconfig context's namespace, else `default`. Checked to be
/// a valid namespace name.
pub(crate) fn namespace(flag: Option<&str>, config: &kube::Config) -> Result<String, CliError> {
    let pod_namespace = std::env::var("POD_NAMESPACE").ok();
    let service_account = std::fs::read_to_string(SERVICE_ACCOUNT_NAMESPACE).ok();
    let ns = resolve_namespace(
        flag,
        pod_namespace.as_deref(),
        service_account.as_deref(),
        Some(&config.default_namespace),
    );
    check_namespace(&ns)?;
    Ok(ns)
}

/// [`namespace`]'s rule on given inputs; empty values count as unset.
fn resolve_namespace(
    flag: Option<&str>,
    pod_namespace: Option<&str>,
    service_account_file: Option<&str>,
    kubeconfig_context: Option<&str>,
) -> String {
    [
        flag,
        pod_namespace,
        service_account_file,
        kubeconfig_context,
    ]
    .into_iter()
    .flatten()
    .map(str::trim)
    .find(|s| !s.is_empty())
    .unwrap_or("default")
    .to_owned()
}

/// This candidate's identity: the flag (even if empty: the library then refuses it),
/// else `$POD_NAME`, else the hostname. Refused if it has control characters: it is
/// written to the Lease and printed by every tool that shows who leads.
pub(crate) fn identity(flag: Option<&str>) -> Result<String, CliError> {
    let pod_name = std::env::var("POD_NAME").ok();
    let hostname = || {
        nix::unistd::gethostname()
            .ok()
            .and_then(|h| h.into_string().ok())
    };
    let (identity, source) =
        resolve_identity(flag, pod_name.as_deref(), hostname).ok_or_else(|| {
            CliError::Usage(
                "cannot tell this candidate's identity: pass --identity or set POD_NAME".into(),
            )
        })?;
    check_identity(&identity, source)?;
    Ok(identity)
}

/// [`identity`]'s rule on given inputs: the identity and where it came from.
fn resolve_identity(
    flag: Option<&str>,
    pod_name: Option<&str>,
    hostname: impl FnOnce() -> Option<String>,
) -> Option<(String, &'static str)> {
    if let Some(flag) = flag {
        return Some((flag.to_owned(), "--identity"));
    }
    if let Some(pod) = pod_name.filter(|p| !p.trim().is_empty()) {
        return Some((pod.to_owned(), "$POD_NAME"));
    }
    hostname()
        .filter(|h| !h.trim().is_empty())
        .map(|h| (h, "the hostname"))
}

/// Refuses an identity with control characters (a newline would split `leaderz status`
/// rows and log lines of every candidate; an escape sequence would steer terminals).
fn check_identity(identity: &str, source: &str) -> Result<(), CliError> {
    match identity.chars().find(|c| c.is_control()) {
        None => Ok(()),
        Some(c) => Err(CliError::Usage(format!(
            "invalid identity `{}` (from {source}): it contains the control character {}; use printable characters only",
            printable(identity),
            c.escape_unicode()
        ))),
    }
}

/// Checks a Lease name (a DNS subdomain), so that a typo fails here instead of being
/// retried against the API server forever.
pub(crate) fn check_lease_name(name: &str) -> Result<(), CliError> {
    let ok = !name.is_empty()
        && name.len() <= 253
        && name.split('.').all(is_dns_label)
        && name.split('.').all(|l| l.len() <= 63);
    if ok {
        Ok(())
    } else {
        Err(CliError::Usage(format!(
            "invalid lease name `{name}`: use lowercase letters, digits, '-' and '.', starting and ending with a letter or digit (at most 253 characters)"
        )))
    }
}

fn check_namespace(ns: &str) -> Result<(), CliError> {
    if is_dns_label(ns) && ns.len() <= 63 {
        Ok(())
    } else {
        Err(CliError::Usage(format!(
            "invalid namespace `{ns}`: use lowercase letters, digits and '-', starting and ending with a letter or digit (at most 63 characters)"
        )))
    }
}

/// An RFC 1123 label, length aside.
fn is_dns_label(s: &str) -> bool {
    let bytes = s.as_bytes();
    let edge = |b: &u8| b.is_ascii_lowercase() || b.is_ascii_digit();
    bytes.first().is_some_and(edge)
        && bytes.last().is_some_and(edge)
        && bytes.iter().all(|b| edge(b) || *b == b'-')
}

/// A client for `config`, once the API server has answered `/version` (within 5 s).
/// Nothing is written before this succeeds.
pub(crate) async fn connect(config: kube::Config) -> Result<Client, CliError> {
    connect_with(config, leaderz::client::Options::default()).await
}

/// [`connect`] with these client options (an election paces the keepalive pings by its
/// timings: [`leaderz::client::Options::for_election`]).
pub(crate) async fn connect_with(
    config: kube::Config,
    options: leaderz::client::Options,
) -> Result<Client, CliError> {
    let url = config.cluster_url.to_string();
    // HTTP/2 with keepalive pings and TCP_NODELAY (see `leaderz::client`).
    let client = options
        .build(config)
        .map_err(|e| CliError::KubeConfig(chain(&e)))?;
    match timeout(REACHABILITY_TIMEOUT, client.apiserver_version()).await {
        Ok(Ok(_)) => Ok(client),
        Ok(Err(kube::Error::Api(status))) if status.code == 401 => Err(CliError::Unauthorized {
            url,
            cause: status.message,
        }),
        // It answered: reachable, even if /version is not for us.
        Ok(Err(kube::Error::Api(_))) => Ok(client),
        Ok(Err(e)) => Err(CliError::Unreachable {
            url,
            cause: chain(&e),
        }),
        Err(_) => Err(CliError::Unreachable {
            url,
            cause: format!("no answer within {REACHABILITY_TIMEOUT:?}"),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn namespace_precedence() {
        let r = resolve_namespace;
        assert_eq!(r(Some("a"), Some("b"), Some("c"), Some("d")), "a");
        assert_eq!(r(None, Some("b"), Some("c"), Some("d")), "b");
        assert_eq!(r(None, None, Some("c\n"), Some("d")), "c");
        assert_eq!(r(None, None, None, Some("d")), "d");
        assert_eq!(r(None, None, None, None), "default");
        // Empty values (an unset downward-API field) count as unset.
        assert_eq!(r(None, Some(""), Some(" \n"), Some("d")), "d");
    }

    #[test]
    fn identity_precedence() {
        let host = || Some("host".to_owned());
        let no_host = || None;
        let r = |flag, pod, host: &dyn Fn() -> Option<String>| {
            resolve_identity(flag, pod, host).map(|(id, source)| format!("{id} from {source}"))
        };
        assert_eq!(
            r(Some("a"), Some("pod"), &host).unwrap(),
            "a from --identity"
        );
        assert_eq!(r(None, Some("pod"), &host).unwrap(), "pod from $POD_NAME");
        assert_eq!(r(None, None, &host).unwrap(), "host from the hostname");
        assert_eq!(r(None, Some(""), &host).unwrap(), "host from the hostname");
        assert_eq!(r(None, None, &no_host), None);
        // An explicit empty identity is kept, for the library to refuse with its message.
        assert_eq!(r(Some(""), Some("pod"), &host).unwrap(), " from --identity");
    }

    #[test]
    fn identities_with_control_characters_are_refused_on_one_line() {
        assert!(check_identity("pod-a.example_1 é", "--identity").is_ok());
        let err = check_identity("a\nb", "$POD_NAME").unwrap_err();
        assert_eq!(err.exit_code(), 2);
        assert_eq!(
            err.to_string(),
            "invalid identity `a\\nb` (from $POD_NAME): it contains the control character \\u{a}; use printable characters only"
        );
        assert!(check_identity("\u{1b}[31mred", "--identity").is_err());
    }

    #[test]
    fn names_are_checked() {
        for ok in ["my-lock", "a", "kube-controller-manager", "a.b-c.d", "0"] {
            assert!(check_lease_name(ok).is_ok(), "{ok}");
        }
        for bad in ["", "My-Lock", "-a", "a-", "a..b", "a_b", &"x".repeat(254)] {
            assert!(check_lease_name(bad).is_err(), "{bad}");
        }
        assert!(check_namespace("kube-system").is_ok());
        for bad in ["", "a.b", "A", &"x".repeat(64)] {
            assert!(check_namespace(bad).is_err(), "{bad}");
        }
    }
}
