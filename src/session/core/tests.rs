//! The session core on virtual time: no sockets, no sleeps. Time is an `Instant` the test
//! moves; the hub runs on an in-memory log; requests are made by the same [`SessionIo`] the
//! drivers use.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use edgestream_codec::{ClientCommand, CloseCode, Frame, Since};
use tokio::time::Instant;

use super::*;
use crate::auth::{mint_hs256, AuthConfig, Authenticator, Claims, JwtAlg};
use crate::event::{Encoding, Event};
use crate::hub::{Hub, Live};
use crate::log::memory::MemoryLog;
use crate::log::{EventLog, LogError, Retention};
use crate::metrics::Metrics;
use crate::session::io::SessionIo;
use crate::session::{ConnectParams, Format, SessionEnv, SessionLimits};

const SECRET: &[u8] = b"0123456789abcdef0123456789abcdef";
const LEEWAY: u64 = 30;

struct Node {
    env: Arc<SessionEnv>,
    log: Arc<MemoryLog>,
}

fn node(limits: SessionLimits) -> Node {
    node_with(limits, Retention::default())
}

fn node_with(limits: SessionLimits, retention: Retention) -> Node {
    let log = Arc::new(MemoryLog::new(retention));
    let metrics = Arc::new(Metrics::default());
    let hub = Hub::new(log.clone(), metrics.clone());
    let auth = Authenticator::new(&AuthConfig {
        alg: JwtAlg::HS256,
        key: SECRET.to_vec(),
        issuer: None,
        audience: None,
        leeway_secs: LEEWAY,
        kid: None,
        max_lifetime_secs: None,
    })
    .unwrap();
    let env = Arc::new(SessionEnv {
        session_permits: Arc::new(tokio::sync::Semaphore::new(limits.max_sessions)),
        uploads: None,
        presence: crate::presence::Presence::new(hub.clone(), Default::default()),
        hub,
        auth: Arc::new(auth),
        metrics,
        limits,
        encoding: Encoding::default(),
        shutdown: Default::default(),
    });
    Node { env, log }
}

fn limits() -> SessionLimits {
    SessionLimits {
        heartbeat: Duration::from_secs(5),
        ..SessionLimits::default()
    }
}

/// A token for `sub` on `orgs`, valid `secs` from now.
fn token(sub: &str, orgs: &[&str], secs: u64) -> (String, u64) {
    let exp = crate::time::unix_secs() + secs;
    let claims = Claims {
        sub: sub.into(),
        exp,
        nbf: None,
        orgs: orgs.iter().map(|s| s.to_string()).collect(),
        scope: None,
        iss: None,
        aud: None,
    };
    (mint_hs256(SECRET, &claims), exp)
}

/// A session of `layout` for `query`, started at `now` with its initial requests made.
struct Session {
    core: SessionCore,
    io: SessionIo,
    queue: crate::hub::Queue,
}

async fn open(node: &Node, query: &str, layout: Layout, now: Instant) -> Result<Session, Refusal> {
    let params = ConnectParams::parse(query, None)?;
    let (io, queue, _) = SessionIo::new(node.env.clone());
    let mut core = SessionCore::admit(node.env.clone(), &params, layout, now)?;
    io.drive(&mut core).await;
    Ok(Session { core, io, queue })
}

impl Session {
    /// Everything the core has to send, as decoded frames (text as JSON strings), with where
    /// it goes.
    fn out(&mut self) -> Vec<Out> {
        let mut v = Vec::new();
        while let Some(t) = self.core.poll_transmit() {
            v.push(match t {
                Transmit::Control(m) => Out::Control(decode(m)),
                Transmit::Stream(id, frames) => Out::Stream(
                    id,
                    frames
                        .into_iter()
                        .map(|b| Frame::decode_exact(b.bytes().clone(), 1 << 20).unwrap())
                        .collect(),
                ),
                Transmit::Datagram(d) => Out::Datagram(Frame::decode_exact(d, 1 << 20).unwrap()),
                Transmit::Open(id) => Out::Open(id),
                Transmit::Finish(id) => Out::Finish(id),
                Transmit::Abort(id) => Out::Abort(id),
                Transmit::Close(r) => Out::Close(r.code),
            });
        }
        v
    }

