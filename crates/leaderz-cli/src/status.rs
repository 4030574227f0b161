//! `leaderz status`: one Lease, or every Lease in the namespace, with their candidates
//! (coordinated leader election) when the API server serves them.

use jiff::Timestamp;
use k8s_openapi::api::coordination::v1::Lease;
use kube::Api;
use kube::api::ListParams;

use crate::candidates;
use crate::cli::{Output, StatusArgs};
use crate::cluster;
use crate::error::CliError;
use crate::leases::{LeaseView, call, candidates_section, table};
use crate::shardmap::ShardMap;

/// Prints the Lease(s) to stdout; returns the exit code.
pub(crate) async fn status(args: StatusArgs) -> Result<u8, CliError> {
    if let Some(name) = &args.name {
        cluster::check_lease_name(name)?;
    }
    let config = cluster::load_config().await?;
    let namespace = cluster::namespace(args.namespace.namespace.as_deref(), &config)?;
    let client = cluster::connect(config).await?;
    let api: Api<Lease> = Api::namespaced(client.clone(), &namespace);
    let format = args.output.format;
    if let Some(set) = &args.shards {
        let selector = format!("{}={set}", leaderz::shards::SET_LABEL);
        let list = call(
            "list",
            &namespace,
            api.list(&ListParams::default().labels(&selector)),
        )
        .await?;
        let map = ShardMap::new(set, &namespace, &list.items, Timestamp::now());
        let text = match format {
            Output::Json => to_json(&map)?,
            Output::Table if list.items.is_empty() => {
                eprintln!("No Leases of shard set `{set}` in namespace `{namespace}`.");
                return Ok(0);
            }
            Output::Table => map.table(),
        };
        print!("{text}");
        return Ok(0);
    }
    let text = match &args.name {
        Some(name) => {
            let lease = call("get", &namespace, api.get_opt(name))
                .await?
                .ok_or_else(|| CliError::LeaseNotFound {
                    name: name.clone(),
                    namespace: namespace.clone(),
                })?;
            let listing = candidates::list(client, &namespace, Some(name)).await;
            let view = LeaseView::new(&lease, Timestamp::now()).with_candidates(&listing);
            match format {
                Output::Json => to_json(&view)?,
                Output::Table => {
                    let views = std::slice::from_ref(&view);
                    table(views) + &candidates_section(views)
                }
            }
        }
        None => {
            let list = call("list", &namespace, api.list(&ListParams::default())).await?;
            let listing = candidates::list(client, &namespace, None).await;
            let now = Timestamp::now();
            let mut views: Vec<LeaseView> = list
                .items
                .iter()
                .map(|l| LeaseView::new(l, now).with_candidates(&listing))
                .collect();
            views.sort_by(|a, b| a.name.cmp(&b.name));
            match format {
                Output::Json => to_json(&views)?,
                Output::Table if views.is_empty() => {
                    eprintln!("No leases found in namespace `{namespace}`.");
                    return Ok(0);
                }
                Output::Table => {
                    let mut text = table(&views) + &candidates_section(&views);
                    let now = Timestamp::now();
                    for set in ShardMap::sets(&list.items) {
                        let map = ShardMap::new(&set, &namespace, &list.items, now);
                        text.push_str(&format!(
                            "{} (leaderz status --shards {set})\n",
                            map.summary()
                        ));
                    }
                    text
                }
            }
        }
    };
    print!("{text}");
    Ok(0)
}

fn to_json<T: serde::Serialize>(value: &T) -> Result<String, CliError> {
    let mut text = serde_json::to_string_pretty(value).map_err(|e| CliError::Io(e.to_string()))?;
    text.push('\n');
    Ok(text)
}
