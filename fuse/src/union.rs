//! The union logic, independent of the FUSE wire protocol: resolving names across layers,
//! interning inodes, copy-up, and the namespace operations (create, unlink, rmdir, rename,
//! link) that write the kernel's upper format.

use std::ffi::{CStr, CString, OsStr};
use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use crate::copyup;
use crate::inode::{lock, rlock, wlock, DirFdCache, DirPart, Inode, InodeState, Name, Rare, Table};
use crate::layers::{self, Layers};
use crate::sys::{self, errno};
use crate::whiteout;

/// Moves (parent, name) to the front of an inode's names: copy-up and I/O of a shared lower
/// hard link go through the name used most recently.
fn touch_name(inode: &Inode, parent: u64, name: &OsStr) {
    lock(&inode.state).name_to_front(parent, name);
}

/// Beyond this many names, a lower file's further names get their own node id (keeps name
/// bookkeeping O(1) on hard-link farms).
const MAX_SHARED_NAMES: usize = 64;

/// Every this many inodes freed by FORGET, the heap is trimmed (about 2 MiB of inodes and
/// names; a trim of a 40 MiB heap takes a few milliseconds).
const TRIM_EVERY: u64 = 16384;

/// Returns free heap memory to the system (`malloc_trim`).
fn trim_heap() {
    #[cfg(target_env = "gnu")]
    // SAFETY: malloc_trim only releases free memory of the allocator's own heaps.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Name of the cached whiteout in the work dir that new whiteouts are hard links of.
const WH_BASE: &CStr = c"#cdf.whiteout";

/// Where a merged object's real data is reached.
pub enum Target {
    /// A non-directory: its parent's fd in the object's layer, plus its name.
    At(Arc<OwnedFd>, CString),
    /// A directory: an O_PATH fd of the directory itself.
    Dir(Arc<OwnedFd>),
    /// An unlinked, still open file: an O_PATH fd of it.
    Orphan(Arc<OwnedFd>),
}

impl Target {
    /// stat without following a final symlink.
    pub fn stat(&self) -> io::Result<libc::stat> {
        match self {
            Target::At(d, n) => sys::fstatat(d.as_raw_fd(), n),
            Target::Dir(fd) | Target::Orphan(fd) => sys::fstat(fd.as_raw_fd()),
        }
    }

    /// A path for the xattr calls, and whether to follow its final component.
    pub fn xattr_path(&self) -> (CString, bool) {
        match self {
            Target::At(d, n) => (sys::proc_path(d.as_raw_fd(), Some(n)), false),
            Target::Dir(fd) | Target::Orphan(fd) => (sys::proc_path(fd.as_raw_fd(), None), true),
        }
    }

    /// chown without following symlinks.
    pub fn chown(&self, uid: u32, gid: u32) -> io::Result<()> {
        match self {
            Target::At(d, n) => sys::fchownat(d.as_raw_fd(), n, uid, gid),
            Target::Dir(fd) | Target::Orphan(fd) => sys::fchownat(fd.as_raw_fd(), c"", uid, gid),
        }
    }

    /// chmod (never called for symlinks).
    pub fn chmod(&self, mode: u32) -> io::Result<()> {
        match self {
            Target::At(d, n) => sys::fchmodat(d.as_raw_fd(), n, mode),
            Target::Dir(fd) | Target::Orphan(fd) => {
                sys::fchmodat(libc::AT_FDCWD, &sys::proc_path(fd.as_raw_fd(), None), mode)
            }
        }
    }

    /// utimensat without following symlinks.
    pub fn utimens(&self, ts: &[libc::timespec; 2]) -> io::Result<()> {
        match self {
            Target::At(d, n) => sys::utimensat(d.as_raw_fd(), n, ts, libc::AT_SYMLINK_NOFOLLOW),
            Target::Dir(fd) | Target::Orphan(fd) => {
                sys::utimensat(libc::AT_FDCWD, &sys::proc_path(fd.as_raw_fd(), None), ts, 0)
            }
        }
    }

    /// Opens a regular file (never following a final symlink). O_NONBLOCK during the open and a
    /// type check after it mean that whatever a concurrent rename put under the name (a FIFO, a
    /// device node, a whiteout) is neither waited on nor handed out.
    pub fn open_file(&self, flags: i32) -> io::Result<(OwnedFd, libc::stat)> {
        let fl = flags | libc::O_NONBLOCK;
        // A whiteout (ENXIO), symlink (ELOOP) or device (ENODEV) here means the regular file we
        // knew under this name was replaced concurrently: to the caller it is gone.
        let gone = |e: io::Error| match e.raw_os_error() {
            Some(libc::ENXIO | libc::ELOOP | libc::ENODEV) => errno(libc::ENOENT),
            _ => e,
        };
        let fd = match self {
            Target::At(d, n) => sys::openat(d.as_raw_fd(), n, fl, 0).map_err(gone)?,
            Target::Dir(_) => return Err(errno(libc::EISDIR)),
            // Re-opening through /proc is the one way to open an O_PATH fd's file.
            Target::Orphan(fd) => {
                sys::reopen(fd.as_raw_fd(), fl & !libc::O_NOFOLLOW).map_err(gone)?
            }
        };
        let st = sys::fstat(fd.as_raw_fd())?;
        if st.st_mode & libc::S_IFMT != libc::S_IFREG {
            return Err(errno(libc::ENOENT));
        }
        if flags & libc::O_NONBLOCK == 0 {
            sys::set_fl(
                fd.as_raw_fd(),
                flags & !(libc::O_CREAT | libc::O_EXCL | libc::O_TRUNC),
            )?;
        }
        Ok((fd, st))
    }
}

/// The result of resolving a name in a merged directory.
#[derive(Debug, Clone)]
pub struct Resolved {
    /// stat of the topmost real object.
    pub st: libc::stat,
    /// Its layer.
    pub layer: usize,
    /// Directories: contributing layers, topmost first.
    pub stack: Vec<usize>,
}

fn is_enoent(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::ENOENT | libc::ENOTDIR))
}

