//! `leaderz handoff`: a planned handover of a Lease to another leaderz candidate.
//!
//! The protocol is the library's ([`leaderz::record::Handoff`], the Lease's
//! `leaderz.io/handoff` annotation): this command writes a request, a candidate accepts
//! it, the holder ends its term, waits for its work, and transfers the Lease, and the
//! new holder's first write completes it. The command:
//!
//! 1. reads the Lease and refuses, writing nothing, when there is nothing to hand over
//!    (no Lease, no holder, the target already holds it), when another handoff is
//!    pending, or when a coordinated-election controller runs the Lease;
//! 2. opens a watch from the version it read (so that a caller without `watch` is
//!    refused before anything is written, and no step is missed);
//! 3. writes the request with a compare-and-swap update (a 409 means the Lease changed:
//!    read it again and check again);
//! 4. waits: for an acceptance (`--accept-timeout`), then for the new holder's own
//!    first write (`--timeout`), and withdraws its request (only its own, and only
//!    before the transfer) when either does not come, or when it is interrupted.

use std::time::Duration;

use futures::StreamExt;
use futures::stream::BoxStream;
use jiff::Timestamp;
use k8s_openapi::api::coordination::v1::Lease;
use kube::Api;
use kube::api::{PostParams, WatchEvent, WatchParams};
use leaderz::LeaderRecord;
use leaderz::record::{HANDOFF_ANNOTATION, Handoff, HandoffState};
use serde::Serialize;
use tokio::time::{Instant, sleep, sleep_until, timeout};
use tracing::{debug, info, warn};

use crate::cli::{HandoffArgs, Output};
use crate::cluster;
use crate::error::{CliError, chain};
use crate::leases::{API_TIMEOUT, HandoffView};
use crate::signals::Signals;
use crate::text::printable;

/// How often a compare-and-swap write is tried again on a Lease that keeps changing
/// (a leader renews every retry period, so a few suffice).
const ATTEMPTS: usize = 20;
/// How long the server keeps one watch open.
const WATCH_TIMEOUT_SECS: u32 = 290;
/// The default `--timeout` beyond twice the Lease's duration.
const TIMEOUT_SLACK: Duration = Duration::from_secs(10);
/// The lease duration assumed when the Lease does not say (client-go's default).
const DEFAULT_LEASE_SECONDS: u64 = 15;

/// A fresh request id: the wall-clock time of the request and this process's id, so
/// that `status` and a refused second request can tell since when it is pending.
pub(crate) fn new_id(now: Timestamp) -> String {
    format!(
        "{}-{:x}",
        now.strftime("%Y-%m-%dT%H:%M:%S%.6fZ"),
        std::process::id()
    )
}

/// When the request with `id` was made, if `leaderz handoff` made the id.
pub(crate) fn requested_at(id: &str) -> Option<Timestamp> {
    let (time, _) = id.rsplit_once('-')?;
    time.parse().ok()
}

/// Runs `leaderz handoff`; returns the exit code.
pub(crate) async fn handoff(args: HandoffArgs) -> Result<u8, CliError> {
    cluster::check_lease_name(&args.name)?;
    let to = args.to.as_deref().map(check_target).transpose()?;
    if args.accept_timeout.is_zero() || args.timeout.is_some_and(|t| t.is_zero()) {
        return Err(CliError::Usage(
            "--accept-timeout and --timeout must be longer than zero".into(),
        ));
    }
    let config = cluster::load_config().await?;
    let namespace = cluster::namespace(args.namespace.namespace.as_deref(), &config)?;
    let client = cluster::connect(config).await?;
    let lease = LeaseApi {
        api: Api::namespaced(client, &namespace),
        name: args.name.clone(),
        namespace,
    };
    let mut signals = Signals::install()?;
    let current = lease.get().await?.ok_or_else(|| lease.not_found())?;
    if args.cancel {
        return cancel(&lease, current, args.output.format).await;
    }
    request(&lease, current, to, &args, &mut signals).await
}

