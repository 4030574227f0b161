//! The lock: where the leader record is read and written.
//!
//! A [`Lock`] is a compare-and-swap register holding one [`LeaderRecord`]: `update`
//! only succeeds if the record is still at the version the caller read. The
//! Kubernetes implementation is [`LeaseLock`] (a `coordination.k8s.io/v1` Lease,
//! written with `replace` carrying the `resourceVersion`); [`MemoryLock`] is an
//! in-process one for deterministic tests and simulations. [`SharedLeaseWatch`] lets
//! many Lease locks in one process share a single watch.
//!
//! Implementations do not time out on their own: the elector bounds every call.

use std::future::Future;
use std::sync::Arc;

use futures::stream::BoxStream;
use k8s_openapi::api::coordination::v1::Lease;

use crate::record::LeaderRecord;

mod candidate;
mod lease;
mod memory;
mod shared;

pub use lease::LeaseLock;
pub(crate) use lease::versioned;
pub use memory::MemoryLock;
pub use shared::SharedLeaseWatch;

/// A record and the version it was read at.
#[derive(Clone, Debug, PartialEq)]
pub struct Versioned {
    /// The record.
    pub record: LeaderRecord,
    /// An opaque version (a `resourceVersion`); an update must name the current one.
    pub version: String,
    /// The whole Lease the record came from, if it came from one, so that an update
    /// keeps its labels, annotations and owner references.
    pub lease: Option<Arc<Lease>>,
}

/// A change seen by [`Lock::watch`].
#[derive(Clone, Debug, PartialEq)]
#[allow(clippy::large_enum_variant)] // handed on at once, never stored in bulk
pub enum LockEvent {
    /// The record was created or changed.
    Changed(Versioned),
    /// The record was deleted.
    Deleted,
}

/// Where the leader record lives. See the [module docs](self).
///
/// With a [`leaderz::client`](crate::client), the elector counts a write's term from
/// when the operation's first request left the client's queue. An implementation must
/// therefore send each operation's write as its first request through that client (or
/// as its only one), never after another through a path that bypasses the client.
///
/// Under load that client may also fail an operation's first request at once, unsent, with
/// a transport error (it is deferred: the elector waits for the request's turn without
/// holding it built, then runs the operation again). An implementation must return that
/// error as it is, not retry the request or carry on without it.
pub trait Lock: Send + Sync + 'static {
    /// Reads the record; `None` if it does not exist.
    fn get(&self) -> impl Future<Output = Result<Option<Versioned>, LockError>> + Send;

    /// Creates the record; [`LockError::AlreadyExists`] if someone else did first.
    fn create(
        &self,
        record: &LeaderRecord,
    ) -> impl Future<Output = Result<Versioned, LockError>> + Send;

    /// Replaces the record if it is still at `current.version`, else
    /// [`LockError::Conflict`].
    fn update(
        &self,
        current: &Versioned,
        record: &LeaderRecord,
    ) -> impl Future<Output = Result<Versioned, LockError>> + Send;

    /// A stream of changes after `version` (empty: from now on). The server ends it after
    /// about `timeout`; the caller then watches anew. A version too old to watch from
    /// fails with [`LockError::Gone`] (when opening, or as the stream's last item).
    fn watch(
        &self,
        version: &str,
        timeout: std::time::Duration,
    ) -> impl Future<Output = Result<BoxStream<'static, Result<LockEvent, LockError>>, LockError>> + Send;

    /// A short description for logs and metrics labels, e.g. `default/my-lock`.
    fn describe(&self) -> String;

    /// When the record is known not to exist without asking: as of a consistent read
    /// sent at the instant returned, or later. A cache kept by a list and a watch, such
    /// as [`SharedLeaseWatch`]'s, knows it as of when its last list was sent (a list
    /// served from the API server's own cache, `resourceVersion=0`, does not count), or
    /// as of when a write was asked for that the watch has since shown. A new election
    /// then creates the record at once instead of reading first, if that instant is
    /// within a retry period; and a create that still waits in the client a retry period
    /// after the read it was decided on is sent only if this still vouches for a retry
    /// period. `None` (the default): not known.
    ///
    /// The instant must not be later than that read: the election trusts an absence
    /// for a retry period after it. A record that exists after all only costs a refused
    /// create (the create is itself a check); but one re-created, led on and deleted
    /// since the instant claimed could have a leader that does not know yet.
    fn known_absent(&self) -> Option<tokio::time::Instant> {
        None
    }

    /// Publishes `identity` as a candidate for coordinated leader election and keeps the
    /// publication fresh (for a Lease: a `LeaseCandidate` answering the controller's
    /// pings) until `stop` is cancelled, then withdraws it. Returns an error only when
    /// coordinated election cannot work at all (the API is not served, access refused
    /// at the start); passing trouble is retried. Locks without coordinated election
    /// (the default) refuse with [`LockError::Unsupported`].
    fn keep_candidate(
        &self,
        identity: &str,
        coordinated: &crate::config::Coordinated,
        stop: tokio_util::sync::CancellationToken,
    ) -> impl Future<Output = Result<(), LockError>> + Send {
        let _ = (identity, coordinated, stop);
        async { Err(LockError::Unsupported) }
    }

    /// Tells the world that `identity` started (`leading`) or stopped leading, for
    /// example as a Kubernetes Event on the Lease. Best effort: failures are only
    /// logged. Does nothing unless the implementation opts in.
    fn announce(&self, identity: &str, leading: bool) -> impl Future<Output = ()> + Send {
        let _ = (identity, leading);
        async {}
    }
}

