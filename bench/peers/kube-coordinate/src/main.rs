//! A leader-election candidate on kube-coordinate 2.0.0-rc.0 (kube 2), with the flags
//! and JSON event lines of `interop/`'s candidates, for the side-by-side benchmark.
//!
//! What the crate allows: every duration must be at least 1 s (`validate` checks
//! `as_secs() >= 1`), so a retry period below 1 s is raised to 1 s. The state channel
//! says Leading / Following / Standby but not who leads: no `new_leader` lines. The
//! crate does not release the Lease on shutdown (its `shutdown` only stops the task),
//! so after SIGTERM the others wait for the lease to expire.

#[path = "../../common.rs"]
mod common;

use std::time::Duration;

use clap::Parser;
use kube_coordinate::{Config, LeaderElector};

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let args = common::Args::parse();
    let retry_period = args.retry_period.max(Duration::from_secs(1));
    eprintln!(
        "kube-coordinate: lease duration {:?}, renew deadline {:?}, retry period {retry_period:?}",
        args.lease_duration, args.renew_deadline
    );
    let config = Config::default()
        .name(&args.lease)
        .namespace(&args.namespace)
        .identity(&args.id)
        .manager("leaderz-bench")
        .lease_duration(args.lease_duration)
        .renew_deadline(args.renew_deadline)
        .retry_period(retry_period);
    let client = kube::Client::try_default().await?;
    let handle = LeaderElector::spawn(config, client)?;
    let mut state = handle.state();
    let mut events = common::Events::new(&args.id);
    loop {
        tokio::select! {
            () = common::terminated() => break,
            changed = state.changed() => {
                if changed.is_err() {
                    break;
                }
                let leading = state.borrow_and_update().is_leader();
                events.set_leading(leading);
            }
        }
    }
    events.set_leading(false);
    handle.shutdown().await?;
    Ok(())
}
