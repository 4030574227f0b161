//! The HTTP endpoints of `serve` (and `run --http`): who leads, status, health,
//! readiness, metrics and a server-sent-events stream of leader changes.

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Json, Response};
use axum::routing::get;
use futures::Stream;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use leaderz::Status;
use leaderz::record::micro_time;
use prometheus_client::registry::Registry;
use serde::Serialize;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::time::Instant;
use tracing::{info, warn};

use crate::election::{Election, ElectionInfo};
use crate::error::{CliError, chain};

/// How much longer than the lease duration a leader may go without renewing before
/// `/healthz` fails (client-go's `HealthzAdaptor` is usually given 20 s).
const HEALTH_TOLERANCE: Duration = Duration::from_secs(20);

/// The Prometheus exposition format `/metrics` answers in.
const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// What the handlers read: the election's facts and its live state.
#[derive(Clone, Debug)]
pub(crate) struct AppState(Arc<Shared>);

#[derive(Debug)]
struct Shared {
    info: Arc<ElectionInfo>,
    leader: watch::Receiver<Option<String>>,
    status: watch::Receiver<Status>,
    registry: Arc<Registry>,
    /// Latched once the elector has read the Lease or led.
    ready: AtomicBool,
}

fn is_ready(status: &Status) -> bool {
    status.observed.is_some() || status.term.is_some()
}

impl AppState {
    /// State over an election's watch channels. Must be called inside a tokio runtime.
    pub(crate) fn new(
        info: Arc<ElectionInfo>,
        leader: watch::Receiver<Option<String>>,
        status: watch::Receiver<Status>,
        registry: Arc<Registry>,
    ) -> Self {
        let shared = Arc::new(Shared {
            info,
            leader,
            status,
            registry,
            ready: AtomicBool::new(false),
        });
        let state = Self(shared);
        let latch = state.clone();
        tokio::spawn(async move { latch.ready().await });
        state
    }

    /// Completes once the elector has read the Lease or led (never if it stops first).
    async fn ready(&self) {
        let mut status = self.0.status.clone();
        if status.wait_for(is_ready).await.is_ok() {
            self.0.ready.store(true, Ordering::Relaxed);
        } else {
            std::future::pending::<()>().await;
        }
    }

    /// State over a running election.
    pub(crate) fn for_election(election: &Election) -> Self {
        Self::new(
            election.info.clone(),
            election.handle.leader(),
            election.handle.status(),
            election.registry.clone(),
        )
    }
}

/// The routes.
pub(crate) fn router(state: AppState) -> Router {
    Router::new()
        .route("/", get(leader))
        .route("/status", get(status))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/events", get(events))
        .with_state(state)
}

/// Binds `addr` (`host:port`), before anything is written to the cluster.
pub(crate) async fn bind(addr: &str) -> Result<TcpListener, CliError> {
    TcpListener::bind(addr).await.map_err(|e| CliError::Listen {
        addr: addr.to_owned(),
        cause: chain(&e),
    })
}

/// Serves `state` on `listener` in the background, until the process exits.
pub(crate) fn spawn(listener: TcpListener, state: AppState) {
    let addr = listener.local_addr().ok();
    let ready = state.clone();
    tokio::spawn(async move {
        // Said once the election is under way, so a bad flag still gets one line only.
        ready.ready().await;
        if let Some(addr) = addr {
            info!(%addr, "serving HTTP");
        }
    });
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, router(state)).await {
            warn!(error = %e, "the HTTP server stopped");
        }
    });
}

/// `GET /`: the kubernetes/contrib leader-elector's answer.
#[derive(Debug, Serialize, PartialEq, Eq)]
struct LeaderBody {
    /// The leader's identity, `""` when nobody leads.
    name: String,
}

impl LeaderBody {
    fn new(leader: Option<&String>) -> Self {
        Self {
            name: leader.cloned().unwrap_or_default(),
        }
    }
}

async fn leader(State(s): State<AppState>) -> Json<LeaderBody> {
    Json(LeaderBody::new(s.0.leader.borrow().as_ref()))
}

/// `GET /status`.
#[derive(Debug, Serialize, PartialEq)]
struct StatusBody {
    lease: String,
    namespace: String,
    identity: String,
    /// Who leads as this process sees it; `null` when nobody does.
    leader: Option<String>,
    is_leader: bool,
    /// `leaseTransitions` of the last record seen.
    lease_transitions: Option<i32>,
    /// This process's fencing token, while it leads.
    fencing_token: Option<i64>,
    acquire_time: Option<MicroTime>,
    renew_time: Option<MicroTime>,
    lease_duration_seconds: Option<i32>,
    /// Until the holder's lease expires in this process's eyes (local monotonic clock).
    expires_in_seconds: Option<f64>,
    /// Whether a watch on the Lease is open.
    watching: bool,
    last_error: Option<String>,
}

