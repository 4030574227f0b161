//! Identities that talk to the control plane, and the kubeconfigs and clients made from them.

use std::fmt;

use base64::{Engine as _, engine::general_purpose::STANDARD as BASE64};
use kube::config::{
    AuthInfo, Cluster, Context, Kubeconfig, NamedAuthInfo, NamedCluster, NamedContext,
};
use secrecy::SecretString;

/// How a client proves who it is: a bearer token or a client certificate.
///
/// Obtain one from [`ControlPlane::admin_credentials`](crate::ControlPlane::admin_credentials),
/// [`ControlPlane::user_credentials`](crate::ControlPlane::user_credentials) or
/// [`ControlPlane::service_account_credentials`](crate::ControlPlane::service_account_credentials),
/// then turn it into a client ([`ControlPlane::client`](crate::ControlPlane::client)) or a
/// kubeconfig file ([`ControlPlane::write_kubeconfig`](crate::ControlPlane::write_kubeconfig)).
/// `Debug` does not show the secret.
///
/// ```
/// use leaderz_testenv::Credentials;
/// let token = Credentials::token("eyJhbGciOi...");
/// assert_eq!(format!("{token:?}"), "Credentials::Token(<redacted>)");
/// ```
#[derive(Clone)]
pub struct Credentials(Secret);

#[derive(Clone)]
enum Secret {
    Token(String),
    ClientCert { cert_pem: String, key_pem: String },
}

impl Credentials {
    /// A bearer token, e.g. a ServiceAccount token from the TokenRequest API.
    pub fn token(token: impl Into<String>) -> Self {
        Self(Secret::Token(token.into()))
    }

    /// A client certificate and its private key, both PEM.
    pub fn client_cert(cert_pem: impl Into<String>, key_pem: impl Into<String>) -> Self {
        Self(Secret::ClientCert {
            cert_pem: cert_pem.into(),
            key_pem: key_pem.into(),
        })
    }

    /// The `users[].user` entry of a kubeconfig, with everything embedded.
    pub(crate) fn auth_info(&self) -> AuthInfo {
        match &self.0 {
            Secret::Token(token) => AuthInfo {
                token: Some(SecretString::from(token.clone())),
                ..AuthInfo::default()
            },
            Secret::ClientCert { cert_pem, key_pem } => AuthInfo {
                client_certificate_data: Some(BASE64.encode(cert_pem)),
                client_key_data: Some(SecretString::from(BASE64.encode(key_pem))),
                ..AuthInfo::default()
            },
        }
    }
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.0 {
            Secret::Token(_) => f.write_str("Credentials::Token(<redacted>)"),
            Secret::ClientCert { .. } => f.write_str("Credentials::ClientCert(<redacted>)"),
        }
    }
}

/// Name of the cluster, user and context in generated kubeconfigs.
const NAME: &str = "leaderz-testenv";

/// A self-contained kubeconfig (certificates and keys embedded) for `server` trusting
/// `ca_pem`, as `credentials`.
pub(crate) fn kubeconfig(server: &str, ca_pem: &str, credentials: &Credentials) -> Kubeconfig {
    Kubeconfig {
        clusters: vec![NamedCluster {
            name: NAME.to_owned(),
            cluster: Some(Cluster {
                server: Some(server.to_owned()),
                certificate_authority_data: Some(BASE64.encode(ca_pem)),
                ..Cluster::default()
            }),
            other: Default::default(),
        }],
        auth_infos: vec![NamedAuthInfo {
            name: NAME.to_owned(),
            auth_info: Some(credentials.auth_info()),
            other: Default::default(),
        }],
        contexts: vec![NamedContext {
            name: NAME.to_owned(),
            context: Some(Context {
                cluster: NAME.to_owned(),
                user: Some(NAME.to_owned()),
                namespace: None,
                extensions: None,
                other: Default::default(),
            }),
            other: Default::default(),
        }],
        current_context: Some(NAME.to_owned()),
        kind: Some("Config".to_owned()),
        api_version: Some("v1".to_owned()),
        ..Kubeconfig::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use secrecy::ExposeSecret as _;

    #[test]
    fn debug_hides_secrets() {
        let cert = Credentials::client_cert("CERT", "KEY");
        let shown = format!("{cert:?}");
        assert!(
            !shown.contains("KEY") && !shown.contains("CERT\""),
            "{shown}"
        );
    }

    #[test]
    fn kubeconfig_embeds_everything_and_round_trips() {
        let config = kubeconfig(
            "https://127.0.0.1:6443",
            "CA PEM",
            &Credentials::client_cert("CERT PEM", "KEY PEM"),
        );
        let yaml = serde_yaml::to_string(&config).unwrap();
        let parsed: Kubeconfig = serde_yaml::from_str(&yaml).unwrap();
        let cluster = parsed.clusters[0].cluster.as_ref().unwrap();
        assert_eq!(cluster.server.as_deref(), Some("https://127.0.0.1:6443"));
        assert_eq!(
            BASE64
                .decode(cluster.certificate_authority_data.as_ref().unwrap())
                .unwrap(),
            b"CA PEM"
        );
        let user = parsed.auth_infos[0].auth_info.as_ref().unwrap();
        assert_eq!(
            BASE64
                .decode(user.client_key_data.as_ref().unwrap().expose_secret())
                .unwrap(),
            b"KEY PEM"
        );
        assert_eq!(parsed.current_context.as_deref(), Some(NAME));
    }

    #[test]
    fn token_kubeconfig_carries_the_token() {
        let config = kubeconfig("https://x", "CA", &Credentials::token("t0k3n"));
        let yaml = serde_yaml::to_string(&config).unwrap();
        assert!(yaml.contains("token: t0k3n"), "{yaml}");
    }
}
