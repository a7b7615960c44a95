//! A client session over WebSocket (PROTOCOL.md sections 4.2 and 4.3): the [`WsSession`]
//! behaviour that `edgestream-ws`'s pump drives.
//!
//! All of a session's orgs share one socket and one bounded queue; each org keeps its own
//! [`OrgCursor`], so per-org order holds whatever the interleaving. Authentication and the
//! initial subscriptions happen in the first wake-up, after the upgrade, so that a refusal is a
//! close code the client can read.

use std::sync::Arc;

use bytes::Bytes;
use edgestream_codec::{json, Frame};
use edgestream_ws::{tungstenite::Utf8Bytes, Close, Incoming, Outgoing, WsSession};
use tokio::sync::mpsc;
use tokio::time::Instant;

use super::{ConnectParams, Format, SessionEnv, SessionToken};
use crate::close::{CloseCode, Refusal};
use crate::hub::{Delivery, Live, OrgCursor, Overflow, Sink, Subscribed, CATCH_UP_BATCH};
use crate::metrics::{Transport, TransportMetrics};
use crate::model::{OrgId, Position};
use crate::presence::{OrgMember, PresenceNote, RoomMember};
use crate::time::unix_ms;

/// Uploads one session may run at once.
const MAX_UPLOADS: usize = 4;

/// An upload in progress on a WebSocket.
struct WsUpload {
    writer: crate::upload::UploadWriter,
    told_at: Instant,
    told_bytes: u64,
}

fn progress(w: &crate::upload::UploadWriter) -> Bytes {
    Frame::UploadProgress {
        upload_id: w.id().to_string(),
        received: w.received(),
        size: w.size(),
    }
    .to_bytes()
}

/// Live events handled per wake-up before the socket is flushed.
const LIVE_BATCH: usize = 256;

/// What woke the session.
#[derive(Debug)]
pub enum Wake {
    Start,
    Live(Live),
    CatchUp,
    Heartbeat,
    Expired,
}

/// Where a session is: not started yet (the start runs on the first wake or the client's first
/// message), starting, or open with what the start established.
enum Phase {
    New,
    Starting,
    Open(Open),
}

/// What a started session holds for its life: its token (grant and expiry), and its
/// `--max-sessions` permit and gauge place (released when dropped).
struct Open {
    token: SessionToken,
    _held: super::Held,
}

/// The grant of an open session; an internal error (never a panic) before the start.
fn grant_of(phase: &Phase) -> Result<&crate::auth::Grant, Refusal> {
    match phase {
        Phase::Open(open) => Ok(&open.token.grant),
        _ => Err(Refusal::new(CloseCode::Internal, "session not started")),
    }
}

/// One WebSocket client.
pub struct WsStreamSession {
    env: Arc<SessionEnv>,
    params: Result<ConnectParams, Refusal>,
    phase: Phase,
    cursors: Cursors,
    sink: Sink,
    queue: mpsc::Receiver<Live>,
    /// The rooms joined and the presence in each subscribed org (in this order, so a session
    /// that ends leaves its rooms before its orgs).
    rooms: Vec<RoomMember>,
    present: Vec<OrgMember>,
    /// Uploads in progress on this socket (UPLOAD_BEGIN, then UPLOAD_CHUNK messages).
    uploads: Vec<WsUpload>,
    overflow: Arc<Overflow>,
    next_heartbeat: Instant,
    deliveries: Vec<Delivery>,
}

impl WsStreamSession {
    /// A session for a `/v1/stream` request; nothing is checked until it starts.
    pub fn new(env: Arc<SessionEnv>, query: &str, bearer: Option<&str>) -> Self {
        let (sink, queue, overflow) = Sink::bounded(env.limits.queue);
        WsStreamSession {
            params: ConnectParams::parse(query, bearer),
            env,
            phase: Phase::New,
            cursors: Cursors::default(),
            sink,
            queue,
            present: Vec::new(),
            rooms: Vec::new(),
            uploads: Vec::new(),
            overflow,
            next_heartbeat: Instant::now(),
            deliveries: Vec::new(),
        }
    }

