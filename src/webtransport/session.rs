//! One WebTransport session (PROTOCOL.md section 4.1): one unidirectional stream per org,
//! the client's first bidirectional stream as the control stream, heartbeats and PING/PONG as
//! datagrams, and close codes as WebTransport session errors.
//!
//! Tasks: the session task owns the orgs and the timers; each org stream has a writer task
//! with its own queue and cursor, so a stalled stream stalls only its org; the control stream
//! and the datagrams each have a reader task. Every queue of the session raises one shared
//! overflow signal: a client that lets any queue fill is closed with 4008.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use edgestream_codec::Frame;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use web_transport_quinn::{RecvStream, SendStream, Session};

use crate::close::{CloseCode, Refusal};
use crate::hub::{
    Delivery, HeadWatch, Live, OrgCursor, Overflow, Sink, Subscribed, CATCH_UP_BATCH,
};
use crate::metrics::{Transport, TransportMetrics};
use crate::model::{OrgId, Position};
use crate::presence::{OrgMember, RoomMember};
use crate::session::{ConnectParams, SessionEnv, SessionToken};
use crate::time::unix_ms;

/// Live events written per batch on an org stream.
const LIVE_BATCH: usize = 256;
/// How long the closing capsule may take to reach the client.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(3);

/// Runs a session until it closes.
pub async fn run(env: Arc<SessionEnv>, wt: Session, query: &str) {
    let metrics = env.metrics.clone();
    let refusal = match WtSession::start(env.clone(), wt.clone(), query).await {
        Ok(mut s) => {
            let r = s.serve().await;
            s.shutdown_streams();
            r
        }
        Err(r) => Some(r),
    };
    if let Some(r) = refusal {
        metrics.record_close(r.code.code());
        wt.close(u32::from(r.code.code()), r.reason.as_bytes());
        let _ = tokio::time::timeout(CLOSE_TIMEOUT, wt.closed()).await;
    }
}

/// An org's stream as the session task sees it.
struct OrgStream {
    stop: Option<oneshot::Sender<()>>,
    head: HeadWatch,
    task: JoinHandle<()>,
    /// The session's presence in the org, held as long as the stream.
    _member: OrgMember,
}

struct WtSession {
    env: Arc<SessionEnv>,
    wt: Session,
    /// `enc=br` was asked for (the rest of the query, token and org lists, is dropped after
    /// the start, as on WebSocket).
    brotli: bool,
    token: SessionToken,
    orgs: HashMap<OrgId, OrgStream>,
    overflow: Arc<Overflow>,
    /// An org writer's failure that ends the session.
    failure: Arc<Failure>,
    control: Option<SendStream>,
    control_rx: mpsc::Receiver<Result<Frame, Refusal>>,
    control_tx: mpsc::Sender<Result<Frame, Refusal>>,
    readers: Vec<JoinHandle<()>>,
    /// Rooms joined (left when dropped).
    rooms: Vec<RoomMember>,
    /// Upload streams being received.
    uploads: Vec<JoinHandle<()>>,
    /// The `--max-sessions` permit and the gauge place, released when the session ends.
    _held: crate::session::Held,
}

impl WtSession {
    /// Authenticates and subscribes the initial orgs (or refuses with a close code).
    async fn start(env: Arc<SessionEnv>, wt: Session, query: &str) -> Result<Self, Refusal> {
        let params = ConnectParams::parse(query, None)?;
        let admitted = crate::session::admit(&env, &params, Transport::WebTransport)?;
        let (token, plan) = (admitted.token, admitted.plan);
        let (control_tx, control_rx) = mpsc::channel(16);
        let mut s = WtSession {
            _held: admitted.held,
            overflow: Arc::new(Overflow::default()),
            failure: Arc::new(Failure::default()),
            orgs: HashMap::new(),
            control: None,
            readers: Vec::new(),
            rooms: Vec::new(),
            uploads: Vec::new(),
            env,
            wt,
            brotli: params.brotli,
            token,
            control_rx,
            control_tx,
        };
        s.readers
            .push(tokio::spawn(datagrams(s.wt.clone(), s.env.clone())));
        for (org, since) in plan {
            s.subscribe(org, since).await?;
        }
        Ok(s)
    }

    fn metrics(&self) -> &TransportMetrics {
        self.env.metrics.transport(Transport::WebTransport)
    }

