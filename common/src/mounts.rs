//! This mount namespace's mount table, read from `/proc/self/mountinfo`.

use std::ffi::OsString;
use std::os::unix::ffi::OsStringExt;
use std::path::{Path, PathBuf};

/// Undoes mountinfo's `\ooo` escapes (space, tab, newline and backslash); anything that is not
/// exactly three octal digits after a backslash stays as it is. Paths are bytes: invalid UTF-8
/// is kept as it is.
pub fn unescape_mountinfo(b: &[u8]) -> PathBuf {
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            let v = u32::from(b[i + 1] - b'0') * 64
                + u32::from(b[i + 2] - b'0') * 8
                + u32::from(b[i + 3] - b'0');
            // \4xx and above do not fit a byte: not an escape the kernel writes.
            if let Ok(v) = u8::try_from(v) {
                out.push(v);
                i += 4;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    PathBuf::from(OsString::from_vec(out))
}

/// The mount table of this process's namespace: (mount point, filesystem type) per line of
/// `/proc/self/mountinfo`, in order (a later entry for a path is mounted on top of an earlier one).
pub fn mount_table() -> Vec<(PathBuf, String)> {
    let Ok(info) = std::fs::read("/proc/self/mountinfo") else {
        return Vec::new();
    };
    parse_mountinfo(&info)
}

fn parse_mountinfo(info: &[u8]) -> Vec<(PathBuf, String)> {
    info.split(|b| *b == b'\n')
        .filter_map(|line| {
            let fields: Vec<&[u8]> = line.split(|b| *b == b' ').collect();
            let sep = fields.iter().position(|f| *f == b"-")?;
            let (point, fstype) = (fields.get(4)?, fields.get(sep + 1)?);
            Some((
                unescape_mountinfo(point),
                String::from_utf8_lossy(fstype).into_owned(),
            ))
        })
        .collect()
}

/// The filesystem type mounted at exactly `path`, if `path` is a mount point in our namespace
/// (the topmost mount when several are stacked there).
pub fn mount_fstype(path: &Path) -> Option<String> {
    mount_table()
        .into_iter()
        .rev()
        .find(|(point, _)| point == path)
        .map(|(_, fstype)| fstype)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::ffi::OsStrExt;

    #[test]
    fn mountinfo_unescape() {
        assert_eq!(unescape_mountinfo(b"/a\\040b"), Path::new("/a b"));
        assert_eq!(unescape_mountinfo(b"/plain"), Path::new("/plain"));
        assert_eq!(unescape_mountinfo(b"/x\\134y"), Path::new("/x\\y"));
        assert_eq!(unescape_mountinfo(b"/nl\\012"), Path::new("/nl\n"));
        assert_eq!(unescape_mountinfo(b"/short\\04"), Path::new("/short\\04"));
        assert_eq!(unescape_mountinfo(b"/big\\777"), Path::new("/big\\777"));
        assert_eq!(
            unescape_mountinfo(b"/bad\xff"),
            Path::new(std::ffi::OsStr::from_bytes(b"/bad\xff"))
        );
    }

    #[test]
    fn parses_lines_with_optional_fields() {
        let t = parse_mountinfo(
            b"22 1 8:1 / / rw,relatime shared:1 - ext4 /dev/sda1 rw\n\
             40 22 0:40 / /mnt/a\\040b rw - fuse.cachedriver-fuse overlay rw\n",
        );
        assert_eq!(t[0], (PathBuf::from("/"), "ext4".to_string()));
        assert_eq!(
            t[1],
            (
                PathBuf::from("/mnt/a b"),
                "fuse.cachedriver-fuse".to_string()
            )
        );
    }

    #[test]
    fn root_is_mounted() {
        assert!(mount_fstype(Path::new("/")).is_some());
    }
}
