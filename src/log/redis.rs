//! The shared log on Redis Streams (`--redis URL`): several nodes share each org's sequencer
//! and replay window, so a client may resume on any node.
//!
//! ## Layout (every key of an org carries the hash tag `{org}`, so Redis Cluster keeps them
//! in one slot and the scripts below touch one slot only)
//! - `es:{org}:m`: a hash with the org's `epoch`, `head` (the last seq assigned) and `conf`
//!   (the last seq confirmed: by `--redis-min-replicas` replicas, or as written without it;
//!   nodes with the flag deliver nothing after it);
//! - `es:{org}:s`: the stream; entry ids are `<seq>-0`, fields `e` (epoch), `t` (ms), `p`
//!   (payload), so a range read by seq is an `XRANGE` by id;
//! - `es:{org}:i:<key>`: an Idempotency-Key's first result, expiring with the replay window.
//!
//! Seqs are assigned by a Lua script (increment and `XADD` in one atomic step), so they stay
//! gap-free whichever node publishes. Retention: by count on every append (`XTRIM MAXLEN`);
//! by time in the scripts themselves, never by a sweep: every append and every state read
//! first drops the org's entries older than the window (a probe of the oldest entry, then
//! `XTRIM MINID`), and every append sets the stream to expire one window after it, so an org
//! nobody touches loses its old entries without a command from any node (its head and epoch,
//! in the meta hash, stay). The byte cap of the embedded log does not apply here.
//!
//! Failures: every command has a response deadline; an error is [`LogError::Unavailable`], so
//! a publish answers 503 and is never acknowledged without being stored. Followers use a
//! connection of their own for blocking reads and are restarted by the hub from their last
//! position.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use parking_lot::Mutex;
use redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use redis::cluster_async::ClusterConnection;
use redis::{Cmd, Pipeline, RedisFuture, Script, Value};

use super::wakes::{Source, Wake, Wakes};
use super::{
    Appended, EventLog, LogError, LogUsage, OrgState, ReadOutcome, Retention, Tail, Tailed,
};
use crate::event::Event;
use crate::model::{Epoch, OrgId, Position};
use crate::time::unix_ms;

/// How long one command may take before the log counts as unavailable.
const RESPONSE_TIMEOUT: Duration = Duration::from_secs(2);
/// Events per follower read.
const TAIL_BATCH: usize = 1024;

