//! Prometheus metrics, named as client-go names them so existing dashboards work.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct NameLabel {
    name: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ErrorLabels {
    name: String,
    kind: String,
}

/// The election metrics. Register once per registry and share clones among electors;
/// every series carries the lock's name in the `name` label, as client-go's do.
///
/// | metric | type | meaning |
/// |---|---|---|
/// | `leader_election_master_status{name}` | gauge | 1 while this process leads, else 0 (client-go) |
/// | `leader_election_slowpath_total{name}` | counter | renewals that needed a GET after the cached update failed (client-go) |
/// | `leaderz_renew_duration_seconds{name}` | histogram | time of each successful renewal |
/// | `leaderz_api_errors_total{name,kind}` | counter | failed API calls by kind (`conflict`, `timeout`, `forbidden`, ...) |
/// | `leaderz_transitions_total{name}` | counter | terms this process started |
/// | `leaderz_follower_watching{name}` | gauge | 1 while the follower watches the lease, 0 while it polls instead |
///
/// `name` is the Lease's name (client-go's `config.Name`), without the namespace.
///
/// ```
/// let mut registry = prometheus_client::registry::Registry::default();
/// let metrics = leaderz::Metrics::new(&mut registry);
/// let mut text = String::new();
/// prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
/// # let _ = metrics;
/// ```
#[derive(Clone, Debug)]
pub struct Metrics {
    master_status: Family<NameLabel, Gauge>,
    slowpath: Family<NameLabel, Counter>,
    renew_duration: Family<NameLabel, Histogram>,
    api_errors: Family<ErrorLabels, Counter>,
    transitions: Family<NameLabel, Counter>,
    watching: Family<NameLabel, Gauge>,
}

fn renew_histogram() -> Histogram {
    // 1 ms .. ~16 s
    Histogram::new(exponential_buckets(0.001, 2.0, 15))
}

impl Metrics {
    /// Creates the metrics and registers them in `registry`.
    pub fn new(registry: &mut Registry) -> Self {
        let m = Self {
            master_status: Family::default(),
            slowpath: Family::default(),
            renew_duration: Family::new_with_constructor(renew_histogram),
            api_errors: Family::default(),
            transitions: Family::default(),
            watching: Family::default(),
        };
        registry.register(
            "leader_election_master_status",
            "Gauge of if the reporting system is master of the relevant lease, 0 indicates backup, 1 indicates master. 'name' is the string used to identify the lease.",
            m.master_status.clone(),
        );
        registry.register(
            "leader_election_slowpath",
            "Total number of slow path exercised in renewing leader leases. 'name' is the string used to identify the lease.",
            m.slowpath.clone(),
        );
        registry.register(
            "leaderz_renew_duration_seconds",
            "Time taken by successful lease renewals.",
            m.renew_duration.clone(),
        );
        registry.register(
            "leaderz_api_errors",
            "Failed lease API calls by kind of failure.",
            m.api_errors.clone(),
        );
        registry.register(
            "leaderz_transitions",
            "Leadership terms started by this process.",
            m.transitions.clone(),
        );
        registry.register(
            "leaderz_follower_watching",
            "1 while the follower watches the lease, 0 while it polls instead.",
            m.watching.clone(),
        );
        m
    }

    fn name(name: &str) -> NameLabel {
        NameLabel {
            name: name.to_owned(),
        }
    }

    pub(crate) fn set_leading(&self, name: &str, leading: bool) {
        self.master_status
            .get_or_create(&Self::name(name))
            .set(i64::from(leading));
        if leading {
            self.transitions.get_or_create(&Self::name(name)).inc();
        }
    }

    pub(crate) fn set_watching(&self, name: &str, watching: bool) {
        self.watching
            .get_or_create(&Self::name(name))
            .set(i64::from(watching));
    }

    pub(crate) fn slowpath(&self, name: &str) {
        self.slowpath.get_or_create(&Self::name(name)).inc();
    }

    pub(crate) fn renewed(&self, name: &str, seconds: f64) {
        self.renew_duration
            .get_or_create(&Self::name(name))
            .observe(seconds);
    }

    pub(crate) fn api_error(&self, name: &str, kind: &str) {
        let labels = ErrorLabels {
            name: name.to_owned(),
            kind: kind.to_owned(),
        };
        self.api_errors.get_or_create(&labels).inc();
    }

    /// Starts the series for `name` at zero so they exist before anything happens.
    pub(crate) fn init(&self, name: &str) {
        self.master_status.get_or_create(&Self::name(name)).set(0);
        let _ = self.slowpath.get_or_create(&Self::name(name));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn client_go_names_are_exposed() {
        let mut registry = Registry::default();
        let m = Metrics::new(&mut registry);
        m.init("my-lock");
        m.set_leading("my-lock", true);
        m.slowpath("my-lock");
        m.api_error("my-lock", "conflict");
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
        assert!(
            text.contains("leader_election_master_status{name=\"my-lock\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("leader_election_slowpath_total{name=\"my-lock\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("leaderz_api_errors_total{name=\"my-lock\",kind=\"conflict\"} 1"),
            "{text}"
        );
    }
}
