//! The session core: one client session as a state machine, the same for both transports and
//! free of I/O, in the spirit of quinn-proto's `Connection`.
//!
//! It owns what a session is: the grant and its expiry, the subscriptions (each org's cursor,
//! its stream and its presence), the rooms joined, the uploads in progress, the heartbeat
//! deadline and the limits. It never awaits, never reads a clock and never touches a socket:
//!
//! - **Input** through `handle_*`: a client command ([`ClientCommand`], decoded from a binary
//!   frame or JSON), a live item from the hub, the answer to an I/O request, a datagram, a
//!   timeout, the transport's progress. Each takes `now` when time matters.
//! - **Output** through `poll_*`: [`SessionCore::poll_transmit`] (what to send where: the
//!   control channel, an org's stream, a datagram, or a close),
//!   [`SessionCore::poll_request`] (I/O to make before the next command: subscribe, append,
//!   join, upload), [`SessionCore::poll_read`] (the next log read of a catch-up) and
//!   [`SessionCore::poll_timeout`] (the next deadline).
//!
//! A driver (`session::ws` for WebSocket, `webtransport::session` for WebTransport) moves
//! bytes and routes transmits; [`super::io::SessionIo`] makes the requests. Where the two
//! transports differ, the core decides by its [`Layout`]: on a WebSocket everything is a
//! message on the one socket; on WebTransport each org has its own stream, heartbeats are
//! datagrams, and the driver reports each stream's progress so that the core paces replays
//! and detects a slow consumer.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use edgestream_codec::{json, ClientCommand, Frame, Resume, Since};
use tokio::time::Instant;

use super::{Admitted, ConnectParams, Format, Held, SessionEnv, SessionToken};
use crate::close::{CloseCode, Refusal};
use crate::event::{Encoded, EventFrame};
use crate::hub::{Delivery, Live, OrgCursor, Subscribed, CATCH_UP_BATCH};
use crate::log::{Appended, LogError, ReadOutcome};
use crate::metrics::{Transport, TransportMetrics};
use crate::model::{OrgId, Position};
use crate::presence::{OrgMember, PresenceNote, RoomMember};

/// The session's user enters an org's presence with its subscription; `listen`: and gets the
/// org's presence (`presence=1`).
#[derive(Debug, Clone)]
pub struct Enter {
    pub user: String,
    pub listen: bool,
}
use crate::upload::{UploadError, UploadView, UploadWriter};

/// Uploads one session may run at once (WebSocket messages or WebTransport streams).
pub const MAX_UPLOADS: usize = 4;
/// Upload progress is reported at least this often, in bytes and in time.
pub const PROGRESS_BYTES: u64 = 256 * 1024;
pub const PROGRESS_EVERY: Duration = Duration::from_millis(250);

/// How a transport carries a session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    /// WebSocket: one ordered socket for everything, in one format.
    Socket(Format),
    /// WebTransport: a control stream, one stream per org, datagrams; binary frames only.
    Streams,
}

/// A subscription's stream. Ids are never reused within a session, so an answer for a
/// subscription that has since ended (or been replaced) is recognised and dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct StreamId(pub u64);

/// A message as the client receives it.
#[derive(Debug, Clone)]
pub enum Message {
    Binary(Bytes),
    /// UTF-8 text (JSON format).
    Text(Bytes),
    /// An event, in the session's format ([`EventFrame::is_text`]): its bytes stay the event's.
    Event(EventFrame),
}

impl Message {
    /// What goes on the wire.
    pub fn bytes(&self) -> &Bytes {
        match self {
            Message::Binary(b) | Message::Text(b) => b,
            Message::Event(f) => f.bytes(),
        }
    }
}

/// The bytes of one frame on an org's stream: built for this session, or an event's.
#[derive(Debug, Clone)]
pub enum FrameBytes {
    Own(Bytes),
    Event(EventFrame),
}

impl FrameBytes {
    pub fn bytes(&self) -> &Bytes {
        match self {
            FrameBytes::Own(b) => b,
            FrameBytes::Event(f) => f.bytes(),
        }
    }

    /// The bytes as their own handle (the event's are shared, not copied).
    pub fn into_bytes(self) -> Bytes {
        match self {
            FrameBytes::Own(b) => b,
            FrameBytes::Event(f) => f.bytes().clone(),
        }
    }
}

impl edgestream_ws::Payload for FrameBytes {
    fn bytes(&self) -> &Bytes {
        FrameBytes::bytes(self)
    }
}

/// What to send where.
#[derive(Debug)]
pub enum Transmit {
    /// A message on the socket (WebSocket) or the control stream (WebTransport).
    Control(Message),
    /// WebTransport: open a unidirectional stream for a subscription; its frames follow.
    Open(StreamId),
    /// WebTransport: frames of one org's stream, in order, to write as one chunk. The driver
    /// reports their progress with [`SessionCore::handle_sent`].
    Stream(StreamId, Vec<FrameBytes>),
    /// WebTransport: finish the stream after its frames (UNSUBSCRIBED was the last).
    Finish(StreamId),
    /// WebTransport: drop the stream at once (replaced by a new subscription).
    Abort(StreamId),
    /// A datagram (WebTransport heartbeats and PONGs).
    Datagram(Bytes),
    /// Close the session with this code (after the transmits before it).
    Close(Refusal),
}