/// Refuses an unusable `--to` before anything is sent.
fn check_target(to: &str) -> Result<String, CliError> {
    if to.trim().is_empty() {
        return Err(CliError::Usage(
            "--to is empty: name the identity of the candidate to hand over to, or leave --to out to hand over to any candidate".into(),
        ));
    }
    if let Some(c) = to.chars().find(|c| c.is_control()) {
        return Err(CliError::Usage(format!(
            "invalid --to `{}`: it contains the control character {}; identities are printable",
            printable(to),
            c.escape_unicode()
        )));
    }
    Ok(to.to_owned())
}

/// The Lease, and the calls this command makes on it.
struct LeaseApi {
    api: Api<Lease>,
    name: String,
    namespace: String,
}

impl LeaseApi {
    /// Reads the Lease (`None`: it does not exist).
    async fn get(&self) -> Result<Option<Lease>, CliError> {
        match timeout(API_TIMEOUT, self.api.get_opt(&self.name)).await {
            Ok(r) => r.map_err(|e| self.error("get", e)),
            Err(_) => Err(self.no_answer("get")),
        }
    }

    /// Replaces the Lease with `lease` if it is still at the version `lease` carries;
    /// `None` on a conflict (it changed since).
    async fn replace(&self, mut lease: Lease) -> Result<Option<Lease>, CliError> {
        lease.metadata.managed_fields = None;
        let params = PostParams::default();
        let call = self.api.replace(&self.name, &params, &lease);
        match timeout(API_TIMEOUT, call).await {
            Ok(Ok(written)) => Ok(Some(written)),
            Ok(Err(kube::Error::Api(s))) if s.code == 409 => Ok(None),
            Ok(Err(kube::Error::Api(s))) if s.code == 404 => Err(self.not_found()),
            Ok(Err(e)) => Err(self.error("update", e)),
            Err(_) => Err(self.no_answer("update")),
        }
    }

    fn not_found(&self) -> CliError {
        CliError::LeaseNotFound {
            name: self.name.clone(),
            namespace: self.namespace.clone(),
        }
    }

    fn no_answer(&self, verb: &str) -> CliError {
        CliError::Api(format!(
            "the API server did not answer a {verb} of lease `{}` in namespace `{}` within {API_TIMEOUT:?}",
            self.name, self.namespace
        ))
    }

    /// A failed call as one line; a refusal names the grant.
    fn error(&self, verb: &str, e: kube::Error) -> CliError {
        match e {
            kube::Error::Api(s) if s.code == 403 => CliError::Api(format!(
                "forbidden: grant `{verb}` on `leases.coordination.k8s.io` in namespace `{}` (lease `{}`; kube/handoff/role.yaml grants what `leaderz handoff` needs): {}",
                self.namespace, self.name, s.message
            )),
            kube::Error::Api(s) if s.code == 401 => CliError::Api(format!(
                "unauthorized: the API server refused our credentials: {}",
                s.message
            )),
            other => CliError::Api(format!(
                "cannot {verb} lease `{}` in namespace `{}`: {}",
                self.name,
                self.namespace,
                chain(&other)
            )),
        }
    }

    /// A watch of the Lease from `version`, opened now (so that a refusal comes before
    /// anything is written).
    async fn watch(&self, version: String) -> Result<LeaseWatch, CliError> {
        let mut w = LeaseWatch {
            api: self.api.clone(),
            params: WatchParams::default()
                .fields(&format!("metadata.name={}", self.name))
                .timeout(WATCH_TIMEOUT_SECS),
            version,
            stream: None,
            relisted: false,
        };
        w.open(self).await?;
        Ok(w)
    }
}

/// What the watch saw.
#[derive(Debug)]
#[allow(clippy::large_enum_variant)] // handled at once
enum Seen {
    /// The Lease as it now is.
    Lease(Lease),
    /// The Lease was deleted.
    Deleted,
}

/// A single-object watch of the Lease that survives the server ending it.
struct LeaseWatch {
    api: Api<Lease>,
    params: WatchParams,
    version: String,
    stream: Option<BoxStream<'static, Result<WatchEvent<Lease>, kube::Error>>>,
    /// The next event is the current state, not a change after `version` (the watch
    /// was restarted from nothing after `410 Gone`).
    relisted: bool,
}

