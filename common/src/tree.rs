//! Removing and walking trees that a container wrote, as root, without trusting them.
//!
//! A container controls everything below an upper dir: 4,000-deep chains (paths far beyond
//! PATH_MAX), 100k-entry directories, symlinks to `/etc` or up `..` chains, names with newlines
//! or invalid UTF-8, and it can swap entries while we work. So both [`remove_tree_at`] and
//! [`walk`]:
//! - never follow a symlink: every step is an `openat(O_NOFOLLOW | O_DIRECTORY)` relative to the
//!   directory fd we hold, and names are bytes straight from `getdents64`, never paths;
//! - hold O(1) descriptors and never recurse: the stack is an explicit `Vec` of
//!   (name, dev, ino) frames and only the current directory is open. Climbing back is
//!   `openat(cur, "..")`, checked against the recorded (dev, ino) of the parent, so a directory
//!   moved under us is detected instead of letting us continue somewhere else;
//! - never leave the filesystem and mount they started on (dev, mount id and the
//!   `STATX_ATTR_MOUNT_ROOT` attribute are checked on every directory opened): removal refuses
//!   to descend into a mount point, a walk skips it.
//!
//! Immutable and append-only flags (`chattr +i`/`+a`, which a privileged container can set)
//! are cleared where they block a removal, on regular files and directories only.
//!
//! Memory is bounded by the names of the directories still to visit on the current path (each
//! directory is listed once into its frame), not by descriptors or stack depth.

use std::ffi::{CStr, CString, OsStr};
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use crate::at::{self, check};

/// How often a directory emptied by us is listed again to catch entries made while we worked
/// (a writer still running); after that its rmdir reports ENOTEMPTY.
const MAX_RELISTS: u32 = 8;

/// Identity and type of one inode, from `statx` (or `fstatat` where statx is missing).
#[derive(Debug, Clone, Copy)]
struct Id {
    dev: u64,
    ino: u64,
    mode: u32,
    /// The mount the inode was reached through (kernel 5.8+).
    mnt_id: Option<u64>,
    /// Whether the inode is the root of a mount (kernel 5.8+).
    mount_root: Option<bool>,
}

impl Id {
    fn is_dir(&self) -> bool {
        self.mode & libc::S_IFMT == libc::S_IFDIR
    }

    fn same_inode(&self, o: &Id) -> bool {
        (self.dev, self.ino) == (o.dev, o.ino)
    }

    /// Whether `self`, reached from inside `top`'s tree, lies on another mount.
    fn is_other_mount(&self, top: &Id) -> bool {
        self.dev != top.dev
            || self.mount_root == Some(true)
            || matches!((self.mnt_id, top.mnt_id), (Some(a), Some(b)) if a != b)
    }
}

/// `statx(dirfd, name)` without following a final symlink or triggering an automount; an
/// empty `name` stats `dirfd` itself.
fn stat_at(dirfd: RawFd, name: &CStr) -> io::Result<Id> {
    let mut flags = libc::AT_SYMLINK_NOFOLLOW | libc::AT_NO_AUTOMOUNT;
    if name.is_empty() {
        flags |= libc::AT_EMPTY_PATH;
    }
    // SAFETY: statx is plain old data.
    let mut sx: libc::statx = unsafe { std::mem::zeroed() };
    let mask = libc::STATX_TYPE | libc::STATX_MODE | libc::STATX_INO | libc::STATX_MNT_ID;
    // SAFETY: valid C string and a valid pointer to a local statx.
    let r = unsafe { libc::statx(dirfd, name.as_ptr(), flags, mask, &mut sx) };
    if r == 0 {
        let mount_attr = libc::STATX_ATTR_MOUNT_ROOT as u64;
        return Ok(Id {
            dev: libc::makedev(sx.stx_dev_major, sx.stx_dev_minor),
            ino: sx.stx_ino,
            mode: u32::from(sx.stx_mode),
            mnt_id: (sx.stx_mask & libc::STATX_MNT_ID != 0).then_some(sx.stx_mnt_id),
            mount_root: (sx.stx_attributes_mask & mount_attr != 0)
                .then_some(sx.stx_attributes & mount_attr != 0),
        });
    }
    let err = io::Error::last_os_error();
    if err.raw_os_error() != Some(libc::ENOSYS) {
        return Err(err);
    }
    // No statx (an old seccomp profile): dev and ino still keep us on one filesystem.
    // SAFETY: stat is plain old data.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: valid C string and a valid pointer to a local stat.
    check(unsafe { libc::fstatat(dirfd, name.as_ptr(), &mut st, flags) })?;
    Ok(Id {
        dev: st.st_dev,
        ino: st.st_ino,
        mode: st.st_mode,
        mnt_id: None,
        mount_root: None,
    })
}

