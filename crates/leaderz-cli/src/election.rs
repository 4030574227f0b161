//! Starting the election for `run` and `serve`: checks, client, lock, metrics, elector.

use std::sync::Arc;
use std::time::Duration;

use leaderz::routing::{LeaderEndpoints, PodLabel, Routes, parse_label};
use leaderz::{ElectionConfig, ElectionHandle, Elector, LeaseLock, Metrics};
use prometheus_client::registry::Registry;
use tracing::{debug, warn};

use crate::cli::{ElectionArgs, RouteArgs};
use crate::cluster;
use crate::error::CliError;

/// The Events reporter name (`reportingController`) used with `--events`.
const EVENTS_CONTROLLER: &str = "leaderz";

/// How much longer the work may take to stop, beyond what the caller allows, when
/// traffic must be pointed away too: the drain, and two calls' time for the clean-up.
pub(crate) fn routing_allowance(args: &RouteArgs) -> Duration {
    if args.any() {
        args.routing_drain + leaderz::routing::DEFAULT_CALL_TIMEOUT * 2
    } else {
        Duration::ZERO
    }
}

/// Logs what may still point here when leaderz exits without releasing because traffic
/// could not be pointed away (see [`Election::abandon`]).
pub(crate) fn left_behind(routes: &Routes, info: &ElectionInfo) {
    warn!(
        %routes,
        lease = %info.lease,
        lease_duration = ?info.lease_duration,
        "traffic may still point here: not releasing the lease; it expires a lease duration after its last renewal, and the next leader then takes the routes over"
    );
}

/// What the HTTP endpoints and the child's environment need to know about the election.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct ElectionInfo {
    /// The Lease's name.
    pub(crate) lease: String,
    /// The Lease's namespace.
    pub(crate) namespace: String,
    /// This candidate's identity.
    pub(crate) identity: String,
    /// The configured lease duration (health check, expiry estimate).
    pub(crate) lease_duration: Duration,
    /// The longest record duration honoured (expiry estimate).
    pub(crate) max_record_duration: Duration,
}

/// A running election on a Lease.
#[derive(Debug)]
pub(crate) struct Election {
    /// The elector.
    pub(crate) handle: ElectionHandle,
    /// The facts of it.
    pub(crate) info: Arc<ElectionInfo>,
    /// The registry the elector's metrics are in.
    pub(crate) registry: Arc<Registry>,
    /// Where traffic to the leader is pointed (empty without `--label-pod` and
    /// `--leader-endpoints`).
    pub(crate) routes: Routes,
}

/// What `--label-pod` and `--leader-endpoints` need from the environment, checked
/// before any API call.
#[derive(Debug, Default)]
struct RouteInput {
    label: Option<(String, String)>,
    pod: Option<String>,
    ip: Option<String>,
}

/// Reads `$POD_NAME` and `$POD_IP` as the route flags need them (usage errors, exit 2).
fn route_input(args: &RouteArgs) -> Result<RouteInput, CliError> {
    if !args.any() {
        return Ok(RouteInput::default());
    }
    let label = match &args.label_pod {
        Some(spec) => {
            Some(parse_label(spec).map_err(|e| CliError::Usage(format!("--label-pod: {e}")))?)
        }
        None => None,
    };
    let flag = if args.label_pod.is_some() {
        "--label-pod"
    } else {
        "--leader-endpoints"
    };
    let pod = std::env::var("POD_NAME").ok().filter(|p| !p.is_empty()).ok_or_else(|| {
        CliError::Usage(format!(
            "{flag} needs this pod's name in POD_NAME: set it from the downward API (env valueFrom fieldRef fieldPath: metadata.name)"
        ))
    })?;
    let ip = match &args.leader_endpoints {
        Some(_) => {
            let ip = std::env::var("POD_IP").ok().filter(|p| !p.is_empty()).ok_or_else(|| {
                CliError::Usage(
                    "--leader-endpoints needs this pod's IP in POD_IP: set it from the downward API (env valueFrom fieldRef fieldPath: status.podIP)".to_owned(),
                )
            })?;
            if ip.parse::<std::net::IpAddr>().is_err() {
                return Err(CliError::Usage(format!(
                    "POD_IP `{ip}` is not an IP address (set it from the downward API's status.podIP)"
                )));
            }
            Some(ip)
        }
        None => None,
    };
    Ok(RouteInput {
        label,
        pod: Some(pod),
        ip,
    })
}

