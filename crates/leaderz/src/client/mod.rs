//! A `kube::Client` built for leader election: no Nagle delay, HTTP/2 multiplexing with
//! keepalive pings, HTTP/1.1 only where an upgrade needs it.
//!
//! kube-rs's default client (`kube::Client::try_default`) speaks HTTP/1.1 with Nagle's
//! algorithm on. For an election that costs twice: a follower's only connection carries
//! its watch, so its takeover opens a new connection whose request waits ~40 ms for the
//! server's delayed ACK (kube-rs#2056); and a process running many elections holds one
//! socket per concurrent request (1350 sockets for 1000 Leases). [`infer`] and
//! [`Options::build`] build the same kind of `kube::Client` from kube-rs's public parts
//! (`kube::Client::new`, the `ConfigExt` layers and TLS config, hyper, hyper-util,
//! hyper-rustls):
//!
//! - **`TCP_NODELAY`** on every connection to the API server.
//! - **HTTP/2** where the server offers it (ALPN): watches and requests share a few
//!   connections (one for up to ~90 watches), so a follower's takeover goes out on a
//!   connection that is already open. kube-apiserver allows 100 concurrent streams per
//!   connection; the client opens another connection for long-running streams beyond
//!   90 % of that, and always leaves room for short requests.
//! - **Keepalive pings**: a connection from which nothing has been read for
//!   [`Options::keepalive`]'s interval (2 s) is pinged, and closed if the ping is not
//!   answered within its timeout (3 s): a dead or blackholed connection is noticed at
//!   most **5 s** after the last frame read from it (client-go: 30 s + 15 s), and the
//!   next request opens a new one. HTTP/1.1 connections get TCP keepalive probes and
//!   `TCP_USER_TIMEOUT` instead.
//! - **Admission control**: at most [`Options::max_in_flight`] short requests (64) are in
//!   flight at once; the others wait in the process, in [`Priority`] order (a leader's
//!   renewal that has become urgent first, then takes, reads, Events, and renewals
//!   that are not urgent yet), and are dropped unsent when their caller gives up.
//!   Elections count neither a request's timeout nor a write's term from the time it
//!   waited here. Under overload the queue is therefore here, where it can be ordered
//!   and shed, and not at the API server, which would serve requests whose callers have
//!   gone (with 10 000 elections in one process that was a congestion collapse).
//! - **HTTP/1.1 for upgrades**: websocket requests (`exec`, `attach`, `portforward`)
//!   cannot travel over HTTP/2 (kube-rs#1923); they get HTTP/1.1 connections of their
//!   own, as does everything when the server does not speak HTTP/2.
//!
//! Everything else is kube-rs's: credentials and their refresh, TLS roots and client
//! certificates, `tls-server-name`, impersonation headers, the retry of 429/503/504. Not
//! carried over: kube-rs's `read_timeout`/`write_timeout` (the keepalive replaces them),
//! its HTTP tracing spans, and proxies — a [`kube::Config`] with a `proxy_url` is handed
//! to kube-rs's own builder unchanged.
//!
//! ```no_run
//! # async fn doc() -> Result<(), Box<dyn std::error::Error>> {
//! use leaderz::{ElectionConfig, Elector, LeaseLock};
//!
//! let client = leaderz::client::infer().await?;
//! let lock = LeaseLock::new(client, "default", "my-lock");
//! let handle = Elector::new(lock, ElectionConfig::new("pod-a"))?.spawn();
//! # Ok(()) }
//! ```
//!
//! Any `kube::Client` works with leaderz; this one is what the `leaderz` binary uses.
//! To keep kube-rs's own client, build it as before; to turn parts off, use [`Options`]:
//! `Options::default().http2(false).build(config)`.

use std::time::Duration;

use hyper_rustls::{FixedServerNameResolver, HttpsConnectorBuilder};
use hyper_util::client::legacy::{self, connect::HttpConnector};
use hyper_util::rt::{TokioExecutor, TokioTimer};
use kube::client::ConfigExt;
use kube::client::retry::RetryPolicy;
use tower::ServiceBuilder;
use tower::retry::RetryLayer;
use tracing::warn;

mod admission;
mod transport;

pub(crate) use admission::Gate;
pub use admission::Priority;
pub(crate) use admission::{State as TicketState, Ticket};
use transport::{Pool, Transport};

