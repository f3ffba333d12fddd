//! Links and special files: symlinks, fifos and sockets.
//! Part of the conformance suite (`tests/conformance.rs`): every `fn(Run)` here runs on every backend.

use super::*;

pub(crate) fn symlinks(r: Run) {
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

pub(crate) fn fifos_and_sockets(r: Run) {
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

pub(crate) fn umask() -> u32 {
    let old = nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o022));
    nix::sys::stat::umask(old);
    old.bits()
}
