//! Thin, safe wrappers over the `*at` system calls (and their fd and xattr companions) that the
//! plugin's layer flattening and the FUSE union filesystem are both built on.
//!
//! Every call takes a directory fd plus ONE path component, and none follows a final symlink
//! (`O_NOFOLLOW`, `AT_SYMLINK_NOFOLLOW`, `linkat` without `AT_SYMLINK_FOLLOW`), so nothing a
//! container wrote into a layer or an upper can send us outside it. Errors are `io::Error`s
//! carrying the errno.

use std::ffi::{CStr, CString};
use std::io;
use std::os::fd::{FromRawFd, OwnedFd, RawFd};

/// Converts a libc return value (-1 = error) into an `io::Result`.
pub fn check(ret: libc::c_int) -> io::Result<libc::c_int> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

/// Converts a libc size return value (-1 = error) into an `io::Result`.
pub fn check_size(ret: libc::ssize_t) -> io::Result<usize> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret as usize)
    }
}

/// An `io::Error` from a raw errno value.
pub fn errno(code: i32) -> io::Error {
    io::Error::from_raw_os_error(code)
}

/// A name (from a directory listing or a request) as a C string; a NUL byte inside is EINVAL.
pub fn cname(name: &[u8]) -> io::Result<CString> {
    CString::new(name).map_err(|_| errno(libc::EINVAL))
}

/// An all-zero `stat`, the starting value for the out-parameter.
pub fn empty_stat() -> libc::stat {
    // SAFETY: libc::stat is plain old data; all-zero is a valid value.
    unsafe { std::mem::zeroed() }
}

/// `fstatat(dirfd, name, AT_SYMLINK_NOFOLLOW)`.
pub fn fstatat(dirfd: RawFd, name: &CStr) -> io::Result<libc::stat> {
    let mut st = empty_stat();
    // SAFETY: valid C string and out pointer.
    check(unsafe { libc::fstatat(dirfd, name.as_ptr(), &mut st, libc::AT_SYMLINK_NOFOLLOW) })?;
    Ok(st)
}

/// `fstat(fd)`, done as `fstatat(fd, "", AT_EMPTY_PATH)` so it works on O_PATH fds too.
pub fn fstat(fd: RawFd) -> io::Result<libc::stat> {
    let mut st = empty_stat();
    // SAFETY: out pointer is valid.
    check(unsafe { libc::fstatat(fd, c"".as_ptr(), &mut st, libc::AT_EMPTY_PATH) })?;
    Ok(st)
}