/// Why a client could not be built.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ClientError {
    /// No kubeconfig and no in-cluster service account was found.
    #[error("no Kubernetes client configuration: {0}")]
    Infer(#[from] kube::config::InferConfigError),
    /// The configuration could not be turned into a client (bad certificates or keys,
    /// credentials, headers).
    #[error("invalid Kubernetes client configuration: {0}")]
    Config(#[from] kube::Error),
    /// `tls-server-name` is not a valid DNS name or IP address.
    #[error("invalid tls-server-name `{0}`")]
    ServerName(String),
}

/// How [`Options::build`] builds a client. The defaults are what [`infer`] and
/// [`from_config`] use.
///
/// ```no_run
/// # async fn doc() -> Result<(), Box<dyn std::error::Error>> {
/// use std::time::Duration;
///
/// let config = kube::Config::infer().await?;
/// let client = leaderz::client::Options::default()
///     .keepalive(Some((Duration::from_secs(5), Duration::from_secs(5))))
///     .build(config)?;
/// # Ok(()) }
/// ```
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct Options {
    http2: bool,
    nodelay: bool,
    keepalive: Option<(Duration, Duration)>,
    max_streams_per_connection: usize,
    max_connections: usize,
    max_in_flight: usize,
    tcp_keepalive: Option<Duration>,
    tcp_user_timeout: Option<Duration>,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            http2: true,
            nodelay: true,
            keepalive: Some((Duration::from_secs(2), Duration::from_secs(3))),
            max_streams_per_connection: 100,
            max_connections: 64,
            max_in_flight: 64,
            tcp_keepalive: Some(Duration::from_secs(15)),
            tcp_user_timeout: Some(Duration::from_secs(30)),
        }
    }
}

impl Options {
    /// The defaults, with keepalive pings paced for `election`: a dead connection —
    /// which with HTTP/2 carries the watch and every request alike — is noticed within
    /// `min(2 s, renew interval) + min(3 s, renew deadline / 2)`, so that a follower's
    /// check of a silent watch (two renewal intervals + 1 s) runs on a fresh connection.
    /// With client-go's timings (2 s / 10 s) that is the default 2 s + 3 s.
    pub fn for_election(election: &crate::ElectionConfig) -> Self {
        let interval = election.renew_every().min(Duration::from_secs(2));
        let timeout = (election.renew_deadline / 2).min(Duration::from_secs(3));
        Self::default().keepalive(Some((interval, timeout)))
    }

    /// Speak HTTP/2 where the server offers it (default `true`). `false`: HTTP/1.1 with a
    /// connection per concurrent request, as kube-rs's own client.
    #[must_use]
    pub fn http2(mut self, enabled: bool) -> Self {
        self.http2 = enabled;
        self
    }

    /// Set `TCP_NODELAY` on every connection (default `true`), so that a request is not
    /// held back waiting for the ACK of the previous segment.
    #[must_use]
    pub fn nodelay(mut self, enabled: bool) -> Self {
        self.nodelay = enabled;
        self
    }

    /// HTTP/2 keepalive: `(interval, timeout)` — ping a connection nothing has been read
    /// from for `interval`, close it if the ping is not answered within `timeout`. A dead
    /// connection is noticed at most `interval + timeout` after the last frame read from
    /// it. Default 2 s and 3 s; `None` turns pings off.
    #[must_use]
    pub fn keepalive(mut self, keepalive: Option<(Duration, Duration)>) -> Self {
        self.keepalive = keepalive;
        self
    }

    /// At most this many concurrent streams per HTTP/2 connection (default 100, as
    /// kube-apiserver's `--http2-max-streams-per-connection`); the server's own limit
    /// applies too once the connection is open. A tenth is kept for short requests.
    #[must_use]
    pub fn max_streams_per_connection(mut self, streams: usize) -> Self {
        self.max_streams_per_connection = streams;
        self
    }

    /// At most this many HTTP/2 connections (default 64). Only long-running requests
    /// (watches) open more than one; one beyond what they all can carry fails at once.
    #[must_use]
    pub fn max_connections(mut self, connections: usize) -> Self {
        self.max_connections = connections;
        self
    }

    /// At most this many short requests (everything but watches and upgrades) in flight
    /// at once (default 64); the others wait in the process, a leader's urgent renewal
    /// first (see [`Priority`]; a quarter more places, at least one, are kept for urgent
    /// renewals), and are dropped unsent when their caller gives up. Time
    /// spent waiting does not count against an election's request timeout, and a
    /// write's term is counted from when it left. Under overload this keeps the queue
    /// here instead of at the API server, where requests whose callers have gone would
    /// still be served.
    #[must_use]
    pub fn max_in_flight(mut self, requests: usize) -> Self {
        self.max_in_flight = requests;
        self
    }

    /// TCP keepalive: probe a connection idle for this long (default 15 s; then every
    /// 5 s, 3 probes). What notices a dead HTTP/1.1 connection that is idle.
    #[must_use]
    pub fn tcp_keepalive(mut self, idle: Option<Duration>) -> Self {
        self.tcp_keepalive = idle;
        self
    }