/// Why a lock operation failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LockError {
    /// The record changed since it was read (HTTP 409 on update): someone else wrote first.
    #[error("conflict: the lease changed since it was read")]
    Conflict,
    /// The record already exists (HTTP 409 on create).
    #[error("the lease already exists")]
    AlreadyExists,
    /// The record does not exist (on update: it was deleted).
    #[error("the lease does not exist")]
    NotFound,
    /// The Lease's namespace does not exist (HTTP 404 on create).
    #[error("namespace `{0}` does not exist: create it or pick another with --namespace")]
    NamespaceNotFound(String),
    /// RBAC denied the request (HTTP 403).
    #[error(
        "forbidden: grant `{verb}` on `leases.coordination.k8s.io` in namespace `{namespace}` (lease `{name}`): {message}"
    )]
    Forbidden {
        /// The verb that was denied: get, create, update or watch.
        verb: &'static str,
        /// The Lease's namespace.
        namespace: String,
        /// The Lease's name.
        name: String,
        /// The API server's message.
        message: String,
    },
    /// RBAC denied a request on this candidate's `LeaseCandidate` (coordinated mode).
    #[error(
        "forbidden: grant `{verb}` on `leasecandidates.coordination.k8s.io` in namespace `{namespace}` (see kube/coordinated/): {message}"
    )]
    CandidateForbidden {
        /// The verb that was denied.
        verb: &'static str,
        /// The namespace.
        namespace: String,
        /// The API server's message.
        message: String,
    },
    /// The credentials were refused (HTTP 401).
    #[error("unauthorized: the API server refused our credentials: {0}")]
    Unauthorized(String),
    /// The call did not finish within its time limit.
    #[error("the API call did not finish within {0:?}")]
    Timeout(std::time::Duration),
    /// The version a watch was to start from is too old (HTTP 410 Gone, e.g. after
    /// etcd compaction): read again and watch from the fresh version.
    #[error("the watched version is gone: {0}")]
    Gone(String),
    /// This lock cannot do what was asked (e.g. coordinated election on an in-memory
    /// lock).
    #[error("this lock does not support coordinated leader election")]
    Unsupported,
    /// Coordinated leader election is not served by the API server.
    #[error(
        "coordinated leader election is not served by this API server: start kube-apiserver with --feature-gates=CoordinatedLeaderElection=true --runtime-config=coordination.k8s.io/v1beta1=true ({0})"
    )]
    CoordinatedNotServed(String),
    /// The API server answered with another error (HTTP 5xx, 429, 410, ...).
    #[error("API error {code} {reason}: {message}")]
    Api {
        /// HTTP status code.
        code: u16,
        /// Machine-readable reason.
        reason: String,
        /// Human-readable message.
        message: String,
    },
    /// The request did not get an answer (connection refused, reset, TLS, ...).
    #[error("cannot reach the API server: {0}")]
    Transport(#[source] Box<dyn std::error::Error + Send + Sync>),
}

impl LockError {
    /// A short label for metrics: `conflict`, `forbidden`, `timeout`, ...
    pub fn kind(&self) -> &'static str {
        match self {
            LockError::Conflict => "conflict",
            LockError::AlreadyExists => "already_exists",
            LockError::NotFound => "not_found",
            LockError::NamespaceNotFound(_) => "namespace_not_found",
            LockError::Forbidden { .. } | LockError::CandidateForbidden { .. } => "forbidden",
            LockError::Unauthorized(_) => "unauthorized",
            LockError::Timeout(_) => "timeout",
            LockError::Gone(_) => "gone",
            LockError::Unsupported => "unsupported",
            LockError::CoordinatedNotServed(_) => "coordinated_not_served",
            LockError::Api { .. } => "api",
            LockError::Transport(_) => "transport",
        }
    }

    /// Whether this is a refusal that retrying cannot cure without someone changing
    /// RBAC, credentials or namespaces: forbidden, unauthorized, a missing namespace.
    /// While an election starts these stop it with this error (it names what to grant);
    /// once it has read or written the Lease, they are an outage it rides out.
    pub fn is_fatal(&self) -> bool {
        matches!(
            self,
            LockError::Forbidden { .. }
                | LockError::CandidateForbidden { .. }
                | LockError::Unauthorized(_)
                | LockError::NamespaceNotFound(_)
                | LockError::CoordinatedNotServed(_)
                | LockError::Unsupported
        )
    }

    /// Whether a watch must restart from a fresh read (see [`LockError::Gone`]).
    pub fn is_gone(&self) -> bool {
        matches!(self, LockError::Gone(_))
    }
}
