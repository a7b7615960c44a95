//! The durable embedded log (`--data-dir`): the in-memory windows of [`super::memory`], made
//! to survive a restart by an append-only log of segment files with a checksum per record.
//!
//! ## Write path
//! An append reserves its seqs under the org's sequencer lock and hands the encoded records to
//! one writer thread (in the same lock, so the writer sees each org's batches in seq order).
//! The writer appends them to the current segment and syncs per `--fsync`: `always` (one
//! `fdatasync` per request), `batch` (group commit: one `fdatasync` for everything that queued
//! up meanwhile) or `never` (the page cache only). Only then are the events committed to the
//! org's window, shown to followers, and the publish acknowledged: nothing a client has seen
//! or been told is stored can vanish in a crash (except with `never`).
//!
//! ## Files
//! `DIR/NNNNNNNNNNNNNNNN.seg`: records `[len u32][crc32 u32][body]`, little endian. Bodies:
//! an event (org, epoch, seq, ts, payload) or an idempotency key (org, key, epoch, first and
//! last seq, ts). Segments roll over at `--data-segment-bytes`; a closed segment whose newest
//! record is older than the replay window (or whose events the count and byte caps have all
//! evicted) is deleted, after `DIR/checkpoint.json` (every org's epoch and the seq before its
//! oldest retained event, written to a temporary file, synced and renamed) has recorded where
//! the kept history starts, so heads and epochs outlive their events.
//!
//! ## Recovery
//! At start: the checkpoint, then every segment in order. A record that is cut short or fails
//! its checksum ends the scan of its segment: in the last segment that is a torn write (the
//! file is cut at the last whole record); elsewhere it is corruption. Both are logged and
//! counted in the metrics. Records that do not continue their org (a gap left by corruption)
//! are dropped and the org starts a new epoch, loudly, so clients get `reset` rather than a
//! silent hole. Corrupt bytes never reach a client: they are never parsed into events.

use std::collections::HashMap;
use std::fs::{self, File, OpenOptions};
use std::io::{BufWriter, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use async_trait::async_trait;
use bytes::{Buf, BufMut, Bytes, BytesMut};
use parking_lot::Mutex;
use tokio::sync::{mpsc, oneshot};

use super::memory::{OrgSlot, OrgTable, WindowSlot};
use super::window::OrgWindow;
use super::{Appended, EventLog, LogError, LogUsage, OrgState, ReadOutcome, Retention, Tail};
use crate::event::Event;
use crate::model::{Epoch, OrgId, Position};
use crate::time::unix_ms;

/// When an append is synced to disk before it is acknowledged.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Fsync {
    /// One `fdatasync` per publish request.
    Always,
    /// Group commit: one `fdatasync` covers every request queued meanwhile.
    #[default]
    Batch,
    /// No sync: a power loss (not a process crash) loses the last moments.
    Never,
}

/// Settings of the durable log.
#[derive(Debug, Clone)]
pub struct DurableConfig {
    pub dir: PathBuf,
    pub fsync: Fsync,
    /// A segment is closed once it holds this many bytes.
    pub segment_bytes: u64,
}

/// What recovery found, for the log and the metrics.
#[derive(Debug, Default, Clone)]
pub struct Recovery {
    pub segments: u64,
    pub records: u64,
    /// Bytes cut from the end of the last segment (a write torn by a crash).
    pub torn_bytes: u64,
    /// Segments whose scan stopped early on a bad record (not the last one).
    pub corrupt_segments: u64,
    /// Orgs that got a new epoch because their history had a hole.
    pub reset_orgs: Vec<String>,
}

const EVENT: u8 = 1;
const KEY: u8 = 2;
const EPOCH: u8 = 3;
const CHECKPOINT: &str = "checkpoint.json";

struct Slot {
    /// The sequencer: the last seq handed out (committed or not) and keys in flight.
    reserve: Mutex<Reserve>,
    /// Committed (durable) events and their followers.
    win: WindowSlot,
}

impl Slot {
    fn new(window: OrgWindow) -> Self {
        Slot {
            reserve: Mutex::new(Reserve {
                head: window.state().head,
                pending: HashMap::new(),
            }),
            win: WindowSlot::new(window),
        }
    }
}

