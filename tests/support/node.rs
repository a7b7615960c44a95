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
    args: Vec<String>,
}

impl Node {
    /// Starts a node with the test secret and `extra` flags; waits until it is healthy.
    pub async fn spawn(extra: &[&str]) -> Node {
        Self::spawn_logging(extra, "warn", None).await
    }

    /// Like [`Self::spawn`], logging at `level` (`EDGESTREAM_LOG`) into `log` (stdout and
    /// stderr) when given.
    pub async fn spawn_logging(extra: &[&str], level: &str, log: Option<&std::path::Path>) -> Node {
        let mut node = Node {
            http: format!("127.0.0.1:{}", super::free_tcp_port())
                .parse()
                .unwrap(),
            quic: format!("127.0.0.1:{}", super::free_udp_port())
                .parse()
                .unwrap(),
            api: Api::new(String::new()),
            child: None,
            args: extra.iter().map(|s| s.to_string()).collect(),
        };
        node.api = Api::new(format!("http://{}", node.http));
        node.start(level, log).await;
        node
    }

    /// Starts the process (again, after [`Self::kill`]) on the node's addresses and flags.
    async fn start(&mut self, level: &str, log: Option<&std::path::Path>) {
        let (stdout, stderr) = match log {
            Some(path) => {
                let f = std::fs::File::create(path).expect("log file");
                (f.try_clone().unwrap().into(), f.into())
            }
            None => (std::process::Stdio::null(), std::process::Stdio::inherit()),
        };
        let child = tokio::process::Command::new(env!("CARGO_BIN_EXE_edgestream"))
            .args(["serve", "--http-listen", &self.http.to_string()])
            .args(["--quic-listen", &self.quic.to_string()])
            .args(&self.args)
            .env("EDGESTREAM_JWT_SECRET", SECRET)
            .env("EDGESTREAM_LOG", level)
            .stdout(stdout)
            .stderr(stderr)
            .kill_on_drop(true)
            .spawn()
            .expect("spawn edgestream");
        self.child = Some(child);
        let start = Instant::now();
        while !matches!(self.api.get("/healthz", None).await, Ok((200, _))) {
            assert!(
                start.elapsed() < Duration::from_secs(20),
                "node did not start"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Starts a killed node again, same addresses and flags.
    pub async fn restart(&mut self) {
        self.kill().await;
        self.start("warn", None).await;
    }

    /// SIGTERM, then waits for the process to exit (after `--drain-delay` and the drain).
    pub async fn terminate(&mut self) {
        if let Some(mut c) = self.child.take() {
            let pid = c.id().expect("running").to_string();
            assert!(std::process::Command::new("kill")
                .args(["-TERM", &pid])
                .status()
                .is_ok_and(|s| s.success()));
            let status = tokio::time::timeout(Duration::from_secs(60), c.wait())
                .await
                .expect("the node exits after SIGTERM")
                .expect("wait");
            assert!(status.success(), "exit after SIGTERM: {status}");
        }
    }

    /// Starts a stopped node again (same addresses and flags) and waits until `/readyz` is 200.
    pub async fn start_again(&mut self) {
        self.start("warn", None).await;
        let start = Instant::now();
        while !matches!(self.api.get("/readyz", None).await, Ok((200, _))) {
            assert!(start.elapsed() < Duration::from_secs(20), "node not ready");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Whether the process runs.
    pub fn is_up(&self) -> bool {
        self.child.is_some()
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

/// A development certificate written as PEM files in `dir` (for `--cert`/`--key`, so that
/// several nodes serve one certificate); returns the paths and the certificate's hash.
pub fn cert_files(dir: &std::path::Path) -> (std::path::PathBuf, std::path::PathBuf, String) {
    let cert = edgestream::tls::DevCertificate::generate(
        &["127.0.0.1".into(), "localhost".into()],
        time::OffsetDateTime::now_utc(),
        time::Duration::days(10),
    )
    .unwrap();
    let (cert_path, key_path) = (dir.join("cert.pem"), dir.join("key.pem"));
    std::fs::write(&cert_path, pem("CERTIFICATE", &cert.cert_der)).unwrap();
    std::fs::write(&key_path, pem("PRIVATE KEY", &cert.key_der)).unwrap();
    (cert_path, key_path, cert.sha256_base64())
}

fn pem(label: &str, der: &[u8]) -> String {
    use base64::Engine as _;
    let b = base64::engine::general_purpose::STANDARD.encode(der);
    let lines: Vec<&str> = b
        .as_bytes()
        .chunks(64)
        .map(|c| std::str::from_utf8(c).unwrap())
        .collect();
    format!(
        "-----BEGIN {label}-----\n{}\n-----END {label}-----\n",
        lines.join("\n")
    )
}
