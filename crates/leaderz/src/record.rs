//! The leader record: what a Lease says, how it maps to and from `LeaseSpec`, and
//! when an observed record expires.
//!
//! This is the one place where expiry is decided ([`Observed::expires_at`]).
//!
//! # Garbage in a Lease
//!
//! Anyone with `update` on a Lease can write anything the API server accepts into it.
//! The rules, chosen so that a bad record can never make us take over sooner than a
//! well-formed one from a holder with our own settings would:
//!
//! | what the Lease says | how it is read |
//! |---|---|
//! | no `spec`, or no/empty `holderIdentity` | no holder: free to take |
//! | `leaseDurationSeconds` missing, zero or negative | our own `lease_duration` |
//! | `leaseDurationSeconds` shorter than ours | our own `lease_duration` (never shorter) |
//! | `leaseDurationSeconds` longer than `max_record_duration` | `max_record_duration` |
//! | `leaseTransitions` missing or negative | 0 |
//! | `leaseTransitions` at `i32::MAX` | kept (cannot rise); taking over is refused and reported until it is fixed, see [`TakeoverError`] |
//! | `holderIdentity` is our identity, but this process did not write the record | someone else's (a restarted pod, or another process with our identity): valid until it expires |
//! | a holder replaced by another without a release, or its record edited without a renewal (an admin) | valid at least as long as the record it replaced ([`Observed::carried`]) |
//! | `acquireTime`/`renewTime` missing or in the future/past | ignored: times only tell that the record changed |
//!
//! Odd durations are logged once per record version ([`LeaderRecord::oddity`]).
//! The cap exists so that garbage cannot stall an election for decades; it also means
//! a real holder whose lease duration exceeds `max_record_duration` (1 h by default)
//! is not supported: raise the cap above every candidate's lease duration.
//! Honouring a longer record duration than our own is what client-go does; refusing a
//! shorter one is leaderz's own, safer rule (client-go would take over sooner).

use std::sync::Arc;
use std::time::Duration;

use jiff::Timestamp;
use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use tokio::time::Instant;

/// A Lease's leader-election fields, as client-go's `LeaderElectionRecord` holds them.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LeaderRecord {
    /// Who holds the lease; empty when nobody does (after a release).
    pub holder_identity: String,
    /// `leaseDurationSeconds` as written (may be garbage: see the module docs).
    pub lease_duration_seconds: Option<i32>,
    /// When the current holder acquired the lease.
    pub acquire_time: Option<Timestamp>,
    /// When the current holder last renewed the lease.
    pub renew_time: Option<Timestamp>,
    /// How many times the lease changed hands (`leaseTransitions`); leaderz's fencing token.
    pub lease_transitions: i32,
    /// `preferredHolder` (coordinated election): whom the Lease's `strategy` wants to
    /// hold it. A holder that is not it steps down. leaderz keeps it as read on renewals.
    pub preferred_holder: Option<String>,
    /// `strategy` (coordinated election): set by the coordinated-election controller.
    /// leaderz keeps it as read on every write (client-go's non-coordinated writes clear
    /// it, which fights a running controller).
    pub strategy: Option<String>,
    /// A planned handover in progress (the Lease's `leaderz.io/handoff` annotation; see
    /// [`Handoff`]).
    pub handoff: Option<Handoff>,
}

/// The annotation that carries a planned handover ([`Handoff`]).
pub const HANDOFF_ANNOTATION: &str = "leaderz.io/handoff";

/// A planned handover (`leaderz handoff`), carried in the Lease's
/// [`leaderz.io/handoff`](HANDOFF_ANNOTATION) annotation as JSON, e.g.
/// `{"state":"requested","to":"pod-b","id":"4f2a…"}`.
///
/// 1. Someone **requests** it (`to`: the candidate to hand over to, or none for any).
/// 2. That candidate, watching the Lease, **accepts** it (`to` is then its identity):
///    proof that it is alive and a leaderz candidate of this Lease.
/// 3. The holder ends its term, waits for its work to stop, and **transfers** the Lease:
///    it writes the accepted candidate as holder, with the next `leaseTransitions`.
/// 4. The new holder starts its term with its first write (which clears the annotation).
///
/// Candidates that do not know the protocol (client-go) ignore the annotation and keep
/// it on their writes; a transferred Lease names a valid holder to them, so they wait.
/// If the new holder never writes, the transferred record expires like any other.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[non_exhaustive]
pub struct Handoff {
    /// How far the handover has come.
    pub state: HandoffState,
    /// The candidate to hand over to (none: any candidate may accept a request).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub to: Option<String>,
    /// The request's id, so that steps of different requests are never mixed up.
    pub id: String,
}

