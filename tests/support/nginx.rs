//! A real nginx (Debian's, with its stream module) as the edge balancer for a test, configured
//! with the documented `deploy/nginx.conf`: UDP for QUIC and TCP for HTTP/WebSocket, round
//! robin over the nodes. Runs in the foreground in a temporary directory; killed when dropped.

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct Nginx {
    pub udp: SocketAddr,
    pub tcp: SocketAddr,
    child: Child,
    dir: tempfile::TempDir,
}

const STREAM_MODULE: &str = "/usr/lib/nginx/modules/ngx_stream_module.so";

/// `deploy/nginx.conf` (the documented configuration) for these nodes: each upstream's
/// example `server` line becomes one line per node (same parameters), the listeners move to
/// `udp` and `tcp`.
fn documented_config(
    quic: &[SocketAddr],
    http: &[SocketAddr],
    udp: SocketAddr,
    tcp: SocketAddr,
) -> String {
    let doc = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/nginx.conf"))
        .expect("deploy/nginx.conf");
    let mut out = String::new();
    for line in doc.lines() {
        let t = line.trim_start();
        let indent = &line[..line.len() - t.len()];
        let replaced = if let Some(rest) = t.strip_prefix("server 10.0.0.11:") {
            // `4433 max_fails=...;`: the port says which upstream.
            let (port, params) = rest.split_once(' ').expect("server line parameters");
            let nodes = if port == "4433" { quic } else { http };
            nodes
                .iter()
                .map(|a| format!("{indent}server {a} {params}\n"))
                .collect()
        } else if t.starts_with("server 10.0.0.") {
            String::new()
        } else if t.starts_with("listen 443 udp") {
            format!("{indent}{}\n", t.replacen("443", &udp.to_string(), 1))
        } else if t.starts_with("listen 443;") {
            format!("{indent}{}\n", t.replacen("443", &tcp.to_string(), 1))
        } else if t.starts_with("events {") {
            // The machine's open-file limit, not a production balancer's.
            format!("{indent}events {{ worker_connections 8192; }}\n")
        } else {
            format!("{line}\n")
        };
        out.push_str(&replaced);
    }
    for (what, addr) in [("udp", udp), ("tcp", tcp)] {
        assert!(
            out.contains(&format!("listen {addr}")),
            "no {what} listener in deploy/nginx.conf"
        );
    }
    out
}

impl Nginx {
    /// Balances UDP over `quic` and TCP over `http` (one entry per node) with the documented
    /// configuration (`deploy/nginx.conf`).
    pub fn start(quic: &[SocketAddr], http: &[SocketAddr]) -> Nginx {
        Self::start_at(quic, http, Self::free_addresses())
    }

    /// Free loopback addresses for nginx's UDP and TCP listeners (for nodes that must name
    /// them in `--public-*-url` before nginx starts).
    pub fn free_addresses() -> (SocketAddr, SocketAddr) {
        let port = super::free_tcp_port();
        (
            format!("127.0.0.1:{port}").parse().unwrap(),
            format!("127.0.0.1:{}", super::free_tcp_port())
                .parse()
                .unwrap(),
        )
    }

    /// Like [`Self::start`], listening on `(udp, tcp)`.
    pub fn start_at(
        quic: &[SocketAddr],
        http: &[SocketAddr],
        (udp, tcp): (SocketAddr, SocketAddr),
    ) -> Nginx {
        let dir = tempfile::tempdir().expect("tempdir");
        let conf = documented_config(quic, http, udp, tcp);
        let d = dir.path().display();
        let path = dir.path().join("nginx.conf");
        std::fs::write(&path, conf).unwrap();
        let child = Command::new("nginx")
            .arg("-c")
            .arg(&path)
            .arg("-p")
            .arg(dir.path())
            .arg("-e")
            .arg(dir.path().join("error.log"))
            .arg("-g")
            .arg(format!(
                "daemon off; pid {d}/nginx.pid; error_log {d}/error.log info;"
            ))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("nginx (apt-get install nginx libnginx-mod-stream)");
        let start = Instant::now();
        while std::net::TcpStream::connect(tcp).is_err() {
            assert!(
                start.elapsed() < Duration::from_secs(20),
                "nginx did not start: {}",
                std::fs::read_to_string(dir.path().join("error.log")).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        Nginx {
            udp,
            tcp,
            child,
            dir,
        }
    }

    /// nginx's error log so far.
    pub fn error_log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("error.log")).unwrap_or_default()
    }
}

impl Drop for Nginx {
    /// SIGTERM to the master, which ends its workers (a SIGKILL would orphan them), then waits;
    /// SIGKILL only if it does not exit within 5 s.
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
