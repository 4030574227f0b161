//! Traffic to the leader: a label on the leader's own pod ([`PodLabel`]) for a Service
//! that selects it, and the EndpointSlice of a selector-less Service pointed at the
//! leader's pod IP ([`LeaderEndpoints`]) — both set around a [`Term`], never by the
//! engine.
//!
//! ```no_run
//! use leaderz::routing::{LeaderEndpoints, PodLabel, Routes};
//! use leaderz::{ElectionConfig, Elector, LeaseLock};
//!
//! # async fn doc() -> Result<(), Box<dyn std::error::Error>> {
//! let client = leaderz::client::infer().await?;
//! let (pod, ip) = (std::env::var("POD_NAME")?, std::env::var("POD_IP")?);
//! let routes = Routes::new()
//!     .label_pod(PodLabel::new(client.clone(), "default", &pod, "role", "leader")?)
//!     .leader_endpoints(LeaderEndpoints::new(client.clone(), "default", "my-app-leader", &pod, &ip)?);
//! // Before campaigning: the grants are there, and nothing a previous container of this
//! // pod left still points here.
//! routes.prepare(&pod).await?;
//! let lock = LeaseLock::new(client, "default", "my-lock");
//! let mut handle = Elector::new(lock, ElectionConfig::new(pod))?.spawn();
//! leaderz::routing::run_while_leading(&mut handle, &routes, |term| async move {
//!     // serve writes: the Services send them here while this term lasts
//!     term.cancelled().await;
//! })
//! .await?;
//! # Ok(()) }
//! ```
//!
//! # The order, and why
//!
//! A term starts → the work starts and, **alongside it**, the label is set and the slice
//! pointed here (the Lease is ours already: waiting for the work first would only widen
//! the window in which the Service reaches nobody) → the term ends → **the work stops →
//! the label is removed and the slice emptied → the Lease is released**. The last arrow
//! needs no help from the engine: it releases only once every clone of the [`Term`] is
//! dropped, and the routing task holds one until its clean-up is written.
//!
//! If the clean-up cannot be written (API server unreachable, RBAC revoked), the task
//! keeps trying (200 ms, doubling to 5 s) and keeps holding the term, so no release
//! happens over a label or slice that still points here: on shutdown the engine gives
//! up after `shutdown_grace` and lets the Lease **expire** instead of releasing it (the
//! handover then takes a lease duration); after a lost term the process does not
//! campaign again until the clean-up is written (`Status::work_overdue` and the health
//! check say so meanwhile). A caller that stops waiting for [`Routed::finish`] (as
//! `leaderz run` and `serve` do after `--routing-drain` + 2 call timeouts) must then
//! stop the election without a release — the routing task's clone of the term sees to
//! that while it lives — and exit.
//!
//! # What each one guarantees
//!
//! Every write is compare-and-swap on the `resourceVersion` read, made only after
//! [`Term::check`], and stamped with the term: annotations [`HOLDER_ANNOTATION`],
//! [`TOKEN_ANNOTATION`] and [`LEASE_ANNOTATION`] (identity, fencing token, lease).
//!
//! - **EndpointSlice**: one writer at a time. A leader overwrites only a slice whose
//!   stamp is not newer than its own term (or that is empty); a leader that steps down
//!   empties only a slice that still names its own term. So a deposed leader's late
//!   write never replaces its successor's, and a new leader replaces whatever a crashed
//!   or partitioned one left, with its first write. While a leader that can reach the API
//!   server leads, the slice names only it, or nobody for the one write after its term
//!   began.
//! - **Pod label**: each process labels only its own pod, and on taking a term also
//!   removes the label from any other pod that carries it for an **older term of the
//!   same Lease** (needs `list` on pods; without it this step is skipped with a warning,
//!   and a crashed or partitioned leader's pod keeps its label until its process can
//!   remove it or the pod is gone). A pod that carries the label for another Lease (two
//!   elections using one label) or without a stamp (set by hand) is left alone, with a
//!   warning: a Service selecting the label reaches it too, so give each election a label
//!   of its own. A restarted container removes its pod's stale label before campaigning.
//! - **A start write whose answer is lost** (no answer within the call timeout, a
//!   transport error, a 5xx) may still land later, even after the step-down. So the
//!   step-down then writes even where nothing points here yet: the annotation
//!   [`STEPPED_DOWN_ANNOTATION`] on the pod, an emptied slice while the slice is at a
//!   version such a write was based on, an emptied slice created where a create may
//!   land. The late write, compare-and-swap on an older version or a create of a taken
//!   name, then fails (409).
//! - **Neither is atomic with the Lease.** The label and the slice lag the term by a
//!   write at its start and lead it by one at its end; kube-proxy adds its own delay
//!   (seconds under load). A leader that cannot reach the API server cannot take its
//!   label or slice back, and a Service selecting the label also selects a pod only
//!   while it is Ready. Where a write must never come from a deposed leader, the
//!   resource still needs the [fencing token](Term::fencing_token).
//! - **Deleting the Lease resets the tokens.** A Lease deleted and created again starts
//!   from token 0, and the stamps of its earlier terms are then newer: a leader does not
//!   overwrite a non-empty slice of such a term ([`RouteError::Superseded`] says so) nor
//!   take the label off such a pod. If the leader of those terms is gone for good (a
//!   live one takes its own routes back at its step-down, a restarted container at
//!   startup), delete the slice (`kubectl delete endpointslice <service>`) and remove the
//!   label (`kubectl label pod <pod> <key>-`) by hand.

use std::collections::BTreeSet;
use std::future::Future;
use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use k8s_openapi::api::authorization::v1::{
    ResourceAttributes, SelfSubjectAccessReview, SelfSubjectAccessReviewSpec,
};
use k8s_openapi::api::core::v1::{ObjectReference, Pod, Service};
use k8s_openapi::api::discovery::v1::{Endpoint, EndpointConditions, EndpointPort, EndpointSlice};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::api::{ListParams, ObjectMeta, Patch, PatchParams, PostParams};
use kube::{Api, Client};
use serde_json::json;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio::time::{Instant, sleep, timeout};
use tracing::{debug, info, warn};

use crate::elector::ElectionError;
use crate::handle::{ElectionHandle, Terms};
use crate::term::{Term, TermInfo};

/// The label that ties an EndpointSlice to its Service (kube-proxy reads it).
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";
/// The label naming who manages an EndpointSlice; ours says [`MANAGED_BY`], so the
/// EndpointSlice controller leaves the slice alone.
pub const MANAGED_BY_LABEL: &str = "endpointslice.kubernetes.io/managed-by";
/// The value of [`MANAGED_BY_LABEL`] on slices leaderz writes.
pub const MANAGED_BY: &str = "leaderz.io";
/// Annotation: the identity whose term a slice or pod label belongs to.
pub const HOLDER_ANNOTATION: &str = "leaderz.io/holder";
/// Annotation: the fencing token of that term.
pub const TOKEN_ANNOTATION: &str = "leaderz.io/fencing-token";
/// Annotation: the lease (`namespace/name`) of that term.
pub const LEASE_ANNOTATION: &str = "leaderz.io/lease";
/// Annotation written by every step-down (`<fencing token>@<time>`): the last term that
/// took its route back from this object. A step-down that does not know whether a write
/// of its term's start landed writes it even when there is nothing else to change, so
/// that the object's resourceVersion moves and that write, based on an older version,
/// can no longer land.
pub const STEPPED_DOWN_ANNOTATION: &str = "leaderz.io/stepped-down";

/// How long one API call may take, unless [`Routes::call_timeout`] says otherwise.
pub const DEFAULT_CALL_TIMEOUT: Duration = Duration::from_secs(5);
const FIRST_RETRY: Duration = Duration::from_millis(200);
const LAST_RETRY: Duration = Duration::from_secs(5);

const LABEL_POD_RBAC: &str = "kube/label-pod/role.yaml";
const ENDPOINTS_RBAC: &str = "kube/leader-endpoints/role.yaml";

