//! `--label-pod` and `--leader-endpoints`: the library's [`Routes`] from the flags.

use kube::Client;
use leaderz::routing::{LeaderEndpoints, PodLabel, Routes, parse_label};

use crate::cli::RouteArgs;
use crate::error::CliError;

/// The routes the flags ask for (none: an empty [`Routes`]). Checked before any API call.
pub(crate) fn from_args(
    args: &RouteArgs,
    client: &Client,
    namespace: &str,
    identity: &str,
) -> Result<Routes, CliError> {
    let mut routes = Routes::new();
    if args.label_pod.is_none() && args.leader_endpoints.is_none() {
        return Ok(routes);
    }
    let pod = args
        .pod_name
        .clone()
        .or_else(|| std::env::var("POD_NAME").ok().filter(|p| !p.is_empty()))
        .unwrap_or_else(|| identity.to_owned());
    if let Some(spec) = &args.label_pod {
        let (key, value) = parse_label(spec).map_err(|e| CliError::Usage(format!("--label-pod: {e}")))?;
        routes = routes.label_pod(PodLabel::new(client.clone(), namespace, &pod, &key, &value));
    }
    if let Some(service) = &args.leader_endpoints {
        let ip = args
            .pod_ip
            .clone()
            .or_else(|| std::env::var("POD_IP").ok().filter(|p| !p.is_empty()))
            .ok_or_else(|| {
                CliError::Usage(
                    "--leader-endpoints needs this pod's IP: set POD_IP from the downward API (fieldPath: status.podIP) or pass --pod-ip".into(),
                )
            })?;
        if ip.parse::<std::net::IpAddr>().is_err() {
            return Err(CliError::Usage(format!("--pod-ip `{ip}` is not an IP address")));
        }
        routes = routes.leader_endpoints(LeaderEndpoints::new(
            client.clone(),
            namespace,
            service,
            &pod,
            &ip,
        ));
    }
    Ok(routes)
}
