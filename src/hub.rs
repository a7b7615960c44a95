//! The hub (the "pool"): one upstream subscription per org with local subscribers, fanned out
//! to every session's bounded queue, and the per-org cursor that turns live events and log
//! reads into a seamless, in-order, duplicate-free stream.
//!
//! The hub never names a transport: a session hands it a [`Sink`] (a bounded queue and an
//! overflow signal) and gets [`OrgCursor`]s back. It never blocks on a session: a full queue
//! raises the session's [`Overflow`] and the session closes itself (4008).
//!
//! ## Seamless resume
//! A subscription registers its sink with the org's feed *before* it reads the log's head, so
//! every event after that head reaches the queue. The cursor then delivers exactly the seq it
//! expects next: older seqs are duplicates and skipped; a newer seq means a gap (a replay in
//! progress, or events that raced the registration), which it fills by reading the log. If the
//! log cannot continue the position (evicted, new epoch), the cursor emits a RESET.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use futures_util::task::AtomicWaker;
use indexmap::IndexMap;
use parking_lot::Mutex;
use tokio::sync::{watch, Notify};
use tokio::task::AbortHandle;

use crate::event::Event;
use crate::log::{EventLog, LogError, ReadOutcome, Resume, Tailed};
use crate::metrics::Metrics;
use crate::model::{Epoch, OrgId, Position};
use crate::note::PresenceNote;

/// Takes an org's signals (a shared log's side channel: presence batches) as its follower on
/// this node reads them. Installed once with [`Hub::on_signals`].
pub trait SignalHandler: Send + Sync {
    fn signals(&self, org: &OrgId, signals: &[bytes::Bytes]);
}

/// Raised when a session's queue is full: the session must close with 4008.
#[derive(Debug, Default)]
pub struct Overflow {
    raised: AtomicBool,
    notify: Notify,
}

impl Overflow {
    fn raise(&self) {
        if !self.raised.swap(true, Ordering::AcqRel) {
            self.notify.notify_waiters();
        }
    }

    /// Whether the queue overflowed.
    pub fn is_raised(&self) -> bool {
        self.raised.load(Ordering::Acquire)
    }

    /// Resolves once the queue has overflowed.
    pub async fn wait(&self) {
        loop {
            let notified = self.notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.is_raised() {
                return;
            }
            notified.await;
        }
    }
}

/// What a session's queue carries: the org's next events, and presence batches it listens to.
#[derive(Debug, Clone)]
pub enum Live {
    Event(Arc<Event>),
    Presence(Arc<PresenceNote>),
}

/// Where a session receives live events: the hub's end of the session's queue.
///
/// The queue is a locked `VecDeque` and a waker, not a channel: the hub pushes one item per
/// subscriber per event, and tokio's bounded mpsc (a semaphore and a block list per push)
/// was about a fifth of the server's CPU in a 1 -> 1,000 WebSocket fan-out (perf). The session
/// takes everything queued with one lock ([`Queue::try_recv`] swaps the deque out), and the
/// hub wakes it only when the queue goes from empty to not empty.
#[derive(Debug, Clone)]
pub struct Sink {
    shared: Arc<QueueShared>,
}

#[derive(Debug)]
struct QueueShared {
    items: Mutex<VecDeque<Live>>,
    waker: AtomicWaker,
    capacity: usize,
    overflow: Arc<Overflow>,
}

impl Sink {
    /// A queue of `capacity` items: the sink for the hub, the receiver for the session. The
    /// session holds at most `capacity` more in the batch it is working through.
    pub fn bounded(capacity: usize) -> (Sink, Queue, Arc<Overflow>) {
        let overflow = Arc::new(Overflow::default());
        let shared = Arc::new(QueueShared {
            items: Mutex::new(VecDeque::new()),
            waker: AtomicWaker::new(),
            capacity: capacity.max(1),
            overflow: overflow.clone(),
        });
        let queue = Queue {
            shared: shared.clone(),
            local: VecDeque::new(),
        };
        (Sink { shared }, queue, overflow)
    }

