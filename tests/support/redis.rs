//! A real `redis-server` for a test: loopback, a free port, no persistence unless asked (then
//! an append-only file fsynced on every write, in a temporary directory). Killed when dropped.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct RedisServer {
    pub port: u16,
    child: Option<Child>,
    dir: tempfile::TempDir,
    durable: bool,
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

impl RedisServer {
    /// A server without persistence.
    pub fn start() -> Self {
        Self::start_with(false)
    }

    /// With `durable`, every write is in an fsynced append-only file, so a restart on the same
    /// directory keeps everything that was acknowledged.
    pub fn start_with(durable: bool) -> Self {
        let mut r = RedisServer {
            port: free_port(),
            child: None,
            dir: tempfile::tempdir().expect("tempdir"),
            durable,
        };
        r.spawn();
        r
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    fn spawn(&mut self) {
        let mut cmd = Command::new("redis-server");
        cmd.args(["--bind", "127.0.0.1", "--port", &self.port.to_string()])
            .args(["--save", ""])
            .arg("--dir")
            .arg(self.dir.path())
            .args(["--protected-mode", "no"])
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        if self.durable {
            cmd.args(["--appendonly", "yes", "--appendfsync", "always"]);
        } else {
            cmd.args(["--appendonly", "no"]);
        }
        self.child = Some(
            cmd.spawn()
                .expect("redis-server (apt-get install redis-server)"),
        );
        let start = Instant::now();
        while !self.ping() {
            assert!(
                start.elapsed() < Duration::from_secs(20),
                "redis-server did not start on {}",
                self.port
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Answers PING (over a plain TCP exchange, so no client library is needed here).
    pub fn ping(&self) -> bool {
        use std::io::{Read, Write};
        let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", self.port)) else {
            return false;
        };
        let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
        if s.write_all(b"PING\r\n").is_err() {
            return false;
        }
        let mut buf = [0u8; 7];
        s.read_exact(&mut buf).is_ok() && &buf == b"+PONG\r\n"
    }

    /// Kills the server (SIGKILL) and waits for it.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts it again on the same port and directory.
    pub fn restart(&mut self) {
        self.kill();
        self.spawn();
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
    }
}
