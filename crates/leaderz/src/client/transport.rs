//! The HTTP transport under [`super::Options::build`]: HTTP/2 connections multiplexing
//! every request, with HTTP/1.1 where an upgrade needs it or the server offers nothing else.
//!
//! hyper-util's pooled client keeps exactly one HTTP/2 connection per host. Long-running
//! streams (watches, followed logs) hold a stream slot for minutes, so once the server's
//! `SETTINGS_MAX_CONCURRENT_STREAMS` (100 on kube-apiserver) are taken by them, every
//! other request on that connection waits — a leader's renewal behind a hundred
//! followers' watches would wait until its term ends. This pool therefore keeps several
//! connections, and counts the streams on each:
//!
//! - a long-running request takes a connection with fewer than 90 % of its streams in
//!   use by long-running requests and a free stream, else opens another connection (at
//!   most `max_connections`; beyond that it fails at once, and the elector polls);
//! - any other request takes the connection with the fewest streams in use, and never
//!   opens a second connection for itself: the remaining 10 % of every connection is
//!   left to short requests, which queue there if need be (client-side, instead of
//!   piling onto the API server's in-flight limit and being answered 429).
//!
//! Each connection is opened once, by the first request that needs it, while the others
//! wait for it; a request that finds its connection closed before it was written is
//! retried once on a fresh one.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, Uri};
use http_body::{Body as HttpBody, Frame, SizeHint};
use hyper::body::Incoming;
use hyper::client::conn::http2;
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::{self, connect::Connection, connect::HttpConnector};
use hyper_util::rt::TokioExecutor;
use kube::client::Body;
use tokio::time::Instant;
use tower::{BoxError, Service, ServiceExt};
use tracing::debug;

use super::admission::{Gate, Permit};

/// An extra connection (not the first) unused this long is closed.
const IDLE: Duration = Duration::from_secs(10);

/// TCP, then TLS (or plain TCP for `http://` URLs).
pub(crate) type Connector = HttpsConnector<HttpConnector>;

/// The tower service under the `kube::Client`.
#[derive(Clone)]
pub(crate) struct Transport {
    shared: Arc<Shared>,
}

struct Shared {
    /// HTTP/1.1 only (ALPN `http/1.1`): upgrades, and everything when the server does not
    /// speak HTTP/2.
    http1: legacy::Client<Connector, Body>,
    /// `None` when HTTP/2 is switched off.
    http2: Option<Pool>,
    /// Bounds the short requests in flight (see [`super::admission`]).
    gate: Arc<Gate>,
}

impl Transport {
    pub(crate) fn new(
        http1: legacy::Client<Connector, Body>,
        http2: Option<Pool>,
        gate: Arc<Gate>,
    ) -> Self {
        Self {
            shared: Arc::new(Shared { http1, http2, gate }),
        }
    }
}

impl Service<Request<Body>> for Transport {
    type Response = Response<TrackedBody>;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, BoxError>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<Body>) -> Self::Future {
        let shared = self.shared.clone();
        Box::pin(async move { shared.send(req).await })
    }
}

impl Shared {
    async fn send(&self, req: Request<Body>) -> Result<Response<TrackedBody>, BoxError> {
        // Watches and upgrades hold their stream for long: they do not count against the
        // short requests in flight.
        let permit = if is_long_running(req.uri()) || needs_http1(&req) {
            None
        } else {
            Some(self.gate.enter().await?)
        };
        let req = match &self.http2 {
            Some(pool) if !needs_http1(&req) && !pool.http1_only.load(Ordering::Relaxed) => {
                match pool.send(req).await {
                    Ok(res) => return Ok(res.map(|body| TrackedBody { permit, ..body })),
                    Err(PoolError::Http1(req)) => req,
                    Err(PoolError::Failed(e)) => return Err(e),
                }
            }
            _ => req,
        };
        let res = self.http1.request(req).await?;
        Ok(res.map(|body| TrackedBody {
            inner: body,
            guard: None,
            permit,
        }))
    }
}

/// An upgrade (websocket `exec`, `attach`, `portforward`) cannot be carried by an HTTP/2
/// stream (kube-rs#1923): it gets an HTTP/1.1 connection of its own.
fn needs_http1(req: &Request<Body>) -> bool {
    req.headers().contains_key(http::header::UPGRADE) || req.method() == http::Method::CONNECT
}