impl OrgSlot for Slot {
    fn window(&self) -> &WindowSlot {
        &self.win
    }

    fn is_idle(&self) -> bool {
        self.win.is_idle() && self.reserve.lock().pending.is_empty()
    }
}

struct Reserve {
    head: u64,
    pending: HashMap<String, Appended>,
}

struct Job {
    org: OrgId,
    slot: Arc<Slot>,
    records: Vec<u8>,
    events: Vec<Arc<Event>>,
    key: Option<String>,
    result: Appended,
    now_ms: u64,
    done: oneshot::Sender<Result<Appended, LogError>>,
}

/// What a segment holds, enough to tell when nothing in it is needed any more.
#[derive(Debug, Default, Clone)]
struct Summary {
    /// The newest record's time.
    max_ts: u64,
    /// The newest idempotency key's time (keys must outlive a restart until they expire).
    max_key_ts: u64,
    /// The last seq of each org in the segment.
    last_seq: HashMap<OrgId, u64>,
}

impl Summary {
    fn add(&mut self, record: &Record) {
        self.max_ts = self.max_ts.max(record.ts());
        match record {
            Record::Event(e) => {
                let s = self.last_seq.entry(e.org.clone()).or_default();
                *s = (*s).max(e.seq);
            }
            Record::Key { ts, .. } => self.max_key_ts = self.max_key_ts.max(*ts),
            Record::Epoch { .. } => {}
        }
    }
}

/// Segment files: the one being written and the closed ones.
struct Segments {
    dir: PathBuf,
    current: BufWriter<File>,
    current_id: u64,
    current_len: u64,
    current_summary: Summary,
    closed: Vec<(u64, Summary)>,
    segment_bytes: u64,
}

/// The durable [`EventLog`].
pub struct DurableLog {
    orgs: OrgTable<Slot>,
    retention: Retention,
    tx: mpsc::UnboundedSender<Job>,
    segments: Arc<Mutex<Segments>>,
    failed: Arc<Mutex<Option<String>>>,
    recovery: Recovery,
    disk_bytes: Arc<AtomicU64>,
}

fn seg_path(dir: &Path, id: u64) -> PathBuf {
    dir.join(format!("{id:016}.seg"))
}

