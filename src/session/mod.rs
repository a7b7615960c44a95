//! Client sessions, transport by transport, over one hub.
//!
//! This module owns what every transport shares: the `/v1/stream` query (PROTOCOL.md section 3),
//! the authorization of the initial subscriptions, and the [`SessionEnv`] every session gets.
//! Transports live in submodules and talk only to the hub, never to the log directly.

pub mod core;
pub mod io;
pub mod ws;

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::auth::{Authenticator, Grant};
use crate::close::{CloseCode, Refusal};
use crate::event::Encoding;
use crate::hub::Hub;
use crate::metrics::{Metrics, Transport};
use crate::model::{parse_org_list, parse_since_list, OrgId, Position};

/// Limits every session obeys.
#[derive(Debug, Clone)]
pub struct SessionLimits {
    /// Live events queued per session before it counts as a slow consumer (4008).
    pub queue: usize,
    /// Orgs one session may subscribe to at once.
    pub max_orgs: usize,
    /// Sessions this node accepts at once, all transports together (above: 4029).
    pub max_sessions: usize,
    /// Heartbeat interval.
    pub heartbeat: Duration,
    /// Largest control frame a client may send, in bytes.
    pub max_control_frame: usize,
    /// Largest chat message body (a JSON value), in bytes: the event size limit.
    pub max_event_bytes: usize,
}

impl Default for SessionLimits {
    fn default() -> Self {
        SessionLimits {
            queue: 4096,
            max_orgs: 64,
            max_sessions: 100_000,
            heartbeat: Duration::from_secs(5),
            max_control_frame: 16 * 1024,
            max_event_bytes: 64 * 1024,
        }
    }
}

/// CHAT (PROTOCOL.md section 8), on either transport: checks a chat message and builds its
/// event, `{"type":"chat.message","room":R,"from":SUB,"id":ID,"body":BODY}`, and its
/// idempotency key (a repeat of (org, from, id) inside the replay window appends nothing and
/// gets the first seq). Refusals become ERROR frames; the session stays.
pub fn chat_payload(
    limits: &SessionLimits,
    grant: &Grant,
    org: &str,
    room: &str,
    id: &str,
    body: &[u8],
) -> Result<(OrgId, bytes::Bytes, String), Refusal> {
    let org = OrgId::parse(org)?;
    if OrgId::parse(room).is_err() {
        return Err(Refusal::new(
            CloseCode::Protocol,
            "invalid room: 1 to 64 bytes of [A-Za-z0-9_.-]",
        ));
    }
    if id.is_empty() || id.chars().count() > 64 {
        return Err(Refusal::new(
            CloseCode::Protocol,
            "chat id must be 1 to 64 characters",
        ));
    }
    if body.len() > limits.max_event_bytes {
        return Err(Refusal::new(
            CloseCode::TooLarge,
            format!("chat body over {} bytes", limits.max_event_bytes),
        ));
    }
    // Validated, then carried verbatim: never re-serialised through a value (which would
    // round big numbers and refuse some valid JSON).
    let body: &serde_json::value::RawValue = serde_json::from_slice(body)
        .map_err(|e| Refusal::new(CloseCode::Protocol, format!("chat body is not JSON: {e}")))?;
    grant
        .check_chat(&org)
        .map_err(|f| Refusal::new(CloseCode::Forbidden, f.to_string()))?;
    let quoted = |s: &str| serde_json::Value::from(s).to_string();
    let payload = bytes::Bytes::from(format!(
        r#"{{"type":"chat.message","room":{},"from":{},"id":{},"body":{}}}"#,
        quoted(room),
        quoted(&grant.sub),
        quoted(id),
        body.get()
    ));
    // The key names the sender: two users' ids never collide.
    let key = format!("chat\u{1f}{}\u{1f}{id}", grant.sub);
    Ok((org, payload, key))
}

/// An upload failure as the close code of an ERROR frame (the session stays).
pub fn upload_refusal(e: crate::upload::UploadError) -> Refusal {
    use crate::upload::UploadError as E;
    let code = match &e {
        E::TooLarge(_) => CloseCode::TooLarge,
        E::Io(_) => CloseCode::Internal,
        _ => CloseCode::Protocol,
    };
    Refusal::new(code, e.to_string())
}

/// Records a completed upload in its org's log: `{"type":"upload.completed",...}`.
pub async fn upload_completed(
    env: &SessionEnv,
    view: &crate::upload::UploadView,
) -> Result<(), Refusal> {
    let org = OrgId::parse(&view.org)?;
    let event = serde_json::json!({
        "type": "upload.completed", "id": view.id, "name": view.name, "size": view.size,
        "sha256": view.sha256, "from": view.from,
    });
    let payload = bytes::Bytes::from(serde_json::to_vec(&event).expect("a JSON value"));
    let key = format!("upload\u{1f}{}", view.id);
    env.hub
        .log()
        .append(&org, vec![payload], Some(&key))
        .await?;
    Ok(())
}

