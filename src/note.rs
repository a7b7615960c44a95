//! A presence change as the hub carries it to sessions ([`crate::hub::Live::Presence`]),
//! encoded once for all of them, and the format of such a change on an org's signal stream
//! (written by `presence::shared`'s script: `joined US online US room US user`, US = 0x1f).
//!
//! Its own module so that the hub, which carries notes, and presence, which makes them and
//! uses the hub, do not depend on each other.

use std::sync::Arc;

use bytes::Bytes;
use edgestream_codec::{json, Frame};

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
    pub fn new(org: &OrgId, room: &str, user: &str, joined: bool, online: u64) -> Arc<Self> {
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

    /// A change announced on the org's signal stream by `presence::shared` (`None`: not a
    /// note).
    pub fn from_signal(org: &OrgId, data: &[u8]) -> Option<Arc<Self>> {
        let (joined, online, room, user) = decode_signal(data)?;
        Some(Self::new(org, room, user, joined, online))
    }
}

/// A signal as (joined, online, room, user); `None` if it is not a presence change.
pub fn decode_signal(data: &[u8]) -> Option<(bool, u64, &str, &str)> {
    let text = std::str::from_utf8(data).ok()?;
    let mut parts = text.splitn(4, '\u{1f}');
    let joined = match parts.next()? {
        "1" => true,
        "0" => false,
        _ => return None,
    };
    let online = parts.next()?.parse().ok()?;
    let room = parts.next()?;
    let user = parts.next()?;
    Some((joined, online, room, user))
}