/// I/O the core needs made before it handles the next command; answered with
/// [`SessionCore::handle_response`].
pub enum Request {
    /// Subscribe the session's sink to an org. `initial`: part of the start (a failure closes
    /// the session) rather than a SUBSCRIBE (a failure is an ERROR frame).
    Subscribe {
        org: OrgId,
        since: Option<Position>,
        initial: bool,
        /// When the session is not yet present in the org.
        enter: Option<Enter>,
    },
    /// Append a chat message (CHAT), with its idempotency key.
    Chat {
        org: OrgId,
        room: String,
        id: String,
        payload: Bytes,
        key: String,
    },
    /// Join a room (JOIN).
    Join {
        org: OrgId,
        room: String,
        user: String,
    },
    /// Start or resume an upload (UPLOAD_BEGIN on a WebSocket).
    UploadBegin {
        org: OrgId,
        name: String,
        size: Option<u64>,
        from: String,
        id: Option<String>,
        offset: u64,
    },
    /// Write an upload's next bytes; when `finish`, complete it and record it in the org's log.
    UploadWrite {
        writer: Box<UploadWriter>,
        bytes: Bytes,
        finish: bool,
    },
}

/// The answer to a [`Request`].
pub enum Response {
    Subscribed {
        org: OrgId,
        initial: bool,
        result: Result<(OrgCursor, Subscribed), LogError>,
        member: Option<OrgMember>,
    },
    Chatted {
        org: OrgId,
        room: String,
        id: String,
        result: Result<Appended, LogError>,
    },
    /// The room's snapshot follows on the session's queue.
    Joined {
        member: Result<RoomMember, LogError>,
    },
    UploadBegun(Result<Box<UploadWriter>, UploadError>),
    UploadWritten {
        upload_id: String,
        /// The writer, when the upload goes on.
        writer: Option<Box<UploadWriter>>,
        /// The completed upload, when it finished.
        done: Option<Box<UploadView>>,
        result: Result<(), Refusal>,
    },
}

/// A log read for a catch-up, answered with [`SessionCore::handle_read`].
#[derive(Debug, Clone)]
pub struct Read {
    pub stream: StreamId,
    pub org: OrgId,
    pub after: Position,
    pub limit: usize,
}

/// The refusal a driver reports when the node drains.
pub fn draining() -> Refusal {
    Refusal::new(CloseCode::GoingAway, "server draining")
}

/// The refusal for a session whose queue overflowed (the hub could not hand it an event).
pub fn slow_consumer() -> Refusal {
    Refusal::new(CloseCode::SlowConsumer, "slow consumer: queue full")
}

/// Wall-clock time derived from `now`: the unix time at the session's start plus the time
/// since, so that a test's virtual time moves the heartbeat timestamps and expiry together.
#[derive(Debug, Clone, Copy)]
struct Clock {
    at: Instant,
    unix_ms: u64,
}

impl Clock {
    fn unix_ms(&self, now: Instant) -> u64 {
        self.unix_ms + now.saturating_duration_since(self.at).as_millis() as u64
    }
}

/// One org of the session.
struct Sub {
    cursor: OrgCursor,
    stream: StreamId,
    /// Streams layout: per transmit handed to the stream and not yet written, in order, its
    /// frames and how many of them are live (the driver reports frames written).
    in_flight: VecDeque<(usize, usize)>,
    live_pending: usize,
    /// A catch-up read is out.
    reading: bool,
    /// A resume (`since` recovered) not yet caught up: since when (for the catch-up histogram).
    resuming_since: Option<Instant>,
}

/// An upload in progress on the socket.
struct Upload {
    id: String,
    /// Out while a write is being made.
    writer: Option<Box<UploadWriter>>,
    received: u64,
    size: u64,
    told_at: Instant,
    told_bytes: u64,
}

/// One client session, transport-neutral and free of I/O.
pub struct SessionCore {
    env: Arc<SessionEnv>,
    layout: Layout,
    transport: Transport,
    brotli: bool,
    /// `presence=1`.
    listen: bool,
    clock: Clock,
    token: SessionToken,
    // Field order is drop order: a session leaves its rooms before its orgs.
    rooms: Vec<RoomMember>,
    subs: Vec<Sub>,
    /// The presence in each subscribed org, kept across a re-SUBSCRIBE.
    present: Vec<OrgMember>,
    uploads: Vec<Upload>,
    /// WebTransport upload streams open now.
    upload_streams: usize,
    next_stream: u64,
    next_heartbeat: Instant,
    max_datagram: usize,
    transmits: VecDeque<Transmit>,
    requests: VecDeque<Request>,
    deliveries: Vec<Delivery>,
    /// Counted events not yet added to the metrics (added once per batch of output).
    delivered: u64,
    replayed: u64,
    /// Live deliveries until the next one is timed (metrics::DELIVERY_SAMPLE_EVERY).
    sample_in: u32,
    closed: bool,
    _held: Held,
}