/// `chattr +i` / `+a` (a privileged container can set them through overlayfs): an inode with
/// either refuses unlink, and a directory with either refuses removing its entries.
const FS_IMMUTABLE_FL: libc::c_int = 0x10;
const FS_APPEND_FL: libc::c_int = 0x20;

/// Clears the immutable and append-only flags of the open regular file or directory `fd`;
/// true when it cleared any.
fn clear_flags_fd(fd: RawFd) -> bool {
    let mut flags: libc::c_int = 0;
    // SAFETY: the kernel reads and writes an int for these ioctls; the pointer is valid.
    unsafe {
        if libc::ioctl(fd, libc::FS_IOC_GETFLAGS, &mut flags) != 0 {
            return false;
        }
        if flags & (FS_IMMUTABLE_FL | FS_APPEND_FL) == 0 {
            return false;
        }
        flags &= !(FS_IMMUTABLE_FL | FS_APPEND_FL);
        libc::ioctl(fd, libc::FS_IOC_SETFLAGS, &flags) == 0
    }
}

/// [`clear_flags_fd`] for `name` in `dirfd`, only if it is a regular file or a directory (an
/// ioctl on a device node would reach its driver) and still the inode we stat'ed.
fn clear_flags_at(dirfd: RawFd, name: &CStr) -> bool {
    let Ok(st) = stat_at(dirfd, name) else {
        return false;
    };
    let fmt = st.mode & libc::S_IFMT;
    if fmt != libc::S_IFREG && fmt != libc::S_IFDIR {
        return false;
    }
    let flags = libc::O_RDONLY | libc::O_NONBLOCK | libc::O_NOCTTY;
    let Ok(fd) = at::openat(dirfd, name, flags, 0) else {
        return false;
    };
    match stat_at(fd.as_raw_fd(), c"") {
        Ok(now) if now.same_inode(&st) && now.mode & libc::S_IFMT == fmt => {
            clear_flags_fd(fd.as_raw_fd())
        }
        _ => false,
    }
}

/// `unlinkat`, and on EPERM once more after clearing immutable/append-only flags from the entry
/// and (with `dir_is_ours`, where `dirfd` is a directory inside the tree) from `dirfd` itself.
fn unlink_forced(
    dirfd: RawFd,
    name: &CStr,
    flags: libc::c_int,
    dir_in_tree: bool,
) -> io::Result<()> {
    match at::unlinkat(dirfd, name, flags) {
        Err(e) if e.raw_os_error() == Some(libc::EPERM) => {
            let entry = clear_flags_at(dirfd, name);
            let dir = dir_in_tree && clear_flags_fd(dirfd);
            if entry || dir {
                at::unlinkat(dirfd, name, flags)
            } else {
                Err(e)
            }
        }
        r => r,
    }
}

/// Every entry of the directory `fd` except `.` and `..`, with its `d_type`, read with raw
/// `getdents64` from offset 0 (names are bytes; nothing here is a path).
fn list(fd: RawFd) -> io::Result<Vec<(CString, u8)>> {
    // SAFETY: plain syscall on an fd we hold.
    if unsafe { libc::lseek(fd, 0, libc::SEEK_SET) } < 0 {
        return Err(io::Error::last_os_error());
    }
    let mut out = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        // SAFETY: the buffer is valid for its length.
        let n = unsafe {
            libc::syscall(
                libc::SYS_getdents64,
                fd,
                buf.as_mut_ptr().cast::<libc::c_void>(),
                buf.len(),
            )
        };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        let n = n as usize;
        if n == 0 {
            return Ok(out);
        }
        let mut off = 0;
        // struct linux_dirent64 { u64 d_ino; i64 d_off; u16 d_reclen; u8 d_type; char d_name[]; }
        while off + 19 <= n {
            let reclen = usize::from(u16::from_ne_bytes([buf[off + 16], buf[off + 17]]));
            if reclen < 19 || off + reclen > n {
                return Err(io::Error::from_raw_os_error(libc::EIO));
            }
            let dtype = buf[off + 18];
            let name = &buf[off + 19..off + reclen];
            let len = name.iter().position(|b| *b == 0).unwrap_or(name.len());
            let name = &name[..len];
            if name != b"." && name != b".." && !name.is_empty() {
                // getdents never returns a NUL inside a name.
                if let Ok(c) = CString::new(name) {
                    out.push((c, dtype));
                }
            }
            off += reclen;
        }
    }
}

