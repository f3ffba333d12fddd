//! The xattr namespace of overlay markers (opaque dirs): `trusted.overlay.*` as real root,
//! `user.overlay.*` inside a user namespace (the kernel's `userxattr`).

use std::ffi::CStr;
use std::io;
use std::os::fd::RawFd;

use crate::at::XattrTarget;

/// Which xattr namespace a store's overlay markers use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[cfg_attr(
    feature = "serde",
    derive(serde::Serialize, serde::Deserialize),
    serde(rename_all = "lowercase")
)]
pub enum XattrNs {
    /// `trusted.overlay.*`: real root, as the kernel writes by default.
    Trusted,
    /// `user.overlay.*`: inside a user namespace (`userxattr`).
    User,
}

/// Both opaque xattr names, read in every layer whatever namespace we write.
pub const OPAQUE_XATTRS: [&CStr; 2] = [c"trusted.overlay.opaque", c"user.overlay.opaque"];

impl XattrNs {
    /// The namespace this process can use: `user` inside a user namespace, else `trusted`.
    pub fn for_this_process() -> Self {
        if crate::userns::in_user_namespace() {
            XattrNs::User
        } else {
            XattrNs::Trusted
        }
    }

    /// The option value (`trusted` or `user`).
    pub fn as_str(self) -> &'static str {
        match self {
            XattrNs::Trusted => "trusted",
            XattrNs::User => "user",
        }
    }

    /// Parses an option value (`trusted` or `user`).
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "trusted" => Some(XattrNs::Trusted),
            "user" => Some(XattrNs::User),
            _ => None,
        }
    }

    /// The opaque-marker xattr name in this namespace.
    pub fn opaque_name(self) -> &'static CStr {
        match self {
            XattrNs::Trusted => OPAQUE_XATTRS[0],
            XattrNs::User => OPAQUE_XATTRS[1],
        }
    }
}

/// Whether the open directory `fd` carries an opaque xattr (`y`) in either namespace: layers
/// written as root and in a user namespace are read alike. An unset xattr or a filesystem
/// without xattrs is not opaque.
pub fn has_opaque_xattr(fd: RawFd) -> io::Result<bool> {
    let t = XattrTarget::Fd(fd);
    for x in OPAQUE_XATTRS {
        if t.get(x)?.as_deref() == Some(b"y") {
            return Ok(true);
        }
    }
    Ok(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        for ns in [XattrNs::Trusted, XattrNs::User] {
            assert_eq!(XattrNs::parse(ns.as_str()), Some(ns));
            let opaque = ns.opaque_name().to_str().unwrap();
            assert_eq!(opaque, format!("{}.overlay.opaque", ns.as_str()));
        }
        assert_eq!(XattrNs::parse("security"), None);
    }

    #[test]
    fn opaque_in_either_namespace() {
        use std::os::fd::AsRawFd;
        let tmp = tempfile::tempdir().unwrap();
        let d = std::fs::File::open(tmp.path()).unwrap();
        assert!(!has_opaque_xattr(d.as_raw_fd()).unwrap());
        let t = XattrTarget::Fd(d.as_raw_fd());
        // Filesystems that refuse user xattrs cannot hold the marker; nothing more to check.
        if t.set(c"user.overlay.opaque", b"n").is_err() {
            return;
        }
        assert!(!has_opaque_xattr(d.as_raw_fd()).unwrap());
        t.set(c"user.overlay.opaque", b"y").unwrap();
        assert!(has_opaque_xattr(d.as_raw_fd()).unwrap());
    }
}
