//! Container start benchmark (DESIGN.md §10, issue 15): `docker run --rm` of a trivial container
//! (`true`) with a volume at /cache, start to exit, on Docker's `local` driver and on cachedriver
//! volumes with the kernel and the FUSE backend; plus the plugin's Mount and Unmount latency at
//! the protocol (one session each, straight to the socket; Podman allows 5 s per call).
//!
//! Runs a private dockerd and the offline busybox image of the e2e suite (tests/e2e: the same
//! modules, compiled in here), under `flock /tmp/cachedriver-e2e.lock` (taken by the bench itself:
//! one engine run on the machine at a time). Repetitions are interleaved across drivers; the table
//! gives medians, the spread (min–max) and each driver's time as a multiple of `local`.
//!
//! Run as root: `cargo bench --bench container` (`-- --quick`: one repetition). Knobs: `BENCH_REPS`
//! (default 7). Skips loudly without root or docker, failing instead under `CI=true` or
//! `CACHEDRIVER_REQUIRE_ALL=1`.

#[allow(dead_code)]
#[path = "support/e2e.rs"]
mod e2e;

#[path = "../tests/support/probe.rs"]
mod probe;
#[path = "support/stats.rs"]
mod stats;

use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use e2e::daemon::{http_over_unix, Dockerd};
use e2e::plugin::{Backend, Plugin};

const LOCK: &str = "/tmp/cachedriver-e2e.lock";

/// A volume to start containers with.
struct Driver {
    label: &'static str,
    /// `--volume-driver` value.
    driver: String,
    volume: String,
    /// The plugin serving it (None for `local`).
    plugin: Option<usize>,
}

fn skip(why: &str) -> ! {
    eprintln!("\n******** container bench SKIPPED: {why} ********\n");
    std::process::exit(if probe::strict() { 1 } else { 0 });
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    // `cargo test --benches` runs us without `--bench`: do nothing then.
    if !args.iter().any(|a| a == "--bench") {
        eprintln!("container bench: run with `cargo bench --bench container`");
        return;
    }
    let quick = args.iter().any(|a| a == "--quick");
    if !nix::unistd::geteuid().is_root() {
        skip("needs root (dockerd, mounts)");
    }
    if probe::which("dockerd").is_none() || probe::which("docker").is_none() {
        skip("dockerd/docker not installed (scripts/install-deps.sh installs docker.io)");
    }
    let reps = if quick {
        1
    } else {
        std::env::var("BENCH_REPS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(7usize)
            .max(1)
    };
    e2e::util::install_signal_handlers();
    if let Err(e) = run(reps) {
        eprintln!("container bench FAILED: {e:#}");
        std::process::exit(1);
    }
}

fn run(reps: usize) -> Result<()> {
    let lockf = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(LOCK)
        .with_context(|| format!("opening {LOCK}"))?;
    eprintln!("bench: waiting for {LOCK} ...");
    // SAFETY: flock on an fd we own; the lock goes with the fd at exit.
    if unsafe { libc::flock(lockf.as_raw_fd(), libc::LOCK_EX) } != 0 {
        bail!("flock {LOCK}: {}", std::io::Error::last_os_error());
    }
    let target = std::env::current_exe()?
        .ancestors()
        .nth(3)
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("target"));
    std::fs::create_dir_all(target.join("bench"))?;
    let dir = tempfile::Builder::new()
        .prefix("container-")
        .tempdir_in(target.join("bench"))?;
    let pid = std::process::id();
    let dockerd = Dockerd::start(&dir.path().join("dockerd"))?;
    let image = e2e::image::build(&dockerd, dir.path(), &format!("cdbench:{pid}"))?;
    let mut plugins = Vec::new();
    for (tag, b) in [("k", Backend::Kernel), ("f", Backend::Fuse)] {
        let name = format!("cdb{pid}{tag}");
        plugins.push(Plugin::start(
            &dir.path().join("plugins").join(&name),
            &name,
            b,
            None,
        )?);
    }
    let drivers = vec![
        Driver {
            label: "docker local",
            driver: "local".into(),
            volume: format!("cdb{pid}-local"),
            plugin: None,
        },
        Driver {
            label: "cachedriver kernel",
            driver: plugins[0].name.clone(),
            volume: format!("cdb{pid}-kernel"),
            plugin: Some(0),
        },
        Driver {
            label: "cachedriver fuse",
            driver: plugins[1].name.clone(),
            volume: format!("cdb{pid}-fuse"),
            plugin: Some(1),
        },
    ];
    let res = measure(&dockerd, &image, &plugins, &drivers, reps);
    for d in &drivers {
        let _ = dockerd.cli(&["volume", "rm", "-f", &d.volume]);
    }
    drop(plugins);
    dockerd.stop();
    res
}

