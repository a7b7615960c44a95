//! A real `edgestream serve` process on free loopback ports (for tests that kill nodes),
//! killed when dropped.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use edgestream_testkit::http::Api;

use super::SECRET;

pub struct Node {
    pub http: SocketAddr,
    pub quic: SocketAddr,
    pub api: Api,
    child: Option<tokio::process::Child>,
}

fn free_tcp() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port()
}

fn free_udp() -> u16 {
    let s = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    s.local_addr().unwrap().port()
}

impl Node {
    /// Starts a node with the test secret and `extra` flags; waits until it is healthy.
    pub async fn spawn(extra: &[&str]) -> Node {
        Self::spawn_logging(extra, "warn", None).await
    }

    /// Like [`Self::spawn`], logging at `level` (`EDGESTREAM_LOG`) into `log` (stdout and
    /// stderr) when given.
    pub async fn spawn_logging(extra: &[&str], level: &str, log: Option<&std::path::Path>) -> Node {
        let (http, quic): (SocketAddr, SocketAddr) = (
            format!("127.0.0.1:{}", free_tcp()).parse().unwrap(),
            format!("127.0.0.1:{}", free_udp()).parse().unwrap(),
        );
        let (stdout, stderr) = match log {
            Some(path) => {
                let f = std::fs::File::create(path).expect("log file");
                (f.try_clone().unwrap().into(), f.into())
            }
            None => (std::process::Stdio::null(), std::process::Stdio::inherit()),
        };
        let child = tokio::process::Command::new(env!("CARGO_BIN_EXE_edgestream"))
            .args(["serve", "--http-listen", &http.to_string()])
            .args(["--quic-listen", &quic.to_string()])
            .args(extra)
            .env("EDGESTREAM_JWT_SECRET", SECRET)
            .env("EDGESTREAM_LOG", level)
            .stdout(stdout)
            .stderr(stderr)
            .kill_on_drop(true)
            .spawn()
            .expect("spawn edgestream");
        let api = Api::new(format!("http://{http}"));
        let start = Instant::now();
        while !matches!(api.get("/healthz", None).await, Ok((200, _))) {
            assert!(
                start.elapsed() < Duration::from_secs(20),
                "node did not start"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Node {
            http,
            quic,
            api,
            child: Some(child),
        }
    }

    pub async fn cert_hash(&self) -> String {
        let (_, v) = self.api.get("/v1/cert-hash", None).await.unwrap();
        v["value"].as_str().unwrap().to_string()
    }

    /// The process id (for reading its memory from /proc).
    pub fn pid(&self) -> u32 {
        self.child.as_ref().and_then(|c| c.id()).unwrap_or(0)
    }

    /// SIGKILL: the node vanishes without closing anything.
    pub async fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill().await;
        }
    }
}
