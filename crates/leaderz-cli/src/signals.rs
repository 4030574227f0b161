//! SIGTERM and SIGINT, the two ways leaderz is asked to stop.

use nix::sys::signal::Signal;
use tokio::signal::unix::{SignalKind, signal};

use crate::error::CliError;

/// Listens for SIGTERM and SIGINT from the moment it is created.
#[derive(Debug)]
pub(crate) struct Signals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
}

impl Signals {
    /// Installs the handlers.
    pub(crate) fn install() -> Result<Self, CliError> {
        let listen =
            |kind| signal(kind).map_err(|e| CliError::Io(format!("cannot handle signals: {e}")));
        Ok(Self {
            term: listen(SignalKind::terminate())?,
            int: listen(SignalKind::interrupt())?,
        })
    }

    /// The next SIGTERM or SIGINT.
    pub(crate) async fn recv(&mut self) -> Signal {
        tokio::select! {
            Some(()) = self.term.recv() => Signal::SIGTERM,
            Some(()) = self.int.recv() => Signal::SIGINT,
            else => std::future::pending().await,
        }
    }
}