    /// Opens the org's stream and starts its writer; an existing subscription is replaced.
    async fn subscribe(&mut self, org: OrgId, since: Option<Position>) -> Result<(), Refusal> {
        self.unsubscribe(&org, false).await;
        let (sink, rx) = Sink::bounded_with(self.env.limits.queue, self.overflow.clone());
        let (cursor, subscribed) = self.env.hub.subscribe(&org, since.as_ref(), &sink).await?;
        let stream =
            self.wt.open_uni().await.map_err(|e| {
                Refusal::new(CloseCode::Internal, format!("cannot open stream: {e}"))
            })?;
        let (stop_tx, stop_rx) = oneshot::channel();
        let head = cursor.head_watch();
        let writer = OrgWriter {
            env: self.env.clone(),
            failure: self.failure.clone(),
            brotli: self.brotli,
            stream,
            cursor,
            rx,
            _sink: sink,
            frames: Vec::new(),
            deliveries: Vec::new(),
        };
        // In the session's span, like every line of the session.
        let task = tokio::spawn(tracing::Instrument::instrument(
            writer.run(subscribed, stop_rx),
            tracing::Span::current(),
        ));
        let member = self.env.presence.enter(&org, &self.token.grant.sub);
        self.orgs.insert(
            org,
            OrgStream {
                stop: Some(stop_tx),
                head,
                task,
                _member: member,
            },
        );
        Ok(())
    }

    /// Ends an org's stream: UNSUBSCRIBED then FIN when `announce`, else just stops it.
    async fn unsubscribe(&mut self, org: &OrgId, announce: bool) {
        if let Some(mut s) = self.orgs.remove(org) {
            if announce {
                if let Some(stop) = s.stop.take() {
                    let _ = stop.send(());
                }
                // The writer finishes on its own; never wait on a client that does not read.
            } else {
                s.task.abort();
            }
        }
    }

    fn shutdown_streams(&mut self) {
        // Rooms are left before the orgs.
        self.rooms.clear();
        // An interrupted upload stays resumable (its writer records the offset when dropped).
        for u in self.uploads.drain(..) {
            u.abort();
        }
        for (_, s) in self.orgs.drain() {
            s.task.abort();
        }
        for r in self.readers.drain(..) {
            r.abort();
        }
    }

    /// The session loop; returns the close to send, or `None` when the client went away.
    async fn serve(&mut self) -> Option<Refusal> {
        let mut next_heartbeat = Instant::now() + self.env.limits.heartbeat;
        let shutdown = self.env.shutdown.clone();
        let overflow = self.overflow.clone();
        let failure = self.failure.clone();
        loop {
            tokio::select! {
                biased;
                _ = shutdown.cancelled() => return Some(Refusal::new(CloseCode::GoingAway, "server draining")),
                _ = overflow.wait() => return Some(Refusal::new(CloseCode::SlowConsumer, "slow consumer: queue full")),
                _ = failure.raised.cancelled() => return Some(failure.take()),
                e = self.wt.closed() => {
                    tracing::debug!(error = %e, "webtransport session ended");
                    return None;
                }
                _ = tokio::time::sleep_until(self.token.expires_at) => {
                    return Some(Refusal::new(CloseCode::TokenExpired, "token expired"));
                }
                _ = tokio::time::sleep_until(next_heartbeat) => {
                    next_heartbeat = Instant::now() + self.env.limits.heartbeat;
                    self.heartbeat();
                }
                bi = self.wt.accept_bi() => match bi {
                    Ok((send, recv)) if self.control.is_none() => {
                        self.control = Some(send);
                        let tx = self.control_tx.clone();
                        let max = self.env.limits.max_control_frame;
                        self.readers.push(tokio::spawn(control_reader(recv, tx, max)));
                    }
                    // Every later bidirectional stream is an upload (section 9).
                    Ok((mut send, recv)) => {
                        self.uploads.retain(|t| !t.is_finished());
                        if self.uploads.len() >= MAX_UPLOADS {
                            let busy = Frame::Error {
                                code: CloseCode::TooMany.code().into(),
                                message: format!("at most {MAX_UPLOADS} uploads at once per session"),
                            };
                            let _ = send.write_all(&busy.to_bytes()).await;
                            let _ = send.finish();
                        } else {
                            let (env, grant) = (self.env.clone(), self.token.grant.clone());
                            self.uploads.push(tokio::spawn(upload_stream(env, grant, send, recv)));
                        }
                    }
                    Err(_) => return None,
                },
                frame = self.control_rx.recv() => match frame {
                    Some(Ok(f)) => {
                        if let Err(r) = self.on_control(f).await {
                            return Some(r);
                        }
                    }
                    Some(Err(r)) => return Some(r),
                    None => {}
                },
            }
        }
    }

