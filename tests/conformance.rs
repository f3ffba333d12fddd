//! The overlay conformance suite (DESIGN.md §9): one set of behaviours run against every backend by one
//! code path. Kernel overlayfs (`index=off,redirect_dir=off,metacopy=off`) is the oracle: where a result is
//! kernel-defined (errno of a directory rename, inode numbers, link counts, hidden xattrs) the test runs
//! the same steps on a kernel mount over identical lowers and requires the same answer.
//!
//! Layout: `conformance/harness.rs` mounts backends and holds helpers, `conformance/tree.rs` snapshots and
//! diffs trees. Each behaviour below is a plain `fn(Run)`; the `suite!` macro at the bottom generates one
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

#[path = "conformance/harness.rs"]
mod harness;
#[path = "conformance/tree.rs"]
mod tree;

use std::fs::{self, File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::Path;

use harness::*;

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
// Read-through.

fn read_through(r: Run) {
    let Some(t) = Ctx::new(r, std_setup) else {
        return;
    };
    assert_eq!(read(t.p("a.txt")), "lower1 a\n", "bottom-only file");
    assert_eq!(read(t.p("shadow.txt")), "from L2\n", "top lower wins");
    assert_eq!(
        read(t.p("dir/one")),
        "1 from L2\n",
        "top lower wins inside a merged dir"
    );
    assert_eq!(read(t.p("dir/sub/deep")), "deep\n");
    assert_eq!(read(t.p("l2only")), "l2\n");
    assert_eq!(names(t.p("dir")), strs(&["one", "sub", "three", "two"]));
    assert_eq!(
        lstat(t.p("dir")).mode() & 0o7777,
        0o755,
        "a merged dir shows the top layer's attributes"
    );
    let (lo, me) = (lstat(t.l1("cu")), lstat(t.p("cu")));
    assert_eq!(
        (
            me.mode(),
            me.uid(),
            me.gid(),
            me.mtime(),
            me.len(),
            me.nlink()
        ),
        (
            lo.mode(),
            lo.uid(),
            lo.gid(),
            lo.mtime(),
            lo.len(),
            lo.nlink()
        )
    );
    assert_eq!(getxattr(t.p("cu"), "user.test").unwrap(), b"v");
    // Reading (and stat, readdir, getxattr) must not copy anything up.
    assert_eq!(
        names(&t.fx.upper),
        Vec::<String>::new(),
        "reads copied something up"
    );
    assert_lowers_untouched(&t);
}

// ---------------------------------------------------------------------------------------------------------
// Copy-up.

#[derive(Default, Clone, Copy)]
struct Change {
    content: Option<&'static str>,
    mode: Option<u32>,
    owner: Option<(u32, u32)>,
    /// `Some(Some(t))`: mtime set to t; `Some(None)`: mtime changes to "now"; `None`: mtime preserved.
    mtime: Option<Option<i64>>,
    xattr: Option<(&'static str, &'static str)>,
}

/// Applies `op` to the lower file `cu` and checks the copy-up: the upper holds a copy, everything `op` did
/// not change (contents, mode, owner, mtime, xattrs) is preserved, and the lower is untouched.
fn copy_up(r: Run, op: fn(&Path), ch: Change) {
    let Some(t) = Ctx::new(r, std_setup) else {
        return;
    };
    let lo = lstat(t.l1("cu"));
    op(&t.p("cu"));
    for (what, p) in [("merged", t.p("cu")), ("upper", t.upper("cu"))] {
        let md = lstat(&p);
        assert!(
            md.file_type().is_file(),
            "{what} cu is not a regular file after copy-up"
        );
        assert_eq!(
            read(&p),
            ch.content.unwrap_or(CU_CONTENT),
            "{what} contents"
        );
        assert_eq!(
            md.mode() & 0o7777,
            ch.mode.unwrap_or(CU_MODE),
            "{what} mode"
        );
        assert_eq!(
            (md.uid(), md.gid()),
            ch.owner.unwrap_or((lo.uid(), lo.gid())),
            "{what} owner"
        );
        match ch.mtime {
            None => assert_eq!(
                (md.mtime(), md.mtime_nsec()),
                (lo.mtime(), lo.mtime_nsec()),
                "{what} mtime not preserved"
            ),
            Some(Some(t)) => assert_eq!(md.mtime(), t, "{what} mtime"),
            Some(None) => assert!(md.mtime() > lo.mtime(), "{what} mtime did not advance"),
        }
        assert_eq!(
            getxattr(&p, "user.test").map_err(|e| errname(&e)),
            Ok(b"v".to_vec()),
            "{what} lost user.test"
        );
        let mut want = vec!["user.test"];
        if let Some((k, v)) = ch.xattr {
            assert_eq!(getxattr(&p, k).unwrap(), v.as_bytes(), "{what} {k}");
            want.push(k);
        }
        if what == "merged" {
            assert_eq!(user_xattrs(&p).unwrap(), strs(&want), "merged listxattr");
        }
    }
    assert_lowers_untouched(&t);
}

fn copy_up_write(r: Run) {
    fn op(p: &Path) {
        let f = OpenOptions::new().write(true).open(p).unwrap();
        f.write_all_at(b"COPY", 0).unwrap();
    }
    copy_up(
        r,
        op,
        Change {
            content: Some("COPY-up source\n"),
            mtime: Some(None),
            ..Default::default()
        },
    );
}

fn copy_up_append(r: Run) {
    fn op(p: &Path) {
        let mut f = OpenOptions::new().append(true).open(p).unwrap();
        f.write_all(b"+").unwrap();
    }
    copy_up(
        r,
        op,
        Change {
            content: Some("copy-up source\n+"),
            mtime: Some(None),
            ..Default::default()
        },
    );
}

fn copy_up_truncate(r: Run) {
    fn op(p: &Path) {
        nix::unistd::truncate(p, 4).unwrap();
    }
    copy_up(
        r,
        op,
        Change {
            content: Some("copy"),
            mtime: Some(None),
            ..Default::default()
        },
    );
}

fn copy_up_chmod(r: Run) {
    fn op(p: &Path) {
        chmod(p, 0o700);
    }
    copy_up(
        r,
        op,
        Change {
            mode: Some(0o700),
            ..Default::default()
        },
    );
}

fn copy_up_chown(r: Run) {
    if in_userns() {
        r.skip("chown to another uid needs more than the one uid a `unshare -U` namespace maps");
        return;
    }
    fn op(p: &Path) {
        chown(p, 4321, 8765);
    }
    copy_up(
        r,
        op,
        Change {
            owner: Some((4321, 8765)),
            ..Default::default()
        },
    );
}

fn copy_up_utimens(r: Run) {
    fn op(p: &Path) {
        set_mtime(p, 2_000_000_000);
    }
    copy_up(
        r,
        op,
        Change {
            mtime: Some(Some(2_000_000_000)),
            ..Default::default()
        },
    );
}

fn copy_up_setxattr(r: Run) {
    fn op(p: &Path) {
        setxattr(p, "user.new", b"1").unwrap();
    }
    copy_up(
        r,
        op,
        Change {
            xattr: Some(("user.new", "1")),
            ..Default::default()
        },
    );
}

/// Copy-up of a deep file copies its parents up with their attributes.
fn copy_up_parent_dirs(r: Run) {
    let Some(t) = Ctx::new(r, std_setup) else {
        return;
    };
    write(t.p("dir/sub/new"), "n");
    let lo_sub = lstat(t.l1("dir/sub"));
    for p in [t.p("dir/sub"), t.upper("dir/sub")] {
        let md = lstat(&p);
        assert!(md.is_dir());
        assert_eq!(
            (md.mode() & 0o7777, md.uid(), md.gid()),
            (lo_sub.mode() & 0o7777, lo_sub.uid(), lo_sub.gid()),
            "{}",
            p.display()
        );
    }
    assert_eq!(
        lstat(t.upper("dir")).mode() & 0o7777,
        0o755,
        "upper dir takes the top lower's mode"
    );
    assert_eq!(names(t.p("dir/sub")), strs(&["deep", "new"]));
    assert!(!exists(t.upper("dir/sub/deep")), "a sibling was copied up");
    assert_eq!(names(t.l1("dir/sub")), strs(&["deep"]));
}

/// link(2) of a lower file: both names are one inode with nlink 2.
fn copy_up_link(r: Run) {
    let Some(t) = Ctx::new(r, std_setup) else {
        return;
    };
    fs::hard_link(t.p("cu"), t.p("cu.link")).unwrap();
    let (a, b) = (lstat(t.p("cu")), lstat(t.p("cu.link")));
    assert_eq!(
        (a.nlink(), b.nlink()),
        (2, 2),
        "both names must count two links"
    );
    // As real root the kernel shows one inode number on both names. In a user namespace (userxattr) it
    // shows the lower's number on the old name and the upper's on the new one: the kernel is excused
    // there, but no other backend may split a hard link.
    if r.backend.is_kernel() && in_userns() {
        eprintln!(
            "{}: kernel in a user namespace: same st_ino on both names = {}",
            r.test,
            a.ino() == b.ino()
        );
    } else {
        assert_eq!(a.ino(), b.ino(), "both names must be one inode");
    }
    let a = lstat(t.p("cu"));
    assert_eq!(
        (a.mode() & 0o7777, a.mtime()),
        (CU_MODE, CU_MTIME),
        "link changed attributes"
    );
    assert_eq!(
        lstat(t.upper("cu")).ino(),
        lstat(t.upper("cu.link")).ino(),
        "upper names are not hard links"
    );
    OpenOptions::new()
        .append(true)
        .open(t.p("cu.link"))
        .unwrap()
        .write_all(b"!")
        .unwrap();
    assert_eq!(read(t.p("cu")), format!("{CU_CONTENT}!"));
    assert_lowers_untouched(&t);
}

/// Copy-up of a file that is open read-only elsewhere: the writer succeeds, later opens see the new
/// contents, and what the old descriptor reads is whatever the kernel's overlay gives it.
fn copy_up_while_open(r: Run) {
    let Some(t) = Ctx::new(r, std_setup) else {
        return;
    };
    let obs = t.same_as_kernel("copy-up while a read-only fd is open", |m| {
        let mut old = fs::File::open(m.p("a.txt")).unwrap();
        let append = OpenOptions::new()
            .append(true)
            .open(m.p("a.txt"))
            .and_then(|mut f| f.write_all(b"+"));
        let old_fd = fs::File::open(m.p("dir/one")).unwrap();
        let trunc =
            outcome(&nix::unistd::truncate(&m.p("dir/one"), 1).map_err(std::io::Error::from));
        let chmod_res = {
            use std::os::unix::fs::PermissionsExt;
            let _held = fs::File::open(m.p("l2only")).unwrap();
            outcome(&fs::set_permissions(
                m.p("l2only"),
                fs::Permissions::from_mode(0o600),
            ))
        };
        let mut via_old = String::new();
        let old_read = outcome(&old.read_to_string(&mut via_old));
        let after = fs::read_to_string(m.p("a.txt")).map_err(|e| errname(&e));
        let one = fs::read_to_string(m.p("dir/one")).map_err(|e| errname(&e));
        drop(old_fd);
        (
            outcome(&append),
            old_read,
            via_old,
            after,
            trunc,
            one,
            chmod_res,
        )
    });
    assert_eq!(obs.0, "ok", "append to a lower file held open read-only");
    assert_eq!(obs.3, Ok("lower1 a\n+".to_string()));
    assert_eq!(obs.5, Ok("1".to_string()));
    assert_eq!(obs.6, "ok");
    assert_lowers_untouched(&t);
}

/// Opening a lower file for writing copies it up at open (the kernel does; a later write may never come),
/// and opening it read-only never does.
fn copy_up_on_open_for_write(r: Run) {
    let Some(t) = Ctx::new(r, std_setup) else {
        return;
    };
    // Our FUSE backend runs in no-open mode: the kernel opens files without asking it, so a write
    // open copies up at the first write or truncate instead (an upper then holds only changed
    // files). Everything else about the open must match the kernel.
    let lazy = t.backend() == Backend::Fuse;
    let obs = t.same_as_kernel("copy-up at open(O_WRONLY) without a write", |m| {
        drop(fs::File::open(m.p("a.txt")).unwrap());
        drop(OpenOptions::new().read(true).open(m.p("dir/one")).unwrap());
        let ro = (exists(m.upper("a.txt")), exists(m.upper("dir/one")));
        drop(
            OpenOptions::new()
                .write(true)
                .open(m.p("shadow.txt"))
                .unwrap(),
        );
        drop(
            OpenOptions::new()
                .read(true)
                .write(true)
                .open(m.p("dir/sub/deep"))
                .unwrap(),
        );
        let rw = (
            exists(m.upper("shadow.txt")),
            exists(m.upper("dir/sub/deep")),
        );
        (ro, read(m.p("shadow.txt")), (!lazy).then_some(rw))
    });
    assert_eq!(obs.0, (false, false), "a read-only open copied up");
    assert_eq!(obs.1, "from L2\n");
    if lazy {
        let rw = (
            exists(t.upper("shadow.txt")),
            exists(t.upper("dir/sub/deep")),
        );
        assert_eq!(rw, (false, false), "no-open: copied up without a write");
        let mut f = OpenOptions::new()
            .write(true)
            .open(t.p("shadow.txt"))
            .unwrap();
        f.write_all(b"W").unwrap();
        drop(f);
        assert!(
            exists(t.upper("shadow.txt")),
            "no-open: first write copies up"
        );
        assert_eq!(read(t.p("shadow.txt")), "Wrom L2\n");
    }
}

/// flock(2) and POSIX record locks on merged files (cargo, npm, gradle lock their caches this way).
fn file_locks(r: Run) {
    use nix::fcntl::{Flock, FlockArg};
    let Some(t) = Ctx::new(r, std_setup) else {
        return;
    };
    let obs = t.same_as_kernel("flock and fcntl locks", |m| {
        let a = fs::File::open(m.p("a.txt")).unwrap();
        let b = fs::File::open(m.p("a.txt")).unwrap();
        let held = Flock::lock(a, FlockArg::LockExclusiveNonblock)
            .map_err(|(_, e)| e)
            .unwrap();
        let second = match Flock::lock(b, FlockArg::LockExclusiveNonblock) {
            Ok(_) => "ok".to_string(),
            Err((_, e)) => format!("{e:?}"),
        };
        let a = held.unlock().map_err(|(_, e)| e).unwrap();
        let b = fs::File::open(m.p("a.txt")).unwrap();
        let after_unlock = outcome(
            &Flock::lock(b, FlockArg::LockExclusiveNonblock)
                .map(|_| ())
                .map_err(|(_, e)| std::io::Error::from(e)),
        );
        drop(a);
        // POSIX write lock held here; a forked child (another process) must be refused.
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .open(m.p("shadow.txt"))
            .unwrap();
        let lk = libc::flock {
            l_type: libc::F_WRLCK as i16,
            l_whence: libc::SEEK_SET as i16,
            l_start: 0,
            l_len: 0,
            l_pid: 0,
        };
        // SAFETY: valid fd and struct.
        let set = unsafe { libc::fcntl(f.as_raw_fd(), libc::F_SETLK, &lk) };
        let fd = f.as_raw_fd();
        let child = in_child(move || {
            let lk = libc::flock {
                l_type: libc::F_WRLCK as i16,
                l_whence: libc::SEEK_SET as i16,
                l_start: 0,
                l_len: 0,
                l_pid: 0,
            };
            // SAFETY: raw syscall on an inherited fd.
            if unsafe { libc::fcntl(fd, libc::F_SETLK, &lk) } == 0 {
                0
            } else {
                last_errno()
            }
        });
        (second, after_unlock, set, child)
    });
    assert_eq!(
        obs.0, "EAGAIN",
        "a second flock(LOCK_EX) must be refused (EWOULDBLOCK)"
    );
    assert_eq!(obs.1, "ok");
    assert_eq!(obs.2, 0);
    assert!(
        obs.3 == libc::EAGAIN || obs.3 == libc::EACCES,
        "POSIX lock not enforced across processes: {}",
        obs.3
    );
}

// ---------------------------------------------------------------------------------------------------------
// Whiteouts and opaque dirs.

fn whiteout_unlink(r: Run) {
    let Some(t) = Ctx::new(r, std_setup) else {
        return;
    };
    fs::remove_file(t.p("shadow.txt")).unwrap(); // in both lowers
    fs::remove_file(t.p("a.txt")).unwrap(); // bottom lower only
    fs::remove_file(t.p("dir/two")).unwrap();
    for n in ["shadow.txt", "a.txt", "dir/two"] {
        assert_eq!(
            outcome(&fs::symlink_metadata(t.p(n))),
            "ENOENT",
            "{n} still visible"
        );
        assert!(
            is_whiteout(t.upper(n)),
            "upper {n} is not a char 0/0 whiteout"
        );
    }
    assert!(!names(t.p(""))
        .iter()
        .any(|n| n == "a.txt" || n == "shadow.txt"));
    assert_eq!(names(t.p("dir")), strs(&["one", "sub", "three"]));
    assert_lowers_untouched(&t);
    // A new file over a whiteout shows only the new contents.
    write(t.p("a.txt"), "new");
    assert_eq!(read(t.p("a.txt")), "new");
    assert_eq!(names(t.p("")).iter().filter(|n| *n == "a.txt").count(), 1);
    assert!(lstat(t.upper("a.txt")).file_type().is_file());
}

fn whiteout_rmdir(r: Run) {
    let Some(t) = Ctx::new(r, std_setup) else {
        return;
    };
    assert_eq!(outcome(&fs::remove_dir(t.p("deldir"))), "ENOTEMPTY");
    fs::remove_file(t.p("deldir/x")).unwrap();
    fs::remove_file(t.p("deldir/y")).unwrap();
    assert_eq!(names(t.p("deldir")), Vec::<String>::new());
    fs::remove_dir(t.p("deldir")).unwrap();
    assert_eq!(outcome(&fs::symlink_metadata(t.p("deldir"))), "ENOENT");
    assert!(
        is_whiteout(t.upper("deldir")),
        "upper deldir is not a char 0/0 whiteout"
    );
    assert!(!names(t.p("")).contains(&"deldir".to_string()));
    // A merged dir whose children all come from lowers is not empty.
    assert_eq!(outcome(&fs::remove_dir(t.p("dir"))), "ENOTEMPTY");
    assert_lowers_untouched(&t);
}

fn opaque_after_rmdir_mkdir(r: Run) {
    let Some(t) = Ctx::new(r, std_setup) else {
        return;
    };
    fs::remove_file(t.p("opq/hidden")).unwrap();
    fs::remove_dir(t.p("opq")).unwrap();
    fs::create_dir(t.p("opq")).unwrap();
    assert_eq!(
        names(t.p("opq")),
        Vec::<String>::new(),
        "lower children leak into a re-created dir"
    );
    assert_eq!(outcome(&fs::symlink_metadata(t.p("opq/hidden"))), "ENOENT");
    assert_eq!(
        getxattr(t.upper("opq"), &overlay_xattr("opaque")).map_err(|e| errname(&e)),
        Ok(b"y".to_vec())
    );
    write(t.p("opq/new"), "n");
    assert_eq!(names(t.p("opq")), strs(&["new"]));
    assert_lowers_untouched(&t);
}

/// Kernel-format markers in a lower: an opaque xattr and a char 0/0 whiteout.
fn markers_setup(l: &Layers) {
    for d in ["m1", "m3"] {
        mkdir(l.l1.join(d));
        write(l.l1.join(d).join("a"), "a");
        write(l.l1.join(d).join("b"), "b");
    }
    write(l.l1.join("top.txt"), "t");
    write(l.l1.join("gone.txt"), "g");
    mkdir(l.l2.join("m1"));
    setxattr(l.l2.join("m1"), &overlay_xattr("opaque"), b"y").unwrap();
    write(l.l2.join("m1/c"), "c");
    mkdir(l.l2.join("m3"));
    mkwhiteout(l.l2.join("m3/a"));
    mkwhiteout(l.l2.join("top.txt"));
}

fn lower_kernel_markers_honoured(r: Run) {
    let Some(t) = Ctx::new(r, markers_setup) else {
        return;
    };
    assert_eq!(
        names(t.p("m1")),
        strs(&["c"]),
        "opaque lower dir must hide the lower layers' children"
    );
    assert_eq!(outcome(&fs::symlink_metadata(t.p("m1/a"))), "ENOENT");
    assert_eq!(
        names(t.p("m3")),
        strs(&["b"]),
        "char 0/0 whiteout in a lower must hide the name"
    );
    assert_eq!(outcome(&fs::symlink_metadata(t.p("top.txt"))), "ENOENT");
    assert!(!names(t.p("")).contains(&"top.txt".to_string()));
    let listed = listxattr(t.p("m1")).unwrap();
    assert!(
        !listed.iter().any(|n| n.contains("overlay.")),
        "overlay marker visible: {listed:?}"
    );
    assert_eq!(read(t.p("gone.txt")), "g");
}

/// AUFS-style markers (`.wh.NAME`, `.wh..wh..opq`) in a lower. The kernel does not know them (it shows
/// them as plain files); our FUSE backend, like fuse-overlayfs, honours them (DESIGN.md §5).
fn aufs_setup(l: &Layers) {
    for d in ["m2", "m3"] {
        mkdir(l.l1.join(d));
        write(l.l1.join(d).join("a"), "a");
        write(l.l1.join(d).join("b"), "b");
    }
    write(l.l1.join("gone.txt"), "g");
    mkdir(l.l2.join("m2"));
    write(l.l2.join("m2/.wh..wh..opq"), "");
    write(l.l2.join("m2/c"), "c");
    mkdir(l.l2.join("m3"));
    write(l.l2.join("m3/.wh.a"), "");
    write(l.l2.join(".wh.gone.txt"), "");
}

fn lower_aufs_markers(r: Run) {
    let Some(t) = Ctx::new(r, aufs_setup) else {
        return;
    };
    if r.backend.is_kernel() {
        assert_eq!(names(t.p("m2")), strs(&[".wh..wh..opq", "a", "b", "c"]));
        assert_eq!(names(t.p("m3")), strs(&[".wh.a", "a", "b"]));
        assert_eq!(read(t.p("gone.txt")), "g");
        return;
    }
    assert_eq!(
        names(t.p("m2")),
        strs(&["c"]),
        ".wh..wh..opq must make m2 opaque"
    );
    assert_eq!(names(t.p("m3")), strs(&["b"]), ".wh.a must hide a");
    assert_eq!(outcome(&fs::symlink_metadata(t.p("m3/a"))), "ENOENT");
    assert_eq!(outcome(&fs::symlink_metadata(t.p("gone.txt"))), "ENOENT");
    assert_eq!(
        outcome(&fs::symlink_metadata(t.p(".wh.gone.txt"))),
        "ENOENT",
        "marker files must not be visible"
    );
    let root = names(t.p(""));
    assert!(
        !root
            .iter()
            .any(|n| n.starts_with(".wh.") || n == "gone.txt"),
        "{root:?}"
    );
}

// ---------------------------------------------------------------------------------------------------------
// Readdir.

fn readdir_merged(r: Run) {
    let Some(t) = Ctx::new(r, std_setup) else {
        return;
    };
    fs::remove_file(t.p("dir/two")).unwrap();
    write(t.p("dir/four"), "4");
    write(t.p("dir/one"), "1 upper"); // in both lowers and now upper
    let raw = raw_names(t.p("dir"));
    assert_eq!(raw.iter().filter(|n| *n == ".").count(), 1, "{raw:?}");
    assert_eq!(raw.iter().filter(|n| *n == "..").count(), 1, "{raw:?}");
    let got = names(t.p("dir")); // asserts no duplicates
    assert_eq!(got, strs(&["four", "one", "sub", "three"]));
    let root = names(t.p(""));
    let want = strs(&[
        "a.txt",
        "cu",
        "deldir",
        "dir",
        "l2only",
        "lfifo",
        "link",
        "opq",
        "pub",
        "ro.txt",
        "shadow.txt",
    ]);
    assert_eq!(root, want);
    // d_type agrees with lstat.
    for e in fs::read_dir(t.p("")).unwrap() {
        let e = e.unwrap();
        assert_eq!(
            e.file_type().unwrap(),
            lstat(e.path()).file_type(),
            "d_type of {:?}",
            e.file_name()
        );
    }
    let kernel = t.same_as_kernel("merged listing", |m| {
        if exists(m.p("dir/two")) {
            fs::remove_file(m.p("dir/two")).unwrap();
            write(m.p("dir/four"), "4");
            write(m.p("dir/one"), "1 upper");
        }
        (names(m.p("")), names(m.p("dir")))
    });
    assert_eq!(kernel.1, got);
}

fn big_setup(l: &Layers) {
    mkdir(l.l1.join("big"));
    mkdir(l.l2.join("big"));
    for i in 0..3000 {
        fs::File::create(l.l1.join(format!("big/f{i:05}"))).unwrap();
    }
    for i in 2000..4000 {
        fs::File::create(l.l2.join(format!("big/f{i:05}"))).unwrap();
    }
}

fn readdir_large(r: Run) {
    let Some(t) = Ctx::new(r, big_setup) else {
        return;
    };
    for i in 0..100 {
        fs::remove_file(t.p(&format!("big/f{i:05}"))).unwrap();
    }
    for i in 4000..5100 {
        fs::File::create(t.p(&format!("big/f{i:05}"))).unwrap();
    }
    let want: Vec<String> = (100..5100).map(|i| format!("f{i:05}")).collect();
    let first = names(t.p("big"));
    assert_eq!(first.len(), want.len());
    assert_eq!(first, want);
    let again = names(t.p("big"));
    assert_eq!(again, first, "second listing differs");
    // One open dir handle, read in small getdents64 batches, rewound and read again.
    let mut dir = nix::dir::Dir::open(
        &t.p("big"),
        nix::fcntl::OFlag::O_RDONLY,
        nix::sys::stat::Mode::empty(),
    )
    .unwrap();
    for pass in 0..2 {
        let mut v: Vec<String> = dir
            .iter()
            .map(|e| String::from_utf8_lossy(e.unwrap().file_name().to_bytes()).into_owned())
            .filter(|n| n != "." && n != "..")
            .collect();
        let n = v.len();
        v.sort();
        v.dedup();
        assert_eq!(v.len(), n, "pass {pass}: duplicates");
        assert_eq!(v, want, "pass {pass} over one handle");
    }
}

/// telldir/seekdir on a large merged dir: resuming at a saved position yields exactly the rest.
fn readdir_seek(r: Run) {
    let Some(t) = Ctx::new(r, big_setup) else {
        return;
    };
    write(t.p("big/upper-only"), "u");
    let path = cstr(&t.p("big"));
    // SAFETY: libc dirent API on a stream we own; names copied out before the next readdir.
    unsafe {
        let d = libc::opendir(path.as_ptr());
        assert!(!d.is_null());
        let next = |d: *mut libc::DIR| -> Option<String> {
            let e = libc::readdir(d);
            if e.is_null() {
                None
            } else {
                Some(
                    std::ffi::CStr::from_ptr((*e).d_name.as_ptr())
                        .to_string_lossy()
                        .into_owned(),
                )
            }
        };
        let mut head = Vec::new();
        for _ in 0..2500 {
            head.push(next(d).expect("short dir"));
        }
        let pos = libc::telldir(d);
        let mut tail = Vec::new();
        while let Some(n) = next(d) {
            tail.push(n);
        }
        libc::seekdir(d, pos);
        let mut again = Vec::new();
        while let Some(n) = next(d) {
            again.push(n);
        }
        libc::rewinddir(d);
        let mut all = Vec::new();
        while let Some(n) = next(d) {
            all.push(n);
        }
        libc::closedir(d);
        assert_eq!(
            again, tail,
            "seekdir(telldir()) did not resume at the same entry"
        );
        let mut first: Vec<String> = head.into_iter().chain(tail).collect();
        first.sort();
        all.sort();
        assert_eq!(first, all, "rewinddir listing differs");
        let want = 4000 + 1 + 2; // lowers' union, upper-only, "." and ".."
        assert_eq!(all.len(), want);
    }
}

/// Directory link counts and d_ino are what `find` and `du` rely on: they must match the kernel's
/// (merged dirs report 1, meaning "unknown"; d_ino equals st_ino).
fn dir_nlink_and_d_ino(r: Run) {
    let Some(t) = Ctx::new(r, std_setup) else {
        return;
    };
    let obs = t.same_as_kernel("st_nlink of dirs, d_ino vs st_ino", |m| {
        mkdir(m.p("newdir/a"));
        mkdir(m.p("dir/added"));
        let nlink: Vec<(&str, u64)> = ["", "dir", "dir/sub", "deldir", "pub", "newdir", "opq"]
            .iter()
            .map(|r| (*r, lstat(m.p(r)).nlink()))
            .collect();
        let mut mismatched = Vec::new();
        for d in ["", "dir", "dir/sub", "newdir"] {
            let mut dir = nix::dir::Dir::open(
                &m.p(d),
                nix::fcntl::OFlag::O_RDONLY,
                nix::sys::stat::Mode::empty(),
            )
            .unwrap();
            for e in dir.iter() {
                let e = e.unwrap();
                let name = e.file_name().to_string_lossy().into_owned();
                if name == "." || name == ".." {
                    continue;
                }
                let rel = if d.is_empty() {
                    name.clone()
                } else {
                    format!("{d}/{name}")
                };
                if e.ino() != ino(m.p(&rel)) {
                    mismatched.push(rel);
                }
            }
        }
        (nlink, mismatched)
    });
    assert!(obs.1.is_empty(), "d_ino != st_ino for {:?}", obs.1);
}

/// Several threads copying up, creating, renaming and listing at once; the result must be exact.
fn concurrent_ops(r: Run) {
    fn setup(l: &Layers) {
        for t in 0..4 {
            mkdir(l.l1.join(format!("t{t}")));
            for i in 0..200 {
                write(l.l1.join(format!("t{t}/f{i}")), format!("{t}-{i}"));
            }
        }
        mkdir(l.l1.join("shared"));
    }
    let Some(t) = Ctx::new(r, setup) else {
        return;
    };
    let root = t.p("");
    std::thread::scope(|sc| {
        for th in 0..4 {
            let root = root.clone();
            sc.spawn(move || {
                for i in 0..200 {
                    let f = root.join(format!("t{th}/f{i}"));
                    match i % 4 {
                        0 => OpenOptions::new()
                            .append(true)
                            .open(&f)
                            .unwrap()
                            .write_all(b"+")
                            .unwrap(),
                        1 => fs::rename(&f, root.join(format!("shared/t{th}-f{i}"))).unwrap(),
                        2 => fs::remove_file(&f).unwrap(),
                        _ => write(root.join(format!("shared/new-{th}-{i}")), "n"),
                    }
                }
            });
        }
        let root = root.clone();
        sc.spawn(move || {
            for _ in 0..50 {
                let n = fs::read_dir(root.join("shared")).unwrap().count();
                assert!(n <= 400);
            }
        });
    });
    for th in 0..4 {
        let mut want: Vec<String> = (0..200)
            .filter(|i| i % 4 == 0 || i % 4 == 3)
            .map(|i| format!("f{i}"))
            .collect();
        want.sort();
        assert_eq!(names(t.p(&format!("t{th}"))), want, "t{th}");
        for i in (0..200).step_by(4) {
            assert_eq!(read(t.p(&format!("t{th}/f{i}"))), format!("{th}-{i}+"));
        }
        for i in (1..200).step_by(4) {
            assert_eq!(
                read(t.p(&format!("shared/t{th}-f{i}"))),
                format!("{th}-{i}")
            );
        }
    }
    assert_eq!(names(t.p("shared")).len(), 4 * 100);
    assert_eq!(names(t.l1("t0")).len(), 200, "lower changed");
}

// ---------------------------------------------------------------------------------------------------------
// Rename.

fn rename_file_within_dir(r: Run) {
    let Some(t) = Ctx::new(r, std_setup) else {
        return;
    };
    fs::rename(t.p("dir/two"), t.p("dir/two.b")).unwrap();
    assert_eq!(read(t.p("dir/two.b")), "2\n");
    assert_eq!(outcome(&fs::symlink_metadata(t.p("dir/two"))), "ENOENT");
    assert_eq!(names(t.p("dir")), strs(&["one", "sub", "three", "two.b"]));
    // Rename of a new upper file, and back over the old name.
    write(t.p("dir/n"), "n");
    fs::rename(t.p("dir/n"), t.p("dir/two")).unwrap();
    assert_eq!(read(t.p("dir/two")), "n");
    assert_lowers_untouched(&t);
}

fn rename_file_across_dirs(r: Run) {
    let Some(t) = Ctx::new(r, std_setup) else {
        return;
    };
    fs::rename(t.p("a.txt"), t.p("dir/sub/a.moved")).unwrap();
    assert_eq!(read(t.p("dir/sub/a.moved")), "lower1 a\n");
    assert_eq!(outcome(&fs::symlink_metadata(t.p("a.txt"))), "ENOENT");
    fs::rename(t.p("dir/sub/deep"), t.p("deep")).unwrap();
    assert_eq!(read(t.p("deep")), "deep\n");
    assert_eq!(names(t.p("dir/sub")), strs(&["a.moved"]));
    let md = lstat(t.p("cu"));
    fs::rename(t.p("cu"), t.p("pub/cu")).unwrap();
    let moved = lstat(t.p("pub/cu"));
    assert_eq!(
        (moved.mode(), moved.uid(), moved.mtime()),
        (md.mode(), md.uid(), md.mtime()),
        "rename changed attributes"
    );
    assert_eq!(getxattr(t.p("pub/cu"), "user.test").unwrap(), b"v");
    assert_lowers_untouched(&t);
}

fn rename_file_over_existing(r: Run) {
    let Some(t) = Ctx::new(r, std_setup) else {
        return;
    };
    fs::rename(t.p("shadow.txt"), t.p("l2only")).unwrap(); // lower over lower
    assert_eq!(read(t.p("l2only")), "from L2\n");
    assert_eq!(outcome(&fs::symlink_metadata(t.p("shadow.txt"))), "ENOENT");
    write(t.p("new"), "new");
    fs::rename(t.p("new"), t.p("a.txt")).unwrap(); // upper over lower
    assert_eq!(read(t.p("a.txt")), "new");
    fs::rename(t.p("dir/one"), t.p("ro.txt")).unwrap(); // lower over lower, across dirs
    assert_eq!(read(t.p("ro.txt")), "1 from L2\n");
    assert_eq!(names(t.p("dir")), strs(&["sub", "three", "two"]));
    let root = names(t.p(""));
    assert_eq!(
        root.iter()
            .filter(|n| *n == "a.txt" || *n == "l2only" || *n == "ro.txt")
            .count(),
        3
    );
    assert!(!root.contains(&"shadow.txt".to_string()) && !root.contains(&"new".to_string()));
    assert_lowers_untouched(&t);
}

/// Renaming a directory that exists in a lower: with `redirect_dir=off` the kernel answers EXDEV (callers
/// such as mv then copy); a backend must give the same answer and leave everything in place.
fn rename_lower_dir(r: Run) {
    let Some(t) = Ctx::new(r, std_setup) else {
        return;
    };
    let obs = t.same_as_kernel("rename(2) of lower dirs", |m| {
        let pure_lower = outcome(&fs::rename(m.p("deldir"), m.p("deldir2")));
        write(m.p("dir/touched"), "t"); // dir is now merged and copied up
        let merged = outcome(&fs::rename(m.p("dir"), m.p("dir2")));
        let into_other = outcome(&fs::rename(m.p("opq"), m.p("pub/opq")));
        (
            pure_lower,
            merged,
            into_other,
            names(m.p("")),
            names(m.p("dir")),
        )
    });
    // Our mount contract (redirect_dir off/nofollow) means no redirect xattrs, so an upper stays a valid
    // lower: the kernel must refuse these renames, and a backend must refuse them the same way.
    assert_eq!(
        [obs.0.as_str(), obs.1.as_str(), obs.2.as_str()],
        ["EXDEV"; 3],
        "renaming a lower dir must fail with EXDEV (callers fall back to copying)"
    );
    assert_eq!(names(t.p("deldir")), strs(&["x", "y"]));
    assert_lowers_untouched(&t);
}

fn rename_upper_dir(r: Run) {
    let Some(t) = Ctx::new(r, std_setup) else {
        return;
    };
    let obs = t.same_as_kernel("rename of a pure upper dir over a lower name", |m| {
        mkdir(m.p("fresh"));
        let over_lower_file = outcome(&fs::rename(m.p("fresh"), m.p("a.txt")));
        let over_empty_lower_dir = {
            mkdir(m.p("fresh2"));
            outcome(&fs::rename(m.p("fresh2"), m.p("pub")))
        };
        (
            over_lower_file,
            over_empty_lower_dir,
            names(m.p("")),
            names(m.p("pub")),
        )
    });
    eprintln!("upper dir over lower names: {:?}", (&obs.0, &obs.1));
    mkdir(t.p("newd/inner"));
    write(t.p("newd/inner/f"), "f");
    fs::rename(t.p("newd"), t.p("dir/sub/newd2")).unwrap();
    assert_eq!(read(t.p("dir/sub/newd2/inner/f")), "f");
    assert_eq!(outcome(&fs::symlink_metadata(t.p("newd"))), "ENOENT");
    mkdir(t.p("empty"));
    fs::rename(t.p("dir/sub/newd2"), t.p("empty")).unwrap(); // over an empty dir
    assert_eq!(names(t.p("empty")), strs(&["inner"]));
    assert_eq!(names(t.p("dir/sub")), strs(&["deep"]));
}

// ---------------------------------------------------------------------------------------------------------
// Links and special files.

fn symlinks(r: Run) {
    let Some(t) = Ctx::new(r, std_setup) else {
        return;
    };
    assert!(lstat(t.p("link")).file_type().is_symlink());
    assert_eq!(fs::read_link(t.p("link")).unwrap(), Path::new("a.txt"));
    assert_eq!(
        read(t.p("link")),
        "lower1 a\n",
        "lower symlink resolves within the merged view"
    );
    std::os::unix::fs::symlink("dir/one", t.p("new-link")).unwrap();
    assert_eq!(
        fs::read_link(t.p("new-link")).unwrap(),
        Path::new("dir/one")
    );
    assert_eq!(read(t.p("new-link")), "1 from L2\n");
    std::os::unix::fs::symlink("/nonexistent/target", t.p("dangling")).unwrap();
    assert!(lstat(t.p("dangling")).file_type().is_symlink());
    assert_eq!(outcome(&fs::metadata(t.p("dangling"))), "ENOENT");
    assert_eq!(
        fs::read_link(t.upper("new-link")).unwrap(),
        Path::new("dir/one")
    );
    fs::remove_file(t.p("link")).unwrap();
    assert!(is_whiteout(t.upper("link")));
    assert!(lstat(t.l1("link")).file_type().is_symlink());
}

fn fifos_and_sockets(r: Run) {
    use nix::sys::stat::{mknod, Mode, SFlag};
    let Some(t) = Ctx::new(r, std_setup) else {
        return;
    };
    assert!(lstat(t.p("lfifo")).file_type().is_fifo(), "lower fifo");
    nix::unistd::mkfifo(&t.p("fifo"), Mode::from_bits_truncate(0o640)).unwrap();
    mknod(
        &t.p("sock"),
        SFlag::S_IFSOCK,
        Mode::from_bits_truncate(0o600),
        0,
    )
    .unwrap();
    mknod(
        &t.p("fifo2"),
        SFlag::S_IFIFO,
        Mode::from_bits_truncate(0o600),
        0,
    )
    .unwrap();
    for (n, want) in [("fifo", "fifo"), ("fifo2", "fifo"), ("sock", "socket")] {
        for p in [t.p(n), t.upper(n)] {
            let ft = lstat(&p).file_type();
            let got = if ft.is_fifo() {
                "fifo"
            } else if ft.is_socket() {
                "socket"
            } else {
                "other"
            };
            assert_eq!(got, want, "{}", p.display());
        }
    }
    assert_eq!(lstat(t.p("fifo")).mode() & 0o777, 0o640 & !umask());
    chmod(t.p("lfifo"), 0o600); // copy-up of a fifo
    let md = lstat(t.upper("lfifo"));
    assert!(md.file_type().is_fifo());
    assert_eq!(md.mode() & 0o777, 0o600);
    let devs = t.same_as_kernel("mknod of a char device, user xattr on a symlink", |m| {
        let dev = outcome(
            &mknod(
                &m.p("null"),
                SFlag::S_IFCHR,
                Mode::from_bits_truncate(0o666),
                nix::sys::stat::makedev(1, 3),
            )
            .map_err(std::io::Error::from),
        );
        let rdev = fs::symlink_metadata(m.p("null"))
            .map(|md| (md.file_type().is_char_device(), md.rdev()));
        let on_link = outcome(&setxattr(m.p("link"), "user.x", b"1"));
        (dev, rdev.map_err(|e| errname(&e)), on_link)
    });
    eprintln!(
        "{} [{}]: char device, xattr on symlink: {devs:?}",
        r.test,
        r.backend.name()
    );
    // A real unix socket bound in the merged dir.
    let l = std::os::unix::net::UnixListener::bind(t.p("bound.sock")).unwrap();
    assert!(lstat(t.p("bound.sock")).file_type().is_socket());
    drop(l);
}

fn umask() -> u32 {
    let old = nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o022));
    nix::sys::stat::umask(old);
    old.bits()
}

