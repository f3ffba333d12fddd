//! The `fuser::Filesystem` implementation: maps FUSE requests onto the union logic, manages
//! file and directory handles, and negotiates the kernel features that make it fast
//! (passthrough, readdirplus, long cache TTLs, parallel dirops).

use std::collections::HashMap;
use std::ffi::OsStr;
use std::io;
use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use fuser::{
    AccessFlags, CopyFileRangeFlags, Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags,
    Generation, INodeNo, InitFlags, KernelConfig, LockOwner, OpenFlags, RenameFlags, ReplyAttr,
    ReplyCreate, ReplyData, ReplyDirectory, ReplyDirectoryPlus, ReplyEmpty, ReplyEntry, ReplyLseek,
    ReplyOpen, ReplyStatfs, ReplyWrite, ReplyXattr, Request, TimeOrNow, WriteFlags,
};

use crate::handle::{kill_suidgid, Handle, OpenMode, READ_BUF};
use crate::inode::{lock, rlock, wlock, DirFdCache, Inode};
use crate::layers::{self, Layers};
use crate::options::Passthrough;
use crate::prefetch::Prefetch;
use crate::sys::{self, errno};
use crate::union::{Target, Union};
use crate::whiteout;

mod iomode;
mod mapread;
use iomode::FILE_FD_BUDGET;
pub use mapread::spawn_readahead_tuning;

/// Key of a directory's own listing in `UnionFs::dirs` when the kernel sends no OPENDIR
/// (handle numbers never reach bit 63).
fn dir_key(ino: u64) -> u64 {
    ino | 1 << 63
}

fn to_errno(e: io::Error) -> Errno {
    Errno::from_i32(e.raw_os_error().unwrap_or(libc::EIO))
}

fn systime(sec: i64, nsec: i64) -> SystemTime {
    if sec >= 0 {
        UNIX_EPOCH + Duration::new(sec as u64, nsec.clamp(0, 999_999_999) as u32)
    } else {
        UNIX_EPOCH - Duration::new(sec.unsigned_abs(), 0)
            + Duration::new(0, nsec.clamp(0, 999_999_999) as u32)
    }
}

fn file_type(mode: u32) -> FileType {
    match mode & libc::S_IFMT {
        libc::S_IFDIR => FileType::Directory,
        libc::S_IFLNK => FileType::Symlink,
        libc::S_IFCHR => FileType::CharDevice,
        libc::S_IFBLK => FileType::BlockDevice,
        libc::S_IFIFO => FileType::NamedPipe,
        libc::S_IFSOCK => FileType::Socket,
        _ => FileType::RegularFile,
    }
}

fn dtype_to_type(d: u8) -> FileType {
    match d {
        libc::DT_DIR => FileType::Directory,
        libc::DT_LNK => FileType::Symlink,
        libc::DT_CHR => FileType::CharDevice,
        libc::DT_BLK => FileType::BlockDevice,
        libc::DT_FIFO => FileType::NamedPipe,
        libc::DT_SOCK => FileType::Socket,
        _ => FileType::RegularFile,
    }
}

/// Builds a FUSE attr from a real stat, with our node id as st_ino.
fn make_attr(ino: u64, st: &libc::stat, merged_dir: bool) -> FileAttr {
    FileAttr {
        ino: INodeNo(ino),
        size: st.st_size as u64,
        blocks: st.st_blocks as u64,
        atime: systime(st.st_atime, st.st_atime_nsec),
        mtime: systime(st.st_mtime, st.st_mtime_nsec),
        ctime: systime(st.st_ctime, st.st_ctime_nsec),
        crtime: UNIX_EPOCH,
        kind: file_type(st.st_mode),
        perm: (st.st_mode & 0o7777) as u16,
        // A merged dir's real link count says nothing about its merged subdirs; 1 tells find(1)
        // not to use the leaf optimisation.
        nlink: if merged_dir { 1 } else { st.st_nlink as u32 },
        uid: st.st_uid,
        gid: st.st_gid,
        rdev: st.st_rdev as u32,
        blksize: st.st_blksize as u32,
        flags: 0,
    }
}

/// A merged directory listing: names, types and the stack position each was found at ("." and
/// ".." first), with the layer stack it was taken from.
type Listing = Arc<(Vec<(std::ffi::OsString, FileType, usize)>, Vec<usize>)>;

/// A snapshot of a merged directory listing, taken at opendir (and at rewind).
struct DirHandle {
    entries: Mutex<Option<Listing>>,
}

