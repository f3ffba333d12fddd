//! The container engine's event stream (`GET /events` on the Docker API socket; Podman's
//! Docker-compatible socket serves the same), followed for `commit-on=success`.
//!
//! Why events: Docker's Mount/Unmount IDs are random, not container IDs, and while Docker sends
//! the Unmount the container API still says "running". But the stream delivers `volume mount`
//! (attributes `container`, `driver`, `destination`) when a container starts with a volume and
//! `container die` (attribute `exitCode`) about 10 ms *before* the Unmount reaches us (measured
//! with dockerd 20.10). So at Unmount we know which containers used a volume since its session
//! began and how each one ended; [`Engine::outcome`] waits a short bound for a `die` still in
//! flight.
//!
//! The follower runs on the async runtime, reconnects with backoff when the engine restarts
//! (asking for events `since` the last one seen), and keeps a bounded history (entries older than
//! [`HISTORY`] or beyond [`MAX_ENTRIES`] are dropped).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use http_body_util::{BodyExt, Empty};
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;
use serde::Deserialize;

/// How long events are remembered.
pub const HISTORY: Duration = Duration::from_secs(6 * 3600);
/// At most this many mounts and exits are remembered.
pub const MAX_ENTRIES: usize = 100_000;

/// How the containers that used a session ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Every container that mounted the volume during the session exited 0.
    Succeeded(Vec<String>),
    /// This container exited with this code (the first failure found).
    Failed {
        /// The container's ID.
        container: String,
        /// Its exit code (`docker kill` gives 137).
        code: i64,
    },
    /// No container mounted the volume during the session (Docker's image-content copy at
    /// create, `docker cp` into a stopped container).
    NoContainer,
    /// The engine did not tell us in time how these containers ended.
    Unknown(Vec<String>),
}

#[derive(Debug, Default)]
struct History {
    /// volume name -> (container, event time in ns)
    mounts: HashMap<String, Vec<(String, u64)>>,
    /// container -> (exit code, event time in ns)
    exits: HashMap<String, (i64, u64)>,
    /// Newest event time seen (ns), for `since` after a reconnect.
    last_ns: u64,
    entries: usize,
    /// Records since the last prune: pruning walks everything, so it runs every
    /// [`PRUNE_EVERY`] records or when over [`MAX_ENTRIES`].
    since_prune: usize,
}

const PRUNE_EVERY: usize = 4096;

impl History {
    fn prune(&mut self, now_ns: u64) {
        self.since_prune += 1;
        if self.entries <= MAX_ENTRIES && self.since_prune < PRUNE_EVERY {
            return;
        }
        self.since_prune = 0;
        let horizon = now_ns.saturating_sub(HISTORY.as_nanos() as u64);
        // Drop the old half when over the count bound, else what is past the horizon.
        let cut = if self.entries > MAX_ENTRIES {
            let mut times: Vec<u64> = self
                .mounts
                .values()
                .flat_map(|v| v.iter().map(|(_, t)| *t))
                .chain(self.exits.values().map(|(_, t)| *t))
                .collect();
            times.sort_unstable();
            times
                .get(times.len() / 2)
                .copied()
                .unwrap_or(horizon)
                .max(horizon)
        } else {
            horizon
        };
        for v in self.mounts.values_mut() {
            v.retain(|(_, t)| *t >= cut);
        }
        self.mounts.retain(|_, v| !v.is_empty());
        self.exits.retain(|_, (_, t)| *t >= cut);
        self.entries = self.mounts.values().map(Vec::len).sum::<usize>() + self.exits.len();
    }

    fn record(&mut self, ev: &Event) {
        let t = ev
            .time_nano
            .unwrap_or(ev.time.unwrap_or(0).saturating_mul(1_000_000_000));
        self.last_ns = self.last_ns.max(t);
        let attrs = &ev.actor.attributes;
        match (ev.kind.as_str(), ev.action.as_str()) {
            ("volume", "mount") => {
                if let Some(c) = attrs.get("container") {
                    self.mounts
                        .entry(ev.actor.id.clone())
                        .or_default()
                        .push((c.clone(), t));
                    self.entries += 1;
                }
            }
            ("container", "die") => {
                let code = attrs
                    .get("exitCode")
                    .and_then(|c| c.parse().ok())
                    .unwrap_or(-1);
                self.exits.insert(ev.actor.id.clone(), (code, t));
                self.entries += 1;
            }
            _ => {}
        }
        self.prune(t);
    }