impl SessionCore {
    /// Starts a session: the shared start sequence ([`super::admit`]: the session permit
    /// before anything else, the token, the plan), then the initial subscriptions as requests.
    pub fn admit(
        env: Arc<SessionEnv>,
        params: &ConnectParams,
        layout: Layout,
        now: Instant,
    ) -> Result<Self, Refusal> {
        let transport = match layout {
            Layout::Socket(_) => Transport::WebSocket,
            Layout::Streams => Transport::WebTransport,
        };
        let clock = Clock {
            at: now,
            unix_ms: crate::time::unix_ms(),
        };
        let Admitted { token, plan, held } =
            super::admit(&env, params, transport, now, clock.unix_ms)?;
        let enter = Enter {
            user: token.grant.sub.clone(),
            listen: params.presence,
        };
        let requests = plan
            .into_iter()
            .map(|(org, since)| Request::Subscribe {
                org,
                since,
                initial: true,
                enter: Some(enter.clone()),
            })
            .collect();
        Ok(SessionCore {
            next_heartbeat: now + env.limits.heartbeat,
            env,
            layout,
            transport,
            brotli: params.brotli,
            listen: params.presence,
            clock,
            token,
            rooms: Vec::new(),
            subs: Vec::new(),
            present: Vec::new(),
            uploads: Vec::new(),
            upload_streams: 0,
            next_stream: 0,
            max_datagram: 1200,
            transmits: VecDeque::new(),
            requests,
            deliveries: Vec::new(),
            delivered: 0,
            replayed: 0,
            sample_in: 1,
            closed: false,
            _held: held,
        })
    }

    /// When the token runs out (`exp` plus the leeway).
    pub fn expires_at(&self) -> Instant {
        self.token.expires_at
    }

    /// Whether the core has closed (a [`Transmit::Close`] was emitted).
    pub fn is_closed(&self) -> bool {
        self.closed
    }

    /// The largest datagram the path carries now (heartbeats are split to fit).
    pub fn set_max_datagram(&mut self, max: usize) {
        self.max_datagram = max;
    }

    fn metrics(&self) -> &TransportMetrics {
        self.env.metrics.transport(self.transport)
    }

    // ----- output -----

    /// The next thing to send. Delivery counts reach the metrics when the output runs dry.
    pub fn poll_transmit(&mut self) -> Option<Transmit> {
        let t = self.transmits.pop_front();
        if t.is_none() && (self.delivered | self.replayed) != 0 {
            let m = self.env.metrics.transport(self.transport);
            m.events_delivered.inc_by(self.delivered);
            m.events_replayed.inc_by(self.replayed);
            (self.delivered, self.replayed) = (0, 0);
        }
        t
    }

    /// The next I/O to make; the driver makes it and answers before handing the core the next
    /// client command, so commands take effect in the order they were sent.
    pub fn poll_request(&mut self) -> Option<Request> {
        if self.closed {
            self.requests.clear();
        }
        let r = self.requests.pop_front();
        if r.is_none() && self.requests.capacity() > 0 {
            // Requests come in bursts (the start, a command): an idle session keeps no room.
            self.requests = VecDeque::new();
        }
        r
    }

    /// Whether a catch-up read is ready to go ([`SessionCore::poll_read`] would return one).
    pub fn wants_read(&self) -> bool {
        !self.closed && self.subs.iter().any(|s| self.read_ready(s))
    }

    fn read_ready(&self, s: &Sub) -> bool {
        // On streams, the next batch waits until the stream has written the last one: a stalled
        // stream stalls only its own replay.
        s.cursor.needs_catch_up()
            && !s.reading
            && (self.layout != Layout::Streams || s.in_flight.is_empty())
    }

    /// The next catch-up read (one org at a time per org, as many orgs as are ready).
    pub fn poll_read(&mut self) -> Option<Read> {
        if self.closed {
            return None;
        }
        let i = self.subs.iter().position(|s| self.read_ready(s))?;
        let s = &mut self.subs[i];
        s.reading = true;
        Some(Read {
            stream: s.stream,
            org: s.cursor.org().clone(),
            after: s.cursor.position(),
            limit: CATCH_UP_BATCH,
        })
    }

    /// The next deadline: a heartbeat or the token's expiry.
    pub fn poll_timeout(&self) -> Instant {
        self.next_heartbeat.min(self.token.expires_at)
    }

    fn close(&mut self, r: Refusal) {
        if !self.closed {
            self.closed = true;
            self.transmits.push_back(Transmit::Close(r));
        }
    }

    fn format(&self) -> Format {
        match self.layout {
            Layout::Socket(f) => f,
            Layout::Streams => Format::Binary,
        }
    }

    /// A message in the session's format: JSON text or a binary frame.
    fn message(&self, text: impl FnOnce() -> String, frame: impl FnOnce() -> Frame) -> Message {
        match self.format() {
            Format::Json => Message::Text(Bytes::from(text())),
            Format::Binary => Message::Binary(frame().to_bytes()),
        }
    }

    fn control(&mut self, m: Message) {
        self.transmits.push_back(Transmit::Control(m));
    }

