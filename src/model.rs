//! Identifiers and positions of the protocol model (PROTOCOL.md section 1), validated once at
//! the edge so the rest of the server can trust them.

use std::fmt;
use std::sync::Arc;

/// Why an identifier or position is invalid (a protocol error: 4400 / HTTP 400).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ModelError {
    #[error("invalid org id {0:?}: 1 to 64 bytes of [A-Za-z0-9_.-]")]
    Org(String),
    #[error("invalid epoch {0:?}: 1 to 32 chars of [A-Za-z0-9_-]")]
    Epoch(String),
    #[error("invalid position {0:?}: expected epoch:seq")]
    Position(String),
    #[error("invalid since entry {0:?}: expected org:epoch:seq")]
    Since(String),
    #[error("more than {0} entries in a list (at most {0} orgs per session)")]
    TooMany(usize),
}

/// An org (tenant) id: 1 to 64 bytes of `[A-Za-z0-9_.-]`. Cheap to clone.
#[derive(Clone, Eq, PartialOrd, Ord)]
pub struct OrgId(Arc<str>);

// Equality checks the pointer first: ids cloned from one parse (the common case on the
// delivery path) compare without reading the bytes. Equal pointers mean equal bytes, so this
// agrees with Hash and Ord, which look at the bytes only.
impl PartialEq for OrgId {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.0, &other.0) || self.0 == other.0
    }
}

impl std::hash::Hash for OrgId {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.0.hash(state);
    }
}

impl OrgId {
    pub fn parse(s: &str) -> Result<Self, ModelError> {
        let ok = !s.is_empty()
            && s.len() <= 64
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'));
        if ok {
            Ok(OrgId(Arc::from(s)))
        } else {
            Err(ModelError::Org(truncate(s)))
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for OrgId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for OrgId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", &*self.0)
    }
}

/// An epoch: 1 to 32 chars of `[A-Za-z0-9_-]`, opaque to clients. Cheap to clone.
#[derive(Clone, Eq)]
pub struct Epoch(Arc<str>);

impl PartialEq for Epoch {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.0, &other.0) || self.0 == other.0
    }
}

impl std::hash::Hash for Epoch {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.0.hash(state);
    }
}

impl Epoch {
    pub fn parse(s: &str) -> Result<Self, ModelError> {
        let ok = !s.is_empty()
            && s.len() <= 32
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-'));
        if ok {
            Ok(Epoch(Arc::from(s)))
        } else {
            Err(ModelError::Epoch(truncate(s)))
        }
    }

    /// A fresh random epoch of 12 alphanumeric chars.
    pub fn random() -> Self {
        use rand::distr::{Alphanumeric, SampleString};
        Epoch(Arc::from(Alphanumeric.sample_string(&mut rand::rng(), 12)))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Epoch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for Epoch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", &*self.0)
    }
}

/// A position in an org's log: the last event a client has, `(epoch, seq)`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Position {
    pub epoch: Epoch,
    pub seq: u64,
}

impl Position {
    /// Parses `epoch:seq`.
    pub fn parse(s: &str) -> Result<Self, ModelError> {
        let (epoch, seq) = s
            .rsplit_once(':')
            .ok_or_else(|| ModelError::Position(truncate(s)))?;
        let seq = parse_seq(seq).ok_or_else(|| ModelError::Position(truncate(s)))?;
        Ok(Position {
            epoch: Epoch::parse(epoch)?,
            seq,
        })
    }
}

impl Position {
    /// The position of a SUBSCRIBE frame: none when `epoch` is empty (PROTOCOL.md section 2).
    pub fn from_subscribe(epoch: &str, seq: u64) -> Result<Option<Self>, ModelError> {
        if epoch.is_empty() {
            return Ok(None);
        }
        Ok(Some(Position {
            epoch: Epoch::parse(epoch)?,
            seq,
        }))
    }
}