/// One directory on the way down from the top.
struct Frame {
    /// Its name in its parent.
    name: CString,
    /// Its identity, checked again when we climb back into it.
    id: Id,
    /// Subdirectories still to visit; `None` until the directory is listed.
    pending: Option<Vec<CString>>,
    /// Times the directory was listed.
    lists: u32,
    /// Depth below the top (the top is 0).
    depth: usize,
}

/// The path of the current position, for error messages only (lossy, shortened).
fn describe(frames: &[Frame], last: Option<&CStr>) -> String {
    let mut parts: Vec<&[u8]> = frames.iter().map(|f| f.name.to_bytes()).collect();
    if let Some(l) = last {
        parts.push(l.to_bytes());
    }
    let full = parts.join(&b'/');
    let s = String::from_utf8_lossy(&full);
    if s.len() > 300 {
        let cut = s
            .char_indices()
            .map(|(i, _)| i)
            .find(|i| *i >= 150)
            .unwrap_or(0);
        let tail = s
            .char_indices()
            .map(|(i, _)| i)
            .find(|i| *i >= s.len() - 150)
            .unwrap_or(s.len());
        format!("{}/...({} levels)/{}", &s[..cut], frames.len(), &s[tail..])
    } else {
        s.into_owned()
    }
}

fn raced(frames: &[Frame], what: &str) -> io::Error {
    io::Error::other(format!(
        "{what} at {:?} changed while we worked on it (moved or replaced); stopped",
        describe(frames, None)
    ))
}

fn refuse_mount(frames: &[Frame], name: &CStr) -> io::Error {
    io::Error::other(format!(
        "refusing to descend into a mount point at {:?}",
        describe(frames, Some(name))
    ))
}

/// Climbs from `cur` to its parent with `openat(cur, "..")`, checking that the parent is the
/// directory `frames.last()` recorded.
fn climb(cur: &OwnedFd, frames: &[Frame]) -> io::Result<OwnedFd> {
    let parent = at::open_dir_at(cur.as_raw_fd(), c"..")?;
    let got = stat_at(parent.as_raw_fd(), c"")?;
    match frames.last() {
        Some(f) if f.id.same_inode(&got) => Ok(parent),
        _ => Err(raced(frames, "the parent directory")),
    }
}

