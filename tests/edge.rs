//! Nodes behind a UDP load balancer: connection IDs that carry the node's server id, and a
//! stateless reset from a surviving node (same `--reset-key`) for a dead node's client. Real
//! node processes killed with SIGKILL; the "balancer" is a UDP relay that can be retargeted.

mod support;

use edgestream_codec::Frame;
use support::node::Node;
use support::relay::Relay;

const RESET_KEY: &str = "edge-test-reset-key-0123456789abcdef";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_nodes_client_is_reset_by_a_peer_with_the_shared_key_and_a_live_ones_is_not() {
    let redis = support::redis::RedisServer::start();
    let url = redis.url();
    let node = |id: &'static str| {
        let url = url.clone();
        async move {
            Node::spawn(&[
                "--server-id",
                id,
                "--reset-key",
                RESET_KEY,
                "--redis",
                &url,
                "--node-ttl",
                "1s",
            ])
            .await
        }
    };
    let mut a = node("0a01").await;
    let b = node("0a02").await;
    let relay = Relay::start(a.quic).await;
    let token = support::token(&["acme"]);
    let url = format!(
        "https://127.0.0.1:{}/v1/stream?access_token={token}&orgs=acme",
        relay.addr.port()
    );
    let client = edgestream_testkit::wt::connect(&url, &a.cert_hash().await)
        .await
        .unwrap();
    let mut client = client;
    assert!(matches!(
        client.next_frame().await.unwrap(),
        Frame::Subscribed { .. }
    ));
    // The client addresses node a by a CID carrying a's server id (short header: flags, then
    // the destination CID: first octet with the length, then the server id).
    client
        .send_datagram(&Frame::Ping(bytes::Bytes::from_static(b"x")))
        .unwrap();
    let _ = client.next_datagram().await;
    let pkt = relay.last_from_client();
    assert_eq!(pkt[0] & 0x80, 0, "a short-header packet: {pkt:02x?}");
    let cid_len = usize::from(pkt[1] & 0x1f) + 1;
    assert_eq!(cid_len, 1 + 2 + 8, "{pkt:02x?}");
    assert_eq!(
        &pkt[2..4],
        &[0x0a, 0x01],
        "a's server id in the CID: {pkt:02x?}"
    );

    let cid = pkt[1..1 + cid_len].to_vec();

    // The reset oracle (RFC 9000 section 21.11): while a is alive, b must not answer a's CIDs
    // with a reset, or anyone could learn the token that ends a's connections. Packets of
    // a's connection sent to b get nothing back, and the connection carries on with a.
    relay.retarget(b.quic);
    for _ in 0..5 {
        client
            .send_datagram(&Frame::Ping(bytes::Bytes::from_static(b"to b")))
            .unwrap();
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    assert_eq!(
        relay.bytes_from(b.quic),
        0,
        "b answered packets of a live peer's connection"
    );
    relay.retarget(a.quic);
    client
        .send_datagram(&Frame::Ping(bytes::Bytes::from_static(b"still a")))
        .unwrap();
    loop {
        if let Frame::Pong(b) = client.next_datagram().await.unwrap() {
            if &b[..] == b"still a" {
                break;
            }
        }
    }

    // a dies; the balancer sends the client's packets to b, which does not know the
    // connection and, sharing the key, answers with a stateless reset for a's CID: its last
    // 16 bytes are the token HMAC-SHA256(key, CID) that a would have given (RFC 9000 10.3).
    // Once a's entry in the node registry has expired (node ttl 1 s), b resets it.
    a.kill().await;
    relay.retarget(b.quic);
    let quic: &quinn::Connection = &client.session;
    support::eventually("the client's connection ends", || async {
        let _ = client.send_datagram(&Frame::Ping(bytes::Bytes::from_static(b"y")));
        tokio::time::sleep(std::time::Duration::from_millis(80)).await;
        quic.close_reason().map(drop)
    })
    .await;
    let reset = relay.last_from_server();
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, RESET_KEY.as_bytes());
    let token = ring::hmac::sign(&key, &cid);
    assert!(reset.len() >= 21, "{reset:02x?}");
    assert_eq!(
        &reset[reset.len() - 16..],
        &token.as_ref()[..16],
        "b sent a stateless reset for a's connection"
    );
    // quinn reports the reset, unless web-transport-quinn's own close (on the CONNECT stream
    // failing) overwrote the error first.
    let err = quic.close_reason().unwrap();
    assert!(
        matches!(
            err,
            quinn::ConnectionError::Reset | quinn::ConnectionError::LocallyClosed
        ),
        "{err}"
    );
}