impl DurableLog {
    /// Opens (or creates) the log in `cfg.dir`, recovering what is there.
    pub fn open(cfg: DurableConfig, retention: Retention) -> anyhow::Result<Self> {
        fs::create_dir_all(&cfg.dir)?;
        let now = unix_ms();
        let mut windows: HashMap<OrgId, OrgWindow> = HashMap::new();
        if let Ok(text) = fs::read_to_string(cfg.dir.join(CHECKPOINT)) {
            // An unreadable checkpoint costs the heads of fully deleted history: the orgs it
            // named restart in new epochs below (their first remaining record leaves a hole).
            let cp: serde_json::Value = serde_json::from_str(&text).unwrap_or_else(|e| {
                tracing::error!(error = %e, "the checkpoint is unreadable; recovering without it");
                serde_json::Value::Null
            });
            if let Some(orgs) = cp["orgs"].as_object() {
                for (org, v) in orgs {
                    let (Ok(org), Some(Ok(epoch)), Some(head)) = (
                        OrgId::parse(org),
                        v["epoch"].as_str().map(Epoch::parse),
                        v["head"].as_u64(),
                    ) else {
                        continue;
                    };
                    let mut w = OrgWindow::new(org.clone(), epoch);
                    w.restore_head(head);
                    windows.insert(org, w);
                }
            }
        }
        let mut ids: Vec<u64> = fs::read_dir(&cfg.dir)?
            .filter_map(|e| e.ok())
            .filter_map(|e| {
                let name = e.file_name().into_string().ok()?;
                name.strip_suffix(".seg")?.parse().ok()
            })
            .collect();
        ids.sort_unstable();
        let mut recovery = Recovery::default();
        let mut broken: Vec<OrgId> = Vec::new();
        let mut closed = Vec::new();
        for (i, id) in ids.iter().enumerate() {
            let path = seg_path(&cfg.dir, *id);
            let mut data = Vec::new();
            File::open(&path)?.read_to_end(&mut data)?;
            let (good, summary) = replay(
                &data,
                &mut windows,
                &mut broken,
                &mut recovery,
                now,
                &retention,
            );
            recovery.segments += 1;
            if good < data.len() {
                if i + 1 == ids.len() {
                    let cut = (data.len() - good) as u64;
                    tracing::warn!(segment = %path.display(), bytes = cut, "torn write at the end of the log: cut at the last whole record");
                    OpenOptions::new()
                        .write(true)
                        .open(&path)?
                        .set_len(good as u64)?;
                    recovery.torn_bytes += cut;
                } else {
                    tracing::error!(segment = %path.display(), offset = good, "corrupt record in the log: the rest of this segment is skipped");
                    recovery.corrupt_segments += 1;
                }
            }
            closed.push((*id, summary));
        }
        for org in &broken {
            if let Some(w) = windows.get_mut(org) {
                let epoch = Epoch::random();
                tracing::error!(org = %org, new_epoch = %epoch, "the org's history has a hole after recovery: new epoch, clients will get reset");
                w.reset(epoch);
                recovery.reset_orgs.push(org.to_string());
            }
        }
        let next_id = ids.last().map_or(1, |l| l + 1);
        let mut current = BufWriter::with_capacity(
            256 * 1024,
            OpenOptions::new()
                .create(true)
                .append(true)
                .open(seg_path(&cfg.dir, next_id))?,
        );
        // The new epochs are written first, so the next start replays them in order.
        let mut epochs = Vec::new();
        for org in &broken {
            if let Some(w) = windows.get(org) {
                Record::Epoch {
                    org: org.clone(),
                    epoch: w.state().epoch,
                    ts: now,
                }
                .encode(&mut epochs);
            }
        }
        current.write_all(&epochs)?;
        current.flush()?;
        current.get_ref().sync_data()?;
        let segments = Arc::new(Mutex::new(Segments {
            dir: cfg.dir.clone(),
            current,
            current_id: next_id,
            current_len: epochs.len() as u64,
            current_summary: Summary {
                max_ts: now,
                ..Default::default()
            },
            closed,
            segment_bytes: cfg.segment_bytes.max(4096),
        }));
        let orgs: HashMap<OrgId, Arc<Slot>> = windows
            .into_iter()
            .map(|(org, w)| (org, Arc::new(Slot::new(w))))
            .collect();
        let orgs = OrgTable::new(orgs);
        let (tx, rx) = mpsc::unbounded_channel();
        let failed = Arc::new(Mutex::new(None));
        let disk_bytes = Arc::new(AtomicU64::new(0));
        {
            let (segments, failed, retention) = (segments.clone(), failed.clone(), retention);
            std::thread::Builder::new()
                .name("edgestream-log-writer".into())
                .spawn(move || writer(rx, segments, cfg.fsync, failed, retention))?;
        }
        let log = DurableLog {
            orgs,
            retention,
            tx,
            segments,
            failed,
            recovery,
            disk_bytes,
        };
        log.refresh_disk_bytes();
        tracing::info!(
            segments = log.recovery.segments,
            records = log.recovery.records,
            torn_bytes = log.recovery.torn_bytes,
            corrupt_segments = log.recovery.corrupt_segments,
            reset_orgs = log.recovery.reset_orgs.len(),
            "durable log recovered"
        );
        Ok(log)
    }

    /// What recovery found.
    pub fn recovery(&self) -> &Recovery {
        &self.recovery
    }

    fn slot(&self, org: &OrgId) -> Arc<Slot> {
        self.orgs.slot(org, Slot::new)
    }