/// The fence both scripts run first (KEYS[1] = meta, KEYS[2] = stream): when the org is still
/// in the epoch the calling node knows (`known`) but its head is below the highest seq that
/// node acknowledged or saw under it (`mark`), the store lost events (a failover to a replica
/// that lacked them, a restore from an older snapshot). The org then moves to the `candidate`
/// epoch with head 0 and an empty stream, in this one atomic step, so that no (epoch, seq) is
/// used for two events and every node sees the same new epoch. Returns 1 when it fenced.
///
/// `trim_old` drops the stream's entries older than `cutoff` (ms) from its front: one probe of
/// the oldest entry when nothing is old; at most 1,000 entries per call, so a script never
/// holds Redis for long (what is left goes at the next call; retention keeps *at least* the
/// window).
const PRELUDE: &str = r#"
local function trim_old(cutoff)
  for _ = 1, 10 do
    local batch = redis.call('XRANGE', KEYS[2], '-', '+', 'COUNT', 1)
    if #batch == 0 or tonumber(batch[1][2][4]) >= cutoff then return end
    batch = redis.call('XRANGE', KEYS[2], '-', '+', 'COUNT', 100)
    local keep = nil
    for _, e in ipairs(batch) do
      if tonumber(e[2][4]) >= cutoff then keep = e[1] break end
    end
    if keep then
      redis.call('XTRIM', KEYS[2], 'MINID', keep)
      return
    end
    local seq = tonumber(string.match(batch[#batch][1], '^(%d+)'))
    redis.call('XTRIM', KEYS[2], 'MINID', (seq + 1) .. '-0')
  end
end
local function fence(known, mark, candidate)
  if known == '' then return 0 end
  local epoch = redis.call('HGET', KEYS[1], 'epoch')
  if epoch ~= known then return 0 end
  local head = tonumber(redis.call('HGET', KEYS[1], 'head') or '0')
  if head >= tonumber(mark) then return 0 end
  redis.call('DEL', KEYS[2])
  redis.call('HSET', KEYS[1], 'epoch', candidate, 'head', 0, 'conf', 0)
  redis.call('PUBLISH', KEYS[2], candidate .. ' 0')
  return 1
end
"#;

/// Appends a batch: KEYS = meta, stream, idempotency key; ARGV = epoch candidate, ts, max
/// events, replay window ms (the idempotency and stream time-to-live), has key (1/0), known
/// epoch, mark, confirmed mode (1/0), payloads...
/// Returns {duplicate(0/1), epoch, first, last, fenced(0/1)}.
///
/// In confirmed mode (`--redis-min-replicas`) the append wakes nobody: followers deliver only
/// up to the meta's `conf`, which [`CONFIRM`] moves once the replicas have the events.
const APPEND: &str = r#"
local fenced = fence(ARGV[6], ARGV[7], ARGV[1])
redis.call('HSETNX', KEYS[1], 'epoch', ARGV[1])
local epoch = redis.call('HGET', KEYS[1], 'epoch')
if ARGV[5] == '1' then
  local prev = redis.call('GET', KEYS[3])
  if prev then
    local e, f, l = string.match(prev, '^(%S+) (%d+) (%d+)$')
    -- A result of an epoch that was fenced away names lost events: append again.
    if e == epoch then
      return {1, e, tonumber(f), tonumber(l), fenced}
    end
  end
end
trim_old(tonumber(ARGV[2]) - tonumber(ARGV[4]))
local n = #ARGV - 8
local last = redis.call('HINCRBY', KEYS[1], 'head', n)
local first = last - n + 1
for i = 1, n do
  redis.call('XADD', KEYS[2], (first + i - 1) .. '-0', 'e', epoch, 't', ARGV[2], 'p', ARGV[8 + i])
end
redis.call('XTRIM', KEYS[2], 'MAXLEN', ARGV[3])
redis.call('PEXPIRE', KEYS[2], ARGV[4])
if ARGV[8] == '1' then
  -- An org without `conf` (written before confirmed mode) counts as confirmed up to here.
  redis.call('HSETNX', KEYS[1], 'conf', first - 1)
else
  -- Acknowledged as written: confirmed as far as this node is concerned (so that nodes in
  -- confirmed mode deliver it too).
  redis.call('HSET', KEYS[1], 'conf', last)
  -- Wakes the followers of every node (crate::log::wakes): the channel is named like the
  -- stream.
  redis.call('PUBLISH', KEYS[2], epoch .. ' ' .. last)
end
if ARGV[5] == '1' then
  redis.call('SET', KEYS[3], epoch .. ' ' .. first .. ' ' .. last, 'PX', ARGV[4])
end
return {0, epoch, first, last, fenced}
"#;

/// An org's state (created with the candidate epoch when new, fenced as in [`PRELUDE`]), and
/// with ARGV[2] = 1, up to ARGV[4] entries after seq ARGV[3]. KEYS = meta, stream; ARGV =
/// epoch candidate, read (1/0), after seq, count, known epoch, mark, time cutoff (ms),
/// confirmed mode (1/0). Returns {epoch, head, first, entries, fenced(0/1)}.
///
/// In confirmed mode the head is the meta's `conf` (the last seq replicas confirmed) and
/// nothing after it is read. A `conf` below this node's mark (a failover lost the `conf` write
/// but not the events, which WAIT had confirmed) is repaired to the mark: a node marks only
/// confirmed seqs in this mode.
const STATE_READ: &str = r#"
local fenced = fence(ARGV[5], ARGV[6], ARGV[1])
trim_old(tonumber(ARGV[7]))
redis.call('HSETNX', KEYS[1], 'epoch', ARGV[1])
local epoch = redis.call('HGET', KEYS[1], 'epoch')
local head = tonumber(redis.call('HGET', KEYS[1], 'head') or '0')
if ARGV[8] == '1' then
  -- No `conf` yet: nothing was appended in confirmed mode, all counts as confirmed.
  local conf = tonumber(redis.call('HGET', KEYS[1], 'conf') or head)
  local mark = tonumber(ARGV[6])
  if epoch == ARGV[5] and conf < mark and mark <= head then
    conf = mark
    redis.call('HSET', KEYS[1], 'conf', conf)
  end
  head = math.min(head, conf)
end
local oldest = redis.call('XRANGE', KEYS[2], '-', '+', 'COUNT', 1)
local first = head + 1
if #oldest > 0 then
  first = math.min(first, tonumber(string.match(oldest[1][1], '^(%d+)')))
end
local entries = {}
if ARGV[2] == '1' and tonumber(ARGV[3]) < head then
  entries = redis.call('XRANGE', KEYS[2], '(' .. ARGV[3] .. '-0', head .. '-0', 'COUNT', ARGV[4])
end
return {epoch, head, first, entries, fenced}
"#;

/// Confirmed mode: the replicas have the org's events up to ARGV[2] under epoch ARGV[1];
/// moves `conf` there (never back, never past the head, never across an epoch) and wakes the
/// followers. KEYS = meta, stream.
const CONFIRM: &str = r#"
if redis.call('HGET', KEYS[1], 'epoch') ~= ARGV[1] then return 0 end
local head = tonumber(redis.call('HGET', KEYS[1], 'head') or '0')
local conf = tonumber(redis.call('HGET', KEYS[1], 'conf') or '0')
local last = math.min(tonumber(ARGV[2]), head)
if last <= conf then return 0 end
redis.call('HSET', KEYS[1], 'conf', last)
redis.call('PUBLISH', KEYS[2], ARGV[1] .. ' ' .. last)
return 1
"#;

/// What this node has seen of each org: the highest seq it acknowledged, read or delivered
/// under the epoch it knows (the fence's `known` and `mark`). Lost with the process, so a
/// store that loses events while every node restarts is not detected (docs/DEPLOYMENT.md).
/// At most [`MAX_MARKS`] orgs: past it, marks of orgs not followed here are dropped, which
/// only weakens the fence for them.
#[derive(Default)]
struct Marks(Mutex<std::collections::HashMap<OrgId, (Epoch, u64)>>);

const MAX_MARKS: usize = 100_000;

impl Marks {
    fn get(&self, org: &OrgId) -> (String, u64) {
        self.0
            .lock()
            .get(org)
            .map_or((String::new(), 0), |(e, s)| (e.to_string(), *s))
    }

    /// Records that `seq` exists under `epoch` (a new epoch replaces the old mark).
    fn saw(&self, org: &OrgId, epoch: &Epoch, seq: u64) {
        let mut m = self.0.lock();
        if m.len() >= MAX_MARKS && !m.contains_key(org) {
            let drop: Vec<OrgId> = m.keys().take(MAX_MARKS / 10).cloned().collect();
            for o in drop {
                m.remove(&o);
            }
        }
        let e = m.entry(org.clone()).or_insert_with(|| (epoch.clone(), seq));
        if e.0 != *epoch {
            *e = (epoch.clone(), seq);
        } else {
            e.1 = e.1.max(seq);
        }
    }

    fn len(&self) -> usize {
        self.0.lock().len()
    }
}

fn fenced_warning(org: &OrgId, known: &str, mark: u64, epoch: &Epoch) {
    tracing::warn!(
        org = %org,
        lost_epoch = known,
        mark,
        new_epoch = %epoch,
        "the store lost events this node had acknowledged or seen: the org moves to a new epoch (clients get reset)"
    );
}

/// Whether Redis answers, as the last command found: a transition is logged once (not per
/// request), and the metrics show it (`log_up`, `log_errors_total`).
#[derive(Default)]
struct Health {
    down: std::sync::atomic::AtomicBool,
    errors: [std::sync::atomic::AtomicU64; 3],
}

impl Health {
    fn record<T>(&self, r: Result<T, LogError>) -> Result<T, LogError> {
        use std::sync::atomic::Ordering::Relaxed;
        match &r {
            Ok(_) => {
                if self.down.swap(false, Relaxed) {
                    tracing::warn!("redis answers again: publishes and deliveries resume");
                }
            }
            Err(e) => {
                let (kind, outage) = match e {
                    LogError::Unavailable(_) => (0, true),
                    LogError::Indeterminate(_) => (1, true),
                    LogError::Internal(_) => (2, false),
                };
                self.errors[kind].fetch_add(1, Relaxed);
                if outage && !self.down.swap(true, Relaxed) {
                    tracing::warn!(error = %e, "redis does not answer: publishes answer 503 (or 504 when the outcome is unknown) and /readyz 503 until it does");
                }
            }
        }
        r
    }

    fn usage(&self, u: &mut LogUsage) {
        use std::sync::atomic::Ordering::Relaxed;
        u.down = self.down.load(Relaxed);
        for (out, n) in u.errors.iter_mut().zip(&self.errors) {
            *out = n.load(Relaxed);
        }
    }
}

/// The Redis Streams [`EventLog`].
pub struct RedisLog {
    health: Arc<Health>,
    /// The pub/sub connection that wakes this node's followers.
    wakes: Arc<Wakes>,
    source: Source,
    /// `--redis-min-replicas`, when set.
    replication: Option<Replication>,
    conn: Conn,
    append: Script,
    retention: Retention,
    reader: Reader,
}

/// How this node reads an org's state and events (shared with its followers).
#[derive(Clone)]
struct Reader {
    state_read: Script,
    /// What this node saw of each org it touched, for the fence (and the metrics' org count).
    marks: Arc<Marks>,
    window_ms: u64,
    /// `--redis-min-replicas` is set: only confirmed events are read (see [`STATE_READ`]).
    confirmed: bool,
}

/// Appends wait for replicas (`--redis-min-replicas`) on a connection of their own.
struct Replication {
    replicas: u32,
    timeout: Duration,
    conn: Conn,
    confirm: Script,
}

impl Replication {
    /// Waits until `replicas` replicas of the org's primary have every write made so far on
    /// this connection (the append included).
    async fn confirm(&self, org: &OrgId, epoch: &Epoch, last: u64) -> Result<(), LogError> {
        let mut wait = redis::cmd("WAIT");
        wait.arg(self.replicas).arg(self.timeout.as_millis() as u64);
        let acked: i64 = match &self.conn {
            // In a cluster, WAIT goes to the org's primary (by default it would go to all).
            Conn::Cluster(c) => {
                use redis::cluster_routing::{Route, RoutingInfo, SingleNodeRoutingInfo, SlotAddr};
                let route = RoutingInfo::SingleNode(SingleNodeRoutingInfo::SpecificNode(
                    Route::with_key(meta_key(org), SlotAddr::Master),
                ));
                let v = c
                    .clone()
                    .route_command(wait, route)
                    .await
                    .map_err(write_failed)?;
                redis::from_redis_value(v).map_err(|e| LogError::Internal(e.to_string()))?
            }
            other => wait
                .query_async(&mut other.clone())
                .await
                .map_err(write_failed)?,
        };
        if acked < i64::from(self.replicas) {
            return Err(LogError::Indeterminate(format!(
                "stored on the primary, confirmed by {acked} of {} replicas within {:?}",
                self.replicas, self.timeout
            )));
        }
        // Confirmed: the followers of every node may deliver up to `last` now.
        let _: i64 = self
            .confirm
            .key(meta_key(org))
            .key(stream_key(org))
            .arg(epoch.as_str())
            .arg(last)
            .invoke_async(&mut self.conn.clone())
            .await
            .map_err(write_failed)?;
        Ok(())
    }
}

/// A connection of either kind; commands and scripts run the same on both (a cluster routes
/// each by its key's slot). Shared presence (`crate::presence::shared`) uses the log's.
#[derive(Clone)]
pub enum Conn {
    Managed(ConnectionManager),
    Multiplexed(redis::aio::MultiplexedConnection),
    Cluster(ClusterConnection),
}

impl ConnectionLike for Conn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Conn::Managed(c) => c.req_packed_command(cmd),
            Conn::Multiplexed(c) => c.req_packed_command(cmd),
            Conn::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Conn::Managed(c) => c.req_packed_commands(pipeline, offset, count),
            Conn::Multiplexed(c) => c.req_packed_commands(pipeline, offset, count),
            Conn::Cluster(c) => c.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Conn::Managed(c) => c.get_db(),
            Conn::Multiplexed(c) => c.get_db(),
            Conn::Cluster(c) => c.get_db(),
        }
    }
}