    async fn command(&mut self, c: ClientCommand, now: Instant) {
        self.core.handle_command(c, now);
        self.io.drive(&mut self.core).await;
    }

    /// Hands the core every live item queued now.
    fn live(&mut self) {
        while let Ok(item) = self.queue.try_recv() {
            self.core.handle_live(item);
        }
    }

    /// Makes the catch-up reads the core asks for, until it asks for none.
    async fn reads(&mut self) {
        while let Some(r) = self.core.poll_read() {
            let (stream, result) = self.io.read(r).await;
            self.core.handle_read(stream, result, Instant::now());
        }
    }
}

#[derive(Debug, PartialEq)]
enum Out {
    Control(Decoded),
    Stream(StreamId, Vec<Frame>),
    Datagram(Frame),
    Open(StreamId),
    Finish(StreamId),
    Abort(StreamId),
    Close(CloseCode),
}

#[derive(Debug, PartialEq)]
enum Decoded {
    Frame(Frame),
    Json(serde_json::Value),
}

fn decode(m: Message) -> Decoded {
    match m {
        Message::Binary(b) => Decoded::Frame(Frame::decode_exact(b, 1 << 20).unwrap()),
        Message::Text(t) => Decoded::Json(serde_json::from_slice(&t).unwrap()),
        Message::Event(f) if f.is_text() => {
            Decoded::Json(serde_json::from_slice(f.bytes()).unwrap())
        }
        Message::Event(f) => {
            Decoded::Frame(Frame::decode_exact(f.bytes().clone(), 1 << 20).unwrap())
        }
    }
}

fn closes(out: &[Out]) -> Vec<CloseCode> {
    out.iter()
        .filter_map(|o| match o {
            Out::Close(c) => Some(*c),
            _ => None,
        })
        .collect()
}

fn control_frames(out: &[Out]) -> Vec<&Frame> {
    out.iter()
        .filter_map(|o| match o {
            Out::Control(Decoded::Frame(f)) => Some(f),
            _ => None,
        })
        .collect()
}

fn org(s: &str) -> OrgId {
    OrgId::parse(s).unwrap()
}

async fn publish(node: &Node, o: &str, n: usize) {
    let payloads = vec![Bytes::from_static(b"{}"); n];
    node.log.append(&org(o), payloads, None).await.unwrap();
}

const BIN: Layout = Layout::Socket(Format::Binary);

#[tokio::test]
async fn the_token_expires_at_exp_plus_leeway_and_not_a_millisecond_before() {
    let n = node(limits());
    let t0 = Instant::now();
    let (tok, exp) = token("alice", &["acme"], 60);
    let mut s = open(&n, &format!("access_token={tok}"), BIN, t0)
        .await
        .unwrap();
    let at = t0 + Duration::from_millis((exp + LEEWAY) * 1000 - s.core.clock.unix_ms);
    assert_eq!(s.core.expires_at(), at);
    s.out();
    s.core.handle_timeout(at - Duration::from_millis(1));
    assert!(closes(&s.out()).is_empty(), "open until exp + leeway");
    s.core.handle_timeout(at);
    assert_eq!(closes(&s.out()), [CloseCode::TokenExpired]);
    assert!(s.core.is_closed());
}

#[tokio::test]
async fn refresh_moves_the_expiry_and_unsubscribes_orgs_no_longer_granted() {
    let n = node(limits());
    let t0 = Instant::now();
    let (tok, _) = token("alice", &["acme", "beta"], 60);
    let mut s = open(&n, &format!("access_token={tok}"), BIN, t0)
        .await
        .unwrap();
    s.out();
    let first = s.core.expires_at();
    // Another subject: ERROR 4001, the old token stays.
    let (other, _) = token("bob", &["acme"], 600);
    s.command(ClientCommand::Refresh { token: other }, t0).await;
    let out = s.out();
    assert!(
        matches!(control_frames(&out)[..], [Frame::Error { code: 4001, .. }]),
        "{out:?}"
    );
    assert_eq!(s.core.expires_at(), first);
    // The same subject, later, one org fewer.
    let (later, _) = token("alice", &["acme"], 600);
    s.command(ClientCommand::Refresh { token: later }, t0).await;
    let out = s.out();
    match &control_frames(&out)[..] {
        [Frame::Error { code: 4003, .. }, Frame::Unsubscribed { org }] => assert_eq!(org, "beta"),
        other => panic!("{other:?}"),
    }
    assert!(s.core.expires_at() > first + Duration::from_secs(500));
    s.core.handle_timeout(first);
    assert!(
        closes(&s.out()).is_empty(),
        "the old expiry has passed harmlessly"
    );
    assert_eq!(s.core.orgs().collect::<Vec<_>>(), [&org("acme")]);
}

