//! The WebTransport driver (PROTOCOL.md section 4.1): moves bytes between a WebTransport
//! session ([`super::h3`]) and the [`SessionCore`], and routes the core's transmits: control
//! frames to the client's first bidirectional stream, each org's frames to that org's
//! unidirectional stream, datagrams, and the close as a WebTransport session error. It decides
//! nothing about the protocol.
//!
//! One task per session: it runs the core, writes the org streams (what the core hands a
//! stream is written at once when quinn takes it; else the write continues as a future the
//! task polls beside the others, and frames for that org wait in its outbox meanwhile, so a
//! stalled stream stalls only its org), and reads what the client sends (datagrams, the
//! control stream, capsules, new streams). The client's sources are polled only after their
//! own waker fired ([`Gate`]), so a wake-up for live events costs no lock of quinn's
//! connection per source. Each upload stream has a task of its own.
//!
//! Session-level flow control (drafts 13/14, what Safari asks for): the bytes and
//! bidirectional streams the client may send are refilled with `WT_MAX_DATA` and
//! `WT_MAX_STREAMS_BIDI` capsules as they are read; when the client announced limits of its
//! own, org streams are opened and written only within them, and `WT_MAX_*` capsules from the
//! client raise them.

use std::future::Future;
use std::pin::{pin, Pin};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll, Wake, Waker};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use edgestream_codec::Frame;
use futures_util::task::AtomicWaker;
use futures_util::FutureExt;
use quinn::{RecvStream, SendStream};
use tokio::sync::Notify;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use super::h3::{self, wire};
use crate::close::{CloseCode, Refusal};
use crate::log::{LogError, ReadOutcome};
use crate::metrics::Transport;
use crate::session::core::{FrameBytes, Layout, SessionCore, StreamId, Transmit};
use crate::session::io::SessionIo;
use crate::session::{ConnectParams, SessionEnv};

/// Live items handed to the core per wake-up.
const LIVE_BATCH: usize = 256;
/// How long the closing capsule may take to reach the client.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(3);
/// The session-level windows given to the client (drafts 13/14): control frames and uploads
/// (refilled as they are read; quinn's own stream and connection windows still apply), the
/// control stream plus uploads at once, and no use for client-opened unidirectional streams
/// beyond a few (they carry nothing in this protocol and are stopped).
pub const WINDOWS: wire::Windows = wire::Windows {
    max_data: 1 << 20,
    max_streams_uni: 4,
    max_streams_bidi: 1 + crate::session::core::MAX_UPLOADS as u64,
};

/// A session's task: runs it until it closes. The session is admitted (or refused) before
/// the future is made, so the task holds only the driver and the close, not the arguments
/// beside them. `started`: when the connection's first packet arrived (for the handshake
/// histogram).
pub fn run(
    env: Arc<SessionEnv>,
    wt: h3::Session,
    query: &str,
    started: Instant,
) -> Pin<Box<dyn Future<Output = ()> + Send>> {
    match admit(&env, &wt, query, started) {
        Ok(core) => Box::pin(Box::new(Driver::new(env, wt, core)).run()),
        Err(r) => {
            let metrics = env.metrics.clone();
            Box::pin(async move { close(wt, Some(r), &metrics).await })
        }
    }
}

/// Closes the session: with the refusal's close code, or quietly when the client went away.
async fn close(mut wt: h3::Session, refusal: Option<Refusal>, metrics: &crate::metrics::Metrics) {
    match refusal {
        Some(r) => {
            metrics.record_close(r.code.code());
            // Boxed: the close's futures (timers, the capsule's write) would otherwise take
            // room in every session's task for its whole life.
            Box::pin(wt.close(u32::from(r.code.code()), &r.reason, CLOSE_TIMEOUT)).await;
        }
        None => wt
            .connection()
            .close(quinn::VarInt::from_u32(wire::H3_NO_ERROR), b""),
    }
}

/// Admits the session: the token, the plan of initial subscriptions (or a close code).
fn admit(
    env: &Arc<SessionEnv>,
    wt: &h3::Session,
    query: &str,
    started: Instant,
) -> Result<SessionCore, Refusal> {
    let mut params = ConnectParams::parse(query, None)?;
    params.engine = wt.engine;
    let now = Instant::now();
    let mut core = SessionCore::admit(env.clone(), &params, Layout::Streams, now)?;
    env.metrics
        .transport(Transport::WebTransport)
        .handshake
        .observe(now.saturating_duration_since(started).as_secs_f64());
    core.set_max_datagram(wt.max_datagram_size());
    Ok(core)
}

