//! Store permissions (issue 12 item 4, DESIGN §3): a host user cannot stat, read or run anything
//! a container wrote, under lower/, upper/, work/ or merged/ (the CVE-2021-41091 pattern), on
//! both backends, through the Driver API. A store made with the old 0755 dirs is shown to be
//! exposed (so the check is not vacuous) and to be closed when the store is opened again. The
//! view itself still serves a non-root user through a bind mount, as in a container.

#[path = "support/driver_fixture.rs"]
mod driver_fixture;

use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use cachedriver::names::CommitMode;
use driver_fixture::{backends, skip, Fixture, Holder};

const NOBODY: &str = "65534";

/// Runs `args` as uid/gid 65534 with no supplementary groups.
fn as_nobody(args: &[&str]) -> Output {
    Command::new("setpriv")
        .args([
            &format!("--reuid={NOBODY}"),
            &format!("--regid={NOBODY}"),
            "--clear-groups",
            "--",
        ])
        .args(args)
        .output()
        .expect("running setpriv")
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// Whether nobody can stat, read or execute `p`; returns what worked.
fn nobody_reaches(p: &Path) -> Vec<String> {
    let s = p.to_str().expect("utf-8 test path");
    let mut got = vec![];
    let st = as_nobody(&["stat", s]);
    if st.status.success() {
        got.push(format!("stat {s}"));
    }
    if p.is_dir() {
        let ls = as_nobody(&["ls", s]);
        if ls.status.success() {
            got.push(format!("ls {s}"));
        }
        return got;
    }
    let cat = as_nobody(&["cat", s]);
    if cat.status.success() {
        got.push(format!("cat {s}"));
    }
    if fs::metadata(p).is_ok_and(|m| m.mode() & 0o111 != 0) {
        // Through a shell: setpriv itself still holds its capabilities at its own execve.
        let run = as_nobody(&["sh", "-c", "exec \"$0\"", s]);
        if run.status.success() {
            got.push(format!("exec {s}: {}", text(&run).trim()));
        }
    }
    got
}

/// What a container wrote: a setuid-root copy of `id` and a world-readable secret.
fn plant(view: &Path, tag: &str) {
    let id = ["/usr/bin/id", "/bin/id"]
        .into_iter()
        .find(|p| Path::new(p).exists())
        .expect("an id binary");
    let suid = view.join(format!("suid-{tag}"));
    fs::copy(id, &suid).unwrap();
    std::os::unix::fs::chown(&suid, Some(0), Some(0)).unwrap();
    fs::set_permissions(&suid, fs::Permissions::from_mode(0o4755)).unwrap();
    let secret = view.join(format!("secret-{tag}"));
    fs::write(&secret, format!("s3cret {tag}\n")).unwrap();
    fs::set_permissions(&secret, fs::Permissions::from_mode(0o644)).unwrap();
    fs::create_dir(view.join(format!("dir-{tag}"))).unwrap();
    fs::set_permissions(
        view.join(format!("dir-{tag}")),
        fs::Permissions::from_mode(0o777),
    )
    .unwrap();
}

/// Every path a host user must not reach: the planted files in the committed layer, the live
/// upper and the live view, and the store's dirs below its root (the root itself may be
/// stat'ed through its parent, not listed: checked apart).
fn targets(root: &Path) -> Vec<PathBuf> {
    let mut v = vec![];
    for (dir, tag) in [
        ("lower/sec/a", "a"),
        ("upper/sec/b", "b"),
        ("merged/sec/b", "b"),
    ] {
        for f in ["suid", "secret", "dir"] {
            v.push(root.join(dir).join(format!("{f}-{tag}")));
        }
    }
    for d in [
        "lower",
        "lower/sec",
        "lower/sec/a",
        "upper",
        "upper/sec",
        "upper/sec/b",
        "work",
        "work/sec",
        "work/sec/b",
        "merged",
        "merged/sec",
        "merged/sec/b",
        "volumes",
        "volumes/sec-a.json",
        "lower/sec/cache-state.json",
    ] {
        v.push(root.join(d));
    }
    v
}

#[test]
fn host_users_cannot_reach_what_containers_wrote() {
    let kinds = backends("store_perms");
    if kinds.is_empty() {
        return;
    }
    if Command::new("setpriv").arg("--version").output().is_err() {
        skip("store_perms", "setpriv (util-linux) is not installed");
        return;
    }
    for kind in kinds {
        eprintln!("-- backend {}", kind.as_str());
        // The temp dir is 0700 itself: open it up so only the store's own modes protect it.
        let tmp = tempfile::tempdir().unwrap();
        fs::set_permissions(tmp.path(), fs::Permissions::from_mode(0o755)).unwrap();
        let root = tmp.path().join("store");
        let mut fx = Fixture::at(&root, kind, CommitMode::Replace);
        fx.create("sec-a", &[]);
        let a = fx.mount("sec-a", "1");
        plant(&a, "a");
        fx.unmount("sec-a", "1");
        assert_eq!(fx.latest("sec"), "a");
        fx.create("sec-b", &[]);
        let b = fx.mount("sec-b", "1");
        plant(&b, "b");

        for d in [
            "",
            "lower",
            "upper",
            "work",
            "merged",
            "volumes",
            "lower/sec",
        ] {
            let m = fs::metadata(root.join(d)).unwrap().mode() & 0o7777;
            assert_eq!(m, 0o700, "{d:?} is root-only");
        }
        let ls = as_nobody(&["ls", root.to_str().unwrap()]);
        assert!(!ls.status.success(), "a host user lists the store root");
        for p in targets(&root) {
            assert!(
                p.exists() || p.is_symlink(),
                "{} exists (as root)",
                p.display()
            );
            let got = nobody_reaches(&p);
            assert!(got.is_empty(), "a host user reached the store: {got:?}");
        }

        // Control: the old 0755 layout exposes all of it, so the checks above are real.
        for d in [
            "",
            "lower",
            "lower/sec",
            "upper",
            "upper/sec",
            "merged",
            "merged/sec",
        ] {
            fs::set_permissions(root.join(d), fs::Permissions::from_mode(0o755)).unwrap();
        }
        let exposed = nobody_reaches(&root.join("lower/sec/a/secret-a"));
        assert!(
            exposed.iter().any(|g| g.starts_with("cat")),
            "with 0755 dirs a host user reads a committed secret: {exposed:?}"
        );
        let suid = nobody_reaches(&root.join("upper/sec/b/suid-b"));
        eprintln!("   old layout, host user: {suid:?}");
        assert!(suid.iter().any(|g| g.starts_with("exec")), "{suid:?}");

        // Opening the store again (plugin upgrade/restart) closes it. The session stays: a
        // stand-in container holds its view (a restart ends sessions nobody uses).
        let hold = Holder::new(&b);
        fx.restart();
        for p in targets(&root) {
            let got = nobody_reaches(&p);
            assert!(got.is_empty(), "after reopening the store: {got:?}");
        }

        // Inside the view (a container's bind mount) a non-root user still gets what the
        // view's own modes allow: the kernel checks there, not on our parents.
        let seen = tmp.path().join("container-view");
        fs::create_dir(&seen).unwrap();
        fs::set_permissions(&seen, fs::Permissions::from_mode(0o755)).unwrap();
        let script = format!(
            "mount --bind '{}' '{}' && setpriv --reuid={NOBODY} --regid={NOBODY} --clear-groups -- \
             sh -c 'cat {}/secret-b && touch {}/dir-b/by-nobody && ls -ld {}/dir-b/by-nobody'",
            b.display(),
            seen.display(),
            seen.display(),
            seen.display(),
            seen.display()
        );
        let out = Command::new("unshare")
            .args(["-m", "--propagation", "private", "sh", "-c", &script])
            .output()
            .unwrap();
        assert!(
            out.status.success() && text(&out).contains("s3cret b"),
            "a non-root user in the view: {}",
            text(&out)
        );
        drop(hold);
        fx.unmount("sec-b", "1");
        let layer = root.join("lower/sec/b");
        let owner = fs::symlink_metadata(layer.join("dir-b/by-nobody"))
            .unwrap()
            .uid();
        assert_eq!(
            owner, 65534,
            "the view's write was committed with its owner"
        );
        assert_eq!(fx.latest("sec"), "b");
    }
}