/// Why pointing traffic at the leader (or away from it) failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RouteError {
    /// RBAC denies a call this needs.
    #[error("forbidden: grant `{verb}` on `{resource}` in namespace `{namespace}`{} (see {rbac})", .name.as_ref().map(|n| format!(" for `{n}`")).unwrap_or_default())]
    Forbidden {
        /// The verb to grant.
        verb: &'static str,
        /// The resource, e.g. `pods` or `endpointslices.discovery.k8s.io`.
        resource: &'static str,
        /// The namespace.
        namespace: String,
        /// The object's name, where the grant can be limited to it.
        name: Option<String>,
        /// The file in `kube/` that has the grant.
        rbac: &'static str,
    },
    /// The pod or the Service does not exist.
    #[error("{what} `{name}` not found in namespace `{namespace}`: {hint}")]
    NotFound {
        /// `pod` or `service`.
        what: &'static str,
        /// Its name.
        name: String,
        /// Its namespace.
        namespace: String,
        /// What to do.
        hint: &'static str,
    },
    /// A setting or the Service cannot be used as given.
    #[error("{0}")]
    Invalid(String),
    /// A newer term than ours points the slice elsewhere: this term is over (or the
    /// Lease was deleted and its token started again).
    #[error(
        "endpointslice `{slice}` names term {theirs} of `{holder}`, newer than ours ({ours}): not overwriting it (if the Lease was deleted and its token reset, delete the EndpointSlice)"
    )]
    Superseded {
        /// The slice.
        slice: String,
        /// Who it names.
        holder: String,
        /// Its token.
        theirs: i64,
        /// Our token.
        ours: i64,
    },
    /// A call took longer than its limit; whether it landed is unknown.
    #[error("the API call did not finish within {0:?}")]
    Timeout(Duration),
    /// The term ended before the write was sent.
    #[error("the term ended before traffic was pointed here")]
    TermEnded,
    /// Another API failure (retried).
    #[error("API call failed: {0}")]
    Api(#[source] kube::Error),
}

impl RouteError {
    fn is_conflict(&self) -> bool {
        matches!(self, RouteError::Api(kube::Error::Api(s)) if s.code == 409)
    }

    fn is_not_found(&self) -> bool {
        matches!(self, RouteError::Api(kube::Error::Api(s)) if s.code == 404)
    }

    /// Whether a write that failed with this error may still have landed, or land
    /// later: no answer in time, a transport error, or a 5xx (the API server may have
    /// passed the write on to etcd). A 4xx answer means it was refused.
    fn outcome_unknown(&self) -> bool {
        match self {
            RouteError::Timeout(_) => true,
            RouteError::Api(kube::Error::Api(s)) => s.code >= 500,
            RouteError::Api(_) => true,
            RouteError::Forbidden { .. }
            | RouteError::NotFound { .. }
            | RouteError::Invalid(_)
            | RouteError::Superseded { .. }
            | RouteError::TermEnded => false,
        }
    }
}

/// The result of a routing call.
pub type Result<T, E = RouteError> = std::result::Result<T, E>;

/// Checks `KEY=VALUE` as Kubernetes checks a label and splits it.
///
/// ```
/// let (k, v) = leaderz::routing::parse_label("leaderz.io/role=leader").unwrap();
/// assert_eq!((k.as_str(), v.as_str()), ("leaderz.io/role", "leader"));
/// assert!(leaderz::routing::parse_label("role").is_err());
/// assert!(leaderz::routing::parse_label("role=not ok").is_err());
/// ```
pub fn parse_label(spec: &str) -> Result<(String, String)> {
    let (key, value) = spec.split_once('=').ok_or_else(|| {
        RouteError::Invalid(format!(
            "label `{spec}` must be KEY=VALUE, e.g. role=leader"
        ))
    })?;
    check_label(key, value)?;
    Ok((key.to_owned(), value.to_owned()))
}

/// A label name or value: at most 63 of `[A-Za-z0-9._-]`, alphanumeric at both ends.
fn is_label_name(s: &str) -> bool {
    let edge = |c: Option<char>| c.is_some_and(|c| c.is_ascii_alphanumeric());
    !s.is_empty()
        && s.len() <= 63
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        && edge(s.chars().next())
        && edge(s.chars().last())
}

/// A DNS subdomain (a label key's prefix, an object name): at most 253 characters,
/// dot-separated parts of `[a-z0-9-]`, alphanumeric at both ends.
fn is_dns_subdomain(s: &str) -> bool {
    s.len() <= 253
        && s.split('.').all(|part| {
            !part.is_empty()
                && part.len() <= 63
                && part
                    .chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
                && !part.starts_with('-')
                && !part.ends_with('-')
        })
}

fn check_label(key: &str, value: &str) -> Result<()> {
    let (prefix, name) = match key.split_once('/') {
        Some((prefix, name)) => (Some(prefix), name),
        None => (None, key),
    };
    if !prefix.is_none_or(is_dns_subdomain) || !is_label_name(name) {
        return Err(RouteError::Invalid(format!(
            "label key `{key}` is not valid: an optional DNS prefix and `/`, then at most 63 letters, digits, `-`, `_` or `.`, starting and ending with a letter or digit"
        )));
    }
    if !(value.is_empty() || is_label_name(value)) {
        return Err(RouteError::Invalid(format!(
            "label value `{value}` is not valid: at most 63 letters, digits, `-`, `_` or `.`, starting and ending with a letter or digit"
        )));
    }
    Ok(())
}

fn check_name(what: &str, name: &str) -> Result<()> {
    if name.is_empty() || !is_dns_subdomain(name) {
        return Err(RouteError::Invalid(format!(
            "{what} `{name}` is not a valid object name (lowercase letters, digits, `-` and `.`)"
        )));
    }
    Ok(())
}

/// The stamp of a term on an object: who, which token, which lease.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Stamp {
    holder: String,
    token: i64,
    lease: String,
}

impl Stamp {
    fn of(term: &Term) -> Self {
        Self::of_info(term.info())
    }

    fn of_info(term: &TermInfo) -> Self {
        Self {
            holder: term.identity.clone(),
            token: term.fencing_token,
            lease: term.lock.clone(),
        }
    }

    fn read(meta: &ObjectMeta) -> Option<Self> {
        let a = meta.annotations.as_ref()?;
        Some(Self {
            holder: a.get(HOLDER_ANNOTATION)?.clone(),
            token: a.get(TOKEN_ANNOTATION)?.parse().ok()?,
            lease: a.get(LEASE_ANNOTATION).cloned().unwrap_or_default(),
        })
    }

    fn annotations(&self) -> serde_json::Value {
        json!({
            HOLDER_ANNOTATION: self.holder,
            TOKEN_ANNOTATION: self.token.to_string(),
            LEASE_ANNOTATION: self.lease,
        })
    }
}

/// The value of [`STEPPED_DOWN_ANNOTATION`] for a step-down of `term` on an object
/// whose annotation is `current`; never equal to it, so the write always changes the
/// object (a write that changes nothing leaves the resourceVersion where it was).
fn stepped_down(term: &TermInfo, current: Option<&String>) -> String {
    let value = format!("{}@{}", term.fencing_token, jiff::Timestamp::now());
    if current == Some(&value) {
        format!("{value}+")
    } else {
        value
    }
}

fn api_error(
    err: kube::Error,
    verb: &'static str,
    resource: &'static str,
    namespace: &str,
    name: Option<&str>,
    rbac: &'static str,
) -> RouteError {
    match err {
        kube::Error::Api(s) if s.code == 403 => RouteError::Forbidden {
            verb,
            resource,
            namespace: namespace.to_owned(),
            name: name.map(str::to_owned),
            rbac,
        },
        other => RouteError::Api(other),
    }
}

/// Runs `call` within `limit`.
async fn bounded<T>(limit: Duration, call: impl Future<Output = Result<T>>) -> Result<T> {
    timeout(limit, call)
        .await
        .unwrap_or(Err(RouteError::Timeout(limit)))
}

