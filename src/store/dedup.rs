//! Duplicate detection for (CloudEvents source, id) pairs.
//!
//! Keys are 128-bit digests (SHA-256, truncated) held in memory in time slices and persisted
//! in `dedup_keys`, an append-only table written in the same transaction as the events. An
//! indexed table of (source, id) would cost a random B-tree page per event in the write-ahead
//! log; the log costs a few bytes on its last page, and is read back once at start-up.

use sha2::{Digest, Sha256};
use std::collections::{HashSet, VecDeque};
use std::hash::{BuildHasherDefault, Hasher};
use std::time::Duration;

/// How long and how many keys are remembered.
#[derive(Debug, Clone, Copy)]
pub struct DedupLimits {
    /// A repeated key within this window is a duplicate (keys live between the window and
    /// 1/16 more).
    pub window: Duration,
    /// Most keys remembered; beyond it the oldest are forgotten early (with a warning).
    pub max_keys: usize,
}

impl DedupLimits {
    /// Default `max_keys`: about 20–40 MB of memory.
    pub const DEFAULT_MAX_KEYS: usize = 1_000_000;

    /// A window with the default key limit.
    pub fn window(window: Duration) -> DedupLimits {
        DedupLimits {
            window,
            max_keys: DEFAULT_MAX_KEYS,
        }
    }
}

const DEFAULT_MAX_KEYS: usize = DedupLimits::DEFAULT_MAX_KEYS;

/// A digest of (source, id). Collisions are as unlikely as for any 128-bit random id, and
/// a sender cannot craft one to suppress another source's event (SHA-256).
pub(crate) type Key = u128;

/// The digest of (receiving reflex source, CloudEvents source, id); the lengths keep the
/// split unambiguous. The receiving source is part of it so that a sender on one source
/// (say an open CloudEvents endpoint) cannot claim another's ids (a vCenter's) and have
/// the real events dropped as duplicates.
pub(crate) fn key(received_by: &str, source: &str, id: &str) -> Key {
    u128::from_le_bytes(digest(received_by, source, id, u64::to_le_bytes))
}

/// The first 16 bytes of SHA-256 over (length, receiving source, length, CloudEvents
/// source, id), the lengths written by `len` (the embedded store's keys use little-endian,
/// PostgreSQL's big-endian so that its migration can compute them in SQL).
pub(crate) fn digest(
    received_by: &str,
    source: &str,
    id: &str,
    len: fn(u64) -> [u8; 8],
) -> [u8; 16] {
    let mut h = Sha256::new();
    h.update(len(received_by.len() as u64));
    h.update(received_by.as_bytes());
    h.update(len(source.len() as u64));
    h.update(source.as_bytes());
    h.update(id.as_bytes());
    h.finalize()[..16].try_into().expect("SHA-256 is 32 bytes")
}

/// The keys are already uniform digests: hashing them again would only cost time.
#[derive(Default)]
struct DigestHasher(u64);

impl Hasher for DigestHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(*b);
        }
    }
    fn write_u128(&mut self, k: u128) {
        self.0 = k as u64;
    }
}

type KeySet = HashSet<Key, BuildHasherDefault<DigestHasher>>;

struct Slice {
    /// Start of the slice (ms since the epoch), a multiple of the slice length.
    start: i64,
    keys: KeySet,
}

/// The remembered keys, oldest slice first.
pub(crate) struct Dedup {
    window_ms: i64,
    slice_ms: i64,
    max_keys: usize,
    slices: VecDeque<Slice>,
    len: usize,
}

impl Dedup {
    pub(crate) fn new(limits: DedupLimits) -> Dedup {
        let window_ms = limits.window.as_millis().min(i64::MAX as u128) as i64;
        Dedup {
            window_ms,
            slice_ms: (window_ms / 16).max(1),
            max_keys: limits.max_keys.max(1),
            slices: VecDeque::new(),
            len: 0,
        }
    }

    /// The window in milliseconds.
    pub(crate) fn window_ms(&self) -> i64 {
        self.window_ms
    }

    /// Keys remembered.
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.len
    }

    /// Whether `k` was seen within the window.
    pub(crate) fn contains(&self, k: Key) -> bool {
        self.slices.iter().rev().any(|s| s.keys.contains(&k))
    }

    /// Remembers `k`, seen at `at` (ms since the epoch).
    pub(crate) fn insert(&mut self, k: Key, at: i64) {
        let start = at.div_euclid(self.slice_ms) * self.slice_ms;
        // A clock that stepped back files the key in the newest slice.
        if self.slices.back().is_none_or(|s| s.start < start) {
            self.slices.push_back(Slice {
                start,
                keys: KeySet::default(),
            });
        }
        let back = self.slices.back_mut().expect("just ensured");
        if back.keys.insert(k) {
            self.len += 1;
        }
        if self.len > self.max_keys {
            self.evict_for_room();
        }
    }

    /// Forgets a key inserted by a transaction that did not commit.
    pub(crate) fn remove(&mut self, k: Key) {
        for s in self.slices.iter_mut().rev() {
            if s.keys.remove(&k) {
                self.len -= 1;
                return;
            }
        }
    }

    /// Drops the slices that ended more than the window ago.
    pub(crate) fn expire(&mut self, now: i64) {
        while let Some(front) = self.slices.front() {
            if front.start + self.slice_ms > now - self.window_ms {
                break;
            }
            self.len -= front.keys.len();
            self.slices.pop_front();
        }
    }

    fn evict_for_room(&mut self) {
        while self.len > self.max_keys && self.slices.len() > 1 {
            let oldest = self.slices.pop_front().expect("more than one slice");
            self.len -= oldest.keys.len();
            tracing::warn!(
                forgotten = oldest.keys.len(),
                max_keys = self.max_keys,
                "dedup: more keys than store.dedup_max_keys within store.dedup_window; the oldest \
                 are forgotten early, so a repeat of them would be delivered again. Raise \
                 dedup_max_keys or shorten dedup_window"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_separate_source_from_id() {
        assert_ne!(key("r", "ab", "c"), key("r", "a", "bc"));
        assert_ne!(key("ra", "b", "c"), key("r", "ab", "c"));
        assert_ne!(key("hook", "a", "b"), key("vc", "a", "b"));
        assert_eq!(key("r", "a", "b"), key("r", "a", "b"));
    }

    #[test]
    fn window_expiry_and_rollback() {
        let mut d = Dedup::new(DedupLimits {
            window: Duration::from_millis(1600),
            max_keys: 100,
        });
        d.insert(1, 1000);
        d.insert(2, 1150);
        assert!(d.contains(1) && d.contains(2) && !d.contains(3));
        d.expire(2599);
        assert!(d.contains(1), "within the window");
        d.expire(2700);
        assert!(!d.contains(1), "a slice ends 100 ms after its start");
        assert!(d.contains(2));
        d.remove(2);
        assert!(!d.contains(2));
        assert_eq!(d.len(), 0);
    }

    #[test]
    fn the_oldest_slices_go_first_when_full() {
        let mut d = Dedup::new(DedupLimits {
            window: Duration::from_secs(16),
            max_keys: 3,
        });
        for (k, at) in [(1, 0), (2, 1000), (3, 2000), (4, 3000)] {
            d.insert(k, at);
        }
        assert!(!d.contains(1));
        assert!(d.contains(2) && d.contains(3) && d.contains(4));
        assert_eq!(d.len(), 3);
    }
}