// ---------------------------------------------------------------------------------------------------------
// Xattrs.

fn xattr_user(r: Run) {
    let Some(t) = Ctx::new(r, std_setup) else {
        return;
    };
    for rel in ["a.txt", "dir", "newfile"] {
        if rel == "newfile" {
            write(t.p(rel), "n");
        }
        let p = t.p(rel);
        assert_eq!(outcome(&getxattr(&p, "user.k")), "ENODATA", "{rel}");
        setxattr(&p, "user.k", b"value").unwrap();
        setxattr(&p, "user.k2", b"").unwrap();
        assert_eq!(getxattr(&p, "user.k").unwrap(), b"value");
        assert_eq!(getxattr(&p, "user.k2").unwrap(), b"");
        assert_eq!(
            user_xattrs(&p).unwrap(),
            strs(&["user.k", "user.k2"]),
            "{rel}"
        );
        setxattr(&p, "user.k", b"v2").unwrap();
        assert_eq!(getxattr(&p, "user.k").unwrap(), b"v2");
        removexattr(&p, "user.k").unwrap();
        assert_eq!(outcome(&getxattr(&p, "user.k")), "ENODATA");
        assert_eq!(outcome(&removexattr(&p, "user.k")), "ENODATA");
        assert_eq!(user_xattrs(&p).unwrap(), strs(&["user.k2"]));
        assert_eq!(
            getxattr(t.upper(rel), "user.k2").unwrap(),
            b"",
            "upper {rel}"
        );
    }
    assert_eq!(
        user_xattrs(t.l1("a.txt")).unwrap(),
        Vec::<String>::new(),
        "lower changed"
    );
}

