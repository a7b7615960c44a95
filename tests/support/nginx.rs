//! A real nginx (Debian's, with its stream module) as the edge balancer for a test: UDP for
//! QUIC and TCP for HTTP/WebSocket, round robin over the nodes, a node that refuses (dead)
//! marked down for 10 s after one failure. Runs in the foreground in a temporary directory; killed when
//! dropped.

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct Nginx {
    pub udp: SocketAddr,
    pub tcp: SocketAddr,
    child: Child,
    _dir: tempfile::TempDir,
}

const STREAM_MODULE: &str = "/usr/lib/nginx/modules/ngx_stream_module.so";

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

impl Nginx {
    /// Balances UDP over `quic` and TCP over `http` (one entry per node).
    pub fn start(quic: &[SocketAddr], http: &[SocketAddr]) -> Nginx {
        let dir = tempfile::tempdir().expect("tempdir");
        let port = free_port();
        let (udp, tcp): (SocketAddr, SocketAddr) = (
            format!("127.0.0.1:{port}").parse().unwrap(),
            format!("127.0.0.1:{}", free_port()).parse().unwrap(),
        );
        let servers = |addrs: &[SocketAddr]| {
            addrs
                .iter()
                .map(|a| format!("    server {a} max_fails=1 fail_timeout=10s;\n"))
                .collect::<String>()
        };
        let d = dir.path().display();
        let conf = format!(
            "load_module {STREAM_MODULE};\n\
             worker_processes 1;\ndaemon off;\npid {d}/nginx.pid;\nerror_log {d}/error.log info;\n\
             events {{ worker_connections 4096; }}\n\
             stream {{\n\
               upstream quic {{\n{}  }}\n\
               upstream web {{\n{}  }}\n\
               server {{ listen {udp} udp; proxy_pass quic; proxy_timeout 30s; }}\n\
               server {{ listen {tcp}; proxy_pass web; proxy_connect_timeout 2s; proxy_timeout 60s; }}\n\
             }}\n",
            servers(quic),
            servers(http),
        );
        let path = dir.path().join("nginx.conf");
        std::fs::write(&path, conf).unwrap();
        let child = Command::new("nginx")
            .arg("-c")
            .arg(&path)
            .arg("-p")
            .arg(dir.path())
            .arg("-e")
            .arg(dir.path().join("error.log"))
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
            _dir: dir,
        }
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
