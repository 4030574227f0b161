//! `leaderz::client` against a real kube-apiserver: `TCP_NODELAY` on the socket, HTTP/2
//! negotiated and shared by many electors, upgrades kept on HTTP/1.1, watches never
//! starving other requests, and keepalive pings noticing a blackholed connection.
//!
//! Each test's client reaches the API server through a TCP proxy of its own (below), so
//! that the test can count the client's connections, find its sockets, and blackhole
//! them, whatever the other tests in this binary do at the same time.

#![allow(clippy::unwrap_used)] // tests: a panic is the failure report

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use futures::StreamExt;
use http::{Request, Version};
use k8s_openapi::api::coordination::v1::Lease;
use kube::api::WatchParams;
use kube::{Api, Client};
use leaderz::client::Options;
use leaderz::{ElectionConfig, ElectionHandle, Elector, LeaseLock};
use leaderz_testenv::ControlPlane;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::{Instant, sleep, timeout};

/// A TCP proxy to the API server that counts the connections it accepted and can
/// blackhole them: a blackholed connection stays open, but nothing passes it any more
/// in either direction (what a dead NAT entry, a crashed load balancer or a frozen
/// server look like to the client).
struct Proxy {
    addr: SocketAddr,
    /// Each chunk is held this long before it is passed on (both ways).
    latency: Arc<std::sync::Mutex<Duration>>,
    accepted: Arc<AtomicUsize>,
    frozen: Arc<std::sync::Mutex<Vec<Arc<AtomicBool>>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Proxy {
    async fn start(upstream: SocketAddr) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let accepted = Arc::new(AtomicUsize::new(0));
        let frozen: Arc<std::sync::Mutex<Vec<Arc<AtomicBool>>>> = Arc::default();
        let latency: Arc<std::sync::Mutex<Duration>> = Arc::default();
        let (count, flags, delay) = (accepted.clone(), frozen.clone(), latency.clone());
        let task = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                count.fetch_add(1, Ordering::SeqCst);
                let flag = Arc::new(AtomicBool::new(false));
                flags.lock().unwrap().push(flag.clone());
                let delay = delay.clone();
                tokio::spawn(async move {
                    let Ok(server) = TcpStream::connect(upstream).await else {
                        return;
                    };
                    let (cr, cw) = client.into_split();
                    let (sr, sw) = server.into_split();
                    tokio::join!(
                        pump(cr, sw, flag.clone(), delay.clone()),
                        pump(sr, cw, flag, delay)
                    );
                });
            }
        });
        Self {
            addr,
            latency,
            accepted,
            frozen,
            task,
        }
    }

    /// From now on every chunk is passed on `latency` late (in order), both ways.
    fn set_latency(&self, latency: Duration) {
        *self.latency.lock().unwrap() = latency;
    }

    fn accepted(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }

    /// From now on nothing passes the connections open so far; new ones work.
    fn blackhole(&self) {
        for flag in self.frozen.lock().unwrap().iter() {
            flag.store(true, Ordering::SeqCst);
        }
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    frozen: Arc<AtomicBool>,
    latency: Arc<std::sync::Mutex<Duration>>,
) {
    // Chunks are read as they come and written `latency` after they were read, so
    // that the delay does not add up over chunks in a row.
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<(Instant, Vec<u8>)>();
    let writer = async move {
        while let Some((due, chunk)) = rx.recv().await {
            tokio::time::sleep_until(due).await;
            if to.write_all(&chunk).await.is_err() {
                return;
            }
        }
    };
    let reader = async move {
        let mut buf = vec![0u8; 16 * 1024];
        loop {
            let n = match from.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            };
            if frozen.load(Ordering::SeqCst) {
                // Swallow this and everything after it; keep both sockets open.
                std::future::pending::<()>().await;
            }
            let due = Instant::now() + *latency.lock().unwrap();
            if tx.send((due, buf[..n].to_vec())).is_err() {
                return;
            }
        }
    };
    tokio::join!(reader, writer);
}