/// Removes `name` in `dirfd` (a file, or a directory tree), never following symlinks, with O(1)
/// descriptors and no recursion, never descending into another mount (that is an error and
/// leaves the mount alone). A missing `name` is `NotFound`.
pub fn remove_tree_at(dirfd: RawFd, name: &CStr) -> io::Result<()> {
    let st = stat_at(dirfd, name)?;
    if !st.is_dir() {
        return unlink_forced(dirfd, name, 0, false);
    }
    let parent = stat_at(dirfd, c"")?;
    if st.is_other_mount(&parent) {
        return Err(io::Error::other(format!(
            "refusing to remove {:?}: it is a mount point",
            String::from_utf8_lossy(name.to_bytes())
        )));
    }
    let top_fd = match at::open_dir_at(dirfd, name) {
        Ok(fd) => fd,
        // Replaced by a non-directory since the stat.
        Err(e) if matches!(e.raw_os_error(), Some(libc::ENOTDIR) | Some(libc::ELOOP)) => {
            return at::unlinkat(dirfd, name, 0)
        }
        Err(e) => return Err(e),
    };
    let top = stat_at(top_fd.as_raw_fd(), c"")?;
    if !top.same_inode(&st) {
        return Err(io::Error::other(format!(
            "{:?} was replaced while we opened it; stopped",
            String::from_utf8_lossy(name.to_bytes())
        )));
    }
    let mut frames = vec![Frame {
        name: name.to_owned(),
        id: top,
        pending: None,
        lists: 0,
        depth: 0,
    }];
    let mut cur = top_fd;
    loop {
        let Some(f) = frames.last_mut() else {
            return Ok(());
        };
        if f.pending.is_none() {
            let mut subdirs = Vec::new();
            if f.lists < MAX_RELISTS {
                f.lists += 1;
                for (child, dtype) in list(cur.as_raw_fd())? {
                    if dtype == libc::DT_DIR {
                        subdirs.push(child);
                        continue;
                    }
                    match unlink_forced(cur.as_raw_fd(), &child, 0, true) {
                        Ok(()) => {}
                        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {}
                        // DT_UNKNOWN (some filesystems) or swapped for a directory.
                        Err(e) if e.raw_os_error() == Some(libc::EISDIR) => subdirs.push(child),
                        Err(e) => return Err(e),
                    }
                }
            }
            // A listing that found nothing more means the directory is done.
            let empty = subdirs.is_empty();
            f.pending = Some(subdirs);
            if empty {
                f.lists = MAX_RELISTS;
            }
        }
        let next = f.pending.as_mut().and_then(Vec::pop);
        if let Some(child) = next {
            let depth = f.depth + 1;
            let fd = match at::open_dir_at(cur.as_raw_fd(), &child) {
                Ok(fd) => fd,
                Err(e) if e.raw_os_error() == Some(libc::ENOENT) => continue,
                // A symlink or file now stands there: remove the entry, follow nothing.
                Err(e) if matches!(e.raw_os_error(), Some(libc::ENOTDIR) | Some(libc::ELOOP)) => {
                    match unlink_forced(cur.as_raw_fd(), &child, 0, true) {
                        Ok(()) => continue,
                        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => continue,
                        Err(e) => return Err(e),
                    }
                }
                Err(e) => return Err(e),
            };
            let id = stat_at(fd.as_raw_fd(), c"")?;
            if id.is_other_mount(&frames[0].id) {
                return Err(refuse_mount(&frames, &child));
            }
            frames.push(Frame {
                name: child,
                id,
                pending: None,
                lists: 0,
                depth,
            });
            // The parent's fd is closed here: only the current directory stays open.
            cur = fd;
            continue;
        }
        if f.lists < MAX_RELISTS {
            // Emptied: list once more in case something appeared meanwhile.
            f.pending = None;
            continue;
        }
        let Some(done) = frames.pop() else {
            return Ok(());
        };
        if frames.is_empty() {
            drop(cur);
            let again = stat_at(dirfd, name)?;
            if !again.same_inode(&done.id) {
                return Err(raced(&[done], "the directory"));
            }
            return unlink_forced(dirfd, name, libc::AT_REMOVEDIR, false);
        }
        cur = climb(&cur, &frames)?;
        let again = stat_at(cur.as_raw_fd(), &done.name)?;
        if !again.same_inode(&done.id) {
            frames.push(done);
            return Err(raced(&frames, "the directory"));
        }
        unlink_forced(cur.as_raw_fd(), &done.name, libc::AT_REMOVEDIR, true)?;
    }
}

/// Opens the parent of `path` (an administrator's path: symlinks in it are followed) and
/// returns it with the last component, which must be a plain name.
fn split_parent(path: &Path) -> io::Result<(OwnedFd, CString)> {
    let name = match path.file_name() {
        Some(n) if n != OsStr::new("..") => n,
        _ => {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{path:?} does not end in a file name"),
            ))
        }
    };
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let cparent = CString::new(parent.as_os_str().as_bytes())
        .map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    let flags = libc::O_RDONLY | libc::O_DIRECTORY | libc::O_CLOEXEC;
    // SAFETY: valid C string; the fd returned is owned below.
    let fd = check(unsafe { libc::open(cparent.as_ptr(), flags) })?;
    // SAFETY: open returned a fresh fd.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let cname =
        CString::new(name.as_bytes()).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    Ok((fd, cname))
}

/// Removes the file or tree at `path` if it exists (see [`remove_tree_at`]). The path's
/// parents are the caller's (followed as given); from its last component down nothing is
/// followed.
pub fn remove_tree(path: &Path) -> io::Result<()> {
    let (parent, name) = match split_parent(path) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        r => r?,
    };
    match remove_tree_at(parent.as_raw_fd(), &name) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        r => r,
    }
}

/// One entry met by [`walk`].
#[derive(Debug)]
pub struct WalkEntry<'a> {
    /// The entry's name (bytes, may hold anything but `/` and NUL).
    pub name: &'a CStr,
    /// Levels below the walk's top (a direct child of the top is 1).
    pub depth: usize,
    /// `lstat` of the entry (never of a symlink's target).
    pub stat: &'a libc::stat,
    /// The directory holding the entry, valid during the callback (for `*at` calls).
    pub dirfd: RawFd,
}

impl WalkEntry<'_> {
    /// Whether the entry is a directory.
    pub fn is_dir(&self) -> bool {
        self.stat.st_mode & libc::S_IFMT == libc::S_IFDIR
    }
}