/// Asks the API server whether we may `verb` `resource` (a SelfSubjectAccessReview,
/// which every authenticated identity may create).
async fn allowed(
    client: &Client,
    verb: &'static str,
    group: &str,
    resource: &str,
    namespace: &str,
    name: Option<&str>,
) -> Result<bool> {
    let review = SelfSubjectAccessReview {
        spec: SelfSubjectAccessReviewSpec {
            resource_attributes: Some(ResourceAttributes {
                verb: Some(verb.to_owned()),
                group: Some(group.to_owned()),
                resource: Some(resource.to_owned()),
                namespace: Some(namespace.to_owned()),
                name: name.map(str::to_owned),
                ..ResourceAttributes::default()
            }),
            ..SelfSubjectAccessReviewSpec::default()
        },
        ..SelfSubjectAccessReview::default()
    };
    let answer = Api::<SelfSubjectAccessReview>::all(client.clone())
        .create(&PostParams::default(), &review)
        .await
        .map_err(RouteError::Api)?;
    Ok(answer.status.is_some_and(|s| s.allowed))
}

// ---- the pod label ------------------------------------------------------------------

/// The leader's label on its own pod: `KEY=VALUE` while it leads, absent otherwise.
///
/// Needs `get` and `patch` on `pods` in the namespace, and `list` to take the label off
/// a crashed or partitioned leader's pod (`kube/label-pod/role.yaml`). RBAC cannot
/// narrow these to the pod itself: a Deployment's pod names are not known when the
/// Role is written.
#[derive(Clone)]
pub struct PodLabel {
    pods: Api<Pod>,
    client: Client,
    namespace: String,
    pod: String,
    key: String,
    value: String,
    /// Whether a pod that carries the label for another Lease (or none) was warned about.
    warned_foreign: Arc<AtomicBool>,
}

/// A write of [`PodLabel`] (see [`PodLabel::write`]).
#[derive(Clone, Copy, Debug)]
enum LabelChange<'a> {
    /// The label, stamped with this term.
    Set(&'a Stamp),
    /// No label and no stamp; the step-down annotation if given.
    Remove { stepped_down: Option<&'a str> },
    /// Only the step-down annotation (to move the resourceVersion).
    SteppedDown(&'a str),
}

impl std::fmt::Debug for PodLabel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PodLabel")
            .field("namespace", &self.namespace)
            .field("pod", &self.pod)
            .field("key", &self.key)
            .field("value", &self.value)
            .finish_non_exhaustive()
    }
}

impl PodLabel {
    /// Label `key=value` on this process's pod `pod` (`$POD_NAME` from the downward API)
    /// in `namespace`. The label is checked as Kubernetes checks labels.
    pub fn new(client: Client, namespace: &str, pod: &str, key: &str, value: &str) -> Result<Self> {
        check_name("pod", pod)?;
        check_label(key, value)?;
        Ok(Self {
            pods: Api::namespaced(client.clone(), namespace),
            client,
            namespace: namespace.to_owned(),
            pod: pod.to_owned(),
            key: key.to_owned(),
            value: value.to_owned(),
            warned_foreign: Arc::default(),
        })
    }

    /// The label selector `key=value`, for a Service or a listing.
    pub fn selector(&self) -> String {
        format!("{}={}", self.key, self.value)
    }

    /// The error for `verb` on pod `name`: a 404 on our own pod means `POD_NAME` is
    /// wrong; on another pod, that it is gone (left as the API's 404).
    fn error(&self, name: &str, verb: &'static str, err: kube::Error) -> RouteError {
        if let kube::Error::Api(s) = &err
            && s.code == 404
            && verb != "list"
            && name == self.pod
        {
            return RouteError::NotFound {
                what: "pod",
                name: self.pod.clone(),
                namespace: self.namespace.clone(),
                hint: "set POD_NAME and POD_NAMESPACE from the downward API (metadata.name, metadata.namespace)",
            };
        }
        api_error(err, verb, "pods", &self.namespace, None, LABEL_POD_RBAC)
    }

    fn carries(&self, pod: &Pod) -> bool {
        pod.metadata
            .labels
            .as_ref()
            .and_then(|l| l.get(&self.key))
            .is_some_and(|v| *v == self.value)
    }

    /// Patches pod `name` if it is still at `version` (compare-and-swap: a merge patch
    /// that carries the resourceVersion). `Set`: the label and the term's stamp;
    /// `Remove`: no label, no stamp; `SteppedDown`: only the step-down annotation.
    async fn write(&self, name: &str, version: &str, change: LabelChange<'_>) -> Result<()> {
        let metadata = match change {
            LabelChange::Set(stamp) => json!({
                "resourceVersion": version,
                "labels": { self.key.as_str(): self.value },
                "annotations": stamp.annotations(),
            }),
            LabelChange::Remove { stepped_down } => {
                let mut annotations = json!({
                    HOLDER_ANNOTATION: null, TOKEN_ANNOTATION: null, LEASE_ANNOTATION: null,
                });
                if let Some(value) = stepped_down {
                    annotations[STEPPED_DOWN_ANNOTATION] = json!(value);
                }
                json!({
                    "resourceVersion": version,
                    "labels": { self.key.as_str(): null },
                    "annotations": annotations,
                })
            }
            LabelChange::SteppedDown(value) => json!({
                "resourceVersion": version,
                "annotations": { STEPPED_DOWN_ANNOTATION: value },
            }),
        };
        self.pods
            .patch(
                name,
                &PatchParams::default(),
                &Patch::Merge(&json!({ "metadata": metadata })),
            )
            .await
            .map_err(|e| self.error(name, "patch", e))?;
        Ok(())
    }

    /// Sets the label on our pod while `term` is active. Sets `unsure` when a write's
    /// outcome is unknown (it may land later).
    async fn point_here(&self, term: &Term, limit: Duration, unsure: &mut bool) -> Result<()> {
        let stamp = Stamp::of(term);
        loop {
            let pod = bounded(limit, async {
                self.pods
                    .get(&self.pod)
                    .await
                    .map_err(|e| self.error(&self.pod, "get", e))
            })
            .await?;
            if self.carries(&pod) && Stamp::read(&pod.metadata).as_ref() == Some(&stamp) {
                return Ok(());
            }
            term.check().map_err(|_| RouteError::TermEnded)?;
            let version = pod.metadata.resource_version.unwrap_or_default();
            match bounded(
                limit,
                self.write(&self.pod, &version, LabelChange::Set(&stamp)),
            )
            .await
            {
                Err(e) if e.is_conflict() => continue,
                Err(e) => {
                    *unsure |= e.outcome_unknown();
                    return Err(e);
                }
                Ok(()) => return Ok(()),
            }
        }
    }