fn parse_seq(s: &str) -> Option<u64> {
    if s.is_empty() || s.len() > 19 || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse()
        .ok()
        .filter(|v| *v <= edgestream_codec::varint::MAX)
}

/// Checks that a comma-separated list has at most `max` non-empty entries, without parsing
/// any of them (the count stops at `max + 1`).
fn bounded_entries(s: &str, max: usize) -> Result<impl Iterator<Item = &str>, ModelError> {
    let entries = || s.split(',').map(str::trim).filter(|e| !e.is_empty());
    if entries().nth(max).is_some() {
        return Err(ModelError::TooMany(max));
    }
    Ok(entries())
}

/// Parses a `since` list: comma-separated `org:epoch:seq`, at most `max` entries. Empty
/// entries are skipped; an org named twice is an error.
pub fn parse_since_list(s: &str, max: usize) -> Result<Vec<(OrgId, Position)>, ModelError> {
    let mut out: Vec<(OrgId, Position)> = Vec::new();
    let mut seen = std::collections::HashSet::new();
    for entry in bounded_entries(s, max)? {
        let (org, pos) = entry
            .split_once(':')
            .ok_or_else(|| ModelError::Since(truncate(entry)))?;
        let org = OrgId::parse(org)?;
        let pos = Position::parse(pos).map_err(|_| ModelError::Since(truncate(entry)))?;
        if !seen.insert(org.clone()) {
            return Err(ModelError::Since(truncate(entry)));
        }
        out.push((org, pos));
    }
    Ok(out)
}

/// Parses a comma-separated org list of at most `max` entries, keeping the first occurrence
/// of each.
pub fn parse_org_list(s: &str, max: usize) -> Result<Vec<OrgId>, ModelError> {
    let mut out: Vec<OrgId> = Vec::new();
    let mut seen = std::collections::HashSet::new();
    for o in bounded_entries(s, max)? {
        let org = OrgId::parse(o)?;
        if seen.insert(org.clone()) {
            out.push(org);
        }
    }
    Ok(out)
}

/// Bounds user input echoed in error messages.
fn truncate(s: &str) -> String {
    s.chars().take(80).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn org_ids() {
        assert!(OrgId::parse("acme").is_ok());
        assert!(OrgId::parse("a.b-c_D9").is_ok());
        assert!(OrgId::parse(&"x".repeat(64)).is_ok());
        for bad in ["", "a b", "a:b", "é", "a,b", "a/b", &"x".repeat(65)] {
            assert!(OrgId::parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn epochs_and_positions() {
        let e = Epoch::random();
        assert!(Epoch::parse(e.as_str()).is_ok());
        assert!(Epoch::parse("a.b").is_err());
        assert!(Epoch::parse(&"x".repeat(33)).is_err());
        let p = Position::parse("k3x9:41").unwrap();
        assert_eq!((p.epoch.as_str(), p.seq), ("k3x9", 41));
        for bad in [
            "k3x9",
            "k3x9:",
            ":4",
            "k3x9:-1",
            "k3x9:+1",
            "k3x9:99999999999999999999",
            "a:b:1",
        ] {
            assert!(Position::parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn since_lists() {
        let l = parse_since_list("acme:k3x9:41, beta:zz:0,", 64).unwrap();
        assert_eq!(l.len(), 2);
        assert_eq!(l[1].0.as_str(), "beta");
        assert!(parse_since_list("acme:k3x9", 64).is_err());
        assert!(parse_since_list("acme:k3x9:1,acme:k3x9:2", 64).is_err());
        assert!(parse_since_list("", 64).unwrap().is_empty());
        assert_eq!(parse_org_list("a,b,a", 64).unwrap().len(), 2);
        assert!(parse_org_list("a,b c", 64).is_err());
        assert_eq!(parse_org_list("a,b,c", 2), Err(ModelError::TooMany(2)));
        assert_eq!(parse_org_list("a,,b,", 2).unwrap().len(), 2);
    }
}
