//! An in-process lock for deterministic tests and simulations.

use std::sync::Arc;

use futures::StreamExt;
use futures::stream::BoxStream;
use tokio::sync::watch;

use super::{Lock, LockError, LockEvent, Versioned};
use crate::record::LeaderRecord;

/// A [`Lock`] held in memory, shared by cloning. It behaves like the API server does
/// for one Lease: versions change on every write, `update` is a compare-and-swap, and
/// watchers see every state after the version they name (intermediate states may be
/// coalesced, as a real watch may deliver them late) until their timeout ends the watch.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")] async fn main() {
/// use leaderz::{Lock, LeaderRecord, MemoryLock};
///
/// let lock = MemoryLock::new("my-lock");
/// assert!(lock.get().await.unwrap().is_none());
/// let v = lock.create(&LeaderRecord::default()).await.unwrap();
/// assert_eq!(lock.get().await.unwrap(), Some(v));
/// # }
/// ```
#[derive(Clone, Debug)]
pub struct MemoryLock {
    name: Arc<str>,
    state: Arc<watch::Sender<State>>,
}

#[derive(Clone, Debug, Default)]
struct State {
    current: Option<Versioned>,
    next_version: u64,
}

impl MemoryLock {
    /// An empty lock (no record yet) called `name`.
    pub fn new(name: &str) -> Self {
        Self {
            name: name.into(),
            state: Arc::new(watch::Sender::new(State {
                current: None,
                next_version: 1,
            })),
        }
    }

    /// Writes `record` unconditionally, as an administrator could; `None` deletes it.
    pub fn force(&self, record: Option<LeaderRecord>) -> Option<Versioned> {
        let mut out = None;
        self.state.send_modify(|s| {
            s.current = record.map(|record| Versioned {
                record,
                version: s.bump(),
                lease: None,
            });
            out = s.current.clone();
        });
        out
    }

    /// Puts the lock back to `record` at `version`, as restoring etcd from a backup
    /// does: versions go backwards (later writes count on from `version`).
    pub fn restore(&self, record: Option<LeaderRecord>, version: u64) {
        self.state.send_modify(|s| {
            s.next_version = version;
            s.current = record.map(|record| Versioned {
                record,
                version: s.bump(),
                lease: None,
            });
        });
    }

    /// The record as it is now, without going through the [`Lock`] API.
    pub fn peek(&self) -> Option<Versioned> {
        self.state.borrow().current.clone()
    }
}

impl MemoryLock {
    /// Writes `record` as a new version if `allowed` accepts the current state.
    fn write(
        &self,
        record: &LeaderRecord,
        allowed: impl FnOnce(Option<&Versioned>) -> Result<(), LockError>,
    ) -> Result<Versioned, LockError> {
        let mut out = Err(LockError::NotFound);
        self.state.send_if_modified(|s| {
            if let Err(e) = allowed(s.current.as_ref()) {
                out = Err(e);
                return false;
            }
            let v = Versioned {
                record: record.clone(),
                version: s.bump(),
                lease: None,
            };
            s.current = Some(v.clone());
            out = Ok(v);
            true
        });
        out
    }
}

impl State {
    fn bump(&mut self) -> String {
        let v = self.next_version;
        self.next_version += 1;
        v.to_string()
    }
}

impl Lock for MemoryLock {
    async fn get(&self) -> Result<Option<Versioned>, LockError> {
        Ok(self.peek())
    }

    async fn create(&self, record: &LeaderRecord) -> Result<Versioned, LockError> {
        self.write(record, |current| match current {
            Some(_) => Err(LockError::AlreadyExists),
            None => Ok(()),
        })
    }

    async fn update(
        &self,
        current: &Versioned,
        record: &LeaderRecord,
    ) -> Result<Versioned, LockError> {
        self.write(record, |now| match now {
            None => Err(LockError::NotFound),
            Some(c) if c.version != current.version => Err(LockError::Conflict),
            Some(_) => Ok(()),
        })
    }

    async fn watch(
        &self,
        version: &str,
        timeout: std::time::Duration,
    ) -> Result<BoxStream<'static, Result<LockEvent, LockError>>, LockError> {
        let mut rx = self.state.subscribe();
        // An empty version means "from now on": the current record is reported at once.
        let mut last = (!version.is_empty()).then(|| version.to_owned());
        // Report the current state at once if it differs from what the caller saw.
        rx.mark_changed();
        let stream = futures::stream::unfold(rx, |mut rx| async move {
            rx.changed().await.ok()?;
            let current = rx.borrow_and_update().current.clone();
            Some((current, rx))
        })
        .filter_map(move |current| {
            let version = current.as_ref().map(|v| v.version.clone());
            let event = if version == last {
                None
            } else {
                last = version;
                Some(Ok(match current {
                    Some(v) => LockEvent::Changed(v),
                    None => LockEvent::Deleted,
                }))
            };
            futures::future::ready(event)
        })
        // The server ends every watch after its timeout.
        .take_until(tokio::time::sleep(timeout));
        Ok(stream.boxed())
    }

    fn describe(&self) -> String {
        format!("memory/{}", self.name)
    }

    /// Nothing to publish in memory: waits until `stop`, so that coordinated mode's
    /// decisions can be tested with a fake controller writing the record.
    async fn keep_candidate(
        &self,
        _identity: &str,
        _coordinated: &crate::config::Coordinated,
        stop: tokio_util::sync::CancellationToken,
    ) -> Result<(), LockError> {
        stop.cancelled().await;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(holder: &str) -> LeaderRecord {
        LeaderRecord {
            holder_identity: holder.into(),
            ..Default::default()
        }
    }

    #[tokio::test]
    async fn update_is_compare_and_swap() {
        let lock = MemoryLock::new("l");
        let v1 = lock.create(&rec("a")).await.unwrap();
        assert!(matches!(
            lock.create(&rec("b")).await,
            Err(LockError::AlreadyExists)
        ));
        let v2 = lock.update(&v1, &rec("b")).await.unwrap();
        assert_ne!(v1.version, v2.version);
        assert!(matches!(
            lock.update(&v1, &rec("c")).await,
            Err(LockError::Conflict)
        ));
        lock.force(None);
        assert!(matches!(
            lock.update(&v2, &rec("c")).await,
            Err(LockError::NotFound)
        ));
    }

    #[tokio::test]
    async fn watch_reports_changes_after_the_named_version() {
        let lock = MemoryLock::new("l");
        let v1 = lock.create(&rec("a")).await.unwrap();
        let mut w = lock
            .watch(&v1.version, std::time::Duration::from_secs(60))
            .await
            .unwrap();
        let v2 = lock.update(&v1, &rec("b")).await.unwrap();
        match w.next().await {
            Some(Ok(LockEvent::Changed(v))) => assert_eq!(v, v2),
            other => panic!("{other:?}"),
        }
        lock.force(None);
        assert!(matches!(w.next().await, Some(Ok(LockEvent::Deleted))));
    }
}
