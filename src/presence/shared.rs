//! Presence shared by the nodes of one Redis (`--redis`, `--redis-cluster`).
//!
//! Each node publishes its own sessions per (org, room, user); one Lua script keeps the
//! combined view and announces each change of it (a user's first session anywhere, or last)
//! on the org's signal stream, which every node following the org reads beside its events
//! (`crate::log::redis::signal_key`) and hands to its subscribers as PRESENCE. Every node
//! therefore sends the same changes in the same order, with the combined `online` figure.
//!
//! ## Layout (hash tag `{org}`, like the log's keys, so one slot holds an org)
//! - `es:{org}:pl`: sorted set, node id -> deadline (ms, Redis clock). A node with anyone
//!   present in the org moves its deadline to now + ttl every ttl/3 (a `sync`). A node that
//!   misses its deadline (dead, cut off) is expired by the next script run for the org: its
//!   sessions are removed as if they had left, so its users leave everywhere within
//!   ttl + ttl/3 of its last refresh.
//! - `es:{org}:pn:<node>`: hash `room\x1fuser` -> that node's sessions;
//! - `es:{org}:pu`: hash `room\x1fuser` -> sessions on all nodes;
//! - `es:{org}:pm:<room>`: set of the users present (`pm:` with no room: the org);
//! - `es:{org}:pc`: hash `room\x1fm` (messages), `room\x1ft` (last message time);
//! - the signal stream, capped at about 1000 entries: `joined\x1fonline\x1froom\x1fuser`.
//!
//! Keys expire an hour after their last write, so an org every node has left disappears.
//!
//! ## Order and failures
//! Changes go to one writer task per node, in the order they happened (queued under the
//! registry lock). Every ttl/3 the writer also sends the node's whole state per org (`sync`):
//! that refreshes the deadline and repairs whatever a failed command or a Redis restart lost.
//! A change older than the last sync of its org is skipped (the sync already holds it). Reads
//! (JOIN's member list, the HTTP routes) go through the same queue, so a session that joins
//! sees itself.

use std::collections::{HashMap, HashSet};
use std::sync::Weak;
use std::time::Duration;

use redis::Script;
use tokio::sync::{mpsc, oneshot};

use super::{Presence, RoomView};
use crate::log::redis::{signal_key, Conn};
use crate::model::OrgId;

const SEP: char = '\u{1f}';

/// How long a read waits for the writer before the node answers with its own view.
const READ_TIMEOUT: Duration = Duration::from_secs(5);

/// Keys of an org outlive their last write by this much.
const KEEP_MS: u64 = 3_600_000;

/// KEYS = live set, signal stream; ARGV = key prefix `es:{org}:`, node, ttl ms, keep ms, op,
/// op arguments: `set` entry sessions | `sync` (entry sessions)... | `chat` room ts |
/// `read` room. `read` returns {{user, sessions, ...}, messages, last message ts}.
const PRESENCE: &str = r#"
local p, node, ttl, keep, op = ARGV[1], ARGV[2], tonumber(ARGV[3]), ARGV[4], ARGV[5]
local SEP = '\31'
local live, signals = KEYS[1], KEYS[2]
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)

local function announce(room, user, joined, online)
  redis.call('XADD', signals, 'MAXLEN', '~', 1000, '*', 'd',
    joined .. SEP .. online .. SEP .. room .. SEP .. user)
  redis.call('PEXPIRE', signals, keep)
  -- Wakes the org's followers on every node (crate::log::wakes: the events stream's channel).
  redis.call('PUBLISH', p .. 's', 'signal')
end

-- Node n now has s sessions of entry ru (room SEP user).
local function set(n, ru, s)
  local i = string.find(ru, SEP, 1, true)
  if not i then return end
  local room, user = string.sub(ru, 1, i - 1), string.sub(ru, i + 1)
  local mk = p .. 'pm:' .. room
  if s > 0 then redis.call('PEXPIRE', mk, keep) end
  local nk = p .. 'pn:' .. n
  local old = tonumber(redis.call('HGET', nk, ru) or '0')
  if old == s then return end
  if s > 0 then redis.call('HSET', nk, ru, s) else redis.call('HDEL', nk, ru) end
  local total = redis.call('HINCRBY', p .. 'pu', ru, s - old)
  if total <= 0 then
    redis.call('HDEL', p .. 'pu', ru)
    if redis.call('SREM', mk, user) == 1 then announce(room, user, 0, redis.call('SCARD', mk)) end
  elseif redis.call('SADD', mk, user) == 1 then
    redis.call('PEXPIRE', mk, keep)
    announce(room, user, 1, redis.call('SCARD', mk))
  end