/// Overlay's own xattrs (opaque, origin, impure, ...) never show in the merged view.
fn xattr_overlay_private_hidden(r: Run) {
    let Some(t) = Ctx::new(r, std_setup) else {
        return;
    };
    let obs = t.same_as_kernel("overlay xattrs in the merged view", |m| {
        fs::remove_file(m.p("opq/hidden")).unwrap();
        fs::remove_dir(m.p("opq")).unwrap();
        fs::create_dir(m.p("opq")).unwrap();
        write(m.p("dir/one"), "copied up");
        fs::rename(m.p("dir/two"), m.p("dir/two.renamed")).unwrap(); // makes dir "impure" in the kernel
        setxattr(m.p("dir"), "user.mine", b"1").unwrap();
        let mut out = Vec::new();
        for rel in ["", "opq", "dir", "dir/one", "dir/two.renamed"] {
            out.push((rel, listxattr(m.p(rel)).map_err(|e| errname(&e))));
        }
        let get = outcome(&getxattr(m.p("opq"), &overlay_xattr("opaque")));
        (out, get)
    });
    for (rel, list) in &obs.0 {
        let list = list.as_ref().unwrap();
        assert!(
            !list.iter().any(|n| n.contains("overlay.")),
            "{rel}: {list:?}"
        );
    }
    assert!(obs
        .0
        .iter()
        .any(|(rel, l)| *rel == "dir" && l.as_ref().unwrap().contains(&"user.mine".to_string())));
    assert!(
        getxattr(t.upper("opq"), &overlay_xattr("opaque")).is_ok(),
        "upper opq has no opaque marker"
    );
}

