//! Full disk (issue 12 item 6): the store root on a small loop-mounted ext4 (64 MiB, no reserved
//! blocks, so root hits ENOSPC too). On both backends:
//! - a session's writes that fill the disk fail for the writer with ENOSPC, as on a local volume,
//!   and the session still commits once the writer frees space;
//! - Create, Mount and the commit at Unmount under ENOSPC fail cleanly with a clear `{"Err"}`,
//!   leave no temp file, and leave the cache at its last good snapshot;
//! - once space is back, the cut-short commit is finished (the plugin's next start, or the next
//!   Unmount / Remove of the volume, per the orphan rule of issue 12 items 1-2) and the volume
//!   can be removed; `gc` and `compact` (where they exist) fail cleanly when full and succeed after.

mod common;

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;

use common::Plugin;
use serde_json::{json, Value};

/// A small ext4 mounted through a loop device; unmounted (which frees the loop device) on drop.
struct LoopFs {
    _dir: tempfile::TempDir,
    mnt: PathBuf,
}

impl LoopFs {
    fn new(mib: u64) -> Result<LoopFs, String> {
        let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
        let img = dir.path().join("disk.img");
        let mnt = dir.path().join("mnt");
        fs::create_dir(&mnt).map_err(|e| e.to_string())?;
        File::create(&img)
            .and_then(|f| f.set_len(mib << 20))
            .map_err(|e| format!("creating the image: {e}"))?;
        let run = |cmd: &mut Command| -> Result<(), String> {
            let o = cmd.output().map_err(|e| format!("{cmd:?}: {e}"))?;
            if o.status.success() {
                Ok(())
            } else {
                Err(format!(
                    "{cmd:?}: {}{}",
                    String::from_utf8_lossy(&o.stdout),
                    String::from_utf8_lossy(&o.stderr)
                ))
            }
        };
        // -m 0: no blocks reserved for root (the plugin runs as root).
        run(Command::new("mkfs.ext4")
            .args(["-q", "-F", "-m", "0"])
            .arg(&img))?;
        run(Command::new("mount")
            .args(["-o", "loop"])
            .arg(&img)
            .arg(&mnt))?;
        Ok(LoopFs { _dir: dir, mnt })
    }
}

impl Drop for LoopFs {
    fn drop(&mut self) {
        common::cleanup_root(&self.mnt);
        let _ = Command::new("umount").arg(&self.mnt).status();
        if common::mounts_under(self.mnt.parent().unwrap_or(&self.mnt))
            .iter()
            .any(|m| Path::new(m) == self.mnt)
        {
            let _ = Command::new("umount").arg("-l").arg(&self.mnt).status();
        }
    }
}

/// Fills the filesystem holding `dir`: its inodes with empty files, then its blocks with one file, so that no new file can be created (blocks alone come back in small amounts when ext4
/// drops a closed file's preallocation, e.g. when a FUSE server exits). Returns what to delete.
fn fill(dir: &Path) -> Vec<PathBuf> {
    let p = dir.join("filler");
    File::create(&p).expect("filler");
    // Inodes first, while the fillers dir can still grow.
    let inodes = dir.join("fillers");
    let _ = fs::create_dir(&inodes);
    let mut n = 0u64;
    while File::create(inodes.join(n.to_string())).is_ok() {
        n += 1;
    }
    for _round in 0..4 {
        let mut f = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&p)
            .expect("filler");
        for chunk in [1 << 20, 64 << 10, 4 << 10, 512, 1] {
            let buf = vec![0xa5u8; chunk];
            while f.write_all(&buf).is_ok() {}
        }
        let _ = f.sync_all();
    }
    vec![p, inodes]
}

/// Takes every inode and block that becomes free until `stop`.
fn hog(dir: &Path, stop: &std::sync::atomic::AtomicBool) {
    let inodes = dir.join("fillers");
    let mut f = OpenOptions::new()
        .append(true)
        .open(dir.join("filler"))
        .ok();
    let mut n = 1u64 << 32;
    let buf = [0x5au8; 512];
    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
        if File::create(inodes.join(n.to_string())).is_ok() {
            n += 1;
        }
        if let Some(f) = f.as_mut() {
            while f.write_all(&buf).is_ok() {}
        }
    }
}

fn free_blocks(dir: &Path) -> u64 {
    nix::sys::statvfs::statvfs(dir)
        .map(|s| s.blocks_available())
        .unwrap_or(0)
}

fn latest(root: &Path, cache: &str) -> Option<String> {
    common::load_state(root, cache)
        .ok()
        .and_then(|s| s["state"]["latest"].as_str().map(str::to_string))
}

fn expect_err(r: Result<(u16, Value), String>, what: &str, failures: &mut Vec<String>) {
    match r {
        Ok((200, v)) => failures.push(format!("{what} on a full disk succeeded: {v}")),
        Ok((_, v)) => {
            let e = v["Err"].as_str().unwrap_or_default();
            if e.is_empty() {
                failures.push(format!("{what} on a full disk: no clear Err: {v}"));
            } else {
                eprintln!("full_disk: {what} refused as expected: {e}");
            }
        }
        Err(e) => failures.push(format!("{what} on a full disk: no reply (crash?): {e}")),
    }
}