    /// When the session's token runs out (none before the session is open).
    fn expires_at(&self) -> Option<Instant> {
        match &self.phase {
            Phase::Open(open) => Some(open.token.expires_at),
            _ => None,
        }
    }

    fn metrics(&self) -> &TransportMetrics {
        self.env.metrics.transport(Transport::WebSocket)
    }

    fn format(&self) -> Format {
        self.params
            .as_ref()
            .map(|p| p.format)
            .unwrap_or(Format::Binary)
    }

    fn brotli(&self) -> bool {
        self.params.as_ref().map(|p| p.brotli).unwrap_or(false)
    }

    async fn start(&mut self, out: &mut Vec<Outgoing>) -> Result<(), Refusal> {
        // Move the one-time parts (the raw token, the initial orgs) out: an idle session keeps
        // only what it uses.
        let params = match &mut self.params {
            Ok(p) => ConnectParams {
                token: std::mem::take(&mut p.token),
                orgs: p.orgs.take(),
                since: p.since.take(),
                brotli: p.brotli,
                format: p.format,
            },
            Err(r) => return Err(r.clone()),
        };
        let admitted = super::admit(&self.env, &params, Transport::WebSocket)?;
        self.phase = Phase::Open(Open {
            token: admitted.token,
            _held: admitted.held,
        });
        let plan = admitted.plan;
        for (org, since) in plan {
            self.subscribe(org, since, out).await?;
        }
        self.next_heartbeat = Instant::now() + self.env.limits.heartbeat;
        Ok(())
    }

    async fn subscribe(
        &mut self,
        org: OrgId,
        since: Option<Position>,
        out: &mut Vec<Outgoing>,
    ) -> Result<(), Refusal> {
        // Drop an existing subscription first, so the new one starts from its own position.
        self.cursors.remove(&org);
        let (cursor, subscribed) = self
            .env
            .hub
            .subscribe(&org, since.as_ref(), &self.sink)
            .await?;
        out.push(self.encode_subscribed(&subscribed));
        self.cursors.insert(cursor);
        if !self.present.iter().any(|m| m.org() == &org) {
            let user = &grant_of(&self.phase)?.sub;
            self.present.push(self.env.presence.enter(&org, user));
        }
        Ok(())
    }

    /// A dynamic SUBSCRIBE: refusals are ERROR frames, the session stays.
    async fn on_subscribe(
        &mut self,
        org: &str,
        since: Option<Position>,
        out: &mut Vec<Outgoing>,
    ) -> Result<(), Refusal> {
        let org = match OrgId::parse(org) {
            Ok(o) => o,
            Err(e) => return Err(e.into()),
        };
        let grant = grant_of(&self.phase)?;
        if let Err(f) = grant.check_subscribe(&org) {
            out.push(self.encode_error(CloseCode::Forbidden, &f.to_string()));
            return Ok(());
        }
        if !self.cursors.contains_key(&org) && self.cursors.len() >= self.env.limits.max_orgs {
            let msg = format!("at most {} orgs per session", self.env.limits.max_orgs);
            out.push(self.encode_error(CloseCode::Protocol, &msg));
            return Ok(());
        }
        if let Err(r) = self.subscribe(org, since, out).await {
            out.push(self.encode_error(r.code, &r.reason));
        }
        Ok(())
    }

    /// Leaves an org: its cursor and the session's presence there.
    fn drop_org(&mut self, org: &OrgId) {
        self.cursors.remove(org);
        self.present.retain(|m| m.org() != org);
    }

    fn on_unsubscribe(&mut self, org: &str, out: &mut Vec<Outgoing>) -> Result<(), Refusal> {
        let org = OrgId::parse(org)?;
        self.drop_org(&org);
        out.push(self.text_or_frame(
            || json::unsubscribed(org.as_str()),
            || Frame::Unsubscribed {
                org: org.to_string(),
            },
        ));
        Ok(())
    }

