//! client-go-style callbacks over the same engine, for code ported from Go.

use std::future::Future;

use futures::future::BoxFuture;
use tokio_util::sync::CancellationToken;
use tokio_util::task::AbortOnDropHandle;

use crate::elector::{ElectionError, Elector};
use crate::lock::Lock;
use crate::term::Term;

/// What to call as leadership changes, as client-go's `LeaderCallbacks`.
///
/// ```no_run
/// # async fn doc(client: kube::Client) -> Result<(), Box<dyn std::error::Error>> {
/// use leaderz::{Callbacks, ElectionConfig, Elector, LeaseLock};
/// use tokio_util::sync::CancellationToken;
///
/// let elector = Elector::new(LeaseLock::new(client, "default", "my-lock"), ElectionConfig::new("pod-a"))?;
/// let callbacks = Callbacks::new(|term| async move {
///         // Runs while leading; stop when the term is cancelled.
///         term.cancelled().await;
///     })
///     .on_stopped_leading(|| eprintln!("leaderelection lost"))
///     .on_new_leader(|leader| println!("leader is now {leader:?}"));
/// elector.run(callbacks, CancellationToken::new()).await?;
/// # Ok(()) }
/// ```
#[allow(clippy::type_complexity)]
pub struct Callbacks {
    started: Box<dyn FnMut(Term) -> BoxFuture<'static, ()> + Send>,
    stopped: Box<dyn FnMut() + Send>,
    new_leader: Box<dyn FnMut(Option<&str>) + Send>,
}

impl std::fmt::Debug for Callbacks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Callbacks").finish_non_exhaustive()
    }
}

impl Callbacks {
    /// `on_started_leading`: spawned with the term each time this process starts
    /// leading. The term ends when its token is cancelled; the elector waits for the
    /// returned future to finish before it releases the lease or campaigns again.
    pub fn new<F, Fut>(mut on_started_leading: F) -> Self
    where
        F: FnMut(Term) -> Fut + Send + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        Self {
            started: Box::new(move |term: Term| {
                // The elector waits for every clone of the term to be dropped: keep one
                // until the future returns, so that a callback that drops its term early
                // (keeping only the token) is still waited for.
                let keep = term.clone();
                let work = on_started_leading(term);
                Box::pin(async move {
                    work.await;
                    drop(keep);
                })
            }),
            stopped: Box::new(|| {}),
            new_leader: Box::new(|_| {}),
        }
    }

    /// Called after each term ends and its work has finished.
    #[must_use]
    pub fn on_stopped_leading(mut self, f: impl FnMut() + Send + 'static) -> Self {
        self.stopped = Box::new(f);
        self
    }

    /// Called when the observed leader changes (including to this process, and to
    /// `None` when nobody leads); never twice in a row with the same value.
    #[must_use]
    pub fn on_new_leader(mut self, f: impl FnMut(Option<&str>) + Send + 'static) -> Self {
        self.new_leader = Box::new(f);
        self
    }
}

impl<L: Lock> Elector<L> {
    /// Runs the election with callbacks until `shutdown` is cancelled (then ends the
    /// term, waits for `on_started_leading` to return, releases) or a fatal error.
    ///
    /// If the elector stops while `on_started_leading` still runs after its term ended
    /// (its `shutdown_grace` ran out, or it failed), the work is aborted: it is never
    /// left running without an elector. Dropping this future (a `select!` that chose
    /// another branch) also aborts the work, and shuts the elector down in the
    /// background (it releases the lease if the work was stopped in time).
    pub async fn run(
        self,
        mut callbacks: Callbacks,
        shutdown: CancellationToken,
    ) -> Result<(), ElectionError> {
        let mut handle = self.spawn();
        let mut leader = handle.leader();
        let stop = handle.shutdown_token();
        let _stop_on_exit = stop.clone().drop_guard();
        let mut ended = None;
        while ended.is_none() {
            tokio::select! {
                biased;
                _ = shutdown.cancelled() => break,
                changed = leader.changed() => {
                    if changed.is_err() {
                        break;
                    }
                    let who = leader.borrow_and_update().clone();
                    (callbacks.new_leader)(who.as_deref());
                }
                term = handle.acquired() => {
                    let Ok(term) = term else { break };
                    let token = term.token();
                    // Aborted if this future is dropped: the elector then shuts down
                    // in the background, and the work must not outlive it.
                    let mut work = AbortOnDropHandle::new(tokio::spawn((callbacks.started)(term)));
                    // Keep reporting leader changes while leading.
                    loop {
                        tokio::select! {
                            biased;
                            // The elector ends the term; the work sees its token cancelled.
                            _ = shutdown.cancelled() => { stop.cancel(); break; }
                            () = token.cancelled() => break,
                            changed = leader.changed() => {
                                // The elector is gone: its term ended with it.
                                if changed.is_err() {
                                    break;
                                }
                                let who = leader.borrow_and_update().clone();
                                (callbacks.new_leader)(who.as_deref());
                            }
                        }
                    }
                    // The term has ended: wait for the work, unless the elector stops
                    // first. A shutdown asked for meanwhile is passed on at once.
                    loop {
                        tokio::select! {
                            biased;
                            _ = &mut work => break,
                            _ = shutdown.cancelled(), if !stop.is_cancelled() => stop.cancel(),
                            result = handle.join() => {
                                ended = Some(result);
                                work.abort();
                                let _ = (&mut work).await;
                                break;
                            }
                        }
                    }
                    (callbacks.stopped)();
                }
            }
        }
        stop.cancel();
        match ended {
            Some(result) => result,
            None => handle.join().await,
        }
    }
}
