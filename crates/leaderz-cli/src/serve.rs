//! `leaderz serve`: a sidecar candidate that serves who leads over HTTP.

use tracing::{info, warn};

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
            if election.routes.is_empty() {
                election.shutdown().await?;
                return Ok(0);
            }
            // The term ends now; the routing task points traffic away and only then
            // drops its term, and the elector releases after that. Bounded: if that is not
            // written within the allowance, or on a second signal, exit without releasing
            // (the routing task still holds the term, so the elector has not released,
            // and the process exit ends it).
            let (routes, info) = (election.routes.clone(), election.info.clone());
            let shutdown = election.shutdown();
            tokio::pin!(shutdown);
            tokio::select! {
                biased;
                done = &mut shutdown => done.map(|()| 0),
                () = tokio::time::sleep(allowance) => {
                    warn!(?allowance, "traffic was not pointed away in time");
                    crate::election::left_behind(&routes, &info);
                    Ok(0)
                }
                signal = signals.recv() => {
                    warn!(%signal, "asked again to stop: not waiting for traffic to be pointed away");
                    crate::election::left_behind(&routes, &info);
                    Ok(0)
                }
            }
        }
        () = election.stopped() => Err(election.stop_reason().await),
    }
}
