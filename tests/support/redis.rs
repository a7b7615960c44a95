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

impl RedisServer {
    /// A server without persistence.
    pub fn start() -> Self {
        Self::start_with(false)
    }

    /// With `durable`, every write is in an fsynced append-only file, so a restart on the same
    /// directory keeps everything that was acknowledged.
    pub fn start_with(durable: bool) -> Self {
        let mut r = RedisServer {
            port: super::free_tcp_port(),
            child: None,
            dir: tempfile::tempdir().expect("tempdir"),
            durable,
        };
        r.spawn();
        r
    }

    /// A replica of `primary` (no persistence), once its link to the primary is up.
    pub fn replica_of(primary: &RedisServer) -> Self {
        let mut r = RedisServer {
            port: super::free_tcp_port(),
            child: None,
            dir: tempfile::tempdir().expect("tempdir"),
            durable: false,
        };
        r.spawn_with(&["--replicaof", "127.0.0.1", &primary.port.to_string()]);
        let start = Instant::now();
        while !r
            .cli(&["INFO", "replication"])
            .contains("master_link_status:up")
        {
            assert!(
                start.elapsed() < Duration::from_secs(20),
                "the replica never synced"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        r
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    fn spawn(&mut self) {
        self.spawn_with(&[]);
    }

    fn spawn_with(&mut self, extra: &[&str]) {
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
        cmd.args(extra);
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

    /// The value of one field of `INFO` (e.g. `connected_clients`).
    pub fn info(&self, field: &str) -> u64 {
        let prefix = format!("{field}:");
        self.cli(&["INFO"])
            .lines()
            .find_map(|l| l.strip_prefix(&prefix)?.trim().parse().ok())
            .unwrap_or_else(|| panic!("INFO has no {field}"))
    }

    /// How many times Redis ran `command` (lowercase), scripts' calls included.
    pub fn calls(&self, command: &str) -> u64 {
        let prefix = format!("cmdstat_{command}:calls=");
        self.cli(&["INFO", "commandstats"])
            .lines()
            .find_map(|l| l.strip_prefix(&prefix)?.split(',').next()?.parse().ok())
            .unwrap_or(0)
    }

    /// Kills the server (SIGKILL) and waits for it.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Freezes the server (SIGSTOP): connections stay open, commands wait unanswered.
    pub fn pause(&self) {
        self.signal("-STOP");
    }

    /// Lets a paused server run again (SIGCONT); it then executes what waited.
    pub fn resume(&self) {
        self.signal("-CONT");
    }

    fn signal(&self, sig: &str) {
        if let Some(c) = &self.child {
            let ok = Command::new("kill")
                .args([sig, &c.id().to_string()])
                .status()
                .is_ok_and(|s| s.success());
            assert!(ok, "kill {sig} redis-server");
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

/// A real three-primary Redis Cluster on loopback (no replicas, no persistence), made with
/// `redis-cli --cluster create`. Killed when dropped.
pub struct RedisCluster {
    pub nodes: Vec<RedisServer>,
}

/// A port whose cluster-bus twin (port + 10000) is free too.
fn cluster_port() -> u16 {
    for _ in 0..200 {
        let p = 20000 + (rand_u16() % 20000);
        let free = |p: u16| std::net::TcpListener::bind(("127.0.0.1", p)).is_ok();
        if free(p) && free(p + 10000) {
            return p;
        }
    }
    panic!("no free port pair for a cluster node");
}

fn rand_u16() -> u16 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(Instant::now().elapsed().as_nanos());
    h.finish() as u16
}

impl RedisCluster {
    /// Three primaries, no replicas.
    pub fn start() -> Self {
        Self::start_with(3, 0)
    }

    /// Three primaries with one replica each (`nodes[3..]` start as replicas).
    pub fn start_with_replicas() -> Self {
        Self::start_with(6, 1)
    }

    fn start_with(count: usize, replicas: u8) -> Self {
        let mut nodes = Vec::new();
        for _ in 0..count {
            let mut r = RedisServer {
                port: cluster_port(),
                child: None,
                dir: tempfile::tempdir().expect("tempdir"),
                durable: false,
            };
            r.spawn_with(&[
                "--cluster-enabled",
                "yes",
                "--cluster-config-file",
                "nodes.conf",
            ]);
            nodes.push(r);
        }
        let addrs: Vec<String> = nodes
            .iter()
            .map(|n| format!("127.0.0.1:{}", n.port))
            .collect();
        let status = Command::new("redis-cli")
            .args(["--cluster", "create"])
            .args(&addrs)
            .args(["--cluster-replicas", &replicas.to_string(), "--cluster-yes"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .expect("redis-cli (apt-get install redis-tools)");
        assert!(status.success(), "redis-cli --cluster create failed");
        let start = Instant::now();
        // Every node sees the cluster ok and every replica (assigned after the join), and
        // every replica's link to its primary is up.
        let replicas_seen =
            |n: &RedisServer| n.cli(&["cluster", "nodes"]).matches("slave").count() >= count - 3;
        let linked = |n: &RedisServer| {
            let r = n.cli(&["INFO", "replication"]);
            !r.contains("role:slave") || r.contains("master_link_status:up")
        };
        while !nodes.iter().all(|n| {
            n.cli(&["cluster", "info"]).contains("cluster_state:ok")
                && replicas_seen(n)
                && linked(n)
        }) {
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "the cluster never became ok"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        RedisCluster { nodes }
    }

    /// The node serving `key`'s slot as primary, and its replica (if any), as indexes into
    /// `nodes`.
    pub fn primary_and_replica(&self, key: &str) -> (usize, Option<usize>) {
        // Asked of the first node that answers (some may be down).
        let (slot, table) = self
            .nodes
            .iter()
            .find_map(|n| {
                let slot: u16 = n.cli(&["CLUSTER", "KEYSLOT", key]).trim().parse().ok()?;
                Some((slot, n.cli(&["CLUSTER", "NODES"])))
            })
            .expect("a live node");
        let index = |addr: &str| {
            let port: u16 = addr.split(['@', ':']).nth(1)?.parse().ok()?;
            self.nodes.iter().position(|n| n.port == port)
        };
        let mut primary = None;
        for line in table.lines() {
            let f: Vec<&str> = line.split_whitespace().collect();
            if f.len() > 8 && f[2].contains("master") {
                let serves = f[8..].iter().any(|r| {
                    let (a, b) = r.split_once('-').unwrap_or((r, r));
                    matches!((a.parse::<u16>(), b.parse::<u16>()), (Ok(a), Ok(b)) if a <= slot && slot <= b)
                });
                if serves {
                    primary = Some((f[0].to_string(), index(f[1]).expect("a node of ours")));
                }
            }
        }
        let (id, p) = primary.expect("a primary for the slot");
        let replica = table.lines().find_map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            (f.len() > 3 && f[2].contains("slave") && f[3] == id).then(|| index(f[1]))?
        });
        (p, replica)
    }

    /// The seed URLs, comma-separated (the value of `--redis-cluster`).
    pub fn seeds(&self) -> String {
        self.nodes
            .iter()
            .map(|n| n.url())
            .collect::<Vec<_>>()
            .join(",")
    }
}

impl RedisServer {
    /// The replication offset a primary has sent or a replica has received.
    pub fn repl_offset(&self) -> u64 {
        let text = self.cli(&["INFO", "replication"]);
        text.lines()
            .find_map(|l| {
                l.strip_prefix("slave_repl_offset:")
                    .or_else(|| l.strip_prefix("master_repl_offset:"))?
                    .trim()
                    .parse()
                    .ok()
            })
            .unwrap_or(0)
    }

    /// Runs `redis-cli -p PORT args...` and returns its output.
    pub fn cli(&self, args: &[&str]) -> String {
        let out = Command::new("redis-cli")
            .args(["-p", &self.port.to_string()])
            .args(args)
            .output()
            .expect("redis-cli");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}
