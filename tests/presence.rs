//! Presence (PROTOCOL.md 1.1, section 8) end to end: opt-in, snapshots then batches, rooms heard
//! while joined, coalescing, counts above the member limit, member paging, and the same batches
//! in the same order on two nodes sharing Redis.
//!
//! Each client keeps a [`View`] (its snapshot with the batches applied, as the browser client
//! does) and tests wait for views to reach a state: how changes fall into batches depends on
//! timing, except where a test measures it (coalescing) or the unit tests do on virtual time
//! (`src/presence/tests.rs`).

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use edgestream_codec::Frame;
use edgestream_testkit::ws::{Msg, WsClient};
use edgestream_testkit::wt::{StreamItem, WtClient};
use serde_json::{json, Value};
use support::TestServer;

/// One PRESENCE frame: (room, online, changes).
type Batch = (String, u64, Vec<(String, bool)>);

/// A client's presence as its frames tell it: per room, `online` and the members listed.
#[derive(Default, Debug)]
struct View {
    frames: Vec<Batch>,
    rooms: BTreeMap<String, (u64, BTreeSet<String>)>,
}

impl View {
    /// A frame with no changes is a count (above the member limit) or an empty group: the
    /// list is unknown or empty either way.
    fn apply(&mut self, b: Batch) {
        let (online, members) = self.rooms.entry(b.0.clone()).or_default();
        *online = b.1;
        if b.2.is_empty() {
            members.clear();
        }
        for (u, joined) in &b.2 {
            if *joined {
                members.insert(u.clone());
            } else {
                members.remove(u);
            }
        }
        self.frames.push(b);
    }

    fn is(&self, room: &str, users: &[&str]) -> bool {
        let want: BTreeSet<String> = users.iter().map(|u| u.to_string()).collect();
        self.rooms
            .get(room)
            .is_some_and(|(online, m)| *m == want && *online == want.len() as u64)
    }
}

fn batch_of(f: Frame) -> Option<Batch> {
    match f {
        Frame::Presence {
            room,
            online,
            changes,
            ..
        } => Some((room, online, changes)),
        _ => None,
    }
}

/// A client that receives PRESENCE frames.
trait Hears {
    /// The next PRESENCE, everything else skipped.
    async fn batch(&mut self) -> Batch;
}

impl Hears for WsClient {
    async fn batch(&mut self) -> Batch {
        loop {
            match self.next().await.expect("the socket is open") {
                Msg::Frame(f) => {
                    if let Some(b) = batch_of(f) {
                        return b;
                    }
                }
                Msg::Json(v) if v["t"] == "presence" => {
                    let changes = v["changes"]
                        .as_array()
                        .unwrap()
                        .iter()
                        .map(|c| (c["user"].as_str().unwrap().to_string(), c["joined"] == true))
                        .collect();
                    return (
                        v["room"].as_str().unwrap().to_string(),
                        v["online"].as_u64().unwrap(),
                        changes,
                    );
                }
                _ => {}
            }
        }
    }
}

impl Hears for WtClient {
    /// On any org stream of the session.
    async fn batch(&mut self) -> Batch {
        loop {
            match self.next_any_item().await.expect("the session is open") {
                StreamItem::Frame { frame, .. } => {
                    if let Some(b) = batch_of(frame) {
                        return b;
                    }
                }
                other => panic!("{other:?}"),
            }
        }
    }
}

/// Reads PRESENCE frames into `v` until `room` lists exactly `users` (bounded).
async fn until(c: &mut impl Hears, v: &mut View, room: &str, users: &[&str]) {
    let reach = async {
        while !v.is(room, users) {
            v.apply(c.batch().await);
        }
    };
    if tokio::time::timeout(support::HANG_GUARD, reach)
        .await
        .is_err()
    {
        panic!("presence of {room:?} never became {users:?}: {v:?}");
    }
}

