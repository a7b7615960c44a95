//! One org's replay window and sequencer, as pure code: no locks, no tasks, no clock (the
//! caller passes `now_ms`). [`super::memory::MemoryLog`] wraps it in a lock.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

use bytes::Bytes;

use crate::event::Event;
use crate::model::{Epoch, OrgId, Position};

use super::{Appended, OrgState};

pub use edgestream_codec::Resume;

/// How much of each org's history is kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Retention {
    /// Events younger than this are kept (unless a cap below evicts them first).
    pub window_ms: u64,
    /// At most this many events per org.
    pub max_events: usize,
    /// At most this many bytes of events per org.
    pub max_bytes: usize,
    /// Embedded logs: idle orgs (nothing retained, no follower, no idempotency key) leave
    /// memory and keep only their epoch and head, for at most this many orgs (the oldest are
    /// forgotten first; a client resuming one of those gets `reset`).
    pub max_idle_orgs: usize,
}

impl Default for Retention {
    fn default() -> Self {
        Retention {
            window_ms: 5 * 60 * 1000,
            max_events: 100_000,
            max_bytes: 64 << 20,
            max_idle_orgs: 100_000,
        }
    }
}

/// The resume rule of PROTOCOL.md section 2: `since` continues only if it names this epoch,
/// is not ahead of the head and its next event is still retained.
pub fn resume(epoch: &Epoch, head: u64, first: u64, since: Option<&Position>) -> Resume {
    match since {
        None => Resume::New,
        Some(p) if p.epoch == *epoch && p.seq <= head && p.seq + 1 >= first => Resume::Recovered,
        Some(_) => Resume::Reset,
    }
}

/// One org's sequencer and retained events.
#[derive(Debug)]
pub struct OrgWindow {
    org: OrgId,
    epoch: Epoch,
    head: u64,
    /// Contiguous: `events[i].seq == first + i`.
    events: VecDeque<Arc<Event>>,
    bytes: usize,
    idempotency: IdempotencyTable,
}

impl OrgWindow {
    pub fn new(org: OrgId, epoch: Epoch) -> Self {
        OrgWindow {
            org,
            epoch,
            head: 0,
            events: VecDeque::new(),
            bytes: 0,
            idempotency: IdempotencyTable::default(),
        }
    }

    pub fn state(&self) -> OrgState {
        OrgState {
            epoch: self.epoch.clone(),
            head: self.head,
            first: self.first(),
        }
    }

    /// The oldest retained seq, or `head + 1` when nothing is retained.
    pub fn first(&self) -> u64 {
        self.events.front().map_or(self.head + 1, |e| e.seq)
    }

    /// Appends a batch with consecutive seqs, then applies retention. Returns the new events
    /// (empty for an idempotent repeat).
    pub fn append(
        &mut self,
        payloads: Vec<Bytes>,
        key: Option<&str>,
        now_ms: u64,
        retention: &Retention,
    ) -> (Appended, Vec<Arc<Event>>) {
        self.evict(now_ms, retention);
        if let Some(prev) = key.and_then(|k| self.idempotency.get(k)) {
            return (
                Appended {
                    duplicate: true,
                    ..prev.clone()
                },
                Vec::new(),
            );
        }
        let first_seq = self.head + 1;
        let mut added = Vec::with_capacity(payloads.len());
        for payload in payloads {
            self.head += 1;
            let e = Event::new(
                self.org.clone(),
                self.epoch.clone(),
                self.head,
                now_ms,
                payload,
            );
            self.bytes += e.size();
            self.events.push_back(e.clone());
            added.push(e);
        }
        let result = Appended {
            epoch: self.epoch.clone(),
            first_seq,
            last_seq: self.head,
            duplicate: false,
        };
        if let Some(k) = key {
            self.idempotency
                .insert(k, result.clone(), now_ms, retention.max_events.max(1024));
        }
        self.evict(now_ms, retention);
        (result, added)
    }

    pub fn epoch(&self) -> &Epoch {
        &self.epoch
    }

    /// The first result recorded for an idempotency key, if it is still remembered.
    pub fn seen_key(&self, key: &str) -> Option<&Appended> {
        self.idempotency.get(key)
    }

    /// Adds events that already have their seqs (the next ones: `head + 1`, ...), remembering
    /// `key` with its result, then applies retention.
    pub fn commit(
        &mut self,
        events: Vec<Arc<Event>>,
        key: Option<(&str, &Appended)>,
        now_ms: u64,
        retention: &Retention,
    ) {
        for e in events {
            debug_assert_eq!(e.seq, self.head + 1, "commits are contiguous");
            self.head = e.seq;
            self.bytes += e.size();
            self.events.push_back(e);
        }
        if let Some((k, result)) = key {
            self.remember(k, result.clone(), now_ms, retention);
        }
        self.evict(now_ms, retention);
    }