    fn error(&mut self, code: CloseCode, message: &str) {
        let m = self.message(
            || json::error(code.code().into(), message),
            || Frame::Error {
                code: code.code().into(),
                message: message.to_string(),
            },
        );
        self.control(m);
    }

    fn refused(&mut self, r: Refusal) {
        self.error(r.code, &r.reason);
    }

    fn unsubscribed(&self, org: &OrgId) -> Message {
        self.message(
            || json::unsubscribed(org.as_str()),
            || Frame::Unsubscribed {
                org: org.to_string(),
            },
        )
    }

    /// An org's message: on its stream (WebTransport) or the socket. `live` counts it against
    /// the slow-consumer limit.
    fn for_org(&mut self, i: usize, m: Message, live: bool) {
        let Layout::Streams = self.layout else {
            return self.control(m);
        };
        let frame = match m {
            Message::Binary(b) => FrameBytes::Own(b),
            Message::Event(f) if !f.is_text() => FrameBytes::Event(f),
            Message::Text(_) | Message::Event(_) => unreachable!("streams carry binary frames"),
        };
        let sub = &mut self.subs[i];
        let n = usize::from(live);
        match self.transmits.back_mut() {
            Some(Transmit::Stream(id, frames)) if *id == sub.stream => {
                frames.push(frame);
                let last = sub.in_flight.back_mut().expect("a transmit in flight");
                (last.0, last.1) = (last.0 + 1, last.1 + n);
            }
            _ => {
                self.transmits
                    .push_back(Transmit::Stream(sub.stream, vec![frame]));
                sub.in_flight.push_back((1, n));
            }
        }
        sub.live_pending += n;
        if sub.live_pending > self.env.limits.queue {
            self.close(slow_consumer());
        }
    }

    // ----- input: client commands -----

    /// A WebSocket binary message.
    pub fn handle_binary(&mut self, msg: Bytes, now: Instant) {
        if self.format() != Format::Binary {
            return self.close(Refusal::new(
                CloseCode::Protocol,
                "binary message on a format=json session",
            ));
        }
        match Frame::decode_exact(msg, self.env.limits.max_control_frame) {
            Ok(f) => self.handle_frame(f, now),
            Err(e) => self.close(e.into()),
        }
    }

    /// A WebSocket text message.
    pub fn handle_text(&mut self, text: &str, now: Instant) {
        if self.format() != Format::Json {
            return self.close(Refusal::new(
                CloseCode::Protocol,
                "text message on a format=bin session",
            ));
        }
        match ClientCommand::from_json(text) {
            Ok(c) => self.handle_command(c, now),
            Err(e) => self.close(Refusal::new(CloseCode::Protocol, e.to_string())),
        }
    }

    /// A frame read from the control stream (WebTransport) or a binary message.
    pub fn handle_frame(&mut self, frame: Frame, now: Instant) {
        match ClientCommand::from_frame(frame) {
            Ok(c) => self.handle_command(c, now),
            Err(e) => self.close(Refusal::new(CloseCode::Protocol, e.to_string())),
        }
    }

    /// A transport-level protocol error (an undecodable control stream): the session closes.
    pub fn handle_protocol_error(&mut self, r: Refusal) {
        self.close(r);
    }

    /// One client command. Refusals of a command the session survives are ERROR frames; a
    /// malformed command closes it (4400).
    pub fn handle_command(&mut self, cmd: ClientCommand, now: Instant) {
        if self.closed {
            return;
        }
        if self.layout == Layout::Streams {
            // Uploads have streams of their own on WebTransport (section 9).
            use edgestream_codec::frame::kind;
            let kind = match &cmd {
                ClientCommand::UploadBegin { .. } => Some(kind::UPLOAD_BEGIN),
                ClientCommand::UploadChunk { .. } => Some(kind::UPLOAD_CHUNK),
                _ => None,
            };
            if let Some(kind) = kind {
                let msg = format!("frame type {kind:#04x} is not sent by clients");
                return self.close(Refusal::new(CloseCode::Protocol, msg));
            }
        }
        let r = match cmd {
            ClientCommand::Subscribe { org, since } => self.on_subscribe(&org, since),
            ClientCommand::Unsubscribe { org } => self.on_unsubscribe(&org),
            ClientCommand::Refresh { token } => {
                self.on_refresh(&token, now);
                Ok(())
            }
            ClientCommand::Ping(body) => {
                let pong = match self.format() {
                    Format::Json => {
                        Message::Text(Bytes::from(json::pong(&String::from_utf8_lossy(&body))))
                    }
                    Format::Binary => Message::Binary(Frame::Pong(body).to_bytes()),
                };
                self.control(pong);
                Ok(())
            }
            ClientCommand::Chat {
                org,
                room,
                id,
                body,
            } => {
                if let Err(r) = self.on_chat(&org, &room, &id, &body) {
                    self.refused(r);
                }
                Ok(())
            }
            ClientCommand::Join { org, room } => {
                if let Err(r) = self.on_join(&org, &room) {
                    self.refused(r);
                }
                Ok(())
            }
            ClientCommand::Leave { org, room } => {
                let (rooms, grant) = (&mut self.rooms, &self.token.grant);
                if let Err(r) = super::leave_room(rooms, grant, &org, &room) {
                    self.refused(r);
                }
                Ok(())
            }
            ClientCommand::UploadBegin {
                org,
                name,
                size,
                upload_id,
                offset,
            } => {
                if let Err(r) = self.on_upload_begin(&org, name, size, upload_id, offset) {
                    self.refused(r);
                }
                Ok(())
            }
            ClientCommand::UploadChunk {
                upload_id,
                offset,
                bytes,
            } => {
                if let Err(r) = self.on_upload_chunk(&upload_id, offset, bytes) {
                    self.refused(r);
                }
                Ok(())
            }
            ClientCommand::Unknown => Ok(()),
        };
        if let Err(r) = r {
            self.close(r);
        }
    }