#[tokio::test]
async fn heartbeats_come_every_interval_with_each_orgs_head_on_either_layout() {
    let n = node(limits());
    publish(&n, "acme", 3).await;
    let t0 = Instant::now();
    let (tok, _) = token("alice", &["acme"], 3600);
    for layout in [BIN, Layout::Socket(Format::Json), Layout::Streams] {
        let mut s = open(&n, &format!("access_token={tok}"), layout, t0)
            .await
            .unwrap();
        s.out();
        let hb = Duration::from_secs(5);
        assert_eq!(s.core.poll_timeout(), t0 + hb);
        s.core.handle_timeout(t0 + hb - Duration::from_millis(1));
        assert!(s.out().is_empty(), "nothing before the interval");
        for k in 1..=3u32 {
            s.core.handle_timeout(t0 + hb * k);
            let out = s.out();
            let ts = s.core.clock.unix_ms(t0 + hb * k);
            match (&layout, &out[..]) {
                (Layout::Streams, [Out::Datagram(Frame::Heartbeat { ts: t, heads })])
                | (_, [Out::Control(Decoded::Frame(Frame::Heartbeat { ts: t, heads }))]) => {
                    assert_eq!((*t, heads.clone()), (ts, vec![("acme".to_string(), 3)]));
                }
                (_, [Out::Control(Decoded::Json(v))]) => {
                    assert_eq!(v["t"], "heartbeat");
                    assert_eq!(v["ts"], ts);
                    assert_eq!(v["heads"]["acme"], 3);
                }
                other => panic!("{layout:?}: {other:?}"),
            }
            assert_eq!(s.core.poll_timeout(), t0 + hb * (k + 1));
        }
    }
}

#[tokio::test]
async fn caps_on_orgs_and_sessions_and_upload_streams() {
    let n = node(SessionLimits {
        max_orgs: 2,
        max_sessions: 2,
        ..limits()
    });
    let t0 = Instant::now();
    let (tok, _) = token("alice", &["a", "b", "c"], 3600);
    let q = format!("access_token={tok}&orgs=a,b");
    let mut s = open(&n, &q, Layout::Streams, t0).await.unwrap();
    s.out();
    s.command(
        ClientCommand::Subscribe {
            org: "c".into(),
            since: None,
        },
        t0,
    )
    .await;
    match &control_frames(&s.out())[..] {
        [Frame::Error {
            code: 4400,
            message,
        }] => assert!(message.contains("at most 2")),
        other => panic!("{other:?}"),
    }
    // Re-subscribing an org already held is not a new org.
    s.command(
        ClientCommand::Subscribe {
            org: "a".into(),
            since: None,
        },
        t0,
    )
    .await;
    let out = s.out();
    assert!(matches!(out[0], Out::Abort(_)), "{out:?}");
    assert!(matches!(out[1], Out::Open(_)), "{out:?}");
    // The second session fits, the third does not: its permit is refused before anything.
    let _second = open(&n, &q, BIN, t0).await.unwrap();
    let third = open(&n, &q, BIN, t0).await.err().unwrap();
    assert_eq!(third.code, CloseCode::TooMany);
    // Upload streams: four at once.
    for _ in 0..MAX_UPLOADS {
        s.core.handle_upload_stream().unwrap();
    }
    assert_eq!(
        s.core.handle_upload_stream().unwrap_err().code,
        CloseCode::TooMany
    );
    s.core.handle_upload_stream_end();
    s.core.handle_upload_stream().unwrap();
}

