//! End-to-end tests of cachedriver against a REAL dockerd (DESIGN §9).
//!
//! One private dockerd (own data root, exec root, socket; no bridge, no iptables) and one offline
//! busybox image serve every scenario; each scenario starts its own `cachedriver serve` as a
//! legacy plugin with a unique name. Scenarios run one after another, each under `catch_unwind`
//! and a guard that removes its containers, volumes and plugin; dockerd, its containerd, every
//! mount and every temporary directory are removed at the end, also after a panic or Ctrl-C;
//! what a killed run leaves behind is recovered by the next run.
//!
//! Scenarios (each on the kernel and on the FUSE backend): the seed walkthrough
//! ([`walkthrough`]), parity with Docker's `local` driver ([`parity`], the `local` driver is the
//! oracle; its determinism is proven first by `parity-oracle-selftest`), session sharing and
//! concurrent merges ([`sessions`]), plugin and dockerd restarts ([`restart`]), dockerd killed
//! with SIGKILL while containers run ([`orphans`]), Podman ([`podman`]), and the Docker managed
//! plugin built by `plugin/build.sh` ([`managed`]).
//!
//! Run: `sudo -E cargo test --test e2e_docker` (root needed). Output: one `ok`/`FAILED` line per
//! scenario, failure details with log tails, and `e2e: N passed, M failed`.
//!
//! Environment:
//! - `CI=true` or `CACHEDRIVER_REQUIRE_ALL=1`: never skip; a missing precondition fails.
//! - `CACHEDRIVER_E2E_ONLY=a,b`: run only scenarios whose name contains one of the substrings.
//! - `CACHEDRIVER_E2E_KEEP=1`: keep the run directory (plugin roots, logs) for inspection.
//! - `CACHEDRIVER_E2E_STORAGE_DRIVER`: force dockerd's storage driver (default: overlay2, then vfs).
//! - `CACHEDRIVER_E2E_DIR`: parent of run directories (default `/tmp/cde2e`).

mod e2e;
#[path = "support/probe.rs"]
mod probe;

use e2e::harness::{self, Precondition, Skip};
use e2e::parity::Group;
use e2e::plugin::Backend;
use e2e::{
    managed, orphans, parity, podman, policy, restart, scopes, sessions, store_perms, util,
    walkthrough, Harness,
};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::time::Instant;

type ScenarioFn = Box<dyn Fn(&Harness) -> anyhow::Result<()>>;

