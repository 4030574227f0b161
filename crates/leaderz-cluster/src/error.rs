//! The one error type of the cluster harness.

use std::{io, path::PathBuf, sync::Arc, time::Duration};

/// `Result` with this crate's [`Error`] as the default error type.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What can go wrong while building, starting or using the cluster.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// This machine cannot run the cluster (not root, a package missing, not Linux). Tests
    /// print this and skip; `LEADERZ_REQUIRE_NODE=1` turns the skip into a failure.
    #[error("cannot run a one-node cluster here: {0}")]
    Unavailable(String),
    /// A build script or `cargo build` failed or did not yield what it should.
    #[error("building {what}: {reason}")]
    Build {
        /// What was being built.
        what: String,
        /// Why it failed.
        reason: String,
    },
    /// A file-system or process operation failed.
    #[error("{context}")]
    Io {
        /// What was being done.
        context: String,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// A command run inside the node's namespaces failed.
    #[error("`{command}` failed ({status}): {stderr}")]
    Command {
        /// The command line.
        command: String,
        /// How it exited.
        status: String,
        /// What it wrote to stderr.
        stderr: String,
    },
    /// A node component exited or did not become ready.
    #[error("{component} {problem}; last lines of its log {}:\n{tail}", log.display())]
    Component {
        /// e.g. `kubelet`.
        component: &'static str,
        /// What went wrong.
        problem: String,
        /// Its log file.
        log: PathBuf,
        /// The last lines of its log.
        tail: String,
    },
    /// Something did not happen in time.
    #[error("{what} did not happen within {timeout:?}{detail}")]
    Timeout {
        /// What was waited for.
        what: String,
        /// How long.
        timeout: Duration,
        /// What was seen last, if anything (starts with `: `).
        detail: String,
    },
    /// The control plane failed.
    #[error(transparent)]
    ControlPlane(#[from] leaderz_testenv::Error),
    /// A Kubernetes API call failed.
    #[error("{context}")]
    Kube {
        /// What was being done.
        context: String,
        /// The cause.
        #[source]
        source: kube::Error,
    },
    /// The shared cluster failed to start earlier in this process.
    #[error("the shared cluster failed to start")]
    Shared(#[source] Arc<Error>),
}

impl Error {
    pub(crate) fn io(context: impl Into<String>) -> impl FnOnce(io::Error) -> Self {
        let context = context.into();
        move |source| Self::Io { context, source }
    }

    /// The reason, if this (or the shared start it wraps) says the machine cannot run a
    /// cluster at all, as opposed to a cluster that failed.
    pub fn unavailable_reason(&self) -> Option<&str> {
        match self {
            Self::Unavailable(reason) => Some(reason),
            Self::Shared(inner) => inner.unavailable_reason(),
            _ => None,
        }
    }
}