impl StatusBody {
    fn new(info: &ElectionInfo, leader: Option<String>, status: &Status, now: Instant) -> Self {
        let observed = status.observed.as_ref();
        let record = observed.map(|o| &o.record);
        let expires_in_seconds = observed.filter(|o| o.record.holder().is_some()).map(|o| {
            let at = o.expires_at(info.lease_duration, info.max_record_duration);
            let secs = if at >= now {
                (at - now).as_secs_f64()
            } else {
                -(now - at).as_secs_f64()
            };
            (secs * 1000.0).round() / 1000.0
        });
        Self {
            lease: info.lease.clone(),
            namespace: info.namespace.clone(),
            identity: info.identity.clone(),
            leader,
            is_leader: status.term.is_some(),
            lease_transitions: record.map(|r| r.lease_transitions),
            fencing_token: status.term.as_ref().map(|t| t.fencing_token),
            acquire_time: record.and_then(|r| r.acquire_time).map(micro_time),
            renew_time: record.and_then(|r| r.renew_time).map(micro_time),
            lease_duration_seconds: record.and_then(|r| r.lease_duration_seconds),
            expires_in_seconds,
            watching: status.watching,
            last_error: status.last_error.clone(),
        }
    }
}

async fn status(State(s): State<AppState>) -> Json<StatusBody> {
    let leader = s.0.leader.borrow().clone();
    let status = s.0.status.borrow().clone();
    Json(StatusBody::new(&s.0.info, leader, &status, Instant::now()))
}

/// `GET /healthz`: client-go's `HealthzAdaptor` rule (unhealthy when this process
/// believes it leads but has not renewed for lease duration + 20 s), or the elector
/// has stopped.
async fn healthz(State(s): State<AppState>) -> Response {
    if s.0.status.has_changed().is_err() {
        return (
            StatusCode::INTERNAL_SERVER_ERROR,
            "the elector has stopped\n",
        )
            .into_response();
    }
    let health =
        s.0.status
            .borrow()
            .check_health(s.0.info.lease_duration, HEALTH_TOLERANCE);
    match health {
        Ok(()) => (StatusCode::OK, "ok\n").into_response(),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, format!("{e}\n")).into_response(),
    }
}

/// `GET /readyz`: ready once the elector has read the Lease at least once, or leads.
async fn readyz(State(s): State<AppState>) -> Response {
    let ready = s.0.ready.load(Ordering::Relaxed) || is_ready(&s.0.status.borrow());
    if ready {
        s.0.ready.store(true, Ordering::Relaxed);
        (StatusCode::OK, "ok\n").into_response()
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "not ready: the Lease has not been read yet\n",
        )
            .into_response()
    }
}

/// `GET /metrics`: the election metrics (client-go's names) in OpenMetrics text.
async fn metrics(State(s): State<AppState>) -> Response {
    let mut text = String::new();
    match prometheus_client::encoding::text::encode(&mut text, &s.0.registry) {
        Ok(()) => ([(header::CONTENT_TYPE, OPENMETRICS)], text).into_response(),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response(),
    }
}