/// A request that holds its stream for long: a watch (also the deprecated
/// `/watch/` paths), or logs followed.
fn is_long_running(uri: &Uri) -> bool {
    // `/api/{version}/watch/...` or `/apis/{group}/{version}/watch/...`: the segment
    // right after the version (a namespace or an object named `watch` is no watch).
    let mut segments = uri.path().split('/').skip(1);
    let watch_at = match segments.next() {
        Some("api") => 1,
        Some("apis") => 2,
        _ => usize::MAX,
    };
    if segments.nth(watch_at) == Some("watch") {
        return true;
    }
    uri.query().is_some_and(|q| {
        q.split('&')
            .any(|pair| matches!(pair, "watch=true" | "watch=1" | "follow=true" | "follow=1"))
    })
}

/// The HTTP/2 connections. See the [module docs](self).
pub(crate) struct Pool {
    connector: Connector,
    builder: http2::Builder<TokioExecutor>,
    connect_timeout: Option<Duration>,
    /// Our own cap on streams per connection; the server's, once known, if lower.
    max_streams: usize,
    max_connections: usize,
    slots: Mutex<Vec<Arc<Slot>>>,
    /// What `Slot::last_used` counts from.
    clock: Instant,
    /// The server answered without HTTP/2 (no ALPN `h2`, or plain `http://`).
    http1_only: AtomicBool,
}

/// One HTTP/2 connection (open, or to be opened by the next request that picks it).
struct Slot {
    /// Streams in flight here, and how many of them are long-running.
    streams: AtomicUsize,
    long: AtomicUsize,
    /// The server's `SETTINGS_MAX_CONCURRENT_STREAMS` as last seen (0: not yet known).
    server_limit: Arc<AtomicUsize>,
    /// Bumped on every attempt to connect, so that requests that waited for a failed
    /// attempt fail with it instead of each trying (and timing out) in turn.
    attempts: AtomicU64,
    conn: tokio::sync::Mutex<Option<http2::SendRequest<Body>>>,
    /// When a stream last started or ended here (milliseconds on the pool's clock).
    last_used_ms: AtomicU64,
}

impl Slot {
    fn last_used(&self) -> Duration {
        Duration::from_millis(self.last_used_ms.load(Ordering::Relaxed))
    }

    fn touch(&self, clock: Instant) {
        let ms = u64::try_from(clock.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last_used_ms.store(ms, Ordering::Relaxed);
    }

    fn new() -> Self {
        Self {
            last_used_ms: AtomicU64::new(0),
            streams: AtomicUsize::new(0),
            long: AtomicUsize::new(0),
            server_limit: Arc::new(AtomicUsize::new(0)),
            attempts: AtomicU64::new(0),
            conn: tokio::sync::Mutex::new(None),
        }
    }
}

#[allow(clippy::large_enum_variant)] // returned once per request, never stored
enum PoolError {
    /// The server does not speak HTTP/2: send this over HTTP/1.1.
    Http1(Request<Body>),
    Failed(BoxError),
}

/// Too many long-running streams for `max_connections` connections.
#[derive(Debug, thiserror::Error)]
#[error(
    "every HTTP/2 connection to the API server is full of watches ({0} connections); \
     raise leaderz::client::Options::max_connections or share one watch among many Leases"
)]
struct StreamsExhausted(usize);

/// A connection attempt that a request waited for failed.
#[derive(Debug, thiserror::Error)]
#[error("connecting to the API server failed (another request's attempt)")]
struct ConnectFailed;

/// No TCP + TLS connection within the connect timeout.
#[derive(Debug, thiserror::Error)]
#[error("no connection to the API server within {0:?}")]
struct ConnectTimeout(Duration);

impl Pool {
    pub(crate) fn new(
        connector: Connector,
        builder: http2::Builder<TokioExecutor>,
        connect_timeout: Option<Duration>,
        max_streams: usize,
        max_connections: usize,
    ) -> Self {
        Self {
            connector,
            builder,
            connect_timeout,
            max_streams: max_streams.max(2),
            max_connections: max_connections.max(1),
            slots: Mutex::new(Vec::new()),
            clock: Instant::now(),
            http1_only: AtomicBool::new(false),
        }
    }

