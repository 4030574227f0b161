//! Logs: `tracing` to stderr, filtered by `--log-level` or `RUST_LOG` (default `info`).

use std::io::IsTerminal;

use std::fmt;

use tracing::field::{Field, Visit};
use tracing_subscriber::EnvFilter;
use tracing_subscriber::field::RecordFields;
use tracing_subscriber::fmt::FormatFields;
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::layer::{Layer, SubscriberExt};
use tracing_subscriber::util::SubscriberInitExt;

use crate::error::CliError;
use crate::text::printable;

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
        .fmt_fields(OneLineFields)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none())
        .with_filter(filter);
    tracing_subscriber::registry()
        .with(fmt)
        .try_init()
        .map_err(|e| CliError::Io(format!("cannot set up logging: {e}")))
}

/// Fields as the default formatter writes them (`message key="string" key=value ...`),
/// with control characters escaped in every value: the default formatter escapes string
/// fields but writes messages and `%`-formatted values (errors quoting a server, a
/// Lease's holder) as they are, and a newline in one must not forge a log line
/// (tracing-subscriber itself escapes only terminal escape sequences).
struct OneLineFields;

impl<'w> FormatFields<'w> for OneLineFields {
    fn format_fields<R: RecordFields>(&self, writer: Writer<'w>, fields: R) -> fmt::Result {
        let mut visitor = OneLineVisitor {
            writer,
            empty: true,
            result: Ok(()),
        };
        fields.record(&mut visitor);
        visitor.result
    }
}

struct OneLineVisitor<'w> {
    writer: Writer<'w>,
    empty: bool,
    result: fmt::Result,
}

impl Visit for OneLineVisitor<'_> {
    fn record_str(&mut self, field: &Field, value: &str) {
        // Quoted and escaped, as the default formatter writes strings.
        if field.name() == "message" {
            self.write(field, value);
        } else {
            self.write(field, &format!("{value:?}"));
        }
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.write(field, &format!("{value:?}"));
    }
}

impl OneLineVisitor<'_> {
    fn write(&mut self, field: &Field, value: &str) {
        if self.result.is_err() || field.name().starts_with("log.") {
            return;
        }
        let space = if self.empty { "" } else { " " };
        self.empty = false;
        let value = printable(value);
        self.result = match field.name() {
            "message" => write!(self.writer, "{space}{value}"),
            name => write!(self.writer, "{space}{name}={value}"),
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    #[test]
    fn a_hostile_field_value_stays_on_its_line() {
        let buffer = Arc::new(Mutex::new(Vec::new()));
        let sink = buffer.clone();
        let subscriber = tracing_subscriber::fmt()
            .fmt_fields(OneLineFields)
            .with_ansi(false)
            .without_time()
            .with_writer(move || Sink(sink.clone()))
            .finish();
        tracing::subscriber::with_default(subscriber, || {
            let span = tracing::info_span!("election", lease = "l");
            let _entered = span.enter();
            let holder = "evil\nINFO";
            let forged = "evil\nINFO forged";
            tracing::info!(leader = holder, holder = %forged, token = 3, "new leader");
            tracing::warn!(error = %std::io::Error::other("a\rb"), "failed");
        });
        let text = String::from_utf8(buffer.lock().unwrap().clone()).unwrap();
        assert_eq!(
            text,
            " INFO election{lease=\"l\"}: leaderz::logging::tests: new leader leader=\"evil\\nINFO\" holder=evil\\nINFO forged token=3\n \
             WARN election{lease=\"l\"}: leaderz::logging::tests: failed error=a\\rb\n"
        );
    }

    struct Sink(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Sink {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
}
