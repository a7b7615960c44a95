//! The QUIC listener against hostile peers and networks (issue 9): abusive connections stay
//! bounded in server memory, a connection that never opens a session is closed, 0-RTT is
//! refused, the server never sends more than 3x what it received from an unvalidated address,
//! and sessions keep their order through NAT rebinding, migration, a blackhole and loss
//! (through the UDP relay in `support::relay`).

mod support;

use std::sync::Arc;
use std::time::Duration;

use edgestream_codec::{Frame, Resume};
use edgestream_testkit::wt::{self, WtClient};
use serde_json::json;
use support::relay::Relay;
use support::TestServer;

/// A bare quinn client endpoint on loopback and its configuration, trusting this certificate.
fn quinn_client(cert_hash: &str, early_data: bool) -> (quinn::Endpoint, quinn::ClientConfig) {
    let mut crypto = wt::client_crypto(cert_hash).unwrap();
    crypto.enable_early_data = early_data;
    let config = quinn::ClientConfig::new(Arc::new(
        quinn::crypto::rustls::QuicClientConfig::try_from(crypto).unwrap(),
    ));
    let endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    (endpoint, config)
}

/// Peak and current resident memory of a process, in bytes.
fn memory_of(pid: u32) -> (u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let field = |name: &str| {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
            .unwrap()
            * 1024
    };
    (field("VmHWM:"), field("VmRSS:"))
}

async fn subscribed(c: &mut WtClient) -> (String, u64, Resume) {
    match c.next_frame().await.unwrap() {
        Frame::Subscribed {
            epoch,
            head,
            resume,
            ..
        } => (epoch, head, resume),
        other => panic!("expected SUBSCRIBED, got {other:?}"),
    }
}

/// 6.5 MB of events (400, round `round`) to acme; `reader` gets them all, in order.
async fn publish_400_events(
    node: &support::node::Node,
    token: &str,
    round: u64,
    reader: &mut WtClient,
) {
    let payload = "x".repeat(16 * 1024);
    for batch in 0..40 {
        let events: Vec<_> = (0..10)
            .map(|i| json!({"i": round * 400 + batch * 10 + i, "pad": payload}))
            .collect();
        let r = node
            .api
            .publish_raw(token, "acme", serde_json::to_vec(&events).unwrap(), None)
            .await
            .unwrap();
        assert_eq!(r.0, 201);
    }
    let seqs: Vec<u64> = reader
        .events(400)
        .await
        .unwrap()
        .iter()
        .map(|e| e.seq)
        .collect();
    assert_eq!(
        seqs,
        (round * 400 + 1..=round * 400 + 400).collect::<Vec<_>>()
    );
}

/// Ten authenticated clients subscribe, open every stream the server allows, fill what they
/// may and never read, while 6.5 MB of events go to their org: the node's peak memory grows
/// by a bounded amount per connection (measured against the same volume published before
/// they came, which the replay log keeps either way), and a well-behaved client still gets
/// every event.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn abusive_connections_stay_bounded_in_server_memory() {
    const ABUSERS: usize = 10;
    let node = support::node::Node::spawn(&[]).await;
    let hash = node.cert_hash().await;
    let token = support::token(&["acme"]);
    let url = format!(
        "https://{}/v1/stream?access_token={token}&orgs=acme",
        node.quic
    );
    let mut good = wt::connect(&url, &hash).await.unwrap();
    subscribed(&mut good).await;
    let (start, _) = memory_of(node.pid());
    publish_400_events(&node, &token, 0, &mut good).await;
    let (peak_before, _) = memory_of(node.pid());
    let without_abusers = peak_before - start;

    let (endpoint, config) = quinn_client(&hash, false);
    let client = web_transport_quinn::Client::new(endpoint, config);
    let mut held = Vec::new();
    let mut opened = (0, 0);
    for _ in 0..ABUSERS {
        let session = client
            .connect(url::Url::parse(&url).unwrap())
            .await
            .unwrap();
        // Every bidirectional stream it may open (the first is the control stream), silent.
        for _ in 0..64 {
            match tokio::time::timeout(Duration::from_millis(100), session.open_bi()).await {
                Ok(Ok(pair)) => {
                    opened.0 += 1;
                    held.push(Box::new(pair) as Box<dyn std::any::Any + Send>);
                }
                _ => break,
            }
        }
        // Every unidirectional stream, each filled until flow control stops it.
        for _ in 0..64 {
            let Ok(Ok(mut send)) =
                tokio::time::timeout(Duration::from_millis(100), session.open_uni()).await
            else {
                break;
            };
            opened.1 += 1;
            let chunk = vec![0x42u8; 64 * 1024];
            for _ in 0..64 {
                let write = send.write_all(&chunk);
                if !matches!(
                    tokio::time::timeout(Duration::from_millis(100), write).await,
                    Ok(Ok(()))
                ) {
                    break;
                }
            }
            held.push(Box::new(send));
        }
        held.push(Box::new(session));
    }
    assert!(
        opened.0 <= ABUSERS * 8 && opened.1 <= ABUSERS * 8,
        "streams opened by the abusers (bidi, uni): {opened:?}"
    );

    // The same volume again; the abusers read none of it.
    publish_400_events(&node, &token, 1, &mut good).await;
    let (peak_after, _) = memory_of(node.pid());
    let with_abusers = peak_after - peak_before;
    let per_connection = with_abusers.saturating_sub(without_abusers) / ABUSERS as u64;
    eprintln!(
        "abusive connections: {opened:?} streams opened; peak memory +{} KiB for 400 events \
         without them, +{} KiB with them: {} KiB per connection",
        without_abusers / 1024,
        with_abusers / 1024,
        per_connection / 1024
    );
    // Receive windows (1 MiB per connection) plus the send window (2 MiB) plus bookkeeping.
    assert!(
        per_connection < 4 << 20,
        "peak memory grew by {per_connection} bytes per abusive connection"
    );
    drop(held);
}

