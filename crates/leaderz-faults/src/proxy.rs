//! A TCP proxy on 127.0.0.1 whose faults are switched at run time: one per candidate,
//! between it and the API server. TLS passes through untouched (the API server's serving
//! certificate covers 127.0.0.1).
//!
//! Modes ([`Mode`]):
//! - pass: bytes flow;
//! - blackhole: nothing flows either way, connections stay open (new ones are accepted and
//!   then hang), as in a network partition; bytes are held, not dropped, so a plain
//!   [`heal`](FaultProxy::heal) delivers them late, like TCP retransmission would;
//! - latency: every chunk is delivered `d` after it was read, in each direction;
//! - reset: open connections get a TCP RST and new ones are reset at once.
//!
//! [`heal_half_open`](FaultProxy::heal_half_open) ends a blackhole so that new
//! connections work again while every connection that existed during it stays open and
//! silent forever: a follower's watch then looks alive but is dead.

use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::time::Duration;

use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};
use tokio::time::{Instant, sleep_until, timeout};
use tokio_util::sync::CancellationToken;

/// What the proxy does to traffic.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Forward both ways.
    Pass,
    /// Forward nothing, keep connections open.
    Blackhole,
    /// Deliver each chunk this long after it was read, both ways.
    Latency(Duration),
    /// Reset open connections and every new one.
    Reset,
}

/// One connection's fault state.
#[derive(Debug, Default)]
struct Conn {
    /// It existed during a blackhole.
    blackholed: AtomicBool,
    /// Silent forever (a half-open heal).
    silenced: AtomicBool,
    /// Reset it now.
    kill: CancellationToken,
}

#[derive(Debug)]
struct Shared {
    mode: watch::Sender<Mode>,
    conns: Mutex<Vec<Weak<Conn>>>,
    upstream: SocketAddr,
}

impl Shared {
    fn live_conns(&self) -> Vec<Arc<Conn>> {
        let mut conns = self.conns.lock().unwrap_or_else(PoisonError::into_inner);
        conns.retain(|c| c.strong_count() > 0);
        conns.iter().filter_map(Weak::upgrade).collect()
    }
}

/// A fault-injecting TCP proxy to one upstream address. Stops (resetting its
/// connections) when dropped.
///
/// ```no_run
/// # async fn demo() -> std::io::Result<()> {
/// use leaderz_faults::proxy::{FaultProxy, Mode};
/// let proxy = FaultProxy::start("127.0.0.1:6443".parse().unwrap()).await?;
/// println!("point the client at https://{}", proxy.addr());
/// proxy.set_mode(Mode::Blackhole);
/// proxy.heal_half_open();
/// # Ok(()) }
/// ```
#[derive(Debug)]
pub struct FaultProxy {
    addr: SocketAddr,
    shared: Arc<Shared>,
    stop: CancellationToken,
}

impl FaultProxy {
    /// Listens on a free port of 127.0.0.1 and forwards to `upstream`, in [`Mode::Pass`].
    pub async fn start(upstream: SocketAddr) -> io::Result<Self> {
        let listener = TcpListener::bind(("127.0.0.1", 0)).await?;
        let addr = listener.local_addr()?;
        let (mode, _) = watch::channel(Mode::Pass);
        let shared = Arc::new(Shared {
            mode,
            conns: Mutex::new(Vec::new()),
            upstream,
        });
        let stop = CancellationToken::new();
        tokio::spawn(accept_loop(listener, shared.clone(), stop.clone()));
        Ok(Self { addr, shared, stop })
    }

    /// The address clients connect to.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The current mode.
    pub fn mode(&self) -> Mode {
        *self.shared.mode.borrow()
    }

    /// Switches the mode. Leaving a blackhole this way lets held bytes through.
    pub fn set_mode(&self, mode: Mode) {
        let conns = self.shared.live_conns();
        match mode {
            Mode::Blackhole => {
                for c in &conns {
                    c.blackholed.store(true, Ordering::SeqCst);
                }
            }
            Mode::Reset => {
                for c in &conns {
                    c.kill.cancel();
                }
            }
            Mode::Pass | Mode::Latency(_) => {
                for c in &conns {
                    c.blackholed.store(false, Ordering::SeqCst);
                }
            }
        }
        self.shared.mode.send_replace(mode);
    }

    /// Back to [`Mode::Pass`].
    pub fn heal(&self) {
        self.set_mode(Mode::Pass);
    }