#[tokio::test]
async fn a_stream_that_does_not_drain_closes_the_session_4008_one_that_drains_never_does() {
    let n = node(SessionLimits {
        queue: 4,
        ..limits()
    });
    publish(&n, "acme", 1).await; // the epoch is the log's; use it for live events
    let t0 = Instant::now();
    let (tok, _) = token("alice", &["acme"], 3600);
    let q = format!("access_token={tok}");
    let epoch = n.log.state(&org("acme")).await.unwrap().epoch;
    let live = |seq| {
        Live::Event(Event::new(
            org("acme"),
            epoch.clone(),
            seq,
            0,
            Bytes::from_static(b"{}"),
        ))
    };
    // Drained after every event: 100 events, no close.
    let mut s = open(&n, &q, Layout::Streams, t0).await.unwrap();
    let out = s.out();
    let Out::Open(id) = out[0] else {
        panic!("{out:?}")
    };
    s.core.handle_sent(id, 1); // SUBSCRIBED written
    for seq in 2..102 {
        s.core.handle_live(live(seq));
        let out = s.out();
        assert!(
            matches!(&out[..], [Out::Stream(_, f)] if f.len() == 1),
            "{out:?}"
        );
        s.core.handle_sent(id, 1);
    }
    // Never drained: the fifth live frame outstanding closes it.
    let mut s = open(&n, &q, Layout::Streams, t0).await.unwrap();
    s.out();
    for seq in 2..6 {
        s.core.handle_live(live(seq));
    }
    assert!(closes(&s.out()).is_empty(), "four outstanding is the limit");
    s.core.handle_live(live(6));
    assert_eq!(closes(&s.out()), [CloseCode::SlowConsumer]);
    // On a socket the hub's queue is the limit: its overflow closes the session.
    let mut s = open(&n, &q, BIN, t0).await.unwrap();
    s.core.handle_overflow();
    assert_eq!(closes(&s.out()), [CloseCode::SlowConsumer]);
}

#[tokio::test]
async fn a_log_outage_during_catch_up_closes_4503_on_either_layout() {
    let n = node(limits());
    publish(&n, "acme", 10).await;
    let epoch = n.log.state(&org("acme")).await.unwrap().epoch;
    let t0 = Instant::now();
    let (tok, _) = token("alice", &["acme"], 3600);
    let q = format!("access_token={tok}&since=acme:{epoch}:2");
    for layout in [BIN, Layout::Streams] {
        let mut s = open(&n, &q, layout, t0).await.unwrap();
        if let [Out::Open(id), ..] = s.out()[..] {
            s.core.handle_sent(id, 1); // SUBSCRIBED written
        }
        let r = s.core.poll_read().expect("a catch-up read");
        assert_eq!((r.after.seq, r.limit), (2, crate::hub::CATCH_UP_BATCH));
        assert!(s.core.poll_read().is_none(), "one read per org at a time");
        s.core.handle_read(
            r.stream,
            Err(LogError::Unavailable("down".into())),
            Instant::now(),
        );
        assert_eq!(closes(&s.out()), [CloseCode::GoingAway], "{layout:?}");
        assert!(s.core.poll_read().is_none());
    }
}

