//! The inode table: FUSE node ids for merged objects, their names, where their data lives, and a
//! bounded cache of O_PATH fds for directories (fds count against RLIMIT_NOFILE, so we never keep
//! one per inode).
//!
//! Lock order: the table lock before any inode's `state` lock; never the reverse.

use std::collections::HashMap;
use std::ffi::{OsStr, OsString};
use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock, RwLockReadGuard, RwLockWriteGuard, Weak};

/// Locks a mutex, recovering from poisoning (a panicked request must not wedge the mount).
pub fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Read-locks an RwLock, recovering from poisoning.
pub fn rlock<T>(m: &RwLock<T>) -> RwLockReadGuard<'_, T> {
    m.read().unwrap_or_else(|e| e.into_inner())
}

/// Write-locks an RwLock, recovering from poisoning.
pub fn wlock<T>(m: &RwLock<T>) -> RwLockWriteGuard<'_, T> {
    m.write().unwrap_or_else(|e| e.into_inner())
}

/// A name in a directory, shared by the table's name index and the inode's own list (one
/// allocation per name, not two).
pub type Name = Arc<OsStr>;

/// A passthrough backing file registered with the kernel, shared by all opens of one inode.
#[derive(Debug)]
pub struct Backing {
    /// The kernel's handle.
    pub id: fuser::BackingId,
    /// (dev, ino) of the real file, so a copied-up inode does not reuse the lower's backing.
    pub real: (u64, u64),
}

/// Mutable state of an inode.
#[derive(Debug, Default)]
pub struct InodeState {
    /// Names (parent node id, name) this object is known under; several for hard links.
    pub names: Vec<(u64, Name)>,
    /// Layer holding the topmost real object.
    pub layer: usize,
    /// Directories only (boxed: the table holds one state per object the kernel knows, and
    /// most are files).
    pub dir: Option<Box<DirPart>>,
    /// What few objects have (boxed: the table holds one state per object the kernel knows,
    /// 200k on big trees, and this keeps an inode in a smaller allocation).
    pub rare: Option<Box<Rare>>,
}

/// The rarely set part of an inode's state.
#[derive(Debug, Default)]
pub struct Rare {
    /// Removed directory (rmdir): nothing may be resolved below it.
    pub dead: bool,
    /// A removed directory's last attributes (it may still be someone's cwd).
    pub dead_attr: Option<libc::stat>,
    /// Upper (dev, ino) this inode is registered under in `Table::upper_ids` (upper files with
    /// several links).
    pub upper_id: Option<(u64, u64)>,
    /// A passthrough open with write access happened: the page cache may be stale.
    pub pt_written: bool,
    /// An O_PATH fd kept when the object was unlinked while open (fstat must still work).
    pub orphan: Option<Arc<OwnedFd>>,
}

/// What only a directory inode has.
#[derive(Debug, Default, Clone)]
pub struct DirPart {
    /// Contributing layers, topmost first.
    pub stack: Vec<usize>,
    /// Path relative to every layer root ("" for the root).
    pub path: OsString,
}

impl InodeState {
    /// The rare part, created empty if missing.
    pub fn rare_mut(&mut self) -> &mut Rare {
        self.rare.get_or_insert_with(Box::default)
    }

    /// Removed directory (rmdir).
    pub fn dead(&self) -> bool {
        self.rare.as_ref().is_some_and(|r| r.dead)
    }

    /// A removed directory's last attributes.
    pub fn dead_attr(&self) -> Option<libc::stat> {
        self.rare.as_ref().and_then(|r| r.dead_attr)
    }

    /// Upper (dev, ino) this inode is registered under in `Table::upper_ids`.
    pub fn upper_id(&self) -> Option<(u64, u64)> {
        self.rare.as_ref().and_then(|r| r.upper_id)
    }

    /// The fd kept for an unlinked, still open object.
    pub fn orphan(&self) -> Option<Arc<OwnedFd>> {
        self.rare.as_ref().and_then(|r| r.orphan.clone())
    }