impl LeaseWatch {
    /// Opens the watch; a refusal is an error, other failures are retried later.
    async fn open(&mut self, lease: &LeaseApi) -> Result<(), CliError> {
        match timeout(API_TIMEOUT, self.api.watch(&self.params, &self.version)).await {
            Ok(Ok(s)) => self.stream = Some(s.boxed()),
            Ok(Err(kube::Error::Api(s))) if s.code == 410 => {
                // Too old: from the current state (sent as ADDED).
                self.version.clear();
                self.relisted = true;
            }
            Ok(Err(e @ kube::Error::Api(_))) if crate::leases::is_fatal(&e) => {
                return Err(lease.error("watch", e));
            }
            Ok(Err(e)) => debug!(error = %e, "cannot watch the lease; retrying"),
            Err(_) => debug!("no answer to the watch; retrying"),
        }
        Ok(())
    }

    /// The next change of the Lease, and whether it is the current state after a
    /// restart of the watch rather than the next change in order.
    async fn next(&mut self, lease: &LeaseApi) -> Result<(Seen, bool), CliError> {
        loop {
            let Some(stream) = &mut self.stream else {
                sleep(Duration::from_millis(200)).await;
                self.open(lease).await?;
                continue;
            };
            match stream.next().await {
                Some(Ok(WatchEvent::Added(l) | WatchEvent::Modified(l))) => {
                    self.version = l.metadata.resource_version.clone().unwrap_or_default();
                    return Ok((Seen::Lease(l), std::mem::take(&mut self.relisted)));
                }
                Some(Ok(WatchEvent::Deleted(l))) => {
                    self.version = l.metadata.resource_version.unwrap_or_default();
                    return Ok((Seen::Deleted, std::mem::take(&mut self.relisted)));
                }
                Some(Ok(WatchEvent::Bookmark(b))) => self.version = b.metadata.resource_version,
                Some(Ok(WatchEvent::Error(s))) => {
                    debug!(code = s.code, message = %s.message, "the watch failed; watching again");
                    if s.code == 410 {
                        self.version.clear();
                        self.relisted = true;
                    }
                    self.stream = None;
                }
                Some(Err(e)) => {
                    debug!(error = %e, "the watch failed; watching again");
                    self.stream = None;
                }
                None => self.stream = None,
            }
        }
    }
}

/// The Lease without a handoff annotation.
fn without_handoff(mut lease: Lease) -> Lease {
    if let Some(a) = &mut lease.metadata.annotations {
        a.remove(HANDOFF_ANNOTATION);
    }
    lease
}

/// The Lease with `h` as its handoff annotation.
fn with_handoff(mut lease: Lease, h: &Handoff) -> Lease {
    lease
        .metadata
        .annotations
        .get_or_insert_default()
        .insert(HANDOFF_ANNOTATION.to_owned(), h.to_annotation());
    lease
}

/// Why a handoff of `lease` (named `name`) to `to` cannot be requested, if it cannot.
fn refusal(lease: &Lease, name: &str, to: Option<&str>, now: Timestamp) -> Option<String> {
    let r = LeaderRecord::from_lease(lease);
    let Some(holder) = r.holder() else {
        return Some(format!(
            "lease `{name}` has no holder: there is nothing to hand over (a candidate takes a free Lease by itself)"
        ));
    };
    if let Some(s) = r.strategy.as_deref().filter(|s| !s.is_empty()) {
        return Some(format!(
            "lease `{name}` is run by coordinated leader election (strategy {}): its controller picks the holder, and candidates do not accept handoffs on it",
            printable(s)
        ));
    }
    if let Some(h) = &r.handoff {
        return Some(pending(name, h, now));
    }
    if to == Some(holder) {
        return Some(format!(
            "{} already holds lease `{name}`: nothing to hand over",
            printable(holder)
        ));
    }
    None
}

/// A pending handoff, in words: to whom, since when, and what to do.
fn pending(name: &str, h: &Handoff, now: Timestamp) -> String {
    let view = HandoffView::new(h);
    let since = match requested_at(&h.id) {
        Some(at) => format!(
            "since {} ({} s ago)",
            at.strftime("%Y-%m-%dT%H:%M:%SZ"),
            now.duration_since(at).as_secs().max(0)
        ),
        None => "since an unknown time".to_owned(),
    };
    let what = view.cell();
    match h.state {
        HandoffState::Transferred => format!(
            "a handoff of lease `{name}` is pending ({what}, {since}): it completes with the new holder's first write, or, if that never comes, by an ordinary election once the transferred record expires"
        ),
        _ => format!(
            "a handoff of lease `{name}` is pending ({what}, {since}): wait for it, or withdraw it with `leaderz handoff {name} --cancel`"
        ),
    }
}

