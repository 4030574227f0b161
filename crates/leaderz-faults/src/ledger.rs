//! The fenced ledger: a small HTTP service on 127.0.0.1 that accepts a write only when its
//! fencing token is at least every token it accepted before, and records every write,
//! accepted or rejected. It is the judge of overlap.
//!
//! Each `resource` (one per trial) is fenced on its own.
//!
//! - `POST /write` with a JSON [`WriteRequest`]: `200 {"accepted":true}`, or
//!   `409 {"accepted":false,"highest":N}` when a higher token was accepted before;
//! - `GET /writes?resource=R`: every [`Write`] to `R` so far, in arrival order, as JSON.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};

use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use crate::now_ns;

/// One write as a writer sends it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct WriteRequest {
    /// Which fenced resource.
    pub resource: String,
    /// The writer's identity (the candidate's).
    pub identity: String,
    /// The fencing token the writer holds.
    pub token: i64,
    /// The writer's process id, to tell a term's processes apart.
    pub pid: u32,
    /// The writer's sequence number, from 0.
    pub seq: u64,
    /// When the writer sent it (Unix ns, wall clock).
    pub sent_ns: u64,
}

/// One write as the ledger recorded it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Write {
    /// What was sent.
    #[serde(flatten)]
    pub request: WriteRequest,
    /// When the ledger received it (Unix ns, wall clock).
    pub received_ns: u64,
    /// Whether it was accepted.
    pub accepted: bool,
}

#[derive(Debug, Default)]
struct Resource {
    highest: Option<i64>,
    writes: Vec<Write>,
}

type Resources = Arc<Mutex<HashMap<String, Resource>>>;

/// A running ledger; stops when dropped.
#[derive(Debug)]
pub struct Ledger {
    addr: SocketAddr,
    resources: Resources,
    stop: CancellationToken,
}

impl Ledger {
    /// Serves on a free port of 127.0.0.1.
    pub async fn start() -> std::io::Result<Self> {
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", 0)).await?;
        let addr = listener.local_addr()?;
        let resources = Resources::default();
        let app = Router::new()
            .route("/write", post(write))
            .route("/writes", get(writes))
            .with_state(resources.clone());
        let stop = CancellationToken::new();
        let stopped = stop.clone();
        tokio::spawn(async move {
            let _ = axum::serve(listener, app)
                .with_graceful_shutdown(stopped.cancelled_owned())
                .await;
        });
        Ok(Self {
            addr,
            resources,
            stop,
        })
    }

    /// `http://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Every write to `resource` so far, in arrival order.
    pub fn writes(&self, resource: &str) -> Vec<Write> {
        self.resources
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(resource)
            .map(|r| r.writes.clone())
            .unwrap_or_default()
    }

    /// Judges and records one write (what `POST /write` does).
    pub fn submit(&self, request: WriteRequest) -> bool {
        judge(&self.resources, request)
    }
}

impl Drop for Ledger {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

fn judge(resources: &Resources, request: WriteRequest) -> bool {
    let received_ns = now_ns();
    let mut resources = resources.lock().unwrap_or_else(PoisonError::into_inner);
    let resource = resources.entry(request.resource.clone()).or_default();
    let accepted = resource.highest.is_none_or(|h| request.token >= h);
    if accepted {
        resource.highest = Some(request.token);
    }
    resource.writes.push(Write {
        request,
        received_ns,
        accepted,
    });
    accepted
}

#[derive(Serialize)]
struct Verdict {
    accepted: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    highest: Option<i64>,
}

async fn write(
    State(resources): State<Resources>,
    Json(request): Json<WriteRequest>,
) -> (StatusCode, Json<Verdict>) {
    let resource = request.resource.clone();
    if judge(&resources, request) {
        let verdict = Verdict {
            accepted: true,
            highest: None,
        };
        return (StatusCode::OK, Json(verdict));
    }
    let highest = resources
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .get(&resource)
        .and_then(|r| r.highest);
    let verdict = Verdict {
        accepted: false,
        highest,
    };
    (StatusCode::CONFLICT, Json(verdict))
}

#[derive(Deserialize)]
struct WritesQuery {
    resource: String,
}

async fn writes(
    State(resources): State<Resources>,
    Query(q): Query<WritesQuery>,
) -> Json<Vec<Write>> {
    let writes = resources
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .get(&q.resource)
        .map(|r| r.writes.clone())
        .unwrap_or_default();
    Json(writes)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn req(identity: &str, token: i64, seq: u64) -> WriteRequest {
        WriteRequest {
            resource: "r".into(),
            identity: identity.into(),
            token,
            pid: 1,
            seq,
            sent_ns: 0,
        }
    }

    #[tokio::test]
    async fn accepts_only_tokens_at_least_the_highest_and_records_everything() {
        let ledger = Ledger::start().await.unwrap();
        assert!(ledger.submit(req("a", 3, 0)));
        assert!(ledger.submit(req("a", 3, 1)));
        assert!(ledger.submit(req("b", 4, 0)));
        assert!(!ledger.submit(req("a", 3, 2)), "stale token accepted");
        assert!(ledger.submit(req("b", 4, 1)));
        let other = WriteRequest {
            resource: "other".into(),
            ..req("c", 0, 0)
        };
        assert!(ledger.submit(other), "resources are fenced apart");
        let log = ledger.writes("r");
        let verdicts: Vec<(i64, bool)> =
            log.iter().map(|w| (w.request.token, w.accepted)).collect();
        assert_eq!(
            verdicts,
            [(3, true), (3, true), (4, true), (3, false), (4, true)]
        );
        assert!(log.windows(2).all(|w| w[0].received_ns <= w[1].received_ns));
    }
}
