//! The state of a running node as the HTTP handlers see it. `server` builds it and `http`
//! reads it; its own module so that neither depends on the other through it.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use edgestream_ws::{OriginPolicy, WsConfig};
use tokio_util::task::TaskTracker;

use crate::config::Config;
use crate::session::SessionEnv;
use crate::webtransport::Certificates;

/// Shared state of a running node, as the HTTP handlers see it.
pub struct App {
    pub env: Arc<SessionEnv>,
    pub config: Config,
    /// The random HS256 secret of development mode.
    pub dev_secret: Option<Vec<u8>>,
    pub draining: AtomicBool,
    /// SIGTERM received: /readyz answers 503 for `--drain-delay` while the node still serves,
    /// then the drain begins.
    pub stopping: AtomicBool,
    pub sessions: TaskTracker,
    pub origins: OriginPolicy,
    pub ws: WsConfig,
    pub http_addr: SocketAddr,
    pub quic_addr: SocketAddr,
    /// The certificate served on UDP.
    pub certs: Arc<Certificates>,
}

impl App {
    /// Stopping or draining: /readyz 503, the `draining` metric 1.
    pub fn leaving(&self) -> bool {
        self.stopping.load(Ordering::Acquire) || self.draining.load(Ordering::Acquire)
    }
}