    async fn reply(&mut self, frame: Frame) -> Result<(), Refusal> {
        if let Some(c) = self.control.as_mut() {
            c.write_all(&frame.to_bytes())
                .await
                .map_err(|_| Refusal::new(CloseCode::Protocol, "control stream closed"))?;
        }
        Ok(())
    }

    async fn error(&mut self, code: CloseCode, message: &str) -> Result<(), Refusal> {
        self.reply(Frame::Error {
            code: code.code().into(),
            message: message.to_string(),
        })
        .await
    }

    async fn on_control(&mut self, frame: Frame) -> Result<(), Refusal> {
        match frame {
            Frame::Subscribe { org, epoch, seq } => {
                let org = OrgId::parse(&org)?;
                let since = Position::from_subscribe(&epoch, seq)?;
                if let Err(f) = self.token.grant.check_subscribe(&org) {
                    return self.error(CloseCode::Forbidden, &f.to_string()).await;
                }
                if !self.orgs.contains_key(&org) && self.orgs.len() >= self.env.limits.max_orgs {
                    let msg = format!("at most {} orgs per session", self.env.limits.max_orgs);
                    return self.error(CloseCode::Protocol, &msg).await;
                }
                if let Err(r) = self.subscribe(org, since).await {
                    return self.error(r.code, &r.reason).await;
                }
                Ok(())
            }
            Frame::Unsubscribe { org } => {
                let org = OrgId::parse(&org)?;
                if self.orgs.contains_key(&org) {
                    self.unsubscribe(&org, true).await;
                    Ok(())
                } else {
                    // Not subscribed: there is no stream to carry UNSUBSCRIBED, so answer here.
                    self.reply(Frame::Unsubscribed {
                        org: org.to_string(),
                    })
                    .await
                }
            }
            Frame::Refresh { token } => self.on_refresh(&token).await,
            Frame::Ping(body) => self.reply(Frame::Pong(body)).await,
            Frame::Chat {
                org,
                room,
                id,
                body,
            } => {
                match crate::session::chat(&self.env, &self.token.grant, &org, &room, &id, &body)
                    .await
                {
                    Ok(seq) => self.reply(Frame::ChatAck { id, seq }).await,
                    Err(r) => self.error(r.code, &r.reason).await,
                }
            }
            Frame::Join { org, room } => {
                let joined = crate::session::join_room(
                    &self.env,
                    &mut self.rooms,
                    &self.token.grant,
                    &org,
                    &room,
                )
                .await;
                match joined {
                    Ok(notes) => {
                        for note in notes {
                            if let Some(c) = self.control.as_mut() {
                                c.write_all(&note.binary).await.map_err(|_| {
                                    Refusal::new(CloseCode::Protocol, "control stream closed")
                                })?;
                            }
                        }
                        Ok(())
                    }
                    Err(r) => self.error(r.code, &r.reason).await,
                }
            }
            Frame::Leave { org, room } => {
                match crate::session::leave_room(&mut self.rooms, &self.token.grant, &org, &room) {
                    Ok(()) => Ok(()),
                    Err(r) => self.error(r.code, &r.reason).await,
                }
            }
            Frame::Unknown { .. } => Ok(()),
            other => Err(Refusal::new(
                CloseCode::Protocol,
                format!("frame type {:#04x} is not sent by clients", other.kind()),
            )),
        }
    }

    async fn on_refresh(&mut self, token: &str) -> Result<(), Refusal> {
        let revoked = match self.token.refresh(&self.env.auth, token, self.orgs.keys()) {
            Ok(revoked) => revoked,
            Err(e) => return self.error(e.code, &e.reason).await,
        };
        for org in revoked {
            self.error(
                CloseCode::Forbidden,
                &format!("org {org} no longer granted"),
            )
            .await?;
            self.unsubscribe(&org, true).await;
        }
        Ok(())
    }

