//! A UDP relay for one client on loopback, written for the network-fault tests: it can drop
//! every packet (a vanished client, a blackholed link), drop a share of them (a lossy link,
//! from a seeded generator so a run can be repeated), delay them, stop forwarding the
//! client's packets after a count (a spoofed source that never answers), move its
//! server-facing socket to a new port or address (NAT rebinding, migration), and forward to
//! another server (a balancer sending a dead node's packets elsewhere). It counts bytes both
//! ways and keeps the first bytes of the latest client packet (to read connection IDs).
//! Bounded: it stops when dropped.

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::net::UdpSocket;
use tokio::sync::watch;

#[derive(Default)]
struct Faults {
    blackhole: AtomicBool,
    /// Packets dropped per 10,000, each direction.
    loss: AtomicU64,
    delay_ms: AtomicU64,
    /// Client packets forwarded before the rest are dropped (`u64::MAX`: no limit).
    client_packets_left: AtomicU64,
    from_client_bytes: AtomicU64,
    to_server_bytes: AtomicU64,
    from_server_bytes: AtomicU64,
    /// Packets dropped by the loss setting.
    lost: AtomicU64,
    /// QUIC v1 Retry packets from the server.
    retries: AtomicU64,
    /// Bytes received per server address.
    by_server: Mutex<std::collections::HashMap<SocketAddr, u64>>,
    rng: Mutex<u64>,
}

impl Faults {
    /// Whether to drop this packet under the configured loss (xorshift, seeded).
    fn lose(&self) -> bool {
        let loss = self.loss.load(Ordering::Relaxed);
        if loss == 0 {
            return false;
        }
        let mut s = self.rng.lock().unwrap();
        *s ^= *s << 13;
        *s ^= *s >> 7;
        *s ^= *s << 17;
        let lose = *s % 10_000 < loss;
        if lose {
            self.lost.fetch_add(1, Ordering::Relaxed);
        }
        lose
    }
}

pub struct Relay {
    pub addr: SocketAddr,
    faults: Arc<Faults>,
    server: Arc<Mutex<SocketAddr>>,
    last_from_client: Arc<Mutex<Vec<u8>>>,
    last_from_server: Arc<Mutex<Vec<u8>>>,
    /// The server-facing socket; replacing it is a rebinding.
    back: watch::Sender<Arc<UdpSocket>>,
    task: tokio::task::JoinHandle<()>,
}

/// Sends now, or after `delay` from a task of its own (order is kept: the delay is fixed).
fn forward(socket: &Arc<UdpSocket>, data: &[u8], to: SocketAddr, delay: u64) {
    let socket = socket.clone();
    let data = data.to_vec();
    if delay == 0 {
        let _ = socket.try_send_to(&data, to);
        return;
    }
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(delay)).await;
        let _ = socket.send_to(&data, to).await;
    });
}

