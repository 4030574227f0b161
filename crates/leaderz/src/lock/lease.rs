//! The Kubernetes lock: one `coordination.k8s.io/v1` Lease, written as client-go does.

use std::collections::BTreeMap;
use std::sync::Arc;

use futures::stream::BoxStream;
use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::ObjectReference;
use kube::api::{ObjectMeta, PostParams, WatchEvent, WatchParams};
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::{Api, Client};

use super::{Lock, LockError, LockEvent, SharedLeaseWatch, Versioned};
use crate::record::{HANDOFF_ANNOTATION, LeaderRecord};

/// A [`Lock`] on a Lease in one namespace.
///
/// Reads with `get`, creates with `create`, and writes with `replace` carrying the
/// `resourceVersion` that was read, so a concurrent write fails with 409 instead of
/// being overwritten. Watches use a single-object watch (`fieldSelector=metadata.name=`),
/// which RBAC can restrict to the lease's `resourceNames`; no `list` is needed. Locks
/// made by [`SharedLeaseWatch::lock`] share one watch on many Leases instead.
///
/// ```no_run
/// # async fn doc() -> Result<(), kube::Error> {
/// let client = kube::Client::try_default().await?;
/// let lock = leaderz::LeaseLock::new(client, "default", "my-lock");
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct LeaseLock {
    api: Api<Lease>,
    namespace: String,
    name: String,
    events: Option<Recorder>,
    labels: BTreeMap<String, String>,
    pub(super) shared: Option<SharedLeaseWatch>,
}

impl std::fmt::Debug for LeaseLock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LeaseLock")
            .field("namespace", &self.namespace)
            .field("name", &self.name)
            .finish()
    }
}

impl LeaseLock {
    /// A lock on Lease `name` in `namespace`.
    pub fn new(client: Client, namespace: &str, name: &str) -> Self {
        Self {
            api: Api::namespaced(client, namespace),
            namespace: namespace.to_owned(),
            name: name.to_owned(),
            events: None,
            labels: BTreeMap::new(),
            shared: None,
        }
    }

    /// Also carries these labels: set when the Lease is created, and added on every
    /// write if someone removed them (other labels are kept), as client-go's
    /// `LeaseLock.Labels` does. A [shard set](crate::shards) labels its Leases so that
    /// its members can find each other with one label selector, and a
    /// [`SharedLeaseWatch::labels`] selector finds the Leases it follows by them.
    #[must_use]
    pub fn with_labels<K: Into<String>, V: Into<String>>(
        mut self,
        labels: impl IntoIterator<Item = (K, V)>,
    ) -> Self {
        self.labels = labels
            .into_iter()
            .map(|(k, v)| (k.into(), v.into()))
            .collect();
        self
    }

    /// Adds this lock's labels to `lease`, keeping the ones it has.
    fn label(&self, lease: &mut Lease) {
        if self.labels.is_empty() {
            return;
        }
        let labels = lease.metadata.labels.get_or_insert_default();
        for (k, v) in &self.labels {
            labels.insert(k.clone(), v.clone());
        }
    }

    /// Also records Kubernetes Events on the Lease when this process starts and stops
    /// leading, as client-go does (reason `LeaderElection`, `"<id> became leader"` /
    /// `"<id> stopped leading"`). Needs `create` on `events.events.k8s.io`.
    #[must_use]
    pub fn with_events(mut self, client: Client, controller: &str) -> Self {
        let reporter = Reporter {
            controller: controller.to_owned(),
            instance: None,
        };
        self.events = Some(Recorder::new(client, reporter));
        self
    }

    /// The Lease's namespace.
    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    /// The Lease's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// A write of ours landed at `v.version`, asked for at `asked`: a shared watch that
    /// later shows that version has shown every change made before `asked`.
    fn wrote(&self, v: Versioned, asked: tokio::time::Instant) -> Versioned {
        if let Some(shared) = &self.shared {
            shared.wrote(&v.version, asked);
        }
        v
    }

    fn error(&self, verb: &'static str, err: kube::Error) -> LockError {
        match err {
            kube::Error::Api(status) => match status.code {
                409 if verb == "create" => LockError::AlreadyExists,
                409 => LockError::Conflict,
                404 if verb == "create"
                    && status
                        .details
                        .as_ref()
                        .is_some_and(|d| d.kind == "namespaces") =>
                {
                    LockError::NamespaceNotFound(self.namespace.clone())
                }
                404 => LockError::NotFound,
                403 => LockError::Forbidden {
                    verb,
                    namespace: self.namespace.clone(),
                    name: self.name.clone(),
                    message: status.message,
                },
                401 => LockError::Unauthorized(status.message),
                410 => LockError::Gone(status.message),
                code => LockError::Api {
                    code,
                    reason: status.reason,
                    message: status.message,
                },
            },
            other => LockError::Transport(Box::new(other)),
        }
    }
}

/// Writes the record's handoff into the Lease's annotation, or removes the annotation.
fn set_handoff(lease: &mut Lease, record: &LeaderRecord) {
    let annotations = lease.metadata.annotations.get_or_insert_default();
    match &record.handoff {
        Some(h) => {
            annotations.insert(HANDOFF_ANNOTATION.to_owned(), h.to_annotation());
        }
        None => {
            annotations.remove(HANDOFF_ANNOTATION);
        }
    }
    if annotations.is_empty() {
        lease.metadata.annotations = None;
    }
}

