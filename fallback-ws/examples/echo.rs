//! A WebSocket echo server on the edgestream pump and limits (`WsConfig::default()`, the
//! configuration `/v1/stream` uses), for conformance runs: `scripts/autobahn` points the
//! Autobahn test suite at it. Test-only: the real server has no echo route.
//!
//! Usage: `cargo run -p edgestream-ws --example echo -- 127.0.0.1:9001 [MAX_MESSAGE_BYTES]`
//! (the second argument raises the message and frame limits, to show that the pump carries
//! messages of any size; without it the limits are the server's).

use edgestream_ws::pump::run_on;
use edgestream_ws::{Close, Incoming, Outgoing, WsConfig, WsSession};
use tokio::net::TcpListener;

/// Sends every message back as it came.
struct Echo;

impl WsSession for Echo {
    type Wake = ();
    type Payload = bytes::Bytes;

    async fn wait(&mut self) {
        std::future::pending().await
    }

    async fn on_wake(&mut self, _: (), _: &mut Vec<Outgoing>) -> Result<(), Close> {
        Ok(())
    }

    async fn on_message(&mut self, m: Incoming, out: &mut Vec<Outgoing>) -> Result<(), Close> {
        out.push(m.into());
        Ok(())
    }

    fn interrupted(&self) -> impl std::future::Future<Output = Close> + Send + 'static {
        std::future::pending()
    }
}

#[tokio::main]
async fn main() -> std::io::Result<()> {
    let addr = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:9001".into());
    let listener = TcpListener::bind(&addr).await?;
    eprintln!("echo on ws://{}", listener.local_addr()?);
    let mut cfg = WsConfig::default();
    if let Some(max) = std::env::args().nth(2).and_then(|m| m.parse().ok()) {
        cfg.max_message_size = max;
        cfg.max_frame_size = max;
        cfg.max_send_message = max;
    }
    loop {
        let (tcp, _) = listener.accept().await?;
        let cfg = cfg.clone();
        tokio::spawn(async move {
            let _ = tcp.set_nodelay(true);
            if let Ok(ws) =
                tokio_tungstenite::accept_async_with_config(tcp, Some(cfg.tungstenite())).await
            {
                run_on(ws, Echo, &cfg).await;
            }
        });
    }
}