/// The scenarios, in run order: the oracle self-test, every scenario on the kernel backend, the
/// same on the FUSE backend, then the dockerd restarts (last: they disturb the shared daemon).
fn scenarios() -> Vec<(String, ScenarioFn)> {
    let mut v: Vec<(String, ScenarioFn)> = vec![(
        "parity-oracle-selftest".into(),
        Box::new(|h: &Harness| {
            parity::parity(h, None, Group::Main)?;
            parity::parity(h, None, Group::HardLinks)
        }),
    )];
    for b in [Backend::Kernel, Backend::Fuse] {
        let n = b.as_str();
        v.push((
            format!("walkthrough-{n}"),
            Box::new(move |h: &Harness| walkthrough::walkthrough(h, b)),
        ));
        v.push((
            format!("parity-{n}"),
            Box::new(move |h: &Harness| parity::parity(h, Some(b), Group::Main)),
        ));
        v.push((
            format!("parity-hardlinks-{n}"),
            Box::new(move |h: &Harness| parity::parity(h, Some(b), Group::HardLinks)),
        ));
        v.push((
            format!("sessions-{n}"),
            Box::new(move |h: &Harness| sessions::sessions(h, b)),
        ));
        v.push((
            format!("driver-defaults-{n}"),
            Box::new(move |h: &Harness| sessions::driver_defaults(h, b)),
        ));
        v.push((
            format!("restart-between-containers-{n}"),
            Box::new(move |h: &Harness| restart::restart_between(h, b)),
        ));
        v.push((
            format!("restart-while-mounted-{n}"),
            Box::new(move |h: &Harness| restart::restart_while_mounted(h, b)),
        ));
        v.push((
            format!("store-perms-{n}"),
            Box::new(move |h: &Harness| store_perms::store_perms(h, b)),
        ));
        v.push((
            format!("podman-{n}"),
            Box::new(move |h: &Harness| podman::podman(h, b)),
        ));
    }
    for b in [Backend::Kernel, Backend::Fuse] {
        v.push((
            format!("scopes-{}", b.as_str()),
            Box::new(move |h: &Harness| scopes::scopes(h, b)),
        ));
        v.push((
            format!("commit-on-success-{}", b.as_str()),
            Box::new(move |h: &Harness| policy::commit_on_success(h, b)),
        ));
        v.push((
            format!("dockerd-restart-{}", b.as_str()),
            Box::new(move |h: &Harness| restart::dockerd_restart(h, b)),
        ));
    }
    for b in [Backend::Kernel, Backend::Fuse] {
        v.push((
            format!("dockerd-sigkill-{}", b.as_str()),
            Box::new(move |h: &Harness| orphans::dockerd_sigkill(h, b)),
        ));
        v.push((
            format!("dockerd-sigkill-live-restore-{}", b.as_str()),
            Box::new(move |h: &Harness| orphans::dockerd_sigkill_live_restore(h, b)),
        ));
    }
    // also restarts dockerd, so it runs with the restarts
    v.push(("managed-plugin".into(), Box::new(managed::managed)));
    v
}

/// A scenario's outcome.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Verdict {
    Ok,
    Failed,
    Skipped,
}

impl Verdict {
    fn label(self) -> &'static str {
        match self {
            Verdict::Ok => "ok",
            Verdict::Failed => "FAILED",
            Verdict::Skipped => "SKIPPED",
        }
    }
}

fn selected(name: &str) -> bool {
    match std::env::var("CACHEDRIVER_E2E_ONLY") {
        Ok(f) if !f.trim().is_empty() => f
            .split(',')
            .map(str::trim)
            .any(|s| !s.is_empty() && name.contains(s)),
        _ => true,
    }
}

fn panic_message(p: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = p.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = p.downcast_ref::<String>() {
        s.clone()
    } else {
        "(non-string panic payload)".to_string()
    }
}

/// Prints the tails of dockerd's log (since `dockerd_start`) and the failed scenario's plugin
/// log, up to where the scenario's cleanup began when known.
fn print_logs(h: &Harness, dockerd_start: u64) {
    let marks = h.log_marks.borrow().clone();
    println!(
        "--- dockerd log tail ({}) ---\n{}",
        h.dockerd.log.display(),
        h.dockerd
            .log_tail((dockerd_start, marks.as_ref().map(|m| m.dockerd_end)), 25)
    );
    let plugin = marks.and_then(|m| m.plugin).or_else(|| {
        // no scope got as far as cleanup: show the most recently written plugin log
        let rd = std::fs::read_dir(h.run_dir.join("plugins")).ok()?;
        let log = rd
            .flatten()
            .map(|e| e.path().join("plugin.log"))
            .filter(|l| l.exists())
            .max_by_key(|l| std::fs::metadata(l).and_then(|m| m.modified()).ok())?;
        let len = util::file_len(&log);
        Some((log, len))
    });
    if let Some((log, end)) = plugin {
        println!(
            "--- plugin log tail ({}) ---\n{}",
            log.display(),
            util::tail_window(&log, (0, Some(end)), 40, &[])
        );
    }
}

