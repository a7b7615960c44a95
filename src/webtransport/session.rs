//! The WebTransport driver (PROTOCOL.md section 4.1): moves bytes between a WebTransport
//! session and the [`SessionCore`], and routes the core's transmits: control frames to the
//! client's first bidirectional stream, each org's frames to that org's unidirectional stream,
//! datagrams, and the close as a WebTransport session error. It decides nothing about the
//! protocol.
//!
//! Tasks: the session task runs the core and writes the org streams itself: what the core
//! hands a stream is written at once when quinn takes it (the common case: no other task is
//! woken), else the write continues as a future the session task polls beside the others, and
//! frames for that org wait in its outbox meanwhile, so a stalled stream stalls only its org.
//! The control stream, the datagrams (PING answered at once, by the core's rule) and each
//! upload stream have a task of their own.

use std::future::Future;
use std::pin::{pin, Pin};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use edgestream_codec::Frame;
use futures_util::FutureExt;
use tokio::sync::{mpsc, Notify};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use web_transport_quinn::{RecvStream, SendStream, Session};

use crate::close::{CloseCode, Refusal};
use crate::log::{LogError, ReadOutcome};
use crate::metrics::Transport;
use crate::session::core::{Layout, Message, SessionCore, StreamId, Transmit};
use crate::session::io::SessionIo;
use crate::session::{ConnectParams, SessionEnv};

/// Live items handed to the core per wake-up.
const LIVE_BATCH: usize = 256;
/// How long the closing capsule may take to reach the client.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(3);

