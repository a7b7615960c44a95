//! Several nodes on one real `redis-server` (started by each test on a free port): a shared
//! sequencer and replay log, resume across nodes, shared idempotency, retention, the pool per
//! node, and a Redis outage in the middle of a stream.

mod support;

use std::collections::BTreeSet;
use std::time::Duration;

use edgestream_codec::{Frame, Resume};
use edgestream_testkit::ws::{Msg, WsClient};
use serde_json::{json, Value};
use support::redis::RedisServer;
use support::{token_for, TestServer};

async fn node(redis: &RedisServer) -> TestServer {
    let url = redis.url();
    TestServer::start_with(move |a| a.redis = Some(url)).await
}

async fn subscribed(c: &mut WsClient) -> (String, u64, Resume) {
    match c.next_non_heartbeat().await.unwrap() {
        Msg::Frame(Frame::Subscribed {
            epoch,
            head,
            resume,
            ..
        }) => (epoch, head, resume),
        other => panic!("expected SUBSCRIBED, got {other:?}"),
    }
}

fn seqs(evs: &[edgestream_testkit::ws::Ev]) -> Vec<u64> {
    evs.iter().map(|e| e.seq).collect()
}

/// Publishes `{"i": n}` events to `acme` (Idempotency-Key `i<n>`, so a retry after 503/504
/// stores event n once) and keeps every acknowledged position, failing the test the moment one
/// (epoch, seq) is acknowledged for two different events.
struct Acks {
    tok: String,
    next: u64,
    acked: std::collections::HashMap<(String, u64), u64>,
}

impl Acks {
    fn new(tok: String) -> Self {
        Acks {
            tok,
            next: 0,
            acked: Default::default(),
        }
    }

    /// Publishes the next event through `api`; returns the status and answer.
    async fn publish(&mut self, api: &edgestream_testkit::http::Api) -> (u16, Value) {
        let i = self.next;
        let body = serde_json::to_vec(&json!({ "i": i })).unwrap();
        let key = format!("i{i}");
        let (st, r) = api
            .publish_raw(&self.tok, "acme", body, Some(&key))
            .await
            .unwrap();
        if st == 201 || st == 200 {
            self.next += 1;
            let key = (
                r["epoch"].as_str().unwrap().to_string(),
                r["first_seq"].as_u64().unwrap(),
            );
            if let Some(prev) = self.acked.insert(key.clone(), i) {
                panic!("{key:?} acknowledged for event {prev} and event {i}");
            }
        }
        (st, r)
    }

    /// Publishes the next event, which must be acknowledged (stored now, not a retry).
    async fn publish_ok(&mut self, api: &edgestream_testkit::http::Api) -> Value {
        let (st, r) = self.publish(api).await;
        assert_eq!(st, 201, "{r}");
        r
    }

    /// After a failover: publishes until one is acknowledged (503/504 while the cluster
    /// settles); returns its answer.
    async fn first_acknowledged(&mut self, api: &edgestream_testkit::http::Api) -> Value {
        let deadline = tokio::time::Instant::now() + support::HANG_GUARD;
        loop {
            let (st, r) = self.publish(api).await;
            match st {
                200 | 201 => return r,
                503 | 504 => tokio::time::sleep(Duration::from_millis(100)).await,
                other => panic!("publish answered {other}: {r}"),
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "never published again"
            );
        }
    }

