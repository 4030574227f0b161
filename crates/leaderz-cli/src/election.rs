//! Starting the election for `run` and `serve`: checks, client, lock, metrics, elector.

use std::sync::Arc;
use std::time::Duration;

use leaderz::{ElectionConfig, ElectionHandle, Elector, LeaseLock, Metrics};
use prometheus_client::registry::Registry;
use tracing::debug;

use crate::cli::ElectionArgs;
use crate::cluster;
use crate::error::CliError;

/// The Events reporter name (`reportingController`) used with `--events`.
const EVENTS_CONTROLLER: &str = "leaderz";

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
}

impl Election {
    /// Checks the flags (before any API call), connects, and starts campaigning.
    /// `tune` adjusts the library config beyond what the common flags set.
    pub(crate) async fn start(
        args: &ElectionArgs,
        tune: impl FnOnce(ElectionConfig) -> ElectionConfig,
    ) -> Result<Self, CliError> {
        cluster::check_lease_name(&args.lease)?;
        let identity = cluster::identity(args.identity.as_deref())?;
        let config = tune(args.election_config(identity));
        config.validate()?;
        let kube_config = cluster::load_config().await?;
        let namespace = cluster::namespace(args.namespace.namespace.as_deref(), &kube_config)?;
        let options = leaderz::client::Options::for_election(&config);
        let client = cluster::connect_with(kube_config, options).await?;

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

    /// Stops the election: releases the Lease if this process leads and no [`leaderz::Term`]
    /// is held any more.
    pub(crate) async fn shutdown(self) -> Result<(), CliError> {
        self.handle.shutdown().await.map_err(CliError::from)
    }
}
