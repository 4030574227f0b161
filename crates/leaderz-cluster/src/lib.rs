//! A real one-node Kubernetes cluster in namespaces of its own, for tests that need pods.
//!
//! etcd, kube-apiserver (ServiceAccount admission on, `Node,RBAC`), kube-controller-manager,
//! kube-scheduler, kube-proxy (iptables), the kubelet and containerd + runc + the CNI
//! bridge, all inside a network, mount and PID namespace that this process creates (see
//! `namespace.rs`): host interfaces, routes, iptables, sysctls and paths are untouched, the
//! pod bridge has no uplink, and nothing outlives this process however it ends. The
//! cluster's images (the app image from the project's static binaries and a sandbox
//! image) are written here as OCI archives and imported — no registry, no daemon.
//!
//! The control plane is [`leaderz_testenv::ControlPlane`] placed in the node's namespaces;
//! this process reaches the API server through a loopback forwarder, so
//! [`Cluster::control_plane`] gives the usual clients and kubeconfig.
//!
//! ```no_run
//! # async fn demo() -> anyhow::Result<()> {
//! let Some(cluster) = leaderz_cluster::shared_or_skip("my_test") else {
//!     return Ok(()); // printed one line saying why
//! };
//! let client = cluster.control_plane().admin_client()?;
//! # Ok(()) }
//! ```

mod cgroups;
mod config;
mod error;
mod foreground;
mod forward;
pub mod image;
mod namespace;
pub mod observe;

use std::{
    collections::BTreeMap,
    io::Write as _,
    net::{Ipv4Addr, SocketAddr},
    path::{Path, PathBuf},
    process::Stdio,
    sync::{Arc, OnceLock},
    thread,
    time::Duration,
};

use k8s_openapi::api::core::v1::{Node, ServiceAccount};
use kube::Api;
use leaderz_testenv::{
    ControlPlane, Placement, StartOptions,
    process::{DataDir, Server, rss_bytes},
};
use tokio::time::Instant;

pub use config::{
    CONTAINERD_SOCKET, KUBERNETES_SERVICE_IP, NODE_IP, NODE_NAME, POD_SUBNET, SERVICE_RANGE,
};
pub use error::{Error, Result};
pub use foreground::run_foreground;

use crate::{cgroups::CgroupRoot, config::Layout, forward::Forwarder, namespace::NodeNamespace};

/// Set to `1` (CI does) to make tests fail, not skip, where the cluster cannot run.
pub const REQUIRE_ENV: &str = "LEADERZ_REQUIRE_NODE";

/// How long each step of startup may take.
const READY_TIMEOUT: Duration = Duration::from_secs(120);

/// How long the parts took, for the report.
#[derive(Debug, Clone, Copy)]
#[non_exhaustive]
pub struct Timings {
    /// Finding or building the Go binaries (`controlplane/build*.sh`).
    pub binaries: Duration,
    /// Building the static Rust binaries and writing the OCI archives.
    pub images: Duration,
    /// From creating the namespaces to: node Ready, images imported, the `default`
    /// ServiceAccount present, and kube-proxy's rules for the `kubernetes` Service in place.
    pub start_to_ready: Duration,
}

/// One process of the node (host PID), for memory reports.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct NodeProcess {
    /// Host PID.
    pub pid: u32,
    /// Its command name (`/proc/<pid>/comm`).
    pub name: String,
    /// Resident set size in bytes.
    pub rss: u64,
}

/// A running one-node cluster; dropping an owned one tears it down (see [`Cluster::stop`]).
pub struct Cluster {
    // Taken in `teardown`, in this order.
    namespace: Option<NodeNamespace>,
    cgroups: Option<CgroupRoot>,
    components: Vec<Server>,
    forwarder: Option<Forwarder>,
    control_plane: Option<ControlPlane>,
    dir: Option<DataDir>,
    timings: Timings,
    images: Vec<String>,
}

