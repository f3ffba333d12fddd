//! Copy-up: building a copy of a lower object in the work dir (data, owner, mode, xattrs, times)
//! so that it can be renamed into the upper atomically.

use std::ffi::CStr;
use std::io;
use std::os::fd::{AsRawFd, RawFd};

use crate::sys;
use crate::whiteout;

/// Copies user-visible xattrs from `src` to `dst` (paths through /proc/self/fd). Overlay-private
/// ones are skipped; ones the destination refuses (e.g. `security.*` in a user namespace) too.
fn copy_xattrs(src: &CStr, dst: &CStr, follow: bool) {
    let list = match sys::listxattr(src, follow) {
        Ok(l) => l,
        Err(_) => return,
    };
    for name in cachedriver_common::xattr::xattr_names(&list) {
        if whiteout::is_private_xattr(name) {
            continue;
        }
        let Ok(cname) = std::ffi::CString::new(name) else {
            continue;
        };
        match sys::getxattr(src, &cname, follow) {
            Ok(v) => {
                if let Err(e) = sys::setxattr(dst, &cname, &v, 0, follow) {
                    tracing::debug!("copy-up: xattr {:?} not copied: {e}", cname);
                }
            }
            Err(e) => tracing::debug!("copy-up: xattr {:?} unreadable: {e}", cname),
        }
    }
}

/// Copies file data, keeping holes: each data extent (SEEK_DATA/SEEK_HOLE) is copied with
/// copy_file_range (falling back to read/write), then the size is set with ftruncate.
fn copy_data(src: RawFd, dst: RawFd, size: u64) -> io::Result<()> {
    let mut pos: i64 = 0;
    let mut use_cfr = true;
    let mut buf = Vec::new();
    while (pos as u64) < size {
        let start = match sys::lseek(src, pos, libc::SEEK_DATA) {
            Ok(s) => s,
            Err(e) if e.raw_os_error() == Some(libc::ENXIO) => break,
            // No SEEK_DATA support: treat the whole file as data.
            Err(_) => pos,
        };
        let end = match sys::lseek(src, start, libc::SEEK_HOLE) {
            Ok(e) => e,
            Err(_) => size as i64,
        }
        .min(size as i64);
        copy_range(src, dst, start, end, &mut use_cfr, &mut buf)?;
        pos = end;
    }
    sys::ftruncate(dst, size)
}

/// Copies bytes [start, end) from src to dst at the same offsets.
fn copy_range(
    src: RawFd,
    dst: RawFd,
    start: i64,
    end: i64,
    use_cfr: &mut bool,
    buf: &mut Vec<u8>,
) -> io::Result<()> {
    let (mut off_in, mut off_out) = (start, start);
    while off_in < end {
        let left = ((end - off_in) as u64).min(1 << 30) as usize;
        if *use_cfr {
            match sys::copy_file_range(src, &mut off_in, dst, &mut off_out, left) {
                Ok(0) => break,
                Ok(_) => continue,
                Err(e)
                    if matches!(
                        e.raw_os_error(),
                        Some(libc::EXDEV | libc::EINVAL | libc::ENOSYS | libc::EOPNOTSUPP)
                    ) =>
                {
                    *use_cfr = false;
                    buf.resize(1 << 20, 0);
                }
                Err(e) => return Err(e),
            }
        } else {
            let want = left.min(buf.len());
            let n = sys::pread_full(src, &mut buf[..want], off_in as u64)?;
            if n == 0 {
                break;
            }
            sys::pwrite_full(dst, &buf[..n], off_out as u64)?;
            off_in += n as i64;
            off_out += n as i64;
        }
    }
    Ok(())
}

/// Creates `work/tmp` as a copy of `src_dir/name` (whose stat is `st`). Data is copied only when
/// `with_data` (a copy-up for O_TRUNC does not need it). On error the partial copy is removed.
pub fn copy_object(
    src_dir: RawFd,
    name: &CStr,
    st: &libc::stat,
    work: RawFd,
    tmp: &CStr,
    with_data: bool,
) -> io::Result<()> {
    let res = copy_object_inner(src_dir, name, st, work, tmp, with_data);
    if res.is_err() {
        let _ = crate::layers::remove_tree(work, tmp);
    }
    res
}

fn copy_object_inner(
    src_dir: RawFd,
    name: &CStr,
    st: &libc::stat,
    work: RawFd,
    tmp: &CStr,
    with_data: bool,
) -> io::Result<()> {
    let mode = st.st_mode & 0o7777;
    let times = cachedriver_common::at::times(st);
    match st.st_mode & libc::S_IFMT {
        libc::S_IFREG => {
            let src = sys::openat(src_dir, name, libc::O_RDONLY, 0)?;
            let dst = sys::openat(
                work,
                tmp,
                libc::O_WRONLY | libc::O_CREAT | libc::O_EXCL,
                0o600,
            )?;
            if with_data {
                copy_data(src.as_raw_fd(), dst.as_raw_fd(), st.st_size as u64)?;
            }
            copy_xattrs(
                &sys::proc_path(src.as_raw_fd(), None),
                &sys::proc_path(dst.as_raw_fd(), None),
                true,
            );
            sys::fchown(dst.as_raw_fd(), st.st_uid, st.st_gid)?;
            sys::fchmod(dst.as_raw_fd(), mode)?;
            sys::futimens(dst.as_raw_fd(), &times)?;
        }
        libc::S_IFDIR => {
            sys::mkdirat(work, tmp, 0o700)?;
            copy_xattrs(
                &sys::proc_path(src_dir, Some(name)),
                &sys::proc_path(work, Some(tmp)),
                false,
            );
            sys::fchownat(work, tmp, st.st_uid, st.st_gid)?;
            sys::fchmodat(work, tmp, mode)?;
            sys::utimensat(work, tmp, &times, libc::AT_SYMLINK_NOFOLLOW)?;
        }
        libc::S_IFLNK => {
            let target = sys::readlinkat(src_dir, name)?;
            let target = std::ffi::CString::new(target).map_err(|_| sys::errno(libc::EINVAL))?;
            sys::symlinkat(&target, work, tmp)?;
            copy_xattrs(
                &sys::proc_path(src_dir, Some(name)),
                &sys::proc_path(work, Some(tmp)),
                false,
            );
            sys::fchownat(work, tmp, st.st_uid, st.st_gid)?;
            sys::utimensat(work, tmp, &times, libc::AT_SYMLINK_NOFOLLOW)?;
        }
        _ => {
            sys::mknodat(work, tmp, st.st_mode, st.st_rdev)?;
            copy_xattrs(
                &sys::proc_path(src_dir, Some(name)),
                &sys::proc_path(work, Some(tmp)),
                false,
            );
            sys::fchownat(work, tmp, st.st_uid, st.st_gid)?;
            sys::fchmodat(work, tmp, mode)?;
            sys::utimensat(work, tmp, &times, libc::AT_SYMLINK_NOFOLLOW)?;
        }
    }
    Ok(())
}