/// The control plane, a proxy to it, and a `kube::Config` that goes through the proxy.
async fn through_proxy() -> (&'static ControlPlane, Proxy, kube::Config) {
    let cp = ControlPlane::shared().unwrap();
    let upstream: SocketAddr = cp
        .server_url()
        .trim_start_matches("https://")
        .parse()
        .unwrap();
    let proxy = Proxy::start(upstream).await;
    let mut config = cp.config(&cp.admin_credentials()).unwrap();
    config.cluster_url = format!("https://{}", proxy.addr).parse().unwrap();
    (cp, proxy, config)
}

/// The sockets of this process connected to `port`, duplicated (pidfd_getfd) so that
/// their options can be read.
fn sockets_to(port: u16) -> Vec<std::os::fd::OwnedFd> {
    // /proc/self/net/tcp: "sl local rem st ... uid timeout inode"; ports in hex.
    let table = std::fs::read_to_string("/proc/self/net/tcp").unwrap();
    let inodes: Vec<String> = table
        .lines()
        .skip(1)
        .filter_map(|line| {
            let cols: Vec<&str> = line.split_whitespace().collect();
            let remote_port = u16::from_str_radix(cols[2].split(':').nth(1)?, 16).ok()?;
            (remote_port == port && cols[3] == "01").then(|| cols[9].to_owned())
        })
        .collect();
    let pidfd = rustix::process::pidfd_open(
        rustix::process::getpid(),
        rustix::process::PidfdFlags::empty(),
    )
    .unwrap();
    let mut fds = Vec::new();
    for entry in std::fs::read_dir("/proc/self/fd").unwrap().flatten() {
        let Ok(target) = std::fs::read_link(entry.path()) else {
            continue;
        };
        let target = target.to_string_lossy().into_owned();
        let is_ours = inodes.iter().any(|i| target == format!("socket:[{i}]"));
        let Ok(fd) = entry.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        if is_ours
            && let Ok(dup) =
                rustix::process::pidfd_getfd(&pidfd, fd, rustix::process::PidfdGetfdFlags::empty())
        {
            fds.push(dup);
        }
    }
    fds
}

fn lease_api(client: &Client, ns: &str) -> Api<Lease> {
    Api::namespaced(client.clone(), ns)
}

/// A raw GET of the Lease list: the answer's HTTP version and status.
async fn raw_get(client: &Client, ns: &str) -> (Version, u16) {
    let req = Request::get(format!(
        "/apis/coordination.k8s.io/v1/namespaces/{ns}/leases"
    ))
    .body(Vec::new())
    .unwrap();
    let res = client.send(req.map(Into::into)).await.unwrap();
    (res.version(), res.status().as_u16())
}

/// An `exec` upgrade request (websocket) for a pod that does not exist.
async fn raw_upgrade(client: &Client, ns: &str) -> Result<(Version, u16), kube::Error> {
    let req = Request::get(format!(
        "/api/v1/namespaces/{ns}/pods/nobody/exec?command=true&stdout=true"
    ))
    .header(http::header::CONNECTION, "Upgrade")
    .header(http::header::UPGRADE, "websocket")
    .header(http::header::SEC_WEBSOCKET_VERSION, "13")
    .header(http::header::SEC_WEBSOCKET_KEY, "dGhlIHNhbXBsZSBub25jZQ==")
    .header(http::header::SEC_WEBSOCKET_PROTOCOL, "v5.channel.k8s.io")
    .body(Vec::new())
    .unwrap();
    let res = client.send(req.map(Into::into)).await?;
    Ok((res.version(), res.status().as_u16()))
}

fn election(id: &str) -> ElectionConfig {
    ElectionConfig::new(id)
        .lease_duration(Duration::from_secs(3))
        .renew_deadline(Duration::from_secs(2))
        .retry_period(Duration::from_millis(500))
        .request_timeout(Duration::from_secs(2))
}