    /// A directory's contributing layers, topmost first (empty for other objects).
    pub fn stack(&self) -> &[usize] {
        self.dir.as_ref().map_or(&[], |d| &d.stack)
    }

    /// A directory's path relative to every layer root (empty for the root and non-directories).
    pub fn path(&self) -> &OsStr {
        self.dir.as_ref().map_or(OsStr::new(""), |d| &d.path)
    }

    /// The directory part, created empty if missing.
    pub fn dir_mut(&mut self) -> &mut DirPart {
        self.dir.get_or_insert_with(Box::default)
    }
}

/// One merged object known to the kernel.
#[derive(Debug)]
pub struct Inode {
    /// FUSE node id (also reported as st_ino).
    pub ino: u64,
    /// File type bits (S_IFMT) — fixed for the life of the inode. 16 bits hold them, and with
    /// them the inode fits a smaller allocation (see `kind()`).
    kind_bits: u16,
    /// Kernel lookup count.
    pub nlookup: AtomicU64,
    /// Mutable state.
    pub state: Mutex<InodeState>,
    /// Live passthrough backing, if any. Also serialises the choice of I/O mode at open, and
    /// copy-up of this object (one lock for both keeps an inode in a 128-byte allocation; the
    /// two never nest: an open copies up before choosing its mode).
    pub backing: Mutex<Weak<Backing>>,
    /// Set once the object has been copied up (open read-only handles then re-open).
    pub copied_up: AtomicBool,
    /// Open file handles.
    pub opens: AtomicU32,
    /// Open handles served through the page cache (the kernel forbids mixing with passthrough).
    pub cached_opens: AtomicU32,
}

impl Inode {
    /// A new inode.
    pub fn new(ino: u64, kind: u32, state: InodeState) -> Inode {
        Inode {
            ino,
            kind_bits: (kind & libc::S_IFMT) as u16,
            nlookup: AtomicU64::new(1),
            state: Mutex::new(state),
            backing: Mutex::new(Weak::new()),
            copied_up: AtomicBool::new(false),
            opens: AtomicU32::new(0),
            cached_opens: AtomicU32::new(0),
        }
    }
}

impl Inode {
    /// File type bits (S_IFMT).
    pub fn kind(&self) -> u32 {
        u32::from(self.kind_bits)
    }

    /// Whether this is a directory.
    pub fn is_dir(&self) -> bool {
        self.kind() == libc::S_IFDIR
    }
}

/// The inode table proper.
#[derive(Debug, Default)]
pub struct Table {
    /// All live inodes.
    pub map: HashMap<u64, Arc<Inode>>,
    /// (parent, name) → node id.
    pub names: HashMap<(u64, Name), u64>,
    /// Upper (dev, ino) → node id, so hard links in the upper share one inode.
    pub upper_ids: HashMap<(u64, u64), u64>,
    /// Real (dev, ino) → node id, kept after forget so that st_ino stays stable for the life of
    /// the mount (a few dozen bytes per object ever seen; the inodes themselves are freed).
    pub ids: HashMap<(u64, u64), u64>,
    /// Next node id to hand out (never reused).
    pub next: u64,
}

impl Table {
    /// A table holding only the root.
    pub fn new(root: Inode) -> Table {
        let mut map = HashMap::new();
        map.insert(fuser::INodeNo::ROOT.0, Arc::new(root));
        Table {
            map,
            names: HashMap::new(),
            upper_ids: HashMap::new(),
            ids: HashMap::new(),
            next: 2,
        }
    }

    /// Looks up a live inode.
    pub fn get(&self, ino: u64) -> Option<Arc<Inode>> {
        self.map.get(&ino).cloned()
    }

    /// The inode currently known under (parent, name).
    pub fn by_name(&self, parent: u64, name: &OsStr) -> Option<Arc<Inode>> {
        self.names
            .get(&(parent, Name::from(name)))
            .and_then(|i| self.map.get(i))
            .cloned()
    }

