//! The inbox log: where every accepted event is stored, and what makes an acknowledged
//! webhook survive `kill -9` and power loss.
//!
//! One writer thread drains every waiting append, writes them in one `write`, syncs once and
//! wakes them all (group commit). The log is the event store itself (`eventlog` indexes it):
//! once a group is durable, the writer reports where each tagged record lies *before* it
//! answers the waiters, so an acknowledged event can be read at once. A file is sealed once
//! it passes the segment size; sealed files stay until retention drops them.
//!
//! File format: `wal-<seq:016x>.log`, records `[u32 LE length][u32 LE crc32][payload]`. A
//! torn or corrupt record ends a file (it was never acknowledged).

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};
use tokio::sync::oneshot;

type Reply = oneshot::Sender<Result<(), String>>;

/// Resolves once a queued append is on disk.
pub type Pending = oneshot::Receiver<Result<(), String>>;

/// When an append's waiter is answered.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Until {
    /// After `fdatasync` (fsync durability).
    Synced,
    /// After `write` reached the OS (batch durability: survives a process crash; the sync
    /// follows within the lazy-sync interval).
    Written,
}

/// What a record is, for the index: its event id and the fingerprint of its
/// de-duplication key.
#[derive(Debug, Clone, Copy)]
pub struct Tag {
    pub id: u64,
    pub fp: u64,
}

/// A tagged record now durable (per the durability setting): where it lies.
#[derive(Debug, Clone)]
pub struct Logged {
    pub id: u64,
    pub fp: u64,
    /// Offset of the record's header in its file.
    pub off: u64,
    /// Payload length.
    pub len: u32,
    /// The payload itself (shared, not copied).
    pub record: bytes::Bytes,
}

/// What the writer reports, in log order.
#[derive(Debug)]
pub enum News {
    /// Records of file `seq` now durable.
    Durable { seq: u64, records: Vec<Logged> },
    /// File `seq` is complete: nothing more is written to it.
    Sealed { seq: u64 },
}

/// Called by the writer thread, in log order, before it answers the waiters.
pub type OnNews = Arc<dyn Fn(News) + Send + Sync>;

enum Msg {
    /// Append the records (none: a barrier) in one write and answer per `Until`.
    Append(Vec<(bytes::Bytes, Option<Tag>)>, Reply, Until),
    /// Seal the current file and start the next; answers the sealed file's sequence number.
    Rotate(oneshot::Sender<Result<u64, String>>),
}

/// Handle to the log writer thread.
#[derive(Clone)]
pub struct Wal {
    tx: mpsc::Sender<Msg>,
    dir: PathBuf,
}

fn file_name(seq: u64) -> String {
    format!("wal-{seq:016x}.log")
}

/// The log files in `dir`, oldest first, with their sequence numbers.
pub fn files(dir: &Path) -> std::io::Result<Vec<(u64, PathBuf)>> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        let name = path
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or_default();
        if let Some(seq) = name
            .strip_prefix("wal-")
            .and_then(|n| n.strip_suffix(".log"))
        {
            if let Ok(seq) = u64::from_str_radix(seq, 16) {
                out.push((seq, path));
            }
        }
    }
    out.sort();
    Ok(out)
}

/// Every intact record of one log file, in order.
pub fn read_records(path: &Path) -> std::io::Result<Vec<Vec<u8>>> {
    Ok(scan(path)?.into_iter().map(|(_, r)| r).collect())
}

/// Every intact record of one log file, in order, with its offset.
pub fn scan(path: &Path) -> std::io::Result<Vec<(u64, Vec<u8>)>> {
    let mut data = Vec::new();
    File::open(path)?.read_to_end(&mut data)?;
    let mut out = Vec::new();
    let mut at = 0;
    while at + 8 <= data.len() {
        let len = u32::from_le_bytes(data[at..at + 4].try_into().expect("4 bytes")) as usize;
        let crc = u32::from_le_bytes(data[at + 4..at + 8].try_into().expect("4 bytes"));
        // The writer never writes an empty record: zeros are a pre-allocated or torn tail.
        if len == 0 {
            break;
        }
        let Some(payload) = data.get(at + 8..at + 8 + len) else {
            break;
        };
        if crc32fast::hash(payload) != crc {
            break;
        }
        out.push((at as u64, payload.to_vec()));
        at += 8 + len;
    }
    Ok(out)
}