    /// Removes the label from other pods that carry it for an older term of OUR Lease (a
    /// crashed or partitioned leader's). A pod that carries the label without our
    /// Lease's stamp (another election that uses the same label, or a label set by hand)
    /// is left alone, with a warning (once). Returns how many; a refused `list` is
    /// `Ok(None)`.
    async fn take_from_others(&self, term: &Term, limit: Duration) -> Result<Option<usize>> {
        let ours = Stamp::of(term);
        let listed = bounded(limit, async {
            self.pods
                .list(&ListParams::default().labels(&self.selector()))
                .await
                .map_err(|e| self.error("", "list", e))
        })
        .await;
        let pods = match listed {
            Ok(list) => list.items,
            Err(RouteError::Forbidden { .. }) => return Ok(None),
            Err(e) => return Err(e),
        };
        let mut taken = 0;
        for mut pod in pods {
            let Some(name) = pod.metadata.name.clone() else {
                continue;
            };
            if name == self.pod {
                continue;
            }
            loop {
                if !self.carries(&pod) {
                    break;
                }
                let stamp = Stamp::read(&pod.metadata);
                match &stamp {
                    Some(stamp) if stamp.lease == ours.lease && stamp.token < ours.token => {}
                    Some(stamp) if stamp.lease == ours.lease => {
                        warn!(pod = %name, theirs = stamp.token, ours = ours.token, "another pod carries the leader label for a term of this lease not older than ours; leaving it (if the Lease was deleted and its tokens started again, remove the label by hand)");
                        break;
                    }
                    other => {
                        if !self.warned_foreign.swap(true, Ordering::Relaxed) {
                            warn!(
                                pod = %name,
                                lease = ?other.as_ref().map(|s| s.lease.as_str()),
                                label = %self.selector(),
                                "another pod carries the leader label but not for this lease (another election uses the same label, or it was set by hand); leaving it, and any such pod (a Service selecting the label reaches them too: give each election a label of its own)"
                            );
                        } else {
                            debug!(pod = %name, "another pod carries the leader label but not for this lease; leaving it");
                        }
                        break;
                    }
                }
                term.check().map_err(|_| RouteError::TermEnded)?;
                let version = pod.metadata.resource_version.clone().unwrap_or_default();
                let removed = LabelChange::Remove { stepped_down: None };
                match bounded(limit, self.write(&name, &version, removed)).await {
                    Ok(()) => {
                        info!(pod = %name, stale = ?stamp.map(|s| s.token), "removed the leader label from a pod of an older term");
                        taken += 1;
                        break;
                    }
                    // Deleted since the listing: its label went with it.
                    Err(e) if e.is_not_found() => {
                        debug!(pod = %name, "a pod with the leader label is gone");
                        break;
                    }
                    Err(e) if e.is_conflict() => {
                        pod = match bounded(limit, async {
                            self.pods
                                .get_opt(&name)
                                .await
                                .map_err(|e| self.error(&name, "get", e))
                        })
                        .await?
                        {
                            Some(p) => p,
                            None => break,
                        };
                    }
                    Err(e) => return Err(e),
                }
            }
        }
        Ok(Some(taken))
    }

    /// Removes the label from our pod if it is there and not stamped by a term newer
    /// than `term` (none: at startup, any). With `bump` (a write of the term's start may
    /// still land), writes the step-down annotation even when there is nothing to
    /// remove, so that the pod's resourceVersion moves past every version that write
    /// could be based on. Returns whether it removed the label.
    async fn point_away(
        &self,
        term: Option<&TermInfo>,
        bump: bool,
        limit: Duration,
    ) -> Result<bool> {
        loop {
            let pod = bounded(limit, async {
                self.pods
                    .get_opt(&self.pod)
                    .await
                    .map_err(|e| self.error(&self.pod, "get", e))
            })
            .await?;
            let Some(pod) = pod else {
                if term.is_none() {
                    // At startup: the pod must exist (POD_NAME wrong, or another namespace).
                    return Err(RouteError::NotFound {
                        what: "pod",
                        name: self.pod.clone(),
                        namespace: self.namespace.clone(),
                        hint: "set POD_NAME and POD_NAMESPACE from the downward API (metadata.name, metadata.namespace)",
                    });
                }
                return Ok(false); // our pod is gone, and its label with it
            };
            let newer = match (term, Stamp::read(&pod.metadata)) {
                (Some(term), Some(stamp)) => {
                    stamp.lease == term.lock && stamp.token > term.fencing_token
                }
                _ => false,
            };
            let remove = self.carries(&pod) && !newer;
            if !remove && !bump {
                return Ok(false);
            }
            let annotations = pod.metadata.annotations.as_ref();
            let stepped_down = term
                .map(|t| stepped_down(t, annotations.and_then(|a| a.get(STEPPED_DOWN_ANNOTATION))));
            let change = match (&stepped_down, remove) {
                (_, true) => LabelChange::Remove {
                    stepped_down: stepped_down.as_deref(),
                },
                (Some(value), false) => LabelChange::SteppedDown(value),
                (None, false) => return Ok(false),
            };
            let version = pod.metadata.resource_version.clone().unwrap_or_default();
            match bounded(limit, self.write(&self.pod, &version, change)).await {
                Err(e) if e.is_conflict() => continue,
                Err(e) => return Err(e),
                Ok(()) => return Ok(remove),
            }
        }
    }

    /// The grants this needs, checked without writing anything.
    async fn check_access(&self) -> Result<()> {
        for verb in ["get", "patch"] {
            if !allowed(
                &self.client,
                verb,
                "",
                "pods",
                &self.namespace,
                Some(&self.pod),
            )
            .await?
            {
                return Err(RouteError::Forbidden {
                    verb,
                    resource: "pods",
                    namespace: self.namespace.clone(),
                    name: None,
                    rbac: LABEL_POD_RBAC,
                });
            }
        }
        if !allowed(&self.client, "list", "", "pods", &self.namespace, None).await? {
            warn!(
                namespace = %self.namespace,
                "no `list` on pods: a crashed or partitioned leader's pod keeps the leader label until its own process removes it or the pod is gone (grant `list` on pods, see {LABEL_POD_RBAC})"
            );
        }
        Ok(())
    }
}

// ---- the EndpointSlice ----------------------------------------------------------------

/// The EndpointSlice of a selector-less Service, pointed at the leader's pod IP while it
/// leads and emptied before it gives leadership up; the next leader takes it over.
///
/// The slice has the Service's name, is labelled [`SERVICE_NAME_LABEL`]`=<service>`
/// and [`MANAGED_BY_LABEL`]`=`[`MANAGED_BY`], owned by the Service (deleted with it), and
/// carries the Service's ports (numeric `targetPort`s: a selector-less Service cannot
/// resolve named ones). Needs `get` on the Service, `create` on `endpointslices`, and
/// `get`, `update` on the slice (`kube/leader-endpoints/role.yaml`): all but `create`
/// can be limited to the names.
#[derive(Clone)]
pub struct LeaderEndpoints {
    slices: Api<EndpointSlice>,
    services: Api<Service>,
    client: Client,
    namespace: String,
    service: String,
    pod: String,
    ip: IpAddr,
    node: Option<String>,
}

impl std::fmt::Debug for LeaderEndpoints {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LeaderEndpoints")
            .field("namespace", &self.namespace)
            .field("service", &self.service)
            .field("pod", &self.pod)
            .field("ip", &self.ip)
            .finish_non_exhaustive()
    }
}

/// Writes of a term's start to the slice whose outcome is unknown (they may land
/// later, see [`LeaderEndpoints::point_away`]).
#[derive(Debug, Default)]
struct SliceUnsure {
    /// A create.
    create: bool,
    /// Replaces, based on these resourceVersions.
    versions: BTreeSet<String>,
}

/// What a leader does to the slice it found (see [`LeaderEndpoints::decide`]).
#[derive(Debug, PartialEq, Eq)]
enum SliceStep {
    /// It is missing: create it.
    Create,
    /// It points here for this term already.
    Done,
    /// Overwrite it (at the version read).
    Replace,
    /// A newer term's: leave it.
    Superseded(Stamp),
}

impl LeaderEndpoints {
    /// Points Service `service` in `namespace` at `pod_ip` (`$POD_IP`, the downward
    /// API's `status.podIP`) of pod `pod` while leading.
    pub fn new(
        client: Client,
        namespace: &str,
        service: &str,
        pod: &str,
        pod_ip: &str,
    ) -> Result<Self> {
        check_name("service", service)?;
        check_name("pod", pod)?;
        let ip = pod_ip.parse().map_err(|_| {
            RouteError::Invalid(format!(
                "pod IP `{pod_ip}` is not an IP address (set POD_IP from the downward API: fieldPath status.podIP)"
            ))
        })?;
        Ok(Self {
            slices: Api::namespaced(client.clone(), namespace),
            services: Api::namespaced(client.clone(), namespace),
            client,
            namespace: namespace.to_owned(),
            service: service.to_owned(),
            pod: pod.to_owned(),
            ip,
            node: None,
        })
    }