    /// REFRESH: a new token for the same subject moves the expiry; orgs it no longer grants
    /// are unsubscribed. A bad token is answered with ERROR 4001 and the old one stays.
    fn on_refresh(&mut self, token: &str, out: &mut Vec<Outgoing>) {
        let Phase::Open(open) = &mut self.phase else {
            return;
        };
        let session_token = &mut open.token;
        let revoked = match session_token.refresh(&self.env.auth, token, self.cursors.keys()) {
            Ok(revoked) => revoked,
            Err(e) => {
                out.push(self.encode_error(e.code, &e.reason));
                return;
            }
        };
        for org in revoked {
            self.drop_org(&org);
            out.push(self.encode_error(
                CloseCode::Forbidden,
                &format!("org {org} no longer granted"),
            ));
            out.push(self.text_or_frame(
                || json::unsubscribed(org.as_str()),
                || Frame::Unsubscribed {
                    org: org.to_string(),
                },
            ));
        }
    }

    /// CHAT: CHAT_ACK with the seq, or ERROR (the session stays).
    async fn on_chat(
        &mut self,
        org: &str,
        room: &str,
        id: &str,
        body: &[u8],
        out: &mut Vec<Outgoing>,
    ) {
        let grant = match grant_of(&self.phase) {
            Ok(g) => g,
            Err(r) => return out.push(self.encode_error(r.code, &r.reason)),
        };
        match super::chat(&self.env, grant, org, room, id, body).await {
            Ok(seq) => out.push(self.text_or_frame(
                || json::chat_ack(id, seq),
                || Frame::ChatAck {
                    id: id.to_string(),
                    seq,
                },
            )),
            Err(r) => out.push(self.encode_error(r.code, &r.reason)),
        }
    }

    /// UPLOAD_BEGIN: starts or resumes an upload; answered with UPLOAD_PROGRESS (which names
    /// the upload's id and where to continue).
    async fn on_upload_begin(
        &mut self,
        org: &str,
        name: &str,
        size: u64,
        upload_id: &str,
        offset: u64,
        out: &mut Vec<Outgoing>,
    ) -> Result<(), Refusal> {
        let uploads = self.env.uploads.clone().ok_or_else(|| {
            Refusal::new(
                CloseCode::Protocol,
                "uploads are not enabled on this node (--upload-dir)",
            )
        })?;
        if self.uploads.len() >= MAX_UPLOADS {
            return Err(Refusal::new(
                CloseCode::TooMany,
                format!("at most {MAX_UPLOADS} uploads at once per session"),
            ));
        }
        let org = OrgId::parse(org)?;
        let grant = grant_of(&self.phase)?;
        grant
            .check_upload(&org)
            .map_err(|f| Refusal::new(CloseCode::Forbidden, f.to_string()))?;
        let id = (!upload_id.is_empty()).then_some(upload_id);
        let size = (offset == 0).then_some(size);
        let writer = uploads
            .begin(&org, name, size, &grant.sub, id, offset)
            .await
            .map_err(super::upload_refusal)?;
        out.push(Outgoing::Binary(progress(&writer)));
        let id = writer.id().to_string();
        self.uploads.push(WsUpload {
            writer,
            told_at: Instant::now(),
            told_bytes: 0,
        });
        if size == Some(0) {
            // An empty file is complete as soon as it begins.
            return self.on_upload_chunk(&id, 0, &[], out).await;
        }
        Ok(())
    }