/// What [`walk`]'s callback wants next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Walk {
    /// Go on (into the entry, if it is a directory).
    Continue,
    /// Do not descend into this directory.
    Skip,
    /// End the walk.
    Stop,
}

/// Visits every entry below the directory `path` (not `path` itself), parents before children,
/// never following symlinks, never leaving `path`'s mount (mount points are visited but not
/// entered), with O(1) descriptors and no recursion. Entries that vanish meanwhile are skipped;
/// a directory moved away under the walk ends it with an error.
pub fn walk(path: &Path, mut visit: impl FnMut(&WalkEntry<'_>) -> Walk) -> io::Result<()> {
    let cpath = CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    // The top is the caller's: following a symlink to it is theirs to decide; nothing below it is.
    let flags = libc::O_RDONLY | libc::O_DIRECTORY | libc::O_CLOEXEC;
    // SAFETY: valid C string; the fd returned is owned below.
    let fd = check(unsafe { libc::open(cpath.as_ptr(), flags) })?;
    // SAFETY: open returned a fresh fd.
    let mut cur = unsafe { OwnedFd::from_raw_fd(fd) };
    let top = stat_at(cur.as_raw_fd(), c"")?;
    let mut frames = vec![Frame {
        name: cpath,
        id: top,
        pending: None,
        lists: 0,
        depth: 0,
    }];
    loop {
        let Some(f) = frames.last_mut() else {
            return Ok(());
        };
        if f.pending.is_none() {
            let mut subdirs = Vec::new();
            for (child, _) in list(cur.as_raw_fd())? {
                let st = match at::fstatat(cur.as_raw_fd(), &child) {
                    Ok(st) => st,
                    Err(e) if e.raw_os_error() == Some(libc::ENOENT) => continue,
                    Err(e) => return Err(e),
                };
                let e = WalkEntry {
                    name: &child,
                    depth: f.depth + 1,
                    stat: &st,
                    dirfd: cur.as_raw_fd(),
                };
                let is_dir = e.is_dir();
                match visit(&e) {
                    Walk::Stop => return Ok(()),
                    Walk::Skip => {}
                    Walk::Continue if is_dir => subdirs.push(child),
                    Walk::Continue => {}
                }
            }
            // Visit in listing order.
            subdirs.reverse();
            f.pending = Some(subdirs);
        }
        let next = f.pending.as_mut().and_then(Vec::pop);
        if let Some(child) = next {
            let depth = f.depth + 1;
            let fd = match at::open_dir_at(cur.as_raw_fd(), &child) {
                Ok(fd) => fd,
                Err(e)
                    if matches!(
                        e.raw_os_error(),
                        Some(libc::ENOENT) | Some(libc::ENOTDIR) | Some(libc::ELOOP)
                    ) =>
                {
                    continue
                }
                Err(e) => return Err(e),
            };
            let id = stat_at(fd.as_raw_fd(), c"")?;
            if id.is_other_mount(&frames[0].id) {
                continue;
            }
            frames.push(Frame {
                name: child,
                id,
                pending: None,
                lists: 0,
                depth,
            });
            cur = fd;
            continue;
        }
        frames.pop();
        if frames.is_empty() {
            return Ok(());
        }
        cur = climb(&cur, &frames)?;
    }
}

/// Allocated bytes and entry count of a tree.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    /// Allocated size (`st_blocks * 512`) of every entry below the top.
    pub bytes: u64,
    /// Entries below the top.
    pub entries: u64,
}

