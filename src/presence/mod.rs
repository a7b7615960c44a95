//! Presence (PROTOCOL.md section 8): who is online in an org (at least one session subscribed
//! to it) and in its rooms (between JOIN and LEAVE). Changes reach the org's subscribers as
//! PRESENCE frames through the hub, beside its events.
//!
//! Membership is held by guards ([`OrgMember`], [`RoomMember`]) that sessions keep; dropping a
//! guard (LEAVE, UNSUBSCRIBE, the session's end, however it ends) is what makes a user leave,
//! so a vanished client leaves when its session is freed (idle timeout).
//!
//! Each node counts its own sessions per (org, room, user). Alone (the embedded log) that is
//! the whole truth and changes are announced here. With a shared log on Redis, [`shared`]
//! publishes each node's counts with a time-to-live and announces changes of the combined
//! view through the org's signal stream, which every node's follower reads (see there).

pub mod shared;

pub use crate::note::PresenceNote;

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use parking_lot::Mutex;

use crate::hub::Hub;
use crate::model::OrgId;

/// Sessions per member, and chat figures (kept while someone is in the org).
#[derive(Default)]
struct Room {
    members: BTreeMap<String, u32>,
    messages: u64,
    last_message_ts: u64,
}

/// An org's rooms; the room `""` is the org itself (its subscribers).
#[derive(Default)]
struct OrgPresence {
    rooms: HashMap<String, Room>,
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
    state: Mutex<State>,
    shared: Option<shared::Shared>,
}

/// A room as `GET /v1/orgs/{org}/rooms/{room}` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RoomView {
    /// Members and their sessions.
    pub members: Vec<(String, u32)>,
    pub messages: u64,
    pub last_message_ts: u64,
}

impl Presence {
    /// Presence of this node alone.
    pub fn new(hub: Hub) -> Arc<Self> {
        Arc::new(Presence {
            hub,
            state: Mutex::new(State::default()),
            shared: None,
        })
    }

    /// Presence shared with the other nodes on this Redis (the shared log's connection).
    pub fn shared(hub: Hub, redis: crate::log::redis::Conn, ttl: std::time::Duration) -> Arc<Self> {
        Arc::new_cyclic(|weak| Presence {
            hub,
            state: Mutex::new(State::default()),
            shared: Some(shared::Shared::start(redis, ttl, weak.clone())),
        })
    }

    /// A session of `user` subscribes to `org`; the user is online there while the guard lives.
    pub fn enter(self: &Arc<Self>, org: &OrgId, user: &str) -> OrgMember {
        self.change(org, "", user, true);
        OrgMember {
            presence: self.clone(),
            org: org.clone(),
            user: user.to_string(),
        }
    }

    /// `user` joins `room`: the guard and the room's members now (one note each, for the
    /// joining session).
    pub async fn join(
        self: &Arc<Self>,
        org: &OrgId,
        room: &str,
        user: &str,
    ) -> (RoomMember, Vec<Arc<PresenceNote>>) {
        self.change(org, room, user, true);
        let guard = RoomMember {
            presence: self.clone(),
            org: org.clone(),
            room: room.to_string(),
            user: user.to_string(),
        };
        let members = self.room(org, room).await.members;
        let online = members.len() as u64;
        let notes = members
            .iter()
            .map(|(m, _)| PresenceNote::new(org, room, m, true, online))
            .collect();
        (guard, notes)
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

    /// Users online in `org` and their sessions (on every node when shared).
    pub async fn org_users(&self, org: &OrgId) -> Vec<(String, u32)> {
        self.room(org, "").await.members
    }

    /// A room's members and chat figures (on every node when shared; this node's view if
    /// Redis cannot be read).
    pub async fn room(&self, org: &OrgId, room: &str) -> RoomView {
        if let Some(shared) = &self.shared {
            match shared.read(org, room).await {
                Ok(view) => return view,
                Err(e) => tracing::warn!(org = %org, error = %e, "shared presence unreadable"),
            }
        }
        let state = self.state.lock();
        match state.orgs.get(org).and_then(|p| p.rooms.get(room)) {
            Some(r) => RoomView {
                members: r.members.iter().map(|(u, n)| (u.clone(), *n)).collect(),
                messages: r.messages,
                last_message_ts: r.last_message_ts,
            },
            None => RoomView {
                members: Vec::new(),
                messages: 0,
                last_message_ts: 0,
            },
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

    /// One session more (`up`) or less of `user` in `room` (`""`: the org).
    fn change(&self, org: &OrgId, room: &str, user: &str, up: bool) {
        let note = {
            let mut state = self.state.lock();
            state.generation += 1;
            let generation = state.generation;
            let p = state.orgs.entry(org.clone()).or_default();
            let r = p.rooms.entry(room.to_string()).or_default();
            let sessions = match (up, r.members.get_mut(user)) {
                (true, Some(n)) => {
                    *n += 1;
                    *n
                }
                (true, None) => {
                    r.members.insert(user.to_string(), 1);
                    1
                }
                (false, Some(n)) => {
                    *n -= 1;
                    *n
                }
                (false, None) => return,
            };
            if sessions == 0 {
                r.members.remove(user);
            }
            let online = r.members.len() as u64;
            if p.rooms.values().all(|r| r.members.is_empty()) {
                // Chat figures go with the last user: this is live state, not history.
                state.orgs.remove(org);
            }
            match &self.shared {
                // Queued under the lock, so the shared view gets changes in their order.
                Some(shared) => {
                    shared.set(org, room, user, sessions, generation);
                    None
                }
                None => {
                    let edge = if up { sessions == 1 } else { sessions == 0 };
                    edge.then(|| PresenceNote::new(org, room, user, up, online))
                }
            }
        };
        if let Some(note) = note {
            self.hub.notify(org, note);
        }
    }
}

/// A session's presence in an org; dropping it leaves.
pub struct OrgMember {
    presence: Arc<Presence>,
    org: OrgId,
    user: String,
}

impl OrgMember {
    pub fn org(&self) -> &OrgId {
        &self.org
    }
}

impl Drop for OrgMember {
    fn drop(&mut self) {
        self.presence.change(&self.org, "", &self.user, false);
    }
}

/// A session's membership of a room; dropping it leaves.
pub struct RoomMember {
    presence: Arc<Presence>,
    org: OrgId,
    room: String,
    user: String,
}

impl RoomMember {
    pub fn is(&self, org: &OrgId, room: &str) -> bool {
        &self.org == org && self.room == room
    }
}

impl Drop for RoomMember {
    fn drop(&mut self) {
        self.presence
            .change(&self.org, &self.room, &self.user, false);
    }
}
