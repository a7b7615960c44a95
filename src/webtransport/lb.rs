//! Edge deployment behind UDP load balancers: connection IDs that carry this node's server id
//! (the plaintext algorithm of the IETF QUIC-LB draft), and a stateless-reset key shared by
//! the nodes.
//!
//! A CID is `first octet | server id | nonce`. The first octet holds the config rotation
//! codepoint (top 3 bits, 0 here) and the CID length minus one (low 5 bits, "length
//! self-encoding"); the server id is copied as configured; the nonce (8 bytes) is random. A
//! CID-aware balancer reads the server id at a fixed offset and routes every packet of a
//! connection to its node, even after the client's address changes.
//!
//! With a shared `--reset-key`, every node derives the same stateless-reset token for a CID,
//! so a node that receives a packet for a connection it does not know (its owner died and the
//! balancer sent the packet elsewhere) resets it at once, and the client reconnects instead of
//! waiting for its idle timeout.
//!
//! That makes every node an oracle for its peers' tokens (RFC 9000 section 21.11): anyone who
//! sends node B a packet with a CID of live node A gets back the token that ends A's
//! connection. So which CIDs a node resets ([`LbCidGenerator`]'s `validate`, which quinn asks
//! before answering an unknown CID) is: its own server id (a CID-aware balancer routes those
//! here; unknown ones are connections of an earlier run), or the server id of a peer known to
//! be dead: [`Peers`] holds the server ids alive in the shared registry (`crate::peers`,
//! Redis), and a CID of any of them is never reset. Without a registry, or while it cannot be
//! read, only the node's own CIDs are.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use parking_lot::RwLock;

use quinn_proto::{ConnectionId, ConnectionIdGenerator, InvalidCid};
use rand::RngCore as _;

/// Random bytes after the server id.
pub const NONCE_LEN: usize = 8;
/// The config rotation codepoint written in the first octet.
const CONFIG_ROTATION: u8 = 0;

/// The server ids of the peers alive now, as the shared registry last said (`None`: no
/// registry, or it could not be read lately).
#[derive(Debug, Default)]
pub struct Peers {
    alive: RwLock<Option<HashSet<Vec<u8>>>>,
}

impl Peers {
    pub fn new() -> Arc<Self> {
        Arc::new(Peers::default())
    }

    /// What the registry says now (`None`: it could not be read).
    pub fn set(&self, alive: Option<HashSet<Vec<u8>>>) {
        *self.alive.write() = alive;
    }

    /// Whether `server_id` is known to be dead (or unknown) rather than alive or unsure.
    fn may_reset(&self, server_id: &[u8]) -> bool {
        self.alive
            .read()
            .as_ref()
            .is_some_and(|alive| !alive.contains(server_id))
    }
}

/// Generates QUIC-LB plaintext CIDs for one server id.
#[derive(Debug, Clone)]
pub struct LbCidGenerator {
    server_id: Vec<u8>,
    peers: Arc<Peers>,
}

impl LbCidGenerator {
    /// `server_id`: 1 to 11 bytes (the CID stays within QUIC's 20 bytes).
    pub fn new(server_id: Vec<u8>, peers: Arc<Peers>) -> anyhow::Result<Self> {
        anyhow::ensure!(
            (1..=11).contains(&server_id.len()),
            "server id must be 1 to 11 bytes, got {}",
            server_id.len()
        );
        Ok(LbCidGenerator { server_id, peers })
    }

    fn len(&self) -> usize {
        1 + self.server_id.len() + NONCE_LEN
    }

    /// The server id a CID of this format carries, if it is one.
    pub fn server_id_of(cid: &[u8], server_id_len: usize) -> Option<&[u8]> {
        let first = *cid.first()?;
        let len = usize::from(first & 0x1f) + 1;
        (first >> 5 == CONFIG_ROTATION && len == cid.len() && len > server_id_len + NONCE_LEN)
            .then(|| &cid[1..1 + server_id_len])
    }
}

impl ConnectionIdGenerator for LbCidGenerator {
    fn generate_cid(&mut self) -> ConnectionId {
        let len = self.len();
        let mut b = [0u8; 20];
        b[0] = (CONFIG_ROTATION << 5) | ((len - 1) as u8 & 0x1f);
        b[1..1 + self.server_id.len()].copy_from_slice(&self.server_id);
        rand::rng().fill_bytes(&mut b[1 + self.server_id.len()..len]);
        ConnectionId::new(&b[..len])
    }

    /// Whether an unknown connection with this CID may be reset (the oracle rule above).
    fn validate(&self, cid: &ConnectionId) -> Result<(), InvalidCid> {
        match Self::server_id_of(cid, self.server_id.len()) {
            Some(id) if id == self.server_id.as_slice() || self.peers.may_reset(id) => Ok(()),
            _ => Err(InvalidCid),
        }
    }

    fn cid_len(&self) -> usize {
        self.len()
    }

    fn cid_lifetime(&self) -> Option<Duration> {
        None
    }
}

/// The endpoint config: QUIC-LB CIDs when a server id is set, and the reset key (shared when
/// given, random per process otherwise).
pub fn endpoint_config(
    server_id: Option<&[u8]>,
    reset_key: Option<&[u8]>,
    peers: Arc<Peers>,
) -> anyhow::Result<quinn::EndpointConfig> {
    // A shared key with random CIDs would reset every peer's connections on request.
    anyhow::ensure!(
        reset_key.is_none() || server_id.is_some(),
        "a shared reset key needs a server id"
    );
    let mut config = match reset_key {
        Some(k) => {
            anyhow::ensure!(k.len() >= 32, "the reset key must be at least 32 bytes");
            quinn::EndpointConfig::new(Arc::new(ring::hmac::Key::new(ring::hmac::HMAC_SHA256, k)))
        }
        None => quinn::EndpointConfig::default(),
    };
    let cids = node_cids(server_id, peers)?;
    config.cid_generator(move || cids.generator());
    Ok(config)
}

