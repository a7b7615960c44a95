//! The embedded, in-process log: one [`OrgWindow`] per org behind a short lock, and a `watch`
//! channel per org that wakes tails. Lost on restart: every org gets a new epoch.

use std::collections::{HashMap, VecDeque};
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

/// What an embedded log keeps of each org's slot, generic over the slot (the in-memory log's
/// [`WindowSlot`], the durable log's with its sequencer).
pub(super) trait OrgSlot: Send + Sync {
    fn window(&self) -> &WindowSlot;
    /// Whether the slot holds nothing but its epoch and head (no retained event, key, follower
    /// or write in flight); called with the table's write lock held.
    fn is_idle(&self) -> bool {
        self.window().is_idle()
    }
}

impl OrgSlot for WindowSlot {
    fn window(&self) -> &WindowSlot {
        self
    }
}

impl WindowSlot {
    /// No follower, no reader holding the window, nothing retained.
    pub(super) fn is_idle(&self) -> bool {
        self.head.receiver_count() == 0
            && Arc::strong_count(&self.window) == 1
            && self.window.lock().is_idle()
    }
}

/// The orgs of an embedded log. An org that falls idle (nothing retained, no follower, no
/// idempotency key) leaves memory at the next sweep, and a tombstone keeps its epoch and head,
/// so a client that was caught up still resumes `recovered` when the org comes back. At most
/// `Retention::max_idle_orgs` tombstones are kept, the oldest dropped first (a client resuming
/// a forgotten org gets `reset`, as PROTOCOL.md section 1 allows). An idle org so costs about
/// 100 bytes instead of its window, channel and locks (about 1 KiB), and a forgotten one nothing.
pub(super) struct OrgTable<S> {
    orgs: RwLock<HashMap<OrgId, Arc<S>>>,
    tombstones: Mutex<Tombstones>,
}

#[derive(Default)]
struct Tombstones {
    /// Epoch, head and the generation of the entry in `order`.
    map: HashMap<OrgId, (Epoch, u64, u64)>,
    /// Oldest first; an entry whose generation differs from the map's is stale.
    order: VecDeque<(OrgId, u64)>,
    next: u64,
}

impl Tombstones {
    fn bury(&mut self, org: OrgId, epoch: Epoch, head: u64, cap: usize) {
        self.next += 1;
        self.order.push_back((org.clone(), self.next));
        self.map.insert(org, (epoch, head, self.next));
        while self.map.len() > cap {
            let Some((o, g)) = self.order.pop_front() else {
                break;
            };
            if self.map.get(&o).is_some_and(|(_, _, gen)| *gen == g) {
                self.map.remove(&o);
            }
        }
        // Orgs revived and buried again leave stale entries: compact when they dominate.
        if self.order.len() > 2 * self.map.len() + 1024 {
            let map = &self.map;
            self.order
                .retain(|(o, g)| map.get(o).is_some_and(|(_, _, gen)| gen == g));
        }
    }

    fn revive(&mut self, org: &OrgId) -> Option<(Epoch, u64)> {
        self.map.remove(org).map(|(e, h, _)| (e, h))
    }
}

impl<S: OrgSlot> OrgTable<S> {
    pub(super) fn new(orgs: HashMap<OrgId, Arc<S>>) -> Self {
        OrgTable {
            orgs: RwLock::new(orgs),
            tombstones: Mutex::new(Tombstones::default()),
        }
    }

    /// The org's slot, made on first use: from its tombstone (same epoch and head) or new
    /// (a new epoch).
    pub(super) fn slot(&self, org: &OrgId, make: impl FnOnce(OrgWindow) -> S) -> Arc<S> {
        if let Some(s) = self.orgs.read().get(org) {
            return s.clone();
        }
        let mut orgs = self.orgs.write();
        orgs.entry(org.clone())
            .or_insert_with(|| {
                let window = match self.tombstones.lock().revive(org) {
                    Some((epoch, head)) => {
                        let mut w = OrgWindow::new(org.clone(), epoch);
                        w.restore_head(head);
                        w
                    }
                    None => OrgWindow::new(org.clone(), Epoch::random()),
                };
                Arc::new(make(window))
            })
            .clone()
    }

    /// Moves idle orgs out of memory, keeping at most `cap` tombstones.
    pub(super) fn retire_idle(&self, cap: usize) {
        // Candidates under the read lock; each checked again under the write lock, where no
        // one can take a new handle on a slot.
        let candidates: Vec<OrgId> = self
            .orgs
            .read()
            .iter()
            .filter(|(_, s)| Arc::strong_count(s) == 1 && s.is_idle())
            .map(|(o, _)| o.clone())
            .collect();
        if candidates.is_empty() {
            return;
        }
        let mut orgs = self.orgs.write();
        let mut tombstones = self.tombstones.lock();
        for org in candidates {
            let idle = orgs
                .get(&org)
                .is_some_and(|s| Arc::strong_count(s) == 1 && s.is_idle());
            if idle {
                if let Some(s) = orgs.remove(&org) {
                    let state = s.window().state();
                    tombstones.bury(org, state.epoch, state.head, cap);
                }
            }
        }
    }