/// What the upload tasks report to the session task (counters and a wake: a channel per
/// session would cost a block of slots for every idle session).
#[derive(Default)]
struct Reports {
    wake: Notify,
    /// Upload streams that ended since the last look.
    uploads_ended: AtomicUsize,
    /// Client streams that ended since the last look, uploads and refused ones (their
    /// session-level stream credit comes back).
    streams_ended: AtomicUsize,
    /// Bytes read from upload streams since the last look (session-level flow control).
    received: AtomicU64,
}

/// One org stream as the session task holds it.
struct OrgOut {
    id: StreamId,
    /// `None` while it is being opened or a write is in flight.
    stream: Option<SendStream>,
    /// Frames waiting for the stream (or what is left of them after a partial write).
    pending: Vec<FrameBytes>,
    /// How many of the core's frames `pending` holds (counted as sent once all their bytes
    /// are).
    frames: usize,
    /// Finish the stream once the frames are written.
    finish: bool,
}

/// A stream operation that did not complete at once.
enum Op {
    Opened(StreamId, Option<SendStream>),
    /// The stream, the frames the write carried, and whether it succeeded.
    Wrote(StreamId, SendStream, usize, bool),
    /// A bidirectional stream of this session the client opened (control or upload).
    Bidi(Option<(SendStream, RecvStream)>),
    /// A unidirectional stream of the HTTP/3 layer (held), or one that was stopped.
    Uni(Option<(u64, RecvStream)>),
}

type OpFuture = Pin<Box<dyn Future<Output = Op> + Send + 'static>>;

type ReadFuture =
    Pin<Box<dyn Future<Output = (StreamId, Result<ReadOutcome, LogError>)> + Send + 'static>>;

type Accept<T> = Pin<Box<dyn Future<Output = Result<T, quinn::ConnectionError>> + Send>>;

/// Polls a future only once its own waker fired (and on its first poll). tokio's `select!`
/// polls every branch whenever the task wakes; the client's sources each lock quinn's
/// connection state when polled, and the task wakes for every batch of live events.
struct Gate {
    flag: Arc<Flag>,
    waker: Waker,
}

struct Flag {
    woken: AtomicBool,
    task: AtomicWaker,
}

impl Wake for Flag {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.woken.store(true, Ordering::Release);
        self.task.wake();
    }
}

impl Gate {
    fn new() -> Self {
        let flag = Arc::new(Flag {
            woken: AtomicBool::new(true),
            task: AtomicWaker::new(),
        });
        Gate {
            waker: Waker::from(flag.clone()),
            flag,
        }
    }

    /// Polls `f` with the gate's waker if it was woken since its last poll.
    fn poll<T>(
        &self,
        cx: &mut Context<'_>,
        f: impl FnOnce(&mut Context<'_>) -> Poll<T>,
    ) -> Poll<T> {
        self.flag.task.register(cx.waker());
        if !self.flag.woken.swap(false, Ordering::AcqRel) {
            return Poll::Pending;
        }
        let out = f(&mut Context::from_waker(&self.waker));
        if out.is_ready() {
            // What replaces the completed source must be polled once to register.
            self.flag.woken.store(true, Ordering::Release);
        }
        out
    }
}

/// What the client sends, as the session task reads it: every source behind one [`Gate`]
/// (a datagram's wake polls the control stream too, but a live event's wakes none of them).
struct Client {
    gate: Gate,
    sources: Sources,
}

struct Sources {
    datagrams: Accept<Bytes>,
    bidi: Accept<(SendStream, RecvStream)>,
    uni: Accept<RecvStream>,
    closed: Pin<Box<dyn Future<Output = ()> + Send>>,
    /// The client's side of the CONNECT stream (capsules).
    connect: Option<RecvStream>,
    capsules: wire::ConnectStream,
    /// The control stream's receiving half and its unparsed bytes.
    control: Option<RecvStream>,
    control_buf: BytesMut,
}

/// One thing the client did.
enum FromClient {
    Datagram(Bytes),
    Bidi(SendStream, RecvStream),
    Uni(RecvStream),
    /// Bytes of the control stream (`None`: it ended).
    Control(Option<usize>),
    Capsule(wire::Capsule),
    /// The session or the connection ended (a CLOSE capsule, the CONNECT stream's end, a
    /// malformed capsule stream, or the connection).
    Gone,
}

fn accept_datagram(conn: quinn::Connection) -> Accept<Bytes> {
    Box::pin(async move { conn.read_datagram().await })
}

fn accept_bidi(conn: quinn::Connection) -> Accept<(SendStream, RecvStream)> {
    Box::pin(async move { conn.accept_bi().await })
}

fn accept_uni(conn: quinn::Connection) -> Accept<RecvStream> {
    Box::pin(async move { conn.accept_uni().await })
}

/// Reads what a stream has now into `buf`: `Some(n)`, or `None` at its end or reset.
fn poll_read(cx: &mut Context<'_>, r: &mut RecvStream, buf: &mut BytesMut) -> Poll<Option<usize>> {
    let mut chunk = [0u8; 2048];
    match r.poll_read(cx, &mut chunk) {
        Poll::Ready(Ok(0)) | Poll::Ready(Err(_)) => Poll::Ready(None),
        Poll::Ready(Ok(n)) => {
            buf.extend_from_slice(&chunk[..n]);
            Poll::Ready(Some(n))
        }
        Poll::Pending => Poll::Pending,
    }
}

impl Client {
    fn new(wt: &mut h3::Session) -> Self {
        let conn = wt.connection().clone();
        let c2 = conn.clone();
        let sources = Sources {
            datagrams: accept_datagram(conn.clone()),
            bidi: accept_bidi(conn.clone()),
            uni: accept_uni(conn),
            closed: Box::pin(async move {
                c2.closed().await;
            }),
            connect: wt.take_connect_recv(),
            capsules: wire::ConnectStream::default(),
            control: None,
            control_buf: BytesMut::new(),
        };
        Client {
            gate: Gate::new(),
            sources,
        }
    }

