//! Mount plumbing shared by benchmarks: unmount what a scratch store left mounted, even on
//! panic, and walk a tree the way a build tool does (stat every entry).

use std::fs;
use std::path::{Path, PathBuf};

#[path = "../../tests/support/unmount.rs"]
mod unmount;

/// Unmounts everything under `<root>/merged` on drop (panics included).
pub struct Unmounter(pub PathBuf);

impl Drop for Unmounter {
    fn drop(&mut self) {
        unmount::unmount_below(&self.0.join("merged"));
    }
}

/// Stats every entry under `root` (explicit stack, symlinks not followed); returns the count.
pub fn walk(root: &Path) -> usize {
    let mut n = 0;
    let mut stack = vec![root.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(rd) = fs::read_dir(&d) else { continue };
        for e in rd.flatten() {
            let Ok(m) = fs::symlink_metadata(e.path()) else {
                continue;
            };
            n += 1;
            if m.is_dir() {
                stack.push(e.path());
            }
        }
    }
    n
}