fn is_dir_mode(mode: u32) -> bool {
    mode & libc::S_IFMT == libc::S_IFDIR
}

/// The union filesystem's state.
pub struct Union {
    /// The layers.
    pub layers: Layers,
    /// The inode table.
    pub table: RwLock<Table>,
    fds: DirFdCache,
    /// No-open mode (see `UnionFs::with_no_open`): the kernel does not tell us which files are
    /// open, so every unlinked or replaced file the kernel still knows keeps an orphan fd.
    pub orphan_always: AtomicBool,
    tmp_seq: AtomicU64,
    /// Inodes freed by FORGET so far (see `TRIM_EVERY`).
    freed: AtomicU64,
    wh_lock: Mutex<()>,
    /// Reverse channel to the kernel, set once the session exists.
    pub notifier: Arc<std::sync::OnceLock<fuser::Notifier>>,
    euid: u32,
    egid: u32,
}

impl Union {
    /// Builds the union over opened layers, resolving the root's layer stack.
    pub fn new(layers: Layers) -> Union {
        let mut stack = Vec::new();
        for li in 0..layers.roots.len() {
            stack.push(li);
            if li + 1 < layers.roots.len() && layers.is_opaque(layers.root(li), None) {
                break;
            }
        }
        let root = Inode::new(
            fuser::INodeNo::ROOT.0,
            libc::S_IFDIR,
            InodeState {
                layer: 0,
                rare: Some(Box::new(Rare {
                    dir: Some(DirPart { stack }),
                    ..Default::default()
                })),
                ..Default::default()
            },
        );
        // A quarter of the descriptor limit at most: the rest is for open files and layers.
        let fd_limit = (sys::nofile_limit() / 4).clamp(64, 65536) as usize;
        Union {
            layers,
            table: RwLock::new(Table::new(root)),
            fds: DirFdCache::with_budget(crate::inode::DIR_FD_BUDGET, fd_limit),
            orphan_always: AtomicBool::new(false),
            tmp_seq: AtomicU64::new(0),
            freed: AtomicU64::new(0),
            wh_lock: Mutex::new(()),
            notifier: Arc::new(std::sync::OnceLock::new()),
            // SAFETY: trivial syscalls.
            euid: unsafe { libc::geteuid() },
            // SAFETY: trivial syscalls.
            egid: unsafe { libc::getegid() },
        }
    }

    /// A live inode, or ENOENT.
    pub fn inode(&self, ino: u64) -> io::Result<Arc<Inode>> {
        rlock(&self.table)
            .get(ino)
            .ok_or_else(|| errno(libc::ENOENT))
    }

    /// An O_PATH fd of directory `inode` in layer `layer` (cached, bounded).
    ///
    /// Resolved one name at a time from the nearest directory whose fd is cached (or the layer
    /// root), never as a path from the layer root: any depth resolves (a path would stop at
    /// PATH_MAX, about 2,000 levels), and each step is an `openat` of a single name with
    /// `O_NOFOLLOW | O_DIRECTORY`, so no symlink is followed and nothing leaves the layer. A
    /// directory's layers are a subset of its parent's, so the parent is in `layer` too.
    pub fn dir_fd(&self, inode: &Inode, layer: usize) -> io::Result<Arc<OwnedFd>> {
        if let Some(fd) = self.fds.get(inode.ino, layer) {
            return Ok(fd);
        }
        // (node id, name in its parent) from `inode` up: an explicit stack, not call recursion.
        let mut chain: Vec<(u64, CString)> = Vec::new();
        let mut cur = inode.ino;
        let mut link = self.dir_link(inode)?;
        let mut fd = loop {
            match link {
                None => {
                    // `cur` is the root.
                    let root = self.layers.root(layer);
                    let fd = Arc::new(sys::openat(
                        root,
                        c".",
                        libc::O_PATH | libc::O_DIRECTORY,
                        0,
                    )?);
                    self.fds.insert(cur, layer, fd.clone());
                    break fd;
                }
                Some((p, cname)) => {
                    chain.push((cur, cname));
                    if let Some(fd) = self.fds.get(p, layer) {
                        break fd;
                    }
                    let parent = self.inode(p)?;
                    cur = p;
                    link = self.dir_link(&parent)?;
                }
            }
        };
        for (ino, cname) in chain.into_iter().rev() {
            let next = Arc::new(sys::openat(
                fd.as_raw_fd(),
                &cname,
                libc::O_PATH | libc::O_DIRECTORY,
                0,
            )?);
            self.fds.insert(ino, layer, next.clone());
            fd = next;
        }
        Ok(fd)
    }

    /// A directory's (parent, name), `None` for the root; ENOENT for a removed directory.
    fn dir_link(&self, d: &Inode) -> io::Result<Option<(u64, CString)>> {
        if d.ino == fuser::INodeNo::ROOT.0 {
            return Ok(None);
        }
        let st = lock(&d.state);
        if st.dead() {
            return Err(errno(libc::ENOENT));
        }
        let Some((p, n)) = st.name.as_ref() else {
            return Err(errno(libc::ENOENT));
        };
        let b = std::os::unix::ffi::OsStrExt::as_bytes(&**n);
        if b.is_empty() || b == b"." || b == b".." || b.contains(&b'/') {
            return Err(errno(libc::ENOENT));
        }
        Ok(Some((*p, sys::cstr(n)?)))
    }

