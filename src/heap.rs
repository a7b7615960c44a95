//! Giving freed heap memory back to the operating system.
//!
//! glibc's allocator keeps what the program frees for later reuse and returns only a free
//! block at the very top of its heap. After a crowd of sessions leaves, its pages stay
//! resident: 20,000 WebTransport sessions closed left 36,814 B per session of RSS
//! (`edgestream-bench --only idle_scale`); the memory is reused by the next crowd, but an
//! operator watching RSS sees a node that never shrinks. Pages that still hold one live block
//! cannot be returned (emptied orgs: their ~100-byte tombstones sit in the pages the orgs
//! used), so this helps where whole pages come free.
//!
//! [`Trimmer`] looks at the allocator's free bytes now and then and, when much is free, asks
//! glibc to release it (`malloc_trim`, which also returns free pages in the middle of the
//! heap). Other allocators and platforms: nothing to do here (the functions are no-ops).

use std::time::{Duration, Instant};

/// How often the allocator's statistics are read.
pub const CHECK_EVERY: Duration = Duration::from_secs(5);

/// Bytes freed since the last trim (or since the allocator's free bytes were lowest) above
/// which a trim is worth its cost.
///
/// A trim walks the allocator's free lists under its locks: 0.1-0.3 ms with a few MB free,
/// 9.8 ms with 65 MB free in small blocks (100,000 emptied orgs, `edgestream-bench --only
/// org_memory`). Free memory that a trim could not return (pages that still hold a live
/// block) stays free afterwards, so trimming again on the same level would pay that cost every
/// check for nothing: only new frees count.
pub const TRIM_ABOVE: usize = 8 << 20;

/// Decides when to look and when to trim; owned by the server's sweeper.
#[derive(Debug, Default)]
pub struct Trimmer {
    last_check: Option<Instant>,
    /// Free bytes right after the last trim, lowered whenever fewer are free.
    floor: usize,
}

/// What one check found and did.
#[derive(Debug, Clone, Copy)]
pub struct Check {
    /// Free bytes the allocator held.
    pub free: usize,
    /// How long the trim took, when there was one.
    pub trimmed: Option<Duration>,
}

impl Trimmer {
    /// Whether a check is due at `now` (at most one per [`CHECK_EVERY`]).
    pub fn due(&mut self, now: Instant) -> bool {
        if self
            .last_check
            .is_some_and(|t| now.duration_since(t) < CHECK_EVERY)
        {
            return false;
        }
        self.last_check = Some(now);
        true
    }

    /// The floor to hand to [`check`].
    pub fn floor(&self) -> usize {
        self.floor
    }

    /// Takes in what a check found.
    pub fn record(&mut self, c: Check) {
        if c.trimmed.is_some() || c.free < self.floor {
            self.floor = c.free;
        }
    }
}

/// Trims when the allocator holds [`TRIM_ABOVE`] more free bytes than `floor`. Blocking (the
/// trim takes the allocator's locks): call it off the async workers. `None` where the
/// allocator says nothing (not glibc).
pub fn check(floor: usize) -> Option<Check> {
    let free = free_bytes()?;
    if free < floor.saturating_add(TRIM_ABOVE) {
        return Some(Check {
            free,
            trimmed: None,
        });
    }
    let started = Instant::now();
    release();
    Some(Check {
        free,
        trimmed: Some(started.elapsed()),
    })
}

/// Bytes the allocator holds free in its arenas (glibc only).
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn free_bytes() -> Option<usize> {
    // SAFETY: mallinfo2 takes no arguments, only reads the allocator's statistics under its own
    // locks and returns a plain struct by value; glibc documents it as thread-safe (MT-Safe
    // with `init` only). Nothing on the Rust side is borrowed or aliased.
    let info = unsafe { libc::mallinfo2() };
    Some(info.fordblks.saturating_add(info.fsmblks))
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn free_bytes() -> Option<usize> {
    None
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn release() {
    // SAFETY: malloc_trim(0) takes a plain integer (bytes to keep at the top: none), works on
    // the allocator's own free lists under its locks and is documented MT-Safe; it frees no
    // block the program still holds, it only returns unused pages to the kernel
    // (madvise(MADV_DONTNEED) or a heap shrink). The return value (whether anything was
    // released) carries no obligation.
    unsafe {
        libc::malloc_trim(0);
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn release() {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checks_at_most_once_per_interval() {
        let mut t = Trimmer::default();
        let now = Instant::now();
        assert!(t.due(now));
        assert!(!t.due(now + CHECK_EVERY / 2));
        assert!(t.due(now + CHECK_EVERY));
    }

    #[test]
    fn only_newly_freed_memory_triggers_a_trim() {
        let mut t = Trimmer::default();
        let trimmed = Some(Duration::from_millis(1));
        // Trimmed at 100 MB free: the floor is 100 MB.
        t.record(Check {
            free: 100 << 20,
            trimmed,
        });
        assert_eq!(t.floor(), 100 << 20);
        // The same level again (pages a trim could not return): the floor stays.
        t.record(Check {
            free: 104 << 20,
            trimmed: None,
        });
        assert_eq!(t.floor(), 100 << 20);
        // Reused, then freed again: counted from the low point.
        t.record(Check {
            free: 20 << 20,
            trimmed: None,
        });
        assert_eq!(t.floor(), 20 << 20);
    }

    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    #[test]
    fn freed_memory_is_counted_and_released() {
        // About 100 MiB in small blocks (the shape of session and org state): glibc keeps them
        // in its arenas, not in mappings of their own that free() would unmap.
        let blocks: Vec<Vec<u8>> = (0..200_000).map(|i| vec![i as u8; 512]).collect();
        let keep: Vec<Vec<u8>> = blocks.iter().step_by(1000).cloned().collect();
        drop(blocks);
        let free = free_bytes().expect("glibc reports free bytes");
        assert!(
            free >= 64 << 20,
            "about 100 MiB freed, the allocator reports {free}"
        );
        let c = check(0).expect("glibc");
        assert!(c.trimmed.is_some(), "{c:?}");
        // Nothing new freed since: no second trim.
        let again = check(c.free).expect("glibc");
        assert!(again.trimmed.is_none(), "{again:?}");
        assert_eq!(keep.len(), 200);
    }
}