/// The mounted filesystem.
pub struct UnionFs {
    u: Union,
    ttl: Duration,
    passthrough: AtomicBool,
    passthrough_mode: Passthrough,
    stack_depth: u32,
    handles: RwLock<HashMap<u64, Arc<Handle>>>,
    dirs: Mutex<HashMap<u64, Arc<DirHandle>>>,
    next_fh: AtomicU64,
    /// The kernel supports FUSE_NO_OPENDIR_SUPPORT.
    no_opendir: AtomicBool,
    /// Directory read-ahead for cold walks.
    prefetch: Prefetch,
    /// No-open mode: OPEN is answered ENOSYS, so the kernel opens files without asking us
    /// (no OPEN, RELEASE or FLUSH round trips, page cache kept across opens) and sends I/O with
    /// file handle 0, served from `files`.
    no_open: bool,
    /// Fds for I/O on files opened without us, by (node id, layer << 1 | writable); bounded.
    files: DirFdCache,
    /// Mappings of large lower files that no-open mode's reads are answered from.
    maps: mapread::MapCache,
}

impl UnionFs {
    /// A filesystem over the opened layers.
    pub fn new(layers: Layers, ttl: Duration, passthrough: Passthrough, userns: bool) -> UnionFs {
        // Before the session's threads exist (see `sys::limit_malloc_arenas`).
        sys::limit_malloc_arenas();
        // FUSE passthrough needs CAP_SYS_ADMIN in the init namespace: inside a user namespace
        // the kernel refuses every backing file, so do not even ask.
        let want_pt = match passthrough {
            Passthrough::Off => false,
            Passthrough::Auto => !userns,
            Passthrough::On => true,
        };
        let mut stack_depth = 1;
        for r in &layers.roots {
            // SAFETY: statfs is plain old data.
            let mut sf: libc::statfs = unsafe { std::mem::zeroed() };
            // SAFETY: valid fd and out pointer.
            if unsafe { libc::fstatfs(r.as_raw_fd(), &mut sf) } == 0 {
                let t = sf.f_type as i64;
                if t == 0x794c7630 || t == 0x65735546 || t == 0x9123683E_u32 as i64 {
                    stack_depth = 2;
                }
            }
        }
        UnionFs {
            u: Union::new(layers),
            ttl,
            passthrough: AtomicBool::new(want_pt),
            passthrough_mode: passthrough,
            stack_depth,
            handles: RwLock::new(HashMap::new()),
            dirs: Mutex::new(HashMap::new()),
            next_fh: AtomicU64::new(1),
            no_opendir: AtomicBool::new(false),
            prefetch: Prefetch::default(),
            no_open: false,
            files: DirFdCache::with_budget(FILE_FD_BUDGET, usize::MAX),
            maps: mapread::MapCache::default(),
        }
    }

    /// The slot the session's notifier goes into (see `lib.rs`).
    pub fn notifier_slot(&self) -> Arc<std::sync::OnceLock<fuser::Notifier>> {
        self.u.notifier.clone()
    }

    fn attr_of(&self, inode: &Inode, fh: Option<FileHandle>) -> io::Result<FileAttr> {
        if let Some(st) = lock(&inode.state).dead_attr() {
            return Ok(make_attr(inode.ino, &st, false));
        }
        let st = match fh.and_then(|fh| self.handle(fh).ok()) {
            Some(h) if !inode.is_dir() => sys::fstat(h.fd(&self.u)?.as_raw_fd())?,
            _ => self.u.target(inode)?.0.stat()?,
        };
        if st.st_mode & libc::S_IFMT != inode.kind() {
            // The name was replaced under us (e.g. by a whiteout mid-unlink): stale.
            return Err(errno(libc::ENOENT));
        }
        let merged = inode.is_dir() && lock(&inode.state).stack().len() > 1;
        Ok(make_attr(inode.ino, &st, merged))
    }

    /// lookup: resolve, intern (counting a lookup), and return the attr.
    fn do_lookup(&self, parent: u64, name: &OsStr) -> io::Result<Option<FileAttr>> {
        let p = self.u.inode(parent)?;
        if !p.is_dir() {
            return Err(errno(libc::ENOTDIR));
        }
        let Some(r) = self.u.resolve(&p, name)? else {
            return Ok(None);
        };
        let inode = self.u.intern(&p, name, &r);
        Ok(Some(make_attr(inode.ino, &r.st, r.stack.len() > 1)))
    }

    /// Entry TTL: long, except for names of a lower file with several links, which share a node
    /// id: the kernel must look each of them up on every access so we know which name is used.
    fn entry_ttl(&self, attr: &FileAttr) -> Duration {
        if attr.kind != FileType::Directory && attr.nlink > 1 {
            if let Ok(i) = self.u.inode(attr.ino.0) {
                if !self.u.layers.is_upper(lock(&i.state).layer) {
                    return Duration::ZERO;
                }
            }
        }
        self.ttl
    }

