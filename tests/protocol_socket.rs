//! The real `cachedriver serve` process over its unix socket, spoken to as Docker and Podman do:
//! POST without Content-Type, empty bodies for Activate and List, JSON errors with a non-200
//! status, a body cap, unknown endpoints, and a clean shutdown on SIGTERM.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper_util::client::legacy::Client;
use hyperlocal::{UnixClientExt, UnixConnector, Uri};
use serde_json::Value;

#[path = "support/probe.rs"]
mod probe;

/// A plugin process on a temp root and socket; killed and unmounted on drop.
struct Plugin {
    child: Child,
    dir: tempfile::TempDir,
    socket: PathBuf,
}

impl Plugin {
    fn start() -> Option<Plugin> {
        if !probe::is_root() {
            probe::skip(
                "protocol_socket",
                "the plugin mounts overlays and needs root",
            );
            return None;
        }
        let dir = tempfile::tempdir().expect("tempdir");
        let socket = dir.path().join("plugin.sock");
        let child = Command::new(probe::exe())
            .arg("serve")
            .arg("--root")
            .arg(dir.path().join("root"))
            .arg("--socket")
            .arg(&socket)
            .arg("--backend")
            .arg("kernel")
            .env("CACHEDRIVER_LOG", "debug")
            .stderr(Stdio::from(
                std::fs::File::create(dir.path().join("plugin.log")).expect("log"),
            ))
            .spawn()
            .expect("starting cachedriver serve");
        let p = Plugin { child, dir, socket };
        let deadline = Instant::now() + Duration::from_secs(20);
        while !p.socket.exists() {
            assert!(
                Instant::now() < deadline,
                "plugin did not create its socket:\n{}",
                p.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        Some(p)
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("plugin.log")).unwrap_or_default()
    }

    fn root(&self) -> PathBuf {
        self.dir.path().join("root")
    }
}

impl Drop for Plugin {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let merged = self.root().join("merged");
        if let Ok(info) = std::fs::read_to_string("/proc/self/mountinfo") {
            for m in info.lines().filter_map(|l| l.split(' ').nth(4)) {
                if Path::new(m).starts_with(&merged) {
                    let _ = nix::mount::umount2(m, nix::mount::MntFlags::MNT_DETACH);
                }
            }
        }
    }
}