    /// Queues `item`, or raises the overflow when the queue is full (the item is dropped: the
    /// session closes with 4008).
    pub fn push(&self, item: Live) {
        let mut items = self.shared.items.lock();
        if items.len() >= self.shared.capacity {
            drop(items);
            self.shared.overflow.raise();
            return;
        }
        let was_empty = items.is_empty();
        items.push_back(item);
        drop(items);
        if was_empty {
            self.shared.waker.wake();
        }
    }

    /// Queues every event of a batch under one lock, with at most one wake; raises the
    /// overflow when they do not all fit (what fits is queued: the session closes with 4008).
    /// The upstream fans a batch out sink by sink with this: one lock per subscriber per
    /// batch, not one per subscriber per event (`Sink::push` per event was 10% of the server's
    /// CPU in a 1 -> 1,000 fan-out of batches of 100).
    fn push_events(&self, events: &[Arc<Event>]) {
        let mut items = self.shared.items.lock();
        let was_empty = items.is_empty();
        let room = self.shared.capacity.saturating_sub(items.len());
        items.extend(events.iter().take(room).cloned().map(Live::Event));
        let woke = was_empty && !items.is_empty();
        drop(items);
        if woke {
            self.shared.waker.wake();
        }
        if events.len() > room {
            self.shared.overflow.raise();
        }
    }
}

/// Nothing queued now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Empty;

/// The session's end of its queue.
#[derive(Debug)]
pub struct Queue {
    shared: Arc<QueueShared>,
    /// The batch taken from the shared deque, being worked through.
    local: VecDeque<Live>,
}

/// A batch's deque is kept for the next one up to this capacity (an idle session keeps none).
const KEEP_BATCH_CAPACITY: usize = 64;

impl Queue {
    /// Items queued and not yet taken.
    pub fn len(&self) -> usize {
        self.local.len() + self.shared.items.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The next item, if one is queued.
    pub fn try_recv(&mut self) -> Result<Live, Empty> {
        if let Some(item) = self.local.pop_front() {
            return Ok(item);
        }
        if self.local.capacity() > KEEP_BATCH_CAPACITY {
            self.local = VecDeque::new();
        }
        std::mem::swap(&mut *self.shared.items.lock(), &mut self.local);
        self.local.pop_front().ok_or(Empty)
    }

    /// Waits for the next item. Cancel-safe: nothing is taken unless it is returned.
    pub async fn recv(&mut self) -> Live {
        std::future::poll_fn(|cx| {
            if let Ok(item) = self.try_recv() {
                return std::task::Poll::Ready(item);
            }
            self.shared.waker.register(cx.waker());
            match self.try_recv() {
                Ok(item) => std::task::Poll::Ready(item),
                Err(Empty) => std::task::Poll::Pending,
            }
        })
        .await
    }
}

/// One org's upstream subscription on this node.
struct Feed {
    org: OrgId,
    /// The latest seq seen upstream (for heartbeats).
    head: AtomicU64,
    /// Sinks that receive the org's events (`None`: a [`Watch`], which only keeps the org
    /// followed), by their [`Registration`]'s id. Leaving is a `swap_remove`, O(1) however
    /// many subscribe (a `retain` over a list made 10,000 subscribers leaving one org 5 * 10^7
    /// steps, under the hub's lock), and the fan-out walks only the live entries (a slab would
    /// keep walking an org's peak: 100,000 slots per batch for the 10 left).
    subscribers: Mutex<IndexMap<u64, Option<Sink>>>,
    task: Mutex<Option<AbortHandle>>,
    /// True once the upstream follows the log. Subscribers wait for it before reading the
    /// head, so the follower's start is never after a head a subscriber relies on.
    following: watch::Sender<bool>,
}

struct HubInner {
    log: Arc<dyn EventLog>,
    feeds: Mutex<HashMap<OrgId, Arc<Feed>>>,
    next_id: AtomicU64,
    metrics: Arc<Metrics>,
    signals: std::sync::OnceLock<Weak<dyn SignalHandler>>,
}

/// The pool of upstream subscriptions. Cheap to clone.
#[derive(Clone)]
pub struct Hub {
    inner: Arc<HubInner>,
}

/// What SUBSCRIBED reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Subscribed {
    pub org: OrgId,
    pub epoch: Epoch,
    pub head: u64,
    pub resume: Resume,
}