    fn reply_entry(&self, res: io::Result<Option<FileAttr>>, reply: ReplyEntry) {
        match res {
            Ok(Some(attr)) => {
                let ettl = self.entry_ttl(&attr);
                reply.entry_with_ttls(&self.ttl, &ettl, &attr, Generation(0))
            }
            Ok(None) => reply.error(Errno::ENOENT),
            Err(e) => reply.error(to_errno(e)),
        }
    }

    fn snapshot(&self, inode: &Inode) -> io::Result<Listing> {
        if lock(&inode.state).dead() {
            // A removed directory (someone's cwd) lists as empty, as on a local filesystem.
            let dots = vec![
                (".".into(), FileType::Directory, 0),
                ("..".into(), FileType::Directory, 0),
            ];
            return Ok(Arc::new((dots, Vec::new())));
        }
        let stack = self.u.stack(inode)?;
        let mut fds = Vec::with_capacity(stack.len());
        let mut path_fds = Vec::with_capacity(stack.len());
        for &li in &stack {
            let fd = self.u.dir_fd(inode, li)?;
            fds.push(sys::reopen_dir(fd.as_raw_fd())?);
            path_fds.push(fd);
        }
        let mut out = vec![
            (".".into(), FileType::Directory, 0),
            ("..".into(), FileType::Directory, 0),
        ];
        out.extend(
            layers::merged_listing(fds)?
                .into_iter()
                .map(|e| (e.name, dtype_to_type(e.dtype), e.pos)),
        );
        // Read the subdirectories ahead, each in the layer the listing found it in.
        for (pos, fd) in path_fds.iter().enumerate() {
            let dirs: Vec<std::ffi::CString> = out[2..]
                .iter()
                .filter(|(_, k, p)| *k == FileType::Directory && *p == pos)
                .filter_map(|(n, _, _)| sys::cstr(n).ok())
                .collect();
            self.prefetch.push(fd, dirs);
        }
        Ok(Arc::new((out, stack)))
    }

    fn dir_entries(&self, ino: u64, fh: FileHandle, offset: u64) -> io::Result<Listing> {
        let h = if fh.0 == 0 {
            // No OPENDIR (see `opendir`): one listing per directory inode, dropped at its end.
            lock(&self.dirs)
                .entry(dir_key(ino))
                .or_insert_with(|| {
                    Arc::new(DirHandle {
                        entries: Mutex::new(None),
                    })
                })
                .clone()
        } else {
            lock(&self.dirs)
                .get(&fh.0)
                .cloned()
                .ok_or_else(|| errno(libc::EBADF))?
        };
        let mut entries = lock(&h.entries);
        let listing = match &*entries {
            // Offset 0 is the first read or a rewinddir(3): list the directory as it is now.
            Some(e) if offset != 0 => e.clone(),
            _ => {
                let inode = self.u.inode(ino)?;
                let snap = self.snapshot(&inode)?;
                *entries = Some(snap.clone());
                snap
            }
        };
        drop(entries);
        if fh.0 == 0 && offset as usize >= listing.0.len() {
            lock(&self.dirs).remove(&dir_key(ino));
        }
        Ok(listing)
    }