/// The steps of a [`Handoff`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
#[non_exhaustive]
pub enum HandoffState {
    /// Asked for; no candidate has accepted yet.
    Requested,
    /// A candidate accepted; waiting for the holder to transfer the Lease.
    Accepted,
    /// The holder wrote the accepted candidate as the new holder.
    Transferred,
}

impl Handoff {
    /// A new request to hand over to `to` (none: any candidate).
    pub fn request(to: Option<String>, id: impl Into<String>) -> Self {
        Self {
            state: HandoffState::Requested,
            to,
            id: id.into(),
        }
    }

    /// Reads the annotation's value; `None` if it is not one (garbage is ignored).
    pub fn parse(value: &str) -> Option<Self> {
        serde_json::from_str(value).ok()
    }

    /// The annotation's value.
    pub fn to_annotation(&self) -> String {
        serde_json::to_string(self).unwrap_or_default()
    }

    /// This handover moved on to `state`, for candidate `to`.
    pub fn step(&self, state: HandoffState, to: &str) -> Self {
        Self {
            state,
            to: Some(to.to_owned()),
            id: self.id.clone(),
        }
    }
}

impl LeaderRecord {
    /// The holder, or `None` if nobody holds the lease.
    pub fn holder(&self) -> Option<&str> {
        (!self.holder_identity.is_empty()).then_some(self.holder_identity.as_str())
    }

    /// Reads a `LeaseSpec` (a missing spec reads as an empty record).
    pub fn from_spec(spec: Option<&LeaseSpec>) -> Self {
        let Some(spec) = spec else {
            return Self::default();
        };
        Self {
            holder_identity: spec.holder_identity.clone().unwrap_or_default(),
            lease_duration_seconds: spec.lease_duration_seconds,
            acquire_time: spec.acquire_time.as_ref().map(|t| t.0),
            renew_time: spec.renew_time.as_ref().map(|t| t.0),
            lease_transitions: spec.lease_transitions.unwrap_or(0).max(0),
            preferred_holder: spec.preferred_holder.clone(),
            strategy: spec.strategy.clone(),
            handoff: None,
        }
    }

    /// Reads a whole Lease: the spec, and the [handoff](Handoff) annotation.
    pub fn from_lease(lease: &Lease) -> Self {
        let handoff = lease
            .metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get(HANDOFF_ANNOTATION))
            .and_then(|v| Handoff::parse(v));
        Self {
            handoff,
            ..Self::from_spec(lease.spec.as_ref())
        }
    }

    /// Whether `identity` is asked to step down: the Lease has a strategy (coordinated
    /// election, or a third-party controller) whose preferred holder is someone else.
    pub fn prefers_other_than(&self, identity: &str) -> bool {
        self.strategy.as_deref().is_some_and(|s| !s.is_empty())
            && self
                .preferred_holder
                .as_deref()
                .is_some_and(|p| !p.is_empty() && p != identity)
    }

    /// Writes the record as client-go does: every field set, times in microseconds,
    /// `holderIdentity: ""` (not null) when nobody holds it.
    pub fn to_spec(&self) -> LeaseSpec {
        LeaseSpec {
            holder_identity: Some(self.holder_identity.clone()),
            lease_duration_seconds: self.lease_duration_seconds,
            acquire_time: self.acquire_time.map(micro_time),
            renew_time: self.renew_time.map(micro_time),
            lease_transitions: Some(self.lease_transitions),
            preferred_holder: self.preferred_holder.clone(),
            strategy: self.strategy.clone(),
        }
    }

    /// How long this record keeps its holder valid after it was observed, by the rules
    /// in the module docs: never shorter than `own`, never longer than `max`.
    pub fn effective_duration(&self, own: Duration, max: Duration) -> Duration {
        self.written_duration().clamp(own, max)
    }

    fn written_duration(&self) -> Duration {
        self.lease_duration_seconds
            .and_then(|s| u64::try_from(s).ok())
            .map(Duration::from_secs)
            .unwrap_or(Duration::ZERO)
    }

    /// What is odd about a held record, by the rules in the module docs, if anything:
    /// for a warning (the elector logs it once per record version).
    pub fn oddity(&self, max: Duration) -> Option<String> {
        self.holder()?;
        match self.lease_duration_seconds {
            None => Some("the lease record has no leaseDurationSeconds; reading it as our own lease duration".into()),
            Some(s) if s <= 0 => Some(format!(
                "the lease record's leaseDurationSeconds is {s}; reading it as our own lease duration"
            )),
            Some(s) if self.written_duration() > max => Some(format!(
                "the lease record's leaseDurationSeconds ({s}) is longer than max_record_duration ({}s); capping it",
                max.as_secs()
            )),
            Some(_) => None,
        }
    }
}