    /// UPLOAD_CHUNK: bytes at the upload's current offset; UPLOAD_DONE after the last one.
    async fn on_upload_chunk(
        &mut self,
        upload_id: &str,
        offset: u64,
        bytes: &[u8],
        out: &mut Vec<Outgoing>,
    ) -> Result<(), Refusal> {
        let i = self
            .uploads
            .iter()
            .position(|u| u.writer.id() == upload_id)
            .ok_or_else(|| Refusal::new(CloseCode::Protocol, "no such upload in this session"))?;
        let u = &mut self.uploads[i];
        if offset != u.writer.received() {
            return Err(Refusal::new(
                CloseCode::Protocol,
                format!("upload {upload_id} is at offset {}", u.writer.received()),
            ));
        }
        if let Err(e) = u.writer.write(bytes).await {
            self.uploads.swap_remove(i);
            return Err(super::upload_refusal(e));
        }
        if u.writer.received() < u.writer.size() {
            if u.writer.received() - u.told_bytes >= 256 * 1024
                || u.told_at.elapsed() >= std::time::Duration::from_millis(250)
            {
                (u.told_at, u.told_bytes) = (Instant::now(), u.writer.received());
                out.push(Outgoing::Binary(progress(&u.writer)));
            }
            return Ok(());
        }
        let u = self.uploads.swap_remove(i);
        let view = u.writer.finish().await.map_err(super::upload_refusal)?;
        super::upload_completed(&self.env, &view).await?;
        out.push(Outgoing::Binary(
            Frame::UploadDone {
                upload_id: view.id.clone(),
                size: view.size,
                sha256: view.sha256.unwrap_or_default(),
            }
            .to_bytes(),
        ));
        Ok(())
    }

    async fn on_binary(&mut self, msg: Bytes, out: &mut Vec<Outgoing>) -> Result<(), Refusal> {
        if self.format() != Format::Binary {
            return Err(Refusal::new(
                CloseCode::Protocol,
                "binary message on a format=json session",
            ));
        }
        match Frame::decode_exact(msg, self.env.limits.max_control_frame)? {
            Frame::Subscribe { org, epoch, seq } => {
                let since = Position::from_subscribe(&epoch, seq)?;
                self.on_subscribe(&org, since, out).await
            }
            Frame::Unsubscribe { org } => self.on_unsubscribe(&org, out),
            Frame::Refresh { token } => {
                self.on_refresh(&token, out);
                Ok(())
            }
            Frame::Ping(body) => {
                out.push(Outgoing::Binary(Frame::Pong(body).to_bytes()));
                Ok(())
            }
            Frame::Chat {
                org,
                room,
                id,
                body,
            } => {
                self.on_chat(&org, &room, &id, &body, out).await;
                Ok(())
            }
            Frame::Join { org, room } => {
                self.on_join(&org, &room, out).await;
                Ok(())
            }
            Frame::Leave { org, room } => {
                self.on_leave(&org, &room, out);
                Ok(())
            }
            Frame::UploadBegin {
                org,
                name,
                size,
                upload_id,
                offset,
                ..
            } => {
                if let Err(r) = self
                    .on_upload_begin(&org, &name, size, &upload_id, offset, out)
                    .await
                {
                    out.push(self.encode_error(r.code, &r.reason));
                }
                Ok(())
            }
            Frame::UploadChunk {
                upload_id,
                offset,
                bytes,
            } => {
                if let Err(r) = self.on_upload_chunk(&upload_id, offset, &bytes, out).await {
                    out.push(self.encode_error(r.code, &r.reason));
                }
                Ok(())
            }
            Frame::Unknown { .. } => Ok(()), // forward compatibility: skip
            other => Err(Refusal::new(
                CloseCode::Protocol,
                format!("frame type {:#04x} is not sent by clients", other.kind()),
            )),
        }
    }