    /// After the store lost events: publishes until one is acknowledged (503/504 while Redis
    /// comes back), which must be seq 1 of an epoch other than `lost`; returns that epoch.
    async fn first_in_a_new_epoch(
        &mut self,
        api: &edgestream_testkit::http::Api,
        lost: &str,
    ) -> String {
        let r = self.first_acknowledged(api).await;
        let e = r["epoch"].as_str().unwrap().to_string();
        assert_ne!(
            e, lost,
            "the epoch survived a loss of acknowledged events: {r}"
        );
        assert_eq!(r["first_seq"], 1, "{r}");
        e
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn published_on_one_node_delivered_in_order_on_the_other() {
    let redis = RedisServer::start();
    let (a, b) = (node(&redis).await, node(&redis).await);
    let tok = a.token(&["acme"]);
    let mut on_b = b.client(&["acme"], "orgs=acme").await;
    let (epoch_b, head, resume) = subscribed(&mut on_b).await;
    assert_eq!((head, resume), (0, Resume::New));
    let mut on_a = a.wt_client(&["acme"], "orgs=acme").await;
    match on_a.next_frame().await.unwrap() {
        Frame::Subscribed { epoch, .. } => assert_eq!(epoch, epoch_b, "one epoch for both"),
        other => panic!("expected SUBSCRIBED, got {other:?}"),
    }
    for batch in 0..20u64 {
        a.publish_numbered(&tok, "acme", batch * 10..batch * 10 + 10)
            .await;
    }
    let got = on_b.events(200).await.unwrap();
    assert_eq!(seqs(&got), (1..=200).collect::<Vec<_>>());
    for (i, e) in got.iter().enumerate() {
        assert_eq!(e.payload, format!(r#"{{"i":{i}}}"#).as_bytes());
    }
    let got_a = on_a.events(200).await.unwrap();
    assert_eq!(
        got_a.iter().map(|e| e.seq).collect::<Vec<_>>(),
        (1..=200).collect::<Vec<_>>()
    );
    // The pool: one upstream read on each node for its subscribers, reported as such.
    let m = b.metrics().await;
    assert_eq!(m["log_backend"], "redis");
    assert_eq!(m["orgs_subscribed"], 1, "{m}");
    drop(on_b);
    b.wait_metrics("org released on b", |m| m["orgs_subscribed"] == 0)
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_publishes_on_two_nodes_get_gap_free_seqs() {
    let redis = RedisServer::start();
    let (a, b) = (node(&redis).await, node(&redis).await);
    let tok = a.token(&["acme"]);
    let mut on_a = a.client(&["acme"], "orgs=acme").await;
    subscribed(&mut on_a).await;
    let mut tasks = Vec::new();
    for (p, api) in [a.api.clone(), b.api.clone(), a.api.clone(), b.api.clone()]
        .into_iter()
        .enumerate()
    {
        let tok = tok.clone();
        tasks.push(tokio::spawn(async move {
            let mut ranges = Vec::new();
            for n in 0..25 {
                let batch: Vec<Value> = (0..4).map(|i| json!({"p": p, "n": n, "i": i})).collect();
                let r = api
                    .publish(&tok, "acme", &Value::Array(batch))
                    .await
                    .unwrap();
                ranges.push((
                    r["first_seq"].as_u64().unwrap(),
                    r["last_seq"].as_u64().unwrap(),
                ));
            }
            ranges
        }));
    }
    let mut all = BTreeSet::new();
    for t in tasks {
        for (first, last) in t.await.unwrap() {
            assert_eq!(last - first, 3, "a batch gets consecutive seqs");
            for s in first..=last {
                assert!(all.insert(s), "seq {s} given twice");
            }
        }
    }
    assert_eq!(
        all.into_iter().collect::<Vec<_>>(),
        (1..=400).collect::<Vec<_>>()
    );
    let got = on_a.events(400).await.unwrap();
    assert_eq!(seqs(&got), (1..=400).collect::<Vec<_>>());
    // Each batch's four events are adjacent in the stream.
    for chunk in got.chunks(4) {
        let v: Vec<Value> = chunk
            .iter()
            .map(|e| serde_json::from_slice(&e.payload).unwrap())
            .collect();
        assert!(
            v.iter().all(|x| x["p"] == v[0]["p"] && x["n"] == v[0]["n"]),
            "{v:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_resumes_on_another_node_exactly() {
    let redis = RedisServer::start();
    let (a, b) = (node(&redis).await, node(&redis).await);
    let tok = a.token(&["acme"]);
    let mut c = a.client(&["acme"], "orgs=acme").await;
    let (epoch, _, _) = subscribed(&mut c).await;
    a.publish_numbered(&tok, "acme", 0..50).await;
    let first = c.events(50).await.unwrap();
    assert_eq!(first.last().unwrap().seq, 50);
    c.close().await;
    // Published while the client is away, on the other node.
    b.publish_numbered(&tok, "acme", 50..100).await;
    let mut c = b
        .client(&["acme"], &format!("orgs=acme&since=acme:{epoch}:50"))
        .await;
    let (_, head, resume) = subscribed(&mut c).await;
    assert_eq!((head, resume), (100, Resume::Recovered));
    b.publish_numbered(&tok, "acme", 100..110).await;
    let rest = c.events(60).await.unwrap();
    assert_eq!(seqs(&rest), (51..=110).collect::<Vec<_>>());
    assert_eq!(rest[0].payload, br#"{"i":50}"#.as_slice());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idempotency_keys_are_shared_by_the_nodes() {
    let redis = RedisServer::start();
    let (a, b) = (node(&redis).await, node(&redis).await);
    let tok = a.token(&["acme"]);
    let body = serde_json::to_vec(&json!([{"x": 1}, {"x": 2}])).unwrap();
    let (s1, r1) = a
        .api
        .publish_raw(&tok, "acme", body.clone(), Some("order-7"))
        .await
        .unwrap();
    let (s2, r2) = b
        .api
        .publish_raw(&tok, "acme", body, Some("order-7"))
        .await
        .unwrap();
    assert_eq!(s1, 201, "{r1}");
    assert_eq!(
        (r2["first_seq"].clone(), r2["last_seq"].clone()),
        (json!(1), json!(2))
    );
    assert_eq!(
        s2, 200,
        "a repeat is answered 200 with the first result: {r2}"
    );
    let (_, h) = b
        .api
        .get("/v1/orgs/acme/events?limit=10", Some(&tok))
        .await
        .unwrap();
    assert_eq!(h["head"], 2, "{h}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_by_count_evicts_and_an_evicted_position_resets() {
    let redis = RedisServer::start();
    let url = redis.url();
    let a = TestServer::start_with(move |x| {
        x.redis = Some(url);
        x.replay_max_events = Some(10);
    })
    .await;
    let tok = a.token(&["acme"]);
    let r = a.publish_numbered(&tok, "acme", 0..30).await;
    let epoch = r["epoch"].as_str().unwrap().to_string();
    let (_, h) = a
        .api
        .get("/v1/orgs/acme/events?limit=100", Some(&tok))
        .await
        .unwrap();
    let kept: Vec<u64> = h["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["seq"].as_u64().unwrap())
        .collect();
    assert_eq!(kept, (21..=30).collect::<Vec<_>>(), "{h}");
    let mut c = a
        .client(&["acme"], &format!("orgs=acme&since=acme:{epoch}:5"))
        .await;
    let (_, head, resume) = subscribed(&mut c).await;
    assert_eq!((head, resume), (30, Resume::Reset));
    let mut c = a
        .client(&["acme"], &format!("orgs=acme&since=acme:{epoch}:20"))
        .await;
    let (_, _, resume) = subscribed(&mut c).await;
    assert_eq!(resume, Resume::Recovered);
    assert_eq!(
        seqs(&c.events(10).await.unwrap()),
        (21..=30).collect::<Vec<_>>()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_outage_mid_stream_loses_no_acknowledged_event() {
    let mut redis = RedisServer::start_with(true);
    let (a, b) = (node(&redis).await, node(&redis).await);
    let tok = a.token(&["acme"]);
    let mut on_b = b.client(&["acme"], "orgs=acme").await;
    subscribed(&mut on_b).await;

    let mut acked: Vec<(u64, u64)> = Vec::new(); // (i, seq)
    let mut refused = 0;
    let publish = |i: u64| {
        let api = a.api.clone();
        let tok = tok.clone();
        async move {
            let body = serde_json::to_vec(&json!({ "i": i })).unwrap();
            api.publish_raw(&tok, "acme", body, None).await.unwrap()
        }
    };
    for i in 0..100 {
        let (status, r) = publish(i).await;
        assert_eq!(status, 201, "{r}");
        acked.push((i, r["first_seq"].as_u64().unwrap()));
    }
    redis.kill();
    // While Redis is down: publishes are refused with 503 (never acknowledged), readyz says so.
    for i in 100..110 {
        let (status, r) = publish(i).await;
        assert_eq!(status, 503, "{r}");
        assert!(r["error"].as_str().is_some(), "a JSON reason: {r}");
        refused += 1;
    }
    let (status, r) = a.api.get("/readyz", None).await.unwrap();
    assert_eq!(status, 503, "{r}");
    redis.restart();
    // Acknowledged again once Redis is back (the connection manager reconnects with backoff).
    let mut i = 110;
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while acked.len() < 200 {
        assert!(
            std::time::Instant::now() < deadline,
            "redis never came back"
        );
        let (status, r) = publish(i).await;
        match status {
            201 => acked.push((i, r["first_seq"].as_u64().unwrap())),
            503 => tokio::time::sleep(Duration::from_millis(100)).await,
            other => panic!("unexpected {other}: {r}"),
        }
        i += 1;
    }
    assert_eq!(refused, 10);
    let (status, _) = a.api.get("/readyz", None).await.unwrap();
    assert_eq!(status, 200);
    // The session on b stayed up and got every acknowledged event, in order, with no gap.
    let last = acked.last().unwrap().1;
    let got = on_b.events(last as usize).await.unwrap();
    assert_eq!(seqs(&got), (1..=last).collect::<Vec<_>>());
    for (i, seq) in &acked {
        let v: Value = serde_json::from_slice(&got[(*seq - 1) as usize].payload).unwrap();
        assert_eq!(v["i"], *i, "seq {seq}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_by_time_trims_the_stream() {
    let redis = RedisServer::start();
    let url = redis.url();
    let a = TestServer::start_with(move |x| {
        x.redis = Some(url);
        x.replay_window = Some("1s".parse().unwrap());
    })
    .await;
    let tok = a.token(&["acme"]);
    a.publish_numbered(&tok, "acme", 0..5).await;
    // No node sweeps: the untouched stream expires one window after its last append.
    support::eventually("the stream expires", || async {
        (redis.cli(&["EXISTS", "es:{acme}:s"]).trim() == "0").then_some(())
    })
    .await;
    assert_eq!(
        redis.cli(&["EXISTS", "es:{acme}:m"]).trim(),
        "1",
        "head and epoch stay"
    );
    assert_eq!(
        redis.cli(&["EXISTS", "es:orgs"]).trim(),
        "0",
        "no sweep set"
    );
    // Reads trim too (here with the expiry removed, so only a read can trim): events older
    // than the window are never served.
    a.publish_numbered(&tok, "acme", 5..10).await;
    assert_eq!(redis.cli(&["PERSIST", "es:{acme}:s"]).trim(), "1");
    let h = support::eventually("history empties once the window passes", || async {
        let (_, h) = a
            .api
            .get("/v1/orgs/acme/events?limit=100", Some(&tok))
            .await
            .unwrap();
        h["events"]
            .as_array()
            .is_some_and(|e| e.is_empty())
            .then_some(h)
    })
    .await;
    assert_eq!(h["head"], 10, "the head stays: {h}");
    assert_eq!(
        redis.cli(&["XLEN", "es:{acme}:s"]).trim(),
        "0",
        "trimmed in Redis"
    );
    // Later events keep their seqs.
    let r = a.publish_numbered(&tok, "acme", 10..11).await;
    assert_eq!(r["first_seq"], 11);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_share_the_log_on_a_redis_cluster_sharded_by_org() {
    let cluster = support::redis::RedisCluster::start();
    let seeds = cluster.seeds();
    let s2 = seeds.clone();
    let a = TestServer::start_with(move |x| x.redis_cluster = Some(s2.parse().unwrap())).await;
    let b = TestServer::start_with(move |x| x.redis_cluster = Some(seeds.parse().unwrap())).await;
    let orgs = ["o1", "o2", "o3", "o4", "o5", "o6", "o7", "o8"];
    let tok = a.token(&orgs);
    let mut on_b = b.client(&orgs, &format!("orgs={}", orgs.join(","))).await;
    for _ in orgs {
        subscribed(&mut on_b).await;
    }
    for round in 0..5u64 {
        for org in orgs {
            a.publish_numbered(&tok, org, round * 3..round * 3 + 3)
                .await;
        }
    }
    let got = on_b.events(orgs.len() * 15).await.unwrap();
    for org in orgs {
        let s: Vec<u64> = got.iter().filter(|e| e.org == org).map(|e| e.seq).collect();
        assert_eq!(s, (1..=15).collect::<Vec<_>>(), "{org}");
    }
    // The orgs' keys are spread over the cluster's primaries.
    let holding = cluster
        .nodes
        .iter()
        .filter(|n| n.cli(&["dbsize"]).trim() != "0")
        .count();
    assert!(holding >= 2, "keys on {holding} of 3 primaries");
    // Resume on the other node.
    let (_, h) = a
        .api
        .get("/v1/orgs/o3/events?limit=1", Some(&tok))
        .await
        .unwrap();
    let epoch = h["epoch"].as_str().unwrap().to_string();
    let mut c = a
        .client(&["o3"], &format!("orgs=o3&since=o3:{epoch}:10"))
        .await;
    let (_, head, resume) = subscribed(&mut c).await;
    assert_eq!((head, resume), (15, Resume::Recovered));
    assert_eq!(
        seqs(&c.events(5).await.unwrap()),
        (11..=15).collect::<Vec<_>>()
    );
}

/// A publish whose command reached Redis but got no answer (Redis frozen) is 504 "outcome
/// unknown", not 503 "not stored": the event is stored once Redis runs again, and a retry with
/// the same Idempotency-Key answers the first result instead of storing it twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_publish_without_an_answer_is_504_and_its_retry_stores_once() {
    let redis = RedisServer::start();
    let a = node(&redis).await;
    let tok = a.token(&["acme"]);
    a.publish_numbered(&tok, "acme", 0..1).await;
    redis.pause();
    let body = serde_json::to_vec(&json!({"i": 1})).unwrap();
    let (status, r) = a
        .api
        .publish_raw(&tok, "acme", body.clone(), Some("k-1"))
        .await
        .unwrap();
    redis.resume();
    assert_eq!(status, 504, "{r}");
    assert!(
        r["error"].as_str().unwrap().contains("Idempotency-Key"),
        "{r}"
    );
    let (status, r) = support::eventually("Redis answers the retry", || async {
        let (status, r) = a
            .api
            .publish_raw(&tok, "acme", body.clone(), Some("k-1"))
            .await
            .unwrap();
        (status != 503).then_some((status, r))
    })
    .await;
    assert_eq!(
        status, 200,
        "the frozen publish was stored; the retry is its duplicate: {r}"
    );
    assert_eq!((&r["first_seq"], &r["last_seq"]), (&json!(2), &json!(2)));
    let (_, h) = a.api.get("/v1/orgs/acme/events", Some(&tok)).await.unwrap();
    let is: Vec<&Value> = h["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| &e["data"]["i"])
        .collect();
    assert_eq!(is, [&json!(0), &json!(1)], "stored exactly once: {h}");
    // Redis down (refusing connections) is 503: nothing was stored.
    drop(redis);
    let (status, r) = a
        .api
        .publish_raw(&tok, "acme", body, Some("k-2"))
        .await
        .unwrap();
    assert_eq!(status, 503, "{r}");
}

/// Redis restarted from an older snapshot while the nodes stay up: the org lost events the
/// nodes had acknowledged and delivered. The first node to touch it moves it to a new epoch
/// (one for all nodes), clients that saw the lost events get RESET, and no (epoch, seq) is ever
/// acknowledged for two different events.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_rolled_back_to_a_snapshot_moves_the_org_to_a_new_epoch() {
    let mut redis = RedisServer::start();
    let (a, b) = (node(&redis).await, node(&redis).await);
    let tok = a.token(&["acme"]);
    let mut on_b = b.client(&["acme"], "orgs=acme").await;
    let (epoch, _, _) = subscribed(&mut on_b).await;
    let mut acks = Acks::new(tok.clone());
    for _ in 0..10 {
        acks.publish_ok(&a.api).await;
    }
    assert_eq!(redis.cli(&["SAVE"]).trim(), "OK");
    for _ in 10..20 {
        acks.publish_ok(&a.api).await;
    }
    // B's client saw all 20.
    assert_eq!(
        seqs(&on_b.events(20).await.unwrap()),
        (1..=20).collect::<Vec<_>>()
    );
    // Redis dies and comes back from the snapshot: head 10, events 11..20 gone.
    redis.restart();
    let new_epoch = acks.first_in_a_new_epoch(&a.api, &epoch).await;
    // More publishes on both nodes: one epoch, gap-free, never a reused position.
    for _ in 0..5 {
        for api in [&a.api, &b.api] {
            let r = acks.publish_ok(api).await;
            assert_eq!(r["epoch"], new_epoch.as_str());
        }
    }
    // B's client: RESET to the new epoch with its head (the client resyncs from the history),
    // then live events after that head.
    let head = loop {
        match on_b.next_non_heartbeat().await.unwrap() {
            Msg::Frame(Frame::Reset { epoch: e, head, .. }) => {
                assert_eq!(e, new_epoch);
                break head;
            }
            Msg::Frame(f) => assert!(
                edgestream_testkit::ws::as_event(f.clone())
                    .unwrap()
                    .is_none(),
                "an event before RESET: {f:?}"
            ),
            other => panic!("unexpected {other:?}"),
        }
    };
    for _ in 0..2 {
        acks.publish_ok(&a.api).await;
    }
    let last = acks.next - 20; // events published in the new epoch
    assert_eq!(
        seqs(&on_b.events((last - head) as usize).await.unwrap()),
        (head + 1..=last).collect::<Vec<_>>()
    );
    // A client that resumes from the lost history is told to reset, on either node.
    for n in [&a, &b] {
        let url = n.ws_url(&format!(
            "access_token={tok}&orgs=acme&since=acme:{epoch}:15"
        ));
        let mut c = WsClient::connect(&url).await.unwrap();
        let (e, _, resume) = subscribed(&mut c).await;
        assert_eq!((e.as_str(), resume), (new_epoch.as_str(), Resume::Reset));
    }
}

/// 5,000 orgs followed by one node: its Redis connections do not grow with them (the shared
/// connection and one pub/sub connection), it sends Redis almost nothing while nothing
/// happens, and every org gets its events. Before: one connection per followed org, each
/// re-issuing a blocking XREAD every 2 s, and a presence refresh per org every ttl/3.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thousands_of_orgs_share_two_redis_connections_and_idle_reads_nothing() {
    const ORGS: usize = 5000;
    let redis = RedisServer::start();
    let url = redis.url();
    let a = TestServer::start_with(move |x| {
        x.redis = Some(url);
        // A presence tick every 500 ms: six in each idle window below.
        x.presence_ttl = Some("1500ms".parse().unwrap());
        // The clients are read only at the end: on a loaded machine the test outlasts the
        // default 30 s, after which the server closes clients that never answer its pings.
        x.ws_idle_timeout = Some("600s".parse().unwrap());
    })
    .await;
    let orgs: Vec<String> = (0..ORGS).map(|i| format!("o{i}")).collect();
    // The node's connections before it follows anything (the one below is this test's).
    a.api.get("/readyz", None).await.unwrap();
    let before = redis.info("connected_clients");
    // 79 sessions of at most 64 orgs each (the per-session limit), each token naming its orgs.
    let mut clients = Vec::new();
    for chunk in orgs.chunks(64) {
        let names: Vec<&str> = chunk.iter().map(String::as_str).collect();
        let tok = a.token(&names);
        let url = a.ws_url(&format!("access_token={tok}&orgs={}", names.join(",")));
        let mut c = WsClient::connect(&url).await.unwrap();
        for _ in 0..chunk.len() {
            subscribed(&mut c).await;
        }
        clients.push((c, chunk.len()));
    }
    a.wait_metrics("5000 orgs followed", |m| m["orgs_subscribed"] == ORGS)
        .await;
    let after = redis.info("connected_clients");
    assert!(
        after <= before + 1,
        "{before} connections before following {ORGS} orgs, {after} after"
    );
    // Idle, once the sessions' 5,000 presence joins are written (asynchronously, each waking
    // the org's followers once): no follower reads (XREAD), no retention sweep (XRANGE), and
    // presence sends a registry refresh plus a small audit slice per tick, not a script per
    // org (EVALSHA). Before: each follower re-issued its blocking XREAD every 2 s (about 7,500
    // per 3 s here), every node swept every org every second, and presence refreshed all
    // 5,000 orgs at each tick (30,000 scripts per 3 s here).
    let mut windows = Vec::new();
    loop {
        let count = || {
            (
                redis.calls("xread"),
                redis.calls("xrange"),
                redis.calls("evalsha") + redis.calls("eval"),
            )
        };
        let before = count();
        tokio::time::sleep(Duration::from_secs(3)).await;
        let now = count();
        let w = (now.0 - before.0, now.1 - before.1, now.2 - before.2);
        windows.push(w);
        if w.0 < 50 && w.1 < 50 && w.2 < 200 {
            break;
        }
        assert!(
            windows.len() < 8,
            "never idle: (xread, xrange, scripts) per 3 s: {windows:?}"
        );
    }
    eprintln!("(xread, xrange, scripts) per 3 s with {ORGS} orgs followed: {windows:?}");
    // One event to every org, from 8 publishers: each arrives, in order per org.
    let tok = token_for("pub", &["*"], "publish");
    let mut tasks = Vec::new();
    for w in 0..8 {
        let (api, tok, orgs) = (a.api.clone(), tok.clone(), orgs.clone());
        tasks.push(tokio::spawn(async move {
            for org in orgs.iter().skip(w).step_by(8) {
                let (st, r) = api
                    .publish_raw(&tok, org, format!(r#"{{"org":"{org}"}}"#), None)
                    .await
                    .unwrap();
                assert_eq!(st, 201, "{r}");
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let mut seen = BTreeSet::new();
    for (c, n) in &mut clients {
        for e in c.events(*n).await.unwrap() {
            assert_eq!(e.seq, 1);
            assert_eq!(e.payload, format!(r#"{{"org":"{}"}}"#, e.org).as_bytes());
            assert!(seen.insert(e.org.clone()), "{} twice", e.org);
        }
    }
    assert_eq!(seen.len(), ORGS);
}

/// `--redis-min-replicas 1`: a publish is acknowledged once a replica has it. With the replica
/// frozen, the publish is 504 (stored on the primary, not confirmed), while a node without the
/// flag still answers 201; once the replica runs again, the retry with the same
/// Idempotency-Key is confirmed and answers the first result (stored once).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn min_replicas_acknowledges_only_what_a_replica_has() {
    let primary = RedisServer::start();
    let replica = RedisServer::replica_of(&primary);
    let url = primary.url();
    let strict = TestServer::start_with(move |x| {
        x.redis = Some(url);
        x.redis_min_replicas = Some(1);
        x.redis_replica_timeout = Some("500ms".parse().unwrap());
    })
    .await;
    let lax = node(&primary).await;
    let tok = strict.token(&["acme"]);
    let body = |i: u64| serde_json::to_vec(&json!({ "i": i })).unwrap();
    let (st, r) = strict
        .api
        .publish_raw(&tok, "acme", body(0), None)
        .await
        .unwrap();
    assert_eq!(st, 201, "confirmed by the replica: {r}");
    replica.pause();
    let (st, r) = strict
        .api
        .publish_raw(&tok, "acme", body(1), Some("k1"))
        .await
        .unwrap();
    assert_eq!(st, 504, "{r}");
    assert!(r["error"].as_str().unwrap().contains("replicas"), "{r}");
    let (st, r) = lax
        .api
        .publish_raw(&tok, "acme", body(2), None)
        .await
        .unwrap();
    assert_eq!(
        st, 201,
        "without the flag the primary's answer is enough: {r}"
    );
    replica.resume();
    let (st, r) = strict
        .api
        .publish_raw(&tok, "acme", body(1), Some("k1"))
        .await
        .unwrap();
    assert_eq!(
        st, 200,
        "the retry is confirmed now and answers the first result: {r}"
    );
    assert_eq!(r["first_seq"], 2);
    let (_, h) = strict
        .api
        .get("/v1/orgs/acme/events", Some(&tok))
        .await
        .unwrap();
    let is: Vec<&Value> = h["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| &e["data"]["i"])
        .collect();
    assert_eq!(
        is,
        [&json!(0), &json!(1), &json!(2)],
        "each stored once: {h}"
    );
}

/// The failover of issue 15, on a real Redis Cluster with replicas: 50 events acknowledged and
/// replicated; the replica of the org's primary is frozen (its link cut); 50 more acknowledged
/// by the primary alone; the primary is killed and the stale replica takes over. Publishing
/// continues under a new epoch: no (epoch, seq) is ever acknowledged for two events, and the
/// subscriber that saw the lost events gets RESET.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failover_to_a_stale_replica_never_reuses_a_position() {
    failover_to_a_stale_replica(false).await;
}

/// The same failover with `--redis-min-replicas 1`: the 10 publishes made while the replica is
/// cut off are 504 (never acknowledged) and never delivered, so the failover loses nothing
/// anyone was told about: the org keeps its epoch, publishing continues at seq 51, and the
/// subscriber gets the new events after the 50 it had, without RESET.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_min_replicas_a_failover_keeps_the_epoch_and_the_subscribers() {
    failover_to_a_stale_replica(true).await;
}

async fn failover_to_a_stale_replica(min_replicas: bool) {
    let mut cluster = support::redis::RedisCluster::start_with_replicas();
    let seeds = cluster.seeds();
    let a = TestServer::start_with(move |x| {
        x.redis_cluster = Some(seeds.parse().unwrap());
        if min_replicas {
            x.redis_min_replicas = Some(1);
            x.redis_replica_timeout = Some("300ms".parse().unwrap());
        }
    })
    .await;
    let tok = a.token(&["acme"]);
    let mut on_a = a.client(&["acme"], "orgs=acme").await;
    let (epoch, _, _) = subscribed(&mut on_a).await;
    let (p, r) = cluster.primary_and_replica("es:{acme}:m");
    let r = r.expect("the org's primary has a replica");
    let mut acks = Acks::new(tok.clone());
    for _ in 0..50 {
        acks.publish_ok(&a.api).await;
    }
    assert_eq!(
        seqs(&on_a.events(50).await.unwrap()),
        (1..=50).collect::<Vec<_>>()
    );
    // The replica has those 50, then its link is cut.
    support::eventually("the replica catches up", || async {
        (cluster.nodes[r].repl_offset() >= cluster.nodes[p].repl_offset()).then_some(())
    })
    .await;
    // Frozen, and its connection dropped by the primary: what follows never reaches it (a
    // frozen replica alone would still find it in its socket buffer when it runs again).
    cluster.nodes[r].pause();
    assert!(!cluster.nodes[p]
        .cli(&["CLIENT", "KILL", "TYPE", "replica"])
        .trim()
        .starts_with('0'));
    if min_replicas {
        // Stored on the primary alone: 504 each, outcome unknown, and not delivered.
        for n in 0..10 {
            let body = serde_json::to_vec(&json!({ "unconfirmed": n })).unwrap();
            let (st, r) = a.api.publish_raw(&tok, "acme", body, None).await.unwrap();
            assert_eq!(st, 504, "{r}");
        }
    } else {
        for _ in 50..100 {
            acks.publish_ok(&a.api).await;
        }
        assert_eq!(
            seqs(&on_a.events(50).await.unwrap()),
            (51..=100).collect::<Vec<_>>()
        );
    }
    // The primary dies; the stale replica takes over.
    cluster.nodes[p].kill();
    cluster.nodes[r].resume();
    assert!(cluster.nodes[r]
        .cli(&["CLUSTER", "FAILOVER", "TAKEOVER"])
        .contains("OK"));
    support::eventually("the replica takes over", || async {
        (cluster.primary_and_replica("es:{acme}:m").0 == r).then_some(())
    })
    .await;
    let surviving = if min_replicas {
        // The new primary has no replica, so nothing can be confirmed until it gets one: a
        // replica of another primary migrates to it.
        let spare = (0..cluster.nodes.len())
            .find(|&n| {
                n != r
                    && n != p
                    && cluster.nodes[n]
                        .cli(&["INFO", "replication"])
                        .contains("role:slave")
            })
            .expect("another replica");
        let id = cluster.nodes[r].cli(&["CLUSTER", "MYID"]);
        assert!(cluster.nodes[spare]
            .cli(&["CLUSTER", "REPLICATE", id.trim()])
            .contains("OK"));
        support::eventually("the migrated replica syncs", || async {
            cluster.nodes[spare]
                .cli(&["INFO", "replication"])
                .contains("master_link_status:up")
                .then_some(())
        })
        .await;
        // Nothing acknowledged or delivered was lost: the same epoch goes on at seq 51, and
        // the subscriber gets exactly the new events, after the 50 it had.
        let first = acks.first_acknowledged(&a.api).await;
        assert_eq!(first["epoch"], epoch.as_str(), "{first}");
        assert_eq!(first["first_seq"], 51, "{first}");
        for _ in 0..19 {
            acks.publish_ok(&a.api).await;
        }
        let evs = on_a.events(20).await.unwrap();
        assert_eq!(seqs(&evs), (51..=70).collect::<Vec<_>>());
        for e in &evs {
            let data: Value = serde_json::from_slice(&e.payload).unwrap();
            let key = (epoch.clone(), e.seq);
            assert_eq!(data["i"].as_u64().as_ref(), acks.acked.get(&key), "{data}");
        }
        epoch
    } else {
        // Publishing goes on, under a new epoch from seq 1: nothing reuses 51..100.
        let new_epoch = acks.first_in_a_new_epoch(&a.api, &epoch).await;
        for _ in 0..20 {
            let r = acks.publish_ok(&a.api).await;
            assert_eq!(r["epoch"], new_epoch.as_str());
        }
        // The subscriber that saw 51..100: RESET to the new epoch, before any event of it.
        match on_a.next_non_heartbeat().await.unwrap() {
            Msg::Frame(Frame::Reset { epoch: e, .. }) => assert_eq!(e, new_epoch),
            other => panic!("expected RESET, got {other:?}"),
        }
        new_epoch
    };
    // What was acknowledged under the surviving epoch reads back unchanged, and nothing else.
    let (_, h) = a
        .api
        .get("/v1/orgs/acme/events?limit=1000", Some(&tok))
        .await
        .unwrap();
    assert_eq!(h["epoch"], surviving.as_str());
    let events = h["events"].as_array().unwrap();
    for e in events {
        let key = (surviving.clone(), e["seq"].as_u64().unwrap());
        assert_eq!(
            e["data"]["i"].as_u64().as_ref(),
            acks.acked.get(&key),
            "{e}"
        );
    }
    assert_eq!(events.len(), if min_replicas { 70 } else { 21 });
}

/// `--redis-min-replicas 1` on a Redis Cluster: WAIT goes to the org's primary (by default the
/// client would send it to every primary): publishes to orgs on every primary are confirmed,
/// and with the replica of one org's primary cut off, that org's publishes are 504 while the
/// others' stay 201.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn min_replicas_on_a_cluster_waits_on_each_orgs_primary() {
    let cluster = support::redis::RedisCluster::start_with_replicas();
    let seeds = cluster.seeds();
    let a = TestServer::start_with(move |x| {
        x.redis_cluster = Some(seeds.parse().unwrap());
        x.redis_min_replicas = Some(1);
        x.redis_replica_timeout = Some("300ms".parse().unwrap());
    })
    .await;
    let orgs = ["o1", "o2", "o3", "o4", "o5", "o6", "o7", "o8"];
    let tok = token_for("pub", &["*"], "publish");
    for org in orgs {
        let (st, r) = a.api.publish_raw(&tok, org, "{}", None).await.unwrap();
        assert_eq!(st, 201, "{org}: {r}");
    }
    // Cut off the replica of o1's primary.
    let (p, r) = cluster.primary_and_replica("es:{o1}:m");
    let r = r.expect("a replica");
    cluster.nodes[r].pause();
    cluster.nodes[p].cli(&["CLIENT", "KILL", "TYPE", "replica"]);
    let mut statuses = Vec::new();
    for org in orgs {
        let same_primary = cluster.primary_and_replica(&format!("es:{{{org}}}:m")).0 == p;
        let (st, r) = a.api.publish_raw(&tok, org, "{}", None).await.unwrap();
        let want = if same_primary { 504 } else { 201 };
        assert_eq!(st, want, "{org} (on o1's primary: {same_primary}): {r}");
        statuses.push(st);
    }
    cluster.nodes[r].resume();
    assert!(
        statuses.contains(&201),
        "every org on one primary: {statuses:?}"
    );
}

/// Issue 16: a Redis outage is logged once when it starts and once when it ends (not per
/// request), and the metrics show it: `log_up` 0 during it, failed commands counted by kind.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_outage_is_logged_once_each_way_and_shown_in_the_metrics() {
    let mut redis = RedisServer::start();
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("node.log");
    let url = redis.url();
    let node = support::node::Node::spawn_logging(&["--redis", &url], "warn", Some(&log)).await;
    let tok = token_for("pub", &["acme"], "publish");
    let (st, _) = node
        .api
        .publish_raw(&tok, "acme", "{}", None)
        .await
        .unwrap();
    assert_eq!(st, 201);
    let (_, m) = node.api.get("/v1/metrics", None).await.unwrap();
    assert_eq!(m["log_up"], 1, "{m}");
    redis.kill();
    for _ in 0..5 {
        let (st, r) = node
            .api
            .publish_raw(&tok, "acme", "{}", None)
            .await
            .unwrap();
        assert!(st == 503 || st == 504, "{st}: {r}");
    }
    let (_, m) = node.api.get("/v1/metrics", None).await.unwrap();
    assert_eq!(m["log_up"], 0, "{m}");
    let failed = m["log_errors"]["unavailable"].as_u64().unwrap()
        + m["log_errors"]["indeterminate"].as_u64().unwrap();
    assert!(failed >= 5, "{m}");
    redis.restart();
    support::eventually("a publish succeeds again", || async {
        let (st, _) = node
            .api
            .publish_raw(&tok, "acme", "{}", None)
            .await
            .unwrap();
        (st == 201).then_some(())
    })
    .await;
    let (_, m) = node.api.get("/v1/metrics", None).await.unwrap();
    assert_eq!(m["log_up"], 1, "{m}");
    let text = std::fs::read_to_string(&log).unwrap();
    assert_eq!(
        text.matches("redis does not answer").count(),
        1,
        "one line when it went down: {text}"
    );
    assert_eq!(
        text.matches("redis answers again").count(),
        1,
        "one line when it came back: {text}"
    );
}

/// Issue 17 parity: a RESET mid-stream reaches a WebSocket and a WebTransport session alike,
/// and `events_delivered` counts events only, on both (before, WebSocket counted the RESET).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reset_mid_stream_is_not_counted_as_a_delivered_event_on_either_transport() {
    let redis = RedisServer::start();
    let a = node(&redis).await;
    let tok = a.token(&["acme"]);
    let mut ws = a.client(&["acme"], "orgs=acme").await;
    subscribed(&mut ws).await;
    let mut wt = a.wt_client(&["acme"], "orgs=acme").await;
    assert!(matches!(
        wt.next_frame().await.unwrap(),
        Frame::Subscribed { .. }
    ));
    for i in 0..3 {
        a.api
            .publish(&tok, "acme", &json!({ "i": i }))
            .await
            .unwrap();
    }
    assert_eq!(ws.events(3).await.unwrap().len(), 3);
    assert_eq!(wt.events(3).await.unwrap().len(), 3);
    // The org's keys vanish (a Redis that lost them): the next publish starts a new epoch.
    redis.cli(&["DEL", "es:{acme}:m", "es:{acme}:s"]);
    a.api
        .publish(&tok, "acme", &json!({ "i": 3 }))
        .await
        .unwrap();
    match ws.next_non_heartbeat().await.unwrap() {
        Msg::Frame(Frame::Reset { .. }) => {}
        other => panic!("websocket: expected RESET, got {other:?}"),
    }
    loop {
        match wt.next_frame().await.unwrap() {
            Frame::Reset { .. } => break,
            Frame::Presence { .. } => {}
            other => panic!("webtransport: expected RESET, got {other:?}"),
        }
    }
    // RESET names head 1: the events after it follow.
    a.api
        .publish(&tok, "acme", &json!({ "i": 4 }))
        .await
        .unwrap();
    assert_eq!(ws.events(1).await.unwrap()[0].seq, 2);
    assert_eq!(wt.events(1).await.unwrap()[0].seq, 2);
    let m = a.metrics().await;
    assert_eq!(m["events_delivered"]["websocket"], 4, "{m}");
    assert_eq!(m["events_delivered"]["webtransport"], 4, "{m}");
}

/// Issue 17 parity: Redis stops answering while a session catches up (a resume far behind,
/// the client reading slowly so that the catch-up is still going when Redis freezes): both
/// transports close the session with 4503 so that the client resumes, here or on another node.
/// Before, a WebTransport org stream retried every 200 ms for as long as Redis was down, with
/// a warning each time, and the client waited without knowing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_log_outage_during_catch_up_closes_with_4503_on_both_transports() {
    let redis = RedisServer::start();
    let url = redis.url();
    let a = TestServer::start_with(move |x| {
        x.redis = Some(url);
        x.replay_max_events = Some(100_000);
    })
    .await;
    let tok = a.token(&["acme"]);
    // 9,000 events of 12 KiB: a catch-up of 105 MiB, in reads of 1,024 events, more than the
    // flow-control windows and socket buffers hold.
    let big = "x".repeat(12 * 1024);
    for _ in 0..180 {
        let batch: Vec<Value> = (0..50).map(|_| json!({ "p": big })).collect();
        a.api.publish(&tok, "acme", &json!(batch)).await.unwrap();
    }
    let (_, h) = a
        .api
        .get("/v1/orgs/acme/events?limit=0", Some(&tok))
        .await
        .unwrap();
    let since = format!("orgs=acme&since=acme:{}:0", h["epoch"].as_str().unwrap());
    let mut ws = a.client(&["acme"], &since).await;
    let mut wt = a.wt_client(&["acme"], &since).await;
    // A few events each, then nothing read: the catch-up stalls on flow control.
    subscribed(&mut ws).await;
    assert_eq!(ws.events(10).await.unwrap().len(), 10);
    assert!(matches!(
        wt.next_frame().await.unwrap(),
        Frame::Subscribed { .. }
    ));
    assert_eq!(wt.events(10).await.unwrap().len(), 10);
    tokio::time::sleep(Duration::from_millis(500)).await;
    redis.pause();
    // Reading again lets the catch-up go on, to a read Redis does not answer.
    let ws_close = async {
        loop {
            match ws.next().await {
                Ok(Msg::Close(code, _)) => return code,
                Ok(_) => {}
                Err(e) => panic!("websocket: {e}"),
            }
        }
    };
    let wt_close = async {
        loop {
            if wt.next_frame().await.is_err() {
                return wt.closed().await.unwrap().0;
            }
        }
    };
    let (ws_code, wt_code) = tokio::join!(ws_close, wt_close);
    redis.resume();
    assert_eq!(ws_code, Some(4503));
    assert_eq!(wt_code, 4503);
}

/// `POST /v1/events` on Redis: one request to node a appends to many orgs at once (their
/// scripts run concurrently), each org with its own gap-free seqs, delivered on node b.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_multi_org_publish_on_one_node_is_delivered_on_the_other() {
    let redis = RedisServer::start();
    let (a, b) = (node(&redis).await, node(&redis).await);
    let orgs: Vec<String> = (0..50).map(|i| format!("o{i}")).collect();
    let mut watched = b.client(&["o7"], "orgs=o7").await;
    subscribed(&mut watched).await;
    let tok = a.token(&["*"]);
    for round in 0..3 {
        let body: Vec<serde_json::Value> = orgs
            .iter()
            .map(|o| serde_json::json!({"org": o, "events": [{"r": round, "k": 0}, {"r": round, "k": 1}]}))
            .collect();
        let (status, v) = a
            .publish_many(&tok, serde_json::to_vec(&body).unwrap(), None)
            .await;
        assert_eq!(status, 201, "{v}");
        for (i, r) in v["results"].as_array().unwrap().iter().enumerate() {
            assert_eq!(r["org"], orgs[i].as_str(), "{v}");
            assert_eq!(
                (r["first_seq"].as_u64(), r["last_seq"].as_u64()),
                (Some(round * 2 + 1), Some(round * 2 + 2)),
                "{v}"
            );
        }
    }
    let got = watched.events(6).await.unwrap();
    assert_eq!(seqs(&got), [1, 2, 3, 4, 5, 6]);
    assert_eq!(&got[5].payload[..], br#"{"k":1,"r":2}"#);
    // With Redis gone, every org's result says why, and the request answers 503 or 504 with
    // a reason, never 201.
    let mut redis = redis;
    redis.kill();
    let body = serde_json::json!([{"org": "o1", "events": {"late": 1}}, {"org": "o2", "events": {"late": 2}}]);
    let (status, v) = a
        .publish_many(&tok, serde_json::to_vec(&body).unwrap(), None)
        .await;
    assert!(status == 503 || status == 504, "{status}: {v}");
    assert!(v["error"].is_string(), "{v}");
    for r in v["results"].as_array().unwrap() {
        assert!(matches!(r["status"].as_u64(), Some(503 | 504)), "{v}");
        assert!(r["error"].is_string(), "{v}");
    }
}
