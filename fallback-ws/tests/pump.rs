//! The pump over a real loopback socket with a toy session: echo, limits, interrupts, idle.

use std::time::Duration;

use edgestream_ws::pump::{run_on, End};
use edgestream_ws::{Close, Incoming, Outgoing, WsConfig, WsSession};
use futures_util::{SinkExt, StreamExt};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch};
use tokio_tungstenite::tungstenite::Message;

/// Echoes every message; `interrupt` closes with its code; `push` sends server messages.
struct Echo {
    push: mpsc::Receiver<Outgoing>,
    interrupt: watch::Receiver<Option<u16>>,
}

impl WsSession for Echo {
    type Wake = Outgoing;
    type Payload = bytes::Bytes;

    async fn wait(&mut self) -> Outgoing {
        match self.push.recv().await {
            Some(m) => m,
            None => std::future::pending().await,
        }
    }

    async fn on_wake(&mut self, m: Outgoing, out: &mut Vec<Outgoing>) -> Result<(), Close> {
        out.push(m);
        Ok(())
    }

    async fn on_message(&mut self, m: Incoming, out: &mut Vec<Outgoing>) -> Result<(), Close> {
        out.push(m.into());
        Ok(())
    }

    fn interrupted(&self) -> impl std::future::Future<Output = Close> + Send + 'static {
        let mut rx = self.interrupt.clone();
        async move {
            let code = *rx
                .wait_for(|c| c.is_some())
                .await
                .expect("sender kept")
                .as_ref()
                .unwrap();
            Close::new(code, "interrupted")
        }
    }
}

struct Harness {
    url: String,
    push: mpsc::Sender<Outgoing>,
    interrupt: watch::Sender<Option<u16>>,
    server: tokio::task::JoinHandle<End>,
}

async fn serve(cfg: WsConfig) -> Harness {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("ws://{}/", listener.local_addr().unwrap());
    let (push_tx, push) = mpsc::channel(16);
    let (interrupt, irx) = watch::channel(None);
    let server = tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.unwrap();
        let ws = tokio_tungstenite::accept_async_with_config(tcp, Some(cfg.tungstenite()))
            .await
            .unwrap();
        run_on(
            ws,
            Echo {
                push,
                interrupt: irx,
            },
            &cfg,
        )
        .await
    });
    Harness {
        url,
        push: push_tx,
        interrupt,
        server,
    }
}

async fn close_code(
    ws: &mut tokio_tungstenite::WebSocketStream<
        tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>,
    >,
) -> u16 {
    loop {
        match tokio::time::timeout(Duration::from_secs(20), ws.next())
            .await
            .unwrap()
        {
            Some(Ok(Message::Close(Some(f)))) => return f.code.into(),
            Some(Ok(_)) => continue,
            other => panic!("no close frame: {other:?}"),
        }
    }
}

#[tokio::test]
async fn echoes_and_pushes() {
    let h = serve(WsConfig::default()).await;
    let (mut ws, _) = tokio_tungstenite::connect_async(&h.url).await.unwrap();
    ws.send(Message::Binary(vec![1, 2, 3].into()))
        .await
        .unwrap();
    assert_eq!(
        ws.next().await.unwrap().unwrap(),
        Message::Binary(vec![1, 2, 3].into())
    );
    ws.send(Message::Text("hi".into())).await.unwrap();
    assert_eq!(
        ws.next().await.unwrap().unwrap(),
        Message::Text("hi".into())
    );
    h.push.send(Outgoing::Text("pushed".into())).await.unwrap();
    assert_eq!(
        ws.next().await.unwrap().unwrap(),
        Message::Text("pushed".into())
    );
    // A client's close is answered with a close frame before the TCP connection ends (the
    // closing handshake; Autobahn counts a bare drop as unclean).
    ws.close(None).await.unwrap();
    assert!(
        matches!(ws.next().await, Some(Ok(Message::Close(_)))),
        "the server answers the close"
    );
    assert!(matches!(h.server.await.unwrap(), End::PeerClosed(_)));
}

#[tokio::test]
async fn oversized_message_closes_with_4413() {
    let cfg = WsConfig {
        max_message_size: 1000,
        max_frame_size: 1000,
        ..WsConfig::default()
    };
    let h = serve(cfg).await;
    let (mut ws, _) = tokio_tungstenite::connect_async(&h.url).await.unwrap();
    ws.send(Message::Binary(vec![0; 2000].into()))
        .await
        .unwrap();
    assert_eq!(close_code(&mut ws).await, 4413);
    assert!(matches!(h.server.await.unwrap(), End::Closed(c) if c.code == 4413));
}