/// How far the handoff has come.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Phase {
    /// Requested; nobody has accepted yet.
    Requested,
    /// Accepted by `by`; waiting for the holder to transfer the Lease.
    Accepted { by: String },
    /// Transferred to `to`; waiting for its first write.
    Transferred { to: String },
}

impl Phase {
    /// The candidate the Lease goes to, once known.
    fn target<'a>(&'a self, named: Option<&'a str>) -> Option<&'a str> {
        match self {
            Phase::Requested => named,
            Phase::Accepted { by } => Some(by),
            Phase::Transferred { to } => Some(to),
        }
    }
}

/// What a state of the Lease means for the handoff with id `id`.
#[derive(Debug, PartialEq, Eq)]
enum Verdict {
    /// Still under way (the phase may have moved on).
    Wait,
    /// Done: `holder` leads, in term `transitions`.
    Done { holder: String, transitions: i32 },
    /// It cannot complete, for this reason.
    Failed(String),
}

/// Reads `seen` for the handoff `id` requested on `before`, moving `phase` on.
fn evaluate(
    seen: &Seen,
    name: &str,
    id: &str,
    named: Option<&str>,
    before: &LeaderRecord,
    phase: &mut Phase,
) -> Verdict {
    let Seen::Lease(lease) = seen else {
        return Verdict::Failed(format!(
            "lease `{name}` was deleted while it was being handed over"
        ));
    };
    let r = LeaderRecord::from_lease(lease);
    let old = printable(&before.holder_identity).into_owned();
    match &r.handoff {
        Some(h) if h.id == id => {
            let to = h.to.clone().unwrap_or_default();
            let next = match h.state {
                HandoffState::Accepted => Some(Phase::Accepted { by: to }),
                HandoffState::Transferred => Some(Phase::Transferred { to }),
                // Requested, or a step this version does not know: nothing to do yet.
                _ => None,
            };
            if let Some(next) = next.filter(|n| n != phase) {
                match &next {
                    Phase::Accepted { by } => {
                        info!(candidate = %by, holder = %old, "accepted; waiting for the holder to hand over");
                    }
                    Phase::Transferred { to } => {
                        info!(to = %to, "the holder stopped its work and transferred the lease; waiting for the new holder");
                    }
                    Phase::Requested => {}
                }
                *phase = next;
            }
            Verdict::Wait
        }
        Some(other) => Verdict::Failed(format!(
            "another handoff replaced this request on lease `{name}`: {}",
            HandoffView::new(other).cell()
        )),
        None => {
            let holder = r.holder();
            let moved = r.lease_transitions > before.lease_transitions;
            match (holder, phase.target(named)) {
                (Some(h), Some(t)) if h == t && moved => Verdict::Done {
                    holder: h.to_owned(),
                    transitions: r.lease_transitions,
                },
                _ if r.holder_identity == before.holder_identity && !moved => {
                    Verdict::Failed(format!(
                        "the request was withdrawn by someone else (`leaderz handoff {name} --cancel`?); {old} still holds lease `{name}`"
                    ))
                }
                (now, _) => {
                    let now = now.map_or_else(
                        || "nobody holds it (it was released)".to_owned(),
                        |h| format!("it is now held by {}", printable(h)),
                    );
                    let how = match phase {
                        Phase::Transferred { to } => format!(
                            "{old} transferred it to {}, which never started its term, and the Lease went to an ordinary election: ",
                            printable(to)
                        ),
                        _ => "it changed hands otherwise: ".to_owned(),
                    };
                    Verdict::Failed(format!(
                        "lease `{name}` was not handed over as asked: {how}{now}"
                    ))
                }
            }
        }
    }
}

/// What `--output json` prints when the handover completed.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct Completed<'a> {
    lease: &'a str,
    namespace: &'a str,
    from: &'a str,
    to: &'a str,
    id: &'a str,
    /// From sending the request to seeing the new holder's first write.
    elapsed_seconds: f64,
    lease_transitions_before: i32,
    lease_transitions_after: i32,
}

