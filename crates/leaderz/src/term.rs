//! A leadership term: what the leader's work holds while it runs.

use std::sync::Arc;

use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::{CancellationToken, WaitForCancellationFuture};

/// One leadership term of this process.
///
/// Hand it to the work that must run only while leading, and drop it when that work
/// has stopped: the elector waits for every clone to be dropped before it campaigns
/// again or releases the lease on shutdown. The term's [token](Term::token) is
/// cancelled when leadership ends, no later than [`Term::deadline`].
#[derive(Clone, Debug)]
pub struct Term {
    inner: Arc<TermInfo>,
    deadline: watch::Receiver<Instant>,
    cancel: CancellationToken,
}

/// The facts of a term, without the ability to keep it alive.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct TermInfo {
    /// This process's identity (the Lease's `holderIdentity`).
    pub identity: String,
    /// The lock, e.g. `default/my-lock`.
    pub lock: String,
    /// The Lease's `leaseTransitions` when this term began.
    pub fencing_token: i64,
    /// When the term began (when the acquiring write was sent).
    pub started_at: Instant,
}

impl Term {
    /// The identity that leads.
    pub fn identity(&self) -> &str {
        &self.inner.identity
    }

    /// The fencing token: the Lease's `leaseTransitions` at the start of this term.
    ///
    /// It rises with every new term on this Lease (leaderz counts a new term as a
    /// transition even when the same identity takes the lease again), so a downstream
    /// system that remembers the highest token it has seen can reject writes from a
    /// stale leader. Deleting the Lease resets it to 0, and client-go candidates do
    /// not raise it when they re-take a lease under the same identity.
    pub fn fencing_token(&self) -> i64 {
        self.inner.fencing_token
    }

    /// The latest instant this term can last: the send time of the last successful
    /// renewal plus the renew deadline. It moves forward with each renewal.
    pub fn deadline(&self) -> Instant {
        *self.deadline.borrow()
    }

    /// The facts of this term.
    pub fn info(&self) -> &TermInfo {
        &self.inner
    }

    /// A token cancelled when this term ends.
    pub fn token(&self) -> CancellationToken {
        self.cancel.clone()
    }

    /// Completes when this term ends.
    pub fn cancelled(&self) -> WaitForCancellationFuture<'_> {
        self.cancel.cancelled()
    }

    /// Whether the term is still going on: not ended, and before its [deadline]. The
    /// deadline is checked on the clock here, so this is right even when the elector's
    /// task has not run for a while (a starved runtime, blocking work).
    ///
    /// [deadline]: Term::deadline
    pub fn is_active(&self) -> bool {
        !self.cancel.is_cancelled() && Instant::now() < self.deadline()
    }

    /// Checks that the term is still going on, right before a side effect that only the
    /// leader may make; cheap enough to call before every write.
    ///
    /// ```
    /// # fn doc(term: &leaderz::Term) -> Result<(), leaderz::term::TermEnded> {
    /// term.check()?; // then write, passing term.fencing_token() along
    /// # Ok(()) }
    /// ```
    ///
    /// This narrows, but cannot close, the window in which a paused process acts on a
    /// term that has ended (it can be paused right after the check): pass the
    /// [fencing token](Term::fencing_token) to the resource as well.
    pub fn check(&self) -> Result<(), TermEnded> {
        if self.is_active() {
            Ok(())
        } else {
            Err(TermEnded)
        }
    }
}

/// The term has ended (see [`Term::check`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("the leadership term has ended")]
pub struct TermEnded;

/// The elector's side of a term: it ends the term and learns when the work stopped.
/// Dropping it ends the term too, so that a crashed or aborted elector task never
/// leaves the work believing it still leads.
#[derive(Debug)]
pub(crate) struct TermControl {
    pub(crate) info: Arc<TermInfo>,
    /// Every [`Term`] holds a receiver: the work has stopped once none is left.
    deadline: watch::Sender<Instant>,
    cancel: CancellationToken,
}

impl TermControl {
    pub(crate) fn new(info: TermInfo, deadline: Instant) -> Self {
        Self {
            info: Arc::new(info),
            deadline: watch::Sender::new(deadline),
            cancel: CancellationToken::new(),
        }
    }

    /// A new handle on the term for the work (only while the term is active).
    pub(crate) fn term(&self) -> Option<Term> {
        if self.cancel.is_cancelled() {
            return None;
        }
        Some(Term {
            inner: self.info.clone(),
            deadline: self.deadline.subscribe(),
            cancel: self.cancel.clone(),
        })
    }

    pub(crate) fn set_deadline(&self, deadline: Instant) {
        self.deadline.send_replace(deadline);
    }

    /// Ends the term: cancels the token; no new handles are given out.
    pub(crate) fn end(&mut self) {
        self.cancel.cancel();
    }

    /// Waits until every [`Term`] handle has been dropped.
    pub(crate) async fn work_stopped(&mut self) {
        self.deadline.closed().await;
    }
}

impl Drop for TermControl {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn info() -> TermInfo {
        TermInfo {
            identity: "a".into(),
            lock: "ns/l".into(),
            fencing_token: 3,
            started_at: Instant::now(),
        }
    }

    /// Defect 6: a term is over at its deadline even if nobody cancelled it yet (the
    /// elector's task is starved), and `check` says so before a side effect.
    #[tokio::test(start_paused = true)]
    async fn a_term_is_inactive_past_its_deadline_even_if_not_cancelled() {
        let control = TermControl::new(info(), Instant::now() + Duration::from_secs(10));
        let term = control.term().unwrap();
        assert!(term.is_active());
        assert_eq!(term.check(), Ok(()));
        tokio::time::advance(Duration::from_secs(9)).await;
        assert!(term.is_active());
        control.set_deadline(Instant::now() + Duration::from_secs(10));
        tokio::time::advance(Duration::from_secs(9)).await;
        assert!(term.is_active(), "the deadline moved with the renewal");
        tokio::time::advance(Duration::from_secs(1)).await;
        assert!(!term.token().is_cancelled(), "nobody cancelled it");
        assert!(!term.is_active());
        assert_eq!(term.check(), Err(TermEnded));
        drop(control);
    }

    #[tokio::test(start_paused = true)]
    async fn the_work_has_stopped_once_every_handle_is_dropped() {
        let mut control = TermControl::new(info(), Instant::now() + Duration::from_secs(10));
        let term = control.term().unwrap();
        let clone = term.clone();
        control.end();
        assert!(control.term().is_none(), "no handles after the end");
        drop(term);
        let waiting = tokio::time::timeout(Duration::from_secs(1), control.work_stopped()).await;
        assert!(waiting.is_err(), "a clone still works");
        drop(clone);
        tokio::time::timeout(Duration::from_secs(1), control.work_stopped())
            .await
            .expect("stopped");
    }
}
