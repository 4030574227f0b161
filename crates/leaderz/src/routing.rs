//! Traffic to the leader: a label on the leader's pod ([`PodLabel`]) for a Service that
//! selects it, or the EndpointSlice of a selector-less Service pointed at the leader's
//! pod IP ([`LeaderEndpoints`]).
//!
//! ```no_run
//! use leaderz::routing::{PodLabel, Routes};
//! use leaderz::{ElectionConfig, Elector, LeaseLock};
//!
//! # async fn doc() -> Result<(), Box<dyn std::error::Error>> {
//! let client = kube::Client::try_default().await?;
//! let pod = std::env::var("POD_NAME")?;
//! let routes = Routes::new().label_pod(PodLabel::new(client.clone(), "default", &pod, "role", "leader"));
//! routes.clear_stale().await?; // a restarted container keeps its pod's labels
//! let lock = LeaseLock::new(client, "default", "my-lock");
//! let mut handle = Elector::new(lock, ElectionConfig::new(pod))?.spawn();
//! leaderz::routing::run_while_leading(&mut handle, &routes, |term| async move {
//!     // serve writes; a Service selecting role=leader sends them here
//!     term.cancelled().await;
//! })
//! .await?;
//! # Ok(()) }
//! ```
//!
//! # The order, and what it guarantees
//!
//! A term starts → the label is set / the slice points here → (the work runs) → the term
//! ends → the work stops → the label is removed / the slice is emptied → the [`Term`] is
//! dropped → the Lease is released (the engine releases only after every `Term` handle
//! is dropped). Every write is compare-and-swap (the `resourceVersion` read), a leader
//! writes only while its term is active, and one that steps down removes only what
//! points at itself, so a late write of a deposed leader never overwrites its
//! successor's.
//!
//! - While the API server is reachable, a follower never carries the label and the
//!   slice never points at a follower's pod for longer than one write: the leader
//!   removes them before it releases, and a starting process removes what a previous
//!   incarnation of its pod left ([`Routes::clear_stale`]).
//! - Neither is atomic with the Lease: the label and the slice lag the term by one write
//!   when it starts (the Service points at nobody in between, after a graceful
//!   handover), and a leader that cannot reach the API server (partitioned, crashed,
//!   paused) cannot remove them: they keep pointing at it until its successor takes
//!   over (the slice: the successor's first write replaces it; the label: the
//!   successor's pod is added, the old one stays until its process can reach the API
//!   server again or the pod is gone). Kube-proxy and the Service add their own delay.
//!   A client that must never reach a deposed leader still needs the fencing token.

use std::time::Duration;

use k8s_openapi::api::core::v1::{ObjectReference, Pod, Service};
use k8s_openapi::api::discovery::v1::{
    Endpoint, EndpointConditions, EndpointPort, EndpointSlice,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::api::{ObjectMeta, Patch, PatchParams, PostParams};
use kube::{Api, Client};
use serde_json::json;
use tokio::time::{Instant, sleep, timeout_at};
use tracing::{debug, info, warn};

use crate::elector::ElectionError;
use crate::handle::ElectionHandle;
use crate::term::Term;

/// The label every EndpointSlice written by leaderz carries, with
/// [`MANAGED_BY_VALUE`]: the Kubernetes EndpointSlice controller leaves it alone.
pub const MANAGED_BY_LABEL: &str = "endpointslice.kubernetes.io/managed-by";
/// See [`MANAGED_BY_LABEL`].
pub const MANAGED_BY_VALUE: &str = "leaderz.io";
/// The label that ties an EndpointSlice to its Service.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

/// How long a step-down may keep trying to remove the label or empty the slice before
/// the term is dropped anyway (the Lease is then released or left to expire).
pub const STEP_DOWN_LIMIT: Duration = Duration::from_secs(5);

/// How long a single routing call may take.
const CALL_LIMIT: Duration = Duration::from_secs(5);

/// Why a routing call failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RouteError {
    /// RBAC denied it.
    #[error(
        "forbidden: grant `{verb}` on `{resource}` in namespace `{namespace}` ({what}): {message}"
    )]
    Forbidden {
        /// The verb denied.
        verb: &'static str,
        /// The resource, e.g. `pods`.
        resource: &'static str,
        /// The namespace.
        namespace: String,
        /// Where the grant is, e.g. `see kube/label-pod/`.
        what: &'static str,
        /// The API server's message.
        message: String,
    },
    /// The pod or the Service does not exist.
    #[error("{0} not found")]
    NotFound(String),
    /// A flag or field is unusable.
    #[error("{0}")]
    Invalid(String),
    /// The term ended before the write could be made.
    #[error("the term ended before traffic could be pointed at the leader")]
    TermEnded,
    /// The call did not finish in time.
    #[error("the API call did not finish in time")]
    Timeout,
    /// Another API error.
    #[error("API error: {0}")]
    Api(#[source] kube::Error),
}

