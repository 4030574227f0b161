//! Stopping and starting kube-apiserver and etcd one at a time, for fault-injection tests.
//!
//! Each server stops as in a crash (SIGKILL) and starts again with the same binary, flags,
//! ports, certificates and data directory, so etcd keeps its data and clients keep their
//! URLs. The other server keeps running meanwhile: kube-apiserver then answers errors (or
//! hangs) while etcd is down, and clients see refused connections while kube-apiserver is.

use std::time::Duration;

use kube::Client;

use crate::error::{Error, Result};
use crate::{ControlPlane, client_config, etcd_health, readyz, wait_ready};

/// How long a restarted server may take to become ready.
const RESTART_READY_TIMEOUT: Duration = Duration::from_secs(90);

impl ControlPlane {
    /// Kills kube-apiserver (SIGKILL, as in a crash) and reaps it; etcd keeps running.
    /// Idempotent. Start it again with [`start_apiserver`](Self::start_apiserver).
    pub fn stop_apiserver(&mut self) {
        self.apiserver.stop();
    }

    /// Starts kube-apiserver again after [`stop_apiserver`](Self::stop_apiserver), with the
    /// same flags, port and certificates, and waits until `/readyz` answers. Does nothing
    /// if it runs.
    ///
    /// ```no_run
    /// # async fn demo(mut cp: leaderz_testenv::ControlPlane) -> leaderz_testenv::Result<()> {
    /// cp.stop_apiserver();
    /// tokio::time::sleep(std::time::Duration::from_secs(2)).await;
    /// cp.start_apiserver().await?;
    /// # Ok(()) }
    /// ```
    pub async fn start_apiserver(&mut self) -> Result<()> {
        self.apiserver.respawn().await?;
        let mut config = client_config(&self.server_url, &self.ca_der, &self.admin)?;
        config.default_retry = false;
        let probe = Client::try_from(config)
            .map_err(Error::kube("building the readiness probe's client"))?;
        wait_ready(&mut self.apiserver, RESTART_READY_TIMEOUT, || {
            readyz(&probe)
        })
        .await
    }

    /// Kills etcd (SIGKILL, as in a crash) and reaps it; kube-apiserver keeps running and
    /// etcd's data directory is kept. Idempotent. Start it again with
    /// [`start_etcd`](Self::start_etcd).
    pub fn stop_etcd(&mut self) {
        self.etcd.stop();
    }

    /// Starts etcd again after [`stop_etcd`](Self::stop_etcd), on the same ports and data
    /// directory, and waits until its `/health` answers. kube-apiserver reconnects by
    /// itself; wait for that with an API call if it matters. Does nothing if it runs.
    pub async fn start_etcd(&mut self) -> Result<()> {
        self.etcd.respawn().await?;
        let addr = etcd_addr(&self.etcd_url)?;
        wait_ready(&mut self.etcd, RESTART_READY_TIMEOUT, || etcd_health(addr)).await
    }

    /// Whether kube-apiserver runs (it was not stopped, or was started again).
    pub fn apiserver_running(&self) -> bool {
        !self.apiserver.is_stopped()
    }

    /// Whether etcd runs (it was not stopped, or was started again).
    pub fn etcd_running(&self) -> bool {
        !self.etcd.is_stopped()
    }
}

/// The address of `http://<ip>:<port>`.
fn etcd_addr(url: &str) -> Result<std::net::SocketAddr> {
    url.trim_start_matches("http://")
        .parse()
        .map_err(|_| Error::InvalidArgument(format!("etcd URL `{url}` is not http://<ip>:<port>")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn etcd_addr_from_url() {
        assert_eq!(
            etcd_addr("http://127.0.0.1:2379").unwrap(),
            "127.0.0.1:2379".parse().unwrap()
        );
        assert!(etcd_addr("http://127.0.0.1").is_err());
    }
}