    /// Also names the node (`spec.nodeName`) in the endpoint, for topology-aware routing.
    #[must_use]
    pub fn node(mut self, node: &str) -> Self {
        self.node = Some(node.to_owned());
        self
    }

    /// The slice's name: the Service's own (the EndpointSlice controller and the
    /// mirroring controller name theirs `<service>-<random>`, so they never collide).
    pub fn slice_name(&self) -> String {
        self.service.clone()
    }

    fn slice_error(&self, verb: &'static str, err: kube::Error) -> RouteError {
        let name = (verb != "create").then(|| self.slice_name());
        api_error(
            err,
            verb,
            "endpointslices.discovery.k8s.io",
            &self.namespace,
            name.as_deref(),
            ENDPOINTS_RBAC,
        )
    }

    fn service_error(&self, err: kube::Error) -> RouteError {
        if let kube::Error::Api(s) = &err
            && s.code == 404
        {
            return RouteError::NotFound {
                what: "service",
                name: self.service.clone(),
                namespace: self.namespace.clone(),
                hint: "create it without a selector (kube/leader-endpoints/service.yaml)",
            };
        }
        api_error(
            err,
            "get",
            "services",
            &self.namespace,
            Some(&self.service),
            ENDPOINTS_RBAC,
        )
    }

    fn address_type(&self) -> &'static str {
        if self.ip.is_ipv4() { "IPv4" } else { "IPv6" }
    }

    /// Whether `slice` points at this pod (by address or by reference).
    fn points_here(&self, slice: &EndpointSlice) -> bool {
        let ip = self.ip.to_string();
        slice.endpoints.iter().any(|e| {
            e.addresses.contains(&ip)
                || e.target_ref.as_ref().is_some_and(|r| {
                    r.kind.as_deref() == Some("Pod") && r.name.as_deref() == Some(&self.pod)
                })
        })
    }

    /// The slice as this pod's term wants it, from the Service.
    async fn desired(&self, stamp: &Stamp, limit: Duration) -> Result<EndpointSlice> {
        let service = bounded(limit, async {
            self.services
                .get(&self.service)
                .await
                .map_err(|e| self.service_error(e))
        })
        .await?;
        let spec = service.spec.clone().unwrap_or_default();
        if spec.selector.as_ref().is_some_and(|s| !s.is_empty()) {
            return Err(RouteError::Invalid(format!(
                "service `{}` has a selector, so Kubernetes writes its endpoints: remove the selector for --leader-endpoints (or select the leader label with --label-pod instead)",
                self.service
            )));
        }
        let mut ports = Vec::new();
        for p in spec.ports.unwrap_or_default() {
            let port = match &p.target_port {
                None => p.port,
                Some(IntOrString::Int(n)) => *n,
                Some(IntOrString::String(name)) => {
                    return Err(RouteError::Invalid(format!(
                        "service `{}` port {} has the named targetPort `{name}`: a selector-less Service needs a number",
                        self.service, p.port
                    )));
                }
            };
            ports.push(EndpointPort {
                name: p.name.clone(),
                port: Some(port),
                protocol: p.protocol.clone(),
                app_protocol: p.app_protocol.clone(),
            });
        }
        let owner = service.metadata.uid.clone().map(|uid| OwnerReference {
            api_version: "v1".into(),
            kind: "Service".into(),
            name: self.service.clone(),
            uid,
            ..OwnerReference::default()
        });
        let annotations = serde_json::from_value(stamp.annotations()).unwrap_or_default();
        Ok(EndpointSlice {
            metadata: ObjectMeta {
                name: Some(self.slice_name()),
                namespace: Some(self.namespace.clone()),
                labels: Some(
                    [
                        (SERVICE_NAME_LABEL.to_owned(), self.service.clone()),
                        (MANAGED_BY_LABEL.to_owned(), MANAGED_BY.to_owned()),
                    ]
                    .into(),
                ),
                annotations: Some(annotations),
                owner_references: owner.map(|o| vec![o]),
                ..ObjectMeta::default()
            },
            address_type: self.address_type().to_owned(),
            endpoints: vec![Endpoint {
                addresses: vec![self.ip.to_string()],
                conditions: Some(EndpointConditions {
                    ready: Some(true),
                    serving: Some(true),
                    terminating: Some(false),
                }),
                node_name: self.node.clone(),
                target_ref: Some(ObjectReference {
                    kind: Some("Pod".into()),
                    name: Some(self.pod.clone()),
                    namespace: Some(self.namespace.clone()),
                    ..ObjectReference::default()
                }),
                ..Endpoint::default()
            }],
            ports: Some(ports),
        })
    }

    /// The leader's decision about the slice it read: the fencing rule lives here.
    fn decide(current: Option<&EndpointSlice>, desired: &EndpointSlice, ours: &Stamp) -> SliceStep {
        let Some(current) = current else {
            return SliceStep::Create;
        };
        let theirs = Stamp::read(&current.metadata);
        if let Some(theirs) = &theirs
            && theirs.lease == ours.lease
            && theirs.token > ours.token
            && !current.endpoints.is_empty()
        {
            return SliceStep::Superseded(theirs.clone());
        }
        let same = theirs.as_ref() == Some(ours)
            && current.endpoints == desired.endpoints
            && current.ports == desired.ports
            && current.metadata.labels == desired.metadata.labels;
        if same {
            SliceStep::Done
        } else {
            SliceStep::Replace
        }
    }

    async fn get(&self, limit: Duration) -> Result<Option<EndpointSlice>> {
        bounded(limit, async {
            self.slices
                .get_opt(&self.slice_name())
                .await
                .map_err(|e| self.slice_error("get", e))
        })
        .await
    }

    async fn replace(&self, next: &EndpointSlice, limit: Duration) -> Result<()> {
        bounded(limit, async {
            self.slices
                .replace(&self.slice_name(), &PostParams::default(), next)
                .await
                .map(drop)
                .map_err(|e| self.slice_error("update", e))
        })
        .await
    }

    /// Points the slice here while `term` is active. Notes in `unsure` each write whose
    /// outcome is unknown (it may land later).
    async fn point_here(
        &self,
        term: &Term,
        limit: Duration,
        unsure: &mut SliceUnsure,
    ) -> Result<()> {
        let ours = Stamp::of(term);
        let desired = self.desired(&ours, limit).await?;
        loop {
            let current = self.get(limit).await?;
            let step = Self::decide(current.as_ref(), &desired, &ours);
            let (result, based_on) = match step {
                SliceStep::Done => return Ok(()),
                SliceStep::Superseded(theirs) => {
                    return Err(RouteError::Superseded {
                        slice: self.slice_name(),
                        holder: theirs.holder,
                        theirs: theirs.token,
                        ours: ours.token,
                    });
                }
                SliceStep::Create => {
                    term.check().map_err(|_| RouteError::TermEnded)?;
                    let created = bounded(limit, async {
                        self.slices
                            .create(&PostParams::default(), &desired)
                            .await
                            .map(drop)
                            .map_err(|e| self.slice_error("create", e))
                    })
                    .await;
                    (created, None)
                }
                SliceStep::Replace => {
                    let current = current.unwrap_or_default();
                    if current.address_type != desired.address_type {
                        return Err(RouteError::Invalid(format!(
                            "endpointslice `{}` has address type {} but the pod IP is {} (the type cannot change): delete the slice",
                            self.slice_name(),
                            current.address_type,
                            desired.address_type
                        )));
                    }
                    let mut next = desired.clone();
                    next.metadata.resource_version = current.metadata.resource_version;
                    term.check().map_err(|_| RouteError::TermEnded)?;
                    let version = next.metadata.resource_version.clone().unwrap_or_default();
                    (self.replace(&next, limit).await, Some(version))
                }
            };
            match result {
                // Someone wrote in between (or created it first): read again, decide again.
                Err(e) if e.is_conflict() => continue,
                Err(e) => {
                    if e.outcome_unknown() {
                        match based_on {
                            Some(version) => {
                                unsure.versions.insert(version);
                            }
                            None => unsure.create = true,
                        }
                    }
                    return Err(e);
                }
                Ok(()) => return Ok(()),
            }
        }
    }

    /// Empties the slice if it names `term` (or, with `None` at startup, our identity,
    /// pod or IP). Also when a write of the term's start may still land (`unsure`): if
    /// the slice is still at a version such a write was based on, it is emptied (the
    /// resourceVersion moves on, so that write can no longer land), and if a create may
    /// land, an emptied slice is created first. Returns whether it wrote.
    async fn point_away(
        &self,
        term: Option<&TermInfo>,
        identity: &str,
        unsure: &SliceUnsure,
        limit: Duration,
    ) -> Result<bool> {
        loop {
            let Some(current) = self.get(limit).await? else {
                let Some(term) = term.filter(|_| unsure.create) else {
                    return Ok(false);
                };
                // A create of this term's start may still land: take the name first.
                let mut empty = match self.desired(&Stamp::of_info(term), limit).await {
                    Ok(slice) => slice,
                    // The Service is gone: a slice it owns is garbage-collected.
                    Err(RouteError::NotFound { .. }) => return Ok(false),
                    Err(e) => return Err(e),
                };
                empty.endpoints.clear();
                empty
                    .metadata
                    .annotations
                    .get_or_insert_default()
                    .insert(STEPPED_DOWN_ANNOTATION.to_owned(), stepped_down(term, None));
                let created = bounded(limit, async {
                    self.slices
                        .create(&PostParams::default(), &empty)
                        .await
                        .map(drop)
                        .map_err(|e| self.slice_error("create", e))
                })
                .await;
                match created {
                    Err(e) if e.is_conflict() => continue,
                    Err(e) => return Err(e),
                    Ok(()) => return Ok(true),
                }
            };
            let version = current
                .metadata
                .resource_version
                .clone()
                .unwrap_or_default();
            // Still at a version a write of the term's start was based on.
            let stale = term.is_some() && unsure.versions.contains(&version);
            let stamp = Stamp::read(&current.metadata);
            let ours = match term {
                // Ours if it names this term or an older one of ours (a term whose own
                // clean-up never got through).
                Some(term) => stamp.as_ref().is_some_and(|s| {
                    s.holder == term.identity
                        && s.lease == term.lock
                        && s.token <= term.fencing_token
                }),
                // At startup: anything a previous process of this identity or pod left.
                None => {
                    stamp.as_ref().is_some_and(|s| s.holder == identity)
                        || self.points_here(&current)
                }
            };
            let points_for_us = ours && !current.endpoints.is_empty();
            if !(stale || points_for_us) {
                return Ok(false);
            }
            let mut next = current;
            next.endpoints.clear();
            next.metadata.managed_fields = None;
            if let Some(term) = term {
                let annotations = next.metadata.annotations.get_or_insert_default();
                let value = stepped_down(term, annotations.get(STEPPED_DOWN_ANNOTATION));
                annotations.insert(STEPPED_DOWN_ANNOTATION.to_owned(), value);
            }
            match self.replace(&next, limit).await {
                Err(e) if e.is_conflict() => continue,
                Err(e) => return Err(e),
                Ok(()) => return Ok(true),
            }
        }
    }

    /// The grants this needs (checked without writing), and the Service as required.
    async fn check_access(&self, limit: Duration) -> Result<()> {
        let slice = self.slice_name();
        let checks: [(&'static str, &str, &'static str, Option<&str>); 4] = [
            ("get", "", "services", Some(&self.service)),
            ("get", "discovery.k8s.io", "endpointslices", Some(&slice)),
            ("update", "discovery.k8s.io", "endpointslices", Some(&slice)),
            ("create", "discovery.k8s.io", "endpointslices", None),
        ];
        for (verb, group, resource, name) in checks {
            if !allowed(&self.client, verb, group, resource, &self.namespace, name).await? {
                return Err(RouteError::Forbidden {
                    verb,
                    resource: if resource == "services" {
                        "services"
                    } else {
                        "endpointslices.discovery.k8s.io"
                    },
                    namespace: self.namespace.clone(),
                    name: name.map(str::to_owned),
                    rbac: ENDPOINTS_RBAC,
                });
            }
        }
        // The Service exists, has no selector, and its ports can be used.
        let probe = Stamp {
            holder: String::new(),
            token: 0,
            lease: String::new(),
        };
        self.desired(&probe, limit).await.map(drop)
    }
}

