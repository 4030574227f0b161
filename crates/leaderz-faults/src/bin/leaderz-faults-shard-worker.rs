//! `leaderz-faults-shard-worker`: the command `leaderz run --shards` supervises in the
//! shard tests. Writes to the fenced ledger for every shard it owns, follows
//! `LEADERZ_SHARDS_FILE` on SIGHUP and acknowledges in `LEADERZ_SHARDS_ACK`.
//!
//! ```sh
//! leaderz run --lease jobs --shards 64 -- leaderz-faults-shard-worker \
//!     --ledger http://127.0.0.1:PORT --prefix run-1 --log /tmp/shards.jsonl
//! ```

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context as _;
use clap::Parser;
use leaderz_faults::shard_worker::{ShardWorkerConfig, run};

/// Writes to the fenced ledger for every shard it owns; exits on SIGTERM.
#[derive(Debug, Parser)]
struct Args {
    /// The ledger, `http://127.0.0.1:<port>`.
    #[arg(long)]
    ledger: String,
    /// Ledger resources are `<prefix>-<shard>`.
    #[arg(long)]
    prefix: String,
    /// The JSON-lines log to append to.
    #[arg(long)]
    log: PathBuf,
    /// Time between rounds of writes.
    #[arg(long, default_value = "100ms", value_parser = humantime::parse_duration)]
    interval: Duration,
    /// How long work takes to stop after a SIGHUP (the old shards are written meanwhile).
    #[arg(long, default_value = "0s", value_parser = humantime::parse_duration)]
    stop_delay: Duration,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let var = |name: &str| std::env::var(name).with_context(|| format!("{name} is not set"));
    let config = ShardWorkerConfig {
        ledger: args.ledger,
        prefix: args.prefix,
        log: args.log,
        interval: args.interval,
        stop_delay: args.stop_delay,
        identity: var("LEADERZ_IDENTITY")?,
        shards_file: var("LEADERZ_SHARDS_FILE")?.into(),
        ack_file: var("LEADERZ_SHARDS_ACK")?.into(),
    };
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?
        .block_on(run(config))
}