/// The library's routes for the flags, checked against the cluster (grants, the
/// Service) and cleared of what a previous process of this pod left, before campaigning.
async fn routes(
    args: &RouteArgs,
    input: RouteInput,
    client: &kube::Client,
    namespace: &str,
    identity: &str,
) -> Result<Routes, CliError> {
    let mut routes = Routes::new().drain(args.routing_drain);
    let Some(pod) = input.pod else {
        return Ok(routes);
    };
    if let Some((key, value)) = &input.label {
        routes = routes.label_pod(PodLabel::new(client.clone(), namespace, &pod, key, value)?);
    }
    if let (Some(service), Some(ip)) = (&args.leader_endpoints, &input.ip) {
        routes = routes.leader_endpoints(LeaderEndpoints::new(
            client.clone(),
            namespace,
            service,
            &pod,
            ip,
        )?);
    }
    routes.prepare(identity).await?;
    Ok(routes)
}

impl Election {
    /// Checks the flags (before any API call), connects, and starts campaigning.
    /// `tune` adjusts the library config beyond what the common flags set.
    pub(crate) async fn start(
        args: &ElectionArgs,
        route_args: &RouteArgs,
        tune: impl FnOnce(ElectionConfig) -> ElectionConfig,
    ) -> Result<Self, CliError> {
        cluster::check_lease_name(&args.lease)?;
        let identity = cluster::identity(args.identity.as_deref())?;
        let config = tune(args.election_config(identity));
        config.validate()?;
        let route_input = route_input(route_args)?;
        let kube_config = cluster::load_config().await?;
        let namespace = cluster::namespace(args.namespace.namespace.as_deref(), &kube_config)?;
        let options = leaderz::client::Options::for_election(&config);
        let client = cluster::connect_with(kube_config, options).await?;
        let routes = routes(
            route_args,
            route_input,
            &client,
            &namespace,
            &config.identity,
        )
        .await?;

        let mut lock = LeaseLock::new(client.clone(), &namespace, &args.lease);
        if args.events {
            lock = lock.with_events(client, EVENTS_CONTROLLER);
        }
        let mut registry = Registry::default();
        let metrics = Metrics::new(&mut registry);
        let info = ElectionInfo {
            lease: args.lease.clone(),
            namespace,
            identity: config.identity.clone(),
            lease_duration: config.lease_duration,
            max_record_duration: config.max_record_duration,
        };
        debug!(lease = %info.lease, namespace = %info.namespace, identity = %info.identity, "campaigning");
        let handle = Elector::new(lock, config)?.metrics(metrics).spawn();
        Ok(Self {
            handle,
            info: Arc::new(info),
            registry: Arc::new(registry),
            routes,
        })
    }

    /// Completes when the elector has stopped by itself (a fatal error).
    pub(crate) fn stopped(&self) -> impl Future<Output = ()> + Send + 'static {
        let mut leader = self.handle.leader();
        async move { while leader.changed().await.is_ok() {} }
    }

    /// Why the elector stopped, once it has (see [`Election::stopped`]).
    pub(crate) async fn stop_reason(&mut self) -> CliError {
        match self.handle.join().await {
            Err(e) => CliError::Election(e),
            Ok(()) => CliError::Io("the elector stopped unexpectedly".into()),
        }
    }

    /// Stops the election WITHOUT releasing the Lease, for when traffic could not be
    /// pointed away in time (the API server unreachable, `patch` or `update` revoked):
    /// the routing task still holds its clone of the [`leaderz::Term`], so the elector,
    /// told to stop, waits for it instead of releasing; the caller returns and the
    /// process exits, which ends both where they stand, as a crash would. The Lease
    /// expires a lease duration after its last renewal and the next leader takes the
    /// routes over then (the slice with its first write; the label if it may `list`
    /// pods). Logs what was left behind.
    pub(crate) fn abandon(self) {
        left_behind(&self.routes, &self.info);
        self.handle.shutdown_token().cancel();
    }

    /// Stops the election: releases the Lease if this process leads and no [`leaderz::Term`]
    /// is held any more.
    pub(crate) async fn shutdown(self) -> Result<(), CliError> {
        self.handle.shutdown().await.map_err(CliError::from)
    }
}
