//! A UDP relay for one client on loopback, with a switch that drops every packet (a
//! vanished client, a blackholed link), a switch of the server it forwards to (a balancer
//! sending a dead node's packets to another node), and the first bytes of the latest
//! client-to-server packet (to read connection IDs). Bounded: it stops when dropped.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use tokio::net::UdpSocket;

pub struct Relay {
    pub addr: SocketAddr,
    blackhole: Arc<AtomicBool>,
    server: Arc<Mutex<SocketAddr>>,
    last_from_client: Arc<Mutex<Vec<u8>>>,
    last_from_server: Arc<Mutex<Vec<u8>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Relay {
    /// Relays between clients of the returned address and `server`.
    pub async fn start(server: SocketAddr) -> Relay {
        let front = Arc::new(UdpSocket::bind("127.0.0.1:0").await.unwrap());
        let back = Arc::new(UdpSocket::bind("127.0.0.1:0").await.unwrap());
        let addr = front.local_addr().unwrap();
        let blackhole = Arc::new(AtomicBool::new(false));
        let server = Arc::new(Mutex::new(server));
        let last_from_client = Arc::new(Mutex::new(Vec::new()));
        let last_from_server = Arc::new(Mutex::new(Vec::new()));
        let (bh, to, last) = (blackhole.clone(), server.clone(), last_from_client.clone());
        let last_s = last_from_server.clone();
        let task = tokio::spawn(async move {
            let mut client: Option<SocketAddr> = None;
            let (mut a, mut b) = (vec![0u8; 65536], vec![0u8; 65536]);
            loop {
                tokio::select! {
                    r = front.recv_from(&mut a) => {
                        let Ok((n, from)) = r else { return };
                        client = Some(from);
                        *last.lock().unwrap() = a[..n.min(64)].to_vec();
                        if !bh.load(Ordering::Relaxed) {
                            let dest = *to.lock().unwrap();
                            let _ = back.send_to(&a[..n], dest).await;
                        }
                    }
                    r = back.recv_from(&mut b) => {
                        // Refused sends (a dead server's port) surface here as errors: ignore.
                        let Ok((n, _)) = r else { continue };
                        *last_s.lock().unwrap() = b[..n].to_vec();
                        if let (Some(c), false) = (client, bh.load(Ordering::Relaxed)) {
                            let _ = front.send_to(&b[..n], c).await;
                        }
                    }
                }
            }
        });
        Relay {
            addr,
            blackhole,
            server,
            last_from_client,
            last_from_server,
            task,
        }
    }

    /// Drops every packet from now on (true) or relays again (false).
    pub fn blackhole(&self, on: bool) {
        self.blackhole.store(on, Ordering::Relaxed);
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