    /// Where the object's real data is, and in which layer.
    pub fn target(&self, inode: &Inode) -> io::Result<(Target, usize)> {
        if inode.is_dir() {
            let layer = lock(&inode.state).layer;
            return Ok((Target::Dir(self.dir_fd(inode, layer)?), layer));
        }
        // The name goes straight into the C string the syscall needs (no copy of the name).
        let (layer, name, orphan) = {
            let st = lock(&inode.state);
            let name = st.name.as_ref().map(|(p, n)| (*p, sys::cstr(n)));
            (st.layer, name, st.orphan())
        };
        let Some((p, cname)) = name else {
            return match orphan {
                Some(fd) => Ok((Target::Orphan(fd), layer)),
                None => Err(errno(libc::ENOENT)),
            };
        };
        let parent = self.inode(p)?;
        let pfd = self.dir_fd(&parent, layer)?;
        Ok((Target::At(pfd, cname?), layer))
    }

    /// The layer stack of a directory inode.
    pub fn stack(&self, inode: &Inode) -> io::Result<Vec<usize>> {
        let st = lock(&inode.state);
        if st.dead() {
            return Err(errno(libc::ENOENT));
        }
        Ok(st.stack().to_vec())
    }

    /// Resolves `name` in directory `parent` across its layers.
    pub fn resolve(&self, parent: &Inode, name: &OsStr) -> io::Result<Option<Resolved>> {
        self.resolve_hinted(parent, name, None)
    }

    /// `resolve`, with a hint from a directory listing: (the parent's stack when listed, the
    /// position the name was found at). Lower layers are immutable, so the layers above that
    /// position need no look (saving negative lookups on every readdirplus entry); only the
    /// upper, which can have changed since, is checked.
    pub fn resolve_hinted(
        &self,
        parent: &Inode,
        name: &OsStr,
        hint: Option<(&[usize], usize)>,
    ) -> io::Result<Option<Resolved>> {
        if whiteout::is_reserved_name(std::os::unix::ffi::OsStrExt::as_bytes(name)) {
            return Ok(None);
        }
        let pstack = self.stack(parent)?;
        let cname = sys::cstr(name)?;
        let mut start = 0;
        if let Some((hstack, pos)) = hint {
            if hstack == pstack.as_slice() && pos < pstack.len() {
                start = pos;
                for &li in &pstack[..pos] {
                    if !self.layers.is_upper(li) {
                        continue;
                    }
                    let pfd = self.dir_fd(parent, li)?;
                    match sys::fstatat(pfd.as_raw_fd(), &cname) {
                        Err(e) if is_enoent(&e) => {}
                        // Created or whited out since the listing: resolve from the top.
                        _ => start = 0,
                    }
                }
            }
        }
        let mut found: Option<Resolved> = None;
        for (i, &li) in pstack.iter().enumerate().skip(start) {
            let pfd = self.dir_fd(parent, li)?;
            let pfd = pfd.as_raw_fd();
            let more = i + 1 < pstack.len();
            match sys::fstatat(pfd, &cname) {
                Err(e) if is_enoent(&e) => {
                    if more && self.layers.has_wh_file(li, pfd, &cname) {
                        break;
                    }
                }
                Err(e) => return Err(e),
                Ok(st) => {
                    if whiteout::is_whiteout(&st) {
                        break;
                    }
                    let dir = is_dir_mode(st.st_mode);
                    match &mut found {
                        None if !dir => {
                            return Ok(Some(Resolved {
                                st,
                                layer: li,
                                stack: Vec::new(),
                            }))
                        }
                        None => {
                            found = Some(Resolved {
                                st,
                                layer: li,
                                stack: vec![li],
                            })
                        }
                        Some(_) if !dir => break,
                        Some(f) => f.stack.push(li),
                    }
                    if more && self.layers.is_opaque(pfd, Some(&cname)) {
                        break;
                    }
                }
            }
        }
        Ok(found)
    }

    /// Finds or creates the inode for a resolved name and counts one kernel lookup on it.
    pub fn intern(&self, parent: &Inode, name: &OsStr, r: &Resolved) -> Arc<Inode> {
        let kind = r.st.st_mode & libc::S_IFMT;
        {
            let t = rlock(&self.table);
            if let Some(ex) = t.by_name(parent.ino, name) {
                if ex.kind() == kind {
                    ex.nlookup.fetch_add(1, Ordering::SeqCst);
                    touch_name(&ex, parent.ino, name);
                    return ex;
                }
            }
        }
        let mut t = wlock(&self.table);
        if let Some(ex) = t.by_name(parent.ino, name) {
            if ex.kind() == kind {
                ex.nlookup.fetch_add(1, Ordering::SeqCst);
                touch_name(&ex, parent.ino, name);
                return ex;
            }
            t.remove_name(parent.ino, name);
        }
        // Names of one lower file share a node id (so st_ino matches, as on overlayfs) until a
        // copy-up splits them; `touch_name` keeps the name used most recently first, and such
        // entries are never cached by the kernel, so every access through a name looks it up.
        let lower_link =
            !self.layers.is_upper(r.layer) && kind != libc::S_IFDIR && r.st.st_nlink > 1;
        if lower_link {
            if let Some(ex) = t
                .ids
                .get(&(r.st.st_dev, r.st.st_ino))
                .and_then(|i| t.get(*i))
            {
                let (still_lower, few) = {
                    let st = lock(&ex.state);
                    (
                        !self.layers.is_upper(st.layer),
                        st.name_count() < MAX_SHARED_NAMES,
                    )
                };
                if ex.kind() == kind && still_lower && few {
                    ex.nlookup.fetch_add(1, Ordering::SeqCst);
                    t.add_name(&ex, parent.ino, name);
                    touch_name(&ex, parent.ino, name);
                    return ex;
                }
            }
        }
        let upper_key =
            (self.layers.is_upper(r.layer) && kind != libc::S_IFDIR && r.st.st_nlink > 1)
                .then_some((r.st.st_dev, r.st.st_ino));
        if let Some(k) = upper_key {
            if let Some(ex) = t.upper_ids.get(&k).and_then(|i| t.get(*i)) {
                if ex.kind() == kind {
                    ex.nlookup.fetch_add(1, Ordering::SeqCst);
                    t.add_name(&ex, parent.ino, name);
                    return ex;
                }
            }
        }
        let stable_key = Some((r.st.st_dev, r.st.st_ino));
        let ino = match stable_key.and_then(|k| t.ids.get(&k).copied()) {
            Some(id) if !t.contains(id) => id,
            _ => {
                let i = t.next;
                t.next += 1;
                i
            }
        };
        if let Some(k) = stable_key {
            t.remember_identity(k, ino);
        }
        let dir = (kind == libc::S_IFDIR).then(|| DirPart {
            stack: r.stack.clone(),
        });
        let rare = (dir.is_some() || upper_key.is_some()).then(|| {
            Box::new(Rare {
                dir,
                upper_id: upper_key,
                ..Default::default()
            })
        });
        let inode = Arc::new(Inode::new(
            ino,
            kind,
            InodeState {
                layer: r.layer,
                rare,
                ..Default::default()
            },
        ));
        t.insert(inode.clone());
        t.add_name(&inode, parent.ino, name);
        if let Some(k) = upper_key {
            t.upper_ids.insert(k, ino);
        }
        inode
    }

