//! Presence (PROTOCOL.md section 8): who is online in an org (at least one session subscribed
//! to it) and in its rooms (between JOIN and LEAVE), told to the sessions that asked, as
//! coalesced batches.
//!
//! Membership is held by guards ([`OrgMember`], [`RoomMember`]) that sessions keep; dropping a
//! guard (LEAVE, UNSUBSCRIBE, the session's end, however it ends) is what makes a user leave,
//! so a vanished client leaves when its session is freed (idle timeout).
//!
//! ## Batches
//! A session *listens* to a group (an org, `presence=1`; a room, by joining it). Each group
//! records the users whose presence flipped since its last batch (with their state then). A
//! flush turns them into one PRESENCE batch (the users whose state differs now, so a join and
//! a leave within one window cancel out), encoded once and pushed to every listener. A new
//! listener waits for the next flush and gets a snapshot instead (every present user as
//! joined, after the batch's changes): the snapshot and the batches after it are one
//! consistent history, whatever the timing. Above `max_members`, batches and snapshots carry
//! `online` only; a group that falls back to the limit or below sends its full list once.
//!
//! Flushes are throttled per org, leading edge first: a change in an org that has not flushed
//! for an interval is sent at once, later ones wait for the interval to end. So a quiet org's
//! changes are immediate and a storm costs one frame per listener per interval: O(members)
//! per window, never O(members^2).
//!
//! Alone (the embedded log) this node's counts are the whole truth and batches are made here.
//! With a shared log on Redis, [`shared`] keeps the combined view and makes the batches there,
//! on the org's signal stream, which every node's follower reads ([`crate::hub::SignalHandler`]):
//! every node sends the same batches in the same order.

pub mod shared;

pub use crate::note::PresenceNote;

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use bytes::Bytes;
use indexmap::IndexMap;
use parking_lot::Mutex;
use tokio::sync::mpsc;
use tokio::time::Instant;

use crate::hub::{Hub, Live, SignalHandler, Sink, Watch};
use crate::log::LogError;
use crate::model::OrgId;
use crate::note::Signal;

/// How presence is batched (`--presence-interval`, `--presence-max-members`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Batching {
    /// At most one batch per org per interval.
    pub interval: Duration,
    /// Above this many users present, a group's frames carry `online` only.
    pub max_members: usize,
}

impl Default for Batching {
    fn default() -> Self {
        Batching {
            interval: Duration::from_millis(500),
            max_members: 1000,
        }
    }
}

/// A group (an org's room; `""`: the org itself).
#[derive(Default)]
struct Room {
    /// Sessions per member on this node (sorted: the HTTP routes page in this order).
    members: BTreeMap<String, u32>,
    messages: u64,
    last_message_ts: u64,
    /// Embedded mode: users whose presence flipped since the last batch, and whether they
    /// were present at it.
    dirty: HashMap<String, bool>,
    /// Embedded mode: `online` as the last batch (or snapshot) told it.
    published: u64,
    /// Sessions that get the batches, by their listening id (index maps: a session leaving
    /// costs O(1) however many listen, where 10,000 leaving a room was quadratic with lists,
    /// and a batch goes through the live entries only, not a room's peak).
    listeners: IndexMap<u64, Sink>,
    /// Sessions waiting for their snapshot (at the next flush).
    awaiting: IndexMap<u64, Sink>,
}

impl Room {
    fn idle(&self) -> bool {
        self.members.is_empty()
            && self.listeners.is_empty()
            && self.awaiting.is_empty()
            && self.dirty.is_empty()
            && self.published == 0
    }

    /// Every member as joined, or nothing above the limit.
    fn snapshot(&self, max: usize) -> Vec<(String, bool)> {
        if self.members.len() > max {
            return Vec::new();
        }
        self.members.keys().map(|u| (u.clone(), true)).collect()
    }

