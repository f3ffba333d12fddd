//! Files: statfs, fsync, fallocate, sparse and large files, open flags, mmap, inode stability, read-only mounts, odd names, lower hard links.
//! Part of the conformance suite (`tests/conformance.rs`): every `fn(Run)` here runs on every backend.

use super::*;

pub(crate) fn statfs_works(r: Run) {
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

pub(crate) fn fsync_works(r: Run) {
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

pub(crate) fn fallocate_works(r: Run) {
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

pub(crate) fn sparse_over_4gib(r: Run) {
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

pub(crate) fn open_flags(r: Run) {
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

pub(crate) fn mmap_shared_write(r: Run) {
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
pub(crate) fn inode_stable(r: Run) {
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

pub(crate) fn readonly_mount(r: Run) {
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
pub(crate) fn readdir_while_deleting(r: Run) {
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
pub(crate) fn unlink_open_file(r: Run) {
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

pub(crate) fn sparse_setup(l: &Layers) {
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
pub(crate) fn copy_up_large_and_sparse(r: Run) {
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
pub(crate) fn copy_up_dir_attrs(r: Run) {
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

pub(crate) fn odd_names_setup(l: &Layers) {
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
pub(crate) fn odd_names(r: Run) {
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
pub(crate) fn lower_hardlinks(r: Run) {
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