/// What one client saw over the run.
#[derive(Debug, Default)]
struct Seen {
    last: u64,
    errors: Vec<String>,
    reconnects: u32,
    /// From losing the node to the first event after resuming, per reconnect.
    resume_ms: Vec<u128>,
}

impl Seen {
    fn event(&mut self, seq: u64) {
        if seq != self.last + 1 {
            let what = if seq <= self.last { "duplicate" } else { "gap" };
            self.errors
                .push(format!("{what}: {seq} after {}", self.last));
        }
        self.last = self.last.max(seq);
    }
}

/// One client through the balancer until it has `total` events: reconnects with its position
/// whenever its node goes away, and checks every seq.
async fn run_client(
    wt: bool,
    nginx: std::net::SocketAddr,
    cert: String,
    total: u64,
    epoch: std::sync::Arc<std::sync::Mutex<String>>,
) -> Seen {
    use edgestream_codec::Resume;
    use edgestream_testkit::ws::{as_event, Msg, WsClient};
    use std::time::{Duration, Instant};
    let token = support::token(&["acme"]);
    let mut seen = Seen::default();
    let mut lost_at: Option<Instant> = None;
    let deadline = Instant::now() + Duration::from_secs(90);
    while seen.last < total && Instant::now() < deadline {
        let since = match (&lost_at, epoch.lock().unwrap().clone()) {
            (Some(_), e) if !e.is_empty() => format!("&since=acme:{e}:{}", seen.last),
            _ => String::new(),
        };
        let q = format!("access_token={token}&orgs=acme{since}");
        if wt {
            let url = format!("https://127.0.0.1:{}/v1/stream?{q}", nginx.port());
            // A fresh endpoint (source port) per attempt, as a browser would.
            let Ok(mut c) = edgestream_testkit::wt::connect(&url, &cert).await else {
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            };
            let mut ping = tokio::time::interval(Duration::from_millis(500));
            loop {
                tokio::select! {
                    f = c.next_frame() => match f {
                        Ok(Frame::Subscribed { epoch: e, resume, .. }) => {
                            if lost_at.is_some() && resume != Resume::Recovered {
                                seen.errors.push(format!("resume {resume:?}"));
                            }
                            *epoch.lock().unwrap() = e;
                        }
                        Ok(f) => {
                            if let Ok(Some(e)) = edgestream_testkit::ws::as_event(f) {
                                seen.event(e.seq);
                                if let Some(t) = lost_at.take() {
                                    seen.resume_ms.push(t.elapsed().as_millis());
                                }
                                if seen.last >= total {
                                    c.close(0);
                                    return seen;
                                }
                            }
                        }
                        Err(_) => break,
                    },
                    // Application PINGs keep packets flowing, so a dead node's client reaches
                    // a peer (and its stateless reset) as soon as the balancer reroutes.
                    _ = ping.tick() => { let _ = c.send_datagram(&Frame::Ping(bytes::Bytes::from_static(b"p"))); }
                }
            }
        } else {
            let url = format!("ws://{nginx}/v1/stream?{q}");
            let Ok(mut c) = WsClient::connect(&url).await else {
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            };
            loop {
                match c.next_non_heartbeat().await {
                    Ok(Msg::Frame(Frame::Subscribed {
                        epoch: e, resume, ..
                    })) => {
                        if lost_at.is_some() && resume != Resume::Recovered {
                            seen.errors.push(format!("resume {resume:?}"));
                        }
                        *epoch.lock().unwrap() = e;
                    }
                    Ok(Msg::Frame(f)) => {
                        if let Ok(Some(e)) = as_event(f) {
                            seen.event(e.seq);
                            if let Some(t) = lost_at.take() {
                                seen.resume_ms.push(t.elapsed().as_millis());
                            }
                            if seen.last >= total {
                                return seen;
                            }
                        }
                    }
                    Ok(_) => {}
                    Err(_) => break,
                }
            }
        }
        seen.reconnects += 1;
        lost_at.get_or_insert_with(Instant::now);
    }
    if seen.last < total {
        seen.errors
            .push(format!("stopped at {} of {total}", seen.last));
    }
    seen
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_killed_behind_nginx_loses_duplicates_and_reorders_nothing() {
    use std::time::Duration;
    let redis = support::redis::RedisServer::start();
    let dir = tempfile::tempdir().unwrap();
    let (cert_path, key_path, hash) = support::node::cert_files(dir.path());
    let url = redis.url();
    let common = |id: &'static str| -> Vec<String> {
        [
            "--redis",
            &url,
            "--cert",
            cert_path.to_str().unwrap(),
            "--key",
            key_path.to_str().unwrap(),
            "--server-id",
            id,
            "--reset-key",
            RESET_KEY,
            "--quic-idle-timeout",
            "5s",
            "--heartbeat",
            "1s",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect()
    };
    let args_a = common("01");
    let args_b = common("02");
    let mut a = Node::spawn(&args_a.iter().map(String::as_str).collect::<Vec<_>>()).await;
    let b = Node::spawn(&args_b.iter().map(String::as_str).collect::<Vec<_>>()).await;
    let nginx = support::nginx::Nginx::start(&[a.quic, b.quic], &[a.http, b.http]);

    const CLIENTS: usize = 100;
    const TOTAL: u64 = 300;
    let epoch = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
    let mut tasks = Vec::new();
    for i in 0..CLIENTS {
        let (hash, epoch) = (hash.clone(), epoch.clone());
        let (udp, tcp) = (nginx.udp, nginx.tcp);
        let wt = i % 2 == 0;
        tasks.push(tokio::spawn(async move {
            run_client(wt, if wt { udp } else { tcp }, hash, TOTAL, epoch).await
        }));
    }
    // Every client connected, spread over both nodes.
    let count = |m: &serde_json::Value| {
        m["sessions"]["websocket"].as_u64().unwrap_or(0)
            + m["sessions"]["webtransport"].as_u64().unwrap_or(0)
    };
    let on_a = support::eventually("every client connected", || async {
        let (_, ma) = a.api.get("/v1/metrics", None).await.unwrap();
        let (_, mb) = b.api.get("/v1/metrics", None).await.unwrap();
        (count(&ma) + count(&mb) == CLIENTS as u64).then(|| count(&ma))
    })
    .await;
    assert!(on_a > 0, "the balancer put clients on both nodes");

    // A steady stream, published on the surviving node; node a is killed a third of the way.
    let token = support::token(&["acme"]);
    for n in 0..TOTAL / 2 {
        let batch = serde_json::json!([{ "n": n * 2 }, { "n": n * 2 + 1 }]);
        b.api.publish(&token, "acme", &batch).await.unwrap();
        if n == TOTAL / 6 {
            a.kill().await;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (mut resumed, mut by) = (Vec::new(), [Vec::new(), Vec::new()]);
    let (mut lost, mut errors) = (0, Vec::new());
    for (i, t) in tasks.into_iter().enumerate() {
        let s = t.await.unwrap();
        lost += TOTAL - s.last.min(TOTAL);
        errors.extend(s.errors);
        by[i % 2].extend(s.resume_ms.iter().copied());
        resumed.extend(s.resume_ms);
    }
    resumed.sort_unstable();
    for (name, v) in ["webtransport", "websocket"].iter().zip(by.iter_mut()) {
        v.sort_unstable();
        eprintln!(
            "node loss, {name}: {} clients resumed; time to resume p50 {} ms, max {} ms",
            v.len(),
            v.get(v.len() / 2).copied().unwrap_or(0),
            v.last().copied().unwrap_or(0)
        );
    }
    eprintln!("node loss: {on_a} of {CLIENTS} clients were on the killed node");
    assert!(
        errors.is_empty(),
        "{} errors: {:?}",
        errors.len(),
        &errors[..errors.len().min(5)]
    );
    assert_eq!(lost, 0);
    assert!(
        resumed.len() as u64 >= on_a,
        "every client of the dead node resumed"
    );
}

/// Issue 16: the documented nginx configuration (`deploy/nginx.conf`) through a rolling restart
/// done as docs/DEPLOYMENT.md says (SIGTERM a node, start it, wait until `/readyz` answers 200
/// and then the QUIC `fail_timeout` and a second more, then the next node), followed by a
/// SIGKILL of a node. A
/// publisher sends through nginx all along, retrying with the same Idempotency-Key as the
/// docs advise: no publish fails during the rolling restart, not even on its first attempt;
/// after the kill every publish is stored once; the log holds each acknowledged event once,
/// in order. Before (no shared zone, `fail_timeout=30s`), the same sequence left nginx
/// answering "no live upstreams" for seconds while a node was healthy.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rolling_restart_then_a_kill_behind_the_documented_nginx_fails_no_publish() {
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    use std::sync::Arc;
    use std::time::Duration;
    let redis = support::redis::RedisServer::start();
    let url = redis.url();
    let args = ["--redis", &url, "--drain-delay", "2s"];
    let mut a = Node::spawn(&args).await;
    let mut b = Node::spawn(&args).await;
    let nginx = support::nginx::Nginx::start(&[a.quic, b.quic], &[a.http, b.http]);
    // A new connection per publish (as many publishers make): each one is balanced anew.
    let api = edgestream_testkit::http::Api {
        base: format!("http://{}", nginx.tcp),
        client: reqwest::Client::builder()
            .pool_max_idle_per_host(0)
            .build()
            .unwrap(),
    };
    let token = support::token(&["acme"]);

    // The publisher: one event every 20 ms; a failed attempt (an error or a 5xx) is retried
    // with the same key every 100 ms for up to 10 s.
    let phase = Arc::new(AtomicUsize::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let publisher = {
        let (phase, stop) = (phase.clone(), stop.clone());
        tokio::spawn(async move {
            let mut first_failures = [0u32; 2];
            let mut acked = Vec::new();
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) && n < 5_000 {
                let key = format!("p{n}");
                let body = serde_json::to_vec(&serde_json::json!({ "n": n })).unwrap();
                let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
                let mut attempt = 0;
                loop {
                    let r = api
                        .publish_raw(&token, "acme", body.clone(), Some(&key))
                        .await;
                    match r {
                        Ok((200 | 201, v)) => {
                            acked.push((n, v["first_seq"].as_u64().unwrap()));
                            break;
                        }
                        other => {
                            if attempt == 0 {
                                first_failures[phase.load(Ordering::Relaxed)] += 1;
                                eprintln!("publish {n}: {other:?}");
                            }
                            assert!(
                                tokio::time::Instant::now() < deadline,
                                "publish {n} never stored: {other:?}"
                            );
                            attempt += 1;
                            tokio::time::sleep(Duration::from_millis(100)).await;
                        }
                    }
                }
                n += 1;
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            (first_failures, acked)
        })
    };
    let settle = Duration::from_secs(11); // the QUIC upstream's fail_timeout (10 s) and a second
    tokio::time::sleep(Duration::from_secs(1)).await;
    // The rolling restart, as documented.
    for node in [&mut a, &mut b] {
        node.terminate().await;
        // Down for a second, as a restart by systemd (`RestartSec=1`) or a binary upgrade is.
        tokio::time::sleep(Duration::from_secs(1)).await;
        node.start_again().await;
        tokio::time::sleep(settle).await;
    }
    // Then a node dies.
    phase.store(1, Ordering::Relaxed);
    a.kill().await;
    tokio::time::sleep(settle).await;
    stop.store(true, Ordering::Relaxed);
    let (first_failures, acked) = publisher.await.unwrap();
    eprintln!(
        "rolling restart: {} publishes; first attempts failed: {} during the rolling restart, {} after the kill",
        acked.len(),
        first_failures[0],
        first_failures[1]
    );
    assert_eq!(
        first_failures[0], 0,
        "a publish failed during the rolling restart"
    );
    assert!(
        !nginx.error_log().contains("no live upstreams"),
        "{}",
        nginx.error_log()
    );
    // Each acknowledged event once, in order: seq i+1 is publish i.
    for (i, (n, seq)) in acked.iter().enumerate() {
        assert_eq!((*n, *seq), (i as u64, i as u64 + 1));
    }
    // The log, page by page (at most 1,000 events a read).
    let tok = support::token(&["acme"]);
    let (_, first) = b
        .api
        .get("/v1/orgs/acme/events?limit=0", Some(&tok))
        .await
        .unwrap();
    let epoch = first["epoch"].as_str().unwrap().to_string();
    let mut ns: Vec<u64> = Vec::new();
    loop {
        let path = format!("/v1/orgs/acme/events?since={epoch}:{}&limit=1000", ns.len());
        let (_, h) = b.api.get(&path, Some(&tok)).await.unwrap();
        let page = h["events"].as_array().unwrap();
        if page.is_empty() {
            break;
        }
        ns.extend(page.iter().map(|e| e["data"]["n"].as_u64().unwrap()));
    }
    assert_eq!(ns, (0..acked.len() as u64).collect::<Vec<_>>());
}