    /// Picks a connection for a request and counts the stream on it.
    fn pick(&self, long: bool) -> Result<StreamGuard, StreamsExhausted> {
        let mut slots = self.slots.lock().unwrap_or_else(|e| e.into_inner());
        let now = self.clock.elapsed();
        // Close extra connections nothing has used for a while (a burst of watches that
        // has ended): dropping the slot drops its connection.
        let mut index = 0;
        slots.retain(|s| {
            index += 1;
            index == 1
                || s.streams.load(Ordering::Relaxed) > 0
                || now.saturating_sub(s.last_used()) < IDLE
        });
        let cap = |s: &Slot| match s.server_limit.load(Ordering::Relaxed) {
            0 => self.max_streams,
            server => server.min(self.max_streams),
        };
        // Long-running streams leave a tenth of every connection (at least one stream)
        // to short requests.
        let long_cap = |s: &Slot| {
            let cap = cap(s);
            cap - (cap / 10).max(1)
        };
        // Short requests go to the first connection, or to one that carries long-running
        // streams: the others (opened for a burst of watches that has ended) get nothing
        // new, fall idle and close.
        let first = slots.first().cloned();
        let wanted = |s: &Slot| {
            long || s.long.load(Ordering::Relaxed) > 0
                || first.as_deref().is_some_and(|f| std::ptr::eq(f, s))
        };
        let fits = |s: &&Arc<Slot>| {
            wanted(s)
                && s.streams.load(Ordering::Relaxed) < cap(s)
                && (!long || s.long.load(Ordering::Relaxed) < long_cap(s))
        };
        // The first connection with room: streams are packed onto as few connections as
        // will carry them.
        let chosen = match slots.iter().find(fits) {
            Some(slot) => slot.clone(),
            None if slots.is_empty() || (long && slots.len() < self.max_connections) => {
                let slot = Arc::new(Slot::new());
                slots.push(slot.clone());
                slot
            }
            None if long => return Err(StreamsExhausted(slots.len())),
            // Short requests queue on the least busy of those connections (the reserve
            // of each keeps them moving), instead of piling onto the API server's
            // in-flight limit.
            None => slots
                .iter()
                .filter(|s| wanted(s))
                .min_by_key(|s| s.streams.load(Ordering::Relaxed))
                .cloned()
                .ok_or(StreamsExhausted(0))?,
        };
        Ok(StreamGuard::new(chosen, long, self.clock))
    }

    async fn send(&self, req: Request<Body>) -> Result<Response<TrackedBody>, PoolError> {
        let long = is_long_running(req.uri());
        let guard = self
            .pick(long)
            .map_err(|e| PoolError::Failed(Box::new(e)))?;
        let mut req = req;
        // A request that finds its connection closed before it was written is retried
        // once on a fresh connection.
        for attempt in 0..2 {
            let mut sender = match self.sender(&guard.slot, req.uri()).await {
                Ok(Some(sender)) => sender,
                Ok(None) => return Err(PoolError::Http1(req)),
                Err(e) => return Err(PoolError::Failed(e)),
            };
            match sender.try_send_request(req).await {
                Ok(res) => {
                    return Ok(res.map(|body| TrackedBody {
                        inner: body,
                        guard: Some(guard),
                        permit: None,
                    }));
                }
                Err(mut e) => match e.take_message() {
                    Some(unsent) if attempt == 0 => {
                        debug!(error = %e.error(), "the HTTP/2 connection closed; reconnecting");
                        req = unsent;
                    }
                    _ => return Err(PoolError::Failed(Box::new(e.into_error()))),
                },
            }
        }
        Err(PoolError::Failed(Box::new(ConnectFailed)))
    }

