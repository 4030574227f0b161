//! Logs: `tracing` to stderr, filtered by `--log-level` or `RUST_LOG` (default `info`).

use std::io::IsTerminal;

use tracing_subscriber::EnvFilter;
use tracing_subscriber::layer::{Layer, SubscriberExt};
use tracing_subscriber::util::SubscriberInitExt;

use crate::error::CliError;

/// kube-client logs every failed request (5xx, connection errors) at ERROR; leaderz
/// reports the same failures itself (the library's warnings, `main`'s one line), so
/// those are off unless the filter names `kube_client`.
const QUIET_KUBE_CLIENT: &str = "kube_client::client::builder=off";

/// Installs the subscriber. `filter` is `--log-level`; without it, `RUST_LOG`, else `info`.
pub(crate) fn init(filter: Option<&str>) -> Result<(), CliError> {
    let (directives, source) = match filter {
        Some(f) => (f.to_owned(), "--log-level"),
        None => match std::env::var("RUST_LOG") {
            Ok(v) if !v.trim().is_empty() => (v, "RUST_LOG"),
            _ => ("info".to_owned(), "the default"),
        },
    };
    let mut full = directives.clone();
    if !directives.contains("kube_client") {
        full.push(',');
        full.push_str(QUIET_KUBE_CLIENT);
    }
    let filter = EnvFilter::try_new(&full).map_err(|e| {
        CliError::Usage(format!(
            "invalid log filter `{directives}` from {source}: {e} (use a level such as `info`, or directives such as `leaderz=debug`)"
        ))
    })?;
    let fmt = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none())
        .with_filter(filter);
    tracing_subscriber::registry()
        .with(fmt)
        .try_init()
        .map_err(|e| CliError::Io(format!("cannot set up logging: {e}")))
}