/// How long a subscribe waits for the org's upstream to start following the log.
const FOLLOW_TIMEOUT: Duration = Duration::from_secs(10);

/// Events read from the log per catch-up step.
pub const CATCH_UP_BATCH: usize = 1024;

impl Hub {
    pub fn new(log: Arc<dyn EventLog>, metrics: Arc<Metrics>) -> Self {
        Hub {
            inner: Arc::new(HubInner {
                log,
                feeds: Mutex::new(HashMap::new()),
                next_id: AtomicU64::new(1),
                metrics,
                signals: std::sync::OnceLock::new(),
            }),
        }
    }

    pub fn log(&self) -> &Arc<dyn EventLog> {
        &self.inner.log
    }

    /// Appends to the log ([`EventLog::append`]), timed for the metrics.
    pub async fn append(
        &self,
        org: &OrgId,
        payloads: Vec<bytes::Bytes>,
        idempotency_key: Option<&str>,
    ) -> Result<crate::log::Appended, LogError> {
        let started = std::time::Instant::now();
        let result = self.inner.log.append(org, payloads, idempotency_key).await;
        self.inner
            .metrics
            .observe_append(self.inner.log.kind(), started.elapsed());
        result
    }

    /// Upstream subscriptions held (one per org with subscribers on this node).
    pub fn orgs_subscribed(&self) -> usize {
        self.inner.feeds.lock().len()
    }

    /// Subscribes a session's sink to an org, resuming after `since` when the log allows.
    pub async fn subscribe(
        &self,
        org: &OrgId,
        since: Option<&Position>,
        sink: &Sink,
    ) -> Result<(OrgCursor, Subscribed), LogError> {
        // Register first, and wait until the org's upstream follows the log: then every event
        // after the head read below reaches the sink.
        let registration = self.register(org, Some(sink));
        let mut following = registration.feed.following.subscribe();
        match tokio::time::timeout(FOLLOW_TIMEOUT, following.wait_for(|f| *f)).await {
            Ok(Ok(_)) => {}
            _ => return Err(LogError::Unavailable("cannot follow the org's log".into())),
        }
        let state = self.inner.log.state(org).await?;
        let resume = state.resume(since);
        let (next, catching_up) = match (resume, since) {
            (Resume::Recovered, Some(p)) => (p.seq + 1, p.seq < state.head),
            _ => (state.head + 1, false),
        };
        let cursor = OrgCursor {
            org: org.clone(),
            epoch: state.epoch.clone(),
            next,
            catching_up,
            log: self.inner.log.clone(),
            registration,
        };
        let subscribed = Subscribed {
            org: org.clone(),
            epoch: state.epoch,
            head: state.head,
            resume,
        };
        Ok((cursor, subscribed))
    }

    /// Where the orgs' signals go (set once, by presence on a shared log).
    pub fn on_signals(&self, handler: Weak<dyn SignalHandler>) {
        let _ = self.inner.signals.set(handler);
    }

    /// Keeps `org` followed on this node (so that its signals arrive) while the watch lives,
    /// without receiving its events.
    pub async fn watch(&self, org: &OrgId) -> Result<Watch, LogError> {
        let registration = self.register(org, None);
        let mut following = registration.feed.following.subscribe();
        let followed = matches!(
            tokio::time::timeout(FOLLOW_TIMEOUT, following.wait_for(|f| *f)).await,
            Ok(Ok(_))
        );
        if !followed {
            return Err(LogError::Unavailable("cannot follow the org's log".into()));
        }
        Ok(Watch(registration))
    }

