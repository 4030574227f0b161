//! `leaderz run --shards S`: run a command as a member of a shard set and tell it which
//! shards it owns.
//!
//! The command starts at once and runs as long as leaderz does. Its shards, each with
//! its fencing token, are in the JSON file `LEADERZ_SHARDS_FILE`:
//! `{"set":"jobs","identity":"pod-a","generation":4,"shards":{"3":7,"12":2}}`, rewritten
//! (atomically: a new file renamed over the old) on every change and followed by SIGHUP
//! to the command's process group. The command applies it (starts work on new shards,
//! stops work on the shards that are gone) and then writes the generation to
//! `LEADERZ_SHARDS_ACK`. leaderz holds a lost shard's [`Term`] until then, so the shard
//! is released only after the command stopped working on it; a command that does not
//! acknowledge within `--grace`, or before another member may take a lost shard over
//! (its term's deadline plus the takeover slack), is killed with its process group and
//! leaderz leaves the set with an error.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use leaderz::Term;
use leaderz::shards::{KubeStore, Owned, ShardSet, ShardSetConfig, ShardSetHandle};
use nix::sys::signal::Signal;
use serde::Serialize;
use tokio::sync::watch;
use tokio::time::{Instant, sleep, sleep_until};
use tracing::{info, warn};

use crate::child::{Child, KillLimit, exit_code};
use crate::cli::RunArgs;
use crate::cluster;
use crate::error::CliError;
use crate::exec;
use crate::run::{KILL_SLACK, takeover_slack, while_stopped};
use crate::signals::Signals;

/// How often the acknowledgement file is read while a lost shard waits for it.
const ACK_POLL: Duration = Duration::from_millis(10);

/// What the command finds in `LEADERZ_SHARDS_FILE`.
#[derive(Debug, Serialize, PartialEq, Eq)]
struct ShardFile<'a> {
    set: &'a str,
    identity: &'a str,
    /// Rises with every rewrite; the command acknowledges it.
    generation: u64,
    /// Shard number (as a JSON object key) to fencing token.
    shards: BTreeMap<String, i64>,
}

/// Writes `contents` to `path` atomically (a temporary file renamed over it).
fn write_atomically(path: &Path, contents: &[u8]) -> std::io::Result<()> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    std::fs::write(&tmp, contents)?;
    std::fs::rename(&tmp, path)
}

/// The generation the command acknowledged, if it wrote one.
fn read_ack(path: &Path) -> Option<u64> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

/// The files the command is told about.
struct Files {
    shards: PathBuf,
    ack: PathBuf,
}

impl Files {
    fn new(flag: Option<&Path>, set: &str) -> Self {
        let shards = flag.map(Path::to_owned).unwrap_or_else(|| {
            std::env::temp_dir().join(format!("leaderz-{set}-{}.json", std::process::id()))
        });
        let mut ack = shards.as_os_str().to_owned();
        ack.push(".ack");
        Self {
            shards,
            ack: PathBuf::from(ack),
        }
    }

    fn write(
        &self,
        set: &str,
        identity: &str,
        generation: u64,
        terms: &BTreeMap<u32, Term>,
    ) -> Result<(), CliError> {
        let file = ShardFile {
            set,
            identity,
            generation,
            shards: terms
                .iter()
                .map(|(s, t)| (s.to_string(), t.fencing_token()))
                .collect(),
        };
        let text = serde_json::to_vec(&file).map_err(|e| CliError::Io(e.to_string()))?;
        write_atomically(&self.shards, &text)
            .map_err(|e| CliError::Io(format!("cannot write {}: {e}", self.shards.display())))
    }

    fn remove(&self) {
        let _ = std::fs::remove_file(&self.shards);
        let _ = std::fs::remove_file(&self.ack);
    }
}

/// Lost shards whose terms wait for the command to acknowledge `generation`.
struct Pending {
    generation: u64,
    since: Instant,
    terms: Vec<Term>,
}