    /// Back to [`Mode::Pass`] for new connections, while every connection that existed
    /// during the blackhole stays open and silent forever.
    pub fn heal_half_open(&self) {
        for c in self.shared.live_conns() {
            if c.blackholed.load(Ordering::SeqCst) {
                c.silenced.store(true, Ordering::SeqCst);
            }
        }
        self.shared.mode.send_replace(Mode::Pass);
    }

    /// How many connections are open.
    pub fn open_connections(&self) -> usize {
        self.shared.live_conns().len()
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.stop.cancel();
        for c in self.shared.live_conns() {
            c.kill.cancel();
        }
    }
}

async fn accept_loop(listener: TcpListener, shared: Arc<Shared>, stop: CancellationToken) {
    loop {
        let accepted = tokio::select! {
            () = stop.cancelled() => return,
            a = listener.accept() => a,
        };
        let Ok((down, _)) = accepted else {
            // EMFILE and the like: wait a moment rather than spin.
            tokio::time::sleep(Duration::from_millis(10)).await;
            continue;
        };
        let mode = *shared.mode.borrow();
        if mode == Mode::Reset {
            reset(&down);
            continue;
        }
        let conn = Arc::new(Conn::default());
        if mode == Mode::Blackhole {
            conn.blackholed.store(true, Ordering::SeqCst);
        }
        shared
            .conns
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(Arc::downgrade(&conn));
        tokio::spawn(serve(down, shared.clone(), conn));
    }
}

/// Closes `stream` with a TCP RST.
fn reset(stream: &TcpStream) {
    let _ = socket2::SockRef::from(stream).set_linger(Some(Duration::ZERO));
}

async fn serve(mut down: TcpStream, shared: Arc<Shared>, conn: Arc<Conn>) {
    let _ = down.set_nodelay(true);
    // Connecting is traffic too: it waits out a blackhole.
    let connect = async {
        gate(&shared, &conn).await?;
        match timeout(Duration::from_secs(5), TcpStream::connect(shared.upstream)).await {
            Ok(result) => result,
            Err(_) => Err(io::ErrorKind::TimedOut.into()),
        }
    };
    let up = tokio::select! {
        () = conn.kill.cancelled() => None,
        up = connect => up.ok(),
    };
    let Some(mut up) = up else {
        reset(&down);
        return;
    };
    let _ = up.set_nodelay(true);
    let killed = {
        let (down_read, down_write) = down.split();
        let (up_read, up_write) = up.split();
        let both = futures::future::join(
            pump(down_read, up_write, &shared, &conn),
            pump(up_read, down_write, &shared, &conn),
        );
        tokio::select! {
            () = conn.kill.cancelled() => true,
            _ = both => false,
        }
    };
    if killed {
        reset(&down);
        reset(&up);
    }
}

/// Waits until bytes may flow on `conn`: not during a blackhole, never once silenced.
/// Fails when the proxy resets.
async fn gate(shared: &Shared, conn: &Conn) -> io::Result<()> {
    let mut mode = shared.mode.subscribe();
    loop {
        if conn.silenced.load(Ordering::SeqCst) {
            return std::future::pending().await;
        }
        match *mode.borrow_and_update() {
            Mode::Pass | Mode::Latency(_) => return Ok(()),
            Mode::Reset => return Err(io::ErrorKind::ConnectionReset.into()),
            Mode::Blackhole => conn.blackholed.store(true, Ordering::SeqCst),
        }
        if mode.changed().await.is_err() {
            return Err(io::ErrorKind::BrokenPipe.into());
        }
    }
}

/// The latency to add now.
fn latency(shared: &Shared) -> Duration {
    match *shared.mode.borrow() {
        Mode::Latency(d) => d,
        _ => Duration::ZERO,
    }
}

