//! A throwaway CNCF distribution registry (Debian's `docker-registry`) on a free loopback
//! port, with its own config and storage, optional htpasswd basic auth; stopped on drop.
#![allow(dead_code)]

use std::fs;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::driver_fixture::skip;

/// The registry binary.
pub const REGISTRY: &str = "/usr/bin/docker-registry";

/// A registry process with its own config and storage; stopped on drop.
pub struct Registry {
    dir: tempfile::TempDir,
    child: Option<Child>,
    /// The port it listens on (127.0.0.1).
    pub port: u16,
    auth: Option<(String, String)>,
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

impl Registry {
    /// Starts a registry (with basic auth for `auth`), or says why it cannot.
    pub fn start(auth: Option<(&str, &str)>) -> Option<Registry> {
        if !Path::new(REGISTRY).exists() {
            skip(
                "remote",
                "docker-registry is not installed (scripts/install-deps.sh installs it)",
            );
            return None;
        }
        let dir = tempfile::tempdir().expect("tempdir");
        let mut reg = Registry {
            dir,
            child: None,
            port: free_port(),
            auth: auth.map(|(u, p)| (u.to_string(), p.to_string())),
        };
        reg.spawn();
        Some(reg)
    }

    pub fn spawn(&mut self) {
        let d = self.dir.path();
        let mut cfg = format!(
            "version: 0.1\nlog:\n  level: info\n  accesslog:\n    disabled: false\nstorage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\nhttp:\n  addr: 127.0.0.1:{}\n",
            d.join("data").display(),
            self.port
        );
        if let Some((u, p)) = &self.auth {
            let out = Command::new("htpasswd")
                .args(["-Bbn", u, p])
                .output()
                .expect("htpasswd (apache2-utils)");
            assert!(out.status.success(), "htpasswd failed");
            fs::write(d.join("htpasswd"), &out.stdout).unwrap();
            cfg.push_str(&format!(
                "auth:\n  htpasswd:\n    realm: test\n    path: {}\n",
                d.join("htpasswd").display()
            ));
        }
        fs::write(d.join("config.yml"), cfg).unwrap();
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(d.join("log"))
            .unwrap();
        let child = Command::new(REGISTRY)
            .arg("serve")
            .arg(d.join("config.yml"))
            .stdout(Stdio::from(log.try_clone().unwrap()))
            .stderr(Stdio::from(log))
            .spawn()
            .expect("start docker-registry");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", self.port)) {
                let _ = s.write_all(b"GET /v2/ HTTP/1.0\r\n\r\n");
                let mut b = String::new();
                let _ = s.read_to_string(&mut b);
                if b.starts_with("HTTP/1.") {
                    return;
                }
            }
            assert!(
                Instant::now() < deadline,
                "registry did not start: {}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn repo(&self, path: &str) -> String {
        format!("127.0.0.1:{}/{path}", self.port)
    }

    pub fn log(&self) -> String {
        fs::read_to_string(self.dir.path().join("log")).unwrap_or_default()
    }

    /// Blob uploads the registry completed (its access log's `PUT .../blobs/uploads/... 201`).
    pub fn blob_puts(&self) -> usize {
        self.log()
            .lines()
            .filter(|l| {
                l.contains("\"PUT /v2/") && l.contains("/blobs/uploads/") && l.contains("\" 201 ")
            })
            .count()
    }

    /// Blob downloads the registry served (`GET .../blobs/sha256:...` answered 200).
    pub fn blob_gets(&self) -> usize {
        self.log()
            .lines()
            .filter(|l| {
                l.contains("\"GET /v2/") && l.contains("/blobs/sha256:") && l.contains("\" 200 ")
            })
            .count()
    }

    /// The stored data file of a blob.
    pub fn blob_file(&self, digest: &str) -> PathBuf {
        let hex = digest.trim_start_matches("sha256:");
        self.dir
            .path()
            .join("data/docker/registry/v2/blobs/sha256")
            .join(&hex[..2])
            .join(hex)
            .join("data")
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        self.stop();
    }
}
