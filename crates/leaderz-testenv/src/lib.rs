//! A real etcd + kube-apiserver on loopback for integration tests, envtest-style.
//!
//! [`ControlPlane::shared`] starts one control plane per test binary on first use and shares
//! it between that binary's tests; [`ControlPlane::start`] starts an owned one that stops
//! when dropped. The binaries come from `controlplane/build.sh` (built once from Go modules
//! and cached, or taken from `KUBEBUILDER_ASSETS`).
//!
//! No controller-manager runs: nothing creates default ServiceAccounts, collects garbage or
//! finishes deleting namespaces, so every test works in its own
//! [`new_namespace`](ControlPlane::new_namespace).
//!
//! The servers never outlive the test process, however it ends (panic, abort, SIGKILL: they
//! run under a parent-death signal), and their temporary directory is removed then too (by a
//! small cleaner process, and failing that by the next run's sweep).
//!
//! ```no_run
//! # async fn demo() -> anyhow::Result<()> {
//! use k8s_openapi::api::coordination::v1::Lease;
//! use kube::Api;
//! use leaderz_testenv::ControlPlane;
//!
//! let cp = ControlPlane::shared()?;
//! let ns = cp.new_namespace("my-test").await?;
//! let client = cp.service_account_client(&ns, "candidate").await?;
//! let leases: Api<Lease> = Api::namespaced(client, &ns);
//! # Ok(()) }
//! ```

mod credentials;
mod error;
mod foreground;
mod pki;
pub mod process;
mod restart;

use std::{
    ffi::OsString,
    fmt,
    future::Future,
    net::{IpAddr, Ipv4Addr, SocketAddr},
    path::{Path, PathBuf},
    process::Stdio,
    sync::{Arc, OnceLock},
    thread,
    time::Duration,
};

use k8s_openapi::{
    api::{
        authentication::v1::{TokenRequest, TokenRequestSpec},
        authorization::v1::{
            ResourceAttributes, SelfSubjectAccessReview, SelfSubjectAccessReviewSpec,
        },
        core::v1::{Namespace, ServiceAccount},
    },
    apimachinery::pkg::apis::meta::v1::ObjectMeta,
};
use kube::{Api, Client, api::PostParams, config::Kubeconfig};
use tokio::time::Instant;

pub use credentials::Credentials;
pub use error::{Error, Result};
pub use foreground::run_foreground;

use crate::{
    pki::{ClientCa, Pki},
    process::{DataDir, Server},
};

/// How long one Kubernetes API call made by this crate may take.
const API_TIMEOUT: Duration = Duration::from_secs(30);

/// Options for [`ControlPlane::start`].
///
/// ```
/// use std::time::Duration;
/// let options = leaderz_testenv::StartOptions::default()
///     .ready_timeout(Duration::from_secs(120))
///     .apiserver_arg("--feature-gates=CoordinatedLeaderElection=true");
/// ```
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct StartOptions {
    binary_dir: Option<PathBuf>,
    ready_timeout: Duration,
    apiserver_args: Vec<String>,
    placement: Option<Placement>,
    serving_sans: Vec<String>,
    service_cluster_ip_range: String,
    service_account_admission: bool,
    authorization_mode: String,
}

impl Default for StartOptions {
    fn default() -> Self {
        Self {
            binary_dir: None,
            ready_timeout: Duration::from_secs(90),
            apiserver_args: Vec::new(),
            placement: None,
            serving_sans: Vec::new(),
            service_cluster_ip_range: "10.0.0.0/24".to_owned(),
            service_account_admission: false,
            authorization_mode: "RBAC".to_owned(),
        }
    }
}

/// Where the servers run and how this process reaches them, when not on 127.0.0.1 of this
/// process's own network namespace (the default: free ports, reached directly).
///
/// For a control plane inside a network namespace, e.g. the one-node cluster's: the servers
/// are started through `command_prefix` (which enters the namespace), listen on fixed ports
/// there, and this process reaches them at the `*_seen_at` addresses (forwarders).
///
/// ```
/// use std::net::{Ipv4Addr, SocketAddr};
/// let placement = leaderz_testenv::Placement::new(
///     ["nsenter", "--target", "4242", "--net", "--mount", "--pid", "--"],
///     Ipv4Addr::new(10, 77, 0, 1).into(),
///     SocketAddr::from(([127, 0, 0, 1], 40001)),
///     SocketAddr::from(([127, 0, 0, 1], 40002)),
/// );
/// let options = leaderz_testenv::StartOptions::default().placement(placement);
/// ```
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct Placement {
    command_prefix: Vec<OsString>,
    advertise_address: IpAddr,
    etcd_seen_at: SocketAddr,
    apiserver_seen_at: SocketAddr,
}

