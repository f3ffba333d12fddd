//! Tree removal and walks under hostile conditions: a descriptor limit far below the tree's
//! depth, a 100k-entry directory, and a mount inside the tree. One binary, so the process-wide
//! RLIMIT_NOFILE set here affects nothing else.

use std::ffi::CString;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use cachedriver_common::tree::{remove_tree, tree_usage, walk, Walk};

/// The descriptor limit is process-wide: the tests here take turns.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn open_dir(dirfd: i32, name: &std::ffi::CStr) -> OwnedFd {
    let flags = libc::O_RDONLY | libc::O_DIRECTORY | libc::O_NOFOLLOW | libc::O_CLOEXEC;
    // SAFETY: valid C string.
    let fd = unsafe { libc::openat(dirfd, name.as_ptr(), flags) };
    assert!(fd >= 0, "{}", std::io::Error::last_os_error());
    // SAFETY: fresh fd.
    unsafe { OwnedFd::from_raw_fd(fd) }
}

fn deep_chain(dir: &Path, depth: usize) {
    let c = CString::new(dir.as_os_str().as_bytes()).unwrap();
    let mut cur = open_dir(libc::AT_FDCWD, &c);
    for _ in 0..depth {
        // SAFETY: valid C string.
        assert_eq!(
            unsafe { libc::mkdirat(cur.as_raw_fd(), c"d".as_ptr(), 0o755) },
            0
        );
        cur = open_dir(cur.as_raw_fd(), c"d");
    }
}

fn set_soft_nofile(n: u64) -> u64 {
    // SAFETY: plain old data and valid pointers.
    unsafe {
        let mut rl: libc::rlimit = std::mem::zeroed();
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut rl);
        let old = rl.rlim_cur;
        rl.rlim_cur = n;
        assert_eq!(libc::setrlimit(libc::RLIMIT_NOFILE, &rl), 0);
        old
    }
}

#[test]
fn hostile_shapes_with_32_descriptors() {
    let _turn = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let t = tempfile::tempdir().unwrap();
    let top = t.path().join("top");
    std::fs::create_dir(&top).unwrap();
    deep_chain(&top, 4000);
    let wide = top.join("wide");
    std::fs::create_dir(&wide).unwrap();
    for i in 0..100_000 {
        let name = format!("f{i}");
        if i % 100 == 0 {
            std::fs::create_dir(wide.join(name)).unwrap();
        } else {
            std::fs::File::create(wide.join(name)).unwrap();
        }
    }
    let old = set_soft_nofile(32);
    let t0 = std::time::Instant::now();
    let u = tree_usage(&top);
    let walked = t0.elapsed();
    assert_eq!(u.entries, 4000 + 1 + 100_000);
    let mut max_depth = 0;
    walk(&top, |e| {
        max_depth = max_depth.max(e.depth);
        Walk::Continue
    })
    .unwrap();
    assert_eq!(max_depth, 4000);
    let t0 = std::time::Instant::now();
    remove_tree(&top).unwrap();
    let removed = t0.elapsed();
    set_soft_nofile(old);
    assert!(!top.exists());
    eprintln!("walk of 104001 entries: {walked:?}; removal: {removed:?} (RLIMIT_NOFILE 32)");
}

#[test]
fn never_descends_into_a_mount() {
    let _turn = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    if !nix_is_root() {
        eprintln!("*** never_descends_into_a_mount: SKIPPED: mounting a tmpfs needs root ***");
        assert!(
            std::env::var("CACHEDRIVER_REQUIRE_ALL").as_deref() != Ok("1"),
            "required"
        );
        return;
    }
    let t = tempfile::tempdir().unwrap();
    let top = t.path().join("top");
    let mnt = top.join("a/mnt");
    std::fs::create_dir_all(&mnt).unwrap();
    std::fs::write(top.join("a/file"), b"x").unwrap();
    let c = CString::new(mnt.as_os_str().as_bytes()).unwrap();
    // SAFETY: valid C strings.
    let r = unsafe {
        libc::mount(
            c"tmpfs".as_ptr(),
            c.as_ptr(),
            c"tmpfs".as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    assert_eq!(r, 0, "{}", std::io::Error::last_os_error());
    struct Unmount(CString);
    impl Drop for Unmount {
        fn drop(&mut self) {
            // SAFETY: valid C string.
            unsafe { libc::umount2(self.0.as_ptr(), libc::MNT_DETACH) };
        }
    }
    let _guard = Unmount(c.clone());
    std::fs::write(mnt.join("inside"), b"keep").unwrap();
    // A walk sees the mount point but does not enter it.
    let mut names = Vec::new();
    walk(&top, |e| {
        names.push(e.name.to_bytes().to_vec());
        Walk::Continue
    })
    .unwrap();
    assert!(
        !names.contains(&b"inside".to_vec()),
        "walk entered the mount"
    );
    let err = remove_tree(&top).unwrap_err();
    assert!(err.to_string().contains("mount point"), "{err}");
    assert_eq!(std::fs::read(mnt.join("inside")).unwrap(), b"keep");
    // The mount itself is refused as a top too.
    let err = remove_tree(&mnt).unwrap_err();
    assert!(err.to_string().contains("mount point"), "{err}");
}

fn nix_is_root() -> bool {
    // SAFETY: trivial syscall.
    unsafe { libc::geteuid() == 0 }
}