/// LEAVE for a session holding `rooms` (a room not joined is a no-op).
pub fn leave_room(
    rooms: &mut Vec<crate::presence::RoomMember>,
    grant: &Grant,
    org: &str,
    room: &str,
) -> Result<(), Refusal> {
    let (org, room) = room_of(grant, org, room)?;
    rooms.retain(|r| !r.is(&org, &room));
    Ok(())
}

/// JOIN / LEAVE checks: the org named by the session's token for subscribing or chatting (a
/// `*` grant reads no member list) and a valid room name.
pub fn room_of(grant: &Grant, org: &str, room: &str) -> Result<(OrgId, String), Refusal> {
    let org = OrgId::parse(org)?;
    if OrgId::parse(room).is_err() {
        return Err(Refusal::new(
            CloseCode::Protocol,
            "invalid room: 1 to 64 bytes of [A-Za-z0-9_.-]",
        ));
    }
    grant
        .check_presence(&org)
        .map_err(|f| Refusal::new(CloseCode::Forbidden, f.to_string()))?;
    Ok((org, room.to_string()))
}

/// What every session needs from the server.
pub struct SessionEnv {
    pub hub: Hub,
    pub presence: Arc<crate::presence::Presence>,
    /// Uploads, when `--upload-dir` is set.
    pub uploads: Option<Arc<crate::upload::Uploads>>,
    pub auth: Arc<Authenticator>,
    pub metrics: Arc<Metrics>,
    pub limits: SessionLimits,
    pub encoding: Encoding,
    /// Cancelled when the node starts draining: sessions close with 4503.
    pub shutdown: CancellationToken,
    /// `--max-sessions` permits: taken before anything else of a session's start (before any
    /// await), held for its life, as mini-redis' `limit_connections`. The `sessions` gauge
    /// only reports.
    pub session_permits: Arc<tokio::sync::Semaphore>,
}

/// What a session holds once admitted: its token (grant and expiry), the initial
/// subscriptions to make, its `--max-sessions` permit and its place in the `sessions` gauge.
pub struct Admitted {
    pub token: SessionToken,
    pub plan: Vec<(OrgId, Option<Position>)>,
    pub held: Held,
}

/// The permit and the gauge place of a session, released when it ends (dropped).
pub struct Held {
    _permit: tokio::sync::OwnedSemaphorePermit,
    metrics: Arc<Metrics>,
    transport: Transport,
}

impl Drop for Held {
    fn drop(&mut self) {
        self.metrics.transport(self.transport).sessions.dec();
    }
}

/// The start sequence both transports share, in its one order: the `--max-sessions` permit
/// (before any await, so a burst cannot get past the cap), the token verified, the `sub`
/// recorded on the session's span, the initial subscriptions planned (the lists are parsed
/// only after the token), the expiry set, and the session counted. The caller then makes the
/// subscriptions of the plan.
pub fn admit(
    env: &SessionEnv,
    params: &ConnectParams,
    transport: Transport,
    now: tokio::time::Instant,
    unix_ms: u64,
) -> Result<Admitted, Refusal> {
    let permit = env.session_permit()?;
    let grant = env.auth.verify(&params.token)?;
    record_sub(&grant.sub);
    let plan = params.plan(&grant, env.limits.max_orgs)?;
    let token = SessionToken::new(&env.auth, grant, now, unix_ms)?;
    let m = env.metrics.transport(transport);
    m.sessions.inc();
    m.sessions_opened.inc();
    env.metrics
        .record_client(transport, params.fallback, params.engine);
    Ok(Admitted {
        token,
        plan,
        held: Held {
            _permit: permit,
            metrics: env.metrics.clone(),
            transport,
        },
    })
}

/// The span every log line of one session is written in: a node-unique id, the transport, and
/// the token's `sub` once it is verified (recorded by the start).
pub fn session_span(transport: &'static str) -> tracing::Span {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
    let id = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    tracing::info_span!("session", id, transport, sub = tracing::field::Empty)
}

/// Records the verified `sub` on the current session span.
pub fn record_sub(sub: &str) {
    tracing::Span::current().record("sub", sub);
}

impl SessionEnv {
    /// A permit to run one more session, or the refusal (4029).
    pub fn session_permit(&self) -> Result<tokio::sync::OwnedSemaphorePermit, Refusal> {
        self.session_permits
            .clone()
            .try_acquire_owned()
            .map_err(|_| Refusal::new(CloseCode::TooMany, "too many sessions on this node"))
    }

