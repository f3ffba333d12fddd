//! The test image, built offline: a root directory with busybox-static and its applet links,
//! `/etc/passwd` with root and `user` (1000), `/tmp` 1777, `/home/user` and an EMPTY
//! `/home/user/.cache` owned by 1000 (Docker copies that ownership onto an empty volume mounted
//! there), and `/data` with files of varied modes, owners, times, a symlink and hard links (Docker
//! copies them into an empty volume mounted there). Then `docker import` (the tar is kept for
//! `podman import`).

use super::daemon::Dockerd;
use super::util;
use anyhow::{bail, Context, Result};
use std::fs;
use std::os::unix::fs::{symlink, PermissionsExt};
use std::path::Path;
use std::process::Command;
use std::time::Duration;

/// Where busybox-static is installed on Debian.
const BUSYBOX: &str = "/bin/busybox";

fn chown(p: &Path, uid: u32, gid: u32) -> Result<()> {
    std::os::unix::fs::lchown(p, Some(uid), Some(gid))
        .with_context(|| format!("chown {}", p.display()))
}

fn chmod(p: &Path, mode: u32) -> Result<()> {
    fs::set_permissions(p, fs::Permissions::from_mode(mode))
        .with_context(|| format!("chmod {}", p.display()))
}

/// Sets a fixed mtime (`touch -d`), so listings of copied files are comparable.
fn set_mtime(p: &Path, date: &str) -> Result<()> {
    let o = util::run(
        Command::new("touch").arg("-h").arg("-d").arg(date).arg(p),
        Duration::from_secs(10),
    )?;
    o.check().map(|_| ())
}

fn write(p: &Path, content: &str, mode: u32, uid: u32, gid: u32) -> Result<()> {
    fs::write(p, content).with_context(|| format!("writing {}", p.display()))?;
    chmod(p, mode)?;
    chown(p, uid, gid)
}

fn mkdir(p: &Path, mode: u32, uid: u32, gid: u32) -> Result<()> {
    fs::create_dir_all(p).with_context(|| format!("mkdir {}", p.display()))?;
    chmod(p, mode)?;
    chown(p, uid, gid)
}

/// Builds the root filesystem in `dir/rootfs`, imports it as `tag` and returns the tag. The
/// archive stays at `dir/image.tar` for other engines (Podman) to import.
pub fn build(dockerd: &Dockerd, dir: &Path, tag: &str) -> Result<String> {
    if !Path::new(BUSYBOX).exists() {
        bail!("{BUSYBOX} is missing: install busybox-static (scripts/install-deps.sh does)");
    }
    let root = dir.join("rootfs");
    if root.exists() {
        fs::remove_dir_all(&root)?;
    }
    mkdir(&root, 0o755, 0, 0)?;
    let bin = root.join("bin");
    mkdir(&bin, 0o755, 0, 0)?;
    fs::copy(BUSYBOX, bin.join("busybox"))?;
    chmod(&bin.join("busybox"), 0o755)?;
    let list = util::run(Command::new(BUSYBOX).arg("--list"), Duration::from_secs(10))?.check()?;
    for applet in list.stdout.split_whitespace() {
        if applet != "busybox" && !applet.contains('/') {
            symlink("busybox", bin.join(applet))?;
        }
    }
    for d in ["etc", "dev", "proc", "sys", "usr", "var"] {
        mkdir(&root.join(d), 0o755, 0, 0)?;
    }
    symlink("../bin", root.join("usr/bin"))?;
    symlink("bin", root.join("sbin"))?;
    mkdir(&root.join("root"), 0o700, 0, 0)?;
    mkdir(&root.join("tmp"), 0o1777, 0, 0)?;
    write(
        &root.join("etc/passwd"),
        "root:x:0:0:root:/root:/bin/sh\nuser:x:1000:1000:user:/home/user:/bin/sh\n",
        0o644,
        0,
        0,
    )?;
    write(
        &root.join("etc/group"),
        "root:x:0:\nuser:x:1000:\n",
        0o644,
        0,
        0,
    )?;
    mkdir(&root.join("home"), 0o755, 0, 0)?;
    mkdir(&root.join("home/user"), 0o755, 1000, 1000)?;
    // empty on purpose: the volume root must still end up owned by 1000, as with `local`
    mkdir(&root.join("home/user/.cache"), 0o755, 1000, 1000)?;

    let data = root.join("data");
    mkdir(&data, 0o755, 0, 0)?;
    write(
        &data.join("hello.txt"),
        "hello from the image\n",
        0o644,
        0,
        0,
    )?;
    write(
        &data.join("secret.txt"),
        "only for user\n",
        0o600,
        1000,
        1000,
    )?;
    write(&data.join("run.sh"), "#!/bin/sh\necho run\n", 0o755, 0, 0)?;
    mkdir(&data.join("sub"), 0o750, 1000, 1000)?;
    write(&data.join("sub/nested.txt"), "nested\n", 0o640, 1000, 0)?;
    mkdir(&data.join("sub/deeper"), 0o700, 0, 0)?;
    write(&data.join("sub/deeper/leaf"), "", 0o444, 0, 0)?;
    mkdir(&data.join("empty"), 0o1777, 0, 0)?;
    symlink("hello.txt", data.join("link-to-hello"))?;
    symlink("/nonexistent/target", data.join("dangling"))?;
    write(&data.join("hard-a"), "shared inode\n", 0o644, 0, 0)?;
    fs::hard_link(data.join("hard-a"), data.join("hard-b"))?;
    for p in [
        "hello.txt",
        "secret.txt",
        "run.sh",
        "sub/nested.txt",
        "sub/deeper/leaf",
        "hard-a",
        "sub/deeper",
        "sub",
        "empty",
    ] {
        set_mtime(&data.join(p), "2000-01-02 03:04:05")?;
    }

    let tar = dir.join("image.tar");
    util::run(
        Command::new("tar")
            .arg("--numeric-owner")
            .arg("-C")
            .arg(&root)
            .arg("-cf")
            .arg(&tar)
            .arg("."),
        Duration::from_secs(120),
    )?
    .check()?;
    let tar_s = tar.to_string_lossy().into_owned();
    dockerd
        .cli(&["import", "-c", "CMD [\"/bin/sh\"]", &tar_s, tag])?
        .check()
        .context("docker import of the test image")?;
    let _ = fs::remove_dir_all(&root);
    Ok(tag.to_string())
}
