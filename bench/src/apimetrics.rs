//! The API server's own count of requests on Leases, from its `/metrics`:
//! `apiserver_request_total{resource="leases",verb=...}` (a counter; a WATCH is
//! counted when it ends) and `apiserver_longrunning_requests{resource="leases"}` (a
//! gauge of the watches open now), and `apiserver_terminated_watchers_total{resource="leases"}`
//! (watches the API server ended because their watcher fell behind its dispatch).

use std::collections::BTreeMap;

use anyhow::{Context, Result};
use kube::Client;
use tokio::time::Instant;

/// One read of the counters.
#[derive(Debug, Clone)]
pub(crate) struct Snapshot {
    at: Instant,
    by_verb: BTreeMap<String, f64>,
    /// Watches on Leases open at the time of the read.
    pub(crate) open_watches: f64,
    /// Watches on Leases the API server has ended as unresponsive (its watch cache could
    /// not hand them an event within its time budget), since it started.
    pub(crate) terminated_watchers: f64,
}

/// Requests per second by verb between two snapshots.
pub(crate) type Rates = BTreeMap<String, f64>;

/// Reads `/metrics` as `client` (the admin may).
pub(crate) async fn scrape(client: &Client) -> Result<Snapshot> {
    let request = http::Request::get("/metrics")
        .body(Vec::new())
        .context("building GET /metrics")?;
    let text = client
        .request_text(request)
        .await
        .context("GET /metrics from the API server")?;
    Ok(parse(&text))
}

fn parse(text: &str) -> Snapshot {
    let mut by_verb = BTreeMap::new();
    let mut open_watches = 0.0;
    let mut terminated_watchers = 0.0;
    for line in text.lines() {
        let (name, labels, value) = match split_sample(line) {
            Some(sample) => sample,
            None => continue,
        };
        if label(labels, "resource") != Some("leases") {
            continue;
        }
        match name {
            "apiserver_request_total" => {
                let verb = label(labels, "verb").unwrap_or("?").to_owned();
                *by_verb.entry(verb).or_insert(0.0) += value;
            }
            "apiserver_longrunning_requests" => open_watches += value,
            "apiserver_terminated_watchers_total" => terminated_watchers += value,
            _ => {}
        }
    }
    Snapshot {
        at: Instant::now(),
        by_verb,
        open_watches,
        terminated_watchers,
    }
}

/// `name{labels} value` → (name, labels, value); `None` for comments and other lines.
fn split_sample(line: &str) -> Option<(&str, &str, f64)> {
    if line.starts_with('#') {
        return None;
    }
    let open = line.find('{')?;
    let close = line.rfind('}')?;
    let value = line[close + 1..].split_whitespace().next()?.parse().ok()?;
    Some((&line[..open], &line[open + 1..close], value))
}

/// The value of label `key` in `a="x",b="y"` (values here hold no `"`).
fn label<'a>(labels: &'a str, key: &str) -> Option<&'a str> {
    let mut rest = labels;
    while !rest.is_empty() {
        let eq = rest.find("=\"")?;
        let k = rest[..eq].trim_start_matches(',');
        let after = &rest[eq + 2..];
        let end = after.find('"')?;
        if k == key {
            return Some(&after[..end]);
        }
        rest = &after[end + 1..];
    }
    None
}

/// Requests per second by verb from `before` to `after`.
pub(crate) fn rates(before: &Snapshot, after: &Snapshot) -> Rates {
    let secs = after.at.duration_since(before.at).as_secs_f64().max(1e-9);
    after
        .by_verb
        .iter()
        .map(|(verb, &n)| {
            let was = before.by_verb.get(verb).copied().unwrap_or(0.0);
            (verb.clone(), (n - was) / secs)
        })
        .collect()
}

/// `measured - baseline`, verb by verb (verbs of either side).
pub(crate) fn net(measured: &Rates, baseline: &Rates) -> Rates {
    let mut out = measured.clone();
    for (verb, base) in baseline {
        *out.entry(verb.clone()).or_insert(0.0) -= base;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_lease_requests_by_verb() {
        let text = r#"# HELP apiserver_request_total x
apiserver_request_total{code="200",component="apiserver",dry_run="",group="coordination.k8s.io",resource="leases",scope="resource",subresource="",verb="PUT",version="v1"} 12
apiserver_request_total{code="409",component="apiserver",dry_run="",group="coordination.k8s.io",resource="leases",scope="resource",subresource="",verb="PUT",version="v1"} 3
apiserver_request_total{code="200",component="apiserver",dry_run="",group="coordination.k8s.io",resource="leases",scope="resource",subresource="",verb="GET",version="v1"} 7
apiserver_request_total{code="200",component="apiserver",dry_run="",group="",resource="pods",scope="resource",subresource="",verb="GET",version="v1"} 99
apiserver_longrunning_requests{component="apiserver",group="coordination.k8s.io",resource="leases",scope="resource",subresource="",verb="WATCH",version="v1"} 2
apiserver_terminated_watchers_total{group="coordination.k8s.io",resource="leases"} 17
apiserver_terminated_watchers_total{group="",resource="pods"} 4
"#;
        let s = parse(text);
        assert_eq!(s.by_verb.get("PUT"), Some(&15.0));
        assert_eq!(s.by_verb.get("GET"), Some(&7.0));
        assert_eq!(s.by_verb.len(), 2);
        assert_eq!(s.open_watches, 2.0);
        assert_eq!(s.terminated_watchers, 17.0);
    }
}