impl Placement {
    /// etcd's client port inside the namespace.
    pub const ETCD_PORT: u16 = 2379;
    /// etcd's peer port inside the namespace.
    pub const ETCD_PEER_PORT: u16 = 2380;
    /// kube-apiserver's secure port inside the namespace.
    pub const APISERVER_PORT: u16 = 6443;

    /// Servers started as `<command_prefix> <binary> <args>`, listening on every address
    /// of their namespace on the fixed ports above; kube-apiserver advertises
    /// `advertise_address` (the address pods reach it at); this process reaches etcd at
    /// `etcd_seen_at` and kube-apiserver at `apiserver_seen_at`.
    pub fn new(
        command_prefix: impl IntoIterator<Item = impl Into<OsString>>,
        advertise_address: IpAddr,
        etcd_seen_at: SocketAddr,
        apiserver_seen_at: SocketAddr,
    ) -> Self {
        Self {
            command_prefix: command_prefix.into_iter().map(Into::into).collect(),
            advertise_address,
            etcd_seen_at,
            apiserver_seen_at,
        }
    }
}

impl StartOptions {
    /// Takes `kube-apiserver` and `etcd` from `dir` instead of running
    /// `controlplane/build.sh`.
    #[must_use]
    pub fn binary_dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.binary_dir = Some(dir.into());
        self
    }

    /// How long each server may take to become ready (default 90 s).
    #[must_use]
    pub fn ready_timeout(mut self, timeout: Duration) -> Self {
        self.ready_timeout = timeout;
        self
    }

    /// Passes one more flag to kube-apiserver, after the built-in ones.
    #[must_use]
    pub fn apiserver_arg(mut self, arg: impl Into<String>) -> Self {
        self.apiserver_args.push(arg.into());
        self
    }

    /// Runs the servers elsewhere (see [`Placement`]); default: on 127.0.0.1 here.
    #[must_use]
    pub fn placement(mut self, placement: Placement) -> Self {
        self.placement = Some(placement);
        self
    }

    /// Adds a DNS name or IP address to the API server's serving certificate (which always
    /// has `localhost` and `127.0.0.1`).
    #[must_use]
    pub fn serving_san(mut self, san: impl Into<String>) -> Self {
        self.serving_sans.push(san.into());
        self
    }

    /// `--service-cluster-ip-range` (default `10.0.0.0/24`); its first address is the
    /// `kubernetes` Service's.
    #[must_use]
    pub fn service_cluster_ip_range(mut self, cidr: impl Into<String>) -> Self {
        self.service_cluster_ip_range = cidr.into();
        self
    }

    /// Whether the ServiceAccount admission plugin runs (default off, as in envtest: no
    /// controller-manager creates the `default` ServiceAccounts). Pods get their token
    /// mounted only with it on.
    #[must_use]
    pub fn service_account_admission(mut self, on: bool) -> Self {
        self.service_account_admission = on;
        self
    }

    /// `--authorization-mode` (default `RBAC`; a cluster with kubelets wants `Node,RBAC`).
    #[must_use]
    pub fn authorization_mode(mut self, mode: impl Into<String>) -> Self {
        self.authorization_mode = mode.into();
        self
    }
}

/// A running etcd + kube-apiserver on 127.0.0.1, with its own CAs.
///
/// Dropping an owned instance kills both servers, reaps them and removes the temporary
/// directory. The instance holds nothing bound to a Tokio runtime; clients are made fresh
/// on each call, inside the caller's runtime.
pub struct ControlPlane {
    server_url: String,
    etcd_url: String,
    ca_pem: String,
    ca_der: Vec<u8>,
    client_ca: ClientCa,
    admin: Credentials,
    kubeconfig_path: PathBuf,
    startup_duration: Duration,
    // Fields drop in declaration order: the servers stop (apiserver first) before their
    // data directory is removed.
    apiserver: Server,
    etcd: Server,
    dir: DataDir,
}

impl fmt::Debug for ControlPlane {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ControlPlane")
            .field("server_url", &self.server_url)
            .field("etcd_url", &self.etcd_url)
            .field("dir", &self.dir.path())
            .field("etcd_pid", &self.etcd.pid())
            .field("apiserver_pid", &self.apiserver.pid())
            .finish_non_exhaustive()
    }
}

