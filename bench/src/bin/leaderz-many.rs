//! N leaderz electors in one process, each the only candidate on its own Lease
//! (`<prefix>-0` .. `<prefix>-<N-1>`), sharing one `kube::Client` and (by default) one
//! watch on the namespace's Leases: the benchmark's "many leases in one process" case. Same output as `bench/clientgo-many`:
//! `{"ts_ns":..,"event":"all_leading","count":1000}` once every elector leads, and
//! `{"ts_ns":..,"event":"lost","lease":".."}` whenever one stops leading. SIGTERM
//! shuts every elector down (each releases its lease) and exits.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use clap::Parser;
use leaderz::{ElectionConfig, Elector, LeaseLock};
use tokio::signal::unix::{SignalKind, signal};

/// Flags named as `bench/clientgo-many`'s.
#[derive(Debug, Parser)]
struct Args {
    /// Number of leases, one elector each.
    #[arg(long, default_value_t = 1000)]
    count: usize,
    /// Identity prefix.
    #[arg(long, default_value = "many")]
    id: String,
    /// The Leases' namespace.
    #[arg(long, default_value = "default")]
    namespace: String,
    /// Lease name prefix.
    #[arg(long, default_value = "many")]
    lease_prefix: String,
    #[arg(long, default_value = "15s", value_parser = humantime::parse_duration)]
    lease_duration: Duration,
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    renew_deadline: Duration,
    #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
    retry_period: Duration,
    /// `leaderz`: `leaderz::client` (HTTP/2, TCP_NODELAY); `kube`: kube-rs's default
    /// client (HTTP/1.1), to compare.
    #[arg(long, default_value = "leaderz")]
    client: String,
    /// Renew every this long instead of every retry period (leaderz's lighter leader).
    #[arg(long, value_parser = humantime::parse_duration)]
    renew_interval: Option<Duration>,
    /// `shared`: one watch on the namespace's Leases for every elector
    /// (`leaderz::lock::SharedLeaseWatch`); `own`: a single-object watch per elector.
    #[arg(long, default_value = "shared")]
    watch: String,
    /// Start this many electors per second instead of all at once (0: all at once).
    #[arg(long, default_value_t = 0)]
    start_rate: u32,
    /// The shared watch's client: `same` (the electors' client and connection), `own`
    /// (an HTTP/2 connection of its own), `http1` (an HTTP/1.1 connection of its own).
    #[arg(long, default_value = "same")]
    watch_client: String,
}

fn log(event: &str, extra: Option<(&str, serde_json::Value)>) {
    let ts = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    let mut line = serde_json::json!({ "ts_ns": ts, "event": event });
    if let Some((k, v)) = extra {
        line[k] = v;
    }
    println!("{line}");
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    // The electors' warnings (why a term was lost) on stderr; RUST_LOG to change.
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let client = match args.client.as_str() {
        "kube" => kube::Client::try_default().await?,
        _ => leaderz::client::infer().await?,
    };
    let watch_client = match args.watch_client.as_str() {
        "own" => leaderz::client::infer().await?,
        "http1" => leaderz::client::Options::default()
            .http2(false)
            .build(kube::Config::infer().await?)?,
        _ => client.clone(),
    };
    let shared = (args.watch == "shared")
        .then(|| leaderz::lock::SharedLeaseWatch::new(watch_client, &args.namespace));
    let leading = Arc::new(AtomicUsize::new(0));
    // How many lead, every 5 s: the shape of the ramp, and losses as they happen.
    tokio::spawn({
        let leading = leading.clone();
        async move {
            let mut every = tokio::time::interval(Duration::from_secs(5));
            loop {
                every.tick().await;
                let n = leading.load(Ordering::SeqCst);
                log("progress", Some(("leading", n.into())));
            }
        }
    });
    if let Some(shared) = &shared {
        // Elections started on a listed watch create absent Leases without reading
        // first (a failed list is no reason not to start: they then read).
        if let Err(e) = shared.ready().await {
            eprintln!("the shared Lease watch did not list: {e}");
        }
    }
    let mut handles = Vec::with_capacity(args.count);
    let pace = (args.start_rate > 0).then(|| Duration::from_secs(1) / args.start_rate);
    let mut ticks = pace.map(tokio::time::interval);
    for i in 0..args.count {
        if let Some(ticks) = &mut ticks {
            ticks.tick().await;
        }
        let lease = format!("{}-{i}", args.lease_prefix);
        let mut config = ElectionConfig::new(format!("{}-{i}", args.id))
            .lease_duration(args.lease_duration)
            .renew_deadline(args.renew_deadline)
            .retry_period(args.retry_period);
        if let Some(every) = args.renew_interval {
            config = config.renew_interval(every);
        }
        let lock = match &shared {
            Some(shared) => shared.lock(&lease),
            None => LeaseLock::new(client.clone(), &args.namespace, &lease),
        };
        let handle = Elector::new(lock, config)?.spawn();
        let (leading, count) = (leading.clone(), args.count);
        let mut status = handle.status();
        tokio::spawn(async move {
            let mut was_leading = false;
            loop {
                let now_leading = status.borrow_and_update().term.is_some();
                if now_leading && !was_leading {
                    if leading.fetch_add(1, Ordering::SeqCst) + 1 == count {
                        log("all_leading", Some(("count", count.into())));
                    }
                } else if !now_leading && was_leading {
                    leading.fetch_sub(1, Ordering::SeqCst);
                    log("lost", Some(("lease", lease.clone().into())));
                }
                was_leading = now_leading;
                if status.changed().await.is_err() {
                    break;
                }
            }
        });
        handles.push(handle);
    }
    signal(SignalKind::terminate())?.recv().await;
    let shutdowns = handles.into_iter().map(|h| h.shutdown());
    for result in futures::future::join_all(shutdowns).await {
        result?;
    }
    Ok(())
}
