//! `presence_storm`: N users connect to one org at once, half of them with `presence=1`,
//! against the same storm with nobody opted in, on a fresh node each. Reports the connect
//! time of both (goal: opted-in <= 1.3x), PRESENCE frames and bytes per opted-in client
//! against the bound the batching promises (one frame per presence interval the storm lasted,
//! plus the snapshot), 4008 closes (goal: 0) and the node's RSS.
//!
//! Before issue 18 every change went to every subscriber: 2,000 WebSocket users on one org made
//! 2,001,006 PRESENCE frames and took 34.5 s to connect against 3.3 s on distinct orgs.

use super::*;

/// The server's default `--presence-interval`.
const INTERVAL: Duration = Duration::from_millis(500);

/// Connects at once (bounded, so that the load does not measure its own backlog).
const IN_FLIGHT: usize = 256;

#[derive(Debug, Clone, serde::Serialize)]
pub(crate) struct StormRun {
    pub users: usize,
    pub opted_in: usize,
    /// From the first connect to the last SUBSCRIBED.
    pub connect_seconds: f64,
    /// PRESENCE frames per opted-in client: mean and most.
    pub frames_mean: f64,
    pub frames_max: u64,
    /// PRESENCE bytes (frame encoding) per opted-in client: mean and most.
    pub bytes_mean: f64,
    pub bytes_max: u64,
    /// Frames the batching allows an opted-in client: the intervals the storm lasted (the
    /// connects, then one interval to flush) plus the snapshot.
    pub frames_bound: u64,
    /// PRESENCE frames received by clients that did not opt in (goal: 0).
    pub frames_not_opted_in: u64,
    pub closed_4008: u64,
    pub rss_bytes: u64,
}

#[derive(Debug, Clone, serde::Serialize)]
pub(crate) struct PresenceStorm {
    pub transport: &'static str,
    pub nobody: StormRun,
    pub half: StormRun,
    /// Connect time with half opted in over connect time with nobody.
    pub connect_ratio: f64,
}

/// What one client saw.
#[derive(Default)]
struct Heard {
    frames: u64,
    bytes: u64,
    closed_4008: bool,
}

pub(crate) async fn presence_storm(
    cli: &Cli,
    transport: Transport,
    users: usize,
) -> anyhow::Result<PresenceStorm> {
    let nobody = storm(cli, transport, users, false).await?;
    let half = storm(cli, transport, users, true).await?;
    Ok(PresenceStorm {
        transport: transport.key(),
        connect_ratio: half.connect_seconds / nobody.connect_seconds.max(f64::MIN_POSITIVE),
        nobody,
        half,
    })
}

