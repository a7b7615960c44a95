//! One table of scenarios, each run through both transports on real connections (WebSocket
//! and WebTransport on loopback, a fresh node per run): the frames each org receives, the
//! answers on the control channel, the close code and the session metrics must be the same.
//!
//! Frames are compared per key: the org a frame names (SUBSCRIBED, EVENT, RESET, UNSUBSCRIBED
//! of a subscribed org) or `control` for the rest. On a WebSocket both share the socket; on
//! WebTransport the org's frames come on its stream. Presence and heartbeats are left out
//! (presence has its own tests; heartbeats are timed). Epochs and timestamps differ between two
//! nodes and are compared as placeholders.

mod support;

use bytes::Bytes;
use edgestream::config::ServeArgs;
use edgestream_codec::{CloseCode, Frame, Resume};
use edgestream_testkit::ws::{Msg, WsClient};
use edgestream_testkit::wt::{StreamItem, WtClient};
use serde_json::{json, Value};
use support::TestServer;

#[derive(Clone, Copy, Debug, PartialEq)]
enum Transport {
    Ws,
    Wt,
}

#[derive(Clone)]
enum Step {
    /// Publish this many `{"i": n}` events to an org (HTTP).
    Publish(&'static str, u64),
    /// Send a frame on the control channel.
    Send(Frame),
    /// Read the next frame of a key (`control` or an org) and record it.
    Expect(&'static str),
    /// The server closes the session with this code.
    Closed(CloseCode),
    /// A second session with the same query is refused with this code.
    SecondRefused(CloseCode),
    /// The node drains.
    Drain,
}

struct Scenario {
    name: &'static str,
    flags: fn(&mut ServeArgs),
    /// Orgs and scope of the session's token.
    orgs: &'static [&'static str],
    scope: &'static str,
    /// Published before the session connects.
    before: &'static [(&'static str, u64)],
    /// Query parameters after the token; `{epoch}` is replaced by the node's epoch of `acme`.
    query: &'static str,
    steps: Vec<Step>,
}

fn none(_: &mut ServeArgs) {}