    fn sub_index(&self, org: &OrgId) -> Option<usize> {
        self.subs.iter().position(|s| s.cursor.org() == org)
    }

    fn on_subscribe(&mut self, org: &str, since: Option<Since>) -> Result<(), Refusal> {
        let org = OrgId::parse(org)?;
        let since = match since {
            None => None,
            Some(Since::Parts { epoch, seq }) => Position::from_subscribe(&epoch, seq)?,
            Some(Since::Text(t)) => Some(Position::parse(&t)?),
        };
        if let Err(f) = self.token.grant.check_subscribe(&org) {
            self.error(CloseCode::Forbidden, &f.to_string());
            return Ok(());
        }
        let max = self.env.limits.max_orgs;
        if self.sub_index(&org).is_none() && self.subs.len() >= max {
            self.error(
                CloseCode::Protocol,
                &format!("at most {max} orgs per session"),
            );
            return Ok(());
        }
        let enter = (!self.present.iter().any(|m| m.org() == &org)).then(|| Enter {
            user: self.token.grant.sub.clone(),
            listen: self.listen,
        });
        self.requests.push_back(Request::Subscribe {
            org,
            since,
            initial: false,
            enter,
        });
        Ok(())
    }

    /// Ends an org's subscription; `announce`: with UNSUBSCRIBED.
    fn drop_org(&mut self, org: &OrgId, announce: bool) {
        if let Some(i) = self.sub_index(org) {
            if announce && self.layout == Layout::Streams {
                let bye = self.unsubscribed(org);
                self.for_org(i, bye, false);
                let s = self.subs.swap_remove(i);
                self.transmits.push_back(Transmit::Finish(s.stream));
            } else {
                self.subs.swap_remove(i);
            }
        }
        self.present.retain(|m| m.org() != org);
        if announce && self.layout != Layout::Streams {
            let bye = self.unsubscribed(org);
            self.control(bye);
        }
    }

    fn on_unsubscribe(&mut self, org: &str) -> Result<(), Refusal> {
        let org = OrgId::parse(org)?;
        if self.sub_index(&org).is_none() {
            // Not subscribed: the answer goes on the control channel on either transport.
            let bye = self.unsubscribed(&org);
            self.control(bye);
            return Ok(());
        }
        self.drop_org(&org, true);
        Ok(())
    }

    /// REFRESH: a new token for the same subject moves the expiry; orgs it no longer grants
    /// are unsubscribed. A bad token is answered with ERROR and the old one stays.
    fn on_refresh(&mut self, token: &str, now: Instant) {
        let subscribed: Vec<OrgId> = self.subs.iter().map(|s| s.cursor.org().clone()).collect();
        let unix = self.clock.unix_ms(now);
        let revoked = match self
            .token
            .refresh(&self.env.auth, token, subscribed.iter(), now, unix)
        {
            Ok(revoked) => revoked,
            Err(e) => return self.refused(e),
        };
        for org in revoked {
            self.error(
                CloseCode::Forbidden,
                &format!("org {org} no longer granted"),
            );
            self.drop_org(&org, true);
        }
    }

    fn on_chat(&mut self, org: &str, room: &str, id: &str, body: &[u8]) -> Result<(), Refusal> {
        let (org, payload, key) =
            super::chat_payload(&self.env.limits, &self.token.grant, org, room, id, body)?;
        self.requests.push_back(Request::Chat {
            org,
            room: room.to_string(),
            id: id.to_string(),
            payload,
            key,
        });
        Ok(())
    }

    fn on_join(&mut self, org: &str, room: &str) -> Result<(), Refusal> {
        let (org, room) = super::room_of(&self.token.grant, org, room)?;
        if !self.rooms.iter().any(|r| r.is(&org, &room)) {
            self.requests.push_back(Request::Join {
                org,
                room,
                user: self.token.grant.sub.clone(),
            });
        }
        Ok(())
    }

    fn on_upload_begin(
        &mut self,
        org: &str,
        name: String,
        size: u64,
        upload_id: String,
        offset: u64,
    ) -> Result<(), Refusal> {
        let org = upload_checks(&self.env, &self.token.grant, org, self.uploads.len())?;
        self.requests.push_back(Request::UploadBegin {
            org,
            name,
            size: (offset == 0).then_some(size),
            from: self.token.grant.sub.clone(),
            id: (!upload_id.is_empty()).then_some(upload_id),
            offset,
        });
        Ok(())
    }