    async fn on_text(&mut self, text: &str, out: &mut Vec<Outgoing>) -> Result<(), Refusal> {
        use edgestream_codec::json::ClientMessage;
        if self.format() != Format::Json {
            return Err(Refusal::new(
                CloseCode::Protocol,
                "text message on a format=bin session",
            ));
        }
        let msg = ClientMessage::parse(text)
            .map_err(|e| Refusal::new(CloseCode::Protocol, e.to_string()))?;
        match msg {
            ClientMessage::Subscribe { org, since } => {
                let since = since.as_deref().map(Position::parse).transpose()?;
                self.on_subscribe(&org, since, out).await
            }
            ClientMessage::Unsubscribe { org } => self.on_unsubscribe(&org, out),
            ClientMessage::Refresh { token } => {
                self.on_refresh(&token, out);
                Ok(())
            }
            ClientMessage::Chat {
                org,
                room,
                id,
                body,
            } => {
                self.on_chat(&org, &room, &id, body.get().as_bytes(), out)
                    .await;
                Ok(())
            }
            ClientMessage::Join { org, room } => {
                self.on_join(&org, &room, out).await;
                Ok(())
            }
            ClientMessage::Leave { org, room } => {
                self.on_leave(&org, &room, out);
                Ok(())
            }
            ClientMessage::Ping { data } => {
                let data = data.unwrap_or_default();
                if data.len() > edgestream_codec::frame::MAX_PING_LEN {
                    return Err(Refusal::new(CloseCode::Protocol, "ping data over 64 bytes"));
                }
                out.push(Outgoing::Text(json::pong(&data).into()));
                Ok(())
            }
            ClientMessage::Unknown => Ok(()),
        }
    }

    /// Turns the cursors' deliveries into messages.
    fn flush_deliveries(&mut self, org: &OrgId, replayed: bool, out: &mut Vec<Outgoing>) {
        let format = self.format();
        let brotli = self.brotli();
        // Events only: a RESET is not an event (as on WebTransport).
        let n = self
            .deliveries
            .iter()
            .filter(|d| matches!(d, Delivery::Event(_)))
            .count() as u64;
        for d in self.deliveries.drain(..) {
            out.push(match d {
                Delivery::Event(e) => match format {
                    Format::Json => match Utf8Bytes::try_from(e.json().clone()) {
                        Ok(t) => Outgoing::Text(t),
                        Err(_) => continue,
                    },
                    Format::Binary if brotli => {
                        Outgoing::Binary(e.binary_for_brotli(&self.env.encoding).clone())
                    }
                    Format::Binary => Outgoing::Binary(e.binary().clone()),
                },
                Delivery::Reset { epoch, head } => match format {
                    Format::Json => {
                        Outgoing::Text(json::reset(org.as_str(), epoch.as_str(), head).into())
                    }
                    Format::Binary => Outgoing::Binary(
                        Frame::Reset {
                            org: org.to_string(),
                            epoch: epoch.to_string(),
                            head,
                        }
                        .to_bytes(),
                    ),
                },
            });
        }
        let m = self.metrics();
        m.events_delivered.add(n);
        if replayed {
            m.events_replayed.add(n);
        }
    }

    fn encode_subscribed(&self, s: &Subscribed) -> Outgoing {
        self.text_or_frame(
            || json::subscribed(s.org.as_str(), s.epoch.as_str(), s.head, s.resume),
            || Frame::Subscribed {
                org: s.org.to_string(),
                epoch: s.epoch.to_string(),
                head: s.head,
                resume: s.resume,
            },
        )
    }

    fn encode_error(&self, code: CloseCode, message: &str) -> Outgoing {
        self.text_or_frame(
            || json::error(code.code().into(), message),
            || Frame::Error {
                code: code.code().into(),
                message: message.to_string(),
            },
        )
    }

    fn text_or_frame(
        &self,
        text: impl FnOnce() -> String,
        frame: impl FnOnce() -> Frame,
    ) -> Outgoing {
        match self.format() {
            Format::Json => Outgoing::Text(text().into()),
            Format::Binary => Outgoing::Binary(frame().to_bytes()),
        }
    }