impl RouteError {
    fn is_conflict(&self) -> bool {
        matches!(self, RouteError::Api(kube::Error::Api(s)) if s.code == 409)
    }

    fn is_fatal(&self) -> bool {
        matches!(
            self,
            RouteError::Forbidden { .. } | RouteError::NotFound(_) | RouteError::Invalid(_)
        )
    }
}

/// Parses `KEY=VALUE` as a label, checked as Kubernetes checks labels.
///
/// ```
/// let (k, v) = leaderz::routing::parse_label("leaderz.io/role=leader").unwrap();
/// assert_eq!((k.as_str(), v.as_str()), ("leaderz.io/role", "leader"));
/// assert!(leaderz::routing::parse_label("no-value").is_err());
/// ```
pub fn parse_label(spec: &str) -> Result<(String, String), RouteError> {
    let (key, value) = spec
        .split_once('=')
        .ok_or_else(|| RouteError::Invalid(format!("label `{spec}` must be KEY=VALUE")))?;
    let name_ok = |s: &str| {
        !s.is_empty()
            && s.len() <= 63
            && s.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
            && s.starts_with(|c: char| c.is_ascii_alphanumeric())
            && s.ends_with(|c: char| c.is_ascii_alphanumeric())
    };
    let (prefix, name) = match key.rsplit_once('/') {
        Some((p, n)) => (Some(p), n),
        None => (None, key),
    };
    let prefix_ok = prefix.is_none_or(crate::config::is_object_name);
    if !prefix_ok || !name_ok(name) {
        return Err(RouteError::Invalid(format!(
            "label key `{key}` is not a valid label key (an optional DNS prefix and `/`, then up to 63 letters, digits, `-`, `_`, `.`)"
        )));
    }
    if !(value.is_empty() || name_ok(value)) {
        return Err(RouteError::Invalid(format!(
            "label value `{value}` is not valid (up to 63 letters, digits, `-`, `_`, `.`, starting and ending with a letter or digit)"
        )));
    }
    Ok((key.to_owned(), value.to_owned()))
}

fn api_error(
    err: kube::Error,
    verb: &'static str,
    resource: &'static str,
    namespace: &str,
    what: &'static str,
    missing: &str,
) -> RouteError {
    match err {
        kube::Error::Api(s) if s.code == 403 => RouteError::Forbidden {
            verb,
            resource,
            namespace: namespace.to_owned(),
            what,
            message: s.message,
        },
        kube::Error::Api(s) if s.code == 404 => RouteError::NotFound(missing.to_owned()),
        other => RouteError::Api(other),
    }
}

async fn bounded<T>(
    call: impl Future<Output = Result<T, RouteError>>,
) -> Result<T, RouteError> {
    match timeout_at(Instant::now() + CALL_LIMIT, call).await {
        Ok(r) => r,
        Err(_) => Err(RouteError::Timeout),
    }
}