    /// Remembers an idempotency key's first result (as of `ts_ms`).
    pub fn remember(&mut self, key: &str, result: Appended, ts_ms: u64, retention: &Retention) {
        self.idempotency
            .insert(key, result, ts_ms, retention.max_events.max(1024));
    }

    /// Sets the head of a window restored from a checkpoint (its events are gone).
    pub fn restore_head(&mut self, head: u64) {
        debug_assert!(self.events.is_empty());
        self.head = head;
    }

    /// Starts over in `epoch` with nothing retained and head 0 (a recovered org whose history
    /// could not be trusted).
    pub fn reset(&mut self, epoch: Epoch) {
        *self = OrgWindow::new(self.org.clone(), epoch);
    }

    /// Drops events older than the window, then the oldest beyond the count and byte caps.
    pub fn evict(&mut self, now_ms: u64, retention: &Retention) {
        let cutoff = now_ms.saturating_sub(retention.window_ms);
        while let Some(front) = self.events.front() {
            let over = self.events.len() > retention.max_events || self.bytes > retention.max_bytes;
            if !(over || front.ts < cutoff) {
                break;
            }
            self.bytes -= front.size();
            self.events.pop_front();
        }
        self.idempotency.expire(cutoff);
    }

    /// At most `limit` events after `after`, or `None` when `after` cannot be continued.
    pub fn read_after(&self, after: &Position, limit: usize) -> Option<Vec<Arc<Event>>> {
        if resume(&self.epoch, self.head, self.first(), Some(after)) != Resume::Recovered {
            return None;
        }
        let start = (after.seq + 1 - self.first()) as usize;
        Some(self.events.range(start..).take(limit).cloned().collect())
    }

    /// Events retained, for metrics.
    pub fn len(&self) -> usize {
        self.events.len()
    }

    pub fn is_empty(&self) -> bool {
        self.events.is_empty()
    }

    /// Nothing retained and no idempotency key to remember: only the epoch and head matter.
    pub fn is_idle(&self) -> bool {
        self.events.is_empty() && self.idempotency.map.is_empty()
    }

    pub fn bytes(&self) -> usize {
        self.bytes
    }
}

/// Idempotency keys of one org, expired with the replay window and capped in count.
#[derive(Debug, Default)]
struct IdempotencyTable {
    map: HashMap<String, Appended>,
    order: VecDeque<(u64, String)>,
}

impl IdempotencyTable {
    fn get(&self, key: &str) -> Option<&Appended> {
        self.map.get(key)
    }

    fn insert(&mut self, key: &str, result: Appended, now_ms: u64, cap: usize) {
        self.map.insert(key.to_owned(), result);
        self.order.push_back((now_ms, key.to_owned()));
        while self.order.len() > cap {
            if let Some((_, k)) = self.order.pop_front() {
                self.map.remove(&k);
            }
        }
    }