/// A QUIC connection that completes its handshake but never sends the WebTransport CONNECT
/// is closed by the server at `--quic-handshake-timeout`, long before the idle timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_that_never_opens_a_session_is_closed_at_the_deadline() {
    let s = TestServer::start_with(|a| {
        a.quic_handshake_timeout = Some("1s".parse().unwrap());
        a.quic_idle_timeout = Some("60s".parse().unwrap());
    })
    .await;
    let (endpoint, config) = quinn_client(&s.cert_hash().await, false);
    let conn = endpoint
        .connect_with(config, s.quic_addr, "localhost")
        .unwrap()
        .await
        .unwrap();
    let started = std::time::Instant::now();
    let reason = tokio::time::timeout(support::HANG_GUARD, conn.closed())
        .await
        .expect("the server closes the connection");
    assert!(
        matches!(
            reason,
            quinn::ConnectionError::ApplicationClosed(_)
                | quinn::ConnectionError::ConnectionClosed(_)
        ),
        "closed by the server, not timed out: {reason:?}"
    );
    assert!(started.elapsed() < Duration::from_secs(60));
}

/// 0-RTT: the same client configuration that sends early data to a bare quinn server with
/// early data on (the control: it proves the client tries) cannot to edgestream, whose
/// tickets allow none, so no session can be opened from replayable data.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn zero_rtt_is_refused() {
    /// Connects twice with one endpoint and configuration (the second time with the first
    /// connection's ticket); whether the second could send 0-RTT data.
    async fn second_connection_sends_0rtt(addr: std::net::SocketAddr, hash: &str) -> bool {
        let (endpoint, config) = quinn_client(hash, true);
        let first = endpoint
            .connect_with(config.clone(), addr, "localhost")
            .unwrap()
            .await
            .unwrap();
        // Tickets come after the handshake: a round trip on a stream lets them arrive.
        let _ = first.open_bi().await;
        tokio::time::sleep(Duration::from_millis(300)).await;
        first.close(0u32.into(), b"");
        let connecting = endpoint.connect_with(config, addr, "localhost").unwrap();
        match connecting.into_0rtt() {
            Ok((_conn, accepted)) => tokio::time::timeout(support::HANG_GUARD, accepted)
                .await
                .unwrap_or(false),
            Err(_) => false,
        }
    }

    // The control: a bare quinn server that accepts early data, with the same kind of
    // certificate.
    let dev = edgestream::tls::DevCertificate::generate(
        &["localhost".to_string()],
        time::OffsetDateTime::now_utc(),
        time::Duration::days(1),
    )
    .unwrap();
    let mut tls = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_protocol_versions(&[&rustls::version::TLS13])
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(
        vec![dev.cert_der.clone().into()],
        rustls::pki_types::PrivateKeyDer::Pkcs8(dev.key_der.clone().into()),
    )
    .unwrap();
    tls.alpn_protocols = vec![b"h3".to_vec()];
    tls.max_early_data_size = u32::MAX;
    let server = quinn::Endpoint::server(
        quinn::ServerConfig::with_crypto(Arc::new(
            quinn::crypto::rustls::QuicServerConfig::try_from(tls).unwrap(),
        )),
        "127.0.0.1:0".parse().unwrap(),
    )
    .unwrap();
    let control_addr = server.local_addr().unwrap();
    let acceptor = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Some(incoming) = server.accept().await {
            if let Ok(connecting) = incoming.accept() {
                if let Ok((conn, _)) = connecting.into_0rtt() {
                    held.push(conn);
                }
            }
        }
    });
    assert!(
        second_connection_sends_0rtt(control_addr, &dev.sha256_base64()).await,
        "the control server takes 0-RTT, so the client does try it"
    );
    acceptor.abort();

    let s = TestServer::start().await;
    assert!(
        !second_connection_sends_0rtt(s.quic_addr, &s.cert_hash().await).await,
        "edgestream accepted 0-RTT data"
    );
}

