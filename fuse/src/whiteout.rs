//! The overlayfs upper-dir format: whiteouts, opaque markers and overlay-private xattrs.
//!
//! We READ every format found in the wild (kernel char 0/0 whiteouts, fuse-overlayfs style
//! `.wh.NAME` files and `.wh..wh..opq` markers, `trusted.`/`user.overlay.opaque`) and WRITE only
//! the kernel format (char 0/0 devices, the opaque xattr in the configured namespace).

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;

/// Prefix of the `.wh.NAME` whiteout files some tools write.
pub const WH_PREFIX: &[u8] = b".wh.";
/// The marker file some tools put in an opaque directory.
pub const OPAQUE_FILE: &[u8] = b".wh..wh..opq";

/// The xattr namespace our opaque markers are written in, and both opaque xattr names (read in
/// every layer whatever namespace we write): one definition, in `cachedriver_common::xattr`.
pub use cachedriver_common::xattr::{XattrNs, OPAQUE_XATTRS};

/// Whether a stat result is a kernel-format whiteout (char device 0/0).
pub fn is_whiteout(st: &libc::stat) -> bool {
    (st.st_mode & libc::S_IFMT) == libc::S_IFCHR && st.st_rdev == 0
}

/// Whether an opaque xattr value means "opaque" (`y`).
pub fn is_opaque_value(v: &[u8]) -> bool {
    v == b"y"
}

/// For a `.wh.NAME` file name, the NAME it whites out (None for other names and the opaque marker).
pub fn whiteout_target(name: &[u8]) -> Option<&[u8]> {
    if name == OPAQUE_FILE {
        return None;
    }
    name.strip_prefix(WH_PREFIX).filter(|n| !n.is_empty())
}

/// Whether a name is reserved by the whiteout format (never shown, never created by users).
pub fn is_reserved_name(name: &[u8]) -> bool {
    name.starts_with(WH_PREFIX)
}

/// The `.wh.NAME` file name for NAME.
pub fn wh_name(name: &[u8]) -> Vec<u8> {
    let mut v = WH_PREFIX.to_vec();
    v.extend_from_slice(name);
    v
}

pub use cachedriver_common::xattr::is_private_xattr;

/// Removes overlay-private names from a NUL-separated xattr name list.
pub fn filter_xattr_list(list: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(list.len());
    for name in cachedriver_common::xattr::xattr_names(list) {
        if !is_private_xattr(name) {
            out.extend_from_slice(name);
            out.push(0);
        }
    }
    out
}

/// Checks a name a user wants to create: one component, not `.`/`..`, not a reserved name,
/// at most 255 bytes. Returns the errno to refuse it with.
pub fn validate_new_name(name: &OsStr) -> Result<(), i32> {
    let b = name.as_bytes();
    if b.is_empty() || b == b"." || b == b".." || b.contains(&b'/') || b.contains(&0) {
        return Err(libc::EINVAL);
    }
    if b.len() > 255 {
        return Err(libc::ENAMETOOLONG);
    }
    if is_reserved_name(b) {
        return Err(libc::EINVAL);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn whiteout_device_detection() {
        let mut st = crate::sys::empty_stat();
        st.st_mode = libc::S_IFCHR;
        st.st_rdev = 0;
        assert!(is_whiteout(&st));
        st.st_rdev = libc::makedev(1, 3);
        assert!(!is_whiteout(&st));
        st.st_mode = libc::S_IFREG;
        st.st_rdev = 0;
        assert!(!is_whiteout(&st));
    }

    #[test]
    fn wh_files() {
        assert_eq!(whiteout_target(b".wh.foo"), Some(&b"foo"[..]));
        assert_eq!(whiteout_target(b".wh..wh..opq"), None);
        assert_eq!(whiteout_target(b".wh."), None);
        assert_eq!(whiteout_target(b"foo"), None);
        assert_eq!(wh_name(b"x"), b".wh.x".to_vec());
    }

    #[test]
    fn private_xattrs_hidden() {
        assert!(is_private_xattr(b"trusted.overlay.opaque"));
        assert!(is_private_xattr(b"user.overlay.origin"));
        assert!(!is_private_xattr(b"user.foo"));
        assert!(!is_private_xattr(b"trusted.overlayfoo"));
        let list = b"user.a\0trusted.overlay.impure\0user.overlay.uuid\0security.selinux\0";
        assert_eq!(
            filter_xattr_list(list),
            b"user.a\0security.selinux\0".to_vec()
        );
    }

    #[test]
    fn name_validation() {
        assert!(validate_new_name(OsStr::new("ok")).is_ok());
        assert_eq!(validate_new_name(OsStr::new(".wh.x")), Err(libc::EINVAL));
        assert_eq!(validate_new_name(OsStr::new("a/b")), Err(libc::EINVAL));
        assert_eq!(validate_new_name(OsStr::new("..")), Err(libc::EINVAL));
        let long = "x".repeat(256);
        assert_eq!(
            validate_new_name(OsStr::new(&long)),
            Err(libc::ENAMETOOLONG)
        );
        assert!(is_opaque_value(b"y"));
        assert!(!is_opaque_value(b"n"));
    }
}