/// A WebSocket client, past SUBSCRIBED.
async fn ws_user(url: &str) -> WsClient {
    let mut c = WsClient::connect(url).await.unwrap();
    support::subscribed(&mut c).await;
    c
}

use support::acme_room as room;

/// Publishes one event to acme and reads `c` up to it: returns the PRESENCE frames before it.
async fn presence_before_marker(s: &TestServer, c: &mut WsClient) -> Vec<Batch> {
    let publisher = s.token_for("pub", &["acme"], "publish");
    s.api
        .publish(&publisher, "acme", &json!({"marker": true}))
        .await
        .expect("publish");
    let mut seen = Vec::new();
    loop {
        // `next`, not `next_non_heartbeat`, which skips PRESENCE.
        match c.next().await.unwrap() {
            Msg::Frame(Frame::Event { payload, .. })
                if serde_json::from_slice::<Value>(&payload).unwrap()["marker"] == true =>
            {
                return seen
            }
            Msg::Frame(f) => seen.extend(batch_of(f)),
            Msg::Json(v) if v["t"] == "presence" => seen.push((String::new(), 0, vec![])),
            Msg::Close(code, reason) => panic!("closed: {code:?} {reason}"),
            Msg::Json(_) => {}
        }
    }
}

/// ann (WebSocket, JSON) and bob (WebTransport) opt in; cat does not. Snapshots first, then
/// batches; a room is heard by its members only, while joined; cat hears nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn presence_is_opt_in_and_rooms_are_heard_while_joined() {
    let s = TestServer::start().await;
    let tok = |u: &str| s.token_for(u, &["acme"], "subscribe chat");
    let mut cat = ws_user(&s.ws_url(&format!("access_token={}&orgs=acme", tok("cat")))).await;
    let mut ann = ws_user(&s.ws_url(&format!(
        "access_token={}&orgs=acme&presence=1&format=json",
        tok("ann")
    )))
    .await;
    let mut av = View::default();
    // The first PRESENCE is the snapshot: cat and ann (or cat alone, ann following in a batch).
    let first = ann.batch().await;
    assert_eq!(first.0, "");
    assert!(
        first.2.iter().all(|(_, j)| *j),
        "a snapshot lists joins: {first:?}"
    );
    av.apply(first);
    until(&mut ann, &mut av, "", &["ann", "cat"]).await;

    let mut bob = edgestream_testkit::wt::connect(
        &s.wt_url(&format!("access_token={}&orgs=acme&presence=1", tok("bob"))),
        &s.cert_hash().await,
    )
    .await
    .unwrap();
    let mut bv = View::default();
    until(&mut bob, &mut bv, "", &["ann", "bob", "cat"]).await;
    until(&mut ann, &mut av, "", &["ann", "bob", "cat"]).await;

    // bob joins the lobby: its snapshot comes on his org stream; ann, not in it, hears nothing
    // of it.
    bob.send_control(&room(true, "lobby")).await.unwrap();
    until(&mut bob, &mut bv, "lobby", &["bob"]).await;
    ann.send_text(&json!({"t": "join", "org": "acme", "room": "lobby"}).to_string())
        .await
        .unwrap();
    until(&mut ann, &mut av, "lobby", &["ann", "bob"]).await;
    until(&mut bob, &mut bv, "lobby", &["ann", "bob"]).await;
    // ann's first lobby frame is her snapshot: she heard nothing of the room before joining.
    let lobby = |v: &View| -> Vec<Batch> {
        v.frames
            .iter()
            .filter(|b| b.0 == "lobby")
            .cloned()
            .collect()
    };
    assert_eq!(
        lobby(&av)[0],
        (
            "lobby".to_string(),
            2,
            vec![("ann".to_string(), true), ("bob".to_string(), true)]
        )
    );

    // ann leaves the lobby: bob hears it; ann hears the lobby no more.
    ann.send_text(&json!({"t": "leave", "org": "acme", "room": "lobby"}).to_string())
        .await
        .unwrap();
    until(&mut bob, &mut bv, "lobby", &["bob"]).await;
    // bob's session ends without a LEAVE: he leaves the room and the org.
    bob.close(0);
    drop(bob);
    until(&mut ann, &mut av, "", &["ann", "cat"]).await;
    assert!(
        !lobby(&av)
            .iter()
            .any(|b| b.2.contains(&("bob".to_string(), false))),
        "ann heard the lobby after leaving it: {:?}",
        lobby(&av)
    );

    // cat, without presence=1, got no PRESENCE at all (the marker event is queued after every
    // batch ann has read).
    assert_eq!(presence_before_marker(&s, &mut cat).await, vec![]);
}