/// Before a client's address is validated, the server sends at most three times what it
/// received (RFC 9000 section 8): the relay forwards only the client's first packet and
/// counts what comes back, with and without Retry.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unvalidated_address_gets_at_most_three_times_what_it_sent() {
    for retry in [
        edgestream::webtransport::RetryPolicy::Never,
        edgestream::webtransport::RetryPolicy::Always,
    ] {
        let s = TestServer::start_with(|a| a.quic_retry = Some(retry)).await;
        let relay = Relay::start(s.quic_addr).await;
        relay.client_packets(1);
        let (endpoint, config) = quinn_client(&s.cert_hash().await, false);
        let connecting = endpoint
            .connect_with(config, relay.addr, "localhost")
            .unwrap();
        // The handshake cannot finish; the server retransmits its flight meanwhile.
        let _ = tokio::time::timeout(Duration::from_secs(3), connecting).await;
        let (sent, received) = (relay.forwarded_to_server(), relay.bytes().1);
        eprintln!("{retry:?}: client sent {sent} bytes, server answered {received}");
        assert!(sent >= 1200, "one padded Initial got through: {sent}");
        assert!(received > 0, "the server answered");
        assert!(
            received <= 3 * sent,
            "{retry:?}: {received} bytes sent to an unvalidated address that sent {sent}"
        );
    }
}

/// A WebTransport client of acme through `relay`, past its SUBSCRIBED (resuming from
/// `since` when given); returns the client and its epoch.
async fn via_relay(
    s: &TestServer,
    relay: &Relay,
    since: Option<(&str, u64)>,
) -> (WtClient, String, Resume) {
    let since = since.map_or(String::new(), |(e, q)| format!("&since=acme:{e}:{q}"));
    let url = format!(
        "https://{}/v1/stream?access_token={}&orgs=acme{since}",
        relay.addr,
        s.token(&["acme"])
    );
    let mut c = wt::connect(&url, &s.cert_hash().await).await.unwrap();
    let (epoch, _, resume) = subscribed(&mut c).await;
    (c, epoch, resume)
}

/// Publishes `{"i": i, "pad": ...}` (`pad` bytes) for each i in `range`, in batches of ten.
async fn publish_range(s: &TestServer, range: std::ops::Range<u64>, pad: usize) {
    let token = s.token(&["acme"]);
    let all: Vec<u64> = range.collect();
    let pad = "p".repeat(pad);
    for batch in all.chunks(10) {
        let events: Vec<_> = batch
            .iter()
            .map(|i| json!({ "i": i, "pad": pad }))
            .collect();
        s.api.publish(&token, "acme", &json!(events)).await.unwrap();
    }
}

fn seqs(c: &[edgestream_testkit::ws::Ev]) -> Vec<u64> {
    c.iter().map(|e| e.seq).collect()
}

/// NAT rebinding (a new source port) and migration (a new source address) keep the session:
/// no new SUBSCRIBED, every event once, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rebinding_and_migration_keep_the_session_and_its_order() {
    let s = TestServer::start().await;
    let relay = Relay::start(s.quic_addr).await;
    let (mut c, _, _) = via_relay(&s, &relay, None).await;
    publish_range(&s, 0..100, 0).await;
    assert_eq!(
        seqs(&c.events(100).await.unwrap()),
        (1..=100).collect::<Vec<_>>()
    );
    for (round, ip) in [[127, 0, 0, 1], [127, 0, 0, 2]].into_iter().enumerate() {
        let from = relay.rebind(ip.into()).await;
        // A client speaks after its address changed (a browser's PING, an ACK): the server
        // sees the new path there, validates it and moves the connection.
        c.send_datagram(&Frame::Ping(bytes::Bytes::from_static(b"rebound")))
            .unwrap();
        let first = 100 * (round as u64 + 1);
        publish_range(&s, first..first + 100, 0).await;
        assert_eq!(
            seqs(&c.events(100).await.unwrap()),
            (first + 1..=first + 100).collect::<Vec<_>>(),
            "after moving to {from}"
        );
    }
    let m = s.metrics().await;
    assert_eq!(
        m["sessions"]["webtransport"], 1,
        "one session all along: {m}"
    );
}