// ---------------------------------------------------------------------------------------------------------
// Permissions.

fn permissions_nonroot(r: Run) {
    if in_userns() {
        r.skip("needs a second uid; a `unshare -U` namespace maps only one");
        return;
    }
    let Some(t) = Ctx::new(r, std_setup) else {
        return;
    };
    let (uid, gid) = (1000, 1000);
    let ro = cstr(&t.p("ro.txt"));
    let mine = cstr(&t.p("pub/mine"));
    let subdir = cstr(&t.p("pub/d"));
    let in_root = cstr(&t.p("rootnew"));
    let open = |p: &std::ffi::CString, flags: i32| {
        let p = p.as_ptr();
        move || {
            // SAFETY: raw syscalls only (see `as_user`).
            unsafe {
                let fd = libc::open(p, flags, 0o644);
                if fd < 0 {
                    return last_errno();
                }
                if flags & libc::O_ACCMODE != libc::O_RDONLY
                    && libc::write(fd, b"x".as_ptr().cast(), 1) != 1
                {
                    return last_errno();
                }
                libc::close(fd);
                0
            }
        }
    };
    assert_eq!(
        as_user(uid, gid, open(&ro, libc::O_WRONLY)),
        libc::EACCES,
        "write to a root 0644 file"
    );
    assert_eq!(
        as_user(uid, gid, open(&ro, libc::O_RDONLY)),
        0,
        "read of a root 0644 file"
    );
    assert_eq!(
        as_user(uid, gid, open(&in_root, libc::O_WRONLY | libc::O_CREAT)),
        libc::EACCES,
        "create in a root 0755 dir"
    );
    assert_eq!(
        as_user(
            uid,
            gid,
            open(&mine, libc::O_WRONLY | libc::O_CREAT | libc::O_EXCL)
        ),
        0,
        "create in a 0777 dir"
    );
    let sp = subdir.as_ptr();
    // SAFETY: raw syscall only.
    assert_eq!(
        as_user(uid, gid, move || unsafe {
            if libc::mkdir(sp, 0o755) == 0 {
                0
            } else {
                last_errno()
            }
        }),
        0
    );
    for p in [
        t.p("pub/mine"),
        t.p("pub/d"),
        t.upper("pub/mine"),
        t.upper("pub/d"),
    ] {
        let md = lstat(&p);
        assert_eq!((md.uid(), md.gid()), (uid, gid), "owner of {}", p.display());
    }
    assert_eq!(read(t.p("pub/mine")), "x");
    assert_eq!(read(t.p("ro.txt")), "read only\n");
    assert!(
        !exists(t.upper("ro.txt")),
        "a denied write copied ro.txt up"
    );
    assert_eq!(lstat(t.p("pub")).mode() & 0o7777, 0o777);
    let md = lstat(t.p("ro.txt"));
    assert_eq!((md.uid(), md.mode() & 0o7777), (0, 0o644));
}