    /// Embedded mode: sends the batch of the changes since the last one, and the snapshot to
    /// the sessions waiting for it; returns whether a frame went to anyone.
    fn flush(&mut self, org: &OrgId, name: &str, max: usize) -> bool {
        let online = self.members.len() as u64;
        let was = self.published;
        let limit = max as u64;
        let batch = if online > limit {
            (online != was).then(Vec::new)
        } else if was > limit {
            // Back to a list: everyone, once, for the clients that only had a number.
            Some(self.snapshot(max))
        } else {
            let mut changes: Vec<(String, bool)> = self
                .dirty
                .iter()
                .filter(|(u, before)| self.members.contains_key(*u) != **before)
                .map(|(u, before)| (u.clone(), !*before))
                .collect();
            changes.sort();
            (!changes.is_empty()).then_some(changes)
        };
        self.dirty.clear();
        self.published = online;
        let mut sent = false;
        if let Some(changes) = batch {
            sent |= self.send(org, name, online, &changes, false);
        }
        if !self.awaiting.is_empty() {
            let snapshot = self.snapshot(max);
            sent |= self.send(org, name, online, &snapshot, true);
        }
        sent
    }

    /// One frame to the listeners (a batch) or to the sessions awaiting a snapshot, which then
    /// listen; returns whether anyone got it.
    fn send(
        &mut self,
        org: &OrgId,
        name: &str,
        online: u64,
        changes: &[(String, bool)],
        snapshot: bool,
    ) -> bool {
        let to = if snapshot {
            &self.awaiting
        } else {
            &self.listeners
        };
        if to.is_empty() {
            return false;
        }
        let note = PresenceNote::new(org, name, online, changes);
        for sink in to.values() {
            sink.push(Live::Presence(note.clone()));
        }
        if snapshot {
            let awaiting = std::mem::take(&mut self.awaiting);
            self.listeners.extend(awaiting);
        }
        true
    }
}

#[derive(Default)]
struct OrgPresence {
    rooms: HashMap<String, Room>,
    /// Embedded mode: the last flush, and whether the next one is scheduled.
    last_flush: Option<Instant>,
    scheduled: bool,
}

#[derive(Default)]
struct State {
    orgs: HashMap<OrgId, OrgPresence>,
    /// Counts every change, so the shared view can tell old changes from new ones.
    generation: u64,
}

/// The registry of this node.
pub struct Presence {
    hub: Hub,
    batching: Batching,
    state: Mutex<State>,
    shared: Option<shared::Shared>,
    /// Embedded mode: the flush timer's queue (when, org).
    timer: Option<mpsc::UnboundedSender<(Instant, OrgId)>>,
    next_listener: AtomicU64,
}

/// A page of a group's members as the HTTP routes show it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RoomView {
    /// Users present (on every node when shared).
    pub online: u64,
    /// This page's members (after `after`, in byte order) and their sessions.
    pub members: Vec<(String, u32)>,
    /// The last member of this page, when more follow.
    pub next: Option<String>,
    pub messages: u64,
    pub last_message_ts: u64,
}

/// What a session's guard does to a group's listeners.
enum Listen {
    Not,
    Add(u64, Sink),
    Remove(u64),
}

impl Presence {
    /// Presence of this node alone.
    pub fn new(hub: Hub, batching: Batching) -> Arc<Self> {
        let (tx, rx) = mpsc::unbounded_channel();
        let p = Arc::new(Presence {
            hub,
            batching,
            state: Mutex::new(State::default()),
            shared: None,
            timer: Some(tx),
            next_listener: AtomicU64::new(1),
        });
        tokio::spawn(timer(Arc::downgrade(&p), rx));
        p
    }

    /// Presence shared with the other nodes on this Redis (the shared log's connection).
    pub fn shared(
        hub: Hub,
        redis: crate::log::redis::Conn,
        ttl: Duration,
        batching: Batching,
    ) -> Arc<Self> {
        let p = Arc::new_cyclic(|weak| Presence {
            hub: hub.clone(),
            batching,
            state: Mutex::new(State::default()),
            shared: Some(shared::Shared::start(redis, ttl, batching, weak.clone())),
            timer: None,
            next_listener: AtomicU64::new(1),
        });
        let handler: Weak<dyn SignalHandler> = Arc::downgrade(&p) as Weak<dyn SignalHandler>;
        hub.on_signals(handler);
        p
    }