    #[allow(clippy::too_many_arguments)]
    fn setattr_inner(
        &self,
        caller_uid: u32,
        ino: u64,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        fh: Option<FileHandle>,
    ) -> io::Result<FileAttr> {
        let inode = self.u.inode(ino)?;
        if !self.u.layers.has_upper {
            return Err(errno(libc::EROFS));
        }
        // A truncate to 0 needs no data copied.
        let with_data = size != Some(0);
        self.u.copy_up(&inode, with_data)?;
        let (t, _) = self.u.target(&inode)?;
        if let Some(m) = mode {
            if inode.kind() == libc::S_IFLNK {
                return Err(errno(libc::EOPNOTSUPP));
            }
            t.chmod(m & 0o7777)?;
        }
        if uid.is_some() || gid.is_some() {
            t.chown(uid.unwrap_or(u32::MAX), gid.unwrap_or(u32::MAX))?;
        }
        if let Some(sz) = size {
            if inode.is_dir() {
                return Err(errno(libc::EISDIR));
            }
            if caller_uid != 0 && mode.is_none() {
                // truncate(2) by an unprivileged caller drops set-ID bits; ours runs as root.
                let (f, _) = t.open_file(libc::O_RDONLY)?;
                kill_suidgid(f.as_raw_fd())?;
            }
            let via_fh = match fh.and_then(|fh| self.handle_fd(fh).ok()) {
                Some(fd) => sys::ftruncate(fd.as_raw_fd(), sz).is_ok(),
                None => false,
            };
            if !via_fh {
                let (f, _) = t.open_file(libc::O_WRONLY)?;
                sys::ftruncate(f.as_raw_fd(), sz)?;
            }
        }
        if atime.is_some() || mtime.is_some() {
            let conv = |t: Option<TimeOrNow>| match t {
                None => libc::timespec {
                    tv_sec: 0,
                    tv_nsec: libc::UTIME_OMIT,
                },
                Some(TimeOrNow::Now) => libc::timespec {
                    tv_sec: 0,
                    tv_nsec: libc::UTIME_NOW,
                },
                Some(TimeOrNow::SpecificTime(st)) => match st.duration_since(UNIX_EPOCH) {
                    Ok(d) => libc::timespec {
                        tv_sec: d.as_secs() as i64,
                        tv_nsec: d.subsec_nanos() as i64,
                    },
                    Err(e) => {
                        let d = e.duration();
                        let (mut s, mut n) = (-(d.as_secs() as i64), -(d.subsec_nanos() as i64));
                        if n < 0 {
                            s -= 1;
                            n += 1_000_000_000;
                        }
                        libc::timespec {
                            tv_sec: s,
                            tv_nsec: n,
                        }
                    }
                },
            };
            t.utimens(&[conv(atime), conv(mtime)])?;
        }
        self.attr_of(&inode, None)
    }

    fn xattr_target(&self, ino: u64) -> io::Result<Target> {
        let inode = self.u.inode(ino)?;
        Ok(self.u.target(&inode)?.0)
    }

    fn reply_xattr_bytes(data: &[u8], size: u32, reply: ReplyXattr) {
        if size == 0 {
            reply.size(data.len() as u32);
        } else if data.len() > size as usize {
            reply.error(Errno::ERANGE);
        } else {
            reply.data(data);
        }
    }

    fn new_node(
        &self,
        req: &Request,
        parent: u64,
        name: &OsStr,
        mode: u32,
        kind: u32,
        make: impl FnMut(RawFd, &std::ffi::CStr, u32) -> io::Result<()>,
    ) -> io::Result<Option<FileAttr>> {
        let p = self.u.inode(parent)?;
        self.u
            .create_node(req.uid(), req.gid(), &p, name, mode, kind, make)?;
        self.do_lookup(parent, name)
    }
}

impl Filesystem for UnionFs {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> io::Result<()> {
        let caps = config.capabilities();
        // Always readdirplus (no READDIRPLUS_AUTO): every entry then carries its node id, so
        // d_ino equals st_ino in every chunk of a large directory, not only the first.
        let mut wanted = InitFlags::FUSE_DO_READDIRPLUS
            | InitFlags::FUSE_PARALLEL_DIROPS
            | InitFlags::FUSE_CACHE_SYMLINKS
            | InitFlags::FUSE_ASYNC_DIO
            // Without this the kernel asks for security.capability before EVERY write, even a
            // passthrough one. We kill suid/sgid ourselves when a write asks for it (and our
            // mount is nosuid).
            | InitFlags::FUSE_HANDLE_KILLPRIV_V2;
        if !self.no_open {
            // An O_TRUNC open then truncates in OPEN. Without OPEN (no-open mode) the kernel
            // would skip the truncate entirely: it must come as SETATTR size=0 instead.
            wanted |= InitFlags::FUSE_ATOMIC_O_TRUNC;
        }
        let _ = config.add_capabilities(wanted & caps);
        if caps.contains(InitFlags::FUSE_NO_OPENDIR_SUPPORT) {
            self.no_opendir.store(true, Ordering::Relaxed);
        }
        if self.passthrough.load(Ordering::Relaxed) {
            if caps.contains(InitFlags::FUSE_PASSTHROUGH)
                && config.add_capabilities(InitFlags::FUSE_PASSTHROUGH).is_ok()
                && config.set_max_stack_depth(self.stack_depth).is_ok()
            {
                tracing::debug!("passthrough negotiated (stack depth {})", self.stack_depth);
            } else {
                tracing::info!("kernel does not offer FUSE passthrough");
                self.passthrough.store(false, Ordering::Relaxed);
            }
        }
        let _ = config.set_max_background(64);
        let _ = config.set_congestion_threshold(48);
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        match self.do_lookup(parent.0, name) {
            Ok(None) => {
                // A negative entry, cached for the TTL: the kernel drops it itself when we create.
                let mut attr = make_attr(0, &sys::empty_stat(), false);
                attr.ino = INodeNo(0);
                reply.entry(&self.ttl, &attr, Generation(0));
            }
            other => self.reply_entry(other, reply),
        }
    }

