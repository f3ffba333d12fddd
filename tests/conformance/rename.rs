//! Rename: files within and across dirs, over existing entries, lower and upper dirs (errno from the kernel oracle).
//! Part of the conformance suite (`tests/conformance.rs`): every `fn(Run)` here runs on every backend.

use super::*;

pub(crate) fn rename_file_within_dir(r: Run) {
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

pub(crate) fn rename_file_across_dirs(r: Run) {
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

pub(crate) fn rename_file_over_existing(r: Run) {
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
pub(crate) fn rename_lower_dir(r: Run) {
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

pub(crate) fn rename_upper_dir(r: Run) {
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