    /// The containers that mounted `volume` at or after `since_ns`, oldest first, deduplicated.
    fn users(&self, volume: &str, since_ns: u64) -> Vec<String> {
        let mut out: Vec<String> = Vec::new();
        for (c, t) in self.mounts.get(volume).into_iter().flatten() {
            if *t >= since_ns && !out.contains(c) {
                out.push(c.clone());
            }
        }
        out
    }

    fn outcome(&self, volume: &str, since_ns: u64) -> Outcome {
        let users = self.users(volume, since_ns);
        if users.is_empty() {
            return Outcome::NoContainer;
        }
        let mut unknown = Vec::new();
        for c in &users {
            match self.exits.get(c) {
                Some((code, t)) if *t >= since_ns => {
                    if *code != 0 {
                        return Outcome::Failed {
                            container: c.clone(),
                            code: *code,
                        };
                    }
                }
                _ => unknown.push(c.clone()),
            }
        }
        if unknown.is_empty() {
            Outcome::Succeeded(users)
        } else {
            Outcome::Unknown(unknown)
        }
    }
}

/// One event of the stream (only the fields we use).
#[derive(Debug, Deserialize)]
struct Event {
    #[serde(rename = "Type", default)]
    kind: String,
    #[serde(rename = "Action", default)]
    action: String,
    #[serde(rename = "Actor", default)]
    actor: Actor,
    #[serde(default)]
    time: Option<u64>,
    #[serde(rename = "timeNano", default)]
    time_nano: Option<u64>,
}

#[derive(Debug, Default, Deserialize)]
struct Actor {
    #[serde(rename = "ID", default)]
    id: String,
    #[serde(rename = "Attributes", default)]
    attributes: HashMap<String, String>,
}

/// The event follower and what it has seen.
#[derive(Debug)]
pub struct Engine {
    socket: PathBuf,
    history: Mutex<History>,
    changed: Condvar,
    connected: AtomicBool,
}

fn now_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

impl Engine {
    /// An engine at `socket`, not yet followed (see [`Engine::follow`]).
    pub fn new(socket: impl Into<PathBuf>) -> Arc<Engine> {
        Arc::new(Engine {
            socket: socket.into(),
            history: Mutex::new(History::default()),
            changed: Condvar::new(),
            connected: AtomicBool::new(false),
        })
    }

    /// The engine's API socket.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// True while the stream is connected, or when the socket accepts a connection now.
    pub fn reachable(&self) -> bool {
        self.connected.load(Ordering::SeqCst)
            || std::os::unix::net::UnixStream::connect(&self.socket).is_ok()
    }