/// Requests the handoff of `current`, waits for it, and prints the outcome.
async fn request(
    lease: &LeaseApi,
    mut current: Lease,
    to: Option<String>,
    args: &HandoffArgs,
    signals: &mut Signals,
) -> Result<u8, CliError> {
    let name = lease.name.as_str();
    let refuse = |l: &Lease| match refusal(l, name, to.as_deref(), Timestamp::now()) {
        Some(why) => Err(CliError::Handoff(why)),
        None => Ok(()),
    };
    refuse(&current)?;
    let version = current
        .metadata
        .resource_version
        .clone()
        .unwrap_or_default();
    let mut watch = lease.watch(version).await?;

    let id = new_id(Timestamp::now());
    let request = Handoff::request(to.clone(), id.clone());
    let mut attempts = 0;
    let (before, requested, written) = loop {
        let before = LeaderRecord::from_lease(&current);
        let sent = Instant::now();
        if let Some(w) = lease
            .replace(with_handoff(current.clone(), &request))
            .await?
        {
            break (
                before,
                sent,
                w.metadata.resource_version.unwrap_or_default(),
            );
        }
        attempts += 1;
        if attempts >= ATTEMPTS {
            return Err(CliError::Api(format!(
                "lease `{name}` kept changing; could not write the request in {ATTEMPTS} attempts"
            )));
        }
        current = lease.get().await?.ok_or_else(|| lease.not_found())?;
        refuse(&current)?;
    };
    let from = before.holder_identity.clone();
    info!(
        id = %id,
        holder = %from,
        to = to.as_deref().unwrap_or("<any candidate>"),
        "requested the handoff; waiting for a candidate to accept"
    );
    let total = args.timeout.unwrap_or_else(|| default_timeout(&before));
    let accept_by = requested + args.accept_timeout.min(total);
    let give_up_at = requested + total;
    let mut phase = Phase::Requested;
    // The watch started before the request was written (from the version first read):
    // changes from before it (a renewal that made the first write conflict) say
    // nothing about the request. Our own write, or anything naming our request, or the
    // current state after a restart of the watch, comes after it.
    let mut caught_up = false;

    loop {
        let deadline = if phase == Phase::Requested {
            accept_by
        } else {
            give_up_at
        };
        let seen = tokio::select! {
            signal = signals.recv() => {
                let note = match withdraw(lease, &id).await {
                    Ok(Withdrawal::Withdrawn) => "withdrew the request".to_owned(),
                    Ok(Withdrawal::Moved(_)) => "the request could no longer be withdrawn".to_owned(),
                    Err(e) => format!("could not withdraw the request: {e}"),
                };
                return Err(CliError::Handoff(format!("interrupted by {signal}; {note}")));
            }
            () = sleep_until(deadline) => {
                match (&phase, withdraw_unless_transferred(lease, &id, &phase).await?) {
                    (_, Withdrawal::Moved(seen)) => seen,
                    (Phase::Requested, Withdrawal::Withdrawn) => {
                        let who = match &to {
                            Some(t) => format!("no leaderz candidate named {} answered", printable(t)),
                            None => "no leaderz candidate answered".to_owned(),
                        };
                        return Err(CliError::Handoff(format!(
                            "{who} within {} (is it running and watching lease `{name}`? client-go candidates do not take part in handoffs); withdrew the request",
                            humantime::format_duration(args.accept_timeout.min(total))
                        )));
                    }
                    (Phase::Accepted { by }, Withdrawal::Withdrawn) => {
                        return Err(CliError::Handoff(format!(
                            "the holder {} did not hand lease `{name}` over to {} within {} (a client-go holder ignores handoffs; a leaderz holder hands over at its next renewal); withdrew the request",
                            printable(&from),
                            printable(by),
                            humantime::format_duration(total)
                        )));
                    }
                    (Phase::Transferred { to }, Withdrawal::Withdrawn) => {
                        return Err(CliError::Handoff(format!(
                            "{} transferred lease `{name}` to {}, which has not started its term within {}; if it never does, the Lease goes to an ordinary election once the transferred record expires",
                            printable(&from),
                            printable(to),
                            humantime::format_duration(total)
                        )));
                    }
                }
            }
            seen = watch.next(lease) => {
                let (seen, fresh) = seen?;
                if !caught_up {
                    caught_up = fresh
                        || match &seen {
                            Seen::Lease(l) => {
                                l.metadata.resource_version.as_deref() == Some(&written)
                                    || LeaderRecord::from_lease(l)
                                        .handoff
                                        .is_some_and(|h| h.id == id)
                            }
                            Seen::Deleted => true,
                        };
                    if !caught_up {
                        debug!("a change from before the request was written; skipped");
                        continue;
                    }
                }
                seen
            }
        };
        match evaluate(&seen, name, &id, to.as_deref(), &before, &mut phase) {
            Verdict::Wait => {}
            Verdict::Failed(why) => return Err(CliError::Handoff(why)),
            Verdict::Done {
                holder,
                transitions,
            } => {
                let elapsed = requested.elapsed();
                let done = Completed {
                    lease: name,
                    namespace: &lease.namespace,
                    from: &from,
                    to: &holder,
                    id: &id,
                    elapsed_seconds: (elapsed.as_secs_f64() * 1000.0).round() / 1000.0,
                    lease_transitions_before: before.lease_transitions,
                    lease_transitions_after: transitions,
                };
                let line = match args.output.format {
                    Output::Json => serde_json::to_string(&done).unwrap_or_default(),
                    Output::Table => format!(
                        "handed lease `{name}` in namespace `{}` over from {} to {} in {} ms (leaseTransitions {} -> {})",
                        lease.namespace,
                        printable(&from),
                        printable(&holder),
                        elapsed.as_millis(),
                        before.lease_transitions,
                        transitions
                    ),
                };
                println!("{line}");
                return Ok(0);
            }
        }
    }
}

