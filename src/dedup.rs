//! The de-duplication index of the events in the inbox log: a fingerprint of each event's
//! (source, vendor event id) -> its event id, in memory (a keydir, as in Bitcask).
//!
//! Why in memory: a sled entry per event cost ~17 µs of CPU per webhook (the insert, and
//! sled's segment cleaning of what those inserts rewrote), a third of ingest. A lookup here
//! costs a hash. The price is memory: ~27 bytes per event kept in the log (31 MB for 1.14 M
//! events; retention bounds it; without retention it grows with the log, at ~1 % of the
//! log's size for 2 KB webhooks).
//!
//! How it stays exact:
//! - A fingerprint is only a hint: a hit is confirmed by reading the event and comparing
//!   its key. Two keys with one fingerprint (a 64-bit collision) keep the second in sled's
//!   `dedup` tree, which is looked at whenever the fingerprint's event is another one.
//! - Events that leave the log (retention drops their file) move to sled's `dedup` tree.
//! - It is rebuilt when the store opens: each sealed log file stores its events'
//!   fingerprints (written just before its index; missing ones are read again from the
//!   file); a file the daemon was killed while writing is read again. A record that must not
//!   answer for its key (a second copy found at recovery, or one that does not read) is
//!   stored as [`NO_KEY`].
//! - Memory is exported as `perkflow_dedup_index_events`.

use std::collections::HashMap;

/// Independent maps, so that growing one moves 1/64 of the entries (a stall of a few ms at
/// ten million events, not a hundred).
const SHARDS: usize = 64;

/// A stable 64-bit fingerprint of a de-duplication key (SHA-256, truncated): stored with
/// the log's index, so it must not change between versions or runs. Never [`NO_KEY`].
pub fn fingerprint(key: &[u8]) -> u64 {
    use sha2::Digest;
    let d = sha2::Sha256::digest(key);
    u64::from_be_bytes(d[..8].try_into().expect("8 bytes")).min(NO_KEY - 1)
}

/// The stored fingerprint of a record that must not enter the index: a second record of a
/// key found at recovery (marked purged), or one that does not read.
pub const NO_KEY: u64 = u64::MAX;

/// The de-duplication state the inbox's lock guards: events on their way to disk, and the
/// index of those in the log.
#[derive(Default)]
pub struct Index {
    /// Keys decided new whose record is not durable yet: their id, and the outcome of the
    /// write, which duplicates wait for.
    pub inflight: HashMap<Vec<u8>, crate::inbox::Reservation>,
    pub keydir: Keydir,
}

/// Fingerprint -> event id, for the events in the log.
pub struct Keydir {
    shards: Vec<HashMap<u64, u64>>,
    len: usize,
}

impl Default for Keydir {
    fn default() -> Self {
        Keydir {
            shards: (0..SHARDS).map(|_| HashMap::new()).collect(),
            len: 0,
        }
    }
}

impl Keydir {
    fn shard(&self, fp: u64) -> &HashMap<u64, u64> {
        &self.shards[(fp >> 58) as usize % SHARDS]
    }

    fn shard_mut(&mut self, fp: u64) -> &mut HashMap<u64, u64> {
        &mut self.shards[(fp >> 58) as usize % SHARDS]
    }

    /// The event id holding `fp`, if any.
    pub fn get(&self, fp: u64) -> Option<u64> {
        self.shard(fp).get(&fp).copied()
    }

    /// Gives `fp` to `id` if no event holds it; else returns the event that does.
    pub fn claim(&mut self, fp: u64, id: u64) -> Result<(), u64> {
        match self.shard_mut(fp).entry(fp) {
            std::collections::hash_map::Entry::Occupied(o) => Err(*o.get()),
            std::collections::hash_map::Entry::Vacant(v) => {
                v.insert(id);
                self.len += 1;
                Ok(())
            }
        }
    }

    /// Gives `fp` to `id`, whoever held it.
    pub fn replace(&mut self, fp: u64, id: u64) {
        if self.shard_mut(fp).insert(fp, id).is_none() {
            self.len += 1;
        }
    }

    /// Lets go of `fp` if `id` holds it.
    pub fn release(&mut self, fp: u64, id: u64) {
        let shard = self.shard_mut(fp);
        if shard.get(&fp) == Some(&id) {
            shard.remove(&fp);
            self.len -= 1;
        }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fingerprints_are_stable() {
        // Stored with the log's index: a change here would make every stored hint wrong.
        assert_eq!(fingerprint(b"shop\0e1"), fingerprint(b"shop\0e1"));
        assert_eq!(fingerprint(b""), 0xe3b0_c442_98fc_1c14);
        assert_ne!(fingerprint(b"shop\0e1"), fingerprint(b"shop\0e2"));
    }

    #[test]
    fn claims_replaces_and_releases() {
        let mut k = Keydir::default();
        assert!(k.is_empty());
        assert_eq!(k.claim(5, 100), Ok(()));
        assert_eq!(k.claim(5, 101), Err(100), "held by the first");
        assert_eq!(k.get(5), Some(100));
        k.release(5, 101);
        assert_eq!(k.get(5), Some(100), "only its holder releases it");
        k.replace(5, 102);
        assert_eq!((k.get(5), k.len()), (Some(102), 1));
        k.release(5, 102);
        assert_eq!((k.get(5), k.len()), (None, 0));
        for fp in 0..1000u64 {
            k.claim(fp.wrapping_mul(0x9e37_79b9_7f4a_7c15), fp).unwrap();
        }
        assert_eq!(k.len(), 1000);
    }
}
