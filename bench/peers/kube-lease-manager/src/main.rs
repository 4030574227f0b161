//! A leader-election candidate on kube-lease-manager 0.13 (kube 5), with the flags and
//! JSON event lines of `interop/`'s candidates, for the side-by-side benchmark.
//!
//! What the crate allows: durations in whole seconds (`leaseDurationSeconds` = the
//! lease duration rounded up); the holder renews `grace` seconds before expiry, so a
//! renewal every `lease duration - grace` seconds: grace is chosen to renew every
//! retry period rounded up to a whole second. No renew deadline, no leader identity
//! (only "am I leading"): no `new_leader` lines. On SIGTERM the watch channel is
//! closed, which makes the crate release the Lease.

#[path = "../../common.rs"]
mod common;

use clap::Parser;
use kube_lease_manager::LeaseManagerBuilder;

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let args = common::Args::parse();
    let duration = common::whole_secs(args.lease_duration);
    anyhow::ensure!(
        duration >= 2,
        "kube-lease-manager needs a lease duration of 2 s or more"
    );
    let renew_every = common::whole_secs(args.retry_period).min(duration - 1);
    let grace = duration - renew_every;
    eprintln!(
        "kube-lease-manager: duration {duration}s, grace {grace}s (renew every {renew_every}s)"
    );

    let client = kube::Client::try_default().await?;
    let manager = LeaseManagerBuilder::new(client, &args.lease)
        .with_namespace(&args.namespace)
        .with_identity(&args.id)
        .with_duration(duration)
        .with_grace(grace)
        .build()
        .await?;
    let (mut leading, task) = manager.watch().await;
    let mut events = common::Events::new(&args.id);
    loop {
        tokio::select! {
            () = common::terminated() => break,
            changed = leading.changed() => {
                if changed.is_err() {
                    break;
                }
                let now = *leading.borrow_and_update();
                events.set_leading(now);
            }
        }
    }
    // The work stops first; closing the channel makes the manager release the Lease.
    events.set_leading(false);
    if !args.release_on_cancel {
        task.abort();
        return Ok(());
    }
    drop(leading);
    task.await??;
    Ok(())
}