    fn on_upload_chunk(&mut self, id: &str, offset: u64, bytes: Bytes) -> Result<(), Refusal> {
        let i = self
            .uploads
            .iter()
            .position(|u| u.id == id)
            .ok_or_else(|| Refusal::new(CloseCode::Protocol, "no such upload in this session"))?;
        let u = &mut self.uploads[i];
        if offset != u.received {
            return Err(Refusal::new(
                CloseCode::Protocol,
                format!("upload {id} is at offset {}", u.received),
            ));
        }
        let Some(writer) = u.writer.take() else {
            return Err(Refusal::new(CloseCode::Protocol, "upload busy"));
        };
        let finish = u.received + bytes.len() as u64 >= u.size;
        self.requests.push_back(Request::UploadWrite {
            writer,
            bytes,
            finish,
        });
        Ok(())
    }

    /// WebTransport: a client opened an upload stream. Returns the grant to check it with, or
    /// the refusal to write on it (the session stays).
    pub fn handle_upload_stream(&mut self) -> Result<crate::auth::Grant, Refusal> {
        if self.upload_streams >= MAX_UPLOADS {
            return Err(too_many_uploads());
        }
        self.upload_streams += 1;
        Ok(self.token.grant.clone())
    }

    /// WebTransport: an upload stream ended.
    pub fn handle_upload_stream_end(&mut self) {
        self.upload_streams = self.upload_streams.saturating_sub(1);
    }

    // ----- input: I/O answers -----

    /// The answer to the last [`Request`].
    pub fn handle_response(&mut self, resp: Response, now: Instant) {
        match resp {
            Response::Subscribed {
                org,
                initial,
                result,
                member,
            } => match result {
                Ok((cursor, subscribed)) => self.subscribed(cursor, subscribed, member, now),
                Err(e) if initial => self.close(e.into()),
                Err(e) => {
                    let r: Refusal = e.into();
                    tracing::debug!(org = %org, error = %r.reason, "subscribe failed");
                    self.refused(r);
                }
            },
            Response::Chatted {
                org,
                room,
                id,
                result,
            } => match result {
                Ok(a) => {
                    if !a.duplicate {
                        self.env.metrics.events_published.inc_by(1);
                        let at = self.clock.unix_ms(now);
                        self.env.presence.record_chat(&org, &room, at);
                    }
                    let ack = self.message(
                        || json::chat_ack(&id, a.first_seq),
                        || Frame::ChatAck {
                            id: id.clone(),
                            seq: a.first_seq,
                        },
                    );
                    self.control(ack);
                }
                Err(e) => self.refused(e.into()),
            },
            Response::Joined { member } => match member {
                // A second JOIN of the room raced the first: one membership is enough.
                Ok(m) if self.rooms.iter().any(|r| r.is(m.org(), m.room())) => {}
                Ok(m) => self.rooms.push(m),
                Err(e) => self.refused(e.into()),
            },
            Response::UploadBegun(Err(e)) => self.refused(super::upload_refusal(e)),
            Response::UploadBegun(Ok(writer)) => {
                self.control(Message::Binary(progress(
                    writer.id(),
                    writer.received(),
                    writer.size(),
                )));
                let (id, received, size) =
                    (writer.id().to_string(), writer.received(), writer.size());
                self.uploads.push(Upload {
                    id: id.clone(),
                    writer: Some(writer),
                    received,
                    size,
                    told_at: now,
                    told_bytes: 0,
                });
                if size == 0 {
                    // An empty file is complete as soon as it begins.
                    if let Err(r) = self.on_upload_chunk(&id, 0, Bytes::new()) {
                        self.refused(r);
                    }
                }
            }
            Response::UploadWritten {
                upload_id,
                writer,
                done,
                result,
            } => self.upload_written(&upload_id, writer, done, result, now),
        }
    }

    fn upload_written(
        &mut self,
        id: &str,
        writer: Option<Box<UploadWriter>>,
        done: Option<Box<UploadView>>,
        result: Result<(), Refusal>,
        now: Instant,
    ) {
        let Some(i) = self.uploads.iter().position(|u| u.id == id) else {
            return;
        };
        if let Err(r) = result {
            self.uploads.swap_remove(i);
            return self.refused(r);
        }
        if let Some(view) = done {
            self.uploads.swap_remove(i);
            let frame = Frame::UploadDone {
                upload_id: view.id.clone(),
                size: view.size,
                sha256: view.sha256.unwrap_or_default(),
            };
            return self.control(Message::Binary(frame.to_bytes()));
        }
        let u = &mut self.uploads[i];
        if let Some(w) = writer {
            u.received = w.received();
            u.writer = Some(w);
        }
        if u.received - u.told_bytes >= PROGRESS_BYTES || now >= u.told_at + PROGRESS_EVERY {
            (u.told_at, u.told_bytes) = (now, u.received);
            let p = progress(&u.id, u.received, u.size);
            self.control(Message::Binary(p));
        }
    }