    fn forget(&self, _req: &Request, ino: INodeNo, nlookup: u64) {
        self.u.forget(ino.0, nlookup);
        if self.u.inode(ino.0).is_err() {
            lock(&self.dirs).remove(&dir_key(ino.0));
            self.files.remove_all(ino.0);
            self.maps.remove(ino.0);
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, fh: Option<FileHandle>, reply: ReplyAttr) {
        match self.u.inode(ino.0).and_then(|i| self.attr_of(&i, fh)) {
            Ok(a) => reply.attr(&self.ttl, &a),
            Err(e) => reply.error(to_errno(e)),
        }
    }

    fn setattr(
        &self,
        req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        match self.setattr_inner(req.uid(), ino.0, mode, uid, gid, size, atime, mtime, fh) {
            Ok(a) => reply.attr(&self.ttl, &a),
            Err(e) => reply.error(to_errno(e)),
        }
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        let res = self
            .u
            .inode(ino.0)
            .and_then(|i| match self.u.target(&i)?.0 {
                Target::At(d, n) => sys::readlinkat(d.as_raw_fd(), &n),
                Target::Dir(_) | Target::Orphan(_) => Err(errno(libc::EINVAL)),
            });
        match res {
            Ok(v) => reply.data(&v),
            Err(e) => reply.error(to_errno(e)),
        }
    }

    fn mknod(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        _umask: u32,
        rdev: u32,
        reply: ReplyEntry,
    ) {
        let kind = mode & libc::S_IFMT;
        let res = self.new_node(req, parent.0, name, mode, kind, |d, n, m| {
            if kind == libc::S_IFREG || kind == 0 {
                sys::openat(d, n, libc::O_CREAT | libc::O_EXCL | libc::O_WRONLY, m).map(drop)
            } else {
                sys::mknodat(d, n, kind | m, rdev as u64)
            }
        });
        self.reply_entry(res, reply);
    }

    fn mkdir(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        _umask: u32,
        reply: ReplyEntry,
    ) {
        let res = self.new_node(req, parent.0, name, mode, libc::S_IFDIR, |d, n, m| {
            sys::mkdirat(d, n, m)
        });
        self.reply_entry(res, reply);
    }

    fn unlink(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        match self.u.inode(parent.0).and_then(|p| self.u.unlink(&p, name)) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(to_errno(e)),
        }
    }