/// A 10 s blackhole in the middle of a steady stream ends without loss: the session either
/// survives it (QUIC retransmits) or the client resumes from its last position.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ten_second_blackhole_ends_without_loss() {
    let s = Arc::new(TestServer::start().await);
    let relay = Relay::start(s.quic_addr).await;
    let (mut c, mut epoch, _) = via_relay(&s, &relay, None).await;
    const TOTAL: u64 = 240;
    let publisher = {
        let s = s.clone();
        tokio::spawn(async move {
            // One event every 50 ms for 12 s.
            let token = s.token(&["acme"]);
            for i in 0..TOTAL {
                s.api
                    .publish(&token, "acme", &json!({ "i": i }))
                    .await
                    .unwrap();
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
    };
    let mut got: Vec<u64> = Vec::new();
    let mut resumed = 0;
    let mut blackholed = false;
    let started = std::time::Instant::now();
    while got.last() != Some(&TOTAL) {
        if !blackholed && started.elapsed() > Duration::from_secs(1) {
            relay.blackhole(true);
            blackholed = true;
            tokio::time::sleep(Duration::from_secs(10)).await;
            relay.blackhole(false);
            // The client speaks as a browser would after a quiet spell.
            let _ = c.send_datagram(&Frame::Ping(bytes::Bytes::from_static(b"back")));
        }
        match c.next_frame().await {
            Ok(Frame::Event { seq, .. }) => got.push(seq),
            Ok(other) => panic!("unexpected {other:?}"),
            Err(e) => {
                // The session did not survive: resume from the last position.
                assert!(resumed < 3, "resumed too often: {e}");
                resumed += 1;
                let last = got.last().copied().unwrap_or(0);
                let (nc, ne, resume) = via_relay(&s, &relay, Some((&epoch, last))).await;
                assert_eq!(resume, Resume::Recovered, "after {e}");
                (c, epoch) = (nc, ne);
            }
        }
    }
    publisher.await.unwrap();
    assert_eq!(
        got,
        (1..=TOTAL).collect::<Vec<_>>(),
        "resumed {resumed} times"
    );
    eprintln!(
        "10 s blackhole: {} events in order, resumed {resumed} times",
        got.len()
    );
}

/// 5% of packets lost each way, on a link with 20 ms of delay each way: every event still
/// arrives, once, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_percent_loss_still_delivers_everything_in_order() {
    let s = TestServer::start().await;
    let relay = Relay::start(s.quic_addr).await;
    let (mut c, _, _) = via_relay(&s, &relay, None).await;
    relay.loss(0.05);
    relay.delay(Duration::from_millis(20));
    publish_range(&s, 0..1000, 2000).await;
    assert_eq!(
        seqs(&c.events(1000).await.unwrap()),
        (1..=1000).collect::<Vec<_>>()
    );
    assert!(relay.lost() > 0, "the relay dropped packets");
    eprintln!(
        "5% loss: {} packets dropped, 1000 events in order",
        relay.lost()
    );
}

/// `--quic-retry auto` asks for address validation once new connections come faster than
/// `--quic-retry-above-rate` a second: in a burst of connections at a limit of 1 a second, the
/// first gets no Retry and a later one does, and both connect.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_is_asked_above_a_handshake_rate() {
    let s = TestServer::start_with(|a| a.quic_retry_above_rate = Some(1)).await;
    let hash = s.cert_hash().await;
    let token = s.token(&["acme"]);
    let mut relays = Vec::new();
    for _ in 0..4 {
        let relay = Relay::start(s.quic_addr).await;
        let url = format!(
            "https://{}/v1/stream?access_token={token}&orgs=acme",
            relay.addr
        );
        let mut c = wt::connect(&url, &hash).await.unwrap();
        subscribed(&mut c).await;
        relays.push((relay, c));
    }
    let retries: Vec<u64> = relays.iter().map(|(r, _)| r.retries()).collect();
    assert_eq!(
        retries[0], 0,
        "the first connection of the second: {retries:?}"
    );
    assert!(
        retries[1..].iter().any(|n| *n > 0),
        "a connection over the rate was asked to retry: {retries:?}"
    );
}