fn measure(
    dockerd: &Dockerd,
    image: &str,
    plugins: &[Plugin],
    drivers: &[Driver],
    reps: usize,
) -> Result<()> {
    for d in drivers {
        dockerd
            .cli(&["volume", "create", "-d", &d.driver, &d.volume])?
            .check()?;
    }
    let run = |d: &Driver| -> Result<f64> {
        let v = format!("{}:/cache", d.volume);
        let t0 = Instant::now();
        dockerd
            .cli(&[
                "run",
                "--rm",
                "--network",
                "none",
                "--volume-driver",
                &d.driver,
                "-v",
                &v,
                image,
                "true",
            ])?
            .check()?;
        Ok(t0.elapsed().as_secs_f64())
    };
    // One start each first: image layers, the volume's first commit and page caches warm.
    for d in drivers {
        run(d)?;
    }
    let mut start: Vec<Vec<f64>> = vec![Vec::new(); drivers.len()];
    let mut mount: Vec<Vec<f64>> = vec![Vec::new(); drivers.len()];
    let mut unmount: Vec<Vec<f64>> = vec![Vec::new(); drivers.len()];
    for rep in 0..reps {
        for (i, d) in drivers.iter().enumerate() {
            e2e::util::check_interrupted();
            start[i].push(run(d)?);
            let Some(p) = d.plugin else { continue };
            let sock = &plugins[p].sock;
            let body = format!(r#"{{"Name":"{}","ID":"bench{rep}"}}"#, d.volume);
            for (path, out) in [
                ("/VolumeDriver.Mount", &mut mount[i]),
                ("/VolumeDriver.Unmount", &mut unmount[i]),
            ] {
                let t0 = Instant::now();
                let resp = http_over_unix(sock, "POST", path, &body)?;
                out.push(t0.elapsed().as_secs_f64());
                if resp.contains(r#""Err":""#) || !resp.contains("Err") {
                    continue;
                }
                bail!("{path} on {}: {resp}", d.label);
            }
        }
    }
    let local = stats::median(&start[0]);
    let mut md = String::from(
        "\n### Container start (`docker run --rm IMAGE true` with a volume at /cache)\n\n\
         | driver | start median (ms) | spread (ms) | × local | Mount median (ms) | Unmount median (ms) |\n\
         |---|---:|---:|---:|---:|---:|\n",
    );
    for (i, d) in drivers.iter().enumerate() {
        let ms = |v: &[f64]| {
            if v.is_empty() {
                "—".to_string()
            } else {
                format!("{:.1}", stats::median(v) * 1e3)
            }
        };
        let (lo, hi) = stats::spread(&start[i]);
        md.push_str(&format!(
            "| {} | {} | {:.0}–{:.0} | {:.2} | {} | {} |\n",
            d.label,
            ms(&start[i]),
            lo * 1e3,
            hi * 1e3,
            stats::median(&start[i]) / local,
            ms(&mount[i]),
            ms(&unmount[i]),
        ));
    }
    md.push_str(&format!(
        "\n{reps} repetition(s), interleaved; kernel {}, {} CPUs.\n",
        stats::kernel_release(),
        stats::cpus()
    ));
    println!("{md}");
    Ok(())
}