end

-- Nodes past their deadline leave with all their sessions.
for _, n in ipairs(redis.call('ZRANGEBYSCORE', live, '-inf', now)) do
  local nk = p .. 'pn:' .. n
  for _, ru in ipairs(redis.call('HKEYS', nk)) do set(n, ru, 0) end
  redis.call('DEL', nk)
  redis.call('ZREM', live, n)
end

local function alive()
  redis.call('ZADD', live, now + ttl, node)
  for _, k in ipairs({live, p .. 'pn:' .. node, p .. 'pu'}) do redis.call('PEXPIRE', k, keep) end
end

if op == 'set' then
  set(node, ARGV[6], tonumber(ARGV[7]))
  alive()
  return 1
elseif op == 'sync' then
  local want = {}
  for i = 6, #ARGV, 2 do want[ARGV[i]] = tonumber(ARGV[i + 1]) end
  for _, ru in ipairs(redis.call('HKEYS', p .. 'pn:' .. node)) do
    if not want[ru] then set(node, ru, 0) end
  end
  local any = false
  for ru, s in pairs(want) do set(node, ru, s); any = true end
  if any then alive() else redis.call('ZREM', live, node) end
  return 1
elseif op == 'chat' then
  local k = p .. 'pc'
  redis.call('HINCRBY', k, ARGV[6] .. SEP .. 'm', 1)
  local last = tonumber(redis.call('HGET', k, ARGV[6] .. SEP .. 't') or '0')
  if tonumber(ARGV[7]) > last then redis.call('HSET', k, ARGV[6] .. SEP .. 't', ARGV[7]) end
  redis.call('PEXPIRE', k, keep)
  return 1
end
local room = ARGV[6]
local members = {}
for _, user in ipairs(redis.call('SMEMBERS', p .. 'pm:' .. room)) do
  table.insert(members, user)
  table.insert(members, redis.call('HGET', p .. 'pu', room .. SEP .. user) or '0')
end
local k = p .. 'pc'
return {members, redis.call('HGET', k, room .. SEP .. 'm') or '0',
  redis.call('HGET', k, room .. SEP .. 't') or '0'}
"#;

/// The `room\x1fuser` field of an entry.
pub(super) fn entry(room: &str, user: &str) -> String {
    format!("{room}{SEP}{user}")
}

/// A signal as (joined, online, room, user); `None` if it is not a presence change.
pub(super) fn decode_signal(data: &[u8]) -> Option<(bool, u64, &str, &str)> {
    let text = std::str::from_utf8(data).ok()?;
    let mut parts = text.splitn(4, SEP);
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

enum Op {
    Set {
        org: OrgId,
        entry: String,
        sessions: u32,
        generation: u64,
    },
    Chat {
        org: OrgId,
        room: String,
        ts: u64,
    },
    Read {
        org: OrgId,
        room: String,
        reply: oneshot::Sender<Result<RoomView, String>>,
    },
}

/// This node's side of shared presence: the queue to its writer task.
pub(super) struct Shared {
    tx: mpsc::UnboundedSender<Op>,
}

impl Shared {
    /// Starts the writer; it ends when the registry is dropped, after the changes queued.
    pub(super) fn start(conn: Conn, ttl: Duration, presence: Weak<Presence>) -> Shared {
        let (tx, rx) = mpsc::unbounded_channel();
        let writer = Writer {
            conn,
            script: Script::new(PRESENCE),
            node: crate::model::Epoch::random().as_str().to_string(),
            ttl,
        };
        tokio::spawn(writer.run(rx, presence));
        Shared { tx }
    }

    pub(super) fn set(&self, org: &OrgId, room: &str, user: &str, sessions: u32, generation: u64) {
        let _ = self.tx.send(Op::Set {
            org: org.clone(),
            entry: entry(room, user),
            sessions,
            generation,
        });
    }

    pub(super) fn record_chat(&self, org: &OrgId, room: &str, ts: u64) {
        let _ = self.tx.send(Op::Chat {
            org: org.clone(),
            room: room.to_string(),
            ts,
        });
    }

    pub(super) async fn read(&self, org: &OrgId, room: &str) -> Result<RoomView, String> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Op::Read {
                org: org.clone(),
                room: room.to_string(),
                reply,
            })
            .map_err(|_| "presence writer stopped".to_string())?;
        match tokio::time::timeout(READ_TIMEOUT, rx).await {
            Ok(Ok(r)) => r,
            Ok(Err(_)) => Err("presence writer stopped".into()),
            Err(_) => Err("presence read timed out".into()),
        }
    }
}

struct Writer {
    conn: Conn,
    script: Script,
    node: String,
    ttl: Duration,
}

