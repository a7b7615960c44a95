//! Presence shared by the nodes of one Redis (`--redis`, `--redis-cluster`).
//!
//! Each node publishes its own sessions per (org, room, user); one Lua script keeps the
//! combined view, records each change of it (a user's first session anywhere, or last) as
//! pending, and sends the pending changes of an org as batches (and the snapshots a node asked
//! for) on the org's signal stream, at most once per presence interval (the script keeps the
//! time of the org's last flush, on the Redis clock, so the throttle holds whichever node
//! flushes). Every node following the org reads that stream beside its events
//! (`crate::log::redis::signal_key`) and hands each batch to its listeners: every node sends
//! the same batches in the same order, with the combined `online` figure.
//!
//! A script run that finds the org's batch throttled answers how long until it may go; the
//! writer runs `flush` for the org then (whichever node made the change, so a dead node's
//! pending changes are sent by the node whose script run reaped it).
//!
//! ## Layout (hash tag `{org}`, like the log's keys, so one slot holds an org)
//! - `es:presence:nodes` (one key for all orgs): sorted set, node id -> deadline (ms, Redis
//!   clock). Each node moves its own deadline to now + ttl every ttl/3: one command per node,
//!   however many orgs it serves (`REGISTER`), and reads back the live ones.
//! - `es:{org}:pl`: sorted set, node id -> its last write to the org (ms, Redis clock). Every
//!   script run for the org is given the live nodes as the registry last said (and when that
//!   was read): a node with entries here that is not live, and wrote here before that read,
//!   is dead (or cut off), and its sessions are removed as if they had left. A node that was
//!   not yet in the registry when it was read wrote here after the read, so it is kept ("before"
//!   allows [`SKEW_MS`] between the clocks of two Redis Cluster primaries). When a node sees
//!   a peer drop out of the registry, it runs the script for every org it has sessions in at
//!   each tick for the next [`SKEW_MS`] + ttl/3, so the dead node's users leave everywhere
//!   within about ttl + ttl/3 + 1 s of its last refresh.
//! - `es:{org}:pn:<node>`: hash `room\x1fuser` -> that node's sessions;
//! - `es:{org}:pu`: hash `room\x1fuser` -> sessions on all nodes;
//! - `es:{org}:pm:<room>`: set of the users present (`pm:` with no room: the org);
//! - `es:{org}:pc`: hash `room\x1fm` (messages), `room\x1ft` (last message time);
//! - `es:{org}:pr`: set of rooms with a pending batch; `es:{org}:pd:<room>`: hash user ->
//!   present at the last batch (1/0), for the users that flipped since; `es:{org}:po`: hash
//!   room -> `online` as last sent; `es:{org}:pw`: rooms a node wants a snapshot of;
//!   `es:{org}:pt`: the last flush (ms), living one interval;
//! - the signal stream, capped at about 1000 entries, one batch or snapshot per entry
//!   ([`crate::note::Signal`]).
//!
//! Keys expire an hour after their last write, so an org every node has left disappears.
//!
//! ## Order and failures
//! Changes go to one writer task per node, in the order they happened (queued under the
//! registry lock). The node's whole state of an org (`sync`) is sent to repair: for an org
//! whose change failed; for every org when the registry did not know this node as live (its
//! first refresh, a Redis restart, a cut-off long enough for its peers to count it dead); and
//! for each org once per [`AUDIT`] (a slice of the orgs at each tick), which keeps its keys
//! from expiring and repairs what a failover to a stale replica lost. A change older than the
//! last sync of its org is skipped (the sync already holds it). An idle node with N orgs thus
//! sends one command per ttl/3 plus N per [`AUDIT`], not N per ttl/3. Reads
//! (JOIN's member list, the HTTP routes) go through the same queue, so a session that joins
//! sees itself.

use std::collections::{HashMap, HashSet};
use std::sync::Weak;
use std::time::Duration;

use redis::Script;
use tokio::sync::{mpsc, oneshot};

use super::{Batching, Presence, RoomView};
use crate::log::redis::{signal_key, Conn};
use crate::model::OrgId;

