//! Flags and JSON event lines shared by the peer candidates (each includes this file
//! with `#[path = "../../common.rs"] mod common;`). The flags and the lines are the
//! same as `interop/`'s leaderz and client-go candidates:
//! `{"ts_ns":..,"id":"x","event":"started_leading"|"stopped_leading"|"new_leader",..}`.

#![allow(dead_code)] // not every peer can report every event

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use clap::Parser;

/// Flags named as the interop candidates'.
#[derive(Debug, Parser)]
pub struct Args {
    /// This candidate's identity (the Lease's holderIdentity when it leads).
    #[arg(long)]
    pub id: String,
    /// The Lease's namespace.
    #[arg(long, default_value = "default")]
    pub namespace: String,
    /// The Lease's name.
    #[arg(long, default_value = "my-lock")]
    pub lease: String,
    /// client-go's LeaseDuration.
    #[arg(long, default_value = "15s", value_parser = humantime::parse_duration)]
    pub lease_duration: Duration,
    /// client-go's RenewDeadline.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    pub renew_deadline: Duration,
    /// client-go's RetryPeriod.
    #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
    pub retry_period: Duration,
    /// Release the Lease on SIGTERM where the crate can.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    pub release_on_cancel: bool,
}

/// Prints one event line on stdout (line-buffered, so it leaves at once).
pub fn log(id: &str, event: &str, leader: Option<&str>) {
    let ts = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    let mut line = serde_json::json!({ "ts_ns": ts, "id": id, "event": event });
    if let Some(leader) = leader {
        line["leader"] = leader.into();
    }
    println!("{line}");
}

/// Turns state observations into event lines, one per change.
pub struct Events {
    id: String,
    leading: bool,
    leader: Option<String>,
}

impl Events {
    pub fn new(id: &str) -> Self {
        Self {
            id: id.to_owned(),
            leading: false,
            leader: None,
        }
    }

    pub fn leading(&self) -> bool {
        self.leading
    }

    /// Reports `started_leading` / `stopped_leading` when `leading` changed.
    pub fn set_leading(&mut self, leading: bool) {
        if leading != self.leading {
            self.leading = leading;
            let event = if leading {
                "started_leading"
            } else {
                "stopped_leading"
            };
            log(&self.id, event, None);
        }
    }

    /// Reports `new_leader` when the observed holder changed (`""` for none).
    pub fn set_leader(&mut self, leader: Option<&str>) {
        let leader = leader.filter(|l| !l.is_empty());
        if leader != self.leader.as_deref() {
            self.leader = leader.map(str::to_owned);
            log(&self.id, "new_leader", Some(leader.unwrap_or("")));
        }
    }
}

/// Completes on the first SIGTERM or SIGINT.
pub async fn terminated() {
    use tokio::signal::unix::{SignalKind, signal};
    match (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) {
        (Ok(mut term), Ok(mut int)) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
        }
        _ => std::future::pending().await,
    }
}

/// Whole seconds, rounded up, at least 1: what a Lease's `leaseDurationSeconds` holds.
pub fn whole_secs(d: Duration) -> u64 {
    d.as_secs_f64().ceil().max(1.0) as u64
}