/// With a long interval: a user who comes and goes inside it is absent from the batch, and
/// 100 users connecting inside it arrive as one batch.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_storm_inside_one_interval_is_one_batch_without_the_users_who_came_and_went() {
    let interval = Duration::from_secs(8);
    let s = TestServer::start_with(|a| a.presence_interval = Some("8s".parse().unwrap())).await;
    let tok = |u: &str| s.token_for(u, &["acme"], "subscribe");
    let url = |u: &str, extra: &str| s.ws_url(&format!("access_token={}&orgs=acme{extra}", tok(u)));
    let mut obs = ws_user(&url("obs", "&presence=1")).await;
    // The snapshot starts the interval (the org's first flush goes at once).
    let snapshot = obs.batch().await;
    let start = Instant::now();
    assert_eq!(
        snapshot,
        (String::new(), 1, vec![("obs".to_string(), true)])
    );
    let flicker = ws_user(&url("flicker", "")).await;
    drop(flicker);
    let mut connecting = tokio::task::JoinSet::new();
    for i in 0..100 {
        let u = url(&format!("u{i:03}"), "");
        connecting.spawn(async move { ws_user(&u).await });
    }
    let users = connecting.join_all().await;
    let storm = start.elapsed();
    let mut v = View::default();
    v.apply(snapshot);
    let names: Vec<String> = (0..100).map(|i| format!("u{i:03}")).collect();
    let mut all: Vec<&str> = names.iter().map(String::as_str).collect();
    all.push("obs");
    until(&mut obs, &mut v, "", &all).await;
    let batches = &v.frames[1..];
    if storm < interval {
        assert_eq!(batches.len(), 1, "one batch: {batches:?}");
        assert_eq!(batches[0].1, 101);
        assert_eq!(batches[0].2.len(), 100);
        assert!(batches[0].2.iter().all(|(u, j)| *j && u != "flicker"));
    } else {
        // A machine too loaded to connect 100 clients in 8 s: still at most one batch per
        // interval the storm took, plus one.
        let most = storm.as_secs_f64() / interval.as_secs_f64() + 2.0;
        assert!(
            (batches.len() as f64) <= most,
            "{} batches in {storm:?}",
            batches.len()
        );
    }
    drop(users);
}