/// Sums the allocated size and entry count below `path` with [`walk`] (no symlink followed, no
/// other mount entered). A missing or unreadable top counts as empty.
pub fn tree_usage(path: &Path) -> Usage {
    let mut u = Usage::default();
    let _ = walk(path, |e| {
        u.bytes += (e.stat.st_blocks as u64) * 512;
        u.entries += 1;
        Walk::Continue
    });
    u
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::ffi::OsStringExt;

    fn c(s: &[u8]) -> CString {
        CString::new(s).unwrap()
    }

    /// Builds a chain `depth` deep under `dir` with `*at` calls (the path is far beyond PATH_MAX).
    fn deep_chain(dir: &Path, depth: usize) {
        let mut cur = at::open_dir_at(libc::AT_FDCWD, &c(dir.as_os_str().as_bytes())).unwrap();
        for _ in 0..depth {
            // SAFETY: valid C string.
            assert_eq!(
                unsafe { libc::mkdirat(cur.as_raw_fd(), c"dd".as_ptr(), 0o755) },
                0
            );
            cur = at::open_dir_at(cur.as_raw_fd(), c"dd").unwrap();
        }
        std::fs::write(format!("/proc/self/fd/{}/leaf", cur.as_raw_fd()), b"x").unwrap();
    }

    #[test]
    fn removes_deep_chains_and_odd_names_without_following_links() {
        let t = tempfile::tempdir().unwrap();
        let outside = t.path().join("outside");
        std::fs::create_dir(&outside).unwrap();
        std::fs::write(outside.join("canary"), b"keep").unwrap();
        let top = t.path().join("top");
        std::fs::create_dir(&top).unwrap();
        deep_chain(&top, 3000);
        let odd = std::ffi::OsString::from_vec(b"new\nline\xff\xfe".to_vec());
        std::fs::create_dir(top.join(&odd)).unwrap();
        std::fs::write(top.join(&odd).join("f"), b"x").unwrap();
        std::os::unix::fs::symlink(&outside, top.join("link")).unwrap();
        std::os::unix::fs::symlink("../../../../..", top.join(&odd).join("up")).unwrap();
        let u = tree_usage(&top);
        assert_eq!(u.entries, 3000 + 1 + 1 + 1 + 2);
        remove_tree(&top).unwrap();
        assert!(!top.exists());
        assert_eq!(std::fs::read(outside.join("canary")).unwrap(), b"keep");
        remove_tree(&top).unwrap(); // gone already: fine
    }

    #[test]
    fn a_symlink_top_is_removed_not_followed() {
        let t = tempfile::tempdir().unwrap();
        let target = t.path().join("target");
        std::fs::create_dir(&target).unwrap();
        std::fs::write(target.join("f"), b"x").unwrap();
        std::os::unix::fs::symlink(&target, t.path().join("l")).unwrap();
        remove_tree(&t.path().join("l")).unwrap();
        assert!(target.join("f").exists());
        let err = remove_tree_at(libc::AT_FDCWD, c"/nonexistent-x/y").unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::NotFound);
    }

    #[test]
    fn immutable_and_append_only_entries_are_removed() {
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("*** immutable_and_append_only_entries_are_removed: SKIPPED: needs root ***");
            return;
        }
        let t = tempfile::tempdir().unwrap();
        let top = t.path().join("top");
        std::fs::create_dir_all(top.join("ad")).unwrap();
        std::fs::write(top.join("imm"), b"x").unwrap();
        std::fs::write(top.join("ad/f"), b"x").unwrap();
        let set = |p: &Path, fl: libc::c_int| {
            let f = std::fs::File::open(p).unwrap();
            let mut flags: libc::c_int = 0;
            // SAFETY: int-sized flags, valid pointer.
            unsafe {
                assert_eq!(
                    libc::ioctl(f.as_raw_fd(), libc::FS_IOC_GETFLAGS, &mut flags),
                    0
                );
                flags |= fl;
                libc::ioctl(f.as_raw_fd(), libc::FS_IOC_SETFLAGS, &flags) == 0
            }
        };
        if !set(&top.join("imm"), FS_IMMUTABLE_FL) {
            eprintln!("*** immutable flags unsupported here: SKIPPED ***");
            return;
        }
        assert!(set(&top.join("ad"), FS_APPEND_FL));
        assert!(set(&top.join("ad/f"), FS_IMMUTABLE_FL));
        assert!(
            std::fs::remove_file(top.join("imm")).is_err(),
            "really immutable"
        );
        remove_tree(&top).unwrap();
        assert!(!top.exists());
    }

    #[test]
    fn walk_skips_and_stops() {
        let t = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(t.path().join("a/b/c")).unwrap();
        std::fs::create_dir_all(t.path().join("x/y")).unwrap();
        let mut seen = Vec::new();
        walk(t.path(), |e| {
            seen.push((e.depth, e.name.to_bytes().to_vec()));
            if e.name.to_bytes() == b"x" {
                Walk::Skip
            } else {
                Walk::Continue
            }
        })
        .unwrap();
        seen.sort();
        assert_eq!(
            seen,
            vec![
                (1, b"a".to_vec()),
                (1, b"x".to_vec()),
                (2, b"b".to_vec()),
                (3, b"c".to_vec())
            ]
        );
        let mut n = 0;
        walk(t.path(), |_| {
            n += 1;
            Walk::Stop
        })
        .unwrap();
        assert_eq!(n, 1);
    }
}
