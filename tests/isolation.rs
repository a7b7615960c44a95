//! Tenant isolation, fuzzed: thousands of random (granted orgs, requested orgs, since list)
//! combinations against two nodes sharing one real redis-server, over WebSocket and
//! WebTransport. Every org's events carry their org in the payload (a canary), so an event of
//! one org on another org's subscription, during replay or live, is caught, as are sessions
//! refused that should be served and replays that miss or repeat events.
//!
//! The seed is printed; `EDGESTREAM_ISOLATION_SEED=N` replays a run.

mod support;

use std::collections::{BTreeMap, BTreeSet};

use edgestream_codec::{Frame, Resume};
use edgestream_testkit::ws::{Msg, WsClient};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};
use support::TestServer;

const ORGS: [&str; 6] = ["t0", "t1", "t2", "t3", "t4", "t5"];
/// Events each org holds before the cases start.
const HISTORY: u64 = 20;

/// What a case asks for.
#[derive(Debug)]
struct Case {
    granted: Vec<&'static str>,
    /// `None`: the `orgs` parameter is left out (the granted orgs).
    requested: Option<Vec<String>>,
    since: Vec<String>,
    node: usize,
    webtransport: bool,
}

/// What the session should do: serve these orgs (with the replay expected per org), or
/// be refused.
#[derive(Debug, PartialEq)]
enum Expect {
    Serve(BTreeMap<String, Option<u64>>),
    Refuse,
}

fn random_case(
    rng: &mut StdRng,
    epochs: &BTreeMap<String, String>,
    heads: &BTreeMap<String, u64>,
) -> Case {
    let pick = |rng: &mut StdRng, p: f64| -> Vec<&'static str> {
        ORGS.iter()
            .copied()
            .filter(|_| rng.random_bool(p))
            .collect()
    };
    let granted = pick(rng, 0.5);
    let requested = if rng.random_bool(0.2) {
        None
    } else {
        let mut r: Vec<String> = if rng.random_bool(0.7) && !granted.is_empty() {
            // Mostly inside the grant, sometimes one more.
            granted
                .iter()
                .filter(|_| rng.random_bool(0.7))
                .map(|o| o.to_string())
                .collect()
        } else {
            pick(rng, 0.4).iter().map(|o| o.to_string()).collect()
        };
        if rng.random_bool(0.1) {
            r.push(ORGS[rng.random_range(0..ORGS.len())].to_string());
        }
        if rng.random_bool(0.03) {
            r.push("bad~org".into());
        }
        Some(r)
    };
    let mut since = Vec::new();
    let subscribing: Vec<&str> = match &requested {
        Some(r) => r.iter().map(String::as_str).collect(),
        None => granted.clone(),
    };
    for _ in 0..rng.random_range(0..3) {
        // Mostly an org the case subscribes to.
        let org = match subscribing.get(rng.random_range(0..subscribing.len().max(1))) {
            Some(o) if rng.random_bool(0.8) && ORGS.contains(o) => *o,
            _ => ORGS[rng.random_range(0..ORGS.len())],
        };
        let epoch = if rng.random_bool(0.85) {
            epochs[org].clone()
        } else {
            "otherepoch".into()
        };
        let seq = rng.random_range(0..=heads[org] + 2);
        since.push(match rng.random_range(0..20) {
            0 => "garbage".to_string(),
            _ => format!("{org}:{epoch}:{seq}"),
        });
    }
    Case {
        granted,
        requested,
        since,
        node: rng.random_range(0..2),
        webtransport: rng.random_bool(0.05),
    }
}

/// The outcome PROTOCOL.md gives for a case (the model this test checks the server against).
fn expect(case: &Case, epochs: &BTreeMap<String, String>, heads: &BTreeMap<String, u64>) -> Expect {
    let requested: Vec<String> = match &case.requested {
        None => case.granted.iter().map(|o| o.to_string()).collect(),
        Some(r) => r.clone(),
    };
    // Repeats are one subscription; an empty list subscribes nothing (docs/PROTOCOL.md).
    let set: BTreeSet<&String> = requested.iter().collect();
    if set.iter().any(|o| !case.granted.contains(&o.as_str())) {
        return Expect::Refuse;
    }
    let mut replay: BTreeMap<String, Option<u64>> =
        set.iter().map(|o| (o.to_string(), None)).collect();
    let mut named = BTreeSet::new();
    for s in &case.since {
        let parts: Vec<&str> = s.split(':').collect();
        let [org, epoch, seq] = parts[..] else {
            return Expect::Refuse;
        };
        let seq: u64 = seq.parse().unwrap();
        if !replay.contains_key(org) || !named.insert(org) {
            return Expect::Refuse;
        }
        // A usable position replays what follows it; an unusable one resets (no replay).
        if epochs[org] == epoch && seq <= heads[org] {
            replay.insert(org.to_string(), Some(seq));
        }
    }
    Expect::Serve(replay)
}

