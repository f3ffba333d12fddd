//! Read-through and readdir: lower content seen through the view, merged listings, seeking, link counts, concurrent operations.
//! Part of the conformance suite (`tests/conformance.rs`): every `fn(Run)` here runs on every backend.

use super::*;

pub(crate) fn read_through(r: Run) {
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

pub(crate) fn readdir_merged(r: Run) {
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

pub(crate) fn big_setup(l: &Layers) {
    mkdir(l.l1.join("big"));
    mkdir(l.l2.join("big"));
    for i in 0..3000 {
        fs::File::create(l.l1.join(format!("big/f{i:05}"))).unwrap();
    }
    for i in 2000..4000 {
        fs::File::create(l.l2.join(format!("big/f{i:05}"))).unwrap();
    }
}

pub(crate) fn readdir_large(r: Run) {
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
pub(crate) fn readdir_seek(r: Run) {
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
pub(crate) fn dir_nlink_and_d_ino(r: Run) {
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
pub(crate) fn concurrent_ops(r: Run) {
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