#[tokio::test]
async fn a_replay_on_a_stream_waits_for_the_stream_to_write_the_last_batch() {
    let n = node(limits());
    publish(&n, "acme", 3000).await;
    let epoch = n.log.state(&org("acme")).await.unwrap().epoch;
    let t0 = Instant::now();
    let (tok, _) = token("alice", &["acme"], 3600);
    let q = format!("access_token={tok}&since=acme:{epoch}:0");
    let mut s = open(&n, &q, Layout::Streams, t0).await.unwrap();
    let out = s.out();
    let Out::Open(id) = out[0] else {
        panic!("{out:?}")
    };
    assert!(
        s.core.poll_read().is_none(),
        "SUBSCRIBED is not written yet"
    );
    s.core.handle_sent(id, 1);
    let mut seqs = Vec::new();
    while let Some(r) = s.core.poll_read() {
        let (stream, result) = s.io.read(r).await;
        s.core.handle_read(stream, result, Instant::now());
        assert!(s.core.poll_read().is_none(), "the batch is not written yet");
        let before = seqs.len();
        for o in s.out() {
            let Out::Stream(_, frames) = o else {
                panic!("{o:?}")
            };
            seqs.extend(frames.iter().map(|f| match f {
                Frame::Event { seq, .. } => *seq,
                other => panic!("{other:?}"),
            }));
        }
        // Half of the batch written: the next read still waits.
        let batch = seqs.len() - before;
        s.core.handle_sent(id, batch / 2);
        assert!(
            s.core.poll_read().is_none(),
            "half the batch is not all of it"
        );
        s.core.handle_sent(id, batch - batch / 2);
    }
    assert_eq!(seqs, (1..=3000).collect::<Vec<_>>());
    let m = n
        .env
        .metrics
        .transport(crate::metrics::Transport::WebTransport);
    assert_eq!(
        (m.events_delivered.get(), m.events_replayed.get()),
        (3000, 3000)
    );
}

#[tokio::test]
async fn a_reset_is_not_counted_as_a_delivered_event_on_either_layout() {
    let t0 = Instant::now();
    let (tok, _) = token("alice", &["acme"], 3600);
    for layout in [BIN, Layout::Streams] {
        let n = node_with(
            limits(),
            Retention {
                max_events: 5,
                ..Retention::default()
            },
        );
        publish(&n, "acme", 5).await;
        let epoch = n.log.state(&org("acme")).await.unwrap().epoch;
        // Recovered at SUBSCRIBED; evicted before the catch-up reads: the read becomes a RESET.
        let q = format!("access_token={tok}&since=acme:{epoch}:1");
        let mut s = open(&n, &q, layout, t0).await.unwrap();
        let out = s.out();
        if let Layout::Streams = layout {
            let Out::Open(id) = out[0] else { panic!() };
            s.core.handle_sent(id, 1);
        }
        publish(&n, "acme", 10).await;
        s.reads().await;
        let out = s.out();
        let frames: Vec<&Frame> = out
            .iter()
            .flat_map(|o| match o {
                Out::Control(Decoded::Frame(f)) => vec![f],
                Out::Stream(_, f) => f.iter().collect(),
                _ => vec![],
            })
            .collect();
        assert!(
            matches!(frames[..], [Frame::Reset { head: 15, .. }]),
            "{layout:?} {frames:?}"
        );
        for t in &n.env.metrics.transports {
            assert_eq!(t.events_delivered.get(), 0, "{layout:?}");
        }
    }
}

