//! The example app from the original write-up: several replicas, one of them does
//! the work ("working...") while it leads; on SIGTERM it stops the work and releases
//! the lease so another replica takes over at once. With `--sidecar URL` it does not
//! campaign itself but asks a `leaderz serve` sidecar who leads (`kube/sidecar/`).

mod sidecar;

use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use leaderz::{ElectionConfig, Elector, LeaseLock};
use tokio::signal::unix::{SignalKind, signal};
use tracing::info;

/// A replica that works only while it holds the lease.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    /// This replica's identity (the pod name).
    #[arg(long, env = "POD_NAME")]
    node_id: String,
    /// The Lease to contend for.
    #[arg(long, env = "LEASE_NAME", default_value = "my-lock")]
    lease_name: String,
    /// The Lease's namespace.
    #[arg(long, env = "POD_NAMESPACE", default_value = "default")]
    namespace: String,
    /// How long followers wait before taking over an unrenewed lease.
    #[arg(long, env = "LEASE_DURATION", default_value = "15s", value_parser = humantime::parse_duration)]
    lease_duration: Duration,
    /// How long the leader keeps leading without a successful renewal.
    #[arg(long, env = "RENEW_DEADLINE", default_value = "10s", value_parser = humantime::parse_duration)]
    renew_deadline: Duration,
    /// How often the leader renews.
    #[arg(long, env = "RETRY_PERIOD", default_value = "2s", value_parser = humantime::parse_duration)]
    retry_period: Duration,
    /// Serve `/healthz` and `/readyz` for the kubelet's probes on this address.
    #[arg(long, env = "HTTP_ADDR")]
    http: Option<std::net::SocketAddr>,
    /// Do not campaign: ask the `leaderz serve` sidecar at this URL who leads (e.g.
    /// `http://127.0.0.1:4040/`) and work while it names this replica.
    #[arg(long, env = "LEADERZ_SIDECAR")]
    sidecar: Option<hyper::Uri>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
    let args = Args::parse();
    if let Some(url) = args.sidecar {
        return sidecar::run(url, args.node_id).await;
    }
    let client = leaderz::client::infer()
        .await
        .context("no Kubernetes client configuration")?;
    let config = ElectionConfig::new(args.node_id.clone())
        .lease_duration(args.lease_duration)
        .renew_deadline(args.renew_deadline)
        .retry_period(args.retry_period);
    let lock = LeaseLock::new(client, &args.namespace, &args.lease_name);
    let mut handle = Elector::new(lock, config)?.spawn();
    if let Some(addr) = args.http {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("binding {addr}"))?;
        tokio::spawn(serve_health(listener, handle.status(), args.lease_duration));
    }

    let mut leader = handle.leader();
    let stop = handle.shutdown_token();
    let report = async {
        loop {
            let who = leader.borrow_and_update().clone();
            match who {
                Some(who) if who == args.node_id => info!("I am the leader"),
                Some(who) => info!(%who, "new leader"),
                None => info!("no leader"),
            }
            if leader.changed().await.is_err() {
                return;
            }
        }
    };
    let mut sigterm = signal(SignalKind::terminate())?;
    let signals = async {
        tokio::select! {
            _ = sigterm.recv() => info!("SIGTERM: stopping"),
            _ = tokio::signal::ctrl_c() => info!("interrupted: stopping"),
        }
        // Ends the term (the work below is dropped), releases, and ends the elector.
        stop.cancel();
        std::future::pending::<()>().await
    };
    let work = handle.run_while_leading(|term| async move {
        info!(token = term.fencing_token(), "started leading");
        // Logs when this future is dropped: the term ended and the work stops here,
        // before the lease is released.
        let _stopped = LogOnDrop("stopped working");
        loop {
            info!("working...");
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    });
    let result = tokio::select! {
        r = work => r,
        () = report => Ok(()),
        () = signals => Ok(()),
    };
    result?;
    info!("stopped");
    Ok(())
}

/// Logs its message when dropped.
struct LogOnDrop(&'static str);

impl Drop for LogOnDrop {
    fn drop(&mut self) {
        info!("{}", self.0);
    }
}

/// `/healthz`: client-go's HealthzAdaptor meaning (unhealthy only if this replica
/// believes it leads but has not renewed for lease_duration + 20 s: the elector is
/// stuck). `/readyz`: every replica is ready once it has seen the lease, so rollouts
/// are not blocked on the leader (kubernetes#97393).
async fn serve_health(
    listener: tokio::net::TcpListener,
    status: tokio::sync::watch::Receiver<leaderz::Status>,
    lease_duration: Duration,
) {
    use axum::http::StatusCode;
    use axum::routing::get;
    let health = status.clone();
    let app = axum::Router::new()
        .route(
            "/healthz",
            get(move || {
                let checked = health
                    .borrow()
                    .check_health(lease_duration, Duration::from_secs(20));
                async move {
                    match checked {
                        Ok(()) => (StatusCode::OK, "ok".to_owned()),
                        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
                    }
                }
            }),
        )
        .route(
            "/readyz",
            get(move || {
                let seen = status.borrow().observed.is_some();
                async move {
                    if seen {
                        (StatusCode::OK, "ok")
                    } else {
                        (StatusCode::SERVICE_UNAVAILABLE, "lease not seen yet")
                    }
                }
            }),
        );
    if let Err(e) = axum::serve(listener, app).await {
        tracing::error!(error = %e, "health server failed");
    }
}