fn unavailable(e: redis::RedisError) -> LogError {
    LogError::Unavailable(format!("redis: {e}"))
}

/// A failed write: not stored when Redis refused it or could not be reached; outcome unknown
/// when the command may have left (a timeout, or the connection lost while it was in flight).
fn write_failed(e: redis::RedisError) -> LogError {
    use std::io::ErrorKind as K;
    // A write that failed (broken pipe, not connected, refused) never left; a read that failed
    // (timeout, reset, end of stream) came after the command was sent.
    let io = std::error::Error::source(&e).and_then(|s| s.downcast_ref::<std::io::Error>());
    let in_flight = e.is_timeout()
        || io.is_some_and(|io| {
            matches!(
                io.kind(),
                K::ConnectionReset | K::UnexpectedEof | K::ConnectionAborted
            )
        });
    if in_flight {
        LogError::Indeterminate(format!("redis: {e}"))
    } else {
        unavailable(e)
    }
}

fn meta_key(org: &OrgId) -> String {
    format!("es:{{{org}}}:m")
}

fn stream_key(org: &OrgId) -> String {
    format!("es:{{{org}}}:s")
}

/// The org's signal stream (entries with one field `d`), read by every node's follower beside
/// the events; written by the shared presence scripts.
pub(crate) fn signal_key(org: &OrgId) -> String {
    format!("es:{{{org}}}:g")
}

