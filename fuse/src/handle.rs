//! Open files: the handle table entries, how each open is served (passthrough or page cache),
//! and the per-write chores (set-ID bits, read buffers).

use std::io;
use std::os::fd::{OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};

use crate::inode::{rlock, wlock, Backing, Inode};
use crate::sys;
use crate::union::Union;

/// How an open file is served.
pub enum OpenMode {
    /// FUSE passthrough to this backing file.
    Passthrough(Arc<Backing>),
    /// Served by us, through the kernel page cache.
    Cached,
}

/// Lower files smaller than this are served through the page cache rather than passthrough:
/// a passthrough open of a lower file pins its backing file, so a write open of the copied-up
/// file while the read-only one stays open must move to a new node (see `UnionFs::open_mode`),
/// and the old fd then keeps reading the lower file instead of following the copy-up.
pub const PT_MIN_LOWER: i64 = 1 << 20;

/// An open file.
pub struct Handle {
    /// The inode opened.
    pub inode: Arc<Inode>,
    /// The real file; swapped for the upper copy when the object is copied up under us.
    pub fd: RwLock<Arc<OwnedFd>>,
    /// Whether `fd` already is the upper file.
    pub upper: AtomicBool,
    /// Open flags, for re-opening.
    pub flags: i32,
    /// Served through passthrough with this backing.
    pub backing: Option<Arc<Backing>>,
}

impl Handle {
    /// The fd to do I/O on, following a copy-up that happened after open (as overlayfs does).
    pub fn fd(&self, u: &Union) -> io::Result<Arc<OwnedFd>> {
        if !self.upper.load(Ordering::Acquire) && self.inode.copied_up.load(Ordering::Acquire) {
            let (t, layer) = u.target(&self.inode)?;
            if u.layers.is_upper(layer) {
                let fl = self.flags
                    & !(libc::O_CREAT
                        | libc::O_EXCL
                        | libc::O_TRUNC
                        | libc::O_NOCTTY
                        | libc::O_DIRECT);
                let nfd = Arc::new(t.open_file(fl)?.0);
                *wlock(&self.fd) = nfd;
                self.upper.store(true, Ordering::Release);
            }
        }
        Ok(rlock(&self.fd).clone())
    }
}

thread_local! {
    /// Per-worker read buffer (see `read`).
    pub static READ_BUF: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Drops set-user-ID / set-group-ID bits and file capabilities, as a write by an unprivileged
/// user does on a local filesystem (we write as root, which would keep them).
/// Returns whether anything changed.
pub fn kill_suidgid(fd: RawFd) -> io::Result<bool> {
    let st = sys::fstat(fd)?;
    let sgid_exec = libc::S_ISGID | libc::S_IXGRP;
    let mut changed = false;
    if st.st_mode & libc::S_ISUID != 0 || st.st_mode & sgid_exec == sgid_exec {
        sys::fchmod(fd, st.st_mode & 0o7777 & !(libc::S_ISUID | libc::S_ISGID))?;
        changed = true;
    }
    if sys::removexattr(&sys::proc_path(fd, None), c"security.capability", true).is_ok() {
        changed = true;
    }
    Ok(changed)
}