/// Why a lease cannot be taken over even though it is free. The elector keeps running
/// (as a follower), reports it in [`Status::problem`](crate::Status::problem), its logs and
/// the `leaderz_api_errors_total{kind="transitions_exhausted"}` metric, and takes the lease
/// as soon as it is fixed.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum TakeoverError {
    /// `leaseTransitions` is `i32::MAX`, so the fencing token could not rise.
    #[error(
        "leaseTransitions is at its maximum (2147483647); the fencing token cannot rise: delete the Lease to reset it (kubectl delete lease <name>)"
    )]
    TransitionsExhausted,
}

/// Formats a timestamp as a Kubernetes MicroTime value (microseconds, UTC, `Z`).
pub fn micro_time(t: Timestamp) -> MicroTime {
    // Truncate to microseconds so that what we hold equals what we read back.
    let micros = t.as_microsecond();
    MicroTime(Timestamp::from_microsecond(micros).unwrap_or(t))
}

/// The current wall-clock time at MicroTime's resolution: only ever written into a
/// record, never used to judge expiry.
pub(crate) fn now_micros() -> Timestamp {
    let now = Timestamp::now();
    Timestamp::from_microsecond(now.as_microsecond()).unwrap_or(now)
}

/// A record as this process saw it, and when (on the local monotonic clock).
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub struct Observed {
    /// The record.
    pub record: LeaderRecord,
    /// The version it was read at (the Lease's `resourceVersion`).
    pub version: String,
    /// When this process first saw the record in this form (a new version with the same
    /// record, e.g. after a label edit, keeps the earlier time).
    pub observed_at: Instant,
    /// The whole Lease it came from, if it came from one (kept so that a write on it
    /// preserves labels, annotations and owners).
    pub lease: Option<Arc<Lease>>,
    /// The lease duration of the record this one replaced, when it replaced a holder
    /// by another without a release in between, or edited the holder's record without
    /// renewing it (same renewTime): this record is valid at least that long. Normally
    /// the old holder's term is over by then (it was taken over after it expired); but
    /// when someone else overwrote the record (an admin, garbage) the holder may still
    /// lead until its own deadline, which its own, possibly longer, duration bounds.
    /// Only the holder's own renewals (a new renewTime) speak for its duration.
    pub carried: Duration,
}

impl Observed {
    /// The instant after which the record's holder no longer holds it in this process's
    /// eyes: `observed_at` plus the record's own (sanitised) duration, or the duration
    /// [carried](Observed::carried) from the holder it replaced if longer. This is the
    /// only expiry rule in leaderz; renewTime is never compared with the local clock.
    pub fn expires_at(&self, own: Duration, max: Duration) -> Instant {
        self.observed_at + self.duration(own, max)
    }

    /// How long the record is valid after it was observed (see [`Observed::expires_at`]).
    pub fn duration(&self, own: Duration, max: Duration) -> Duration {
        self.record
            .effective_duration(own, max)
            .max(self.carried.min(max))
    }