/// The leader's label on its own pod: `KEY=VALUE` while it leads, absent otherwise.
///
/// Needs `get` and `patch` on `pods` in the pod's namespace (`kube/label-pod/role.yaml`;
/// RBAC cannot narrow that to the pod itself, since a Deployment's pod names are not
/// known in advance).
#[derive(Clone)]
pub struct PodLabel {
    api: Api<Pod>,
    namespace: String,
    pod: String,
    key: String,
    value: String,
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
    /// Label `key=value` on pod `pod` in `namespace` (its own pod: `POD_NAME` and
    /// `POD_NAMESPACE` from the downward API).
    pub fn new(client: Client, namespace: &str, pod: &str, key: &str, value: &str) -> Self {
        Self {
            api: Api::namespaced(client, namespace),
            namespace: namespace.to_owned(),
            pod: pod.to_owned(),
            key: key.to_owned(),
            value: value.to_owned(),
        }
    }

    fn error(&self, verb: &'static str, err: kube::Error) -> RouteError {
        api_error(
            err,
            verb,
            "pods",
            &self.namespace,
            "see kube/label-pod/",
            &format!("pod `{}` in namespace `{}`", self.pod, self.namespace),
        )
    }

    /// The label's value on the pod now, and the pod's `resourceVersion`.
    async fn read(&self) -> Result<(Option<String>, String), RouteError> {
        let pod = self
            .api
            .get(&self.pod)
            .await
            .map_err(|e| self.error("get", e))?;
        let value = pod
            .metadata
            .labels
            .as_ref()
            .and_then(|l| l.get(&self.key))
            .cloned();
        Ok((value, pod.metadata.resource_version.unwrap_or_default()))
    }

    /// Sets (`Some`) or removes (`None`) the label if the pod is still at `version`.
    async fn write(&self, value: Option<&str>, version: &str) -> Result<(), RouteError> {
        let mut labels = serde_json::Map::new();
        labels.insert(self.key.clone(), json!(value));
        let patch = json!({
            "metadata": {
                "resourceVersion": version,
                "labels": labels,
            }
        });
        self.api
            .patch(&self.pod, &PatchParams::default(), &Patch::Merge(&patch))
            .await
            .map_err(|e| self.error("patch", e))?;
        Ok(())
    }

    /// Sets the label while `term` is active.
    async fn point_here(&self, term: &Term) -> Result<(), RouteError> {
        loop {
            let (value, version) = bounded(self.read()).await?;
            if value.as_deref() == Some(self.value.as_str()) {
                return Ok(());
            }
            term.check().map_err(|_| RouteError::TermEnded)?;
            match bounded(self.write(Some(&self.value), &version)).await {
                Err(e) if e.is_conflict() => continue,
                other => return other,
            }
        }
    }

    /// Removes the label if it is ours.
    async fn point_away(&self) -> Result<bool, RouteError> {
        loop {
            let (value, version) = bounded(self.read()).await?;
            if value.as_deref() != Some(self.value.as_str()) {
                return Ok(false);
            }
            match bounded(self.write(None, &version)).await {
                Err(e) if e.is_conflict() => continue,
                Err(e) => return Err(e),
                Ok(()) => return Ok(true),
            }
        }
    }
}

/// The EndpointSlice of a selector-less Service, pointed at the leader's pod IP while
/// it leads and emptied before it gives leadership up; the next leader takes it over.
///
/// The slice is `<service>-leader`, labelled `kubernetes.io/service-name=<service>` and
/// `endpointslice.kubernetes.io/managed-by=leaderz.io`, owned by the Service (deleted
/// with it), with the Service's ports (numeric `targetPort`s; a selector-less Service
/// cannot name ports). Needs `get` on the Service, `create` on `endpointslices`, and
/// `get`, `update` on the slice (`kube/leader-endpoints/role.yaml`).
#[derive(Clone)]
pub struct LeaderEndpoints {
    slices: Api<EndpointSlice>,
    services: Api<Service>,
    namespace: String,
    service: String,
    pod: String,
    pod_ip: String,
    node: Option<String>,
}