    /// Sessions open now, all transports.
    pub fn open_sessions(&self) -> u64 {
        self.metrics
            .transports
            .iter()
            .map(|t| t.sessions.get())
            .sum()
    }
}

/// A session's token: what it grants and when it runs out (`exp` plus the leeway).
#[derive(Debug, Clone)]
pub struct SessionToken {
    pub grant: Grant,
    pub expires_at: tokio::time::Instant,
}

impl SessionToken {
    /// The token of a new session at `now` (whose wall-clock time is `unix_ms`); refused if it
    /// is already past its expiry.
    pub fn new(
        auth: &Authenticator,
        grant: Grant,
        now: tokio::time::Instant,
        unix_ms: u64,
    ) -> Result<Self, Refusal> {
        let at_ms = auth.expires_at_ms(&grant);
        if at_ms <= unix_ms {
            return Err(Refusal::new(CloseCode::Unauthorized, "token expired"));
        }
        let expires_at = now + Duration::from_millis(at_ms - unix_ms);
        Ok(SessionToken { grant, expires_at })
    }

    /// REFRESH: a valid token for the same subject replaces this one (on error this one
    /// stays). Returns the orgs among `subscribed` that the new token no longer grants.
    pub fn refresh<'a>(
        &mut self,
        auth: &Authenticator,
        token: &str,
        subscribed: impl Iterator<Item = &'a OrgId>,
        now: tokio::time::Instant,
        unix_ms: u64,
    ) -> Result<Vec<OrgId>, Refusal> {
        let grant = auth.verify(token)?;
        if grant.sub != self.grant.sub {
            return Err(crate::auth::AuthError::SubjectChanged.into());
        }
        let revoked = subscribed
            .filter(|o| grant.check_subscribe(o).is_err())
            .cloned()
            .collect();
        *self = SessionToken::new(auth, grant, now, unix_ms)?;
        Ok(revoked)
    }
}

/// The WebSocket message format (`format`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Binary,
    Json,
}

/// The `/v1/stream` query. Only its scalars are parsed when it arrives; the `orgs` and `since`
/// lists, whose length the client chooses, are parsed by [`ConnectParams::plan`] after the
/// token is verified, and refused unparsed when longer than the per-session org limit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnectParams {
    pub token: String,
    /// The raw `orgs` list, if given.
    pub orgs: Option<String>,
    /// The raw `since` list, if given.
    pub since: Option<String>,
    pub brotli: bool,
    pub format: Format,
    /// `presence=1`: the session gets the presence of the orgs it subscribes to.
    pub presence: bool,
    /// `fallback=`: why a client that tried WebTransport connects over WebSocket (metrics).
    pub fallback: crate::metrics::Fallback,
    /// The browser engine the User-Agent names (set by the transport; metrics).
    pub engine: crate::metrics::Engine,
}

/// The initial subscriptions a query asks for, parsed.
pub type Lists = (Option<Vec<OrgId>>, Vec<(OrgId, Position)>);

impl ConnectParams {
    /// Parses the query string; `bearer` is the `Authorization: Bearer` token, if any (it and
    /// every `access_token` parameter must agree, [`crate::auth::request_token`]).
    pub fn parse(query: &str, bearer: Option<&str>) -> Result<Self, Refusal> {
        let mut p = ConnectParams {
            token: crate::auth::request_token(bearer, query)?,
            orgs: None,
            since: None,
            brotli: false,
            format: Format::Binary,
            presence: false,
            fallback: crate::metrics::Fallback::None,
            engine: crate::metrics::Engine::Unknown,
        };
        for (k, v) in form_urlencoded::parse(query.as_bytes()) {
            match &*k {
                "orgs" => p.orgs = Some(v.into_owned()),
                "since" => p.since = Some(v.into_owned()),
                "enc" => p.brotli = v.split(',').any(|e| e.trim() == "br"),
                "presence" => {
                    p.presence = match &*v {
                        "1" | "true" => true,
                        "0" | "false" | "" => false,
                        other => {
                            return Err(Refusal::new(
                                CloseCode::Protocol,
                                format!(
                                    "presence must be 1 or 0, not {:?}",
                                    other.chars().take(16).collect::<String>()
                                ),
                            ))
                        }
                    }
                }
                "format" => {
                    p.format = match &*v {
                        "bin" | "" => Format::Binary,
                        "json" => Format::Json,
                        other => {
                            return Err(Refusal::new(
                                CloseCode::Protocol,
                                format!(
                                    "unknown format {:?}",
                                    other.chars().take(16).collect::<String>()
                                ),
                            ))
                        }
                    }
                }
                // Unknown reasons are counted as `other`: a newer client must not be refused.
                "fallback" => p.fallback = crate::metrics::Fallback::parse(&v),
                _ => {} // access_token above; unknown parameters are ignored, for forward compatibility
            }
        }
        Ok(p)
    }

