//! Extended attributes of a path for tests (`#[path = "support/xattr_io.rs"] mod xattr_io;`), on
//! `cachedriver_common::at`'s wrappers: the `l*` calls (a final symlink is not followed), names
//! as text.
#![allow(dead_code)]

use std::ffi::CString;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use cachedriver_common::at;

fn cpath(p: &Path) -> CString {
    CString::new(p.as_os_str().as_bytes()).expect("path without NUL")
}

fn cname(name: &str) -> CString {
    CString::new(name).expect("xattr name without NUL")
}

/// Sets `name` to `value`.
pub fn setxattr(p: impl AsRef<Path>, name: &str, value: &[u8]) -> io::Result<()> {
    at::setxattr(&cpath(p.as_ref()), &cname(name), value, 0, false)
}

/// The value of `name`.
pub fn getxattr(p: impl AsRef<Path>, name: &str) -> io::Result<Vec<u8>> {
    at::getxattr(&cpath(p.as_ref()), &cname(name), false)
}

/// The names set, sorted.
pub fn listxattr(p: impl AsRef<Path>) -> io::Result<Vec<String>> {
    let raw = at::listxattr(&cpath(p.as_ref()), false)?;
    let mut names: Vec<String> = cachedriver_common::xattr::xattr_names(&raw)
        .map(|s| String::from_utf8_lossy(s).into_owned())
        .collect();
    names.sort();
    Ok(names)
}

/// Removes `name`.
pub fn removexattr(p: impl AsRef<Path>, name: &str) -> io::Result<()> {
    at::removexattr(&cpath(p.as_ref()), &cname(name), false)
}
