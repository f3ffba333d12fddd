//! I/O policy of the filesystem: how an open file is served (no-open mode, FUSE passthrough or
//! the page cache), which pages the kernel may keep, and the fds I/O requests are served from.
//! `fs.rs` is the wire protocol; this is what it consults for opens, reads and writes.

use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};

use fuser::{BackingId, FileHandle, FopenFlags, INodeNo};

use super::UnionFs;
use crate::handle::{Handle, OpenMode, PT_MIN_LOWER, READ_BUF};
use crate::inode::{lock, rlock, wlock, Backing, Inode};
use crate::options::Passthrough;
use crate::sys::{self, errno};

/// Memory the fds no-open mode keeps for I/O may hold, at `FD_COST` an fd: 128 KiB (64 fds, a
/// few per worker: each is one file being read or written right now; the next request for an
/// evicted one re-opens it).
pub(super) const FILE_FD_BUDGET: usize = 64 * crate::inode::FD_COST;

/// Largest file whose content `prefill` pushes at open.
const PREFILL_MAX: usize = 64 * 1024;

impl UnionFs {
    /// Chooses no-open mode (`None`: on unless passthrough was asked for with `passthrough=on`,
    /// since passthrough needs an OPEN reply to attach the backing file to). Not even files made
    /// by CREATE get passthrough then: the kernel fails (EIO) every open made without us of an
    /// inode that has a passthrough open (fs/fuse/iomode.c), measured on 6.18.
    pub fn with_no_open(mut self, no_open: Option<bool>) -> UnionFs {
        self.no_open = no_open.unwrap_or(self.passthrough_mode != Passthrough::On);
        if self.no_open {
            self.passthrough.store(false, Ordering::Relaxed);
            self.u.orphan_always.store(true, Ordering::Relaxed);
        }
        self
    }

    /// Opens the real file for an open(2) of `inode`, copying it up first when writing.
    pub(super) fn open_real(
        &self,
        inode: &Arc<Inode>,
        flags: i32,
    ) -> io::Result<(OwnedFd, libc::stat)> {
        let acc = flags & libc::O_ACCMODE;
        let trunc = flags & libc::O_TRUNC != 0;
        if acc != libc::O_RDONLY || trunc {
            if !self.u.layers.has_upper {
                return Err(errno(libc::EROFS));
            }
            self.u.copy_up(inode, !trunc)?;
        }
        let (t, _) = self.u.target(inode)?;
        let oflags = flags & !(libc::O_CREAT | libc::O_EXCL | libc::O_NOCTTY | libc::O_DIRECT);
        t.open_file(oflags)
    }

    /// Decides passthrough or page cache for an open file, counting the open on the inode.
    /// The kernel fails opens that mix the two modes on one inode, or two backing files.
    pub(super) fn open_mode(
        &self,
        inode: &Inode,
        fd: &OwnedFd,
        st: &libc::stat,
        writable: bool,
        open_backing: impl FnOnce(&OwnedFd) -> io::Result<BackingId>,
    ) -> io::Result<OpenMode> {
        let mut slot = lock(&inode.backing);
        let cached = |inode: &Inode| {
            inode.cached_opens.fetch_add(1, Ordering::SeqCst);
            Ok(OpenMode::Cached)
        };
        let live = slot.upgrade();
        if inode.kind() != libc::S_IFREG
            || (live.is_none() && !self.passthrough.load(Ordering::Relaxed))
        {
            return cached(inode);
        }
        let real = (st.st_dev, st.st_ino);
        if let Some(b) = live {
            if b.real != real {
                // A passthrough open of another real file (the lower one, before a copy-up) is
                // still live, and the kernel allows one backing file per inode and no other kind
                // of open beside it (fs/fuse/iomode.c: even FOPEN_DIRECT_IO fails). Detach this
                // node from its name and answer ESTALE: the VFS retries the open once with
                // LOOKUP_REVAL, the lookup then gives a fresh node for the same name, and the
                // open succeeds there. The old fds keep their backing file.
                drop(slot);
                self.u.retire(inode);
                return Err(errno(libc::ESTALE));
            }
            if writable {
                lock(&inode.state).rare_mut().pt_written = true;
            }
            return Ok(OpenMode::Passthrough(b));
        }
        let upper = self.u.layers.is_upper(lock(&inode.state).layer);
        // Passthrough writes run with our (root) credentials and would keep set-ID bits; the
        // kernel asks us to drop them only on writes it sends us.
        let sgid_exec = libc::S_ISGID | libc::S_IXGRP;
        let set_id = st.st_mode & libc::S_ISUID != 0 || st.st_mode & sgid_exec == sgid_exec;
        if inode.cached_opens.load(Ordering::SeqCst) > 0
            || (!upper && st.st_size < PT_MIN_LOWER)
            || (writable && set_id)
        {
            return cached(inode);
        }
        match open_backing(fd) {
            Ok(id) => {
                let b = Arc::new(Backing { id, real });
                *slot = Arc::downgrade(&b);
                if writable {
                    lock(&inode.state).rare_mut().pt_written = true;
                }
                Ok(OpenMode::Passthrough(b))
            }
            Err(e) => {
                self.passthrough.store(false, Ordering::Relaxed);
                if self.passthrough_mode == Passthrough::On {
                    tracing::error!(
                        "FUSE passthrough refused by the kernel ({e}); serving I/O ourselves"
                    );
                } else {
                    tracing::info!("FUSE passthrough unavailable ({e}); serving I/O ourselves");
                }
                cached(inode)
            }
        }
    }