    /// `TCP_USER_TIMEOUT` (Linux): close a connection whose sent data stays unacknowledged
    /// this long (default 30 s).
    #[must_use]
    pub fn tcp_user_timeout(mut self, timeout: Option<Duration>) -> Self {
        self.tcp_user_timeout = timeout;
        self
    }

    /// Builds a client for `config`. Needs a tokio runtime when requests are sent.
    pub fn build(&self, config: kube::Config) -> Result<kube::Client, ClientError> {
        if config.proxy_url.is_some() {
            warn!(
                "a proxy is configured: using kube-rs's own HTTP/1.1 client (no TCP_NODELAY, no HTTP/2)"
            );
            return Ok(kube::Client::try_from(config)?);
        }
        let tls = config.rustls_client_config()?;
        let tcp = self.tcp(&config);
        let server_name: Option<rustls::pki_types::ServerName<'static>> =
            match &config.tls_server_name {
                Some(name) => Some(
                    name.clone()
                        .try_into()
                        .map_err(|_| ClientError::ServerName(name.clone()))?,
                ),
                None => None,
            };
        let https = || {
            let builder = HttpsConnectorBuilder::new()
                .with_tls_config(tls.clone())
                .https_or_http();
            match &server_name {
                Some(name) => {
                    builder.with_server_name_resolver(FixedServerNameResolver::new(name.clone()))
                }
                None => builder,
            }
        };

        let http1 = legacy::Client::builder(TokioExecutor::new())
            .timer(TokioTimer::new())
            .pool_timer(TokioTimer::new())
            .build(https().enable_http1().wrap_connector(tcp.clone()));
        let http2 = self.http2.then(|| {
            let mut h2 = hyper::client::conn::http2::Builder::new(TokioExecutor::new());
            h2.timer(TokioTimer::new());
            // h2 sends GOAWAY and drops the whole connection after 1024 streams it reset
            // itself (a guard against a hostile peer making it reset streams): answers
            // still arriving for requests we gave up on count, so an overloaded API
            // server answering thousands of elections' timed-out requests late killed
            // the connection all of them shared (seen with 10 000 elections in one
            // process). The peer here is the API server: no limit.
            h2.max_local_error_reset_streams(None);
            if let Some((interval, timeout)) = self.keepalive {
                h2.keep_alive_interval(interval)
                    .keep_alive_timeout(timeout)
                    .keep_alive_while_idle(true);
            }
            Pool::new(
                https().enable_all_versions().wrap_connector(tcp),
                h2,
                config.connect_timeout,
                self.max_streams_per_connection,
                self.max_connections,
            )
        });
        let service = ServiceBuilder::new()
            .layer(config.base_uri_layer())
            .option_layer(
                config
                    .default_retry
                    .then(|| RetryLayer::new(RetryPolicy::server_retry())),
            )
            .option_layer(config.auth_layer()?)
            .layer(config.extra_headers_layer()?)
            .service(Transport::new(http1, http2, Gate::new(self.max_in_flight)));
        Ok(kube::Client::new(service, config.default_namespace))
    }

    fn tcp(&self, config: &kube::Config) -> HttpConnector {
        let mut tcp = HttpConnector::new();
        tcp.enforce_http(false);
        tcp.set_nodelay(self.nodelay);
        tcp.set_connect_timeout(config.connect_timeout);
        tcp.set_keepalive(self.tcp_keepalive);
        if self.tcp_keepalive.is_some() {
            tcp.set_keepalive_interval(Some(Duration::from_secs(5)));
            tcp.set_keepalive_retries(Some(3));
        }
        #[cfg(any(target_os = "linux", target_os = "android", target_os = "fuchsia"))]
        tcp.set_tcp_user_timeout(self.tcp_user_timeout);
        tcp
    }
}

/// The request was deferred by the client's admission control (it is sent again once
/// it has a place; see [`admission`]): not a failure to report.
pub(crate) fn is_deferred(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Service(e) if e.is::<admission::Deferred>())
}

/// A client for `config` with the default [`Options`].
///
/// ```no_run
/// # async fn doc() -> Result<(), Box<dyn std::error::Error>> {
/// let config = kube::Config::infer().await?;
/// let client = leaderz::client::from_config(config)?;
/// # Ok(()) }
/// ```
pub fn from_config(config: kube::Config) -> Result<kube::Client, ClientError> {
    Options::default().build(config)
}

/// A client from the environment, as `kube::Client::try_default` finds it (`$KUBECONFIG`,
/// `~/.kube/config`, else the pod's service account), with the default [`Options`].
///
/// ```no_run
/// # async fn doc() -> Result<(), Box<dyn std::error::Error>> {
/// let client = leaderz::client::infer().await?;
/// # Ok(()) }
/// ```
pub async fn infer() -> Result<kube::Client, ClientError> {
    from_config(kube::Config::infer().await?)
}