    /// Sends HEARTBEAT datagrams naming every org's head, split to fit the path.
    fn heartbeat(&mut self) {
        let ts = unix_ms();
        let mut heads: Vec<(String, u64)> = self
            .orgs
            .iter()
            .map(|(o, s)| (o.to_string(), s.head.head()))
            .collect();
        heads.sort();
        let max = self.wt.max_datagram_size();
        for frame in split_heartbeat(ts, heads, max) {
            if self.wt.send_datagram(frame).is_ok() {
                self.metrics().heartbeats_sent.inc();
            }
        }
    }
}

/// Splits a heartbeat into frames of at most `max` bytes each (one at least, even empty).
pub fn split_heartbeat(ts: u64, heads: Vec<(String, u64)>, max: usize) -> Vec<Bytes> {
    let mut out = Vec::new();
    let mut current: Vec<(String, u64)> = Vec::new();
    for entry in heads {
        current.push(entry);
        let f = Frame::Heartbeat {
            ts,
            heads: current.clone(),
        };
        if f.encoded_len() > max && current.len() > 1 {
            let last = current.pop().expect("len > 1");
            out.push(
                Frame::Heartbeat {
                    ts,
                    heads: std::mem::take(&mut current),
                }
                .to_bytes(),
            );
            current.push(last);
        }
    }
    let f = Frame::Heartbeat { ts, heads: current };
    if out.is_empty() || !matches!(&f, Frame::Heartbeat { heads, .. } if heads.is_empty()) {
        out.push(f.to_bytes());
    }
    out
}

/// Writes one org's frames to its stream, in order.
/// The first failure an org writer cannot get past (the log failed during catch-up): the
/// session closes with it, as a WebSocket session does.
#[derive(Default)]
struct Failure {
    refusal: parking_lot::Mutex<Option<Refusal>>,
    raised: tokio_util::sync::CancellationToken,
}

impl Failure {
    fn raise(&self, r: Refusal) {
        self.refusal.lock().get_or_insert(r);
        self.raised.cancel();
    }

    fn take(&self) -> Refusal {
        self.refusal
            .lock()
            .take()
            .unwrap_or_else(|| Refusal::new(CloseCode::Internal, "internal error"))
    }
}

struct OrgWriter {
    env: Arc<SessionEnv>,
    failure: Arc<Failure>,
    brotli: bool,
    stream: SendStream,
    cursor: OrgCursor,
    rx: mpsc::Receiver<Live>,
    /// Keeps the queue open while the writer lives.
    _sink: Sink,
    frames: Vec<Bytes>,
    deliveries: Vec<Delivery>,
}

impl OrgWriter {
    async fn run(mut self, subscribed: Subscribed, mut stop: oneshot::Receiver<()>) {
        let first = Frame::Subscribed {
            org: subscribed.org.to_string(),
            epoch: subscribed.epoch.to_string(),
            head: subscribed.head,
            resume: subscribed.resume,
        };
        self.frames.push(first.to_bytes());
        loop {
            if !self.frames.is_empty() && self.flush().await.is_err() {
                return; // the client stopped the stream or the session ended
            }
            if self.cursor.needs_catch_up() {
                if let Err(e) = self
                    .cursor
                    .catch_up(CATCH_UP_BATCH, &mut self.deliveries)
                    .await
                {
                    // The client resumes with `since`, here or on another node.
                    tracing::debug!(error = %e, "replay read failed: the session closes");
                    self.failure.raise(e.into());
                    return;
                }
                self.encode(true);
                continue;
            }
            tokio::select! {
                biased;
                _ = &mut stop => {
                    let bye = Frame::Unsubscribed { org: self.cursor.org().to_string() }.to_bytes();
                    let _ = self.stream.write_all(&bye).await;
                    let _ = self.stream.finish();
                    return;
                }
                item = self.rx.recv() => {
                    let Some(item) = item else { return };
                    self.take(item);
                    for _ in 1..LIVE_BATCH {
                        match self.rx.try_recv() {
                            Ok(item) => self.take(item),
                            Err(_) => break,
                        }
                    }
                    self.encode(false);
                }
            }
        }
    }

