//! Election timing and identity, checked once before an election starts.

use std::time::Duration;

/// The longest lease duration a Lease can carry (`leaseDurationSeconds` is an int32).
const MAX_LEASE_SECONDS: u64 = i32::MAX as u64;

/// client-go's jitter factor: the acquire loop waits up to 1.2 × `retry_period`,
/// and `renew_deadline` must exceed that.
const JITTER_FACTOR: f64 = 1.2;

/// How an election is timed and who takes part, with client-go's defaults.
///
/// Build it with [`ElectionConfig::new`] and the chainable setters; it is checked
/// by [`ElectionConfig::validate`] (which the elector calls for you), never by a panic.
///
/// ```
/// use std::time::Duration;
/// use leaderz::ElectionConfig;
///
/// let config = ElectionConfig::new("pod-a")
///     .lease_duration(Duration::from_secs(15))
///     .renew_deadline(Duration::from_secs(10))
///     .retry_period(Duration::from_secs(2));
/// assert!(config.validate().is_ok());
/// ```
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub struct ElectionConfig {
    /// Who this candidate is; written as the Lease's `holderIdentity`. Must be unique
    /// among candidates (a pod name is), not blank, and free of control characters
    /// (newlines, escapes: they would corrupt logs and `kubectl` output). The API sets no
    /// length limit on `holderIdentity` beyond the object's size; keep it readable.
    pub identity: String,
    /// How long followers wait, from when they observed the last renewal, before they
    /// may take the lease over. Whole seconds: the Lease stores whole seconds.
    pub lease_duration: Duration,
    /// How long the leader keeps leading without a successful renewal. Measured from
    /// the send time of its last successful renewal; when it passes, the term ends.
    pub renew_deadline: Duration,
    /// How often the leader renews (unless [`renew_interval`](Self::renew_interval) is
    /// set), how soon it retries a failed renewal, and how often followers poll when they
    /// cannot watch.
    pub retry_period: Duration,
    /// How often the leader renews while renewals succeed; a failed renewal is retried
    /// every `retry_period` until the renew deadline. `None` (the default): every
    /// `retry_period`, as client-go does. A longer interval cuts the leader's API load
    /// (one write per interval; client-go #125861) without touching safety, which rests
    /// on `renew_deadline` and `lease_duration` alone; it must leave room for a retry:
    /// `renew_interval + 1.2 × retry_period < renew_deadline`. The price is slack: a
    /// renewal is sent `renew_interval` after the last good one, so an API server slower
    /// than `renew_deadline − renew_interval` (3 s at 10 s / 7 s) ends the term, where the
    /// default leaves a slow renewal the whole request timeout and a retry.
    pub renew_interval: Option<Duration>,
    /// The longest any single API call may be in flight before it is abandoned (at
    /// most half the renew deadline is used: a slower call is failing in effect, and a
    /// silently dead connection should be given up quickly). Time a call spends waiting
    /// in a [`leaderz::client`](crate::client) for a place among the requests in flight
    /// does not count; that wait is bounded by the renew deadline (for a leader's
    /// renewal: its term's).
    pub request_timeout: Duration,
    /// Release the lease on shutdown (after the work stopped) so a follower takes over
    /// at once instead of after `lease_duration`.
    pub release_on_cancel: bool,
    /// On shutdown, how long to wait for the leader's work to stop before giving up on
    /// releasing (the lease then expires on its own).
    pub shutdown_grace: Duration,
    /// Followers watch the Lease for changes (falling back to polling when the watch is
    /// forbidden or failing). Off: followers poll every `retry_period` like client-go.
    pub watch: bool,
    /// Longest `leaseDurationSeconds` from a Lease record that is honoured as written;
    /// longer ones (garbage, or a typo) are treated as this long. See [`crate::record`].
    pub max_record_duration: Duration,
    /// Coordinated leader election (KEP-4355): this candidate publishes a
    /// `LeaseCandidate` and never takes the Lease on its own; a controller in
    /// kube-apiserver names the holder. `None` (the default): an ordinary election.
    pub coordinated: Option<Coordinated>,
}

