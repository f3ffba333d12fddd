//! Mount plumbing shared by benchmarks: unmount what a scratch store left mounted, even on
//! panic, and walk a tree the way a build tool does (stat every entry).

use std::fs;
use std::path::{Path, PathBuf};

/// Unmounts everything under `<root>/merged` on drop (panics included).
pub struct Unmounter(pub PathBuf);

impl Drop for Unmounter {
    fn drop(&mut self) {
        let Ok(info) = fs::read_to_string("/proc/self/mountinfo") else {
            return;
        };
        let prefix = self.0.join("merged").to_string_lossy().to_string();
        let mut points: Vec<String> = info
            .lines()
            .filter_map(|l| l.split(' ').nth(4).map(str::to_string))
            .filter(|m| m.starts_with(&prefix))
            .collect();
        points.sort();
        points.reverse();
        for m in points {
            let _ = nix::mount::umount2(m.as_str(), nix::mount::MntFlags::MNT_DETACH);
        }
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
