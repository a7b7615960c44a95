//! Chat (PROTOCOL.md section 8) on both transports: messages are org events in one order,
//! acknowledged with their seq, deduplicated by (sender, client id), scoped by `chat`.

mod support;

use edgestream_codec::Frame;
use edgestream_testkit::ws::{Msg, WsClient};
use serde_json::{json, Value};
use support::TestServer;

use support::{acme_room as room_frame, subscribed};

/// A binary WebSocket client of acme with this token, past its SUBSCRIBED.
async fn ws_user(s: &TestServer, token: &str) -> WsClient {
    let mut c = WsClient::connect(&s.ws_url(&format!("access_token={token}&orgs=acme")))
        .await
        .unwrap();
    subscribed(&mut c).await;
    c
}

fn chat(org: &str, room: &str, id: &str, body: Value) -> Frame {
    Frame::Chat {
        org: org.into(),
        room: room.into(),
        id: id.into(),
        body: serde_json::to_vec(&body).unwrap().into(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_users_on_two_transports_see_one_order_and_retries_append_once() {
    let s = TestServer::start().await;
    let ws_tok = s.token_for("ann", &["acme"], "subscribe chat");
    let wt_tok = s.token_for("bob", &["acme"], "subscribe chat");
    let mut ann = ws_user(&s, &ws_tok).await;
    let mut bob = edgestream_testkit::wt::connect(
        &s.wt_url(&format!("access_token={wt_tok}&orgs=acme")),
        &s.cert_hash().await,
    )
    .await
    .unwrap();
    assert!(matches!(
        bob.next_frame().await.unwrap(),
        Frame::Subscribed { .. }
    ));

    ann.send_frame(&chat("acme", "lobby", "a-1", json!({"text": "hi bob"})))
        .await
        .unwrap();
    let ack_a = match ann.next_non_heartbeat().await.unwrap() {
        Msg::Frame(Frame::ChatAck { id, seq }) => {
            assert_eq!(id, "a-1");
            seq
        }
        // The event may arrive before the ack.
        Msg::Frame(Frame::Event { seq, .. }) => match ann.next_non_heartbeat().await.unwrap() {
            Msg::Frame(Frame::ChatAck { seq: s2, .. }) => {
                assert_eq!(s2, seq);
                s2
            }
            other => panic!("{other:?}"),
        },
        other => panic!("{other:?}"),
    };
    bob.send_control(&chat("acme", "lobby", "b-1", json!({"text": "hi ann"})))
        .await
        .unwrap();
    assert!(matches!(
        bob.next_control().await.unwrap(),
        Frame::ChatAck { ref id, seq } if id == "b-1" && seq == ack_a + 1
    ));
    // A retry of ann's message (lost ack) appends nothing and gets the first seq.
    ann.send_frame(&chat("acme", "lobby", "a-1", json!({"text": "hi bob"})))
        .await
        .unwrap();
    bob.send_control(&chat("acme", "lobby", "b-2", json!({"text": "bye"})))
        .await
        .unwrap();
    assert!(matches!(
        bob.next_control().await.unwrap(),
        Frame::ChatAck { seq, .. } if seq == ack_a + 2
    ));
    // Both see the same three messages in one order, with sender and room.
    let bob_events = bob.events(3).await.unwrap();
    let mut ann_events = Vec::new();
    let mut acks = Vec::new();
    while ann_events.len() < 3 || acks.is_empty() {
        match ann.next_non_heartbeat().await.unwrap() {
            Msg::Frame(Frame::Event { seq, payload, .. }) => ann_events.push((seq, payload)),
            Msg::Frame(Frame::ChatAck { id, seq }) => acks.push((id, seq)),
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(
        acks.last().unwrap(),
        &("a-1".to_string(), ack_a),
        "the retry's ack"
    );
    let seen: Vec<(u64, Value)> = ann_events
        .iter()
        .map(|(s, p)| (*s, serde_json::from_slice(p).unwrap()))
        .collect();
    assert_eq!(
        bob_events.iter().map(|e| e.seq).collect::<Vec<_>>(),
        seen.iter().map(|(s, _)| *s).collect::<Vec<_>>()
    );
    let who: Vec<(&str, &str)> = seen
        .iter()
        .map(|(_, v)| (v["from"].as_str().unwrap(), v["id"].as_str().unwrap()))
        .collect();
    assert_eq!(who, [("ann", "a-1"), ("bob", "b-1"), ("bob", "b-2")]);
    assert_eq!(seen[0].1["type"], "chat.message");
    assert_eq!(seen[0].1["room"], "lobby");
    assert_eq!(seen[0].1["body"], json!({"text": "hi bob"}));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chat_in_json_and_refusals_keep_the_session() {
    let s = TestServer::start().await;
    let tok = s.token_for("ann", &["acme"], "subscribe chat");
    let mut c = WsClient::connect(&s.ws_url(&format!("access_token={tok}&orgs=acme&format=json")))
        .await
        .unwrap();
    subscribed(&mut c).await;
    let msg = json!({"t":"chat","org":"acme","room":"r1","id":"x","body":[1,2]});
    c.send_text(&msg.to_string()).await.unwrap();
    let mut got_ack = false;
    for _ in 0..2 {
        match c.next_non_heartbeat().await.unwrap() {
            Msg::Json(v) if v["t"] == "chat_ack" => {
                assert_eq!((v["id"].as_str(), v["seq"].as_u64()), (Some("x"), Some(1)));
                got_ack = true;
            }
            Msg::Json(v) if v["t"] == "event" => assert_eq!(v["data"]["body"], json!([1, 2])),
            other => panic!("{other:?}"),
        }
    }
    assert!(got_ack);
    // Refusals are ERROR messages; the session stays.
    for (msg, code) in [
        (
            json!({"t":"chat","org":"other","room":"r1","id":"y","body":1}),
            4003,
        ),
        (
            json!({"t":"chat","org":"acme","room":"bad room","id":"y","body":1}),
            4400,
        ),
        (
            json!({"t":"chat","org":"acme","room":"r1","id":"","body":1}),
            4400,
        ),
        (
            json!({"t":"chat","org":"acme","room":"r1","id":"z".repeat(65),"body":1}),
            4400,
        ),
    ] {
        c.send_text(&msg.to_string()).await.unwrap();
        match c.next_non_heartbeat().await.unwrap() {
            Msg::Json(v) if v["t"] == "error" => assert_eq!(v["code"], code, "{msg}: {v}"),
            other => panic!("{msg}: {other:?}"),
        }
    }
    // Without the chat (or publish) scope.
    let reader = s.token_for("eve", &["acme"], "subscribe");
    let mut r = ws_user(&s, &reader).await;
    r.send_frame(&chat("acme", "r1", "e-1", json!("hi")))
        .await
        .unwrap();
    match r.next_non_heartbeat().await.unwrap() {
        Msg::Frame(Frame::Error { code, .. }) => assert_eq!(code, 4003),
        other => panic!("{other:?}"),
    }
    // A body that is not JSON (binary format).
    r.send_frame(&Frame::Chat {
        org: "acme".into(),
        room: "r1".into(),
        id: "e-2".into(),
        body: bytes::Bytes::from_static(b"{nope"),
    })
    .await
    .unwrap();
    match r.next_non_heartbeat().await.unwrap() {
        Msg::Frame(Frame::Error { code, .. }) => assert_eq!(code, 4400),
        other => panic!("{other:?}"),
    }
    let (_, h) = s
        .api
        .get("/v1/orgs/acme/events?limit=10", Some(&tok))
        .await
        .unwrap();
    assert_eq!(h["head"], 1, "only the valid message was appended: {h}");
}

/// ann (WebSocket at `ws_url`) and bob (WebTransport at `wt_url`) subscribe to acme and join
/// its lobby, on one node or two (`api`: where to watch the room). Presence frames are
/// tests/presence.rs's subject; here the room's HTTP view says when both are in.
async fn ann_and_bob_join_the_lobby(
    ws_url: &str,
    wt_url: &str,
    cert_hash: &str,
    api: &edgestream_testkit::http::Api,
    token: &str,
) -> (WsClient, edgestream_testkit::wt::WtClient) {
    let mut ann = WsClient::connect(ws_url).await.unwrap();
    subscribed(&mut ann).await;
    let mut bob = edgestream_testkit::wt::connect(wt_url, cert_hash)
        .await
        .unwrap();
    assert!(matches!(
        bob.next_frame().await.unwrap(),
        Frame::Subscribed { .. }
    ));
    bob.send_control(&room_frame(true, "lobby")).await.unwrap();
    ann.send_frame(&room_frame(true, "lobby")).await.unwrap();
    poll_json(api, "/v1/orgs/acme/rooms/lobby", token, |v| {
        v["members"] == json!(["ann", "bob"])
    })
    .await;
    (ann, bob)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn presence_in_orgs_and_rooms_across_transports() {
    let s = TestServer::start().await;
    let ann_tok = s.token_for("ann", &["acme"], "subscribe chat");
    let bob_tok = s.token_for("bob", &["acme"], "subscribe chat");
    let (mut ann, bob) = ann_and_bob_join_the_lobby(
        &s.ws_url(&format!("access_token={ann_tok}&orgs=acme")),
        &s.wt_url(&format!("access_token={bob_tok}&orgs=acme")),
        &s.cert_hash().await,
        &s.api,
        &ann_tok,
    )
    .await;

    // The HTTP views and the metrics.
    ann.send_frame(&chat("acme", "lobby", "m-1", json!("hello")))
        .await
        .unwrap();
    let (_, v) = s
        .api
        .get("/v1/orgs/acme/presence", Some(&ann_tok))
        .await
        .unwrap();
    assert_eq!(v["online"], 2, "{v}");
    assert_eq!(v["users"][0], json!({"sub": "ann", "sessions": 1}));
    let room = support::eventually("the room counts the message", || async {
        let (status, r) = s
            .api
            .get("/v1/orgs/acme/rooms/lobby", Some(&bob_tok))
            .await
            .unwrap();
        assert_eq!(status, 200);
        (r["messages"] == 1).then_some(r)
    })
    .await;
    assert_eq!(room["online"], 2, "{room}");
    assert_eq!(room["members"], json!(["ann", "bob"]));
    assert_eq!(room["messages"], 1);
    assert!(room["last_message_ts"].as_u64().unwrap() > 0);
    let m = s.metrics().await;
    assert_eq!(m["presence"], json!({"rooms": 1, "users": 2}), "{m}");
    let other = s.token_for("eve", &["other"], "subscribe");
    let (status, _) = s
        .api
        .get("/v1/orgs/acme/presence", Some(&other))
        .await
        .unwrap();
    assert_eq!(status, 403);

    // bob's session ends without a LEAVE: he leaves the room and the org.
    bob.close(0);
    drop(bob);
    poll_json(&s.api, "/v1/orgs/acme/rooms/lobby", &ann_tok, |v| {
        v["members"] == json!(["ann"])
    })
    .await;
    poll_json(&s.api, "/v1/orgs/acme/presence", &ann_tok, |v| {
        v["online"] == 1
    })
    .await;
    // LEAVE.
    ann.send_frame(&room_frame(false, "lobby")).await.unwrap();
    poll_json(&s.api, "/v1/orgs/acme/rooms/lobby", &ann_tok, |v| {
        v["online"] == 0
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vanished_browser_leaves_its_room_at_the_idle_timeout() {
    let s = TestServer::start_with(|a| a.quic_idle_timeout = Some("1s".parse().unwrap())).await;
    let ann_tok = s.token_for("ann", &["acme"], "subscribe chat");
    let bob_tok = s.token_for("bob", &["acme"], "subscribe chat");
    let _ann = ws_user(&s, &ann_tok).await;
    // bob on WebTransport through a relay that can drop everything.
    let relay = support::relay::Relay::start(s.quic_addr).await;
    let url = format!(
        "https://127.0.0.1:{}/v1/stream?access_token={bob_tok}&orgs=acme",
        relay.addr.port()
    );
    let mut bob = edgestream_testkit::wt::connect(&url, &s.cert_hash().await)
        .await
        .unwrap();
    assert!(matches!(
        bob.next_frame().await.unwrap(),
        Frame::Subscribed { .. }
    ));
    bob.send_control(&room_frame(true, "lobby")).await.unwrap();
    poll_json(&s.api, "/v1/orgs/acme/rooms/lobby", &ann_tok, |v| {
        v["members"] == json!(["bob"])
    })
    .await;
    poll_json(&s.api, "/v1/orgs/acme/presence", &ann_tok, |v| {
        v["online"] == 2
    })
    .await;
    relay.blackhole(true); // the browser vanishes: no close, no packets
    poll_json(&s.api, "/v1/orgs/acme/rooms/lobby", &ann_tok, |v| {
        v["online"] == 0
    })
    .await;
    poll_json(&s.api, "/v1/orgs/acme/presence", &ann_tok, |v| {
        v["online"] == 1
    })
    .await;
}

/// Waits (bounded) until `GET path` on `api` satisfies `done`; returns the last answer.
async fn poll_json(
    api: &edgestream_testkit::http::Api,
    path: &str,
    token: &str,
    done: impl Fn(&Value) -> bool,
) -> Value {
    // (Before, this returned the last answer when time ran out, and the caller's assertion
    // reported that instead of the wait.)
    support::eventually(path, || async {
        let (status, v) = api.get(path, Some(token)).await.unwrap();
        assert_eq!(status, 200, "{path}: {v}");
        done(&v).then_some(v)
    })
    .await
}

/// Redis mode: ann on node A (WebSocket) and bob on node B (WebTransport, a real process)
/// share one chat order and one presence view; when B is SIGKILLed its users leave on A
/// within the presence ttl; a Redis that lost the presence keys is repaired by the next
/// registry refresh.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn users_on_two_nodes_share_order_and_presence_and_a_dead_nodes_users_leave() {
    let redis = support::redis::RedisServer::start();
    let url = redis.url();
    let a = {
        let url = url.clone();
        TestServer::start_with(move |a| {
            a.redis = Some(url);
            a.presence_ttl = Some("1s".parse().unwrap());
        })
        .await
    };
    let mut b = support::node::Node::spawn(&["--redis", &url, "--presence-ttl", "1s"]).await;
    let ann_tok = a.token_for("ann", &["acme"], "subscribe chat");
    let bob_tok = a.token_for("bob", &["acme"], "subscribe chat");

    let (mut ann, mut bob) = ann_and_bob_join_the_lobby(
        &a.ws_url(&format!("access_token={ann_tok}&orgs=acme")),
        &format!(
            "https://{}/v1/stream?access_token={bob_tok}&orgs=acme",
            b.quic
        ),
        &b.cert_hash().await,
        &a.api,
        &ann_tok,
    )
    .await;

    // Messages from both nodes, one order for both.
    ann.send_frame(&chat("acme", "lobby", "a-1", json!("hi bob")))
        .await
        .unwrap();
    bob.send_control(&chat("acme", "lobby", "b-1", json!("hi ann")))
        .await
        .unwrap();
    assert!(matches!(
        bob.next_control().await.unwrap(),
        Frame::ChatAck { ref id, .. } if id == "b-1"
    ));
    let bob_saw: Vec<(u64, String)> = bob
        .events(2)
        .await
        .unwrap()
        .iter()
        .map(|e| {
            let v: Value = serde_json::from_slice(&e.payload).unwrap();
            (e.seq, v["id"].as_str().unwrap().to_string())
        })
        .collect();
    let mut ann_saw = Vec::new();
    while ann_saw.len() < 2 {
        match ann.next().await.unwrap() {
            Msg::Frame(Frame::Event { seq, payload, .. }) => {
                let v: Value = serde_json::from_slice(&payload).unwrap();
                ann_saw.push((seq, v["id"].as_str().unwrap().to_string()));
            }
            Msg::Frame(Frame::ChatAck { .. } | Frame::Heartbeat { .. }) => {}
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(ann_saw, bob_saw);
    let mut ids: Vec<&str> = ann_saw.iter().map(|(_, id)| id.as_str()).collect();
    ids.sort();
    assert_eq!(ids, ["a-1", "b-1"]);

    // The HTTP views of either node are the combined ones.
    for api in [&a.api, &b.api] {
        let v = poll_json(api, "/v1/orgs/acme/rooms/lobby", &ann_tok, |v| {
            v["messages"] == 2
        })
        .await;
        assert_eq!(v["members"], json!(["ann", "bob"]), "{v}");
        assert_eq!(v["messages"], 2, "{v}");
        let (_, v) = api
            .get("/v1/orgs/acme/presence", Some(&bob_tok))
            .await
            .unwrap();
        let mut users: Vec<Value> = v["users"].as_array().unwrap().clone();
        users.sort_by_key(|u| u["sub"].as_str().unwrap().to_string());
        assert_eq!(
            users,
            [
                json!({"sub": "ann", "sessions": 1}),
                json!({"sub": "bob", "sessions": 1})
            ]
        );
    }

    // Node B dies without a word: its users leave on A once its entries expire.
    b.kill().await;
    poll_json(&a.api, "/v1/orgs/acme/rooms/lobby", &ann_tok, |v| {
        v["members"] == json!(["ann"])
    })
    .await;
    poll_json(&a.api, "/v1/orgs/acme/presence", &ann_tok, |v| {
        v["online"] == 1
    })
    .await;

    // Redis loses the presence keys (the node registry with them, as in a restart): A's next
    // refresh finds itself unknown and syncs every org, which puts ann back.
    redis.cli(&[
        "EVAL",
        "for _, k in ipairs(redis.call('KEYS', 'es:{acme}:p*')) do redis.call('DEL', k) end \
         redis.call('DEL', 'es:presence:nodes')",
        "0",
    ]);
    let v = poll_json(&a.api, "/v1/orgs/acme/rooms/lobby", &ann_tok, |v| {
        v["online"] == 1
    })
    .await;
    assert_eq!(v["members"], json!(["ann"]), "{v}");
}