// ---- both, around a term ---------------------------------------------------------------

/// Writes of a term's start whose outcome is unknown (no answer in time, a transport
/// error, a 5xx): they may land at any time later, even after the step-down. So the
/// step-down does not just look (a label not there yet, a slice not pointing here yet)
/// but writes on the version it read — the step-down annotation on the pod, an emptied
/// slice at a version such a write was based on, an emptied slice where a create may
/// land — and every such write, being compare-and-swap on an older version (or a create
/// of a name taken), then fails.
#[derive(Debug, Default)]
struct Unsure {
    /// A write of the label.
    label: bool,
    /// Writes of the slice.
    slice: SliceUnsure,
}

impl Unsure {
    fn any(&self) -> bool {
        self.label || self.slice.create || !self.slice.versions.is_empty()
    }
}

/// The outcome of two sides done at once: the first error that keeps the task trying
/// (an API failure, a timeout) over one that would stop it, so a side that failed
/// for good never hides one that may still succeed.
fn both(a: Result<()>, b: Result<()>) -> Result<()> {
    let last = |e: &RouteError| matches!(e, RouteError::TermEnded | RouteError::Superseded { .. });
    match (a, b) {
        (Ok(()), Ok(())) => Ok(()),
        (Err(e), Ok(())) | (Ok(()), Err(e)) => Err(e),
        (Err(RouteError::TermEnded), Err(_)) | (Err(_), Err(RouteError::TermEnded)) => {
            Err(RouteError::TermEnded)
        }
        (Err(a), Err(b)) => Err(if last(&a) && !last(&b) { b } else { a }),
    }
}

/// Where traffic to the leader is pointed: a pod label, an EndpointSlice, both, or
/// neither (then every call does nothing). Cheap to clone.
#[derive(Clone, Debug)]
pub struct Routes {
    label: Option<PodLabel>,
    endpoints: Option<LeaderEndpoints>,
    call_timeout: Duration,
    drain: Duration,
}

impl Default for Routes {
    fn default() -> Self {
        Self {
            label: None,
            endpoints: None,
            call_timeout: DEFAULT_CALL_TIMEOUT,
            drain: Duration::ZERO,
        }
    }
}

/// What the routes point here, for logs: e.g. ``label `role=leader` on pod `p`,
/// EndpointSlice `s` `` (`nothing` when empty).
impl std::fmt::Display for Routes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut parts = Vec::new();
        if let Some(l) = &self.label {
            parts.push(format!("label `{}` on pod `{}`", l.selector(), l.pod));
        }
        if let Some(e) = &self.endpoints {
            parts.push(format!("EndpointSlice `{}`", e.slice_name()));
        }
        if parts.is_empty() {
            f.write_str("nothing")
        } else {
            f.write_str(&parts.join(", "))
        }
    }
}

impl Routes {
    /// No routes.
    pub fn new() -> Self {
        Self::default()
    }

    /// Labels the leader's pod.
    #[must_use]
    pub fn label_pod(mut self, label: PodLabel) -> Self {
        self.label = Some(label);
        self
    }

    /// Points a selector-less Service's EndpointSlice at the leader.
    #[must_use]
    pub fn leader_endpoints(mut self, endpoints: LeaderEndpoints) -> Self {
        self.endpoints = Some(endpoints);
        self
    }

    /// How long one API call may take ([`DEFAULT_CALL_TIMEOUT`] unless set).
    #[must_use]
    pub fn call_timeout(mut self, limit: Duration) -> Self {
        self.call_timeout = limit;
        self
    }

