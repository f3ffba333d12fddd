//! The FUSE backend's I/O mode for a plugin's sessions (`CACHEDRIVER_FUSE_IO`): `noopen` (the
//! default: small files read without round trips) or `passthrough` (large files at kernel
//! speed). The real `serve` starts each session's server in the chosen mode, the session reads
//! and commits as usual, and a value we do not know stops `serve` with a message naming both.

mod common;

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::json;

struct Serve {
    child: Child,
    dir: tempfile::TempDir,
}

impl Serve {
    fn start(io: &str) -> Serve {
        let dir = tempfile::tempdir().expect("tempdir");
        let child = Command::new(common::exe())
            .args(["serve", "--backend", "fuse", "--root"])
            .arg(dir.path().join("root"))
            .arg("--socket")
            .arg(dir.path().join("s.sock"))
            .env("CACHEDRIVER_FUSE_IO", io)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(
                std::fs::File::create(dir.path().join("serve.log")).expect("log"),
            ))
            .spawn()
            .expect("starting serve");
        let s = Serve { child, dir };
        let deadline = Instant::now() + Duration::from_secs(60);
        while !s.sock().exists() {
            assert!(
                Instant::now() < deadline,
                "serve did not start: {}",
                std::fs::read_to_string(s.dir.path().join("serve.log")).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        s
    }

    fn sock(&self) -> std::path::PathBuf {
        self.dir.path().join("s.sock")
    }

    fn root(&self) -> std::path::PathBuf {
        self.dir.path().join("root")
    }
}

impl Drop for Serve {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        common::cleanup_root(&self.root());
    }
}

fn session(s: &Serve, vol: &str, f: impl FnOnce(&Path)) -> Result<(), String> {
    common::callj(&s.sock(), "/VolumeDriver.Create", &json!({"Name": vol}))?;
    let (st, v) = common::callj(
        &s.sock(),
        "/VolumeDriver.Mount",
        &json!({"Name": vol, "ID": "a"}),
    )?;
    if st != 200 {
        return Err(v["Err"].as_str().unwrap_or_default().to_string());
    }
    let m = std::path::PathBuf::from(v["Mountpoint"].as_str().unwrap_or_default());
    f(&m);
    let (st, v) = common::callj(
        &s.sock(),
        "/VolumeDriver.Unmount",
        &json!({"Name": vol, "ID": "a"}),
    )?;
    assert_eq!(st, 200, "{v}");
    Ok(())
}

#[test]
fn sessions_run_in_the_chosen_fuse_io_mode() {
    if common::backends("fuse_io").iter().all(|b| *b != "fuse") {
        return;
    }
    for (io, want) in [("noopen", false), ("passthrough", true)] {
        let s = Serve::start(io);
        let root = s.root();
        session(&s, "io-one", |m| {
            let servers = common::processes_under(&root);
            assert_eq!(servers.len(), 1, "{servers:?}");
            eprintln!("fuse_io: {io}: {}", servers[0].1);
            assert_eq!(
                servers[0].1.contains("passthrough=on"),
                want,
                "CACHEDRIVER_FUSE_IO={io}: {}",
                servers[0].1
            );
            std::fs::write(m.join("big"), vec![5u8; 4 << 20]).unwrap();
        })
        .unwrap();
        session(&s, "io-two", |m| {
            assert_eq!(
                std::fs::read(m.join("big")).unwrap(),
                vec![5u8; 4 << 20],
                "{io}"
            );
        })
        .unwrap();
    }
    // A mode we do not know stops `serve` at its startup probe, with one line naming both.
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(common::exe())
        .args(["serve", "--backend", "fuse", "--root"])
        .arg(dir.path().join("root"))
        .arg("--socket")
        .arg(dir.path().join("s.sock"))
        .env("CACHEDRIVER_FUSE_IO", "fast")
        .output()
        .expect("serve");
    let e = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "serve started with CACHEDRIVER_FUSE_IO=fast"
    );
    let last = e.lines().last().unwrap_or_default();
    assert!(
        last.contains("CACHEDRIVER_FUSE_IO")
            && last.contains("noopen")
            && last.contains("passthrough"),
        "{e}"
    );
    common::cleanup_root(&dir.path().join("root"));
}