    /// Parses the `orgs` and `since` lists, each refused before parsing when it has more
    /// than `max_orgs` entries.
    pub fn lists(&self, max_orgs: usize) -> Result<Lists, Refusal> {
        let orgs = self
            .orgs
            .as_deref()
            .map(|l| parse_org_list(l, max_orgs))
            .transpose()?;
        let since = match self.since.as_deref() {
            Some(l) => parse_since_list(l, max_orgs)?,
            None => Vec::new(),
        };
        Ok((orgs, since))
    }

    /// Authorizes the initial subscriptions (call after the token is verified): the orgs asked
    /// for (default: those the token names), each granted, each `since` naming one of them.
    pub fn plan(
        &self,
        grant: &Grant,
        max_orgs: usize,
    ) -> Result<Vec<(OrgId, Option<Position>)>, Refusal> {
        let (asked, mut since) = self.lists(max_orgs)?;
        let orgs = asked.unwrap_or_else(|| grant.orgs().to_vec());
        if orgs.len() > max_orgs {
            return Err(Refusal::new(
                CloseCode::Protocol,
                format!("{} orgs asked, at most {max_orgs} per session", orgs.len()),
            ));
        }
        for org in &orgs {
            grant.check_subscribe(org)?;
        }
        // Both lists hold at most `max_orgs` entries: these scans are bounded by its square.
        if let Some((org, _)) = since.iter().find(|(o, _)| !orgs.contains(o)) {
            return Err(Refusal::new(
                CloseCode::Protocol,
                format!("since names org {org}, which is not subscribed"),
            ));
        }
        Ok(orgs
            .into_iter()
            .map(|o| {
                let p = since.iter().position(|(s, _)| *s == o);
                (o, p.map(|i| since.swap_remove(i).1))
            })
            .collect())
    }
}

/// Removes the value of `access_token` from a query string, for logging.
pub fn redact_query(query: &str) -> String {
    query
        .split('&')
        .map(|kv| match kv.split_once('=') {
            Some(("access_token", _)) => "access_token=REDACTED".to_string(),
            _ => kv.to_string(),
        })
        .collect::<Vec<_>>()
        .join("&")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_query() {
        let p = ConnectParams::parse(
            "access_token=t&orgs=acme,beta&since=acme:e1:5&enc=br&format=json",
            None,
        )
        .unwrap();
        assert_eq!(p.token, "t");
        let (orgs, since) = p.lists(64).unwrap();
        assert_eq!(orgs.unwrap().len(), 2);
        assert_eq!(since[0].1.seq, 5);
        assert!(p.brotli);
        assert_eq!(p.format, Format::Json);
        let p = ConnectParams::parse("", Some("bearer-tok")).unwrap();
        assert_eq!(
            (p.token.as_str(), p.format, p.brotli),
            ("bearer-tok", Format::Binary, false)
        );
        assert_eq!(
            ConnectParams::parse("format=xml", None).unwrap_err().code,
            CloseCode::Protocol
        );
        for bad in ["orgs=a%20b", "since=acme:e1", "since=acme:e1:x"] {
            let p = ConnectParams::parse(bad, None).expect("lists are parsed later");
            assert_eq!(p.lists(64).unwrap_err().code, CloseCode::Protocol, "{bad}");
        }
        // Tokens: the header and every query parameter agree, or the request is refused.
        assert_eq!(
            ConnectParams::parse("access_token=a&access_token=a", Some("a"))
                .unwrap()
                .token,
            "a"
        );
        for (q, b) in [
            ("access_token=a&access_token=b", None),
            ("access_token=a", Some("b")),
        ] {
            assert_eq!(
                ConnectParams::parse(q, b).unwrap_err().code,
                CloseCode::Unauthorized,
                "{q} {b:?}"
            );
        }
    }

    #[test]
    fn long_lists_are_refused_before_parsing() {
        // 17,000 names: over the limit, refused without parsing any of them.
        let many = vec!["x"; 17_000].join(",");
        let p = ConnectParams::parse(&format!("orgs={many}&since={many}"), None).unwrap();
        let e = p.lists(64).unwrap_err();
        assert_eq!(e.code, CloseCode::Protocol);
        assert!(e.reason.contains("at most 64"), "{}", e.reason);
        // At the limit, duplicates are kept once.
        let p = ConnectParams::parse("orgs=a,b,a", None).unwrap();
        assert_eq!(p.lists(3).unwrap().0.unwrap().len(), 2);
    }

    #[test]
    fn redaction() {
        assert_eq!(
            redact_query("orgs=a&access_token=secret.jwt&x=1"),
            "orgs=a&access_token=REDACTED&x=1"
        );
    }
}
