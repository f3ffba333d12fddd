//! Whiteouts and opaque dirs: deleting lower entries, replacing lower dirs, and the markers other tools wrote.
//! Part of the conformance suite (`tests/conformance.rs`): every `fn(Run)` here runs on every backend.

use super::*;

pub(crate) fn whiteout_unlink(r: Run) {
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

pub(crate) fn whiteout_rmdir(r: Run) {
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

pub(crate) fn opaque_after_rmdir_mkdir(r: Run) {
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
pub(crate) fn markers_setup(l: &Layers) {
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

pub(crate) fn lower_kernel_markers_honoured(r: Run) {
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
pub(crate) fn aufs_setup(l: &Layers) {
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

pub(crate) fn lower_aufs_markers(r: Run) {
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