    fn poll(&mut self, cx: &mut Context<'_>, conn: &quinn::Connection) -> Poll<FromClient> {
        let sources = &mut self.sources;
        self.gate.poll(cx, |cx| sources.poll(cx, conn))
    }
}

impl Sources {
    fn poll(&mut self, cx: &mut Context<'_>, conn: &quinn::Connection) -> Poll<FromClient> {
        if self.closed.as_mut().poll(cx).is_ready() {
            return Poll::Ready(FromClient::Gone);
        }
        loop {
            match self.capsules.next_capsule() {
                Ok(Some(c)) => return Poll::Ready(FromClient::Capsule(c)),
                Err(_) => return Poll::Ready(FromClient::Gone),
                Ok(None) => {}
            }
            let Some(r) = self.connect.as_mut() else {
                break;
            };
            let mut buf = BytesMut::new();
            match poll_read(cx, r, &mut buf) {
                Poll::Ready(Some(_)) => self.capsules.feed(&buf),
                Poll::Ready(None) => return Poll::Ready(FromClient::Gone),
                Poll::Pending => break,
            }
        }
        if let Some(r) = self.control.as_mut() {
            if let Poll::Ready(n) = poll_read(cx, r, &mut self.control_buf) {
                if n.is_none() {
                    self.control = None;
                }
                return Poll::Ready(FromClient::Control(n));
            }
        }
        if let Poll::Ready(r) = self.datagrams.as_mut().poll(cx) {
            self.datagrams = accept_datagram(conn.clone());
            return Poll::Ready(r.map_or(FromClient::Gone, FromClient::Datagram));
        }
        if let Poll::Ready(r) = self.bidi.as_mut().poll(cx) {
            self.bidi = accept_bidi(conn.clone());
            return Poll::Ready(r.map_or(FromClient::Gone, |(s, r)| FromClient::Bidi(s, r)));
        }
        if let Poll::Ready(r) = self.uni.as_mut().poll(cx) {
            self.uni = accept_uni(conn.clone());
            return Poll::Ready(r.map_or(FromClient::Gone, FromClient::Uni));
        }
        Poll::Pending
    }
}

/// Session-level flow control (drafts 13/14), both ways.
struct Flow {
    /// What the client may send: bytes on its streams, and bidirectional streams.
    data_in: wire::Window,
    bidi_in: wire::Window,
    /// What the client lets this server send: bytes on its streams, and streams opened.
    data_out: wire::Credit,
    uni_out: wire::Credit,
    /// Org streams waiting for stream credit.
    waiting: Vec<StreamId>,
    /// Capsules not yet taken by quinn.
    capsules: BytesMut,
    /// A `WT_DATA_BLOCKED` was sent at this limit.
    blocked_at: Option<u64>,
}

struct Driver {
    env: Arc<SessionEnv>,
    wt: h3::Session,
    core: SessionCore,
    io: SessionIo,
    queue: crate::hub::Queue,
    overflow: Arc<crate::hub::Overflow>,
    control: Option<SendStream>,
    client: Client,
    reports: Arc<Reports>,
    /// The header every org stream starts with.
    header: Bytes,
    flow: Box<Flow>,
    /// The org streams (a short list: at most the per-session org limit).
    orgs: Vec<OrgOut>,
    /// Stream opens and writes in flight (a plain list: usually empty, which costs nothing).
    ops: Vec<OpFuture>,
    /// The catch-up read out now, if any.
    read: Option<ReadFuture>,
    tasks: Vec<JoinHandle<()>>,
}

impl Driver {
    fn new(env: Arc<SessionEnv>, mut wt: h3::Session, core: SessionCore) -> Self {
        let (io, queue, overflow) = SessionIo::new(env.clone());
        let client = Client::new(&mut wt);
        let flow = Box::new(Flow {
            data_in: wire::Window::new(WINDOWS.max_data),
            bidi_in: wire::Window::new(WINDOWS.max_streams_bidi),
            data_out: wire::Credit::new(wt.peer.max_data),
            uni_out: wire::Credit::new(wt.peer.max_streams_uni),
            waiting: Vec::new(),
            capsules: BytesMut::new(),
            blocked_at: None,
        });
        Driver {
            header: wire::uni_header(wt.id()),
            env,
            wt,
            core,
            io,
            queue,
            overflow,
            control: None,
            client,
            reports: Arc::default(),
            flow,
            orgs: Vec::new(),
            ops: Vec::new(),
            read: None,
            tasks: Vec::new(),
        }
    }

