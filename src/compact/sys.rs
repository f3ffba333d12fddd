//! Thin `*at` syscall wrappers for flattening: everything relative to directory fds, nothing
//! ever follows a symlink (a layer is container-written data).

use std::ffi::{CStr, CString};
use std::io;
use std::os::fd::{FromRawFd, OwnedFd, RawFd};

fn check(r: libc::c_int) -> io::Result<libc::c_int> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

fn check_size(r: libc::ssize_t) -> io::Result<usize> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r as usize)
    }
}

/// A name from a directory listing as a C string (listings never hold NUL bytes).
pub fn cname(name: &[u8]) -> io::Result<CString> {
    CString::new(name).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))
}

/// Opens directory `name` in `dirfd` readable, refusing anything that is not a real directory
/// (a symlink there gives ELOOP/ENOTDIR, never its target).
pub fn open_dir_at(dirfd: RawFd, name: &CStr) -> io::Result<OwnedFd> {
    // SAFETY: valid C string; the fd returned is owned below.
    let fd = check(unsafe {
        libc::openat(
            dirfd,
            name.as_ptr(),
            libc::O_RDONLY | libc::O_DIRECTORY | libc::O_NOFOLLOW | libc::O_CLOEXEC,
        )
    })?;
    // SAFETY: openat returned a fresh fd.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Opens a regular file `name` in `dirfd` for reading, never through a symlink.
pub fn open_file_at(dirfd: RawFd, name: &CStr, flags: i32, mode: u32) -> io::Result<OwnedFd> {
    // SAFETY: valid C string; the fd returned is owned below.
    let fd = check(unsafe {
        libc::openat(
            dirfd,
            name.as_ptr(),
            flags | libc::O_NOFOLLOW | libc::O_CLOEXEC,
            mode as libc::c_uint,
        )
    })?;
    // SAFETY: openat returned a fresh fd.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// `fstatat` without following a final symlink.
pub fn lstat_at(dirfd: RawFd, name: &CStr) -> io::Result<libc::stat> {
    // SAFETY: stat is plain old data; pointers valid.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    check(unsafe { libc::fstatat(dirfd, name.as_ptr(), &mut st, libc::AT_SYMLINK_NOFOLLOW) })?;
    Ok(st)
}

/// `fstat`.
pub fn fstat(fd: RawFd) -> io::Result<libc::stat> {
    // SAFETY: stat is plain old data; pointers valid.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    check(unsafe { libc::fstat(fd, &mut st) })?;
    Ok(st)
}

/// `mkdirat`.
pub fn mkdir_at(dirfd: RawFd, name: &CStr, mode: u32) -> io::Result<()> {
    // SAFETY: valid C string.
    check(unsafe { libc::mkdirat(dirfd, name.as_ptr(), mode as libc::mode_t) }).map(drop)
}

/// `linkat` without `AT_SYMLINK_FOLLOW`: a symlink is linked as itself, never its target.
pub fn link_at(olddir: RawFd, old: &CStr, newdir: RawFd, new: &CStr) -> io::Result<()> {
    // SAFETY: valid C strings.
    check(unsafe { libc::linkat(olddir, old.as_ptr(), newdir, new.as_ptr(), 0) }).map(drop)
}

/// `mknodat`.
pub fn mknod_at(dirfd: RawFd, name: &CStr, mode: u32, rdev: u64) -> io::Result<()> {
    // SAFETY: valid C string.
    check(unsafe { libc::mknodat(dirfd, name.as_ptr(), mode as libc::mode_t, rdev) }).map(drop)
}

/// `symlinkat`.
pub fn symlink_at(target: &CStr, dirfd: RawFd, name: &CStr) -> io::Result<()> {
    // SAFETY: valid C strings.
    check(unsafe { libc::symlinkat(target.as_ptr(), dirfd, name.as_ptr()) }).map(drop)
}

/// `readlinkat`.
pub fn readlink_at(dirfd: RawFd, name: &CStr) -> io::Result<Vec<u8>> {
    let mut buf = vec![0u8; libc::PATH_MAX as usize + 1];
    // SAFETY: buffer valid for its length.
    let n = check_size(unsafe {
        libc::readlinkat(dirfd, name.as_ptr(), buf.as_mut_ptr().cast(), buf.len())
    })?;
    buf.truncate(n);
    Ok(buf)
}

/// `fchownat` with `AT_SYMLINK_NOFOLLOW`.
pub fn lchown_at(dirfd: RawFd, name: &CStr, uid: u32, gid: u32) -> io::Result<()> {
    // SAFETY: valid C string.
    check(unsafe { libc::fchownat(dirfd, name.as_ptr(), uid, gid, libc::AT_SYMLINK_NOFOLLOW) })
        .map(drop)
}

/// `utimensat` with `AT_SYMLINK_NOFOLLOW`.
pub fn lutimens_at(dirfd: RawFd, name: &CStr, st: &libc::stat) -> io::Result<()> {
    let ts = times(st);
    // SAFETY: valid C string and array of two timespecs.
    check(unsafe { libc::utimensat(dirfd, name.as_ptr(), ts.as_ptr(), libc::AT_SYMLINK_NOFOLLOW) })
        .map(drop)
}

/// The (atime, mtime) pair of a stat result.
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

/// `fchown`.
pub fn fchown(fd: RawFd, uid: u32, gid: u32) -> io::Result<()> {
    // SAFETY: plain syscall.
    check(unsafe { libc::fchown(fd, uid, gid) }).map(drop)
}

/// `fchmod`.
pub fn fchmod(fd: RawFd, mode: u32) -> io::Result<()> {
    // SAFETY: plain syscall.
    check(unsafe { libc::fchmod(fd, mode as libc::mode_t) }).map(drop)
}

/// `futimens` with a stat result's atime and mtime.
pub fn futimens(fd: RawFd, st: &libc::stat) -> io::Result<()> {
    let ts = times(st);
    // SAFETY: array of two timespecs.
    check(unsafe { libc::futimens(fd, ts.as_ptr()) }).map(drop)
}

/// Where the xattr calls for an fd or an entry of a dir fd go: the fd itself, or a
/// `/proc/self/fd/N/NAME` path used with the `l*` calls (the final component is not followed,
/// and `N` is the already-opened directory).
pub enum XattrTarget<'a> {
    /// An open file or directory.
    Fd(RawFd),
    /// An entry of an open directory (symlinks, devices: what cannot be opened).
    At(RawFd, &'a CStr),
}

impl XattrTarget<'_> {
    fn path(dirfd: RawFd, name: &CStr) -> CString {
        let mut p = format!("/proc/self/fd/{dirfd}/").into_bytes();
        p.extend_from_slice(name.to_bytes());
        // Neither part holds a NUL byte.
        CString::new(p).unwrap_or_default()
    }

    /// The NUL-separated list of xattr names.
    pub fn list(&self) -> io::Result<Vec<u8>> {
        let mut buf = vec![0u8; 1024];
        loop {
            // SAFETY: buffer valid for its length; path C string alive for the call.
            let r = match self {
                XattrTarget::Fd(fd) => unsafe {
                    libc::flistxattr(*fd, buf.as_mut_ptr().cast(), buf.len())
                },
                XattrTarget::At(d, n) => {
                    let p = Self::path(*d, n);
                    unsafe { libc::llistxattr(p.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) }
                }
            };
            match check_size(r) {
                Ok(n) => {
                    buf.truncate(n);
                    return Ok(buf);
                }
                Err(e) if e.raw_os_error() == Some(libc::ERANGE) && buf.len() < 1 << 22 => {
                    let len = buf.len() * 4;
                    buf.resize(len, 0);
                }
                Err(e) if e.raw_os_error() == Some(libc::ENOTSUP) => return Ok(Vec::new()),
                Err(e) => return Err(e),
            }
        }
    }

    /// One xattr's value; `None` when it is not set.
    pub fn get(&self, name: &CStr) -> io::Result<Option<Vec<u8>>> {
        let mut buf = vec![0u8; 256];
        loop {
            // SAFETY: buffer valid for its length; C strings alive for the call.
            let r = match self {
                XattrTarget::Fd(fd) => unsafe {
                    libc::fgetxattr(*fd, name.as_ptr(), buf.as_mut_ptr().cast(), buf.len())
                },
                XattrTarget::At(d, n) => {
                    let p = Self::path(*d, n);
                    unsafe {
                        libc::lgetxattr(
                            p.as_ptr(),
                            name.as_ptr(),
                            buf.as_mut_ptr().cast(),
                            buf.len(),
                        )
                    }
                }
            };
            match check_size(r) {
                Ok(n) => {
                    buf.truncate(n);
                    return Ok(Some(buf));
                }
                Err(e) if e.raw_os_error() == Some(libc::ERANGE) && buf.len() < 1 << 20 => {
                    let len = buf.len() * 4;
                    buf.resize(len, 0);
                }
                Err(e) if matches!(e.raw_os_error(), Some(libc::ENODATA) | Some(libc::ENOTSUP)) => {
                    return Ok(None)
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Sets one xattr.
    pub fn set(&self, name: &CStr, value: &[u8]) -> io::Result<()> {
        // SAFETY: valid pointers and lengths; C strings alive for the call.
        let r = match self {
            XattrTarget::Fd(fd) => unsafe {
                libc::fsetxattr(*fd, name.as_ptr(), value.as_ptr().cast(), value.len(), 0)
            },
            XattrTarget::At(d, n) => {
                let p = Self::path(*d, n);
                unsafe {
                    libc::lsetxattr(
                        p.as_ptr(),
                        name.as_ptr(),
                        value.as_ptr().cast(),
                        value.len(),
                        0,
                    )
                }
            }
        };
        check(r).map(drop)
    }
}

/// Lists a directory's entries as (name, d_type), skipping `.` and `..`. Reads through a fresh
/// open of the directory so `fd`'s own offset and lifetime are untouched.
pub fn list_dir(fd: RawFd) -> io::Result<Vec<(Vec<u8>, u8)>> {
    cachedriver_common::dir::list_dir(open_dir_at(fd, c".")?)
}

/// `syncfs` on the filesystem holding `fd`.
pub fn syncfs(fd: RawFd) -> io::Result<()> {
    // SAFETY: plain syscall.
    check(unsafe { libc::syncfs(fd) }).map(drop)
}
