//! `leaderz serve`: a sidecar candidate that serves who leads over HTTP.

use tracing::info;

use crate::cli::ServeArgs;
use crate::election::Election;
use crate::error::CliError;
use crate::http;
use crate::signals::Signals;

/// Runs `leaderz serve` until SIGTERM/SIGINT (exit 0, after releasing) or a fatal
/// election error.
pub(crate) async fn serve(args: ServeArgs) -> Result<u8, CliError> {
    let mut signals = Signals::install()?;
    let listener = http::bind(&args.http).await?;
    let (mut election, routes) =
        Election::start_routed(&args.election, Some(&args.routes), |c| c).await?;
    http::spawn(listener, http::AppState::for_election(&election));
    // The sidecar's "work" is answering who leads, so nothing holds a Term but the
    // routes: with --label-pod or --leader-endpoints a term holds until traffic points
    // away from this pod; otherwise a lost term ends at once and shutdown releases
    // without waiting.
    let follow = (!routes.is_empty()).then(|| {
        let terms = election.handle.terms();
        tokio::spawn(async move { routes.follow(terms).await })
    });
    let result = tokio::select! {
        signal = signals.recv() => {
            info!(%signal, "shutting down");
            election.shutdown().await.map(|()| 0)
        }
        () = election.stopped() => Err(election.stop_reason().await),
    };
    if let Some(follow) = follow {
        let _ = follow.await;
    }
    result
}