    /// The session's life. The driver is boxed: an async fn's argument is kept in its future
    /// beside the local it is moved into, and a driver held by value would be there twice.
    async fn run(mut self: Box<Self>) {
        let r = self.serve().await;
        self.shutdown();
        // Boxed: what the close needs would otherwise take room in the task for its life.
        Box::pin(self.finish(r)).await;
    }

    async fn finish(self: Box<Self>, r: Option<Refusal>) {
        // The client's streams (the CONNECT stream's receiving half among them) stay open
        // until the close is out: dropping them would stop them, and a browser takes a
        // stopped CONNECT stream for a lost session.
        let Driver {
            env,
            wt,
            client,
            control,
            ..
        } = *self;
        close(wt, r, &env.metrics).await;
        drop((client, control));
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
        // loop turns once per batch of live items.
        let shutdown = self.env.shutdown.clone();
        let (overflow, reports) = (self.overflow.clone(), self.reports.clone());
        let conn = self.wt.connection().clone();
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
            if !self.flow.capsules.is_empty() {
                self.wt.write_capsules(&mut self.flow.capsules);
            }
            let deadline = self.core.poll_timeout();
            if timer.deadline() != deadline {
                timer.as_mut().reset(deadline);
            }
            let reading = self.read.is_some();
            let client = &mut self.client;
            tokio::select! {
                biased;
                _ = &mut stop => self.core.handle_shutdown(),
                _ = &mut overflowed => self.core.handle_overflow(),
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
                from = std::future::poll_fn(|cx| client.poll(cx, &conn)) => {
                    if self.on_client(from) {
                        tracing::debug!("webtransport session ended by the client");
                        return None;
                    }
                }
            }
        }
    }

    /// What the client did; `true` when the session is over.
    fn on_client(&mut self, from: FromClient) -> bool {
        match from {
            FromClient::Gone => return true,
            FromClient::Datagram(d) => {
                let max = self.env.limits.max_control_frame;
                let payload = wire::datagram_payload(self.wt.id(), d);
                if let Some(answer) =
                    payload.and_then(|p| crate::session::core::answer_datagram(p, max))
                {
                    self.wt.send_datagram(&answer);
                }
            }
            FromClient::Bidi(send, recv) => {
                let id = self.wt.id();
                self.ops.push(Box::pin(async move {
                    Op::Bidi(h3::bidi_stream(send, recv, id).await)
                }));
            }
            FromClient::Uni(recv) => {
                self.ops
                    .push(Box::pin(async move { Op::Uni(h3::uni_stream(recv).await) }));
            }
            FromClient::Control(n) => {
                if let Some(n) = n {
                    self.received(n as u64);
                }
                self.on_control();
            }
            FromClient::Capsule(c) => match c {
                wire::Capsule::Close { .. } => return true,
                wire::Capsule::MaxData(n) => {
                    self.flow.data_out.raise(n);
                    for i in (0..self.orgs.len()).rev() {
                        self.flush(i);
                    }
                }
                wire::Capsule::MaxStreamsUni(n) => {
                    self.flow.uni_out.raise(n);
                    let waiting = std::mem::take(&mut self.flow.waiting);
                    for id in waiting {
                        self.open(id);
                    }
                }
                wire::Capsule::Drain | wire::Capsule::MaxStreamsBidi(_) | wire::Capsule::Other => {}
            },
        }
        false
    }

