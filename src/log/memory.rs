//! The embedded, in-process log: one [`OrgWindow`] per org behind a short lock, and a `watch`
//! channel per org that wakes tails. Lost on restart: every org gets a new epoch.

use std::collections::HashMap;
use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;
use parking_lot::{Mutex, RwLock};
use tokio::sync::watch;

use super::window::OrgWindow;
use super::{
    Appended, EventLog, LogError, LogUsage, OrgState, ReadOutcome, Retention, Tail, Tailed,
};
use crate::event::Event;
use crate::model::{Epoch, OrgId, Position};
use crate::time::unix_ms;

/// One org's window and the channel that wakes its followers: the part of an org the
/// embedded logs (in memory and durable) share.
pub(super) struct WindowSlot {
    pub(super) window: Arc<Mutex<OrgWindow>>,
    head: watch::Sender<u64>,
}

type Slot = WindowSlot;

impl WindowSlot {
    pub(super) fn new(window: OrgWindow) -> Self {
        let head = window.state().head;
        WindowSlot {
            window: Arc::new(Mutex::new(window)),
            head: watch::channel(head).0,
        }
    }

    /// Wakes followers up to `last` (call with the window lock held, so heads rise in order).
    pub(super) fn announce(&self, last: u64) {
        self.head.send_if_modified(|h| {
            let newer = last > *h;
            *h = (*h).max(last);
            newer
        });
    }

    pub(super) fn state(&self) -> OrgState {
        self.window.lock().state()
    }

    pub(super) fn read(&self, after: &Position, limit: usize) -> ReadOutcome {
        let w = self.window.lock();
        let state = w.state();
        match w.read_after(after, limit) {
            Some(events) => ReadOutcome::Events { state, events },
            None => ReadOutcome::Unusable { state },
        }
    }

    /// A follower after `after` (after the head when `None`).
    pub(super) fn tail(&self, after: Option<Position>) -> Box<dyn Tail> {
        let mut rx = self.head.subscribe();
        rx.mark_unchanged();
        let cursor = after.unwrap_or_else(|| {
            let state = self.state();
            Position {
                epoch: state.epoch,
                seq: state.head,
            }
        });
        Box::new(MemoryTail {
            window: self.window.clone(),
            rx,
            cursor,
        })
    }
}

/// The org's slot, made (with a new epoch) on first use.
pub(super) fn org_slot<S>(
    orgs: &RwLock<HashMap<OrgId, Arc<S>>>,
    org: &OrgId,
    make: impl FnOnce(OrgWindow) -> S,
) -> Arc<S> {
    if let Some(s) = orgs.read().get(org) {
        return s.clone();
    }
    orgs.write()
        .entry(org.clone())
        .or_insert_with(|| Arc::new(make(OrgWindow::new(org.clone(), Epoch::random()))))
        .clone()
}

/// Orgs, retained events and bytes over some windows.
pub(super) fn usage<'a>(windows: impl ExactSizeIterator<Item = &'a WindowSlot>) -> LogUsage {
    let mut u = LogUsage {
        orgs: windows.len() as u64,
        ..Default::default()
    };
    for s in windows {
        let w = s.window.lock();
        u.events += w.len() as u64;
        u.bytes += w.bytes() as u64;
    }
    u
}

/// The in-memory [`EventLog`].
pub struct MemoryLog {
    orgs: RwLock<HashMap<OrgId, Arc<Slot>>>,
    retention: Retention,
}

impl MemoryLog {
    pub fn new(retention: Retention) -> Self {
        MemoryLog {
            orgs: RwLock::new(HashMap::new()),
            retention,
        }
    }

    fn slot(&self, org: &OrgId) -> Arc<Slot> {
        org_slot(&self.orgs, org, Slot::new)
    }
}

#[async_trait]
impl EventLog for MemoryLog {
    async fn append(
        &self,
        org: &OrgId,
        payloads: Vec<Bytes>,
        idempotency_key: Option<&str>,
    ) -> Result<Appended, LogError> {
        let slot = self.slot(org);
        let appended = {
            let mut w = slot.window.lock();
            let (appended, _) = w.append(payloads, idempotency_key, unix_ms(), &self.retention);
            // Under the window lock, so tails observe heads in order.
            slot.announce(appended.last_seq);
            appended
        };
        Ok(appended)
    }

    async fn state(&self, org: &OrgId) -> Result<OrgState, LogError> {
        Ok(self.slot(org).state())
    }

    async fn read(
        &self,
        org: &OrgId,
        after: &Position,
        limit: usize,
    ) -> Result<ReadOutcome, LogError> {
        Ok(self.slot(org).read(after, limit))
    }

    async fn tail(&self, org: &OrgId, after: Option<Position>) -> Result<Box<dyn Tail>, LogError> {
        Ok(self.slot(org).tail(after))
    }

    fn kind(&self) -> &'static str {
        "memory"
    }

    fn usage(&self) -> LogUsage {
        usage(self.orgs.read().values().map(|s| &**s))
    }

    fn sweep(&self, now_ms: u64) {
        let slots: Vec<Arc<Slot>> = self.orgs.read().values().cloned().collect();
        for s in slots {
            s.window.lock().evict(now_ms, &self.retention);
        }
    }
}

/// A follower of one org's window, woken by its head channel.
struct MemoryTail {
    window: Arc<Mutex<OrgWindow>>,
    rx: watch::Receiver<u64>,
    cursor: Position,
}

/// Events read per wake-up; a burst larger than this is returned over several calls.
const TAIL_BATCH: usize = 1024;

#[async_trait]
impl Tail for MemoryTail {
    async fn next(&mut self) -> Result<Tailed, LogError> {
        loop {
            let events: Vec<Arc<Event>> = {
                let w = self.window.lock();
                match w.read_after(&self.cursor, TAIL_BATCH) {
                    Some(events) => events,
                    None => {
                        // Evicted past the cursor (the hub fell far behind): jump to the
                        // oldest retained; sessions fill or reset from the log themselves.
                        let s = w.state();
                        self.cursor = Position {
                            epoch: s.epoch,
                            seq: s.first - 1,
                        };
                        continue;
                    }
                }
            };
            if let Some(last) = events.last() {
                self.cursor.seq = last.seq;
                return Ok(Tailed {
                    events,
                    signals: Vec::new(),
                });
            }
            if self.rx.changed().await.is_err() {
                return Err(LogError::Internal("org log dropped".into()));
            }
        }
    }

    fn position(&self) -> Position {
        self.cursor.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn tail_follows_appends_in_order() {
        let log = MemoryLog::new(Retention::default());
        let org = OrgId::parse("acme").unwrap();
        log.append(&org, vec![Bytes::from_static(b"{}")], None)
            .await
            .unwrap();
        let mut tail = log.tail(&org, None).await.unwrap();
        let l2 = Arc::new(log);
        let l3 = l2.clone();
        let o2 = org.clone();
        tokio::spawn(async move {
            for _ in 0..50 {
                l3.append(&o2, vec![Bytes::from_static(b"{}"); 3], None)
                    .await
                    .unwrap();
                tokio::task::yield_now().await;
            }
        });
        let mut seen = Vec::new();
        while seen.len() < 150 {
            seen.extend(tail.next().await.unwrap().events.iter().map(|e| e.seq));
        }
        assert_eq!(
            seen,
            (2..=151).collect::<Vec<_>>(),
            "starts after the head at tail time"
        );
    }
}
