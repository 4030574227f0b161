//! Loopback forwarders from this process's network namespace into the node's.
//!
//! One thread enters the node's network namespace (`setns`, for that thread only) and runs
//! a small Tokio runtime there. Listeners are bound on 127.0.0.1 *before* the thread
//! enters, so they stay in the host's namespace; every socket the thread opens afterwards
//! is in the node's. So a test reaches the API server at `127.0.0.1:<port>` on the host
//! while the host's interfaces and routes stay untouched. The same thread opens
//! connections on request ([`Forwarder::connect`]): a test talking to a pod's address.

use std::{
    fs::File,
    io,
    net::{Ipv4Addr, SocketAddr, TcpListener},
    path::Path,
    thread,
};

use nix::sched::{CloneFlags, setns};
use tokio::sync::{mpsc, oneshot};

use crate::error::{Error, Result};

type Dial = (SocketAddr, oneshot::Sender<io::Result<std::net::TcpStream>>);

/// Forwarders and a dialer inside the node's network namespace; stopped on drop.
#[derive(Debug)]
pub(crate) struct Forwarder {
    seen_at: Vec<SocketAddr>,
    dial: mpsc::UnboundedSender<Dial>,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<thread::JoinHandle<()>>,
}

impl Forwarder {
    /// Forwards a fresh `127.0.0.1:<port>` here to each of `targets` in the network
    /// namespace `netns` (e.g. `/proc/<pid>/ns/net`).
    pub(crate) fn start(netns: &Path, targets: &[SocketAddr]) -> Result<Self> {
        let netns = File::open(netns).map_err(Error::io(format!("opening {}", netns.display())))?;
        let mut listeners = Vec::new();
        for _ in targets {
            let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
                .map_err(Error::io("binding a forwarder on 127.0.0.1"))?;
            listener
                .set_nonblocking(true)
                .map_err(Error::io("making a forwarder non-blocking"))?;
            listeners.push(listener);
        }
        let seen_at = listeners
            .iter()
            .map(TcpListener::local_addr)
            .collect::<io::Result<Vec<_>>>()
            .map_err(Error::io("reading a forwarder's address"))?;
        let targets = targets.to_vec();
        let (dial, mut dials) = mpsc::unbounded_channel::<Dial>();
        let (stop, stopped) = oneshot::channel::<()>();
        let (entered, entered_rx) = std::sync::mpsc::channel::<io::Result<()>>();
        let thread = thread::Builder::new()
            .name("leaderz-node-netns".to_owned())
            .spawn(move || {
                if let Err(err) = setns(&netns, CloneFlags::CLONE_NEWNET) {
                    let _ = entered.send(Err(io::Error::from(err)));
                    return;
                }
                let runtime = match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(runtime) => runtime,
                    Err(err) => {
                        let _ = entered.send(Err(err));
                        return;
                    }
                };
                let _ = entered.send(Ok(()));
                runtime.block_on(async move {
                    for (listener, target) in listeners.into_iter().zip(targets) {
                        match tokio::net::TcpListener::from_std(listener) {
                            Ok(listener) => {
                                tokio::spawn(forward(listener, target));
                            }
                            Err(err) => tracing::warn!(%err, "forwarder listener"),
                        }
                    }
                    tokio::spawn(async move {
                        while let Some((addr, reply)) = dials.recv().await {
                            tokio::spawn(async move {
                                let stream = tokio::net::TcpStream::connect(addr)
                                    .await
                                    .and_then(|s| s.into_std());
                                let _ = reply.send(stream);
                            });
                        }
                    });
                    let _ = stopped.await;
                });
            })
            .map_err(Error::io("starting the node's network-namespace thread"))?;
        entered_rx
            .recv()
            .map_err(|_| Error::Io {
                context: "the node's network-namespace thread died".to_owned(),
                source: io::Error::other("no answer"),
            })?
            .map_err(Error::io("entering the node's network namespace (setns)"))?;
        Ok(Self {
            seen_at,
            dial,
            stop: Some(stop),
            thread: Some(thread),
        })
    }

    /// Where this process reaches `targets[i]`.
    pub(crate) fn seen_at(&self, i: usize) -> SocketAddr {
        self.seen_at[i]
    }

    /// A TCP connection to `addr` opened inside the node's network namespace (e.g. a pod's
    /// address), for use in the caller's runtime.
    pub(crate) async fn connect(&self, addr: SocketAddr) -> io::Result<tokio::net::TcpStream> {
        let (reply, answer) = oneshot::channel();
        let gone = || io::Error::other("the node's network-namespace thread is gone");
        self.dial.send((addr, reply)).map_err(|_| gone())?;
        let stream = answer.await.map_err(|_| gone())??;
        tokio::net::TcpStream::from_std(stream)
    }
}

impl Drop for Forwarder {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Accepts on `listener` (host side) and pipes each connection to `target` (node side).
async fn forward(listener: tokio::net::TcpListener, target: SocketAddr) {
    loop {
        let (mut inbound, _) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(err) => {
                tracing::debug!(%err, "forwarder accept");
                tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                continue;
            }
        };
        tokio::spawn(async move {
            let Ok(mut outbound) = tokio::net::TcpStream::connect(target).await else {
                return; // dropping `inbound` tells the client
            };
            // No delayed-ACK stalls added by this hop.
            let _ = inbound.set_nodelay(true);
            let _ = outbound.set_nodelay(true);
            let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
        });
    }
}