    /// Frames read from the control stream, handed to the core. A control stream that ends
    /// or is reset leaves the session going without it.
    fn on_control(&mut self) {
        let max = self.env.limits.max_control_frame;
        loop {
            match Frame::decode(&mut self.client.sources.control_buf, max) {
                Ok(Some(f)) => self.core.handle_frame(f, Instant::now()),
                Ok(None) => break,
                Err(e) => {
                    self.core.handle_protocol_error(e.into());
                    self.client.sources.control = None;
                    return;
                }
            }
        }
    }

    /// `n` bytes of the client's streams were read: refill its session-level window.
    fn received(&mut self, n: u64) {
        if let Some(limit) = self.flow.data_in.used(n) {
            let c = wire::limit_capsule(wire::CAPSULE_MAX_DATA, limit);
            self.flow.capsules.extend_from_slice(&c);
        }
    }

    /// Hands the core what the upload tasks report.
    fn on_reports(&mut self) {
        for _ in 0..self.reports.uploads_ended.swap(0, Ordering::AcqRel) {
            self.core.handle_upload_stream_end();
        }
        let ended = self.reports.streams_ended.swap(0, Ordering::AcqRel);
        if ended > 0 {
            if let Some(limit) = self.flow.bidi_in.used(ended as u64) {
                let c = wire::limit_capsule(wire::CAPSULE_MAX_STREAMS_BIDI, limit);
                self.flow.capsules.extend_from_slice(&c);
            }
        }
        let n = self.reports.received.swap(0, Ordering::AcqRel);
        if n > 0 {
            self.received(n);
        }
    }

    fn org(&mut self, id: StreamId) -> Option<usize> {
        self.orgs.iter().position(|o| o.id == id)
    }

