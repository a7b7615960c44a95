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

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use parking_lot::Mutex;
use tokio::sync::{mpsc, Notify};
use tokio::task::AbortHandle;

use crate::event::Event;
use crate::log::{EventLog, LogError, ReadOutcome, Resume};
use crate::metrics::Metrics;
use crate::model::{Epoch, OrgId, Position};

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

/// Where a session receives live events.
#[derive(Debug, Clone)]
pub struct Sink {
    tx: mpsc::Sender<Arc<Event>>,
    overflow: Arc<Overflow>,
}

impl Sink {
    /// A bounded queue of `capacity` events: the sink for the hub, the receiver for the session.
    pub fn bounded(capacity: usize) -> (Sink, mpsc::Receiver<Arc<Event>>, Arc<Overflow>) {
        let (tx, rx) = mpsc::channel(capacity.max(1));
        let overflow = Arc::new(Overflow::default());
        (
            Sink {
                tx,
                overflow: overflow.clone(),
            },
            rx,
            overflow,
        )
    }

    fn push(&self, event: &Arc<Event>) {
        if let Err(mpsc::error::TrySendError::Full(_)) = self.tx.try_send(event.clone()) {
            self.overflow.raise();
        }
    }
}

/// One org's upstream subscription on this node.
struct Feed {
    org: OrgId,
    /// The latest seq seen upstream (for heartbeats).
    head: AtomicU64,
    subscribers: Mutex<Vec<(u64, Sink)>>,
    task: Mutex<Option<AbortHandle>>,
}

struct HubInner {
    log: Arc<dyn EventLog>,
    feeds: Mutex<HashMap<OrgId, Arc<Feed>>>,
    next_id: AtomicU64,
    metrics: Arc<Metrics>,
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
            }),
        }
    }

    pub fn log(&self) -> &Arc<dyn EventLog> {
        &self.inner.log
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
        // Register first: every event after the head read below reaches the sink.
        let registration = self.register(org, sink);
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

    fn register(&self, org: &OrgId, sink: &Sink) -> Registration {
        let id = self.inner.next_id.fetch_add(1, Ordering::Relaxed);
        let mut feeds = self.inner.feeds.lock();
        let feed = match feeds.get(org) {
            Some(f) => f.clone(),
            None => {
                let feed = Arc::new(Feed {
                    org: org.clone(),
                    head: AtomicU64::new(0),
                    subscribers: Mutex::new(Vec::new()),
                    task: Mutex::new(None),
                });
                let task = tokio::spawn(upstream(self.inner.log.clone(), Arc::downgrade(&feed)));
                *feed.task.lock() = Some(task.abort_handle());
                feeds.insert(org.clone(), feed.clone());
                self.inner.metrics.orgs_subscribed.set(feeds.len() as u64);
                feed
            }
        };
        feed.subscribers.lock().push((id, sink.clone()));
        Registration {
            hub: Arc::downgrade(&self.inner),
            feed,
            id,
        }
    }
}

/// A sink's place in a feed; dropping it unsubscribes, and the last one out releases the
/// org's upstream subscription.
struct Registration {
    hub: Weak<HubInner>,
    feed: Arc<Feed>,
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
            subs.retain(|(id, _)| *id != self.id);
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
async fn upstream(log: Arc<dyn EventLog>, feed: Weak<Feed>) {
    let mut backoff = Duration::from_millis(100);
    let Some(org) = feed.upgrade().map(|f| f.org.clone()) else {
        return;
    };
    'restart: loop {
        let mut tail = match log.tail(&org).await {
            Ok(t) => t,
            Err(e) => {
                tracing::warn!(org = %org, error = %e, "cannot follow org log; retrying");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(5));
                continue;
            }
        };
        loop {
            let events = match tail.next().await {
                Ok(events) => events,
                Err(e) => {
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
            let subs = feed.subscribers.lock();
            for event in &events {
                for (_, sink) in subs.iter() {
                    sink.push(event);
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
    pub fn on_live(&mut self, event: &Arc<Event>, out: &mut Vec<Delivery>) {
        if self.catching_up {
            return; // the log read will return it
        }
        if event.epoch != self.epoch || event.seq > self.next {
            self.catching_up = true; // a gap or a new epoch: the log decides
        } else if event.seq == self.next {
            self.next += 1;
            out.push(Delivery::Event(event.clone()));
        }
        // event.seq < next: already delivered.
    }

    /// Reads the next events from the log (at most `limit`). Ends the catch-up once the head
    /// seen by the read is reached; a position the log cannot continue becomes a RESET.
    pub async fn catch_up(
        &mut self,
        limit: usize,
        out: &mut Vec<Delivery>,
    ) -> Result<(), LogError> {
        let from = self.position();
        match self.log.read(&self.org, &from, limit).await? {
            ReadOutcome::Events { state, events } => {
                for e in events {
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
        Ok(())
    }
}
