//! Reading a directory through a descriptor: names as raw bytes (newlines and invalid UTF-8 are
//! fine), with their `d_type`, for walkers that must not go through paths.

use std::ffi::CStr;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};

/// Lists a directory's entries as (name, d_type), skipping `.` and `..`.
pub fn list_dir(fd: OwnedFd) -> io::Result<Vec<(Vec<u8>, u8)>> {
    let raw = fd.as_raw_fd();
    // SAFETY: fdopendir takes ownership of the fd on success.
    let dir = unsafe { libc::fdopendir(raw) };
    if dir.is_null() {
        return Err(io::Error::last_os_error());
    }
    std::mem::forget(fd);
    let mut out = Vec::new();
    loop {
        // SAFETY: errno reset so end-of-stream and error can be told apart.
        unsafe { *libc::__errno_location() = 0 };
        // SAFETY: dir is a valid DIR*.
        let ent = unsafe { libc::readdir64(dir) };
        if ent.is_null() {
            let e = io::Error::last_os_error();
            // SAFETY: dir is valid and closed once.
            unsafe { libc::closedir(dir) };
            if e.raw_os_error().unwrap_or(0) != 0 {
                return Err(e);
            }
            return Ok(out);
        }
        // SAFETY: ent points to a valid dirent64 until the next readdir call.
        let (name, dtype) = unsafe {
            let e = &*ent;
            (
                CStr::from_ptr(e.d_name.as_ptr()).to_bytes().to_vec(),
                e.d_type,
            )
        };
        if name == b"." || name == b".." {
            continue;
        }
        out.push((name, dtype));
    }
}
