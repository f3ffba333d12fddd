//! The plugin under ROOTLESS engines (issue 13): a fresh unprivileged user with subordinate ids,
//! created by the test, runs rootless Podman and rootless Docker (`dockerd-rootless.sh`,
//! rootlesskit) and our plugin inside the engine's user and mount namespaces, with no root help,
//! and the seed walkthrough (`tests/rootless/walk.sh`) passes on both backends.
//!
//! How the plugin joins each engine (found on this host, dockerd 20.10 and Podman 4.3):
//! - Podman: `podman unshare cachedriver serve ...` (Podman's own user+mount namespace), socket
//!   named in `~/.config/containers/containers.conf` `[engine.volume_plugins]`.
//! - Docker: dockerd 20.10 looks for plugins only at `/run/docker/plugins` and
//!   `/etc/docker/plugins` (its rootless `$XDG_CONFIG_HOME/docker/plugins` lookup came later), and
//!   inside rootlesskit's namespaces `/run` is a private copy the user owns: so the plugin runs
//!   there (`nsenter -U --preserve-credentials -m -t $(pgrep -u $USER -x dockerd)`) and binds
//!   `/run/docker/plugins/NAME.sock`.
//!
//! The host is prepared the way a distribution's udev already prepares it: `/dev/fuse` and
//! `/dev/net/tun` mode 0666 (this VM has no udev), `/run/user/UID` as logind would make it.
//! Everything the user started is killed and the user deleted at the end, also on failure.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

#[path = "support/probe.rs"]
mod probe;

/// Why this host cannot run the rootless tests, if it cannot.
fn missing() -> Option<String> {
    if !nix::unistd::geteuid().is_root() {
        return Some("needs root to create a test user".into());
    }
    for tool in [
        "useradd",
        "runuser",
        "newuidmap",
        "podman",
        "rootlesskit",
        "slirp4netns",
        "nsenter",
    ] {
        if probe::which(tool).is_none() {
            return Some(format!(
                "{tool} is not installed (scripts/install-deps.sh installs it)"
            ));
        }
    }
    if !Path::new("/usr/share/docker.io/contrib/dockerd-rootless.sh").exists() {
        return Some("dockerd-rootless.sh (Debian docker.io) is missing".into());
    }
    None
}

fn skip_or_fail(test: &str) -> bool {
    if let Some(why) = missing() {
        probe::skip(&format!("rootless::{test}"), &why);
        return true;
    }
    false
}

fn sh(cmd: &mut Command) -> std::process::Output {
    cmd.output()
        .unwrap_or_else(|e| panic!("running {cmd:?}: {e}"))
}

/// A fresh unprivileged user; on drop every process of it is killed and it is deleted.
struct TestUser {
    name: String,
    uid: u32,
    home: PathBuf,
    /// Readable by the user: our binary, the walk script and the image tar.
    share: tempfile::TempDir,
}