const SEP: char = '\u{1f}';

/// How long a read waits for the writer before the node answers with its own view.
const READ_TIMEOUT: Duration = Duration::from_secs(5);

/// Keys of an org outlive their last write by this much.
const KEEP_MS: u64 = 3_600_000;

/// Every org's state is sent again once per this (well within [`KEEP_MS`]).
const AUDIT: Duration = Duration::from_secs(600);

/// How far apart the clocks of two Redis primaries may be (the script's `SKEW_MS`).
const SKEW_MS: u64 = 1000;

/// The node registry, one key for every org.
const NODES_KEY: &str = "es:presence:nodes";

/// KEYS = the registry; ARGV = node, ttl ms. Refreshes this node's deadline, drops nodes past
/// theirs, returns {now (ms), 1 if this node was live already else 0, live node ids}.
const REGISTER: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local was = tonumber(redis.call('ZSCORE', KEYS[1], ARGV[1]) or '0')
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[1])
return {now, was > now and 1 or 0, redis.call('ZRANGE', KEYS[1], 0, -1)}
"#;

/// KEYS = the org's node set, signal stream; ARGV = key prefix `es:{org}:`, node, keep ms,
/// live nodes (comma-separated; `?`: unknown), when the registry said so (ms), op, presence
/// interval ms, member limit, op arguments: `set` entry sessions | `sync` (entry sessions)... |
/// `want` room | `flush` | `reap` | `chat` room ts | `read` room. The first five return the ms
/// until the org's pending batch may be sent (0: nothing pending); `read` returns
/// {{user, sessions, ...}, messages, last message ts}.
const PRESENCE: &str = r#"
local SKEW_MS = 1000
local p, node, keep, live, since, op = ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5], ARGV[6]
local interval, limit = tonumber(ARGV[7]), tonumber(ARGV[8])
local SEP = '\31'
local nodes, signals = KEYS[1], KEYS[2]
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)

-- A batch ('b') or snapshot ('s') on the signal stream (crate::note::Signal's format).
local function emit(kind, online, room, changes)
  local parts = {kind, SEP, online, SEP, room, SEP}
  for i = 1, #changes, 2 do
    local u = changes[i]
    table.insert(parts, changes[i + 1] .. string.len(u) .. ':' .. u)
  end
  redis.call('XADD', signals, 'MAXLEN', '~', 1000, '*', 'd', table.concat(parts))
  redis.call('PEXPIRE', signals, keep)
  -- Wakes the org's followers on every node (crate::log::wakes: the events stream's channel).
  redis.call('PUBLISH', p .. 's', 'signal')
end

local function pending(room)
  redis.call('SADD', p .. 'pr', room)
  redis.call('PEXPIRE', p .. 'pr', keep)
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
  local flipped
  if total <= 0 then
    redis.call('HDEL', p .. 'pu', ru)
    flipped = redis.call('SREM', mk, user) == 1
  else
    flipped = redis.call('SADD', mk, user) == 1
    redis.call('PEXPIRE', mk, keep)
  end
  if flipped then
    -- Whether the user was present at the last batch: the opposite of now, at the first flip.
    local dk = p .. 'pd:' .. room
    redis.call('HSETNX', dk, user, total <= 0 and '1' or '0')
    redis.call('PEXPIRE', dk, keep)
    pending(room)
  end
end

local function sorted(room)
  local all = redis.call('SMEMBERS', p .. 'pm:' .. room)
  table.sort(all)
  return all
end