#[tokio::test]
async fn every_connection_has_tcp_nodelay() {
    let (cp, proxy, config) = through_proxy().await;
    let ns = cp.new_namespace("nodelay").await.unwrap();
    let client = Options::default().build(config).unwrap();
    // One HTTP/2 connection for requests and watches, one HTTP/1.1 connection for the
    // upgrade.
    raw_get(&client, &ns).await;
    raw_upgrade(&client, &ns).await.unwrap();
    let sockets = sockets_to(proxy.addr.port());
    assert_eq!(sockets.len(), 2, "one HTTP/2 and one HTTP/1.1 connection");
    for socket in &sockets {
        assert!(
            rustix::net::sockopt::tcp_nodelay(socket).unwrap(),
            "TCP_NODELAY is off on a connection to the API server"
        );
    }
}

#[tokio::test]
async fn http2_is_negotiated_and_carries_many_elections_on_one_connection() {
    let (cp, proxy, config) = through_proxy().await;
    let ns = cp.new_namespace("http2").await.unwrap();
    let client = Options::default().build(config).unwrap();
    assert_eq!(raw_get(&client, &ns).await, (Version::HTTP_2, 200));

    // 10 Leases, 3 candidates each: 10 leaders renewing, 20 followers watching.
    let handles: Vec<ElectionHandle> = (0..30)
        .map(|i| {
            let lock = LeaseLock::new(client.clone(), &ns, &format!("lease-{}", i % 10));
            Elector::new(lock, election(&format!("c{i}")))
                .unwrap()
                .spawn()
        })
        .collect();
    timeout(Duration::from_secs(30), async {
        loop {
            let leaders = handles.iter().filter(|h| h.is_leader()).count();
            let watching = handles
                .iter()
                .filter(|h| h.status().borrow().watching)
                .count();
            if leaders == 10 && watching == 20 {
                return;
            }
            sleep(Duration::from_millis(50)).await;
        }
    })
    .await
    .expect("10 leaders and 20 watching followers within 30 s");
    // A few renewals on top.
    sleep(Duration::from_secs(2)).await;
    assert_eq!(
        proxy.accepted(),
        1,
        "30 electors (20 watches, 10 leaders renewing) should share one HTTP/2 connection"
    );
    assert_eq!(sockets_to(proxy.addr.port()).len(), 1);
    for h in handles {
        h.shutdown().await.unwrap();
    }
}

#[tokio::test]
async fn upgrades_travel_over_http1() {
    let (cp, proxy, config) = through_proxy().await;
    let ns = cp.new_namespace("upgrade").await.unwrap();
    let client = Options::default().build(config).unwrap();
    assert_eq!(raw_get(&client, &ns).await.0, Version::HTTP_2);
    // Over HTTP/1.1 the API server takes the upgrade request as one and answers that the
    // pod does not exist; over HTTP/2 the upgrade headers cannot be sent at all.
    let answer = raw_upgrade(&client, &ns).await.unwrap();
    assert_eq!(answer, (Version::HTTP_11, 404));
    assert_eq!(
        proxy.accepted(),
        2,
        "the upgrade needs a connection of its own"
    );
    // Requests that do not upgrade stay on HTTP/2.
    assert_eq!(raw_get(&client, &ns).await.0, Version::HTTP_2);
}