/// Above the member limit, frames carry `online` only; the HTTP routes page the members.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn above_the_member_limit_only_counts_travel_and_http_pages_the_members() {
    let s = TestServer::start_with(|a| {
        a.presence_max_members = Some(3);
        a.presence_interval = Some("100ms".parse().unwrap());
    })
    .await;
    let tok = |u: &str| s.token_for(u, &["acme"], "subscribe chat");
    let mut obs =
        ws_user(&s.ws_url(&format!("access_token={}&orgs=acme&presence=1", tok("obs")))).await;
    let mut v = View::default();
    until(&mut obs, &mut v, "", &["obs"]).await;
    let mut others = Vec::new();
    for u in ["a", "b", "c", "d"] {
        others.push(ws_user(&s.ws_url(&format!("access_token={}&orgs=acme", tok(u)))).await);
    }
    // Until the count reaches 5: every frame above the limit lists nobody.
    let reach = async {
        loop {
            let b = obs.batch().await;
            if b.1 > 3 {
                assert!(b.2.is_empty(), "above the limit only the count: {b:?}");
            }
            if b.1 == 5 {
                return;
            }
        }
    };
    tokio::time::timeout(support::HANG_GUARD, reach)
        .await
        .unwrap();
    // A newcomer's snapshot is the count too.
    let mut late = WsClient::connect(&s.ws_url(&format!(
        "access_token={}&orgs=acme&presence=1&format=json",
        tok("late")
    )))
    .await
    .unwrap();
    let snap = late.batch().await;
    assert!(snap.1 > 3 && snap.2.is_empty(), "{snap:?}");

    // Pages of 2, in sub order, on both routes.
    let mut subs = Vec::new();
    let mut after = String::new();
    loop {
        let path = format!("/v1/orgs/acme/presence?limit=2{after}");
        let (status, p) = s.api.get(&path, Some(&tok("obs"))).await.unwrap();
        assert_eq!(status, 200, "{p}");
        assert_eq!(p["online"], 6, "{p}");
        let users = p["users"].as_array().unwrap();
        assert!(users.len() <= 2);
        subs.extend(users.iter().map(|u| u["sub"].as_str().unwrap().to_string()));
        match p["next"].as_str() {
            Some(n) => after = format!("&after={n}"),
            None => break,
        }
    }
    assert_eq!(subs, ["a", "b", "c", "d", "late", "obs"]);
    let (status, e) = s
        .api
        .get("/v1/orgs/acme/presence?limit=0", Some(&tok("obs")))
        .await
        .unwrap();
    assert_eq!(status, 400, "{e}");
    // Back to the limit: the next frame lists everyone again.
    others.truncate(1);
    drop(late);
    let reach = async {
        loop {
            let b = obs.batch().await;
            if b.1 <= 3 {
                return b;
            }
        }
    };
    let b = tokio::time::timeout(support::HANG_GUARD, reach)
        .await
        .unwrap();
    let listed: BTreeSet<&str> = b.2.iter().map(|(u, _)| u.as_str()).collect();
    assert!(b.2.iter().all(|(_, j)| *j), "{b:?}");
    if b.1 == 2 {
        assert_eq!(listed, BTreeSet::from(["a", "obs"]));
    }
    // The room route pages as well.
    obs.send_frame(&room(true, "lobby")).await.unwrap();
    others[0].send_frame(&room(true, "lobby")).await.unwrap();
    let r = support::eventually("both in the lobby", || async {
        let (_, r) = s
            .api
            .get("/v1/orgs/acme/rooms/lobby?limit=1", Some(&tok("obs")))
            .await
            .unwrap();
        (r["online"] == 2).then_some(r)
    })
    .await;
    assert_eq!(r["members"], json!(["a"]));
    assert_eq!(r["next"], "a");
}