/// A Lease as read, kept as the record and its version. Its `managedFields` are dropped:
/// leaderz never writes them back (an update leaves them to the API server), and they are
/// most of a parsed Lease's memory — which counts with thousands of elections in a
/// process.
pub(crate) fn versioned(mut lease: Lease) -> Versioned {
    lease.metadata.managed_fields = None;
    Versioned {
        record: LeaderRecord::from_lease(&lease),
        version: lease.metadata.resource_version.clone().unwrap_or_default(),
        lease: Some(Arc::new(lease)),
    }
}

impl Lock for LeaseLock {
    async fn get(&self) -> Result<Option<Versioned>, LockError> {
        match self.api.get_opt(&self.name).await {
            Ok(lease) => Ok(lease.map(versioned)),
            Err(e) => Err(self.error("get", e)),
        }
    }

    async fn create(&self, record: &LeaderRecord) -> Result<Versioned, LockError> {
        let mut lease = Lease {
            metadata: ObjectMeta {
                name: Some(self.name.clone()),
                namespace: Some(self.namespace.clone()),
                labels: (!self.labels.is_empty()).then(|| self.labels.clone()),
                ..Default::default()
            },
            spec: Some(record.to_spec()),
        };
        set_handoff(&mut lease, record);
        self.label(&mut lease);
        let asked = tokio::time::Instant::now();
        match self.api.create(&PostParams::default(), &lease).await {
            Ok(lease) => Ok(self.wrote(versioned(lease), asked)),
            Err(e) => Err(self.error("create", e)),
        }
    }

    async fn update(
        &self,
        current: &Versioned,
        record: &LeaderRecord,
    ) -> Result<Versioned, LockError> {
        // Keep whatever else the Lease carries (labels, annotations, owners); replace
        // the spec and pin the version we read.
        let mut lease = match &current.lease {
            Some(lease) => Lease::clone(lease),
            None => Lease {
                metadata: ObjectMeta {
                    name: Some(self.name.clone()),
                    namespace: Some(self.namespace.clone()),
                    ..Default::default()
                },
                spec: None,
            },
        };
        lease.metadata.resource_version = Some(current.version.clone());
        lease.metadata.managed_fields = None;
        lease.spec = Some(record.to_spec());
        set_handoff(&mut lease, record);
        self.label(&mut lease);
        let asked = tokio::time::Instant::now();
        match self
            .api
            .replace(&self.name, &PostParams::default(), &lease)
            .await
        {
            // An update that changed nothing keeps the version: it dates nothing.
            Ok(lease) if lease.metadata.resource_version.as_ref() == Some(&current.version) => {
                Ok(versioned(lease))
            }
            Ok(lease) => Ok(self.wrote(versioned(lease), asked)),
            Err(e) => Err(self.error("update", e)),
        }
    }

    fn known_absent(&self) -> Option<tokio::time::Instant> {
        self.shared.as_ref()?.known_absent(&self.name)
    }

    async fn watch(
        &self,
        version: &str,
        timeout: std::time::Duration,
    ) -> Result<BoxStream<'static, Result<LockEvent, LockError>>, LockError> {
        if let Some(shared) = &self.shared {
            return shared.subscribe(&self.name, version, timeout).await;
        }
        let secs = u32::try_from(timeout.as_secs()).unwrap_or(u32::MAX).max(1);
        let params = WatchParams::default()
            .fields(&format!("metadata.name={}", self.name))
            .timeout(secs);
        let stream = self
            .api
            .watch(&params, version)
            .await
            .map_err(|e| self.error("watch", e))?;
        let this = self.clone();
        let events = stream
            .map_err(move |e| this.error("watch", e))
            .filter_map(|ev| {
                let out = match ev {
                    Ok(WatchEvent::Added(lease) | WatchEvent::Modified(lease)) => {
                        Some(Ok(LockEvent::Changed(versioned(lease))))
                    }
                    Ok(WatchEvent::Deleted(_)) => Some(Ok(LockEvent::Deleted)),
                    Ok(WatchEvent::Bookmark(_)) => None,
                    Ok(WatchEvent::Error(status)) if status.code == 410 => {
                        Some(Err(LockError::Gone(status.message)))
                    }
                    Ok(WatchEvent::Error(status)) => Some(Err(LockError::Api {
                        code: status.code,
                        reason: status.reason,
                        message: status.message,
                    })),
                    Err(e) => Some(Err(e)),
                };
                futures::future::ready(out)
            });
        Ok(events.boxed())
    }

    fn describe(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }

    async fn keep_candidate(
        &self,
        identity: &str,
        coordinated: &crate::config::Coordinated,
        stop: tokio_util::sync::CancellationToken,
    ) -> Result<(), LockError> {
        let candidate = super::candidate::Candidate {
            api: Api::namespaced(self.api.clone().into_client(), &self.namespace),
            namespace: self.namespace.clone(),
            name: identity.to_owned(),
            lease: self.name.clone(),
            spec: coordinated.clone(),
        };
        candidate.keep(stop).await
    }

    async fn announce(&self, identity: &str, leading: bool) {
        let Some(recorder) = &self.events else { return };
        let note = if leading {
            format!("{identity} became leader")
        } else {
            format!("{identity} stopped leading")
        };
        let event = Event {
            type_: EventType::Normal,
            reason: "LeaderElection".into(),
            note: Some(note),
            action: if leading {
                "Acquire".into()
            } else {
                "Release".into()
            },
            secondary: None,
        };
        let reference = ObjectReference {
            api_version: Some("coordination.k8s.io/v1".into()),
            kind: Some("Lease".into()),
            name: Some(self.name.clone()),
            namespace: Some(self.namespace.clone()),
            ..Default::default()
        };
        match recorder.publish(&event, &reference).await {
            Err(e) if !crate::client::is_deferred(&e) => {
                tracing::warn!(error = %e, "could not record a leader election event");
            }
            _ => {}
        }
    }
}