fn idem_key(org: &OrgId, key: &str) -> String {
    format!("es:{{{org}}}:i:{key}")
}

/// A stream entry as `XRANGE` returns it: id and field/value pairs.
type RawEntry = (String, Vec<(String, Vec<u8>)>);

impl RedisLog {
    /// Connects to `url` (`redis://host:port/db`). Fails when Redis cannot be reached now;
    /// later outages are reconnected with backoff.
    pub async fn connect(url: &str, retention: Retention) -> anyhow::Result<Self> {
        let client = redis::Client::open(url)?;
        let config = ConnectionManagerConfig::new()
            .set_response_timeout(Some(RESPONSE_TIMEOUT))
            .set_connection_timeout(Some(RESPONSE_TIMEOUT))
            .set_number_of_retries(1)
            .set_min_delay(Duration::from_millis(100))
            .set_max_delay(Duration::from_secs(2));
        let conn = tokio::time::timeout(
            RESPONSE_TIMEOUT * 3,
            ConnectionManager::new_with_config(client.clone(), config),
        )
        .await
        .map_err(|_| anyhow::anyhow!("connect timed out"))??;
        Ok(Self::with(
            Source::Single(client),
            Conn::Managed(conn),
            retention,
        ))
    }

    /// Connects to a Redis Cluster through any of its `seeds` (`redis://host:port`).
    pub async fn connect_cluster(seeds: &[String], retention: Retention) -> anyhow::Result<Self> {
        let client = cluster_client(seeds, RESPONSE_TIMEOUT)?;
        let conn = tokio::time::timeout(RESPONSE_TIMEOUT * 3, client.get_async_connection())
            .await
            .map_err(|_| anyhow::anyhow!("connect timed out"))??;
        Ok(Self::with(
            Source::Cluster(seeds.to_vec()),
            Conn::Cluster(conn),
            retention,
        ))
    }