fn perm_setup(l: &Layers) {
    let l1 = &l.l1;
    mkdir(l1.join("home"));
    chown(l1.join("home"), 1000, 1000);
    write(l1.join("home/mine.txt"), "mine\n");
    chmod(l1.join("home/mine.txt"), 0o644);
    chown(l1.join("home/mine.txt"), 1000, 1000);
    set_mtime(l1.join("home/mine.txt"), CU_MTIME);
    mkdir(l1.join("sgid"));
    chown(l1.join("sgid"), 0, 5678);
    chmod(l1.join("sgid"), 0o2777);
    mkdir(l1.join("sticky"));
    chmod(l1.join("sticky"), 0o1777);
    write(l1.join("sticky/rootfile"), "r");
    chmod(l1.join("sticky/rootfile"), 0o666);
    write(l1.join("secret"), "s");
    chmod(l1.join("secret"), 0o600);
    mkdir(l1.join("rootdir/deeper"));
    write(l1.join("rootdir/deeper/world.txt"), "w");
    chmod(l1.join("rootdir/deeper/world.txt"), 0o666);
}

/// Copy-up and creation done on behalf of a non-root caller: owners kept, setgid dirs, sticky dirs,
/// owner-only operations. Compared with the kernel.
fn permissions_nonroot_copy_up(r: Run) {
    if in_userns() {
        r.skip("needs a second uid; a `unshare -U` namespace maps only one");
        return;
    }
    let Some(t) = Ctx::new(r, perm_setup) else {
        return;
    };
    let obs = t.same_as_kernel("non-root copy-up and creation", |m| {
        let mine = cstr(&m.p("home/mine.txt"));
        let sgid_new = cstr(&m.p("sgid/new"));
        let sgid_dir = cstr(&m.p("sgid/dir"));
        let rootfile = cstr(&m.p("sticky/rootfile"));
        let world = cstr(&m.p("rootdir/deeper/world.txt"));
        let wp = world.as_ptr();
        // SAFETY: raw syscalls only, see `as_user`.
        let write_world = as_user(1000, 1000, move || unsafe {
            let fd = libc::open(wp, libc::O_WRONLY | libc::O_APPEND);
            if fd < 0 || libc::write(fd, b"+".as_ptr().cast(), 1) != 1 {
                return last_errno();
            }
            libc::close(fd);
            0
        });
        let secret = cstr(&m.p("secret"));
        let sp = secret.as_ptr();
        // SAFETY: raw syscalls only, see `as_user`.
        let read_secret = as_user(1000, 1000, move || unsafe {
            let fd = libc::open(sp, libc::O_RDONLY);
            if fd < 0 {
                return last_errno();
            }
            libc::close(fd);
            0
        });
        let (mp, sn, sd, rf) = (
            mine.as_ptr(),
            sgid_new.as_ptr(),
            sgid_dir.as_ptr(),
            rootfile.as_ptr(),
        );
        // SAFETY (all closures): raw syscalls only, see `as_user`.
        let append = as_user(1000, 1000, move || unsafe {
            let fd = libc::open(mp, libc::O_WRONLY | libc::O_APPEND);
            if fd < 0 || libc::write(fd, b"+".as_ptr().cast(), 1) != 1 {
                return last_errno();
            }
            libc::close(fd);
            0
        });
        let chmod_own = as_user(1000, 1000, move || unsafe {
            if libc::chmod(mp, 0o600) == 0 {
                0
            } else {
                last_errno()
            }
        });
        let chown_own = as_user(1000, 1000, move || unsafe {
            if libc::chown(mp, 0, 0) == 0 {
                0
            } else {
                last_errno()
            }
        });
        let create_sgid = as_user(1000, 1000, move || unsafe {
            let fd = libc::open(sn, libc::O_WRONLY | libc::O_CREAT | libc::O_EXCL, 0o644);
            if fd < 0 {
                return last_errno();
            }
            libc::close(fd);
            if libc::mkdir(sd, 0o755) == 0 {
                0
            } else {
                last_errno()
            }
        });
        let unlink_sticky = as_user(1000, 1000, move || unsafe {
            if libc::unlink(rf) == 0 {
                0
            } else {
                last_errno()
            }
        });
        let md = |rel: &str| {
            let md = lstat(m.p(rel));
            (md.uid(), md.gid(), md.mode() & 0o7777)
        };
        (
            (
                append,
                chmod_own,
                chown_own,
                create_sgid,
                unlink_sticky,
                read_secret,
                write_world,
            ),
            md("home/mine.txt"),
            md("sgid/new"),
            md("sgid/dir"),
            read(m.p("home/mine.txt")),
            exists(m.p("sticky/rootfile")),
            (md("rootdir/deeper/world.txt"), md("rootdir/deeper")),
        )
    });
    assert_eq!(obs.0 .0, 0, "owner appends to own lower file");
    assert_eq!(obs.0 .5, libc::EACCES, "uid 1000 read a root 0600 file");
    assert_eq!(
        obs.0 .6, 0,
        "uid 1000 appends to a root 0666 file under root 0755 dirs (copy-up by the fs)"
    );
    assert_eq!(obs.1 .0, 1000, "copy-up kept the owner");
    assert_eq!(obs.4, "mine\n+");
    let up = lstat(t.upper("home/mine.txt"));
    assert_eq!((up.uid(), up.gid()), (1000, 1000), "upper copy owner");
    assert_eq!(lstat(t.upper("home")).uid(), 1000, "copied-up parent owner");
}