impl std::fmt::Debug for Cluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cluster")
            .field("control_plane", &self.control_plane)
            .field(
                "init_pid",
                &self.namespace.as_ref().map(NodeNamespace::init_pid),
            )
            .field("timings", &self.timings)
            .finish_non_exhaustive()
    }
}

/// Why this machine cannot run the cluster, if it cannot: not Linux, not root, or a
/// program or CNI plugin missing (install the Debian packages `containerd`, `runc`,
/// `containernetworking-plugins`, `iptables`, `iproute2`, `util-linux`).
pub fn unavailable_reason() -> Option<String> {
    if !cfg!(target_os = "linux") {
        return Some("the node needs Linux namespaces".to_owned());
    }
    if !nix::unistd::geteuid().is_root() {
        return Some(
            "the node needs root (namespaces, mounts, cgroups); run the tests as root".to_owned(),
        );
    }
    let missing: Vec<&str> = [
        "containerd",
        "containerd-shim-runc-v2",
        "runc",
        "ctr",
        "unshare",
        "nsenter",
        "setpriv",
        "ip",
        "iptables",
        "go",
    ]
    .into_iter()
    .filter(|program| !on_path(program))
    .chain(
        ["bridge", "host-local", "loopback"]
            .into_iter()
            .filter(|plugin| !Path::new("/usr/lib/cni").join(plugin).is_file()),
    )
    .collect();
    if !missing.is_empty() {
        return Some(format!(
            "missing {} (apt-get install containerd runc containernetworking-plugins iptables iproute2 util-linux; Go for the kubelet)",
            missing.join(", ")
        ));
    }
    None
}

fn on_path(program: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|path| std::env::split_paths(&path).any(|dir| dir.join(program).is_file()))
}

/// The shared cluster, or `None` after printing one line (bypassing the test harness's
/// output capture) saying why the test `test` is skipped. Panics instead of skipping if
/// [`REQUIRE_ENV`] is `1`, and if the cluster failed to start for any other reason.
pub fn shared_or_skip(test: &str) -> Option<&'static Cluster> {
    match Cluster::shared() {
        Ok(cluster) => Some(cluster),
        Err(err) => match err.unavailable_reason() {
            Some(reason) if std::env::var(REQUIRE_ENV).as_deref() != Ok("1") => {
                let _ = writeln!(std::io::stderr(), "{test}: SKIPPED: {reason}");
                None
            }
            Some(reason) => panic!("{test}: {REQUIRE_ENV}=1 but {reason}"),
            None => panic!("{test}: the cluster failed to start: {}", error_chain(&err)),
        },
    }
}

/// `err: cause: cause...`.
pub fn error_chain(err: &dyn std::error::Error) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// What [`prepare`] made: the binaries' directories and the image archives.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct Prepared {
    /// kube-apiserver and etcd.
    pub controlplane_bin: PathBuf,
    /// kubelet, kube-controller-manager, kube-scheduler, kube-proxy, pause.
    pub node_bin: PathBuf,
    /// The OCI archives: the app image, then the sandbox image.
    pub archives: Vec<PathBuf>,
    /// How long the Go binaries took (found in the cache: well under a second).
    pub binaries: Duration,
    /// How long the static Rust binaries and the archives took.
    pub images: Duration,
}

