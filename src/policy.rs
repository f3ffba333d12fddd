//! Commit policies: `commit-on=always|success` (volume option; driver-wide `--commit-on`).
//!
//! With `success`, the last Unmount of a session commits only if every container that used the
//! session exited 0; otherwise its changes are discarded and the log names the container and its
//! exit code. Who used the session and how they ended comes from the engine's event stream
//! ([`crate::engine`]). A session no container mounted (Docker's image-content copy at create,
//! `docker cp` into a stopped container) commits. When the outcome is still unknown
//! [`OUTCOME_WAIT`] after the Unmount, `--commit-on-unknown` decides (default `discard`).

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::engine::{Engine, Outcome};
use crate::error::{Error, Result};
use crate::names::CommitMode;

/// How long an Unmount waits for a `container die` still in flight.
pub const OUTCOME_WAIT: Duration = Duration::from_secs(2);

/// When a session's changes are committed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum CommitOn {
    /// Always (per the commit mode): today's behaviour.
    #[default]
    Always,
    /// Only if every container that used the session exited 0.
    Success,
}

impl CommitOn {
    /// `always` or `success`.
    pub fn as_str(self) -> &'static str {
        match self {
            CommitOn::Always => "always",
            CommitOn::Success => "success",
        }
    }

    /// Parses a volume option value.
    pub fn parse(s: &str) -> Result<Self> {
        match s {
            "always" => Ok(CommitOn::Always),
            "success" => Ok(CommitOn::Success),
            _ => Err(Error::InvalidOption(format!(
                "invalid commit-on value {s:?}: use commit-on=always or commit-on=success"
            ))),
        }
    }
}

/// What to do with a `success` session whose containers' outcome is unknown.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum OnUnknown {
    /// Discard its changes (a cache miss is cheaper than a poisoned cache).
    #[default]
    Discard,
    /// Commit them.
    Commit,
}

/// The driver-wide policy settings.
#[derive(Debug, Clone, Default)]
pub struct Policy {
    /// `--commit-on`: for volumes that set no `commit-on`.
    pub commit_on: CommitOn,
    /// `--commit-on-unknown`.
    pub on_unknown: OnUnknown,
    /// The engine whose event stream is followed (`--engine-socket`), if any.
    pub engine: Option<Arc<Engine>>,
}

impl Policy {
    /// The volume's policy: its own `commit-on` option, else the driver-wide one.
    pub fn commit_on(&self, opts: &std::collections::BTreeMap<String, String>) -> CommitOn {
        opts.get("commit-on")
            .and_then(|v| CommitOn::parse(v).ok())
            .unwrap_or(self.commit_on)
    }

    /// Refuses, at Create, `commit-on=success` without a reachable engine socket.
    pub fn check_create(&self, commit_on: CommitOn) -> Result<()> {
        if commit_on != CommitOn::Success {
            return Ok(());
        }
        match &self.engine {
            Some(e) if e.reachable() => Ok(()),
            Some(e) => Err(Error::InvalidOption(format!(
                "commit-on=success needs the engine's event stream, but {} does not answer: start the engine, \
                 or point --engine-socket / CACHEDRIVER_ENGINE_SOCKET at its API socket",
                e.socket().display()
            ))),
            None => Err(Error::InvalidOption(
                "commit-on=success needs the engine's event stream: start the plugin with --engine-socket \
                 (CACHEDRIVER_ENGINE_SOCKET), e.g. /var/run/docker.sock"
                    .into(),
            )),
        }
    }

