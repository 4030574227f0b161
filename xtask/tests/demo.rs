//! The README's first command, run non-interactively as CI would: it must finish and
//! its output must show one leader, a failover after a kill, and a graceful handover.

use std::process::Command;

#[test]
fn demo_runs_to_completion_and_shows_a_failover() {
    let out = Command::new(env!("CARGO_BIN_EXE_xtask"))
        .args(["demo", "--ci"])
        .output()
        .expect("running the demo");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    println!("{stdout}");
    assert!(
        out.status.success(),
        "demo failed: {}\n{stderr}",
        out.status
    );
    let failover = stdout
        .lines()
        .find(|l| l.starts_with("failover: "))
        .expect("a failover line");
    assert!(failover.contains("took over"), "{failover}");
    assert!(
        stdout.lines().any(|l| l.starts_with("graceful handover: ")),
        "no handover line"
    );
    // kubectl describe names the holder, and it changes after the kill.
    let holders: Vec<&str> = stdout
        .lines()
        .filter_map(|l| l.trim().strip_prefix("Holder Identity:"))
        .map(str::trim)
        .collect();
    assert_eq!(holders.len(), 2, "{stdout}");
    assert_ne!(
        holders[0], holders[1],
        "the holder must change after the leader is killed"
    );
    assert!(
        holders.iter().all(|h| h.starts_with("leaderz-example-")),
        "{holders:?}"
    );
}
