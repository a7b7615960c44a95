//! A presence batch as sessions receive it ([`crate::hub::Live::Presence`]), encoded once for
//! all of them, and the format of a batch on an org's signal stream (written by
//! `presence::shared`'s script, read by every node's follower of the org).
//!
//! Its own module so that the hub, which carries notes and signals, and presence, which makes
//! them and uses the hub, do not depend on each other.

use std::sync::Arc;

use bytes::Bytes;
use edgestream_codec::{json, Frame};

use crate::model::OrgId;

/// One PRESENCE frame (a batch or a snapshot of one (org, room)), encoded once for every
/// session that gets it.
#[derive(Debug)]
pub struct PresenceNote {
    pub org: OrgId,
    /// Empty: the org itself.
    pub room: String,
    pub binary: Bytes,
    pub json: Bytes,
}

impl PresenceNote {
    /// `changes`: (user, present now); empty in counts mode.
    pub fn new(org: &OrgId, room: &str, online: u64, changes: &[(String, bool)]) -> Arc<Self> {
        Arc::new(PresenceNote {
            org: org.clone(),
            room: room.to_string(),
            binary: Frame::Presence {
                org: org.to_string(),
                room: room.to_string(),
                online,
                changes: changes.to_vec(),
            }
            .to_bytes(),
            json: Bytes::from(json::presence(org.as_str(), room, online, changes)),
        })
    }
}

/// A presence batch or snapshot on an org's signal stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Signal {
    /// A snapshot (for the sessions waiting for one) rather than a batch (for the others).
    pub snapshot: bool,
    pub room: String,
    pub online: u64,
    pub changes: Vec<(String, bool)>,
}

const SEP: u8 = 0x1f;

impl Signal {
    /// `b|s US online US room US` then per change `0|1 <user length> : <user>` (the user is
    /// length-prefixed: a subject may hold any byte).
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::new();
        out.push(if self.snapshot { b's' } else { b'b' });
        out.push(SEP);
        out.extend_from_slice(self.online.to_string().as_bytes());
        out.push(SEP);
        out.extend_from_slice(self.room.as_bytes());
        out.push(SEP);
        for (user, joined) in &self.changes {
            out.push(if *joined { b'1' } else { b'0' });
            out.extend_from_slice(user.len().to_string().as_bytes());
            out.push(b':');
            out.extend_from_slice(user.as_bytes());
        }
        out
    }

    /// `None`: not a presence signal of this format.
    pub fn decode(data: &[u8]) -> Option<Signal> {
        let mut parts = data.splitn(4, |b| *b == SEP);
        let snapshot = match parts.next()? {
            b"s" => true,
            b"b" => false,
            _ => return None,
        };
        let online = std::str::from_utf8(parts.next()?).ok()?.parse().ok()?;
        let room = std::str::from_utf8(parts.next()?).ok()?.to_string();
        let mut rest = parts.next()?;
        let mut changes = Vec::new();
        while let Some((&flag, tail)) = rest.split_first() {
            let joined = match flag {
                b'1' => true,
                b'0' => false,
                _ => return None,
            };
            let colon = tail.iter().position(|b| *b == b':')?;
            let len: usize = std::str::from_utf8(&tail[..colon]).ok()?.parse().ok()?;
            let user = tail.get(colon + 1..colon + 1 + len)?;
            changes.push((std::str::from_utf8(user).ok()?.to_string(), joined));
            rest = &tail[colon + 1 + len..];
        }
        Some(Signal {
            snapshot,
            room,
            online,
            changes,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signals_round_trip_users_with_any_bytes() {
        let s = Signal {
            snapshot: false,
            room: "lobby".into(),
            online: 3,
            changes: vec![
                ("a\u{1f}b:1".into(), true),
                ("".into(), false),
                ("é".into(), true),
            ],
        };
        assert_eq!(Signal::decode(&s.encode()), Some(s.clone()));
        let snap = Signal {
            snapshot: true,
            room: String::new(),
            online: 5000,
            changes: vec![],
        };
        assert_eq!(Signal::decode(&snap.encode()), Some(snap));
        // The script writes the same bytes (presence::shared's `emit`).
        assert_eq!(
            Signal::decode(b"b\x1f2\x1flobby\x1f13:ann00:"),
            Some(Signal {
                snapshot: false,
                room: "lobby".into(),
                online: 2,
                changes: vec![("ann".into(), true), ("".into(), false)],
            })
        );
        for bad in [
            &b"x\x1f1\x1fr\x1f"[..],
            b"b\x1fx\x1fr\x1f",
            b"b\x1f1\x1fr",
            b"b\x1f1\x1fr\x1f19:ann",
            b"b\x1f1\x1fr\x1f2ann",
            b"1\x1f3\x1flobby\x1fann",
        ] {
            assert_eq!(Signal::decode(bad), None, "{bad:?}");
        }
    }
}