/// Runs `leaderz run --shards`; returns the exit code.
pub(crate) async fn run(args: RunArgs, shards: u32) -> Result<u8, CliError> {
    if let Some(program) = args.command.first() {
        exec::find(program)?;
    }
    let mut signals = Signals::install()?;
    let e = &args.election;
    let set_name = e.lease.clone();
    let identity = cluster::identity(e.identity.as_deref())?;
    let overdue = args.grace + KILL_SLACK;
    let config = ShardSetConfig::new(
        set_name.clone(),
        shards,
        e.election_config(identity.clone()).shutdown_grace(overdue),
    );
    config.validate()?;
    let kube_config = cluster::load_config().await?;
    let namespace = cluster::namespace(e.namespace.namespace.as_deref(), &kube_config)?;
    let options = leaderz::client::Options::for_election(&config.election);
    let client = cluster::connect_with(kube_config, options).await?;
    let slack = takeover_slack(e.lease_duration, e.renew_deadline);
    let stopped = while_stopped(
        e.renew_deadline,
        e.renew_interval.unwrap_or(e.retry_period),
        slack,
    );

    let files = Files::new(args.shards_file.as_deref(), &set_name);
    let _ = std::fs::remove_file(&files.ack);
    let mut generation = 0u64;
    let mut held: BTreeMap<u32, Term> = BTreeMap::new();
    files.write(&set_name, &identity, generation, &held)?;

    let mut set = ShardSet::new(KubeStore::new(client, &namespace), config)?.spawn();
    let mut owned = set.owned();
    let env = vec![
        ("LEADERZ_IDENTITY", identity.clone()),
        ("LEADERZ_NAMESPACE", namespace.clone()),
        ("LEADERZ_SHARD_SET", set_name.clone()),
        ("LEADERZ_SHARD_COUNT", shards.to_string()),
        ("LEADERZ_SHARDS_FILE", files.shards.display().to_string()),
        ("LEADERZ_SHARDS_ACK", files.ack.display().to_string()),
    ];
    let mut child = match Child::spawn(&args.command, &env, stopped) {
        Ok(child) => child,
        Err(err) => {
            leave(set, &files).await;
            return Err(err);
        }
    };
    info!(pid = child.pid(), set = %set_name, shards, "joined as a shard set member: started the command");

    let mut pending: Vec<Pending> = Vec::new();
    loop {
        let kill_at = kill_at(&pending, args.grace, slack);
        tokio::select! {
            biased;
            signal = signals.recv() => {
                info!(%signal, "forwarding to the command, then leaving the shard set");
                let limit = KillLimit { grace: args.grace, term: first_deadline(&held).map(|t| (t, slack)) };
                let (status, _) = child.stop(signal, limit, &mut signals, 1).await;
                drop((held, pending));
                leave(set, &files).await;
                return Ok(exit_code(status));
            }
            status = child.wait() => {
                child.kill_leftovers();
                let code = exit_code(status);
                info!(code, "the command exited: leaving the shard set");
                drop((held, pending));
                leave(set, &files).await;
                return Ok(code);
            }
            changed = owned.changed() => {
                if changed.is_err() {
                    // The set stopped by itself: a fatal error.
                    let limit = KillLimit { grace: args.grace, term: first_deadline(&held).map(|t| (t, slack)) };
                    child.stop(Signal::SIGTERM, limit, &mut signals, 0).await;
                    drop((held, pending));
                    files.remove();
                    return Err(match set.join().await {
                        Err(e) => CliError::Election(e),
                        Ok(()) => CliError::Io("the shard set stopped unexpectedly".into()),
                    });
                }
                if let Some(lost) = update(&owned, &mut held) {
                    generation += 1;
                    files.write(&set_name, &identity, generation, &held)?;
                    child.signal(Signal::SIGHUP);
                    info!(generation, shards = ?held.keys().collect::<Vec<_>>(), "told the command its shards");
                    if !lost.is_empty() {
                        pending.push(Pending { generation, since: Instant::now(), terms: lost });
                    }
                }
            }
            () = sleep(ACK_POLL), if !pending.is_empty() => {
                if let Some(ack) = read_ack(&files.ack) {
                    pending.retain(|p| p.generation > ack);
                }
            }
            () = sleep_until_some(kill_at) => {
                let generation = pending.first().map_or(generation, |p| p.generation);
                warn!(generation, "the command did not acknowledge a lost shard in time: killing it");
                child.signal(Signal::SIGKILL);
                child.wait().await;
                child.kill_leftovers();
                drop((held, pending));
                leave(set, &files).await;
                return Err(CliError::ShardsNotAcknowledged { generation });
            }
        }
    }
}

/// Brings `held` up to date with the set's owned shards. Returns the terms of the
/// shards that are no longer owned (to hold until the command acknowledged), or `None`
/// if nothing changed.
fn update(owned: &watch::Receiver<Owned>, held: &mut BTreeMap<u32, Term>) -> Option<Vec<Term>> {
    let now: BTreeMap<u32, Term> = owned
        .borrow()
        .iter()
        .filter(|(_, t)| t.is_active())
        .map(|(s, t)| (*s, t.clone()))
        .collect();
    let same = now.len() == held.len()
        && now.iter().all(|(s, t)| {
            held.get(s)
                .is_some_and(|h| h.fencing_token() == t.fencing_token())
        });
    if same {
        return None;
    }
    let mut lost = Vec::new();
    for (shard, term) in std::mem::take(held) {
        match now.get(&shard) {
            Some(t) if t.fencing_token() == term.fencing_token() => {}
            _ => lost.push(term),
        }
    }
    *held = now;
    Some(lost)
}

/// When a command that has not acknowledged must be killed: `grace` after the oldest
/// pending change, or shortly before another member may take a lost shard over.
fn kill_at(pending: &[Pending], grace: Duration, slack: Duration) -> Option<Instant> {
    pending
        .iter()
        .map(|p| {
            p.terms
                .iter()
                .map(|t| t.deadline() + slack)
                .fold(p.since + grace, Instant::min)
        })
        .min()
}

/// The held term that ends first, to bound how long a stopping command may run.
fn first_deadline(held: &BTreeMap<u32, Term>) -> Option<&Term> {
    held.values().min_by_key(|t| t.deadline())
}

async fn sleep_until_some(at: Option<Instant>) {
    match at {
        Some(at) => sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// Leaves the set (member Lease, then every shard; nothing is held any more) and
/// removes the files.
async fn leave(set: ShardSetHandle, files: &Files) {
    if let Err(e) = set.shutdown().await {
        warn!(error = %e, "the shard set stopped with an error");
    }
    files.remove();
}
