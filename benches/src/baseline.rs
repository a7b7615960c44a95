//! The baselines: what a user could build from the bare libraries. Each runs as its own process
//! (so its CPU time is its own), accepts `subscribers` clients, then broadcasts `events`
//! pre-encoded EVENT frames (the same bytes edgestream sends) to all of them.

use std::sync::Arc;

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use tokio::net::TcpListener;
use tokio::sync::{broadcast, Barrier};
use tokio_tungstenite::tungstenite::Message;

/// The frames to broadcast: EVENT frames of org `bench` with `payload_bytes` payloads.
fn frames(events: u64, payload_bytes: usize) -> Vec<Bytes> {
    let pad = "x".repeat(payload_bytes.saturating_sub(16));
    (1..=events)
        .map(|seq| {
            let payload = format!(r#"{{"t":0,"p":"{pad}"}}"#);
            edgestream_codec::encode_event("bench", seq, 0, 0, payload.as_bytes())
        })
        .collect()
}

/// Sends the frames through a broadcast channel big enough that no receiver lags: every
/// frame at once, or (`rate` events/s) one at a time on a fixed schedule, each payload
/// stamped with its send time as edgestream's fixed-load publisher stamps it (unix micros in
/// `u`), so the load workers time both the same way.
async fn broadcast(tx: broadcast::Sender<Bytes>, events: u64, payload_bytes: usize, rate: f64) {
    if rate <= 0.0 {
        for f in frames(events, payload_bytes) {
            let _ = tx.send(f);
        }
        return;
    }
    let step = std::time::Duration::from_secs_f64(1.0 / rate);
    let start = tokio::time::Instant::now();
    for seq in 1..=events {
        tokio::time::sleep_until(start + step * (seq - 1) as u32).await;
        let payload = serde_json::to_vec(&crate::load::timed_payload()).unwrap_or_default();
        let _ = tx.send(edgestream_codec::encode_event("bench", seq, 0, 0, &payload));
    }
}

/// Bare tokio-tungstenite: one task per socket, writes coalesced and flushed when idle.
pub async fn websocket(
    subscribers: usize,
    events: u64,
    payload_bytes: usize,
    rate: f64,
) -> anyhow::Result<()> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    println!("ready {}", listener.local_addr()?.port());
    let (tx, _) = broadcast::channel::<Bytes>(events as usize + 16);
    let all = Arc::new(Barrier::new(subscribers + 1));
    for _ in 0..subscribers {
        let (tcp, _) = listener.accept().await?;
        tcp.set_nodelay(true)?;
        let mut rx = tx.subscribe();
        let all = all.clone();
        tokio::spawn(async move {
            let Ok(mut ws) = tokio_tungstenite::accept_async(tcp).await else {
                return;
            };
            all.wait().await;
            let mut sent = 0u64;
            while sent < events {
                let Ok(f) = rx.recv().await else { return };
                if ws.feed(Message::Binary(f)).await.is_err() {
                    return;
                }
                sent += 1;
                while let Ok(f) = rx.try_recv() {
                    if ws.feed(Message::Binary(f)).await.is_err() {
                        return;
                    }
                    sent += 1;
                }
                if ws.flush().await.is_err() {
                    return;
                }
            }
            while ws.next().await.is_some() {}
        });
    }
    all.wait().await;
    broadcast(tx, events, payload_bytes, rate).await;
    std::future::pending::<()>().await;
    Ok(())
}

/// Bare web-transport-quinn (the thinnest stack the same WebTransport clients can reach): one
/// unidirectional stream per session, writes batched.
pub async fn webtransport(
    subscribers: usize,
    events: u64,
    payload_bytes: usize,
    rate: f64,
) -> anyhow::Result<()> {
    let cert = edgestream::tls::DevCertificate::generate(
        &["localhost".into(), "127.0.0.1".into()],
        time::OffsetDateTime::now_utc(),
        time::Duration::days(10),
    )?;
    let chain = vec![rustls::pki_types::CertificateDer::from(
        cert.cert_der.clone(),
    )];
    let key = rustls::pki_types::PrivateKeyDer::Pkcs8(cert.key_der.clone().into());
    let mut server = web_transport_quinn::ServerBuilder::new()
        .with_addr("127.0.0.1:0".parse()?)
        .with_certificate(chain, key)?;
    // The same kernel socket buffers as edgestream's listener (with the defaults, a fan-out
    // burst drops datagrams at the socket and sessions stall).
    server.rebind(edgestream::webtransport::udp_socket(
        "127.0.0.1:0".parse()?,
        edgestream::webtransport::QuicConfig::default().socket_buffer,
    )?)?;
    println!(
        "ready {} {}",
        server.local_addr()?.port(),
        cert.sha256_base64()
    );
    let (tx, _) = broadcast::channel::<Bytes>(events as usize + 16);
    let all = Arc::new(Barrier::new(subscribers + 1));
    for _ in 0..subscribers {
        let Some(req) = server.accept().await else {
            anyhow::bail!("endpoint closed")
        };
        let mut rx = tx.subscribe();
        let all = all.clone();
        tokio::spawn(async move {
            let Ok(session) = req.ok().await else { return };
            let Ok(mut stream) = session.open_uni().await else {
                return;
            };
            all.wait().await;
            let mut sent = 0u64;
            let mut batch = Vec::new();
            while sent < events {
                let Ok(f) = rx.recv().await else { return };
                batch.push(f);
                while let Ok(f) = rx.try_recv() {
                    batch.push(f);
                }
                sent += batch.len() as u64;
                if stream.write_all_chunks(&mut batch).await.is_err() {
                    return;
                }
                batch.clear();
            }
            let _ = session.closed().await;
        });
    }
    all.wait().await;
    broadcast(tx, events, payload_bytes, rate).await;
    std::future::pending::<()>().await;
    Ok(())
}