/// Runs a session until it closes.
/// `started`: when the connection's first packet arrived (for the handshake histogram).
pub async fn run(env: Arc<SessionEnv>, wt: Session, query: &str, started: Instant) {
    let metrics = env.metrics.clone();
    let refusal = match Driver::start(env, wt.clone(), query, started).await {
        Ok(mut d) => {
            let r = d.serve().await;
            d.shutdown();
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

/// What the upload tasks report to the session task (a counter and a wake: a channel per
/// session would cost a block of slots for every idle session).
#[derive(Default)]
struct Reports {
    wake: Notify,
    /// Upload streams that ended since the last look.
    uploads_ended: AtomicUsize,
}

/// One org stream as the session task holds it.
struct OrgOut {
    id: StreamId,
    /// `None` while it is being opened or a write is in flight.
    stream: Option<SendStream>,
    /// Frames waiting for the stream.
    pending: Vec<Bytes>,
    /// Finish the stream once the frames are written.
    finish: bool,
}

/// A stream operation that did not complete at once.
enum Op {
    Opened(StreamId, Option<SendStream>),
    /// The stream, the frames the write carried, and whether it succeeded.
    Wrote(StreamId, SendStream, usize, bool),
}

type OpFuture = Pin<Box<dyn Future<Output = Op> + Send + 'static>>;

type ReadFuture =
    Pin<Box<dyn Future<Output = (StreamId, Result<ReadOutcome, LogError>)> + Send + 'static>>;

struct Driver {
    env: Arc<SessionEnv>,
    wt: Session,
    core: SessionCore,
    io: SessionIo,
    queue: crate::hub::Queue,
    overflow: Arc<crate::hub::Overflow>,
    control: Option<SendStream>,
    /// The control stream's frames and the upload streams, from the accepting task.
    from_client: mpsc::Receiver<FromClient>,
    reports: Arc<Reports>,
    /// The org streams (a short list: at most the per-session org limit).
    orgs: Vec<OrgOut>,
    /// Stream opens and writes in flight (a plain list: usually empty, which costs nothing).
    ops: Vec<OpFuture>,
    /// The catch-up read out now, if any.
    read: Option<ReadFuture>,
    tasks: Vec<JoinHandle<()>>,
}

impl Driver {
    /// Admits the session and makes its initial subscriptions (or refuses with a close code).
    async fn start(
        env: Arc<SessionEnv>,
        wt: Session,
        query: &str,
        started: Instant,
    ) -> Result<Self, Refusal> {
        let params = ConnectParams::parse(query, None)?;
        let now = Instant::now();
        let mut core = SessionCore::admit(env.clone(), &params, Layout::Streams, now)?;
        env.metrics
            .transport(Transport::WebTransport)
            .handshake
            .observe(now.saturating_duration_since(started).as_secs_f64());
        core.set_max_datagram(wt.max_datagram_size());
        let (io, queue, overflow) = SessionIo::new(env.clone());
        let (tx, from_client) = mpsc::channel(16);
        let max = env.limits.max_control_frame;
        let client = tokio::spawn(serve_client(wt.clone(), tx, max));
        let mut d = Driver {
            env,
            wt,
            core,
            io,
            queue,
            overflow,
            control: None,
            from_client,
            reports: Arc::default(),
            orgs: Vec::new(),
            ops: Vec::new(),
            read: None,
            tasks: vec![client],
        };
        d.io.drive(&mut d.core).await;
        Ok(d)
    }

    fn shutdown(&mut self) {
        // An interrupted upload stays resumable (its writer records the offset when dropped).
        for t in self.tasks.drain(..) {
            t.abort();
        }
        self.orgs.clear();
        self.ops.clear();
    }

    /// The session loop; returns the close to send, or `None` when the client went away.
    async fn serve(&mut self) -> Option<Refusal> {
        // The futures of the select live across iterations, and none is costly to poll: the
        // loop turns once per batch of live items. (Accepting streams, whose poll locks the
        // session's accept state and the connection's, has a task of its own.)
        let (wt, shutdown) = (self.wt.clone(), self.env.shutdown.clone());
        let (overflow, reports) = (self.overflow.clone(), self.reports.clone());
        let mut closed = pin!(wt.closed());
        let mut stop = pin!(shutdown.cancelled());
        let mut overflowed = pin!(overflow.wait());
        let mut reported = pin!(reports.wake.notified());
        let mut timer = pin!(tokio::time::sleep_until(self.core.poll_timeout()));
        loop {
            self.on_reports();
            self.io.drive(&mut self.core).await;
            if self.read.is_none() {
                if let Some(r) = self.core.poll_read() {
                    self.read = Some(Box::pin(self.io.read(r)));
                }
            }
            if let Err(r) = self.route().await {
                return Some(r);
            }
            let deadline = self.core.poll_timeout();
            if timer.deadline() != deadline {
                timer.as_mut().reset(deadline);
            }
            let reading = self.read.is_some();
            tokio::select! {
                biased;
                _ = &mut stop => self.core.handle_shutdown(),
                _ = &mut overflowed => self.core.handle_overflow(),
                e = &mut closed => {
                    tracing::debug!(error = %e, "webtransport session ended");
                    return None;
                }
                _ = &mut timer => {
                    self.core.set_max_datagram(self.wt.max_datagram_size());
                    self.core.handle_timeout(Instant::now());
                }
                _ = &mut reported => reported.set(reports.wake.notified()),
                op = next_op(&mut self.ops), if !self.ops.is_empty() => self.on_op(op),
                (stream, result) = async { self.read.as_mut().expect("reading").await }, if reading => {
                    self.read = None;
                    self.core.handle_read(stream, result, Instant::now());
                }
                item = self.queue.recv() => {
                    self.core.handle_live(item);
                    for _ in 1..LIVE_BATCH {
                        match self.queue.try_recv() {
                            Ok(item) => self.core.handle_live(item),
                            Err(_) => break,
                        }
                    }
                }
                from = self.from_client.recv() => match from {
                    Some(FromClient::Control(send)) => self.control = Some(*send),
                    Some(FromClient::Frame(f)) => match *f {
                        Ok(f) => self.core.handle_frame(f, Instant::now()),
                        Err(r) => self.core.handle_protocol_error(r),
                    },
                    Some(FromClient::Upload(pair)) => self.on_upload(*pair),
                    None => {}
                },
            }
        }
    }

    /// Hands the core what the upload tasks report.
    fn on_reports(&mut self) {
        for _ in 0..self.reports.uploads_ended.swap(0, Ordering::AcqRel) {
            self.core.handle_upload_stream_end();
        }
    }

    fn org(&mut self, id: StreamId) -> Option<usize> {
        self.orgs.iter().position(|o| o.id == id)
    }

    /// A stream operation completed: the stream is back for the next write.
    fn on_op(&mut self, op: Op) {
        let (id, stream, written) = match op {
            Op::Opened(id, stream) => (id, stream, 0),
            Op::Wrote(id, stream, n, ok) => (id, ok.then_some(stream), n),
        };
        let Some(i) = self.org(id) else {
            return; // aborted meanwhile: the stream is dropped
        };
        if written > 0 {
            self.core.handle_sent(id, written);
        }
        match stream {
            Some(s) => {
                self.orgs[i].stream = Some(s);
                self.flush(i);
            }
            None => self.gone(i),
        }
    }

    /// The client stopped the stream, or it could not be opened.
    fn gone(&mut self, i: usize) {
        let o = self.orgs.swap_remove(i);
        self.core.handle_stream_gone(o.id);
    }

    /// Writes what waits for an org's stream: at once if quinn takes it all, else as an
    /// operation the session task polls. Several transmits go out as one chunk: quinn keeps
    /// each written chunk as a segment until it is acknowledged, finds a send offset by
    /// scanning those segments, and puts at most one segment in a STREAM frame, so a batch of
    /// small frames written as separate chunks made packet building cost grow with the
    /// unacknowledged backlog (44% of server CPU in `write_stream_frames` in the bench
    /// profile). One copy per batch avoids that.
    fn flush(&mut self, i: usize) {
        let o = &mut self.orgs[i];
        let Some(mut stream) = o.stream.take() else {
            return; // opening, or a write in flight: it flushes again when done
        };
        if o.pending.is_empty() {
            if o.finish {
                let _ = stream.finish();
                self.orgs.swap_remove(i);
            } else {
                o.stream = Some(stream);
            }
            return;
        }
        let (id, n) = (o.id, o.pending.len());
        let chunk = if n == 1 {
            o.pending.pop().expect("one frame")
        } else {
            let mut joined = BytesMut::with_capacity(o.pending.iter().map(Bytes::len).sum());
            for f in o.pending.drain(..) {
                joined.extend_from_slice(&f);
            }
            joined.freeze()
        };
        let mut bufs = [chunk];
        // `write_chunks` is cancel-safe: if it does not resolve at once, nothing was written.
        match stream.write_chunks(&mut bufs).now_or_never() {
            Some(Ok(w)) if w.chunks == 1 => {
                o.stream = Some(stream);
                self.core.handle_sent(id, n);
                self.flush(i); // a FIN may wait
            }
            Some(Err(_)) => self.gone(i),
            // Blocked (flow control) or partly written: the rest as an operation.
            Some(Ok(_)) | None => {
                let [mut rest] = bufs;
                self.ops.push(Box::pin(async move {
                    let ok = stream
                        .write_all_chunks(std::slice::from_mut(&mut rest))
                        .await
                        .is_ok();
                    Op::Wrote(id, stream, n, ok)
                }));
            }
        }
    }

    /// An upload stream (section 9): served by a task of its own, or refused there.
    fn on_upload(&mut self, (mut send, recv): (SendStream, RecvStream)) {
        self.tasks.retain(|t| !t.is_finished());
        let task = match self.core.handle_upload_stream() {
            Ok(grant) => {
                let (env, reports) = (self.env.clone(), self.reports.clone());
                tokio::spawn(tracing::Instrument::instrument(
                    async move {
                        super::upload::serve(env, grant, send, recv).await;
                        reports.uploads_ended.fetch_add(1, Ordering::AcqRel);
                        reports.wake.notify_one();
                    },
                    tracing::Span::current(),
                ))
            }
            Err(r) => tokio::spawn(async move {
                let busy = Frame::Error {
                    code: r.code.code().into(),
                    message: r.reason,
                };
                let _ = send.write_all(&busy.to_bytes()).await;
                let _ = send.finish();
            }),
        };
        self.tasks.push(task);
    }

    /// Routes the core's transmits; `Err` is the close to send.
    async fn route(&mut self) -> Result<(), Refusal> {
        while let Some(t) = self.core.poll_transmit() {
            match t {
                Transmit::Control(Message::Binary(b) | Message::Text(b)) => {
                    if let Some(c) = self.control.as_mut() {
                        c.write_all(&b).await.map_err(|_| {
                            Refusal::new(CloseCode::Protocol, "control stream closed")
                        })?;
                    }
                }
                Transmit::Open(id) => {
                    self.orgs.push(OrgOut {
                        id,
                        stream: None,
                        pending: Vec::new(),
                        finish: false,
                    });
                    let wt = self.wt.clone();
                    self.ops.push(Box::pin(
                        async move { Op::Opened(id, wt.open_uni().await.ok()) },
                    ));
                }
                Transmit::Stream(id, frames) => {
                    if let Some(i) = self.org(id) {
                        self.orgs[i].pending.extend(frames);
                        self.flush(i);
                    }
                }
                Transmit::Finish(id) => {
                    // Written after its frames; never waited on (a client may not read).
                    if let Some(i) = self.org(id) {
                        self.orgs[i].finish = true;
                        self.flush(i);
                    }
                }
                Transmit::Abort(id) => {
                    if let Some(i) = self.org(id) {
                        self.orgs.swap_remove(i);
                    }
                }
                Transmit::Datagram(d) => {
                    let _ = self.wt.send_datagram(d);
                }
                Transmit::Close(r) => return Err(r),
            }
        }
        Ok(())
    }
}

/// The first stream operation to complete.
fn next_op(ops: &mut Vec<OpFuture>) -> impl Future<Output = Op> + '_ {
    std::future::poll_fn(move |cx| {
        for i in 0..ops.len() {
            if let std::task::Poll::Ready(op) = ops[i].as_mut().poll(cx) {
                drop(ops.swap_remove(i));
                return std::task::Poll::Ready(op);
            }
        }
        std::task::Poll::Pending
    })
}

/// What the client's bidirectional streams bring the session task (boxed: the channel's
/// slots stay small).
enum FromClient {
    /// The control stream's sending half.
    Control(Box<SendStream>),
    /// A frame read from the control stream, or why it could not be read.
    Frame(Box<Result<Frame, Refusal>>),
    /// An upload stream.
    Upload(Box<(SendStream, RecvStream)>),
}

/// What comes from the client other than its reading of org streams, in one task: datagrams
/// (answered here), and the bidirectional streams: the first is the control stream (its frames
/// are read here), every later one an upload (section 9).
async fn serve_client(wt: Session, tx: mpsc::Sender<FromClient>, max: usize) {
    let streams = async {
        let Ok((send, recv)) = wt.accept_bi().await else {
            return;
        };
        if tx.send(FromClient::Control(Box::new(send))).await.is_err() {
            return;
        }
        let uploads = async {
            while let Ok(pair) = wt.accept_bi().await {
                if tx.send(FromClient::Upload(Box::new(pair))).await.is_err() {
                    return;
                }
            }
        };
        tokio::join!(read_control(recv, &tx, max), uploads);
    };
    tokio::join!(answer_datagrams(&wt, max), streams);
}

/// Reads frames from the control stream and hands them to the session task.
async fn read_control(mut recv: RecvStream, tx: &mpsc::Sender<FromClient>, max: usize) {
    let mut buf = BytesMut::with_capacity(1024);
    loop {
        loop {
            let f = match Frame::decode(&mut buf, max) {
                Ok(Some(f)) => Ok(f),
                Ok(None) => break,
                Err(e) => Err(e.into()),
            };
            let end = f.is_err();
            if tx.send(FromClient::Frame(Box::new(f))).await.is_err() || end {
                return;
            }
        }
        match recv.read_chunk(max, true).await {
            Ok(Some(chunk)) => buf.extend_from_slice(&chunk.bytes),
            Ok(None) | Err(_) => return, // finished or reset: the session goes on without it
        }
    }
}

/// Answers the client's datagrams (a PING gets a PONG) as the core says.
async fn answer_datagrams(wt: &Session, max: usize) {
    while let Ok(d) = wt.read_datagram().await {
        if let Some(answer) = crate::session::core::answer_datagram(d, max) {
            let _ = wt.send_datagram(answer);
        }
    }
}
