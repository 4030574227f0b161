//! Every flag and environment variable of `leaderz`, and how they map to the library.
//!
//! Each flag can also be set with the `LEADERZ_*` variable named in its help; a flag on
//! the command line wins over the variable. Durations are humantime (`15s`, `500ms`, `1m`);
//! switches take `true`/`false`, `1`/`0`, `yes`/`no` or `on`/`off` from the environment.

use std::ffi::OsString;
use std::time::Duration;

use clap::builder::BoolishValueParser;
use clap::{Args, Parser, Subcommand, ValueEnum};
use leaderz::ElectionConfig;
use leaderz::config::Coordinated;

/// Leader election on Kubernetes Leases for any program: run a command only while this
/// process leads, or campaign as a sidecar and serve who leads over HTTP.
#[derive(Debug, Parser)]
#[command(name = "leaderz", version)]
pub(crate) struct Cli {
    /// Log filter: a level (`info`, `debug`) or tracing directives
    /// (`leaderz=debug,kube_client=debug`). Logs go to stderr; kube-client's own
    /// request-failure logs stay off unless the filter names `kube_client`.
    /// [default: $RUST_LOG, else `info`]
    #[arg(long, global = true, env = "LEADERZ_LOG_LEVEL", value_name = "FILTER")]
    pub(crate) log_level: Option<String>,

    #[command(subcommand)]
    pub(crate) command: Command,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub(crate) enum Command {
    /// Run CMD only while this process leads the Lease.
    ///
    /// CMD runs in its own process group (so it cannot read from the terminal) with
    /// LEADERZ_IDENTITY, LEADERZ_LEASE, LEADERZ_NAMESPACE and LEADERZ_FENCING_TOKEN in
    /// its environment. On loss of
    /// leadership the group gets SIGTERM (SIGKILL after --grace), then leaderz campaigns
    /// again (or exits with --exit-on-loss). When CMD exits, leaderz releases the Lease and
    /// exits with CMD's code (128+N if a signal N killed it). SIGTERM/SIGINT are forwarded
    /// to the group; leaderz releases once it has stopped. If leaderz dies, even by
    /// SIGKILL, the group is killed with it; if leaderz is stopped (SIGSTOP, Ctrl-Z) past
    /// its term, the group gets SIGTERM, then SIGKILL before another candidate may take
    /// over. A CMD that cannot be executed fails at once, before anything is written,
    /// with 127 (not found) or 126 (not executable).
    Run(RunArgs),
    /// Sidecar: campaign for the Lease and serve who leads over HTTP.
    ///
    /// GET / answers `{"name":"<leader>"}` like the kubernetes/contrib leader-elector;
    /// /status (details as JSON), /healthz, /readyz, /metrics (Prometheus) and /events
    /// (server-sent events, one per leader change). SIGTERM/SIGINT release and exit 0.
    Serve(ServeArgs),
    /// Show one Lease, or every Lease in the namespace, as `kubectl describe` does, plus
    /// an estimate of when it expires.
    Status(StatusArgs),
    /// Print a line each time a Lease's holder or transitions change (or its strategy,
    /// preferred holder, pending handoff or candidates), starting with the current state.
    /// Runs until interrupted.
    Watch(WatchArgs),
    /// Hand the Lease over to another leaderz candidate now: the holder stops its work,
    /// then writes the chosen candidate as holder, which starts at once.
    ///
    /// Writes a request into the Lease's `leaderz.io/handoff` annotation; the named
    /// candidate (or, without --to, whichever leaderz candidate answers first) accepts it,
    /// which proves it is alive and watching; the holder ends its term at its next renewal,
    /// waits for its work to stop, and transfers the Lease; the new holder's first write
    /// completes it. Waits for that and prints one line. Nobody answering within
    /// --accept-timeout, or the holder not handing over within --timeout (a client-go
    /// holder ignores handoffs), withdraws the request and fails. Writing nothing, it
    /// refuses a Lease that does not exist, has no holder, is already being handed over,
    /// or is run by a coordinated-election controller. Needs `get`, `update` and `watch`
    /// on the Lease (kube/handoff/role.yaml).
    Handoff(HandoffArgs),
}

/// The namespace flag shared by every subcommand.
#[derive(Debug, Args)]
pub(crate) struct NamespaceArg {
    /// Namespace of the Lease. [default: $POD_NAMESPACE, else the pod's service-account
    /// namespace, else the kubeconfig context's, else `default`]
    #[arg(short = 'n', long, env = "LEADERZ_NAMESPACE")]
    pub(crate) namespace: Option<String>,
}

/// How a candidate takes part in the election (`run` and `serve`).
#[derive(Debug, Args)]
pub(crate) struct ElectionArgs {
    /// Name of the Lease to contend for (created if missing).
    #[arg(long, env = "LEADERZ_LEASE", value_name = "NAME")]
    pub(crate) lease: String,