impl ControlPlane {
    /// The control plane shared by every test in this process, started on first use.
    ///
    /// Blocks until it is ready (seconds; the first build of the binaries takes minutes and
    /// prints its progress). Safe to call from inside any Tokio runtime: startup runs on a
    /// thread of its own. If startup fails, every call returns [`Error::Shared`] with that
    /// failure. It is never dropped; its servers die with the process and a cleaner process
    /// removes its directory then.
    ///
    /// ```no_run
    /// # async fn demo() -> leaderz_testenv::Result<()> {
    /// let cp = leaderz_testenv::ControlPlane::shared()?;
    /// let client = cp.admin_client()?;
    /// # Ok(()) }
    /// ```
    pub fn shared() -> Result<&'static Self> {
        static SHARED: OnceLock<Result<ControlPlane, Arc<Error>>> = OnceLock::new();
        SHARED
            .get_or_init(|| Self::start_blocking(StartOptions::default()).map_err(Arc::new))
            .as_ref()
            .map_err(|err| Error::Shared(Arc::clone(err)))
    }

    /// [`start`](Self::start) on a thread of its own with its own runtime, blocking until
    /// done: for synchronous code, or code inside a runtime that must not nest `block_on`.
    pub fn start_blocking(options: StartOptions) -> Result<Self> {
        let startup = thread::Builder::new()
            .name("leaderz-testenv-start".to_owned())
            .spawn(move || {
                tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .map_err(Error::io("building a Tokio runtime for startup"))?
                    .block_on(Self::start(options))
            })
            .map_err(Error::io("starting the control plane's startup thread"))?;
        startup
            .join()
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
    }

    /// Starts an owned control plane; it stops when dropped.
    ///
    /// Runs `controlplane/build.sh` to get the binaries (its progress goes to stderr),
    /// sweeps temporary directories of dead earlier runs, then starts etcd and
    /// kube-apiserver and waits until `/readyz` (including RBAC bootstrap) answers.
    ///
    /// ```no_run
    /// # async fn demo() -> leaderz_testenv::Result<()> {
    /// use leaderz_testenv::{ControlPlane, StartOptions};
    /// let cp = ControlPlane::start(StartOptions::default()).await?;
    /// println!("export KUBECONFIG={}", cp.kubeconfig_path().display());
    /// # Ok(()) }
    /// ```
    pub async fn start(options: StartOptions) -> Result<Self> {
        let started = Instant::now();
        let binaries = binaries(&options).await?;
        let mut attempt = 1;
        loop {
            match Self::start_once(&binaries, &options, started).await {
                Err(err) if err.is_port_conflict() && attempt < 3 => {
                    tracing::debug!(%err, "a port was taken meanwhile; starting again");
                    attempt += 1;
                }
                result => return result,
            }
        }
    }

    async fn start_once(binaries: &Path, options: &StartOptions, started: Instant) -> Result<Self> {
        // Locals drop in reverse order: on failure the servers stop before `dir` goes.
        let dir = DataDir::create(process::DIR_PREFIX)?;
        let pki = Pki::generate(&options.serving_sans)?;
        dir.write("serving-ca.crt", &pki.serving_ca_pem)?;
        let tls_cert = dir.write("apiserver.crt", &pki.serving_cert_pem)?;
        let tls_key = dir.write("apiserver.key", &pki.serving_key_pem)?;
        let client_ca = dir.write("client-ca.crt", &pki.client_ca.cert_pem)?;
        let sa_key = dir.write("sa.key", &pki.sa_key_pem)?;
        let sa_public = dir.write("sa.pub", &pki.sa_public_pem)?;

        // Where the servers listen (in their namespace) and where this process reaches them.
        let prefix: &[OsString] = options
            .placement
            .as_ref()
            .map_or(&[], |p| &p.command_prefix[..]);
        let (etcd_port, peer_port, api_port, bind, advertise, etcd_seen_at, server_url) =
            match &options.placement {
                None => {
                    let ports = process::free_ports(3)?;
                    let loopback = IpAddr::V4(Ipv4Addr::LOCALHOST);
                    let etcd_seen_at = SocketAddr::new(loopback, ports[0]);
                    let server_url = format!("https://127.0.0.1:{}", ports[2]);
                    let (e, p, a) = (ports[0], ports[1], ports[2]);
                    (e, p, a, loopback, loopback, etcd_seen_at, server_url)
                }
                Some(placement) => (
                    Placement::ETCD_PORT,
                    Placement::ETCD_PEER_PORT,
                    Placement::APISERVER_PORT,
                    IpAddr::V4(Ipv4Addr::UNSPECIFIED),
                    placement.advertise_address,
                    placement.etcd_seen_at,
                    format!("https://{}", placement.apiserver_seen_at),
                ),
            };
        let etcd_url = format!("http://{etcd_seen_at}");
        let etcd_listen_url = format!("http://127.0.0.1:{etcd_port}");
        let peer_url = format!("http://127.0.0.1:{peer_port}");

        let mut etcd = Server::spawn_with_prefix(
            "etcd",
            prefix,
            &binaries.join("etcd"),
            args([
                format!("--data-dir={}", dir.path().join("etcd").display()),
                format!("--listen-client-urls={etcd_listen_url}"),
                format!("--advertise-client-urls={etcd_listen_url}"),
                format!("--listen-peer-urls={peer_url}"),
                format!("--initial-advertise-peer-urls={peer_url}"),
                format!("--initial-cluster=default={peer_url}"),
                "--unsafe-no-fsync=true".to_owned(),
            ]),
            dir.path().join("etcd.log"),
        )
        .await?;
        wait_ready(&mut etcd, options.ready_timeout, || {
            etcd_health(etcd_seen_at)
        })
        .await?;

        // The API server's client certificate for kubelets (`kubectl logs`, `exec`).
        let kubelet_client = pki
            .client_ca
            .issue("kube-apiserver-kubelet-client", &["system:masters"])?;
        let kubelet_client_cert = dir.write("kubelet-client.crt", &kubelet_client.cert_pem)?;
        let kubelet_client_key = dir.write("kubelet-client.key", &kubelet_client.key_pem)?;

        let mut apiserver_args = args([
            format!("--etcd-servers={etcd_listen_url}"),
            format!(
                "--cert-dir={}",
                dir.path().join("apiserver-certs").display()
            ),
            format!("--secure-port={api_port}"),
            format!("--bind-address={bind}"),
            format!("--advertise-address={advertise}"),
            format!(
                "--service-cluster-ip-range={}",
                options.service_cluster_ip_range
            ),
            "--allow-privileged=true".to_owned(),
            format!("--authorization-mode={}", options.authorization_mode),
            format!("--service-account-issuer={server_url}/"),
            format!("--service-account-key-file={}", sa_public.display()),
            format!("--service-account-signing-key-file={}", sa_key.display()),
            format!("--client-ca-file={}", client_ca.display()),
            format!("--tls-cert-file={}", tls_cert.display()),
            format!("--tls-private-key-file={}", tls_key.display()),
            // API priority and fairness only matters under load; off, the server uses
            // ~10 MiB less (measured: 240-246 vs 251-257 MiB RSS; start time unchanged).
            "--enable-priority-and-fairness=false".to_owned(),
            "--profiling=false".to_owned(),
            format!(
                "--kubelet-client-certificate={}",
                kubelet_client_cert.display()
            ),
            format!("--kubelet-client-key={}", kubelet_client_key.display()),
        ]);
        if !options.service_account_admission {
            apiserver_args.push("--disable-admission-plugins=ServiceAccount".into());
        }
        apiserver_args.extend(options.apiserver_args.iter().map(OsString::from));
        let mut apiserver = Server::spawn_with_prefix(
            "kube-apiserver",
            prefix,
            &binaries.join("kube-apiserver"),
            apiserver_args,
            dir.path().join("kube-apiserver.log"),
        )
        .await?;

        let admin_cert = pki.client_ca.issue("admin", &["system:masters"])?;
        let admin = Credentials::client_cert(admin_cert.cert_pem, admin_cert.key_pem);
        let mut probe_config = client_config(&server_url, &pki.serving_ca_der, &admin)?;
        probe_config.default_retry = false;
        let probe = Client::try_from(probe_config)
            .map_err(Error::kube("building the readiness probe's client"))?;
        wait_ready(&mut apiserver, options.ready_timeout, || readyz(&probe)).await?;
        drop(probe);

        let kubeconfig = credentials::kubeconfig(&server_url, &pki.serving_ca_pem, &admin);
        let kubeconfig_path = dir.write(
            "kubeconfig",
            serde_yaml::to_string(&kubeconfig).map_err(Error::Kubeconfig)?,
        )?;
        let startup_duration = started.elapsed();
        tracing::info!(
            %server_url,
            kubeconfig = %kubeconfig_path.display(),
            ?startup_duration,
            "control plane ready"
        );
        Ok(Self {
            server_url,
            etcd_url,
            ca_pem: pki.serving_ca_pem,
            ca_der: pki.serving_ca_der,
            client_ca: pki.client_ca,
            admin,
            kubeconfig_path,
            startup_duration,
            apiserver,
            etcd,
            dir,
        })
    }

    /// The API server's URL, `https://127.0.0.1:<port>`.
    pub fn server_url(&self) -> &str {
        &self.server_url
    }

    /// etcd's client URL, `http://127.0.0.1:<port>`.
    pub fn etcd_url(&self) -> &str {
        &self.etcd_url
    }

    /// The PEM certificate of the CA that signed the API server's serving certificate.
    pub fn ca_pem(&self) -> &str {
        &self.ca_pem
    }

    /// A kubeconfig file for the admin (group `system:masters`), with certificates and key
    /// embedded, e.g. for `kubectl --kubeconfig`.
    pub fn kubeconfig_path(&self) -> &Path {
        &self.kubeconfig_path
    }

    /// The serving CA's certificate file (PEM): what pods and node components trust.
    pub fn ca_path(&self) -> PathBuf {
        self.dir.path().join("serving-ca.crt")
    }

    /// The client CA's certificate file (PEM), e.g. for a kubelet's `clientCAFile`.
    pub fn client_ca_path(&self) -> PathBuf {
        self.dir.path().join("client-ca.crt")
    }

    /// The ServiceAccount token signing key file (PEM), e.g. for kube-controller-manager's
    /// `--service-account-private-key-file`.
    pub fn service_account_key_path(&self) -> PathBuf {
        self.dir.path().join("sa.key")
    }

    /// Writes a kubeconfig for `server` (e.g. the API server's address inside a network
    /// namespace, for a component running there) as `credentials`, trusting the serving CA.
    pub fn write_kubeconfig_for_server(
        &self,
        path: impl AsRef<Path>,
        server: &str,
        credentials: &Credentials,
    ) -> Result<()> {
        let kubeconfig = credentials::kubeconfig(server, &self.ca_pem, credentials);
        let yaml = serde_yaml::to_string(&kubeconfig).map_err(Error::Kubeconfig)?;
        process::write_private(path.as_ref(), yaml.as_bytes())
    }

    /// The temporary directory holding certificates, etcd's data and the servers' logs
    /// (`etcd.log`, `kube-apiserver.log`). Its name contains this process's id.
    pub fn data_dir(&self) -> &Path {
        self.dir.path()
    }

    /// How long [`start`](Self::start) took, binaries lookup included.
    pub fn startup_duration(&self) -> Duration {
        self.startup_duration
    }

    /// The etcd process id.
    pub fn etcd_pid(&self) -> u32 {
        self.etcd.pid()
    }

    /// The kube-apiserver process id.
    pub fn apiserver_pid(&self) -> u32 {
        self.apiserver.pid()
    }

    /// Fails with [`Error::Exited`] (and the server's last log lines) if etcd or
    /// kube-apiserver has exited.
    pub fn check_running(&mut self) -> Result<()> {
        self.etcd.check_running()?;
        self.apiserver.check_running()
    }

    /// The admin's credentials: a client certificate with CN `admin`, O `system:masters`.
    pub fn admin_credentials(&self) -> Credentials {
        self.admin.clone()
    }

    /// A new client acting as the admin. Must be called inside a Tokio runtime (the client
    /// spawns its connection task there).
    pub fn admin_client(&self) -> Result<Client> {
        self.client(&self.admin)
    }

    /// A `kube::Config` for this control plane as `credentials`, to adjust before building a
    /// client (timeouts, default namespace).
    pub fn config(&self, credentials: &Credentials) -> Result<kube::Config> {
        client_config(&self.server_url, &self.ca_der, credentials)
    }

    /// A new client acting as `credentials`. Must be called inside a Tokio runtime.
    pub fn client(&self, credentials: &Credentials) -> Result<Client> {
        Client::try_from(self.config(credentials)?).map_err(Error::kube("building a client"))
    }

    /// A self-contained kubeconfig for this control plane as `credentials`.
    pub fn kubeconfig(&self, credentials: &Credentials) -> Kubeconfig {
        credentials::kubeconfig(&self.server_url, &self.ca_pem, credentials)
    }

    /// Writes [`kubeconfig`](Self::kubeconfig) to `path` (mode 0600), e.g. for a process of
    /// the `leaderz` binary that should run as a ServiceAccount:
    ///
    /// ```no_run
    /// # async fn demo(cp: &leaderz_testenv::ControlPlane, ns: &str) -> leaderz_testenv::Result<()> {
    /// use std::time::Duration;
    /// let sa = cp.service_account_credentials(ns, "candidate", Duration::from_secs(3600)).await?;
    /// cp.write_kubeconfig("/tmp/candidate.kubeconfig", &sa)?;
    /// # Ok(()) }
    /// ```
    pub fn write_kubeconfig(
        &self,
        path: impl AsRef<Path>,
        credentials: &Credentials,
    ) -> Result<()> {
        let yaml =
            serde_yaml::to_string(&self.kubeconfig(credentials)).map_err(Error::Kubeconfig)?;
        process::write_private(path.as_ref(), yaml.as_bytes())
    }

    /// Credentials for `user` in `groups`: a client certificate signed by the client CA,
    /// CN = `user`, one O per group. The API server adds `system:authenticated`.
    pub fn user_credentials(&self, user: &str, groups: &[&str]) -> Result<Credentials> {
        if user.is_empty() {
            return Err(Error::InvalidArgument("the user name is empty".to_owned()));
        }
        let cert = self.client_ca.issue(user, groups)?;
        Ok(Credentials::client_cert(cert.cert_pem, cert.key_pem))
    }

    /// A new client acting as `user` in `groups` (see
    /// [`user_credentials`](Self::user_credentials)). Must be called inside a Tokio runtime.
    pub fn user_client(&self, user: &str, groups: &[&str]) -> Result<Client> {
        self.client(&self.user_credentials(user, groups)?)
    }

    /// Creates a namespace named `<prefix>-<random>` and returns its name.
    ///
    /// Namespaces never finish deleting here (no controller-manager), so each test takes a
    /// fresh one. `prefix` is lowercased and trimmed to a valid name.
    pub async fn new_namespace(&self, prefix: &str) -> Result<String> {
        let name = unique_name(prefix);
        let namespaces: Api<Namespace> = Api::all(self.admin_client()?);
        let namespace = Namespace {
            metadata: ObjectMeta {
                name: Some(name.clone()),
                labels: Some(
                    [(
                        "app.kubernetes.io/created-by".to_owned(),
                        "leaderz-testenv".to_owned(),
                    )]
                    .into(),
                ),
                ..ObjectMeta::default()
            },
            ..Namespace::default()
        };
        api(
            format!("creating namespace `{name}`"),
            namespaces.create(&PostParams::default(), &namespace),
        )
        .await?;
        Ok(name)
    }

    /// A token for ServiceAccount `namespace/name` from the TokenRequest API, valid for
    /// `expiration` (at least 10 minutes, the API server's minimum). Creates the
    /// ServiceAccount if it does not exist.
    pub async fn service_account_token(
        &self,
        namespace: &str,
        name: &str,
        expiration: Duration,
    ) -> Result<String> {
        if expiration < Duration::from_secs(600) {
            return Err(Error::InvalidArgument(format!(
                "token expiration {expiration:?} is below the API server's minimum of 10 minutes"
            )));
        }
        let expiration_seconds = i64::try_from(expiration.as_secs()).map_err(|_| {
            Error::InvalidArgument(format!("token expiration {expiration:?} is too long"))
        })?;
        let accounts: Api<ServiceAccount> = Api::namespaced(self.admin_client()?, namespace);
        let account = ServiceAccount {
            metadata: ObjectMeta {
                name: Some(name.to_owned()),
                ..ObjectMeta::default()
            },
            ..ServiceAccount::default()
        };
        match tokio::time::timeout(
            API_TIMEOUT,
            accounts.create(&PostParams::default(), &account),
        )
        .await
        {
            Ok(Ok(_)) => {}
            Ok(Err(kube::Error::Api(status))) if status.code == 409 => {} // exists already
            Ok(Err(source)) => {
                return Err(Error::Kube {
                    context: format!("creating ServiceAccount `{namespace}/{name}`"),
                    source,
                });
            }
            Err(_) => {
                return Err(Error::Timeout {
                    context: format!("creating ServiceAccount `{namespace}/{name}`"),
                    timeout: API_TIMEOUT,
                });
            }
        }
        let request = TokenRequest {
            spec: TokenRequestSpec {
                expiration_seconds: Some(expiration_seconds),
                ..TokenRequestSpec::default()
            },
            ..TokenRequest::default()
        };
        let context = format!("requesting a token for ServiceAccount `{namespace}/{name}`");
        let answer = api(
            context.clone(),
            accounts.create_token_request(name, &PostParams::default(), &request),
        )
        .await?;
        answer
            .status
            .map(|status| status.token)
            .filter(|token| !token.is_empty())
            .ok_or_else(|| Error::Kube {
                context,
                source: kube::Error::Service("the TokenRequest came back without a token".into()),
            })
    }

    /// [`service_account_token`](Self::service_account_token) as [`Credentials`].
    pub async fn service_account_credentials(
        &self,
        namespace: &str,
        name: &str,
        expiration: Duration,
    ) -> Result<Credentials> {
        let token = self
            .service_account_token(namespace, name, expiration)
            .await?;
        Ok(Credentials::token(token))
    }

    /// A new client acting as ServiceAccount `namespace/name` (created if missing) with a
    /// one-hour token; its default namespace is `namespace`. Must be called inside a Tokio
    /// runtime.
    pub async fn service_account_client(&self, namespace: &str, name: &str) -> Result<Client> {
        let credentials = self
            .service_account_credentials(namespace, name, Duration::from_secs(3600))
            .await?;
        let mut config = self.config(&credentials)?;
        namespace.clone_into(&mut config.default_namespace);
        Client::try_from(config).map_err(Error::kube("building a client"))
    }
}