    fn expire(&mut self, cutoff_ms: u64) {
        while self.order.front().is_some_and(|(ts, _)| *ts < cutoff_ms) {
            if let Some((_, k)) = self.order.pop_front() {
                self.map.remove(&k);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn window() -> OrgWindow {
        OrgWindow::new(OrgId::parse("acme").unwrap(), Epoch::parse("ep1").unwrap())
    }

    fn payloads(n: usize) -> Vec<Bytes> {
        (0..n)
            .map(|i| Bytes::from(format!(r#"{{"i":{i}}}"#)))
            .collect()
    }

    fn pos(epoch: &str, seq: u64) -> Position {
        Position {
            epoch: Epoch::parse(epoch).unwrap(),
            seq,
        }
    }

    const KEEP_ALL: Retention = Retention {
        window_ms: u64::MAX,
        max_events: usize::MAX,
        max_bytes: usize::MAX,
        max_idle_orgs: usize::MAX,
    };

    #[test]
    fn seqs_are_gap_free_and_batches_contiguous() {
        let mut w = window();
        let (a, _) = w.append(payloads(1), None, 10, &KEEP_ALL);
        let (b, ev) = w.append(payloads(3), None, 11, &KEEP_ALL);
        assert_eq!((a.first_seq, a.last_seq), (1, 1));
        assert_eq!((b.first_seq, b.last_seq), (2, 4));
        assert_eq!(ev.iter().map(|e| e.seq).collect::<Vec<_>>(), [2, 3, 4]);
        assert_eq!(
            w.state(),
            OrgState {
                epoch: Epoch::parse("ep1").unwrap(),
                head: 4,
                first: 1
            }
        );
    }

    #[test]
    fn idempotency_key_appends_once_within_window() {
        let mut w = window();
        let r = Retention {
            window_ms: 100,
            ..KEEP_ALL
        };
        let (a, _) = w.append(payloads(2), Some("k"), 1000, &r);
        let (b, ev) = w.append(payloads(2), Some("k"), 1050, &r);
        assert!(b.duplicate && ev.is_empty());
        assert_eq!((b.first_seq, b.last_seq), (a.first_seq, a.last_seq));
        // After the window the key is forgotten.
        let (c, _) = w.append(payloads(1), Some("k"), 1200, &r);
        assert!(!c.duplicate);
        assert_eq!(c.first_seq, 3);
    }

    #[test]
    fn retention_by_time_count_and_bytes() {
        let mut w = window();
        let r = Retention {
            window_ms: 1000,
            max_events: 5,
            ..KEEP_ALL
        };
        for t in 0..10 {
            w.append(payloads(1), None, t, &r);
        }
        assert_eq!((w.len(), w.first()), (5, 6), "count cap");
        w.evict(1000 + 7, &r);
        assert_eq!(
            (w.len(), w.first()),
            (3, 8),
            "events before ts 7 are past the window"
        );
        w.evict(10_000, &r);
        assert_eq!((w.len(), w.first(), w.state().head), (0, 11, 10));

        let mut w = window();
        let one = Event::new(
            OrgId::parse("a").unwrap(),
            Epoch::parse("e").unwrap(),
            1,
            0,
            payloads(1)[0].clone(),
        )
        .size();
        let r = Retention {
            max_bytes: one * 3,
            ..KEEP_ALL
        };
        w.append(payloads(10), None, 0, &r);
        assert_eq!((w.len(), w.bytes()), (3, one * 3), "byte cap");
    }

    #[test]
    fn resume_rules() {
        let mut w = window();
        let r = Retention {
            max_events: 5,
            ..KEEP_ALL
        };
        w.append(payloads(10), None, 0, &r); // retained: 6..=10
        let s = w.state();
        assert_eq!(s.resume(None), Resume::New);
        assert_eq!(
            s.resume(Some(&pos("ep1", 10))),
            Resume::Recovered,
            "at head"
        );
        assert_eq!(
            s.resume(Some(&pos("ep1", 5))),
            Resume::Recovered,
            "next one retained"
        );
        assert_eq!(s.resume(Some(&pos("ep1", 4))), Resume::Reset, "evicted");
        assert_eq!(
            s.resume(Some(&pos("ep1", 11))),
            Resume::Reset,
            "ahead of head"
        );
        assert_eq!(
            s.resume(Some(&pos("other", 7))),
            Resume::Reset,
            "foreign epoch"
        );
        assert_eq!(
            w.read_after(&pos("ep1", 7), 2)
                .unwrap()
                .iter()
                .map(|e| e.seq)
                .collect::<Vec<_>>(),
            [8, 9]
        );
        assert!(w.read_after(&pos("ep1", 10), 5).unwrap().is_empty());
        assert!(w.read_after(&pos("ep1", 4), 5).is_none());
        let fresh = window();
        assert_eq!(
            fresh.state().resume(Some(&pos("ep1", 0))),
            Resume::Recovered
        );
    }

    proptest! {
        /// Whatever the appends and evictions, the window stays contiguous, within its caps, and
        /// a read after any recoverable position returns exactly the following seqs.
        #[test]
        fn window_arithmetic(ops in proptest::collection::vec((1usize..20, 0u64..50), 1..40),
                             max_events in 1usize..60, window_ms in 1u64..200, probe in 0u64..400) {
            let mut w = window();
            let r = Retention { window_ms, max_events, max_bytes: usize::MAX, max_idle_orgs: usize::MAX };
            let mut now = 0;
            for (n, dt) in ops {
                now += dt;
                w.append(payloads(n), None, now, &r);
                prop_assert!(w.len() <= max_events);
                let s = w.state();
                let seqs: Vec<u64> = w.events.iter().map(|e| e.seq).collect();
                prop_assert!(seqs.windows(2).all(|p| p[1] == p[0] + 1));
                prop_assert_eq!(s.first + w.len() as u64, s.head + 1);
                prop_assert!(w.events.iter().all(|e| e.ts + window_ms >= now));
            }
            let s = w.state();
            let p = pos("ep1", probe);
            match w.read_after(&p, usize::MAX) {
                Some(evs) => {
                    prop_assert_eq!(s.resume(Some(&p)), Resume::Recovered);
                    let want: Vec<u64> = (probe + 1..=s.head).collect();
                    prop_assert_eq!(evs.iter().map(|e| e.seq).collect::<Vec<_>>(), want);
                }
                None => prop_assert_eq!(s.resume(Some(&p)), Resume::Reset),
            }
        }
    }
}