async fn call(socket: &Path, endpoint: &str, body: impl Into<Bytes>) -> (u16, Value) {
    let client: Client<UnixConnector, Full<Bytes>> = Client::unix();
    // Like Docker: a POST with no Content-Type header.
    let req = hyper::Request::post(hyper::Uri::from(Uri::new(socket, endpoint)))
        .body(Full::new(body.into()))
        .expect("request");
    let resp = client.request(req).await.expect("request sent");
    let status = resp.status().as_u16();
    let bytes = resp.into_body().collect().await.expect("body").to_bytes();
    let v = serde_json::from_slice(&bytes)
        .unwrap_or_else(|e| panic!("{endpoint}: reply is not JSON ({e}): {bytes:?}"));
    (status, v)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn docker_and_podman_requests_over_the_socket() {
    let Some(p) = Plugin::start() else { return };
    let s = p.socket.as_path();

    let (st, v) = call(s, "/Plugin.Activate", "").await;
    assert_eq!(
        (st, v["Implements"][0].as_str()),
        (200, Some("VolumeDriver"))
    );
    let (st, v) = call(s, "/VolumeDriver.Capabilities", "").await;
    assert_eq!(
        (st, v["Capabilities"]["Scope"].as_str()),
        (200, Some("local"))
    );
    let (st, v) = call(s, "/VolumeDriver.List", "").await;
    assert_eq!((st, v["Volumes"].as_array().map(Vec::len)), (200, Some(0)));

    let (st, _) = call(
        s,
        "/VolumeDriver.Create",
        r#"{"Name":"sock-one","Opts":{}}"#,
    )
    .await;
    assert_eq!(st, 200);
    let (st, v) = call(
        s,
        "/VolumeDriver.Mount",
        r#"{"Name":"sock-one","ID":"abc"}"#,
    )
    .await;
    assert_eq!(st, 200, "{v}");
    let mp = PathBuf::from(v["Mountpoint"].as_str().expect("Mountpoint"));
    assert_eq!(mp, p.root().join("merged/sock/one"));
    std::fs::write(mp.join("hello"), "world").expect("write through the mount");
    let (_, v) = call(s, "/VolumeDriver.Get", r#"{"Name":"sock-one"}"#).await;
    let st_ = &v["Volume"]["Status"];
    assert_eq!(st_["cache"], "sock");
    assert_eq!(st_["state"], "mounted");
    assert_eq!(st_["backend"], "kernel");
    assert_eq!(st_["commit"], "replace");
    assert_eq!(st_["base"], "0");
    let (_, v) = call(s, "/VolumeDriver.Path", r#"{"Name":"sock-one"}"#).await;
    assert_eq!(
        v["Mountpoint"].as_str().map(PathBuf::from),
        Some(mp.clone())
    );

    // A running container of the volume (a volume nobody uses any more would be removable).
    let mut container = Command::new("sleep")
        .arg("600")
        .current_dir(&mp)
        .spawn()
        .expect("sleep");

    // Bad input: a clear Err with a non-200 status, and the server keeps serving.
    for (ep, body, want) in [
        ("/VolumeDriver.Create", "not json", 400),
        ("/VolumeDriver.Create", r#"{"Name":["x"]}"#, 400),
        ("/VolumeDriver.Create", r#"{"Name":"no/slash-x"}"#, 400),
        ("/VolumeDriver.Mount", r#"{"Name":"ghost-x","ID":"1"}"#, 404),
        (
            "/VolumeDriver.Unmount",
            r#"{"Name":"sock-one","ID":"other"}"#,
            409,
        ),
        ("/VolumeDriver.Remove", r#"{"Name":"sock-one"}"#, 409),
        ("/VolumeDriver.Nope", "{}", 404),
        ("/", "", 404),
    ] {
        let (st, v) = call(s, ep, body).await;
        assert_eq!(st, want, "{ep} {body}: {v}");
        assert!(
            v["Err"].as_str().is_some_and(|e| !e.is_empty()),
            "{ep} {body}: {v}"
        );
    }
    // Over the 1 MiB cap: a 413 with an Err, or (when the server's reply and close win the race
    // against the client still writing) a reset connection; never a 200. Either way nothing is
    // created and the server keeps serving (checked by the calls that follow).
    let big = vec![b' '; 2 << 20];
    let client: Client<UnixConnector, Full<Bytes>> = Client::unix();
    let req = hyper::Request::post(hyper::Uri::from(Uri::new(s, "/VolumeDriver.Create")))
        .body(Full::new(Bytes::from(big)))
        .expect("request");
    match client.request(req).await {
        Ok(resp) => assert_eq!(resp.status().as_u16(), 413),
        Err(e) => eprintln!("oversized body: the server closed while we wrote ({e}): refused"),
    }
    let _ = container.kill();
    let _ = container.wait();

    let (st, _) = call(
        s,
        "/VolumeDriver.Unmount",
        r#"{"Name":"sock-one","ID":"abc"}"#,
    )
    .await;
    assert_eq!(st, 200);
    let state =
        std::fs::read_to_string(p.root().join("lower/sock/cache-state.json")).expect("state");
    assert!(state.contains("\"latest\": \"one\""), "{state}");
    let (st, _) = call(s, "/VolumeDriver.Remove", r#"{"Name":"sock-one"}"#).await;
    assert_eq!(st, 200);
    let (_, v) = call(s, "/VolumeDriver.List", "").await;
    assert_eq!(v["Volumes"].as_array().map(Vec::len), Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_stops_cleanly_and_sessions_survive_a_restart() {
    let Some(mut p) = Plugin::start() else { return };
    let s = p.socket.clone();
    call(&s, "/VolumeDriver.Create", r#"{"Name":"rs-a"}"#).await;
    let (_, v) = call(&s, "/VolumeDriver.Mount", r#"{"Name":"rs-a","ID":"x"}"#).await;
    let mp = PathBuf::from(v["Mountpoint"].as_str().expect("Mountpoint"));
    std::fs::write(mp.join("f"), "1").expect("write");
    // Its container keeps running across the plugin restart.
    let mut container = Command::new("sleep")
        .arg("600")
        .current_dir(&mp)
        .spawn()
        .expect("sleep");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(p.child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .expect("SIGTERM");
    let status = p.child.wait().expect("wait");
    assert!(status.success(), "exit status {status}:\n{}", p.log());
    assert!(!s.exists(), "socket removed on shutdown");
    assert_eq!(
        std::fs::read_to_string(mp.join("f")).ok().as_deref(),
        Some("1"),
        "the session stays mounted"
    );

    // A new process on the same root knows the volume and its session.
    let log = std::fs::File::create(p.dir.path().join("plugin2.log")).expect("log");
    p.child = Command::new(probe::exe())
        .args(["serve", "--backend", "kernel", "--root"])
        .arg(p.root())
        .arg("--socket")
        .arg(&s)
        .stderr(Stdio::from(log))
        .spawn()
        .expect("restart");
    let deadline = Instant::now() + Duration::from_secs(20);
    while !s.exists() {
        assert!(Instant::now() < deadline, "no socket after restart");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (_, v) = call(&s, "/VolumeDriver.Get", r#"{"Name":"rs-a"}"#).await;
    assert_eq!(v["Volume"]["Status"]["state"], "mounted", "{v}");
    let _ = container.kill();
    let _ = container.wait();
    let (st, _) = call(&s, "/VolumeDriver.Unmount", r#"{"Name":"rs-a","ID":"x"}"#).await;
    assert_eq!(st, 200);
    let state = std::fs::read_to_string(p.root().join("lower/rs/cache-state.json")).expect("state");
    assert!(state.contains("\"latest\": \"a\""), "{state}");
}