    #[command(flatten)]
    pub(crate) namespace: NamespaceArg,

    /// This candidate's identity, written as the Lease's holderIdentity; must be unique
    /// among candidates. [default: $POD_NAME, else the hostname]
    #[arg(long, env = "LEADERZ_IDENTITY")]
    pub(crate) identity: Option<String>,

    /// How long followers wait after the last renewal they saw before taking over.
    #[arg(long, env = "LEADERZ_LEASE_DURATION", value_name = "DURATION", default_value = "15s", value_parser = parse_duration)]
    pub(crate) lease_duration: Duration,

    /// How long the leader keeps leading without a successful renewal.
    #[arg(long, env = "LEADERZ_RENEW_DEADLINE", value_name = "DURATION", default_value = "10s", value_parser = parse_duration)]
    pub(crate) renew_deadline: Duration,

    /// How often the leader renews (unless --renew-interval is set), how soon it retries
    /// a failed renewal, and how often followers poll when they cannot watch.
    #[arg(long, env = "LEADERZ_RETRY_PERIOD", value_name = "DURATION", default_value = "2s", value_parser = parse_duration)]
    pub(crate) retry_period: Duration,

    /// How often the leader renews while renewals succeed (failed ones are retried every
    /// retry period). Longer cuts the API load; it must leave room for a retry:
    /// renew interval + 1.2 x retry period < renew deadline. [default: the retry period]
    #[arg(long, env = "LEADERZ_RENEW_INTERVAL", value_name = "DURATION", value_parser = parse_duration)]
    pub(crate) renew_interval: Option<Duration>,

    /// Record Kubernetes Events on the Lease when this process starts and stops leading
    /// (needs `create` on `events.events.k8s.io`).
    #[arg(long, env = "LEADERZ_EVENTS", value_parser = BoolishValueParser::new())]
    pub(crate) events: bool,

    #[command(flatten)]
    pub(crate) coordinated: CoordinatedArgs,
}

/// Coordinated leader election (KEP-4355) for `run` and `serve`.
#[derive(Debug, Args)]
pub(crate) struct CoordinatedArgs {
    /// Take part in coordinated leader election: publish a LeaseCandidate named after
    /// the identity (which must then be a DNS subdomain) and lead only when
    /// kube-apiserver's controller names this candidate; never take the Lease on its
    /// own. Needs kube-apiserver with `--feature-gates=CoordinatedLeaderElection=true
    /// --runtime-config=coordination.k8s.io/v1beta1=true`, and the Role in
    /// kube/coordinated/.
    #[arg(long, env = "LEADERZ_COORDINATED", value_parser = BoolishValueParser::new())]
    pub(crate) coordinated: bool,

