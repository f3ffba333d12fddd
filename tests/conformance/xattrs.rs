//! Xattrs: user xattrs read and written through the view; overlay-private xattrs hidden.
//! Part of the conformance suite (`tests/conformance.rs`): every `fn(Run)` here runs on every backend.

use super::*;

pub(crate) fn xattr_user(r: Run) {
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
pub(crate) fn xattr_overlay_private_hidden(r: Run) {
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