impl std::fmt::Debug for LeaderEndpoints {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LeaderEndpoints")
            .field("namespace", &self.namespace)
            .field("service", &self.service)
            .field("pod", &self.pod)
            .field("pod_ip", &self.pod_ip)
            .finish_non_exhaustive()
    }
}

impl LeaderEndpoints {
    /// Points Service `service` in `namespace` at `pod_ip` (the downward API's
    /// `status.podIP`) of pod `pod` while leading.
    pub fn new(client: Client, namespace: &str, service: &str, pod: &str, pod_ip: &str) -> Self {
        Self {
            slices: Api::namespaced(client.clone(), namespace),
            services: Api::namespaced(client, namespace),
            namespace: namespace.to_owned(),
            service: service.to_owned(),
            pod: pod.to_owned(),
            pod_ip: pod_ip.to_owned(),
            node: None,
        }
    }

    /// Also names the node (`spec.nodeName`) in the endpoint, for topology-aware routing.
    #[must_use]
    pub fn node(mut self, node: &str) -> Self {
        self.node = Some(node.to_owned());
        self
    }

    /// The slice's name: `<service>-leader`.
    pub fn slice_name(&self) -> String {
        format!("{}-leader", self.service)
    }

    fn error(&self, verb: &'static str, resource: &'static str, err: kube::Error) -> RouteError {
        let missing = if resource == "services" {
            format!("service `{}` in namespace `{}`", self.service, self.namespace)
        } else {
            format!("endpointslice `{}`", self.slice_name())
        };
        api_error(
            err,
            verb,
            resource,
            &self.namespace,
            "see kube/leader-endpoints/",
            &missing,
        )
    }