    fn subscribed(
        &mut self,
        cursor: OrgCursor,
        s: Subscribed,
        member: Option<OrgMember>,
        now: Instant,
    ) {
        let org = s.org.clone();
        if let Some(i) = self.sub_index(&org) {
            // A new SUBSCRIBE replaces the subscription: it starts from its own position.
            let old = self.subs.swap_remove(i);
            if self.layout == Layout::Streams {
                self.transmits.push_back(Transmit::Abort(old.stream));
            }
        }
        let stream = StreamId(self.next_stream);
        self.next_stream += 1;
        // Exact growth: most sessions hold one org, and an idle session's size is what 100,000
        // of them cost.
        self.subs.reserve_exact(1);
        self.subs.push(Sub {
            cursor,
            stream,
            in_flight: VecDeque::new(),
            live_pending: 0,
            reading: false,
            resuming_since: (s.resume == Resume::Recovered).then_some(now),
        });
        if self.layout == Layout::Streams {
            self.transmits.push_back(Transmit::Open(stream));
        }
        let m = self.message(
            || json::subscribed(s.org.as_str(), s.epoch.as_str(), s.head, s.resume),
            || Frame::Subscribed {
                org: s.org.to_string(),
                epoch: s.epoch.to_string(),
                head: s.head,
                resume: s.resume,
            },
        );
        let i = self.subs.len() - 1;
        self.for_org(i, m, false);
        self.check_caught_up(i, now);
        if let Some(member) = member {
            // A SUBSCRIBE that raced another for the org brings a second one: dropped.
            if !self.present.iter().any(|m| m.org() == &org) {
                self.present.reserve_exact(1);
                self.present.push(member);
            }
        }
    }

    /// The answer to a [`Read`]. A failed read closes the session (4503 for an unavailable
    /// log): the client resumes with `since`, here or on another node.
    pub fn handle_read(
        &mut self,
        stream: StreamId,
        result: Result<ReadOutcome, LogError>,
        now: Instant,
    ) {
        let Some(i) = self.subs.iter().position(|s| s.stream == stream) else {
            return; // unsubscribed meanwhile
        };
        self.subs[i].reading = false;
        match result {
            Ok(outcome) => {
                self.subs[i]
                    .cursor
                    .apply_read(outcome, &mut self.deliveries);
                self.deliver(i, true);
                self.check_caught_up(i, now);
            }
            Err(e) => {
                tracing::debug!(error = %e, "replay read failed: the session closes");
                self.close(e.into());
            }
        }
    }

    /// Times a resume once its subscription has caught up with the live events.
    fn check_caught_up(&mut self, i: usize, now: Instant) {
        let Some(s) = self.subs.get_mut(i) else {
            return;
        };
        if s.cursor.needs_catch_up() {
            return;
        }
        if let Some(since) = s.resuming_since.take() {
            let took = now.saturating_duration_since(since);
            self.metrics().catch_up.observe(took.as_secs_f64());
        }
    }

    // ----- input: live items, time, transport progress -----

    /// A live item from the session's queue.
    pub fn handle_live(&mut self, item: Live) {
        if self.closed {
            return;
        }
        match item {
            Live::Event(e) => {
                if let Some(i) = self.sub_index(&e.org) {
                    self.subs[i].cursor.on_live(e, &mut self.deliveries);
                    self.deliver(i, false);
                }
            }
            Live::Presence(note) => {
                // With the org's events when subscribed (its stream, on WebTransport); a room
                // joined without subscribing to its org hears it on the control channel.
                let m = self.note(&note);
                if let Some(i) = self.sub_index(&note.org) {
                    self.for_org(i, m, true);
                } else if !note.room.is_empty()
                    && self.rooms.iter().any(|r| r.is(&note.org, &note.room))
                {
                    self.control(m);
                }
            }
        }
    }

    fn note(&self, note: &PresenceNote) -> Message {
        match self.format() {
            Format::Json => Message::Text(note.json.clone()),
            Format::Binary => Message::Binary(note.binary.clone()),
        }
    }

    /// Turns the cursor's deliveries into messages. Events are counted (a RESET is not an
    /// event, on either transport).
    fn deliver(&mut self, i: usize, replayed: bool) {
        let mut deliveries = std::mem::take(&mut self.deliveries);
        let format = self.format();
        for d in deliveries.drain(..) {
            let m = match d {
                Delivery::Event(e) => {
                    self.delivered += 1;
                    self.replayed += u64::from(replayed);
                    if !replayed {
                        self.sample_in -= 1;
                        if self.sample_in == 0 {
                            self.sample_in = crate::metrics::DELIVERY_SAMPLE_EVERY;
                            self.metrics().observe_delivery(e.ts);
                        }
                    }
                    let encoded = match format {
                        Format::Json => Encoded::Json,
                        Format::Binary if self.brotli => Encoded::Brotli,
                        Format::Binary => Encoded::Binary,
                    };
                    Message::Event(EventFrame::new(e, encoded, &self.env.encoding))
                }
                Delivery::Reset { epoch, head } => {
                    let org = self.subs[i].cursor.org().clone();
                    self.message(
                        || json::reset(org.as_str(), epoch.as_str(), head),
                        || Frame::Reset {
                            org: org.to_string(),
                            epoch: epoch.to_string(),
                            head,
                        },
                    )
                }
            };
            self.for_org(i, m, !replayed);
            if self.closed {
                break;
            }
        }
        self.deliveries = deliveries;
    }