    /// Pushes a small file's content into the kernel page cache (FUSE_NOTIFY_STORE) while
    /// opening it read-only, so the read that follows needs no READ round trip. Only when the
    /// file has no other open handle: nobody else can then hold one of its page locks while
    /// waiting for us, and nobody writes it; a change seen after the store drops the pages again.
    pub(super) fn prefill(&self, inode: &Inode, fd: &OwnedFd, st: &libc::stat) {
        let size = st.st_size as usize;
        if size == 0 || size > PREFILL_MAX || inode.opens.load(Ordering::SeqCst) != 0 {
            return;
        }
        let Some(n) = self.u.notifier.get() else {
            return;
        };
        let stored = READ_BUF.with(|cell| {
            let mut buf = cell.borrow_mut();
            if buf.len() < size {
                buf.resize(size, 0);
            }
            match sys::pread_full(fd.as_raw_fd(), &mut buf[..size], 0) {
                Ok(got) if got == size => n.store(INodeNo(inode.ino), 0, &buf[..got]).is_ok(),
                _ => false,
            }
        });
        if !stored {
            return;
        }
        let changed = match sys::fstat(fd.as_raw_fd()) {
            Ok(now) => {
                (
                    now.st_size,
                    now.st_mtime,
                    now.st_mtime_nsec,
                    now.st_ctime,
                    now.st_ctime_nsec,
                ) != (
                    st.st_size,
                    st.st_mtime,
                    st.st_mtime_nsec,
                    st.st_ctime,
                    st.st_ctime_nsec,
                )
            }
            Err(_) => true,
        };
        if changed {
            // Dropping pages takes their locks: do it off this worker, which a reader holding
            // one of them may be waiting for.
            let (n, ino) = (n.clone(), inode.ino);
            let _ = std::thread::Builder::new()
                .name("inval".into())
                .spawn(move || n.inval_inode(INodeNo(ino), 0, 0));
        }
    }

    /// Registers an open file and returns its handle number.
    pub(super) fn add_handle(
        &self,
        inode: Arc<Inode>,
        fd: OwnedFd,
        flags: i32,
        backing: Option<Arc<Backing>>,
    ) -> u64 {
        let fh = self.next_fh.fetch_add(1, Ordering::Relaxed);
        let upper = self.u.layers.is_upper(lock(&inode.state).layer);
        inode.opens.fetch_add(1, Ordering::SeqCst);
        let h = Handle {
            inode,
            fd: RwLock::new(Arc::new(fd)),
            upper: AtomicBool::new(upper),
            flags,
            backing,
        };
        wlock(&self.handles).insert(fh, Arc::new(h));
        fh
    }

    pub(super) fn handle(&self, fh: FileHandle) -> io::Result<Arc<Handle>> {
        rlock(&self.handles)
            .get(&fh.0)
            .cloned()
            .ok_or_else(|| errno(libc::EBADF))
    }

    pub(super) fn handle_fd(&self, fh: FileHandle) -> io::Result<Arc<OwnedFd>> {
        self.handle(fh)?.fd(&self.u)
    }

    /// The fd for I/O on `ino`: the open handle's, or for file handle 0 (the kernel opened the
    /// file without asking us) one by node, copying the file up first when `write`.
    pub(super) fn io_fd(
        &self,
        ino: INodeNo,
        fh: FileHandle,
        write: bool,
    ) -> io::Result<Arc<OwnedFd>> {
        if fh.0 != 0 {
            return self.handle_fd(fh);
        }
        let inode = self.u.inode(ino.0)?;
        if inode.kind() != libc::S_IFREG {
            return Err(errno(libc::EBADF));
        }
        if write {
            if !self.u.layers.has_upper {
                return Err(errno(libc::EROFS));
            }
            self.u.copy_up(&inode, true)?;
        }
        let layer = lock(&inode.state).layer;
        let key = layer << 1 | write as usize;
        if let Some(fd) = self.files.get(ino.0, key) {
            return Ok(fd);
        }
        let (t, layer) = self.u.target(&inode)?;
        let flags = if write { libc::O_RDWR } else { libc::O_RDONLY };
        let fd = Arc::new(t.open_file(flags | libc::O_CLOEXEC)?.0);
        self.files
            .insert(ino.0, layer << 1 | write as usize, fd.clone());
        Ok(fd)
    }

    /// Open flags for a page-cache open. FOPEN_NOFLUSH everywhere: we have nothing to do at
    /// close(2), so the kernel need not send FLUSH.
    pub(super) fn cached_flags(&self, inode: &Inode) -> FopenFlags {
        let mut st = lock(&inode.state);
        if let Some(r) = st.rare.as_mut().filter(|r| r.pt_written) {
            // Written through passthrough: cached pages may be stale, let the kernel drop them.
            r.pt_written = false;
            FopenFlags::FOPEN_NOFLUSH
        } else {
            FopenFlags::FOPEN_KEEP_CACHE | FopenFlags::FOPEN_NOFLUSH
        }
    }
}
