//! The inode table: FUSE node ids for merged objects, their names, where their data lives, and a
//! cache of O_PATH fds for directories bounded by memory (`DIR_FD_BUDGET`; fds also count
//! against RLIMIT_NOFILE, so we never keep one per inode). Inodes live while the kernel knows
//! them: its FORGET frees them.
//!
//! Lock order: the table lock before any inode's `state` lock; never the reverse.

use std::collections::HashMap;
use std::ffi::OsStr;
use std::hash::{BuildHasher, RandomState};
use std::os::fd::OwnedFd;
use std::os::unix::ffi::OsStrExt;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock, RwLockReadGuard, RwLockWriteGuard, Weak};

use hashbrown::HashTable;

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

pub use crate::name::Name;

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
    /// The name (parent node id, name) this object was reached through most recently; `None`
    /// once it has none. Further names (hard links) are in `Rare::more_names`: most objects
    /// have one name, and keeping it inline saves an allocation per object.
    pub name: Option<(u64, Name)>,
    /// Layer holding the topmost real object.
    pub layer: usize,
    /// What directories and few other objects have (boxed, one pointer for all of it: the
    /// table holds one state per object the kernel knows, 200k on big trees, and this keeps an
    /// inode in a 112-byte allocation).
    pub rare: Option<Box<Rare>>,
}

/// The rarely set part of an inode's state, and a directory's layers and path.
#[derive(Debug, Default)]
pub struct Rare {
    /// Directories only.
    pub dir: Option<DirPart>,
    /// Removed directory (rmdir): nothing may be resolved below it.
    pub dead: bool,
    /// A removed directory's last attributes (it may still be someone's cwd).
    pub dead_attr: Option<Box<libc::stat>>,
    /// Upper (dev, ino) this inode is registered under in `Table::upper_ids` (upper files with
    /// several links).
    pub upper_id: Option<(u64, u64)>,
    /// A passthrough open with write access happened: the page cache may be stale.
    pub pt_written: bool,
    /// An O_PATH fd kept when the object was unlinked while open (fstat must still work).
    pub orphan: Option<Arc<OwnedFd>>,
    /// Names after `InodeState::name` (hard links), in order of most recent use.
    pub more_names: Vec<(u64, Name)>,
}

/// What only a directory inode has. No path: a directory is reached through its parents'
/// names (`Union::dir_fd`), so a rename touches nothing below the renamed directory.
#[derive(Debug, Default, Clone)]
pub struct DirPart {
    /// Contributing layers, topmost first.
    pub stack: Vec<usize>,
}

impl InodeState {
    /// The name used most recently, if any.
    pub fn first_name(&self) -> Option<(u64, Name)> {
        self.name.clone()
    }

    /// How many names the object has.
    pub fn name_count(&self) -> usize {
        usize::from(self.name.is_some()) + self.rare.as_ref().map_or(0, |r| r.more_names.len())
    }

    /// All names, most recently used first.
    pub fn names(&self) -> Vec<(u64, Name)> {
        let mut v = Vec::with_capacity(self.name_count());
        v.extend(self.name.iter().cloned());
        if let Some(r) = &self.rare {
            v.extend(r.more_names.iter().cloned());
        }
        v
    }

    /// Whether (parent, name) is one of the object's names.
    pub fn has_name(&self, parent: u64, name: &OsStr) -> bool {
        let is = |(p, n): &(u64, Name)| *p == parent && **n == *name;
        self.name.as_ref().is_some_and(is)
            || self
                .rare
                .as_ref()
                .is_some_and(|r| r.more_names.iter().any(is))
    }

    /// Adds a name (last in order of use) unless the object already has it.
    pub fn push_name(&mut self, parent: u64, name: Name) {
        if self.has_name(parent, &name) {
            return;
        }
        if self.name.is_none() {
            self.name = Some((parent, name));
        } else {
            let more = &mut self.rare_mut().more_names;
            // Exactly one more: a pushed-to empty Vec would allocate room for four.
            more.reserve_exact(1);
            more.push((parent, name));
        }
    }

    /// Removes a name; the next most recently used one takes its place.
    pub fn remove_name(&mut self, parent: u64, name: &OsStr) {
        let is = |(p, n): &(u64, Name)| *p == parent && **n == *name;
        if let Some(r) = &mut self.rare {
            r.more_names.retain(|k| !is(k));
        }
        if self.name.as_ref().is_some_and(is) {
            self.name = self
                .rare
                .as_mut()
                .and_then(|r| (!r.more_names.is_empty()).then(|| r.more_names.remove(0)));
        }
    }