    /// The LeaseCandidate's binaryVersion (semver without a leading `v`), with
    /// --coordinated. [default: this leaderz's version]
    #[arg(
        long,
        env = "LEADERZ_BINARY_VERSION",
        value_name = "VERSION",
        requires = "coordinated"
    )]
    pub(crate) binary_version: Option<String>,

    /// The LeaseCandidate's emulationVersion, at most the binary version; the built-in
    /// strategy elects the candidate with the lowest. With --coordinated. [default: the
    /// binary version]
    #[arg(
        long,
        env = "LEADERZ_EMULATION_VERSION",
        value_name = "VERSION",
        requires = "coordinated"
    )]
    pub(crate) emulation_version: Option<String>,

    /// The strategy this candidate asks for: `OldestEmulationVersion` (built into
    /// kube-apiserver) or a third-party strategy (a name with a `/`), carried out by
    /// another controller. With --coordinated. [default: OldestEmulationVersion]
    #[arg(
        long,
        env = "LEADERZ_STRATEGY",
        value_name = "STRATEGY",
        requires = "coordinated"
    )]
    pub(crate) strategy: Option<String>,
}

impl CoordinatedArgs {
    /// The library's coordinated-election settings, if `--coordinated` is on.
    pub(crate) fn config(&self) -> Option<Coordinated> {
        if !self.coordinated {
            return None;
        }
        let binary = self
            .binary_version
            .clone()
            .unwrap_or_else(|| env!("CARGO_PKG_VERSION").to_owned());
        let emulation = self
            .emulation_version
            .clone()
            .unwrap_or_else(|| binary.clone());
        let mut c = Coordinated::new(binary).emulation_version(emulation);
        if let Some(strategy) = &self.strategy {
            c = c.strategy(strategy.clone());
        }
        Some(c)
    }
}

impl ElectionArgs {
    /// The library's election config for these flags (validated by the caller).
    pub(crate) fn election_config(&self, identity: String) -> ElectionConfig {
        let mut config = ElectionConfig::new(identity)
            .lease_duration(self.lease_duration)
            .renew_deadline(self.renew_deadline)
            .retry_period(self.retry_period);
        if let Some(interval) = self.renew_interval {
            config = config.renew_interval(interval);
        }
        if let Some(coordinated) = self.coordinated.config() {
            config = config.coordinated(coordinated);
        }
        config
    }
}

/// Traffic to the leader (`run` and `serve`): a label on its pod, and the EndpointSlice
/// of a selector-less Service. Both need this pod's name in `$POD_NAME`; the
/// EndpointSlice also its IP in `$POD_IP` (the downward API's `metadata.name` and
/// `status.podIP`). Pod and Service are in the Lease's namespace.
#[derive(Debug, Args)]
pub(crate) struct RouteArgs {
    /// While leading, label this pod KEY=VALUE, for a Service that selects it. Set when
    /// a term starts (alongside the work), removed after the work stopped and before the
    /// Lease is released; also taken off other pods that carry it for an older term; a
    /// stale one on this pod is removed at startup. Needs kube/label-pod/role.yaml.
    #[arg(long, env = "LEADERZ_LABEL_POD", value_name = "KEY=VALUE")]
    pub(crate) label_pod: Option<String>,

    /// While leading, point the EndpointSlice named SERVICE, of the selector-less Service
    /// SERVICE, at this pod's IP ($POD_IP) with the Service's ports; emptied after the
    /// work stopped and before the Lease is released; the next leader takes it over.
    /// Needs kube/leader-endpoints/role.yaml.
    #[arg(long, env = "LEADERZ_LEADER_ENDPOINTS", value_name = "SERVICE")]
    pub(crate) leader_endpoints: Option<String>,

    /// With --label-pod or --leader-endpoints: after traffic was pointed away, wait this
    /// long before releasing the Lease, so that kube-proxy (which applies changes about
    /// once a second) stops sending connections here before the next leader starts. The
    /// Service reaches nobody for that much longer at each graceful handover.
    #[arg(long, env = "LEADERZ_ROUTING_DRAIN", value_name = "DURATION", default_value = "0s", value_parser = parse_duration)]
    pub(crate) routing_drain: Duration,
}

