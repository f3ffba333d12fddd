//! The overlay conformance suite (DESIGN.md §9): one set of behaviours run against every backend by one
//! code path. Kernel overlayfs (`index=off,redirect_dir=off,metacopy=off`) is the oracle: where a result is
//! kernel-defined (errno of a directory rename, inode numbers, link counts, hidden xattrs) the test runs
//! the same steps on a kernel mount over identical lowers and requires the same answer.
//!
//! Layout: `conformance/harness.rs` mounts backends and holds helpers, `conformance/tree.rs` snapshots and
//! diffs trees; the behaviours live by area in `conformance/{reading,copy_up,whiteouts,rename,special,
//! xattrs,permissions,files,format}.rs`, shared fixtures here. Each behaviour is a plain `fn(Run)`; the `suite!` macro at the bottom generates one
//! `#[test]` per behaviour per backend (`kernel::read_through`, `fuse::read_through`, ...). Adding a
//! backend is one line there (plus its mount recipe in the harness). The reference peers
//! `fuse_overlayfs::*` (Debian's C fuse-overlayfs 1.10) and `fuse_overlayfs_2::*` (the Rust 2.0.0, which
//! the backends bench installs) are `#[ignore]`d: run them with `cargo test --test conformance --
//! --ignored`. Their failures are facts about them, not about us.
//!
//! `rootless::*` re-executes this test binary as uid 1000 inside `unshare -Urm` (an unprivileged user
//! namespace, as rootless Docker and Podman run) on every behaviour except the few that need a second uid:
//! the kernel with `userxattr` (and `redirect_dir=nofollow`, which the kernel requires with it), our FUSE
//! with `xattr=user`, overlay markers in `user.overlay.*`. Tests that cannot run here (not root, no
//! overlay, no /dev/fuse) say so loudly; with `CI=true` or `CACHEDRIVER_REQUIRE_ALL=1` such a skip fails
//! the test.
//!
//! Run: `cargo test --test conformance` (as root).

#[path = "conformance/copy_up.rs"]
mod copy_up;
#[path = "conformance/files.rs"]
mod files;
#[path = "conformance/format.rs"]
mod format;
#[path = "conformance/harness.rs"]
mod harness;
#[path = "conformance/permissions.rs"]
mod permissions;
#[path = "support/probe.rs"]
mod probe;
#[path = "conformance/reading.rs"]
mod reading;
#[path = "conformance/rename.rs"]
mod rename;
#[path = "conformance/special.rs"]
mod special;
#[path = "conformance/tree.rs"]
mod tree;
#[path = "conformance/whiteouts.rs"]
mod whiteouts;
#[path = "support/xattr_io.rs"]
mod xattr_io;
#[path = "conformance/xattrs.rs"]
mod xattrs;

