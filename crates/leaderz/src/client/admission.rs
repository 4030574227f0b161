//! Admission control: at most [`Options::max_in_flight`](super::Options::max_in_flight)
//! short requests are in flight to the API server at once; the others wait here, in the
//! process, in priority order.
//!
//! Why here and not in the API server's queue: a request that waits in the process can
//! be dropped unsent when its caller gives up, and the order it leaves in can favour a
//! leader's renewal over a follower's read. Queued at the server (or in an HTTP/2
//! connection's stream queue), a request that timed out is still served, by an API
//! server already behind: with 10 000 elections in one process that was a congestion
//! collapse — every request waited longer than its timeout, was sent again, and every
//! term ended.
//!
//! The order (see [`Priority`]): renewals that have become urgent, earliest first; then
//! other writes, first come first served; then reads; then best-effort requests; then
//! renewals that are not urgent yet, earliest first. A leader's renewal therefore waits
//! while others have work to do, until it is urgent, and then goes before everything:
//! under load a leader renews less often (as late as its term allows) instead of
//! starving new candidates, and never loses its term to them. An urgent renewal does not
//! even wait for a place: a quarter of the limit more (at least one) is kept for urgent
//! renewals alone, so that requests that hold their places for long (slow lists, bodies nobody
//! reads, an application's own burst through the same client) cannot hold a term's
//! renewal back past its deadline.
//!
//! The caller learns when its request left the process ([`Ticket::sent`]): time spent
//! waiting here is not time the API server could have seen the request, so a write's
//! term may be counted from when it left, and its timeout too.
//!
//! Elections do not even wait here with their request built: their ticket is
//! [deferring](Ticket::deferring), so a request that would wait fails at once, unsent,
//! with [`Deferred`]; the waiter stays in the queue; the election awaits its place
//! ([`Ticket::admitted`]) and builds the request again, which takes the place handed to
//! its ticket. With 10 000 elections in a process nearly every leader has a renewal
//! waiting at any time, and the built requests (with kube's retry copy and the tower
//! futures around them, ~19 KiB each) were half of the process's memory.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, VecDeque};
use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::oneshot;
use tokio::time::Instant;
use tower::BoxError;

/// How soon a request should leave the process when
/// [`Options::max_in_flight`](super::Options::max_in_flight) requests are already in
/// flight. Elections set it on their own requests; anything else is [`Priority::Normal`]
/// (other code cannot set it: this is public so that [`Request`](crate::machine::Request)
/// can say how its caller should queue it).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Priority {
    /// A leader's renewal: it waits behind every other request until `urgent_at`, then
    /// goes before all of them (the earliest `urgent_at` first).
    Renewal {
        /// When the renewal must go out for its term to be safe from one more failure.
        urgent_at: Instant,
    },
    /// Takes, releases, and requests of unknown purpose.
    Normal,
    /// A follower's reads.
    Read,
    /// Best effort: Events announcing a new leader.
    Background,
}

tokio::task_local! {
    static TICKET: Arc<Ticket>;
}

/// What a caller knows of its request's way through the gate.
#[derive(Debug)]
pub(crate) struct Ticket {
    priority: Priority,
    /// The caller can build its request again: when it would have to wait, the first
    /// request is failed with [`Deferred`] instead, and its place is awaited with
    /// [`Ticket::admitted`], so that the request is not held, built, while it waits.
    defer: bool,
    state: Mutex<State>,
    place: Mutex<Place>,
    /// Past this instant no attempt of the request leaves (kube's client retries after
    /// a 429 or 503 too): see [`Request::send_by`](crate::machine::Request::send_by).
    send_by: Mutex<Option<Instant>>,
    /// Its caller has begun sending it (an `Unseen` ticket not begun has surely not
    /// left).
    begun: AtomicBool,
}

/// The place a deferred request waits for, or has been given.
#[derive(Debug, Default)]
enum Place {
    #[default]
    None,
    Waiting {
        gate: Arc<Gate>,
        rx: oneshot::Receiver<Permit>,
    },
    Given(Permit),
}

