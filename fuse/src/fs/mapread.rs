//! READ replies straight from a lower file's page cache: the daemon maps a large lower file
//! read-only and hands the mapped range to the reply's `writev(2)`, so the kernel copies the
//! data once (lower page cache into the FUSE page) instead of twice (`pread` into our buffer,
//! then our buffer into the FUSE page). No-open mode serves every read of a large file itself
//! (there is no OPEN to attach FUSE passthrough to), so this is where its large-read time goes.
//!
//! Safety of the mapping: layers are immutable, and only the kernel ever reads the mapped bytes
//! (inside `writev` on /dev/fuse), never our own code. A lower file shrunk behind our back (a
//! contract violation) therefore makes that `writev` fail with EFAULT, which the kernel turns
//! into EIO for the one read, instead of a SIGBUS killing the daemon: a kernel-mode fault on a
//! user address is fixed up, never signalled. Upper files, which we truncate ourselves, are
//! never mapped.

use std::collections::HashMap;
use std::io;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use fuser::{INodeNo, ReplyData};

use super::UnionFs;
use crate::inode::{lock, Inode};

/// Reads at or past this offset, or larger than `MAP_SIZE` (the kernel never reads ahead past
/// the end of a file, so only a large file gets such a read), are served from a mapping; the
/// reads of a small file (most of a build cache) stay on the `pread` path and cost no mapping
/// or `fstat`.
const MAP_FROM: u64 = 512 * 1024;
const MAP_SIZE: u32 = 256 * 1024;

/// Read-ahead window asked for our mount's bdi (the kernel offers FUSE at most 128 KiB at
/// INIT): fewer, larger READs of a large file, each answered from a mapping with one copy.
const READ_AHEAD_KB: u32 = 1024;

/// After this many bytes served from a mapping, its page-table entries are dropped again, so
/// the daemon's resident size (which counts mapped file pages) stays small. The page cache
/// keeps the pages; a later read just maps them again.
const ZAP_EVERY: u64 = 4 << 20;

/// Memory the mappings may hold: each keeps at most `ZAP_EVERY` of file pages resident (plus a
/// VMA and a file reference, a few hundred bytes), so 16 MiB allows four mappings, the least
/// recently used unmapped first (one per large file being read right now; an evicted one is
/// mapped again by its next read, a few microseconds).
const MAP_BUDGET: u64 = 16 << 20;
const MAPS: usize = (MAP_BUDGET / ZAP_EVERY) as usize;

/// A read-only shared mapping of a whole lower file.
pub(super) struct Mapping {
    addr: usize,
    len: usize,
    /// The layer the mapped file is in (the node's layer changes at copy-up).
    layer: usize,
    /// Bytes served since the last `MADV_DONTNEED`.
    served: AtomicU64,
}

impl Mapping {
    fn new(fd: i32, len: usize, layer: usize) -> io::Result<Mapping> {
        // SAFETY: a fresh read-only shared mapping of `fd`; nothing else is at that address.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ,
                libc::MAP_SHARED,
                fd,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        Ok(Mapping {
            addr: p as usize,
            len,
            layer,
            served: AtomicU64::new(0),
        })
    }

    /// The mapped bytes of `[offset, offset + size)`, clipped at the end of the file.
    fn range(&self, offset: u64, size: u32) -> &[u8] {
        let start = (offset as usize).min(self.len);
        let end = start.saturating_add(size as usize).min(self.len);
        // SAFETY: inside our live mapping (it is unmapped only when the last Arc drops). The
        // bytes are only ever read by the kernel during the reply's writev (see module doc).
        unsafe { std::slice::from_raw_parts((self.addr + start) as *const u8, end - start) }
    }

    /// Counts `n` bytes served up to `end`; drops the mapping's page-table entries every
    /// `ZAP_EVERY`, and when a read reached the end of the file (nothing lingers after a
    /// one-pass read).
    fn served(&self, n: usize, end: u64) {
        let before = self.served.fetch_add(n as u64, Ordering::Relaxed);
        if before + n as u64 >= ZAP_EVERY || end >= self.len as u64 {
            self.served.store(0, Ordering::Relaxed);
            // SAFETY: our own mapping; a reader of it on another worker faults pages back in.
            unsafe {
                libc::madvise(
                    self.addr as *mut libc::c_void,
                    self.len,
                    libc::MADV_DONTNEED,
                )
            };
        }
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: our mapping, and no reference into it outlives the last Arc.
        unsafe { libc::munmap(self.addr as *mut libc::c_void, self.len) };
    }
}