// ---------------------------------------------------------------------------------------------------------
// Files: statfs, fsync, fallocate, sparse, open flags, mmap.

fn statfs_works(r: Run) {
    let Some(t) = Ctx::new(r, std_setup) else {
        return;
    };
    let s = nix::sys::statvfs::statvfs(t.p("").as_path()).unwrap();
    assert!(
        s.block_size() > 0 && s.blocks() > 0 && s.name_max() > 0,
        "{s:?}"
    );
    let f = fs::File::open(t.p("a.txt")).unwrap();
    let fs2 = nix::sys::statvfs::fstatvfs(&f).unwrap();
    assert_eq!(fs2.block_size(), s.block_size());
    // A lower-only subdirectory too.
    nix::sys::statvfs::statvfs(t.p("dir/sub").as_path()).unwrap();
}

fn fsync_works(r: Run) {
    let Some(t) = Ctx::new(r, std_setup) else {
        return;
    };
    let mut f = fs::File::create(t.p("synced")).unwrap();
    f.write_all(b"durable").unwrap();
    f.sync_all().unwrap();
    f.sync_data().unwrap();
    drop(f);
    fs::File::open(t.p("")).unwrap().sync_all().unwrap(); // fsync of the merged dir
    fs::File::open(t.p("dir")).unwrap().sync_all().unwrap();
    fs::File::open(t.p("a.txt")).unwrap().sync_all().unwrap(); // read-only fd on a lower file
    let mut f = OpenOptions::new()
        .append(true)
        .open(t.p("shadow.txt"))
        .unwrap();
    f.write_all(b"+").unwrap();
    f.sync_all().unwrap();
    assert_eq!(read(t.upper("synced")), "durable");
    assert_eq!(read(t.upper("shadow.txt")), "from L2\n+");
    assert!(
        !exists(t.upper("a.txt")),
        "fsync of a read-only fd copied up"
    );
}

fn fallocate_works(r: Run) {
    use nix::fcntl::{fallocate, FallocateFlags};
    let Some(t) = Ctx::new(r, std_setup) else {
        return;
    };
    let f = OpenOptions::new()
        .create(true)
        .truncate(true)
        .read(true)
        .write(true)
        .open(t.p("alloc"))
        .unwrap();
    fallocate(&f, FallocateFlags::empty(), 0, 1 << 20).unwrap();
    let md = f.metadata().unwrap();
    assert_eq!(md.len(), 1 << 20);
    assert!(md.blocks() * 512 >= 1 << 20, "blocks {}", md.blocks());
    f.write_all_at(b"abc", 4096).unwrap();
    let obs = t.same_as_kernel("fallocate modes", |m| {
        let f = OpenOptions::new()
            .create(true)
            .truncate(true)
            .read(true)
            .write(true)
            .open(m.p("modes"))
            .unwrap();
        f.write_all_at(&[7u8; 8192], 0).unwrap();
        let keep = outcome(
            &fallocate(&f, FallocateFlags::FALLOC_FL_KEEP_SIZE, 8192, 65536)
                .map_err(std::io::Error::from),
        );
        let len_after_keep = f.metadata().unwrap().len();
        let punch = outcome(
            &fallocate(
                &f,
                FallocateFlags::FALLOC_FL_PUNCH_HOLE | FallocateFlags::FALLOC_FL_KEEP_SIZE,
                0,
                4096,
            )
            .map_err(std::io::Error::from),
        );
        let mut buf = [1u8; 4];
        f.read_exact_at(&mut buf, 0).unwrap();
        (keep, len_after_keep, punch, buf)
    });
    eprintln!("fallocate modes: {obs:?}");
    // On a lower file: copy-up, contents intact, size kept with KEEP_SIZE.
    let f = OpenOptions::new().write(true).open(t.p("a.txt")).unwrap();
    fallocate(&f, FallocateFlags::FALLOC_FL_KEEP_SIZE, 0, 1 << 16).unwrap();
    drop(f);
    assert_eq!(read(t.p("a.txt")), "lower1 a\n");
    assert!(lstat(t.upper("a.txt")).is_file());
}

fn sparse_over_4gib(r: Run) {
    let Some(t) = Ctx::new(r, std_setup) else {
        return;
    };
    const OFF: u64 = 5 << 30;
    for rel in ["sparse", "a.txt"] {
        let f = OpenOptions::new()
            .create(true)
            .truncate(false)
            .read(true)
            .write(true)
            .open(t.p(rel))
            .unwrap();
        f.write_all_at(b"end", OFF).unwrap();
        drop(f);
        let md = lstat(t.p(rel));
        assert_eq!(md.len(), OFF + 3, "{rel}");
        assert!(
            md.blocks() < 1 << 15,
            "{rel}: {} blocks: not sparse",
            md.blocks()
        );
        let mut f = fs::File::open(t.p(rel)).unwrap();
        let mut buf = [0u8; 3];
        f.read_exact_at(&mut buf, OFF).unwrap();
        assert_eq!(&buf, b"end");
        f.read_exact_at(&mut buf, OFF - 3).unwrap();
        assert_eq!(buf, [0, 0, 0], "{rel}: hole reads as zeros");
        assert_eq!(f.seek(SeekFrom::End(0)).unwrap(), OFF + 3);
        assert_eq!(lstat(t.upper(rel)).len(), OFF + 3, "{rel} upper size");
    }
    let mut head = [0u8; 9];
    fs::File::open(t.p("a.txt"))
        .unwrap()
        .read_exact(&mut head)
        .unwrap();
    assert_eq!(&head, b"lower1 a\n");
}

fn open_flags(r: Run) {
    let Some(t) = Ctx::new(r, std_setup) else {
        return;
    };
    // O_APPEND writes at the end even after a seek.
    let mut f = OpenOptions::new()
        .append(true)
        .open(t.p("shadow.txt"))
        .unwrap();
    f.seek(SeekFrom::Start(0)).unwrap();
    f.write_all(b"tail").unwrap();
    drop(f);
    assert_eq!(read(t.p("shadow.txt")), "from L2\ntail");
    // O_TRUNC on a lower file.
    drop(
        OpenOptions::new()
            .write(true)
            .truncate(true)
            .open(t.p("a.txt"))
            .unwrap(),
    );
    assert_eq!(read(t.p("a.txt")), "");
    assert_eq!(lstat(t.upper("a.txt")).len(), 0);
    assert_eq!(read(t.l1("a.txt")), "lower1 a\n");
    // O_EXCL.
    let excl = |rel: &str| {
        outcome(
            &OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(t.p(rel)),
        )
    };
    assert_eq!(excl("l2only"), "EEXIST", "O_EXCL on a top-lower file");
    assert_eq!(excl("dir/two"), "EEXIST", "O_EXCL on a bottom-lower file");
    assert_eq!(excl("dir"), "EEXIST", "O_EXCL on a dir");
    assert_eq!(excl("link"), "EEXIST", "O_EXCL on a symlink");
    fs::remove_file(t.p("ro.txt")).unwrap();
    assert_eq!(excl("ro.txt"), "ok", "O_EXCL over a whiteout");
    assert_eq!(excl("brand-new"), "ok");
    assert_eq!(read(t.p("ro.txt")), "");
    // O_CREAT without O_EXCL on a lower file opens it (no truncation).
    drop(
        OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false)
            .open(t.p("dir/one"))
            .unwrap(),
    );
    assert_eq!(read(t.p("dir/one")), "1 from L2\n");
    // Flags whose errors are the kernel's to define.
    t.same_as_kernel(
        "open(O_DIRECTORY) on a file, O_NOFOLLOW on a symlink",
        |m| {
            let d = outcome(
                &OpenOptions::new()
                    .read(true)
                    .custom_flags(libc::O_DIRECTORY)
                    .open(m.p("a.txt")),
            );
            let nf = outcome(
                &OpenOptions::new()
                    .read(true)
                    .custom_flags(libc::O_NOFOLLOW)
                    .open(m.p("link")),
            );
            (d, nf)
        },
    );
}