    /// Removes the name (parent, name) from whatever inode holds it.
    pub fn remove_name(&mut self, parent: u64, name: &OsStr) -> Option<Arc<Inode>> {
        let ino = self.names.remove(&(parent, Name::from(name)))?;
        let inode = self.map.get(&ino).cloned()?;
        lock(&inode.state)
            .names
            .retain(|(p, n)| !(*p == parent && **n == *name));
        Some(inode)
    }

    /// Adds a name to an inode.
    pub fn add_name(&mut self, inode: &Inode, parent: u64, name: &OsStr) {
        let key = (parent, Name::from(name));
        if let Some(old) = self.names.insert(key.clone(), inode.ino) {
            if old != inode.ino {
                if let Some(o) = self.map.get(&old) {
                    lock(&o.state).names.retain(|k| *k != key);
                }
            }
        }
        let mut st = lock(&inode.state);
        if !st.names.contains(&key) {
            // Exactly one more: most objects have one name, and a pushed-to empty Vec would
            // allocate room for four (96 bytes wasted per object on a 200k-entry tree).
            st.names.reserve_exact(1);
            st.names.push(key);
        }
    }

    /// Forgets the identity of a removed upper object (its inode number may be reused by the
    /// filesystem for something else).
    pub fn forget_identity(&mut self, st: &libc::stat) {
        self.ids.remove(&(st.st_dev, st.st_ino));
    }

    /// Drops an inode the kernel has forgotten.
    pub fn remove(&mut self, ino: u64) {
        if let Some(inode) = self.map.remove(&ino) {
            let st = lock(&inode.state);
            for k in &st.names {
                if self.names.get(k) == Some(&ino) {
                    self.names.remove(k);
                }
            }
            if let Some(k) = st.upper_id() {
                if self.upper_ids.get(&k) == Some(&ino) {
                    self.upper_ids.remove(&k);
                }
            }
        }
    }
}

/// Cached fds by (node id, layer), each with its last-use tick.
type FdMap = HashMap<(u64, usize), (Arc<OwnedFd>, u64)>;

/// A bounded cache of O_PATH directory fds keyed by (node id, layer).
#[derive(Debug)]
pub struct DirFdCache {
    map: Mutex<FdMap>,
    tick: AtomicU64,
    cap: usize,
}

impl DirFdCache {
    /// A cache holding at most `cap` fds.
    pub fn new(cap: usize) -> DirFdCache {
        DirFdCache {
            map: Mutex::new(HashMap::new()),
            tick: AtomicU64::new(0),
            cap: cap.max(16),
        }
    }

    /// A cached fd.
    pub fn get(&self, ino: u64, layer: usize) -> Option<Arc<OwnedFd>> {
        let t = self.tick.fetch_add(1, Ordering::Relaxed);
        let mut m = lock(&self.map);
        let e = m.get_mut(&(ino, layer))?;
        e.1 = t;
        Some(e.0.clone())
    }

    /// Inserts an fd, evicting the least recently used half when full.
    pub fn insert(&self, ino: u64, layer: usize, fd: Arc<OwnedFd>) {
        let t = self.tick.fetch_add(1, Ordering::Relaxed);
        let mut m = lock(&self.map);
        if m.len() >= self.cap {
            let mut ticks: Vec<u64> = m.values().map(|v| v.1).collect();
            ticks.sort_unstable();
            let cut = ticks[ticks.len() / 2];
            m.retain(|_, v| v.1 > cut);
        }
        m.insert((ino, layer), (fd, t));
    }

    /// Forgets every fd of a node (linear: for small caches).
    pub fn remove_all(&self, ino: u64) {
        lock(&self.map).retain(|k, _| k.0 != ino);
    }

    /// Forgets the fds of a node in the given layers.
    pub fn remove(&self, ino: u64, layers: &[usize]) {
        let mut m = lock(&self.map);
        for l in layers {
            m.remove(&(ino, *l));
        }
    }
}
