//! `leaderz-faults-worker`: the work `leaderz run` supervises in the fault suite. Writes to
//! the fenced ledger every few ms with `LEADERZ_FENCING_TOKEN` and `LEADERZ_IDENTITY`,
//! logs when it started and when it got SIGTERM, and exits on SIGTERM.
//!
//! ```sh
//! leaderz run --lease my-lock -- leaderz-faults-worker \
//!     --ledger http://127.0.0.1:PORT --resource trial-1 --log /tmp/workers.jsonl
//! ```

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context as _;
use clap::Parser;
use leaderz_faults::worker::{WorkerConfig, run};

/// Writes to the fenced ledger while it runs; exits on SIGTERM.
#[derive(Debug, Parser)]
struct Args {
    /// The ledger, `http://127.0.0.1:<port>`.
    #[arg(long)]
    ledger: String,
    /// The fenced resource to write to.
    #[arg(long)]
    resource: String,
    /// The JSON-lines log to append to.
    #[arg(long)]
    log: PathBuf,
    /// Time between writes.
    #[arg(long, default_value = "5ms", value_parser = humantime::parse_duration)]
    interval: Duration,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let identity = std::env::var("LEADERZ_IDENTITY").context("LEADERZ_IDENTITY is not set")?;
    let token = std::env::var("LEADERZ_FENCING_TOKEN")
        .context("LEADERZ_FENCING_TOKEN is not set")?
        .parse()
        .context("LEADERZ_FENCING_TOKEN is not a number")?;
    let config = WorkerConfig {
        ledger: args.ledger,
        resource: args.resource,
        log: args.log,
        interval: args.interval,
        identity,
        token,
    };
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?
        .block_on(run(config))
}