    /// Writes every org's epoch and the seq its kept history starts after to the checkpoint
    /// (temporary file, sync, rename).
    fn checkpoint(&self) -> anyhow::Result<()> {
        let mut orgs = serde_json::Map::new();
        // Live and idle orgs, each with the seq before its oldest retained event: everything
        // after it stays on disk, in segments this sweep keeps, and is replayed after it at
        // the next start.
        for (org, epoch, head) in self.orgs.positions() {
            orgs.insert(
                org.to_string(),
                serde_json::json!({"epoch": epoch.as_str(), "head": head}),
            );
        }
        let dir = self.segments.lock().dir.clone();
        let tmp = dir.join("checkpoint.json.tmp");
        {
            let mut f = File::create(&tmp)?;
            f.write_all(serde_json::to_string(&serde_json::json!({ "orgs": orgs }))?.as_bytes())?;
            f.sync_all()?;
        }
        fs::rename(&tmp, dir.join(CHECKPOINT))?;
        File::open(&dir)?.sync_all()?;
        Ok(())
    }

    fn refresh_disk_bytes(&self) {
        let dir = self.segments.lock().dir.clone();
        let total = fs::read_dir(dir)
            .map(|d| {
                d.filter_map(|e| e.ok()?.metadata().ok())
                    .map(|m| m.len())
                    .sum()
            })
            .unwrap_or(0);
        self.disk_bytes.store(total, Ordering::Relaxed);
    }

    /// Bytes in the data directory (as of the last sweep).
    pub fn disk_bytes(&self) -> u64 {
        self.disk_bytes.load(Ordering::Relaxed)
    }
}

/// Replays one segment's records into the windows; returns the length of its whole, valid
/// prefix and the newest record time.
fn replay(
    data: &[u8],
    windows: &mut HashMap<OrgId, OrgWindow>,
    broken: &mut Vec<OrgId>,
    recovery: &mut Recovery,
    now: u64,
    retention: &Retention,
) -> (usize, Summary) {
    let (mut at, mut summary) = (0usize, Summary::default());
    while data.len() - at >= 8 {
        let len = u32::from_le_bytes(data[at..at + 4].try_into().expect("4")) as usize;
        let crc = u32::from_le_bytes(data[at + 4..at + 8].try_into().expect("4"));
        let Some(body) = data.get(at + 8..at + 8 + len) else {
            break;
        };
        if crc32fast::hash(body) != crc {
            break;
        }
        let Some(record) = Record::decode(body) else {
            break;
        };
        at += 8 + len;
        recovery.records += 1;
        summary.add(&record);
        apply(record, windows, broken, now, retention);
    }
    (at, summary)
}

fn apply(
    record: Record,
    windows: &mut HashMap<OrgId, OrgWindow>,
    broken: &mut Vec<OrgId>,
    now: u64,
    retention: &Retention,
) {
    let org = record.org().clone();
    if let Record::Epoch { epoch, .. } = &record {
        // The org restarted in this epoch (an earlier recovery found a hole): what came before
        // no longer counts.
        broken.retain(|o| o != &org);
        windows
            .entry(org.clone())
            .or_insert_with(|| OrgWindow::new(org.clone(), epoch.clone()))
            .reset(epoch.clone());
        return;
    }
    if broken.contains(&org) {
        return;
    }
    let w = windows
        .entry(org.clone())
        .or_insert_with(|| OrgWindow::new(org.clone(), record.epoch().clone()));
    match record {
        Record::Event(e) => {
            let s = w.state();
            if e.epoch != s.epoch || e.seq > s.head + 1 {
                broken.push(org);
            } else if e.seq == s.head + 1 {
                w.commit(vec![e], None, now, retention);
            }
            // e.seq <= head: already covered by the checkpoint.
        }
        Record::Key {
            key, result, ts, ..
        } => {
            if result.epoch == w.state().epoch && ts + retention.window_ms >= now {
                w.remember(&key, result, ts, retention);
            }
        }
        Record::Epoch { .. } => {}
    }
}

enum Record {
    Event(Arc<Event>),
    Key {
        org: OrgId,
        key: String,
        result: Appended,
        ts: u64,
    },
    /// The org starts over in this epoch with head 0.
    Epoch {
        org: OrgId,
        epoch: Epoch,
        ts: u64,
    },
}

fn put_str(b: &mut BytesMut, s: &str) {
    b.put_u16_le(s.len() as u16);
    b.put_slice(s.as_bytes());
}