#[tokio::test]
async fn watches_never_take_the_last_streams_of_a_connection() {
    let (cp, proxy, config) = through_proxy().await;
    let ns = cp.new_namespace("streams").await.unwrap();
    // One connection only, and a cap above the server's (kube-apiserver allows 100
    // streams): what binds is the limit the server announced.
    let client = Options::default()
        .max_connections(1)
        .max_streams_per_connection(1000)
        .build(config)
        .unwrap();
    raw_get(&client, &ns).await;
    let api = lease_api(&client, &ns);
    let mut watches = Vec::new();
    let mut refused = 0;
    for i in 0..110 {
        let params = WatchParams::default()
            .fields(&format!("metadata.name=w{i}"))
            .timeout(60);
        match timeout(Duration::from_secs(10), api.watch(&params, "0")).await {
            Ok(Ok(stream)) => watches.push(stream.boxed()),
            Ok(Err(_)) => refused += 1,
            Err(_) => panic!("opening watch {i} hung: the connection is full"),
        }
    }
    assert!(refused > 0, "110 watches fit on one connection?");
    assert!(
        watches.len() >= 80,
        "only {} watches opened; a tenth of the streams is kept for requests",
        watches.len()
    );
    // With every stream a watch may take taken, requests still go through at once.
    let started = Instant::now();
    for _ in 0..20 {
        let got = timeout(Duration::from_secs(5), api.get_opt("w0")).await;
        assert!(
            matches!(got, Ok(Ok(None))),
            "a GET behind {} watches: {got:?}",
            watches.len()
        );
    }
    println!(
        "{} watches open, {refused} refused, 20 GETs in {:?}",
        watches.len(),
        started.elapsed()
    );
    assert_eq!(proxy.accepted(), 1);
}