    fn register(&self, org: &OrgId, sink: Option<&Sink>) -> Registration {
        let id = self.inner.next_id.fetch_add(1, Ordering::Relaxed);
        let mut feeds = self.inner.feeds.lock();
        let feed = match feeds.get(org) {
            Some(f) => f.clone(),
            None => {
                let feed = Arc::new(Feed {
                    org: org.clone(),
                    head: AtomicU64::new(0),
                    subscribers: Mutex::new(IndexMap::new()),
                    task: Mutex::new(None),
                    following: watch::channel(false).0,
                });
                let task = tokio::spawn(upstream(
                    self.inner.log.clone(),
                    Arc::downgrade(&feed),
                    self.inner.signals.get().cloned(),
                ));
                *feed.task.lock() = Some(task.abort_handle());
                feeds.insert(org.clone(), feed.clone());
                self.inner.metrics.orgs_subscribed.set(feeds.len() as u64);
                feed
            }
        };
        feed.subscribers.lock().insert(id, sink.cloned());
        Registration {
            hub: Arc::downgrade(&self.inner),
            feed,
            id,
        }
    }
}

/// Keeps an org followed on this node ([`Hub::watch`]).
pub struct Watch(#[allow(dead_code)] Registration);

/// A sink's place in a feed; dropping it unsubscribes, and the last one out releases the
/// org's upstream subscription.
struct Registration {
    hub: Weak<HubInner>,
    feed: Arc<Feed>,
    /// Its key in the feed's subscribers.
    id: u64,
}

impl Drop for Registration {
    fn drop(&mut self) {
        let Some(hub) = self.hub.upgrade() else {
            return;
        };
        let mut feeds = hub.feeds.lock();
        let empty = {
            let mut subs = self.feed.subscribers.lock();
            subs.swap_remove(&self.id);
            subs.is_empty()
        };
        if empty
            && feeds
                .get(&self.feed.org)
                .is_some_and(|f| Arc::ptr_eq(f, &self.feed))
        {
            feeds.remove(&self.feed.org);
            if let Some(task) = self.feed.task.lock().take() {
                task.abort();
            }
            hub.metrics.orgs_subscribed.set(feeds.len() as u64);
        }
    }
}

/// The upstream subscription of one org: follows the log and pushes each event to every sink.
async fn upstream(
    log: Arc<dyn EventLog>,
    feed: Weak<Feed>,
    handler: Option<Weak<dyn SignalHandler>>,
) {
    let mut backoff = Duration::from_millis(100);
    let Some(org) = feed.upgrade().map(|f| f.org.clone()) else {
        return;
    };
    // Where the follower is; kept across restarts so an error skips nothing.
    let mut position: Option<Position> = None;
    'restart: loop {
        let mut tail = match log.tail(&org, position.clone()).await {
            Ok(t) => {
                let Some(f) = feed.upgrade() else { return };
                f.head.store(t.position().seq, Ordering::Release);
                f.following.send_replace(true);
                t
            }
            Err(e) => {
                tracing::warn!(org = %org, error = %e, "cannot follow org log; retrying");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(5));
                continue;
            }
        };
        loop {
            let Tailed { events, signals } = match tail.next().await {
                Ok(t) => t,
                Err(e) => {
                    position = Some(tail.position());
                    tracing::warn!(org = %org, error = %e, "org log follow failed; retrying");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                    continue 'restart;
                }
            };
            backoff = Duration::from_millis(100);
            let Some(feed) = feed.upgrade() else { return };
            if let Some(last) = events.last() {
                feed.head.store(last.seq, Ordering::Release);
            }
            {
                let subs = feed.subscribers.lock();
                for sink in subs.values().filter_map(Option::as_ref) {
                    sink.push_events(&events);
                }
            }
            if !signals.is_empty() {
                if let Some(h) = handler.as_ref().and_then(Weak::upgrade) {
                    h.signals(&org, &signals);
                }
            }
        }
    }
}

/// What a cursor asks its session to send.
#[derive(Debug, Clone)]
pub enum Delivery {
    Event(Arc<Event>),
    /// Continuity was lost: RESET with the new epoch and head.
    Reset {
        epoch: Epoch,
        head: u64,
    },
}

