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
    let allowance = crate::election::routing_allowance(&args.routes);
    let mut election = Election::start(&args.election, &args.routes, |c| {
        let grace = c.shutdown_grace + allowance;
        c.shutdown_grace(grace)
    })
    .await?;
    http::spawn(listener, http::AppState::for_election(&election));
    // The sidecar's "work" is answering who leads, which holds no Term: a lost term ends
    // at once and shutdown releases without waiting — except for the routes, which hold
    // the term until traffic is pointed away (--label-pod, --leader-endpoints).
    if !election.routes.is_empty() {
        let (routes, terms) = (election.routes.clone(), election.handle.terms());
        tokio::spawn(async move { routes.follow(terms).await });
    }
    tokio::select! {
        signal = signals.recv() => {
            info!(%signal, "shutting down");
            election.shutdown().await?;
            Ok(0)
        }
        () = election.stopped() => Err(election.stop_reason().await),
    }
}
