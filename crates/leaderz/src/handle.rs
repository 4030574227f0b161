//! The running election as the application sees it: terms, the current leader,
//! status and health, and a helper that runs work only while leading.

use std::future::Future;
use std::time::Duration;

use futures::channel::mpsc::UnboundedSender;
use tokio::sync::{oneshot, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::elector::ElectionError;
use crate::machine::HandOverError;
use crate::record::Observed;
use crate::term::{Term, TermInfo};

/// What the elector knows right now (for status pages, sidecars and health checks).
#[derive(Clone, Debug, Default, PartialEq)]
#[non_exhaustive]
pub struct Status {
    /// The latest record this process read or was sent, and when it first saw it.
    pub observed: Option<Observed>,
    /// This process's current term, if it leads.
    pub term: Option<TermInfo>,
    /// Send time of this process's last successful write of the lease (acquire or renew).
    pub last_renewed: Option<Instant>,
    /// The last API failure, cleared by the next successful renewal.
    pub last_error: Option<String>,
    /// Whether a watch on the lease is open (followers only).
    pub watching: bool,
    /// Why the follower polls instead of watching, while it does (watch refused or
    /// failing; watching is tried again with a backoff).
    pub polling: Option<String>,
    /// The last term ended more than `shutdown_grace` ago but its work still holds a
    /// [`Term`]; the elector does not campaign until it is dropped.
    pub work_overdue: bool,
    /// A problem that keeps this process from leading until someone fixes it: the
    /// Lease's `leaseTransitions` is exhausted, or another process uses our identity.
    pub problem: Option<String>,
}

impl Status {
    /// Health in the sense of client-go's `HealthzAdaptor` (see
    /// [`ElectionHandle::check_health`]), from this snapshot alone.
    pub fn check_health(
        &self,
        lease_duration: Duration,
        tolerance: Duration,
    ) -> Result<(), HealthError> {
        if let (Some(term), Some(last)) = (&self.term, self.last_renewed) {
            let since = last.elapsed();
            if since > lease_duration + tolerance {
                return Err(HealthError::NotRenewing {
                    lock: term.lock.clone(),
                    since,
                });
            }
        }
        if self.work_overdue {
            return Err(HealthError::WorkNotStopped);
        }
        if let Some(problem) = &self.problem {
            return Err(HealthError::Problem(problem.clone()));
        }
        Ok(())
    }
}

/// The elector has stopped; [`ElectionHandle::shutdown`] tells why.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("the elector has stopped")]
pub struct Stopped;

/// A running election. Dropping it stops the election (releasing the lease in the
/// background once the work has stopped); [`ElectionHandle::shutdown`] does the same
/// and waits for it.
#[derive(Debug)]
pub struct ElectionHandle {
    shutdown: CancellationToken,
    task: Option<JoinHandle<Result<(), ElectionError>>>,
    leader: watch::Receiver<Option<String>>,
    term: watch::Receiver<Option<Term>>,
    status: watch::Receiver<Status>,
    commands: UnboundedSender<Command>,
}

/// A request from the handle to the elector task.
#[derive(Debug)]
pub(crate) enum Command {
    /// [`ElectionHandle::hand_over`].
    HandOver {
        to: Option<String>,
        reply: oneshot::Sender<Result<String, HandOverError>>,
    },
}

impl ElectionHandle {
    pub(crate) fn new(
        shutdown: CancellationToken,
        task: JoinHandle<Result<(), ElectionError>>,
        leader: watch::Receiver<Option<String>>,
        term: watch::Receiver<Option<Term>>,
        status: watch::Receiver<Status>,
        commands: UnboundedSender<Command>,
    ) -> Self {
        Self {
            shutdown,
            task: Some(task),
            leader,
            term,
            status,
            commands,
        }
    }

    /// Hands the lease over to the leaderz candidate `to` (none: whichever candidate
    /// accepts first) — a planned handover, as `leaderz handoff` does from outside.
    ///
    /// Only the leader can: the request goes out with a renewal at once; a candidate
    /// that watches the Lease accepts it; this process then ends its term, waits for
    /// the work to drop its [`Term`] and writes the candidate as the holder, with the
    /// next fencing token; the candidate's first write starts its term. If no candidate
    /// accepts within a lease duration, the request is withdrawn and this process keeps
    /// leading. Returns the request's id once the request is queued; watch
    /// [`ElectionHandle::leader`] to see the lease move.
    ///
    /// ```no_run
    /// # async fn f(handle: leaderz::ElectionHandle) -> Result<(), leaderz::machine::HandOverError> {
    /// let id = handle.hand_over(Some("pod-b")).await?;
    /// println!("asked to hand over (request {id})");
    /// # Ok(()) }
    /// ```
    pub async fn hand_over(&self, to: Option<&str>) -> Result<String, HandOverError> {
        let (reply, answer) = oneshot::channel();
        let command = Command::HandOver {
            to: to.map(str::to_owned),
            reply,
        };
        self.commands
            .unbounded_send(command)
            .map_err(|_| HandOverError::Stopped)?;
        answer.await.unwrap_or(Err(HandOverError::Stopped))
    }

    /// Waits until this process leads and returns the term (at once if it leads now).
    /// Drop the term when the work it guards has stopped.
    ///
    /// Returns [`Stopped`] once the elector has ended, whether by shutdown or by a fatal
    /// error (RBAC denied, a missing namespace, ...); [`ElectionHandle::join`] then
    /// returns the error.
    pub async fn acquired(&self) -> Result<Term, Stopped> {
        let mut rx = self.term.clone();
        let term = rx
            .wait_for(|t| t.as_ref().is_some_and(Term::is_active))
            .await
            .map_err(|_| Stopped)?;
        term.clone().ok_or(Stopped)
    }

    /// Waits for terms without borrowing the handle: for a task of its own that follows
    /// the terms of an election whose handle someone else keeps (to stop it). A
    /// [`Terms`] holds no [`Term`] itself.
    pub fn terms(&self) -> Terms {
        Terms(self.term.clone())
    }

    /// The facts of the current term, if this process leads. (A [`TermInfo`], not a
    /// [`Term`]: holding a `Term` keeps the elector waiting for the work to stop.)
    pub fn current_term(&self) -> Option<TermInfo> {
        self.term
            .borrow()
            .as_ref()
            .filter(|t| t.is_active())
            .map(|t| t.info().clone())
    }

    /// Whether this process leads now.
    pub fn is_leader(&self) -> bool {
        self.term.borrow().as_ref().is_some_and(Term::is_active)
    }

    /// Who leads, as this process sees it: `None` when nobody does (released, deleted,
    /// or the holder's lease expired). Changes are deduplicated.
    pub fn leader(&self) -> watch::Receiver<Option<String>> {
        self.leader.clone()
    }

    /// What the elector knows right now.
    pub fn status(&self) -> watch::Receiver<Status> {
        self.status.clone()
    }

    /// A token that stops the election when cancelled (same as dropping the handle).
    pub fn shutdown_token(&self) -> CancellationToken {
        self.shutdown.clone()
    }

    /// Health, in the sense of client-go's `HealthzAdaptor`: unhealthy if this process
    /// believes it leads but has not renewed for longer than the lease duration plus
    /// `tolerance` (the elector is stuck, and a restart is the cure), if a lost term's
    /// work has not stopped, or if a [`Status::problem`] keeps it from leading. Followers
    /// and leaders that step down on time are healthy.
    pub fn check_health(
        &self,
        lease_duration: Duration,
        tolerance: Duration,
    ) -> Result<(), HealthError> {
        self.health_check(lease_duration).check(tolerance)?;
        if self.task.as_ref().is_none_or(JoinHandle::is_finished) {
            return Err(HealthError::Stopped);
        }
        Ok(())
    }

    /// A health check that does not borrow the handle (for HTTP handlers and the like),
    /// with the same meaning as [`ElectionHandle::check_health`].
    pub fn health_check(&self, lease_duration: Duration) -> HealthCheck {
        HealthCheck {
            status: self.status.clone(),
            lease_duration,
        }
    }

    /// Runs `work` each time this process leads, and drops (aborts) it when the term
    /// ends. Returns when the elector stops: `Ok` after a shutdown, the error if it
    /// failed (e.g. RBAC denied).
    ///
    /// ```no_run
    /// # async fn doc(mut handle: leaderz::ElectionHandle) -> Result<(), leaderz::ElectionError> {
    /// handle.run_while_leading(|term| async move {
    ///     loop {
    ///         println!("working as term {}", term.fencing_token());
    ///         tokio::time::sleep(std::time::Duration::from_secs(1)).await;
    ///     }
    /// }).await?;
    /// # Ok(()) }
    /// ```
    pub async fn run_while_leading<F, Fut>(&mut self, mut work: F) -> Result<(), ElectionError>
    where
        F: FnMut(Term) -> Fut,
        Fut: Future<Output = ()>,
    {
        while let Ok(term) = self.acquired().await {
            let token = term.token();
            tokio::select! {
                () = work(term) => {
                    // Finished early: the term stays ours until it ends.
                    token.cancelled().await;
                }
                () = token.cancelled() => {}
            }
        }
        self.join().await
    }

    /// Stops the election: ends the term, waits (up to the configured grace) for the
    /// work to drop its [`Term`], releases the lease if configured, and returns how the
    /// elector ended.
    pub async fn shutdown(mut self) -> Result<(), ElectionError> {
        self.shutdown.cancel();
        self.join().await
    }

    /// Stops the elector at once, as a crash would: no release. The term ends with the
    /// elector task (its token is cancelled as the task's state is dropped), but nothing
    /// waits for the work. For simulations and fault tests.
    #[doc(hidden)]
    pub fn abort(mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }

    /// Waits for the elector to stop by itself (a fatal error) without stopping it.
    pub async fn join(&mut self) -> Result<(), ElectionError> {
        let Some(task) = self.task.as_mut() else {
            return Ok(());
        };
        let result = match task.await {
            Ok(r) => r,
            Err(e) => Err(ElectionError::Task(e.to_string())),
        };
        self.task = None;
        result
    }
}

impl Drop for ElectionHandle {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// The terms of a running election, for a task that does not own its
/// [`ElectionHandle`] (see [`ElectionHandle::terms`]).
#[derive(Clone, Debug)]
pub struct Terms(watch::Receiver<Option<Term>>);

impl Terms {
    /// Waits until this process leads and returns the term, as
    /// [`ElectionHandle::acquired`] does; [`Stopped`] once the elector has ended.
    pub async fn acquired(&mut self) -> Result<Term, Stopped> {
        let term = self
            .0
            .wait_for(|t| t.as_ref().is_some_and(Term::is_active))
            .await
            .map_err(|_| Stopped)?;
        term.clone().ok_or(Stopped)
    }

    /// Completes once the elector has ended.
    pub(crate) async fn stopped(&mut self) {
        while self.0.changed().await.is_ok() {}
    }
}

/// A cloneable, `'static` health check on a running election (see
/// [`ElectionHandle::health_check`]).
#[derive(Clone, Debug)]
pub struct HealthCheck {
    status: watch::Receiver<Status>,
    lease_duration: Duration,
}

impl HealthCheck {
    /// Unhealthy if the leader has not renewed for `lease_duration + tolerance`, if a
    /// lost term's work has not stopped, if a [`Status::problem`] keeps it from leading,
    /// or if the elector has ended.
    pub fn check(&self, tolerance: Duration) -> Result<(), HealthError> {
        self.status
            .borrow()
            .check_health(self.lease_duration, tolerance)?;
        if self.status.has_changed().is_err() {
            return Err(HealthError::Stopped);
        }
        Ok(())
    }
}

/// Why [`ElectionHandle::check_health`] reports unhealthy.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum HealthError {
    /// The elector believes it leads but has not renewed in time: it is stuck.
    #[error("failed election to renew leadership on lease {lock} (last renewal {since:?} ago)")]
    NotRenewing {
        /// The lock.
        lock: String,
        /// Time since the last successful renewal.
        since: Duration,
    },
    /// A lost term's work has not dropped its [`Term`]; the elector cannot campaign.
    #[error("the last term's work has not stopped; the elector is not campaigning")]
    WorkNotStopped,
    /// Something only a person can fix keeps this process from leading (see
    /// [`Status::problem`]).
    #[error("{0}")]
    Problem(String),
    /// The elector task has ended.
    #[error("the elector has stopped")]
    Stopped,
}