    /// A session of `user` subscribes to `org`; the user is online there while the guard lives.
    /// With `listen` (`presence=1`), the session gets the org's snapshot, then its batches.
    pub fn enter(self: &Arc<Self>, org: &OrgId, user: &str, listen: Option<&Sink>) -> OrgMember {
        let listener = listen.map(|_| self.next_listener.fetch_add(1, Ordering::Relaxed));
        let how = match (listener, listen) {
            (Some(id), Some(sink)) => Listen::Add(id, sink.clone()),
            _ => Listen::Not,
        };
        self.change(org, "", user, true, how);
        OrgMember {
            presence: self.clone(),
            org: org.clone(),
            user: user.to_string(),
            listener,
        }
    }

    /// `user` joins `room`; the session (its `sink`) gets the room's snapshot, then its batches,
    /// while the guard lives. On a shared log the org is followed meanwhile (its batches come
    /// on its signal stream), which fails if the log is unavailable.
    pub async fn join(
        self: &Arc<Self>,
        org: &OrgId,
        room: &str,
        user: &str,
        sink: &Sink,
    ) -> Result<RoomMember, LogError> {
        let watch = match self.shared {
            Some(_) => Some(self.hub.watch(org).await?),
            None => None,
        };
        let id = self.next_listener.fetch_add(1, Ordering::Relaxed);
        self.change(org, room, user, true, Listen::Add(id, sink.clone()));
        Ok(RoomMember {
            presence: self.clone(),
            org: org.clone(),
            room: room.to_string(),
            user: user.to_string(),
            listener: id,
            _watch: watch,
        })
    }

    /// A chat message was appended to `room`.
    pub fn record_chat(&self, org: &OrgId, room: &str, ts: u64) {
        if let Some(shared) = &self.shared {
            shared.record_chat(org, room, ts);
            return;
        }
        let mut state = self.state.lock();
        // Figures are kept while someone is present in the org (so no entry is made here).
        let Some(p) = state.orgs.get_mut(org) else {
            return;
        };
        let r = p.rooms.entry(room.to_string()).or_default();
        r.messages += 1;
        r.last_message_ts = r.last_message_ts.max(ts);
    }

    /// A page of a group's members (`room` `""`: the org's users), after `after`, at most
    /// `limit`, with the chat figures (on every node when shared; this node's view if Redis
    /// cannot be read).
    pub async fn room(
        &self,
        org: &OrgId,
        room: &str,
        after: Option<&str>,
        limit: usize,
    ) -> RoomView {
        let limit = limit.max(1);
        if let Some(shared) = &self.shared {
            match shared.read(org, room, after, limit).await {
                Ok(view) => return view,
                Err(e) => tracing::warn!(org = %org, error = %e, "shared presence unreadable"),
            }
        }
        let state = self.state.lock();
        let Some(r) = state.orgs.get(org).and_then(|p| p.rooms.get(room)) else {
            return RoomView {
                online: 0,
                members: Vec::new(),
                next: None,
                messages: 0,
                last_message_ts: 0,
            };
        };
        use std::ops::Bound;
        let from = match after {
            Some(a) => Bound::Excluded(a.to_string()),
            None => Bound::Unbounded,
        };
        let mut members: Vec<(String, u32)> = r
            .members
            .range((from, Bound::Unbounded))
            .take(limit + 1)
            .map(|(u, n)| (u.clone(), *n))
            .collect();
        let next = (members.len() > limit).then(|| {
            members.truncate(limit);
            members[limit - 1].0.clone()
        });
        RoomView {
            online: r.members.len() as u64,
            members,
            next,
            messages: r.messages,
            last_message_ts: r.last_message_ts,
        }
    }

