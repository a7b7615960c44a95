//! Wake-ups for the Redis log's followers: one pub/sub connection per node, however many orgs
//! it follows.
//!
//! The append script (and the fence, and shared presence when it writes a signal) publishes
//! on the org's channel, named like its event stream (`es:{org}:s`). A follower registers the
//! org's channel here and sleeps until a message arrives, then reads the org's streams with a
//! plain `XREAD` on the node's shared connection. Before, every followed org held a Redis
//! connection of its own in a blocking `XREAD`, re-issued every 2 s even when idle: 2,000 orgs
//! were 2,002 connections per node.
//!
//! Classic pub/sub (not sharded): in a Redis Cluster a message published on any node reaches
//! subscribers on every node, so one connection to any node serves all orgs. Messages are not
//! stored: after the connection is lost and made again, every follower is woken, so whatever
//! was published meanwhile is read from the streams.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use parking_lot::Mutex;
use tokio::sync::{mpsc, oneshot, Notify};

/// How a node reaches Redis for pub/sub: the one server, or any of the cluster's seeds.
#[derive(Clone)]
pub(super) enum Source {
    Single(redis::Client),
    Cluster(Vec<String>),
}

impl Source {
    async fn connect(&self) -> Result<redis::aio::PubSub, String> {
        match self {
            Source::Single(c) => c.get_async_pubsub().await.map_err(|e| e.to_string()),
            Source::Cluster(seeds) => {
                let mut last = String::from("no seed");
                for seed in seeds {
                    match redis::Client::open(seed.as_str()) {
                        Ok(c) => match c.get_async_pubsub().await {
                            Ok(p) => return Ok(p),
                            Err(e) => last = e.to_string(),
                        },
                        Err(e) => last = e.to_string(),
                    }
                }
                Err(last)
            }
        }
    }
}

enum Command {
    Subscribe(String, oneshot::Sender<()>),
    Unsubscribe(String),
}

/// The node's subscriptions and the task that holds its pub/sub connection.
pub(super) struct Wakes {
    /// Channel -> the follower's wake-up.
    channels: Mutex<HashMap<String, Arc<Slot>>>,
    commands: mpsc::UnboundedSender<Command>,
}

/// One follower's wake-up and what woke it.
#[derive(Default)]
struct Slot {
    notify: Notify,
    /// The last message's payload since the follower last looked; `None` after a reconnect
    /// (anything may have been missed).
    news: Mutex<Option<Option<String>>>,
}

/// What woke a follower.
pub(super) enum Wake {
    /// A message: the append script's `epoch head`, the fence's `epoch 0`, or presence's
    /// `signal`.
    Message(String),
    /// The pub/sub connection was made again: messages may have been lost.
    Reconnected,
}

/// A follower's subscription; dropping it unsubscribes.
pub(super) struct Registration {
    wakes: Arc<Wakes>,
    channel: String,
    slot: Arc<Slot>,
}

impl Registration {
    /// Resolves after a message for this org arrived since the last call (or the connection
    /// was made again), with the latest one. A message that arrives while nobody waits is kept.
    pub(super) async fn woken(&self) -> Wake {
        loop {
            self.slot.notify.notified().await;
            match self.slot.news.lock().take() {
                Some(Some(m)) => return Wake::Message(m),
                Some(None) => return Wake::Reconnected,
                None => continue, // already taken with an earlier permit
            }
        }
    }
}

impl Slot {
    fn tell(&self, news: Option<String>) {
        let mut n = self.news.lock();
        // A reconnect stays a reconnect until the follower looks.
        if !matches!(*n, Some(None)) {
            *n = Some(news);
        }
        drop(n);
        self.notify.notify_one();
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        let mut channels = self.wakes.channels.lock();
        // Only its own entry: a newer registration of the channel keeps it.
        if channels
            .get(&self.channel)
            .is_some_and(|n| Arc::ptr_eq(n, &self.slot))
        {
            channels.remove(&self.channel);
            let _ = self
                .wakes
                .commands
                .send(Command::Unsubscribe(self.channel.clone()));
        }
    }
}

/// How long a registration waits for Redis to confirm the subscription before the follower
/// starts anyway (it then relies on the wake-up after the reconnection).
const CONFIRM: Duration = Duration::from_secs(2);

impl Wakes {
    /// Starts the task holding the pub/sub connection (on the current runtime); it ends when
    /// the last handle is dropped.
    pub(super) fn start(source: Source) -> Arc<Self> {
        let (tx, rx) = mpsc::unbounded_channel();
        let wakes = Arc::new(Wakes {
            channels: Mutex::new(HashMap::new()),
            commands: tx,
        });
        tokio::spawn(run(source, Arc::downgrade(&wakes), rx));
        wakes
    }

    /// Subscribes `channel` (one registration per channel per node: the hub runs one follower
    /// per org) and returns once Redis confirmed it, so nothing published after this returns
    /// goes unnoticed.
    pub(super) async fn register(self: &Arc<Self>, channel: String) -> Registration {
        let slot = Arc::new(Slot::default());
        self.channels.lock().insert(channel.clone(), slot.clone());
        let (ack, confirmed) = oneshot::channel();
        let _ = self.commands.send(Command::Subscribe(channel.clone(), ack));
        let _ = tokio::time::timeout(CONFIRM, confirmed).await;
        Registration {
            wakes: self.clone(),
            channel,
            slot,
        }
    }

    fn wake_all(&self) {
        for s in self.channels.lock().values() {
            s.tell(None);
        }
    }
}

async fn run(
    source: Source,
    wakes: std::sync::Weak<Wakes>,
    mut commands: mpsc::UnboundedReceiver<Command>,
) {
    let mut backoff = Duration::from_millis(100);
    loop {
        let pubsub = match source.connect().await {
            Ok(p) => p,
            Err(e) => {
                tracing::warn!(error = %e, "redis pub/sub connection failed; retrying");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(2));
                if wakes.strong_count() == 0 {
                    return;
                }
                continue;
            }
        };
        let (mut sink, mut stream) = pubsub.split();
        // Everything registered so far, then everyone woken: messages sent while there was no
        // connection are lost, the streams are not.
        let Some(w) = wakes.upgrade() else { return };
        let current: Vec<String> = w.channels.lock().keys().cloned().collect();
        let mut ok = true;
        for chunk in current.chunks(1000) {
            if sink.subscribe(chunk).await.is_err() {
                ok = false;
                break;
            }
        }
        if !ok {
            drop(w);
            tokio::time::sleep(backoff).await;
            continue;
        }
        backoff = Duration::from_millis(100);
        w.wake_all();
        drop(w);
        loop {
            tokio::select! {
                cmd = commands.recv() => {
                    let r = match cmd {
                        None => return,
                        Some(Command::Subscribe(channel, ack)) => {
                            let r = sink.subscribe(&channel).await;
                            let _ = ack.send(());
                            r
                        }
                        Some(Command::Unsubscribe(channel)) => sink.unsubscribe(&channel).await,
                    };
                    if let Err(e) = r {
                        tracing::warn!(error = %e, "redis pub/sub command failed; reconnecting");
                        break;
                    }
                }
                msg = stream.next() => {
                    let Some(msg) = msg else {
                        tracing::warn!("redis pub/sub connection lost; reconnecting");
                        break;
                    };
                    let Some(w) = wakes.upgrade() else { return };
                    let slot = w.channels.lock().get(msg.get_channel_name()).cloned();
                    if let Some(s) = slot {
                        s.tell(Some(msg.get_payload::<String>().unwrap_or_default()));
                    }
                }
            }
        }
        tokio::time::sleep(backoff).await;
    }
}