/// The payload of the record at `off` (of `len` bytes), checked against its header.
pub fn read_at(file: &File, off: u64, len: u32) -> std::io::Result<Vec<u8>> {
    let mut buf = vec![0u8; 8 + len as usize];
    file.read_exact_at(&mut buf, off)?;
    let bad = |what: &str| std::io::Error::new(std::io::ErrorKind::InvalidData, what.to_string());
    let stored = u32::from_le_bytes(buf[..4].try_into().expect("4 bytes"));
    let crc = u32::from_le_bytes(buf[4..8].try_into().expect("4 bytes"));
    if stored != len {
        return Err(bad("log record length differs from its index entry"));
    }
    buf.drain(..8);
    if crc32fast::hash(&buf) != crc {
        return Err(bad("log record checksum mismatch"));
    }
    Ok(buf)
}

/// The path of log file `seq` in `dir`.
pub fn path(dir: &Path, seq: u64) -> PathBuf {
    dir.join(file_name(seq))
}

/// fsyncs a directory, so created and deleted files are durable.
pub fn sync_dir(dir: &Path) -> std::io::Result<()> {
    File::open(dir)?.sync_all()
}

/// How the writer runs.
#[derive(Clone)]
pub struct Options {
    /// `Some(d)`: batch durability, synced at most `d` after a write.
    pub lazy_sync: Option<Duration>,
    /// A file is sealed once it holds this many bytes.
    pub segment_bytes: u64,
    pub healthy: Arc<AtomicBool>,
    pub on_news: Option<OnNews>,
    /// While set, every write fails (tests of the failure paths).
    pub fault: Option<Arc<AtomicBool>>,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            lazy_sync: None,
            segment_bytes: 64 << 20,
            healthy: Arc::new(AtomicBool::new(true)),
            on_news: None,
            fault: None,
        }
    }
}