fn get_str(b: &mut &[u8]) -> Option<String> {
    if b.remaining() < 2 {
        return None;
    }
    let n = b.get_u16_le() as usize;
    if b.remaining() < n {
        return None;
    }
    let s = std::str::from_utf8(&b[..n]).ok()?.to_owned();
    b.advance(n);
    Some(s)
}

fn get_u64(b: &mut &[u8]) -> Option<u64> {
    (b.remaining() >= 8).then(|| b.get_u64_le())
}

impl Record {
    fn org(&self) -> &OrgId {
        match self {
            Record::Event(e) => &e.org,
            Record::Key { org, .. } => org,
            Record::Epoch { org, .. } => org,
        }
    }

    fn epoch(&self) -> &Epoch {
        match self {
            Record::Event(e) => &e.epoch,
            Record::Key { result, .. } => &result.epoch,
            Record::Epoch { epoch, .. } => epoch,
        }
    }

    fn ts(&self) -> u64 {
        match self {
            Record::Event(e) => e.ts,
            Record::Key { ts, .. } | Record::Epoch { ts, .. } => *ts,
        }
    }

    /// Appends `[len][crc][body]` to `out`.
    fn encode(&self, out: &mut Vec<u8>) {
        let mut b = BytesMut::new();
        match self {
            Record::Event(e) => {
                b.put_u8(EVENT);
                put_str(&mut b, e.org.as_str());
                put_str(&mut b, e.epoch.as_str());
                b.put_u64_le(e.seq);
                b.put_u64_le(e.ts);
                b.put_u32_le(e.payload.len() as u32);
                b.put_slice(&e.payload);
            }
            Record::Key {
                org,
                key,
                result,
                ts,
            } => {
                b.put_u8(KEY);
                put_str(&mut b, org.as_str());
                put_str(&mut b, key);
                put_str(&mut b, result.epoch.as_str());
                b.put_u64_le(result.first_seq);
                b.put_u64_le(result.last_seq);
                b.put_u64_le(*ts);
            }
            Record::Epoch { org, epoch, ts } => {
                b.put_u8(EPOCH);
                put_str(&mut b, org.as_str());
                put_str(&mut b, epoch.as_str());
                b.put_u64_le(*ts);
            }
        }
        out.extend_from_slice(&(b.len() as u32).to_le_bytes());
        out.extend_from_slice(&crc32fast::hash(&b).to_le_bytes());
        out.extend_from_slice(&b);
    }

    fn decode(mut b: &[u8]) -> Option<Record> {
        let b = &mut b;
        if b.remaining() < 1 {
            return None;
        }
        match b.get_u8() {
            EVENT => {
                let org = OrgId::parse(&get_str(b)?).ok()?;
                let epoch = Epoch::parse(&get_str(b)?).ok()?;
                let (seq, ts) = (get_u64(b)?, get_u64(b)?);
                if b.remaining() < 4 {
                    return None;
                }
                let n = b.get_u32_le() as usize;
                if b.remaining() != n {
                    return None;
                }
                Some(Record::Event(Event::new(
                    org,
                    epoch,
                    seq,
                    ts,
                    Bytes::copy_from_slice(b),
                )))
            }
            KEY => {
                let org = OrgId::parse(&get_str(b)?).ok()?;
                let key = get_str(b)?;
                let epoch = Epoch::parse(&get_str(b)?).ok()?;
                let (first_seq, last_seq, ts) = (get_u64(b)?, get_u64(b)?, get_u64(b)?);
                Some(Record::Key {
                    org,
                    key,
                    result: Appended {
                        epoch,
                        first_seq,
                        last_seq,
                        duplicate: false,
                    },
                    ts,
                })
            }
            EPOCH => {
                let org = OrgId::parse(&get_str(b)?).ok()?;
                let epoch = Epoch::parse(&get_str(b)?).ok()?;
                let ts = get_u64(b)?;
                Some(Record::Epoch { org, epoch, ts })
            }
            _ => None,
        }
    }
}

