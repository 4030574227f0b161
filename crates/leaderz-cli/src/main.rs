//! `leaderz`: Kubernetes leader election for any program.
//!
//! `leaderz run --lease NAME -- CMD ...` runs CMD only while this process leads the
//! Lease; `leaderz serve --lease NAME` is a sidecar candidate that answers who leads over
//! HTTP; `leaderz status` and `leaderz watch` show Leases; `leaderz handoff NAME` hands a
//! Lease over to another candidate. Flags are in [`cli`]; every error ends the process
//! with one `error: ...` line on stderr and a non-zero code.

use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;

mod candidates;
mod child;
mod cli;
mod cluster;
mod election;
mod error;
mod exec;
mod handoff;
mod http;
mod leases;
mod logging;
mod run;
mod serve;
mod shardmap;
mod shards;
mod signals;
mod status;
mod supervise;
mod text;
mod watch;

use cli::{Cli, Command};
use error::{CliError, EXIT_USAGE};

fn main() -> ExitCode {
    let args: Vec<std::ffi::OsString> = std::env::args_os().collect();
    if args.get(1).is_some_and(|a| a == supervise::MODE) {
        return ExitCode::from(supervise::main(&args[2..]));
    }
    let cli = match Cli::try_parse_from(&args) {
        Ok(cli) => cli,
        // --help and --version go to stdout and exit 0.
        Err(e) if !e.use_stderr() => e.exit(),
        Err(e) => {
            eprintln!("error: {}", cli::one_line(&e, &args));
            return ExitCode::from(EXIT_USAGE);
        }
    };
    match execute(cli) {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            // One line, whatever the message quotes (an identity, a command, a server's words).
            eprintln!("error: {}", text::printable(&e.to_string()));
            ExitCode::from(e.exit_code())
        }
    }
}

fn execute(cli: Cli) -> Result<u8, CliError> {
    logging::init(cli.log_level.as_deref())?;
    // One thread is plenty for one election and a few HTTP requests, and keeps a sidecar small.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| CliError::Io(format!("cannot start the async runtime: {e}")))?;
    let result = runtime.block_on(async {
        match cli.command {
            Command::Run(args) => run::run(args).await,
            Command::Serve(args) => serve::serve(args).await,
            Command::Status(args) => status::status(args).await,
            Command::Watch(args) => watch::watch(args).await,
            Command::Handoff(args) => handoff::handoff(args).await,
        }
    });
    // Open HTTP connections (an /events stream) must not hold the exit up.
    runtime.shutdown_timeout(Duration::from_millis(500));
    result
}
