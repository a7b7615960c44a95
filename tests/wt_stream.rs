//! End to end over WebTransport with the Rust client: the WebSocket guarantees again (order,
//! resume, reset, isolation, JWT refusal, slow consumers), plus per-org streams, datagram
//! heartbeats, PING/PONG, close codes and session release.

mod support;

use edgestream_codec::{CloseCode, Frame, Resume};
use edgestream_testkit::token;
use edgestream_testkit::wt::{self, StreamItem, WtClient};
use serde_json::{json, Value};
use support::{TestServer, SECRET};

async fn subscribed(c: &mut WtClient) -> (String, String, u64, Resume) {
    match c.next_frame().await.unwrap() {
        Frame::Subscribed {
            org,
            epoch,
            head,
            resume,
        } => (org, epoch, head, resume),
        other => panic!("expected SUBSCRIBED, got {other:?}"),
    }
}

fn seqs(evs: &[edgestream_testkit::ws::Ev]) -> Vec<u64> {
    evs.iter().map(|e| e.seq).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_events_in_order_and_brotli() {
    let s = TestServer::start().await;
    let tok = s.token(&["acme"]);
    let mut c = s.wt_client(&["acme"], "enc=br").await;
    let (org, _, head, resume) = subscribed(&mut c).await;
    assert_eq!((org.as_str(), head, resume), ("acme", 0, Resume::New));
    let api = s.api.clone();
    let publisher = tokio::spawn(async move {
        for b in 0..100 {
            let batch: Vec<Value> = (0..100).map(|i| json!({"n": b * 100 + i})).collect();
            api.publish(&tok, "acme", &Value::Array(batch))
                .await
                .unwrap();
        }
    });
    let evs = c.events(10_000).await.unwrap();
    publisher.await.unwrap();
    assert_eq!(seqs(&evs), (1..=10_000).collect::<Vec<_>>());
    for (i, e) in evs.iter().enumerate() {
        assert_eq!(e.payload, format!(r#"{{"n":{i}}}"#).as_bytes());
    }
    let big = format!(r#"{{"text":"{}"}}"#, "brotli ".repeat(500));
    let tok = s.token(&["acme"]);
    s.api
        .publish_raw(&tok, "acme", big.clone(), None)
        .await
        .unwrap();
    let e = &c.events(1).await.unwrap()[0];
    assert!(e.compressed);
    assert_eq!(e.payload, big.as_bytes());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resume_and_reset() {
    let s = TestServer::start_with(|a| a.replay_max_events = Some(50)).await;
    let tok = s.token(&["acme"]);
    let r = s.publish_numbered(&tok, "acme", 0..10).await;
    let epoch = r["epoch"].as_str().unwrap().to_string();
    let mut c = s
        .wt_client(&["acme"], &format!("since=acme:{epoch}:4"))
        .await;
    assert_eq!(subscribed(&mut c).await.3, Resume::Recovered);
    s.publish_numbered(&tok, "acme", 10..15).await;
    assert_eq!(
        seqs(&c.events(11).await.unwrap()),
        (5..=15).collect::<Vec<_>>()
    );
    for since in ["acme:other:3".to_string(), format!("acme:{epoch}:99")] {
        let mut c = s.wt_client(&["acme"], &format!("since={since}")).await;
        let (_, e, head, resume) = subscribed(&mut c).await;
        assert_eq!(
            (e.as_str(), head, resume),
            (epoch.as_str(), 15, Resume::Reset),
            "{since}"
        );
    }
    s.publish_numbered(&tok, "acme", 0..60).await; // evicts seq 5
    let mut c = s
        .wt_client(&["acme"], &format!("since=acme:{epoch}:4"))
        .await;
    assert_eq!(subscribed(&mut c).await.3, Resume::Reset, "evicted");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_orgs_on_separate_streams_one_stalled_while_the_other_flows() {
    let s = TestServer::start().await;
    let tok = s.token(&["acme", "beta"]);
    let mut c = s.wt_client(&["acme", "beta"], "").await;
    let mut orgs = vec![subscribed(&mut c).await.0, subscribed(&mut c).await.0];
    orgs.sort();
    assert_eq!(orgs, ["acme", "beta"]);
    c.stall("acme", true);
    // Enough for acme to exceed the stream's flow-control window, not the session queue.
    let pad = "x".repeat(4000);
    for b in 0..20 {
        let batch: Vec<Value> = (0..50)
            .map(|i| json!({"b": b, "i": i, "pad": pad}))
            .collect();
        s.api
            .publish(&tok, "acme", &Value::Array(batch))
            .await
            .unwrap();
    }
    s.publish_numbered(&tok, "beta", 0..100).await;
    let mut beta = Vec::new();
    while beta.len() < 100 {
        match c.next_item().await.unwrap() {
            StreamItem::Frame {
                org,
                frame: Frame::Event { seq, .. },
            } => {
                assert_eq!(org, "beta", "acme's stream is not being read");
                beta.push(seq);
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(
        beta,
        (1..=100).collect::<Vec<_>>(),
        "beta flows while acme is stalled"
    );
    c.stall("acme", false);
    let acme = c.events(1000).await.unwrap();
    assert!(acme.iter().all(|e| e.org == "acme"));
    assert_eq!(seqs(&acme), (1..=1000).collect::<Vec<_>>());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heartbeat_datagrams_name_heads_and_pings_are_answered() {
    let s = TestServer::start_with(|a| a.heartbeat = Some("200ms".parse().unwrap())).await;
    let tok = s.token(&["acme", "beta"]);
    s.publish_numbered(&tok, "acme", 0..3).await;
    let mut c = s.wt_client(&["acme", "beta"], "").await;
    subscribed(&mut c).await;
    subscribed(&mut c).await;
    match c.next_datagram().await.unwrap() {
        Frame::Heartbeat { heads, ts } => {
            assert!(ts > 1_700_000_000_000);
            assert_eq!(heads, [("acme".to_string(), 3), ("beta".to_string(), 0)]);
        }
        other => panic!("unexpected datagram {other:?}"),
    }
    c.send_datagram(&Frame::Ping(b"dg".to_vec().into()))
        .unwrap();
    loop {
        // Datagrams may be lost on a real network; on loopback they arrive.
        match c.next_datagram().await.unwrap() {
            Frame::Pong(b) => {
                assert_eq!(&b[..], b"dg");
                break;
            }
            Frame::Heartbeat { .. } => continue,
            other => panic!("unexpected datagram {other:?}"),
        }
    }
    c.send_control(&Frame::Ping(b"ctl".to_vec().into()))
        .await
        .unwrap();
    assert_eq!(
        c.next_control().await.unwrap(),
        Frame::Pong(b"ctl".to_vec().into())
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dynamic_subscribe_unsubscribe_and_refusals_on_the_control_stream() {
    let s = TestServer::start().await;
    let tok = s.token(&["acme", "beta"]);
    let mut c = s.wt_client(&["acme", "beta"], "orgs=acme").await;
    subscribed(&mut c).await;
    c.send_control(&Frame::Subscribe {
        org: "beta".into(),
        epoch: String::new(),
        seq: 0,
    })
    .await
    .unwrap();
    assert_eq!(subscribed(&mut c).await.0, "beta");
    c.send_control(&Frame::Subscribe {
        org: "gamma".into(),
        epoch: String::new(),
        seq: 0,
    })
    .await
    .unwrap();
    assert!(matches!(
        c.next_control().await.unwrap(),
        Frame::Error { code: 4003, .. }
    ));
    c.send_control(&Frame::Unsubscribe { org: "acme".into() })
        .await
        .unwrap();
    assert_eq!(
        c.next_item().await.unwrap(),
        StreamItem::Frame {
            org: "acme".into(),
            frame: Frame::Unsubscribed { org: "acme".into() }
        }
    );
    assert_eq!(
        c.next_item().await.unwrap(),
        StreamItem::Finished { org: "acme".into() }
    );
    s.api.publish(&tok, "acme", &json!({"x": 1})).await.unwrap();
    s.api.publish(&tok, "beta", &json!({"x": 2})).await.unwrap();
    let e = c.events(1).await.unwrap();
    assert_eq!((e[0].org.as_str(), e[0].seq), ("beta", 1));
    // A malformed control frame (a string longer than its frame) closes the session with 4400.
    c.send_control_raw(&[0x10, 0x02, 0x05, b'a']).await.unwrap();
    assert_eq!(c.closed().await.unwrap().0, 4400);
    // A control frame declaring more than the limit closes with 4413.
    let mut c = s.wt_client(&["acme"], "").await;
    subscribed(&mut c).await;
    c.send_control_raw(&[0x10, 0x80, 0x10, 0x00, 0x00])
        .await
        .unwrap();
    assert_eq!(c.closed().await.unwrap().0, 4413);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusals_are_session_close_codes() {
    let s = TestServer::start().await;
    let hash = s.cert_hash().await;
    let mut bad = token::claims("alice", &["acme"], "subscribe");
    bad["exp"] = json!(token::now() - 600);
    let cases = [
        (token::hs256(SECRET.as_bytes(), &bad), "", 4001, "expired"),
        (
            token::alg_none(&token::claims("alice", &["acme"], "subscribe")),
            "",
            4001,
            "alg none",
        ),
        (
            token::tampered(&s.token(&["acme"])),
            "",
            4001,
            "bad signature",
        ),
        (String::new(), "", 4001, "missing"),
        (s.token(&["acme"]), "&orgs=beta", 4003, "org not granted"),
        (s.token(&["acme"]), "&format=xml", 4400, "bad query"),
    ];
    for (tok, extra, want, why) in cases {
        let c = wt::connect(&s.wt_url(&format!("access_token={tok}{extra}")), &hash)
            .await
            .unwrap();
        assert_eq!(c.closed().await.unwrap().0, want, "{why}");
    }
    // The server keeps serving.
    let mut ok = s.wt_client(&["acme"], "").await;
    subscribed(&mut ok).await;
    // The wrong path is refused with 404 before any session.
    let url = format!("https://127.0.0.1:{}/nope", s.quic_addr.port());
    assert!(wt::connect(&url, &hash).await.is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tenant_isolation_over_webtransport() {
    let s = TestServer::start().await;
    let tok_b = s.token_for("bob", &["org-b"], "subscribe publish");
    let tok_a = s.token_for("alice", &["org-a"], "subscribe publish");
    let q = format!("access_token={tok_a}");
    let mut a = wt::connect(&s.wt_url(&q), &s.cert_hash().await)
        .await
        .unwrap();
    subscribed(&mut a).await;
    a.send_control(&Frame::Subscribe {
        org: "org-b".into(),
        epoch: String::new(),
        seq: 0,
    })
    .await
    .unwrap();
    assert!(matches!(
        a.next_control().await.unwrap(),
        Frame::Error { code: 4003, .. }
    ));
    s.publish_numbered(&tok_b, "org-b", 0..50).await;
    s.api
        .publish(&tok_a, "org-a", &json!({"mine": true}))
        .await
        .unwrap();
    let e = a.events(1).await.unwrap();
    assert_eq!((e[0].org.as_str(), e[0].seq), ("org-a", 1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_consumer_4008_and_release_and_shutdown_4503() {
    let mut s = TestServer::start_with(|a| a.session_queue = Some(32)).await;
    let tok = s.token(&["acme"]);
    let mut slow = s.wt_client(&["acme"], "").await;
    let mut fast = s.wt_client(&["acme"], "").await;
    subscribed(&mut slow).await;
    subscribed(&mut fast).await;
    slow.stall("acme", true);
    let pad = "x".repeat(30_000);
    let mut published = 0u64;
    let mut delivered = Vec::new();
    for _ in 0..400 {
        let batch: Vec<Value> = (0..16).map(|i| json!({"i": i, "pad": pad})).collect();
        s.api
            .publish(&tok, "acme", &Value::Array(batch))
            .await
            .unwrap();
        published += 16;
        delivered.extend(seqs(&fast.events(16).await.unwrap()));
        if s.metrics().await["sessions_closed"]["4008"] == 1 {
            break;
        }
    }
    assert_eq!(slow.closed_code().await.unwrap(), CloseCode::SlowConsumer);
    assert_eq!(
        delivered,
        (1..=published).collect::<Vec<_>>(),
        "the fast consumer kept up"
    );
    let m = s
        .wait_metrics("one WT session left", |m| {
            m["sessions"]["webtransport"] == 1
        })
        .await;
    assert_eq!(m["orgs_subscribed"], 1);
    // A clean close from the client frees its session at once.
    fast.close(0);
    let m = s
        .wait_metrics("no WT session", |m| m["sessions"]["webtransport"] == 0)
        .await;
    assert_eq!(m["orgs_subscribed"], 0);
    let mut last = s.wt_client(&["acme"], "").await;
    subscribed(&mut last).await;
    s.begin_stop();
    assert_eq!(last.closed().await.unwrap().0, 4503);
    s.join().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vanished_client_is_freed_at_the_idle_timeout() {
    let s = TestServer::start_with(|a| a.quic_idle_timeout = Some("1s".parse().unwrap())).await;
    let relay = support::relay::Relay::start(s.quic_addr).await;
    let url = format!(
        "https://127.0.0.1:{}/v1/stream?access_token={}",
        relay.addr.port(),
        s.token(&["acme"])
    );
    let mut c = wt::connect(&url, &s.cert_hash().await).await.unwrap();
    subscribed(&mut c).await;
    let m = s
        .wait_metrics("one WT session", |m| m["sessions"]["webtransport"] == 1)
        .await;
    assert_eq!(m["orgs_subscribed"], 1);
    relay.blackhole(true); // the client vanishes: no close, no packets
    let m = s
        .wait_metrics("the session freed", |m| m["sessions"]["webtransport"] == 0)
        .await;
    assert_eq!(m["orgs_subscribed"], 0, "the pool drops with it: {m}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_cap_refuses_with_4029_on_both_transports() {
    let s = TestServer::start_with(|a| a.max_sessions = Some(1)).await;
    let mut first = s.wt_client(&["acme"], "").await;
    subscribed(&mut first).await;
    let second = wt::connect(
        &s.wt_url(&format!("access_token={}", s.token(&["acme"]))),
        &s.cert_hash().await,
    )
    .await
    .unwrap();
    assert_eq!(second.closed_code().await.unwrap(), CloseCode::TooMany);
    let mut ws = s.client(&["acme"], "").await;
    assert_eq!(ws.expect_close_code().await.unwrap(), CloseCode::TooMany);
    let m = s.metrics().await;
    assert_eq!(m["sessions_closed"]["4029"], 2, "{m}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_always_still_connects() {
    let s = TestServer::start_with(|a| {
        a.quic_retry = Some(edgestream::webtransport::RetryPolicy::Always)
    })
    .await;
    let mut c = s.wt_client(&["acme"], "").await;
    subscribed(&mut c).await;
    s.api
        .publish(&s.token(&["acme"]), "acme", &json!({"after": "retry"}))
        .await
        .unwrap();
    assert_eq!(c.events(1).await.unwrap()[0].seq, 1);
}

/// Every handshake proves its address with a Retry (`--quic-retry always`; `auto` does the
/// same in a reconnect storm) while thousands of sessions stay open: every one connects.
/// A Retry gets a fresh connection ID that quinn does not check against the live ones; when
/// it named a live connection's CID, the client's next Initial went to that connection, which
/// dropped it, and the client waited out its handshake timeout. quinn's default CIDs carry 24
/// random bits, which made that rare but real at scale (a few clients in some 10,000-session
/// bench runs); with a 16-bit generator this test saw 25 of 6,000 sessions stall. Nodes now
/// issue 64 random bits (`webtransport::lb`; its unit test checks the CID space itself).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thousands_of_retried_handshakes_all_connect() {
    use futures_util::StreamExt as _;
    const SESSIONS: usize = 5_000;
    let s = TestServer::start_with(|a| {
        a.quic_retry = Some(edgestream::webtransport::RetryPolicy::Always)
    })
    .await;
    let hash = s.cert_hash().await;
    let url = s.wt_url(&format!("access_token={}&orgs=acme", s.token(&["acme"])));
    let connectors: Vec<wt::Connector> =
        (0..8).map(|_| wt::Connector::new(&hash).unwrap()).collect();
    let sessions: Vec<anyhow::Result<WtClient>> = futures_util::stream::iter(0..SESSIONS)
        .map(|i| connectors[i % connectors.len()].connect(&url))
        .buffer_unordered(64)
        .collect()
        .await;
    let failed: Vec<String> = sessions
        .iter()
        .filter_map(|r| r.as_ref().err().map(|e| format!("{e:#}")))
        .collect();
    assert!(
        failed.is_empty(),
        "{} of {SESSIONS} sessions did not connect: {:?}",
        failed.len(),
        &failed[..failed.len().min(3)]
    );
    let m = s.metrics().await;
    assert_eq!(m["sessions"]["webtransport"], SESSIONS as u64, "{m}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificate_rotation_keeps_sessions_and_serves_the_new_one() {
    let s = TestServer::start().await;
    let old_hash = s.cert_hash().await;
    let mut c = s.wt_client(&["acme"], "").await;
    subscribed(&mut c).await;
    let later = time::OffsetDateTime::now_utc() + time::Duration::days(9);
    assert!(s.app.certs.rotate_if_due(later).unwrap());
    let new_hash = s.cert_hash().await;
    assert_ne!(new_hash, old_hash);
    let (_, info) = s.api.get("/v1/info", None).await.unwrap();
    assert_eq!(info["cert_hash"]["value"], new_hash.as_str());
    // The open session goes on.
    s.api
        .publish(&s.token(&["acme"]), "acme", &json!({"after": "rotation"}))
        .await
        .unwrap();
    assert_eq!(c.events(1).await.unwrap()[0].seq, 1);
    // New handshakes get the new certificate: pinning the old hash fails, the new one works.
    let url = s.wt_url(&format!("access_token={}", s.token(&["acme"])));
    assert!(wt::connect(&url, &old_hash).await.is_err());
    let mut fresh = wt::connect(&url, &new_hash).await.unwrap();
    subscribed(&mut fresh).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn configured_certificate_files() {
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
    let ok = std::process::Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-days",
            "10",
            "-subj",
            "/CN=localhost",
        ])
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .output()
        .unwrap();
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    let (c2, k2) = (cert.clone(), key.clone());
    let s = TestServer::start_with(move |a| {
        a.cert = Some(c2);
        a.key = Some(k2);
    })
    .await;
    assert_eq!(s.api.get("/v1/cert-hash", None).await.unwrap().0, 404);
    let (_, info) = s.api.get("/v1/info", None).await.unwrap();
    assert!(info["cert_hash"].is_null(), "{info}");
    // A client pinned to that certificate's hash connects.
    use base64::Engine as _;
    use sha2::Digest as _;
    let pem = std::fs::read_to_string(&cert).unwrap();
    let b64: String = pem.lines().filter(|l| !l.starts_with("-----")).collect();
    let der = base64::engine::general_purpose::STANDARD
        .decode(b64)
        .unwrap();
    let hash = base64::engine::general_purpose::STANDARD.encode(sha2::Sha256::digest(&der));
    let url = s.wt_url(&format!("access_token={}", s.token(&["acme"])));
    let mut c = wt::connect(&url, &hash).await.unwrap();
    subscribed(&mut c).await;
    // A key without its certificate is a configuration error, not a panic.
    let err = edgestream::config::Config::resolve(edgestream::config::ServeArgs {
        key: Some(key),
        ..Default::default()
    });
    assert!(err.is_err());
}

/// Issue 17: the session cap holds under a burst. 70 WebTransport and 10 WebSocket sessions,
/// each subscribing 64 orgs of its own on Redis (so the start sequence awaits a while),
/// connect at once to a node capped at 10: at most 10 are open, the others close with 4029.
/// The cap is now a semaphore taken before the start's first await; before, it was a gauge
/// that WebTransport raised only after its subscribes (this test did not catch that race on
/// this machine: it passed on the previous code too, 10 open every run).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_of_connections_never_gets_past_the_session_cap() {
    const CAP: usize = 10;
    // On Redis, where a subscribe's first read takes a round trip: a wide window.
    let redis = support::redis::RedisServer::start();
    let url = redis.url();
    let s = TestServer::start_with(move |a| {
        a.max_sessions = Some(CAP);
        a.redis = Some(url);
    })
    .await;
    let hash = s.cert_hash().await;
    let connector = std::sync::Arc::new(wt::Connector::new(&hash).unwrap());
    let mut tasks = Vec::new();
    for i in 0..80 {
        // Orgs of its own, so that every subscribe starts a feed (a round trip to Redis).
        let orgs: Vec<String> = (0..64).map(|j| format!("s{i}-{j}")).collect();
        let names: Vec<&str> = orgs.iter().map(String::as_str).collect();
        let query = format!("access_token={}&orgs={}", s.token(&names), orgs.join(","));
        let (wt_url, ws_url) = (s.wt_url(&query), s.ws_url(&query));
        let connector = if i % 8 == 0 {
            std::sync::Arc::new(wt::Connector::new(&hash).unwrap())
        } else {
            connector.clone()
        };
        tasks.push(tokio::spawn(async move {
            // Open: every org SUBSCRIBED; else the close code.
            if i % 8 != 7 {
                let mut c = connector.connect(&wt_url).await.unwrap();
                for _ in 0..64 {
                    match c.next_frame().await {
                        Ok(Frame::Subscribed { .. }) => {}
                        _ => return Err(c.closed().await.unwrap().0),
                    }
                }
                Ok(Box::new(c) as Box<dyn std::any::Any + Send>)
            } else {
                let mut c = edgestream_testkit::ws::WsClient::connect(&ws_url)
                    .await
                    .unwrap();
                for _ in 0..64 {
                    match c.next_non_heartbeat().await.unwrap() {
                        edgestream_testkit::ws::Msg::Frame(Frame::Subscribed { .. }) => {}
                        edgestream_testkit::ws::Msg::Close(code, _) => {
                            return Err(code.unwrap_or(0) as u32)
                        }
                        other => panic!("{other:?}"),
                    }
                }
                Ok(Box::new(c) as Box<dyn std::any::Any + Send>)
            }
        }));
    }
    let (mut open, mut refused) = (Vec::new(), 0);
    for t in tasks {
        match t.await.unwrap() {
            Ok(c) => open.push(c),
            Err(code) => {
                assert_eq!(code, 4029);
                refused += 1;
            }
        }
    }
    assert!(
        open.len() <= CAP,
        "{} sessions open at once with --max-sessions {CAP}",
        open.len()
    );
    assert_eq!(open.len() + refused, 80);
    let m = s.metrics().await;
    let sessions = m["sessions"]["websocket"].as_u64().unwrap()
        + m["sessions"]["webtransport"].as_u64().unwrap();
    assert!(sessions <= CAP as u64, "{m}");
}