    /// `--redis-min-replicas`: an append is acknowledged only once `replicas` replicas of the
    /// org's primary confirm they have it (`WAIT replicas timeout` after the script, on a
    /// connection of its own: WAIT covers the writes made on its connection, and holds that
    /// connection while it waits). Not confirmed in time: [`LogError::Indeterminate`] (the
    /// primary has the events; they are lost only if it fails before a replica gets them).
    pub async fn require_replicas(
        &mut self,
        replicas: u32,
        timeout: Duration,
    ) -> anyhow::Result<()> {
        let answer = RESPONSE_TIMEOUT + timeout;
        let conn = match &self.source {
            Source::Single(client) => {
                let config = ConnectionManagerConfig::new()
                    .set_response_timeout(Some(answer))
                    .set_connection_timeout(Some(RESPONSE_TIMEOUT))
                    .set_number_of_retries(1)
                    .set_min_delay(Duration::from_millis(100))
                    .set_max_delay(Duration::from_secs(2));
                Conn::Managed(ConnectionManager::new_with_config(client.clone(), config).await?)
            }
            Source::Cluster(seeds) => Conn::Cluster(
                cluster_client(seeds, answer)?
                    .get_async_connection()
                    .await?,
            ),
        };
        self.replication = Some(Replication {
            replicas,
            timeout,
            conn,
            confirm: Script::new(CONFIRM),
        });
        self.reader.confirmed = true;
        Ok(())
    }

    fn with(source: Source, conn: Conn, retention: Retention) -> Self {
        RedisLog {
            health: Arc::new(Health::default()),
            wakes: Wakes::start(source.clone()),
            source,
            replication: None,
            conn,
            append: Script::new(&format!("{PRELUDE}{APPEND}")),
            reader: Reader {
                state_read: Script::new(&format!("{PRELUDE}{STATE_READ}")),
                marks: Arc::new(Marks::default()),
                window_ms: retention.window_ms,
                confirmed: false,
            },
            retention,
        }
    }

    async fn state_and_read(
        &self,
        org: &OrgId,
        after: Option<u64>,
        limit: usize,
    ) -> Result<(OrgState, Vec<Arc<Event>>), LogError> {
        self.reader
            .state_and_read(self.conn.clone(), org, after, limit)
            .await
    }
}

impl Reader {
    /// The org's state (fenced against this node's mark) and, with `after`, up to `limit`
    /// events after that seq; the mark learns the head.
    async fn state_and_read(
        &self,
        mut conn: Conn,
        org: &OrgId,
        after: Option<u64>,
        limit: usize,
    ) -> Result<(OrgState, Vec<Arc<Event>>), LogError> {
        let marks = &self.marks;
        let (known, mark) = marks.get(org);
        let v: Value = self
            .state_read
            .key(meta_key(org))
            .key(stream_key(org))
            .arg(Epoch::random().as_str())
            .arg(if after.is_some() { "1" } else { "0" })
            .arg(after.unwrap_or(0))
            .arg(limit)
            .arg(&known)
            .arg(mark)
            .arg(unix_ms().saturating_sub(self.window_ms))
            .arg(if self.confirmed { "1" } else { "0" })
            .invoke_async(&mut conn)
            .await
            .map_err(unavailable)?;
        let Value::Array(parts) = v else {
            return Err(LogError::Internal("redis: unexpected state reply".into()));
        };
        let [epoch, head, first, entries, fenced] = <[Value; 5]>::try_from(parts)
            .map_err(|_| LogError::Internal("redis: state reply of the wrong length".into()))?;
        let epoch = Epoch::parse(&as_string(&epoch)?)
            .map_err(|e| LogError::Internal(format!("redis: {e}")))?;
        let state = OrgState {
            epoch,
            head: as_u64(&head)?,
            first: as_u64(&first)?,
        };
        if as_u64(&fenced)? == 1 {
            fenced_warning(org, &known, mark, &state.epoch);
        }
        marks.saw(org, &state.epoch, state.head);
        let events = parse_entries(org, entries)?;
        Ok((state, events))
    }
}

/// A cluster client with this response deadline per command.
fn cluster_client(
    seeds: &[String],
    timeout: Duration,
) -> anyhow::Result<redis::cluster::ClusterClient> {
    Ok(redis::cluster::ClusterClient::builder(seeds.to_vec())
        .response_timeout(timeout)
        .connection_timeout(RESPONSE_TIMEOUT)
        .retries(2)
        .build()?)
}

