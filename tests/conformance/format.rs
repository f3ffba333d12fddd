//! Upper-dir format: the upper a backend leaves is the kernel's (diffed against a kernel run) and mounts as a kernel lower.
//! Part of the conformance suite (`tests/conformance.rs`): every `fn(Run)` here runs on every backend.

use super::*;

/// The same operations, whatever the backend. Every kind of upper-dir change appears at least once.
pub(crate) fn script(m: &MountGuard) {
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

pub(crate) struct KernelRun {
    merged: std::collections::BTreeMap<String, tree::Entry>,
    upper: std::collections::BTreeMap<String, tree::Entry>,
}

pub(crate) fn keep_user_xattrs(name: &str) -> bool {
    !tree::kernel_private_xattr(name)
}

pub(crate) fn kernel_script_run(r: Run) -> Option<KernelRun> {
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

pub(crate) fn assert_no_diff(what: &str, d: Vec<String>) {
    assert!(
        d.is_empty(),
        "{what}: {} differences:\n{}",
        d.len(),
        d.join("\n")
    );
}

/// (1) The same script through this backend and through the kernel leaves identical upper dirs.
pub(crate) fn format_upper_matches_kernel(r: Run) {
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
pub(crate) fn format_upper_as_kernel_lower(r: Run) {
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
