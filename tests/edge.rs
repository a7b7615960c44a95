//! Nodes behind a UDP load balancer: connection IDs that carry the node's server id, and a
//! stateless reset from a surviving node (same `--reset-key`) for a dead node's client. Real
//! node processes killed with SIGKILL; the "balancer" is a UDP relay that can be retargeted.

mod support;

use edgestream_codec::Frame;
use support::node::Node;
use support::relay::Relay;

const RESET_KEY: &str = "edge-test-reset-key-0123456789abcdef";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_nodes_client_is_reset_by_a_peer_with_the_shared_key() {
    let mut a = Node::spawn(&["--server-id", "0a01", "--reset-key", RESET_KEY]).await;
    let b = Node::spawn(&["--server-id", "0a02", "--reset-key", RESET_KEY]).await;
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

    // a dies; the balancer sends the client's packets to b, which does not know the
    // connection and, sharing the key, resets it at once.
    a.kill().await;
    relay.retarget(b.quic);
    client
        .send_datagram(&Frame::Ping(bytes::Bytes::from_static(b"y")))
        .unwrap();
    let err = tokio::time::timeout(support::HANG_GUARD, client.session.closed())
        .await
        .expect("the client learns at once (no idle timeout)");
    assert!(
        err.to_string().contains("reset"),
        "a stateless reset, got: {err}"
    );
}