/// `--timeout`'s default: twice the Lease's duration (the holder's next renewal comes
/// well within one) plus some slack.
fn default_timeout(before: &LeaderRecord) -> Duration {
    let secs = before
        .lease_duration_seconds
        .and_then(|s| u64::try_from(s).ok())
        .filter(|s| *s > 0)
        .unwrap_or(DEFAULT_LEASE_SECONDS);
    Duration::from_secs(2 * secs) + TIMEOUT_SLACK
}

/// The outcome of a withdrawal.
#[derive(Debug)]
#[allow(clippy::large_enum_variant)] // handled at once
enum Withdrawal {
    /// The request was ours and is gone.
    Withdrawn,
    /// The request had moved on (or was not ours any more): the Lease as read.
    Moved(Seen),
}

/// Withdraws handoff `id` unless the Lease was already transferred (it would then name
/// a holder whose term nobody starts: only its expiry would end it).
async fn withdraw_unless_transferred(
    lease: &LeaseApi,
    id: &str,
    phase: &Phase,
) -> Result<Withdrawal, CliError> {
    if matches!(phase, Phase::Transferred { .. }) {
        return Ok(Withdrawal::Withdrawn);
    }
    withdraw(lease, id).await
}

/// Removes the annotation if it still holds request `id`, requested or accepted;
/// otherwise reports the Lease as it is.
async fn withdraw(lease: &LeaseApi, id: &str) -> Result<Withdrawal, CliError> {
    for _ in 0..ATTEMPTS {
        let Some(current) = lease.get().await? else {
            return Ok(Withdrawal::Moved(Seen::Deleted));
        };
        let ours = LeaderRecord::from_lease(&current)
            .handoff
            .is_some_and(|h| h.id == id && h.state != HandoffState::Transferred);
        if !ours {
            return Ok(Withdrawal::Moved(Seen::Lease(current)));
        }
        if lease.replace(without_handoff(current)).await?.is_some() {
            info!(id, "withdrew the handoff request");
            return Ok(Withdrawal::Withdrawn);
        }
    }
    warn!(
        id,
        "could not withdraw the handoff request: the lease kept changing"
    );
    Err(CliError::Api(format!(
        "lease `{}` kept changing; could not withdraw request {id}",
        lease.name
    )))
}