    fn address_type(&self) -> Result<&'static str, RouteError> {
        match self.pod_ip.parse::<std::net::IpAddr>() {
            Ok(std::net::IpAddr::V4(_)) => Ok("IPv4"),
            Ok(std::net::IpAddr::V6(_)) => Ok("IPv6"),
            Err(_) => Err(RouteError::Invalid(format!(
                "pod IP `{}` is not an IP address (set POD_IP from the downward API's status.podIP)",
                self.pod_ip
            ))),
        }
    }

    /// Whether `slice` points at this pod.
    fn points_here(&self, slice: &EndpointSlice) -> bool {
        slice.endpoints.iter().any(|e| {
            e.addresses.contains(&self.pod_ip)
                || e
                    .target_ref
                    .as_ref()
                    .is_some_and(|r| r.name.as_deref() == Some(self.pod.as_str()))
        })
    }

    /// The slice pointing here, from the Service's ports.
    async fn desired(&self) -> Result<EndpointSlice, RouteError> {
        let address_type = self.address_type()?;
        let service = self
            .services
            .get(&self.service)
            .await
            .map_err(|e| self.error("get", "services", e))?;
        let spec = service.spec.clone().unwrap_or_default();
        if spec.selector.as_ref().is_some_and(|s| !s.is_empty()) {
            return Err(RouteError::Invalid(format!(
                "service `{}` has a selector: its EndpointSlices belong to Kubernetes; remove the selector for --leader-endpoints",
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
        Ok(EndpointSlice {
            metadata: ObjectMeta {
                name: Some(self.slice_name()),
                namespace: Some(self.namespace.clone()),
                labels: Some(
                    [
                        (SERVICE_NAME_LABEL.to_owned(), self.service.clone()),
                        (MANAGED_BY_LABEL.to_owned(), MANAGED_BY_VALUE.to_owned()),
                    ]
                    .into(),
                ),
                owner_references: owner.map(|o| vec![o]),
                ..ObjectMeta::default()
            },
            address_type: address_type.to_owned(),
            endpoints: vec![Endpoint {
                addresses: vec![self.pod_ip.clone()],
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

    async fn get(&self) -> Result<Option<EndpointSlice>, RouteError> {
        self.slices
            .get_opt(&self.slice_name())
            .await
            .map_err(|e| self.error("get", "endpointslices", e))
    }

    /// Points the slice here while `term` is active.
    async fn point_here(&self, term: &Term) -> Result<(), RouteError> {
        let desired = bounded(self.desired()).await?;
        loop {
            let current = bounded(self.get()).await?;
            term.check().map_err(|_| RouteError::TermEnded)?;
            let result = match current {
                None => bounded(async {
                    self.slices
                        .create(&PostParams::default(), &desired)
                        .await
                        .map(|_| ())
                        .map_err(|e| self.error("create", "endpointslices", e))
                })
                .await,
                Some(current) => {
                    if current.endpoints == desired.endpoints
                        && current.ports == desired.ports
                        && current.address_type == desired.address_type
                    {
                        return Ok(());
                    }
                    let mut next = desired.clone();
                    next.metadata.resource_version = current.metadata.resource_version.clone();
                    next.metadata.owner_references = current
                        .metadata
                        .owner_references
                        .clone()
                        .or(next.metadata.owner_references);
                    // A slice's address type cannot change; keep the slice's own.
                    if current.address_type != next.address_type {
                        return Err(RouteError::Invalid(format!(
                            "endpointslice `{}` has address type {}, the pod IP is {}: delete the slice",
                            self.slice_name(),
                            current.address_type,
                            next.address_type
                        )));
                    }
                    bounded(async {
                        self.slices
                            .replace(&self.slice_name(), &PostParams::default(), &next)
                            .await
                            .map(|_| ())
                            .map_err(|e| self.error("update", "endpointslices", e))
                    })
                    .await
                }
            };
            match result {
                Err(e) if e.is_conflict() => continue,
                other => return other,
            }
        }
    }

    /// Empties the slice if it points here.
    async fn point_away(&self) -> Result<bool, RouteError> {
        loop {
            let Some(current) = bounded(self.get()).await? else {
                return Ok(false);
            };
            if !self.points_here(&current) {
                return Ok(false);
            }
            let mut next = current.clone();
            next.endpoints.clear();
            next.metadata.managed_fields = None;
            let result = bounded(async {
                self.slices
                    .replace(&self.slice_name(), &PostParams::default(), &next)
                    .await
                    .map(|_| ())
                    .map_err(|e| self.error("update", "endpointslices", e))
            })
            .await;
            match result {
                Err(e) if e.is_conflict() => continue,
                Err(e) => return Err(e),
                Ok(()) => return Ok(true),
            }
        }
    }
}

/// Where traffic to the leader is pointed: a pod label, an EndpointSlice, both, or
/// neither (then every call does nothing).
#[derive(Clone, Debug, Default)]
pub struct Routes {
    label: Option<PodLabel>,
    endpoints: Option<LeaderEndpoints>,
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

    /// Whether there is nothing to do.
    pub fn is_empty(&self) -> bool {
        self.label.is_none() && self.endpoints.is_none()
    }

    /// Before campaigning: removes what a previous incarnation of this pod left (a
    /// restarted container keeps its pod's labels and IP). Also checks that the pod and
    /// the Service can be read: refusals here (RBAC, a missing Service) are returned,
    /// to stop before the election starts.
    pub async fn clear_stale(&self) -> Result<(), RouteError> {
        if let Some(label) = &self.label
            && label.point_away().await?
        {
            info!(pod = %label.pod, key = %label.key, "removed a stale leader label from our pod");
        }
        if let Some(endpoints) = &self.endpoints {
            bounded(endpoints.desired()).await?;
            if endpoints.point_away().await? {
                info!(slice = %endpoints.slice_name(), "emptied an EndpointSlice still pointing at our pod");
            }
        }
        Ok(())
    }

    /// A term started: points traffic here, retrying (1 s, doubling to 10 s) until it
    /// worked or the term ended. Refusals that retrying cannot cure are logged and
    /// returned.
    pub async fn lead(&self, term: &Term) -> Result<(), RouteError> {
        let started = Instant::now();
        let mut backoff = Duration::from_secs(1);
        loop {
            let result = async {
                if let Some(label) = &self.label {
                    label.point_here(term).await?;
                }
                if let Some(endpoints) = &self.endpoints {
                    endpoints.point_here(term).await?;
                }
                Ok::<(), RouteError>(())
            }
            .await;
            match result {
                Ok(()) => {
                    if !self.is_empty() {
                        info!(after = ?started.elapsed(), "traffic points at this pod");
                    }
                    return Ok(());
                }
                Err(RouteError::TermEnded) => return Err(RouteError::TermEnded),
                Err(e) if e.is_fatal() => {
                    warn!(error = %e, "cannot point traffic at this pod");
                    return Err(e);
                }
                Err(e) => {
                    warn!(error = %e, retry_in = ?backoff, "pointing traffic at this pod failed");
                    tokio::select! {
                        () = sleep(backoff) => {}
                        () = term.cancelled() => return Err(RouteError::TermEnded),
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(10));
                }
            }
        }
    }

    /// The work stopped: points traffic away from here (removes our label, empties the
    /// slice if it points here), retrying for up to [`STEP_DOWN_LIMIT`]. Call it before
    /// dropping the [`Term`], so the Lease is released only afterwards.
    pub async fn step_down(&self) -> Result<(), RouteError> {
        if self.is_empty() {
            return Ok(());
        }
        let started = Instant::now();
        let until = started + STEP_DOWN_LIMIT;
        loop {
            let result = async {
                if let Some(label) = &self.label {
                    label.point_away().await?;
                }
                if let Some(endpoints) = &self.endpoints {
                    endpoints.point_away().await?;
                }
                Ok::<(), RouteError>(())
            };
            let result = match timeout_at(until, result).await {
                Ok(r) => r,
                Err(_) => Err(RouteError::Timeout),
            };
            match result {
                Ok(()) => {
                    info!(after = ?started.elapsed(), "traffic no longer points at this pod");
                    return Ok(());
                }
                Err(e) if e.is_fatal() || Instant::now() >= until => {
                    warn!(error = %e, "could not point traffic away from this pod");
                    return Err(e);
                }
                Err(e) => {
                    debug!(error = %e, "pointing traffic away failed; retrying");
                    sleep(Duration::from_millis(200)).await;
                }
            }
        }
    }

    /// For every term of the election behind `terms`: points traffic here, holds the
    /// term until it ends, points traffic away, then drops it (so the Lease is released
    /// only afterwards). Returns when the elector stops. For a process whose work does
    /// not hold terms itself (a sidecar).
    pub async fn follow(&self, mut terms: crate::handle::Terms) {
        while let Ok(term) = terms.acquired().await {
            tokio::select! {
                _ = self.lead(&term) => {}
                () = term.cancelled() => {}
            }
            term.cancelled().await;
            let _ = self.step_down().await;
            drop(term);
        }
    }
}

/// [`ElectionHandle::run_while_leading`] with [`Routes`]: each term, traffic is pointed
/// here (alongside `work`, which starts at once), and when the term ends `work` is
/// dropped, traffic is pointed away, and only then is the term dropped and the Lease
/// released.
pub async fn run_while_leading<F, Fut>(
    handle: &mut ElectionHandle,
    routes: &Routes,
    mut work: F,
) -> Result<(), ElectionError>
where
    F: FnMut(Term) -> Fut,
    Fut: Future<Output = ()>,
{
    while let Ok(term) = handle.acquired().await {
        let token = term.token();
        {
            let job = work(term.clone());
            let lead = async {
                let _ = routes.lead(&term).await;
                std::future::pending::<()>().await;
            };
            tokio::select! {
                () = async { tokio::join!(job, lead); } => {}
                () = token.cancelled() => {}
            }
        }
        let _ = routes.step_down().await;
        drop(term);
    }
    handle.join().await
}
