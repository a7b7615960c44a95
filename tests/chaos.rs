//! Chaos soak: three real nodes on one redis-server behind nginx (UDP and TCP), a few hundred
//! WebTransport and WebSocket clients over many orgs, a steady publish rate, a random node
//! SIGKILLed (and restarted) every interval, and clients' links blackholed now and then. It
//! reports events acknowledged and delivered, lost, duplicated and reordered, and the time
//! to resume; the bar is 0 lost, 0 duplicated, 0 reordered, and every resume `recovered`.
//!
//! Bounded: loopback only, every wait has a deadline. `EDGESTREAM_CHAOS_SECS` (default 120)
//! and `EDGESTREAM_CHAOS_CLIENTS` (default 200) size the run; `scripts/chaos` runs the
//! 10-minute version documented in docs/RELIABILITY.md.

mod support;

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use edgestream_codec::{Frame, Resume};
use edgestream_testkit::ws::{Msg, WsClient};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use support::node::Node;
use support::relay::Relay;

const RESET_KEY: &str = "chaos-test-reset-key-0123456789abcdef";
const ORGS: usize = 24;
/// Events per second over all orgs.
const RATE: u64 = 60;

fn env_or(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn org(i: usize) -> String {
    format!("c{i:02}")
}

/// What one client saw of one org.
#[derive(Debug, Default, Clone)]
struct OrgSeen {
    /// The head at the first SUBSCRIBED: events after it are owed to the client.
    start: Option<u64>,
    last: u64,
    delivered: u64,
    duplicated: u64,
    /// Gaps and backward jumps.
    reordered: u64,
}

#[derive(Debug, Default)]
struct ClientSeen {
    orgs: BTreeMap<String, OrgSeen>,
    epoch: BTreeMap<String, String>,
    /// From noticing the loss to the SUBSCRIBED of the new session, per reconnect.
    resume_ms: Vec<u128>,
    /// What the client is (transport, relayed), for the report's slowest resumes.
    kind: String,
    /// Failed connection attempts, per reconnect (for the report's slowest resumes).
    attempts: Vec<u32>,
    pending_attempts: u32,
    errors: Vec<String>,
}

impl ClientSeen {
    fn event(&mut self, org: &str, seq: u64) {
        let o = self.orgs.entry(org.to_string()).or_default();
        if seq <= o.last {
            o.duplicated += 1;
            return;
        }
        if seq != o.last + 1 {
            o.reordered += 1;
        }
        o.last = seq;
        o.delivered += 1;
    }

    fn since(&self) -> String {
        self.orgs
            .iter()
            .filter(|(_, o)| o.start.is_some())
            .map(|(org, o)| format!("{org}:{}:{}", self.epoch[org], o.last))
            .collect::<Vec<_>>()
            .join(",")
    }

    fn caught_up(&self, heads: &HashMap<String, u64>) -> bool {
        self.orgs
            .iter()
            .all(|(org, o)| heads.get(org).is_some_and(|h| o.last >= *h))
    }
}

/// Everything a client needs to run.
struct ClientPlan {
    webtransport: bool,
    orgs: Vec<String>,
    /// Through a relay of its own (its link can be blackholed), else straight to nginx.
    relay: Option<Arc<Relay>>,
    nginx: (SocketAddr, SocketAddr),
    cert_hash: String,
}

/// Final heads, set once publishing stops; clients run until they reach them.
type Heads = Arc<Mutex<Option<HashMap<String, u64>>>>;

/// One client: connects, reads, and on any loss reconnects with its positions.
async fn run_client(plan: ClientPlan, heads: Heads, stop: Arc<AtomicBool>) -> ClientSeen {
    let mut seen = ClientSeen {
        kind: match (plan.webtransport, plan.relay.is_some()) {
            (true, true) => "webtransport, relayed".into(),
            (true, false) => "webtransport".into(),
            _ => "websocket".into(),
        },
        ..ClientSeen::default()
    };
    for org in &plan.orgs {
        seen.orgs.insert(org.clone(), OrgSeen::default());
    }
    let token = support::token(&plan.orgs.iter().map(String::as_str).collect::<Vec<_>>());
    let mut lost_at: Option<Instant> = None;
    loop {
        if stop.load(Ordering::Relaxed) {
            let behind: Vec<String> = seen
                .orgs
                .iter()
                .map(|(org, o)| format!("{org} at {}", o.last))
                .collect();
            let heads = heads.lock().unwrap().clone().unwrap_or_default();
            let want: Vec<String> = seen
                .orgs
                .keys()
                .map(|o| format!("{o} to {:?}", heads.get(o)))
                .collect();
            seen.errors.push(format!(
                "{} client stopped before catching up: {behind:?}, heads {want:?}",
                if plan.webtransport {
                    "webtransport"
                } else {
                    "websocket"
                }
            ));
            return seen;
        }
        let mut query = format!("access_token={token}&orgs={}", plan.orgs.join(","));
        let since = seen.since();
        if !since.is_empty() {
            query.push_str(&format!("&since={since}"));
        }
        let mut resubscribed = 0;
        if plan.webtransport {
            let addr = plan.relay.as_ref().map_or(plan.nginx.0, |r| r.addr);
            let url = format!("https://{addr}/v1/stream?{query}");
            let Ok(mut c) = edgestream_testkit::wt::connect(&url, &plan.cert_hash).await else {
                seen.pending_attempts += 1;
                lost_at.get_or_insert_with(Instant::now);
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            };
            let mut ping = tokio::time::interval(Duration::from_millis(500));
            loop {
                tokio::select! {
                    item = c.next_frame() => match item {
                        Ok(frame) => {
                            if on_frame(&mut seen, frame, &mut lost_at, &mut resubscribed, &heads) {
                                c.close(0);
                                return seen;
                            }
                        }
                        Err(_) => break,
                    },
                    // A browser client pings; so the link's state shows soon after a change.
                    _ = ping.tick() => {
                        if done(&seen, &heads) {
                            c.close(0);
                            return seen;
                        }
                        if stop.load(Ordering::Relaxed) {
                            break;
                        }
                        let _ = c.send_datagram(&Frame::Ping(bytes::Bytes::from_static(b"p")));
                    }
                }
            }
        } else {
            let url = format!("ws://{}/v1/stream?{query}", plan.nginx.1);
            let Ok(mut c) = WsClient::connect(&url).await else {
                seen.pending_attempts += 1;
                lost_at.get_or_insert_with(Instant::now);
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            };
            let mut check = tokio::time::interval(Duration::from_millis(500));
            loop {
                tokio::select! {
                    msg = c.next_non_heartbeat() => match msg {
                        Ok(Msg::Frame(frame)) => {
                            if on_frame(&mut seen, frame, &mut lost_at, &mut resubscribed, &heads) {
                                return seen;
                            }
                        }
                        Ok(_) => {}
                        Err(_) => break,
                    },
                    _ = check.tick() => {
                        if done(&seen, &heads) {
                            return seen;
                        }
                        if stop.load(Ordering::Relaxed) {
                            break;
                        }
                    }
                }
            }
        }
        lost_at.get_or_insert_with(Instant::now);
    }
}

/// Handles one frame; true when the client has everything up to the final heads.
fn on_frame(
    seen: &mut ClientSeen,
    frame: Frame,
    lost_at: &mut Option<Instant>,
    resubscribed: &mut usize,
    heads: &Heads,
) -> bool {
    match frame {
        Frame::Subscribed {
            org,
            epoch,
            head,
            resume,
        } => {
            let o = seen.orgs.entry(org.clone()).or_default();
            if o.start.is_none() {
                o.start = Some(head);
                o.last = head;
            } else if resume != Resume::Recovered {
                seen.errors.push(format!("{org}: resumed with {resume:?}"));
            }
            seen.epoch.insert(org, epoch);
            *resubscribed += 1;
            if *resubscribed == seen.orgs.len() {
                if let Some(t) = lost_at.take() {
                    seen.resume_ms.push(t.elapsed().as_millis());
                    seen.attempts.push(seen.pending_attempts);
                    seen.pending_attempts = 0;
                }
            }
        }
        Frame::Event { org, seq, .. } => seen.event(&org, seq),
        Frame::Reset { org, .. } => seen.errors.push(format!("{org}: RESET")),
        _ => {}
    }
    done(seen, heads)
}

/// Whether the final heads are known and the client has reached them.
fn done(seen: &ClientSeen, heads: &Heads) -> bool {
    heads
        .lock()
        .unwrap()
        .as_ref()
        .is_some_and(|h| seen.caught_up(h))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chaos_soak_loses_duplicates_and_reorders_nothing() {
    let secs = env_or("EDGESTREAM_CHAOS_SECS", 120);
    let clients = env_or("EDGESTREAM_CHAOS_CLIENTS", 200) as usize;
    let seed = env_or("EDGESTREAM_CHAOS_SEED", rand::random::<u32>() as u64);
    let kill_every = Duration::from_secs((secs / 3).clamp(20, 60));
    eprintln!("chaos: {secs} s, {clients} clients, {ORGS} orgs, {RATE} events/s, a node killed every {kill_every:?}, seed {seed}");
    let mut rng = StdRng::seed_from_u64(seed);

    let redis = support::redis::RedisServer::start();
    let dir = tempfile::tempdir().unwrap();
    let (cert, key, cert_hash) = support::node::cert_files(dir.path());
    let url = redis.url();
    let mut nodes = Vec::new();
    for id in ["01", "02", "03"] {
        let args = [
            "--redis",
            &url,
            "--cert",
            cert.to_str().unwrap(),
            "--key",
            key.to_str().unwrap(),
            "--server-id",
            id,
            "--reset-key",
            RESET_KEY,
            "--node-ttl",
            "2s",
            "--quic-idle-timeout",
            "5s",
            "--heartbeat",
            "1s",
        ];
        nodes.push(Node::spawn(&args).await);
    }
    let quic: Vec<SocketAddr> = nodes.iter().map(|n| n.quic).collect();
    let http: Vec<SocketAddr> = nodes.iter().map(|n| n.http).collect();
    let nginx = support::nginx::Nginx::start(&quic, &http);

    // Clients: half WebTransport (every fifth of those through a relay of its own), half
    // WebSocket; one or two orgs each.
    let heads: Heads = Arc::new(Mutex::new(None));
    let stop = Arc::new(AtomicBool::new(false));
    let mut relays = Vec::new();
    let mut tasks = Vec::new();
    for i in 0..clients {
        let webtransport = i % 2 == 0;
        let mut orgs = vec![org(i % ORGS)];
        if i % 3 == 0 {
            orgs.push(org((i * 7 + 5) % ORGS));
            orgs.dedup();
        }
        let relay = if webtransport && i % 10 == 0 {
            let r = Arc::new(Relay::start(nginx.udp).await);
            relays.push(r.clone());
            Some(r)
        } else {
            None
        };
        let plan = ClientPlan {
            webtransport,
            orgs,
            relay,
            nginx: (nginx.udp, nginx.tcp),
            cert_hash: cert_hash.clone(),
        };
        tasks.push(tokio::spawn(run_client(plan, heads.clone(), stop.clone())));
    }

    // Publishers: RATE events a second, round robin over the orgs, through nginx (any node).
    let acknowledged = Arc::new(AtomicU64::new(0));
    let refused = Arc::new(AtomicU64::new(0));
    let publishing = Arc::new(AtomicBool::new(true));
    let publisher = {
        let (acknowledged, refused, publishing) =
            (acknowledged.clone(), refused.clone(), publishing.clone());
        let api = edgestream_testkit::http::Api::new(format!("http://{}", nginx.tcp));
        let all: Vec<String> = (0..ORGS).map(org).collect();
        let token = support::token(&all.iter().map(String::as_str).collect::<Vec<_>>());
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(1000 / RATE));
            let mut n = 0u64;
            while publishing.load(Ordering::Relaxed) {
                tick.tick().await;
                let org = &all[(n as usize) % ORGS];
                let body = serde_json::json!({ "n": n });
                let sent = tokio::time::timeout(
                    Duration::from_secs(3),
                    api.publish_raw(&token, org, body.to_string(), None),
                )
                .await;
                match sent {
                    Ok(Ok((201, _))) => acknowledged.fetch_add(1, Ordering::Relaxed),
                    _ => refused.fetch_add(1, Ordering::Relaxed),
                };
                n += 1;
            }
        })
    };

    // Chaos: a random node killed and restarted every interval; a random relayed client's
    // link blackholed for 2 to 6 s every 10 s.
    let started = Instant::now();
    let mut next_kill = started + kill_every;
    let mut next_blackhole = started + Duration::from_secs(10);
    let (mut kills, mut blackholes) = (0, 0);
    while started.elapsed() < Duration::from_secs(secs) {
        tokio::time::sleep(Duration::from_millis(200)).await;
        if Instant::now() >= next_kill {
            let victim = rng.random_range(0..nodes.len());
            nodes[victim].kill().await;
            kills += 1;
            tokio::time::sleep(Duration::from_secs(3)).await;
            nodes[victim].restart().await;
            next_kill += kill_every;
        }
        if Instant::now() >= next_blackhole && !relays.is_empty() {
            let r = relays[rng.random_range(0..relays.len())].clone();
            let off = Duration::from_millis(rng.random_range(2000..6000));
            blackholes += 1;
            tokio::spawn(async move {
                r.blackhole(true);
                tokio::time::sleep(off).await;
                r.blackhole(false);
            });
            next_blackhole += Duration::from_secs(10);
        }
    }
    publishing.store(false, Ordering::Relaxed);
    publisher.await.unwrap();
    for r in &relays {
        r.blackhole(false);
    }

    // The final heads, then every client must reach them.
    let all: Vec<String> = (0..ORGS).map(org).collect();
    let ops = support::token(&all.iter().map(String::as_str).collect::<Vec<_>>());
    let mut final_heads = HashMap::new();
    for i in 0..ORGS {
        let (status, v) = nodes[0]
            .api
            .get(&format!("/v1/orgs/{}/events?limit=1", org(i)), Some(&ops))
            .await
            .unwrap();
        assert_eq!(status, 200, "{v}");
        final_heads.insert(org(i), v["head"].as_u64().unwrap());
    }
    let stored: u64 = final_heads.values().sum();
    *heads.lock().unwrap() = Some(final_heads);
    let catch_up = tokio::spawn({
        let stop = stop.clone();
        async move {
            tokio::time::sleep(Duration::from_secs(60)).await;
            stop.store(true, Ordering::Relaxed);
        }
    });
    let (mut delivered, mut lost, mut duplicated, mut reordered) = (0u64, 0u64, 0u64, 0u64);
    let mut resume_ms = Vec::new();
    let mut slowest: Vec<(u128, String, u32)> = Vec::new();
    let mut errors = Vec::new();
    let heads_now = heads.lock().unwrap().clone().unwrap();
    for t in tasks {
        let s = t.await.unwrap();
        for (org, o) in &s.orgs {
            delivered += o.delivered;
            duplicated += o.duplicated;
            reordered += o.reordered;
            let owed = heads_now[org] - o.start.unwrap_or(heads_now[org]);
            lost += owed.saturating_sub(o.delivered);
        }
        for (ms, attempts) in s.resume_ms.iter().zip(&s.attempts) {
            slowest.push((*ms, s.kind.clone(), *attempts));
        }
        resume_ms.extend(s.resume_ms);
        errors.extend(s.errors);
    }
    catch_up.abort();
    resume_ms.sort_unstable();
    let pct = |p: usize| {
        resume_ms
            .get((resume_ms.len() * p / 100).min(resume_ms.len().saturating_sub(1)))
            .copied()
            .unwrap_or(0)
    };
    let report = serde_json::json!({
        "seconds": secs, "clients": clients, "orgs": ORGS, "nodes": 3,
        "node_kills": kills, "link_blackholes": blackholes,
        "events_acknowledged": acknowledged.load(Ordering::Relaxed),
        "publishes_refused": refused.load(Ordering::Relaxed),
        "events_stored": stored,
        "deliveries": delivered, "lost": lost, "duplicated": duplicated, "reordered": reordered,
        "resumes": resume_ms.len(),
        "resume_ms": {"p50": pct(50), "p99": pct(99), "max": resume_ms.last().copied().unwrap_or(0)},
        "errors": errors.len(),
    });
    eprintln!("chaos report: {report}");
    slowest.sort_unstable_by_key(|s| std::cmp::Reverse(s.0));
    for (ms, kind, attempts) in slowest.iter().take(5) {
        eprintln!("chaos slowest resume: {ms} ms, {kind}, {attempts} failed connection attempts");
    }
    if let Ok(path) = std::env::var("EDGESTREAM_CHAOS_REPORT") {
        std::fs::write(path, serde_json::to_string_pretty(&report).unwrap()).unwrap();
    }
    assert!(
        errors.is_empty(),
        "{} errors, first: {:?}",
        errors.len(),
        &errors[..errors.len().min(5)]
    );
    assert_eq!((lost, duplicated, reordered), (0, 0, 0));
    assert!(kills >= 2, "nodes were killed");
    assert!(resume_ms.len() as u64 >= kills, "clients resumed");
}