fn scenarios() -> Vec<Scenario> {
    use Step::*;
    let sub = |org: &str, epoch: &str, seq| {
        Send(Frame::Subscribe {
            org: org.into(),
            epoch: epoch.into(),
            seq,
        })
    };
    vec![
        Scenario {
            name: "live events in order",
            flags: none,
            orgs: &["acme"],
            scope: "subscribe publish",
            before: &[],
            query: "",
            steps: vec![
                Expect("acme"),
                Publish("acme", 3),
                Expect("acme"),
                Expect("acme"),
                Expect("acme"),
            ],
        },
        Scenario {
            name: "resume after a position: the missed events, then live",
            flags: none,
            orgs: &["acme"],
            scope: "subscribe publish",
            before: &[("acme", 5)],
            query: "since=acme:{epoch}:2",
            steps: vec![
                Expect("acme"),
                Expect("acme"),
                Expect("acme"),
                Expect("acme"),
                Publish("acme", 1),
                Expect("acme"),
            ],
        },
        Scenario {
            name: "an unknown epoch: SUBSCRIBED says reset, then live",
            flags: none,
            orgs: &["acme"],
            scope: "subscribe publish",
            before: &[("acme", 2)],
            query: "since=acme:zz9:1",
            steps: vec![Expect("acme"), Publish("acme", 1), Expect("acme")],
        },
        Scenario {
            name: "dynamic subscribe and unsubscribe",
            flags: none,
            orgs: &["acme", "beta"],
            scope: "subscribe publish",
            before: &[("beta", 1)],
            query: "orgs=acme",
            steps: vec![
                Expect("acme"),
                sub("beta", "", 0),
                Expect("beta"),
                Publish("beta", 1),
                Expect("beta"),
                Send(Frame::Unsubscribe { org: "beta".into() }),
                Expect("beta"),
                Publish("acme", 1),
                Expect("acme"),
            ],
        },
        Scenario {
            name: "refusals of SUBSCRIBE are ERROR frames and the session stays",
            flags: |a| a.max_orgs_per_session = Some(1),
            orgs: &["acme", "beta"],
            scope: "subscribe publish",
            before: &[],
            query: "orgs=acme",
            steps: vec![
                Expect("acme"),
                sub("gamma", "", 0),
                Expect("control"),
                sub("beta", "", 0),
                Expect("control"),
                Send(Frame::Ping(Bytes::from_static(b"still here"))),
                Expect("control"),
            ],
        },
        Scenario {
            name: "chat: acknowledged with its seq, a repeat gets the same seq",
            flags: none,
            orgs: &["acme"],
            scope: "subscribe publish chat",
            before: &[],
            query: "",
            steps: vec![
                Expect("acme"),
                Send(chat("m1")),
                Expect("control"),
                Expect("acme"),
                Send(chat("m1")),
                Expect("control"),
                Send(Frame::Chat {
                    org: "acme".into(),
                    room: "lobby".into(),
                    id: "m2".into(),
                    body: Bytes::from_static(b"{not json"),
                }),
                Expect("control"),
            ],
        },
        Scenario {
            name: "REFRESH that drops an org: ERROR 4003 and the org unsubscribed",
            flags: none,
            orgs: &["acme", "beta"],
            scope: "subscribe publish",
            before: &[],
            query: "orgs=acme,beta",
            steps: vec![
                Expect("acme"),
                Expect("beta"),
                Send(Frame::Refresh {
                    token: support::token_for("alice", &["acme"], "subscribe"),
                }),
                Expect("control"),
                Expect("beta"),
                Send(Frame::Refresh {
                    token: support::token_for("mallory", &["acme"], "subscribe"),
                }),
                Expect("control"),
            ],
        },
        Scenario {
            name: "a bad token closes 4001",
            flags: none,
            orgs: &[],
            scope: "subscribe",
            before: &[],
            query: "",
            steps: vec![Closed(CloseCode::Unauthorized)],
        },
        Scenario {
            name: "a malformed SUBSCRIBE position closes 4400",
            flags: none,
            orgs: &["acme"],
            scope: "subscribe",
            before: &[],
            query: "",
            steps: vec![
                Expect("acme"),
                sub("acme", "not an epoch", 1),
                Closed(CloseCode::Protocol),
            ],
        },
        Scenario {
            name: "a server-to-client frame from the client closes 4400",
            flags: none,
            orgs: &["acme"],
            scope: "subscribe",
            before: &[],
            query: "",
            steps: vec![
                Expect("acme"),
                Send(Frame::Pong(Bytes::new())),
                Closed(CloseCode::Protocol),
            ],
        },
        Scenario {
            name: "over --max-sessions: 4029",
            flags: |a| a.max_sessions = Some(1),
            orgs: &["acme"],
            scope: "subscribe",
            before: &[],
            query: "",
            steps: vec![Expect("acme"), SecondRefused(CloseCode::TooMany)],
        },
        Scenario {
            name: "a draining node closes 4503",
            flags: none,
            orgs: &["acme"],
            scope: "subscribe",
            before: &[],
            query: "",
            steps: vec![Expect("acme"), Drain, Closed(CloseCode::GoingAway)],
        },
    ]
}

