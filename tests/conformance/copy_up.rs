//! Copy-up: every operation that changes a lower file or dir copies it up first, keeping data, mode, owner, times and xattrs; file locks.
//! Part of the conformance suite (`tests/conformance.rs`): every `fn(Run)` here runs on every backend.

use super::*;

#[derive(Default, Clone, Copy)]
pub(crate) struct Change {
    content: Option<&'static str>,
    mode: Option<u32>,
    owner: Option<(u32, u32)>,
    /// `Some(Some(t))`: mtime set to t; `Some(None)`: mtime changes to "now"; `None`: mtime preserved.
    mtime: Option<Option<i64>>,
    xattr: Option<(&'static str, &'static str)>,
}

/// Applies `op` to the lower file `cu` and checks the copy-up: the upper holds a copy, everything `op` did
/// not change (contents, mode, owner, mtime, xattrs) is preserved, and the lower is untouched.
pub(crate) fn copy_up(r: Run, op: fn(&Path), ch: Change) {
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

pub(crate) fn copy_up_write(r: Run) {
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

pub(crate) fn copy_up_append(r: Run) {
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

pub(crate) fn copy_up_truncate(r: Run) {
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

pub(crate) fn copy_up_chmod(r: Run) {
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

pub(crate) fn copy_up_chown(r: Run) {
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

pub(crate) fn copy_up_utimens(r: Run) {
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

pub(crate) fn copy_up_setxattr(r: Run) {
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
pub(crate) fn copy_up_parent_dirs(r: Run) {
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
pub(crate) fn copy_up_link(r: Run) {
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
pub(crate) fn copy_up_while_open(r: Run) {
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
pub(crate) fn copy_up_on_open_for_write(r: Run) {
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
pub(crate) fn file_locks(r: Run) {
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
