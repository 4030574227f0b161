//! Leader election on Kubernetes `coordination.k8s.io/v1` Leases, wire-compatible
//! with client-go's `tools/leaderelection`, with safe step-down, watch-based handover
//! and fencing tokens.
//!
//! # Quick start
//!
//! ```no_run
//! use leaderz::{ElectionConfig, Elector, LeaseLock};
//!
//! # async fn doc() -> Result<(), Box<dyn std::error::Error>> {
//! let client = leaderz::client::infer().await?;
//! let identity = std::env::var("POD_NAME")?;
//! let lock = LeaseLock::new(client, "default", "my-lock");
//! let mut handle = Elector::new(lock, ElectionConfig::new(identity))?.spawn();
//!
//! // Run the work only while leading; it is dropped when leadership ends.
//! handle
//!     .run_while_leading(|term| async move {
//!         loop {
//!             println!("working as leader, fencing token {}", term.fencing_token());
//!             tokio::time::sleep(std::time::Duration::from_secs(1)).await;
//!         }
//!     })
//!     .await?;
//! # Ok(()) }
//! ```
//!
//! Other styles over the same engine: [`ElectionHandle::acquired`] yields a [`Term`]
//! whose [token](Term::token) is cancelled when leadership ends;
//! [`ElectionHandle::leader`] is a `watch::Receiver` of who leads; [`Callbacks`] mirror
//! client-go's `OnStartedLeading` / `OnStoppedLeading` / `OnNewLeader`.
//!
//! # Guarantees, and their limits
//!
//! - **Wire compatibility.** The Lease is read and written as client-go does: `replace`
//!   with the `resourceVersion` read, MicroTime timestamps, `holderIdentity: ""` after a
//!   release, the record's own `leaseDurationSeconds` honoured. leaderz and client-go
//!   candidates can share a Lease.
//! - **Expiry on the local clock.** A follower considers a record valid until
//!   `observed_at + leaseDurationSeconds`, where `observed_at` is when this process
//!   first saw that version (see [`record::Observed::expires_at`]). Clock *offsets*
//!   between machines do not matter; clock *rates* do: the bound is
//!   `lease_duration / renew_deadline` (1.5 with the defaults), the factor by which a
//!   follower's clock may run faster than the leader's before their terms can overlap.
//! - **Safe step-down.** The leader's term ends (its token is cancelled) no later than
//!   `send time of its last successful renewal + renew_deadline`, measured on its
//!   monotonic clock, even if the API server hangs: every call has a time limit. A
//!   follower cannot take over before `lease_duration` after it observed that renewal.
//! - **Release only after the work stopped.** On shutdown the term is cancelled, the
//!   work's [`Term`] handles must be dropped (within `shutdown_grace`), and only then is
//!   the lease released. If the work does not stop in time the lease is left to expire.
//! - **The API server does not fence.** A leader that is paused (GC, SIGSTOP, a VM
//!   freeze) longer than its deadline can resume and act before it notices its term
//!   ended. Timing makes overlap unlikely, not impossible. Where that matters, pass
//!   [`Term::fencing_token`] to the resource you protect and have it reject tokens lower
//!   than the highest it has seen. The token is the Lease's `leaseTransitions`, which
//!   leaderz raises on every new term; deleting the Lease resets it to 0.
//!
//! # Layout
//!
//! [`config`] (timing and validation), [`record`] (the Lease record and where expiry is
//! decided), [`lock`] (the Lease and in-memory locks), [`machine`] (every decision of
//! the election: when to read, take, renew, step down, release, and with which record —
//! a state machine without I/O), the tokio driver behind [`Elector::spawn`] (the only
//! place the lock is called), [`Term`] and [`ElectionHandle`], [`Callbacks`],
//! [`Metrics`]; [`routing`] points a Service at the leader (a pod label, an
//! EndpointSlice) around its terms.

pub mod callbacks;
pub mod client;
pub mod config;
mod elector;
pub mod handle;
pub mod lock;
pub mod machine;
pub mod metrics;
pub mod record;
pub mod routing;
pub mod shards;
pub mod term;

pub use callbacks::Callbacks;
pub use config::{ConfigError, ElectionConfig};
pub use elector::{ElectionError, Elector};
pub use handle::{ElectionHandle, HealthCheck, HealthError, Status, Stopped, Terms};
pub use lock::{LeaseLock, Lock, LockError, LockEvent, MemoryLock, Versioned};
pub use metrics::Metrics;
pub use record::{LeaderRecord, Observed, TakeoverError};
pub use term::{Term, TermInfo};