    /// How long to wait, after traffic was pointed away and before the term is dropped
    /// (and the Lease released), for the data plane to catch up (default: not at all).
    ///
    /// The label's removal and the emptied slice reach kube-proxy through watches, and
    /// kube-proxy applies changes at most once per `--iptables-min-sync-period` (1 s by
    /// default); until then connections still reach the old leader. Without a drain the
    /// next leader can start while they do; with a drain longer than that lag they stop
    /// before it starts, at the price of a longer gap in which the Service reaches
    /// nobody.
    #[must_use]
    pub fn drain(mut self, drain: Duration) -> Self {
        self.drain = drain;
        self
    }

    /// Whether there is nothing to do.
    pub fn is_empty(&self) -> bool {
        self.label.is_none() && self.endpoints.is_none()
    }

    /// Before campaigning: checks the grants (a SelfSubjectAccessReview per verb, so a
    /// missing one is named before anything is written) and the Service, then removes
    /// what a previous process of this pod (a restarted container keeps its pod's labels
    /// and IP) or of this `identity` left pointing here. Errors are for the caller to
    /// stop on; transient API failures are retried for up to 10 call timeouts.
    pub async fn prepare(&self, identity: &str) -> Result<()> {
        if self.is_empty() {
            return Ok(());
        }
        let until = Instant::now() + self.call_timeout * 10;
        let mut backoff = FIRST_RETRY;
        loop {
            match self.prepare_once(identity).await {
                Ok(()) => return Ok(()),
                Err(e @ (RouteError::Api(_) | RouteError::Timeout(_)))
                    if Instant::now() + backoff < until =>
                {
                    warn!(error = %e, retry_in = ?backoff, "checking the routes failed; retrying");
                    sleep(backoff).await;
                    backoff = (backoff * 2).min(LAST_RETRY);
                }
                Err(e) => return Err(e),
            }
        }
    }

    async fn prepare_once(&self, identity: &str) -> Result<()> {
        let limit = self.call_timeout;
        if let Some(label) = &self.label {
            label.check_access().await?;
            if label.point_away(None, false, limit).await? {
                info!(pod = %label.pod, label = %label.selector(), "removed a stale leader label from this pod");
            }
        }
        if let Some(endpoints) = &self.endpoints {
            endpoints.check_access(limit).await?;
            if endpoints
                .point_away(None, identity, &SliceUnsure::default(), limit)
                .await?
            {
                info!(slice = %endpoints.slice_name(), "emptied an EndpointSlice a previous process left pointing here");
            }
        }
        Ok(())
    }

    /// Points traffic here for `term` (once; see [`Routes::route`] for the retrying task).
    /// Notes in `unsure` every write whose outcome is unknown, on either side, whatever
    /// the other side did.
    async fn point_here(&self, term: &Term, unsure: &mut Unsure) -> Result<()> {
        let limit = self.call_timeout;
        let Unsure {
            label: label_unsure,
            slice: slice_unsure,
        } = unsure;
        let label = async {
            let Some(label) = &self.label else {
                return Ok(());
            };
            label.point_here(term, limit, label_unsure).await?;
            match label.take_from_others(term, limit).await? {
                Some(_) => {}
                None => debug!("no `list` on pods: not looking for other pods with the label"),
            }
            Ok(())
        };
        let endpoints = async {
            match &self.endpoints {
                Some(e) => e.point_here(term, limit, slice_unsure).await,
                None => Ok(()),
            }
        };
        let (label, endpoints): (Result<()>, Result<()>) = tokio::join!(label, endpoints);
        both(label, endpoints)
    }

    /// Points traffic away from here after `term`; see [`Unsure`] for what more it
    /// writes when a write of the term's start may still land.
    async fn point_away(&self, term: &TermInfo, unsure: &Unsure) -> Result<()> {
        let limit = self.call_timeout;
        let label = async {
            match &self.label {
                Some(l) => l
                    .point_away(Some(term), unsure.label, limit)
                    .await
                    .map(drop),
                None => Ok(()),
            }
        };
        let endpoints = async {
            match &self.endpoints {
                Some(e) => e
                    .point_away(Some(term), &term.identity, &unsure.slice, limit)
                    .await
                    .map(drop),
                None => Ok(()),
            }
        };
        let (label, endpoints): (Result<()>, Result<()>) = tokio::join!(label, endpoints);
        both(label, endpoints)
    }

    /// Starts routing traffic for `term`: a task that points traffic here alongside the
    /// work (retrying while the term lasts), and once the work has stopped — when the
    /// returned [`Routed`] is [finished](Routed::finish) or dropped — points it away and
    /// only then drops its clone of the term, so the Lease is released afterwards.
    /// Must be called inside a tokio runtime.
    pub fn route(&self, term: &Term) -> Routed {
        if self.is_empty() {
            return Routed {
                work_stopped: None,
                task: None,
            };
        }
        let (tx, rx) = oneshot::channel();
        let task = tokio::spawn(self.clone().run_term(term.clone(), rx));
        Routed {
            work_stopped: Some(tx),
            task: Some(task),
        }
    }

    async fn run_term(self, term: Term, mut work_stopped: oneshot::Receiver<()>) {
        let started = Instant::now();
        let mut backoff = FIRST_RETRY;
        let mut failing = false;
        let mut unsure = Unsure::default();
        let mut work_done = false;
        loop {
            if !term.is_active() {
                break;
            }
            // Never cut a call short: a write cancelled in flight could land after the
            // clean-up read; the calls have their own limits, and a write whose outcome
            // is unknown is noted in `unsure` for the step-down.
            match self.point_here(&term, &mut unsure).await {
                Ok(()) => {
                    info!(after = ?started.elapsed(), fencing_token = term.fencing_token(), "traffic points at this pod");
                    break;
                }
                Err(RouteError::TermEnded) => break,
                Err(e @ RouteError::Superseded { .. }) => {
                    warn!(error = %e, "not pointing traffic here");
                    break;
                }
                Err(e) => {
                    if !failing {
                        warn!(error = %e, "pointing traffic at this pod failed; retrying while the term lasts");
                        failing = true;
                    }
                    tokio::select! {
                        () = sleep(backoff) => {}
                        () = term.cancelled() => break,
                        _ = &mut work_stopped => { work_done = true; break; }
                    }
                    backoff = (backoff * 2).min(LAST_RETRY);
                }
            }
        }
        if !work_done {
            // The order: the work stops, then traffic is pointed away.
            let _ = work_stopped.await;
        }
        // `term` is held until traffic points away (and the drain is over): the engine
        // releases only after that.
        self.step_down(term.info(), &unsure).await;
        drop(term);
    }

    /// Points traffic away until that is written, holding `term` (see the module docs).
    async fn step_down(&self, term: &TermInfo, unsure: &Unsure) {
        let began = Instant::now();
        if unsure.any() {
            info!(
                ?unsure,
                "a write pointing traffic here may still land: stepping down with writes it cannot outlive"
            );
        }
        let mut backoff = FIRST_RETRY;
        let mut failures = 0u32;
        loop {
            match self.point_away(term, unsure).await {
                Ok(()) => break,
                Err(e) => {
                    failures += 1;
                    if failures == 1 {
                        warn!(error = %e, "pointing traffic away from this pod failed; retrying, and the lease is not released until it is done");
                    }
                    sleep(backoff).await;
                    backoff = (backoff * 2).min(LAST_RETRY);
                }
            }
        }
        if failures > 0 {
            info!(after = ?began.elapsed(), failures, "traffic no longer points at this pod");
        } else {
            info!(after = ?began.elapsed(), "traffic no longer points at this pod");
        }
        if !self.drain.is_zero() {
            sleep(self.drain).await;
            debug!(drain = ?self.drain, "drained");
        }
    }

