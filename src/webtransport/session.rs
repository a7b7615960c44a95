//! The WebTransport driver (PROTOCOL.md section 4.1): moves bytes between a WebTransport
//! session and the [`SessionCore`], and routes the core's transmits: control frames to the
//! client's first bidirectional stream, each org's frames to that org's unidirectional stream,
//! datagrams, and the close as a WebTransport session error. It decides nothing about the
//! protocol.
//!
//! Tasks: the session task runs the core; each org stream has a writer task that opens the
//! stream, writes what the core hands it through the stream's outbox (all that waits, as one
//! chunk) and reports the frames written, so a stalled stream stalls only its org; the control
//! stream, the datagrams (PING answered at once, by the core's rule) and each upload stream
//! have a task of their own.

use std::future::Future;
use std::pin::{pin, Pin};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use edgestream_codec::Frame;
use parking_lot::Mutex;
use tokio::sync::{mpsc, Notify};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use web_transport_quinn::{RecvStream, SendStream, Session};

use crate::close::{CloseCode, Refusal};
use crate::log::{LogError, ReadOutcome};
use crate::session::core::{Layout, Message, SessionCore, StreamId, Transmit};
use crate::session::io::SessionIo;
use crate::session::{ConnectParams, SessionEnv};

/// Live items handed to the core per wake-up.
const LIVE_BATCH: usize = 256;
/// How long the closing capsule may take to reach the client.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(3);
/// Frames a writer may write before it reports them even while it has more to write.
const REPORT_EVERY: usize = 256;