-- Sends the org's pending batches (one per room with changes, then the snapshots asked for),
-- at most once per interval; returns the ms until it may, or 0.
local function flush()
  local rooms = redis.call('SMEMBERS', p .. 'pr')
  if #rooms == 0 then return 0 end
  local last = tonumber(redis.call('GET', p .. 'pt') or '0')
  if now < last + interval then return last + interval - now end
  redis.call('SET', p .. 'pt', now, 'PX', math.max(interval, 1))
  redis.call('DEL', p .. 'pr')
  table.sort(rooms)
  for _, room in ipairs(rooms) do
    local mk, dk = p .. 'pm:' .. room, p .. 'pd:' .. room
    local online = redis.call('SCARD', mk)
    local was = tonumber(redis.call('HGET', p .. 'po', room) or '0')
    local changes = nil
    if online > limit then
      if online ~= was then changes = {} end
    elseif was > limit then
      changes = {}
      for _, u in ipairs(sorted(room)) do
        table.insert(changes, u)
        table.insert(changes, '1')
      end
    else
      local d = redis.call('HGETALL', dk)
      local users = {}
      for j = 1, #d, 2 do
        local present = redis.call('SISMEMBER', mk, d[j]) == 1
        if present ~= (d[j + 1] == '1') then table.insert(users, d[j]) end
      end
      if #users > 0 then
        table.sort(users)
        changes = {}
        for _, u in ipairs(users) do
          table.insert(changes, u)
          table.insert(changes, redis.call('SISMEMBER', mk, u) == 1 and '1' or '0')
        end
      end
    end
    redis.call('DEL', dk)
    if online > 0 then
      redis.call('HSET', p .. 'po', room, online)
      redis.call('PEXPIRE', p .. 'po', keep)
    else
      redis.call('HDEL', p .. 'po', room)
    end
    if changes then emit('b', online, room, changes) end
    if redis.call('SREM', p .. 'pw', room) == 1 then
      local snap = {}
      if online <= limit then
        for _, u in ipairs(sorted(room)) do
          table.insert(snap, u)
          table.insert(snap, '1')
        end
      end
      emit('s', online, room, snap)
    end
  end
  return 0
end

-- Nodes out of the registry that wrote here before it was read leave with their sessions.
if live ~= '?' then
  local up = {}
  for id in string.gmatch(live, '[^,]+') do up[id] = true end
  for _, n in ipairs(redis.call('ZRANGEBYSCORE', nodes, '-inf', '(' .. (since - SKEW_MS))) do
    if not up[n] then
      local nk = p .. 'pn:' .. n
      for _, ru in ipairs(redis.call('HKEYS', nk)) do set(n, ru, 0) end
      redis.call('DEL', nk)
      redis.call('ZREM', nodes, n)
    end
  end
end

local function alive()
  redis.call('ZADD', nodes, now, node)
  for _, k in ipairs({nodes, p .. 'pn:' .. node, p .. 'pu'}) do redis.call('PEXPIRE', k, keep) end
end

if op == 'set' then
  set(node, ARGV[9], tonumber(ARGV[10]))
  alive()
  return flush()
elseif op == 'reap' or op == 'flush' then
  return flush()
elseif op == 'want' then
  redis.call('SADD', p .. 'pw', ARGV[9])
  redis.call('PEXPIRE', p .. 'pw', keep)
  pending(ARGV[9])
  return flush()
elseif op == 'sync' then
  local want = {}
  for i = 9, #ARGV, 2 do want[ARGV[i]] = tonumber(ARGV[i + 1]) end
  for _, ru in ipairs(redis.call('HKEYS', p .. 'pn:' .. node)) do
    if not want[ru] then set(node, ru, 0) end
  end
  local any = false
  for ru, s in pairs(want) do set(node, ru, s); any = true end
  if any then alive() else redis.call('ZREM', nodes, node) end
  return flush()
elseif op == 'chat' then
  local k = p .. 'pc'
  redis.call('HINCRBY', k, ARGV[9] .. SEP .. 'm', 1)
  local last = tonumber(redis.call('HGET', k, ARGV[9] .. SEP .. 't') or '0')
  if tonumber(ARGV[10]) > last then redis.call('HSET', k, ARGV[9] .. SEP .. 't', ARGV[10]) end
  redis.call('PEXPIRE', k, keep)
  return 1
end
local room = ARGV[9]
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
    Want {
        org: OrgId,
        room: String,
    },
    Read {
        org: OrgId,
        room: String,
        after: Option<String>,
        limit: usize,
        reply: oneshot::Sender<Result<RoomView, String>>,
    },
}