/// How a candidate takes part in coordinated leader election (KEP-4355): what it
/// publishes in its `coordination.k8s.io/v1beta1` `LeaseCandidate`, named after its
/// identity. Needs kube-apiserver with `--feature-gates=CoordinatedLeaderElection=true
/// --runtime-config=coordination.k8s.io/v1beta1=true`.
///
/// ```
/// let c = leaderz::config::Coordinated::new("1.34.0").emulation_version("1.33.0");
/// let config = leaderz::ElectionConfig::new("pod-a").coordinated(c);
/// assert!(config.validate().is_ok());
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct Coordinated {
    /// The candidate's binary version (`binaryVersion`), e.g. `1.34.0`.
    pub binary_version: String,
    /// The version it emulates (`emulationVersion`), at most the binary version. The
    /// built-in strategy elects the candidate with the lowest.
    pub emulation_version: String,
    /// The strategy it asks for: `OldestEmulationVersion` (built in), or a third-party
    /// strategy (a name with a `/`) that another controller carries out.
    pub strategy: String,
}

impl Coordinated {
    /// A candidate of `binary_version` that emulates it, with the built-in strategy.
    #[must_use]
    pub fn new(binary_version: impl Into<String>) -> Self {
        let binary_version = binary_version.into();
        Self {
            emulation_version: binary_version.clone(),
            binary_version,
            strategy: "OldestEmulationVersion".into(),
        }
    }

    /// Sets [`Coordinated::emulation_version`].
    #[must_use]
    pub fn emulation_version(mut self, v: impl Into<String>) -> Self {
        self.emulation_version = v.into();
        self
    }

    /// Sets [`Coordinated::strategy`].
    #[must_use]
    pub fn strategy(mut self, s: impl Into<String>) -> Self {
        self.strategy = s.into();
        self
    }
}

impl ElectionConfig {
    /// A configuration for `identity` with client-go's defaults: lease duration 15 s,
    /// renew deadline 10 s, retry period 2 s; release on cancel and watch on.
    #[must_use]
    pub fn new(identity: impl Into<String>) -> Self {
        Self {
            identity: identity.into(),
            lease_duration: Duration::from_secs(15),
            renew_deadline: Duration::from_secs(10),
            retry_period: Duration::from_secs(2),
            renew_interval: None,
            request_timeout: Duration::from_secs(5),
            release_on_cancel: true,
            shutdown_grace: Duration::from_secs(10),
            watch: true,
            max_record_duration: Duration::from_secs(3600),
            coordinated: None,
        }
    }

    /// Sets [`ElectionConfig::lease_duration`].
    #[must_use]
    pub fn lease_duration(mut self, d: Duration) -> Self {
        self.lease_duration = d;
        self
    }

    /// Sets [`ElectionConfig::renew_deadline`].
    #[must_use]
    pub fn renew_deadline(mut self, d: Duration) -> Self {
        self.renew_deadline = d;
        self
    }

    /// Sets [`ElectionConfig::retry_period`].
    #[must_use]
    pub fn retry_period(mut self, d: Duration) -> Self {
        self.retry_period = d;
        self
    }

    /// Sets [`ElectionConfig::renew_interval`].
    #[must_use]
    pub fn renew_interval(mut self, d: Duration) -> Self {
        self.renew_interval = Some(d);
        self
    }

    /// How often the leader renews while renewals succeed.
    pub fn renew_every(&self) -> Duration {
        self.renew_interval.unwrap_or(self.retry_period)
    }

    /// Sets [`ElectionConfig::request_timeout`].
    #[must_use]
    pub fn request_timeout(mut self, d: Duration) -> Self {
        self.request_timeout = d;
        self
    }

    /// Sets [`ElectionConfig::release_on_cancel`].
    #[must_use]
    pub fn release_on_cancel(mut self, release: bool) -> Self {
        self.release_on_cancel = release;
        self
    }

    /// Sets [`ElectionConfig::shutdown_grace`].
    #[must_use]
    pub fn shutdown_grace(mut self, d: Duration) -> Self {
        self.shutdown_grace = d;
        self
    }

    /// Sets [`ElectionConfig::watch`].
    #[must_use]
    pub fn watch(mut self, watch: bool) -> Self {
        self.watch = watch;
        self
    }

    /// Takes part in coordinated leader election (see [`Coordinated`]).
    #[must_use]
    pub fn coordinated(mut self, c: Coordinated) -> Self {
        self.coordinated = Some(c);
        self
    }

    /// Sets [`ElectionConfig::max_record_duration`].
    #[must_use]
    pub fn max_record_duration(mut self, d: Duration) -> Self {
        self.max_record_duration = d;
        self
    }

