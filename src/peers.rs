//! The registry of live nodes (Redis mode with `--server-id`): each node refreshes its server
//! id in the sorted set `es:nodes` (score: its deadline on the Redis clock) every third of
//! `--node-ttl` and reads the others' back into [`Peers`], which decides whose connection IDs
//! the node may answer with a stateless reset (`webtransport::lb`): never those of a peer
//! that is alive. A node killed without a word drops out once its deadline passes, and from
//! then on its clients' packets, sent by the balancer to a live node, are reset there.

use std::sync::{Arc, Weak};
use std::time::Duration;

use redis::Script;

use crate::log::redis::Conn;
use crate::webtransport::lb::Peers;

const NODES_KEY: &str = "es:nodes";

/// KEYS = the set; ARGV = this node's server id (hex), ttl ms. Drops nodes past their
/// deadline, refreshes this one, returns the live ones.
const REFRESH: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[1])
return redis.call('ZRANGE', KEYS[1], 0, -1)
"#;

/// Keeps this node registered and `peers` current until `peers` is dropped (with the QUIC
/// endpoint that uses it).
pub fn start(conn: Conn, server_id: Vec<u8>, ttl: Duration, peers: &Arc<Peers>) {
    let peers: Weak<Peers> = Arc::downgrade(peers);
    let me = hex(&server_id);
    tokio::spawn(async move {
        let script = Script::new(REFRESH);
        let mut tick = tokio::time::interval(ttl / 3);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let Some(peers) = peers.upgrade() else { return };
            let mut conn = conn.clone();
            let reply: Result<Vec<String>, _> = script
                .key(NODES_KEY)
                .arg(&me)
                .arg(ttl.as_millis() as u64)
                .invoke_async(&mut conn)
                .await;
            match reply {
                Ok(ids) => peers.set(Some(ids.iter().filter_map(|h| unhex(h)).collect())),
                Err(e) => {
                    // Unsure who is alive: reset no peer's connection until it answers again.
                    tracing::debug!(error = %e, "node registry unreadable");
                    peers.set(None);
                }
            }
        }
    });
}

pub(crate) fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn unhex(s: &str) -> Option<Vec<u8>> {
    crate::webtransport::lb::parse_server_id(s).ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    #[test]
    fn ids_round_trip_through_hex() {
        assert_eq!(hex(&[0x0a, 0x01]), "0a01");
        let ids: HashSet<Vec<u8>> = ["0a01", "zz"].iter().filter_map(|h| unhex(h)).collect();
        assert_eq!(ids, [vec![0x0a, 0x01]].into());
    }
}
