//! A WebSocket client of `/v1/stream`, binary or JSON format.

use std::io::Read as _;

use anyhow::{bail, Context as _};
use bytes::Bytes;
use edgestream_codec::{Frame, FLAG_BROTLI};
use futures_util::{SinkExt, StreamExt};
use serde_json::Value;
use tokio::net::{TcpSocket, TcpStream};
use tokio_tungstenite::tungstenite::{client::IntoClientRequest, http::HeaderValue, Message};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

use crate::HANG_GUARD;

/// One message from the server.
#[derive(Debug, Clone, PartialEq)]
pub enum Msg {
    Frame(Frame),
    Json(Value),
    Close(Option<u16>, String),
}

/// An event as the client sees it, whichever the format.
#[derive(Debug, Clone, PartialEq)]
pub struct Ev {
    pub org: String,
    pub seq: u64,
    pub ts: u64,
    /// The payload after brotli decoding.
    pub payload: Bytes,
    pub compressed: bool,
}

/// The read buffer of a test client. tungstenite fills the free part of its read buffer with
/// zeros before every `read` (`FrameCodec::read_in` in tungstenite 0.29), so with its default
/// of 128 KiB a client that receives one small event per read zeroes 128 KiB per event: in the
/// bench's fixed-load run (1,000 clients, one 150-byte event per read) that memset was 28% of
/// a load worker's CPU (perf). 16 KiB still takes a hundred 144-byte events per read when a
/// client is behind.
const READ_BUFFER: usize = 16 * 1024;

fn client_config() -> tokio_tungstenite::tungstenite::protocol::WebSocketConfig {
    tokio_tungstenite::tungstenite::protocol::WebSocketConfig::default()
        .read_buffer_size(READ_BUFFER)
}

pub struct WsClient {
    ws: WebSocketStream<MaybeTlsStream<TcpStream>>,
}

/// Connection options.
#[derive(Debug, Default, Clone)]
pub struct Options {
    pub headers: Vec<(String, String)>,
    /// SO_RCVBUF for a client that wants to fall behind quickly.
    pub recv_buffer: Option<u32>,
    /// The local address to connect from (load tests spread clients over 127.0.0.x: one
    /// source address has about 28,000 ephemeral ports).
    pub bind: Option<std::net::IpAddr>,
}

impl WsClient {
    /// Connects to a `ws://` URL (with its query).
    pub async fn connect(url: &str) -> anyhow::Result<Self> {
        Self::connect_with(url, &Options::default()).await
    }

    pub async fn connect_with(url: &str, opts: &Options) -> anyhow::Result<Self> {
        let mut req = url.into_client_request()?;
        for (k, v) in &opts.headers {
            req.headers_mut().insert(
                tokio_tungstenite::tungstenite::http::HeaderName::from_bytes(k.as_bytes())?,
                HeaderValue::from_str(v)?,
            );
        }
        let host = req.uri().host().context("url host")?.to_string();
        let port = req.uri().port_u16().unwrap_or(80);
        let addr = tokio::net::lookup_host((host.as_str(), port))
            .await?
            .next()
            .context("resolve")?;
        let socket = if addr.is_ipv4() {
            TcpSocket::new_v4()?
        } else {
            TcpSocket::new_v6()?
        };
        if let Some(n) = opts.recv_buffer {
            socket.set_recv_buffer_size(n)?;
        }
        if let Some(ip) = opts.bind {
            socket.bind(std::net::SocketAddr::new(ip, 0))?;
        }
        let stream = tokio::time::timeout(HANG_GUARD, socket.connect(addr)).await??;
        stream.set_nodelay(true)?;
        let (ws, _) = tokio::time::timeout(
            HANG_GUARD,
            tokio_tungstenite::client_async_with_config(
                req,
                MaybeTlsStream::Plain(stream),
                Some(client_config()),
            ),
        )
        .await??;
        Ok(WsClient { ws })
    }

    /// The next message, skipping WebSocket ping/pong.
    pub async fn next(&mut self) -> anyhow::Result<Msg> {
        loop {
            let msg = tokio::time::timeout(HANG_GUARD, self.ws.next())
                .await
                .context("no message from the server in time")?;
            let msg = match msg {
                None => bail!("connection ended without a close frame"),
                Some(Err(e)) => bail!("websocket error: {e}"),
                Some(Ok(m)) => m,
            };
            return Ok(match msg {
                Message::Binary(b) => Msg::Frame(Frame::decode_exact(b, 1 << 24)?),
                Message::Text(t) => Msg::Json(serde_json::from_str(t.as_str())?),
                Message::Close(c) => match c {
                    Some(f) => Msg::Close(Some(f.code.into()), f.reason.to_string()),
                    None => Msg::Close(None, String::new()),
                },
                _ => continue,
            });
        }
    }