impl Writer {
    async fn run(self, mut rx: mpsc::UnboundedReceiver<Op>, presence: Weak<Presence>) {
        let mut tick = tokio::time::interval(self.ttl / 3);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // Changes at or below an org's floor are in its last successful sync.
        let mut floors: HashMap<OrgId, u64> = HashMap::new();
        // Orgs where Redis may hold entries of this node.
        let mut placed: HashSet<OrgId> = HashSet::new();
        loop {
            tokio::select! {
                op = rx.recv() => match op {
                    Some(op) => self.apply(op, &floors, &mut placed).await,
                    None => return,
                },
                _ = tick.tick() => {
                    while let Ok(op) = rx.try_recv() {
                        self.apply(op, &floors, &mut placed).await;
                    }
                    let Some(p) = presence.upgrade() else { return };
                    let (generation, orgs) = p.snapshot();
                    drop(p);
                    floors.clear();
                    let gone: Vec<OrgId> =
                        placed.iter().filter(|o| !orgs.contains_key(*o)).cloned().collect();
                    for org in gone {
                        if self.sync(&org, &[]).await.is_ok() {
                            placed.remove(&org);
                        }
                    }
                    for (org, entries) in orgs {
                        placed.insert(org.clone());
                        if self.sync(&org, &entries).await.is_ok() {
                            floors.insert(org, generation);
                        }
                    }
                }
            }
        }
    }

    async fn apply(&self, op: Op, floors: &HashMap<OrgId, u64>, placed: &mut HashSet<OrgId>) {
        match op {
            Op::Set {
                org,
                entry,
                sessions,
                generation,
            } => {
                if floors.get(&org).is_some_and(|f| generation <= *f) {
                    return;
                }
                placed.insert(org.clone());
                let args = [entry, sessions.to_string()];
                if let Err(e) = self.call(&org, "set", &args).await {
                    tracing::debug!(org = %org, error = %e, "presence change not shared yet");
                }
            }
            Op::Chat { org, room, ts } => {
                if let Err(e) = self.call(&org, "chat", &[room, ts.to_string()]).await {
                    tracing::debug!(org = %org, error = %e, "room figures not shared");
                }
            }
            Op::Read { org, room, reply } => {
                let view = self
                    .call(&org, "read", std::slice::from_ref(&room))
                    .await
                    .and_then(|v| {
                        let (pairs, messages, last_message_ts): (Vec<String>, u64, u64) =
                            redis::from_redis_value(v)?;
                        let mut members: Vec<(String, u32)> = pairs
                            .chunks(2)
                            .map(|kv| {
                                let sessions = kv.get(1).and_then(|n| n.parse().ok());
                                (kv[0].clone(), sessions.unwrap_or(0))
                            })
                            .collect();
                        members.sort();
                        Ok(RoomView {
                            members,
                            messages,
                            last_message_ts,
                        })
                    })
                    .map_err(|e| e.to_string());
                let _ = reply.send(view);
            }
        }
    }

    async fn sync(&self, org: &OrgId, entries: &[(String, u32)]) -> Result<(), redis::RedisError> {
        let args: Vec<String> = entries
            .iter()
            .flat_map(|(e, n)| [e.clone(), n.to_string()])
            .collect();
        self.call(org, "sync", &args)
            .await
            .map(drop)
            .inspect_err(|e| {
                tracing::debug!(org = %org, error = %e, "presence sync failed; next tick retries");
            })
    }

    async fn call(
        &self,
        org: &OrgId,
        op: &str,
        args: &[String],
    ) -> Result<redis::Value, redis::RedisError> {
        let mut conn = self.conn.clone();
        let mut call = self.script.prepare_invoke();
        call.key(format!("es:{{{org}}}:pl"))
            .key(signal_key(org))
            .arg(format!("es:{{{org}}}:"))
            .arg(&self.node)
            .arg(self.ttl.as_millis() as u64)
            .arg(KEEP_MS)
            .arg(op);
        for a in args {
            call.arg(a);
        }
        call.invoke_async(&mut conn).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signals_round_trip_users_with_separators() {
        let data = format!("1{SEP}3{SEP}lobby{SEP}a{SEP}b");
        assert_eq!(
            decode_signal(data.as_bytes()),
            Some((true, 3, "lobby", &*format!("a{SEP}b")))
        );
        assert_eq!(decode_signal(b"2\x1f1\x1fr\x1fu"), None);
        assert_eq!(decode_signal(b"1\x1fx\x1fr\x1fu"), None);
        assert_eq!(decode_signal(b"1\x1f1\x1fr"), None);
    }
}