fn mmap_shared_write(r: Run) {
    let Some(t) = Ctx::new(r, std_setup) else {
        return;
    };
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .open(t.p("a.txt"))
        .unwrap();
    let len = f.metadata().unwrap().len() as usize;
    // SAFETY: mapping a file we hold open, for its length; unmapped below.
    let ptr = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
            f.as_raw_fd(),
            0,
        )
    };
    assert_ne!(
        ptr,
        libc::MAP_FAILED,
        "mmap: {}",
        std::io::Error::last_os_error()
    );
    // SAFETY: ptr is a valid writable mapping of `len` >= 6 bytes.
    unsafe { std::ptr::copy_nonoverlapping(b"MAPPED".as_ptr(), ptr.cast::<u8>(), 6) };
    assert_eq!(
        read(t.p("a.txt")),
        "MAPPED a\n",
        "shared mapping not visible to read(2) before msync"
    );
    // SAFETY: same mapping.
    unsafe {
        assert_eq!(libc::msync(ptr, len, libc::MS_SYNC), 0);
        assert_eq!(libc::munmap(ptr, len), 0);
    }
    drop(f);
    assert_eq!(read(t.p("a.txt")), "MAPPED a\n");
    assert_eq!(read(t.upper("a.txt")), "MAPPED a\n");
    assert_eq!(read(t.l1("a.txt")), "lower1 a\n");
}

/// st_ino is stable across repeated stat and, where the kernel keeps it, across copy-up and rename.
fn inode_stable(r: Run) {
    let Some(t) = Ctx::new(r, std_setup) else {
        return;
    };
    let obs = t.same_as_kernel("inode numbers across copy-up and rename", |m| {
        let stable = |rel: &str| ino(m.p(rel)) == ino(m.p(rel));
        let repeated = ["a.txt", "dir", "dir/sub/deep", "link", ""]
            .iter()
            .all(|r| stable(r));
        let (f0, d0) = (ino(m.p("a.txt")), ino(m.p("dir/sub")));
        let fd = fs::File::open(m.p("a.txt")).unwrap();
        OpenOptions::new()
            .append(true)
            .open(m.p("a.txt"))
            .unwrap()
            .write_all(b"+")
            .unwrap();
        write(m.p("dir/sub/new"), "n");
        let file_after_copy_up = ino(m.p("a.txt")) == f0;
        let fstat_agrees = fd.metadata().unwrap().ino() == ino(m.p("a.txt"));
        let dir_after_copy_up = ino(m.p("dir/sub")) == d0;
        fs::rename(m.p("a.txt"), m.p("a.renamed")).unwrap();
        let after_rename = ino(m.p("a.renamed")) == f0;
        write(m.p("fresh"), "f");
        let fresh = ino(m.p("fresh"));
        let fresh_stable = (0..5).all(|_| ino(m.p("fresh")) == fresh);
        let distinct = fresh != ino(m.p("a.renamed")) && ino(m.p("dir")) != ino(m.p("dir/sub"));
        (
            repeated,
            file_after_copy_up,
            fstat_agrees,
            dir_after_copy_up,
            after_rename,
            fresh_stable,
            distinct,
        )
    });
    eprintln!("{} [{}] inode stability: {obs:?}", r.test, r.backend.name());
    assert!(
        obs.0 && obs.5 && obs.6,
        "inode numbers unstable or reused: {obs:?}"
    );
}

fn readonly_mount(r: Run) {
    let Some(t) = Ctx::new_ro(r, std_setup) else {
        return;
    };
    assert_eq!(read(t.p("shadow.txt")), "from L2\n");
    let obs = t.same_as_kernel_with("errors on a read-only union", true, |m| {
        (
            outcome(&OpenOptions::new().write(true).open(m.p("a.txt"))),
            outcome(&fs::File::create(m.p("new"))),
            outcome(&fs::create_dir(m.p("newdir"))),
            outcome(&fs::remove_file(m.p("a.txt"))),
            outcome(&fs::rename(m.p("a.txt"), m.p("b.txt"))),
            outcome(&setxattr(m.p("a.txt"), "user.x", b"1")),
            outcome(&fs::read_to_string(m.p("dir/sub/deep"))),
        )
    });
    assert_eq!(obs.0, "EROFS");
    assert_eq!(obs.6, "ok");
    assert_lowers_untouched(&t);
}

/// `rm -rf` of a large merged dir: unlinking while reading must neither skip nor repeat entries.
fn readdir_while_deleting(r: Run) {
    let Some(t) = Ctx::new(r, big_setup) else {
        return;
    };
    for i in 4000..4100 {
        fs::File::create(t.p(&format!("big/f{i:05}"))).unwrap();
    }
    let mut seen = std::collections::BTreeSet::new();
    let mut dir = nix::dir::Dir::open(
        &t.p("big"),
        nix::fcntl::OFlag::O_RDONLY,
        nix::sys::stat::Mode::empty(),
    )
    .unwrap();
    for e in dir.iter() {
        let name = String::from_utf8_lossy(e.unwrap().file_name().to_bytes()).into_owned();
        if name == "." || name == ".." {
            continue;
        }
        assert!(seen.insert(name.clone()), "{name} returned twice");
        fs::remove_file(t.p(&format!("big/{name}"))).unwrap();
    }
    drop(dir);
    assert_eq!(seen.len(), 4100, "entries skipped while deleting");
    assert_eq!(names(t.p("big")), Vec::<String>::new());
    fs::remove_dir(t.p("big")).unwrap();
    assert!(is_whiteout(t.upper("big")));
    assert_eq!(fs::read_dir(t.l1("big")).unwrap().count(), 3000);
}

/// An unlinked file stays usable through descriptors opened before the unlink.
fn unlink_open_file(r: Run) {
    let Some(t) = Ctx::new(r, std_setup) else {
        return;
    };
    let mut lower_fd = fs::File::open(t.p("a.txt")).unwrap();
    fs::remove_file(t.p("a.txt")).unwrap();
    let mut s = String::new();
    lower_fd.read_to_string(&mut s).unwrap();
    assert_eq!(s, "lower1 a\n");
    let mut f = OpenOptions::new()
        .create(true)
        .truncate(true)
        .read(true)
        .write(true)
        .open(t.p("tmp"))
        .unwrap();
    fs::remove_file(t.p("tmp")).unwrap();
    f.write_all(b"still here").unwrap();
    f.seek(SeekFrom::Start(0)).unwrap();
    let mut s = String::new();
    f.read_to_string(&mut s).unwrap();
    assert_eq!(s, "still here");
    assert_eq!(f.metadata().unwrap().nlink(), 0);
    assert!(!exists(t.p("tmp")) && !exists(t.upper("tmp")));
    // Hard links: removing one name leaves the other with nlink 1.
    write(t.p("h1"), "h");
    fs::hard_link(t.p("h1"), t.p("h2")).unwrap();
    fs::remove_file(t.p("h1")).unwrap();
    assert_eq!(lstat(t.p("h2")).nlink(), 1);
    assert_eq!(read(t.p("h2")), "h");
}

fn sparse_setup(l: &Layers) {
    let f = File::create(l.l1.join("sparse")).unwrap();
    f.write_all_at(b"tail", (1 << 30) - 4).unwrap();
    let chunk: Vec<u8> = (0..1 << 20).map(|i: u32| (i % 251) as u8).collect();
    let mut f = File::create(l.l1.join("large")).unwrap();
    for _ in 0..32 {
        f.write_all(&chunk).unwrap();
    }
    std_setup(l);
}

/// Copy-up of a 32 MiB file and of a 1 GiB sparse file: contents intact; holes kept if the kernel keeps them.
fn copy_up_large_and_sparse(r: Run) {
    let Some(t) = Ctx::new(r, sparse_setup) else {
        return;
    };
    let want = fs::read(t.l1("large")).unwrap();
    OpenOptions::new()
        .append(true)
        .open(t.p("large"))
        .unwrap()
        .write_all(b"!")
        .unwrap();
    let got = fs::read(t.p("large")).unwrap();
    assert_eq!(got.len(), want.len() + 1);
    assert!(
        got[..want.len()] == want[..] && got[want.len()] == b'!',
        "large copy-up corrupted"
    );
    let holes = t.same_as_kernel("sparse copy-up keeps holes", |m| {
        chmod(m.p("sparse"), 0o600); // copy-up without a data change
        lstat(m.p("sparse")).blocks() < 1 << 16 // < 32 MiB allocated for a 1 GiB file
    });
    eprintln!(
        "{} [{}]: sparse copy-up keeps holes: {holes}",
        r.test,
        r.backend.name()
    );
    let md = lstat(t.upper("sparse"));
    assert_eq!(md.len(), 1 << 30);
    let mut buf = [0u8; 4];
    File::open(t.p("sparse"))
        .unwrap()
        .read_exact_at(&mut buf, (1 << 30) - 4)
        .unwrap();
    assert_eq!(&buf, b"tail");
    assert_eq!(
        fs::read(t.l1("large")).unwrap().len(),
        want.len(),
        "lower changed"
    );
}

/// Attribute changes on a merged directory copy up the directory only: lower children stay visible and
/// the upper dir is not opaque.
fn copy_up_dir_attrs(r: Run) {
    let Some(t) = Ctx::new(r, std_setup) else {
        return;
    };
    chmod(t.p("dir/sub"), 0o700);
    set_mtime(t.p("dir"), 1_500_000_000);
    setxattr(t.p("deldir"), "user.d", b"1").unwrap();
    if !in_userns() {
        chown(t.p("opq"), 42, 43);
    }
    assert_eq!(lstat(t.p("dir/sub")).mode() & 0o7777, 0o700);
    assert_eq!(lstat(t.p("dir")).mtime(), 1_500_000_000);
    assert_eq!(getxattr(t.p("deldir"), "user.d").unwrap(), b"1");
    assert_eq!(names(t.p("dir/sub")), strs(&["deep"]));
    assert_eq!(names(t.p("dir")), strs(&["one", "sub", "three", "two"]));
    assert_eq!(names(t.p("deldir")), strs(&["x", "y"]));
    assert_eq!(names(t.p("opq")), strs(&["hidden"]));
    for d in ["dir", "dir/sub", "deldir"] {
        assert!(lstat(t.upper(d)).is_dir(), "upper {d} missing");
        assert_eq!(
            outcome(&getxattr(t.upper(d), &overlay_xattr("opaque"))),
            "ENODATA",
            "upper {d} must not be opaque"
        );
    }
    assert_eq!(read(t.p("dir/sub/deep")), "deep\n");
    assert!(!exists(t.upper("dir/sub/deep")));
}

fn odd_names_setup(l: &Layers) {
    use std::os::unix::ffi::OsStrExt;
    let os = |b: &[u8]| std::ffi::OsStr::from_bytes(b).to_os_string();
    for n in [
        &b"with space"[..],
        b"new\nline",
        b"\xff\xfe-not-utf8",
        b".whatever",
        b"wh.x",
        b"...",
    ] {
        fs::write(l.l1.join(os(n)), n).unwrap();
    }
    fs::write(l.l1.join("x".repeat(255)), "long").unwrap();
    mkdir(l.l1.join("d"));
}

