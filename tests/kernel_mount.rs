//! The kernel backend's classic mount path (mount(2) with the one-page option string), forced
//! with `CACHEDRIVER_KERNEL_MOUNT=classic` on a kernel that has `lowerdir+`: a chain whose
//! absolute paths exceed a page mounts with paths relative to the cache dir, and one too long
//! even so fails with an error that says to compact.
//!
//! One test function: the mode is a process-wide environment variable.

use std::fs;
use std::path::{Path, PathBuf};

use cachedriver::backend::{Backend, Kernel, MountSpec};
use cachedriver::state::XattrNs;

#[path = "support/probe.rs"]
mod probe;

/// A chain of `n` layers named by `name(i)` (topmost first) in `<root>/lower/<cache>`, each
/// holding a file `f<i>`, plus upper, work and target dirs.
struct Chain {
    lowers: Vec<PathBuf>,
    upper: PathBuf,
    work: PathBuf,
    target: PathBuf,
    pid: PathBuf,
}

fn chain(root: &Path, n: usize, name: impl Fn(usize) -> String) -> Chain {
    let cache = root.join("lower").join("cache");
    let mut lowers = Vec::new();
    for i in (0..n).rev() {
        let d = cache.join(name(i));
        fs::create_dir_all(&d).unwrap();
        fs::write(d.join(format!("f{i}")), format!("{i}")).unwrap();
        lowers.push(d);
    }
    let c = Chain {
        lowers,
        upper: root.join("upper/cache/s"),
        work: root.join("work/cache/s"),
        target: root.join("merged/cache/s"),
        pid: root.join("pid"),
    };
    for d in [&c.upper, &c.work, &c.target] {
        fs::create_dir_all(d).unwrap();
    }
    c
}

fn spec(c: &Chain) -> MountSpec<'_> {
    MountSpec {
        lowers: c.lowers.clone(),
        upper: &c.upper,
        work: &c.work,
        target: &c.target,
        xattr: XattrNs::for_this_process(),
        pid_file: &c.pid,
    }
}

fn options_of(target: &Path) -> String {
    let t = target.to_string_lossy().to_string();
    fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .lines()
        .find(|l| l.split(' ').nth(4) == Some(t.as_str()))
        .unwrap_or("")
        .to_string()
}

struct Unmount<'a>(&'a Path);

impl Drop for Unmount<'_> {
    fn drop(&mut self) {
        let _ = nix::mount::umount2(self.0, nix::mount::MntFlags::MNT_DETACH);
    }
}

#[test]
fn classic_mount_relative_paths_and_the_compact_error() {
    if !probe::is_root() {
        probe::skip("kernel_mount", "mounting overlays needs root");
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    // Long absolute paths: about 420 bytes per layer, so 12 layers are over a page.
    let root = tmp.path().join("r".repeat(200)).join("s".repeat(200));
    let k = Kernel::new();

    // SAFETY (edition 2021: safe): this test binary has a single test, so no other thread reads
    // the environment meanwhile.
    std::env::set_var("CACHEDRIVER_KERNEL_MOUNT", "classic");
    let c = chain(&root.join("a"), 12, |i| format!("l{i}"));
    let abs_len: usize = c.lowers.iter().map(|l| l.as_os_str().len() + 1).sum();
    assert!(abs_len > 4096, "the chain must exceed a page: {abs_len}");
    {
        k.mount(&spec(&c))
            .expect("classic mount with relative layer paths");
        let _u = Unmount(&c.target);
        let opts = options_of(&c.target);
        assert!(
            opts.contains("lowerdir=l11:l10:") && !opts.contains("lowerdir+"),
            "classic mount with relative lowers: {opts}"
        );
        for i in 0..12 {
            assert_eq!(
                fs::read_to_string(c.target.join(format!("f{i}"))).unwrap(),
                i.to_string()
            );
        }
        fs::write(c.target.join("new"), "w").unwrap();
        k.unmount(&c.target, None).unwrap();
        assert_eq!(fs::read_to_string(c.upper.join("new")).unwrap(), "w");
    }

    // Too long even relative to the cache dir: 100 layers with 60-byte names.
    let long = chain(&root.join("b"), 100, |i| {
        format!("{}{i:03}", "x".repeat(57))
    });
    let e = k.mount(&spec(&long)).unwrap_err().to_string();
    let _u = Unmount(&long.target);
    assert!(
        e.contains("compact the cache") && e.contains("cachedriver compact cache"),
        "{e}"
    );
    eprintln!("too long for classic: {e}");

    std::env::set_var("CACHEDRIVER_KERNEL_MOUNT", "auto");
    // fsconfig takes at most 255-byte strings: `auto` mounts these long paths the classic way.
    {
        k.mount(&spec(&c))
            .expect("auto: long paths fall back to classic");
        let _u = Unmount(&c.target);
        assert!(options_of(&c.target).contains("lowerdir=l11:"));
        k.unmount(&c.target, None).unwrap();
    }
    // 100 long-named layers under a short root mount through lowerdir+ (this kernel has it).
    let short = chain(&tmp.path().join("s"), 100, |i| {
        format!("{}{i:03}", "x".repeat(57))
    });
    k.mount(&spec(&short)).expect("lowerdir+ mount");
    let _u2 = Unmount(&short.target);
    assert!(short.target.join("f0").exists() && short.target.join("f99").exists());
    assert!(
        options_of(&short.target).contains("lowerdir+"),
        "{}",
        options_of(&short.target)
    );
    k.unmount(&short.target, None).unwrap();

    std::env::set_var("CACHEDRIVER_KERNEL_MOUNT", "bogus");
    let e = k.mount(&spec(&long)).unwrap_err().to_string();
    assert!(e.contains("auto, new or classic"), "{e}");
    std::env::remove_var("CACHEDRIVER_KERNEL_MOUNT");
}
