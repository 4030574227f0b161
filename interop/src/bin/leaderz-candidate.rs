//! A leaderz candidate with the same flags and JSON event lines as the client-go
//! candidate (`interop/clientgo-candidate`):
//! `{"ts_ns":..,"id":"lz-0","event":"started_leading","token":3}`,
//! `{"ts_ns":..,"id":"lz-0","event":"stopped_leading"}`,
//! `{"ts_ns":..,"id":"lz-0","event":"new_leader","leader":"cg-1"}`.
//! On SIGTERM the work stops first, then the lease is released.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use clap::Parser;
use leaderz::{ElectionConfig, Elector, LeaseLock};
use tokio::signal::unix::{SignalKind, signal};

/// Flags named as the client-go candidate's.
#[derive(Debug, Parser)]
struct Args {
    #[arg(long)]
    id: String,
    #[arg(long, default_value = "default")]
    namespace: String,
    #[arg(long, default_value = "my-lock")]
    lease: String,
    #[arg(long, default_value = "15s", value_parser = humantime::parse_duration)]
    lease_duration: Duration,
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    renew_deadline: Duration,
    #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
    retry_period: Duration,
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    release_on_cancel: bool,
    /// `leaderz`: `leaderz::client` (HTTP/2, TCP_NODELAY); `kube`: kube-rs's default
    /// client (HTTP/1.1), to compare.
    #[arg(long, default_value = "leaderz")]
    client: String,
    /// Coordinated leader election: publish a LeaseCandidate, let the controller elect.
    #[arg(long)]
    coordinated: bool,
    #[arg(long, default_value = "1.34.0")]
    binary_version: String,
    /// [default: the binary version]
    #[arg(long)]
    emulation_version: Option<String>,
}

fn log(id: &str, event: &str, extra: Option<(&str, serde_json::Value)>) {
    let ts = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    let mut line = serde_json::json!({ "ts_ns": ts as u64, "id": id, "event": event });
    if let Some((k, v)) = extra {
        line[k] = v;
    }
    println!("{line}");
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let client = match args.client.as_str() {
        "kube" => kube::Client::try_default().await?,
        _ => leaderz::client::infer().await?,
    };
    let config = ElectionConfig::new(args.id.clone())
        .lease_duration(args.lease_duration)
        .renew_deadline(args.renew_deadline)
        .retry_period(args.retry_period)
        .release_on_cancel(args.release_on_cancel);
    let config = if args.coordinated {
        let emulation = args
            .emulation_version
            .clone()
            .unwrap_or_else(|| args.binary_version.clone());
        config.coordinated(
            leaderz::config::Coordinated::new(args.binary_version.clone())
                .emulation_version(emulation),
        )
    } else {
        config
    };
    let mut handle =
        Elector::new(LeaseLock::new(client, &args.namespace, &args.lease), config)?.spawn();
    let id = args.id.as_str();

    let mut leader = handle.leader();
    let report = async {
        loop {
            let who = leader.borrow_and_update().clone();
            log(
                id,
                "new_leader",
                Some(("leader", who.unwrap_or_default().into())),
            );
            if leader.changed().await.is_err() {
                std::future::pending::<()>().await;
            }
        }
    };
    let work = async {
        while let Ok(term) = handle.acquired().await {
            log(
                id,
                "started_leading",
                Some(("token", term.fencing_token().into())),
            );
            term.cancelled().await;
            log(id, "stopped_leading", None);
        }
    };
    let mut sigterm = signal(SignalKind::terminate())?;
    let was_leading = tokio::select! {
        _ = sigterm.recv() => handle.is_leader(),
        () = report => false,
        () = work => {
            // The elector stopped by itself: say why.
            if let Err(e) = handle.join().await {
                eprintln!("error: {e}");
                std::process::exit(1);
            }
            false
        }
    };
    // The work future is gone; log its end before the release goes out.
    if was_leading {
        log(id, "stopped_leading", None);
    }
    handle.shutdown().await?;
    Ok(())
}