/// What [`Ticket::take_place`] found.
enum Taken {
    Given(Permit),
    Waiting(oneshot::Receiver<Permit>),
}

/// The request was not sent: it would have had to wait for a place, and its caller
/// waits for that place without it ([`Ticket::admitted`]), then sends it again.
#[derive(Debug, thiserror::Error)]
#[error("the request waits for a place to be sent (it is sent again once it has one)")]
pub(crate) struct Deferred;

/// The request was not sent: it reached its place after the instant it had to leave by.
#[derive(Debug, thiserror::Error)]
#[error("the request was not sent: the instant it had to leave by had passed")]
pub(crate) struct TooLate;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum State {
    /// Not seen by a gate (yet, or ever: a client without one).
    Unseen,
    /// Waiting for its turn: queued in the gate, or deferred (its caller waits for the
    /// place, and sends the request again once it has it).
    Queued,
    /// Left the process at this instant (its first attempt, if retried).
    Sent(Instant),
    /// Never sent: its first attempt reached its place after the ticket's `send_by`.
    TooLate,
}

impl Ticket {
    /// A ticket for a caller that waits with its request built (the tests').
    #[cfg(test)]
    pub(crate) fn new(priority: Priority) -> Arc<Self> {
        Arc::new(Self {
            priority,
            defer: false,
            state: Mutex::new(State::Unseen),
            place: Mutex::new(Place::None),
            send_by: Mutex::new(None),
            begun: AtomicBool::new(false),
        })
    }

    /// A ticket whose first request is deferred rather than held while it waits (see
    /// [`Deferred`]): its caller must await [`Ticket::admitted`] when that request
    /// fails, and then build and send it again.
    pub(crate) fn deferring(priority: Priority) -> Arc<Self> {
        Arc::new(Self {
            priority,
            defer: true,
            state: Mutex::new(State::Unseen),
            place: Mutex::new(Place::None),
            send_by: Mutex::new(None),
            begun: AtomicBool::new(false),
        })
    }

    /// No attempt of the request leaves after `by` (`None`: no limit).
    pub(crate) fn set_send_by(&self, by: Option<Instant>) {
        *self.send_by.lock().unwrap_or_else(|e| e.into_inner()) = by;
    }

    /// The caller begins sending the request.
    pub(crate) fn begin(&self) {
        self.begun.store(true, Ordering::Relaxed);
    }

    /// Whether the request may have left: it has begun and is not known to wait.
    pub(crate) fn may_have_left(&self) -> bool {
        self.begun.load(Ordering::Relaxed) && !matches!(self.state(), State::Queued)
    }

    fn too_late(&self) -> bool {
        self.send_by
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_some_and(|by| Instant::now() >= by)
    }

    fn place(&self) -> std::sync::MutexGuard<'_, Place> {
        self.place.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether the request was deferred, and waits for its place.
    pub(crate) fn deferred(&self) -> bool {
        matches!(*self.place(), Place::Waiting { .. })
    }

    /// Waits for the place of a deferred request, which the next request sent with this
    /// ticket takes. At once if it was not deferred.
    pub(crate) async fn admitted(&self) -> Result<(), GateClosed> {
        // Taken out first: a guard in the `match` scrutinee would live through its arms.
        let place = std::mem::take(&mut *self.place());
        let (gate, mut rx) = match place {
            Place::Waiting { gate, rx } => (gate, rx),
            other => {
                *self.place() = other;
                return Ok(());
            }
        };
        let urgent_at = match self.priority {
            Priority::Renewal { urgent_at } => Some(urgent_at),
            _ => None,
        };
        let permit = gate.wait(&mut rx, urgent_at).await?;
        *self.place() = Place::Given(permit);
        Ok(())
    }