impl RouteArgs {
    /// Whether any route is asked for.
    pub(crate) fn any(&self) -> bool {
        self.label_pod.is_some() || self.leader_endpoints.is_some()
    }
}

/// `leaderz run`.
#[derive(Debug, Args)]
pub(crate) struct RunArgs {
    #[command(flatten)]
    pub(crate) election: ElectionArgs,

    #[command(flatten)]
    pub(crate) routes: RouteArgs,

    /// Join the shard set named by --lease with this many shards instead of leading one
    /// Lease: CMD runs from the start and is told which shards this member owns, in the
    /// JSON file LEADERZ_SHARDS_FILE (`{"generation":N,"shards":{"3":7,...}}`, shard to
    /// fencing token), rewritten on every change, followed by SIGHUP to its process
    /// group. It must write the generation it has applied to LEADERZ_SHARDS_ACK: a lost
    /// shard is released only then (SIGKILL if it does not within --grace, or before
    /// another member may take the shard). See README "Sharded leases".
    #[arg(long, env = "LEADERZ_SHARDS", value_name = "S",
          conflicts_with_all = ["exit_on_loss", "http", "events", "coordinated", "label_pod", "leader_endpoints"])]
    pub(crate) shards: Option<u32>,

    /// Where --shards writes the shard file (the ack file is the same path with `.ack`
    /// appended). [default: a file in the temporary directory]
    #[arg(
        long,
        env = "LEADERZ_SHARDS_FILE_PATH",
        value_name = "PATH",
        requires = "shards"
    )]
    pub(crate) shards_file: Option<std::path::PathBuf>,

    /// After SIGTERM, how long CMD's process group may take to exit before SIGKILL. After
    /// a loss of leadership SIGKILL comes earlier if need be: before another candidate
    /// may take over (the last renewal + the lease duration, less up to 500 ms).
    #[arg(long, env = "LEADERZ_GRACE", value_name = "DURATION", default_value = "10s", value_parser = parse_duration)]
    pub(crate) grace: Duration,

    /// Exit with code 1 when leadership is lost, instead of campaigning again.
    #[arg(long, env = "LEADERZ_EXIT_ON_LOSS", value_parser = BoolishValueParser::new())]
    pub(crate) exit_on_loss: bool,

    /// Also serve the HTTP endpoints of `leaderz serve` on this address.
    #[arg(long, env = "LEADERZ_HTTP", value_name = "ADDR")]
    pub(crate) http: Option<String>,

    /// The command to run while leading, and its arguments (after `--`).
    #[arg(last = true, required = true, value_name = "CMD")]
    pub(crate) command: Vec<OsString>,
}

/// `leaderz serve`.
#[derive(Debug, Args)]
pub(crate) struct ServeArgs {
    #[command(flatten)]
    pub(crate) election: ElectionArgs,

    #[command(flatten)]
    pub(crate) routes: RouteArgs,

    /// Address to serve HTTP on. Use `0.0.0.0:4040` for kubelet probes.
    #[arg(
        long,
        env = "LEADERZ_HTTP",
        value_name = "ADDR",
        default_value = "127.0.0.1:4040"
    )]
    pub(crate) http: String,
}

/// `leaderz status`.
#[derive(Debug, Args)]
pub(crate) struct StatusArgs {
    /// The Lease to show. [default: every Lease in the namespace]
    #[arg(conflicts_with = "shards")]
    pub(crate) name: Option<String>,

    /// Show the shard map of this shard set: its members, and who owns each shard.
    #[arg(long, env = "LEADERZ_STATUS_SHARDS", value_name = "SET")]
    pub(crate) shards: Option<String>,

    #[command(flatten)]
    pub(crate) namespace: NamespaceArg,

