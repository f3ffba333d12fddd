//! Flattening a range of layers (topmost first) into one new layer, by hard links.
//!
//! The range is always the bottom of a chain, so nothing lies below it: every whiteout (char 0/0
//! device, `.wh.NAME` file) and opaque marker (`trusted.`/`user.overlay.opaque`=`y`,
//! `.wh..wh..opq`) is resolved here and none is written. For every path the topmost version
//! wins. Non-directories are `linkat`ed from the layer holding the winning version (no data is
//! copied; names that share an inode in a layer keep sharing it). Directories are made new and
//! get the winning version's owner, mode, times and xattrs, except the overlay-private ones.
//!
//! The walk is iterative (an explicit stack: a container can make a tree thousands of levels
//! deep) and works only through directory fds opened with `O_NOFOLLOW|O_DIRECTORY`, so no
//! symlink in a layer is ever followed. It holds one fd per level for the new layer and one per
//! level per layer still contributing to that directory; the caller raises RLIMIT_NOFILE.

use std::collections::HashMap;
use std::ffi::{CStr, CString};
use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};

use cachedriver_common::at::{self, XattrTarget};
use cachedriver_common::xattr::{has_opaque_xattr, is_private_xattr, xattr_names};
use cachedriver_fuse::whiteout::{whiteout_target, OPAQUE_FILE, WH_PREFIX};

use crate::error::{Error, Result};

/// What a flattening did.
#[derive(Debug, Default, Clone, Copy)]
pub struct Stats {
    /// Entries made in the new layer (links, copies, directories; the root not counted).
    pub entries: u64,
    /// Entries copied instead of linked (EMLINK: the inode had too many links).
    pub copied: u64,
    /// Deepest directory level reached.
    pub max_depth: usize,
}

/// How one name of a merged directory resolves, by position in the directory's source list.
enum Entry {
    /// Hidden by a whiteout (or never visible); nothing is made.
    Hidden,
    /// A non-directory: linked from the source at this position.
    NonDir(usize),
    /// A directory made of the sources at these positions (topmost first); `open` while a
    /// lower source may still add to it (no non-directory or whiteout seen below it yet).
    Dir(Vec<usize>, bool),
}

/// One directory being built.
struct Frame {
    /// Its name in the parent (empty for the root), for error messages.
    name: Vec<u8>,
    /// The new directory.
    out: OwnedFd,
    /// Contributing source directories, topmost first: (layer index, fd).
    srcs: Vec<(usize, OwnedFd)>,
    /// Merged, visible entries still to make.
    entries: Listing,
    next: usize,
    /// The topmost source's stat, taken before listing it (listing updates its atime).
    attrs: libc::stat,
}

enum Kind {
    Dir,
    Whiteout,
    Other,
}

#[cfg(test)]
thread_local! {
    /// A test knob: copy every non-directory as if `linkat` had answered EMLINK.
    pub(crate) static FORCE_COPY: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

struct Flattener<'a> {
    /// (layer name, layer dir), topmost first.
    layers: &'a [(String, PathBuf)],
    stack: Vec<Frame>,
    stats: Stats,
    /// Inodes copied under EMLINK, by source (dev, ino): where the first copy went (relative
    /// path in the new layer), so further names of that inode link to the copy.
    copies: HashMap<(u64, u64), Vec<u8>>,
}

/// Flattens `layers` ((name, dir), topmost first) into the existing empty directory `out`.
pub fn flatten(layers: &[(String, PathBuf)], out: &Path) -> Result<Stats> {
    if layers.is_empty() {
        return Err(Error::Corrupt("compaction: no layers to flatten".into()));
    }
    let mut f = Flattener {
        layers,
        stack: Vec::new(),
        stats: Stats::default(),
        copies: HashMap::new(),
    };
    f.run(out)
}