/// One org of one session: where it is, and how to continue in order.
pub struct OrgCursor {
    org: OrgId,
    epoch: Epoch,
    /// The seq to deliver next.
    next: u64,
    catching_up: bool,
    log: Arc<dyn EventLog>,
    registration: Registration,
}

impl OrgCursor {
    pub fn org(&self) -> &OrgId {
        &self.org
    }

    /// The org's head as far as this node knows (for heartbeats).
    pub fn head(&self) -> u64 {
        self.registration
            .feed
            .head
            .load(Ordering::Acquire)
            .max(self.next - 1)
    }

    /// The last position delivered.
    pub fn position(&self) -> Position {
        Position {
            epoch: self.epoch.clone(),
            seq: self.next - 1,
        }
    }

    /// Whether the cursor must read the log before it can deliver live events.
    pub fn needs_catch_up(&self) -> bool {
        self.catching_up
    }

    /// Handles a live event of this org from the session's queue.
    pub fn on_live(&mut self, event: Arc<Event>, out: &mut Vec<Delivery>) {
        if self.catching_up {
            return; // the log read will return it
        }
        if event.epoch != self.epoch || event.seq > self.next {
            self.catching_up = true; // a gap or a new epoch: the log decides
        } else if event.seq == self.next {
            self.next += 1;
            out.push(Delivery::Event(event));
        }
        // event.seq < next: already delivered.
    }

    /// Reads the next events from the log (at most `limit`) and applies them
    /// ([`OrgCursor::apply_read`]).
    pub async fn catch_up(
        &mut self,
        limit: usize,
        out: &mut Vec<Delivery>,
    ) -> Result<(), LogError> {
        let outcome = self.log.read(&self.org, &self.position(), limit).await?;
        self.apply_read(outcome, out);
        Ok(())
    }