    /// For a process whose work holds no terms itself (a sidecar): routes every term of
    /// the election behind `terms` — here at its start, away at its end, then the term
    /// is dropped. Returns when the elector stops (also while a clean-up is still being
    /// tried: the elector then did not release, see [`run_while_leading`]).
    pub async fn follow(&self, mut terms: Terms) {
        while let Ok(term) = terms.acquired().await {
            let routed = self.route(&term);
            term.cancelled().await;
            drop(term);
            tokio::select! {
                () = routed.finish() => {}
                () = terms.stopped() => {
                    self.gave_up();
                    return;
                }
            }
        }
    }

    /// The elector stopped while the routing task still held its term: it did not
    /// release (its `shutdown_grace` ran out first), and the task goes on trying.
    fn gave_up(&self) {
        warn!(
            routes = %self,
            "the elector stopped before traffic was pointed away: it did not release the lease, and traffic may still point here until the next leader takes it over"
        );
    }
}

/// Routing of one term (see [`Routes::route`]). Finish it, or drop it, once the term's
/// work has stopped; either way the clean-up runs and holds the term until written.
#[derive(Debug)]
pub struct Routed {
    work_stopped: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
}

impl Routed {
    /// The work has stopped: points traffic away and waits until that is written (the
    /// term's clone is dropped then). Unbounded while the clean-up cannot be written; a
    /// caller that gives up waiting (drops this future) leaves the task running, still
    /// holding the term — so the election cannot release until the task is done — and
    /// should then stop the election and exit (the Lease expires).
    pub async fn finish(mut self) {
        self.work_stopped.take();
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
    }
}

impl Drop for Routed {
    fn drop(&mut self) {
        // Dropping the sender tells the task the work stopped; the task carries on.
        self.work_stopped.take();
    }
}

/// [`ElectionHandle::run_while_leading`] with [`Routes`]: each term, traffic is pointed
/// here alongside `work`; when the term ends `work` is dropped, then traffic is pointed
/// away, and only then is the term dropped and the Lease released. If that cannot be
/// written before the elector stops (a shutdown whose `shutdown_grace` runs out), the
/// Lease is not released and this returns as the elector ended, with a warning.
pub async fn run_while_leading<F, Fut>(
    handle: &mut ElectionHandle,
    routes: &Routes,
    mut work: F,
) -> std::result::Result<(), ElectionError>
where
    F: FnMut(Term) -> Fut,
    Fut: Future<Output = ()>,
{
    while let Ok(term) = handle.acquired().await {
        let token = term.token();
        let routed = routes.route(&term);
        tokio::select! {
            () = work(term) => token.cancelled().await,
            () = token.cancelled() => {}
        }
        // Until traffic points away; but not past the elector's end (a shutdown whose
        // `shutdown_grace` ran out first: it stopped without releasing).
        tokio::select! {
            () = routed.finish() => {}
            stopped = handle.join() => {
                routes.gave_up();
                return stopped;
            }
        }
    }
    handle.join().await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn slice(stamp: Option<&Stamp>, ips: &[&str]) -> EndpointSlice {
        EndpointSlice {
            metadata: ObjectMeta {
                annotations: stamp
                    .map(|s| serde_json::from_value(s.annotations()).unwrap_or_default()),
                ..ObjectMeta::default()
            },
            address_type: "IPv4".into(),
            endpoints: ips
                .iter()
                .map(|ip| Endpoint {
                    addresses: vec![(*ip).to_owned()],
                    ..Endpoint::default()
                })
                .collect(),
            ports: None,
        }
    }

    fn stamp(holder: &str, token: i64) -> Stamp {
        Stamp {
            holder: holder.into(),
            token,
            lease: "ns/l".into(),
        }
    }

    fn api(code: u16) -> RouteError {
        RouteError::Api(kube::Error::Api(
            kube::core::Status::failure("test", "Test")
                .with_code(code)
                .boxed(),
        ))
    }

    /// Review finding 2: a write that timed out, failed in transport or got a 5xx may
    /// still land; a 4xx answer (conflict, forbidden, invalid) means it did not.
    #[test]
    fn a_write_may_still_land_after_a_timeout_a_transport_error_or_a_5xx() {
        assert!(RouteError::Timeout(Duration::from_secs(1)).outcome_unknown());
        assert!(api(500).outcome_unknown());
        assert!(api(503).outcome_unknown());
        assert!(api(504).outcome_unknown());
        let transport = RouteError::Api(kube::Error::Service("connection reset".into()));
        assert!(transport.outcome_unknown());
        for code in [400, 404, 409, 422, 429] {
            assert!(!api(code).outcome_unknown(), "{code}");
        }
        assert!(!RouteError::TermEnded.outcome_unknown());
    }

    /// Review finding 2: with both routes, the outcome of the two sides is combined so
    /// that an error to retry is never hidden behind one that stops the task.
    #[test]
    fn a_side_that_failed_for_good_never_hides_one_to_retry() {
        let superseded = || RouteError::Superseded {
            slice: "s".into(),
            holder: "z".into(),
            theirs: 2,
            ours: 1,
        };
        assert!(both(Ok(()), Ok(())).is_ok());
        assert!(matches!(
            both(Err(superseded()), Err(api(503))),
            Err(RouteError::Api(_))
        ));
        assert!(matches!(
            both(Err(api(503)), Err(superseded())),
            Err(RouteError::Api(_))
        ));
        assert!(matches!(
            both(Ok(()), Err(superseded())),
            Err(RouteError::Superseded { .. })
        ));
        assert!(matches!(
            both(Err(api(503)), Err(RouteError::TermEnded)),
            Err(RouteError::TermEnded)
        ));
    }

    #[test]
    fn labels_are_checked_as_kubernetes_does() {
        for ok in [
            "role=leader",
            "leaderz.io/role=leader",
            "a=",
            "a.b_c-d=x.y_z-1",
        ] {
            assert!(parse_label(ok).is_ok(), "{ok}");
        }
        for bad in [
            "role",
            "=x",
            "-a=x",
            "a-=x",
            "role=lead er",
            "role=-x",
            "Bad_Prefix/a=x",
            "/a=x",
            "a/b/c=x",
            &format!("{}=x", "a".repeat(64)),
            &format!("a={}", "b".repeat(64)),
        ] {
            assert!(parse_label(bad).is_err(), "{bad}");
        }
    }

    /// The fencing rule of the slice: a leader overwrites anything not newer than its
    /// own term, and an empty slice of any term; it never overwrites a newer term's.
    #[test]
    fn a_leader_overwrites_older_terms_and_never_a_newer_one() {
        let ours = stamp("b", 5);
        let desired = slice(Some(&ours), &["10.0.0.2"]);
        assert_eq!(
            LeaderEndpoints::decide(None, &desired, &ours),
            SliceStep::Create
        );
        let older = slice(Some(&stamp("a", 4)), &["10.0.0.1"]);
        assert_eq!(
            LeaderEndpoints::decide(Some(&older), &desired, &ours),
            SliceStep::Replace
        );
        let unstamped = slice(None, &["10.0.0.9"]);
        assert_eq!(
            LeaderEndpoints::decide(Some(&unstamped), &desired, &ours),
            SliceStep::Replace
        );
        let newer = slice(Some(&stamp("c", 6)), &["10.0.0.3"]);
        assert_eq!(
            LeaderEndpoints::decide(Some(&newer), &desired, &ours),
            SliceStep::Superseded(stamp("c", 6))
        );
        let newer_but_emptied = slice(Some(&stamp("c", 6)), &[]);
        assert_eq!(
            LeaderEndpoints::decide(Some(&newer_but_emptied), &desired, &ours),
            SliceStep::Replace
        );
        let other_lease = Stamp {
            lease: "ns/other".into(),
            ..stamp("c", 6)
        };
        let other = slice(Some(&other_lease), &["10.0.0.3"]);
        assert_eq!(
            LeaderEndpoints::decide(Some(&other), &desired, &ours),
            SliceStep::Replace
        );
        assert_eq!(
            LeaderEndpoints::decide(Some(&desired), &desired, &ours),
            SliceStep::Done
        );
    }
}