    /// Makes (parent, name) the first name, if the object has it.
    pub fn name_to_front(&mut self, parent: u64, name: &OsStr) {
        let Some(r) = &mut self.rare else { return };
        if let Some(i) = r
            .more_names
            .iter()
            .position(|(p, n)| *p == parent && **n == *name)
        {
            let e = r.more_names.remove(i);
            if let Some(old) = self.name.replace(e) {
                r.more_names.insert(0, old);
            }
        }
    }

    /// Removes and returns every name but the first.
    pub fn take_other_names(&mut self) -> Vec<(u64, Name)> {
        self.rare
            .as_mut()
            .map(|r| std::mem::take(&mut r.more_names))
            .unwrap_or_default()
    }

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
        self.rare
            .as_ref()
            .and_then(|r| r.dead_attr.as_deref().copied())
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
        self.rare
            .as_ref()
            .and_then(|r| r.dir.as_ref())
            .map_or(&[], |d| &d.stack)
    }

    /// The directory part, created empty if missing.
    pub fn dir_mut(&mut self) -> &mut DirPart {
        self.rare_mut().dir.get_or_insert_with(DirPart::default)
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

/// A slot of the name index: which node a (parent, name) is, with 32 bits of the name's hash
/// (the full hash is derived from them, so the table can grow without looking at the inodes).
/// 12 bytes a name, where a map keyed by (parent, name) held 32 and a shared name.
#[derive(Debug, Clone, Copy)]
struct NameSlot {
    h: u32,
    ino: [u32; 2],
}

impl NameSlot {
    fn new(h: u32, ino: u64) -> NameSlot {
        NameSlot {
            h,
            ino: [ino as u32, (ino >> 32) as u32],
        }
    }

    fn ino(&self) -> u64 {
        u64::from(self.ino[0]) | (u64::from(self.ino[1]) << 32)
    }
}

/// Spreads 32 bits over 64 (the index uses the top bits and the bottom bits of a hash).
fn spread(h: u32) -> u64 {
    u64::from(h).wrapping_mul(0x9E37_79B9_7F4A_7C15)
}

/// The hash of a node id in the node map (ids are handed out in sequence; no one chooses them).
fn ino_hash(ino: u64) -> u64 {
    let h = ino.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    h ^ (h >> 29)
}

/// The inode table proper.
///
/// Memory: one node-map slot (an `Arc`, 8 bytes) and one name-index slot (12 bytes) per
/// object, plus the inode itself; names live once, in the inode. The name index does not
/// hold the names: a probe checks a candidate against its inode's names (so the table lock
/// must be taken before any inode's `state` lock, never while holding one).
#[derive(Debug, Default)]
pub struct Table {
    /// All live inodes, by node id.
    map: HashTable<Arc<Inode>>,
    /// (parent, name) → node id.
    names: HashTable<NameSlot>,
    /// Keys the name hash (names come from containers: no chosen collisions).
    hasher: RandomState,
    /// Upper (dev, ino) → node id, so hard links in the upper share one inode.
    pub upper_ids: HashMap<(u64, u64), u64>,
    /// Real (dev, ino) → node id, kept after forget so that st_ino stays stable for the life of
    /// the mount (`ID_COST` per object seen; the inodes themselves are freed), up to
    /// `IDS_BUDGET`: see `remember_identity`.
    pub ids: HashMap<(u64, u64), u64>,
    /// Entry count past which `remember_identity` drops the identities of forgotten objects.
    ids_limit: usize,
    /// Next node id to hand out (never reused).
    pub next: u64,
}

/// What one remembered identity costs: a 24-byte slot, its control byte and the table's spare
/// room (at most 1/8 empty before growing, up to half after).
pub const ID_COST: usize = 32;

/// Memory the identities of forgotten objects may hold: 32 MiB, about a million objects, more
/// than a build cache's walk sees; past it they are dropped (those objects get a new st_ino at
/// their next lookup, as on a remount), never the identities of live inodes.
pub const IDS_BUDGET: usize = 32 << 20;

impl Table {
    /// A table holding only the root.
    pub fn new(root: Inode) -> Table {
        let mut t = Table {
            next: 2,
            ids_limit: IDS_BUDGET / ID_COST,
            ..Default::default()
        };
        t.insert(Arc::new(root));
        t
    }

    fn name_hash(&self, parent: u64, name: &OsStr) -> u32 {
        let h = self.hasher.hash_one((parent, name.as_bytes()));
        (h ^ (h >> 32)) as u32
    }

    /// Looks up a live inode.
    pub fn get(&self, ino: u64) -> Option<Arc<Inode>> {
        self.map.find(ino_hash(ino), |i| i.ino == ino).cloned()
    }

    /// Whether a node id is live.
    pub fn contains(&self, ino: u64) -> bool {
        self.map.find(ino_hash(ino), |i| i.ino == ino).is_some()
    }

    /// Adds (or replaces) a live inode under its node id.
    pub fn insert(&mut self, inode: Arc<Inode>) {
        let ino = inode.ino;
        match self
            .map
            .entry(ino_hash(ino), |i| i.ino == ino, |i| ino_hash(i.ino))
        {
            hashbrown::hash_table::Entry::Occupied(mut e) => *e.get_mut() = inode,
            hashbrown::hash_table::Entry::Vacant(e) => {
                e.insert(inode);
            }
        }
    }

    /// Gives the indexes' memory back once the kernel has forgotten most of what it knew: a
    /// table less than a quarter full shrinks to twice its entries (a rehash of what is left,
    /// so at most once per halving).
    pub fn shrink_if_sparse(&mut self) {
        let (n, cap) = (self.map.len(), self.map.capacity());
        if cap > 4096 && n < cap / 4 {
            self.map.shrink_to(n * 2, |i| ino_hash(i.ino));
        }
        let (n, cap) = (self.names.len(), self.names.capacity());
        if cap > 4096 && n < cap / 4 {
            self.names.shrink_to(n * 2, |s| spread(s.h));
        }
    }

    /// The node id known under (parent, name).
    pub fn name_ino(&self, parent: u64, name: &OsStr) -> Option<u64> {
        let h = self.name_hash(parent, name);
        let map = &self.map;
        self.names
            .find(spread(h), |s| {
                s.h == h && {
                    let ino = s.ino();
                    map.find(ino_hash(ino), |i| i.ino == ino)
                        .is_some_and(|i| lock(&i.state).has_name(parent, name))
                }
            })
            .map(NameSlot::ino)
    }

    /// Drops the index entry (parent, name) → `ino`, if there is one (the inode's own list of
    /// names is left alone).
    pub fn unindex_name(&mut self, parent: u64, name: &OsStr, ino: u64) {
        let h = self.name_hash(parent, name);
        if let Ok(e) = self
            .names
            .find_entry(spread(h), |s| s.h == h && s.ino() == ino)
        {
            e.remove();
        }
    }

    /// The inode currently known under (parent, name).
    pub fn by_name(&self, parent: u64, name: &OsStr) -> Option<Arc<Inode>> {
        self.name_ino(parent, name).and_then(|i| self.get(i))
    }

    /// Removes the name (parent, name) from whatever inode holds it.
    pub fn remove_name(&mut self, parent: u64, name: &OsStr) -> Option<Arc<Inode>> {
        let ino = self.name_ino(parent, name)?;
        self.unindex_name(parent, name, ino);
        let inode = self.get(ino)?;
        lock(&inode.state).remove_name(parent, name);
        Some(inode)
    }

    /// Adds a name to an inode.
    pub fn add_name(&mut self, inode: &Inode, parent: u64, name: &OsStr) {
        match self.name_ino(parent, name) {
            Some(old) if old == inode.ino => {}
            Some(old) => {
                self.unindex_name(parent, name, old);
                if let Some(o) = self.get(old) {
                    lock(&o.state).remove_name(parent, name);
                }
                self.index_name(parent, name, inode.ino);
            }
            None => self.index_name(parent, name, inode.ino),
        }
        lock(&inode.state).push_name(parent, Name::from(name));
    }

    fn index_name(&mut self, parent: u64, name: &OsStr, ino: u64) {
        let h = self.name_hash(parent, name);
        self.names
            .insert_unique(spread(h), NameSlot::new(h, ino), |s| spread(s.h));
    }

    /// Remembers that real object `key` is node `ino`. Past `ids_limit` entries, drops the
    /// identities of objects the kernel has forgotten (a rescan that then waits until the map
    /// doubles, so its cost is amortised even if most entries are live).
    pub fn remember_identity(&mut self, key: (u64, u64), ino: u64) {
        self.ids.insert(key, ino);
        if self.ids.len() <= self.ids_limit {
            return;
        }
        let mut ids = std::mem::take(&mut self.ids);
        ids.retain(|_, i| self.contains(*i));
        ids.shrink_to_fit();
        self.ids_limit = self.ids_limit.max(ids.len() * 2);
        self.ids = ids;
        tracing::debug!(
            "identity map over budget: kept {} live entries",
            self.ids.len()
        );
    }

    /// Forgets the identity of a removed upper object (its inode number may be reused by the
    /// filesystem for something else).
    pub fn forget_identity(&mut self, st: &libc::stat) {
        self.ids.remove(&(st.st_dev, st.st_ino));
    }

    /// Drops an inode the kernel has forgotten.
    pub fn remove(&mut self, ino: u64) {
        let Ok(e) = self.map.find_entry(ino_hash(ino), |i| i.ino == ino) else {
            return;
        };
        let (inode, _) = e.remove();
        let (names, upper_id) = {
            let st = lock(&inode.state);
            (st.names(), st.upper_id())
        };
        for (p, n) in names {
            self.unindex_name(p, &n, ino);
        }
        if let Some(k) = upper_id {
            if self.upper_ids.get(&k) == Some(&ino) {
                self.upper_ids.remove(&k);
            }
        }
    }
}

/// What one cached O_PATH directory fd costs, estimated (kernel 6.x, x86-64): in the kernel a
/// `struct file` (a 256-byte slab object) and its fd-table slot, plus the dentry (192 bytes) and
/// the inode (about 1 KiB for ext4 or xfs) that an open fd keeps from being reclaimed; here a
/// map slot (about 40 bytes with the table's spare room) and the shared fd (a 32-byte
/// allocation). Rounded up to 2 KiB.
pub const FD_COST: usize = 2048;

/// Memory the directory-fd cache may hold, at `FD_COST` an fd: 16 MiB (8192 fds), almost all
/// of it kernel memory. Enough for the directories of a 200k-entry tree (2k) and then some:
/// with fewer fds than the directories a walk visits, a second walk misses on every one (the
/// cache evicts its older half when full) and each miss costs an `openat2` from the layer root
/// (measured: 4 MiB made a warm walk of that tree 20% slower).
pub const DIR_FD_BUDGET: usize = 16 << 20;

/// Cached fds by (node id, layer), each with its last-use tick.
type FdMap = HashMap<(u64, usize), (Arc<OwnedFd>, u64)>;

/// A bounded cache of fds keyed by (node id, layer): O_PATH fds of directories (bounded by
/// memory: `with_budget`), or of files for I/O.
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

    /// A cache holding at most `bytes` of memory at `FD_COST` an fd, and never more than
    /// `fd_limit` fds (descriptors count against RLIMIT_NOFILE).
    pub fn with_budget(bytes: usize, fd_limit: usize) -> DirFdCache {
        DirFdCache::new((bytes / FD_COST).min(fd_limit))
    }

    /// How many fds it may hold.
    #[cfg(test)]
    pub fn capacity(&self) -> usize {
        self.cap
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

#[cfg(test)]
mod tests {
    use super::*;

    /// The table holds one inode per object the kernel knows: with `Arc`'s two counters it must
    /// fit glibc's 112-byte chunk (a request of at most 104 bytes).
    #[test]
    fn inode_fits_a_small_allocation() {
        assert!(
            std::mem::size_of::<Inode>() + 16 <= 104,
            "Inode is {} bytes",
            std::mem::size_of::<Inode>()
        );
        assert_eq!(std::mem::size_of::<InodeState>(), 32);
    }

    fn state_with(names: &[(u64, &str)]) -> InodeState {
        let mut st = InodeState::default();
        for (p, n) in names {
            st.push_name(*p, Name::from(OsStr::new(n)));
        }
        st
    }

    #[test]
    fn dir_fds_are_bounded_by_memory() {
        let c = DirFdCache::with_budget(DIR_FD_BUDGET, 1 << 20);
        assert_eq!(c.capacity(), DIR_FD_BUDGET / FD_COST);
        // The descriptor limit still caps it.
        assert_eq!(DirFdCache::with_budget(DIR_FD_BUDGET, 100).capacity(), 100);
        let c = DirFdCache::with_budget(64 * FD_COST, 1 << 20);
        let fd = Arc::new(OwnedFd::from(std::fs::File::open("/").unwrap()));
        for i in 0..1000 {
            c.insert(i, 0, fd.clone());
            assert!(lock(&c.map).len() <= 64);
        }
        assert!(c.get(999, 0).is_some());
    }

    #[test]
    fn names_keep_order_of_use() {
        let mut st = state_with(&[(1, "a"), (2, "a-much-longer-name"), (1, "a"), (3, "c")]);
        assert_eq!(st.name_count(), 3);
        st.name_to_front(3, OsStr::new("c"));
        assert_eq!(st.first_name().map(|(p, _)| p), Some(3));
        st.remove_name(3, OsStr::new("c"));
        assert_eq!(st.first_name().map(|(p, _)| p), Some(1));
        assert!(st.has_name(2, OsStr::new("a-much-longer-name")));
        assert_eq!(st.take_other_names().len(), 1);
        assert_eq!(st.name_count(), 1);
        st.remove_name(1, OsStr::new("a"));
        assert_eq!(st.name_count(), 0);
    }

    #[test]
    fn identities_of_forgotten_objects_are_dropped_past_the_budget_never_live_ones() {
        let mut t = Table::new(Inode::new(1, libc::S_IFDIR, InodeState::default()));
        assert_eq!(t.ids_limit, IDS_BUDGET / ID_COST);
        t.ids_limit = 8;
        let remember_live = |t: &mut Table, ino: u64| {
            t.insert(Arc::new(Inode::new(
                ino,
                libc::S_IFREG,
                InodeState::default(),
            )));
            t.remember_identity((1, ino), ino);
        };
        // Three live objects, then forgotten ones until the map passes its limit.
        for ino in 2..5u64 {
            remember_live(&mut t, ino);
        }
        for ino in 5..10u64 {
            t.remember_identity((1, ino), ino);
        }
        assert_eq!(t.ids.len(), 8, "at the limit nothing is dropped");
        t.remember_identity((1, 10), 10);
        let mut kept: Vec<u64> = t.ids.values().copied().collect();
        kept.sort_unstable();
        assert_eq!(kept, vec![2, 3, 4], "only the live inodes' identities stay");
        assert_eq!(t.ids_limit, 8);
        // Mostly live: the next rescan waits until the map doubles.
        for ino in 11..30u64 {
            remember_live(&mut t, ino);
        }
        assert_eq!(t.ids.len(), 22);
        assert!(t.ids_limit >= 22);
    }

    #[test]
    fn name_index_follows_names() {
        let mut t = Table::new(Inode::new(1, libc::S_IFDIR, InodeState::default()));
        let a = Arc::new(Inode::new(5, libc::S_IFREG, InodeState::default()));
        let b = Arc::new(Inode::new(6, libc::S_IFREG, InodeState::default()));
        t.insert(a.clone());
        t.insert(b.clone());
        t.add_name(&a, 1, OsStr::new("x"));
        t.add_name(&a, 1, OsStr::new("y"));
        assert_eq!(t.name_ino(1, OsStr::new("x")), Some(5));
        assert_eq!(t.name_ino(1, OsStr::new("y")), Some(5));
        assert_eq!(t.name_ino(2, OsStr::new("x")), None);
        // A name moving to another inode leaves the first one's list.
        t.add_name(&b, 1, OsStr::new("x"));
        assert_eq!(t.name_ino(1, OsStr::new("x")), Some(6));
        assert!(!lock(&a.state).has_name(1, OsStr::new("x")));
        assert!(t.remove_name(1, OsStr::new("y")).is_some());
        assert_eq!(t.name_ino(1, OsStr::new("y")), None);
        for i in 0..5000u64 {
            let n = Arc::new(Inode::new(100 + i, libc::S_IFREG, InodeState::default()));
            t.insert(n.clone());
            t.add_name(&n, 1, OsStr::new(&format!("f{i}")));
        }
        for i in (0..5000u64).step_by(7) {
            assert_eq!(t.name_ino(1, OsStr::new(&format!("f{i}"))), Some(100 + i));
        }
        t.remove(100);
        assert_eq!(t.name_ino(1, OsStr::new("f0")), None);
        assert!(t.get(100).is_none() && t.contains(101));
    }
}
