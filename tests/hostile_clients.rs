//! What a hostile client tried (issue 14) and what the server does now: floods that must not
//! grow memory, stored payloads that must not break reads, slow and idle HTTP clients, read
//! grants, long lists before authentication, development mode's token route, org churn.
//! docs/RELIABILITY.md ("Hostile clients") has the table.

mod support;

use edgestream_codec::CloseCode;

use std::time::Duration;

use bytes::Bytes;
use edgestream_testkit::ws::{Msg, WsClient};
use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use support::{token_for, TestServer, HANG_GUARD};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;

/// Resident memory of this process, in bytes.
fn rss() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap();
    kb * 1024
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_websocket_ping_flood_without_reading_is_closed_4008_in_bounded_memory() {
    let s = TestServer::start().await;
    let url = s.ws_url(&format!("access_token={}", s.token(&["acme"])));
    let (mut ws, _) = tokio_tungstenite::connect_async(url).await.unwrap();
    let before = rss();
    // 100-byte pings, never reading: the pongs pile up server-side once the socket is full.
    let ping = Bytes::from(vec![7u8; 100]);
    let mut sent = 0u64;
    let flood = async {
        for _ in 0..200_000u32 {
            if ws.feed(Message::Ping(ping.clone())).await.is_err() {
                break;
            }
            sent += 1;
            if sent % 256 == 0 && ws.flush().await.is_err() {
                break;
            }
        }
    };
    let _ = tokio::time::timeout(HANG_GUARD, flood).await;
    let m = s
        .wait_metrics("a 4008 close", |m| {
            m["sessions_closed"]["4008"] == 1 && m["sessions"]["websocket"] == 0
        })
        .await;
    let grown = rss().saturating_sub(before);
    eprintln!("sent {sent} pings; process RSS grew {} KiB", grown / 1024);
    assert!(
        grown < 16 << 20,
        "memory grew by {grown} bytes under the flood"
    );
    assert_eq!(m["sessions"]["websocket"], 0, "{m}");
}