/// One script of commands and live events through both layouts: the same frames, in the same
/// order per org, the control answers the same, the same close.
#[tokio::test]
async fn both_layouts_answer_a_script_with_the_same_frames() {
    let t0 = Instant::now();
    let (tok, _) = token("alice", &["acme", "beta"], 3600);
    // presence=1: each org's snapshot (the session itself) comes on its stream too.
    let q = format!("access_token={tok}&orgs=acme&presence=1");
    let script = || {
        [
            ClientCommand::Ping(Bytes::from_static(b"p1")),
            ClientCommand::Subscribe {
                org: "beta".into(),
                since: Some(Since::Text("nope".into())),
            },
        ]
    };
    let mut seen = Vec::new();
    for layout in [BIN, Layout::Streams] {
        // A node each: the same history, an epoch of its own (compared as "E").
        let n = node(limits());
        publish(&n, "acme", 2).await;
        publish(&n, "beta", 1).await;
        let mut s = open(&n, &q, layout, t0).await.unwrap();
        let mut frames: Vec<(String, Frame)> = Vec::new();
        let mut record = |out: Vec<Out>, streams: &mut Vec<StreamId>| {
            for o in out {
                match o {
                    Out::Control(Decoded::Frame(f)) => frames.push(("control".into(), f)),
                    Out::Stream(id, fs) => {
                        for f in fs {
                            frames.push((format!("org{}", id.0), f));
                        }
                    }
                    Out::Open(id) => streams.push(id),
                    Out::Close(c) => frames.push((
                        "close".into(),
                        Frame::Error {
                            code: c.code().into(),
                            message: String::new(),
                        },
                    )),
                    _ => {}
                }
            }
        };
        let mut streams = Vec::new();
        record(s.out(), &mut streams);
        s.command(
            ClientCommand::Subscribe {
                org: "beta".into(),
                since: None,
            },
            t0,
        )
        .await;
        s.command(ClientCommand::Ping(Bytes::from_static(b"x")), t0)
            .await;
        record(s.out(), &mut streams);
        publish(&n, "acme", 1).await;
        publish(&n, "beta", 1).await;
        // Wait for the hub's follower (the only real wait: the in-memory log's tail task).
        // Two events (through the hub's follower task: the one wait of these tests, bounded)
        // and the two presence snapshots (pushed when the session entered each org).
        let queued = async {
            while s.queue.len() < 4 {
                tokio::task::yield_now().await;
            }
        };
        tokio::time::timeout(Duration::from_secs(10), queued)
            .await
            .expect("the hub delivers");
        s.live();
        record(s.out(), &mut streams);
        s.command(ClientCommand::Unsubscribe { org: "beta".into() }, t0)
            .await;
        s.command(
            ClientCommand::Unsubscribe {
                org: "gamma".into(),
            },
            t0,
        )
        .await;
        for c in script() {
            s.command(c, t0).await;
        }
        record(s.out(), &mut streams);
        // Per destination: WebSocket has one; compare the org streams' and control's contents.
        let by = |dest: &str| -> Vec<Frame> {
            frames
                .iter()
                .filter(|(d, _)| d == dest)
                .map(|(_, f)| edgestream_testkit::node_neutral(f.clone()))
                .collect()
        };
        let mut per_org = Vec::new();
        for (i, id) in streams.iter().enumerate() {
            per_org.push((i, by(&format!("org{}", id.0))));
        }
        seen.push((layout, by("control"), per_org, by("close")));
    }
    let (_, ws_control, _, ws_close) = &seen[0];
    let (_, wt_control, wt_orgs, wt_close) = &seen[1];
    // On a socket the org frames are in the control sequence; split them out by org.
    let org_of = |f: &Frame| match f {
        Frame::Subscribed { org, .. }
        | Frame::Unsubscribed { org }
        | Frame::Reset { org, .. }
        | Frame::Presence { org, .. }
        | Frame::Event { org, .. } => Some(org.clone()),
        _ => None,
    };
    let ws_acme: Vec<&Frame> = ws_control
        .iter()
        .filter(|f| org_of(f).as_deref() == Some("acme"))
        .collect();
    let ws_beta: Vec<&Frame> = ws_control
        .iter()
        .filter(|f| org_of(f).as_deref() == Some("beta"))
        .collect();
    let kinds = |fs: &[&Frame]| fs.iter().map(|f| f.kind()).collect::<Vec<_>>();
    // SUBSCRIBED, the presence snapshot (this session), the live event.
    assert_eq!(kinds(&ws_acme), [0x01, 0x09, 0x02], "{ws_acme:?}");
    // SUBSCRIBED, snapshot, the live event, UNSUBSCRIBED.
    assert_eq!(kinds(&ws_beta), [0x01, 0x09, 0x02, 0x07], "{ws_beta:?}");
    assert_eq!(ws_acme, wt_orgs[0].1.iter().collect::<Vec<_>>());
    assert_eq!(ws_beta, wt_orgs[1].1.iter().collect::<Vec<_>>());
    // Control: the same answers; the UNSUBSCRIBED of a subscribed org travels on its stream on
    // WebTransport (counted above), an unsubscribed one on control on both.
    let ws_rest: Vec<&Frame> = ws_control
        .iter()
        .filter(|f| {
            org_of(f).is_none() || matches!(f, Frame::Unsubscribed { org } if org == "gamma")
        })
        .collect();
    assert_eq!(ws_rest, wt_control.iter().collect::<Vec<_>>());
    assert_eq!(ws_close, wt_close);
    assert_eq!(ws_close.len(), 1, "the malformed since closes the session");
}

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
        let Frame::Heartbeat { heads, .. } = Frame::decode_exact(f.clone(), 4096).unwrap() else {
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