/// The writer thread: append, sync per policy, then commit and acknowledge in order.
fn writer(
    mut rx: mpsc::UnboundedReceiver<Job>,
    segments: Arc<Mutex<Segments>>,
    fsync: Fsync,
    failed: Arc<Mutex<Option<String>>>,
    retention: Retention,
) {
    while let Some(first) = rx.blocking_recv() {
        let mut jobs = vec![first];
        if fsync != Fsync::Always {
            while jobs.len() < 4096 {
                match rx.try_recv() {
                    Ok(j) => jobs.push(j),
                    Err(_) => break,
                }
            }
        }
        let failure = failed.lock().clone();
        let written = match failure {
            Some(f) => Err(f),
            None => write_batch(&segments, &jobs, fsync).map_err(|e| e.to_string()),
        };
        match written {
            Ok(()) => {
                for j in jobs {
                    {
                        let mut w = j.slot.win.window.lock();
                        w.commit(
                            j.events,
                            j.key.as_deref().map(|k| (k, &j.result)),
                            j.now_ms,
                            &retention,
                        );
                        j.slot.win.announce(j.result.last_seq);
                    }
                    if let Some(k) = &j.key {
                        j.slot.reserve.lock().pending.remove(k);
                    }
                    // The slot is released before the acknowledgement, so an org whose last
                    // append was acknowledged is idle as far as the sweep can tell.
                    drop(j.slot);
                    let _ = j.done.send(Ok(j.result));
                }
            }
            Err(e) => {
                // Reserved seqs were not stored: the org's sequence would have a hole, so the
                // log stops accepting writes (readyz 503) until an operator restarts it.
                tracing::error!(error = %e, "durable log write failed; refusing further appends");
                *failed.lock() = Some(e.clone());
                for j in jobs {
                    let _ = j
                        .done
                        .send(Err(LogError::Unavailable(format!("data dir: {e}"))));
                }
            }
        }
    }
}

fn write_batch(segments: &Mutex<Segments>, jobs: &[Job], fsync: Fsync) -> std::io::Result<()> {
    let mut s = segments.lock();
    for j in jobs {
        s.current.write_all(&j.records)?;
        s.current_len += j.records.len() as u64;
        let sum = &mut s.current_summary;
        sum.max_ts = sum.max_ts.max(j.now_ms);
        if j.key.is_some() {
            sum.max_key_ts = sum.max_key_ts.max(j.now_ms);
        }
        let last = sum.last_seq.entry(j.org.clone()).or_default();
        *last = (*last).max(j.result.last_seq);
    }
    s.current.flush()?;
    if fsync != Fsync::Never {
        s.current.get_ref().sync_data()?;
    }
    if s.current_len >= s.segment_bytes {
        s.rotate()?;
    }
    Ok(())
}

impl Segments {
    /// Closes the current segment and starts the next.
    fn rotate(&mut self) -> std::io::Result<()> {
        self.current.flush()?;
        self.current.get_ref().sync_all()?;
        let next = self.current_id + 1;
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(seg_path(&self.dir, next))?;
        File::open(&self.dir)?.sync_all()?;
        let summary = std::mem::take(&mut self.current_summary);
        self.closed.push((self.current_id, summary));
        self.current = BufWriter::with_capacity(256 * 1024, file);
        self.current_id = next;
        self.current_len = 0;
        Ok(())
    }
}