use std::fs::{self, File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::Path;

use copy_up::*;
use files::*;
use format::*;
use harness::*;
use permissions::*;
use reading::*;
use rename::*;
use special::*;
use whiteouts::*;
use xattrs::*;

// ---------------------------------------------------------------------------------------------------------
// Fixtures.

const CU_CONTENT: &str = "copy-up source\n";
const CU_MTIME: i64 = 1_000_000_000;
const CU_MODE: u32 = 0o751;

/// Owner given to some lower entries; in a user namespace only uid 0 is mapped, so they stay root's.
fn other_owner() -> (u32, u32) {
    if in_userns() {
        (0, 0)
    } else {
        (1234, 5678)
    }
}

/// The standard lowers. `l1` is the bottom layer, `l2` the top one.
fn std_setup(l: &Layers) {
    let (l1, l2) = (&l.l1, &l.l2);
    let (ou, og) = other_owner();
    write(l1.join("a.txt"), "lower1 a\n");
    write(l1.join("shadow.txt"), "from L1\n");
    mkdir(l1.join("dir/sub"));
    chmod(l1.join("dir"), 0o711);
    write(l1.join("dir/one"), "1\n");
    write(l1.join("dir/two"), "2\n");
    write(l1.join("dir/sub/deep"), "deep\n");
    chmod(l1.join("dir/sub"), 0o750);
    chown(l1.join("dir/sub"), ou, og);
    mkdir(l1.join("deldir"));
    write(l1.join("deldir/x"), "x\n");
    write(l1.join("deldir/y"), "y\n");
    mkdir(l1.join("opq"));
    write(l1.join("opq/hidden"), "h\n");
    write(l1.join("ro.txt"), "read only\n");
    chmod(l1.join("ro.txt"), 0o644);
    mkdir(l1.join("pub"));
    chmod(l1.join("pub"), 0o777);
    write(l1.join("cu"), CU_CONTENT);
    chmod(l1.join("cu"), CU_MODE);
    chown(l1.join("cu"), ou, og);
    setxattr(l1.join("cu"), "user.test", b"v")
        .expect("setxattr on lower (does the fs support user xattrs?)");
    set_mtime(l1.join("cu"), CU_MTIME);
    std::os::unix::fs::symlink("a.txt", l1.join("link")).unwrap();
    nix::unistd::mkfifo(
        &l1.join("lfifo"),
        nix::sys::stat::Mode::from_bits_truncate(0o640),
    )
    .unwrap();

    write(l2.join("shadow.txt"), "from L2\n");
    mkdir(l2.join("dir"));
    chmod(l2.join("dir"), 0o755);
    write(l2.join("dir/three"), "3\n");
    write(l2.join("dir/one"), "1 from L2\n");
    write(l2.join("l2only"), "l2\n");
}

fn assert_lowers_untouched(t: &Ctx) {
    assert_eq!(read(t.l1("a.txt")), "lower1 a\n");
    assert_eq!(read(t.l1("shadow.txt")), "from L1\n");
    assert_eq!(read(t.l2("shadow.txt")), "from L2\n");
    assert_eq!(names(t.l1("dir")), strs(&["one", "sub", "two"]));
    assert_eq!(names(t.l1("deldir")), strs(&["x", "y"]));
    assert_eq!(names(t.l1("opq")), strs(&["hidden"]));
    let cu = lstat(t.l1("cu"));
    assert_eq!(
        (cu.mode() & 0o7777, cu.mtime(), cu.len()),
        (CU_MODE, CU_MTIME, CU_CONTENT.len() as u64)
    );
    assert_eq!(read(t.l1("cu")), CU_CONTENT);
    assert_eq!(user_xattrs(t.l1("cu")).unwrap(), strs(&["user.test"]));
}

// ---------------------------------------------------------------------------------------------------------
// Rootless: re-run a subset inside `unshare -Urm`.

/// Tests left out of the rootless pass: they need a second uid, and `unshare -U` maps only one.
const NEEDS_SECOND_UID: &[&str] = &[
    "copy_up_chown",
    "permissions_nonroot",
    "permissions_nonroot_copy_up",
];

fn rootless(backend: Backend, module: &str) {
    let test = "rootless";
    for tool in ["/usr/bin/unshare", "/usr/bin/setpriv"] {
        if !Path::new(tool).exists() {
            skip(test, backend, &format!("{tool} (util-linux) not installed"));
            return;
        }
    }
    if !nix::unistd::geteuid().is_root() {
        skip(
            test,
            backend,
            "the outer run must be root to switch to uid 1000",
        );
        return;
    }
    let exe = std::env::current_exe().unwrap();
    let names: Vec<String> = SUITE
        .iter()
        .filter(|n| !NEEDS_SECOND_UID.contains(n))
        .map(|n| format!("{module}::{n}"))
        .collect();
    // Really unprivileged, as rootless Docker/Podman run: uid 1000 outside, root of its own namespace.
    // A FUSE daemon needs /dev/fuse, which some hosts (containers) keep at 0600 root: there the namespace
    // is made by root instead, which still exercises every user-namespace code path (userxattr, user.
    // xattrs, no passthrough).
    let exe_c = cstr(&exe);
    let fuse_c = cstr(Path::new("/dev/fuse"));
    let (ep, fp) = (exe_c.as_ptr(), fuse_c.as_ptr());
    // SAFETY: raw syscalls only (see `as_user`).
    let exe_ok = as_user(1000, 1000, move || unsafe {
        if libc::access(ep, libc::X_OK) == 0 {
            0
        } else {
            last_errno()
        }
    }) == 0;
    let fuse_ok = backend.is_kernel()
        || as_user(1000, 1000, move || unsafe {
            libc::access(fp, libc::R_OK | libc::W_OK)
        }) == 0;
    let mut cmd = if exe_ok && fuse_ok {
        let mut c = std::process::Command::new("setpriv");
        c.args([
            "--reuid=1000",
            "--regid=1000",
            "--clear-groups",
            "--",
            "unshare",
        ]);
        c
    } else {
        eprintln!(
            "\n******** NOTE rootless [{}]: uid 1000 cannot use {}; running the user namespace as root ********\n",
            backend.name(),
            if exe_ok { "/dev/fuse" } else { "the test binary" }
        );
        std::process::Command::new("unshare")
    };
    let out = cmd
        .args(["-Urm", "--propagation", "private"])
        .arg(&exe)
        .args(&names)
        .args([
            "--exact",
            "--nocapture",
            "--test-threads=2",
            "--include-ignored",
        ])
        .env("CONFORMANCE_USERNS", "1")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    if !out.status.success() && stdout.is_empty() && stderr.contains("unshare") {
        skip(
            test,
            backend,
            &format!("cannot create a user namespace here: {}", stderr.trim()),
        );
        return;
    }
    let summary = stdout
        .lines()
        .find(|l| l.starts_with("test result:"))
        .unwrap_or("")
        .to_string();
    assert!(
        out.status.success(),
        "rootless {} run failed ({}): {summary}\n--- stdout\n{stdout}\n--- stderr\n{stderr}",
        backend.name(),
        out.status
    );
    let want = format!("test result: ok. {} passed; 0 failed", names.len());
    assert!(
        summary.starts_with(&want),
        "rootless run did not run all {} tests: {summary}",
        names.len()
    );
    if let Some(line) = stderr.lines().find(|l| l.contains("SKIPPED")) {
        skip(
            test,
            backend,
            &format!("the rootless run skipped tests: {line}"),
        );
    }
    eprintln!("rootless {}: {summary}", backend.name());
}

// ---------------------------------------------------------------------------------------------------------
// One #[test] per behaviour per backend.

macro_rules! one_test {
    ({$($attr:tt)*} $backend:expr, $test:ident) => {
        #[test]
        $($attr)*
        fn $test() {
            super::$test(super::Run { backend: $backend, test: stringify!($test) })
        }
    };
}

macro_rules! backend_module {
    ($module:ident, $backend:expr, $attrs:tt, $($test:ident),*) => {
        mod $module {
            $( one_test!($attrs $backend, $test); )*
        }
    };
}

macro_rules! suite {
    ($($test:ident),* $(,)?) => {
        /// Every behaviour of the suite, by name.
        const SUITE: &[&str] = &[$(stringify!($test)),*];
        backend_module!(kernel, super::Backend::Kernel, {}, $($test),*);
        backend_module!(fuse, super::Backend::Fuse, {}, $($test),*);
        backend_module!(fuse_overlayfs, super::Backend::FuseOverlayfs, {#[ignore = "reference peer (Debian fuse-overlayfs); run with --ignored"]}, $($test),*);
        backend_module!(fuse_overlayfs_2, super::Backend::FuseOverlayfs2, {#[ignore = "reference peer (fuse-overlayfs 2.0.0); run with --ignored"]}, $($test),*);
    };
}

suite!(
    read_through,
    copy_up_write,
    copy_up_append,
    copy_up_truncate,
    copy_up_chmod,
    copy_up_chown,
    copy_up_utimens,
    copy_up_setxattr,
    copy_up_parent_dirs,
    copy_up_link,
    copy_up_while_open,
    copy_up_on_open_for_write,
    file_locks,
    whiteout_unlink,
    whiteout_rmdir,
    opaque_after_rmdir_mkdir,
    lower_kernel_markers_honoured,
    lower_aufs_markers,
    readdir_merged,
    readdir_large,
    readdir_while_deleting,
    readdir_seek,
    dir_nlink_and_d_ino,
    concurrent_ops,
    unlink_open_file,
    copy_up_large_and_sparse,
    copy_up_dir_attrs,
    odd_names,
    lower_hardlinks,
    rename_file_within_dir,
    rename_file_across_dirs,
    rename_file_over_existing,
    rename_lower_dir,
    rename_upper_dir,
    symlinks,
    fifos_and_sockets,
    xattr_user,
    xattr_overlay_private_hidden,
    permissions_nonroot,
    permissions_nonroot_copy_up,
    statfs_works,
    fsync_works,
    fallocate_works,
    sparse_over_4gib,
    open_flags,
    mmap_shared_write,
    inode_stable,
    readonly_mount,
    format_upper_matches_kernel,
    format_upper_as_kernel_lower,
);

mod rootless {
    #[test]
    fn kernel() {
        super::rootless(super::Backend::Kernel, "kernel");
    }

    #[test]
    fn fuse() {
        super::rootless(super::Backend::Fuse, "fuse");
    }

    #[test]
    #[ignore = "reference peer (Debian fuse-overlayfs); run with --ignored"]
    fn fuse_overlayfs() {
        super::rootless(super::Backend::FuseOverlayfs, "fuse_overlayfs");
    }

    #[test]
    #[ignore = "reference peer (fuse-overlayfs 2.0.0); run with --ignored"]
    fn fuse_overlayfs_2() {
        super::rootless(super::Backend::FuseOverlayfs2, "fuse_overlayfs_2");
    }
}