/// Reports a case that took long (for finding what waits).
struct SlowCase(std::time::Instant, String);

impl Drop for SlowCase {
    fn drop(&mut self) {
        if self.0.elapsed() > std::time::Duration::from_secs(1) {
            eprintln!("slow ({:?}): {}", self.0.elapsed(), self.1);
        }
    }
}

/// One frame as the checks see it, from either transport.
enum Seen {
    Subscribed {
        org: String,
        resume: Resume,
    },
    Event {
        org: String,
        seq: u64,
        payload: Value,
    },
    Pong,
    Closed(u16),
    Other(String),
}

async fn next_seen_ws(c: &mut WsClient) -> Seen {
    match c.next_non_heartbeat().await {
        Ok(Msg::Frame(Frame::Subscribed { org, resume, .. })) => Seen::Subscribed { org, resume },
        Ok(Msg::Frame(Frame::Event {
            org, seq, payload, ..
        })) => Seen::Event {
            org,
            seq,
            payload: serde_json::from_slice(&payload).unwrap(),
        },
        Ok(Msg::Frame(Frame::Pong(_))) => Seen::Pong,
        Ok(Msg::Close(code, _)) => Seen::Closed(code.unwrap_or(0)),
        other => Seen::Other(format!("{other:?}")),
    }
}

