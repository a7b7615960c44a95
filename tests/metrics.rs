//! `/metrics` as Prometheus reads it: the body of a node that has served publishes, WebSocket
//! and WebTransport sessions and a resume, parsed by the Prometheus project's own Python
//! parsers (`prometheus_client`: the strict OpenMetrics parser, and the text 0.0.4 one), and
//! the histograms an operator watches carry those observations.

mod support;

use std::process::Stdio;

use edgestream_codec::Frame;
use serde_json::{json, Value};
use support::{python, TestServer};
use tokio::io::AsyncWriteExt;

/// Parses `body` with `parser` ("openmetrics" or "prometheus"); fails on any parse error.
async fn parse(parser: &str, body: &str) -> Value {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/metrics/parse.py");
    let mut child = tokio::process::Command::new(python())
        .arg(script)
        .arg(parser)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("run the parser");
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(body.as_bytes()).await.unwrap();
    drop(stdin);
    let out = child.wait_with_output().await.unwrap();
    assert!(
        out.status.success(),
        "{parser} parser refused /metrics: {}\n{body}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// The value of the sample `name` whose labels include `labels`.
fn sample(families: &Value, family: &str, name: &str, labels: &Value) -> f64 {
    let f = &families[family];
    assert!(f.is_object(), "no family {family}");
    f["samples"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| {
            s[0] == name
                && labels
                    .as_object()
                    .unwrap()
                    .iter()
                    .all(|(k, v)| &s[1][k] == v)
        })
        .unwrap_or_else(|| panic!("no sample {name} {labels} in {f}"))[2]
        .as_f64()
        .unwrap()
}

async fn scrape(s: &TestServer, accept: &str) -> (String, String) {
    let r = reqwest::Client::new()
        .get(format!("http://{}/metrics", s.addr))
        .header("accept", accept)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let ct = r.headers()["content-type"].to_str().unwrap().to_string();
    (ct, r.text().await.unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_parse_with_prometheus_parsers_and_histograms_record_the_data_path() {
    let s = TestServer::start().await;
    let tok = s.token(&["acme"]);
    // A WebSocket and a WebTransport subscriber, each sent one live event.
    let mut ws = s.client(&["acme"], "").await;
    support::subscribed(&mut ws).await;
    let mut wt = s.wt_client(&["acme"], "").await;
    let epoch = match wt.next_frame().await.unwrap() {
        Frame::Subscribed { epoch, .. } => epoch,
        f => panic!("expected SUBSCRIBED, got {f:?}"),
    };
    s.publish_numbered(&tok, "acme", 1..=3).await;
    assert_eq!(ws.events(3).await.unwrap().len(), 3);
    assert_eq!(wt.events(3).await.unwrap().len(), 3);
    // A resume that reads the log: from seq 1 it catches up 2 and 3.
    let mut resumed = s.client(&["acme"], &format!("since=acme:{epoch}:1")).await;
    support::subscribed(&mut resumed).await;
    assert_eq!(resumed.events(2).await.unwrap()[1].seq, 3);
    s.wait_metrics("the resumed session's replays counted", |m| {
        m["events_replayed"]["websocket"] == 2
    })
    .await;

    let om = "application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5";
    let (ct, text) = scrape(&s, om).await;
    assert!(ct.starts_with("application/openmetrics-text"), "{ct}");
    let f = parse("openmetrics", &text).await;
    let (ct, plain) = scrape(&s, "*/*").await;
    assert!(ct.starts_with("text/plain; version=0.0.4"), "{ct}");
    let p = parse("prometheus", &plain).await;

    // The same figures through both parsers.
    assert_eq!(
        sample(
            &f,
            "edgestream_events_published",
            "edgestream_events_published_total",
            &json!({})
        ),
        3.0
    );
    assert_eq!(
        sample(
            &p,
            "edgestream_events_published",
            "edgestream_events_published_total",
            &json!({})
        ),
        3.0
    );
    assert_eq!(f["edgestream_build"]["type"], "info");
    for (family, labels, at_least) in [
        (
            "edgestream_append_duration_seconds",
            json!({"log": "memory"}),
            1.0,
        ),
        (
            "edgestream_handshake_duration_seconds",
            json!({"transport": "websocket"}),
            2.0,
        ),
        (
            "edgestream_handshake_duration_seconds",
            json!({"transport": "webtransport"}),
            1.0,
        ),
        // The first live event of each session is timed (then one in 64).
        (
            "edgestream_delivery_latency_seconds",
            json!({"transport": "websocket"}),
            1.0,
        ),
        (
            "edgestream_delivery_latency_seconds",
            json!({"transport": "webtransport"}),
            1.0,
        ),
        (
            "edgestream_catch_up_duration_seconds",
            json!({"transport": "websocket"}),
            1.0,
        ),
    ] {
        for families in [&f, &p] {
            assert_eq!(families[family]["type"], "histogram", "{family}");
            let count = sample(families, family, &format!("{family}_count"), &labels);
            assert!(count >= at_least, "{family} {labels}: {count} observations");
            let mut inf = labels.clone();
            inf["le"] = json!("+Inf");
            assert_eq!(
                sample(families, family, &format!("{family}_bucket"), &inf),
                count
            );
        }
    }
    // No resume on WebTransport: its catch-up histogram is empty.
    assert_eq!(
        sample(
            &f,
            "edgestream_catch_up_duration_seconds",
            "edgestream_catch_up_duration_seconds_count",
            &json!({"transport": "webtransport"})
        ),
        0.0
    );
    dashboard_queries_only_series_that_exist(&f);
    s.stop().await.unwrap();
}

/// docs/grafana/edgestream.json queries only series this node exports (OpenMetrics families:
/// a counter family `x` has samples `x_total`; a histogram `x`, `x_bucket`, `x_sum`, `x_count`).
fn dashboard_queries_only_series_that_exist(families: &Value) {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/docs/grafana/edgestream.json");
    let dashboard: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let mut known = std::collections::BTreeSet::new();
    for (name, f) in families.as_object().unwrap() {
        let suffixes: &[&str] = match f["type"].as_str().unwrap() {
            "counter" => &["_total"],
            "histogram" => &["_bucket", "_sum", "_count"],
            "info" => &["_info"],
            _ => &[""],
        };
        known.extend(suffixes.iter().map(|s| format!("{name}{s}")));
    }
    let mut queried = 0;
    for panel in dashboard["panels"].as_array().unwrap() {
        for target in panel["targets"].as_array().unwrap() {
            let expr = target["expr"].as_str().unwrap();
            let mut rest = expr;
            while let Some(at) = rest.find("edgestream_") {
                let name: String = rest[at..]
                    .chars()
                    .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                    .collect();
                assert!(
                    known.contains(&name),
                    "{} queries {name}: not exported",
                    panel["title"]
                );
                queried += 1;
                rest = &rest[at + name.len()..];
            }
        }
    }
    assert!(queried >= 20, "only {queried} series queried");
}

/// A full QUIC receive buffer shows on `/metrics`: datagrams blasted at a node whose socket
/// buffer is the kernel's minimum overflow it, and the kernel's count of them is exported.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kernel_drops_at_the_quic_socket_are_counted() {
    let s = TestServer::start_with(|a| a.quic_socket_buffer = Some(2048)).await;
    let (_, m) = s.api.get("/v1/metrics", None).await.unwrap();
    assert_eq!(m["quic_socket_receive_drops"], 0, "{m}");
    let sock = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let junk = [0x40u8; 1200];
    let m = support::eventually("kernel drops counted", || async {
        // Bursts the node cannot read as fast (its socket holds two or three datagrams).
        for _ in 0..2_000 {
            let _ = sock.send_to(&junk, s.quic_addr);
        }
        let (_, m) = s.api.get("/v1/metrics", None).await.unwrap();
        (m["quic_socket_receive_drops"].as_u64() > Some(0)).then_some(m)
    })
    .await;
    let (_, text) = scrape(&s, "text/plain").await;
    assert!(
        text.lines()
            .any(|l| l.starts_with("edgestream_quic_socket_receive_drops_total ")),
        "{m}"
    );
    s.stop().await.unwrap();
}