/// The connection IDs this node issues.
#[derive(Debug, Clone)]
enum NodeCids {
    /// QUIC-LB CIDs for a CID-aware balancer.
    Lb(LbCidGenerator),
    /// No server id: 8 random bytes. Not quinn's default (`HashedConnectionIdGenerator`, 3
    /// random bytes and a 5-byte keyed hash): quinn gives a Retry a fresh CID without checking
    /// it against the live ones and routes by live CIDs first, so in a 2^24 space a Retry
    /// sometimes named a live connection's CID and that client's Initials went to the live
    /// connection, which dropped them (docs/PERFORMANCE.md, "Retry in a long storm"). What the
    /// hash bought, not answering non-QUIC packets with a stateless reset, is lost; quinn sends
    /// at most one reset per 20 ms, each smaller than the packet that caused it.
    Random,
}

fn node_cids(server_id: Option<&[u8]>, peers: Arc<Peers>) -> anyhow::Result<NodeCids> {
    Ok(match server_id {
        Some(id) => NodeCids::Lb(LbCidGenerator::new(id.to_vec(), peers)?),
        None => NodeCids::Random,
    })
}

impl NodeCids {
    fn generator(&self) -> Box<dyn ConnectionIdGenerator> {
        match self {
            NodeCids::Lb(g) => Box::new(g.clone()),
            NodeCids::Random => Box::new(quinn_proto::RandomConnectionIdGenerator::new(NONCE_LEN)),
        }
    }
}

/// Parses a server id given in hex (`0a01`).
pub fn parse_server_id(hex: &str) -> Result<Vec<u8>, String> {
    let hex = hex.trim();
    if hex.is_empty() || hex.len() % 2 != 0 || hex.len() > 22 {
        return Err(format!(
            "server id {hex:?}: 1 to 11 bytes as an even number of hex digits"
        ));
    }
    (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).map_err(|e| format!("server id: {e}")))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cids_carry_the_length_and_the_server_id_and_random_nonces() {
        let mut g = LbCidGenerator::new(vec![0x0a, 0x01], Peers::new()).unwrap();
        let (a, b) = (g.generate_cid(), g.generate_cid());
        assert_eq!(a.len(), 1 + 2 + NONCE_LEN);
        assert_eq!(
            usize::from(a[0] & 0x1f) + 1,
            a.len(),
            "length self-encoding"
        );
        assert_eq!(a[0] >> 5, 0, "config rotation 0");
        assert_eq!(&a[1..3], &[0x0a, 0x01]);
        assert_eq!(LbCidGenerator::server_id_of(&b, 2), Some(&[0x0a, 0x01][..]));
        assert_ne!(a[3..], b[3..], "nonces differ");
        assert!(g.validate(&a).is_ok());
        // Another format (a random 8-byte CID) is not ours to reset.
        let mut random = [0u8; 8];
        rand::rng().fill_bytes(&mut random);
        random[0] = 0xff;
        assert!(g.validate(&ConnectionId::new(&random)).is_err());
    }

    /// quinn's default generator draws 3 random bytes (2^24 CIDs), and quinn does not check
    /// a Retry's CID against the live ones: at thousands of connections, a Retry could name
    /// a live connection's CID and the client's next Initial went to that connection.
    #[test]
    fn a_node_without_a_server_id_never_issues_a_cid_twice() {
        let mut g = node_cids(None, Peers::new()).unwrap().generator();
        let draws = 200_000;
        let distinct: HashSet<ConnectionId> = (0..draws).map(|_| g.generate_cid()).collect();
        assert_eq!(distinct.len(), draws, "CIDs issued twice");
    }

    #[test]
    fn a_peers_cids_are_reset_only_once_the_registry_says_it_is_dead() {
        let peers = Peers::new();
        let g = LbCidGenerator::new(vec![0x0a, 0x01], peers.clone()).unwrap();
        let mut other = LbCidGenerator::new(vec![0x0a, 0x02], Peers::new()).unwrap();
        let theirs = other.generate_cid();
        assert!(g.validate(&theirs).is_err(), "no registry: own CIDs only");
        peers.set(Some([vec![0x0a, 0x01], vec![0x0a, 0x02]].into()));
        assert!(g.validate(&theirs).is_err(), "a live peer's CID");
        peers.set(Some([vec![0x0a, 0x01]].into()));
        assert!(g.validate(&theirs).is_ok(), "a dead peer's CID");
        peers.set(None);
        assert!(g.validate(&theirs).is_err(), "registry unreadable");
        let own = LbCidGenerator::new(vec![0x0a, 0x01], Peers::new())
            .unwrap()
            .generate_cid();
        assert!(g.validate(&own).is_ok(), "own CIDs always");
        assert!(endpoint_config(None, Some(&[7; 32]), Peers::new()).is_err());
    }

    #[test]
    fn server_ids_parse_from_hex() {
        assert_eq!(parse_server_id("0a01"), Ok(vec![0x0a, 0x01]));
        assert!(parse_server_id("").is_err());
        assert!(parse_server_id("abc").is_err());
        assert!(parse_server_id("zz").is_err());
        assert!(parse_server_id(&"00".repeat(12)).is_err());
        assert!(LbCidGenerator::new(vec![0; 12], Peers::new()).is_err());
    }
}