impl Relay {
    /// Relays between clients of the returned address and `server`.
    pub async fn start(server: SocketAddr) -> Relay {
        let front = Arc::new(UdpSocket::bind("127.0.0.1:0").await.unwrap());
        let back = Arc::new(UdpSocket::bind("127.0.0.1:0").await.unwrap());
        let addr = front.local_addr().unwrap();
        let faults = Arc::new(Faults {
            client_packets_left: AtomicU64::new(u64::MAX),
            rng: Mutex::new(0x2545_f491_4f6c_dd1d),
            ..Faults::default()
        });
        let server = Arc::new(Mutex::new(server));
        let last_from_client = Arc::new(Mutex::new(Vec::new()));
        let last_from_server = Arc::new(Mutex::new(Vec::new()));
        let (back_tx, mut back_rx) = watch::channel(back);
        let (f, to, last) = (faults.clone(), server.clone(), last_from_client.clone());
        let last_s = last_from_server.clone();
        let task = tokio::spawn(async move {
            let mut client: Option<SocketAddr> = None;
            let (mut a, mut b) = (vec![0u8; 65536], vec![0u8; 65536]);
            let mut back = back_rx.borrow_and_update().clone();
            loop {
                tokio::select! {
                    r = front.recv_from(&mut a) => {
                        let Ok((n, from)) = r else { return };
                        client = Some(from);
                        f.from_client_bytes.fetch_add(n as u64, Ordering::Relaxed);
                        *last.lock().unwrap() = a[..n.min(64)].to_vec();
                        let allowed = f
                            .client_packets_left
                            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |left| {
                                left.checked_sub(1)
                            })
                            .is_ok();
                        if allowed && !f.blackhole.load(Ordering::Relaxed) && !f.lose() {
                            f.to_server_bytes.fetch_add(n as u64, Ordering::Relaxed);
                            let dest = *to.lock().unwrap();
                            forward(&back, &a[..n], dest, f.delay_ms.load(Ordering::Relaxed));
                        }
                    }
                    r = back.recv_from(&mut b) => {
                        // Refused sends (a dead server's port) surface here as errors: ignore.
                        let Ok((n, from)) = r else { continue };
                        f.from_server_bytes.fetch_add(n as u64, Ordering::Relaxed);
                        *f.by_server.lock().unwrap().entry(from).or_default() += n as u64;
                        // Long header (bit 7), packet type 3 (bits 4-5): Retry.
                        if b[0] & 0x80 != 0 && (b[0] >> 4) & 0x3 == 3 {
                            f.retries.fetch_add(1, Ordering::Relaxed);
                        }
                        *last_s.lock().unwrap() = b[..n].to_vec();
                        if let (Some(c), false) = (client, f.blackhole.load(Ordering::Relaxed)) {
                            if !f.lose() {
                                forward(&front, &b[..n], c, f.delay_ms.load(Ordering::Relaxed));
                            }
                        }
                    }
                    changed = back_rx.changed() => {
                        if changed.is_err() {
                            return;
                        }
                        back = back_rx.borrow_and_update().clone();
                    }
                }
            }
        });
        Relay {
            addr,
            faults,
            server,
            last_from_client,
            last_from_server,
            back: back_tx,
            task,
        }
    }

    /// Drops every packet from now on (true) or relays again (false).
    pub fn blackhole(&self, on: bool) {
        self.faults.blackhole.store(on, Ordering::Relaxed);
    }

    /// Drops this share of packets (0.0 to 1.0) in each direction from now on.
    pub fn loss(&self, share: f64) {
        let per_10k = (share.clamp(0.0, 1.0) * 10_000.0) as u64;
        self.faults.loss.store(per_10k, Ordering::Relaxed);
    }

    /// Delays every packet by this much from now on.
    pub fn delay(&self, delay: Duration) {
        self.faults
            .delay_ms
            .store(delay.as_millis() as u64, Ordering::Relaxed);
    }

    /// Forwards only the next `n` client packets; the rest are dropped.
    pub fn client_packets(&self, n: u64) {
        self.faults.client_packets_left.store(n, Ordering::Relaxed);
    }

    /// Bytes received from the client and from the server so far.
    pub fn bytes(&self) -> (u64, u64) {
        (
            self.faults.from_client_bytes.load(Ordering::Relaxed),
            self.faults.from_server_bytes.load(Ordering::Relaxed),
        )
    }

    /// Retry packets the server sent so far.
    pub fn retries(&self) -> u64 {
        self.faults.retries.load(Ordering::Relaxed)
    }

    /// Bytes received from this server address so far.
    pub fn bytes_from(&self, server: SocketAddr) -> u64 {
        let by = self.faults.by_server.lock().unwrap();
        by.get(&server).copied().unwrap_or(0)
    }

    /// Packets dropped by [`Self::loss`] so far.
    pub fn lost(&self) -> u64 {
        self.faults.lost.load(Ordering::Relaxed)
    }

    /// Bytes forwarded to the server so far.
    pub fn forwarded_to_server(&self) -> u64 {
        self.faults.to_server_bytes.load(Ordering::Relaxed)
    }

    /// Moves the server-facing side to a new socket on `ip` (a new port, and a new address
    /// when `ip` differs): the server sees the client's packets come from elsewhere, as after
    /// a NAT rebinding or a client's migration. Returns the new address.
    pub async fn rebind(&self, ip: IpAddr) -> SocketAddr {
        let socket = Arc::new(UdpSocket::bind((ip, 0)).await.unwrap());
        let addr = socket.local_addr().unwrap();
        self.back.send_replace(socket);
        addr
    }

    /// Forwards the client's packets to another server from now on.
    pub fn retarget(&self, server: SocketAddr) {
        *self.server.lock().unwrap() = server;
    }

    /// The latest packet from the server, whole.
    pub fn last_from_server(&self) -> Vec<u8> {
        self.last_from_server.lock().unwrap().clone()
    }

    /// The first bytes of the latest packet from the client.
    pub fn last_from_client(&self) -> Vec<u8> {
        self.last_from_client.lock().unwrap().clone()
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.task.abort();
    }
}
