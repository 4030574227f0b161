//! What can go wrong, as one line that says what to do, and the exit code for it.

use std::error::Error as StdError;

use leaderz::{ConfigError, ElectionError};

use crate::exec::NotRunnable;
use crate::text::printable;

/// Exit code for bad input found before contacting the cluster (as clap uses).
pub(crate) const EXIT_USAGE: u8 = 2;
/// Exit code for every other failure.
pub(crate) const EXIT_FAILURE: u8 = 1;
/// Exit code when the command cannot be executed (as shells use).
pub(crate) const EXIT_CANNOT_EXECUTE: u8 = 126;
/// Exit code when the command is not found (as shells use).
pub(crate) const EXIT_NOT_FOUND: u8 = 127;

/// Why `leaderz` stopped with an error. `main` prints it as `error: <message>`.
#[derive(Debug, thiserror::Error)]
pub(crate) enum CliError {
    /// A flag's value is unusable (checked before any API call).
    #[error("{0}")]
    Usage(String),
    /// The election timing or identity was refused by the library.
    #[error("{0}")]
    Config(#[from] ConfigError),
    /// No kubeconfig and not in a pod.
    #[error(
        "cannot load a Kubernetes client configuration: {0} (set KUBECONFIG, or run in a pod with a service account)"
    )]
    KubeConfig(String),
    /// The API server did not answer.
    #[error("cannot reach the Kubernetes API server at {url}: {cause}")]
    Unreachable {
        /// The server's URL from the kubeconfig.
        url: String,
        /// Why.
        cause: String,
    },
    /// The API server refused the credentials.
    #[error(
        "the Kubernetes API server at {url} refused our credentials: {cause} (check the kubeconfig's user or the pod's service account token)"
    )]
    Unauthorized {
        /// The server's URL from the kubeconfig.
        url: String,
        /// The server's message.
        cause: String,
    },
    /// The elector stopped with a fatal error (RBAC, missing namespace, ...).
    #[error("{}", election_message(.0))]
    Election(#[from] ElectionError),
    /// The HTTP address cannot be listened on.
    #[error("cannot listen on `{addr}`: {cause} (pick another --http address)")]
    Listen {
        /// The address asked for.
        addr: String,
        /// Why.
        cause: String,
    },
    /// The command cannot be executed (checked before anything is written).
    #[error("{0}")]
    NotRunnable(#[from] NotRunnable),
    /// The command's supervisor could not be started.
    #[error("cannot start `{}`: {cause}", printable(.program))]
    Spawn {
        /// The program.
        program: String,
        /// Why.
        cause: std::io::Error,
    },
    /// Leadership was lost and `--exit-on-loss` was given.
    #[error("lost leadership of lease `{0}` (exiting as --exit-on-loss asks)")]
    LostLeadership(String),
    /// The Lease asked for does not exist.
    #[error("lease `{name}` not found in namespace `{namespace}`")]
    LeaseNotFound {
        /// The Lease's name.
        name: String,
        /// Its namespace.
        namespace: String,
    },
    /// `--label-pod` or `--leader-endpoints` cannot work: a grant, the pod or the
    /// Service is missing (checked before campaigning).
    #[error("{0}")]
    Route(#[from] leaderz::routing::RouteError),
    /// The shard set's configuration was refused, or it stopped with an error.
    #[error("{0}")]
    Shards(#[from] leaderz::shards::ShardSetError),
    /// The command did not acknowledge a shard change in time (`run --shards`).
    #[error(
        "the command did not acknowledge shard change {generation} within its limit (write the generation to $LEADERZ_SHARDS_ACK after applying $LEADERZ_SHARDS_FILE); it was killed"
    )]
    ShardsNotAcknowledged {
        /// The generation it did not acknowledge.
        generation: u64,
    },
    /// An API call of `status`, `watch` or `handoff` failed.
    #[error("{0}")]
    Api(String),
    /// A handoff was refused, or could not complete (`handoff`).
    #[error("{0}")]
    Handoff(String),
    /// Anything else (signal handlers, stdout).
    #[error("{0}")]
    Io(String),
}

impl CliError {
    /// The process exit code for this error.
    pub(crate) fn exit_code(&self) -> u8 {
        match self {
            CliError::Usage(_) | CliError::Config(_) | CliError::Listen { .. } => EXIT_USAGE,
            CliError::Spawn { cause, .. } if cause.kind() == std::io::ErrorKind::NotFound => {
                EXIT_NOT_FOUND
            }
            CliError::Spawn { .. } => EXIT_CANNOT_EXECUTE,
            CliError::NotRunnable(e) => e.exit_code(),
            _ => EXIT_FAILURE,
        }
    }
}

/// The library's message, without the "invalid election config: " prefix (flags are
/// not a config file) and on one line.
fn election_message(e: &ElectionError) -> String {
    match e {
        ElectionError::Config(c) => c.to_string(),
        other => chain(other),
    }
}

/// An error and its causes on one line, `a: b: c`, skipping causes whose message the
/// previous one already contains (many errors repeat their source).
pub(crate) fn chain(err: &(dyn StdError + 'static)) -> String {
    let mut out = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        let msg = cause.to_string();
        if !out.contains(&msg) {
            out.push_str(": ");
            out.push_str(&msg);
        }
        source = cause.source();
    }
    out.replace('\n', " ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use leaderz::LockError;
    use std::io;

    #[test]
    fn exit_codes() {
        let spawn = |kind| CliError::Spawn {
            program: "x".into(),
            cause: io::Error::from(kind),
        };
        assert_eq!(spawn(io::ErrorKind::NotFound).exit_code(), 127);
        assert_eq!(spawn(io::ErrorKind::PermissionDenied).exit_code(), 126);
        assert_eq!(CliError::Usage("x".into()).exit_code(), 2);
        assert_eq!(CliError::Config(ConfigError::EmptyIdentity).exit_code(), 2);
        let e = CliError::Election(ElectionError::Lock(LockError::NamespaceNotFound(
            "nope".into(),
        )));
        assert_eq!(e.exit_code(), 1);
        assert_eq!(CliError::LostLeadership("l".into()).exit_code(), 1);
    }

    #[test]
    fn messages_are_the_librarys_on_one_line() {
        let e = CliError::Election(ElectionError::Lock(LockError::NamespaceNotFound(
            "nope".into(),
        )));
        assert_eq!(
            e.to_string(),
            "namespace `nope` does not exist: create it or pick another with --namespace"
        );
        let e = CliError::Election(ElectionError::Config(ConfigError::EmptyIdentity));
        assert!(e.to_string().starts_with("identity must not be empty"));
        let e = CliError::Unreachable {
            url: "https://127.0.0.1:1/".into(),
            cause: "connection refused".into(),
        };
        assert_eq!(
            e.to_string(),
            "cannot reach the Kubernetes API server at https://127.0.0.1:1/: connection refused"
        );
    }

    #[test]
    fn chain_skips_repeated_causes() {
        #[derive(Debug, thiserror::Error)]
        #[error("outer: {0}")]
        struct Repeats(#[source] io::Error);
        #[derive(Debug, thiserror::Error)]
        #[error("outer")]
        struct Adds(#[source] io::Error);
        let inner = || io::Error::other("refused\nreally");
        assert_eq!(chain(&Repeats(inner())), "outer: refused really");
        assert_eq!(chain(&Adds(inner())), "outer: refused really");
    }
}