/// `openat(dirfd, name, flags | O_NOFOLLOW | O_CLOEXEC, mode)`.
pub fn openat(dirfd: RawFd, name: &CStr, flags: i32, mode: u32) -> io::Result<OwnedFd> {
    // SAFETY: valid C string.
    let fd = check(unsafe {
        libc::openat(
            dirfd,
            name.as_ptr(),
            flags | libc::O_NOFOLLOW | libc::O_CLOEXEC,
            mode as libc::c_uint,
        )
    })?;
    // SAFETY: fd was just returned by openat and is owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Opens directory `name` in `dirfd` readable, refusing anything that is not a real directory
/// (a symlink there gives ELOOP/ENOTDIR, never its target).
pub fn open_dir_at(dirfd: RawFd, name: &CStr) -> io::Result<OwnedFd> {
    openat(dirfd, name, libc::O_RDONLY | libc::O_DIRECTORY, 0)
}

/// Lists the entries of the open directory `fd` as (name, d_type), skipping `.` and `..`. Reads
/// through a fresh open of the directory so `fd`'s own offset and lifetime are untouched.
pub fn list_dir_fd(fd: RawFd) -> io::Result<Vec<(Vec<u8>, u8)>> {
    crate::dir::list_dir(open_dir_at(fd, c".")?)
}

/// `mkdirat`.
pub fn mkdirat(dirfd: RawFd, name: &CStr, mode: u32) -> io::Result<()> {
    // SAFETY: valid C string.
    check(unsafe { libc::mkdirat(dirfd, name.as_ptr(), mode as libc::mode_t) }).map(drop)
}

/// `mknodat`.
pub fn mknodat(dirfd: RawFd, name: &CStr, mode: u32, rdev: u64) -> io::Result<()> {
    // SAFETY: valid C string.
    check(unsafe { libc::mknodat(dirfd, name.as_ptr(), mode as libc::mode_t, rdev) }).map(drop)
}

/// `symlinkat(target, dirfd, name)`.
pub fn symlinkat(target: &CStr, dirfd: RawFd, name: &CStr) -> io::Result<()> {
    // SAFETY: valid C strings.
    check(unsafe { libc::symlinkat(target.as_ptr(), dirfd, name.as_ptr()) }).map(drop)
}

/// `readlinkat`.
pub fn readlinkat(dirfd: RawFd, name: &CStr) -> io::Result<Vec<u8>> {
    let mut buf = vec![0u8; libc::PATH_MAX as usize + 1];
    // SAFETY: buffer is valid for buf.len() bytes.
    let n = check_size(unsafe {
        libc::readlinkat(dirfd, name.as_ptr(), buf.as_mut_ptr().cast(), buf.len())
    })?;
    buf.truncate(n);
    Ok(buf)
}

/// `unlinkat`.
pub fn unlinkat(dirfd: RawFd, name: &CStr, flags: i32) -> io::Result<()> {
    // SAFETY: valid C string.
    check(unsafe { libc::unlinkat(dirfd, name.as_ptr(), flags) }).map(drop)
}

/// `renameat2`.
pub fn renameat2(
    olddir: RawFd,
    oldname: &CStr,
    newdir: RawFd,
    newname: &CStr,
    flags: u32,
) -> io::Result<()> {
    // SAFETY: valid C strings.
    check(unsafe { libc::renameat2(olddir, oldname.as_ptr(), newdir, newname.as_ptr(), flags) })
        .map(drop)
}

/// `linkat` without `AT_SYMLINK_FOLLOW`: a symlink is linked as itself, never its target.
pub fn linkat(olddir: RawFd, oldname: &CStr, newdir: RawFd, newname: &CStr) -> io::Result<()> {
    // SAFETY: valid C strings.
    check(unsafe { libc::linkat(olddir, oldname.as_ptr(), newdir, newname.as_ptr(), 0) }).map(drop)
}

/// `fchownat(.., AT_SYMLINK_NOFOLLOW)`; an empty name means the fd itself.
pub fn fchownat(dirfd: RawFd, name: &CStr, uid: u32, gid: u32) -> io::Result<()> {
    let flags = if name.is_empty() {
        libc::AT_EMPTY_PATH
    } else {
        libc::AT_SYMLINK_NOFOLLOW
    };
    // SAFETY: valid C string.
    check(unsafe { libc::fchownat(dirfd, name.as_ptr(), uid, gid, flags) }).map(drop)
}

/// `fchmodat` (follows a final symlink; callers never pass one).
pub fn fchmodat(dirfd: RawFd, name: &CStr, mode: u32) -> io::Result<()> {
    // SAFETY: valid C string.
    check(unsafe { libc::fchmodat(dirfd, name.as_ptr(), mode as libc::mode_t, 0) }).map(drop)
}

/// `utimensat` with `flags` (`AT_SYMLINK_NOFOLLOW` to set a symlink's own times).
pub fn utimensat(
    dirfd: RawFd,
    name: &CStr,
    ts: &[libc::timespec; 2],
    flags: i32,
) -> io::Result<()> {
    // SAFETY: valid C string and a two-element array.
    check(unsafe { libc::utimensat(dirfd, name.as_ptr(), ts.as_ptr(), flags) }).map(drop)
}

/// The (atime, mtime) pair of a stat result, as `utimensat`/`futimens` take it.
pub fn times(st: &libc::stat) -> [libc::timespec; 2] {
    [
        libc::timespec {
            tv_sec: st.st_atime,
            tv_nsec: st.st_atime_nsec,
        },
        libc::timespec {
            tv_sec: st.st_mtime,
            tv_nsec: st.st_mtime_nsec,
        },
    ]
}

/// `fchown` on an open fd.
pub fn fchown(fd: RawFd, uid: u32, gid: u32) -> io::Result<()> {
    // SAFETY: plain syscall.
    check(unsafe { libc::fchown(fd, uid, gid) }).map(drop)
}

/// `fchmod` on an open fd.
pub fn fchmod(fd: RawFd, mode: u32) -> io::Result<()> {
    // SAFETY: plain syscall.
    check(unsafe { libc::fchmod(fd, mode as libc::mode_t) }).map(drop)
}

/// `futimens` on an open fd.
pub fn futimens(fd: RawFd, ts: &[libc::timespec; 2]) -> io::Result<()> {
    // SAFETY: two-element array.
    check(unsafe { libc::futimens(fd, ts.as_ptr()) }).map(drop)
}

/// A path through `/proc/self/fd` naming `name` inside directory `fd` (or the fd itself when
/// `name` is None). The xattr calls need paths for what cannot be opened (symlinks, devices)
/// and because O_PATH fds refuse `f*xattr`; used with the `l*` calls, the final component is
/// not followed.
pub fn proc_path(fd: RawFd, name: Option<&CStr>) -> CString {
    let mut p = format!("/proc/self/fd/{fd}").into_bytes();
    if let Some(n) = name {
        p.push(b'/');
        p.extend_from_slice(n.to_bytes());
    }
    // A C string's bytes never hold a NUL, and the prefix has none either.
    CString::new(p).unwrap_or_default()
}

/// Largest buffer an xattr value read grows to (the kernel's XATTR_SIZE_MAX is 64 KiB).
const XATTR_VALUE_MAX: usize = 1 << 20;
/// Largest buffer an xattr name list grows to.
const XATTR_LIST_MAX: usize = 1 << 22;

/// Runs a sized read `call` (an xattr get or list) with a buffer of `start` bytes, growing it
/// fourfold on ERANGE while below `max`.
fn read_growing(
    start: usize,
    max: usize,
    mut call: impl FnMut(&mut [u8]) -> libc::ssize_t,
) -> io::Result<Vec<u8>> {
    let mut buf = vec![0u8; start];
    loop {
        match check_size(call(&mut buf)) {
            Ok(n) => {
                buf.truncate(n);
                return Ok(buf);
            }
            Err(e) if e.raw_os_error() == Some(libc::ERANGE) && buf.len() < max => {
                let len = buf.len() * 4;
                buf.resize(len, 0);
            }
            Err(e) => return Err(e),
        }
    }
}

/// Gets an xattr value. `follow` false uses the `l*` variant (the final component is not followed).
pub fn getxattr(path: &CStr, name: &CStr, follow: bool) -> io::Result<Vec<u8>> {
    read_growing(256, XATTR_VALUE_MAX, |buf| {
        // SAFETY: buffer valid for its length; C strings alive for the call.
        unsafe {
            if follow {
                libc::getxattr(
                    path.as_ptr(),
                    name.as_ptr(),
                    buf.as_mut_ptr().cast(),
                    buf.len(),
                )
            } else {
                libc::lgetxattr(
                    path.as_ptr(),
                    name.as_ptr(),
                    buf.as_mut_ptr().cast(),
                    buf.len(),
                )
            }
        }
    })
}

/// `fgetxattr`: an xattr value of an open (not O_PATH) fd.
pub fn fgetxattr(fd: RawFd, name: &CStr) -> io::Result<Vec<u8>> {
    read_growing(256, XATTR_VALUE_MAX, |buf| {
        // SAFETY: buffer valid for its length; C string alive for the call.
        unsafe { libc::fgetxattr(fd, name.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) }
    })
}

/// Lists xattr names (NUL-separated raw list).
pub fn listxattr(path: &CStr, follow: bool) -> io::Result<Vec<u8>> {
    read_growing(1024, XATTR_LIST_MAX, |buf| {
        // SAFETY: buffer valid for its length; C string alive for the call.
        unsafe {
            if follow {
                libc::listxattr(path.as_ptr(), buf.as_mut_ptr().cast(), buf.len())
            } else {
                libc::llistxattr(path.as_ptr(), buf.as_mut_ptr().cast(), buf.len())
            }
        }
    })
}

/// `flistxattr`: the NUL-separated xattr names of an open (not O_PATH) fd.
pub fn flistxattr(fd: RawFd) -> io::Result<Vec<u8>> {
    read_growing(1024, XATTR_LIST_MAX, |buf| {
        // SAFETY: buffer valid for its length.
        unsafe { libc::flistxattr(fd, buf.as_mut_ptr().cast(), buf.len()) }
    })
}

/// Sets an xattr.
pub fn setxattr(
    path: &CStr,
    name: &CStr,
    value: &[u8],
    flags: i32,
    follow: bool,
) -> io::Result<()> {
    let (p, n, v, len) = (
        path.as_ptr(),
        name.as_ptr(),
        value.as_ptr().cast(),
        value.len(),
    );
    // SAFETY: valid pointers and lengths.
    check(unsafe {
        if follow {
            libc::setxattr(p, n, v, len, flags)
        } else {
            libc::lsetxattr(p, n, v, len, flags)
        }
    })
    .map(drop)
}

/// `fsetxattr`: sets an xattr of an open (not O_PATH) fd.
pub fn fsetxattr(fd: RawFd, name: &CStr, value: &[u8], flags: i32) -> io::Result<()> {
    // SAFETY: valid pointers and lengths.
    check(unsafe { libc::fsetxattr(fd, name.as_ptr(), value.as_ptr().cast(), value.len(), flags) })
        .map(drop)
}

/// Removes an xattr.
pub fn removexattr(path: &CStr, name: &CStr, follow: bool) -> io::Result<()> {
    // SAFETY: valid C strings.
    check(unsafe {
        if follow {
            libc::removexattr(path.as_ptr(), name.as_ptr())
        } else {
            libc::lremovexattr(path.as_ptr(), name.as_ptr())
        }
    })
    .map(drop)
}

/// Where the xattr copies of layer flattening read and write: an open fd (`f*` calls), or an
/// entry of a dir fd that cannot be opened (symlinks, devices: `l*` calls through
/// [`proc_path`], the final component not followed). Unset xattrs and filesystems without
/// xattr support read as absent, not as errors.
pub enum XattrTarget<'a> {
    /// An open file or directory.
    Fd(RawFd),
    /// An entry of an open directory.
    At(RawFd, &'a CStr),
}

impl XattrTarget<'_> {
    /// The NUL-separated list of xattr names (empty where xattrs are not supported).
    pub fn list(&self) -> io::Result<Vec<u8>> {
        let r = match self {
            XattrTarget::Fd(fd) => flistxattr(*fd),
            XattrTarget::At(d, n) => listxattr(&proc_path(*d, Some(n)), false),
        };
        match r {
            Err(e) if e.raw_os_error() == Some(libc::ENOTSUP) => Ok(Vec::new()),
            r => r,
        }
    }

    /// One xattr's value; `None` when it is not set (or xattrs are not supported).
    pub fn get(&self, name: &CStr) -> io::Result<Option<Vec<u8>>> {
        let r = match self {
            XattrTarget::Fd(fd) => fgetxattr(*fd, name),
            XattrTarget::At(d, n) => getxattr(&proc_path(*d, Some(n)), name, false),
        };
        match r {
            Ok(v) => Ok(Some(v)),
            Err(e) if matches!(e.raw_os_error(), Some(libc::ENODATA) | Some(libc::ENOTSUP)) => {
                Ok(None)
            }
            Err(e) => Err(e),
        }
    }

    /// Sets one xattr.
    pub fn set(&self, name: &CStr, value: &[u8]) -> io::Result<()> {
        match self {
            XattrTarget::Fd(fd) => fsetxattr(*fd, name, value, 0),
            XattrTarget::At(d, n) => setxattr(&proc_path(*d, Some(n)), name, value, 0, false),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsRawFd;
    use std::os::unix::ffi::OsStrExt;

    fn dir_fd(p: &std::path::Path) -> OwnedFd {
        let c = cname(p.as_os_str().as_bytes()).unwrap();
        open_dir_at(libc::AT_FDCWD, &c).unwrap()
    }

    #[test]
    fn entries_are_made_and_read_without_following_symlinks() {
        let tmp = tempfile::tempdir().unwrap();
        let d = dir_fd(tmp.path());
        let fd = d.as_raw_fd();
        mkdirat(fd, c"sub", 0o755).unwrap();
        symlinkat(c"sub", fd, c"link").unwrap();
        assert_eq!(readlinkat(fd, c"link").unwrap(), b"sub");
        // A symlink to a directory is neither opened as one nor stat'ed as one.
        assert!(open_dir_at(fd, c"link").is_err());
        let st = fstatat(fd, c"link").unwrap();
        assert_eq!(st.st_mode & libc::S_IFMT, libc::S_IFLNK);
        let f = openat(
            fd,
            c"f",
            libc::O_WRONLY | libc::O_CREAT | libc::O_EXCL,
            0o600,
        )
        .unwrap();
        fchmod(f.as_raw_fd(), 0o640).unwrap();
        assert_eq!(fstat(f.as_raw_fd()).unwrap().st_mode & 0o7777, 0o640);
        linkat(fd, c"f", fd, c"g").unwrap();
        assert_eq!(fstatat(fd, c"g").unwrap().st_nlink, 2);
        let mut names: Vec<_> = list_dir_fd(fd).unwrap().into_iter().map(|e| e.0).collect();
        names.sort();
        assert_eq!(names, [&b"f"[..], b"g", b"link", b"sub"]);
        unlinkat(fd, c"sub", libc::AT_REMOVEDIR).unwrap();
        assert!(fstatat(fd, c"sub").is_err());
        assert_eq!(
            cname(b"a\0b").unwrap_err().raw_os_error(),
            Some(libc::EINVAL)
        );
    }

    #[test]
    fn times_round_trip_through_futimens_and_utimensat() {
        let tmp = tempfile::tempdir().unwrap();
        let d = dir_fd(tmp.path());
        let fd = d.as_raw_fd();
        let f = openat(fd, c"f", libc::O_WRONLY | libc::O_CREAT, 0o600).unwrap();
        let mut st = empty_stat();
        st.st_atime = 1_000_000;
        st.st_mtime = 2_000_000;
        st.st_mtime_nsec = 5;
        futimens(f.as_raw_fd(), &times(&st)).unwrap();
        let got = fstat(f.as_raw_fd()).unwrap();
        assert_eq!(
            (got.st_atime, got.st_mtime, got.st_mtime_nsec),
            (1_000_000, 2_000_000, 5)
        );
        symlinkat(c"f", fd, c"l").unwrap();
        utimensat(fd, c"l", &times(&st), libc::AT_SYMLINK_NOFOLLOW).unwrap();
        assert_eq!(fstatat(fd, c"l").unwrap().st_mtime, 2_000_000);
    }

    #[test]
    fn xattr_target_reads_unset_as_none_and_copies_values() {
        let tmp = tempfile::tempdir().unwrap();
        let d = dir_fd(tmp.path());
        let fd = d.as_raw_fd();
        let f = openat(fd, c"f", libc::O_RDWR | libc::O_CREAT, 0o600).unwrap();
        let by_fd = XattrTarget::Fd(f.as_raw_fd());
        let by_name = XattrTarget::At(fd, c"f");
        assert_eq!(by_fd.get(c"user.none").unwrap(), None);
        // Some filesystems (tmpfs without user xattrs) refuse user.*; nothing more to check.
        if by_fd.set(c"user.k", b"v").is_err() {
            return;
        }
        assert_eq!(by_name.get(c"user.k").unwrap().as_deref(), Some(&b"v"[..]));
        let big = vec![7u8; 4000];
        by_name.set(c"user.big", &big).unwrap();
        assert_eq!(by_fd.get(c"user.big").unwrap(), Some(big));
        let list = by_fd.list().unwrap();
        assert!(list.split(|b| *b == 0).any(|n| n == b"user.k"));
        assert_eq!(list, listxattr(&proc_path(fd, Some(c"f")), false).unwrap());
        removexattr(&proc_path(f.as_raw_fd(), None), c"user.k", true).unwrap();
        assert_eq!(by_name.get(c"user.k").unwrap(), None);
    }
}