/// Copies one direction, chunk by chunk, through the gate and the latency. At end of
/// stream, shuts the writing side down (a half-close).
async fn pump<R, W>(mut from: R, mut to: W, shared: &Shared, conn: &Conn) -> io::Result<()>
where
    R: tokio::io::AsyncRead + Unpin,
    W: tokio::io::AsyncWrite + Unpin,
{
    // Reader and writer run apart so that latency delays each chunk, not the stream's
    // throughput; `None` marks the end of the stream.
    let (chunks, mut queue) = mpsc::unbounded_channel::<Option<(Instant, Vec<u8>)>>();
    let read = async {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            gate(shared, conn).await?;
            let n = from.read(&mut buf).await?;
            if n == 0 {
                let _ = chunks.send(None);
                return Ok::<(), io::Error>(());
            }
            if chunks
                .send(Some((Instant::now(), buf[..n].to_vec())))
                .is_err()
            {
                return Ok(());
            }
        }
    };
    let write = async {
        while let Some(chunk) = queue.recv().await {
            let Some((read_at, bytes)) = chunk else {
                let _ = to.shutdown().await;
                return Ok(());
            };
            loop {
                gate(shared, conn).await?;
                let due = read_at + latency(shared);
                if Instant::now() >= due {
                    break;
                }
                // A mode change while waiting re-checks the gate and the latency.
                let mut mode = shared.mode.subscribe();
                tokio::select! {
                    () = sleep_until(due) => {}
                    _ = mode.changed() => {}
                }
            }
            to.write_all(&bytes).await?;
        }
        Ok::<(), io::Error>(())
    };
    let (r, w) = futures::future::join(read, write).await;
    r.and(w)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    /// An echo server; returns its address.
    async fn echo() -> SocketAddr {
        let listener = TcpListener::bind(("127.0.0.1", 0)).await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            loop {
                let (mut s, _) = listener.accept().await.unwrap();
                tokio::spawn(async move {
                    let (mut r, mut w) = s.split();
                    let _ = tokio::io::copy(&mut r, &mut w).await;
                });
            }
        });
        addr
    }

    async fn roundtrip(s: &mut TcpStream, within: Duration) -> io::Result<Vec<u8>> {
        s.write_all(b"ping").await?;
        let mut buf = [0u8; 4];
        match timeout(within, s.read_exact(&mut buf)).await {
            Ok(r) => r.map(|_| buf.to_vec()),
            Err(_) => Err(io::ErrorKind::TimedOut.into()),
        }
    }

    #[tokio::test]
    async fn passes_blackholes_heals_and_delays() {
        let proxy = FaultProxy::start(echo().await).await.unwrap();
        let mut s = TcpStream::connect(proxy.addr()).await.unwrap();
        assert_eq!(
            roundtrip(&mut s, Duration::from_secs(2)).await.unwrap(),
            b"ping"
        );

        proxy.set_mode(Mode::Blackhole);
        let err = roundtrip(&mut s, Duration::from_millis(300))
            .await
            .unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        // The held bytes arrive after a plain heal.
        proxy.heal();
        let mut buf = [0u8; 4];
        timeout(Duration::from_secs(2), s.read_exact(&mut buf))
            .await
            .unwrap()
            .unwrap();

        proxy.set_mode(Mode::Latency(Duration::from_millis(200)));
        let started = Instant::now();
        roundtrip(&mut s, Duration::from_secs(2)).await.unwrap();
        let rtt = started.elapsed();
        assert!(
            rtt >= Duration::from_millis(400) && rtt < Duration::from_millis(1000),
            "{rtt:?}"
        );
    }

    #[tokio::test]
    async fn half_open_heal_silences_old_connections_only() {
        let proxy = FaultProxy::start(echo().await).await.unwrap();
        let mut old = TcpStream::connect(proxy.addr()).await.unwrap();
        roundtrip(&mut old, Duration::from_secs(2)).await.unwrap();
        proxy.set_mode(Mode::Blackhole);
        tokio::time::sleep(Duration::from_millis(50)).await;
        proxy.heal_half_open();
        let mut new = TcpStream::connect(proxy.addr()).await.unwrap();
        roundtrip(&mut new, Duration::from_secs(2)).await.unwrap();
        let err = roundtrip(&mut old, Duration::from_millis(500))
            .await
            .unwrap_err();
        assert_eq!(
            err.kind(),
            io::ErrorKind::TimedOut,
            "old connection open, silent"
        );
        assert_eq!(proxy.open_connections(), 2);
    }

    #[tokio::test]
    async fn reset_resets_open_and_new_connections() {
        let proxy = FaultProxy::start(echo().await).await.unwrap();
        let mut s = TcpStream::connect(proxy.addr()).await.unwrap();
        roundtrip(&mut s, Duration::from_secs(2)).await.unwrap();
        proxy.set_mode(Mode::Reset);
        tokio::time::sleep(Duration::from_millis(50)).await;
        let err = roundtrip(&mut s, Duration::from_secs(2)).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::ConnectionReset, "{err}");
        let mut s2 = TcpStream::connect(proxy.addr()).await.unwrap();
        assert!(roundtrip(&mut s2, Duration::from_secs(2)).await.is_err());
        proxy.heal();
        let mut s3 = TcpStream::connect(proxy.addr()).await.unwrap();
        roundtrip(&mut s3, Duration::from_secs(2)).await.unwrap();
    }
}
