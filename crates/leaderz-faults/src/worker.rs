//! The worker `leaderz run` supervises in the fault suite (`leaderz-faults-worker`): it
//! writes to the fenced ledger every few milliseconds with `LEADERZ_FENCING_TOKEN` and
//! `LEADERZ_IDENTITY`, logs (wall clock) when it started and when it received SIGTERM,
//! and exits on SIGTERM.
//!
//! It deliberately does nothing else: it does not watch its parent, so a `leaderz` that
//! dies without stopping it shows up as writes after the death.

use std::path::{Path, PathBuf};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt as _, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde::{Deserialize, Serialize};

use crate::ledger::WriteRequest;
use crate::now_ns;

/// How long the ledger may be unreachable before the worker gives up and exits.
const LEDGER_GONE: Duration = Duration::from_secs(10);

/// One line of a worker's log (JSON lines, appended to a file shared by a trial's workers).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkerEvent {
    /// `started`, `sigterm`, `ledger_unreachable`, or `ledger_gone` (it exits).
    pub event: String,
    /// When (Unix ns, wall clock).
    pub ts_ns: u64,
    /// `LEADERZ_IDENTITY`.
    pub identity: String,
    /// `LEADERZ_FENCING_TOKEN`.
    pub token: i64,
    /// The worker's pid.
    pub pid: u32,
    /// The worker's process group (under `leaderz run`, the group of its supervisor,
    /// which leads it); absent in client-go candidates' events.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pgid: Option<u32>,
    /// Writes sent so far.
    pub sent: u64,
}

impl WorkerEvent {
    /// The process group to signal to reach this worker and everything with it.
    pub fn group(&self) -> u32 {
        self.pgid.unwrap_or(self.pid)
    }

    /// Whether this event ends the worker's work (`sigterm`, client-go's `stopped`,
    /// `ledger_gone`).
    pub fn is_stop(&self) -> bool {
        matches!(self.event.as_str(), "sigterm" | "stopped" | "ledger_gone")
    }
}

/// What the worker needs to run.
#[derive(Clone, Debug)]
pub struct WorkerConfig {
    /// The ledger's `http://127.0.0.1:<port>`.
    pub ledger: String,
    /// The fenced resource to write to.
    pub resource: String,
    /// The JSON-lines log to append to.
    pub log: PathBuf,
    /// Time between writes.
    pub interval: Duration,
    /// The identity (`LEADERZ_IDENTITY`).
    pub identity: String,
    /// The fencing token (`LEADERZ_FENCING_TOKEN`).
    pub token: i64,
}

/// Appends one event line to `log` (one `write` on an `O_APPEND` file: lines of
/// concurrent workers do not interleave). Synchronous, so that the line is written when
/// it returns, even if the process exits right after.
pub fn log_event(log: &Path, event: &WorkerEvent) -> std::io::Result<()> {
    log_event_line(log, event)
}

/// Appends any event as one JSON line to `log` (see [`log_event`]).
pub fn log_event_line<T: Serialize>(log: &Path, event: &T) -> std::io::Result<()> {
    use std::io::Write as _;
    let mut line = serde_json::to_vec(event)?;
    line.push(b'\n');
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)?
        .write_all(&line)
}

/// Reads every event of a worker log; a missing file has none.
pub fn read_log(log: &Path) -> Vec<WorkerEvent> {
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

/// Runs the worker until SIGTERM; never returns normally (exits the process).
pub async fn run(config: WorkerConfig) -> anyhow::Result<()> {
    let mut sigterm = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let pid = std::process::id();
    let pgid = u32::try_from(nix::unistd::getpgrp().as_raw()).ok();
    let event = |event: &str, sent: u64| WorkerEvent {
        event: event.to_owned(),
        ts_ns: now_ns(),
        identity: config.identity.clone(),
        token: config.token,
        pid,
        pgid,
        sent,
    };
    log_event(&config.log, &event("started", 0))?;

    let client: Client<HttpConnector, Full<Bytes>> =
        Client::builder(TokioExecutor::new()).build_http();
    let url: hyper::Uri = format!("{}/write", config.ledger).parse()?;
    let mut seq = 0u64;
    let mut unreachable_logged = false;
    // The ledger lives as long as its trial: a worker that cannot reach it for this long
    // was left behind by a harness that died, and must not run on forever.
    let mut unreachable_since: Option<tokio::time::Instant> = None;
    let mut tick = tokio::time::interval(config.interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            biased;
            _ = sigterm.recv() => {
                log_event(&config.log, &event("sigterm", seq))?;
                std::process::exit(0);
            }
            _ = tick.tick() => {}
        }
        let request = WriteRequest {
            resource: config.resource.clone(),
            identity: config.identity.clone(),
            token: config.token,
            pid,
            seq,
            sent_ns: now_ns(),
        };
        seq += 1;
        let body = Full::new(Bytes::from(serde_json::to_vec(&request)?));
        let http = hyper::Request::post(url.clone())
            .header("content-type", "application/json")
            .body(body)?;
        let sent = async {
            let response = client.request(http).await?;
            response.into_body().collect().await?;
            anyhow::Ok(())
        };
        tokio::select! {
            biased;
            _ = sigterm.recv() => {
                log_event(&config.log, &event("sigterm", seq))?;
                std::process::exit(0);
            }
            result = tokio::time::timeout(Duration::from_secs(1), sent) => {
                if matches!(result, Ok(Ok(()))) {
                    unreachable_since = None;
                    continue;
                }
                if !unreachable_logged {
                    unreachable_logged = true;
                    log_event(&config.log, &event("ledger_unreachable", seq))?;
                }
                let since = *unreachable_since.get_or_insert_with(tokio::time::Instant::now);
                if since.elapsed() >= LEDGER_GONE {
                    log_event(&config.log, &event("ledger_gone", seq))?;
                    std::process::exit(3);
                }
            }
        }
    }
}
