//! The command `leaderz run --shards` supervises in the shard tests
//! (`leaderz-faults-shard-worker`): it reads `LEADERZ_SHARDS_FILE` at start and on every
//! SIGHUP, writes to the fenced ledger for each shard it owns (resource
//! `<prefix>-<shard>`, that shard's fencing token) every interval, logs when it starts
//! and stops working on a shard, and acknowledges each generation in
//! `LEADERZ_SHARDS_ACK` once it stopped working on the shards that are gone.

use std::collections::BTreeMap;
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
use crate::worker::log_event_line;

/// One line of a shard worker's log.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShardEvent {
    /// `start` (working on `shard` with `token`), `stop`, `ack` (of `generation`), or
    /// `sigterm`.
    pub event: String,
    /// When (Unix ns, wall clock).
    pub ts_ns: u64,
    /// `LEADERZ_IDENTITY`.
    pub identity: String,
    /// The shard, for `start` and `stop`.
    #[serde(default)]
    pub shard: u32,
    /// Its fencing token, for `start` and `stop`.
    #[serde(default)]
    pub token: i64,
    /// The generation acknowledged, for `ack`.
    #[serde(default)]
    pub generation: u64,
}

/// What the shard worker needs to run.
#[derive(Clone, Debug)]
pub struct ShardWorkerConfig {
    /// The ledger's `http://127.0.0.1:<port>`.
    pub ledger: String,
    /// Resources are `<prefix>-<shard>`.
    pub prefix: String,
    /// The JSON-lines log to append to.
    pub log: PathBuf,
    /// Time between rounds of writes.
    pub interval: Duration,
    /// How long work takes to stop: after a SIGHUP that takes a shard away, the shards
    /// owned so far are written for this long before the new file is applied and
    /// acknowledged.
    pub stop_delay: Duration,
    /// `LEADERZ_IDENTITY`.
    pub identity: String,
    /// `LEADERZ_SHARDS_FILE`.
    pub shards_file: PathBuf,
    /// `LEADERZ_SHARDS_ACK`.
    pub ack_file: PathBuf,
}

#[derive(Deserialize)]
struct ShardFile {
    generation: u64,
    shards: BTreeMap<String, i64>,
}

fn read_shards(path: &Path) -> anyhow::Result<(u64, BTreeMap<u32, i64>)> {
    let file: ShardFile = serde_json::from_slice(&std::fs::read(path)?)?;
    let shards = file
        .shards
        .into_iter()
        .map(|(k, v)| Ok((k.parse()?, v)))
        .collect::<anyhow::Result<_>>()?;
    Ok((file.generation, shards))
}

async fn until(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// Reads every event of a shard worker log; a missing file has none.
pub fn read_log(log: &Path) -> Vec<ShardEvent> {
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

/// Runs the shard worker until SIGTERM; never returns normally (exits the process).
pub async fn run(config: ShardWorkerConfig) -> anyhow::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut sigterm = signal(SignalKind::terminate())?;
    let mut sighup = signal(SignalKind::hangup())?;
    let log = |event: &str, shard: u32, token: i64, generation: u64| {
        let e = ShardEvent {
            event: event.to_owned(),
            ts_ns: now_ns(),
            identity: config.identity.clone(),
            shard,
            token,
            generation,
        };
        log_event_line(&config.log, &e)
    };
    let client: Client<HttpConnector, Full<Bytes>> =
        Client::builder(TokioExecutor::new()).build_http();
    let url: hyper::Uri = format!("{}/write", config.ledger).parse()?;
    let mut owned: BTreeMap<u32, i64> = BTreeMap::new();
    let mut seq = 0u64;
    let pid = std::process::id();
    let apply = |owned: &mut BTreeMap<u32, i64>| -> anyhow::Result<()> {
        let (generation, now) = read_shards(&config.shards_file)?;
        for (shard, token) in owned.iter() {
            if now.get(shard) != Some(token) {
                log("stop", *shard, *token, generation)?;
            }
        }
        for (shard, token) in &now {
            if owned.get(shard) != Some(token) {
                log("start", *shard, *token, generation)?;
            }
        }
        *owned = now;
        let mut tmp = config.ack_file.as_os_str().to_owned();
        tmp.push(".tmp");
        std::fs::write(&tmp, generation.to_string())?;
        std::fs::rename(&tmp, &config.ack_file)?;
        log("ack", 0, 0, generation)?;
        Ok(())
    };
    apply(&mut owned)?;
    let mut apply_at: Option<tokio::time::Instant> = None;
    let mut tick = tokio::time::interval(config.interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            biased;
            _ = sigterm.recv() => {
                for (shard, token) in &owned {
                    log("stop", *shard, *token, 0)?;
                }
                log("sigterm", 0, 0, 0)?;
                std::process::exit(0);
            }
            _ = sighup.recv() => {
                // Only stopping takes time: a change that loses no shard applies at once.
                let (_, next) = read_shards(&config.shards_file)?;
                let loses = owned.iter().any(|(s, t)| next.get(s) != Some(t));
                if loses || apply_at.is_some() {
                    apply_at.get_or_insert(tokio::time::Instant::now() + config.stop_delay);
                } else {
                    apply(&mut owned)?;
                }
            }
            () = until(apply_at) => {
                apply_at = None;
                apply(&mut owned)?;
            }
            _ = tick.tick() => {
                // One round: every owned shard once; the round ends before a SIGHUP is
                // handled, so no write for a lost shard is sent after its `stop`.
                let writes = owned.iter().map(|(shard, token)| {
                    seq += 1;
                    let request = WriteRequest {
                        resource: format!("{}-{shard}", config.prefix),
                        identity: config.identity.clone(),
                        token: *token,
                        pid,
                        seq,
                        sent_ns: now_ns(),
                    };
                    let client = client.clone();
                    let url = url.clone();
                    async move {
                        let body = Full::new(Bytes::from(serde_json::to_vec(&request)?));
                        let http = hyper::Request::post(url)
                            .header("content-type", "application/json")
                            .body(body)?;
                        let response = client.request(http).await?;
                        response.into_body().collect().await?;
                        anyhow::Ok(())
                    }
                });
                let round = futures::future::join_all(writes);
                let _ = tokio::time::timeout(Duration::from_secs(2), round).await;
            }
        }
    }
}