/// `--cancel`: withdraws the pending handoff, whoever requested it, unless it was
/// already transferred.
async fn cancel(lease: &LeaseApi, mut current: Lease, format: Output) -> Result<u8, CliError> {
    let name = &lease.name;
    for _ in 0..ATTEMPTS {
        let Some(h) = LeaderRecord::from_lease(&current).handoff else {
            return Err(CliError::Handoff(format!(
                "no handoff of lease `{name}` is pending: nothing to withdraw"
            )));
        };
        if h.state == HandoffState::Transferred {
            return Err(CliError::Handoff(format!(
                "the handoff of lease `{name}` cannot be withdrawn any more: {}",
                pending(name, &h, Timestamp::now())
            )));
        }
        if lease
            .replace(without_handoff(current.clone()))
            .await?
            .is_some()
        {
            let view = HandoffView::new(&h);
            let line = match format {
                Output::Json => serde_json::to_string(&serde_json::json!({
                    "lease": name,
                    "namespace": lease.namespace,
                    "withdrawn": view,
                }))
                .unwrap_or_default(),
                Output::Table => format!(
                    "withdrew the handoff of lease `{name}` in namespace `{}`: {}",
                    lease.namespace,
                    view.cell()
                ),
            };
            println!("{line}");
            return Ok(0);
        }
        current = lease.get().await?.ok_or_else(|| lease.not_found())?;
    }
    Err(CliError::Api(format!(
        "lease `{name}` kept changing; could not withdraw its handoff"
    )))
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::coordination::v1::LeaseSpec;
    use kube::api::ObjectMeta;

    fn ts(s: &str) -> Timestamp {
        s.parse().unwrap()
    }

    fn lease(holder: &str, transitions: i32, handoff: Option<&Handoff>) -> Lease {
        let l = Lease {
            metadata: ObjectMeta {
                name: Some("l".into()),
                ..Default::default()
            },
            spec: Some(LeaseSpec {
                holder_identity: Some(holder.into()),
                lease_duration_seconds: Some(3),
                lease_transitions: Some(transitions),
                ..Default::default()
            }),
        };
        match handoff {
            Some(h) => with_handoff(l, h),
            None => l,
        }
    }

    #[test]
    fn ids_carry_the_time_of_the_request() {
        let at = ts("2025-01-02T03:04:05.123456Z");
        let id = new_id(at);
        assert!(id.starts_with("2025-01-02T03:04:05.123456Z-"), "{id}");
        assert_eq!(requested_at(&id), Some(at));
        assert_eq!(requested_at("h1"), None);
        assert_eq!(requested_at("some-thing"), None);
    }

    #[test]
    fn targets_are_checked_before_anything_is_sent() {
        assert_eq!(check_target("pod-b").unwrap(), "pod-b");
        for bad in ["", "  "] {
            let e = check_target(bad).unwrap_err();
            assert_eq!(e.exit_code(), 2);
            assert!(e.to_string().starts_with("--to is empty"), "{e}");
        }
        let e = check_target("a\nb").unwrap_err();
        assert_eq!(
            e.to_string(),
            "invalid --to `a\\nb`: it contains the control character \\u{a}; identities are printable"
        );
    }

    #[test]
    fn requests_are_refused_when_nothing_can_be_handed_over() {
        let now = ts("2025-01-02T03:04:15Z");
        assert_eq!(refusal(&lease("a", 0, None), "l", Some("b"), now), None);
        assert_eq!(refusal(&lease("a", 0, None), "l", None, now), None);
        let why = refusal(&lease("", 0, None), "l", Some("b"), now).unwrap();
        assert!(why.starts_with("lease `l` has no holder"), "{why}");
        let why = refusal(&lease("a", 0, None), "l", Some("a"), now).unwrap();
        assert_eq!(why, "a already holds lease `l`: nothing to hand over");
        let h = Handoff::request(Some("c".into()), new_id(ts("2025-01-02T03:04:05Z")));
        let why = refusal(&lease("a", 0, Some(&h)), "l", Some("b"), now).unwrap();
        assert!(
            why.starts_with("a handoff of lease `l` is pending (requested for c (id 2025-01-02T03:04:05.000000Z-")
                && why.ends_with(
                    "), since 2025-01-02T03:04:05Z (10 s ago)): wait for it, or withdraw it with `leaderz handoff l --cancel`"
                ),
            "{why}"
        );
        let t = h.step(HandoffState::Transferred, "c");
        let why = refusal(&lease("c", 1, Some(&t)), "l", Some("b"), now).unwrap();
        assert!(
            why.contains("transferred to c") && !why.contains("--cancel"),
            "{why}"
        );
        let mut coordinated = lease("a", 0, None);
        coordinated.spec.as_mut().unwrap().strategy = Some("OldestEmulationVersion".into());
        let why = refusal(&coordinated, "l", Some("b"), now).unwrap();
        assert!(why.contains("coordinated leader election"), "{why}");
    }

    #[test]
    fn the_handoff_is_done_at_the_new_holders_own_write() {
        let before = LeaderRecord::from_lease(&lease("a", 4, None));
        let req = Handoff::request(Some("b".into()), "id1");
        let mut phase = Phase::Requested;
        let eval = |l: Lease, phase: &mut Phase| {
            evaluate(&Seen::Lease(l), "l", "id1", Some("b"), &before, phase)
        };
        assert_eq!(eval(lease("a", 4, Some(&req)), &mut phase), Verdict::Wait);
        assert_eq!(phase, Phase::Requested);
        let acc = req.step(HandoffState::Accepted, "b");
        assert_eq!(eval(lease("a", 4, Some(&acc)), &mut phase), Verdict::Wait);
        assert_eq!(phase, Phase::Accepted { by: "b".into() });
        let tr = req.step(HandoffState::Transferred, "b");
        assert_eq!(eval(lease("b", 5, Some(&tr)), &mut phase), Verdict::Wait);
        assert_eq!(phase, Phase::Transferred { to: "b".into() });
        assert_eq!(
            eval(lease("b", 5, None), &mut phase),
            Verdict::Done {
                holder: "b".into(),
                transitions: 5
            }
        );
    }

    #[test]
    fn a_handoff_to_anyone_is_done_for_whoever_accepted() {
        let before = LeaderRecord::from_lease(&lease("a", 0, None));
        let req = Handoff::request(None, "id1");
        let mut phase = Phase::Requested;
        let acc = req.step(HandoffState::Accepted, "c");
        let seen = Seen::Lease(lease("a", 0, Some(&acc)));
        assert_eq!(
            evaluate(&seen, "l", "id1", None, &before, &mut phase),
            Verdict::Wait
        );
        let seen = Seen::Lease(lease("c", 1, None));
        assert!(matches!(
            evaluate(&seen, "l", "id1", None, &before, &mut phase),
            Verdict::Done { holder, .. } if holder == "c"
        ));
    }

    #[test]
    fn other_outcomes_fail_with_what_happened() {
        let before = LeaderRecord::from_lease(&lease("a", 4, None));
        let fail = |seen: Seen, mut phase: Phase| match evaluate(
            &seen,
            "l",
            "id1",
            Some("b"),
            &before,
            &mut phase,
        ) {
            Verdict::Failed(why) => why,
            other => panic!("{other:?}"),
        };
        let why = fail(Seen::Lease(lease("a", 4, None)), Phase::Requested);
        assert!(
            why.starts_with("the request was withdrawn by someone else"),
            "{why}"
        );
        let why = fail(Seen::Deleted, Phase::Requested);
        assert_eq!(why, "lease `l` was deleted while it was being handed over");
        let other = Handoff::request(Some("c".into()), "id2");
        let why = fail(Seen::Lease(lease("a", 4, Some(&other))), Phase::Requested);
        assert!(
            why.contains("another handoff replaced this request"),
            "{why}"
        );
        let why = fail(
            Seen::Lease(lease("c", 6, None)),
            Phase::Transferred { to: "b".into() },
        );
        assert_eq!(
            why,
            "lease `l` was not handed over as asked: a transferred it to b, which never started its term, and the Lease went to an ordinary election: it is now held by c"
        );
        let why = fail(
            Seen::Lease(lease("", 4, None)),
            Phase::Accepted { by: "b".into() },
        );
        assert!(
            why.ends_with("it changed hands otherwise: nobody holds it (it was released)"),
            "{why}"
        );
    }

    #[test]
    fn the_default_timeout_covers_two_lease_durations() {
        let r = |s| LeaderRecord {
            lease_duration_seconds: s,
            ..Default::default()
        };
        assert_eq!(default_timeout(&r(Some(3))), Duration::from_secs(16));
        assert_eq!(default_timeout(&r(None)), Duration::from_secs(40));
        assert_eq!(default_timeout(&r(Some(-1))), Duration::from_secs(40));
    }
}