fn cpath(p: &Path) -> Result<CString> {
    use std::os::unix::ffi::OsStrExt;
    CString::new(p.as_os_str().as_bytes())
        .map_err(|_| Error::Corrupt(format!("path {} holds a NUL byte", p.display())))
}

fn is_opaque(fd: RawFd) -> io::Result<bool> {
    if has_opaque_xattr(fd)? {
        return Ok(true);
    }
    match at::fstatat(fd, &at::cname(OPAQUE_FILE)?) {
        Ok(_) => Ok(true),
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(false),
        Err(e) => Err(e),
    }
}

fn classify(dirfd: RawFd, name: &[u8], dtype: u8) -> io::Result<Kind> {
    match dtype {
        libc::DT_DIR => Ok(Kind::Dir),
        libc::DT_CHR | libc::DT_UNKNOWN => {
            let st = at::fstatat(dirfd, &at::cname(name)?)?;
            Ok(match st.st_mode & libc::S_IFMT {
                libc::S_IFDIR => Kind::Dir,
                libc::S_IFCHR if st.st_rdev == 0 => Kind::Whiteout,
                _ => Kind::Other,
            })
        }
        _ => Ok(Kind::Other),
    }
}

/// A merged listing: (name, how it resolves), in first-seen order.
type Listing = Vec<(Vec<u8>, Entry)>;

/// The merged listing of one directory from its sources (topmost first); on failure, the
/// position of the source that failed.
fn merge(srcs: &[(usize, OwnedFd)]) -> std::result::Result<Listing, (usize, io::Error)> {
    let mut index: HashMap<Vec<u8>, usize> = HashMap::new();
    let mut list: Vec<(Vec<u8>, Entry)> = Vec::new();
    for (pos, (_, fd)) in srcs.iter().enumerate() {
        let fd = fd.as_raw_fd();
        let names = at::list_dir_fd(fd).map_err(|e| (pos, e))?;
        // `.wh.NAME` hides NAME in the layers below this one, not this layer's own NAME.
        let mut hide_below: Vec<Vec<u8>> = Vec::new();
        for (name, dtype) in names {
            if name == OPAQUE_FILE {
                continue;
            }
            if let Some(t) = whiteout_target(&name) {
                hide_below.push(t.to_vec());
                continue;
            }
            if name.starts_with(WH_PREFIX) {
                continue;
            }
            let kind = classify(fd, &name, dtype).map_err(|e| (pos, e))?;
            match index.get(&name) {
                None => {
                    let e = match kind {
                        Kind::Whiteout => Entry::Hidden,
                        Kind::Other => Entry::NonDir(pos),
                        Kind::Dir => Entry::Dir(vec![pos], true),
                    };
                    index.insert(name.clone(), list.len());
                    list.push((name, e));
                }
                Some(&i) => {
                    if let Entry::Dir(positions, open) = &mut list[i].1 {
                        if *open {
                            match kind {
                                Kind::Dir => positions.push(pos),
                                // A non-directory or whiteout below a directory is hidden by it,
                                // and so is everything under that.
                                _ => *open = false,
                            }
                        }
                    }
                }
            }
        }
        for t in hide_below {
            match index.get(&t) {
                None => {
                    index.insert(t.clone(), list.len());
                    list.push((t, Entry::Hidden));
                }
                Some(&i) => {
                    if let Entry::Dir(_, open) = &mut list[i].1 {
                        *open = false;
                    }
                }
            }
        }
    }
    list.retain(|(_, e)| !matches!(e, Entry::Hidden));
    Ok(list)
}