    /// Applies a log read made after [`OrgCursor::position`] (by whoever does the I/O: a
    /// session core asks for the read and its driver makes it). Ends the catch-up once the head
    /// seen by the read is reached; a position the log cannot continue becomes a RESET. A read
    /// that no longer starts at the cursor's position (events arrived meanwhile) is applied
    /// from where it continues the cursor, its older events skipped.
    pub fn apply_read(&mut self, outcome: ReadOutcome, out: &mut Vec<Delivery>) {
        match outcome {
            ReadOutcome::Events { state, events } => {
                for e in events {
                    if e.epoch == self.epoch && e.seq < self.next {
                        continue;
                    }
                    self.next = e.seq + 1;
                    out.push(Delivery::Event(e));
                }
                if self.next > state.head {
                    self.catching_up = false;
                }
            }
            ReadOutcome::Unusable { state } => {
                self.epoch = state.epoch.clone();
                self.next = state.head + 1;
                self.catching_up = false;
                out.push(Delivery::Reset {
                    epoch: state.epoch,
                    head: state.head,
                });
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::log::memory::MemoryLog;
    use crate::log::{Appended, LogUsage, OrgState, Retention, Tail};
    use async_trait::async_trait;
    use bytes::Bytes;

    /// A log whose followers start late, as a busy runtime may start the upstream task.
    struct SlowTail(MemoryLog);

    #[async_trait]
    impl EventLog for SlowTail {
        async fn append(
            &self,
            org: &OrgId,
            p: Vec<Bytes>,
            k: Option<&str>,
        ) -> Result<Appended, LogError> {
            self.0.append(org, p, k).await
        }
        async fn state(&self, org: &OrgId) -> Result<OrgState, LogError> {
            self.0.state(org).await
        }
        async fn read(
            &self,
            org: &OrgId,
            after: &Position,
            limit: usize,
        ) -> Result<ReadOutcome, LogError> {
            self.0.read(org, after, limit).await
        }
        async fn tail(
            &self,
            org: &OrgId,
            after: Option<Position>,
        ) -> Result<Box<dyn Tail>, LogError> {
            tokio::time::sleep(Duration::from_millis(200)).await;
            self.0.tail(org, after).await
        }
        fn kind(&self) -> &'static str {
            "slow-tail"
        }
        fn usage(&self) -> LogUsage {
            self.0.usage()
        }
    }

    async fn next_delivery(cursor: &mut OrgCursor, rx: &mut Queue) -> Vec<Delivery> {
        let mut out = Vec::new();
        while out.is_empty() {
            if cursor.needs_catch_up() {
                cursor.catch_up(CATCH_UP_BATCH, &mut out).await.unwrap();
                continue;
            }
            let item = tokio::time::timeout(Duration::from_secs(5), rx.recv())
                .await
                .expect("the event published after subscribing is delivered");
            if let Live::Event(e) = item {
                cursor.on_live(e, &mut out);
            }
        }
        out
    }

    #[tokio::test]
    async fn an_event_published_right_after_subscribe_is_delivered_even_if_the_follower_starts_late(
    ) {
        let log = Arc::new(SlowTail(MemoryLog::new(Retention::default())));
        let hub = Hub::new(log.clone(), Arc::new(Metrics::default()));
        let org = OrgId::parse("acme").unwrap();
        log.append(&org, vec![Bytes::from_static(b"{}")], None)
            .await
            .unwrap();
        let (sink, mut rx, _) = Sink::bounded(16);
        let (mut cursor, sub) = hub.subscribe(&org, None, &sink).await.unwrap();
        assert_eq!((sub.head, sub.resume), (1, Resume::New));
        log.append(&org, vec![Bytes::from_static(b"{\"n\":2}")], None)
            .await
            .unwrap();
        let d = next_delivery(&mut cursor, &mut rx).await;
        assert!(
            matches!(&d[..], [Delivery::Event(e)] if e.seq == 2),
            "{d:?}"
        );
        assert_eq!(hub.orgs_subscribed(), 1);
        drop(cursor);
        assert_eq!(
            hub.orgs_subscribed(),
            0,
            "the last subscriber out releases the feed"
        );
    }

    #[test]
    fn a_batch_is_queued_in_order_and_overflows_only_past_capacity() {
        let org = OrgId::parse("acme").unwrap();
        let epoch = Epoch::parse("e1").unwrap();
        let batch = |from: u64, n: u64| -> Vec<Arc<Event>> {
            (from..from + n)
                .map(|seq| Event::new(org.clone(), epoch.clone(), seq, 0, Bytes::from("{}")))
                .collect()
        };
        let (sink, mut rx, overflow) = Sink::bounded(5);
        sink.push_events(&batch(1, 3));
        sink.push_events(&batch(4, 2));
        assert!(!overflow.is_raised(), "5 events fit a queue of 5");
        let seqs = |rx: &mut Queue| {
            std::iter::from_fn(|| rx.try_recv().ok())
                .map(|l| match l {
                    Live::Event(e) => e.seq,
                    Live::Presence(_) => 0,
                })
                .collect::<Vec<_>>()
        };
        assert_eq!(seqs(&mut rx), [1, 2, 3, 4, 5]);
        sink.push_events(&batch(6, 4));
        sink.push_events(&batch(10, 3));
        assert!(overflow.is_raised(), "7 events do not fit a queue of 5");
        assert_eq!(
            seqs(&mut rx),
            [6, 7, 8, 9, 10],
            "what fits is queued, in order"
        );
    }

    #[tokio::test]
    async fn subscribers_leave_in_any_order_and_the_others_keep_receiving() {
        let log = Arc::new(MemoryLog::new(Retention::default()));
        let hub = Hub::new(log.clone(), Arc::new(Metrics::default()));
        let org = OrgId::parse("acme").unwrap();
        let mut subs = Vec::new();
        for _ in 0..300 {
            let (sink, rx, _) = Sink::bounded(16);
            let (cursor, _) = hub.subscribe(&org, None, &sink).await.unwrap();
            subs.push(Some((cursor, rx)));
        }
        // Every third, then every other one leaves (entries move as others are removed).
        for i in (0..300).step_by(3).chain((1..300).step_by(2)) {
            subs[i] = None;
        }
        let (sink, rx, _) = Sink::bounded(16);
        let (cursor, _) = hub.subscribe(&org, None, &sink).await.unwrap();
        subs.push(Some((cursor, rx)));
        let stayed = subs.iter().filter(|s| s.is_some()).count();
        assert_eq!(stayed, 101);
        log.append(&org, vec![Bytes::from_static(b"{}")], None)
            .await
            .unwrap();
        for (cursor, rx) in subs.iter_mut().flatten() {
            let d = next_delivery(cursor, rx).await;
            assert!(
                matches!(&d[..], [Delivery::Event(e)] if e.seq == 1),
                "{d:?}"
            );
        }
        assert_eq!(hub.orgs_subscribed(), 1);
        subs.clear();
        assert_eq!(
            hub.orgs_subscribed(),
            0,
            "the last one out releases the feed"
        );
    }

    #[tokio::test]
    async fn cursor_dedupes_fills_gaps_and_resets() {
        let log = Arc::new(MemoryLog::new(Retention {
            max_events: 5,
            ..Retention::default()
        }));
        let hub = Hub::new(log.clone(), Arc::new(Metrics::default()));
        let org = OrgId::parse("acme").unwrap();
        let payloads = |n| vec![Bytes::from_static(b"{}"); n];
        let a = log.append(&org, payloads(3), None).await.unwrap();
        let (sink, _rx, _) = Sink::bounded(16);
        let since = Position {
            epoch: a.epoch.clone(),
            seq: 1,
        };
        let (mut cursor, sub) = hub.subscribe(&org, Some(&since), &sink).await.unwrap();
        assert_eq!(sub.resume, Resume::Recovered);
        let mut out = Vec::new();
        cursor.catch_up(CATCH_UP_BATCH, &mut out).await.unwrap();
        let seqs = |out: &[Delivery]| {
            out.iter()
                .map(|d| match d {
                    Delivery::Event(e) => e.seq,
                    Delivery::Reset { .. } => 0,
                })
                .collect::<Vec<_>>()
        };
        assert_eq!(seqs(&out), [2, 3]);
        assert!(!cursor.needs_catch_up());
        // A live duplicate is dropped; a live event past a gap switches to catch-up.
        let evs = log.read(&org, &since, 10).await.unwrap();
        let ReadOutcome::Events { events, .. } = evs else {
            panic!()
        };
        out.clear();
        cursor.on_live(events[0].clone(), &mut out);
        assert!(out.is_empty());
        log.append(&org, payloads(2), None).await.unwrap(); // 4, 5
        let ReadOutcome::Events { events, .. } = log
            .read(
                &org,
                &Position {
                    epoch: a.epoch.clone(),
                    seq: 4,
                },
                1,
            )
            .await
            .unwrap()
        else {
            panic!()
        };
        cursor.on_live(events[0].clone(), &mut out); // seq 5: 4 is missing
        assert!(out.is_empty() && cursor.needs_catch_up());
        cursor.catch_up(CATCH_UP_BATCH, &mut out).await.unwrap();
        assert_eq!(seqs(&out), [4, 5]);
        // Fall out of the window: the catch-up becomes a RESET at the head.
        log.append(&org, payloads(1), None).await.unwrap(); // 6
        let ReadOutcome::Events { events, .. } = log
            .read(
                &org,
                &Position {
                    epoch: a.epoch.clone(),
                    seq: 5,
                },
                1,
            )
            .await
            .unwrap()
        else {
            panic!()
        };
        log.append(&org, payloads(10), None).await.unwrap(); // 7..=16, keeps 12..=16
        out.clear();
        let mut later = events[0].clone();
        later = Event::new(
            later.org.clone(),
            later.epoch.clone(),
            16,
            later.ts,
            later.payload.clone(),
        );
        cursor.on_live(later, &mut out);
        cursor.catch_up(CATCH_UP_BATCH, &mut out).await.unwrap();
        assert!(
            matches!(&out[..], [Delivery::Reset { head: 16, .. }]),
            "{out:?}"
        );
    }
}
