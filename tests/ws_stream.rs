//! End to end over WebSocket: order, batches, resume, reset, brotli, formats, the pool,
//! heartbeats and shutdown. Real server on port 0, real WebSocket clients.

mod support;

use edgestream_codec::{Frame, Resume};
use edgestream_testkit::ws::{Msg, WsClient};
use serde_json::{json, Value};
use support::TestServer;

async fn subscribed(c: &mut WsClient) -> (String, String, u64, Resume) {
    match c.next_non_heartbeat().await.unwrap() {
        Msg::Frame(Frame::Subscribed {
            org,
            epoch,
            head,
            resume,
        }) => (org, epoch, head, resume),
        other => panic!("expected SUBSCRIBED, got {other:?}"),
    }
}

fn seqs(evs: &[edgestream_testkit::ws::Ev]) -> Vec<u64> {
    evs.iter().map(|e| e.seq).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_events_in_order_without_gaps_binary_and_json() {
    let s = TestServer::start().await;
    let tok = s.token(&["acme"]);
    let mut bin = s.client(&["acme"], "orgs=acme").await;
    let mut js = s.client(&["acme"], "orgs=acme&format=json").await;
    let (_, epoch, head, resume) = subscribed(&mut bin).await;
    assert_eq!((head, resume), (0, Resume::New));
    let first = js.next_non_heartbeat().await.unwrap();
    assert!(
        matches!(&first, Msg::Json(v) if v["t"] == "subscribed" && v["resume"] == "new" && v["epoch"] == epoch.as_str()),
        "{first:?}"
    );

    // 100 batches of 100, published concurrently with the reading.
    let api = s.api.clone();
    let publisher = tokio::spawn(async move {
        for b in 0..100 {
            let batch: Vec<Value> = (0..100).map(|i| json!({"n": b * 100 + i})).collect();
            api.publish(&tok, "acme", &Value::Array(batch))
                .await
                .unwrap();
        }
    });
    let evs = bin.events(10_000).await.unwrap();
    let jevs = js.events(10_000).await.unwrap();
    publisher.await.unwrap();
    assert_eq!(seqs(&evs), (1..=10_000).collect::<Vec<_>>());
    assert_eq!(seqs(&jevs), (1..=10_000).collect::<Vec<_>>());
    for (i, (e, j)) in evs.iter().zip(&jevs).enumerate() {
        let want = format!(r#"{{"n":{i}}}"#);
        assert_eq!(
            e.payload,
            want.as_bytes(),
            "binary payload is the published bytes"
        );
        assert_eq!(j.payload, want.as_bytes());
        assert_eq!(e.ts, j.ts);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_batches_are_atomic_and_contiguous() {
    let s = TestServer::start().await;
    let tok = s.token(&["acme"]);
    let mut c = s.client(&["acme"], "").await;
    subscribed(&mut c).await;
    let mut tasks = Vec::new();
    for p in 0..4 {
        let (api, tok) = (s.api.clone(), tok.clone());
        tasks.push(tokio::spawn(async move {
            let mut ranges = Vec::new();
            for b in 0..25 {
                let batch: Vec<Value> = (0..7).map(|i| json!({"p": p, "b": b, "i": i})).collect();
                let r = api
                    .publish(&tok, "acme", &Value::Array(batch))
                    .await
                    .unwrap();
                let (first, last) = (
                    r["first_seq"].as_u64().unwrap(),
                    r["last_seq"].as_u64().unwrap(),
                );
                assert_eq!(last - first, 6, "a batch gets consecutive seqs");
                ranges.push((first, p, b));
            }
            ranges
        }));
    }
    let mut ranges = Vec::new();
    for t in tasks {
        ranges.extend(t.await.unwrap());
    }
    let evs = c.events(4 * 25 * 7).await.unwrap();
    assert_eq!(seqs(&evs), (1..=700).collect::<Vec<_>>());
    for (first, p, b) in ranges {
        for i in 0..7u64 {
            let v: Value = serde_json::from_slice(&evs[(first + i - 1) as usize].payload).unwrap();
            assert_eq!(
                v,
                json!({"p": p, "b": b, "i": i}),
                "batch members stay together in order"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resume_with_valid_position_gets_exactly_the_missed_events() {
    let s = TestServer::start().await;
    let tok = s.token(&["acme"]);
    for i in 0..10 {
        s.api.publish(&tok, "acme", &json!({"i": i})).await.unwrap();
    }
    let mut c = s.client(&["acme"], "").await;
    let (_, epoch, head, _) = subscribed(&mut c).await;
    assert_eq!(head, 10);
    s.api
        .publish(&tok, "acme", &json!({"i": 10}))
        .await
        .unwrap();
    let evs = c.events(1).await.unwrap();
    assert_eq!(evs[0].seq, 11);
    c.close().await;

    // Missed while away: 12..=30.
    let batch: Vec<Value> = (11..30).map(|i| json!({"i": i})).collect();
    s.api
        .publish(&tok, "acme", &Value::Array(batch))
        .await
        .unwrap();
    let mut c = s.client(&["acme"], &format!("since=acme:{epoch}:11")).await;
    let (_, e2, head, resume) = subscribed(&mut c).await;
    assert_eq!(
        (e2.as_str(), head, resume),
        (epoch.as_str(), 30, Resume::Recovered)
    );
    // Live events published while the replay is under way come after it, without a duplicate.
    let api = s.api.clone();
    let tok2 = tok.clone();
    let live = tokio::spawn(async move {
        for i in 30..60 {
            api.publish(&tok2, "acme", &json!({"i": i})).await.unwrap();
        }
    });
    let evs = c.events(49).await.unwrap();
    live.await.unwrap();
    assert_eq!(seqs(&evs), (12..=60).collect::<Vec<_>>());
    for e in &evs {
        let v: Value = serde_json::from_slice(&e.payload).unwrap();
        assert_eq!(v["i"].as_u64().unwrap() + 1, e.seq);
    }

    // Resume at the head: recovered, nothing replayed, live continues.
    let mut c = s.client(&["acme"], &format!("since=acme:{epoch}:60")).await;
    assert_eq!(subscribed(&mut c).await.3, Resume::Recovered);
    s.api
        .publish(&tok, "acme", &json!({"i": 60}))
        .await
        .unwrap();
    assert_eq!(seqs(&c.events(1).await.unwrap()), [61]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unusable_positions_reset() {
    let s = TestServer::start_with(|a| a.replay_max_events = Some(5)).await;
    let tok = s.token(&["acme"]);
    let r = s.publish_numbered(&tok, "acme", 0..20).await;
    let epoch = r["epoch"].as_str().unwrap().to_string();
    for (i, (since, why)) in [
        ("acme:someotherepoch:3".to_string(), "foreign epoch"),
        (format!("acme:{epoch}:4"), "evicted (log keeps 16..=20)"),
        (format!("acme:{epoch}:99"), "ahead of head"),
    ]
    .into_iter()
    .enumerate()
    {
        let mut c = s.client(&["acme"], &format!("since={since}")).await;
        let (_, e, head, resume) = subscribed(&mut c).await;
        let want_head = 20 + i as u64;
        assert_eq!(
            (e.as_str(), head, resume),
            (epoch.as_str(), want_head, Resume::Reset),
            "{why}"
        );
        s.api
            .publish(&tok, "acme", &json!({"after": why}))
            .await
            .unwrap();
        let ev = c.events(1).await.unwrap();
        assert_eq!(
            ev[0].seq,
            want_head + 1,
            "{why}: live events after head follow"
        );
        c.close().await;
    }
    // Head is 23 and the log keeps 19..=23: the oldest retained position still resumes.
    let mut c = s.client(&["acme"], &format!("since=acme:{epoch}:18")).await;
    assert_eq!(subscribed(&mut c).await.3, Resume::Recovered);
    assert_eq!(seqs(&c.events(5).await.unwrap()), [19, 20, 21, 22, 23]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dynamic_subscribe_unsubscribe_ping_over_binary_and_json() {
    let s = TestServer::start().await;
    let tok = s.token(&["acme", "beta"]);
    let mut c = s.client(&["acme", "beta"], "orgs=acme").await;
    subscribed(&mut c).await;
    c.send_frame(&Frame::Subscribe {
        org: "beta".into(),
        epoch: String::new(),
        seq: 0,
    })
    .await
    .unwrap();
    assert_eq!(subscribed(&mut c).await.0, "beta");
    c.send_frame(&Frame::Ping(b"hello".to_vec().into()))
        .await
        .unwrap();
    assert_eq!(
        c.next_non_heartbeat().await.unwrap(),
        Msg::Frame(Frame::Pong(b"hello".to_vec().into()))
    );
    c.send_frame(&Frame::Unsubscribe { org: "acme".into() })
        .await
        .unwrap();
    assert_eq!(
        c.next_non_heartbeat().await.unwrap(),
        Msg::Frame(Frame::Unsubscribed { org: "acme".into() })
    );
    s.api.publish(&tok, "acme", &json!({"x": 1})).await.unwrap();
    s.api.publish(&tok, "beta", &json!({"x": 2})).await.unwrap();
    let e = c.events(1).await.unwrap();
    assert_eq!(
        (e[0].org.as_str(), e[0].seq),
        ("beta", 1),
        "no event of the unsubscribed org"
    );

    let mut j = s.client(&["acme", "beta"], "orgs=&format=json").await;
    j.send_text(r#"{"t":"subscribe","org":"acme","since":"nope:0"}"#)
        .await
        .unwrap();
    let m = j.next_non_heartbeat().await.unwrap();
    assert!(
        matches!(&m, Msg::Json(v) if v["t"] == "subscribed" && v["resume"] == "reset" && v["head"] == 1),
        "{m:?}"
    );
    j.send_text(r#"{"t":"ping","data":"p1"}"#).await.unwrap();
    assert_eq!(
        j.next_non_heartbeat().await.unwrap(),
        Msg::Json(json!({"t":"pong","data":"p1"}))
    );
    j.send_text(r#"{"t":"some-future-message"}"#).await.unwrap();
    j.send_text(r#"{"t":"unsubscribe","org":"acme"}"#)
        .await
        .unwrap();
    assert_eq!(
        j.next_non_heartbeat().await.unwrap(),
        Msg::Json(json!({"t":"unsubscribed","org":"acme"}))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn brotli_only_for_enc_br_clients_and_decodes_to_the_published_bytes() {
    let s = TestServer::start().await;
    let tok = s.token(&["acme"]);
    let mut br = s.client(&["acme"], "enc=br").await;
    let mut plain = s.client(&["acme"], "").await;
    subscribed(&mut br).await;
    subscribed(&mut plain).await;
    let big = format!(r#"{{ "text": "{}" }}"#, "compressible text ".repeat(300));
    let small = r#"{"tiny":true}"#;
    for body in [&big[..], small] {
        let (st, _) = s
            .api
            .publish_raw(&tok, "acme", body.to_string(), None)
            .await
            .unwrap();
        assert_eq!(st, 201);
    }
    let b = br.events(2).await.unwrap();
    let p = plain.events(2).await.unwrap();
    assert!(b[0].compressed, "a large payload is compressed for enc=br");
    assert!(!b[1].compressed, "payloads under the threshold are not");
    assert!(
        !p[0].compressed && !p[1].compressed,
        "never for clients without enc=br"
    );
    assert_eq!(b[0].payload, big.as_bytes());
    assert_eq!(p[0].payload, big.as_bytes());
    assert_eq!(b[1].payload, small.as_bytes());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pool_holds_one_upstream_subscription_per_org() {
    let s = TestServer::start().await;
    let mut clients = Vec::new();
    for i in 0..20 {
        let orgs = if i % 2 == 0 { "acme" } else { "acme,beta" };
        let mut c = s.client(&["acme", "beta"], &format!("orgs={orgs}")).await;
        subscribed(&mut c).await;
        clients.push(c);
    }
    let m = s
        .wait_metrics("20 sessions", |m| m["sessions"]["websocket"] == 20)
        .await;
    assert_eq!(
        m["orgs_subscribed"], 2,
        "one upstream subscription per org: {m}"
    );
    for c in clients.drain(..) {
        c.close().await;
    }
    let m = s
        .wait_metrics("0 sessions", |m| m["sessions"]["websocket"] == 0)
        .await;
    assert_eq!(
        m["orgs_subscribed"], 0,
        "released when the last subscriber leaves: {m}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heartbeats_name_the_heads_of_the_sessions_orgs() {
    let s = TestServer::start_with(|a| a.heartbeat = Some("200ms".parse().unwrap())).await;
    let tok = s.token(&["acme", "beta"]);
    s.publish_numbered(&tok, "acme", 0..3).await;
    let mut c = s.client(&["acme", "beta"], "").await;
    let mut j = s.client(&["acme", "beta"], "format=json&orgs=acme").await;
    loop {
        match c.next().await.unwrap() {
            Msg::Frame(Frame::Heartbeat { heads, ts }) => {
                assert!(ts > 1_700_000_000_000);
                assert_eq!(heads, [("acme".to_string(), 3), ("beta".to_string(), 0)]);
                break;
            }
            Msg::Frame(Frame::Subscribed { .. } | Frame::Presence { .. }) => {}
            other => panic!("unexpected {other:?}"),
        }
    }
    loop {
        if let Msg::Json(v) = j.next().await.unwrap() {
            if v["t"] == "heartbeat" {
                assert_eq!(v["heads"], json!({"acme": 3}));
                break;
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_shutdown_closes_sessions_with_4503() {
    let mut s = TestServer::start().await;
    let mut c = s.client(&["acme"], "").await;
    let mut j = s.client(&["acme"], "format=json").await;
    subscribed(&mut c).await;
    j.next_non_heartbeat().await.unwrap();
    s.begin_stop();
    assert_eq!(c.expect_close().await.unwrap().0, 4503);
    assert_eq!(j.expect_close().await.unwrap().0, 4503);
    s.join().await.unwrap();
}