impl Flattener<'_> {
    /// The directory being built.
    fn top(&self) -> Result<&Frame> {
        self.stack
            .last()
            .ok_or_else(|| Error::Corrupt("compaction: directory stack empty".into()))
    }

    /// The path of `name` (relative to the layer root) under the current stack.
    fn rel(&self, name: Option<&[u8]>) -> PathBuf {
        use std::os::unix::ffi::OsStrExt;
        let mut p = PathBuf::new();
        for f in self.stack.iter().skip(1) {
            p.push(std::ffi::OsStr::from_bytes(&f.name));
        }
        if let Some(n) = name {
            p.push(std::ffi::OsStr::from_bytes(n));
        }
        p
    }

    fn layer_err(&self, li: usize, name: Option<&[u8]>, what: &'static str, e: io::Error) -> Error {
        Error::io(what, self.layers[li].1.join(self.rel(name)), e)
    }

    fn out_err(&self, out: &Path, name: Option<&[u8]>, what: &'static str, e: io::Error) -> Error {
        Error::io(what, out.join(self.rel(name)), e)
    }

    /// Opens `name` in each source at `positions` (all `None`: the layer roots), stopping after
    /// an opaque one.
    fn open_sources(
        &self,
        parent: Option<&Frame>,
        name: &[u8],
        positions: &[usize],
    ) -> Result<Vec<(usize, OwnedFd)>> {
        let mut out = Vec::with_capacity(positions.len());
        for &pos in positions {
            let (li, fd) = match parent {
                Some(p) => {
                    let (li, pfd) = &p.srcs[pos];
                    let c = at::cname(name)
                        .map_err(|e| self.layer_err(*li, Some(name), "opening", e))?;
                    let fd = at::open_dir_at(pfd.as_raw_fd(), &c).map_err(|e| {
                        self.layer_err(*li, Some(name), "opening directory to compact", e)
                    })?;
                    (*li, fd)
                }
                None => {
                    let dir = &self.layers[pos].1;
                    let fd = at::open_dir_at(libc::AT_FDCWD, &cpath(dir)?).map_err(|e| {
                        Error::io("opening layer to compact (missing or unreadable?)", dir, e)
                    })?;
                    (pos, fd)
                }
            };
            let opaque = is_opaque(fd.as_raw_fd()).map_err(|e| {
                self.layer_err(li, parent.map(|_| name), "reading opaque marker", e)
            })?;
            out.push((li, fd));
            if opaque {
                break;
            }
        }
        Ok(out)
    }

    fn push_frame(
        &mut self,
        name: Vec<u8>,
        out: OwnedFd,
        srcs: Vec<(usize, OwnedFd)>,
    ) -> Result<()> {
        let rel = if name.is_empty() {
            None
        } else {
            Some(&name[..])
        };
        let Some((li0, fd0)) = srcs.first() else {
            return Err(Error::Corrupt(
                "compaction: a directory without sources".into(),
            ));
        };
        let attrs = at::fstat(fd0.as_raw_fd())
            .map_err(|e| self.layer_err(*li0, rel, "inspecting directory", e))?;
        let entries = match merge(&srcs) {
            Ok(e) => e,
            Err((pos, e)) => {
                let li = srcs[pos].0;
                return Err(self.layer_err(li, rel, "listing directory to compact", e));
            }
        };
        self.stack.push(Frame {
            name,
            out,
            srcs,
            entries,
            next: 0,
            attrs,
        });
        self.stats.max_depth = self.stats.max_depth.max(self.stack.len() - 1);
        Ok(())
    }

    fn run(&mut self, out: &Path) -> Result<Stats> {
        let root_out = at::open_dir_at(libc::AT_FDCWD, &cpath(out)?)
            .map_err(|e| Error::io("opening new layer", out, e))?;
        let all: Vec<usize> = (0..self.layers.len()).collect();
        let srcs = self.open_sources(None, b"", &all)?;
        self.push_frame(Vec::new(), root_out, srcs)?;
        while let Some(top) = self.stack.last_mut() {
            if top.next == top.entries.len() {
                let Some(f) = self.stack.pop() else { break };
                self.finish_dir(&f, out)?;
                continue;
            }
            let i = top.next;
            top.next += 1;
            let name = std::mem::take(&mut top.entries[i].0);
            let entry = std::mem::replace(&mut top.entries[i].1, Entry::Hidden);
            match entry {
                Entry::Hidden => {}
                Entry::NonDir(pos) => self.link(pos, &name, out)?,
                Entry::Dir(positions, _) => {
                    let c = at::cname(&name)
                        .map_err(|e| self.out_err(out, Some(&name), "naming", e))?;
                    let parent = self.top()?;
                    at::mkdirat(parent.out.as_raw_fd(), &c, 0o700)
                        .map_err(|e| self.out_err(out, Some(&name), "creating directory", e))?;
                    let child_out = at::open_dir_at(parent.out.as_raw_fd(), &c)
                        .map_err(|e| self.out_err(out, Some(&name), "opening new directory", e))?;
                    let srcs = self.open_sources(Some(parent), &name, &positions)?;
                    self.stats.entries += 1;
                    self.push_frame(name, child_out, srcs)?;
                }
            }
        }
        Ok(self.stats)
    }

    /// Gives a finished directory the topmost source's owner, xattrs, mode and times (times
    /// last: making entries changed them).
    fn finish_dir(&self, f: &Frame, out: &Path) -> Result<()> {
        let Some((li, src)) = f.srcs.first() else {
            return Ok(());
        };
        let name = if self.stack.is_empty() {
            None
        } else {
            Some(&f.name[..])
        };
        // `self.stack` no longer holds `f`: its path is the parent's path plus its name.
        let lerr = |what, e| self.layer_err(*li, name, what, e);
        let oerr = |what, e| self.out_err(out, name, what, e);
        let st = &f.attrs;
        let o = f.out.as_raw_fd();
        at::fchown(o, st.st_uid, st.st_gid).map_err(|e| oerr("setting owner", e))?;
        copy_xattrs(&XattrTarget::Fd(src.as_raw_fd()), &XattrTarget::Fd(o)).map_err(
            |(from, e)| {
                if from {
                    lerr("reading xattrs", e)
                } else {
                    oerr("setting xattrs", e)
                }
            },
        )?;
        at::fchmod(o, st.st_mode & 0o7777).map_err(|e| oerr("setting mode", e))?;
        at::futimens(o, &at::times(st)).map_err(|e| oerr("setting times", e))?;
        Ok(())
    }

    /// Links `name` from the source at `pos` of the current directory into the new one.
    fn link(&mut self, pos: usize, name: &[u8], out: &Path) -> Result<()> {
        let top = self.top()?;
        let (li, src) = &top.srcs[pos];
        let li = *li;
        let c = at::cname(name).map_err(|e| self.layer_err(li, Some(name), "naming", e))?;
        #[cfg(test)]
        let forced = FORCE_COPY.with(|f| f.get());
        #[cfg(not(test))]
        let forced = false;
        let r = if forced {
            Err(io::Error::from_raw_os_error(libc::EMLINK))
        } else {
            at::linkat(src.as_raw_fd(), &c, top.out.as_raw_fd(), &c)
        };
        self.stats.entries += 1;
        match r {
            Ok(()) => Ok(()),
            // The inode has as many links as the filesystem allows (65,000 on ext4): rare, since
            // it takes that many layers or names holding one file. Copy it, data and attributes,
            // once; further names of the same inode link to the copy.
            Err(e) if e.raw_os_error() == Some(libc::EMLINK) => self.copy(pos, name, &c, out),
            Err(e) => Err(self.layer_err(li, Some(name), "linking into the new layer", e)),
        }
    }

    fn copy(&mut self, pos: usize, name: &[u8], c: &CStr, out: &Path) -> Result<()> {
        let top = self.top()?;
        let (li, src) = &top.srcs[pos];
        let (li, sfd, ofd) = (*li, src.as_raw_fd(), top.out.as_raw_fd());
        let st =
            at::fstatat(sfd, c).map_err(|e| self.layer_err(li, Some(name), "inspecting", e))?;
        let key = (st.st_dev, st.st_ino);
        let rel = {
            use std::os::unix::ffi::OsStrExt;
            self.rel(Some(name)).as_os_str().as_bytes().to_vec()
        };
        if let Some(first) = self.copies.get(&key) {
            let root = self.stack[0].out.as_raw_fd();
            if let Ok(fc) = at::cname(first) {
                if at::linkat(root, &fc, ofd, c).is_ok() {
                    return Ok(());
                }
            }
        }
        copy_entry(sfd, ofd, c, &st).map_err(|(from, e)| {
            if from {
                self.layer_err(li, Some(name), "copying (EMLINK fallback)", e)
            } else {
                self.out_err(out, Some(name), "copying (EMLINK fallback)", e)
            }
        })?;
        self.stats.copied += 1;
        if st.st_nlink > 1 {
            self.copies.entry(key).or_insert(rel);
        }
        Ok(())
    }
}