/// Payloads that are valid JSON but that serde_json cannot hold as a value.
fn odd_payloads() -> Vec<String> {
    vec![
        r#"{"a":1e99999}"#.to_string(),
        format!(r#"{{"n":{}}}"#, "9".repeat(5000)),
        r#"{"s":"\ud800"}"#.to_string(),
    ]
}

/// The text of the next `n` JSON-format event messages on a WebSocket (raw: a test client that
/// parsed them into values could not hold `1e99999` either).
async fn json_event_texts(url: &str, n: usize) -> Vec<String> {
    let (mut ws, _) = tokio_tungstenite::connect_async(url).await.unwrap();
    let mut out = Vec::new();
    while out.len() < n {
        let m = tokio::time::timeout(HANG_GUARD, ws.next())
            .await
            .expect("an event in time")
            .expect("open")
            .expect("no error");
        if let Message::Text(t) = m {
            if t.as_str().starts_with(r#"{"t":"event""#) {
                out.push(t.as_str().to_string());
            }
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stored_payloads_are_carried_verbatim_on_every_read_path() {
    let s = TestServer::start().await;
    let t = s.token(&["acme"]);
    let payloads = odd_payloads();
    // Live subscribers on JSON WebSocket and WebTransport, before the publishes.
    let live_url = s.ws_url(&format!("access_token={t}&format=json"));
    let live = tokio::spawn(async move { json_event_texts(&live_url, 3).await });
    let mut wt = s.wt_client(&["acme"], "").await;
    assert!(matches!(
        wt.next_frame().await.unwrap(),
        edgestream_codec::Frame::Subscribed { .. }
    ));
    s.wait_metrics("2 sessions", |m| {
        m["sessions"]["websocket"] == 1 && m["sessions"]["webtransport"] == 1
    })
    .await;
    for p in &payloads {
        let (st, v) = s
            .api
            .publish_raw(&t, "acme", p.clone(), None)
            .await
            .unwrap();
        assert_eq!(st, 201, "{v}");
    }
    // History: 200, the payloads byte for byte.
    let res = s
        .api
        .client
        .get(format!("{}/v1/orgs/acme/events", s.api.base))
        .bearer_auth(&t)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    let body = res.text().await.unwrap();
    let epoch = body
        .split(r#""epoch":""#)
        .nth(1)
        .and_then(|r| r.split('"').next())
        .unwrap()
        .to_string();
    for p in &payloads {
        assert!(
            body.contains(&format!(r#""data":{p}}}"#)),
            "history lacks {p:.40}"
        );
    }
    // JSON WebSocket, live and replayed.
    let replay_url = s.ws_url(&format!(
        "access_token={t}&format=json&since=acme:{epoch}:0"
    ));
    for (name, texts) in [
        ("live", live.await.unwrap()),
        ("replay", json_event_texts(&replay_url, 3).await),
    ] {
        for (text, p) in texts.iter().zip(&payloads) {
            assert!(
                text.ends_with(&format!(r#""data":{p}}}"#)),
                "{name}: {text:.80}"
            );
        }
    }
    // WebTransport: the binary payloads as published.
    let evs = wt.events(3).await.unwrap();
    for (e, p) in evs.iter().zip(&payloads) {
        assert_eq!(e.payload, p.as_bytes(), "WebTransport");
    }
    // A chat body with a number serde_json would round is stored as sent.
    let chat_token = token_for("bob", &["acme"], "subscribe chat");
    let url = s.ws_url(&format!("access_token={chat_token}&format=json"));
    let mut bob = WsClient::connect(&url).await.unwrap();
    bob.send_text(
        r#"{"t":"chat","org":"acme","room":"r","id":"m1","body":{"n":12345678901234567890123}}"#,
    )
    .await
    .unwrap();
    let evs = wt.events(1).await.unwrap();
    let text = String::from_utf8(evs[0].payload.to_vec()).unwrap();
    assert!(
        text.contains(r#""body":{"n":12345678901234567890123}"#),
        "{text}"
    );
}

/// A server whose HTTP timeouts are short, so slow clients meet them within the test.
async fn short_timeouts(max_connections: usize) -> TestServer {
    TestServer::start_with(|a| {
        a.http_header_timeout = Some("1s".parse().unwrap());
        a.http_body_timeout = Some("1s".parse().unwrap());
        a.http_idle_timeout = Some("1s".parse().unwrap());
        a.max_connections = Some(max_connections);
    })
    .await
}

/// Reads until the server closes the connection; returns what it sent.
async fn read_until_closed(tcp: &mut TcpStream) -> String {
    let mut out = Vec::new();
    let r = tokio::time::timeout(HANG_GUARD, async {
        let mut buf = [0u8; 4096];
        loop {
            match tcp.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => out.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await;
    assert!(r.is_ok(), "the server kept the connection open");
    String::from_utf8_lossy(&out).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_and_idle_http_clients_are_cut_off() {
    let s = short_timeouts(1000).await;
    let t = s.token(&["acme"]);
    // A partial header.
    let mut tcp = TcpStream::connect(s.addr).await.unwrap();
    tcp.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();
    let got = read_until_closed(&mut tcp).await;
    assert!(!got.contains("200 OK"), "{got}");
    // A short body (Content-Length larger than what is sent): 408.
    let mut tcp = TcpStream::connect(s.addr).await.unwrap();
    let head = format!(
        "POST /v1/orgs/acme/events HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {t}\r\nContent-Length: 100\r\n\r\n{{\"a\":"
    );
    tcp.write_all(head.as_bytes()).await.unwrap();
    let got = read_until_closed(&mut tcp).await;
    assert!(got.starts_with("HTTP/1.1 408"), "{got}");
    assert!(got.contains(r#"{"error":"#), "{got}");
    // An endless chunked body, a byte at a time.
    let mut tcp = TcpStream::connect(s.addr).await.unwrap();
    let head = format!(
        "POST /v1/orgs/acme/events HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {t}\r\nTransfer-Encoding: chunked\r\n\r\n"
    );
    tcp.write_all(head.as_bytes()).await.unwrap();
    let (mut rd, mut wr) = tcp.into_split();
    let trickle = tokio::spawn(async move {
        for _ in 0..200 {
            if wr.write_all(b"1\r\n \r\n").await.is_err() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    });
    let mut got = Vec::new();
    let _ = tokio::time::timeout(HANG_GUARD, rd.read_to_end(&mut got)).await;
    trickle.abort();
    let got = String::from_utf8_lossy(&got);
    assert!(got.starts_with("HTTP/1.1 408"), "{got}");
    // An idle keep-alive connection after a request.
    let mut tcp = TcpStream::connect(s.addr).await.unwrap();
    tcp.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let got = read_until_closed(&mut tcp).await;
    assert!(got.starts_with("HTTP/1.1 200"), "{got}");
    // A request within the limits still works.
    let (st, _) = s
        .api
        .publish_raw(&t, "acme", r#"{"ok":1}"#, None)
        .await
        .unwrap();
    assert_eq!(st, 201);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_connection_cap_holds_and_health_still_answers() {
    let s = TestServer::start_with(|a| a.max_connections = Some(4)).await;
    let t = s.token(&["acme"]);
    // Four idle connections (a WebSocket among them) take every permit.
    let mut held = Vec::new();
    for _ in 0..3 {
        held.push(TcpStream::connect(s.addr).await.unwrap());
    }
    let _ws = s.client(&["acme"], "").await;
    // Metrics answer on the reserve once the cap is reached (so the poll itself counts).
    s.wait_metrics("the cap reached", |m| {
        m["http_connections_refused"].as_u64() >= Some(1)
    })
    .await;
    // Over the cap: health and metrics answer, the API says 503 with a reason.
    let fresh = edgestream_testkit::http::Api::new(s.api.base.clone());
    let (st, v) = fresh.get("/healthz", None).await.unwrap();
    assert_eq!((st, &v["status"]), (200, &json!("ok")));
    let (st, v) = fresh.get("/v1/orgs/acme/events", Some(&t)).await.unwrap();
    assert_eq!(st, 503, "{v}");
    assert!(v["error"]
        .as_str()
        .unwrap()
        .contains("too many connections"));
    let m = s.metrics().await;
    assert!(m["http_connections_refused"].as_u64().unwrap() >= 2, "{m}");
    // Freed permits serve the API again.
    drop(held);
    support::eventually("permits freed", || async {
        let api = edgestream_testkit::http::Api::new(s.api.base.clone());
        (api.get("/v1/orgs/acme/events", Some(&t)).await.unwrap().0 == 200).then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_star_grant_publishes_but_reads_nothing() {
    let uploads = tempfile::tempdir().unwrap();
    let s = TestServer::start_with(|a| a.upload_dir = Some(uploads.path().to_path_buf())).await;
    let star = token_for("mallory", &["*"], "subscribe publish chat upload");
    let named = token_for("alice", &["acme"], "subscribe publish upload");
    s.api
        .publish(&star, "acme", &json!({"x": 1}))
        .await
        .unwrap();
    // Someone is present, and an upload exists.
    let _alice = s.client(&["acme"], "").await;
    let res = s
        .api
        .client
        .put(format!("{}/v1/orgs/acme/uploads?name=f.txt", s.api.base))
        .bearer_auth(&named)
        .body("hello")
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 201);
    let id = res.json::<Value>().await.unwrap()["id"]
        .as_str()
        .unwrap()
        .to_string();
    for path in [
        "/v1/orgs/acme/events",
        "/v1/orgs/acme/presence",
        "/v1/orgs/acme/rooms/lobby",
    ] {
        let (st, v) = s.api.get(path, Some(&star)).await.unwrap();
        assert_eq!(st, 403, "{path}: {v}");
        assert_eq!(
            s.api.get(path, Some(&named)).await.unwrap().0,
            200,
            "{path}"
        );
    }
    let upload = format!("/v1/uploads/{id}");
    assert_eq!(s.api.get(&upload, Some(&star)).await.unwrap().0, 404);
    assert_eq!(s.api.get(&upload, Some(&named)).await.unwrap().0, 200);
    // JOIN's member list: refused over the WebSocket.
    let url = s.ws_url(&format!("access_token={star}&format=json&orgs="));
    let mut m = WsClient::connect(&url).await.unwrap();
    m.send_text(r#"{"t":"join","org":"acme","room":"lobby"}"#)
        .await
        .unwrap();
    let Msg::Json(v) = m.next_non_heartbeat().await.unwrap() else {
        panic!("not json")
    };
    assert_eq!(
        (&v["t"], &v["code"]),
        (&json!("error"), &json!(4003)),
        "{v}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn long_org_lists_are_refused_after_authentication_without_parsing() {
    let s = TestServer::start().await;
    // 17,000 names, one of them invalid, and a bad token: the token is checked first (4001);
    // before, the whole list was parsed (quadratically) and refused as malformed (4400).
    let mut orgs = vec!["o"; 17_000].join(",");
    orgs.push_str(",bad%20name");
    let url = s.ws_url(&format!("access_token=nope&orgs={orgs}"));
    let mut c = WsClient::connect(&url).await.unwrap();
    assert_eq!(
        c.expect_close_code().await.unwrap(),
        CloseCode::Unauthorized
    );
    // With a valid token, the list is refused by its length, whatever it holds.
    let url = s.ws_url(&format!("access_token={}&orgs={orgs}", s.token(&["o"])));
    let mut c = WsClient::connect(&url).await.unwrap();
    let (code, reason) = c.expect_close().await.unwrap();
    assert_eq!(code, 4400);
    assert!(reason.contains("at most 64"), "{reason}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dev_tokens_need_a_local_host_and_no_forwarding() {
    let s = TestServer::start_with(|a| {
        a.jwt_secret = None;
        a.dev = true;
    })
    .await;
    let get = |headers: Vec<(&'static str, &'static str)>| {
        let mut req = s
            .api
            .client
            .get(format!("{}/v1/dev/token?sub=a&orgs=acme", s.api.base));
        for (k, v) in headers {
            req = req.header(k, v);
        }
        async move { req.send().await.unwrap().status().as_u16() }
    };
    assert_eq!(get(vec![]).await, 200);
    assert_eq!(get(vec![("host", "localhost:8080")]).await, 200);
    assert_eq!(get(vec![("host", "rebound.example:8080")]).await, 403);
    assert_eq!(get(vec![("x-forwarded-for", "203.0.113.9")]).await, 403);
    assert_eq!(get(vec![("forwarded", "for=203.0.113.9")]).await, 403);
    // A ttl past the end of time is refused, not wrapped into the past.
    let (st, v) = s
        .api
        .get("/v1/dev/token?sub=a&ttl=18446744073709551615s", None)
        .await
        .unwrap();
    assert_eq!(st, 400, "{v}");
    // The temporary upload directory goes with the server.
    let dir = s.app.env.uploads.as_ref().unwrap().dir().to_path_buf();
    assert!(dir.exists());
    s.stop().await.unwrap();
    assert!(!dir.exists(), "{} left behind", dir.display());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_errors_are_json_and_small_inputs_behave() {
    let uploads = tempfile::tempdir().unwrap();
    let s = TestServer::start_with(|a| {
        a.allowed_origins = Some("https://app.example".parse().unwrap());
        a.upload_dir = Some(uploads.path().to_path_buf());
    })
    .await;
    let t = s.token(&["acme"]);
    s.api.publish(&t, "acme", &json!({"x": 1})).await.unwrap();
    // Bad query values: JSON errors.
    for q in ["limit=x", "limit=-1", "since=nope"] {
        let (st, v) = s
            .api
            .get(&format!("/v1/orgs/acme/events?{q}"), Some(&t))
            .await
            .unwrap();
        assert_eq!(st, 400, "{q}");
        assert!(v["error"].is_string(), "{q}: {v}");
    }
    // 405 too.
    let res = s
        .api
        .client
        .delete(format!("{}/v1/orgs/acme/events", s.api.base))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 405);
    assert!(res.json::<Value>().await.unwrap()["error"].is_string());
    // limit=0: the position, no events.
    let (st, v) = s
        .api
        .get("/v1/orgs/acme/events?limit=0", Some(&t))
        .await
        .unwrap();
    assert_eq!(
        (st, v["events"].as_array().unwrap().len(), &v["head"]),
        (200, 0, &json!(1))
    );
    // Two different tokens (header and query) are refused; the same twice is fine.
    let other = token_for("bob", &["acme"], "subscribe");
    let (st, _) = s
        .api
        .get(
            &format!("/v1/orgs/acme/events?access_token={other}"),
            Some(&t),
        )
        .await
        .unwrap();
    assert_eq!(st, 401);
    let (st, _) = s
        .api
        .get(&format!("/v1/orgs/acme/events?access_token={t}"), Some(&t))
        .await
        .unwrap();
    assert_eq!(st, 200);
    // /v1/info: an odd Host is not reflected; never cached.
    let res = s
        .api
        .client
        .get(format!("{}/v1/info", s.api.base))
        .header("host", "evil.example/x?")
        .send()
        .await
        .unwrap();
    assert_eq!(res.headers()["cache-control"], "no-store");
    let v: Value = res.json().await.unwrap();
    assert!(!v["websocket"].as_str().unwrap().contains("evil"), "{v}");
    // CORS: the allowed origin is echoed (never *), others get nothing and a 403 preflight.
    let pre = |origin: &'static str| {
        s.api
            .client
            .request(
                reqwest::Method::OPTIONS,
                format!("{}/v1/orgs/acme/events", s.api.base),
            )
            .header("origin", origin)
            .header("access-control-request-method", "POST")
            .header("access-control-request-headers", "authorization")
            .send()
    };
    let ok = pre("https://app.example").await.unwrap();
    assert_eq!(ok.status(), 204);
    assert_eq!(
        ok.headers()["access-control-allow-origin"],
        "https://app.example"
    );
    assert!(ok
        .headers()
        .get("access-control-allow-credentials")
        .is_none());
    assert_eq!(pre("https://evil.example").await.unwrap().status(), 403);
    let res = s
        .api
        .client
        .get(format!("{}/v1/orgs/acme/events", s.api.base))
        .bearer_auth(&t)
        .header("origin", "https://app.example")
        .send()
        .await
        .unwrap();
    assert_eq!(
        res.headers()["access-control-allow-origin"],
        "https://app.example"
    );
    // Upload names with control characters are refused.
    let res = s
        .api
        .client
        .put(format!("{}/v1/orgs/acme/uploads?name=a%0D%0Ab", s.api.base))
        .bearer_auth(&t)
        .body("hi")
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 400);
}

/// A binary node with a 1 s replay window: waves of fresh orgs, one event each.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn org_churn_does_not_grow_memory_wave_after_wave() {
    let node =
        support::node::Node::spawn(&["--replay-window", "1s", "--max-idle-orgs", "1000"]).await;
    let star = token_for("pub", &["*"], "publish");
    let mut after = Vec::new();
    for wave in 0..10u32 {
        let mut tasks = Vec::new();
        for w in 0..8u32 {
            let api = node.api.clone();
            let star = star.clone();
            tasks.push(tokio::spawn(async move {
                for i in 0..1250u32 {
                    let org = format!("w{wave}-{w}-{i}");
                    let (st, v) = api
                        .publish_raw(&star, &org, r#"{"e":1}"#, None)
                        .await
                        .unwrap();
                    assert_eq!(st, 201, "{v}");
                }
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        // Every org empties (1 s window) and leaves memory at a sweep.
        let m = support::eventually("every org leaves memory", || async {
            let (_, m) = node.api.get("/v1/metrics", None).await.unwrap();
            (m["log"]["events"] == 0 && m["log"]["orgs"] == 0).then_some(m)
        })
        .await;
        assert_eq!(m["log_idle_orgs"], 1000, "{m}");
        after.push(rss_of(node.pid()));
    }
    eprintln!("node RSS after each wave of 10,000 orgs: {after:?}");
    // Before: about 1 KiB per org ever seen, so +10 MiB a wave, every wave. Now RSS climbs
    // to the high-water mark of orgs alive at once (how many depends on how late the sweeps
    // run on a busy machine) and stays there: idle machine, 8 waves: +12.5, +5.4, +2.2, +1.0,
    // +0.5, +0.2, +0.1 MiB; loaded by other tests, 10 waves: +11, +13, +7, +2.7, +1.4, +0.8,
    // +0.9, +1.7, +0.7 MiB. The last three waves must add well under one wave of the old leak.
    assert!(
        after[9] < after[6] + (8 << 20),
        "RSS grew from {} to {} bytes over waves 7 to 10",
        after[6],
        after[9]
    );
}

/// Resident memory of another process, in bytes.
fn rss_of(pid: u32) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    s.lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
        .unwrap()
        * 1024
}

/// A retained event costs its own bytes, not the request it came in: payloads were slices of
/// the HTTP connection's read buffer, so each small event kept a share of an 8 KiB buffer (or
/// all of it) alive for as long as the replay log held it, beyond what `--replay-max-bytes`
/// counts. 20,000 events of 100 bytes in one org, published one per request over keep-alive
/// connections (the way a publisher's HTTP client sends them).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retained_event_costs_its_payload_not_its_request_buffer() {
    let node = support::node::Node::spawn(&["--replay-max-events", "100000"]).await;
    let t = token_for("pub", &["acme"], "publish");
    let before = rss_of(node.pid());
    const EVENTS: u64 = 20_000;
    let payload = format!(r#"{{"p":"{}"}}"#, "x".repeat(92));
    assert_eq!(payload.len(), 100);
    let mut tasks = Vec::new();
    for _ in 0..4 {
        let (api, t, payload) = (node.api.clone(), t.clone(), payload.clone());
        tasks.push(tokio::spawn(async move {
            for _ in 0..EVENTS / 4 {
                let (st, v) = api
                    .publish_raw(&t, "acme", payload.clone(), None)
                    .await
                    .unwrap();
                assert_eq!(st, 201, "{v}");
            }
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
    let (_, m) = node.api.get("/v1/metrics", None).await.unwrap();
    assert_eq!(m["log"]["events"], EVENTS, "{m}");
    let per_event = rss_of(node.pid()).saturating_sub(before) / EVENTS;
    eprintln!("node RSS per retained 100-byte event: {per_event} B");
    // The event (about 150 B), its payload (100 B and the allocator's header) and its slot:
    // measured 300-400 B. Before: 1,000-2,000 B (request headers, token and neighbours'
    // bytes kept with it).
    assert!(
        per_event < 800,
        "{per_event} B of RSS per retained 100-byte event"
    );
}

/// After a crowd of sessions has left, the node gives most of their memory back to the OS
/// (src/heap.rs). Before: glibc kept every freed page, so RSS stayed at the crowd's peak
/// (bench, 19,000 WebSocket sessions: 7,701 B per session still resident after all closed;
/// 20,000 WebTransport sessions: 36,814 B); with the trim, 3,186 B and 4,665 B.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_of_closed_sessions_goes_back_to_the_os() {
    let node = support::node::Node::spawn(&[]).await;
    let t = token_for("sub", &["acme"], "subscribe");
    let url = format!("ws://{}/v1/stream?access_token={t}&orgs=acme", node.http);
    let before = rss_of(node.pid());
    const SESSIONS: usize = 3_000;
    let sockets: Vec<_> = futures_util::stream::iter(0..SESSIONS)
        .map(|_| {
            let url = url.clone();
            async move {
                let (mut ws, _) = tokio_tungstenite::connect_async(url).await.unwrap();
                // SUBSCRIBED: the session is open and holds its state.
                let first = tokio::time::timeout(HANG_GUARD, ws.next()).await.unwrap();
                assert!(matches!(first, Some(Ok(Message::Binary(_)))), "{first:?}");
                ws
            }
        })
        .buffer_unordered(64)
        .collect()
        .await;
    let open = rss_of(node.pid());
    drop(sockets);
    support::eventually("every session closed", || async {
        let (_, m) = node.api.get("/v1/metrics", None).await.unwrap();
        (m["sessions"]["websocket"] == 0).then_some(())
    })
    .await;
    // One heap check of the node (every 5 s) and a margin.
    tokio::time::sleep(edgestream::heap::CHECK_EVERY + Duration::from_secs(2)).await;
    let closed = rss_of(node.pid());
    let (grown, kept) = (open.saturating_sub(before), closed.saturating_sub(before));
    eprintln!(
        "node RSS: +{} KiB with {SESSIONS} sessions open, +{} KiB after they closed",
        grown / 1024,
        kept / 1024
    );
    assert!(grown > 4 << 20, "the sessions cost {grown} B");
    assert!(
        kept < grown * 7 / 10,
        "{kept} of {grown} bytes still resident after every session closed"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_claims_hostile_providers_send() {
    use edgestream_testkit::token;
    let s = TestServer::start_with(|a| {
        a.jwt_audience = Some("edge".into());
        a.jwt_max_lifetime = Some("1h".parse().unwrap());
    })
    .await;
    let base = |f: &dyn Fn(&mut Value)| {
        let mut c = token::claims("alice", &["acme"], "subscribe publish");
        c["aud"] = json!("edge");
        f(&mut c);
        token::hs256(support::SECRET.as_bytes(), &c)
    };
    let status = |tok: String| {
        let api = s.api.clone();
        async move { api.get("/v1/orgs/acme/events", Some(&tok)).await.unwrap().0 }
    };
    assert_eq!(status(base(&|_| {})).await, 200);
    // aud as an array, as many identity providers issue it.
    assert_eq!(
        status(base(&|c| c["aud"] = json!(["other", "edge"]))).await,
        200
    );
    assert_eq!(status(base(&|c| c["aud"] = json!(["other"]))).await, 401);
    // exp far out: over --jwt-max-lifetime.
    assert_eq!(status(base(&|c| c["exp"] = json!(u64::MAX))).await, 401);
    // Scopes split on ASCII spaces only: a tab does not grant publish.
    let tab = base(&|c| c["scope"] = json!("subscribe\tpublish"));
    let (st, _) = s.api.publish_raw(&tab, "acme", "{}", None).await.unwrap();
    assert_eq!(st, 403);
}

/// A misspelt key variable must not start an open server: no key and no `--dev` is an error
/// that names the variable.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_misspelt_key_variable_stops_the_start_and_is_named() {
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_edgestream"))
        .args([
            "serve",
            "--http-listen",
            "127.0.0.1:0",
            "--quic-listen",
            "127.0.0.1:0",
        ])
        .env("EDGESTREAM_JWT_SECERT", "typo-secret-0123456789abcdef")
        .env_remove("EDGESTREAM_JWT_SECRET")
        .output();
    let out = tokio::time::timeout(HANG_GUARD, out)
        .await
        .unwrap()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "it started: {stderr}");
    assert!(stderr.contains("--dev"), "{stderr}");
    assert!(stderr.contains("EDGESTREAM_JWT_SECERT"), "{stderr}");
    // A server that does start (here in development mode) warns about it.
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_edgestream"))
        .args(["serve", "--dev", "--http-listen", "127.0.0.1:0"])
        .args(["--quic-listen", "127.0.0.1:0"])
        .env("EDGESTREAM_JWT_SECERT", "typo-secret-0123456789abcdef")
        .env("EDGESTREAM_LOG", "warn")
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines =
        tokio::io::AsyncBufReadExt::lines(tokio::io::BufReader::new(child.stderr.take().unwrap()));
    let warned = tokio::time::timeout(HANG_GUARD, async {
        while let Ok(Some(line)) = lines.next_line().await {
            if line.contains("unknown EDGESTREAM_ variable")
                && line.contains("EDGESTREAM_JWT_SECERT")
            {
                return true;
            }
        }
        false
    })
    .await;
    let _ = child.kill().await;
    assert_eq!(
        warned.ok(),
        Some(true),
        "no warning about the unknown variable"
    );
    // --dev on a public address is refused too.
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_edgestream"))
        .args(["serve", "--dev", "--http-listen", "0.0.0.0:0"])
        .output();
    let out = tokio::time::timeout(HANG_GUARD, out)
        .await
        .unwrap()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("loopback"));
}

/// Out of file descriptors (a cap set above what the process may open): accepts fail, the
/// listener backs off instead of spinning, counts the failures, and serves again once
/// descriptors are free.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn accept_failures_back_off_and_the_listener_recovers() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let cmd = format!(
        "ulimit -n 64 && exec {} serve --http-listen 127.0.0.1:{port} --quic-listen 127.0.0.1:0 \
         --max-connections 1000",
        env!("CARGO_BIN_EXE_edgestream")
    );
    let mut child = tokio::process::Command::new("sh")
        .args(["-c", &cmd])
        .env("EDGESTREAM_JWT_SECRET", support::SECRET)
        .env("EDGESTREAM_LOG", "error")
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let api = edgestream_testkit::http::Api::new(format!("http://127.0.0.1:{port}"));
    support::eventually("the node starts", || async {
        api.get("/healthz", None).await.ok().map(drop)
    })
    .await;
    // More connections than descriptors: the kernel queues them, accept fails with EMFILE.
    let mut held = Vec::new();
    for _ in 0..100 {
        if let Ok(c) = TcpStream::connect(("127.0.0.1", port)).await {
            held.push(c);
        }
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    drop(held);
    // Descriptors free again: the listener serves, and it counted what failed.
    let m = support::eventually("the node serves again", || async {
        let fresh = edgestream_testkit::http::Api::new(api.base.clone());
        match fresh.get("/v1/metrics", None).await {
            Ok((200, m)) => Some(m),
            _ => None,
        }
    })
    .await;
    assert!(m["http_accept_errors"].as_u64() >= Some(1), "{m}");
    let _ = child.kill().await;
}