    /// Checks the rules client-go enforces, plus the ones the Lease format implies:
    /// `lease_duration > renew_deadline > 1.2 × retry_period > 0`, a non-empty
    /// identity, a lease duration of whole seconds that fits the Lease, and a
    /// non-zero request timeout.
    pub fn validate(&self) -> Result<(), ConfigError> {
        use ConfigError::*;
        if self.identity.trim().is_empty() {
            return Err(EmptyIdentity);
        }
        if let Some(c) = self.identity.chars().find(|c| c.is_control()) {
            return Err(IdentityControlCharacter(c));
        }
        if self.retry_period.is_zero() {
            return Err(ZeroRetryPeriod);
        }
        if self.request_timeout.is_zero() {
            return Err(ZeroRequestTimeout);
        }
        if self.lease_duration.subsec_nanos() != 0 || self.lease_duration.is_zero() {
            return Err(LeaseDurationNotWholeSeconds(self.lease_duration));
        }
        if self.lease_duration.as_secs() > MAX_LEASE_SECONDS {
            return Err(LeaseDurationTooLong(self.lease_duration));
        }
        if self.lease_duration <= self.renew_deadline {
            return Err(RenewDeadlineNotBelowLeaseDuration {
                lease_duration: self.lease_duration,
                renew_deadline: self.renew_deadline,
            });
        }
        if self.renew_deadline.as_secs_f64() <= JITTER_FACTOR * self.retry_period.as_secs_f64() {
            return Err(RetryPeriodTooLong {
                renew_deadline: self.renew_deadline,
                retry_period: self.retry_period,
            });
        }
        if self.max_record_duration < self.lease_duration {
            return Err(MaxRecordDurationTooShort(self.max_record_duration));
        }
        if self.shutdown_grace.as_secs() > MAX_LEASE_SECONDS {
            return Err(ShutdownGraceTooLong(self.shutdown_grace));
        }
        if let Some(c) = &self.coordinated {
            if !is_object_name(&self.identity) {
                return Err(IdentityNotAnObjectName(self.identity.clone()));
            }
            if c.binary_version.trim().is_empty() || c.strategy.trim().is_empty() {
                return Err(CoordinatedFieldsEmpty);
            }
        }
        if let Some(interval) = self.renew_interval {
            let room = interval.as_secs_f64() + JITTER_FACTOR * self.retry_period.as_secs_f64();
            if interval.is_zero() || room >= self.renew_deadline.as_secs_f64() {
                return Err(RenewIntervalTooLong {
                    renew_interval: interval,
                    renew_deadline: self.renew_deadline,
                    retry_period: self.retry_period,
                });
            }
        }
        Ok(())
    }

    /// The lease duration as written to `leaseDurationSeconds`.
    pub(crate) fn lease_duration_seconds(&self) -> i32 {
        // validate() bounds it to i32::MAX.
        i32::try_from(self.lease_duration.as_secs()).unwrap_or(i32::MAX)
    }
}

/// Whether `s` can name a Kubernetes object: a DNS subdomain (RFC 1123), at most 253
/// characters of lowercase letters, digits, `-` and `.`, starting and ending with a
/// letter or digit.
pub(crate) fn is_object_name(s: &str) -> bool {
    let ok_char = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '.';
    let alnum = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit();
    !s.is_empty()
        && s.len() <= 253
        && s.chars().all(ok_char)
        && s.starts_with(alnum)
        && s.ends_with(alnum)
}