    /// One item of the queue: an event for the cursor, or a presence change (after the events
    /// queued before it).
    fn take(&mut self, item: Live) {
        match item {
            Live::Event(e) => self.cursor.on_live(e, &mut self.deliveries),
            Live::Presence(note) => {
                self.encode(false);
                self.frames.push(note.binary.clone());
            }
        }
    }

    fn encode(&mut self, replayed: bool) {
        let org = self.cursor.org().clone();
        let n = self
            .deliveries
            .iter()
            .filter(|d| matches!(d, Delivery::Event(_)))
            .count() as u64;
        for d in self.deliveries.drain(..) {
            self.frames.push(match d {
                Delivery::Event(e) if self.brotli => {
                    e.binary_for_brotli(&self.env.encoding).clone()
                }
                Delivery::Event(e) => e.binary().clone(),
                Delivery::Reset { epoch, head } => Frame::Reset {
                    org: org.to_string(),
                    epoch: epoch.to_string(),
                    head,
                }
                .to_bytes(),
            });
        }
        let m = self.env.metrics.transport(Transport::WebTransport);
        m.events_delivered.add(n);
        if replayed {
            m.events_replayed.add(n);
        }
    }

    /// Writes the pending frames as one chunk. quinn keeps each written chunk as a segment
    /// until it is acknowledged, finds a send offset by scanning those segments, and puts at
    /// most one segment in a STREAM frame: a batch of small event frames written as separate
    /// chunks made packet building cost grow with the unacknowledged backlog (44% of server
    /// CPU in `write_stream_frames` in the bench profile). One copy per batch avoids that.
    async fn flush(&mut self) -> Result<(), ()> {
        let mut chunk = if self.frames.len() == 1 {
            self.frames.pop().expect("one frame")
        } else {
            let len = self.frames.iter().map(Bytes::len).sum();
            let mut joined = BytesMut::with_capacity(len);
            for f in self.frames.drain(..) {
                joined.extend_from_slice(&f);
            }
            joined.freeze()
        };
        self.frames.clear();
        self.stream
            .write_all_chunks(std::slice::from_mut(&mut chunk))
            .await
            .map_err(|_| ())
    }
}

/// Uploads one session may run at once.
const MAX_UPLOADS: usize = 4;
/// Progress is reported at least this often, in bytes and in time.
const PROGRESS_BYTES: u64 = 256 * 1024;
const PROGRESS_EVERY: Duration = Duration::from_millis(250);

/// One upload stream (section 9): UPLOAD_BEGIN, then raw bytes to the end of the stream;
/// UPLOAD_PROGRESS as they land, then UPLOAD_DONE, or ERROR. The stream's flow control is the
/// backpressure: bytes are read only once the previous ones are on disk.
async fn upload_stream(
    env: Arc<SessionEnv>,
    grant: crate::auth::Grant,
    mut send: SendStream,
    mut recv: RecvStream,
) {
    if let Err(r) = upload(&env, &grant, &mut send, &mut recv).await {
        let err = Frame::Error {
            code: r.code.code().into(),
            message: r.reason,
        };
        let _ = send.write_all(&err.to_bytes()).await;
    }
    let _ = send.finish();
}