fn as_string(v: &Value) -> Result<String, LogError> {
    match v {
        Value::BulkString(b) => Ok(String::from_utf8_lossy(b).into_owned()),
        Value::SimpleString(s) => Ok(s.clone()),
        Value::Int(i) => Ok(i.to_string()),
        other => Err(LogError::Internal(format!(
            "redis: expected a string, got {other:?}"
        ))),
    }
}

fn as_u64(v: &Value) -> Result<u64, LogError> {
    match v {
        Value::Int(i) => u64::try_from(*i).map_err(|_| LogError::Internal("negative".into())),
        other => as_string(other)?
            .parse()
            .map_err(|_| LogError::Internal(format!("redis: expected a number, got {other:?}"))),
    }
}

fn seq_of(id: &str) -> Option<u64> {
    id.split_once('-').map_or(id, |(s, _)| s).parse().ok()
}

/// Stream entries (`[[id, [field, value, ...]], ...]`) as (id, fields) pairs.
fn stream_entries(entries: Value) -> Result<Vec<(String, Vec<Value>)>, LogError> {
    let Value::Array(entries) = entries else {
        return Ok(Vec::new());
    };
    entries
        .into_iter()
        .map(|entry| match entry {
            Value::Array(pair) => match <[Value; 2]>::try_from(pair) {
                Ok([id, Value::Array(fields)]) => Ok((as_string(&id)?, fields)),
                _ => Err(LogError::Internal("redis: malformed stream entry".into())),
            },
            _ => Err(LogError::Internal("redis: malformed stream entry".into())),
        })
        .collect()
}

/// Signal entries as (id, the `d` field).
fn parse_signals(entries: Value) -> Result<Vec<(String, Bytes)>, LogError> {
    let mut out = Vec::new();
    for (id, fields) in stream_entries(entries)? {
        let data = fields
            .chunks(2)
            .find_map(|kv| match kv {
                [k, Value::BulkString(v)] if as_string(k).is_ok_and(|k| k == "d") => {
                    Some(Bytes::copy_from_slice(v))
                }
                _ => None,
            })
            .unwrap_or_default();
        out.push((id, data));
    }
    Ok(out)
}

/// Stream entries as events.
fn parse_entries(org: &OrgId, entries: Value) -> Result<Vec<Arc<Event>>, LogError> {
    let entries = stream_entries(entries)?;
    let mut out = Vec::with_capacity(entries.len());
    for (id, fields) in entries {
        let seq = seq_of(&id).ok_or_else(|| LogError::Internal(format!("redis: id {id}")))?;
        let (mut epoch, mut ts, mut payload) = (None, 0, None);
        for kv in fields.chunks(2) {
            let [k, v] = kv else { break };
            match as_string(k)?.as_str() {
                "e" => epoch = Some(as_string(v)?),
                "t" => ts = as_u64(v)?,
                "p" => {
                    payload = Some(match v {
                        Value::BulkString(b) => Bytes::copy_from_slice(b),
                        other => Bytes::from(as_string(other)?),
                    })
                }
                _ => {}
            }
        }
        let epoch = Epoch::parse(&epoch.unwrap_or_default())
            .map_err(|e| LogError::Internal(format!("redis: {e}")))?;
        out.push(Event::new(
            org.clone(),
            epoch,
            seq,
            ts,
            payload.unwrap_or_default(),
        ));
    }
    Ok(out)
}

impl RedisLog {
    async fn append_inner(
        &self,
        org: &OrgId,
        payloads: Vec<Bytes>,
        idempotency_key: Option<&str>,
    ) -> Result<Appended, LogError> {
        // With --redis-min-replicas the script runs on the connection WAIT then confirms.
        let mut conn = match &self.replication {
            Some(r) => r.conn.clone(),
            None => self.conn.clone(),
        };
        let (known, mark) = self.reader.marks.get(org);
        let mut call = self.append.prepare_invoke();
        call.key(meta_key(org))
            .key(stream_key(org))
            .key(idem_key(org, idempotency_key.unwrap_or("")))
            .arg(Epoch::random().as_str())
            .arg(unix_ms())
            .arg(self.retention.max_events.max(1))
            .arg(self.retention.window_ms.max(1))
            .arg(if idempotency_key.is_some() { "1" } else { "0" })
            .arg(&known)
            .arg(mark)
            .arg(if self.reader.confirmed { "1" } else { "0" });
        for p in &payloads {
            call.arg(p.as_ref());
        }
        let (dup, epoch, first, last, fenced): (u8, String, u64, u64, u8) =
            call.invoke_async(&mut conn).await.map_err(write_failed)?;
        let epoch = Epoch::parse(&epoch).map_err(|e| LogError::Internal(format!("redis: {e}")))?;
        if fenced == 1 {
            fenced_warning(org, &known, mark, &epoch);
        }
        // Stored (and with --redis-min-replicas, confirmed): from now on this node holds the
        // store to it.
        if let Some(r) = &self.replication {
            r.confirm(org, &epoch, last).await?;
        }
        self.reader.marks.saw(org, &epoch, last);
        Ok(Appended {
            epoch,
            first_seq: first,
            last_seq: last,
            duplicate: dup == 1,
        })
    }

