//! The replay log and sequencer behind one trait, [`EventLog`], that the hub and the HTTP API
//! use. Backbones: [`memory::MemoryLog`] (embedded, the default) and [`redis::RedisLog`]
//! (Redis Streams, shared by several nodes).
//!
//! A log assigns each org's gap-free seqs, keeps its epoch, retains recent events (by time,
//! count and bytes) and serves range reads by position. It never knows about sessions,
//! transports or tokens.

pub mod durable;
pub mod memory;
pub mod redis;
mod wakes;
pub mod window;

use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;

use crate::event::Event;
use crate::model::{Epoch, OrgId, Position};

pub use window::{Resume, Retention};

/// What a successful append returns (PROTOCOL.md section 7).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Appended {
    pub epoch: Epoch,
    pub first_seq: u64,
    pub last_seq: u64,
    /// The Idempotency-Key was seen before: nothing was appended, this is the first result.
    pub duplicate: bool,
}

/// An org's log at one instant.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OrgState {
    pub epoch: Epoch,
    /// The latest seq (0 if none).
    pub head: u64,
    /// The oldest retained seq (`head + 1` when nothing is retained).
    pub first: u64,
}

impl OrgState {
    /// The resume rule of PROTOCOL.md section 2 (SUBSCRIBED.resume).
    pub fn resume(&self, since: Option<&Position>) -> Resume {
        window::resume(&self.epoch, self.head, self.first, since)
    }
}

/// The answer to a range read.
#[derive(Debug)]
pub enum ReadOutcome {
    /// Events after the position, in seq order (possibly none: the position is the head).
    Events {
        state: OrgState,
        events: Vec<Arc<Event>>,
    },
    /// The position cannot be continued: other epoch, evicted, or ahead of the head.
    Unusable { state: OrgState },
}

/// Why a log operation failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum LogError {
    /// The backbone cannot be reached (Redis down) or refused the command: nothing was
    /// appended; retry later.
    #[error("log unavailable: {0}")]
    Unavailable(String),
    /// A write was sent but its answer never came (a timeout, a connection lost after the
    /// command left): it may or may not have been stored. Retry with the same Idempotency-Key.
    #[error("outcome unknown: {0}")]
    Indeterminate(String),
    /// A bug or corrupt state.
    #[error("log error: {0}")]
    Internal(String),
}

/// What a log holds, for metrics.
#[derive(Debug, Default, Clone, Copy)]
pub struct LogUsage {
    /// Orgs held in memory (embedded logs; Redis: orgs followed here).
    pub orgs: u64,
    /// Idle orgs of an embedded log remembered by epoch and head only.
    pub idle_orgs: u64,
    pub events: u64,
    pub bytes: u64,
    /// Bytes on disk (durable log).
    pub disk_bytes: u64,
    /// What the durable log's recovery at start cut or dropped.
    pub recovered_torn_bytes: u64,
    pub recovered_corrupt_segments: u64,
    pub recovered_reset_orgs: u64,
    /// The backbone failed its last command (Redis unreachable); embedded logs never are.
    pub down: bool,
    /// Failed commands by kind: unavailable (not stored), indeterminate (outcome unknown),
    /// internal.
    pub errors: [u64; 3],
}

/// What a follower returns: new events and, from a shared log, org signals.
#[derive(Debug, Default)]
pub struct Tailed {
    /// In seq order.
    pub events: Vec<Arc<Event>>,
    /// Short messages other nodes addressed to this org's followers (shared presence,
    /// `crate::presence`), opaque to the log, in the order they were written.
    pub signals: Vec<Bytes>,
}

/// A follower of one org's new events, for the hub's one upstream subscription per org.
#[async_trait]
pub trait Tail: Send {
    /// Waits for events after the last ones returned (or signals) and returns them. After an
    /// epoch change or an eviction the follower jumps ahead: sessions notice the jump by seq
    /// and read the log to fill or reset.
    async fn next(&mut self) -> Result<Tailed, LogError>;

    /// The last position returned (or the start position).
    fn position(&self) -> Position;
}

/// The sequencer and replay log, as the hub and the HTTP API see it.
#[async_trait]
pub trait EventLog: Send + Sync + 'static {
    /// Appends a batch atomically with consecutive seqs. With `idempotency_key`, a repeat inside
    /// the replay window appends nothing and returns the first result with `duplicate` set.
    async fn append(
        &self,
        org: &OrgId,
        payloads: Vec<Bytes>,
        idempotency_key: Option<&str>,
    ) -> Result<Appended, LogError>;

    /// The org's epoch, head and oldest retained seq (creating the org's log if it has none,
    /// so that subscribers get an epoch to resume from).
    async fn state(&self, org: &OrgId) -> Result<OrgState, LogError>;

    /// At most `limit` events after `after`.
    async fn read(
        &self,
        org: &OrgId,
        after: &Position,
        limit: usize,
    ) -> Result<ReadOutcome, LogError>;

    /// Follows the org's new events, starting after `after` (after the current head when
    /// `None`). A follower restarted after an error passes its last position, so nothing
    /// appended in between is skipped.
    async fn tail(&self, org: &OrgId, after: Option<Position>) -> Result<Box<dyn Tail>, LogError>;

    /// Short name for metrics and logs (`memory`, `redis`).
    fn kind(&self) -> &'static str;

    /// The Redis connection of a shared log, for the other state nodes share (presence).
    fn backbone(&self) -> Option<redis::Conn> {
        None
    }

    /// Orgs, events and bytes held on this node.
    fn usage(&self) -> LogUsage;

    /// Applies time-based retention everywhere (called periodically, so idle orgs are trimmed).
    fn sweep(&self, _now_ms: u64) {}

    /// Whether the log can serve now (readyz): the embedded log always can; Redis when it
    /// answers.
    async fn ready(&self) -> Result<(), LogError> {
        Ok(())
    }
}
