//! Backends bench plumbing: the lower tree every backend is measured over (small files in deep
//! dirs, large files, and dirs to copy up and delete).

use std::fs::{self, File};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::time::Instant;

use crate::{Config, MIB};
// ---------------------------------------------------------------------------------------------------------
// The lower tree.

pub struct Tree {
    pub lower: PathBuf,
    pub small: Vec<String>,
    pub small_bytes: u64,
    pub entries: usize,
    pub large: Vec<String>,
}

pub fn small_size(i: usize) -> usize {
    100 + (i * 7919) % 4000
}

pub fn build_tree(cfg: &Config, scratch: &Path) -> io::Result<Tree> {
    let lower = scratch.join("lower");
    let t0 = Instant::now();
    let mut small = Vec::with_capacity(cfg.small_files);
    let mut small_bytes = 0;
    let mut dirs = std::collections::BTreeSet::new();
    let buf = vec![b'x'; 4200];
    // 10 x 10 x 10 leaf dirs, four levels deep, files spread evenly.
    for i in 0..cfg.small_files {
        let leaf = i % 1000;
        let rel = format!(
            "tree/a{}/b{}/c{}/d/f{i}",
            leaf / 100,
            (leaf / 10) % 10,
            leaf % 10
        );
        let p = lower.join(&rel);
        let parent = p.parent().unwrap().to_path_buf();
        if dirs.insert(parent.clone()) {
            fs::create_dir_all(&parent)?;
        }
        let n = small_size(i);
        fs::write(&p, &buf[..n])?;
        small_bytes += n as u64;
        small.push(rel);
    }
    // Every dir on the way counts as an entry of the walk too.
    let mut all_dirs = std::collections::BTreeSet::new();
    for d in &dirs {
        let mut d = d.as_path();
        while let Ok(rel) = d.strip_prefix(lower.join("tree")) {
            if rel.as_os_str().is_empty() {
                break;
            }
            all_dirs.insert(rel.to_path_buf());
            d = d.parent().unwrap();
        }
    }
    let entries = small.len() + all_dirs.len();
    fs::create_dir_all(lower.join("large"))?;
    let mut large = Vec::new();
    let chunk: Vec<u8> = (0..MIB as usize).map(|i| (i * 31 % 251) as u8).collect();
    for i in 0..cfg.large_files {
        let rel = format!("large/big{i}");
        let mut f = File::create(lower.join(&rel))?;
        let mut left = cfg.large_size;
        while left > 0 {
            let n = left.min(MIB) as usize;
            f.write_all(&chunk[..n])?;
            left -= n as u64;
        }
        large.push(rel);
    }
    for d in ["cu", "del"] {
        fs::create_dir_all(lower.join(d))?;
        for i in 0..cfg.n_mut {
            fs::write(lower.join(format!("{d}/f{i}")), &buf[..1024])?;
        }
    }
    nix::unistd::sync();
    eprintln!(
        "bench: lower tree: {} small files ({} MiB) in {} dirs, {} x {} MiB large, 2 x {} mutable; built in {:.1} s",
        small.len(),
        small_bytes / MIB,
        all_dirs.len(),
        large.len(),
        cfg.large_size / MIB,
        cfg.n_mut,
        t0.elapsed().as_secs_f64()
    );
    Ok(Tree {
        lower,
        small,
        small_bytes,
        entries,
        large,
    })
}