    async fn read_inner(
        &self,
        org: &OrgId,
        after: &Position,
        limit: usize,
    ) -> Result<ReadOutcome, LogError> {
        let (state, events) = self.state_and_read(org, Some(after.seq), limit).await?;
        let usable =
            after.epoch == state.epoch && after.seq <= state.head && after.seq + 1 >= state.first;
        if !usable {
            return Ok(ReadOutcome::Unusable { state });
        }
        Ok(ReadOutcome::Events { state, events })
    }

    async fn tail_inner(
        &self,
        org: &OrgId,
        after: Option<Position>,
    ) -> Result<Box<dyn Tail>, LogError> {
        // Subscribed (and confirmed) before the first read, so no append after it goes unseen.
        let wake = self.wakes.register(stream_key(org)).await;
        let state = self.state_and_read(org, None, 0).await?.0;
        let cursor = match after {
            Some(p) if p.epoch == state.epoch && p.seq <= state.head => p,
            // A follower restarted into a new epoch (Redis lost the org, or a fence moved it):
            // from the oldest retained event of the new epoch, so that the sessions see the
            // change (and reset) even if nothing more is published.
            Some(_) => Position {
                epoch: state.epoch,
                seq: state.first - 1,
            },
            // A new follower: from the head.
            None => Position {
                epoch: state.epoch,
                seq: state.head,
            },
        };
        // Signals from now on (ids are time-based, so they keep growing across Redis restarts).
        let mut meta = self.conn.clone();
        let last: Vec<RawEntry> = redis::cmd("XREVRANGE")
            .arg(signal_key(org))
            .arg("+")
            .arg("-")
            .arg("COUNT")
            .arg(1)
            .query_async(&mut meta)
            .await
            .map_err(unavailable)?;
        let signal_cursor = last
            .first()
            .map_or_else(|| "0-0".to_string(), |e| e.0.clone());
        Ok(Box::new(RedisTail {
            org: org.clone(),
            wake,
            woken: None,
            signal_cursor,
            meta: self.conn.clone(),
            reader: self.reader.clone(),
            health: self.health.clone(),
            cursor,
        }))
    }
}

#[async_trait]
impl EventLog for RedisLog {
    async fn append(
        &self,
        org: &OrgId,
        payloads: Vec<Bytes>,
        idempotency_key: Option<&str>,
    ) -> Result<Appended, LogError> {
        self.health
            .record(self.append_inner(org, payloads, idempotency_key).await)
    }

    async fn state(&self, org: &OrgId) -> Result<OrgState, LogError> {
        self.health
            .record(self.state_and_read(org, None, 0).await.map(|(s, _)| s))
    }

    async fn read(
        &self,
        org: &OrgId,
        after: &Position,
        limit: usize,
    ) -> Result<ReadOutcome, LogError> {
        self.health.record(self.read_inner(org, after, limit).await)
    }

    async fn tail(&self, org: &OrgId, after: Option<Position>) -> Result<Box<dyn Tail>, LogError> {
        self.health.record(self.tail_inner(org, after).await)
    }

    fn kind(&self) -> &'static str {
        "redis"
    }

    fn backbone(&self) -> Option<Conn> {
        Some(self.conn.clone())
    }

    fn usage(&self) -> LogUsage {
        let mut u = LogUsage {
            orgs: self.reader.marks.len() as u64,
            ..Default::default()
        };
        self.health.usage(&mut u);
        u
    }

    async fn ready(&self) -> Result<(), LogError> {
        let mut conn = self.conn.clone();
        let ping: Result<String, _> = redis::cmd("PING").query_async(&mut conn).await;
        self.health.record(ping.map(drop).map_err(unavailable))
    }
}

/// One org's follower: a plain `XREAD` on the node's shared connection each time the org's
/// channel wakes it ([`super::wakes`]).
struct RedisTail {
    org: OrgId,
    wake: super::wakes::Registration,
    /// Woken since the last read found nothing, and whether what woke it asks for a look at
    /// the org's state (another epoch, a head behind the cursor, a lost connection).
    woken: Option<bool>,
    meta: Conn,
    reader: Reader,
    health: Arc<Health>,
    cursor: Position,
    /// The last signal id read.
    signal_cursor: String,
}

impl RedisTail {
    /// Events after the cursor and signals after the signal cursor, in one `XREAD`.
    async fn read_all(&mut self) -> Result<Tailed, LogError> {
        let events_key = stream_key(&self.org);
        let signals_key = signal_key(&self.org);
        let reply: Value = redis::cmd("XREAD")
            .arg("COUNT")
            .arg(TAIL_BATCH)
            .arg("STREAMS")
            .arg(&events_key)
            .arg(&signals_key)
            .arg(format!("{}-0", self.cursor.seq))
            .arg(&self.signal_cursor)
            .query_async(&mut self.meta)
            .await
            .map_err(unavailable)?;
        let mut out = Tailed::default();
        for (key, entries) in xread_streams(reply) {
            if as_string(&key)? == signals_key {
                out.signals = self.take_signals(entries)?;
            } else {
                out.events = parse_entries(&self.org, entries)?;
            }
        }
        Ok(out)
    }

