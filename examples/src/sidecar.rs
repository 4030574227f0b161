//! The sidecar pattern, from the app's side: this replica does not campaign itself; it asks
//! the `leaderz serve` sidecar in its pod who leads (`GET /` answers `{"name":"<leader>"}`,
//! like the retired contrib leader-elector) and works only while that is its own name. Any
//! language can do this with an HTTP client; see `kube/sidecar/`.

use std::time::Duration;

use anyhow::{Context as _, bail};
use http_body_util::{BodyExt as _, Empty};
use hyper::{Request, Uri, body::Bytes, header::HOST};
use hyper_util::rt::TokioIo;
use tokio::signal::unix::{SignalKind, signal};
use tracing::{info, warn};

/// Polls `url` once a second; logs `working...` while the sidecar names `identity`, and
/// each change of leader. Returns on SIGTERM or Ctrl-C.
pub(crate) async fn run(url: Uri, identity: String) -> anyhow::Result<()> {
    let mut sigterm = signal(SignalKind::terminate())?;
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    let mut last: Option<String> = None;
    info!(%url, "asking the sidecar who leads");
    loop {
        tokio::select! {
            _ = sigterm.recv() => break,
            _ = tokio::signal::ctrl_c() => break,
            _ = tick.tick() => {}
        }
        let leader = match leader(&url).await {
            Ok(leader) => leader,
            Err(err) => {
                warn!(error = %format!("{err:#}"), "the sidecar did not answer");
                continue;
            }
        };
        if last.as_deref() != Some(leader.as_str()) {
            match leader.as_str() {
                "" => info!("no leader"),
                who if who == identity => info!("the sidecar says I am the leader"),
                who => info!(%who, "new leader"),
            }
            last = Some(leader.clone());
        }
        if leader == identity {
            info!("working...");
        }
    }
    info!("stopped");
    Ok(())
}

/// `GET <url>` over HTTP/1.1; the `name` of the JSON answer.
async fn leader(url: &Uri) -> anyhow::Result<String> {
    let authority = url
        .authority()
        .context("the sidecar URL has no host:port")?
        .clone();
    let port = authority.port_u16().unwrap_or(80);
    let stream = tokio::time::timeout(
        Duration::from_secs(2),
        tokio::net::TcpStream::connect((authority.host(), port)),
    )
    .await
    .context("connecting timed out")??;
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .context("HTTP handshake")?;
    let driver = tokio::spawn(connection);
    let request = Request::get(url.path_and_query().map_or("/", |p| p.as_str()))
        .header(HOST, authority.as_str())
        .body(Empty::<Bytes>::new())?;
    let answer = tokio::time::timeout(Duration::from_secs(2), async {
        let response = sender.send_request(request).await?;
        let status = response.status();
        let body = response.into_body().collect().await?.to_bytes();
        anyhow::Ok((status, body))
    })
    .await
    .context("the answer timed out")??;
    driver.abort();
    let (status, body) = answer;
    if !status.is_success() {
        bail!("{status}: {}", String::from_utf8_lossy(&body));
    }
    let json: serde_json::Value =
        serde_json::from_slice(&body).context("the answer is not JSON")?;
    json["name"]
        .as_str()
        .map(str::to_owned)
        .context("the answer has no `name`")
}
