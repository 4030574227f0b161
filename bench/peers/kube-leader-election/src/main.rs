//! A leader-election candidate on kube-leader-election 0.44 (kube 4), with the flags
//! and JSON event lines of `interop/`'s candidates, for the side-by-side benchmark.
//!
//! The crate offers one call, `try_acquire_or_renew` (a GET, then a merge patch), and
//! `step_down`; the loop is the application's. This one calls it every retry period
//! (leader and followers alike, as the crate's README shows), bounds each call by the
//! renew deadline, and stops leading when no renewal succeeded for a renew deadline.
//! On SIGTERM it stops leading, then calls `step_down` (holder `""`, duration 1 s).

#[path = "../../common.rs"]
mod common;

use std::time::Duration;

use clap::Parser;
use k8s_openapi::api::coordination::v1::Lease;
use kube_leader_election::{LeaseLock, LeaseLockParams, LeaseLockResult};
use tokio::time::{Instant, MissedTickBehavior, interval, timeout};

fn holder(lease: &Lease) -> Option<&str> {
    lease.spec.as_ref()?.holder_identity.as_deref()
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let args = common::Args::parse();
    eprintln!(
        "kube-leader-election: ttl {:?}, poll every {:?}, renew deadline {:?}",
        args.lease_duration, args.retry_period, args.renew_deadline
    );
    let client = kube::Client::try_default().await?;
    let lock = LeaseLock::new(
        client,
        &args.namespace,
        LeaseLockParams {
            lease_name: args.lease.clone(),
            holder_id: args.id.clone(),
            lease_ttl: args.lease_duration,
        },
    );
    let mut events = common::Events::new(&args.id);
    let mut tick = interval(args.retry_period);
    tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut last_renewal: Option<Instant> = None;
    let terminated = common::terminated();
    tokio::pin!(terminated);
    loop {
        tokio::select! {
            () = &mut terminated => break,
            _ = tick.tick() => {}
        }
        let started = Instant::now();
        let result = tokio::select! {
            () = &mut terminated => break,
            r = timeout(args.renew_deadline, lock.try_acquire_or_renew()) => r,
        };
        match result {
            Ok(Ok(LeaseLockResult::Acquired(lease))) => {
                last_renewal = Some(started);
                events.set_leader(holder(&lease));
                events.set_leading(true);
            }
            Ok(Ok(LeaseLockResult::NotAcquired(lease))) => {
                events.set_leading(false);
                events.set_leader(holder(&lease));
            }
            Ok(Err(e)) => eprintln!("try_acquire_or_renew: {e}"),
            Err(_) => eprintln!("try_acquire_or_renew timed out"),
        }
        if events.leading() && last_renewal.is_none_or(|t| t.elapsed() >= args.renew_deadline) {
            events.set_leading(false);
        }
    }
    let was_leading = events.leading();
    events.set_leading(false);
    if was_leading && args.release_on_cancel {
        match timeout(Duration::from_secs(5), lock.step_down()).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => eprintln!("step_down: {e}"),
            Err(_) => eprintln!("step_down timed out"),
        }
    }
    Ok(())
}