/// This node's side of shared presence: the queue to its writer task.
pub(super) struct Shared {
    tx: mpsc::UnboundedSender<Op>,
}

impl Shared {
    /// Starts the writer; it ends when the registry is dropped, after the changes queued.
    pub(super) fn start(
        conn: Conn,
        ttl: Duration,
        batching: Batching,
        presence: Weak<Presence>,
    ) -> Shared {
        let (tx, rx) = mpsc::unbounded_channel();
        let writer = Writer {
            conn,
            script: Script::new(PRESENCE),
            register: Script::new(REGISTER),
            node: crate::model::Epoch::random().as_str().to_string(),
            ttl,
            batching,
            live: None,
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

    /// A session of this node waits for a snapshot of (org, room).
    pub(super) fn want(&self, org: &OrgId, room: &str) {
        let _ = self.tx.send(Op::Want {
            org: org.clone(),
            room: room.to_string(),
        });
    }

    pub(super) fn record_chat(&self, org: &OrgId, room: &str, ts: u64) {
        let _ = self.tx.send(Op::Chat {
            org: org.clone(),
            room: room.to_string(),
            ts,
        });
    }

    pub(super) async fn read(
        &self,
        org: &OrgId,
        room: &str,
        after: Option<&str>,
        limit: usize,
    ) -> Result<RoomView, String> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Op::Read {
                org: org.clone(),
                room: room.to_string(),
                after: after.map(str::to_string),
                limit,
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
    register: Script,
    node: String,
    ttl: Duration,
    batching: Batching,
    /// The live nodes as the registry last said (comma-separated), and when (ms, Redis
    /// clock); `None` while the registry cannot be read.
    live: Option<(String, u64)>,
}

/// The orgs whose whole state a tick sends: all after a lapse of the registry, else those whose
/// change failed and this tick's audit slice.
struct Due {
    full: bool,
    dirty: HashSet<OrgId>,
    slice: u64,
    slices: u64,
}

impl Due {
    /// Takes the tick's repairs out of `books`.
    fn take(books: &mut Books, ttl: Duration) -> Due {
        let slices = (AUDIT.as_millis() / (ttl / 3).as_millis().max(1)).max(1) as u64;
        Due {
            full: std::mem::take(&mut books.repair),
            dirty: std::mem::take(&mut books.dirty),
            slice: books.ticks % slices,
            slices,
        }
    }

    fn includes(&self, org: &OrgId) -> bool {
        use std::hash::BuildHasher;
        // A fixed hasher: an org stays in its slice.
        let audit = || {
            std::hash::BuildHasherDefault::<std::collections::hash_map::DefaultHasher>::default()
                .hash_one(org.as_str())
                % self.slices
                == self.slice
        };
        self.full || self.dirty.contains(org) || audit()
    }
}

/// What the writer keeps between ticks.
#[derive(Default)]
struct Books {
    /// Changes at or below an org's floor are in its last successful sync.
    floors: HashMap<OrgId, u64>,
    /// Orgs where Redis may hold entries of this node.
    placed: HashSet<OrgId>,
    /// Orgs whose last change failed: synced at the next tick.
    dirty: HashSet<OrgId>,
    /// The peers the registry last counted live.
    peers: HashSet<String>,
    /// Until then (ms, registry clock) every org is run once per tick: a peer died.
    reap_until: u64,
    /// Ticks so far; the orgs of slice `ticks % slices` are audited at each.
    ticks: u64,
    /// Every org is synced at the next tick (the registry did not know this node as live).
    repair: bool,
    /// Orgs whose batch waits for the end of their interval, and when to flush them.
    due: std::collections::BinaryHeap<std::cmp::Reverse<(tokio::time::Instant, OrgId)>>,
    waiting: HashSet<OrgId>,
}

impl Books {
    /// A script run answered `delay_ms` until the org's pending batch may go (0: none).
    fn after(&mut self, org: &OrgId, reply: &Result<redis::Value, redis::RedisError>) {
        let delay: u64 = match reply {
            Ok(v) => redis::from_redis_value(v.clone()).unwrap_or(0),
            Err(_) => return,
        };
        if delay > 0 && self.waiting.insert(org.clone()) {
            let at = tokio::time::Instant::now() + Duration::from_millis(delay);
            self.due.push(std::cmp::Reverse((at, org.clone())));
        }
    }

    fn next_due(&self) -> Option<tokio::time::Instant> {
        self.due.peek().map(|std::cmp::Reverse((at, _))| *at)
    }
}

impl Writer {
    async fn run(mut self, mut rx: mpsc::UnboundedReceiver<Op>, presence: Weak<Presence>) {
        let mut tick = tokio::time::interval(self.ttl / 3);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut books = Books {
            repair: true,
            ..Books::default()
        };
        // Registered before the first write, so that no peer mistakes this node's first
        // entries for a dead node's (see the module's layout).
        tick.tick().await;
        self.register(&mut books).await;
        loop {
            let next = books.next_due();
            tokio::select! {
                op = rx.recv() => match op {
                    Some(op) => self.apply(op, &mut books).await,
                    None => return,
                },
                () = tokio::time::sleep_until(next.unwrap_or_else(tokio::time::Instant::now)), if next.is_some() => {
                    let now = tokio::time::Instant::now();
                    while books.next_due().is_some_and(|at| at <= now) {
                        let Some(std::cmp::Reverse((_, org))) = books.due.pop() else { break };
                        books.waiting.remove(&org);
                        let reply = self.call(&org, "flush", &[]).await;
                        books.after(&org, &reply);
                    }
                }
                _ = tick.tick() => {
                    while let Ok(op) = rx.try_recv() {
                        self.apply(op, &mut books).await;
                    }
                    let died = self.register(&mut books).await;
                    books.ticks += 1;
                    let due = Due::take(&mut books, self.ttl);
                    let Some(p) = presence.upgrade() else { return };
                    // Only the orgs this tick touches are copied out (every org only when a
                    // peer died or the node must repair all).
                    let (generation, orgs) = p.snapshot(|org| died || due.includes(org));
                    drop(p);
                    self.repair(&mut books, &due, generation, orgs, died).await;
                }
            }
        }
    }

    /// Refreshes this node in the registry; returns whether a peer dropped out of it lately
    /// (so its users must be made to leave this node's orgs).
    async fn register(&mut self, books: &mut Books) -> bool {
        let reply: Result<(u64, u8, Vec<String>), _> = self
            .register
            .key(NODES_KEY)
            .arg(&self.node)
            .arg(self.ttl.as_millis() as u64)
            .invoke_async(&mut self.conn.clone())
            .await;
        match reply {
            Ok((now, was_live, ids)) => {
                books.repair |= was_live == 0;
                let peers: HashSet<String> = ids.iter().cloned().collect();
                if books.peers.iter().any(|n| !peers.contains(n)) {
                    books.reap_until = now + SKEW_MS + self.ttl.as_millis() as u64 / 3;
                }
                books.peers = peers;
                self.live = Some((ids.join(","), now));
                now <= books.reap_until
            }
            Err(e) => {
                tracing::debug!(error = %e, "presence registry unreadable; repairs when it answers");
                self.live = None;
                books.repair = true;
                false
            }
        }
    }

    /// Syncs what needs it: every org after a lapse of the registry, else the orgs whose
    /// change failed and this tick's audit slice; with `died`, every other org of this node is
    /// run once more, so that the dead peer's users leave it.
    async fn repair(
        &self,
        books: &mut Books,
        due: &Due,
        generation: u64,
        orgs: HashMap<OrgId, Vec<(String, u32)>>,
        died: bool,
    ) {
        let full = due.full;
        let due = |org: &OrgId| due.includes(org);
        let mut failed = false;
        let gone: Vec<OrgId> = books
            .placed
            .iter()
            .filter(|o| !orgs.contains_key(*o) && due(o))
            .cloned()
            .collect();
        for org in gone {
            match self.sync(books, &org, &[]).await {
                Ok(()) => {
                    books.placed.remove(&org);
                    books.floors.remove(&org);
                }
                Err(_) => {
                    failed = true;
                    books.dirty.insert(org);
                }
            }
        }
        for (org, entries) in orgs {
            let result = if due(&org) {
                books.placed.insert(org.clone());
                self.sync(books, &org, &entries).await.map(|()| true)
            } else if died {
                let reply = self.call(&org, "reap", &[]).await;
                books.after(&org, &reply);
                reply.map(|_| false)
            } else {
                continue;
            };
            match result {
                Ok(true) => {
                    books.floors.insert(org, generation);
                }
                Ok(false) => {}
                Err(_) => {
                    failed = true;
                    books.dirty.insert(org);
                }
            }
        }
        if failed && full {
            books.repair = true;
        }
    }

    async fn apply(&self, op: Op, books: &mut Books) {
        match op {
            Op::Set {
                org,
                entry,
                sessions,
                generation,
            } => {
                if books.floors.get(&org).is_some_and(|f| generation <= *f) {
                    return;
                }
                books.placed.insert(org.clone());
                let args = [entry, sessions.to_string()];
                let reply = self.call(&org, "set", &args).await;
                books.after(&org, &reply);
                if let Err(e) = reply {
                    tracing::debug!(org = %org, error = %e, "presence change not shared yet");
                    books.dirty.insert(org);
                }
            }
            Op::Want { org, room } => {
                let reply = self.call(&org, "want", std::slice::from_ref(&room)).await;
                books.after(&org, &reply);
                if let Err(e) = reply {
                    // The session waits for its snapshot until a later flush of the room
                    // carries one; the next want (another session) or sync asks again.
                    tracing::debug!(org = %org, error = %e, "presence snapshot not asked for");
                }
            }
            Op::Chat { org, room, ts } => {
                if let Err(e) = self.call(&org, "chat", &[room, ts.to_string()]).await {
                    tracing::debug!(org = %org, error = %e, "room figures not shared");
                }
            }
            Op::Read {
                org,
                room,
                after,
                limit,
                reply,
            } => {
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
                        Ok(page(
                            members,
                            after.as_deref(),
                            limit,
                            messages,
                            last_message_ts,
                        ))
                    })
                    .map_err(|e| e.to_string());
                let _ = reply.send(view);
            }
        }
    }

    async fn sync(
        &self,
        books: &mut Books,
        org: &OrgId,
        entries: &[(String, u32)],
    ) -> Result<(), redis::RedisError> {
        let args: Vec<String> = entries
            .iter()
            .flat_map(|(e, n)| [e.clone(), n.to_string()])
            .collect();
        let reply = self.call(org, "sync", &args).await;
        books.after(org, &reply);
        reply.map(drop).inspect_err(|e| {
            tracing::debug!(org = %org, error = %e, "presence sync failed; a later tick retries");
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
            .arg(KEEP_MS)
            .arg(self.live.as_ref().map_or("?", |(ids, _)| ids.as_str()))
            .arg(self.live.as_ref().map_or(0, |(_, at)| *at))
            .arg(op)
            .arg(self.batching.interval.as_millis() as u64)
            .arg(self.batching.max_members);
        for a in args {
            call.arg(a);
        }
        call.invoke_async(&mut conn).await
    }
}

/// One page of a sorted member list (byte order, as the embedded registry pages).
fn page(
    members: Vec<(String, u32)>,
    after: Option<&str>,
    limit: usize,
    messages: u64,
    last_message_ts: u64,
) -> RoomView {
    let online = members.len() as u64;
    let start = after.map_or(0, |a| members.partition_point(|(u, _)| u.as_str() <= a));
    let mut members: Vec<(String, u32)> = members.into_iter().skip(start).take(limit + 1).collect();
    let next = (members.len() > limit).then(|| {
        members.truncate(limit);
        members[limit - 1].0.clone()
    });
    RoomView {
        online,
        members,
        next,
        messages,
        last_message_ts,
    }
}