fn chat(id: &str) -> Frame {
    Frame::Chat {
        org: "acme".into(),
        room: "lobby".into(),
        id: id.into(),
        body: Bytes::from_static(br#"{"text":"hi"}"#),
    }
}

/// A session on either transport, read per key.
enum Client {
    Ws(Box<WsClient>, Vec<(String, Frame)>),
    Wt(Box<WtClient>, Vec<(String, Frame)>),
}

fn key_of(f: &Frame) -> Option<String> {
    match f {
        Frame::Subscribed { org, .. }
        | Frame::Event { org, .. }
        | Frame::Reset { org, .. }
        | Frame::Unsubscribed { org } => Some(org.clone()),
        _ => None,
    }
}

impl Client {
    async fn connect(t: Transport, node: &TestServer, query: &str) -> anyhow::Result<Client> {
        Ok(match t {
            Transport::Ws => Client::Ws(
                Box::new(WsClient::connect(&node.ws_url(query)).await?),
                Vec::new(),
            ),
            Transport::Wt => {
                let url = node.wt_url(query);
                Client::Wt(
                    Box::new(edgestream_testkit::wt::connect(&url, &node.cert_hash().await).await?),
                    Vec::new(),
                )
            }
        })
    }

    async fn send(&mut self, f: &Frame) {
        match self {
            Client::Ws(c, _) => c.send_frame(f).await.unwrap(),
            Client::Wt(c, _) => c.send_control(f).await.unwrap(),
        }
    }

    async fn next(&mut self, key: &str) -> Frame {
        match self {
            Client::Ws(c, pending) => {
                if let Some(i) = pending.iter().position(|(k, _)| k == key) {
                    return pending.remove(i).1;
                }
                loop {
                    let f = match c.next_non_heartbeat().await.unwrap() {
                        Msg::Frame(Frame::Presence { .. }) => continue,
                        Msg::Frame(f) => f,
                        other => panic!("expected a frame for {key}, got {other:?}"),
                    };
                    let k = key_of(&f).unwrap_or_else(|| "control".into());
                    if k == key {
                        return f;
                    }
                    pending.push((k, f));
                }
            }
            Client::Wt(c, _) if key == "control" => loop {
                match c.next_control().await.unwrap() {
                    Frame::Presence { .. } => continue,
                    f => return f,
                }
            },
            Client::Wt(c, pending) => {
                // Org streams are independent: another org's frame may come first.
                if let Some(i) = pending.iter().position(|(k, _)| k == key) {
                    return pending.remove(i).1;
                }
                loop {
                    match c.next_item().await.unwrap() {
                        StreamItem::Frame { org, frame } if org == key => return frame,
                        StreamItem::Frame { org, frame } => pending.push((org, frame)),
                        StreamItem::Finished { .. } => continue, // after UNSUBSCRIBED
                        StreamItem::Failed { org, error } => {
                            panic!("stream of {org} failed: {error}")
                        }
                    }
                }
            }
        }
    }

    async fn closed(&mut self) -> u16 {
        match self {
            Client::Ws(c, _) => c.expect_close().await.unwrap().0,
            Client::Wt(c, _) => u16::try_from(c.closed().await.unwrap().0).unwrap(),
        }
    }
}

/// What one run observed.
#[derive(Debug, PartialEq)]
struct Transcript {
    frames: Vec<(String, Frame)>,
    closes: Vec<u16>,
    metrics: Value,
}

async fn run(s: &Scenario, t: Transport) -> Transcript {
    let mut node = TestServer::start_with(s.flags).await;
    let publisher = node.token_for("pub", &["acme", "beta", "gamma"], "publish");
    let mut published = std::collections::HashMap::<&str, u64>::new();
    let mut epoch = String::from("none");
    for (org, n) in s.before {
        let at = published.entry(org).or_default();
        let r = node.publish_numbered(&publisher, org, *at..*at + n).await;
        *at += n;
        if *org == "acme" {
            epoch = r["epoch"].as_str().unwrap().to_string();
        }
    }
    let token = if s.orgs.is_empty() {
        "not.a.token".to_string()
    } else {
        node.token_for("alice", s.orgs, s.scope)
    };
    let query = format!(
        "access_token={token}&{}",
        s.query.replace("{epoch}", &epoch)
    );
    let mut c = Client::connect(t, &node, &query).await.unwrap();
    let mut tr = Transcript {
        frames: Vec::new(),
        closes: Vec::new(),
        metrics: Value::Null,
    };
    let mut draining = false;
    for step in &s.steps {
        match step {
            Step::Publish(org, n) => {
                let at = published.entry(org).or_default();
                node.publish_numbered(&publisher, org, *at..*at + n).await;
                *at += n;
            }
            Step::Send(f) => c.send(f).await,
            Step::Expect(key) => {
                let f = edgestream_testkit::node_neutral(c.next(key).await);
                tr.frames.push((key.to_string(), f));
            }
            Step::Closed(code) => {
                let got = c.closed().await;
                assert_eq!(got, code.code(), "{}: {t:?}", s.name);
                tr.closes.push(got);
            }
            Step::SecondRefused(code) => {
                let mut second = Client::connect(t, &node, &query).await.unwrap();
                let got = second.closed().await;
                assert_eq!(got, code.code(), "{}: {t:?}", s.name);
                tr.closes.push(got);
            }
            Step::Drain => {
                node.begin_stop();
                draining = true;
            }
        }
    }
    if !draining {
        // The session counters a user would read: per transport, so take this run's.
        let m = node.metrics().await;
        let label = match t {
            Transport::Ws => "websocket",
            Transport::Wt => "webtransport",
        };
        tr.metrics = json!({
            "events_delivered": m["events_delivered"][label],
            "events_replayed": m["events_replayed"][label],
            "sessions_opened": m["sessions_opened"][label],
            "sessions_closed": m["sessions_closed"],
        });
        node.stop().await.unwrap();
    } else {
        node.join().await.unwrap();
    }
    tr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_scenario_looks_the_same_on_both_transports() {
    for s in scenarios() {
        let ws = run(&s, Transport::Ws).await;
        let wt = run(&s, Transport::Wt).await;
        assert_eq!(
            ws, wt,
            "scenario {:?}: WebSocket (left) and WebTransport (right) differ",
            s.name
        );
        // The transcripts are not empty by accident: every expected frame was read.
        let expected = s
            .steps
            .iter()
            .filter(|st| matches!(st, Step::Expect(_)))
            .count();
        assert_eq!(ws.frames.len(), expected, "{}", s.name);
    }
}

/// Spot checks that the shared transcript says what the scenario means (the comparison above
/// would also pass if both transports were wrong the same way).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_transcripts_say_what_the_contract_says() {
    let all = scenarios();
    let by_name = |n: &str| all.iter().find(|s| s.name.starts_with(n)).unwrap();
    let resume = run(by_name("resume after"), Transport::Wt).await;
    let seqs: Vec<u64> = resume
        .frames
        .iter()
        .filter_map(|(_, f)| match f {
            Frame::Event { seq, .. } => Some(*seq),
            _ => None,
        })
        .collect();
    assert_eq!(seqs, [3, 4, 5, 6]);
    assert!(matches!(
        resume.frames[0].1,
        Frame::Subscribed {
            resume: Resume::Recovered,
            head: 5,
            ..
        }
    ));
    assert_eq!(resume.metrics["events_replayed"], 3, "{}", resume.metrics);
    assert_eq!(resume.metrics["events_delivered"], 4, "{}", resume.metrics);
    let chat = run(by_name("chat"), Transport::Ws).await;
    let acks: Vec<&Frame> = chat
        .frames
        .iter()
        .filter(|(k, _)| k == "control")
        .map(|(_, f)| f)
        .collect();
    assert!(
        matches!(
            acks[..],
            [
                Frame::ChatAck { seq: 1, .. },
                Frame::ChatAck { seq: 1, .. },
                Frame::Error { code: 4400, .. }
            ]
        ),
        "{acks:?}"
    );
    let refusals = run(by_name("refusals"), Transport::Wt).await;
    let codes: Vec<u64> = refusals
        .frames
        .iter()
        .filter_map(|(_, f)| match f {
            Frame::Error { code, .. } => Some(*code),
            _ => None,
        })
        .collect();
    assert_eq!(codes, [4003, 4400]);
}
