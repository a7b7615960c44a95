//! The embedded registry's batches on virtual time: opt-in, the throttle (leading edge, then
//! one flush per interval), coalescing, snapshots, counts mode, paging.

use std::collections::BTreeSet;

use edgestream_codec::Frame;

use super::*;
use crate::log::{memory::MemoryLog, Retention};
use crate::metrics::Metrics;

const I: Duration = Duration::from_millis(500);

fn registry(max_members: usize) -> Arc<Presence> {
    let hub = Hub::new(
        Arc::new(MemoryLog::new(Retention::default())),
        Arc::new(Metrics::default()),
    );
    Presence::new(
        hub,
        Batching {
            interval: I,
            max_members,
        },
    )
}

fn org(name: &str) -> OrgId {
    OrgId::parse(name).unwrap()
}

/// A session's queue.
struct Ear {
    sink: Sink,
    rx: crate::hub::Queue,
}

fn ear() -> Ear {
    let (sink, rx, _) = Sink::bounded(10_000);
    Ear { sink, rx }
}

/// (room, online, changes) of a PRESENCE frame.
type Heard = (String, u64, Vec<(String, bool)>);

impl Ear {
    /// Every PRESENCE frame queued now.
    fn heard(&mut self) -> Vec<Heard> {
        let mut out = Vec::new();
        while let Ok(item) = self.rx.try_recv() {
            let Live::Presence(note) = item else { continue };
            match Frame::decode_exact(note.binary.clone(), 1 << 20).unwrap() {
                Frame::Presence {
                    room,
                    online,
                    changes,
                    ..
                } => out.push((room, online, changes)),
                other => panic!("not PRESENCE: {other:?}"),
            }
        }
        out
    }
}

impl Ear {
    /// Applies every frame queued now to a member set, as a client does.
    fn apply_to(&mut self, view: &mut BTreeSet<String>) {
        for (_, _, changes) in self.heard() {
            for (u, j) in changes {
                if j {
                    view.insert(u);
                } else {
                    view.remove(&u);
                }
            }
        }
    }
}

/// Lets the timer task run at the (virtual) time reached.
async fn pass(d: Duration) {
    tokio::time::advance(d).await;
    for _ in 0..10 {
        tokio::task::yield_now().await;
    }
}

fn joined(users: &[&str]) -> Vec<(String, bool)> {
    users.iter().map(|u| (u.to_string(), true)).collect()
}

#[tokio::test(start_paused = true)]
async fn only_listeners_hear_and_a_snapshot_comes_first_then_batches() {
    let p = registry(1000);
    let acme = org("acme");
    let mut deaf = ear();
    let mut ann = ear();
    let _d = p.enter(&acme, "dee", None);
    // Leading edge: the org has not flushed, so ann's snapshot goes at once (with dee and ann).
    let _a = p.enter(&acme, "ann", Some(&ann.sink));
    assert_eq!(
        ann.heard(),
        vec![(String::new(), 2, joined(&["ann", "dee"]))]
    );
    // Within the interval, bob's arrival waits for its end.
    let b = p.enter(&acme, "bob", None);
    assert_eq!(ann.heard(), vec![]);
    pass(I).await;
    assert_eq!(ann.heard(), vec![(String::new(), 3, joined(&["bob"]))]);
    drop(b);
    pass(I).await;
    assert_eq!(
        ann.heard(),
        vec![(String::new(), 2, vec![("bob".into(), false)])]
    );
    // A session without presence=1 never hears anything.
    assert!(deaf.heard().is_empty());
    let _ = &mut deaf.sink;
}

#[tokio::test(start_paused = true)]
async fn a_join_and_leave_within_one_window_cancel_and_a_hundred_joins_are_one_batch() {
    let p = registry(1000);
    let acme = org("acme");
    let mut ann = ear();
    let _a = p.enter(&acme, "ann", Some(&ann.sink));
    assert_eq!(ann.heard().len(), 1, "the snapshot");
    // Within the window after it: a user who comes and goes, and 100 who come.
    drop(p.enter(&acme, "flicker", None));
    let guards: Vec<OrgMember> = (0..100)
        .map(|i| p.enter(&acme, &format!("u{i:03}"), None))
        .collect();
    pass(I).await;
    let heard = ann.heard();
    assert_eq!(heard.len(), 1, "one batch: {heard:?}");
    let (_, online, changes) = &heard[0];
    assert_eq!(*online, 101);
    assert_eq!(changes.len(), 100);
    assert!(changes.iter().all(|(u, j)| *j && u != "flicker"));
    // Leaving in a storm: at most one batch per interval, whatever the number of changes.
    for (n, g) in guards.into_iter().enumerate() {
        drop(g);
        if n % 25 == 24 {
            pass(I / 5).await;
        }
    }
    pass(I).await;
    let heard = ann.heard();
    assert!(heard.len() <= 3, "{} batches", heard.len());
    assert_eq!(heard.last().unwrap().1, 1);
    let left: usize = heard.iter().map(|h| h.2.len()).sum();
    assert_eq!(left, 100);
}