    /// Detaches an inode from its names, so that the next lookup of any of them makes a new node
    /// (see `UnionFs::open_mode`). The inode lives on for the files open on it and still reaches
    /// its object through the names it keeps.
    pub fn retire(&self, inode: &Inode) {
        let mut t = wlock(&self.table);
        let (names, upper_id) = {
            let st = lock(&inode.state);
            (st.names(), st.upper_id())
        };
        for (p, n) in names {
            t.unindex_name(p, &n, inode.ino);
        }
        if let Some(k) = upper_id {
            if t.upper_ids.get(&k) == Some(&inode.ino) {
                t.upper_ids.remove(&k);
            }
        }
        // Names of a lower hard link would otherwise find this inode again by identity.
        t.ids.retain(|_, i| *i != inode.ino);
    }

    /// Drops `n` kernel lookups of an inode, freeing it at zero.
    pub fn forget(&self, ino: u64, n: u64) {
        if ino == fuser::INodeNo::ROOT.0 {
            return;
        }
        let Some(inode) = rlock(&self.table).get(ino) else {
            return;
        };
        let prev = inode
            .nlookup
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |v| {
                Some(v.saturating_sub(n))
            })
            .unwrap_or(0);
        if prev > n {
            return;
        }
        let mut t = wlock(&self.table);
        if inode.nlookup.load(Ordering::SeqCst) == 0 {
            t.remove(ino);
            t.shrink_if_sparse();
            drop(t);
            let mut layers = lock(&inode.state).stack().to_vec();
            layers.push(0);
            self.fds.remove(ino, &layers);
            drop(inode);
            // After a storm of FORGETs (the kernel reclaiming its caches), hand the freed
            // inodes' memory back to the system: glibc keeps freed memory below the top of
            // its heaps otherwise.
            if self.freed.fetch_add(1, Ordering::Relaxed) % TRIM_EVERY == TRIM_EVERY - 1 {
                trim_heap();
            }
        }
    }

    /// A fresh name for a temporary object in the work dir.
    pub fn tmp_name(&self) -> CString {
        let n = self.tmp_seq.fetch_add(1, Ordering::Relaxed);
        CString::new(format!("#cdf.{}.{n}", std::process::id())).unwrap_or_default()
    }

    /// Copies an object (and its parents) up into the upper layer. `with_data` false skips the
    /// file data (for an open with O_TRUNC).
    pub fn copy_up(&self, inode: &Arc<Inode>, with_data: bool) -> io::Result<()> {
        if !self.layers.has_upper {
            return Err(errno(libc::EROFS));
        }
        if lock(&inode.state).layer == 0 {
            return Ok(());
        }
        // The parents not yet in the upper, nearest first: an explicit stack, not call
        // recursion (container trees can be thousands of levels deep).
        let mut chain: Vec<Arc<Inode>> = Vec::new();
        let mut cur = lock(&inode.state).first_name().map(|(p, _)| p);
        while let Some(p) = cur {
            let parent = self.inode(p)?;
            let (layer, next) = {
                let st = lock(&parent.state);
                (st.layer, st.first_name().map(|(p, _)| p))
            };
            if layer == 0 {
                break;
            }
            chain.push(parent);
            cur = next;
        }
        for parent in chain.iter().rev() {
            self.copy_up_one(parent, true)?;
        }
        self.copy_up_one(inode, with_data)
    }

    /// Copies one object up; its parent is in the upper already.
    fn copy_up_one(&self, inode: &Arc<Inode>, with_data: bool) -> io::Result<()> {
        if lock(&inode.state).layer == 0 {
            return Ok(());
        }
        let _g = lock(&inode.backing);
        let (layer, name) = {
            let st = lock(&inode.state);
            (st.layer, st.first_name())
        };
        if layer == 0 {
            return Ok(());
        }
        let (p, name) = name.ok_or_else(|| errno(libc::ENOENT))?;
        let parent = self.inode(p)?;
        if lock(&parent.state).layer != 0 {
            // Moved under another lower directory since the chain was taken (a race): copy
            // that parent up as well.
            self.copy_up(&parent, true)?;
        }
        let up = self.dir_fd(&parent, 0)?;
        let src = self.dir_fd(&parent, layer)?;
        let cname = sys::cstr(&name)?;
        let st = sys::fstatat(src.as_raw_fd(), &cname)?;
        let work = self.layers.work_fd()?;
        let tmp = self.tmp_name();
        copyup::copy_object(src.as_raw_fd(), &cname, &st, work, &tmp, with_data)?;
        if let Err(e) = sys::renameat2(work, &tmp, up.as_raw_fd(), &cname, libc::RENAME_NOREPLACE) {
            let _ = layers::remove_tree(work, &tmp);
            tracing::warn!("copy-up of {:?}: {e}", name);
            return Err(e);
        }
        {
            let mut t = wlock(&self.table);
            if let Ok(ust) = sys::fstatat(up.as_raw_fd(), &cname) {
                t.remember_identity((ust.st_dev, ust.st_ino), inode.ino);
            }
            if !inode.is_dir() && st.st_nlink > 1 {
                // Copy-up breaks a lower hard link (overlayfs index=off): the other names stay
                // with the lower file and get their own node id at their next lookup.
                let others: Vec<(u64, Name)> = lock(&inode.state).take_other_names();
                for (p, n) in others {
                    t.unindex_name(p, &n, inode.ino);
                }
                if t.ids.get(&(st.st_dev, st.st_ino)) == Some(&inode.ino) {
                    t.ids.remove(&(st.st_dev, st.st_ino));
                }
            }
        }
        if let Some(n) = self.notifier.get() {
            // Attributes only (nlink, ctime changed): takes no inode lock in the kernel.
            let _ = n.inval_inode(fuser::INodeNo(inode.ino), -1, 0);
        }
        let mut s = lock(&inode.state);
        s.layer = 0;
        if inode.is_dir() {
            s.dir_mut().stack.insert(0, 0);
        }
        inode.copied_up.store(true, Ordering::SeqCst);
        tracing::debug!("copied up {:?} (ino {})", name, inode.ino);
        Ok(())
    }

    /// Whether a lower layer of `parent` (already copied up) has a visible `name`.
    pub fn lower_has(&self, parent: &Inode, name: &CStr) -> io::Result<bool> {
        let stack = self.stack(parent)?;
        for &li in &stack {
            if self.layers.is_upper(li) {
                continue;
            }
            let pfd = self.dir_fd(parent, li)?;
            match sys::fstatat(pfd.as_raw_fd(), name) {
                Ok(st) => return Ok(!whiteout::is_whiteout(&st)),
                Err(e) if is_enoent(&e) => {
                    if self.layers.has_wh_file(li, pfd.as_raw_fd(), name) {
                        return Ok(false);
                    }
                }
                Err(e) => return Err(e),
            }
        }
        Ok(false)
    }

    /// Creates a whiteout at `dir/name` (nothing may exist there). Like the kernel, new whiteouts
    /// are hard links to one cached whiteout in the work dir: linking is an order of magnitude
    /// cheaper than allocating a device inode on most filesystems.
    fn link_whiteout(&self, dir: RawFd, name: &CStr) -> io::Result<()> {
        let work = self.layers.work_fd()?;
        for _ in 0..3 {
            match sys::linkat(work, WH_BASE, dir, name) {
                Ok(()) => return Ok(()),
                Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {
                    let _g = lock(&self.wh_lock);
                    match sys::mknodat(work, WH_BASE, libc::S_IFCHR, 0) {
                        Ok(()) => {}
                        Err(e) if e.raw_os_error() == Some(libc::EEXIST) => {}
                        Err(_) => break,
                    }
                }
                Err(e) if e.raw_os_error() == Some(libc::EMLINK) => {
                    let _g = lock(&self.wh_lock);
                    let _ = sys::unlinkat(work, WH_BASE, 0);
                }
                Err(e) if e.raw_os_error() == Some(libc::EEXIST) => return Err(e),
                Err(_) => break,
            }
        }
        sys::mknodat(dir, name, libc::S_IFCHR, 0)
    }

    /// Creates a whiteout at `up/name`, where nothing exists in the upper.
    fn put_whiteout(&self, up: RawFd, name: &CStr) -> io::Result<()> {
        self.link_whiteout(up, name)
    }

    /// Replaces the upper object `up/name` by a whiteout atomically, then deletes the object.
    fn replace_with_whiteout(&self, up: RawFd, name: &CStr) -> io::Result<()> {
        let work = self.layers.work_fd()?;
        let tmp = self.tmp_name();
        self.link_whiteout(work, &tmp)?;
        if let Err(e) = sys::renameat2(work, &tmp, up, name, libc::RENAME_EXCHANGE) {
            let _ = sys::unlinkat(work, &tmp, 0);
            return Err(e);
        }
        if let Err(e) = layers::remove_tree(work, &tmp) {
            tracing::warn!("cleaning work dir entry {:?}: {e}", tmp);
        }
        Ok(())
    }

    /// Removes whiteouts (and other format markers) from an upper dir about to be removed or
    /// replaced; anything else there means the merged dir is not empty.
    fn clear_upper_dir(&self, up: RawFd, name: &CStr) -> io::Result<()> {
        let d = sys::openat(up, name, libc::O_RDONLY | libc::O_DIRECTORY, 0)?;
        let dpath = sys::openat(d.as_raw_fd(), c".", libc::O_PATH | libc::O_DIRECTORY, 0)?;
        for (child, _) in sys::list_dir(d)? {
            let c = CString::new(child.clone()).map_err(|_| errno(libc::EINVAL))?;
            let st = sys::fstatat(dpath.as_raw_fd(), &c)?;
            if whiteout::is_whiteout(&st) || whiteout::is_reserved_name(&child) {
                sys::unlinkat(dpath.as_raw_fd(), &c, 0)?;
            } else {
                return Err(errno(libc::ENOTEMPTY));
            }
        }
        Ok(())
    }

    /// Whether the merged directory `parent/name` (resolved as `r`) is empty.
    fn merged_empty(&self, parent: &Inode, name: &CStr, r: &Resolved) -> io::Result<bool> {
        let mut dirs = Vec::new();
        for &li in &r.stack {
            let pfd = self.dir_fd(parent, li)?;
            dirs.push(sys::openat(
                pfd.as_raw_fd(),
                name,
                libc::O_RDONLY | libc::O_DIRECTORY,
                0,
            )?);
        }
        Ok(layers::merged_listing(dirs)?.is_empty())
    }

    /// Owner, group and mode for a new object in a directory with stat `pst`.
    fn new_owner(
        &self,
        uid: u32,
        gid: u32,
        pst: &libc::stat,
        is_dir: bool,
        mode: u32,
    ) -> (u32, u32, u32) {
        let mut mode = mode & 0o7777;
        let mut gid = gid;
        if pst.st_mode & libc::S_ISGID != 0 {
            gid = pst.st_gid;
            if is_dir {
                mode |= libc::S_ISGID;
            }
        }
        (uid, gid, mode)
    }

    fn set_owner(
        &self,
        dir: RawFd,
        name: &CStr,
        uid: u32,
        gid: u32,
        mode: u32,
        kind: u32,
    ) -> io::Result<()> {
        if (uid, gid) != (self.euid, self.egid) {
            sys::fchownat(dir, name, uid, gid)?;
        }
        if kind != libc::S_IFLNK && mode & 0o7000 != 0 {
            sys::fchmodat(dir, name, mode)?;
        }
        Ok(())
    }

    /// Creates a new object `name` in `parent` with `make(dirfd, name, mode)`, owned by
    /// (uid, gid): directly in the upper, or — over a whiteout — in the work dir and then renamed
    /// over it (a directory created there becomes opaque).
    #[allow(clippy::too_many_arguments)]
    pub fn create_node(
        &self,
        uid: u32,
        gid: u32,
        parent: &Arc<Inode>,
        name: &OsStr,
        mode: u32,
        kind: u32,
        mut make: impl FnMut(RawFd, &CStr, u32) -> io::Result<()>,
    ) -> io::Result<()> {
        whiteout::validate_new_name(name).map_err(errno)?;
        self.copy_up(parent, true)?;
        let up = self.dir_fd(parent, 0)?;
        let up = up.as_raw_fd();
        let pst = sys::fstat(up)?;
        let (uid, gid, mode) = self.new_owner(uid, gid, &pst, kind == libc::S_IFDIR, mode);
        let cname = sys::cstr(name)?;
        let over_wh = match sys::fstatat(up, &cname) {
            Ok(st) if whiteout::is_whiteout(&st) => true,
            Ok(_) => return Err(errno(libc::EEXIST)),
            Err(e) if is_enoent(&e) => false,
            Err(e) => return Err(e),
        };
        let rmflag = if kind == libc::S_IFDIR {
            libc::AT_REMOVEDIR
        } else {
            0
        };
        if !over_wh {
            make(up, &cname, mode)?;
            if let Err(e) = self.set_owner(up, &cname, uid, gid, mode, kind) {
                let _ = sys::unlinkat(up, &cname, rmflag);
                return Err(e);
            }
            return Ok(());
        }
        let work = self.layers.work_fd()?;
        let tmp = self.tmp_name();
        make(work, &tmp, mode)?;
        let res = (|| {
            self.set_owner(work, &tmp, uid, gid, mode, kind)?;
            if kind == libc::S_IFDIR {
                sys::setxattr(
                    &sys::proc_path(work, Some(&tmp)),
                    self.layers.xattr_ns.opaque_name(),
                    b"y",
                    0,
                    false,
                )?;
                sys::renameat2(work, &tmp, up, &cname, libc::RENAME_EXCHANGE)?;
                sys::unlinkat(work, &tmp, 0)
            } else {
                sys::renameat2(work, &tmp, up, &cname, 0)
            }
        })();
        if res.is_err() {
            let _ = layers::remove_tree(work, &tmp);
        }
        res
    }

    /// Before the name (parent, name) of a non-directory in `layer` goes away: if its inode may
    /// still be open, keep an O_PATH fd of the file so that I/O, fstat(2) and friends keep working.
    fn keep_orphan(
        &self,
        parent: &Inode,
        name: &OsStr,
        cname: &CStr,
        layer: usize,
    ) -> io::Result<()> {
        if let Some(i) = rlock(&self.table).by_name(parent.ino, name) {
            let open =
                i.opens.load(Ordering::SeqCst) > 0 || self.orphan_always.load(Ordering::Relaxed);
            if open && !i.is_dir() && lock(&i.state).name_count() == 1 {
                let pfd = self.dir_fd(parent, layer)?;
                if let Ok(fd) = sys::openat(pfd.as_raw_fd(), cname, libc::O_PATH, 0) {
                    lock(&i.state).rare_mut().orphan = Some(Arc::new(fd));
                }
            }
        }
        Ok(())
    }

    /// unlink(2) in the merged view.
    pub fn unlink(&self, parent: &Arc<Inode>, name: &OsStr) -> io::Result<()> {
        let r = self
            .resolve(parent, name)?
            .ok_or_else(|| errno(libc::ENOENT))?;
        if is_dir_mode(r.st.st_mode) {
            return Err(errno(libc::EISDIR));
        }
        self.copy_up(parent, true)?;
        let up = self.dir_fd(parent, 0)?;
        let cname = sys::cstr(name)?;
        self.keep_orphan(parent, name, &cname, r.layer)?;
        if self.layers.is_upper(r.layer) {
            // An upper object needs a whiteout only if a lower layer has the name too (a lower
            // object always does: the `else` below).
            if self.lower_has(parent, &cname)? {
                self.replace_with_whiteout(up.as_raw_fd(), &cname)?;
            } else {
                sys::unlinkat(up.as_raw_fd(), &cname, 0)?;
            }
        } else {
            self.put_whiteout(up.as_raw_fd(), &cname)?;
        }
        let mut t = wlock(&self.table);
        t.remove_name(parent.ino, name);
        if self.layers.is_upper(r.layer) && r.st.st_nlink <= 1 {
            t.forget_identity(&r.st);
        }
        Ok(())
    }

    /// rmdir(2) in the merged view.
    pub fn rmdir(&self, parent: &Arc<Inode>, name: &OsStr) -> io::Result<()> {
        let r = self
            .resolve(parent, name)?
            .ok_or_else(|| errno(libc::ENOENT))?;
        if !is_dir_mode(r.st.st_mode) {
            return Err(errno(libc::ENOTDIR));
        }
        let cname = sys::cstr(name)?;
        if !self.merged_empty(parent, &cname, &r)? {
            return Err(errno(libc::ENOTEMPTY));
        }
        self.copy_up(parent, true)?;
        let up = self.dir_fd(parent, 0)?;
        let up = up.as_raw_fd();
        if self.layers.is_upper(r.layer) {
            self.clear_upper_dir(up, &cname)?;
            if self.lower_has(parent, &cname)? {
                self.replace_with_whiteout(up, &cname)?;
            } else {
                sys::unlinkat(up, &cname, libc::AT_REMOVEDIR)?;
            }
        } else {
            self.put_whiteout(up, &cname)?;
        }
        let removed = {
            let mut t = wlock(&self.table);
            if self.layers.is_upper(r.layer) {
                t.forget_identity(&r.st);
            }
            t.remove_name(parent.ino, name)
        };
        if let Some(d) = removed {
            let mut layers = {
                let mut s = lock(&d.state);
                s.rare_mut().dead = true;
                let mut st = r.st;
                st.st_nlink = 0;
                s.rare_mut().dead_attr = Some(Box::new(st));
                s.stack().to_vec()
            };
            layers.push(0);
            self.fds.remove(d.ino, &layers);
        }
        Ok(())
    }

    /// Looks up (parent, name) and returns its inode with one extra lookup counted.
    fn pin(&self, parent: &Inode, name: &OsStr, r: &Resolved) -> Arc<Inode> {
        self.intern(parent, name, r)
    }

    /// rename(2)/renameat2(2) in the merged view.
    pub fn rename(
        &self,
        parent: &Arc<Inode>,
        name: &OsStr,
        newparent: &Arc<Inode>,
        newname: &OsStr,
        flags: u32,
    ) -> io::Result<()> {
        if flags & !(libc::RENAME_NOREPLACE | libc::RENAME_EXCHANGE) != 0
            || flags == libc::RENAME_NOREPLACE | libc::RENAME_EXCHANGE
        {
            return Err(errno(libc::EINVAL));
        }
        if !self.layers.has_upper {
            return Err(errno(libc::EROFS));
        }
        whiteout::validate_new_name(newname).map_err(errno)?;
        let src = self
            .resolve(parent, name)?
            .ok_or_else(|| errno(libc::ENOENT))?;
        let dst = self.resolve(newparent, newname)?;
        let src_dir = is_dir_mode(src.st.st_mode);
        let pure_upper = |r: &Resolved| r.stack == [0] && self.layers.is_upper(0);
        if src_dir && !pure_upper(&src) {
            // As kernel overlayfs with redirect_dir=off: a directory with lower parts cannot move.
            return Err(errno(libc::EXDEV));
        }
        let src_inode = self.pin(parent, name, &src);
        let res = self.rename_inner(
            parent,
            name,
            newparent,
            newname,
            flags,
            &src,
            dst.as_ref(),
            &src_inode,
        );
        self.forget(src_inode.ino, 1);
        res
    }

    #[allow(clippy::too_many_arguments)]
    fn rename_inner(
        &self,
        parent: &Arc<Inode>,
        name: &OsStr,
        newparent: &Arc<Inode>,
        newname: &OsStr,
        flags: u32,
        src: &Resolved,
        dst: Option<&Resolved>,
        src_inode: &Arc<Inode>,
    ) -> io::Result<()> {
        let src_dir = is_dir_mode(src.st.st_mode);
        let cname = sys::cstr(name)?;
        let cnew = sys::cstr(newname)?;
        if flags & libc::RENAME_EXCHANGE != 0 {
            let dst = dst.ok_or_else(|| errno(libc::ENOENT))?;
            if is_dir_mode(dst.st.st_mode) && dst.stack != [0] {
                return Err(errno(libc::EXDEV));
            }
            let dst_inode = self.pin(newparent, newname, dst);
            let res = (|| {
                self.copy_up(src_inode, true)?;
                self.copy_up(&dst_inode, true)?;
                self.copy_up(parent, true)?;
                self.copy_up(newparent, true)?;
                let up = self.dir_fd(parent, 0)?;
                let up2 = self.dir_fd(newparent, 0)?;
                sys::renameat2(
                    up.as_raw_fd(),
                    &cname,
                    up2.as_raw_fd(),
                    &cnew,
                    libc::RENAME_EXCHANGE,
                )?;
                let mut t = wlock(&self.table);
                t.remove_name(parent.ino, name);
                t.remove_name(newparent.ino, newname);
                t.add_name(src_inode, newparent.ino, newname);
                t.add_name(&dst_inode, parent.ino, name);
                drop(t);
                Ok(())
            })();
            self.forget(dst_inode.ino, 1);
            return res;
        }
        if let Some(d) = dst {
            if flags & libc::RENAME_NOREPLACE != 0 {
                return Err(errno(libc::EEXIST));
            }
            let dst_dir = is_dir_mode(d.st.st_mode);
            if src_dir && !dst_dir {
                return Err(errno(libc::ENOTDIR));
            }
            if !src_dir && dst_dir {
                return Err(errno(libc::EISDIR));
            }
            if dst_dir && !self.merged_empty(newparent, &cnew, d)? {
                return Err(errno(libc::ENOTEMPTY));
            }
            if parent.ino == newparent.ino && name == newname {
                return Ok(());
            }
            if let Some(di) = rlock(&self.table).by_name(newparent.ino, newname) {
                if di.ino == src_inode.ino {
                    // Two names of one file: rename(2) does nothing.
                    return Ok(());
                }
            }
        }
        if let Some(d) = dst.filter(|d| !is_dir_mode(d.st.st_mode)) {
            // The file replaced may still be open.
            self.keep_orphan(newparent, newname, &cnew, d.layer)?;
        }
        self.copy_up(src_inode, true)?;
        self.copy_up(parent, true)?;
        self.copy_up(newparent, true)?;
        let up = self.dir_fd(parent, 0)?;
        let up2 = self.dir_fd(newparent, 0)?;
        let (up, up2) = (up.as_raw_fd(), up2.as_raw_fd());
        let need_wh = self.lower_has(parent, &cname)?;
        // What the upper holds at the destination: a whiteout, a real (replaceable) object, or nothing.
        match sys::fstatat(up2, &cnew) {
            Ok(st) if whiteout::is_whiteout(&st) => {
                if src_dir {
                    sys::unlinkat(up2, &cnew, 0)?;
                }
            }
            Ok(st) if is_dir_mode(st.st_mode) => self.clear_upper_dir(up2, &cnew)?,
            Ok(_) => {}
            Err(e) if is_enoent(&e) => {}
            Err(e) => return Err(e),
        }
        if src_dir && (self.stack(newparent)?.len() > 1 || self.lower_has(newparent, &cnew)?) {
            // Lower content under the new name must not show through the moved directory (the
            // kernel marks a directory moved into a merged parent opaque for the same reason).
            sys::setxattr(
                &sys::proc_path(up, Some(&cname)),
                self.layers.xattr_ns.opaque_name(),
                b"y",
                0,
                false,
            )?;
        }
        if need_wh {
            match sys::renameat2(up, &cname, up2, &cnew, libc::RENAME_WHITEOUT) {
                Ok(()) => {}
                Err(e) if matches!(e.raw_os_error(), Some(libc::EINVAL | libc::EPERM)) => {
                    sys::renameat2(up, &cname, up2, &cnew, 0)?;
                    self.put_whiteout(up, &cname)?;
                }
                Err(e) => return Err(e),
            }
        } else {
            sys::renameat2(up, &cname, up2, &cnew, 0)?;
        }
        let mut t = wlock(&self.table);
        if let Some(d) = dst {
            if self.layers.is_upper(d.layer) && (is_dir_mode(d.st.st_mode) || d.st.st_nlink <= 1) {
                t.forget_identity(&d.st);
            }
        }
        if let Some(old) = t.remove_name(newparent.ino, newname) {
            if old.is_dir() {
                lock(&old.state).rare_mut().dead = true;
            }
        }
        t.remove_name(parent.ino, name);
        t.add_name(src_inode, newparent.ino, newname);
        drop(t);
        Ok(())
    }

    /// link(2): hard link `inode` as `newparent/newname` in the upper; returns the new stat.
    pub fn link(
        &self,
        inode: &Arc<Inode>,
        newparent: &Arc<Inode>,
        newname: &OsStr,
    ) -> io::Result<libc::stat> {
        whiteout::validate_new_name(newname).map_err(errno)?;
        if inode.is_dir() {
            return Err(errno(libc::EPERM));
        }
        self.copy_up(inode, true)?;
        self.copy_up(newparent, true)?;
        let (t, _) = self.target(inode)?;
        let Target::At(sdir, sname) = t else {
            return Err(errno(libc::EPERM));
        };
        let up2 = self.dir_fd(newparent, 0)?;
        let up2 = up2.as_raw_fd();
        let cnew = sys::cstr(newname)?;
        match sys::fstatat(up2, &cnew) {
            Ok(st) if whiteout::is_whiteout(&st) => {
                let work = self.layers.work_fd()?;
                let tmp = self.tmp_name();
                sys::linkat(sdir.as_raw_fd(), &sname, work, &tmp)?;
                if let Err(e) = sys::renameat2(work, &tmp, up2, &cnew, 0) {
                    let _ = sys::unlinkat(work, &tmp, 0);
                    return Err(e);
                }
            }
            Ok(_) => return Err(errno(libc::EEXIST)),
            Err(e) if is_enoent(&e) => sys::linkat(sdir.as_raw_fd(), &sname, up2, &cnew)?,
            Err(e) => return Err(e),
        }
        let st = sys::fstatat(up2, &cnew)?;
        let mut t = wlock(&self.table);
        t.add_name(inode, newparent.ino, newname);
        let key = (st.st_dev, st.st_ino);
        t.upper_ids.insert(key, inode.ino);
        lock(&inode.state).rare_mut().upper_id = Some(key);
        inode.nlookup.fetch_add(1, Ordering::SeqCst);
        Ok(st)
    }
}