#[async_trait]
impl EventLog for DurableLog {
    async fn append(
        &self,
        org: &OrgId,
        payloads: Vec<Bytes>,
        idempotency_key: Option<&str>,
    ) -> Result<Appended, LogError> {
        if let Some(f) = self.failed.lock().clone() {
            return Err(LogError::Unavailable(format!("data dir: {f}")));
        }
        let slot = self.slot(org);
        let now_ms = unix_ms();
        let rx = {
            let mut r = slot.reserve.lock();
            if let Some(k) = idempotency_key {
                let seen = slot.win.window.lock().seen_key(k).cloned();
                if let Some(prev) = seen.or_else(|| r.pending.get(k).cloned()) {
                    return Ok(Appended {
                        duplicate: true,
                        ..prev
                    });
                }
            }
            let epoch = slot.win.window.lock().epoch().clone();
            let first_seq = r.head + 1;
            let events: Vec<Arc<Event>> = payloads
                .into_iter()
                .zip(first_seq..)
                .map(|(p, seq)| Event::new(org.clone(), epoch.clone(), seq, now_ms, p))
                .collect();
            let result = Appended {
                epoch,
                first_seq,
                last_seq: first_seq + events.len() as u64 - 1,
                duplicate: false,
            };
            let mut records = Vec::new();
            for e in &events {
                Record::Event(e.clone()).encode(&mut records);
            }
            if let Some(k) = idempotency_key {
                Record::Key {
                    org: org.clone(),
                    key: k.to_owned(),
                    result: result.clone(),
                    ts: now_ms,
                }
                .encode(&mut records);
            }
            let (done, rx) = oneshot::channel();
            let job = Job {
                org: org.clone(),
                slot: slot.clone(),
                records,
                events,
                key: idempotency_key.map(str::to_owned),
                result: result.clone(),
                now_ms,
                done,
            };
            // In the sequencer lock: the writer gets this org's batches in seq order.
            self.tx
                .send(job)
                .map_err(|_| LogError::Unavailable("the log writer stopped".into()))?;
            r.head = result.last_seq;
            if let Some(k) = idempotency_key {
                r.pending.insert(k.to_owned(), result);
            }
            rx
        };
        rx.await
            .map_err(|_| LogError::Unavailable("the log writer stopped".into()))?
    }

    async fn state(&self, org: &OrgId) -> Result<OrgState, LogError> {
        Ok(self.slot(org).win.state())
    }

    async fn read(
        &self,
        org: &OrgId,
        after: &Position,
        limit: usize,
    ) -> Result<ReadOutcome, LogError> {
        Ok(self.slot(org).win.read(after, limit))
    }

    async fn tail(&self, org: &OrgId, after: Option<Position>) -> Result<Box<dyn Tail>, LogError> {
        Ok(self.slot(org).win.tail(after))
    }

    fn kind(&self) -> &'static str {
        "durable"
    }

    fn usage(&self) -> LogUsage {
        LogUsage {
            disk_bytes: self.disk_bytes(),
            recovered_torn_bytes: self.recovery.torn_bytes,
            recovered_corrupt_segments: self.recovery.corrupt_segments,
            recovered_reset_orgs: self.recovery.reset_orgs.len() as u64,
            ..self.orgs.usage()
        }
    }

    fn sweep(&self, now_ms: u64) {
        for (_, s) in self.orgs.slots() {
            s.win.window.lock().evict(now_ms, &self.retention);
        }
        self.orgs.retire_idle(self.retention.max_idle_orgs);
        let cutoff = now_ms.saturating_sub(self.retention.window_ms);
        // A closed segment is deleted once nothing in it is needed: all older than the
        // window, or every event evicted by the count or byte caps and no key still live.
        let firsts: HashMap<OrgId, u64> = self
            .orgs
            .slots()
            .into_iter()
            .map(|(o, s)| (o, s.win.window.lock().first()))
            .collect();
        let old: Vec<u64> = self
            .segments
            .lock()
            .closed
            .iter()
            .filter(|(_, sum)| {
                sum.max_ts < cutoff
                    || (sum.max_key_ts < cutoff
                        && sum
                            .last_seq
                            .iter()
                            // An org no longer in memory retains nothing.
                            .all(|(org, last)| firsts.get(org).is_none_or(|f| last < f)))
            })
            .map(|(id, _)| *id)
            .collect();
        if !old.is_empty() {
            // Heads and epochs first, then the events they no longer need.
            if let Err(e) = self.checkpoint() {
                tracing::error!(error = %e, "checkpoint failed; old segments kept");
                return;
            }
            let mut s = self.segments.lock();
            for id in &old {
                if let Err(e) = fs::remove_file(seg_path(&s.dir, *id)) {
                    tracing::warn!(error = %e, "cannot delete an old segment");
                }
            }
            s.closed.retain(|(id, _)| !old.contains(id));
        }
        self.refresh_disk_bytes();
    }

    async fn ready(&self) -> Result<(), LogError> {
        match self.failed.lock().clone() {
            Some(f) => Err(LogError::Unavailable(format!("data dir: {f}"))),
            None => Ok(()),
        }
    }
}