    /// The place this ticket was given, or waits for, at `gate`, if any.
    fn take_place(&self, gate: &Arc<Gate>) -> Option<Taken> {
        let mut place = self.place();
        let here = match &*place {
            Place::Given(permit) => permit.gate.as_ref().is_some_and(|g| Arc::ptr_eq(g, gate)),
            Place::Waiting { gate: g, .. } => Arc::ptr_eq(g, gate),
            Place::None => false,
        };
        if !here {
            return None;
        }
        match std::mem::take(&mut *place) {
            Place::Given(permit) => Some(Taken::Given(permit)),
            Place::Waiting { rx, .. } => Some(Taken::Waiting(rx)),
            Place::None => None,
        }
    }

    /// Runs `fut` with this ticket on every request it sends through a leaderz client.
    pub(crate) fn scope<F: Future>(self: &Arc<Self>, fut: F) -> impl Future<Output = F::Output> {
        TICKET.scope(self.clone(), fut)
    }

    pub(crate) fn state(&self) -> State {
        *self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// When the request first left the process, if it did.
    pub(crate) fn sent(&self) -> Option<Instant> {
        match self.state() {
            State::Sent(at) => Some(at),
            _ => None,
        }
    }

    /// The request takes its place and leaves, unless its `send_by` has passed: the
    /// place is then given back and the attempt fails with [`TooLate`].
    fn depart(&self, permit: Permit) -> Result<Permit, BoxError> {
        if self.too_late() {
            drop(permit);
            self.set(State::TooLate);
            return Err(TooLate.into());
        }
        self.set(State::Sent(Instant::now()));
        Ok(permit)
    }

    fn set(&self, new: State) {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        // The first departure counts: a retry leaves later, but the first attempt may
        // have landed.
        if !matches!(*state, State::Sent(_)) {
            *state = new;
        }
    }
}

/// The gate short requests pass. See the [module docs](self).
#[derive(Debug)]
pub(crate) struct Gate {
    limit: usize,
    /// Places beyond `limit` for urgent renewals only.
    reserve: usize,
    queue: Mutex<Queue>,
}

#[derive(Debug, Default)]
struct Queue {
    /// Places taken, urgent renewals beyond the limit included.
    in_flight: usize,
    /// The queue length beyond which waiters that gave up are swept out.
    sweep_at: usize,
    /// Renewals, by `urgent_at` (then arrival).
    renewals: BinaryHeap<Reverse<Waiter>>,
    normal: VecDeque<Waiter>,
    reads: VecDeque<Waiter>,
    background: VecDeque<Waiter>,
    arrivals: u64,
}

#[derive(Debug)]
struct Waiter {
    urgent_at: Instant,
    arrival: u64,
    tx: oneshot::Sender<Permit>,
}

impl PartialEq for Waiter {
    fn eq(&self, other: &Self) -> bool {
        (self.urgent_at, self.arrival) == (other.urgent_at, other.arrival)
    }
}
impl Eq for Waiter {}
impl PartialOrd for Waiter {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Waiter {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        (self.urgent_at, self.arrival).cmp(&(other.urgent_at, other.arrival))
    }
}

impl Queue {
    /// The next waiter whose caller still waits, in the order of the module docs.
    fn next(&mut self, now: Instant) -> Option<Waiter> {
        loop {
            let urgent = self
                .renewals
                .peek()
                .is_some_and(|Reverse(w)| w.urgent_at <= now);
            let waiter = if urgent {
                self.renewals.pop().map(|Reverse(w)| w)
            } else {
                self.normal
                    .pop_front()
                    .or_else(|| self.reads.pop_front())
                    .or_else(|| self.background.pop_front())
                    .or_else(|| self.renewals.pop().map(|Reverse(w)| w))
            }?;
            if !waiter.tx.is_closed() {
                return Some(waiter);
            }
        }
    }