fn no_temp_files(root: &Path, when: &str, failures: &mut Vec<String>) {
    let t = common::temp_files_under(root);
    if !t.is_empty() {
        failures.push(format!("{when}: temp files left behind: {t:?}"));
    }
}

fn run(backend: &'static str) {
    let lfs = match LoopFs::new(64) {
        Ok(l) => l,
        Err(e) => {
            common::skip(
                &format!("full_disk::{backend}"),
                &format!("no loop-mounted ext4: {e}"),
            );
            return;
        }
    };
    let mut failures: Vec<String> = vec![];
    {
        let mut p = Plugin::new(backend, Some(&lfs.mnt), &[]);
        p.start(None).expect("serve");
        let root = p.root.clone();

        // 1. A writer fills the disk through its merged dir: ENOSPC, as on a local volume.
        p.ok("/VolumeDriver.Create", json!({"Name": "fd-w"}))
            .expect("create");
        let mp = p
            .ok("/VolumeDriver.Mount", json!({"Name": "fd-w", "ID": "w"}))
            .expect("mount");
        let mp = PathBuf::from(mp["Mountpoint"].as_str().expect("Mountpoint"));
        let big = mp.join("big");
        let err = {
            let mut f = File::create(&big).expect("create in the merged dir");
            let buf = vec![7u8; 1 << 20];
            let mut e = None;
            for _ in 0..200 {
                if let Err(x) = f.write_all(&buf).and_then(|_| f.flush()) {
                    e = Some(x);
                    break;
                }
            }
            e.or_else(|| f.sync_all().err())
        };
        match err {
            Some(e) if e.raw_os_error() == Some(libc::ENOSPC) => {}
            Some(e) => failures.push(format!(
                "a writer filling the disk through the {backend} view got {e} ({:?}), not ENOSPC",
                e.raw_os_error()
            )),
            None => failures
                .push("writing 200 MiB to a 64 MiB disk through the view did not fail".into()),
        }
        fs::remove_file(&big).expect("the writer can delete its file again");
        fs::write(mp.join("ok.txt"), "ok").expect("the writer can write again after freeing space");
        if let Err(e) = p.ok("/VolumeDriver.Unmount", json!({"Name": "fd-w", "ID": "w"})) {
            failures.push(format!("commit after the writer freed space: {e}"));
        }
        let good = latest(&root, "fd");
        if good.as_deref() != Some("w") {
            failures.push(format!(
                "latest after the writer's commit is {good:?}, want \"w\""
            ));
        }

        // 2. Create and Mount on a full disk fail cleanly.
        p.ok(
            "/VolumeDriver.Create",
            json!({"Name": "fd-c", "Opts": {"commit": "merge"}}),
        )
        .expect("create fd-c");
        let mp = p
            .ok("/VolumeDriver.Mount", json!({"Name": "fd-c", "ID": "c"}))
            .expect("mount fd-c");
        let mp = PathBuf::from(mp["Mountpoint"].as_str().expect("Mountpoint"));
        fs::write(mp.join("c.txt"), "committed after the disk was freed").expect("write c.txt");
        let filler = fill(&lfs.mnt);
        eprintln!(
            "full_disk[{backend}]: disk filled, {} blocks free",
            free_blocks(&lfs.mnt)
        );
        let state_before = fs::read(root.join("lower/fd/cache-state.json")).ok();
        expect_err(
            p.call("/VolumeDriver.Create", json!({"Name": "fd-new"})),
            "Create",
            &mut failures,
        );
        no_temp_files(&root, "after Create failed on a full disk", &mut failures);
        if p.call("/VolumeDriver.Get", json!({"Name": "fd-new"}))
            .is_ok_and(|(st, _)| st == 200)
        {
            failures.push("a Create that failed for lack of space left a volume behind".into());
        }

        // 3. The commit at Unmount cannot write the state: a clean error, the last good snapshot.
        // Whatever the unmount itself frees (a FUSE server's pid file, a closed file's
        // preallocated blocks) is taken again at once, as other writers on a full disk would.
        let stop = std::sync::atomic::AtomicBool::new(false);
        let r = std::thread::scope(|s| {
            s.spawn(|| hog(&lfs.mnt, &stop));
            let r = p.call("/VolumeDriver.Unmount", json!({"Name": "fd-c", "ID": "c"}));
            stop.store(true, std::sync::atomic::Ordering::Relaxed);
            r
        });
        expect_err(r, "Unmount (commit)", &mut failures);
        no_temp_files(
            &root,
            "after the commit failed on a full disk",
            &mut failures,
        );
        let state_after = fs::read(root.join("lower/fd/cache-state.json")).ok();
        if state_after != state_before {
            failures.push(format!(
                "the failed commit changed cache-state.json: {:?}",
                state_after.map(|b| String::from_utf8_lossy(&b).to_string())
            ));
        }
        if let Err(e) = common::check_state(&root, "fd") {
            failures.push(format!("after the failed commit: {e}"));
        }
        if !p.running() {
            failures.push(format!("the plugin died on a full disk:\n{}", p.log_tail()));
            p.start(None).expect("restart");
        }
        for cmd in ["gc", "compact"] {
            if common::subcommands().iter().any(|c| c == cmd) {
                let o = Command::new(common::exe())
                    .arg(cmd)
                    .arg("--root")
                    .arg(&root)
                    .output();
                if let Ok(o) = o {
                    if o.status.code() == Some(101) || o.status.code().is_none() {
                        failures.push(format!("`{cmd}` on a full disk crashed: {o:?}"));
                    }
                }
                if let Err(e) = common::check_state(&root, "fd") {
                    failures.push(format!("after `{cmd}` on a full disk: {e}"));
                }
            }
        }

        // 4. Space comes back: the session's changes reach the cache on retry.
        for f in &filler {
            let _ = fs::remove_file(f);
            let _ = fs::remove_dir_all(f);
        }
        let _ = Command::new("sync").status();
        // The retry the contract gives: the plugin's next start finishes or ends the session
        // (issue 12 item 2); Remove ends a session nobody uses (item 1).
        let _ = p.stop();
        if let Err(e) = p.start(None) {
            failures.push(format!("restart after freeing space: {e}"));
        }
        let mut committed = common::latest_files(&root, "fd")
            .map(|f| f.contains_key("c.txt"))
            .unwrap_or(false);
        if !committed {
            // Still a live session: the engine's next Unmount of the same ID ends it.
            let g = p.ok("/VolumeDriver.Get", json!({"Name": "fd-c"}));
            if g.is_ok_and(|v| v["Volume"]["Status"]["state"] == "mounted") {
                let _ = p.call("/VolumeDriver.Unmount", json!({"Name": "fd-c", "ID": "c"}));
            }
            committed = common::latest_files(&root, "fd")
                .map(|f| f.contains_key("c.txt"))
                .unwrap_or(false);
        }
        if !committed {
            failures.push(format!(
                "INVARIANT retry-commits: once space is back, the commit that failed for lack of space was not finished (latest {:?} lacks c.txt): startup recovery / orphan rule, issue 12 items 1-2",
                latest(&root, "fd")
            ));
        }
        if let Err(e) = common::check_state(&root, "fd") {
            failures.push(format!("after space came back: {e}"));
        }
        for v in ["fd-c", "fd-w"] {
            if let Err(e) = p.ok("/VolumeDriver.Remove", json!({"Name": v})) {
                failures.push(format!(
                    "INVARIANT docker-ops: Remove {v} after space came back: {e}"
                ));
            }
        }
        match p
            .ok("/VolumeDriver.Create", json!({"Name": "fd-new"}))
            .and_then(|_| p.ok("/VolumeDriver.Mount", json!({"Name": "fd-new", "ID": "n"})))
        {
            Ok(v) => {
                let mp = PathBuf::from(v["Mountpoint"].as_str().unwrap_or_default());
                if !mp.join("ok.txt").exists() {
                    failures.push(
                        "a new session after recovery does not see the last good snapshot".into(),
                    );
                }
                for (ep, b) in [
                    (
                        "/VolumeDriver.Unmount",
                        json!({"Name": "fd-new", "ID": "n"}),
                    ),
                    ("/VolumeDriver.Remove", json!({"Name": "fd-new"})),
                ] {
                    if let Err(e) = p.ok(ep, b) {
                        failures.push(format!("after space came back: {e}"));
                    }
                }
            }
            Err(e) => failures.push(format!("Create/Mount after space came back: {e}")),
        }
        for cmd in ["gc", "compact"] {
            if common::subcommands().iter().any(|c| c == cmd) {
                let o = Command::new(common::exe())
                    .arg(cmd)
                    .arg("--root")
                    .arg(&root)
                    .output();
                if !o.as_ref().is_ok_and(|o| o.status.success()) {
                    failures.push(format!("`{cmd}` after space came back: {o:?}"));
                }
            }
        }
        if let Err(e) = p.stop() {
            failures.push(e);
        }
        no_temp_files(&root, "after shutdown", &mut failures);
        if !failures.is_empty() {
            failures.push(format!("plugin logs (tail):\n{}", p.log_tail()));
        }
    }
    assert!(
        failures.is_empty(),
        "full_disk[{backend}]:\n{}",
        failures.join("\n\n")
    );
}

#[test]
fn full_disk_kernel() {
    if common::backends("full_disk::kernel").contains(&"kernel") {
        run("kernel");
    }
}

#[test]
fn full_disk_fuse() {
    if common::backends("full_disk::fuse").contains(&"fuse") {
        run("fuse");
    }
}