/// Builds (or finds cached) everything the cluster needs, without starting it: the Go
/// binaries (`controlplane/build.sh`, `controlplane/build-node.sh`), the static
/// `leaderz` and `leaderz-example`, and the OCI archives in `target/leaderz-images/`.
/// Progress goes to stderr.
pub async fn prepare() -> Result<Prepared> {
    let began = Instant::now();
    eprintln!(
        "cluster: [1/3] Go binaries: kube-apiserver, etcd, kubelet, kube-controller-manager, kube-scheduler, kube-proxy (built once, cached)"
    );
    let controlplane_bin = build_script("build.sh").await?;
    let node_bin = build_script("build-node.sh").await?;
    let binaries = began.elapsed();

    let began = Instant::now();
    eprintln!(
        "cluster: [2/3] static release binaries leaderz + leaderz-example (cargo; minutes the first time), then the images"
    );
    let image_dir = image::target_dir().join("leaderz-images");
    std::fs::create_dir_all(&image_dir)
        .map_err(Error::io(format!("creating {}", image_dir.display())))?;
    let [leaderz, example] = image::build_app_binaries().await?;
    let read =
        |path: &Path| std::fs::read(path).map_err(Error::io(format!("reading {}", path.display())));
    let app_archive = image_dir.join("leaderz.oci.tar");
    image::app_image(read(&leaderz)?, read(&example)?).write_archive(&app_archive)?;
    let pause_archive = image_dir.join("pause.oci.tar");
    image::pause_image(read(&node_bin.join("pause"))?).write_archive(&pause_archive)?;
    Ok(Prepared {
        controlplane_bin,
        node_bin,
        archives: vec![app_archive, pause_archive],
        binaries,
        images: began.elapsed(),
    })
}

