//! The one error type of the test environment.

use std::{io, path::PathBuf, sync::Arc, time::Duration};

/// `Result` with this crate's [`Error`] as the default error type.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What can go wrong while starting or using the control plane.
///
/// Messages say what happened and, where there is one, what to do; the cause
/// (if any) is in [`std::error::Error::source`].
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// `controlplane/build.sh` could not be run, failed, or named a directory without both
    /// binaries.
    #[error(
        "could not obtain kube-apiserver and etcd via {}: {reason} \
         (or point KUBEBUILDER_ASSETS at a directory holding both binaries)",
        script.display()
    )]
    Binaries {
        /// The build script that was run.
        script: PathBuf,
        /// Why it did not yield the binaries.
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
    /// Generating a key or certificate failed.
    #[error("generating the {what}")]
    Certificate {
        /// Which key or certificate.
        what: &'static str,
        /// The cause.
        #[source]
        source: rcgen::Error,
    },
    /// A server process exited while it was expected to run.
    #[error("{component} exited ({status}); last lines of its log {}:\n{tail}", log.display())]
    Exited {
        /// `etcd` or `kube-apiserver`.
        component: &'static str,
        /// How it exited.
        status: String,
        /// Its log file (removed with the data directory).
        log: PathBuf,
        /// The last lines of its log.
        tail: String,
    },
    /// A server did not become ready in time.
    #[error(
        "{component} did not become ready within {timeout:?} (last probe: {last_probe}); \
         last lines of its log {}:\n{tail}",
        log.display()
    )]
    NotReady {
        /// `etcd` or `kube-apiserver`.
        component: &'static str,
        /// How long it was given.
        timeout: Duration,
        /// What the last readiness probe answered.
        last_probe: String,
        /// Its log file (removed with the data directory).
        log: PathBuf,
        /// The last lines of its log.
        tail: String,
    },
    /// A Kubernetes API call failed.
    #[error("{context}")]
    Kube {
        /// What was being done.
        context: String,
        /// The cause.
        #[source]
        source: kube::Error,
    },
    /// A Kubernetes API call got no answer in time.
    #[error("{context}: no answer within {timeout:?}")]
    Timeout {
        /// What was being done.
        context: String,
        /// How long it was given.
        timeout: Duration,
    },
    /// A permission did not take effect in time (see
    /// [`wait_until_allowed`](crate::wait_until_allowed)).
    #[error(
        "still not allowed to {request} after {timeout:?} ({reason}): \
         grant it with a Role and RoleBinding, or check the subject's name"
    )]
    NotAllowed {
        /// The request, e.g. `create coordination.k8s.io/leases in namespace x`.
        request: String,
        /// How long it was waited for.
        timeout: Duration,
        /// The authorizer's last reason, if it gave one.
        reason: String,
    },
    /// A kubeconfig could not be serialized.
    #[error("serializing a kubeconfig")]
    Kubeconfig(#[source] serde_yaml::Error),
    /// An argument was out of range.
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// The shared control plane failed to start earlier in this process; every later call
    /// to [`ControlPlane::shared`](crate::ControlPlane::shared) returns that failure.
    #[error("the shared control plane failed to start")]
    Shared(#[source] Arc<Error>),
}

impl Error {
    pub(crate) fn io(context: impl Into<String>) -> impl FnOnce(io::Error) -> Self {
        let context = context.into();
        move |source| Self::Io { context, source }
    }

    pub(crate) fn kube(context: impl Into<String>) -> impl FnOnce(kube::Error) -> Self {
        let context = context.into();
        move |source| Self::Kube { context, source }
    }

    pub(crate) fn certificate(what: &'static str) -> impl FnOnce(rcgen::Error) -> Self {
        move |source| Self::Certificate { what, source }
    }

    /// True when a server failed because its port was taken between choosing it and binding
    /// it (another process won the race); starting again with fresh ports fixes that.
    pub(crate) fn is_port_conflict(&self) -> bool {
        match self {
            Self::Exited { tail, .. } | Self::NotReady { tail, .. } => {
                tail.contains("address already in use")
            }
            _ => false,
        }
    }
}