    /// Rooms with members and users present on this node, over all orgs (for the metrics).
    pub fn counts(&self) -> (u64, u64) {
        let state = self.state.lock();
        let mut rooms = 0;
        let mut users = 0;
        for p in state.orgs.values() {
            for (name, r) in &p.rooms {
                if name.is_empty() {
                    users += r.members.len() as u64;
                } else if !r.members.is_empty() {
                    rooms += 1;
                }
            }
        }
        (rooms, users)
    }

    /// This node's sessions per `room\x1fuser` in every `wanted` org that has any, and the
    /// generation they reflect (for [`shared`]).
    fn snapshot(
        &self,
        wanted: impl Fn(&OrgId) -> bool,
    ) -> (u64, HashMap<OrgId, Vec<(String, u32)>>) {
        let state = self.state.lock();
        let orgs = state
            .orgs
            .iter()
            .filter(|(org, _)| wanted(org))
            .map(|(org, p)| {
                let entries = p
                    .rooms
                    .iter()
                    .flat_map(|(room, r)| {
                        r.members
                            .iter()
                            .map(move |(user, n)| (shared::entry(room, user), *n))
                    })
                    .collect::<Vec<_>>();
                (org.clone(), entries)
            })
            .filter(|(_, e)| !e.is_empty())
            .collect();
        (state.generation, orgs)
    }

    /// One session more (`up`) or less of `user` in `room` (`""`: the org), and the session's
    /// listening.
    fn change(&self, org: &OrgId, room: &str, user: &str, up: bool, listen: Listen) {
        let now = Instant::now();
        let mut state = self.state.lock();
        state.generation += 1;
        let generation = state.generation;
        let p = state.orgs.entry(org.clone()).or_default();
        let r = p.rooms.entry(room.to_string()).or_default();
        let mut wants_snapshot = false;
        match listen {
            Listen::Not => {}
            Listen::Add(id, sink) => {
                r.awaiting.insert(id, sink);
                wants_snapshot = true;
            }
            Listen::Remove(id) => {
                r.listeners.swap_remove(&id);
                r.awaiting.swap_remove(&id);
            }
        }
        let before = r.members.get(user).copied().unwrap_or(0);
        let sessions = match (up, before) {
            (true, n) => n + 1,
            (false, 0) => 0,
            (false, n) => n - 1,
        };
        if sessions == 0 {
            r.members.remove(user);
        } else {
            r.members.insert(user.to_string(), sessions);
        }
        let flipped = (before == 0) != (sessions == 0);
        match &self.shared {
            // Queued under the lock, so the shared view gets changes in their order.
            Some(shared) => {
                if before != sessions {
                    shared.set(org, room, user, sessions, generation);
                }
                if wants_snapshot {
                    shared.want(org, room);
                }
            }
            None => {
                if flipped {
                    r.dirty.entry(user.to_string()).or_insert(before > 0);
                }
                if flipped || wants_snapshot {
                    self.touch(p, org, now);
                }
            }
        }
        self.tidy(&mut state, org, now);
    }

    /// Embedded mode: flushes the org now if it has not for an interval, else makes sure a
    /// flush is scheduled for when the interval ends.
    fn touch(&self, p: &mut OrgPresence, org: &OrgId, now: Instant) {
        if p.scheduled {
            return;
        }
        match p.last_flush {
            Some(at) if now < at + self.batching.interval => {
                p.scheduled = true;
                if let Some(timer) = &self.timer {
                    let _ = timer.send((at + self.batching.interval, org.clone()));
                }
            }
            _ => self.flush(p, org, now),
        }
    }

    fn flush(&self, p: &mut OrgPresence, org: &OrgId, now: Instant) {
        p.scheduled = false;
        for (name, r) in &mut p.rooms {
            // Only a flush that sent something starts an interval: changes nobody listens to
            // leave the leading edge to the next one that someone hears.
            if (!r.dirty.is_empty() || !r.awaiting.is_empty())
                && r.flush(org, name, self.batching.max_members)
            {
                p.last_flush = Some(now);
            }
        }
    }

