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

/// True for overlay-private xattrs (`trusted.overlay.*`, `user.overlay.*`): markers of the
/// layer format, never shown to or copied for a container.
pub fn is_private_xattr(name: &[u8]) -> bool {
    name.starts_with(b"trusted.overlay.") || name.starts_with(b"user.overlay.")
}

/// The names in a `listxattr` result (NUL-separated), empty ones skipped.
pub fn xattr_names(list: &[u8]) -> impl Iterator<Item = &[u8]> {
    list.split(|b| *b == 0).filter(|n| !n.is_empty())
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
    fn listxattr_results_split_into_names() {
        let names: Vec<&[u8]> = xattr_names(b"user.a\0\0trusted.overlay.opaque\0").collect();
        assert_eq!(names, [&b"user.a"[..], b"trusted.overlay.opaque"]);
        assert_eq!(xattr_names(b"").count(), 0);
        assert!(is_private_xattr(names[1]) && !is_private_xattr(names[0]));
    }

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
