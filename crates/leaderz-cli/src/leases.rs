//! Leases as `status` and `watch` show them: the fields `kubectl describe lease` shows,
//! plus an estimate of when the holder's lease expires.

use std::time::Duration;

use jiff::Timestamp;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use serde::Serialize;
use tokio::time::timeout;

use crate::error::{CliError, chain};
use crate::text::printable;

/// How long one API call of `status` or `watch` may take.
pub(crate) const API_TIMEOUT: Duration = Duration::from_secs(10);

/// One Lease, with its fields named as in the Lease.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct LeaseView {
    pub(crate) name: String,
    pub(crate) namespace: String,
    pub(crate) holder_identity: Option<String>,
    pub(crate) lease_duration_seconds: Option<i32>,
    pub(crate) acquire_time: Option<MicroTime>,
    pub(crate) renew_time: Option<MicroTime>,
    pub(crate) lease_transitions: Option<i32>,
    /// `renewTime + leaseDurationSeconds - now` on this machine's wall clock: an
    /// estimate (clocks differ between machines; electors judge expiry on their own
    /// monotonic clocks). `null` when nobody holds the Lease.
    pub(crate) expires_in_seconds: Option<f64>,
}

impl LeaseView {
    /// The view of `lease` at wall-clock time `now`.
    pub(crate) fn new(lease: &Lease, now: Timestamp) -> Self {
        let spec = lease.spec.clone().unwrap_or_default();
        let held = spec
            .holder_identity
            .as_deref()
            .is_some_and(|h| !h.is_empty());
        let expires_in_seconds = match (held, &spec.renew_time, spec.lease_duration_seconds) {
            (true, Some(renew), Some(secs)) => Some(expires_in(renew.0, secs, now)),
            _ => None,
        };
        Self {
            name: lease.metadata.name.clone().unwrap_or_default(),
            namespace: lease.metadata.namespace.clone().unwrap_or_default(),
            holder_identity: spec.holder_identity,
            lease_duration_seconds: spec.lease_duration_seconds,
            acquire_time: spec.acquire_time,
            renew_time: spec.renew_time,
            lease_transitions: spec.lease_transitions,
            expires_in_seconds,
        }
    }

    /// A Lease that does not exist (for `watch`).
    pub(crate) fn absent(name: &str, namespace: &str) -> Self {
        Self {
            name: name.to_owned(),
            namespace: namespace.to_owned(),
            holder_identity: None,
            lease_duration_seconds: None,
            acquire_time: None,
            renew_time: None,
            lease_transitions: None,
            expires_in_seconds: None,
        }
    }

    /// The holder for people: `<none>` after a release. Anyone who may write the Lease
    /// chooses it, so control characters are escaped (`\n`, `\u{1b}`).
    pub(crate) fn holder_cell(&self) -> String {
        match self.holder_identity.as_deref() {
            Some(h) if !h.is_empty() => printable(h).into_owned(),
            _ => "<none>".to_owned(),
        }
    }
}

/// Seconds from `now` until `renew + duration_seconds` (negative once past), to the ms.
fn expires_in(renew: Timestamp, duration_seconds: i32, now: Timestamp) -> f64 {
    let micros =
        renew.as_microsecond() + i64::from(duration_seconds) * 1_000_000 - now.as_microsecond();
    (micros as f64 / 1000.0).round() / 1000.0
}

/// A timestamp for people: UTC, to the second.
pub(crate) fn time_cell(t: Option<&MicroTime>) -> String {
    t.map_or_else(
        || "-".to_owned(),
        |t| t.0.strftime("%Y-%m-%dT%H:%M:%SZ").to_string(),
    )
}

fn opt_cell<T: ToString>(v: Option<T>, suffix: &str) -> String {
    v.map_or_else(|| "-".to_owned(), |v| format!("{}{suffix}", v.to_string()))
}

fn expires_cell(secs: Option<f64>) -> String {
    match secs {
        None => "-".to_owned(),
        Some(s) if s < 0.0 => "expired".to_owned(),
        Some(s) => format!("{s:.1}s"),
    }
}

/// Leases as a table with a header, as `kubectl get` prints.
pub(crate) fn table(views: &[LeaseView]) -> String {
    let header = [
        "NAME",
        "HOLDER",
        "DURATION",
        "ACQUIRED",
        "RENEWED",
        "TRANSITIONS",
        "EXPIRES IN (EST.)",
    ];
    let rows: Vec<[String; 7]> = views
        .iter()
        .map(|v| {
            [
                v.name.clone(),
                v.holder_cell(),
                opt_cell(v.lease_duration_seconds, "s"),
                time_cell(v.acquire_time.as_ref()),
                time_cell(v.renew_time.as_ref()),
                opt_cell(v.lease_transitions, ""),
                expires_cell(v.expires_in_seconds),
            ]
        })
        .collect();
    let mut widths = header.map(str::len);
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    let mut line = |cells: &[&str]| {
        let mut text = String::new();
        for (i, cell) in cells.iter().enumerate() {
            if i + 1 == cells.len() {
                text.push_str(cell);
            } else {
                text.push_str(&format!("{cell:<width$}   ", width = widths[i]));
            }
        }
        out.push_str(text.trim_end());
        out.push('\n');
    };
    line(&header);
    for row in &rows {
        line(&row.each_ref().map(String::as_str));
    }
    out
}

