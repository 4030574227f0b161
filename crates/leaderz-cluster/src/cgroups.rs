//! The kubelet's cgroups: one root per run in every hierarchy, removed on teardown.
//!
//! Cgroups are host state the namespaces cannot hide, so the kubelet gets a `cgroupRoot`
//! named `leaderz-node-<pid>-<start time>-<random>` of its own (pid and start time identify
//! the owning process). Teardown removes the tree once the node's processes are gone; a
//! [`Cleaner`] does it if this process dies first; and every start sweeps the roots of dead
//! owners, in case the cleaner was killed too.

use std::{
    ffi::OsString,
    fs, io,
    path::{Path, PathBuf},
    time::Duration,
};

use leaderz_testenv::process::{Cleaner, proc_stat};
use tokio::time::Instant;

use crate::error::{Error, Result};

const PREFIX: &str = "leaderz-node-";

/// Removes the given cgroup trees deepest first, retrying while the kernel still counts
/// dying tasks in them.
const CLEANER_SCRIPT: &str = r#"sleep 1
for attempt in 1 2 3 4 5 6 7 8 9 10; do
  left=
  for dir in "$@"; do
    [ -d "$dir" ] || continue
    find "$dir" -depth -type d -exec rmdir {} + 2>/dev/null || true
    [ -d "$dir" ] && left=1
  done
  [ -z "$left" ] && exit 0
  sleep 1
done"#;

/// A cgroup root in every mounted hierarchy.
#[derive(Debug)]
pub(crate) struct CgroupRoot {
    name: String,
    dirs: Vec<PathBuf>,
    cleaner: Option<Cleaner>,
}

impl CgroupRoot {
    /// Sweeps dead runs' roots, then creates `/<name>` in every hierarchy.
    pub(crate) fn create() -> Result<Self> {
        let hierarchies = hierarchies();
        sweep(&hierarchies);
        let pid = std::process::id();
        let start = proc_stat(pid).map_or(0, |stat| stat.start_time);
        let name = format!("{PREFIX}{pid}-{start}-{:08x}", rand_suffix());
        let dirs: Vec<PathBuf> = hierarchies.iter().map(|h| h.join(&name)).collect();
        let cleaner = Cleaner::spawn(
            "leaderz-cgroup-cleaner",
            CLEANER_SCRIPT,
            &dirs
                .iter()
                .map(|d| d.as_os_str().to_owned())
                .collect::<Vec<OsString>>(),
        )?;
        let root = Self {
            name,
            dirs,
            cleaner: Some(cleaner),
        };
        for (hierarchy, dir) in hierarchies.iter().zip(&root.dirs) {
            fs::create_dir(dir).map_err(Error::io(format!("creating cgroup {}", dir.display())))?;
            // A new cpuset cgroup has no CPUs or memory nodes; give it its parent's.
            for file in ["cpuset.cpus", "cpuset.mems"] {
                if let Ok(parent) = fs::read_to_string(hierarchy.join(file)) {
                    fs::write(dir.join(file), parent.trim())
                        .map_err(Error::io(format!("writing {}", dir.join(file).display())))?;
                }
            }
        }
        Ok(root)
    }

    /// The kubelet's `cgroupRoot`: `/<name>`.
    pub(crate) fn kubelet_root(&self) -> String {
        format!("/{}", self.name)
    }

    /// The directories, one per hierarchy.
    pub(crate) fn dirs(&self) -> &[PathBuf] {
        &self.dirs
    }

    /// Removes the trees (their processes must be gone); retries while the kernel still
    /// counts exiting tasks. Blocks.
    pub(crate) fn remove(&mut self) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let mut last_error = None;
            for dir in &self.dirs {
                if let Err(err) = remove_tree(dir) {
                    last_error = Some((dir.clone(), err));
                }
            }
            match last_error {
                None => break,
                Some((dir, err)) if Instant::now() >= deadline => {
                    return Err(Error::Io {
                        context: format!("removing cgroup {}", dir.display()),
                        source: err,
                    });
                }
                Some(_) => std::thread::sleep(Duration::from_millis(50)),
            }
        }
        if let Some(cleaner) = self.cleaner.take() {
            cleaner.disarm();
        }
        Ok(())
    }
}

/// Mount points of the cgroup hierarchies (v1 controllers and the v2 unified one).
fn hierarchies() -> Vec<PathBuf> {
    let Ok(mountinfo) = fs::read_to_string("/proc/self/mountinfo") else {
        return Vec::new();
    };
    let mut found: Vec<PathBuf> = mountinfo
        .lines()
        .filter_map(|line| {
            let (left, right) = line.split_once(" - ")?;
            let fstype = right.split_whitespace().next()?;
            let mount_point = left.split_whitespace().nth(4)?;
            matches!(fstype, "cgroup" | "cgroup2").then(|| PathBuf::from(mount_point))
        })
        .collect();
    found.sort();
    found.dedup();
    found
}

/// Removes `dir` and every cgroup below it, deepest first. Missing is fine.
fn remove_tree(dir: &Path) -> io::Result<()> {
    let entries = match fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(err) if err.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(err) => return Err(err),
    };
    for entry in entries.flatten() {
        if entry.file_type().is_ok_and(|t| t.is_dir()) {
            remove_tree(&entry.path())?;
        }
    }
    match fs::remove_dir(dir) {
        Err(err) if err.kind() == io::ErrorKind::NotFound => Ok(()),
        other => other,
    }
}

/// Removes roots whose owning process (pid and start time in the name) is gone.
fn sweep(hierarchies: &[PathBuf]) {
    for hierarchy in hierarchies {
        let Ok(entries) = fs::read_dir(hierarchy) else {
            continue;
        };
        for entry in entries.flatten() {
            let name = entry.file_name();
            let Some(owner) = name.to_str().and_then(parse_owner) else {
                continue;
            };
            if !owner_alive(owner) {
                match remove_tree(&entry.path()) {
                    Ok(()) => tracing::debug!(cgroup = %entry.path().display(), "swept"),
                    Err(err) => {
                        tracing::debug!(cgroup = %entry.path().display(), %err, "not swept")
                    }
                }
            }
        }
    }
}

/// `(pid, start time)` from `leaderz-node-<pid>-<start>-<random>`.
fn parse_owner(name: &str) -> Option<(u32, u64)> {
    let mut parts = name.strip_prefix(PREFIX)?.split('-');
    let pid = parts.next()?.parse().ok()?;
    let start = parts.next()?.parse().ok()?;
    Some((pid, start))
}

fn owner_alive((pid, start): (u32, u64)) -> bool {
    proc_stat(pid).is_some_and(|stat| stat.start_time == start && stat.state != 'Z')
}

fn rand_suffix() -> u32 {
    use std::hash::{BuildHasher as _, RandomState};
    // Randomly keyed SipHash of the time: random enough for a unique name.
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    RandomState::new().hash_one(nanos) as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn owner_is_parsed_from_the_name() {
        assert_eq!(
            parse_owner("leaderz-node-42-9876-0badcafe"),
            Some((42, 9876))
        );
        assert_eq!(parse_owner("kubepods"), None);
        assert_eq!(parse_owner("leaderz-node-x-1-2"), None);
    }

    #[test]
    fn this_process_is_an_owner_alive_and_a_dead_pid_is_not() {
        let me = std::process::id();
        let start = proc_stat(me).unwrap().start_time;
        assert!(owner_alive((me, start)));
        assert!(
            !owner_alive((me, start + 1)),
            "a reused pid is not the owner"
        );
        assert!(!owner_alive((u32::MAX, 0)));
    }
}