/// Two nodes on Redis, users on both: each node's observer gets the same batches in the same
/// order; a dead node's users leave within the presence ttl.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_nodes_send_the_same_batches_in_the_same_order_and_a_dead_nodes_users_leave() {
    let redis = support::redis::RedisServer::start();
    let url = redis.url();
    let a = {
        let url = url.clone();
        TestServer::start_with(move |a| {
            a.redis = Some(url);
            a.presence_ttl = Some("1s".parse().unwrap());
            a.presence_interval = Some("200ms".parse().unwrap());
        })
        .await
    };
    let mut b = support::node::Node::spawn(&[
        "--redis",
        &url,
        "--presence-ttl",
        "1s",
        "--presence-interval",
        "200ms",
    ])
    .await;
    let tok = |u: &str| a.token_for(u, &["acme"], "subscribe chat");
    let a_url =
        |u: &str, extra: &str| a.ws_url(&format!("access_token={}&orgs=acme{extra}", tok(u)));
    let b_url = |u: &str, extra: &str| {
        format!(
            "ws://{}/v1/stream?access_token={}&orgs=acme{extra}",
            b.http,
            tok(u)
        )
    };
    let mut oa = ws_user(&a_url("oa", "&presence=1")).await;
    let mut va = View::default();
    until(&mut oa, &mut va, "", &["oa"]).await;
    let mut ob = ws_user(&b_url("ob", "&presence=1")).await;
    let mut vb = View::default();
    until(&mut ob, &mut vb, "", &["oa", "ob"]).await;
    until(&mut oa, &mut va, "", &["oa", "ob"]).await;
    let (a_mark, b_mark) = (va.frames.len(), vb.frames.len());

    // Users on both nodes, in waves, joining a room too.
    let mut users = Vec::new();
    let mut names = vec!["oa".to_string(), "ob".to_string()];
    for wave in 0..4 {
        for i in 0..5 {
            let name = format!("w{wave}u{i}");
            let mut c = if i % 2 == 0 {
                ws_user(&a_url(&name, "")).await
            } else {
                ws_user(&b_url(&name, "")).await
            };
            if i == 0 {
                c.send_frame(&room(true, "lobby")).await.unwrap();
            }
            users.push((name.clone(), c));
            names.push(name);
        }
        if wave == 2 {
            // Some leave again.
            users.truncate(users.len() - 2);
            names.truncate(names.len() - 2);
        }
    }
    let all: Vec<&str> = names.iter().map(String::as_str).collect();
    until(&mut oa, &mut va, "", &all).await;
    until(&mut ob, &mut vb, "", &all).await;
    // Everything after both observers were listening: the same frames in the same order.
    let tail_a = &va.frames[a_mark..];
    let tail_b = &vb.frames[b_mark..];
    assert!(!tail_a.is_empty());
    assert_eq!(tail_a, tail_b, "node A and node B told different stories");

    // A session that JOINs the lobby without subscribing to acme hears the room on its socket
    // (on Redis, its node follows acme's signal stream for it meanwhile).
    let side_tok = a.token_for("side", &["acme", "side"], "subscribe chat");
    let mut side = ws_user(&format!(
        "ws://{}/v1/stream?access_token={side_tok}&orgs=side",
        b.http
    ))
    .await;
    side.send_frame(&room(true, "lobby")).await.unwrap();
    let mut vs = View::default();
    until(
        &mut side,
        &mut vs,
        "lobby",
        &["side", "w0u0", "w1u0", "w2u0", "w3u0"],
    )
    .await;
    assert!(vs.frames.iter().all(|f| f.0 == "lobby"), "{vs:?}");
    drop(side);

    // Node B dies: its users (ob and the odd ones) leave on A within the presence ttl.
    b.kill().await;
    let on_a: Vec<&str> = all
        .iter()
        .copied()
        .filter(|u| *u == "oa" || u.ends_with('0') || u.ends_with('2') || u.ends_with('4'))
        .collect();
    until(&mut oa, &mut va, "", &on_a).await;
}

/// `presence` takes 1/true or 0/false; anything else is a bad request (4400, after the upgrade).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_presence_parameter_closes_with_4400() {
    let s = TestServer::start().await;
    let t = s.token_for("ann", &["acme"], "subscribe");
    let mut c = WsClient::connect(&s.ws_url(&format!("access_token={t}&orgs=acme&presence=yes")))
        .await
        .unwrap();
    assert_eq!(
        c.expect_close_code().await.unwrap(),
        edgestream_codec::CloseCode::Protocol
    );
    for ok in ["1", "true", "0", "false"] {
        let mut c = ws_user(&s.ws_url(&format!("access_token={t}&orgs=acme&presence={ok}"))).await;
        c.send_frame(&Frame::Ping(bytes::Bytes::from_static(b"p")))
            .await
            .unwrap();
    }
}