#[tokio::test]
async fn interrupt_closes_even_when_the_client_reads_nothing() {
    let cfg = WsConfig {
        close_timeout: Duration::from_millis(300),
        ..WsConfig::default()
    };
    let h = serve(cfg).await;
    let (mut ws, _) = tokio_tungstenite::connect_async(&h.url).await.unwrap();
    // Fill the socket: the client does not read while the server pushes.
    let push = h.push.clone();
    tokio::spawn(async move {
        for _ in 0..10_000 {
            if push
                .send(Outgoing::Binary(vec![7; 64 * 1024].into()))
                .await
                .is_err()
            {
                break;
            }
        }
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    h.interrupt.send(Some(4008)).unwrap();
    let end = tokio::time::timeout(Duration::from_secs(20), h.server)
        .await
        .unwrap()
        .unwrap();
    assert!(
        matches!(end, End::Closed(ref c) if c.code == 4008),
        "{end:?}"
    );
    drop(ws.close(None).await);
}

#[tokio::test]
async fn silent_client_is_closed_at_the_idle_timeout() {
    let cfg = WsConfig {
        ping_interval: Duration::from_millis(50),
        idle_timeout: Duration::from_millis(200),
        ..WsConfig::default()
    };
    let h = serve(cfg).await;
    let (_ws, _) = tokio_tungstenite::connect_async(&h.url).await.unwrap();
    // Not reading means not answering pings.
    let end = tokio::time::timeout(Duration::from_secs(20), h.server)
        .await
        .unwrap()
        .unwrap();
    assert!(
        matches!(end, End::Closed(ref c) if c.code == 1001),
        "{end:?}"
    );
}

#[tokio::test]
async fn data_frames_of_every_length_encoding_arrive_intact() {
    let h = serve(WsConfig::default()).await;
    let (mut ws, _) = tokio_tungstenite::connect_async(&h.url).await.unwrap();
    // 7-bit, 16-bit and 64-bit lengths, at their edges; binary and text.
    let sizes = [0usize, 1, 125, 126, 127, 65_535, 65_536, 100_000];
    for (i, &n) in sizes.iter().enumerate() {
        let byte = b'a' + i as u8;
        h.push
            .send(Outgoing::Binary(vec![byte; n].into()))
            .await
            .unwrap();
        h.push
            .send(Outgoing::Text(vec![byte; n].into()))
            .await
            .unwrap();
    }
    for (i, &n) in sizes.iter().enumerate() {
        let byte = b'a' + i as u8;
        let want_text = String::from_utf8(vec![byte; n]).unwrap();
        assert_eq!(
            ws.next().await.unwrap().unwrap(),
            Message::Binary(vec![byte; n].into())
        );
        assert_eq!(
            ws.next().await.unwrap().unwrap(),
            Message::Text(want_text.into())
        );
    }
}

#[tokio::test]
async fn a_write_cut_by_the_interrupt_is_finished_before_the_close_frame() {
    let cfg = WsConfig {
        close_timeout: Duration::from_secs(10),
        ..WsConfig::default()
    };
    let h = serve(cfg).await;
    let (mut ws, _) = tokio_tungstenite::connect_async(&h.url).await.unwrap();
    // The client reads nothing until the server is stuck mid-write, then everything: every
    // message must be whole (a frame cut short would corrupt the stream) and the close last.
    let push = h.push.clone();
    tokio::spawn(async move {
        for _ in 0..1_000 {
            if push
                .send(Outgoing::Binary(vec![7; 64 * 1024 + 3].into()))
                .await
                .is_err()
            {
                break;
            }
        }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    h.interrupt.send(Some(4008)).unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    let mut whole = 0;
    let code = loop {
        match tokio::time::timeout(Duration::from_secs(20), ws.next())
            .await
            .unwrap()
        {
            Some(Ok(Message::Binary(b))) => {
                assert!(b.len() == 64 * 1024 + 3 && b.iter().all(|&x| x == 7));
                whole += 1;
            }
            Some(Ok(Message::Close(Some(f)))) => break u16::from(f.code),
            other => panic!("after {whole} messages: {other:?}"),
        }
    };
    assert_eq!(code, 4008);
    assert!(whole > 0);
    drop(ws); // the server's closing handshake ends with the connection
    let end = h.server.await.unwrap();
    assert!(
        matches!(end, End::Closed(ref c) if c.code == 4008),
        "{end:?}"
    );
}