    #[command(flatten)]
    pub(crate) output: OutputArg,
}

/// `leaderz watch`.
#[derive(Debug, Args)]
pub(crate) struct WatchArgs {
    /// The Lease to watch.
    pub(crate) name: String,

    #[command(flatten)]
    pub(crate) namespace: NamespaceArg,

    #[command(flatten)]
    pub(crate) output: OutputArg,
}

/// `leaderz handoff`.
#[derive(Debug, Args)]
pub(crate) struct HandoffArgs {
    /// The Lease to hand over.
    pub(crate) name: String,

    #[command(flatten)]
    pub(crate) namespace: NamespaceArg,

    /// The identity of the candidate to hand over to. [default: whichever leaderz
    /// candidate of the Lease accepts first]
    #[arg(long, env = "LEADERZ_HANDOFF_TO", value_name = "IDENTITY")]
    pub(crate) to: Option<String>,

    /// How long a candidate has to accept the request before it is withdrawn.
    #[arg(long, env = "LEADERZ_HANDOFF_ACCEPT_TIMEOUT", value_name = "DURATION", default_value = "5s", value_parser = parse_duration)]
    pub(crate) accept_timeout: Duration,

    /// How long, from the request, the handover may take before the request is
    /// withdrawn. [default: 2 x the Lease's leaseDurationSeconds + 10s]
    #[arg(long, env = "LEADERZ_HANDOFF_TIMEOUT", value_name = "DURATION", value_parser = parse_duration)]
    pub(crate) timeout: Option<Duration>,

    /// Withdraw the pending handoff of the Lease (requested or accepted) instead of
    /// requesting one.
    #[arg(long, env = "LEADERZ_HANDOFF_CANCEL", value_parser = BoolishValueParser::new(), conflicts_with_all = ["to", "timeout"])]
    pub(crate) cancel: bool,

    #[command(flatten)]
    pub(crate) output: OutputArg,
}

/// The output format flag of `status`, `watch` and `handoff`.
#[derive(Debug, Args)]
pub(crate) struct OutputArg {
    /// Output format.
    #[arg(short = 'o', long = "output", env = "LEADERZ_OUTPUT", value_enum, default_value_t = Output::Table)]
    pub(crate) format: Output,
}

/// How `status`, `watch` and `handoff` print.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub(crate) enum Output {
    /// Aligned columns for people.
    Table,
    /// JSON (`watch`: one object per line), fields named as in the Lease.
    Json,
}

/// The longest duration a flag takes: beyond it a value is a typo, and timers built on
/// it could overflow.
const MAX_FLAG_DURATION: Duration = Duration::from_secs(366 * 24 * 3600);

/// Parses a humantime duration (`15s`, `500ms`, `1m 30s`), at most a year.
fn parse_duration(s: &str) -> Result<Duration, String> {
    let d = humantime::parse_duration(s)
        .map_err(|e| format!("{e} (write durations like `15s`, `500ms` or `1m`)"))?;
    if d > MAX_FLAG_DURATION {
        return Err(format!("{s} is longer than a year"));
    }
    Ok(d)
}