    /// Every org this table knows, live or idle, with its epoch and the seq before its oldest
    /// retained event (for the durable log's checkpoint).
    pub(super) fn positions(&self) -> Vec<(OrgId, Epoch, u64)> {
        let mut out: Vec<(OrgId, Epoch, u64)> = self
            .orgs
            .read()
            .iter()
            .map(|(o, s)| {
                let st = s.window().state();
                (o.clone(), st.epoch, st.first - 1)
            })
            .collect();
        out.extend(
            self.tombstones
                .lock()
                .map
                .iter()
                .map(|(o, (e, h, _))| (o.clone(), e.clone(), *h)),
        );
        out
    }

    /// The live slots (a snapshot).
    pub(super) fn slots(&self) -> Vec<(OrgId, Arc<S>)> {
        self.orgs
            .read()
            .iter()
            .map(|(o, s)| (o.clone(), s.clone()))
            .collect()
    }

    /// Live orgs, retained events and bytes, and idle orgs remembered.
    pub(super) fn usage(&self) -> LogUsage {
        let orgs = self.orgs.read();
        let mut u = LogUsage {
            orgs: orgs.len() as u64,
            idle_orgs: self.tombstones.lock().map.len() as u64,
            ..Default::default()
        };
        for s in orgs.values() {
            let w = s.window().window.lock();
            u.events += w.len() as u64;
            u.bytes += w.bytes() as u64;
        }
        u
    }
}

/// The in-memory [`EventLog`].
pub struct MemoryLog {
    orgs: OrgTable<Slot>,
    retention: Retention,
}

impl MemoryLog {
    pub fn new(retention: Retention) -> Self {
        MemoryLog {
            orgs: OrgTable::new(HashMap::new()),
            retention,
        }
    }

    fn slot(&self, org: &OrgId) -> Arc<Slot> {
        self.orgs.slot(org, Slot::new)
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
        self.orgs.usage()
    }

    fn sweep(&self, now_ms: u64) {
        for (_, s) in self.orgs.slots() {
            s.window.lock().evict(now_ms, &self.retention);
        }
        self.orgs.retire_idle(self.retention.max_idle_orgs);
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
    async fn idle_orgs_leave_memory_and_come_back_with_their_epoch_and_head() {
        let log = MemoryLog::new(Retention {
            window_ms: 1000,
            max_idle_orgs: 2,
            ..Retention::default()
        });
        let orgs: Vec<OrgId> = (0..3)
            .map(|i| OrgId::parse(&format!("o{i}")).unwrap())
            .collect();
        let mut states = Vec::new();
        for org in &orgs {
            log.append(org, vec![Bytes::from_static(b"{}"); 2], None)
                .await
                .unwrap();
            states.push(log.state(org).await.unwrap());
        }
        // A follower keeps its org; the others stay while they retain events.
        let tail1 = log.tail(&orgs[1], None).await.unwrap();
        let tail2 = log.tail(&orgs[2], None).await.unwrap();
        log.sweep(unix_ms());
        assert_eq!(log.usage().orgs, 3);
        // Past the window: nothing retained; o0 leaves, o1 and o2 have followers.
        log.sweep(unix_ms() + 5_000);
        let u = log.usage();
        assert_eq!((u.orgs, u.idle_orgs, u.events), (2, 1, 0));
        drop(tail1);
        log.sweep(unix_ms() + 5_000);
        assert_eq!((log.usage().orgs, log.usage().idle_orgs), (1, 2));
        drop(tail2);
        log.sweep(unix_ms() + 5_000);
        // Three idle orgs, two tombstones: the oldest (o0) is forgotten.
        assert_eq!((log.usage().orgs, log.usage().idle_orgs), (0, 2));
        for (i, org) in orgs.iter().enumerate() {
            let st = log.state(org).await.unwrap();
            if i == 0 {
                assert_ne!(
                    st.epoch, states[0].epoch,
                    "a forgotten org gets a new epoch"
                );
                assert_eq!(st.head, 0);
            } else {
                assert_eq!((&st.epoch, st.head), (&states[i].epoch, 2), "{org}");
                assert_eq!(st.first, 3, "nothing retained");
                // A caught-up client resumes.
                let at = Position {
                    epoch: st.epoch.clone(),
                    seq: 2,
                };
                assert_eq!(st.resume(Some(&at)), crate::log::Resume::Recovered);
            }
        }
        // Revived orgs continue their sequence.
        let a = log
            .append(&orgs[1], vec![Bytes::from_static(b"{}")], None)
            .await
            .unwrap();
        assert_eq!((a.epoch, a.first_seq), (states[1].epoch.clone(), 3));
    }

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
