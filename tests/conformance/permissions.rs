//! Permissions: a non-root user gets what the modes allow, also across copy-up.
//! Part of the conformance suite (`tests/conformance.rs`): every `fn(Run)` here runs on every backend.

use super::*;

pub(crate) fn permissions_nonroot(r: Run) {
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

pub(crate) fn perm_setup(l: &Layers) {
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
pub(crate) fn permissions_nonroot_copy_up(r: Run) {
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