    /// The mode a session ending now is committed with: `mode`, or `Discard` when the policy
    /// says its changes must not reach the cache. Blocking (may wait [`OUTCOME_WAIT`]).
    pub fn decide(
        &self,
        volume: &str,
        opts: &std::collections::BTreeMap<String, String>,
        started_at: &str,
        mode: CommitMode,
    ) -> CommitMode {
        if mode == CommitMode::Discard || self.commit_on(opts) != CommitOn::Success {
            return mode;
        }
        let since = parse_rfc3339(started_at).unwrap_or(UNIX_EPOCH);
        let outcome = match &self.engine {
            Some(e) => e.outcome(volume, since, OUTCOME_WAIT),
            None => Outcome::Unknown(vec![]),
        };
        match outcome {
            Outcome::Succeeded(cs) => {
                tracing::info!(volume, containers = ?cs, "commit-on=success: every container exited 0; committing");
                mode
            }
            Outcome::NoContainer => {
                tracing::info!(
                    volume,
                    "commit-on=success: no container used this session; committing"
                );
                mode
            }
            Outcome::Failed { container, code } => {
                tracing::warn!(
                    volume,
                    container,
                    exit_code = code,
                    "commit-on=success: a container failed; discarding the session's changes"
                );
                CommitMode::Discard
            }
            Outcome::Unknown(cs) => {
                let m = match self.on_unknown {
                    OnUnknown::Discard => CommitMode::Discard,
                    OnUnknown::Commit => mode,
                };
                tracing::warn!(volume, containers = ?cs, decision = m.as_str(),
                    "commit-on=success: how the session's containers ended is unknown (engine events missing); applying --commit-on-unknown");
                m
            }
        }
    }
}

/// Parses our own `YYYY-MM-DDTHH:MM:SSZ` timestamps.
pub fn parse_rfc3339(s: &str) -> Option<SystemTime> {
    let b = s.as_bytes();
    if b.len() < 20
        || b[4] != b'-'
        || b[7] != b'-'
        || b[10] != b'T'
        || b[13] != b':'
        || b[16] != b':'
    {
        return None;
    }
    let n = |r: std::ops::Range<usize>| s.get(r)?.parse::<i64>().ok();
    let (y, m, d) = (n(0..4)?, n(5..7)?, n(8..10)?);
    let (hh, mm, ss) = (n(11..13)?, n(14..16)?, n(17..19)?);
    // Howard Hinnant's days_from_civil.
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    let secs = days * 86_400 + hh * 3600 + mm * 60 + ss;
    u64::try_from(secs)
        .ok()
        .map(|s| UNIX_EPOCH + Duration::from_secs(s))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_round_trip() {
        let s = crate::fsutil::now_rfc3339();
        let t = parse_rfc3339(&s).unwrap();
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs();
        let got = t.duration_since(UNIX_EPOCH).unwrap().as_secs();
        assert!(now.abs_diff(got) <= 1, "{s} -> {got} vs {now}");
        assert_eq!(
            parse_rfc3339("2000-02-29T00:00:00Z")
                .unwrap()
                .duration_since(UNIX_EPOCH)
                .unwrap()
                .as_secs(),
            951_782_400
        );
        assert!(parse_rfc3339("yesterday").is_none());
    }

    #[test]
    fn success_needs_an_engine_at_create() {
        let p = Policy::default();
        assert!(p.check_create(CommitOn::Always).is_ok());
        let e = p.check_create(CommitOn::Success).unwrap_err().to_string();
        assert!(e.contains("--engine-socket"), "{e}");
        let p = Policy {
            engine: Some(Engine::new("/nonexistent/docker.sock")),
            ..Policy::default()
        };
        let e = p.check_create(CommitOn::Success).unwrap_err().to_string();
        assert!(e.contains("/nonexistent/docker.sock"), "{e}");
    }

    #[test]
    fn unknown_outcome_follows_the_setting() {
        let opts =
            std::collections::BTreeMap::from([("commit-on".to_string(), "success".to_string())]);
        let e = Engine::new("/nonexistent");
        let t = crate::engine::Engine::now_ns();
        e.ingest(format!(r#"{{"Type":"volume","Action":"mount","Actor":{{"ID":"v-a","Attributes":{{"container":"c1"}}}},"timeNano":{t}}}"#).as_bytes());
        let mut p = Policy {
            engine: Some(e),
            ..Policy::default()
        };
        let started = crate::fsutil::now_rfc3339();
        // (waits OUTCOME_WAIT for the die event that never comes)
        assert_eq!(
            p.decide("v-a", &opts, &started, CommitMode::Merge),
            CommitMode::Discard
        );
        p.on_unknown = OnUnknown::Commit;
        assert_eq!(
            p.decide("v-a", &opts, &started, CommitMode::Merge),
            CommitMode::Merge
        );
        assert_eq!(
            p.decide("v-a", &Default::default(), &started, CommitMode::Replace),
            CommitMode::Replace
        );
    }
}