/// Runs a Lease API call with a time limit, turning failures into one line that says
/// what to do.
pub(crate) async fn call<T>(
    verb: &str,
    namespace: &str,
    request: impl Future<Output = Result<T, kube::Error>>,
) -> Result<T, CliError> {
    match timeout(API_TIMEOUT, request).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(api_error(verb, namespace, e)),
        Err(_) => Err(CliError::Api(format!(
            "the API server did not answer a {verb} of leases in namespace `{namespace}` within {API_TIMEOUT:?}"
        ))),
    }
}

/// Whether retrying cannot help (RBAC, credentials).
pub(crate) fn is_fatal(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(s) if s.code == 401 || s.code == 403)
}

pub(crate) fn api_error(verb: &str, namespace: &str, e: kube::Error) -> CliError {
    match e {
        kube::Error::Api(s) if s.code == 403 => CliError::Api(format!(
            "forbidden: grant `{verb}` on `leases.coordination.k8s.io` in namespace `{namespace}`: {}",
            s.message
        )),
        kube::Error::Api(s) if s.code == 401 => CliError::Api(format!(
            "unauthorized: the API server refused our credentials: {}",
            s.message
        )),
        other => CliError::Api(format!(
            "cannot {verb} leases in namespace `{namespace}`: {}",
            chain(&other)
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::coordination::v1::LeaseSpec;
    use kube::api::ObjectMeta;
    use serde_json::json;

    fn ts(s: &str) -> Timestamp {
        s.parse().unwrap()
    }

    fn lease(holder: &str) -> Lease {
        Lease {
            metadata: ObjectMeta {
                name: Some("my-lock".into()),
                namespace: Some("ns".into()),
                ..Default::default()
            },
            spec: Some(LeaseSpec {
                holder_identity: Some(holder.into()),
                lease_duration_seconds: Some(15),
                acquire_time: Some(MicroTime(ts("2025-01-02T03:04:00.123456Z"))),
                renew_time: Some(MicroTime(ts("2025-01-02T03:04:05.500000Z"))),
                lease_transitions: Some(3),
                ..Default::default()
            }),
        }
    }

    #[test]
    fn json_names_fields_as_the_lease_does() {
        let view = LeaseView::new(&lease("pod-a"), ts("2025-01-02T03:04:10Z"));
        assert_eq!(
            serde_json::to_value(&view).unwrap(),
            json!({
                "name": "my-lock",
                "namespace": "ns",
                "holderIdentity": "pod-a",
                "leaseDurationSeconds": 15,
                "acquireTime": "2025-01-02T03:04:00.123456Z",
                "renewTime": "2025-01-02T03:04:05.500000Z",
                "leaseTransitions": 3,
                "expiresInSeconds": 10.5,
            })
        );
    }

    #[test]
    fn expiry_is_an_estimate_that_can_be_past() {
        let now = ts("2025-01-02T03:04:30Z");
        let view = LeaseView::new(&lease("pod-a"), now);
        assert_eq!(view.expires_in_seconds, Some(-9.5));
        assert_eq!(expires_cell(view.expires_in_seconds), "expired");
        assert_eq!(expires_cell(Some(10.46)), "10.5s");
        // Released: nobody holds it, nothing expires.
        let view = LeaseView::new(&lease(""), now);
        assert_eq!(view.expires_in_seconds, None);
        assert_eq!(view.holder_cell(), "<none>");
    }

    #[test]
    fn table_is_aligned_with_a_header() {
        let now = ts("2025-01-02T03:04:10Z");
        let mut other = lease("");
        other.metadata.name = Some("b".into());
        let text = table(&[
            LeaseView::new(&lease("pod-a"), now),
            LeaseView::new(&other, now),
        ]);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 3, "{text}");
        assert_eq!(
            lines[0],
            "NAME      HOLDER   DURATION   ACQUIRED               RENEWED                TRANSITIONS   EXPIRES IN (EST.)"
        );
        assert_eq!(
            lines[1],
            "my-lock   pod-a    15s        2025-01-02T03:04:00Z   2025-01-02T03:04:05Z   3             10.5s"
        );
        assert_eq!(
            lines[2],
            "b         <none>   15s        2025-01-02T03:04:00Z   2025-01-02T03:04:05Z   3             -"
        );
    }
}
