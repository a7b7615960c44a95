//! Presence (PROTOCOL.md section 8): who is online in an org (at least one session subscribed
//! to it) and in its rooms (between JOIN and LEAVE), on this node. Changes reach the org's
//! subscribers as PRESENCE frames through the hub, beside its events.
//!
//! Membership is held by guards ([`OrgMember`], [`RoomMember`]) that sessions keep; dropping a
//! guard (LEAVE, UNSUBSCRIBE, the session's end, however it ends) is what makes a user leave,
//! so a vanished client leaves when its session is freed (idle timeout).

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use bytes::Bytes;
use edgestream_codec::{json, Frame};
use parking_lot::Mutex;

use crate::hub::Hub;
use crate::model::OrgId;

/// One presence change, encoded once for every session that gets it.
#[derive(Debug)]
pub struct PresenceNote {
    pub org: OrgId,
    /// Empty: the org itself.
    pub room: String,
    pub user: String,
    pub joined: bool,
    /// Users present after the change.
    pub online: u64,
    pub binary: Bytes,
    pub json: Bytes,
}

impl PresenceNote {
    fn new(org: &OrgId, room: &str, user: &str, joined: bool, online: u64) -> Arc<Self> {
        Arc::new(PresenceNote {
            org: org.clone(),
            room: room.to_string(),
            user: user.to_string(),
            joined,
            online,
            binary: Frame::Presence {
                org: org.to_string(),
                room: room.to_string(),
                user: user.to_string(),
                joined,
                online,
            }
            .to_bytes(),
            json: Bytes::from(json::presence(org.as_str(), room, user, joined, online)),
        })
    }
}

#[derive(Default)]
struct Room {
    /// Sessions per member.
    members: BTreeMap<String, u32>,
    messages: u64,
    last_message_ts: u64,
}

#[derive(Default)]
struct OrgPresence {
    /// Sessions per user subscribed to the org.
    users: BTreeMap<String, u32>,
    rooms: HashMap<String, Room>,
}

/// The registry of this node.
pub struct Presence {
    hub: Hub,
    orgs: Mutex<HashMap<OrgId, OrgPresence>>,
}

/// A room as `GET /v1/orgs/{org}/rooms/{room}` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RoomView {
    pub members: Vec<String>,
    pub messages: u64,
    pub last_message_ts: u64,
}

impl Presence {
    pub fn new(hub: Hub) -> Arc<Self> {
        Arc::new(Presence {
            hub,
            orgs: Mutex::new(HashMap::new()),
        })
    }

    /// A session of `user` subscribes to `org`; the user is online there while the guard lives.
    pub fn enter(self: &Arc<Self>, org: &OrgId, user: &str) -> OrgMember {
        let note = {
            let mut orgs = self.orgs.lock();
            let p = orgs.entry(org.clone()).or_default();
            let first = {
                let n = p.users.entry(user.to_string()).or_default();
                *n += 1;
                *n == 1
            };
            first.then(|| PresenceNote::new(org, "", user, true, p.users.len() as u64))
        };
        if let Some(note) = note {
            self.hub.notify(org, note);
        }
        OrgMember {
            presence: self.clone(),
            org: org.clone(),
            user: user.to_string(),
        }
    }

    /// `user` joins `room`: the guard and the room's members now (one note each, for the
    /// joining session).
    pub fn join(
        self: &Arc<Self>,
        org: &OrgId,
        room: &str,
        user: &str,
    ) -> (RoomMember, Vec<Arc<PresenceNote>>) {
        let (note, members) = {
            let mut orgs = self.orgs.lock();
            let r = orgs
                .entry(org.clone())
                .or_default()
                .rooms
                .entry(room.to_string())
                .or_default();
            let first = {
                let n = r.members.entry(user.to_string()).or_default();
                *n += 1;
                *n == 1
            };
            let online = r.members.len() as u64;
            let note = first.then(|| PresenceNote::new(org, room, user, true, online));
            let members = r
                .members
                .keys()
                .map(|m| PresenceNote::new(org, room, m, true, online))
                .collect();
            (note, members)
        };
        if let Some(note) = note {
            self.hub.notify(org, note);
        }
        let guard = RoomMember {
            presence: self.clone(),
            org: org.clone(),
            room: room.to_string(),
            user: user.to_string(),
        };
        (guard, members)
    }

    /// A chat message was appended to `room`.
    pub fn record_chat(&self, org: &OrgId, room: &str, ts: u64) {
        let mut orgs = self.orgs.lock();
        let r = orgs
            .entry(org.clone())
            .or_default()
            .rooms
            .entry(room.to_string())
            .or_default();
        r.messages += 1;
        r.last_message_ts = r.last_message_ts.max(ts);
    }

    /// Users online in `org` and their sessions on this node.
    pub fn org_users(&self, org: &OrgId) -> Vec<(String, u32)> {
        self.orgs
            .lock()
            .get(org)
            .map(|p| p.users.iter().map(|(u, n)| (u.clone(), *n)).collect())
            .unwrap_or_default()
    }

    /// A room's members and chat figures on this node.
    pub fn room(&self, org: &OrgId, room: &str) -> RoomView {
        let orgs = self.orgs.lock();
        match orgs.get(org).and_then(|p| p.rooms.get(room)) {
            Some(r) => RoomView {
                members: r.members.keys().cloned().collect(),
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

    /// Rooms with members and users present, over all orgs (for the metrics).
    pub fn counts(&self) -> (u64, u64) {
        let orgs = self.orgs.lock();
        let rooms = orgs
            .values()
            .map(|p| p.rooms.values().filter(|r| !r.members.is_empty()).count() as u64)
            .sum();
        let users = orgs.values().map(|p| p.users.len() as u64).sum();
        (rooms, users)
    }

    fn leave_org(&self, org: &OrgId, user: &str) {
        let note = {
            let mut orgs = self.orgs.lock();
            let Some(p) = orgs.get_mut(org) else { return };
            let Some(n) = p.users.get_mut(user) else {
                return;
            };
            *n -= 1;
            let left = *n == 0;
            if left {
                p.users.remove(user);
            }
            let note = left.then(|| PresenceNote::new(org, "", user, false, p.users.len() as u64));
            if p.users.is_empty() && p.rooms.values().all(|r| r.members.is_empty()) {
                // Room chat figures go with the last user: this is live state, not history.
                orgs.remove(org);
            }
            note
        };
        if let Some(note) = note {
            self.hub.notify(org, note);
        }
    }

    fn leave_room(&self, org: &OrgId, room: &str, user: &str) {
        let note = {
            let mut orgs = self.orgs.lock();
            let Some(r) = orgs.get_mut(org).and_then(|p| p.rooms.get_mut(room)) else {
                return;
            };
            let Some(n) = r.members.get_mut(user) else {
                return;
            };
            *n -= 1;
            let left = *n == 0;
            if left {
                r.members.remove(user);
            }
            left.then(|| PresenceNote::new(org, room, user, false, r.members.len() as u64))
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
        self.presence.leave_org(&self.org, &self.user);
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
        self.presence.leave_room(&self.org, &self.room, &self.user);
    }
}
