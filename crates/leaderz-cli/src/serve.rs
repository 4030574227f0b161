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
    let mut election = Election::start(&args.election, |c| c).await?;
    http::spawn(listener, http::AppState::for_election(&election));
    // Nothing here holds a Term: the sidecar's "work" is answering who leads, so a lost
    // term ends at once and shutdown releases without waiting.
    tokio::select! {
        signal = signals.recv() => {
            info!(%signal, "shutting down");
            election.shutdown().await?;
            Ok(0)
        }
        () = election.stopped() => Err(election.stop_reason().await),
    }
}
