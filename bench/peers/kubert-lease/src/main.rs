//! A leader-election candidate on kubert 0.25's `lease` module (kube 1.1), with the
//! flags and JSON event lines of `interop/`'s candidates, for the side-by-side benchmark.
//!
//! What the crate allows: the Lease must exist before `LeaseManager::init` (the
//! benchmark creates it). The holder renews `renew_grace_period` before the claim
//! expires: a grace of `lease duration - retry period` renews every retry period.
//! There is no renew deadline: a claim is current until its expiry. Dropping the
//! claim receiver makes the task vacate the Lease (holder, times and duration set to
//! null), which is how SIGTERM releases it.

#[path = "../../common.rs"]
mod common;

use std::time::Duration;

use clap::Parser;
use k8s_openapi::api::coordination::v1::Lease;
use kubert::lease::{ClaimParams, LeaseManager};

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let args = common::Args::parse();
    let grace = args
        .lease_duration
        .saturating_sub(args.retry_period)
        .max(Duration::from_millis(1));
    eprintln!(
        "kubert: lease duration {:?}, renew grace {grace:?} (renew every {:?})",
        args.lease_duration,
        args.lease_duration.saturating_sub(grace)
    );
    let client = kube::Client::try_default().await?;
    let api = kube::Api::<Lease>::namespaced(client, &args.namespace);
    let manager = LeaseManager::init(api, &args.lease).await?;
    let params = ClaimParams {
        lease_duration: args.lease_duration,
        renew_grace_period: grace,
    };
    let (mut claims, task) = manager.spawn(&args.id, params).await?;
    let mut events = common::Events::new(&args.id);
    loop {
        let claim = claims.borrow_and_update().clone();
        events.set_leader(Some(&claim.holder));
        events.set_leading(claim.is_current_for(&args.id));
        tokio::select! {
            () = common::terminated() => break,
            changed = claims.changed() => if changed.is_err() { break },
            // A claim ends at its expiry even when no update arrives.
            () = async {
                if claim.is_current() {
                    claim.expire().await;
                } else {
                    std::future::pending::<()>().await;
                }
            } => {}
        }
    }
    events.set_leading(false);
    if !args.release_on_cancel {
        task.abort();
        return Ok(());
    }
    drop(claims);
    task.await??;
    Ok(())
}