/// Names a union filesystem must pass through untouched: spaces, newlines, non-UTF-8 bytes, names that
/// merely start like whiteout markers, 255-byte names.
fn odd_names(r: Run) {
    use std::os::unix::ffi::{OsStrExt, OsStringExt};
    let Some(t) = Ctx::new(r, odd_names_setup) else {
        return;
    };
    let listed: Vec<Vec<u8>> = {
        let mut v: Vec<Vec<u8>> = fs::read_dir(t.p(""))
            .unwrap()
            .map(|e| e.unwrap().file_name().into_vec())
            .collect();
        v.sort();
        v
    };
    let lower: Vec<Vec<u8>> = {
        let mut v: Vec<Vec<u8>> = fs::read_dir(t.l1(""))
            .unwrap()
            .map(|e| e.unwrap().file_name().into_vec())
            .collect();
        v.sort();
        v
    };
    assert_eq!(listed, lower);
    for n in &lower {
        let p = t.p("").join(std::ffi::OsStr::from_bytes(n));
        if n.as_slice() != b"d" && n.len() < 255 {
            assert_eq!(
                fs::read(&p).unwrap(),
                *n,
                "{:?}",
                String::from_utf8_lossy(n)
            );
        }
    }
    let obs = t.same_as_kernel("odd names: unlink, rename, limits", |m| {
        let p = |b: &[u8]| m.p("").join(std::ffi::OsStr::from_bytes(b));
        let unlink = outcome(&fs::remove_file(p(b"\xff\xfe-not-utf8")));
        let rename = outcome(&fs::rename(p(b"new\nline"), p(b"d/\xe2\x9c\x93 ok")));
        let long_ok = outcome(&fs::write(m.p(&"y".repeat(255)), "y"));
        let too_long = outcome(&fs::write(m.p(&"z".repeat(256)), "z"));
        let unlink_long = outcome(&fs::remove_file(m.p(&"x".repeat(255))));
        let mut root: Vec<Vec<u8>> = fs::read_dir(m.p(""))
            .unwrap()
            .map(|e| e.unwrap().file_name().into_vec())
            .collect();
        root.sort();
        (
            unlink,
            rename,
            long_ok,
            too_long,
            unlink_long,
            root,
            names(m.p("d")),
        )
    });
    assert_eq!(obs.0, "ok");
    assert!(is_whiteout(
        t.upper("")
            .join(std::ffi::OsStr::from_bytes(b"\xff\xfe-not-utf8"))
    ));
    assert!(
        is_whiteout(t.upper(&"x".repeat(255))),
        "whiteout for a 255-byte name"
    );
}

/// Two names for one inode inside a lower: what a write through one name does to the other is decided
/// by the kernel (with index=off it breaks the link); a backend must agree.
fn lower_hardlinks(r: Run) {
    fn setup(l: &Layers) {
        write(l.l1.join("h1"), "shared\n");
        fs::hard_link(l.l1.join("h1"), l.l1.join("h2")).unwrap();
    }
    let Some(t) = Ctx::new(r, setup) else {
        return;
    };
    let obs = t.same_as_kernel("lower hard links across copy-up", |m| {
        let before = (lstat(m.p("h1")).nlink(), ino(m.p("h1")) == ino(m.p("h2")));
        OpenOptions::new()
            .append(true)
            .open(m.p("h1"))
            .unwrap()
            .write_all(b"+")
            .unwrap();
        let after = (
            read(m.p("h1")),
            read(m.p("h2")),
            lstat(m.p("h1")).nlink(),
            lstat(m.p("h2")).nlink(),
        );
        (before, after)
    });
    eprintln!("{} [{}]: {obs:?}", r.test, r.backend.name());
    assert_eq!(obs.1 .0, "shared\n+");
    assert_eq!(read(t.l1("h2")), "shared\n", "lower changed");
}

// ---------------------------------------------------------------------------------------------------------
// Upper-dir format (the issue's two format tests).

/// The same operations, whatever the backend. Every kind of upper-dir change appears at least once.
fn script(m: &MountGuard) {
    write(m.p("new.txt"), "new\n");
    mkdir(m.p("newdir/sub"));
    write(m.p("newdir/sub/f"), "f");
    OpenOptions::new()
        .append(true)
        .open(m.p("a.txt"))
        .unwrap()
        .write_all(b"appended\n")
        .unwrap();
    chmod(m.p("cu"), 0o700);
    if !in_userns() {
        chown(m.p("ro.txt"), 1000, 1000);
    }
    fs::remove_file(m.p("shadow.txt")).unwrap();
    fs::remove_file(m.p("dir/one")).unwrap();
    fs::remove_file(m.p("deldir/x")).unwrap();
    fs::remove_file(m.p("deldir/y")).unwrap();
    fs::remove_dir(m.p("deldir")).unwrap();
    fs::remove_file(m.p("opq/hidden")).unwrap();
    fs::remove_dir(m.p("opq")).unwrap();
    fs::create_dir(m.p("opq")).unwrap();
    write(m.p("opq/inside"), "i");
    std::os::unix::fs::symlink("target/of/link", m.p("newlink")).unwrap();
    fs::rename(m.p("dir/two"), m.p("dir/two.renamed")).unwrap();
    setxattr(m.p("dir/sub/deep"), "user.k", b"v").unwrap();
    nix::unistd::mkfifo(
        &m.p("fifo"),
        nix::sys::stat::Mode::from_bits_truncate(0o644),
    )
    .unwrap();
    fs::hard_link(m.p("l2only"), m.p("l2only.hard")).unwrap();
    nix::unistd::truncate(&m.p("dir/three"), 1).unwrap();
    fs::remove_file(m.p("link")).unwrap();
    write(m.p("link"), "now a file");
    // Things that must leave no trace: pure-upper entries created and removed again.
    mkdir(m.p("dir/tmpdir/inner"));
    fs::remove_dir(m.p("dir/tmpdir/inner")).unwrap();
    fs::remove_dir(m.p("dir/tmpdir")).unwrap();
    write(m.p("dir/sub/tmpfile"), "t");
    fs::remove_file(m.p("dir/sub/tmpfile")).unwrap();
    // A copied-up file then removed: only a whiteout remains.
    OpenOptions::new()
        .append(true)
        .open(m.p("dir/three"))
        .unwrap()
        .write_all(b"x")
        .unwrap();
    fs::remove_file(m.p("dir/three")).unwrap();
    // Upper file renamed over a lower name; xattr on a dir; a new file in a 0777 lower dir.
    write(m.p("atomic.tmp"), "atomic");
    fs::rename(m.p("atomic.tmp"), m.p("ro.txt")).unwrap();
    setxattr(m.p("pub"), "user.dir", b"d").unwrap();
    write(m.p("pub/made"), "m");
    fs::remove_file(m.p("lfifo")).unwrap();
}

struct KernelRun {
    merged: std::collections::BTreeMap<String, tree::Entry>,
    upper: std::collections::BTreeMap<String, tree::Entry>,
}

fn keep_user_xattrs(name: &str) -> bool {
    !tree::kernel_private_xattr(name)
}

fn kernel_script_run(r: Run) -> Option<KernelRun> {
    if let Some(why) = unavailable(Backend::Kernel) {
        r.skip(&format!("kernel oracle unavailable: {why}"));
        return None;
    }
    let fx = Fixture::new(Backend::Kernel, std_setup);
    let m = fx.mount().expect("kernel mount");
    script(&m);
    let merged = tree::snapshot(m.path(), &|_| true);
    m.unmount().unwrap();
    let upper = tree::snapshot(&fx.upper, &keep_user_xattrs);
    Some(KernelRun { merged, upper })
}

fn assert_no_diff(what: &str, d: Vec<String>) {
    assert!(
        d.is_empty(),
        "{what}: {} differences:\n{}",
        d.len(),
        d.join("\n")
    );
}

/// (1) The same script through this backend and through the kernel leaves identical upper dirs.
fn format_upper_matches_kernel(r: Run) {
    let Some(mut t) = Ctx::new(r, std_setup) else {
        return;
    };
    let Some(k) = kernel_script_run(r) else {
        return;
    };
    script(&t.m);
    let merged = tree::snapshot(t.m.path(), &|_| true);
    t.m.unmount_in_place().unwrap();
    let upper = tree::snapshot(&t.fx.upper, &keep_user_xattrs);
    assert_no_diff(
        "upper dir vs kernel's upper dir",
        tree::diff(r.backend.name(), &upper, "kernel", &k.upper),
    );
    assert_no_diff(
        "merged view vs kernel's merged view",
        tree::diff(r.backend.name(), &merged, "kernel", &k.merged),
    );
    // Sanity: the script left every kind of change in the upper.
    assert_eq!(
        k.upper.get("deldir").map(|e| (e.kind, e.data.as_str())),
        Some(("chr", "rdev 0:0"))
    );
    assert!(k.upper["opq"].xattrs.contains_key(&overlay_xattr("opaque")));
}

/// (2) An upper written by this backend, stacked as a lower under a kernel mount, shows the tree the
/// kernel itself showed after the script (deleted names gone, opaque dirs hide lower content).
fn format_upper_as_kernel_lower(r: Run) {
    let Some(mut t) = Ctx::new(r, std_setup) else {
        return;
    };
    let Some(k) = kernel_script_run(r) else {
        return;
    };
    script(&t.m);
    t.m.unmount_in_place().unwrap();
    let mnt2 = t.fx.root().join("stacked");
    mkdir(&mnt2);
    let lowers = [
        t.fx.upper.clone(),
        t.fx.layers.l2.clone(),
        t.fx.layers.l1.clone(),
    ];
    let m2 = MountGuard::mount(Backend::Kernel, &lowers, None, &mnt2)
        .expect("kernel mount over the backend's upper");
    let stacked = tree::snapshot(m2.path(), &|_| true);
    m2.unmount().unwrap();
    assert!(
        !stacked.contains_key("deldir")
            && !stacked.contains_key("shadow.txt")
            && !stacked.contains_key("opq/hidden")
    );
    assert_no_diff(
        "kernel view of [backend upper, l2, l1] vs kernel's merged view",
        tree::diff("stacked", &stacked, "kernel", &k.merged),
    );
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