impl TestUser {
    fn create(tag: &str) -> TestUser {
        let name = format!("cdrl{}{tag}", std::process::id() % 100_000);
        let out = sh(Command::new("useradd").args(["-m", "-s", "/bin/bash", &name]));
        assert!(
            out.status.success(),
            "useradd {name}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let uid = nix::unistd::User::from_name(&name)
            .ok()
            .flatten()
            .map(|u| u.uid.as_raw())
            .expect("the new user exists");
        let subuid = std::fs::read_to_string("/etc/subuid").unwrap_or_default();
        assert!(
            subuid.lines().any(|l| l.starts_with(&format!("{name}:"))),
            "useradd gave {name} no subordinate uids in /etc/subuid"
        );
        let run = PathBuf::from(format!("/run/user/{uid}"));
        std::fs::create_dir_all(&run).expect("creating XDG_RUNTIME_DIR");
        std::fs::set_permissions(&run, std::fs::Permissions::from_mode(0o700)).unwrap();
        nix::unistd::chown(&run, Some(uid.into()), None).unwrap();
        // What udev does on a distribution host (this VM has none).
        for dev in ["/dev/fuse", "/dev/net/tun"] {
            let _ = std::fs::set_permissions(dev, std::fs::Permissions::from_mode(0o666));
        }
        let share = tempfile::Builder::new()
            .prefix("cdrl-share-")
            .tempdir()
            .unwrap();
        std::fs::set_permissions(share.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        let bin = share.path().join("cachedriver");
        std::fs::copy(env!("CARGO_BIN_EXE_cachedriver"), &bin).unwrap();
        let walk = share.path().join("walk.sh");
        std::fs::copy(
            Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/rootless/walk.sh"),
            &walk,
        )
        .unwrap();
        make_image_tar(share.path());
        TestUser {
            home: PathBuf::from(format!("/home/{name}")),
            name,
            uid,
            share,
        }
    }

    /// Runs the walkthrough as this user; panics with its output if it fails.
    fn walk(&self, engine: &str, backend: &str) {
        let s = self.share.path();
        let script = format!(
            "bash {} {engine} {backend} {} {}",
            s.join("walk.sh").display(),
            s.join("cachedriver").display(),
            s.join("image.tar").display()
        );
        let out = sh(Command::new("runuser").args(["-l", &self.name, "-c", &script]));
        let (o, e) = (
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
        );
        assert!(
            out.status.success() && o.contains("WALK OK"),
            "rootless {engine} walkthrough on the {backend} backend failed ({}):\n--- stdout ---\n{o}\n--- stderr ---\n{e}",
            out.status
        );
        eprintln!("rootless: {engine} / {backend}: walkthrough passed");
    }
}

impl Drop for TestUser {
    fn drop(&mut self) {
        // rootless engines and our plugin live in the user's namespaces: killing every process
        // of the user ends those namespaces and with them every mount made there
        for _ in 0..3 {
            let _ = Command::new("pkill")
                .args(["-KILL", "-u", &self.name])
                .status();
            std::thread::sleep(std::time::Duration::from_millis(300));
        }
        let _ = Command::new("userdel")
            .args(["-r", "-f", &self.name])
            .output();
        let _ = std::fs::remove_dir_all(&self.home);
        let _ = std::fs::remove_dir_all(format!("/run/user/{}", self.uid));
    }
}

/// An offline busybox image root as a tar (what `podman import` / `docker import` take).
fn make_image_tar(dir: &Path) {
    let root = dir.join("rootfs");
    std::fs::create_dir_all(root.join("bin")).unwrap();
    let busybox = ["/bin/busybox", "/usr/bin/busybox"]
        .into_iter()
        .find(|p| Path::new(p).exists())
        .expect("busybox-static is installed");
    std::fs::copy(busybox, root.join("bin/busybox")).unwrap();
    for app in [
        "sh", "ls", "cat", "echo", "sleep", "mkdir", "grep", "rm", "touch",
    ] {
        std::os::unix::fs::symlink("busybox", root.join("bin").join(app)).unwrap();
    }
    let out = sh(Command::new("tar")
        .arg("-C")
        .arg(&root)
        .arg("-cf")
        .arg(dir.join("image.tar"))
        .arg("."));
    assert!(
        out.status.success(),
        "tar: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    std::fs::set_permissions(
        dir.join("image.tar"),
        std::fs::Permissions::from_mode(0o644),
    )
    .unwrap();
}

#[test]
fn rootless_podman_walkthrough_on_both_backends() {
    if skip_or_fail("podman") {
        return;
    }
    let u = TestUser::create("p");
    u.walk("podman", "kernel");
    u.walk("podman", "fuse");
}

#[test]
fn rootless_docker_walkthrough_on_both_backends() {
    if skip_or_fail("docker") {
        return;
    }
    let u = TestUser::create("d");
    u.walk("docker", "kernel");
    u.walk("docker", "fuse");
}