    fn rmdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        match self.u.inode(parent.0).and_then(|p| self.u.rmdir(&p, name)) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(to_errno(e)),
        }
    }

    fn symlink(
        &self,
        req: &Request,
        parent: INodeNo,
        link_name: &OsStr,
        target: &Path,
        reply: ReplyEntry,
    ) {
        let res = sys::cstr(target.as_os_str()).and_then(|tgt| {
            self.new_node(req, parent.0, link_name, 0o777, libc::S_IFLNK, |d, n, _| {
                sys::symlinkat(&tgt, d, n)
            })
        });
        self.reply_entry(res, reply);
    }

    fn rename(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        let res = (|| {
            let p = self.u.inode(parent.0)?;
            let np = self.u.inode(newparent.0)?;
            self.u.rename(&p, name, &np, newname, flags.bits())
        })();
        match res {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(to_errno(e)),
        }
    }

    fn link(
        &self,
        _req: &Request,
        ino: INodeNo,
        newparent: INodeNo,
        newname: &OsStr,
        reply: ReplyEntry,
    ) {
        let res = (|| {
            let i = self.u.inode(ino.0)?;
            let np = self.u.inode(newparent.0)?;
            let st = self.u.link(&i, &np, newname)?;
            Ok(Some(make_attr(i.ino, &st, false)))
        })();
        self.reply_entry(res, reply);
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        if self.no_open {
            // The kernel then opens every file itself from now on (see `no_open`).
            return reply.error(Errno::ENOSYS);
        }
        let inode = match self.u.inode(ino.0) {
            Ok(i) => i,
            Err(e) => return reply.error(to_errno(e)),
        };
        let (fd, st) = match self.open_real(&inode, flags.0) {
            Ok(f) => f,
            Err(e) => return reply.error(to_errno(e)),
        };
        let writable = flags.0 & libc::O_ACCMODE != libc::O_RDONLY;
        match self.open_mode(&inode, &fd, &st, writable, |fd| {
            reply.open_backing(fd.as_fd())
        }) {
            Ok(OpenMode::Passthrough(b)) => {
                let fh = self.add_handle(inode, fd, flags.0, Some(b.clone()));
                reply.opened_passthrough(FileHandle(fh), FopenFlags::FOPEN_NOFLUSH, &b.id);
            }
            Ok(OpenMode::Cached) => {
                let fl = self.cached_flags(&inode);
                if fl.contains(FopenFlags::FOPEN_KEEP_CACHE) && !writable {
                    self.prefill(&inode, &fd, &st);
                }
                let fh = self.add_handle(inode, fd, flags.0, None);
                reply.opened(FileHandle(fh), fl);
            }
            Err(e) => reply.error(to_errno(e)),
        }
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        let reply = if fh.0 == 0 {
            match self.read_mapped(ino, offset, size, reply) {
                Some(r) => r,
                None => return,
            }
        } else {
            reply
        };
        let fd = match self.io_fd(ino, fh, false) {
            Ok(fd) => fd,
            Err(e) => return reply.error(to_errno(e)),
        };
        // One buffer per worker thread, reused: the kernel asks for up to the readahead window
        // (often far more than a small file holds), and zeroing a fresh buffer each time costs.
        READ_BUF.with(|cell| {
            let mut buf = cell.borrow_mut();
            if buf.len() < size as usize {
                buf.resize(size as usize, 0);
            }
            match sys::pread_full(fd.as_raw_fd(), &mut buf[..size as usize], offset) {
                Ok(n) => reply.data(&buf[..n]),
                Err(e) => reply.error(to_errno(e)),
            }
        });
    }

    fn write(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        data: &[u8],
        write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        let res = self.io_fd(ino, fh, true).and_then(|fd| {
            if write_flags.contains(WriteFlags::FUSE_WRITE_KILL_SUIDGID)
                && kill_suidgid(fd.as_raw_fd())?
            {
                // The kernel keeps the old mode cached; attributes only, no lock is taken.
                if let Some(n) = self.u.notifier.get() {
                    let _ = n.inval_inode(ino, -1, 0);
                }
            }
            sys::pwrite_full(fd.as_raw_fd(), data, offset)
        });
        match res {
            Ok(n) => reply.written(n as u32),
            Err(e) => reply.error(to_errno(e)),
        }
    }

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        // Nothing to do at close(2): ENOSYS makes the kernel stop sending FLUSH for the mount
        // (files opened without us have no FOPEN_NOFLUSH to say so).
        reply.error(Errno::ENOSYS);
    }

    fn release(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        if let Some(h) = wlock(&self.handles).remove(&fh.0) {
            h.inode.opens.fetch_sub(1, Ordering::SeqCst);
            if h.backing.is_none() {
                h.inode.cached_opens.fetch_sub(1, Ordering::SeqCst);
            }
        }
        reply.ok();
    }

    fn fsync(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        datasync: bool,
        reply: ReplyEmpty,
    ) {
        match self
            .io_fd(ino, fh, false)
            .and_then(|fd| sys::fsync(fd.as_raw_fd(), datasync))
        {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(to_errno(e)),
        }
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        if self.no_opendir.load(Ordering::Relaxed) {
            // The kernel then stops sending OPENDIR/RELEASEDIR altogether and treats every
            // directory as FOPEN_KEEP_CACHE | FOPEN_CACHE_DIR: one round trip less per
            // directory walked, none at all for a directory it has cached.
            return reply.error(Errno::ENOSYS);
        }
        match self.u.inode(ino.0) {
            Ok(i) if i.is_dir() => {
                // The listing is taken at the first readdir: a kernel serving readdir from its
                // cache (FOPEN_CACHE_DIR) never asks, and then nothing is wasted.
                let fh = self.next_fh.fetch_add(1, Ordering::Relaxed);
                lock(&self.dirs).insert(
                    fh,
                    Arc::new(DirHandle {
                        entries: Mutex::new(None),
                    }),
                );
                reply.opened(
                    FileHandle(fh),
                    FopenFlags::FOPEN_KEEP_CACHE | FopenFlags::FOPEN_CACHE_DIR,
                );
            }
            Ok(_) => reply.error(Errno::ENOTDIR),
            Err(e) => reply.error(to_errno(e)),
        }
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        let entries = match self.dir_entries(ino.0, fh, offset) {
            Ok(e) => e,
            Err(e) => return reply.error(to_errno(e)),
        };
        let t = rlock(&self.u.table);
        for (i, (name, kind, _)) in entries.0.iter().enumerate().skip(offset as usize) {
            let d_ino = if i < 2 {
                ino.0
            } else {
                t.name_ino(ino.0, name.as_os_str())
                    .unwrap_or((1 << 62) + i as u64)
            };
            if reply.add(INodeNo(d_ino), (i + 1) as u64, *kind, name) {
                break;
            }
        }
        drop(t);
        reply.ok();
    }

    fn readdirplus(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectoryPlus,
    ) {
        let entries = match self.dir_entries(ino.0, fh, offset) {
            Ok(e) => e,
            Err(e) => return reply.error(to_errno(e)),
        };
        let dir_attr = match self.u.inode(ino.0).and_then(|i| self.attr_of(&i, None)) {
            Ok(a) => a,
            Err(e) => return reply.error(to_errno(e)),
        };
        let parent = match self.u.inode(ino.0) {
            Ok(p) => p,
            Err(e) => return reply.error(to_errno(e)),
        };
        for (i, (name, _, pos)) in entries.0.iter().enumerate().skip(offset as usize) {
            if i < 2 {
                // The kernel does not count "." and ".." as lookups.
                if reply.add(
                    dir_attr.ino,
                    (i + 1) as u64,
                    name,
                    &self.ttl,
                    &dir_attr,
                    Generation(0),
                ) {
                    break;
                }
                continue;
            }
            let attr = match self
                .u
                .resolve_hinted(&parent, name, Some((&entries.1, *pos)))
            {
                Ok(Some(r)) => {
                    let inode = self.u.intern(&parent, name, &r);
                    make_attr(inode.ino, &r.st, r.stack.len() > 1)
                }
                _ => continue,
            };
            let ttl = self.entry_ttl(&attr);
            if reply.add(attr.ino, (i + 1) as u64, name, &ttl, &attr, Generation(0)) {
                // Not sent: undo the lookup we counted.
                self.u.forget(attr.ino.0, 1);
                break;
            }
        }
        reply.ok();
    }

    fn releasedir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        reply: ReplyEmpty,
    ) {
        lock(&self.dirs).remove(&fh.0);
        reply.ok();
    }

    fn fsyncdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        datasync: bool,
        reply: ReplyEmpty,
    ) {
        let res = (|| {
            let i = self.u.inode(ino.0)?;
            let layer = lock(&i.state).layer;
            if !self.u.layers.is_upper(layer) {
                return Ok(());
            }
            let fd = self.u.dir_fd(&i, layer)?;
            let d = sys::reopen_dir(fd.as_raw_fd())?;
            sys::fsync(d.as_raw_fd(), datasync)
        })();
        match res {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(to_errno(e)),
        }
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        match sys::fstatvfs(self.u.layers.root(0)) {
            Ok(s) => reply.statfs(
                s.f_blocks,
                s.f_bfree,
                s.f_bavail,
                s.f_files,
                s.f_ffree,
                s.f_bsize as u32,
                s.f_namemax as u32,
                s.f_frsize as u32,
            ),
            Err(e) => reply.error(to_errno(e)),
        }
    }

    fn setxattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        name: &OsStr,
        value: &[u8],
        flags: i32,
        _position: u32,
        reply: ReplyEmpty,
    ) {
        let res = (|| {
            let bname = std::os::unix::ffi::OsStrExt::as_bytes(name);
            if whiteout::is_private_xattr(bname) {
                return Err(errno(libc::EOPNOTSUPP));
            }
            let inode = self.u.inode(ino.0)?;
            self.u.copy_up(&inode, true)?;
            let (t, _) = self.u.target(&inode)?;
            let (p, follow) = t.xattr_path();
            sys::setxattr(&p, &sys::cstr(name)?, value, flags, follow)
        })();
        match res {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(to_errno(e)),
        }
    }

    fn getxattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, size: u32, reply: ReplyXattr) {
        let res = (|| {
            let bname = std::os::unix::ffi::OsStrExt::as_bytes(name);
            if whiteout::is_private_xattr(bname) {
                // Hidden, as kernel overlayfs hides its own.
                return Err(errno(libc::ENODATA));
            }
            let (p, follow) = self.xattr_target(ino.0)?.xattr_path();
            sys::getxattr(&p, &sys::cstr(name)?, follow)
        })();
        match res {
            Ok(v) => Self::reply_xattr_bytes(&v, size, reply),
            Err(e) => reply.error(to_errno(e)),
        }
    }

    fn listxattr(&self, _req: &Request, ino: INodeNo, size: u32, reply: ReplyXattr) {
        let res = (|| {
            let (p, follow) = self.xattr_target(ino.0)?.xattr_path();
            Ok::<_, io::Error>(whiteout::filter_xattr_list(&sys::listxattr(&p, follow)?))
        })();
        match res {
            Ok(v) => Self::reply_xattr_bytes(&v, size, reply),
            Err(e) => reply.error(to_errno(e)),
        }
    }

    fn removexattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let res = (|| {
            let bname = std::os::unix::ffi::OsStrExt::as_bytes(name);
            if whiteout::is_private_xattr(bname) {
                return Err(errno(libc::EOPNOTSUPP));
            }
            let cname = sys::cstr(name)?;
            let inode = self.u.inode(ino.0)?;
            // Removing an attribute that is not there must not copy the file up.
            let (p, follow) = self.u.target(&inode)?.0.xattr_path();
            sys::getxattr(&p, &cname, follow)?;
            self.u.copy_up(&inode, true)?;
            let (p, follow) = self.u.target(&inode)?.0.xattr_path();
            sys::removexattr(&p, &cname, follow)
        })();
        match res {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(to_errno(e)),
        }
    }

    fn access(&self, _req: &Request, _ino: INodeNo, _mask: AccessFlags, reply: ReplyEmpty) {
        // default_permissions: the kernel checks; this is only reached without it.
        reply.ok();
    }

    fn create(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        _umask: u32,
        flags: i32,
        reply: ReplyCreate,
    ) {
        let mut file: Option<OwnedFd> = None;
        let oflags = (flags
            & !(libc::O_CREAT | libc::O_EXCL | libc::O_NOCTTY | libc::O_TRUNC | libc::O_DIRECT))
            | libc::O_CREAT
            | libc::O_EXCL;
        let res = self.new_node(req, parent.0, name, mode, libc::S_IFREG, |d, n, m| {
            file = Some(sys::openat(d, n, oflags, m)?);
            Ok(())
        });
        let attr = match res {
            Ok(Some(a)) => a,
            Ok(None) => return reply.error(Errno::ENOENT),
            Err(e) => return reply.error(to_errno(e)),
        };
        let (Some(fd), Ok(inode)) = (file, self.u.inode(attr.ino.0)) else {
            return reply.error(Errno::EIO);
        };
        let st = match sys::fstat(fd.as_raw_fd()) {
            Ok(st) => st,
            Err(e) => return reply.error(to_errno(e)),
        };
        let writable = flags & libc::O_ACCMODE != libc::O_RDONLY;
        match self.open_mode(&inode, &fd, &st, writable, |fd| {
            reply.open_backing(fd.as_fd())
        }) {
            Ok(OpenMode::Passthrough(b)) => {
                let fh = self.add_handle(inode, fd, flags, Some(b.clone()));
                reply.created_passthrough(
                    &self.ttl,
                    &attr,
                    Generation(0),
                    FileHandle(fh),
                    FopenFlags::FOPEN_NOFLUSH,
                    &b.id,
                );
            }
            Ok(OpenMode::Cached) => {
                let fl = self.cached_flags(&inode);
                let fh = self.add_handle(inode, fd, flags, None);
                reply.created(&self.ttl, &attr, Generation(0), FileHandle(fh), fl);
            }
            Err(e) => reply.error(to_errno(e)),
        }
    }

    fn fallocate(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        length: u64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        match self
            .io_fd(ino, fh, true)
            .and_then(|fd| sys::fallocate(fd.as_raw_fd(), mode, offset, length))
        {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(to_errno(e)),
        }
    }

    fn lseek(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: i64,
        whence: i32,
        reply: ReplyLseek,
    ) {
        match self
            .io_fd(ino, fh, false)
            .and_then(|fd| sys::lseek(fd.as_raw_fd(), offset, whence))
        {
            Ok(o) => reply.offset(o),
            Err(e) => reply.error(to_errno(e)),
        }
    }

    fn copy_file_range(
        &self,
        _req: &Request,
        ino_in: INodeNo,
        fh_in: FileHandle,
        offset_in: u64,
        ino_out: INodeNo,
        fh_out: FileHandle,
        offset_out: u64,
        len: u64,
        _flags: CopyFileRangeFlags,
        reply: ReplyWrite,
    ) {
        let res = (|| {
            let (fin, fout) = (
                self.io_fd(ino_in, fh_in, false)?,
                self.io_fd(ino_out, fh_out, true)?,
            );
            let (mut oi, mut oo) = (offset_in as i64, offset_out as i64);
            sys::copy_file_range(
                fin.as_raw_fd(),
                &mut oi,
                fout.as_raw_fd(),
                &mut oo,
                len.min(u32::MAX as u64) as usize,
            )
        })();
        match res {
            Ok(n) => reply.written(n as u32),
            Err(e) => reply.error(to_errno(e)),
        }
    }
}