    /// Time passed: the token may have run out, a heartbeat may be due.
    pub fn handle_timeout(&mut self, now: Instant) {
        if self.closed {
            return;
        }
        if now >= self.token.expires_at {
            return self.close(Refusal::new(CloseCode::TokenExpired, "token expired"));
        }
        if now >= self.next_heartbeat {
            self.next_heartbeat = now + self.env.limits.heartbeat;
            self.heartbeat(now);
        }
    }

    fn heartbeat(&mut self, now: Instant) {
        let ts = self.clock.unix_ms(now);
        let mut heads: Vec<(String, u64)> = self
            .subs
            .iter()
            .map(|s| (s.cursor.org().to_string(), s.cursor.head()))
            .collect();
        heads.sort();
        match self.layout {
            Layout::Socket(Format::Json) => {
                let text = json::heartbeat(ts, heads.iter().map(|(o, h)| (o.as_str(), *h)));
                self.control(Message::Text(Bytes::from(text)));
                self.metrics().heartbeats_sent.inc();
            }
            Layout::Socket(Format::Binary) => {
                let f = Frame::Heartbeat { ts, heads };
                self.control(Message::Binary(f.to_bytes()));
                self.metrics().heartbeats_sent.inc();
            }
            Layout::Streams => {
                for d in split_heartbeat(ts, heads, self.max_datagram) {
                    self.transmits.push_back(Transmit::Datagram(d));
                    self.metrics().heartbeats_sent.inc();
                }
            }
        }
    }

    /// WebTransport: the stream wrote its next `frames` frames. A transmit's live frames stop
    /// counting against the slow-consumer limit once all of it is written.
    pub fn handle_sent(&mut self, stream: StreamId, mut frames: usize) {
        let Some(s) = self.subs.iter_mut().find(|s| s.stream == stream) else {
            return;
        };
        while frames > 0 {
            let Some(front) = s.in_flight.front_mut() else {
                break;
            };
            if frames < front.0 {
                front.0 -= frames;
                break;
            }
            frames -= front.0;
            s.live_pending -= front.1;
            s.in_flight.pop_front();
        }
    }

    /// WebTransport: the client stopped an org's stream (or it could not be opened): the org's
    /// subscription ends quietly.
    pub fn handle_stream_gone(&mut self, stream: StreamId) {
        if let Some(i) = self.subs.iter().position(|s| s.stream == stream) {
            let org = self.subs.swap_remove(i).cursor.org().clone();
            self.present.retain(|m| m.org() != &org);
        }
    }

    /// The hub could not hand the session an event (its queue was full): 4008.
    pub fn handle_overflow(&mut self) {
        self.close(slow_consumer());
    }

    /// The node drains: 4503.
    pub fn handle_shutdown(&mut self) {
        self.close(draining());
    }

    /// The orgs subscribed now, for tests and logs.
    pub fn orgs(&self) -> impl Iterator<Item = &OrgId> {
        self.subs.iter().map(|s| s.cursor.org())
    }
}

fn too_many_uploads() -> Refusal {
    Refusal::new(
        CloseCode::TooMany,
        format!("at most {MAX_UPLOADS} uploads at once per session"),
    )
}

/// The answer to a client's datagram: a PING gets a PONG datagram; anything else is ignored
/// (datagrams are unreliable: nothing in one can be an error). Stateless, so the driver's
/// datagram reader answers at once.
pub fn answer_datagram(d: Bytes, max_frame: usize) -> Option<Bytes> {
    match Frame::decode_exact(d, max_frame) {
        Ok(Frame::Ping(body)) => Some(Frame::Pong(body).to_bytes()),
        _ => None,
    }
}

/// The checks of an upload's start, on either transport: uploads enabled, under the session's
/// limit (`running` uploads now), a valid org granted for uploading.
pub fn upload_checks(
    env: &SessionEnv,
    grant: &crate::auth::Grant,
    org: &str,
    running: usize,
) -> Result<OrgId, Refusal> {
    if env.uploads.is_none() {
        return Err(Refusal::new(
            CloseCode::Protocol,
            "uploads are not enabled on this node (--upload-dir)",
        ));
    }
    if running >= MAX_UPLOADS {
        return Err(too_many_uploads());
    }
    let org = OrgId::parse(org)?;
    grant
        .check_upload(&org)
        .map_err(|f| Refusal::new(CloseCode::Forbidden, f.to_string()))?;
    Ok(org)
}

/// UPLOAD_PROGRESS.
pub fn progress(id: &str, received: u64, size: u64) -> Bytes {
    Frame::UploadProgress {
        upload_id: id.to_string(),
        received,
        size,
    }
    .to_bytes()
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

#[cfg(test)]
mod tests;