async fn upload(
    env: &SessionEnv,
    grant: &crate::auth::Grant,
    send: &mut SendStream,
    recv: &mut RecvStream,
) -> Result<(), Refusal> {
    let uploads = env.uploads.as_ref().ok_or_else(|| {
        Refusal::new(
            CloseCode::Protocol,
            "uploads are not enabled on this node (--upload-dir)",
        )
    })?;
    let mut buf = BytesMut::with_capacity(1024);
    let begin = loop {
        if let Some(f) = Frame::decode(&mut buf, env.limits.max_control_frame)? {
            break f;
        }
        match recv.read_chunk(64 * 1024, true).await {
            Ok(Some(c)) => buf.extend_from_slice(&c.bytes),
            _ => {
                return Err(Refusal::new(
                    CloseCode::Protocol,
                    "the stream ended before UPLOAD_BEGIN",
                ))
            }
        }
    };
    let Frame::UploadBegin {
        org,
        name,
        size,
        upload_id,
        offset,
        ..
    } = begin
    else {
        return Err(Refusal::new(
            CloseCode::Protocol,
            "an upload stream starts with UPLOAD_BEGIN",
        ));
    };
    let org = OrgId::parse(&org)?;
    grant
        .check_upload(&org)
        .map_err(|f| Refusal::new(CloseCode::Forbidden, f.to_string()))?;
    let id = (!upload_id.is_empty()).then_some(upload_id.as_str());
    let size = (offset == 0).then_some(size);
    let mut w = uploads
        .begin(&org, &name, size, &grant.sub, id, offset)
        .await
        .map_err(crate::session::upload_refusal)?;
    let progress = |w: &crate::upload::UploadWriter| {
        Frame::UploadProgress {
            upload_id: w.id().to_string(),
            received: w.received(),
            size: w.size(),
        }
        .to_bytes()
    };
    let (mut told_at, mut told_bytes) = (Instant::now(), w.received());
    let mut data = buf.split().freeze();
    loop {
        if !data.is_empty() {
            w.write(&data)
                .await
                .map_err(crate::session::upload_refusal)?;
        }
        if w.received() - told_bytes >= PROGRESS_BYTES || told_at.elapsed() >= PROGRESS_EVERY {
            (told_at, told_bytes) = (Instant::now(), w.received());
            send.write_all(&progress(&w))
                .await
                .map_err(|_| Refusal::new(CloseCode::Protocol, "upload stream closed"))?;
        }
        match recv.read_chunk(64 * 1024, true).await {
            Ok(Some(c)) => data = c.bytes,
            Ok(None) => break,
            // Reset or the session ended: the upload stays resumable at its offset.
            Err(_) => return Ok(()),
        }
    }
    let view = w.finish().await.map_err(crate::session::upload_refusal)?;
    crate::session::upload_completed(env, &view).await?;
    let done = Frame::UploadDone {
        upload_id: view.id.clone(),
        size: view.size,
        sha256: view.sha256.clone().unwrap_or_default(),
    };
    let _ = send.write_all(&progress_done(&view)).await;
    send.write_all(&done.to_bytes())
        .await
        .map_err(|_| Refusal::new(CloseCode::Protocol, "upload stream closed"))?;
    Ok(())
}

fn progress_done(view: &crate::upload::UploadView) -> Bytes {
    Frame::UploadProgress {
        upload_id: view.id.clone(),
        received: view.size,
        size: view.size,
    }
    .to_bytes()
}

/// Reads frames from the control stream and hands them to the session task.
async fn control_reader(
    mut recv: RecvStream,
    tx: mpsc::Sender<Result<Frame, Refusal>>,
    max: usize,
) {
    let mut buf = BytesMut::with_capacity(1024);
    loop {
        loop {
            match Frame::decode(&mut buf, max) {
                Ok(Some(f)) => {
                    if tx.send(Ok(f)).await.is_err() {
                        return;
                    }
                }
                Ok(None) => break,
                Err(e) => {
                    let _ = tx.send(Err(e.into())).await;
                    return;
                }
            }
        }
        match recv.read_chunk(max, true).await {
            Ok(Some(chunk)) => buf.extend_from_slice(&chunk.bytes),
            Ok(None) | Err(_) => return, // finished or reset: the session goes on without it
        }
    }
}

/// Answers PING datagrams with PONG datagrams; ignores everything else.
async fn datagrams(wt: Session, env: Arc<SessionEnv>) {
    while let Ok(d) = wt.read_datagram().await {
        if let Ok(Frame::Ping(body)) = Frame::decode_exact(d, env.limits.max_control_frame) {
            let _ = wt.send_datagram(Frame::Pong(body).to_bytes());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn heartbeats_split_to_fit() {
        let heads: Vec<(String, u64)> = (0..200)
            .map(|i| (format!("org-{i:03}-{}", "x".repeat(40)), i))
            .collect();
        let frames = split_heartbeat(1, heads.clone(), 1200);
        assert!(frames.len() > 1);
        let mut seen = Vec::new();
        for f in &frames {
            assert!(f.len() <= 1200, "{}", f.len());
            let Frame::Heartbeat { heads, .. } = Frame::decode_exact(f.clone(), 4096).unwrap()
            else {
                panic!()
            };
            seen.extend(heads);
        }
        assert_eq!(seen, heads, "every head once, in order");
        assert_eq!(
            split_heartbeat(1, vec![], 1200).len(),
            1,
            "an empty heartbeat still goes out"
        );
    }
}
