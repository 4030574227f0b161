//! `leaderz-controlplane`: a real etcd + kube-apiserver on loopback, in the foreground.
//!
//! Prints `export KUBECONFIG=...` when ready; Ctrl-C (or SIGTERM) stops both servers and
//! removes the temporary directory. Killing this process any other way kills the servers
//! too.

use std::{error::Error as _, process::ExitCode};

use leaderz_testenv::{StartOptions, run_foreground};

#[tokio::main]
async fn main() -> ExitCode {
    if std::env::args().len() > 1 {
        eprintln!(
            "usage: leaderz-controlplane\n\n\
             Starts etcd and kube-apiserver on 127.0.0.1 and prints `export KUBECONFIG=...`;\n\
             Ctrl-C stops them. Binaries come from controlplane/build.sh (or KUBEBUILDER_ASSETS)."
        );
        return ExitCode::from(2);
    }
    match run_foreground(StartOptions::default()).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("leaderz-controlplane: {err}");
            let mut source = err.source();
            while let Some(cause) = source {
                eprintln!("  caused by: {cause}");
                source = cause.source();
            }
            ExitCode::FAILURE
        }
    }
}