    /// The next urgent renewal whose caller still waits.
    fn next_urgent(&mut self, now: Instant) -> Option<Waiter> {
        while self
            .renewals
            .peek()
            .is_some_and(|Reverse(w)| w.urgent_at <= now)
        {
            let Reverse(waiter) = self.renewals.pop()?;
            if !waiter.tx.is_closed() {
                return Some(waiter);
            }
        }
        None
    }

    fn len(&self) -> usize {
        self.renewals.len() + self.normal.len() + self.reads.len() + self.background.len()
    }

    fn push(&mut self, priority: Priority, tx: oneshot::Sender<Permit>, now: Instant) {
        // Waiters that gave up leave only when popped, and a class behind a busy one is
        // not popped: sweep them out now and then (amortised: when the queue doubled).
        if self.len() >= self.sweep_at {
            self.renewals.retain(|Reverse(w)| !w.tx.is_closed());
            for class in [&mut self.normal, &mut self.reads, &mut self.background] {
                class.retain(|w| !w.tx.is_closed());
            }
            self.sweep_at = (self.len() * 2).max(1024);
        }
        self.arrivals += 1;
        let waiter = |urgent_at| Waiter {
            urgent_at,
            arrival: self.arrivals,
            tx,
        };
        match priority {
            Priority::Renewal { urgent_at } => self.renewals.push(Reverse(waiter(urgent_at))),
            Priority::Normal => self.normal.push_back(waiter(now)),
            Priority::Read => self.reads.push_back(waiter(now)),
            Priority::Background => self.background.push_back(waiter(now)),
        }
    }
}

/// The gate closed (the client was dropped) while a request waited.
#[derive(Debug, thiserror::Error)]
#[error("the client was dropped while the request waited to be sent")]
pub(crate) struct GateClosed;

impl Gate {
    pub(crate) fn new(limit: usize) -> Arc<Self> {
        let limit = limit.max(1);
        Arc::new(Self {
            limit,
            reserve: (limit / 4).max(1),
            queue: Mutex::new(Queue::default()),
        })
    }

    fn queue(&self) -> std::sync::MutexGuard<'_, Queue> {
        self.queue.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Waits for a place among the requests in flight, in the order of the calling
    /// task's [`Ticket`] (none: [`Priority::Normal`]), and marks the ticket sent; fails
    /// with [`Deferred`] instead of waiting when the ticket says so.
    pub(crate) async fn enter(self: &Arc<Self>) -> Result<Permit, BoxError> {
        let ticket = TICKET.try_with(Arc::clone).ok();
        let priority = ticket.as_ref().map_or(Priority::Normal, |t| t.priority);
        let urgent_at = match priority {
            Priority::Renewal { urgent_at } => Some(urgent_at),
            _ => None,
        };
        if let Some(t) = &ticket {
            let permit = match t.take_place(self) {
                Some(Taken::Given(permit)) => Some(permit),
                // Sent again without waiting for the place (a lock that retried after
                // `Deferred`): wait in the deferred request's place in the queue,
                // rather than queue again and leave that place, once given, idle.
                Some(Taken::Waiting(mut rx)) => Some(self.wait(&mut rx, urgent_at).await?),
                None => None,
            };
            if let Some(permit) = permit {
                return t.depart(permit);
            }
        }
        let rx = {
            let mut queue = self.queue();
            if queue.in_flight < self.limit {
                queue.in_flight += 1;
                None
            } else if urgent_at.is_some_and(|t| t <= Instant::now())
                && queue.in_flight < self.limit + self.reserve
            {
                // An urgent renewal takes a reserved place at once.
                queue.in_flight += 1;
                None
            } else {
                let (tx, rx) = oneshot::channel();
                queue.push(priority, tx, Instant::now());
                Some(rx)
            }
        };
        let permit = match rx {
            None => Permit {
                gate: Some(self.clone()),
            },
            Some(mut rx) => {
                if let Some(t) = &ticket {
                    let first = t.state() == State::Unseen;
                    t.set(State::Queued);
                    if t.defer && first {
                        *t.place() = Place::Waiting {
                            gate: self.clone(),
                            rx,
                        };
                        return Err(Deferred.into());
                    }
                }
                self.wait(&mut rx, urgent_at).await?
            }
        };
        match &ticket {
            Some(t) => t.depart(permit),
            None => Ok(permit),
        }
    }