    /// The next message that is neither a heartbeat nor a presence change (PRESENCE goes to
    /// every subscriber of an org; tests of presence read [`Self::next`]). Heartbeats do not
    /// extend the hang guard.
    pub async fn next_non_heartbeat(&mut self) -> anyhow::Result<Msg> {
        let wait = async {
            loop {
                match self.next().await? {
                    Msg::Frame(Frame::Heartbeat { .. } | Frame::Presence { .. }) => continue,
                    Msg::Json(v) if v["t"] == "heartbeat" || v["t"] == "presence" => continue,
                    other => return Ok(other),
                }
            }
        };
        tokio::time::timeout(HANG_GUARD, wait)
            .await
            .context("only heartbeats from the server, for the whole hang guard")?
    }

    pub async fn send_frame(&mut self, f: &Frame) -> anyhow::Result<()> {
        self.ws.send(Message::Binary(f.to_bytes())).await?;
        Ok(())
    }

    pub async fn send_binary(&mut self, b: impl Into<Bytes>) -> anyhow::Result<()> {
        self.ws.send(Message::Binary(b.into())).await?;
        Ok(())
    }

    pub async fn send_text(&mut self, s: &str) -> anyhow::Result<()> {
        self.ws.send(Message::Text(s.into())).await?;
        Ok(())
    }

    /// Reads until the server closes; returns the close code and reason. Other messages are
    /// discarded.
    pub async fn expect_close(&mut self) -> anyhow::Result<(u16, String)> {
        let deadline = tokio::time::Instant::now() + HANG_GUARD;
        loop {
            anyhow::ensure!(
                tokio::time::Instant::now() < deadline,
                "no close from the server in time"
            );
            if let Msg::Close(code, reason) = self.next().await? {
                // Send the closing-handshake reply tungstenite queued, so the server is not
                // left waiting for it.
                let _ = self.ws.flush().await;
                return Ok((code.unwrap_or(1005), reason));
            }
        }
    }

    /// Waits for the server's close; its code as one of the contract's (an error otherwise).
    pub async fn expect_close_code(&mut self) -> anyhow::Result<edgestream_codec::CloseCode> {
        let (code, reason) = self.expect_close().await?;
        edgestream_codec::CloseCode::from_code(code)
            .with_context(|| format!("close code {code} ({reason}) is not the contract's"))
    }

    /// Collects `n` events (any org), skipping heartbeats and presence, failing on anything else.
    pub async fn events(&mut self, n: usize) -> anyhow::Result<Vec<Ev>> {
        let mut out = Vec::with_capacity(n);
        while out.len() < n {
            match self.next_non_heartbeat().await? {
                Msg::Frame(f) => match as_event(f)? {
                    Some(e) => out.push(e),
                    None => bail!("expected an event"),
                },
                Msg::Json(v) if v["t"] == "event" => out.push(json_event(&v)?),
                other => bail!("expected an event, got {other:?}"),
            }
        }
        Ok(out)
    }

    pub async fn close(mut self) {
        let _ = self.ws.close(None).await;
    }
}

/// An EVENT frame as an [`Ev`] (payload decompressed); `None` for other frames.
pub fn as_event(f: Frame) -> anyhow::Result<Option<Ev>> {
    let Frame::Event {
        org,
        seq,
        ts,
        flags,
        payload,
    } = f
    else {
        return Ok(None);
    };
    let compressed = flags & FLAG_BROTLI != 0;
    let payload = if compressed {
        let mut plain = Vec::new();
        brotli::Decompressor::new(&payload[..], 4096).read_to_end(&mut plain)?;
        Bytes::from(plain)
    } else {
        payload
    };
    Ok(Some(Ev {
        org,
        seq,
        ts,
        payload,
        compressed,
    }))
}

/// A JSON-format event message as an [`Ev`] (`data` re-serialised compactly).
pub fn json_event(v: &Value) -> anyhow::Result<Ev> {
    Ok(Ev {
        org: v["org"].as_str().context("org")?.to_string(),
        seq: v["seq"].as_u64().context("seq")?,
        ts: v["ts"].as_u64().context("ts")?,
        payload: Bytes::from(serde_json::to_vec(&v["data"])?),
        compressed: false,
    })
}