    /// Whether someone holds the record and it has not expired at `now`.
    pub fn is_held_at(&self, now: Instant, own: Duration, max: Duration) -> bool {
        self.record.holder().is_some() && now < self.expires_at(own, max)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn micro_time_is_formatted_exactly_as_client_go_writes_it() {
        let t: Timestamp = "2020-03-06T19:38:10.890381Z".parse().unwrap();
        let json = serde_json::to_string(&micro_time(t)).unwrap();
        assert_eq!(json, "\"2020-03-06T19:38:10.890381Z\"");
        // Nanoseconds are truncated, whole seconds keep six zeros.
        let t: Timestamp = "2020-03-06T19:38:10.890381999Z".parse().unwrap();
        assert_eq!(
            serde_json::to_string(&micro_time(t)).unwrap(),
            "\"2020-03-06T19:38:10.890381Z\""
        );
        let t: Timestamp = "2020-03-06T19:38:10Z".parse().unwrap();
        assert_eq!(
            serde_json::to_string(&micro_time(t)).unwrap(),
            "\"2020-03-06T19:38:10.000000Z\""
        );
    }

    #[test]
    fn spec_json_matches_client_go_field_for_field() {
        let rec = LeaderRecord {
            holder_identity: "pod-a".into(),
            lease_duration_seconds: Some(15),
            acquire_time: Some("2020-03-06T19:38:10.890381Z".parse().unwrap()),
            renew_time: Some("2020-03-06T19:38:12.000001Z".parse().unwrap()),
            lease_transitions: 3,
            preferred_holder: None,
            strategy: None,
            handoff: None,
        };
        let json = serde_json::to_value(rec.to_spec()).unwrap();
        assert_eq!(
            json,
            serde_json::json!({
                "holderIdentity": "pod-a",
                "leaseDurationSeconds": 15,
                "acquireTime": "2020-03-06T19:38:10.890381Z",
                "renewTime": "2020-03-06T19:38:12.000001Z",
                "leaseTransitions": 3,
            })
        );
    }

    #[test]
    fn released_record_writes_empty_holder_not_null() {
        let rec = LeaderRecord {
            lease_duration_seconds: Some(1),
            ..Default::default()
        };
        let json = serde_json::to_value(rec.to_spec()).unwrap();
        assert_eq!(json["holderIdentity"], "");
        assert_eq!(rec.holder(), None);
    }

    #[test]
    fn missing_or_garbage_spec_reads_safely() {
        assert_eq!(LeaderRecord::from_spec(None), LeaderRecord::default());
        let spec = LeaseSpec {
            holder_identity: None,
            lease_transitions: Some(-7),
            ..Default::default()
        };
        let rec = LeaderRecord::from_spec(Some(&spec));
        assert_eq!(rec.holder(), None);
        assert_eq!(rec.lease_transitions, 0);
    }

    #[test]
    fn effective_duration_rules() {
        let own = Duration::from_secs(15);
        let max = Duration::from_secs(3600);
        let with = |s: Option<i32>| LeaderRecord {
            holder_identity: "x".into(),
            lease_duration_seconds: s,
            ..Default::default()
        };
        assert_eq!(with(None).effective_duration(own, max), own);
        assert_eq!(with(Some(0)).effective_duration(own, max), own);
        assert_eq!(with(Some(-5)).effective_duration(own, max), own);
        assert_eq!(with(Some(1)).effective_duration(own, max), own);
        assert_eq!(
            with(Some(137)).effective_duration(own, max),
            Duration::from_secs(137)
        );
        assert_eq!(with(Some(i32::MAX)).effective_duration(own, max), max);
    }

    #[test]
    fn oddities_are_named() {
        let max = Duration::from_secs(3600);
        let with = |s: Option<i32>| LeaderRecord {
            holder_identity: "x".into(),
            lease_duration_seconds: s,
            ..Default::default()
        };
        assert!(
            with(None)
                .oddity(max)
                .unwrap()
                .contains("no leaseDurationSeconds")
        );
        assert!(with(Some(-1)).oddity(max).unwrap().contains("is -1"));
        assert!(
            with(Some(i32::MAX))
                .oddity(max)
                .unwrap()
                .contains("capping")
        );
        assert_eq!(with(Some(15)).oddity(max), None);
        // A released record has no holder to worry about.
        let released = LeaderRecord::default();
        assert_eq!(released.oddity(max), None);
    }

    fn arb_timestamp() -> impl Strategy<Value = Option<Timestamp>> {
        // Years 1 to 9999 at microsecond resolution: everything MicroTime can carry.
        proptest::option::of(
            (-62_135_596_800_000_000i64..253_402_300_799_000_000i64)
                .prop_map(|us| Timestamp::from_microsecond(us).unwrap()),
        )
    }

    proptest! {
        #[test]
        fn record_round_trips_through_spec_and_json(
            holder in "[a-z0-9-]{0,20}",
            dur in proptest::option::of(1i32..=i32::MAX),
            acquire in arb_timestamp(),
            renew in arb_timestamp(),
            transitions in 0i32..=i32::MAX,
        ) {
            let rec = LeaderRecord {
                holder_identity: holder,
                lease_duration_seconds: dur,
                acquire_time: acquire,
                renew_time: renew,
                lease_transitions: transitions,
                preferred_holder: None,
                strategy: None,
                handoff: None,
            };
            let spec = rec.to_spec();
            prop_assert_eq!(LeaderRecord::from_spec(Some(&spec)), rec.clone());
            let json = serde_json::to_string(&spec).unwrap();
            let back: LeaseSpec = serde_json::from_str(&json).unwrap();
            prop_assert_eq!(LeaderRecord::from_spec(Some(&back)), rec);
        }

        #[test]
        fn effective_duration_is_never_below_own(dur in proptest::option::of(any::<i32>()), own in 1u64..100_000) {
            let own = Duration::from_secs(own);
            let max = Duration::from_secs(100_000);
            let rec = LeaderRecord { lease_duration_seconds: dur, ..Default::default() };
            let d = rec.effective_duration(own, max);
            prop_assert!(d >= own && d <= max);
        }
    }
}