/// Mappings by node id, least recently used evicted first.
#[derive(Default)]
pub(super) struct MapCache {
    map: Mutex<HashMap<u64, (Arc<Mapping>, u64)>>,
    tick: AtomicU64,
}

impl MapCache {
    fn get(&self, ino: u64, layer: usize) -> Option<Arc<Mapping>> {
        let t = self.tick.fetch_add(1, Ordering::Relaxed);
        let mut m = lock(&self.map);
        let e = m.get_mut(&ino).filter(|e| e.0.layer == layer)?;
        e.1 = t;
        Some(e.0.clone())
    }

    fn insert(&self, ino: u64, map: Arc<Mapping>) {
        let t = self.tick.fetch_add(1, Ordering::Relaxed);
        let mut m = lock(&self.map);
        if m.len() >= MAPS && !m.contains_key(&ino) {
            if let Some(old) = m.iter().min_by_key(|(_, v)| v.1).map(|(k, _)| *k) {
                m.remove(&old);
            }
        }
        m.insert(ino, (map, t));
    }

    /// Forgets a node's mapping (FORGET): unmapped once no reply uses it any more.
    pub(super) fn remove(&self, ino: u64) {
        lock(&self.map).remove(&ino);
    }
}

impl UnionFs {
    /// Answers a READ sent without a file handle (no-open mode) from a mapping of the node's
    /// lower file, when that applies; gives `reply` back when the read should take the `pread`
    /// path instead (small or upper files, the start of a file, or a failed mapping).
    pub(super) fn read_mapped(
        &self,
        ino: INodeNo,
        offset: u64,
        size: u32,
        reply: ReplyData,
    ) -> Option<ReplyData> {
        if offset < MAP_FROM && size <= MAP_SIZE {
            return Some(reply);
        }
        let Ok(inode) = self.u.inode(ino.0) else {
            return Some(reply);
        };
        if inode.kind() != libc::S_IFREG {
            return Some(reply);
        }
        let layer = lock(&inode.state).layer;
        if self.u.layers.is_upper(layer) {
            return Some(reply);
        }
        let map = match self.maps.get(ino.0, layer) {
            Some(m) => m,
            None => match self.map_lower(&inode, layer) {
                Some(m) => m,
                None => return Some(reply),
            },
        };
        let data = map.range(offset, size);
        let n = data.len();
        reply.data(data);
        map.served(n, offset + n as u64);
        None
    }

    /// Maps the node's file in `layer`, if that still is where the node is and it is a
    /// regular file larger than `MAP_FROM`. The mapping outlives the fd it was made from.
    fn map_lower(&self, inode: &Inode, layer: usize) -> Option<Arc<Mapping>> {
        let (t, li) = self.u.target(inode).ok()?;
        if li != layer || self.u.layers.is_upper(li) {
            return None;
        }
        let (fd, st) = t.open_file(libc::O_RDONLY | libc::O_CLOEXEC).ok()?;
        if st.st_mode & libc::S_IFMT != libc::S_IFREG || (st.st_size as u64) <= MAP_SIZE as u64 {
            return None;
        }
        let map = Arc::new(Mapping::new(fd.as_raw_fd(), st.st_size as usize, layer).ok()?);
        self.maps.insert(inode.ino, map.clone());
        Some(map)
    }
}

/// Raises the read-ahead window of the FUSE mount at `mountpoint` to `READ_AHEAD_KB`, from a
/// thread of its own: finding the mount's device takes a `stat` that our own session answers.
/// Best effort: inside a user namespace sysfs is read-only and the kernel's 128 KiB stays.
pub fn spawn_readahead_tuning(mountpoint: std::path::PathBuf) {
    let res = std::thread::Builder::new()
        .name("readahead".into())
        .spawn(move || {
            use std::os::unix::fs::MetadataExt;
            let Ok(md) = std::fs::metadata(&mountpoint) else {
                return;
            };
            let dev = md.dev();
            let bdi = format!(
                "/sys/class/bdi/{}:{}/read_ahead_kb",
                libc::major(dev),
                libc::minor(dev)
            );
            if let Err(e) = std::fs::write(&bdi, READ_AHEAD_KB.to_string()) {
                tracing::debug!("read-ahead of {mountpoint:?} stays at the default ({bdi}: {e})");
            }
        });
    if let Err(e) = res {
        tracing::debug!("cannot start the read-ahead thread: {e}");
    }
}