/// Waits until `client` may do what `attributes` describe, asking the API server with
/// SelfSubjectAccessReviews: RBAC changes take a moment to reach the authorizer.
///
/// ```no_run
/// # async fn demo(client: kube::Client, ns: &str) -> leaderz_testenv::Result<()> {
/// use k8s_openapi::api::authorization::v1::ResourceAttributes;
/// use std::time::Duration;
/// leaderz_testenv::wait_until_allowed(
///     &client,
///     ResourceAttributes {
///         group: Some("coordination.k8s.io".into()),
///         resource: Some("leases".into()),
///         verb: Some("update".into()),
///         namespace: Some(ns.into()),
///         ..Default::default()
///     },
///     Duration::from_secs(10),
/// )
/// .await?;
/// # Ok(()) }
/// ```
pub async fn wait_until_allowed(
    client: &Client,
    attributes: ResourceAttributes,
    timeout: Duration,
) -> Result<()> {
    let request = describe(&attributes);
    let reviews: Api<SelfSubjectAccessReview> = Api::all(client.clone());
    let review = SelfSubjectAccessReview {
        spec: SelfSubjectAccessReviewSpec {
            resource_attributes: Some(attributes),
            ..SelfSubjectAccessReviewSpec::default()
        },
        ..SelfSubjectAccessReview::default()
    };
    let deadline = Instant::now() + timeout;
    loop {
        let answer = api(
            format!("asking whether we may {request}"),
            reviews.create(&PostParams::default(), &review),
        )
        .await?;
        let status = answer.status.unwrap_or_default();
        if status.allowed {
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(Error::NotAllowed {
                request,
                timeout,
                reason: status
                    .reason
                    .unwrap_or_else(|| "no reason given".to_owned()),
            });
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn describe(attributes: &ResourceAttributes) -> String {
    let field = |f: &Option<String>| f.as_deref().unwrap_or("*").to_owned();
    let resource = match attributes.group.as_deref() {
        None | Some("") => field(&attributes.resource),
        Some(group) => format!("{group}/{}", field(&attributes.resource)),
    };
    let scope = match &attributes.namespace {
        Some(ns) => format!(" in namespace `{ns}`"),
        None => String::new(),
    };
    format!("{} {resource}{scope}", field(&attributes.verb))
}

/// Runs one API call with [`API_TIMEOUT`].
async fn api<T>(context: String, call: impl Future<Output = kube::Result<T>>) -> Result<T> {
    match tokio::time::timeout(API_TIMEOUT, call).await {
        Ok(result) => result.map_err(Error::kube(context)),
        Err(_) => Err(Error::Timeout {
            context,
            timeout: API_TIMEOUT,
        }),
    }
}

fn client_config(
    server_url: &str,
    ca_der: &[u8],
    credentials: &Credentials,
) -> Result<kube::Config> {
    let uri = server_url
        .parse()
        .map_err(|err| Error::InvalidArgument(format!("server URL `{server_url}`: {err}")))?;
    let mut config = kube::Config::new(uri);
    config.root_cert = Some(vec![ca_der.to_vec()]);
    config.auth_info = credentials.auth_info();
    Ok(config)
}

fn args<const N: usize>(args: [String; N]) -> Vec<OsString> {
    args.into_iter().map(OsString::from).collect()
}

/// `<prefix>-<8 hex digits>`, a valid namespace name whatever `prefix` is.
fn unique_name(prefix: &str) -> String {
    let cleaned: String = prefix
        .chars()
        .map(|c| match c.to_ascii_lowercase() {
            c @ ('a'..='z' | '0'..='9') => c,
            _ => '-',
        })
        .take(50)
        .collect();
    let cleaned = cleaned.trim_matches('-');
    let base = if cleaned.is_empty() { "test" } else { cleaned };
    format!("{base}-{:08x}", rand::random::<u32>())
}

/// Finds the directory holding `kube-apiserver` and `etcd`.
async fn binaries(options: &StartOptions) -> Result<PathBuf> {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../controlplane/build.sh");
    let dir = match &options.binary_dir {
        Some(dir) => dir.clone(),
        None => {
            let output = tokio::process::Command::new("bash")
                .arg(&script)
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                // Build progress goes straight to the terminal.
                .stderr(Stdio::inherit())
                .output()
                .await
                .map_err(|err| Error::Binaries {
                    script: script.clone(),
                    reason: format!("cannot run bash: {err}"),
                })?;
            if !output.status.success() {
                return Err(Error::Binaries {
                    script,
                    reason: format!("it {}; its messages above say why", output.status),
                });
            }
            let stdout = String::from_utf8_lossy(&output.stdout);
            match stdout.lines().rev().find(|line| !line.trim().is_empty()) {
                Some(line) => PathBuf::from(line.trim()),
                None => {
                    return Err(Error::Binaries {
                        script,
                        reason: "it printed no directory".to_owned(),
                    });
                }
            }
        }
    };
    for binary in ["kube-apiserver", "etcd"] {
        if !dir.join(binary).is_file() {
            return Err(Error::Binaries {
                script,
                reason: format!("{} has no `{binary}`", dir.display()),
            });
        }
    }
    Ok(dir)
}

/// Polls `probe` until it succeeds, failing early if the server exits.
async fn wait_ready<F, Fut>(server: &mut Server, timeout: Duration, mut probe: F) -> Result<()>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<(), String>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        server.check_running()?;
        let last_probe = match tokio::time::timeout(Duration::from_secs(5), probe()).await {
            Ok(Ok(())) => return Ok(()),
            Ok(Err(err)) => err,
            Err(_) => "the probe got no answer within 5s".to_owned(),
        };
        if Instant::now() >= deadline {
            server.check_running()?;
            return Err(Error::NotReady {
                component: server.name(),
                timeout,
                last_probe,
                log: server.log_path().to_owned(),
                tail: server.log_tail(),
            });
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// etcd's `/health`, over plain HTTP/1.0.
async fn etcd_health(addr: SocketAddr) -> Result<(), String> {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let mut stream = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|err| format!("connecting: {err}"))?;
    stream
        .write_all(b"GET /health HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
        .await
        .map_err(|err| format!("sending: {err}"))?;
    let mut response = String::new();
    stream
        .read_to_string(&mut response)
        .await
        .map_err(|err| format!("reading: {err}"))?;
    if response.contains(r#""health":"true""#) {
        Ok(())
    } else {
        Err(response.chars().take(300).collect())
    }
}

/// The API server's `/readyz`, which includes the RBAC bootstrap hook.
async fn readyz(client: &Client) -> Result<(), String> {
    let request = http::Request::get("/readyz?verbose")
        .body(Vec::new())
        .map_err(|err| err.to_string())?;
    client
        .request_text(request)
        .await
        .map(drop)
        .map_err(|err| with_causes(&err))
}

/// `err: cause: cause...`, since kube's messages alone hide the cause ("client error
/// (Connect)" rather than "connection refused").
fn with_causes(err: &dyn std::error::Error) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        let message = cause.to_string();
        if !text.contains(&message) {
            text.push_str(": ");
            text.push_str(&message);
        }
        source = cause.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unique_names_are_valid_and_distinct() {
        let name = unique_name("My_Test::Lease Conflict");
        let (base, suffix) = name.rsplit_once('-').unwrap();
        assert_eq!(base, "my-test--lease-conflict");
        assert_eq!(suffix.len(), 8);
        assert_ne!(unique_name("x"), unique_name("x"));
        assert!(unique_name("--").starts_with("test-"));
        let long = unique_name(&"a".repeat(200));
        assert!(long.len() <= 63, "{long}");
    }

    #[test]
    fn describes_requests_for_error_messages() {
        let attributes = ResourceAttributes {
            group: Some("coordination.k8s.io".into()),
            resource: Some("leases".into()),
            verb: Some("update".into()),
            namespace: Some("ns1".into()),
            ..Default::default()
        };
        assert_eq!(
            describe(&attributes),
            "update coordination.k8s.io/leases in namespace `ns1`"
        );
        assert_eq!(describe(&ResourceAttributes::default()), "* *");
    }

    #[test]
    fn options_are_chainable() {
        let options = StartOptions::default()
            .binary_dir("/opt/k8s")
            .ready_timeout(Duration::from_secs(5))
            .apiserver_arg("--v=2");
        assert_eq!(options.binary_dir.as_deref(), Some(Path::new("/opt/k8s")));
        assert_eq!(options.ready_timeout, Duration::from_secs(5));
        assert_eq!(options.apiserver_args, ["--v=2"]);
    }
}