/// `GET /events`: one `data: {"name":"..."}` event per leader change, the current
/// leader first. Ends when the elector stops.
async fn events(
    State(s): State<AppState>,
) -> Sse<impl Stream<Item = Result<Event, Infallible>> + use<>> {
    let rx = s.0.leader.clone();
    let stream =
        futures::stream::unfold((rx, None::<Option<String>>), |(mut rx, last)| async move {
            loop {
                if last.is_some() {
                    rx.changed().await.ok()?;
                }
                let current = rx.borrow_and_update().clone();
                if last.as_ref() == Some(&current) {
                    continue;
                }
                let body = LeaderBody::new(current.as_ref());
                let data = serde_json::to_string(&body).unwrap_or_default();
                return Some((Ok(Event::default().data(data)), (rx, Some(current))));
            }
        });
    Sse::new(stream).keep_alive(KeepAlive::default())
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::body::Body;
    use axum::http::Request;
    use futures::StreamExt;
    use leaderz::{ElectionConfig, Elector, LeaderRecord, MemoryLock, Metrics};
    use serde_json::{Value, json};
    use tower::ServiceExt;

    fn info() -> Arc<ElectionInfo> {
        Arc::new(ElectionInfo {
            lease: "l".into(),
            namespace: "ns".into(),
            identity: "a".into(),
            lease_duration: Duration::from_secs(15),
            max_record_duration: Duration::from_secs(3600),
        })
    }

    async fn get(state: &AppState, path: &str) -> (StatusCode, String, String) {
        let response = router(state.clone())
            .oneshot(Request::get(path).body(Body::empty()).unwrap())
            .await
            .unwrap();
        let code = response.status();
        let content_type = response
            .headers()
            .get(header::CONTENT_TYPE)
            .map(|v| v.to_str().unwrap().to_owned())
            .unwrap_or_default();
        let body = axum::body::to_bytes(response.into_body(), 1 << 20)
            .await
            .unwrap();
        (
            code,
            content_type,
            String::from_utf8(body.to_vec()).unwrap(),
        )
    }

    async fn get_json(state: &AppState, path: &str) -> Value {
        let (code, content_type, body) = get(state, path).await;
        assert_eq!(code, StatusCode::OK);
        assert_eq!(content_type, "application/json");
        serde_json::from_str(&body).unwrap()
    }

    /// An elector on the in-memory lock, and the HTTP state over it.
    fn elect(lock: &MemoryLock, id: &str) -> (leaderz::ElectionHandle, AppState) {
        let mut registry = Registry::default();
        let metrics = Metrics::new(&mut registry);
        let handle = Elector::new(lock.clone(), ElectionConfig::new(id))
            .unwrap()
            .metrics(metrics)
            .spawn();
        let state = AppState::new(info(), handle.leader(), handle.status(), Arc::new(registry));
        (handle, state)
    }

    #[tokio::test(start_paused = true)]
    async fn leader_sees_itself() {
        let lock = MemoryLock::new("l");
        let (handle, state) = elect(&lock, "a");
        drop(handle.acquired().await.unwrap());

        assert_eq!(get_json(&state, "/").await, json!({"name": "a"}));

        let mut status = get_json(&state, "/status").await;
        let time = status["renew_time"].take();
        assert!(time.as_str().unwrap().ends_with('Z'), "{time}");
        assert_eq!(status["acquire_time"].take(), time);
        assert_eq!(
            status,
            json!({
                "lease": "l",
                "namespace": "ns",
                "identity": "a",
                "leader": "a",
                "is_leader": true,
                "lease_transitions": 0,
                "fencing_token": 0,
                "acquire_time": null,
                "renew_time": null,
                "lease_duration_seconds": 15,
                "expires_in_seconds": 15.0,
                "watching": false,
                "last_error": null,
            })
        );

        assert_eq!(get(&state, "/healthz").await.0, StatusCode::OK);
        assert_eq!(get(&state, "/readyz").await.0, StatusCode::OK);
        let (code, content_type, text) = get(&state, "/metrics").await;
        assert_eq!(code, StatusCode::OK);
        assert_eq!(content_type, OPENMETRICS);
        assert!(
            text.contains("leader_election_master_status{name=\"l\"} 1"),
            "{text}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn follower_sees_the_holder_and_when_it_expires() {
        let lock = MemoryLock::new("l");
        lock.force(Some(LeaderRecord {
            holder_identity: "other".into(),
            lease_duration_seconds: Some(20),
            lease_transitions: 4,
            ..Default::default()
        }));
        let (handle, state) = elect(&lock, "a");
        let mut leader = handle.leader();
        leader.wait_for(|l| l.is_some()).await.unwrap();
        tokio::time::sleep(Duration::from_secs(5)).await;

        assert_eq!(get_json(&state, "/").await, json!({"name": "other"}));
        let status = get_json(&state, "/status").await;
        assert_eq!(status["leader"], "other");
        assert_eq!(status["is_leader"], false);
        assert_eq!(status["fencing_token"], Value::Null);
        assert_eq!(status["lease_transitions"], 4);
        assert_eq!(status["lease_duration_seconds"], 20);
        assert_eq!(status["expires_in_seconds"], 15.0);
        assert_eq!(status["watching"], true);
    }

    #[tokio::test(start_paused = true)]
    async fn events_stream_the_current_leader_then_changes() {
        let lock = MemoryLock::new("l");
        let (handle, state) = elect(&lock, "a");
        drop(handle.acquired().await.unwrap());
        let response = router(state)
            .oneshot(Request::get("/events").body(Body::empty()).unwrap())
            .await
            .unwrap();
        assert_eq!(
            response.headers()[header::CONTENT_TYPE],
            "text/event-stream"
        );
        let mut body = response.into_body().into_data_stream();
        let first = body.next().await.unwrap().unwrap();
        assert_eq!(&first[..], b"data: {\"name\":\"a\"}\n\n");
        // The elector stops and releases: nobody leads.
        handle.shutdown().await.unwrap();
        let next = body.next().await.unwrap().unwrap();
        assert_eq!(&next[..], b"data: {\"name\":\"\"}\n\n");
    }

    #[tokio::test]
    async fn before_the_lease_is_read_and_after_the_elector_stopped() {
        let (leader_tx, leader) = watch::channel(None);
        let (status_tx, status) = watch::channel(Status::default());
        let state = AppState::new(info(), leader, status, Arc::new(Registry::default()));

        assert_eq!(get_json(&state, "/").await, json!({"name": ""}));
        let status = get_json(&state, "/status").await;
        assert_eq!(status["leader"], Value::Null);
        assert_eq!(status["is_leader"], false);
        assert_eq!(status["expires_in_seconds"], Value::Null);
        let (code, _, body) = get(&state, "/readyz").await;
        assert_eq!(code, StatusCode::SERVICE_UNAVAILABLE, "{body}");
        assert_eq!(get(&state, "/healthz").await.0, StatusCode::OK);

        drop((leader_tx, status_tx));
        let (code, _, body) = get(&state, "/healthz").await;
        assert_eq!(code, StatusCode::INTERNAL_SERVER_ERROR);
        assert_eq!(body, "the elector has stopped\n");
    }
}