    /// Confirmed mode: events up to the confirmed head through the state script (which also
    /// fences, and follows the org into a new epoch), signals by `XREAD`.
    async fn read_confirmed(&mut self) -> Result<Tailed, LogError> {
        let mut out = Tailed::default();
        let (state, events) = self
            .reader
            .state_and_read(
                self.meta.clone(),
                &self.org,
                Some(self.cursor.seq),
                TAIL_BATCH,
            )
            .await?;
        out.events = if state.epoch == self.cursor.epoch {
            events
        } else {
            self.new_epoch(state.epoch);
            let (_, events) = self
                .reader
                .state_and_read(self.meta.clone(), &self.org, Some(0), TAIL_BATCH)
                .await?;
            events
                .into_iter()
                .filter(|e| e.epoch == self.cursor.epoch)
                .collect()
        };
        let reply: Value = redis::cmd("XREAD")
            .arg("COUNT")
            .arg(TAIL_BATCH)
            .arg("STREAMS")
            .arg(signal_key(&self.org))
            .arg(&self.signal_cursor)
            .query_async(&mut self.meta)
            .await
            .map_err(unavailable)?;
        for (_, entries) in xread_streams(reply) {
            out.signals = self.take_signals(entries)?;
        }
        Ok(out)
    }

    fn take_signals(&mut self, entries: Value) -> Result<Vec<Bytes>, LogError> {
        let mut out = Vec::new();
        for (id, data) in parse_signals(entries)? {
            self.signal_cursor = id;
            out.push(data);
        }
        Ok(out)
    }

    /// A new epoch (the org's keys were lost and recreated, or a fence moved it because the
    /// store lost events) restarts seqs below the cursor, where a read after it would never
    /// look; the hub's sessions then read the log and get RESET.
    fn new_epoch(&mut self, epoch: Epoch) {
        tracing::warn!(org = %self.org, epoch = %epoch, "org has a new epoch in redis");
        self.cursor = Position { epoch, seq: 0 };
    }
}

/// An `XREAD` reply as (key, entries) pairs: `[[key, entries], ...]` (a map in RESP3), or nil
/// when nothing is new.
fn xread_streams(reply: Value) -> Vec<(Value, Value)> {
    match reply {
        Value::Array(streams) => streams
            .into_iter()
            .filter_map(|s| match s {
                Value::Array(kv) => <[Value; 2]>::try_from(kv).ok().map(|[k, v]| (k, v)),
                _ => None,
            })
            .collect(),
        Value::Map(m) => m,
        _ => Vec::new(),
    }
}

#[async_trait]
impl Tail for RedisTail {
    async fn next(&mut self) -> Result<Tailed, LogError> {
        let r = self.next_inner().await;
        self.health.record(r)
    }

    fn position(&self) -> Position {
        self.cursor.clone()
    }
}

impl RedisTail {
    async fn next_inner(&mut self) -> Result<Tailed, LogError> {
        loop {
            let out = if self.reader.confirmed {
                self.read_confirmed().await?
            } else {
                self.read_all().await?
            };
            if let Some(last) = out.events.last() {
                self.cursor = Position {
                    epoch: last.epoch.clone(),
                    seq: last.seq,
                };
                // Delivered: the store is held to it.
                self.reader.marks.saw(&self.org, &last.epoch, last.seq);
            }
            if !out.events.is_empty() || !out.signals.is_empty() {
                self.woken = None;
                return Ok(out);
            }
            match self.woken.take() {
                // Woken, read, still nothing, and what woke it calls for a look (which a
                // confirmed-mode read has already taken): below.
                Some(true) if !self.reader.confirmed => {}
                // Nothing new (or nothing that calls for a look): sleep until the org's
                // channel says something happened.
                _ => {
                    let check = match self.wake.woken().await {
                        Wake::Reconnected => true,
                        Wake::Message(m) => match m.split_once(' ') {
                            // `epoch head` of an append or a fence: a look at the state only
                            // if XREAD cannot see it (another epoch, or a head not after ours).
                            Some((epoch, head)) => {
                                epoch != self.cursor.epoch.as_str()
                                    || head.parse::<u64>().is_ok_and(|h| h < self.cursor.seq)
                            }
                            None => false, // a presence signal: XREAD reads it
                        },
                    };
                    self.woken = Some(check);
                    continue;
                }
            }
            // Check the org's state, fenced against what this node saw.
            let (state, _) = self
                .reader
                .state_and_read(self.meta.clone(), &self.org, None, 0)
                .await?;
            if state.epoch != self.cursor.epoch {
                self.new_epoch(state.epoch);
            }
        }
    }
}