/// Why an [`ElectionConfig`] was refused.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// The identity is empty or blank.
    #[error("identity must not be empty (set it to the pod name, e.g. from the downward API)")]
    EmptyIdentity,
    /// The identity contains a control character.
    #[error("identity must not contain control characters (found {0:?}); use the pod name")]
    IdentityControlCharacter(char),
    /// `retry_period` is zero.
    #[error("retry period must be greater than zero")]
    ZeroRetryPeriod,
    /// `request_timeout` is zero.
    #[error("request timeout must be greater than zero")]
    ZeroRequestTimeout,
    /// The Lease stores whole seconds; a fraction would make followers and the Lease disagree.
    #[error("lease duration must be a whole number of seconds, at least 1s (got {0:?})")]
    LeaseDurationNotWholeSeconds(Duration),
    /// More seconds than `leaseDurationSeconds` (int32) holds.
    #[error("lease duration {0:?} is longer than a Lease can hold ({MAX_LEASE_SECONDS}s)")]
    LeaseDurationTooLong(Duration),
    /// The leader must step down before followers may take over.
    #[error(
        "lease duration ({lease_duration:?}) must be greater than renew deadline ({renew_deadline:?})"
    )]
    RenewDeadlineNotBelowLeaseDuration {
        /// The configured lease duration.
        lease_duration: Duration,
        /// The configured renew deadline.
        renew_deadline: Duration,
    },
    /// The leader must get more than one (jittered) renewal attempt per deadline.
    #[error(
        "renew deadline ({renew_deadline:?}) must be greater than 1.2 x retry period ({retry_period:?})"
    )]
    RetryPeriodTooLong {
        /// The configured renew deadline.
        renew_deadline: Duration,
        /// The configured retry period.
        retry_period: Duration,
    },
    /// In coordinated mode the identity names the `LeaseCandidate` object.
    #[error(
        "in coordinated mode the identity names a LeaseCandidate, so it must be a DNS subdomain (at most 253 of a-z, 0-9, '-', '.'): {0:?}"
    )]
    IdentityNotAnObjectName(String),
    /// Coordinated mode needs a binary version and a strategy.
    #[error("coordinated mode needs a binary version and a strategy")]
    CoordinatedFieldsEmpty,
    /// The renew interval leaves no room to retry a failed renewal before the deadline.
    #[error(
        "renew interval ({renew_interval:?}) plus 1.2 x retry period ({retry_period:?}) must be less than renew deadline ({renew_deadline:?}), and above zero"
    )]
    RenewIntervalTooLong {
        /// The configured renew interval.
        renew_interval: Duration,
        /// The configured renew deadline.
        renew_deadline: Duration,
        /// The configured retry period.
        retry_period: Duration,
    },
    /// A shutdown grace longer than any lease (beyond what a clock can add).
    #[error("shutdown grace {0:?} is longer than {MAX_LEASE_SECONDS}s")]
    ShutdownGraceTooLong(Duration),
    /// `max_record_duration` below `lease_duration` would let us shorten other holders' leases.
    #[error("max record duration ({0:?}) must be at least the lease duration")]
    MaxRecordDurationTooShort(Duration),
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secs(s: f64) -> Duration {
        Duration::from_secs_f64(s)
    }

    #[test]
    fn defaults_are_client_go_defaults_and_valid() {
        let c = ElectionConfig::new("a");
        assert_eq!(c.lease_duration, secs(15.0));
        assert_eq!(c.renew_deadline, secs(10.0));
        assert_eq!(c.retry_period, secs(2.0));
        assert!(c.release_on_cancel);
        assert_eq!(c.validate(), Ok(()));
        assert_eq!(c.lease_duration_seconds(), 15);
    }

    /// (identity, lease duration, renew deadline, retry period, expected outcome)
    type Case = (
        &'static str,
        f64,
        f64,
        f64,
        Result<(), fn(&ConfigError) -> bool>,
    );

    #[test]
    fn validation_table() {
        use ConfigError as E;
        let cases: Vec<Case> = vec![
            ("a", 15.0, 10.0, 2.0, Ok(())),
            ("a", 3.0, 2.0, 0.5, Ok(())),
            ("a", 1.0, 0.5, 0.1, Ok(())),
            ("", 15.0, 10.0, 2.0, Err(|e| matches!(e, E::EmptyIdentity))),
            (
                "  ",
                15.0,
                10.0,
                2.0,
                Err(|e| matches!(e, E::EmptyIdentity)),
            ),
            (
                "a",
                15.0,
                10.0,
                0.0,
                Err(|e| matches!(e, E::ZeroRetryPeriod)),
            ),
            (
                "a",
                0.0,
                0.0,
                2.0,
                Err(|e| matches!(e, E::LeaseDurationNotWholeSeconds(_))),
            ),
            (
                "a",
                15.5,
                10.0,
                2.0,
                Err(|e| matches!(e, E::LeaseDurationNotWholeSeconds(_))),
            ),
            (
                "a",
                0.5,
                0.3,
                0.1,
                Err(|e| matches!(e, E::LeaseDurationNotWholeSeconds(_))),
            ),
            (
                "a",
                1e10,
                10.0,
                2.0,
                Err(|e| matches!(e, E::LeaseDurationTooLong(_))),
            ),
            (
                "a",
                10.0,
                10.0,
                2.0,
                Err(|e| matches!(e, E::RenewDeadlineNotBelowLeaseDuration { .. })),
            ),
            (
                "a",
                10.0,
                12.0,
                2.0,
                Err(|e| matches!(e, E::RenewDeadlineNotBelowLeaseDuration { .. })),
            ),
            // 1.2 x 2s = 2.4s is not below 2.4s
            (
                "a",
                15.0,
                2.4,
                2.0,
                Err(|e| matches!(e, E::RetryPeriodTooLong { .. })),
            ),
            ("a", 15.0, 2.41, 2.0, Ok(())),
            (
                "a",
                15.0,
                1.0,
                2.0,
                Err(|e| matches!(e, E::RetryPeriodTooLong { .. })),
            ),
        ];
        for (id, ld, rd, rp, want) in cases {
            let c = ElectionConfig::new(id)
                .lease_duration(secs(ld))
                .renew_deadline(secs(rd))
                .retry_period(secs(rp));
            let got = c.validate();
            match (&got, &want) {
                (Ok(()), Ok(())) => {}
                (Err(e), Err(check)) => assert!(check(e), "{id:?} {ld} {rd} {rp}: got {e:?}"),
                _ => panic!("{id:?} {ld} {rd} {rp}: got {got:?}"),
            }
        }
    }

    #[test]
    fn identities_with_control_characters_are_refused() {
        for bad in ["pod\nb", "pod\u{1b}[31m", "a\tb", "\u{7f}x"] {
            let e = ElectionConfig::new(bad).validate().unwrap_err();
            assert!(
                matches!(e, ConfigError::IdentityControlCharacter(_)),
                "{bad:?}: {e}"
            );
        }
        assert_eq!(ElectionConfig::new("pod-a.example_1").validate(), Ok(()));
    }

    #[test]
    fn an_absurd_shutdown_grace_is_refused_not_overflowed() {
        let e = ElectionConfig::new("a")
            .shutdown_grace(Duration::MAX)
            .validate();
        assert!(
            matches!(e, Err(ConfigError::ShutdownGraceTooLong(_))),
            "{e:?}"
        );
        let day = ElectionConfig::new("a").shutdown_grace(secs(86_400.0));
        assert_eq!(day.validate(), Ok(()));
    }

    #[test]
    fn renew_interval_must_leave_room_for_a_retry() {
        let c = ElectionConfig::new("a").renew_interval(secs(5.0));
        assert_eq!(c.validate(), Ok(()));
        assert_eq!(c.renew_every(), secs(5.0));
        assert_eq!(ElectionConfig::new("a").renew_every(), secs(2.0));
        // 7.6 s + 1.2 x 2 s = 10 s is not below the 10 s deadline.
        for bad in [secs(7.6), secs(9.0), secs(0.0)] {
            let e = ElectionConfig::new("a").renew_interval(bad).validate();
            assert!(
                matches!(e, Err(ConfigError::RenewIntervalTooLong { .. })),
                "{bad:?}: {e:?}"
            );
        }
        assert_eq!(
            ElectionConfig::new("a")
                .renew_interval(secs(7.5))
                .validate(),
            Ok(())
        );
    }

    #[test]
    fn coordinated_identities_name_objects() {
        let c = Coordinated::new("1.34.0");
        assert_eq!(
            ElectionConfig::new("pod-a.b")
                .coordinated(c.clone())
                .validate(),
            Ok(())
        );
        for bad in ["Pod-A", "pod_a", "-a", "a-", &"a".repeat(254)] {
            let e = ElectionConfig::new(bad).coordinated(c.clone()).validate();
            assert!(
                matches!(e, Err(ConfigError::IdentityNotAnObjectName(_))),
                "{bad}: {e:?}"
            );
        }
        let e = ElectionConfig::new("a")
            .coordinated(Coordinated::new(" "))
            .validate();
        assert_eq!(e, Err(ConfigError::CoordinatedFieldsEmpty));
    }

    #[test]
    fn other_rules() {
        let c = ElectionConfig::new("a").request_timeout(Duration::ZERO);
        assert_eq!(c.validate(), Err(ConfigError::ZeroRequestTimeout));
        let c = ElectionConfig::new("a").max_record_duration(secs(14.0));
        assert!(matches!(
            c.validate(),
            Err(ConfigError::MaxRecordDurationTooShort(_))
        ));
    }

    #[test]
    fn errors_say_what_to_do() {
        let e = ElectionConfig::new("a")
            .renew_deadline(secs(20.0))
            .validate()
            .unwrap_err();
        assert_eq!(
            e.to_string(),
            "lease duration (15s) must be greater than renew deadline (20s)"
        );
    }
}