/// Runs the suite; returns the process exit code.
fn run_all() -> i32 {
    util::install_signal_handlers();
    let start = Instant::now();
    let required = harness::required();
    if let Precondition::Missing(why) = harness::check_preconditions() {
        if required {
            println!("e2e: FAILED: cannot run the docker end-to-end suite: {why}");
            println!("e2e: 0 passed, 1 failed (preconditions; CI=true/CACHEDRIVER_REQUIRE_ALL=1 forbids skipping)");
            return 1;
        }
        println!("**************************************************************");
        println!("e2e: SKIPPED the docker end-to-end suite: {why}");
        println!("e2e: set CI=true or CACHEDRIVER_REQUIRE_ALL=1 to make this a failure");
        println!("**************************************************************");
        println!("e2e: 0 passed, 0 failed (all skipped: {why})");
        return 0;
    }
    let setup = catch_unwind(Harness::setup);
    let mut h = match setup {
        Ok(Ok(h)) => h,
        Ok(Err(e)) => {
            println!("e2e: FAILED: harness setup: {e:#}");
            println!("e2e: 0 passed, 1 failed (setup)");
            return 1;
        }
        Err(p) => {
            println!(
                "e2e: FAILED: harness setup panicked: {}",
                panic_message(&*p)
            );
            println!("e2e: 0 passed, 1 failed (setup)");
            return 1;
        }
    };
    println!(
        "e2e: dockerd up ({} storage, {}), image {}, plugin binary {}",
        h.dockerd.storage_driver,
        h.dockerd.host(),
        h.image,
        e2e::plugin::binary()
    );
    let mut results: Vec<(String, Verdict, f64)> = Vec::new();
    for (name, f) in scenarios() {
        if !selected(&name) {
            continue;
        }
        if util::interrupted() {
            break;
        }
        println!("e2e: running {name}");
        *h.log_marks.borrow_mut() = None;
        let dockerd_start = util::file_len(&h.dockerd.log);
        let t = Instant::now();
        let outcome = catch_unwind(AssertUnwindSafe(|| f(&h)));
        let secs = t.elapsed().as_secs_f64();
        let verdict = match outcome {
            Ok(Ok(())) => Verdict::Ok,
            Ok(Err(e)) => match e.downcast_ref::<Skip>() {
                Some(skip) if !required => {
                    println!("e2e: scenario {name} SKIPPED: {}", skip.0);
                    Verdict::Skipped
                }
                Some(skip) => {
                    println!(
                        "e2e: scenario {name} failed: {} (CI=true/CACHEDRIVER_REQUIRE_ALL=1 \
                         forbids skipping)",
                        skip.0
                    );
                    Verdict::Failed
                }
                None => {
                    println!("e2e: scenario {name} failed: {e:#}");
                    Verdict::Failed
                }
            },
            Err(p) => {
                println!("e2e: scenario {name} panicked: {}", panic_message(&*p));
                Verdict::Failed
            }
        };
        if verdict == Verdict::Failed {
            print_logs(&h, dockerd_start);
        }
        println!("{:<8} {name} ({secs:.1}s)", verdict.label());
        results.push((name, verdict, secs));
    }
    h.teardown();
    drop(h);
    let count = |v: Verdict| results.iter().filter(|r| r.1 == v).count();
    let (passed, failed, skipped) = (
        count(Verdict::Ok),
        count(Verdict::Failed),
        count(Verdict::Skipped),
    );
    println!(
        "e2e: summary ({:.0}s total):",
        start.elapsed().as_secs_f64()
    );
    for (name, v, secs) in &results {
        println!("  {:<8} {name} ({secs:.1}s)", v.label());
    }
    if util::interrupted() {
        println!("e2e: interrupted; remaining scenarios not run");
    }
    if skipped > 0 {
        println!("e2e: {skipped} skipped (see SKIPPED lines above)");
    }
    println!("e2e: {passed} passed, {failed} failed");
    if failed > 0 || util::interrupted() || results.is_empty() {
        1
    } else {
        0
    }
}

/// Entry point (`harness = false` in Cargo.toml: one dockerd for all scenarios, own summary).
fn main() {
    std::process::exit(run_all());
}