impl Wal {
    /// Starts a writer appending to a new file numbered `seq` in `dir`. Appends someone waits
    /// for are synced at once; with `lazy_sync: Some(d)` the others (batch durability) are
    /// synced at most `d` later. `healthy` follows whether the last write succeeded.
    pub fn start(dir: &Path, seq: u64, options: Options) -> std::io::Result<Wal> {
        std::fs::create_dir_all(dir)?;
        let file = open_new(dir, seq)?;
        let (tx, rx) = mpsc::channel();
        let d = dir.to_path_buf();
        std::thread::Builder::new()
            .name("perkflow-wal".into())
            .spawn(move || writer(d, seq, file, rx, options))?;
        Ok(Wal {
            tx,
            dir: dir.to_path_buf(),
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Queues `payload`; the receiver resolves once it is synced to disk. Queue order is log
    /// order.
    pub fn append(&self, payload: bytes::Bytes) -> Pending {
        let records = if payload.is_empty() {
            vec![]
        } else {
            vec![(payload, None)]
        };
        self.send(records, Until::Synced)
    }

    /// Queues records to index, written together in one write (never split across files
    /// or writes), reported in `News::Durable` before the waiter is answered; `synced`:
    /// answered after the sync, else once written to the OS (batch durability: it survives
    /// a crash of this process; the sync follows within the lazy-sync interval).
    pub fn append_tagged(&self, records: Vec<(bytes::Bytes, Tag)>, synced: bool) -> Pending {
        let until = if synced {
            Until::Synced
        } else {
            Until::Written
        };
        let records = records
            .into_iter()
            .filter(|(p, _)| !p.is_empty())
            .map(|(p, t)| (p, Some(t)))
            .collect();
        self.send(records, until)
    }

    fn send(&self, records: Vec<(bytes::Bytes, Option<Tag>)>, until: Until) -> Pending {
        let (tx, rx) = oneshot::channel();
        let _ = self.tx.send(Msg::Append(records, tx, until));
        rx
    }

    /// Seals the current file (everything queued before is synced) and starts the next one.
    pub async fn rotate(&self) -> Result<u64, String> {
        let (tx, rx) = oneshot::channel();
        self.tx
            .send(Msg::Rotate(tx))
            .map_err(|_| "log writer stopped".to_string())?;
        rx.await.map_err(|_| "log writer stopped".to_string())?
    }

    /// Blocking `rotate`, for threads outside the async runtime.
    pub fn rotate_blocking(&self) -> Result<u64, String> {
        let (tx, rx) = oneshot::channel();
        self.tx
            .send(Msg::Rotate(tx))
            .map_err(|_| "log writer stopped".to_string())?;
        rx.blocking_recv()
            .map_err(|_| "log writer stopped".to_string())?
    }
}

fn open_new(dir: &Path, seq: u64) -> std::io::Result<File> {
    let f = OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join(file_name(seq)))?;
    sync_dir(dir)?;
    Ok(f)
}

struct Writer {
    dir: PathBuf,
    seq: u64,
    file: File,
    /// The next file, created (and its directory entry synced) off this thread ahead of
    /// time: a rotation then costs no file creation and no directory sync while appends wait.
    spare: Option<mpsc::Receiver<std::io::Result<File>>>,
    /// Bytes of the current file known to hold whole records.
    good_len: u64,
    /// Bytes of the current file known to be synced.
    synced_len: u64,
    options: Options,
}

impl Writer {
    fn news(&self, n: News) {
        if let Some(f) = &self.options.on_news {
            f(n);
        }
    }

    /// Appends `buf`; on failure cuts the file back to its last whole record (or, if that
    /// fails, moves on to a new file) so that no torn record hides later ones.
    fn write(&mut self, buf: &[u8]) -> std::io::Result<()> {
        let written = match &self.options.fault {
            Some(f) if f.load(Ordering::Relaxed) => Err(std::io::Error::other("injected fault")),
            _ => self.file.write_all(buf),
        };
        match written {
            Ok(()) => {
                self.good_len += buf.len() as u64;
                Ok(())
            }
            Err(e) => {
                self.discard_tail();
                Err(e)
            }
        }
    }

    /// Syncs. On failure with fsync durability, the unsynced tail (whose waiters are told
    /// it failed, and whose events are rolled back) is discarded so that it is never read as
    /// an event; with batch durability it was already acknowledged and stays.
    fn sync(&mut self) -> std::io::Result<()> {
        match self.file.sync_data() {
            Ok(()) => {
                self.synced_len = self.good_len;
                Ok(())
            }
            Err(e) => {
                if self.options.lazy_sync.is_none() {
                    self.good_len = self.synced_len;
                    self.discard_tail();
                }
                Err(e)
            }
        }
    }

    fn discard_tail(&mut self) {
        let cut = self
            .file
            .set_len(self.good_len)
            .and_then(|_| self.file.sync_data());
        if cut.is_err() {
            if let Err(e) = self.rotate() {
                tracing::error!(error = %e, "cannot start a new inbox log file");
            }
        }
    }

    fn rotate(&mut self) -> Result<u64, String> {
        let sealed = self.seq;
        let prepared = self.spare.take().and_then(|rx| rx.recv().ok()?.ok());
        let f = match prepared {
            Some(f) => f,
            None => open_new(&self.dir, self.seq + 1)
                .map_err(|e| format!("cannot start a new log file: {e}"))?,
        };
        self.file = f;
        self.seq += 1;
        self.good_len = 0;
        self.synced_len = 0;
        self.news(News::Sealed { seq: sealed });
        Ok(sealed)
    }

    /// Starts creating the file after the current one once this one is half full (an empty
    /// file left by a crash is removed when the store opens).
    fn prepare_next(&mut self) {
        let (tx, rx) = mpsc::channel();
        let (dir, seq) = (self.dir.clone(), self.seq + 1);
        let started = std::thread::Builder::new()
            .name("perkflow-wal-next".into())
            .spawn(move || {
                let _ = tx.send(open_new(&dir, seq));
            });
        self.spare = started.is_ok().then_some(rx);
    }
}

fn writer(dir: PathBuf, seq: u64, file: File, rx: mpsc::Receiver<Msg>, options: Options) {
    let mut w = Writer {
        dir,
        seq,
        file,
        spare: None,
        good_len: 0,
        synced_len: 0,
        options,
    };
    let lazy_sync = w.options.lazy_sync;
    let mut buf = Vec::with_capacity(1 << 20);
    let mut written_waiters: Vec<Reply> = Vec::new();
    let mut synced_waiters: Vec<Reply> = Vec::new();
    let mut rotations = Vec::new();
    // Tagged records written but not yet reported (fsync durability reports after the sync).
    let mut unreported: Vec<Logged> = Vec::new();
    // Written but not yet synced (batch durability), and since when.
    let mut unsynced_since: Option<Instant> = None;
    loop {
        let first = match (unsynced_since, lazy_sync) {
            (Some(since), Some(every)) => {
                match rx.recv_timeout(every.saturating_sub(since.elapsed())) {
                    Ok(m) => Some(m),
                    Err(mpsc::RecvTimeoutError::Timeout) => None,
                    Err(mpsc::RecvTimeoutError::Disconnected) => {
                        let _ = w.file.sync_data();
                        return;
                    }
                }
            }
            _ => match rx.recv() {
                Ok(m) => Some(m),
                Err(_) => return,
            },
        };
        buf.clear();
        let mut tagged = Vec::new();
        let mut next = first;
        while let Some(msg) = next.take().or_else(|| rx.try_recv().ok()) {
            match msg {
                Msg::Append(records, reply, until) => {
                    for (payload, tag) in records {
                        if let Some(t) = tag {
                            tagged.push(Logged {
                                id: t.id,
                                fp: t.fp,
                                off: w.good_len + buf.len() as u64,
                                len: payload.len() as u32,
                                record: payload.clone(),
                            });
                        }
                        buf.extend_from_slice(&(payload.len() as u32).to_le_bytes());
                        buf.extend_from_slice(&crc32fast::hash(&payload).to_le_bytes());
                        buf.extend_from_slice(&payload);
                    }
                    match until {
                        Until::Synced => synced_waiters.push(reply),
                        Until::Written => written_waiters.push(reply),
                    }
                }
                Msg::Rotate(reply) => {
                    rotations.push(reply);
                    break; // everything queued before the rotation goes into this file
                }
            }
            if buf.len() > 8 << 20 {
                break;
            }
        }
        let mut result = Ok(());
        if !buf.is_empty() {
            result = w.write(&buf);
            unsynced_since.get_or_insert_with(Instant::now);
        }
        if result.is_ok() {
            unreported.append(&mut tagged);
        }
        let reply_all = |waiters: &mut Vec<Reply>, r: &Result<(), String>| {
            for tx in waiters.drain(..) {
                let _ = tx.send(r.clone());
            }
        };
        let report = |w: &Writer, unreported: &mut Vec<Logged>| {
            if !unreported.is_empty() {
                w.news(News::Durable {
                    seq: w.seq,
                    records: std::mem::take(unreported),
                });
            }
        };
        // Batch durability: a record written is acknowledged, so it is readable now.
        if lazy_sync.is_some() && result.is_ok() {
            report(&w, &mut unreported);
        }
        let written = result.as_ref().map(|_| ()).map_err(|e| e.to_string());
        reply_all(&mut written_waiters, &written);
        let due = match (unsynced_since, lazy_sync) {
            (None, _) => false,
            (Some(_), None) => true,
            (Some(since), Some(every)) => {
                !synced_waiters.is_empty() || !rotations.is_empty() || since.elapsed() >= every
            }
        };
        if result.is_ok() && due {
            result = w.sync();
            unsynced_since = None;
        }
        if result.is_ok() {
            report(&w, &mut unreported);
        } else {
            // Cut off with the tail (fsync durability): never acknowledged, never indexed.
            unreported.clear();
        }
        let result = result.map_err(|e| e.to_string());
        w.options.healthy.store(result.is_ok(), Ordering::Relaxed);
        if let Err(e) = &result {
            unsynced_since = None;
            tracing::error!(error = %e, "writing the inbox log failed; webhooks are answered 503 until it works");
        }
        reply_all(&mut synced_waiters, &result);
        for r in rotations.drain(..) {
            let _ = r.send(w.rotate());
        }
        if w.spare.is_none() && w.good_len >= w.options.segment_bytes / 2 {
            w.prepare_next();
        }
        // Sealed only once everything in it is synced (its index must not name records a
        // power loss could take).
        if w.good_len >= w.options.segment_bytes && w.synced_len == w.good_len {
            if let Err(e) = w.rotate() {
                tracing::error!(error = %e, "cannot seal the inbox log file; it keeps growing");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn appends_are_synced_readable_and_rotated() {
        let dir = tempfile::tempdir().unwrap();
        let wal = Wal::start(dir.path(), 7, Options::default()).unwrap();
        let waits: Vec<_> = (0..100u32)
            .map(|i| wal.append(format!("record {i}").into_bytes().into()))
            .collect();
        for w in waits {
            w.await.unwrap().unwrap();
        }
        assert_eq!(wal.rotate().await.unwrap(), 7);
        wal.append(bytes::Bytes::from_static(b"next"))
            .await
            .unwrap()
            .unwrap();
        let f = files(dir.path()).unwrap();
        assert_eq!(f.iter().map(|(s, _)| *s).collect::<Vec<_>>(), [7, 8]);
        let first = read_records(&f[0].1).unwrap();
        assert_eq!(first.len(), 100);
        assert_eq!(first[42], b"record 42");
        assert_eq!(read_records(&f[1].1).unwrap(), [b"next".to_vec()]);
    }

    /// Tagged records are reported where they lie, before their waiters are answered, and a
    /// file past the segment size is sealed; a failed write is never reported.
    #[tokio::test]
    async fn reports_durable_records_and_seals_full_files() {
        let dir = tempfile::tempdir().unwrap();
        let news = Arc::new(std::sync::Mutex::new(Vec::new()));
        let fault = Arc::new(AtomicBool::new(false));
        let sink = news.clone();
        let wal = Wal::start(
            dir.path(),
            1,
            Options {
                segment_bytes: 40,
                on_news: Some(Arc::new(move |n| sink.lock().unwrap().push(n))),
                fault: Some(fault.clone()),
                ..Options::default()
            },
        )
        .unwrap();
        for i in 0..4u64 {
            let tag = Tag { id: i, fp: i };
            wal.append_tagged(vec![(format!("record-{i}").into_bytes().into(), tag)], true)
                .await
                .unwrap()
                .unwrap();
            // Reported before the answer.
            assert!(news.lock().unwrap().iter().any(
                |n| matches!(n, News::Durable { records, .. } if records.iter().any(|r| r.id == i))
            ));
        }
        fault.store(true, Ordering::Relaxed);
        let tag = Tag { id: 9, fp: 9 };
        assert!(wal
            .append_tagged(vec![(bytes::Bytes::from_static(b"lost"), tag)], true)
            .await
            .unwrap()
            .is_err());
        let news = news.lock().unwrap();
        let mut sealed = Vec::new();
        for n in news.iter() {
            match n {
                News::Durable { seq, records } => {
                    for r in records {
                        assert_ne!(r.id, 9, "a failed write was reported");
                        let f = File::open(path(dir.path(), *seq)).unwrap();
                        assert_eq!(
                            read_at(&f, r.off, r.len).unwrap(),
                            format!("record-{}", r.id).into_bytes()
                        );
                    }
                }
                News::Sealed { seq } => sealed.push(*seq),
            }
        }
        // 16 bytes a record (8 header + 8 payload), sealed past 40: after the third.
        assert_eq!(sealed, [1]);
        let f = File::open(path(dir.path(), 1)).unwrap();
        assert!(read_at(&f, 0, 9).is_err(), "a wrong length is refused");
    }

    #[tokio::test]
    async fn lazy_sync_still_reaches_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let wal = Wal::start(
            dir.path(),
            1,
            Options {
                lazy_sync: Some(Duration::from_millis(20)),
                ..Options::default()
            },
        )
        .unwrap();
        // Answered once written, before any sync.
        let tag = Tag { id: 1, fp: 1 };
        wal.append_tagged(vec![(bytes::Bytes::from_static(b"lazy"), tag)], false)
            .await
            .unwrap()
            .unwrap();
        let path = dir.path().join(file_name(1));
        assert_eq!(read_records(&path).unwrap(), [b"lazy".to_vec()]);
        // A synced waiter forces a sync at once.
        wal.append(bytes::Bytes::new()).await.unwrap().unwrap();
    }

    /// The next file is created while the current one fills (off the writer thread), and
    /// the rotation takes it.
    #[tokio::test]
    async fn the_next_file_is_prepared_before_it_is_needed() {
        let dir = tempfile::tempdir().unwrap();
        let options = Options {
            segment_bytes: 1000,
            ..Options::default()
        };
        let wal = Wal::start(dir.path(), 1, options).unwrap();
        let record = |n: usize| bytes::Bytes::from(vec![b'r'; n]);
        wal.append(record(300)).await.unwrap().unwrap();
        assert!(!path(dir.path(), 2).exists(), "not before half the segment");
        wal.append(record(300)).await.unwrap().unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while !path(dir.path(), 2).exists() {
            assert!(Instant::now() < deadline, "the next file was not prepared");
            std::thread::sleep(Duration::from_millis(5));
        }
        wal.append(record(500)).await.unwrap().unwrap();
        wal.append(bytes::Bytes::from_static(b"next"))
            .await
            .unwrap()
            .unwrap();
        let f = files(dir.path()).unwrap();
        assert_eq!(f.iter().map(|(s, _)| *s).collect::<Vec<_>>(), [1, 2]);
        assert_eq!(read_records(&f[0].1).unwrap().len(), 3);
        assert_eq!(read_records(&f[1].1).unwrap(), [b"next".to_vec()]);
    }

    /// A failed write (here: a full device) never leaves later records behind a torn one:
    /// the writer moves on to a new file when it cannot cut the old one back.
    #[test]
    fn a_failed_write_moves_on_to_a_clean_file() {
        let dir = tempfile::tempdir().unwrap();
        let Ok(full) = OpenOptions::new().write(true).open("/dev/full") else {
            return;
        };
        let mut w = Writer {
            dir: dir.path().to_path_buf(),
            seq: 4,
            file: full,
            spare: None,
            good_len: 0,
            synced_len: 0,
            options: Options::default(),
        };
        assert!(w.write(b"record").is_err());
        assert_eq!(w.seq, 5);
        w.write(b"next").unwrap();
        w.sync().unwrap();
        assert_eq!(
            std::fs::read(dir.path().join(file_name(5))).unwrap(),
            b"next"
        );
    }

    #[test]
    fn a_zero_filled_tail_ends_replay() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(file_name(1));
        let mut data = Vec::new();
        data.extend_from_slice(&3u32.to_le_bytes());
        data.extend_from_slice(&crc32fast::hash(b"one").to_le_bytes());
        data.extend_from_slice(b"one");
        data.extend_from_slice(&[0u8; 64]);
        std::fs::write(&path, &data).unwrap();
        assert_eq!(read_records(&path).unwrap(), [b"one".to_vec()]);
    }

    #[test]
    fn a_torn_tail_ends_replay() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(file_name(1));
        let mut data = Vec::new();
        for p in [&b"one"[..], b"two"] {
            data.extend_from_slice(&(p.len() as u32).to_le_bytes());
            data.extend_from_slice(&crc32fast::hash(p).to_le_bytes());
            data.extend_from_slice(p);
        }
        let whole = data.len();
        data.extend_from_slice(&(100u32).to_le_bytes());
        data.extend_from_slice(&[1, 2, 3]);
        std::fs::write(&path, &data).unwrap();
        assert_eq!(
            read_records(&path).unwrap(),
            [b"one".to_vec(), b"two".to_vec()]
        );
        // A flipped bit in the second record ends replay before it.
        data[whole - 1] ^= 1;
        std::fs::write(&path, &data).unwrap();
        assert_eq!(read_records(&path).unwrap(), [b"one".to_vec()]);
    }
}