async fn next_seen_wt(c: &mut edgestream_testkit::wt::WtClient) -> Seen {
    use edgestream_testkit::wt::StreamItem;
    match c.next_item().await {
        Ok(StreamItem::Frame { frame, .. }) => match frame {
            Frame::Subscribed { org, resume, .. } => Seen::Subscribed { org, resume },
            Frame::Event {
                org, seq, payload, ..
            } => Seen::Event {
                org,
                seq,
                payload: serde_json::from_slice(&payload).unwrap(),
            },
            other => Seen::Other(format!("{other:?}")),
        },
        Ok(other) => Seen::Other(format!("{other:?}")),
        Err(_) => Seen::Closed(c.closed().await.map_or(0, |(code, _)| code as u16)),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_grants_requests_and_positions_never_cross_orgs() {
    let cases: usize = std::env::var("EDGESTREAM_ISOLATION_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2000);
    let seed: u64 = std::env::var("EDGESTREAM_ISOLATION_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(rand::random);
    eprintln!("isolation fuzz: seed {seed}, {cases} cases");
    let mut rng = StdRng::seed_from_u64(seed);

    let redis = support::redis::RedisServer::start();
    let url = redis.url();
    let nodes = [
        {
            let url = url.clone();
            TestServer::start_with(move |a| a.redis = Some(url)).await
        },
        TestServer::start_with(move |a| a.redis = Some(url)).await,
    ];
    let hashes = [nodes[0].cert_hash().await, nodes[1].cert_hash().await];
    let ops = nodes[0].token_for("ops", &ORGS, "subscribe publish");
    let mut epochs = BTreeMap::new();
    let mut heads = BTreeMap::new();
    for org in ORGS {
        let events: Vec<Value> = (1..=HISTORY).map(|n| json!({"org": org, "n": n})).collect();
        let r = nodes[1]
            .api
            .publish(&ops, org, &json!(events))
            .await
            .unwrap();
        epochs.insert(org.to_string(), r["epoch"].as_str().unwrap().to_string());
        heads.insert(org.to_string(), HISTORY);
    }

    let (mut served, mut refused, mut replayed) = (0, 0, 0);
    for i in 0..cases {
        let case = random_case(&mut rng, &epochs, &heads);
        let want = expect(&case, &epochs, &heads);
        let node = &nodes[case.node];
        let token = node.token_for("fuzz", &case.granted, "subscribe");
        let mut query = format!("access_token={token}");
        if let Some(r) = &case.requested {
            query.push_str(&format!("&orgs={}", r.join(",")));
        }
        if !case.since.is_empty() {
            query.push_str(&format!("&since={}", case.since.join(",")));
        }
        let ctx = format!("case {i} (seed {seed}): {case:?}");
        let started = std::time::Instant::now();
        let _slow = SlowCase(started, ctx.clone());
        let mut ws = None;
        let mut wt = None;
        if case.webtransport {
            match edgestream_testkit::wt::connect(&node.wt_url(&query), &hashes[case.node]).await {
                Ok(c) => wt = Some(c),
                Err(e) => panic!("{ctx}: connect: {e}"),
            }
        } else {
            ws = Some(WsClient::connect(&node.ws_url(&query)).await.unwrap());
        }
        macro_rules! next {
            () => {
                match (&mut ws, &mut wt) {
                    (Some(c), _) => next_seen_ws(c).await,
                    (_, Some(c)) => next_seen_wt(c).await,
                    _ => unreachable!(),
                }
            };
        }

        let Expect::Serve(replay) = want else {
            match next!() {
                Seen::Closed(code) => {
                    assert!(code == 4003 || code == 4400, "{ctx}: refused with {code}")
                }
                Seen::Subscribed { org, .. } => panic!("{ctx}: served {org}, should be refused"),
                Seen::Event { org, .. } => panic!("{ctx}: an event of {org} to a refused session"),
                _ => {}
            }
            refused += 1;
            continue;
        };
        // SUBSCRIBED for each org (any order), replays after each, all of the right org.
        let mut subscribed = BTreeSet::new();
        let mut got: BTreeMap<String, Vec<u64>> = BTreeMap::new();
        let expected_events: usize = replay
            .iter()
            .map(|(org, s)| s.map_or(0, |s| (heads[org] - s) as usize))
            .sum();
        let mut events = 0;
        while subscribed.len() < replay.len() || events < expected_events {
            match next!() {
                Seen::Subscribed { org, resume } => {
                    assert!(replay.contains_key(&org), "{ctx}: SUBSCRIBED to {org}");
                    let want_resume = match replay[&org] {
                        Some(_) => Resume::Recovered,
                        None if case.since.iter().any(|s| s.starts_with(&format!("{org}:"))) => {
                            Resume::Reset
                        }
                        None => Resume::New,
                    };
                    assert_eq!(resume, want_resume, "{ctx}: resume of {org}");
                    subscribed.insert(org);
                }
                Seen::Event { org, seq, payload } => {
                    assert!(replay.contains_key(&org), "{ctx}: an event of {org}");
                    assert_eq!(
                        payload["org"], org,
                        "{ctx}: {org}'s event carries {payload}"
                    );
                    got.entry(org).or_default().push(seq);
                    events += 1;
                }
                Seen::Closed(code) => panic!("{ctx}: closed with {code}, should be served"),
                other @ (Seen::Pong | Seen::Other(_)) => {
                    panic!(
                        "{ctx}: unexpected {}",
                        match other {
                            Seen::Other(s) => s,
                            _ => "PONG".into(),
                        }
                    )
                }
            }
        }
        for (org, since) in &replay {
            let want: Vec<u64> = since.map_or(Vec::new(), |s| (s + 1..=heads[org]).collect());
            assert_eq!(
                got.get(org).cloned().unwrap_or_default(),
                want,
                "{ctx}: replay of {org}"
            );
        }
        served += 1;
        replayed += events;
        // Live: a canary to a random org through the other node, then one to an org of the
        // session; until the latter arrives, every event must be of the session's orgs.
        let canary_org = ORGS[rng.random_range(0..ORGS.len())];
        let other = &nodes[1 - case.node];
        other
            .api
            .publish(&ops, canary_org, &json!({"org": canary_org, "case": i}))
            .await
            .unwrap();
        *heads.get_mut(canary_org).unwrap() += 1;
        if let Some(own) = replay.keys().next().cloned() {
            other
                .api
                .publish(&ops, &own, &json!({"org": own, "case": i, "last": true}))
                .await
                .unwrap();
            *heads.get_mut(&own).unwrap() += 1;
            loop {
                match next!() {
                    Seen::Event { org, payload, .. } => {
                        assert!(replay.contains_key(&org), "{ctx}: a live event of {org}");
                        assert_eq!(payload["org"], org, "{ctx}: {org}'s live event: {payload}");
                        if payload["last"] == true && payload["case"] == i {
                            break;
                        }
                    }
                    Seen::Closed(code) => panic!("{ctx}: closed with {code}"),
                    _ => {}
                }
            }
        }
        // Nothing of another org after that (a PING's PONG closes the window on WebSocket).
        if let Some(c) = &mut ws {
            c.send_frame(&Frame::Ping(bytes::Bytes::from_static(b"end")))
                .await
                .unwrap();
            loop {
                match next_seen_ws(c).await {
                    Seen::Pong => break,
                    Seen::Event { org, .. } if replay.contains_key(&org) => {}
                    Seen::Event { org, .. } => panic!("{ctx}: an event of {org}"),
                    _ => panic!("{ctx}: no PONG"),
                }
            }
        }
    }
    eprintln!(
        "isolation fuzz: {served} sessions served ({replayed} events replayed and checked), \
         {refused} refused"
    );
    assert!(
        served > cases / 5 && refused > cases / 10,
        "the cases cover both outcomes"
    );
}