    /// Waits for a place handed over through `rx`; a renewal that becomes urgent while
    /// it waits takes a reserved place if one is free.
    async fn wait(
        self: &Arc<Self>,
        rx: &mut oneshot::Receiver<Permit>,
        urgent_at: Option<Instant>,
    ) -> Result<Permit, GateClosed> {
        if let Some(urgent_at) = urgent_at {
            tokio::select! {
                permit = &mut *rx => return permit.map_err(|_| GateClosed),
                () = tokio::time::sleep_until(urgent_at) => {}
            }
            let mut queue = self.queue();
            if queue.in_flight < self.limit + self.reserve {
                // Withdraw from the queue (a permit already handed over comes back
                // through the channel, and is used instead).
                rx.close();
                if let Ok(permit) = rx.try_recv() {
                    return Ok(permit);
                }
                queue.in_flight += 1;
                return Ok(Permit {
                    gate: Some(self.clone()),
                });
            }
            // Every reserved place is taken by urgent renewals: each is handed on to the
            // next urgent renewal when it comes free.
        }
        rx.await.map_err(|_| GateClosed)
    }

    /// A request left the flight: its place goes to the next waiter, if any.
    fn leave(self: &Arc<Self>) {
        let mut permit = Permit {
            gate: Some(self.clone()),
        };
        loop {
            // Never send while holding the lock: a permit dropped with a channel whose
            // receiver just went away re-enters here.
            let next = {
                let mut queue = self.queue();
                // A place beyond the limit goes only to an urgent renewal.
                let now = Instant::now();
                let next = if queue.in_flight > self.limit {
                    queue.next_urgent(now)
                } else {
                    queue.next(now)
                };
                match next {
                    Some(waiter) => waiter,
                    None => {
                        queue.in_flight -= 1;
                        permit.gate = None;
                        return;
                    }
                }
            };
            match next.tx.send(permit) {
                Ok(()) => return,
                Err(back) => permit = back,
            }
        }
    }