impl Cluster {
    /// The cluster shared by every test in this process, started on first use (on a thread
    /// of its own, so any runtime may call this). Never dropped: it dies with the process,
    /// and cleaners remove its directories and cgroups then.
    pub fn shared() -> Result<&'static Self> {
        static SHARED: OnceLock<Result<Cluster, Arc<Error>>> = OnceLock::new();
        SHARED
            .get_or_init(|| Self::start_blocking().map_err(Arc::new))
            .as_ref()
            .map_err(|err| Error::Shared(Arc::clone(err)))
    }

    /// [`start`](Self::start) on a thread of its own with its own runtime.
    pub fn start_blocking() -> Result<Self> {
        thread::Builder::new()
            .name("leaderz-cluster-start".to_owned())
            .spawn(|| {
                tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .map_err(Error::io("building a Tokio runtime for startup"))?
                    .block_on(Self::start())
            })
            .map_err(Error::io("starting the cluster's startup thread"))?
            .join()
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
    }

    /// Builds what is missing (Go binaries, static Rust binaries, images; progress on
    /// stderr), then starts an owned cluster and waits until it can run pods.
    pub async fn start() -> Result<Self> {
        if let Some(reason) = unavailable_reason() {
            return Err(Error::Unavailable(reason));
        }
        let prepared = prepare().await?;
        eprintln!("cluster: [3/3] starting the node");
        let began = Instant::now();
        let mut cluster = Self::boot(
            &prepared.controlplane_bin,
            &prepared.node_bin,
            &prepared.archives,
            Timings {
                binaries: prepared.binaries,
                images: prepared.images,
                start_to_ready: Duration::ZERO,
            },
        )
        .await?;
        cluster.timings.start_to_ready = began.elapsed();
        tracing::info!(timings = ?cluster.timings, "cluster ready");
        Ok(cluster)
    }

    async fn boot(
        controlplane_bin: &Path,
        node_bin: &Path,
        archives: &[PathBuf],
        timings: Timings,
    ) -> Result<Self> {
        let dir = DataDir::create("leaderz-cluster-")?;
        // From here on, `cluster` owns what is started: an error drops it, which tears
        // down whatever runs already.
        let mut cluster = Self {
            namespace: None,
            cgroups: Some(CgroupRoot::create()?),
            components: Vec::new(),
            forwarder: None,
            control_plane: None,
            dir: Some(dir),
            timings,
            images: vec![image::APP_IMAGE.to_owned(), image::PAUSE_IMAGE.to_owned()],
        };
        let dir = cluster.data_dir().to_owned();
        let namespace = NodeNamespace::create(&node_bin.join("pause"), NODE_IP, &dir).await?;
        let prefix = namespace.enter_prefix();
        let forwarder = Forwarder::start(
            &namespace.netns_path(),
            &[
                SocketAddr::from((Ipv4Addr::LOCALHOST, Placement::ETCD_PORT)),
                SocketAddr::from((Ipv4Addr::LOCALHOST, Placement::APISERVER_PORT)),
            ],
        )?;
        let placement = Placement::new(
            prefix.clone(),
            NODE_IP.into(),
            forwarder.seen_at(0),
            forwarder.seen_at(1),
        );
        cluster.namespace = Some(namespace);
        cluster.forwarder = Some(forwarder);

        // containerd and the control plane start side by side.
        let layout = Layout {
            cni_conf_dir: dir.join("cni").display().to_string(),
            sandbox_image: image::PAUSE_IMAGE.to_owned(),
            cgroup_root: cluster.cgroups()?.kubelet_root(),
            client_ca_file: String::new(), // filled in once the control plane has its CA
        };
        let cni_dir = dir.join("cni");
        std::fs::create_dir_all(&cni_dir)
            .map_err(Error::io(format!("creating {}", cni_dir.display())))?;
        write(
            &cni_dir.join("10-leaderz.conflist"),
            &config::cni_conflist(),
        )?;
        write(
            &dir.join("containerd.toml"),
            &config::containerd_toml(&layout),
        )?;
        let options = StartOptions::default()
            .binary_dir(controlplane_bin)
            .ready_timeout(READY_TIMEOUT)
            .placement(placement)
            .serving_san(NODE_IP.to_string())
            .serving_san(KUBERNETES_SERVICE_IP.to_string())
            .serving_san("kubernetes")
            .serving_san("kubernetes.default")
            .serving_san("kubernetes.default.svc")
            .serving_san("kubernetes.default.svc.cluster.local")
            .service_cluster_ip_range(SERVICE_RANGE)
            .service_account_admission(true)
            .authorization_mode("Node,RBAC")
            // `kubectl logs/exec`: dial the kubelet at the node's address, never look its
            // name up (the node's network has no DNS; the lookup would go nowhere).
            .apiserver_arg("--kubelet-preferred-address-types=InternalIP");
        let containerd = Server::spawn_with_prefix(
            "containerd",
            &prefix,
            Path::new("/usr/bin/containerd"),
            vec!["--config".into(), dir.join("containerd.toml").into()],
            dir.join("containerd.log"),
        )
        .await?;
        cluster.components.push(containerd);
        let (control_plane, imported) = tokio::join!(
            ControlPlane::start(options),
            cluster.import_images(archives)
        );
        let control_plane = control_plane?;
        imported?;

        // Identities of the node components: client certificates from the control plane's
        // CA, kubeconfigs pointing at the API server's address inside the namespace.
        let server = format!("https://{NODE_IP}:{}", Placement::APISERVER_PORT);
        let kubeconfig = |name: &str, user: &str, groups: &[&str]| -> Result<PathBuf> {
            let path = dir.join(format!("{name}.kubeconfig"));
            let credentials = control_plane.user_credentials(user, groups)?;
            control_plane.write_kubeconfig_for_server(&path, &server, &credentials)?;
            Ok(path)
        };
        let kubelet_kubeconfig = kubeconfig(
            "kubelet",
            &format!("system:node:{NODE_NAME}"),
            &["system:nodes"],
        )?;
        let cm_kubeconfig =
            kubeconfig("controller-manager", "system:kube-controller-manager", &[])?;
        let scheduler_kubeconfig = kubeconfig("scheduler", "system:kube-scheduler", &[])?;
        let proxy_kubeconfig = kubeconfig("kube-proxy", "system:kube-proxy", &[])?;
        let kubelet_config = Layout {
            client_ca_file: control_plane.client_ca_path().display().to_string(),
            ..layout
        };
        write(
            &dir.join("kubelet.yaml"),
            &config::kubelet_config(&kubelet_config),
        )?;

        let arg = |name: &str, value: &dyn std::fmt::Display| format!("--{name}={value}");
        let components: [(&'static str, Vec<String>); 4] = [
            (
                "kubelet",
                vec![
                    arg("config", &dir.join("kubelet.yaml").display()),
                    arg("kubeconfig", &kubelet_kubeconfig.display()),
                    arg("hostname-override", &NODE_NAME),
                    arg("node-ip", &NODE_IP),
                ],
            ),
            (
                "kube-controller-manager",
                vec![
                    arg("kubeconfig", &cm_kubeconfig.display()),
                    arg("use-service-account-credentials", &true),
                    arg(
                        "service-account-private-key-file",
                        &control_plane.service_account_key_path().display(),
                    ),
                    arg("root-ca-file", &control_plane.ca_path().display()),
                    arg("leader-elect", &false),
                    arg("secure-port", &0),
                ],
            ),
            (
                "kube-scheduler",
                vec![
                    arg("kubeconfig", &scheduler_kubeconfig.display()),
                    arg("leader-elect", &false),
                    arg("secure-port", &0),
                ],
            ),
            (
                "kube-proxy",
                vec![
                    arg("kubeconfig", &proxy_kubeconfig.display()),
                    arg("proxy-mode", &"iptables"),
                    arg("hostname-override", &NODE_NAME),
                    arg("cluster-cidr", &POD_SUBNET),
                    arg("conntrack-max-per-core", &0),
                    arg("conntrack-tcp-timeout-established", &"0s"),
                    arg("conntrack-tcp-timeout-close-wait", &"0s"),
                    arg("iptables-localhost-nodeports", &false),
                    arg("metrics-bind-address", &"127.0.0.1:10249"),
                    arg("healthz-bind-address", &"127.0.0.1:10256"),
                ],
            ),
        ];
        cluster.control_plane = Some(control_plane);
        for (name, args) in components {
            let server = Server::spawn_with_prefix(
                name,
                &prefix,
                &node_bin.join(name),
                args.into_iter().map(Into::into).collect(),
                dir.join(format!("{name}.log")),
            )
            .await?;
            cluster.components.push(server);
        }
        cluster.wait_ready().await?;
        Ok(cluster)
    }

    fn cgroups(&self) -> Result<&CgroupRoot> {
        self.cgroups.as_ref().ok_or_else(torn_down)
    }

    fn namespace(&self) -> Result<&NodeNamespace> {
        self.namespace.as_ref().ok_or_else(torn_down)
    }

    /// Waits for containerd's socket, then imports the OCI archives into its `k8s.io`
    /// namespace (where the CRI plugin looks).
    async fn import_images(&self, archives: &[PathBuf]) -> Result<()> {
        let namespace = self.namespace()?;
        let socket = namespace.host_view(CONTAINERD_SOCKET);
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            if socket.exists()
                && namespace
                    .run("ctr", &["--address", CONTAINERD_SOCKET, "version"])
                    .await
                    .is_ok()
            {
                break;
            }
            self.check_components()?;
            if Instant::now() >= deadline {
                return Err(Error::Timeout {
                    what: "containerd's socket".to_owned(),
                    timeout: READY_TIMEOUT,
                    detail: String::new(),
                });
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        for archive in archives {
            let archive = archive.display().to_string();
            namespace
                .run(
                    "ctr",
                    &[
                        "--address",
                        CONTAINERD_SOCKET,
                        "--namespace",
                        "k8s.io",
                        "images",
                        "import",
                        &archive,
                    ],
                )
                .await?;
        }
        Ok(())
    }

    /// Fails with the component's log if one has exited.
    fn check_components(&self) -> Result<()> {
        for component in &self.components {
            // `check_running` needs `&mut`; a zero-signal probe of the pid does not.
            let alive = leaderz_testenv::process::proc_stat(component.pid())
                .is_some_and(|stat| stat.state != 'Z');
            if !alive {
                return Err(Error::Component {
                    component: component.name(),
                    problem: "exited".to_owned(),
                    log: component.log_path().to_owned(),
                    tail: component.log_tail(),
                });
            }
        }
        Ok(())
    }

    /// Node Ready, the `default` ServiceAccount made, kube-proxy's rules for the
    /// `kubernetes` Service in place.
    async fn wait_ready(&self) -> Result<()> {
        let client = self.control_plane().admin_client()?;
        let nodes: Api<Node> = Api::all(client.clone());
        let accounts: Api<ServiceAccount> = Api::namespaced(client, "default");
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            self.check_components()?;
            let (node_ready, node_error) = match nodes.get_opt(NODE_NAME).await {
                Ok(Some(node)) => (
                    node.status
                        .and_then(|s| s.conditions)
                        .unwrap_or_default()
                        .iter()
                        .any(|c| c.type_ == "Ready" && c.status == "True"),
                    String::new(),
                ),
                Ok(None) => (false, String::new()),
                Err(err) => (false, format!(" (reading the node: {err})")),
            };
            let account = matches!(accounts.get_opt("default").await, Ok(Some(_)));
            let proxied = self
                .namespace()?
                .run("iptables", &["-t", "nat", "-S", "KUBE-SERVICES"])
                .await
                .is_ok_and(|rules| rules.contains("default/kubernetes:https"));
            if node_ready && account && proxied {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(Error::Timeout {
                    what: "the node becoming ready".to_owned(),
                    timeout: READY_TIMEOUT,
                    detail: format!(
                        ": node Ready: {node_ready}{node_error}, default ServiceAccount: {account}, kube-proxy rules: {proxied}"
                    ),
                });
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The control plane (clients, kubeconfigs, namespaces, tokens).
    pub fn control_plane(&self) -> &ControlPlane {
        self.control_plane
            .as_ref()
            .unwrap_or_else(|| panic!("{}", torn_down()))
    }

    /// An admin kubeconfig for `kubectl` on this host.
    pub fn kubeconfig_path(&self) -> &Path {
        self.control_plane().kubeconfig_path()
    }

    /// How long the parts of startup took.
    pub fn timings(&self) -> Timings {
        self.timings
    }

    /// The images loaded into containerd.
    pub fn images(&self) -> &[String] {
        &self.images
    }

    /// The directory with the node's configuration and logs (`kubelet.log`,
    /// `containerd.log`, ...).
    pub fn data_dir(&self) -> &Path {
        self.dir
            .as_ref()
            .map(DataDir::path)
            .unwrap_or_else(|| Path::new("/nonexistent"))
    }

    /// The host PID of the init of the node's PID namespace.
    pub fn init_pid(&self) -> u32 {
        self.namespace.as_ref().map_or(0, NodeNamespace::init_pid)
    }

    /// `pid:[inode]` of the node's PID namespace, as `/proc/<pid>/ns/pid` reads.
    pub fn pid_namespace(&self) -> String {
        self.namespace
            .as_ref()
            .map(|ns| ns.pid_ns().to_owned())
            .unwrap_or_default()
    }

    /// The cgroup directories the kubelet's pods live under, one per hierarchy.
    pub fn cgroup_dirs(&self) -> Vec<PathBuf> {
        self.cgroups
            .as_ref()
            .map(|c| c.dirs().to_vec())
            .unwrap_or_default()
    }

    /// Runs `program args` inside the node's namespaces (e.g. `ctr`, `iptables-save`) and
    /// returns its stdout.
    pub async fn run_in_node(&self, program: &str, args: &[&str]) -> Result<String> {
        self.namespace()?.run(program, args).await
    }

    /// Kills a container's process with SIGKILL through the node's runtime (a crash, as
    /// the kubelet sees it). `container_id` as in a pod's status (`containerd://...`) or
    /// bare.
    pub async fn kill_container(&self, container_id: &str) -> Result<()> {
        let id = container_id.trim_start_matches("containerd://");
        self.run_in_node(
            "ctr",
            &[
                "--address",
                CONTAINERD_SOCKET,
                "--namespace",
                "k8s.io",
                "tasks",
                "kill",
                "--signal",
                "SIGKILL",
                id,
            ],
        )
        .await
        .map(drop)
    }

    /// A TCP connection opened inside the node's network namespace: to a pod's address,
    /// as another pod would connect. Use it in the caller's runtime.
    pub async fn connect(&self, addr: SocketAddr) -> std::io::Result<tokio::net::TcpStream> {
        match &self.forwarder {
            Some(forwarder) => forwarder.connect(addr).await,
            None => Err(std::io::Error::other(torn_down().to_string())),
        }
    }

    /// Every process of the node (the control plane, containerd, shims, the pods), with
    /// its RSS.
    pub fn processes(&self) -> Vec<NodeProcess> {
        let Some(namespace) = &self.namespace else {
            return Vec::new();
        };
        namespace
            .processes()
            .into_iter()
            .filter_map(|pid| {
                let name = std::fs::read_to_string(format!("/proc/{pid}/comm")).ok()?;
                Some(NodeProcess {
                    pid,
                    name: name.trim().to_owned(),
                    rss: rss_bytes(pid).unwrap_or(0),
                })
            })
            .collect()
    }

    /// RSS summed by command name, largest first, e.g. `kube-apiserver 262 MiB`.
    pub fn memory_report(&self) -> Vec<(String, usize, u64)> {
        let mut by_name: BTreeMap<String, (usize, u64)> = BTreeMap::new();
        for p in self.processes() {
            let entry = by_name.entry(p.name).or_default();
            entry.0 += 1;
            entry.1 += p.rss;
        }
        let mut report: Vec<(String, usize, u64)> = by_name
            .into_iter()
            .map(|(name, (count, rss))| (name, count, rss))
            .collect();
        report.sort_by_key(|r| std::cmp::Reverse(r.2));
        report
    }

    /// Tears the cluster down now and says how long it took: kills the node's PID
    /// namespace (everything in it dies at once: pods, shims, containerd, the kubelet, the
    /// control plane), waits until its processes are gone, removes the cgroups and the
    /// directories. The namespaces' mounts vanish with them.
    pub fn stop(mut self) -> Result<Duration> {
        let began = Instant::now();
        self.teardown()?;
        Ok(began.elapsed())
    }

    fn teardown(&mut self) -> Result<()> {
        let mut result = Ok(());
        if let Some(mut namespace) = self.namespace.take() {
            result = namespace.destroy();
        }
        for mut component in self.components.drain(..) {
            component.stop();
        }
        if let Some(mut cgroups) = self.cgroups.take()
            && let Err(err) = cgroups.remove()
        {
            result = result.and(Err(err));
        }
        self.forwarder.take();
        self.control_plane.take();
        self.dir.take();
        result
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if let Err(err) = self.teardown() {
            tracing::warn!(err = %error_chain(&err), "cluster teardown");
        }
    }
}

fn torn_down() -> Error {
    Error::Unavailable("the cluster was torn down".to_owned())
}

fn write(path: &Path, contents: &str) -> Result<()> {
    std::fs::write(path, contents).map_err(Error::io(format!("writing {}", path.display())))
}

/// Runs `controlplane/<script>` (progress to stderr) and returns the directory it prints.
async fn build_script(script: &str) -> Result<PathBuf> {
    let path = image::workspace_root().join("controlplane").join(script);
    let output = tokio::process::Command::new("bash")
        .arg(&path)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .output()
        .await
        .map_err(Error::io(format!("running {}", path.display())))?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    match stdout.lines().rev().find(|l| !l.trim().is_empty()) {
        Some(dir) if output.status.success() => Ok(PathBuf::from(dir.trim())),
        _ => Err(Error::Build {
            what: format!("the binaries of {}", path.display()),
            reason: format!("it {}; its messages above say why", output.status),
        }),
    }
}