    fn heartbeat(&self) -> Outgoing {
        let ts = unix_ms();
        let mut heads: Vec<(String, u64)> = self
            .cursors
            .values()
            .map(|c| (c.org().to_string(), c.head()))
            .collect();
        heads.sort();
        self.text_or_frame(
            || json::heartbeat(ts, heads.iter().map(|(o, h)| (o.as_str(), *h))),
            || Frame::Heartbeat {
                ts,
                heads: heads.clone(),
            },
        )
    }

    fn on_live(&mut self, item: Live, out: &mut Vec<Outgoing>) {
        let mut org = None;
        let mut next = Some(item);
        let mut handled = 0;
        while let Some(item) = next.take() {
            match item {
                Live::Event(e) => {
                    if let Some(cursor) = self.cursors.get_mut(&e.org) {
                        org.get_or_insert_with(|| e.org.clone());
                        cursor.on_live(e, &mut self.deliveries);
                    }
                }
                Live::Presence(note) => {
                    // Events queued before the change go out before it.
                    if let Some(o) = org.take() {
                        self.flush_deliveries(&o, false, out);
                    }
                    if self.cursors.contains_key(&note.org) {
                        out.extend(self.encode_note(&note));
                    }
                }
            }
            handled += 1;
            if handled < LIVE_BATCH {
                next = self.queue.try_recv().ok();
            }
        }
        // Live deliveries are events only (a RESET comes from a log read), so the org passed
        // here names no frame.
        if let Some(o) = org {
            self.flush_deliveries(&o, false, out);
        }
    }

    fn encode_note(&self, note: &PresenceNote) -> Option<Outgoing> {
        match self.format() {
            Format::Json => Utf8Bytes::try_from(note.json.clone())
                .ok()
                .map(Outgoing::Text),
            Format::Binary => Some(Outgoing::Binary(note.binary.clone())),
        }
    }

    /// JOIN: the room's members now, as PRESENCE messages; the others hear of it through the
    /// org's subscribers.
    async fn on_join(&mut self, org: &str, room: &str, out: &mut Vec<Outgoing>) {
        let grant = match grant_of(&self.phase) {
            Ok(g) => g,
            Err(r) => return out.push(self.encode_error(r.code, &r.reason)),
        };
        match super::join_room(&self.env, &mut self.rooms, grant, org, room).await {
            Ok(notes) => {
                for note in notes {
                    out.extend(self.encode_note(&note));
                }
            }
            Err(r) => out.push(self.encode_error(r.code, &r.reason)),
        }
    }

    fn on_leave(&mut self, org: &str, room: &str, out: &mut Vec<Outgoing>) {
        let grant = match grant_of(&self.phase) {
            Ok(g) => g,
            Err(r) => return out.push(self.encode_error(r.code, &r.reason)),
        };
        if let Err(r) = super::leave_room(&mut self.rooms, grant, org, room) {
            out.push(self.encode_error(r.code, &r.reason));
        }
    }

    async fn catch_up(&mut self, out: &mut Vec<Outgoing>) -> Result<(), Refusal> {
        let Some(org) = self
            .cursors
            .values()
            .find(|c| c.needs_catch_up())
            .map(|c| c.org().clone())
        else {
            return Ok(());
        };
        let cursor = self.cursors.get_mut(&org).expect("found above");
        cursor
            .catch_up(CATCH_UP_BATCH, &mut self.deliveries)
            .await?;
        self.flush_deliveries(&org, true, out);
        Ok(())
    }
}

/// A session's cursors, one per org: a short list (at most `max_orgs`, 64 by default), where a
/// linear scan with pointer-first id comparison beats hashing the org id on every event.
#[derive(Default)]
struct Cursors(Vec<OrgCursor>);

impl Cursors {
    fn get_mut(&mut self, org: &OrgId) -> Option<&mut OrgCursor> {
        self.0.iter_mut().find(|c| c.org() == org)
    }

    fn contains_key(&self, org: &OrgId) -> bool {
        self.0.iter().any(|c| c.org() == org)
    }

    fn remove(&mut self, org: &OrgId) -> Option<OrgCursor> {
        let i = self.0.iter().position(|c| c.org() == org)?;
        Some(self.0.swap_remove(i))
    }