    /// The timer's turn for `org`.
    fn flush_due(&self, org: &OrgId) {
        let now = Instant::now();
        let mut state = self.state.lock();
        if let Some(p) = state.orgs.get_mut(org) {
            if p.scheduled {
                self.flush(p, org, now);
            }
        }
        self.tidy(&mut state, org, now);
    }

    /// Forgets an org nobody is in, listens to or waits for (its chat figures with it: this
    /// is live state, not history). An org that flushed lately is kept until its interval
    /// ends (the timer comes back for it), so that the throttle holds.
    fn tidy(&self, state: &mut State, org: &OrgId, now: Instant) {
        let Some(p) = state.orgs.get_mut(org) else {
            return;
        };
        if p.scheduled || !p.rooms.values().all(Room::idle) {
            return;
        }
        match p.last_flush.map(|at| at + self.batching.interval) {
            Some(until) if now < until => {
                p.scheduled = true;
                if let Some(timer) = &self.timer {
                    let _ = timer.send((until, org.clone()));
                }
            }
            _ => {
                state.orgs.remove(org);
            }
        }
    }

    /// A batch or snapshot from the shared view, for this node's listeners.
    fn on_signal(&self, org: &OrgId, s: Signal) {
        let mut state = self.state.lock();
        let Some(r) = state
            .orgs
            .get_mut(org)
            .and_then(|p| p.rooms.get_mut(&s.room))
        else {
            return;
        };
        r.send(org, &s.room, s.online, &s.changes, s.snapshot);
    }
}

impl SignalHandler for Presence {
    fn signals(&self, org: &OrgId, signals: &[Bytes]) {
        for s in signals.iter().filter_map(|d| Signal::decode(d)) {
            self.on_signal(org, s);
        }
    }
}

/// Embedded mode: flushes each org when its scheduled time comes.
async fn timer(presence: Weak<Presence>, mut rx: mpsc::UnboundedReceiver<(Instant, OrgId)>) {
    let mut due: BinaryHeap<Reverse<(Instant, OrgId)>> = BinaryHeap::new();
    loop {
        let next = due.peek().map(|Reverse((at, _))| *at);
        tokio::select! {
            m = rx.recv() => match m {
                Some(entry) => due.push(Reverse(entry)),
                None => return,
            },
            () = tokio::time::sleep_until(next.unwrap_or_else(Instant::now)), if next.is_some() => {
                let Some(p) = presence.upgrade() else { return };
                let now = Instant::now();
                while due.peek().is_some_and(|Reverse((at, _))| *at <= now) {
                    if let Some(Reverse((_, org))) = due.pop() {
                        p.flush_due(&org);
                    }
                }
            }
        }
    }
}

/// A session's presence in an org; dropping it leaves (and stops listening).
pub struct OrgMember {
    presence: Arc<Presence>,
    org: OrgId,
    user: String,
    listener: Option<u64>,
}

impl OrgMember {
    pub fn org(&self) -> &OrgId {
        &self.org
    }
}

impl Drop for OrgMember {
    fn drop(&mut self) {
        let how = self.listener.map_or(Listen::Not, Listen::Remove);
        self.presence.change(&self.org, "", &self.user, false, how);
    }
}

/// A session's membership of a room; dropping it leaves (and stops listening).
pub struct RoomMember {
    presence: Arc<Presence>,
    org: OrgId,
    room: String,
    user: String,
    listener: u64,
    _watch: Option<Watch>,
}

impl RoomMember {
    pub fn is(&self, org: &OrgId, room: &str) -> bool {
        &self.org == org && self.room == room
    }

    pub fn org(&self) -> &OrgId {
        &self.org
    }

    pub fn room(&self) -> &str {
        &self.room
    }
}

impl Drop for RoomMember {
    fn drop(&mut self) {
        let how = Listen::Remove(self.listener);
        self.presence
            .change(&self.org, &self.room, &self.user, false, how);
    }
}

#[cfg(test)]
mod tests;