/// Copies every xattr but the overlay-private ones. Errors say which side failed (true: source).
fn copy_xattrs(
    src: &XattrTarget<'_>,
    dst: &XattrTarget<'_>,
) -> std::result::Result<(), (bool, io::Error)> {
    let list = src.list().map_err(|e| (true, e))?;
    for x in xattr_names(&list) {
        if is_private_xattr(x) {
            continue;
        }
        let Ok(xc) = CString::new(x) else { continue };
        let Some(v) = src.get(&xc).map_err(|e| (true, e))? else {
            continue;
        };
        dst.set(&xc, &v).map_err(|e| (false, e))?;
    }
    Ok(())
}

/// Copies one non-directory with its data, owner, xattrs, mode and times.
fn copy_entry(
    sfd: RawFd,
    ofd: RawFd,
    c: &CStr,
    st: &libc::stat,
) -> std::result::Result<(), (bool, io::Error)> {
    let perm = st.st_mode & 0o7777;
    match st.st_mode & libc::S_IFMT {
        libc::S_IFREG => {
            let s = at::openat(sfd, c, libc::O_RDONLY, 0).map_err(|e| (true, e))?;
            let d = at::openat(ofd, c, libc::O_WRONLY | libc::O_CREAT | libc::O_EXCL, 0o600)
                .map_err(|e| (false, e))?;
            let mut sf = std::fs::File::from(s);
            let mut df = std::fs::File::from(d);
            std::io::copy(&mut sf, &mut df).map_err(|e| (false, e))?;
            let (s, d) = (sf.as_raw_fd(), df.as_raw_fd());
            at::fchown(d, st.st_uid, st.st_gid).map_err(|e| (false, e))?;
            copy_xattrs(&XattrTarget::Fd(s), &XattrTarget::Fd(d))?;
            at::fchmod(d, perm).map_err(|e| (false, e))?;
            at::futimens(d, &at::times(st)).map_err(|e| (false, e))?;
            return Ok(());
        }
        libc::S_IFLNK => {
            let target = at::readlinkat(sfd, c).map_err(|e| (true, e))?;
            let t = CString::new(target)
                .map_err(|_| (true, io::Error::from_raw_os_error(libc::EINVAL)))?;
            at::symlinkat(&t, ofd, c).map_err(|e| (false, e))?;
        }
        fmt => {
            at::mknodat(ofd, c, fmt | 0o600, st.st_rdev).map_err(|e| (false, e))?;
        }
    }
    at::fchownat(ofd, c, st.st_uid, st.st_gid).map_err(|e| (false, e))?;
    copy_xattrs(&XattrTarget::At(sfd, c), &XattrTarget::At(ofd, c))?;
    if st.st_mode & libc::S_IFMT != libc::S_IFLNK {
        // The entry was just made by us and is not a symlink (fchmodat would follow one).
        at::fchmodat(ofd, c, perm).map_err(|e| (false, e))?;
    }
    at::utimensat(ofd, c, &at::times(st), libc::AT_SYMLINK_NOFOLLOW).map_err(|e| (false, e))
}