#[tokio::test(start_paused = true)]
async fn rooms_are_heard_by_their_members_only() {
    let p = registry(1000);
    let acme = org("acme");
    let (mut ann, mut bob) = (ear(), ear());
    let _ao = p.enter(&acme, "ann", Some(&ann.sink));
    let _bo = p.enter(&acme, "bob", None);
    pass(I).await;
    ann.heard();
    let ar = p.join(&acme, "lobby", "ann", &ann.sink).await.unwrap();
    pass(I).await;
    assert_eq!(ann.heard(), vec![("lobby".into(), 1, joined(&["ann"]))]);
    let br = p.join(&acme, "lobby", "bob", &bob.sink).await.unwrap();
    pass(I).await;
    assert_eq!(ann.heard(), vec![("lobby".into(), 2, joined(&["bob"]))]);
    assert_eq!(
        bob.heard(),
        vec![("lobby".into(), 2, joined(&["ann", "bob"]))]
    );
    // After LEAVE, ann hears the room no more; bob does.
    drop(ar);
    pass(I).await;
    assert_eq!(
        bob.heard(),
        vec![("lobby".into(), 1, vec![("ann".into(), false)])]
    );
    assert_eq!(ann.heard(), vec![]);
    drop(br);
}

#[tokio::test(start_paused = true)]
async fn above_the_member_limit_only_the_count_travels_and_the_list_returns_below_it() {
    let p = registry(3);
    let acme = org("acme");
    let mut ann = ear();
    let _a = p.enter(&acme, "ann", Some(&ann.sink));
    ann.heard();
    let mut guards: Vec<OrgMember> = ["b", "c", "d"]
        .iter()
        .map(|u| p.enter(&acme, u, None))
        .collect();
    pass(I).await;
    assert_eq!(ann.heard(), vec![(String::new(), 4, vec![])]);
    // A newcomer's snapshot is the count too.
    let mut late = ear();
    let _l = p.enter(&acme, "late", Some(&late.sink));
    pass(I).await;
    assert_eq!(late.heard(), vec![(String::new(), 5, vec![])]);
    assert_eq!(ann.heard(), vec![(String::new(), 5, vec![])]);
    // Back to the limit: everyone, once, so that clients can list them again.
    guards.truncate(1);
    pass(I).await;
    assert_eq!(
        ann.heard(),
        vec![(String::new(), 3, joined(&["ann", "b", "late"]))]
    );
    assert_eq!(
        late.heard(),
        vec![(String::new(), 3, joined(&["ann", "b", "late"]))]
    );
}

#[tokio::test(start_paused = true)]
async fn a_snapshot_and_the_batches_after_it_always_add_up_to_the_truth() {
    // A fixed pseudo-random walk of joins, leaves and late listeners; every listener's view
    // (its snapshot with the batches applied) equals the registry's after each flush.
    let p = registry(1000);
    let acme = org("acme");
    let mut rng = 0x2545_f491_4f6c_dd1d_u64;
    let mut next = move |n: u64| {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng % n
    };
    let mut held: Vec<OrgMember> = Vec::new();
    let mut ears: Vec<(Ear, OrgMember, BTreeSet<String>)> = Vec::new();
    for step in 0..400 {
        match next(10) {
            0..=4 => held.push(p.enter(&acme, &format!("u{}", next(30)), None)),
            5..=7 if !held.is_empty() => {
                let i = next(held.len() as u64) as usize;
                held.swap_remove(i);
            }
            8 if ears.len() < 6 => {
                let e = ear();
                let m = p.enter(&acme, &format!("l{step}"), Some(&e.sink));
                ears.push((e, m, BTreeSet::new()));
            }
            _ => pass(Duration::from_millis(next(400))).await,
        }
        for (e, _, view) in &mut ears {
            e.apply_to(view);
        }
    }
    pass(I * 2).await;
    let truth: BTreeSet<String> = p
        .room(&acme, "", None, 1000)
        .await
        .members
        .into_iter()
        .map(|(u, _)| u)
        .collect();
    assert!(!ears.is_empty());
    for (e, _, view) in &mut ears {
        e.apply_to(view);
        assert_eq!(*view, truth);
    }
}

#[tokio::test(start_paused = true)]
async fn members_page_in_byte_order() {
    let p = registry(1000);
    let acme = org("acme");
    let _g: Vec<OrgMember> = ["c", "a", "B", "b", "a"]
        .iter()
        .map(|u| p.enter(&acme, u, None))
        .collect();
    let first = p.room(&acme, "", None, 2).await;
    assert_eq!(first.online, 4);
    assert_eq!(first.members, vec![("B".into(), 1), ("a".into(), 2)]);
    assert_eq!(first.next.as_deref(), Some("a"));
    let second = p.room(&acme, "", first.next.as_deref(), 2).await;
    assert_eq!(second.members, vec![("b".into(), 1), ("c".into(), 1)]);
    assert_eq!(second.next, None);
}

#[tokio::test(start_paused = true)]
async fn an_org_everyone_left_is_forgotten_once_its_interval_ends() {
    let p = registry(1000);
    let acme = org("acme");
    let e = ear();
    drop(p.enter(&acme, "ann", Some(&e.sink)));
    assert!(
        p.state.lock().orgs.contains_key(&acme),
        "kept for the throttle"
    );
    pass(I * 2).await;
    assert!(p.state.lock().orgs.is_empty());
}