    /// A stream operation completed.
    fn on_op(&mut self, op: Op) {
        let (id, stream, written) = match op {
            Op::Opened(id, stream) => (id, stream, 0),
            Op::Wrote(id, stream, n, ok) => (id, ok.then_some(stream), n),
            Op::Bidi(Some((send, recv))) => return self.on_bidi(send, recv),
            Op::Bidi(None) => return,
            Op::Uni(Some((_, recv))) => return self.wt.hold(recv),
            Op::Uni(None) => return,
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

    /// The client's first bidirectional stream is the control stream; every later one an
    /// upload (section 9).
    fn on_bidi(&mut self, send: SendStream, recv: RecvStream) {
        if self.control.is_none() {
            self.control = Some(send);
            self.client.sources.control = Some(recv);
            // Polled at the next turn (the gate opens after any source completes).
        } else {
            self.on_upload(send, recv);
        }
    }

    /// The client stopped the stream, or it could not be opened.
    fn gone(&mut self, i: usize) {
        let o = self.orgs.swap_remove(i);
        self.core.handle_stream_gone(o.id);
    }

    /// Opens an org stream within the client's stream credit (or waits for more).
    fn open(&mut self, id: StreamId) {
        if self.flow.uni_out.available() == 0 {
            self.flow.waiting.push(id);
            let limit = self.flow.uni_out.limit().unwrap_or(0);
            let c = wire::limit_capsule(wire::CAPSULE_STREAMS_BLOCKED_UNI, limit);
            self.flow.capsules.extend_from_slice(&c);
            return;
        }
        self.flow.uni_out.spend(1);
        // Whether a peer counts stream headers in its session-level data is not settled
        // between drafts: counting them keeps this side within the limit either way.
        self.flow.data_out.spend(self.header.len() as u64);
        let (conn, header) = (self.wt.connection().clone(), self.header.clone());
        self.ops.push(Box::pin(async move {
            let opened = async {
                let mut s = conn.open_uni().await.ok()?;
                s.write_all(&header).await.ok()?;
                Some(s)
            };
            Op::Opened(id, opened.await)
        }));
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
        let (id, n) = (o.id, std::mem::take(&mut o.frames));
        let mut chunk = if o.pending.len() == 1 {
            o.pending.pop().expect("one chunk").into_bytes()
        } else {
            let size = o.pending.iter().map(|f| f.bytes().len()).sum();
            let mut joined = BytesMut::with_capacity(size);
            for f in o.pending.drain(..) {
                joined.extend_from_slice(f.bytes());
            }
            joined.freeze()
        };
        // Within the client's session-level credit (drafts 13/14; unlimited otherwise): what
        // does not fit waits for a WT_MAX_DATA capsule, and its frames count as sent with it.
        let credit = self.flow.data_out.available();
        let mut frames = n;
        if (chunk.len() as u64) > credit {
            o.pending
                .push(FrameBytes::Own(chunk.split_off(credit as usize)));
            o.frames = n;
            frames = 0;
            let limit = self.flow.data_out.limit();
            if self.flow.blocked_at != limit {
                self.flow.blocked_at = limit;
                let c = wire::limit_capsule(wire::CAPSULE_DATA_BLOCKED, limit.unwrap_or(0));
                self.flow.capsules.extend_from_slice(&c);
            }
            if chunk.is_empty() {
                o.stream = Some(stream);
                return;
            }
        }
        self.flow.data_out.spend(chunk.len() as u64);
        let mut bufs = [chunk];
        // `write_chunks` is cancel-safe: if it does not resolve at once, nothing was written.
        match stream.write_chunks(&mut bufs).now_or_never() {
            Some(Ok(w)) if w.chunks == 1 => {
                self.orgs[i].stream = Some(stream);
                if frames > 0 {
                    self.core.handle_sent(id, frames);
                }
                self.flush(i); // a FIN, or the rest, may wait
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
                    Op::Wrote(id, stream, frames, ok)
                }));
            }
        }
    }

    /// An upload stream (section 9): served by a task of its own, or refused there.
    fn on_upload(&mut self, mut send: SendStream, recv: RecvStream) {
        self.tasks.retain(|t| !t.is_finished());
        let task = match self.core.handle_upload_stream() {
            Ok(grant) => {
                let (env, reports) = (self.env.clone(), self.reports.clone());
                tokio::spawn(tracing::Instrument::instrument(
                    async move {
                        let r = reports.clone();
                        let on_read = move |n: usize| {
                            r.received.fetch_add(n as u64, Ordering::AcqRel);
                            r.wake.notify_one();
                        };
                        super::upload::serve(env, grant, send, recv, on_read).await;
                        reports.uploads_ended.fetch_add(1, Ordering::AcqRel);
                        reports.streams_ended.fetch_add(1, Ordering::AcqRel);
                        reports.wake.notify_one();
                    },
                    tracing::Span::current(),
                ))
            }
            Err(r) => {
                let reports = self.reports.clone();
                tokio::spawn(async move {
                    let busy = Frame::Error {
                        code: r.code.code().into(),
                        message: r.reason,
                    };
                    let _ = send.write_all(&busy.to_bytes()).await;
                    let _ = send.finish();
                    drop(recv);
                    // Not an upload for the core, but its stream credit comes back.
                    reports.streams_ended.fetch_add(1, Ordering::AcqRel);
                    reports.wake.notify_one();
                })
            }
        };
        self.tasks.push(task);
    }

    /// Routes the core's transmits; `Err` is the close to send.
    async fn route(&mut self) -> Result<(), Refusal> {
        while let Some(t) = self.core.poll_transmit() {
            match t {
                Transmit::Control(m) => {
                    if let Some(c) = self.control.as_mut() {
                        c.write_all(m.bytes()).await.map_err(|_| {
                            Refusal::new(CloseCode::Protocol, "control stream closed")
                        })?;
                    }
                }
                Transmit::Open(id) => {
                    self.orgs.push(OrgOut {
                        id,
                        stream: None,
                        pending: Vec::new(),
                        frames: 0,
                        finish: false,
                    });
                    self.open(id);
                }
                Transmit::Stream(id, frames) => {
                    if let Some(i) = self.org(id) {
                        let o = &mut self.orgs[i];
                        o.frames += frames.len();
                        o.pending.extend(frames);
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
                    self.flow.waiting.retain(|w| *w != id);
                }
                Transmit::Datagram(d) => self.wt.send_datagram(&d),
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
            if let Poll::Ready(op) = ops[i].as_mut().poll(cx) {
                drop(ops.swap_remove(i));
                return Poll::Ready(op);
            }
        }
        Poll::Pending
    })
}