/// kubernetes#125530: a follower whose connection silently died did not see the leader
/// go and lost ~30 s of failover. Here the follower's only connection is blackholed just
/// before the leader releases; the keepalive must notice the dead connection, so that the
/// follower watches again on a new one and takes over long before the lease would
/// expire.
#[tokio::test]
async fn keepalive_notices_a_blackholed_connection() {
    let (cp, proxy, config) = through_proxy().await;
    let ns = cp.new_namespace("keepalive").await.unwrap();
    let slow = |id: &str| {
        ElectionConfig::new(id)
            .lease_duration(Duration::from_secs(30))
            .renew_deadline(Duration::from_secs(20))
            .retry_period(Duration::from_secs(1))
            .request_timeout(Duration::from_secs(5))
    };
    let leader = Elector::new(
        LeaseLock::new(cp.admin_client().unwrap(), &ns, "ka"),
        slow("leader"),
    )
    .unwrap()
    .spawn();
    timeout(Duration::from_secs(20), leader.acquired())
        .await
        .unwrap()
        .unwrap();
    let (interval, ping_timeout) = (Duration::from_secs(1), Duration::from_secs(1));
    let client = Options::default()
        .keepalive(Some((interval, ping_timeout)))
        .build(config)
        .unwrap();
    let follower = Elector::new(LeaseLock::new(client, &ns, "ka"), slow("follower"))
        .unwrap()
        .spawn();
    timeout(Duration::from_secs(20), async {
        while !follower.status().borrow().watching {
            sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .unwrap();

    proxy.blackhole();
    let released = Instant::now();
    leader.shutdown().await.unwrap();
    let took = timeout(Duration::from_secs(20), follower.acquired())
        .await
        .map(|_| released.elapsed());
    println!("takeover after the release, the follower's connection blackholed: {took:?}");
    // Noticed within interval + timeout, then a jittered retry period before watching
    // again: far below the 30 s lease duration.
    let took = took.expect("the follower did not take over within 20 s");
    assert!(
        took < interval + ping_timeout + Duration::from_secs(5),
        "took {took:?}"
    );
    assert!(proxy.accepted() >= 2, "the follower reconnected");
    follower.shutdown().await.unwrap();
}

/// A request that waits in the process for a place among `max_in_flight` and is given
/// up there never reaches the API server; let through at once (a limit high enough),
/// the same request lands although its caller gave up.
#[tokio::test]
async fn a_request_given_up_while_it_waits_to_be_sent_is_never_sent() {
    async fn run(limit: usize) -> bool {
        let (cp, proxy, config) = through_proxy().await;
        let ns = cp.new_namespace("admission").await.unwrap();
        let admin = cp.client(&cp.admin_credentials()).unwrap();
        let client = Options::default()
            .max_in_flight(limit)
            .build(config)
            .unwrap();
        raw_get(&client, &ns).await;
        // Every request now takes over 1.6 s there and back.
        proxy.set_latency(Duration::from_millis(800));
        let api = lease_api(&client, &ns);
        let slow = tokio::spawn({
            let api = api.clone();
            async move { api.get_opt("slow").await }
        });
        sleep(Duration::from_millis(100)).await;
        let lease = Lease {
            metadata: kube::api::ObjectMeta {
                name: Some("given-up".into()),
                ..Default::default()
            },
            ..Default::default()
        };
        let gave_up = timeout(
            Duration::from_millis(300),
            api.create(&kube::api::PostParams::default(), &lease),
        )
        .await;
        assert!(gave_up.is_err(), "the create was answered within 300 ms");
        assert!(matches!(slow.await.unwrap(), Ok(None)));
        // Long enough for a create sent at once to have landed.
        sleep(Duration::from_secs(2)).await;
        lease_api(&admin, &ns)
            .get_opt("given-up")
            .await
            .unwrap()
            .is_some()
    }
    assert!(!run(1).await, "a create given up while it waited was sent");
    // The control: without the wait, the same create lands (so the test can fail).
    assert!(run(8).await, "a create sent at once did not land");
}

/// The client is the bottleneck (one request in flight, each taking ~200 ms there and
/// back, so about 4 requests/s) and a dozen single-candidate elections in one process
/// ask for 12 renewals/s: renewals wait in the process, and the time they wait counts
/// neither against their request timeout (2 s) nor against their terms. All of them
/// lead, and none loses its term.
#[tokio::test]
async fn elections_keep_their_terms_when_the_client_is_the_bottleneck() {
    let (cp, proxy, config) = through_proxy().await;
    let ns = cp.new_namespace("bottleneck").await.unwrap();
    let client = Options::default().max_in_flight(1).build(config).unwrap();
    raw_get(&client, &ns).await;
    proxy.set_latency(Duration::from_millis(100));
    let config = |i: usize| {
        ElectionConfig::new(format!("b{i}"))
            .lease_duration(Duration::from_secs(6))
            .renew_deadline(Duration::from_secs(4))
            .retry_period(Duration::from_secs(1))
            .watch(false)
    };
    let handles: Vec<ElectionHandle> = (0..12)
        .map(|i| {
            let lock = LeaseLock::new(client.clone(), &ns, &format!("lease-{i}"));
            Elector::new(lock, config(i)).unwrap().spawn()
        })
        .collect();
    let lost = Arc::new(AtomicUsize::new(0));
    let leading = Arc::new(AtomicUsize::new(0));
    for h in &handles {
        let (lost, leading) = (lost.clone(), leading.clone());
        let mut status = h.status();
        tokio::spawn(async move {
            let mut was = false;
            loop {
                let now = status.borrow_and_update().term.is_some();
                if now && !was {
                    leading.fetch_add(1, Ordering::SeqCst);
                } else if was && !now {
                    leading.fetch_sub(1, Ordering::SeqCst);
                    lost.fetch_add(1, Ordering::SeqCst);
                }
                was = now;
                if status.changed().await.is_err() {
                    return;
                }
            }
        });
    }
    let started = Instant::now();
    while leading.load(Ordering::SeqCst) < 12 {
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "only {} of 12 lead after 30 s",
            leading.load(Ordering::SeqCst)
        );
        sleep(Duration::from_millis(100)).await;
    }
    let ramp = started.elapsed();
    sleep(Duration::from_secs(20)).await;
    let lost = lost.load(Ordering::SeqCst);
    println!(
        "12 elections behind one request in flight: all led after {ramp:?}; {lost} terms lost in 20 s"
    );
    assert_eq!(lost, 0, "terms were lost");
    assert_eq!(leading.load(Ordering::SeqCst), 12);
    for h in handles {
        h.shutdown().await.unwrap();
    }
}