async fn storm(
    cli: &Cli,
    transport: Transport,
    users: usize,
    opt_in: bool,
) -> anyhow::Result<StormRun> {
    let es = start_edgestream(cli, 1000).await?;
    let connector = match transport {
        Transport::Wt => Some(Arc::new(wt::Connector::new(&es.cert)?)),
        Transport::Ws => None,
    };
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let gate = Arc::new(tokio::sync::Semaphore::new(IN_FLIGHT));
    let (up_tx, mut up_rx) = tokio::sync::mpsc::unbounded_channel::<anyhow::Result<()>>();
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..users {
        let listens = opt_in && i % 2 == 0;
        let t = token::hs256(
            SECRET.as_bytes(),
            &token::claims(&format!("user{i:05}"), &["storm"], "subscribe"),
        );
        let q = format!(
            "access_token={t}&orgs=storm{}",
            if listens { "&presence=1" } else { "" }
        );
        let ws_url = format!("ws://127.0.0.1:{}/v1/stream?{q}", es.http);
        let wt_url = format!("{}?{q}", es.wt_url);
        let (gate, up, connector, mut stop_rx) = (
            gate.clone(),
            up_tx.clone(),
            connector.clone(),
            stop_rx.clone(),
        );
        tasks.spawn(async move {
            let mut heard = Heard::default();
            // Held until SUBSCRIBED: at most IN_FLIGHT handshakes at once.
            let mut permit = Some(gate.acquire_owned().await);
            let count = |f: &Frame, heard: &mut Heard| {
                if matches!(f, Frame::Presence { .. }) {
                    heard.frames += 1;
                    heard.bytes += f.to_bytes().len() as u64;
                }
            };
            match connector {
                None => {
                    // Raw messages, counted by their frame type byte: the same count against
                    // a server of any version (1.0's PRESENCE had another body).
                    use futures_util::StreamExt;
                    use tokio_tungstenite::tungstenite::Message;
                    let mut c = match tokio_tungstenite::connect_async(ws_url.as_str()).await {
                        Ok((c, _)) => c,
                        Err(e) => {
                            let _ = up.send(Err(e.into()));
                            return (listens, heard);
                        }
                    };
                    let mut told = false;
                    loop {
                        tokio::select! {
                            _ = stop_rx.changed() => break,
                            m = c.next() => match m {
                                Some(Ok(Message::Binary(b))) => {
                                    if !told && b.first() == Some(&0x01) {
                                        told = true;
                                        permit.take();
                                        let _ = up.send(Ok(()));
                                    }
                                    if b.first() == Some(&0x09) {
                                        heard.frames += 1;
                                        heard.bytes += b.len() as u64;
                                    }
                                }
                                Some(Ok(Message::Close(f))) => {
                                    heard.closed_4008 = f.is_some_and(|f| u16::from(f.code) == 4008);
                                    break;
                                }
                                Some(Ok(_)) => {}
                                Some(Err(_)) | None => break,
                            }
                        }
                    }
                }
                Some(connector) => {
                    let mut c = match connector.connect(&wt_url).await {
                        Ok(c) => c,
                        Err(e) => {
                            let _ = up.send(Err(e));
                            return (listens, heard);
                        }
                    };
                    let mut told = false;
                    loop {
                        tokio::select! {
                            _ = stop_rx.changed() => break,
                            item = c.next_any_item() => match item {
                                Ok(wt::StreamItem::Frame { frame, .. }) => {
                                    if !told && matches!(frame, Frame::Subscribed { .. }) {
                                        told = true;
                                        permit.take();
                                        let _ = up.send(Ok(()));
                                    }
                                    count(&frame, &mut heard);
                                }
                                Ok(_) | Err(_) => {
                                    if let Ok(code) = c.closed_code().await {
                                        heard.closed_4008 = code == edgestream_codec::CloseCode::SlowConsumer;
                                    }
                                    break;
                                }
                            }
                        }
                    }
                }
            }
            (listens, heard)
        });
    }
    drop(up_tx);
    let mut up = 0;
    let deadline = started + Duration::from_secs(600);
    while up < users {
        match tokio::time::timeout_at(deadline.into(), up_rx.recv()).await {
            Ok(Some(Ok(()))) => up += 1,
            Ok(Some(Err(e))) => bail!("a client could not connect: {e:#}"),
            Ok(None) => bail!("clients ended before connecting"),
            Err(_) => bail!("{up} of {users} connected in 600 s"),
        }
    }
    let connect_seconds = started.elapsed().as_secs_f64();
    // The last batch goes at most one interval after the last change; give it two.
    tokio::time::sleep(INTERVAL * 2).await;
    let rss = rss_bytes(&es.proc);
    let (_, m) = es.api.get("/v1/metrics", None).await?;
    let _ = stop_tx.send(true);
    let mut listeners = Vec::new();
    let mut deaf_frames = 0;
    let mut closed_4008 = m["sessions_closed"]["4008"].as_u64().unwrap_or(0);
    let mut client_4008 = 0;
    while let Some(r) = tasks.join_next().await {
        let (listens, heard) = r?;
        client_4008 += u64::from(heard.closed_4008);
        if listens {
            listeners.push(heard);
        } else {
            deaf_frames += heard.frames;
        }
    }
    closed_4008 = closed_4008.max(client_4008);
    let n = listeners.len().max(1) as f64;
    let intervals = (connect_seconds / INTERVAL.as_secs_f64()).ceil() as u64 + 1;
    Ok(StormRun {
        users,
        opted_in: listeners.len(),
        connect_seconds,
        frames_mean: listeners.iter().map(|h| h.frames).sum::<u64>() as f64 / n,
        frames_max: listeners.iter().map(|h| h.frames).max().unwrap_or(0),
        bytes_mean: listeners.iter().map(|h| h.bytes).sum::<u64>() as f64 / n,
        bytes_max: listeners.iter().map(|h| h.bytes).max().unwrap_or(0),
        frames_bound: intervals + 1,
        frames_not_opted_in: deaf_frames,
        closed_4008,
        rss_bytes: rss,
    })
}