/// Runs a session until it closes.
pub async fn run(env: Arc<SessionEnv>, wt: Session, query: &str) {
    let metrics = env.metrics.clone();
    let refusal = match Driver::start(env, wt.clone(), query).await {
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

/// What the tasks of a session report to the session task, as counters and flags (a channel
/// per session would cost a block of slots for every idle session); the session task is woken
/// through `wake` and reads them.
#[derive(Default)]
struct Reports {
    wake: Notify,
    /// Upload streams that ended since the last look.
    uploads_ended: AtomicUsize,
}

/// One org stream's outbox: the frames the session task hands the writer, and what the writer
/// reports back.
#[derive(Default)]
struct Outbox {
    frames: Mutex<Vec<Bytes>>,
    /// Finish the stream once the frames are written.
    finish: AtomicBool,
    wake: Notify,
    /// Frames written and not yet reported to the core.
    written: AtomicUsize,
    /// The stream could not be opened, or the client stopped it.
    gone: AtomicBool,
    /// The core waits on this stream's progress (a replay batch, a limit in sight): report
    /// as soon as the outbox is written.
    report_wanted: AtomicBool,
}

struct Writer {
    id: StreamId,
    outbox: Arc<Outbox>,
    task: JoinHandle<()>,
}

type ReadFuture =
    Pin<Box<dyn Future<Output = (StreamId, Result<ReadOutcome, LogError>)> + Send + 'static>>;

struct Driver {
    env: Arc<SessionEnv>,
    wt: Session,
    core: SessionCore,
    io: SessionIo,
    queue: mpsc::Receiver<crate::hub::Live>,
    overflow: Arc<crate::hub::Overflow>,
    control: Option<SendStream>,
    control_rx: mpsc::Receiver<Result<Frame, Refusal>>,
    control_tx: mpsc::Sender<Result<Frame, Refusal>>,
    reports: Arc<Reports>,
    /// The org streams' writers (a short list: at most the per-session org limit).
    writers: Vec<Writer>,
    /// The catch-up read out now, if any.
    read: Option<ReadFuture>,
    tasks: Vec<JoinHandle<()>>,
}

impl Driver {
    /// Admits the session and makes its initial subscriptions (or refuses with a close code).
    async fn start(env: Arc<SessionEnv>, wt: Session, query: &str) -> Result<Self, Refusal> {
        let params = ConnectParams::parse(query, None)?;
        let mut core = SessionCore::admit(env.clone(), &params, Layout::Streams, Instant::now())?;
        core.set_max_datagram(wt.max_datagram_size());
        let (io, queue, overflow) = SessionIo::new(env.clone());
        let (control_tx, control_rx) = mpsc::channel(16);
        let max = env.limits.max_control_frame;
        let datagrams = tokio::spawn(answer_datagrams(wt.clone(), max));
        let mut d = Driver {
            env,
            wt,
            core,
            io,
            queue,
            overflow,
            control: None,
            control_rx,
            control_tx,
            reports: Arc::default(),
            writers: Vec::new(),
            read: None,
            tasks: vec![datagrams],
        };
        d.io.drive(&mut d.core).await;
        Ok(d)
    }

    fn shutdown(&mut self) {
        // An interrupted upload stays resumable (its writer records the offset when dropped).
        for t in self.tasks.drain(..) {
            t.abort();
        }
        for w in self.writers.drain(..) {
            w.task.abort();
        }
    }

    /// The session loop; returns the close to send, or `None` when the client went away.
    async fn serve(&mut self) -> Option<Refusal> {
        // The futures of the select live across iterations: the loop turns once per batch of
        // live items, and making `closed` and `accept_bi` anew each time would lock the QUIC
        // connection's state twice per event.
        let (wt, shutdown) = (self.wt.clone(), self.env.shutdown.clone());
        let (overflow, reports) = (self.overflow.clone(), self.reports.clone());
        let mut closed = pin!(wt.closed());
        let mut accept = pin!(wt.accept_bi());
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
            for w in &self.writers {
                let wanted = self.core.awaits_progress(w.id);
                w.outbox.report_wanted.store(wanted, Ordering::Release);
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
                (stream, result) = async { self.read.as_mut().expect("reading").await }, if reading => {
                    self.read = None;
                    self.core.handle_read(stream, result);
                }
                item = self.queue.recv() => {
                    // The session holds a sender: the queue never ends while it runs.
                    let item = item?;
                    self.core.handle_live(item);
                    for _ in 1..LIVE_BATCH {
                        match self.queue.try_recv() {
                            Ok(item) => self.core.handle_live(item),
                            Err(_) => break,
                        }
                    }
                }
                bi = &mut accept => {
                    accept.set(wt.accept_bi());
                    match bi {
                        Ok((send, recv)) => self.on_bi(send, recv).await,
                        Err(_) => return None,
                    }
                }
                frame = self.control_rx.recv() => match frame {
                    Some(Ok(f)) => self.core.handle_frame(f, Instant::now()),
                    Some(Err(r)) => self.core.handle_protocol_error(r),
                    None => {}
                },
            }
        }
    }

    /// Hands the core what the writers and upload tasks report.
    fn on_reports(&mut self) {
        let core = &mut self.core;
        self.writers.retain(|w| {
            let n = w.outbox.written.swap(0, Ordering::AcqRel);
            if n > 0 {
                core.handle_sent(w.id, n);
            }
            let gone = w.outbox.gone.load(Ordering::Acquire);
            if gone {
                core.handle_stream_gone(w.id);
            }
            !gone
        });
        for _ in 0..self.reports.uploads_ended.swap(0, Ordering::AcqRel) {
            core.handle_upload_stream_end();
        }
    }

    fn writer(&self, id: StreamId) -> Option<&Writer> {
        self.writers.iter().find(|w| w.id == id)
    }

    fn remove_writer(&mut self, id: StreamId) -> Option<Writer> {
        let i = self.writers.iter().position(|w| w.id == id)?;
        Some(self.writers.swap_remove(i))
    }

    /// The client's first bidirectional stream is the control stream; every later one is an
    /// upload (section 9).
    async fn on_bi(&mut self, mut send: SendStream, recv: RecvStream) {
        if self.control.is_none() {
            self.control = Some(send);
            let max = self.env.limits.max_control_frame;
            let tx = self.control_tx.clone();
            self.tasks.push(tokio::spawn(read_control(recv, tx, max)));
            return;
        }
        self.tasks.retain(|t| !t.is_finished());
        match self.core.handle_upload_stream() {
            Ok(grant) => {
                let (env, reports) = (self.env.clone(), self.reports.clone());
                self.tasks
                    .push(tokio::spawn(tracing::Instrument::instrument(
                        async move {
                            super::upload::serve(env, grant, send, recv).await;
                            reports.uploads_ended.fetch_add(1, Ordering::AcqRel);
                            reports.wake.notify_one();
                        },
                        tracing::Span::current(),
                    )));
            }
            Err(r) => {
                let busy = Frame::Error {
                    code: r.code.code().into(),
                    message: r.reason,
                };
                let _ = send.write_all(&busy.to_bytes()).await;
                let _ = send.finish();
            }
        }
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
                    let outbox = Arc::new(Outbox::default());
                    let task = tokio::spawn(tracing::Instrument::instrument(
                        write_org(self.wt.clone(), outbox.clone(), self.reports.clone()),
                        tracing::Span::current(),
                    ));
                    self.writers.push(Writer { id, outbox, task });
                }
                Transmit::Stream(id, frames) => {
                    if let Some(w) = self.writer(id) {
                        w.outbox.frames.lock().extend(frames);
                        w.outbox.wake.notify_one();
                    }
                }
                Transmit::Finish(id) => {
                    // The writer finishes on its own; never wait on a client that does not read.
                    if let Some(w) = self.remove_writer(id) {
                        w.outbox.finish.store(true, Ordering::Release);
                        w.outbox.wake.notify_one();
                    }
                }
                Transmit::Abort(id) => {
                    if let Some(w) = self.remove_writer(id) {
                        w.task.abort();
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

/// One org's stream: opens it, then writes what the session hands it, in order. Transmits
/// waiting together are written as one chunk: quinn keeps each written chunk as a segment until
/// it is acknowledged, finds a send offset by scanning those segments, and puts at most one
/// segment in a STREAM frame, so a batch of small frames written as separate chunks made packet
/// building cost grow with the unacknowledged backlog (44% of server CPU in
/// `write_stream_frames` in the bench profile). One copy per batch avoids that.
async fn write_org(wt: Session, outbox: Arc<Outbox>, reports: Arc<Reports>) {
    let gone = || {
        outbox.gone.store(true, Ordering::Release);
        reports.wake.notify_one();
    };
    let Ok(mut stream) = wt.open_uni().await else {
        return gone();
    };
    let mut frames: Vec<Bytes> = Vec::new();
    let mut unreported = 0;
    loop {
        std::mem::swap(&mut frames, &mut *outbox.frames.lock());
        if frames.is_empty() {
            if outbox.finish.load(Ordering::Acquire) {
                let _ = stream.finish();
                return;
            }
            outbox.wake.notified().await;
            continue;
        }
        let n = frames.len();
        let mut chunk = if n == 1 {
            frames.pop().expect("one frame")
        } else {
            let mut joined = BytesMut::with_capacity(frames.iter().map(Bytes::len).sum());
            for f in frames.drain(..) {
                joined.extend_from_slice(&f);
            }
            joined.freeze()
        };
        if stream
            .write_all_chunks(std::slice::from_mut(&mut chunk))
            .await
            .is_err()
        {
            return gone();
        }
        // The session task reads the count whenever it wakes; it is woken for it only when the
        // core waits on this stream (a replay batch, the slow-consumer limit in sight) or every
        // REPORT_EVERY frames, never once per write.
        outbox.written.fetch_add(n, Ordering::AcqRel);
        unreported += n;
        if unreported >= REPORT_EVERY || outbox.report_wanted.load(Ordering::Acquire) {
            unreported = 0;
            reports.wake.notify_one();
        }
    }
}

/// Reads frames from the control stream and hands them to the session task.
async fn read_control(mut recv: RecvStream, tx: mpsc::Sender<Result<Frame, Refusal>>, max: usize) {
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

/// Answers the client's datagrams (a PING gets a PONG) as the core says.
async fn answer_datagrams(wt: Session, max: usize) {
    while let Ok(d) = wt.read_datagram().await {
        if let Some(answer) = crate::session::core::answer_datagram(d, max) {
            let _ = wt.send_datagram(answer);
        }
    }
}
