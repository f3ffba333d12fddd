//! Snapshots of directory trees (type, mode, owner, link count, contents, symlink target, device number,
//! xattrs) and entry-by-entry diffs, used to compare upper dirs written by two backends and merged views.

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::Path;

use super::harness::{getxattr, listxattr};

/// What we compare about one entry. Timestamps, sizes of directories and inode numbers are left out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub kind: &'static str,
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    /// Link count of non-directories (hard links in a layer are part of its format).
    pub nlink: Option<u64>,
    /// Size and a hash of the contents of regular files; target of symlinks; rdev of devices.
    pub data: String,
    pub xattrs: BTreeMap<String, String>,
}

/// xattrs the kernel writes into its upper dirs for its own bookkeeping, which another backend need not.
pub fn kernel_private_xattr(name: &str) -> bool {
    ["origin", "impure", "uuid", "nlink"]
        .iter()
        .any(|s| name == format!("trusted.overlay.{s}") || name == format!("user.overlay.{s}"))
}

fn fnv(data: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in data {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

fn kind(ft: fs::FileType) -> &'static str {
    if ft.is_dir() {
        "dir"
    } else if ft.is_file() {
        "file"
    } else if ft.is_symlink() {
        "symlink"
    } else if ft.is_char_device() {
        "chr"
    } else if ft.is_block_device() {
        "blk"
    } else if ft.is_fifo() {
        "fifo"
    } else if ft.is_socket() {
        "socket"
    } else {
        "unknown"
    }
}

/// Every entry under `root` (the root itself as `"."`), keyed by relative path. `keep_xattr` filters names.
pub fn snapshot(root: &Path, keep_xattr: &dyn Fn(&str) -> bool) -> BTreeMap<String, Entry> {
    let mut out = BTreeMap::new();
    walk(root, root, keep_xattr, &mut out);
    out
}

fn walk(
    root: &Path,
    p: &Path,
    keep_xattr: &dyn Fn(&str) -> bool,
    out: &mut BTreeMap<String, Entry>,
) {
    let md = fs::symlink_metadata(p).unwrap_or_else(|e| panic!("lstat {}: {e}", p.display()));
    let ft = md.file_type();
    let data = if ft.is_file() {
        let bytes = fs::read(p).unwrap_or_else(|e| panic!("read {}: {e}", p.display()));
        if bytes.len() <= 64 {
            format!("{:?}", String::from_utf8_lossy(&bytes))
        } else {
            format!("{} bytes, fnv {:016x}", bytes.len(), fnv(&bytes))
        }
    } else if ft.is_symlink() {
        format!("-> {}", fs::read_link(p).unwrap().display())
    } else if ft.is_char_device() || ft.is_block_device() {
        format!("rdev {}:{}", libc::major(md.rdev()), libc::minor(md.rdev()))
    } else {
        String::new()
    };
    let mut xattrs = BTreeMap::new();
    for name in listxattr(p).unwrap_or_default() {
        if keep_xattr(&name) {
            let v = getxattr(p, &name)
                .map(|v| String::from_utf8_lossy(&v).into_owned())
                .unwrap_or_else(|e| format!("<{e}>"));
            xattrs.insert(name, v);
        }
    }
    let is_whiteout = ft.is_char_device() && md.rdev() == 0;
    let rel = p.strip_prefix(root).unwrap();
    let rel = if rel.as_os_str().is_empty() {
        ".".to_string()
    } else {
        rel.display().to_string()
    };
    out.insert(
        rel,
        Entry {
            kind: kind(ft),
            mode: md.mode() & 0o7777,
            uid: md.uid(),
            gid: md.gid(),
            // Whiteouts are often hard links to one shared whiteout inode (the kernel's work dir keeps
            // one); their link count is not part of the format.
            nlink: (!ft.is_dir() && !is_whiteout).then_some(md.nlink()),
            data,
            xattrs,
        },
    );
    if ft.is_dir() {
        let mut children: Vec<_> = fs::read_dir(p)
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        children.sort();
        for c in children {
            walk(root, &c, keep_xattr, out);
        }
    }
}

/// Human-readable differences between two snapshots (`a` labelled `la`, `b` labelled `lb`); empty if equal.
pub fn diff(
    la: &str,
    a: &BTreeMap<String, Entry>,
    lb: &str,
    b: &BTreeMap<String, Entry>,
) -> Vec<String> {
    let mut out = Vec::new();
    for (k, ea) in a {
        match b.get(k) {
            None => out.push(format!("{k}: only in {la}: {ea:?}")),
            Some(eb) if ea != eb => out.push(format!("{k}:\n    {la}: {ea:?}\n    {lb}: {eb:?}")),
            Some(_) => {}
        }
    }
    for (k, eb) in b {
        if !a.contains_key(k) {
            out.push(format!("{k}: only in {lb}: {eb:?}"));
        }
    }
    out
}