    /// Adds a cursor; the caller removed any earlier one of the same org.
    fn insert(&mut self, cursor: OrgCursor) {
        debug_assert!(!self.contains_key(cursor.org()));
        self.0.push(cursor);
    }

    fn len(&self) -> usize {
        self.0.len()
    }

    fn keys(&self) -> impl Iterator<Item = &OrgId> {
        self.0.iter().map(OrgCursor::org)
    }

    fn values(&self) -> impl Iterator<Item = &OrgCursor> {
        self.0.iter()
    }
}

fn close(r: Refusal) -> Close {
    Close::new(r.code.code(), r.reason)
}

impl WsSession for WsStreamSession {
    type Wake = Wake;

    async fn wait(&mut self) -> Wake {
        if matches!(self.phase, Phase::New) {
            self.phase = Phase::Starting;
            return Wake::Start;
        }
        // Timers first, so that a busy queue or a long replay never starves heartbeats (clients
        // treat three missing heartbeats as a dead link) or the token expiry.
        let now = Instant::now();
        let expires_at = self.expires_at();
        if expires_at.is_some_and(|t| now >= t) {
            return Wake::Expired;
        }
        if now >= self.next_heartbeat {
            self.next_heartbeat = now + self.env.limits.heartbeat;
            return Wake::Heartbeat;
        }
        if self.cursors.values().any(OrgCursor::needs_catch_up) {
            // Keep the queue moving during a replay: live events first, then the next chunk.
            return match self.queue.try_recv() {
                Ok(e) => Wake::Live(e),
                Err(_) => Wake::CatchUp,
            };
        }
        let expiry = async move {
            match expires_at {
                Some(t) => tokio::time::sleep_until(t).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            biased;
            e = self.queue.recv() => match e {
                Some(e) => Wake::Live(e),
                None => std::future::pending().await, // the session holds a sender: unreachable
            },
            _ = tokio::time::sleep_until(self.next_heartbeat) => {
                self.next_heartbeat = Instant::now() + self.env.limits.heartbeat;
                Wake::Heartbeat
            }
            _ = expiry => Wake::Expired,
        }
    }

    async fn on_wake(&mut self, wake: Wake, out: &mut Vec<Outgoing>) -> Result<(), Close> {
        match wake {
            Wake::Start => self.start(out).await.map_err(close),
            Wake::Live(e) => {
                self.on_live(e, out);
                Ok(())
            }
            Wake::CatchUp => self.catch_up(out).await.map_err(close),
            Wake::Heartbeat => {
                out.push(self.heartbeat());
                self.metrics().heartbeats_sent.inc();
                Ok(())
            }
            Wake::Expired => Err(Close::new(CloseCode::TokenExpired.code(), "token expired")),
        }
    }

    async fn on_message(&mut self, msg: Incoming, out: &mut Vec<Outgoing>) -> Result<(), Close> {
        if matches!(self.phase, Phase::New) {
            // The client spoke first: authenticate and subscribe before handling it.
            self.phase = Phase::Starting;
            self.start(out).await.map_err(close)?;
        }
        match msg {
            Incoming::Binary(b) => self.on_binary(b, out).await.map_err(close),
            Incoming::Text(t) => self.on_text(t.as_str(), out).await.map_err(close),
        }
    }

    fn on_close(&mut self, close: &Close) {
        self.env.metrics.record_close(close.code);
    }

    fn interrupted(&self) -> impl std::future::Future<Output = Close> + Send + 'static {
        let shutdown = self.env.shutdown.clone();
        let overflow = self.overflow.clone();
        async move {
            tokio::select! {
                _ = shutdown.cancelled() => Close::new(CloseCode::GoingAway.code(), "server draining"),
                _ = overflow.wait() => Close::new(CloseCode::SlowConsumer.code(), "slow consumer: queue full"),
            }
        }
    }
}