    /// Follows the stream forever, reconnecting with backoff (1 s doubling to 10 s). Run it as a
    /// task on the runtime.
    pub async fn follow(self: Arc<Self>) {
        let mut backoff = Duration::from_secs(1);
        loop {
            match self.stream_once().await {
                Ok(()) => {
                    tracing::info!(socket = %self.socket.display(), "engine event stream ended; reconnecting");
                    backoff = Duration::from_secs(1);
                }
                Err(e) => {
                    tracing::debug!(socket = %self.socket.display(), error = %e, "engine event stream unavailable")
                }
            }
            self.connected.store(false, Ordering::SeqCst);
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_secs(10));
        }
    }

    async fn stream_once(&self) -> anyhow::Result<()> {
        let stream = tokio::net::UnixStream::connect(&self.socket).await?;
        let (mut sender, conn) =
            hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
        let conn = tokio::spawn(conn);
        let since = {
            let h = self.history.lock().unwrap_or_else(|e| e.into_inner());
            if h.last_ns == 0 {
                None
            } else {
                Some(h.last_ns / 1_000_000_000)
            }
        };
        // {"type":["container","volume"],"event":["die","mount"]}, URL-encoded
        let mut uri = String::from(
            "/events?filters=%7B%22type%22%3A%5B%22container%22%2C%22volume%22%5D%2C%22event%22%3A%5B%22die%22%2C%22mount%22%5D%7D",
        );
        if let Some(s) = since {
            uri.push_str(&format!("&since={s}"));
        }
        let req = hyper::Request::get(uri)
            .header(hyper::header::HOST, "docker")
            .body(Empty::<Bytes>::new())?;
        let resp = sender.send_request(req).await?;
        anyhow::ensure!(resp.status().is_success(), "GET /events: {}", resp.status());
        self.connected.store(true, Ordering::SeqCst);
        tracing::info!(socket = %self.socket.display(), "following the engine's event stream");
        let mut body = resp.into_body();
        let mut buf: Vec<u8> = Vec::new();
        while let Some(frame) = body.frame().await {
            let frame = frame?;
            let Some(data) = frame.data_ref() else {
                continue;
            };
            buf.extend_from_slice(data);
            if buf.len() > 1 << 20 {
                anyhow::bail!("an event larger than 1 MiB: dropping the connection");
            }
            while let Some(nl) = buf.iter().position(|b| *b == b'\n') {
                let line: Vec<u8> = buf.drain(..=nl).collect();
                self.ingest(&line);
            }
        }
        conn.abort();
        Ok(())
    }

    /// Records one line of the stream (ignored when it is not an event we know).
    pub fn ingest(&self, line: &[u8]) {
        let Ok(ev) = serde_json::from_slice::<Event>(line) else {
            return;
        };
        tracing::debug!(kind = %ev.kind, action = %ev.action, id = %ev.actor.id, "engine event");
        self.history
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .record(&ev);
        self.changed.notify_all();
    }

    /// How the containers that mounted `volume` since `since` ended, waiting up to `wait` for
    /// exits still in flight. Blocking: call it off the async runtime.
    pub fn outcome(&self, volume: &str, since: SystemTime, wait: Duration) -> Outcome {
        // A second of slack: session start times are stored at second precision.
        let since_ns = since
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0)
            .saturating_sub(1_000_000_000);
        let deadline = Instant::now() + wait;
        let mut h = self.history.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            let o = h.outcome(volume, since_ns);
            let left = deadline.saturating_duration_since(Instant::now());
            // No container yet may mean its `volume mount` event is still in flight too.
            if !matches!(o, Outcome::Unknown(_) | Outcome::NoContainer) || left.is_zero() {
                return o;
            }
            h = self
                .changed
                .wait_timeout(h, left.min(Duration::from_millis(50)))
                .map(|(g, _)| g)
                .unwrap_or_else(|e| e.into_inner().0);
        }
    }

    /// Test and tooling aid: the current time in the stream's units.
    pub fn now_ns() -> u64 {
        now_ns()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mount(vol: &str, c: &str, t: u64) -> String {
        format!(
            r#"{{"Type":"volume","Action":"mount","Actor":{{"ID":"{vol}","Attributes":{{"container":"{c}","driver":"cd"}}}},"time":{},"timeNano":{t}}}"#,
            t / 1_000_000_000
        )
    }

    fn die(c: &str, code: i64, t: u64) -> String {
        format!(
            r#"{{"Type":"container","Action":"die","Actor":{{"ID":"{c}","Attributes":{{"exitCode":"{code}"}}}},"timeNano":{t}}}"#
        )
    }

    #[test]
    fn outcomes_from_events() {
        let e = Engine::new("/nonexistent");
        let t0 = now_ns();
        let since = SystemTime::now() - Duration::from_secs(5);
        let w = Duration::ZERO;
        assert_eq!(e.outcome("v-a", since, w), Outcome::NoContainer);
        e.ingest(mount("v-a", "c1", t0).as_bytes());
        assert_eq!(
            e.outcome("v-a", since, w),
            Outcome::Unknown(vec!["c1".into()])
        );
        e.ingest(die("c1", 0, t0 + 1).as_bytes());
        assert_eq!(
            e.outcome("v-a", since, w),
            Outcome::Succeeded(vec!["c1".into()])
        );
        e.ingest(mount("v-a", "c2", t0 + 2).as_bytes());
        e.ingest(die("c2", 137, t0 + 3).as_bytes());
        assert_eq!(
            e.outcome("v-a", since, w),
            Outcome::Failed {
                container: "c2".into(),
                code: 137
            }
        );
        // a later session does not inherit earlier containers
        let later = SystemTime::now() + Duration::from_secs(10);
        assert_eq!(e.outcome("v-a", later, w), Outcome::NoContainer);
        e.ingest(b"not json\n");
        e.ingest(br#"{"Type":"network","Action":"connect"}"#);
    }

    #[test]
    fn history_is_bounded() {
        let mut h = History::default();
        let t = now_ns();
        for i in 0..(MAX_ENTRIES + 10) {
            let ev: Event =
                serde_json::from_str(&mount("v", &format!("c{i}"), t + i as u64)).unwrap();
            h.record(&ev);
        }
        assert!(h.entries <= MAX_ENTRIES, "{} entries kept", h.entries);
    }
}