    /// The slot's open connection, opening it if need be. `None`: the server does not
    /// speak HTTP/2.
    async fn sender(
        &self,
        slot: &Slot,
        uri: &Uri,
    ) -> Result<Option<http2::SendRequest<Body>>, BoxError> {
        let seen = slot.attempts.load(Ordering::Acquire);
        let mut conn = slot.conn.lock().await;
        if let Some(sender) = conn.as_ref()
            && !sender.is_closed()
        {
            return Ok(Some(sender.clone()));
        }
        *conn = None;
        if slot.attempts.load(Ordering::Acquire) != seen {
            // Someone tried while we waited, and failed.
            return Err(Box::new(ConnectFailed));
        }
        slot.attempts.fetch_add(1, Ordering::AcqRel);
        let connect = self.connect(uri, &slot.server_limit);
        let sender = match self.connect_timeout {
            Some(limit) => tokio::time::timeout(limit, connect)
                .await
                .map_err(|_| Box::new(ConnectTimeout(limit)))??,
            None => connect.await?,
        };
        if let Some(sender) = &sender {
            *conn = Some(sender.clone());
        }
        Ok(sender)
    }

    async fn connect(
        &self,
        uri: &Uri,
        server_limit: &Arc<AtomicUsize>,
    ) -> Result<Option<http2::SendRequest<Body>>, BoxError> {
        let mut target = Uri::builder();
        if let Some(scheme) = uri.scheme() {
            target = target.scheme(scheme.clone());
        }
        if let Some(authority) = uri.authority() {
            target = target.authority(authority.clone());
        }
        let target = target.path_and_query("/").build()?;
        let io = self.connector.clone().oneshot(target).await?;
        if !io.connected().is_negotiated_h2() {
            debug!("the API server does not offer HTTP/2; using HTTP/1.1");
            self.http1_only.store(true, Ordering::Relaxed);
            return Ok(None);
        }
        let (sender, mut connection) = self.builder.handshake(io).await?;
        // Drive the connection, and keep up with the server's stream limit as it goes.
        let limit = server_limit.clone();
        tokio::spawn(async move {
            let ended = std::future::poll_fn(|cx| {
                let polled = Pin::new(&mut connection).poll(cx);
                limit.store(connection.current_max_send_streams(), Ordering::Relaxed);
                polled
            })
            .await;
            if let Err(e) = ended {
                debug!(error = %e, "an HTTP/2 connection to the API server ended");
            }
        });
        Ok(Some(sender))
    }
}

/// One stream counted on a connection until the response body ends or is dropped.
struct StreamGuard {
    slot: Arc<Slot>,
    long: bool,
    clock: Instant,
}

impl StreamGuard {
    fn new(slot: Arc<Slot>, long: bool, clock: Instant) -> Self {
        slot.streams.fetch_add(1, Ordering::Relaxed);
        if long {
            slot.long.fetch_add(1, Ordering::Relaxed);
        }
        slot.touch(clock);
        Self { slot, long, clock }
    }
}

impl Drop for StreamGuard {
    fn drop(&mut self) {
        self.slot.touch(self.clock);
        self.slot.streams.fetch_sub(1, Ordering::Relaxed);
        if self.long {
            self.slot.long.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

/// A response body that releases its stream's place on the connection, and its place
/// among the requests in flight, when it ends.
pub(crate) struct TrackedBody {
    inner: Incoming,
    guard: Option<StreamGuard>,
    permit: Option<Permit>,
}

impl HttpBody for TrackedBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        if matches!(polled, Poll::Ready(None | Some(Err(_)))) {
            self.guard = None;
            self.permit = None;
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_running_requests() {
        let long = |s: &str| is_long_running(&s.parse::<Uri>().unwrap());
        assert!(long(
            "/apis/coordination.k8s.io/v1/namespaces/a/leases?watch=true"
        ));
        assert!(long(
            "/apis/x?fieldSelector=metadata.name%3Dl&timeoutSeconds=290&watch=true"
        ));
        assert!(long("/api/v1/namespaces/a/pods/p/log?follow=true"));
        assert!(long("/api/v1/watch/namespaces/a/pods"));
        assert!(long(
            "/apis/coordination.k8s.io/v1/watch/namespaces/a/leases/l"
        ));
        assert!(!long("/apis/coordination.k8s.io/v1/namespaces/a/leases/l"));
        assert!(!long(
            "/apis/coordination.k8s.io/v1/namespaces/watch/leases/l"
        ));
        assert!(!long("/api/v1/namespaces/watch/pods/watch"));
        assert!(!long("/api/v1/namespaces/a/pods?watchy=true"));
        assert!(!long("/api/v1/namespaces/a/pods?watch=false"));
    }
}