    #[cfg(test)]
    fn in_flight(&self) -> usize {
        self.queue().in_flight
    }
}

/// A place among the requests in flight, given up when dropped.
#[derive(Debug)]
pub(crate) struct Permit {
    gate: Option<Arc<Gate>>,
}

impl Drop for Permit {
    fn drop(&mut self) {
        if let Some(gate) = self.gate.take() {
            gate.leave();
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    /// Enters the gate as a task with `priority`, and reports its order of entry.
    fn waiter(
        gate: &Arc<Gate>,
        priority: Priority,
        name: &'static str,
        order: &tokio::sync::mpsc::UnboundedSender<&'static str>,
    ) -> tokio::task::JoinHandle<Arc<Ticket>> {
        let gate = gate.clone();
        let order = order.clone();
        tokio::spawn(async move {
            let ticket = Ticket::new(priority);
            let permit = ticket.scope(gate.enter()).await.unwrap();
            order.send(name).unwrap();
            drop(permit);
            ticket
        })
    }

    #[tokio::test(start_paused = true)]
    async fn urgent_renewals_go_first_and_others_wait_in_their_class_order() {
        let gate = Gate::new(1);
        let held = gate.enter().await.unwrap();
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let now = Instant::now();
        let later = Renewal(now + Duration::from_secs(60));
        let urgent = Renewal(now);
        #[allow(non_snake_case)]
        fn Renewal(urgent_at: Instant) -> Priority {
            Priority::Renewal { urgent_at }
        }
        let mut tasks = Vec::new();
        for (priority, name) in [
            (later, "renewal later"),
            (Priority::Background, "event"),
            (Priority::Read, "read"),
            (Priority::Normal, "take"),
            (urgent, "urgent renewal"),
            (Priority::Normal, "second take"),
        ] {
            tasks.push(waiter(&gate, priority, name, &tx));
            tokio::task::yield_now().await;
        }
        assert_eq!(gate.in_flight(), 1);
        drop(held);
        let mut seen = Vec::new();
        for _ in 0..6 {
            seen.push(rx.recv().await.unwrap());
        }
        assert_eq!(
            seen,
            [
                "urgent renewal",
                "take",
                "second take",
                "read",
                "event",
                "renewal later"
            ]
        );
        for t in tasks {
            assert!(t.await.unwrap().sent().is_some());
        }
        assert_eq!(gate.in_flight(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_waiter_that_gives_up_is_skipped_and_the_time_it_waited_is_not_sent_time() {
        let gate = Gate::new(1);
        let held = gate.enter().await.unwrap();
        let gone = Ticket::new(Priority::Normal);
        let waited = tokio::time::timeout(Duration::from_secs(1), gone.scope(gate.enter())).await;
        assert!(waited.is_err());
        assert_eq!(gone.state(), State::Queued);

        let ticket = Ticket::new(Priority::Read);
        let queued_at = Instant::now();
        let next = tokio::spawn({
            let gate = gate.clone();
            let ticket = ticket.clone();
            async move { ticket.scope(gate.enter()).await.unwrap() }
        });
        tokio::time::sleep(Duration::from_secs(3)).await;
        drop(held);
        let permit = next.await.unwrap();
        assert_eq!(gate.in_flight(), 1);
        assert!(ticket.sent().unwrap() >= queued_at + Duration::from_secs(3));
        drop(permit);
        assert_eq!(gate.in_flight(), 0);
        // Free places are taken at once.
        let a = gate.enter().await.unwrap();
        assert_eq!(gate.in_flight(), 1);
        drop(a);
    }

    #[tokio::test(start_paused = true)]
    async fn an_urgent_renewal_does_not_wait_for_places_held_for_long() {
        let gate = Gate::new(4); // and one reserved place
        let held: Vec<Permit> = futures::future::join_all((0..4).map(|_| gate.enter()))
            .await
            .into_iter()
            .map(Result::unwrap)
            .collect();
        let renew = |gate: &Arc<Gate>, after: Duration| {
            let gate = gate.clone();
            let ticket = Ticket::new(Priority::Renewal {
                urgent_at: Instant::now() + after,
            });
            let t = ticket.clone();
            (
                ticket,
                tokio::spawn(async move { t.scope(gate.enter()).await.unwrap() }),
            )
        };
        let (first, first_task) = renew(&gate, Duration::from_secs(1));
        let (second, second_task) = renew(&gate, Duration::from_secs(2));
        let normal = tokio::spawn({
            let gate = gate.clone();
            async move { gate.enter().await.unwrap() }
        });
        tokio::time::sleep(Duration::from_millis(1500)).await;
        // The first became urgent and took the reserved place; the others wait.
        assert!(first.sent().is_some());
        assert_eq!(gate.in_flight(), 5);
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert_eq!(second.state(), State::Queued, "no second reserved place");
        // The reserved place goes on to the next urgent renewal, not to the request
        // that waited longer.
        drop(first_task.await.unwrap());
        let second_permit = second_task.await.unwrap();
        assert_eq!(gate.in_flight(), 5);
        // A place within the limit goes to the normal request.
        drop(held);
        let normal = normal.await.unwrap();
        assert_eq!(gate.in_flight(), 2);
        drop((normal, second_permit));
        assert_eq!(gate.in_flight(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_retried_request_keeps_the_instant_it_first_left() {
        let gate = Gate::new(1);
        let ticket = Ticket::new(Priority::Normal);
        let first = ticket.scope(gate.enter()).await.unwrap();
        let left = ticket.sent().unwrap();
        drop(first);
        tokio::time::sleep(Duration::from_secs(1)).await;
        let retry = ticket.scope(gate.enter()).await.unwrap();
        assert_eq!(ticket.sent(), Some(left));
        drop(retry);
    }

    #[tokio::test(start_paused = true)]
    async fn a_deferred_request_waits_for_its_place_in_order_without_being_held() {
        let gate = Gate::new(1);
        let held = gate.enter().await.unwrap();
        // Queued first, undeferred: it goes before the deferred one.
        let (tx, mut order) = tokio::sync::mpsc::unbounded_channel();
        let read = waiter(&gate, Priority::Read, "read", &tx);
        tokio::task::yield_now().await;
        let ticket = Ticket::deferring(Priority::Read);
        let err = ticket.scope(gate.enter()).await.unwrap_err();
        assert!(err.is::<Deferred>(), "{err}");
        assert!(ticket.deferred());
        assert_eq!(ticket.state(), State::Queued);
        let admitted = {
            let ticket = ticket.clone();
            tokio::spawn(async move { ticket.admitted().await })
        };
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert!(!admitted.is_finished(), "admitted with no place free");
        drop(held);
        assert_eq!(order.recv().await, Some("read"));
        read.await.unwrap();
        admitted.await.unwrap().unwrap();
        assert_eq!(gate.in_flight(), 1, "the place is held for the request");
        // The request sent again takes that place, without queueing behind a newcomer.
        let newcomer = waiter(&gate, Priority::Normal, "newcomer", &tx);
        tokio::task::yield_now().await;
        let at = Instant::now();
        let permit = ticket.scope(gate.enter()).await.unwrap();
        assert_eq!(ticket.sent(), Some(at));
        assert!(order.try_recv().is_err(), "the newcomer went first");
        drop(permit);
        assert_eq!(order.recv().await, Some("newcomer"));
        newcomer.await.unwrap();
        assert_eq!(gate.in_flight(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_request_sent_again_without_waiting_for_its_place_keeps_it() {
        let gate = Gate::new(1);
        let held = gate.enter().await.unwrap();
        let ticket = Ticket::deferring(Priority::Normal);
        assert!(ticket.scope(gate.enter()).await.is_err());
        let again = {
            let (gate, ticket) = (gate.clone(), ticket.clone());
            tokio::spawn(async move { ticket.scope(gate.enter()).await.unwrap() })
        };
        tokio::task::yield_now().await;
        assert_eq!(gate.queue().len(), 1, "queued twice");
        drop(held);
        let permit = again.await.unwrap();
        assert!(ticket.sent().is_some());
        assert_eq!(gate.in_flight(), 1);
        drop(permit);
        assert_eq!(gate.in_flight(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_deferred_renewal_that_turns_urgent_takes_a_reserved_place() {
        let gate = Gate::new(1);
        let held = gate.enter().await.unwrap();
        let urgent_at = Instant::now() + Duration::from_secs(5);
        let ticket = Ticket::deferring(Priority::Renewal { urgent_at });
        assert!(ticket.scope(gate.enter()).await.is_err());
        tokio::time::timeout(Duration::from_secs(6), ticket.admitted())
            .await
            .expect("an urgent renewal waits for no place")
            .unwrap();
        assert_eq!(Instant::now(), urgent_at);
        assert_eq!(gate.in_flight(), 2);
        drop(ticket);
        drop(held);
        assert_eq!(
            gate.in_flight(),
            0,
            "a place given and never used is given back"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn waiters_that_gave_up_are_swept_out() {
        let gate = Gate::new(1);
        let held = gate.enter().await.unwrap();
        for _ in 0..3000 {
            let t = Ticket::new(Priority::Read);
            let _ = tokio::time::timeout(Duration::from_millis(1), t.scope(gate.enter())).await;
        }
        assert!(
            gate.queue().len() <= 2048,
            "{} dead waiters kept",
            gate.queue().len()
        );
        drop(held);
        assert_eq!(gate.in_flight(), 0);
    }

    /// No attempt leaves after the ticket's `send_by`, a retry neither (kube's client
    /// retries after a 429 or 503): the place is given back, and a ticket that never
    /// left says so.
    #[tokio::test(start_paused = true)]
    async fn nothing_leaves_after_send_by() {
        let gate = Gate::new(1);
        let ticket = Ticket::new(Priority::Normal);
        ticket.set_send_by(Some(Instant::now()));
        let refused = ticket.scope(gate.enter()).await;
        assert!(refused.unwrap_err().is::<TooLate>());
        assert_eq!(ticket.state(), State::TooLate);
        assert_eq!(gate.in_flight(), 0, "the place is given back");

        let ticket = Ticket::new(Priority::Normal);
        ticket.set_send_by(Some(Instant::now() + Duration::from_secs(1)));
        let first = ticket.scope(gate.enter()).await.unwrap();
        let sent = ticket.sent().expect("left");
        drop(first);
        tokio::time::advance(Duration::from_secs(1)).await;
        let retry = ticket.scope(gate.enter()).await;
        assert!(retry.unwrap_err().is::<TooLate>());
        assert_eq!(ticket.sent(), Some(sent), "the first attempt left");
        assert_eq!(gate.in_flight(), 0);
    }

    /// A request not yet begun, or waiting for its place, has not left; one begun and
    /// unseen by a gate (a client without one) may have; one sent has.
    #[tokio::test(start_paused = true)]
    async fn what_may_have_left() {
        let gate = Gate::new(1);
        let held = gate.enter().await.unwrap();
        let ticket = Ticket::deferring(Priority::Normal);
        assert!(!ticket.may_have_left(), "not begun");
        ticket.begin();
        assert!(ticket.may_have_left(), "begun, unseen by a gate");
        assert!(ticket.scope(gate.enter()).await.is_err(), "deferred");
        assert!(!ticket.may_have_left(), "waits for its place");
        drop(held);
        ticket.admitted().await.unwrap();
        let _permit = ticket.scope(gate.enter()).await.unwrap();
        assert!(ticket.may_have_left(), "sent");
    }

    /// `admitted` on a ticket that waits for nothing returns at once (it used to lock
    /// the ticket's place twice, and hang for good).
    #[test]
    fn admitted_returns_at_once_when_nothing_was_deferred() {
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .build()
                .unwrap();
            let ticket = Ticket::deferring(Priority::Normal);
            tx.send(rt.block_on(ticket.admitted()).is_ok()).unwrap();
        });
        assert_eq!(rx.recv_timeout(Duration::from_secs(5)), Ok(true));
    }

    #[tokio::test]
    async fn never_more_than_the_limit_and_its_reserve_in_flight() {
        let gate = Gate::new(3);
        let most = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let now = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let mut tasks = Vec::new();
        for i in 0..200u32 {
            let (gate, most, now) = (gate.clone(), most.clone(), now.clone());
            tasks.push(tokio::spawn(async move {
                let priority = match i % 4 {
                    0 => Priority::Read,
                    1 => Priority::Renewal {
                        urgent_at: Instant::now(),
                    },
                    2 => Priority::Background,
                    _ => Priority::Normal,
                };
                let ticket = Ticket::new(priority);
                // Some give up while they wait.
                let entered = tokio::time::timeout(
                    Duration::from_micros(u64::from(i % 7) * 300 + 1),
                    ticket.scope(gate.enter()),
                )
                .await;
                if let Ok(permit) = entered {
                    let n = now.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1;
                    most.fetch_max(n, std::sync::atomic::Ordering::SeqCst);
                    tokio::task::yield_now().await;
                    now.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
                    drop(permit);
                }
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        // Three, and the one place reserved for urgent renewals.
        assert!(most.load(std::sync::atomic::Ordering::SeqCst) <= 4);
        assert_eq!(gate.in_flight(), 0);
    }
}