/// Flattens a clap error (which spans several lines with usage) into the one line
/// `main` prints after `error: `. `args` are the command line, to tailor the hint.
pub(crate) fn one_line(err: &clap::Error, args: &[OsString]) -> String {
    let rendered = err.render().to_string();
    let mut parts: Vec<&str> = Vec::new();
    for line in rendered.lines().map(str::trim) {
        if line.is_empty() || line.starts_with("Usage:") || line.starts_with("For more information")
        {
            continue;
        }
        parts.push(line.strip_prefix("error: ").unwrap_or(line));
    }
    let mut message = parts.join(" ");
    let subcommand = args
        .iter()
        .skip(1)
        .filter_map(|a| a.to_str())
        .find(|a| !a.starts_with('-'));
    if subcommand == Some("run") && err.kind() == clap::error::ErrorKind::UnknownArgument {
        message.push_str(" (the command goes after `--`: leaderz run --lease NAME -- CMD ARGS...)");
    } else {
        match subcommand {
            Some(sub @ ("run" | "serve" | "status" | "watch" | "handoff")) => {
                message.push_str(&format!(" (see `leaderz {sub} --help`)"));
            }
            _ => message.push_str(" (see `leaderz --help`)"),
        }
    }
    message
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("leaderz").chain(args.iter().copied()))
    }

    fn run_args(args: &[&str]) -> RunArgs {
        match parse(args).unwrap().command {
            Command::Run(r) => r,
            other => panic!("not run: {other:?}"),
        }
    }

    #[test]
    fn clap_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn defaults_are_client_go_defaults() {
        let r = run_args(&["run", "--lease", "l", "--", "true"]);
        assert_eq!(r.election.lease, "l");
        assert_eq!(r.election.lease_duration, Duration::from_secs(15));
        assert_eq!(r.election.renew_deadline, Duration::from_secs(10));
        assert_eq!(r.election.retry_period, Duration::from_secs(2));
        assert_eq!(r.grace, Duration::from_secs(10));
        assert!(!r.exit_on_loss && !r.election.events);
        assert_eq!(r.http, None);
        assert_eq!(r.command, vec![OsString::from("true")]);
        let config = r.election.election_config("me".into());
        assert_eq!(config, ElectionConfig::new("me"));
    }

    #[test]
    fn shards_and_the_flags_it_cannot_honour() {
        let r = run_args(&["run", "--lease", "jobs", "--shards", "64", "--", "w"]);
        assert_eq!((r.shards, r.shards_file), (Some(64), None));
        for flag in ["--exit-on-loss", "--events", "--coordinated", "--http=:0"] {
            let args = ["run", "--lease", "jobs", "--shards", "8", flag, "--", "w"];
            assert!(parse(&args).is_err(), "{flag} with --shards was accepted");
        }
        assert!(parse(&["run", "--lease", "j", "--shards-file", "/f", "--", "w"]).is_err());
    }

    #[test]
    fn routing_flags_for_run_and_serve_and_not_with_shards() {
        let r = run_args(&["run", "--lease", "l", "--", "x"]);
        assert!(!r.routes.any());
        assert_eq!(r.routes.routing_drain, Duration::ZERO);
        let r = run_args(&[
            "run",
            "--lease",
            "l",
            "--label-pod",
            "leaderz.io/role=leader",
            "--leader-endpoints",
            "svc",
            "--routing-drain",
            "2s",
            "--",
            "x",
        ]);
        assert_eq!(
            r.routes.label_pod.as_deref(),
            Some("leaderz.io/role=leader")
        );
        assert_eq!(r.routes.leader_endpoints.as_deref(), Some("svc"));
        assert_eq!(r.routes.routing_drain, Duration::from_secs(2));
        let Command::Serve(s) = parse(&["serve", "--lease", "l", "--label-pod", "a=b"])
            .unwrap()
            .command
        else {
            panic!()
        };
        assert!(s.routes.any());
        for flag in ["--label-pod=a=b", "--leader-endpoints=svc"] {
            let args = ["run", "--lease", "jobs", "--shards", "8", flag, "--", "w"];
            assert!(parse(&args).is_err(), "{flag} with --shards was accepted");
        }
    }

    #[test]
    fn absurd_durations_are_refused() {
        assert!(parse_duration("365d").is_ok());
        let e = parse_duration("1000000000000s").unwrap_err();
        assert!(e.contains("longer than a year"), "{e}");
    }

    #[test]
    fn humantime_durations_and_the_command_after_dashes() {
        let r = run_args(&[
            "run",
            "--lease",
            "l",
            "--lease-duration",
            "3s",
            "--renew-deadline",
            "2s",
            "--retry-period",
            "500ms",
            "--renew-interval",
            "1s",
            "--grace",
            "1m 30s",
            "--exit-on-loss",
            "--",
            "sh",
            "-c",
            "echo --lease",
        ]);
        assert_eq!(r.election.lease_duration, Duration::from_secs(3));
        assert_eq!(r.election.retry_period, Duration::from_millis(500));
        let config = r.election.election_config("me".into());
        assert_eq!(config.renew_interval, Some(Duration::from_secs(1)));
        assert_eq!(r.grace, Duration::from_secs(90));
        assert!(r.exit_on_loss);
        assert_eq!(r.command, ["sh", "-c", "echo --lease"].map(OsString::from));
    }

    #[test]
    fn coordinated_flags_map_to_the_library_with_defaults() {
        let r = run_args(&["run", "--lease", "l", "--", "true"]);
        assert_eq!(r.election.election_config("me".into()).coordinated, None);
        let r = run_args(&["run", "--lease", "l", "--coordinated", "--", "true"]);
        let c = r.election.election_config("me".into()).coordinated.unwrap();
        let own = env!("CARGO_PKG_VERSION");
        assert_eq!(c, Coordinated::new(own));
        assert_eq!(
            (c.emulation_version.as_str(), c.strategy.as_str()),
            (own, "OldestEmulationVersion")
        );
        let Command::Serve(s) = parse(&[
            "serve",
            "--lease",
            "l",
            "--coordinated",
            "--binary-version",
            "1.34.0",
            "--emulation-version",
            "1.33.0",
            "--strategy",
            "example.com/mine",
        ])
        .unwrap()
        .command
        else {
            panic!()
        };
        let c = s.election.election_config("me".into()).coordinated.unwrap();
        assert_eq!(
            c,
            Coordinated::new("1.34.0")
                .emulation_version("1.33.0")
                .strategy("example.com/mine")
        );
        // The emulation version defaults to the binary version given.
        let r = run_args(&[
            "run",
            "--lease",
            "l",
            "--coordinated",
            "--binary-version",
            "1.2.3",
            "--",
            "x",
        ]);
        let c = r.election.election_config("me".into()).coordinated.unwrap();
        assert_eq!(c.emulation_version, "1.2.3");
    }

    #[test]
    fn coordinated_settings_need_coordinated() {
        for flag in ["--binary-version", "--emulation-version", "--strategy"] {
            let err = parse(&["serve", "--lease", "l", flag, "1.0.0"]).unwrap_err();
            assert_eq!(
                err.kind(),
                clap::error::ErrorKind::MissingRequiredArgument,
                "{flag}"
            );
        }
    }

    #[test]
    fn handoff_takes_a_lease_a_target_and_timeouts() {
        let Command::Handoff(h) = parse(&["handoff", "my-lock"]).unwrap().command else {
            panic!()
        };
        assert_eq!((h.name.as_str(), h.to, h.timeout), ("my-lock", None, None));
        assert_eq!(h.accept_timeout, Duration::from_secs(5));
        assert!(!h.cancel);
        let Command::Handoff(h) = parse(&[
            "handoff",
            "my-lock",
            "--to",
            "pod-b",
            "-n",
            "ns",
            "--timeout",
            "1m",
            "--accept-timeout",
            "2s",
            "-o",
            "json",
        ])
        .unwrap()
        .command
        else {
            panic!()
        };
        assert_eq!(h.to.as_deref(), Some("pod-b"));
        assert_eq!(h.namespace.namespace.as_deref(), Some("ns"));
        assert_eq!(h.timeout, Some(Duration::from_secs(60)));
        assert_eq!(h.accept_timeout, Duration::from_secs(2));
        assert_eq!(h.output.format, Output::Json);
        let Command::Handoff(h) = parse(&["handoff", "my-lock", "--cancel"]).unwrap().command
        else {
            panic!()
        };
        assert!(h.cancel);
        let err = parse(&["handoff", "my-lock", "--cancel", "--to", "b"]).unwrap_err();
        assert_eq!(err.kind(), clap::error::ErrorKind::ArgumentConflict);
        assert!(parse(&["handoff"]).is_err(), "the Lease is required");
    }

    #[test]
    fn serve_listens_on_loopback_by_default() {
        let Command::Serve(s) = parse(&["serve", "--lease", "l"]).unwrap().command else {
            panic!()
        };
        assert_eq!(s.http, "127.0.0.1:4040");
    }

    #[test]
    fn status_and_watch_take_namespace_and_output() {
        let Command::Status(s) = parse(&["status"]).unwrap().command else {
            panic!()
        };
        assert_eq!((s.name, s.namespace.namespace), (None, None));
        assert_eq!(s.output.format, Output::Table);
        let Command::Watch(w) = parse(&["watch", "l", "-n", "ns", "-o", "json"])
            .unwrap()
            .command
        else {
            panic!()
        };
        assert_eq!(w.name, "l");
        assert_eq!(w.namespace.namespace.as_deref(), Some("ns"));
        assert_eq!(w.output.format, Output::Json);
    }

    /// Every flag has a `LEADERZ_*` variable (checked on the clap definition, so a new
    /// flag without one fails here).
    #[test]
    fn every_flag_has_an_env_var() {
        fn check(cmd: &clap::Command, path: &str) {
            for arg in cmd.get_arguments() {
                let id = arg.get_id().as_str();
                if arg.is_positional() || matches!(id, "help" | "version") {
                    continue;
                }
                let env = arg.get_env().and_then(|e| e.to_str()).unwrap_or("");
                assert!(env.starts_with("LEADERZ_"), "{path} --{id} has no env var");
            }
            for sub in cmd.get_subcommands() {
                check(sub, &format!("{path} {}", sub.get_name()));
            }
        }
        check(&Cli::command(), "leaderz");
    }

    #[test]
    fn env_vars_set_flags_and_flags_win() {
        // Tests cannot set variables (unsafe in edition 2024), so point --http at one
        // that is always there.
        let path = std::env::var("PATH").unwrap();
        let cmd =
            || Cli::command().mut_subcommand("run", |run| run.mut_arg("http", |a| a.env("PATH")));
        let get = |args: &[&str]| {
            let m = cmd().try_get_matches_from(args.iter().copied()).unwrap();
            let run = m.subcommand_matches("run").unwrap().clone();
            run.get_one::<String>("http").cloned()
        };
        assert_eq!(
            get(&["leaderz", "run", "--lease", "l", "--", "x"]),
            Some(path)
        );
        assert_eq!(
            get(&[
                "leaderz", "run", "--lease", "l", "--http", "[::1]:1", "--", "x"
            ])
            .as_deref(),
            Some("[::1]:1")
        );
    }

    #[test]
    fn bad_input_is_one_line_that_says_what_to_do() {
        let line = |args: &[&str]| {
            let err = parse(args).unwrap_err();
            let argv: Vec<OsString> = std::iter::once("leaderz")
                .chain(args.iter().copied())
                .map(OsString::from)
                .collect();
            let line = one_line(&err, &argv);
            assert!(!line.contains('\n'), "{line}");
            line
        };
        let l = line(&["run", "--", "true"]);
        assert!(
            l.contains("--lease <NAME>") && l.ends_with("(see `leaderz run --help`)"),
            "{l}"
        );
        let l = line(&["run", "--lease", "l", "--lease-duration", "soon", "--", "x"]);
        assert!(l.contains("write durations like `15s`"), "{l}");
        let l = line(&["run", "--lease", "l", "sleep", "1"]);
        assert!(l.contains("after `--`"), "{l}");
        let l = line(&["frobnicate"]);
        assert!(l.ends_with("(see `leaderz --help`)"), "{l}");
    }
}
