//! Coordinated leader election's `LeaseCandidate` (coordination.k8s.io/v1beta1), kept as
//! client-go's `leasecandidate.go` keeps it: created (or taken over and brought up to
//! date) at the start, renewed when the controller pings it (`pingTime` after
//! `renewTime`) and every 5 minutes, and deleted on shutdown.

use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::coordination::v1beta1::{LeaseCandidate, LeaseCandidateSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use kube::Api;
use kube::api::{DeleteParams, ObjectMeta, PostParams, WatchEvent, WatchParams};
use tokio::time::{sleep, timeout};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::LockError;
use crate::config::Coordinated;
use crate::record::now_micros;

/// How often the candidate is renewed without being asked (client-go: 5 minutes).
const RENEW_EVERY: Duration = Duration::from_secs(300);
/// The limit on each call.
const CALL_TIMEOUT: Duration = Duration::from_secs(10);

/// One candidate's `LeaseCandidate`.
pub(super) struct Candidate {
    pub(super) api: Api<LeaseCandidate>,
    pub(super) namespace: String,
    pub(super) name: String,
    pub(super) lease: String,
    pub(super) spec: Coordinated,
}

impl Candidate {
    /// Runs until `stop`, then deletes the candidate. See the [module docs](self).
    ///
    /// Returns an error only when coordinated election cannot work at all (the API is
    /// not served, RBAC refuses it, the namespace is missing); passing trouble, even at
    /// the first write, is retried with a backoff.
    pub(super) async fn keep(&self, stop: CancellationToken) -> Result<(), LockError> {
        let mut backoff = Duration::from_millis(200);
        let mut version = loop {
            let first = tokio::select! {
                _ = stop.cancelled() => return Ok(()),
                v = self.ensure() => v,
            };
            match first {
                Ok(v) => break v,
                Err(e) if e.is_fatal() => return Err(e),
                Err(e) => {
                    warn!(error = %e, "cannot publish the lease candidate yet; retrying");
                    self.pause(&stop, &mut backoff).await;
                }
            }
        };
        info!(candidate = %self.name, lease = %self.lease, "published the lease candidate");
        backoff = Duration::from_millis(200);
        // The ping last answered: the controller's pingTime is its clock, our renewTime
        // ours, so comparing them alone could renew again and again when ours is behind.
        let mut answered: Option<MicroTime> = None;
        loop {
            let params = WatchParams::default()
                .fields(&format!("metadata.name={}", self.name))
                .timeout(290);
            let watch = tokio::select! {
                _ = stop.cancelled() => break,
                w = timeout(CALL_TIMEOUT, self.api.watch(&params, &version)) => w,
            };
            let mut events = match watch {
                Ok(Ok(s)) => s.boxed(),
                Ok(Err(e)) => {
                    debug!(error = %e, "cannot watch the lease candidate");
                    self.pause(&stop, &mut backoff).await;
                    let Some(renewed) = self.renew_unless(&stop).await else {
                        break;
                    };
                    version = renewed.unwrap_or(version);
                    continue;
                }
                Err(_) => {
                    self.pause(&stop, &mut backoff).await;
                    continue;
                }
            };
            let renew_timer = sleep(RENEW_EVERY);
            tokio::pin!(renew_timer);
            loop {
                // Each renewal below gives way to `stop` (None: stopped).
                let renewed = tokio::select! {
                    _ = stop.cancelled() => None,
                    () = &mut renew_timer => {
                        renew_timer.as_mut().reset(tokio::time::Instant::now() + RENEW_EVERY);
                        self.renew_unless(&stop).await
                    }
                    event = events.next() => match event {
                        Some(Ok(WatchEvent::Added(c) | WatchEvent::Modified(c))) => {
                            backoff = Duration::from_millis(200);
                            version = c.metadata.resource_version.clone().unwrap_or(version);
                            match pinged(&c, answered.as_ref()) {
                                Some(ping) => {
                                    debug!("the controller pinged the lease candidate: renewing");
                                    let renewed = self.renew_unless(&stop).await;
                                    if matches!(renewed, Some(Some(_))) {
                                        answered = Some(ping);
                                    } else {
                                        // Answer it again soon: the controller does not
                                        // ping again while a ping is unanswered.
                                        renew_timer.as_mut().reset(
                                            tokio::time::Instant::now() + Duration::from_secs(1),
                                        );
                                    }
                                    renewed
                                }
                                None => Some(None),
                            }
                        }
                        // Garbage-collected or deleted by hand: publish it again.
                        Some(Ok(WatchEvent::Deleted(_))) => self.renew_unless(&stop).await,
                        Some(Ok(WatchEvent::Bookmark(b))) => {
                            version = b.metadata.resource_version;
                            Some(None)
                        }
                        Some(Ok(WatchEvent::Error(_)) | Err(_)) => {
                            // Gone (410) or broken: read afresh and watch again.
                            let Some(renewed) = self.renew_unless(&stop).await else { break };
                            version = renewed.unwrap_or_default();
                            break;
                        }
                        None => break,
                    },
                };
                match renewed {
                    None => {
                        self.delete().await;
                        return Ok(());
                    }
                    Some(Some(v)) => version = v,
                    Some(None) => {}
                }
            }
            if stop.is_cancelled() {
                break;
            }
        }
        self.delete().await;
        Ok(())
    }

    /// Renews unless `stop` comes first (`None`); `Some(None)` when the renewal failed.
    async fn renew_unless(&self, stop: &CancellationToken) -> Option<Option<String>> {
        tokio::select! {
            _ = stop.cancelled() => None,
            v = self.renew_or_log() => Some(v),
        }
    }

    /// Creates the candidate, or brings an existing one up to date; its version.
    async fn ensure(&self) -> Result<String, LockError> {
        match self.call("get", self.api.get_opt(&self.name)).await? {
            None => {
                let candidate = LeaseCandidate {
                    metadata: ObjectMeta {
                        name: Some(self.name.clone()),
                        namespace: Some(self.namespace.clone()),
                        ..Default::default()
                    },
                    spec: Some(self.spec_now(None)),
                };
                let created = self
                    .call(
                        "create",
                        self.api.create(&PostParams::default(), &candidate),
                    )
                    .await?;
                Ok(created.metadata.resource_version.unwrap_or_default())
            }
            Some(existing) => self.update(existing).await,
        }
    }

    /// Renews: `renewTime` now, and our versions and strategy (a restarted process may
    /// run a newer binary under the same name). Retries once on a conflict.
    async fn renew(&self) -> Result<String, LockError> {
        for _ in 0..3 {
            let Some(existing) = self.call("get", self.api.get_opt(&self.name)).await? else {
                return self.ensure().await;
            };
            match self.update(existing).await {
                Err(LockError::Conflict) => continue,
                other => return other,
            }
        }
        Err(LockError::Conflict)
    }

    async fn update(&self, mut existing: LeaseCandidate) -> Result<String, LockError> {
        let ping = existing.spec.as_ref().and_then(|s| s.ping_time.clone());
        existing.spec = Some(self.spec_now(ping));
        existing.metadata.managed_fields = None;
        let updated = self
            .call(
                "update",
                self.api
                    .replace(&self.name, &PostParams::default(), &existing),
            )
            .await?;
        Ok(updated.metadata.resource_version.unwrap_or_default())
    }

    async fn renew_or_log(&self) -> Option<String> {
        match self.renew().await {
            Ok(v) => Some(v),
            Err(e) => {
                warn!(error = %e, "cannot renew the lease candidate; retrying");
                None
            }
        }
    }

    async fn delete(&self) {
        match timeout(
            CALL_TIMEOUT,
            self.api.delete(&self.name, &DeleteParams::default()),
        )
        .await
        {
            Ok(Ok(_)) => info!(candidate = %self.name, "withdrew the lease candidate"),
            Ok(Err(e)) => warn!(error = %e, "could not delete the lease candidate"),
            Err(_) => warn!("could not delete the lease candidate in time"),
        }
    }

    fn spec_now(&self, ping_time: Option<MicroTime>) -> LeaseCandidateSpec {
        LeaseCandidateSpec {
            binary_version: self.spec.binary_version.clone(),
            emulation_version: Some(self.spec.emulation_version.clone()),
            lease_name: self.lease.clone(),
            ping_time,
            renew_time: Some(MicroTime(now_micros())),
            strategy: self.spec.strategy.clone(),
        }
    }

    async fn call<T>(
        &self,
        verb: &'static str,
        call: impl Future<Output = Result<T, kube::Error>>,
    ) -> Result<T, LockError> {
        match timeout(CALL_TIMEOUT, call).await {
            Ok(r) => r.map_err(|e| self.explain(e, verb)),
            Err(_) => Err(LockError::Timeout(CALL_TIMEOUT)),
        }
    }

    /// What a failed call means here.
    fn explain(&self, e: kube::Error, verb: &'static str) -> LockError {
        match e {
            kube::Error::Api(status) => match status.code {
                404 if status
                    .details
                    .as_ref()
                    .is_some_and(|d| d.kind == "namespaces") =>
                {
                    LockError::NamespaceNotFound(self.namespace.clone())
                }
                404 if verb != "get" => LockError::CoordinatedNotServed(status.message),
                404 => LockError::NotFound,
                403 => LockError::CandidateForbidden {
                    verb,
                    namespace: self.namespace.clone(),
                    message: status.message,
                },
                401 => LockError::Unauthorized(status.message),
                409 => LockError::Conflict,
                code => LockError::Api {
                    code,
                    reason: status.reason,
                    message: status.message,
                },
            },
            other => LockError::Transport(Box::new(other)),
        }
    }

    /// Waits the backoff (doubling up to 30 s) unless stopped.
    async fn pause(&self, stop: &CancellationToken, backoff: &mut Duration) {
        tokio::select! {
            _ = stop.cancelled() => {}
            () = sleep(*backoff) => {}
        }
        *backoff = (*backoff * 2).min(Duration::from_secs(30));
    }
}

/// The ping to answer, if the controller asks for a renewal: a `pingTime` after
/// `renewTime` that we have not answered yet.
fn pinged(c: &LeaseCandidate, answered: Option<&MicroTime>) -> Option<MicroTime> {
    let spec = c.spec.as_ref()?;
    let ping = spec.ping_time.as_ref()?;
    let asks = spec
        .renew_time
        .as_ref()
        .is_none_or(|renew| ping.0 > renew.0);
    (asks && answered.is_none_or(|a| a.0 != ping.0)).then(|| ping.clone())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn candidate(ping: Option<&str>, renew: Option<&str>) -> LeaseCandidate {
        let t = |s: &str| MicroTime(s.parse().unwrap());
        LeaseCandidate {
            metadata: ObjectMeta::default(),
            spec: Some(LeaseCandidateSpec {
                ping_time: ping.map(t),
                renew_time: renew.map(t),
                ..Default::default()
            }),
        }
    }

    #[test]
    fn a_ping_is_answered_once_even_when_our_clock_is_behind() {
        let ping = "2026-11-25T10:00:05Z";
        // Our renewal, written by a clock 10 s behind, is still "before" the ping.
        let c = candidate(Some(ping), Some("2026-11-25T09:59:56Z"));
        let first = pinged(&c, None).expect("a fresh ping is answered");
        assert_eq!(pinged(&c, Some(&first)), None);
        let later = candidate(Some("2026-11-25T10:00:20Z"), Some("2026-11-25T09:59:56Z"));
        assert!(pinged(&later, Some(&first)).is_some());
        assert_eq!(pinged(&candidate(None, Some(ping)), None), None);
        assert!(pinged(&candidate(Some(ping), None), None).is_some());
        assert_eq!(
            pinged(&candidate(Some(ping), Some("2026-11-25T10:00:06Z")), None),
            None
        );
    }
}
