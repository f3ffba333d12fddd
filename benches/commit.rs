//! Commit latency against cache size (`cargo bench --bench commit`, as root).
//!
//! For caches of 1k, 10k and 100k files, times the Unmount that commits a one-file change
//! (through the driver, with real kernel overlay mounts), beside the time a full copy of the same
//! cache takes (`cp -a`, what the original project did on every commit). Prints a table and
//! writes `target/bench/commit.json`. Commit should be flat: largest/smallest near 1.
//! Env: `COMMIT_BENCH_SIZES=1000,10000,100000`, `COMMIT_BENCH_ROUNDS=21`, `BENCH_DIR` (scratch
//! parent; default under target/). `-- --quick` (CI): 100 and 1000 files, 3 rounds.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use cachedriver::backend::BackendKind;
use cachedriver::driver::{Config, Driver};
use cachedriver::names::CommitMode;
use cachedriver::store::Store;

#[path = "support/chart.rs"]
mod chart;

fn median(v: &mut [Duration]) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// Builds a seed-format cache of `n` small files in dirs of 100.
fn build_cache(root: &Path, n: usize) -> PathBuf {
    let layer = root.join("lower/bench/seed");
    for i in 0..n {
        let dir = layer.join(format!("g{:04}/h{:02}", i / 1000, (i / 100) % 10));
        if i % 100 == 0 {
            fs::create_dir_all(&dir).expect("mkdir");
        }
        fs::write(
            dir.join(format!("artifact-{i}.jar")),
            format!("content {i}\n"),
        )
        .expect("write");
    }
    fs::write(
        root.join("lower/bench/cache-state.json"),
        r#"{"state":{"latest":"seed"}}"#,
    )
    .expect("state");
    layer
}

fn main() {
    // CACHEDRIVER_LOG=info shows each commit's unmount/commit/record breakdown.
    if let Ok(f) = tracing_subscriber::EnvFilter::try_from_env("CACHEDRIVER_LOG") {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(f)
            .with_writer(std::io::stderr)
            .try_init();
    }
    if !nix::unistd::geteuid().is_root() {
        eprintln!("commit bench: needs root (it mounts kernel overlays); nothing measured");
        std::process::exit(1);
    }
    let quick = std::env::args().any(|a| a == "--quick");
    let sizes: Vec<usize> = std::env::var("COMMIT_BENCH_SIZES")
        .unwrap_or_else(|_| {
            if quick {
                "100,1000"
            } else {
                "1000,10000,100000"
            }
            .into()
        })
        .split(',')
        .filter_map(|s| s.trim().parse().ok())
        .collect();
    let rounds: usize = std::env::var("COMMIT_BENCH_ROUNDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(if quick { 3 } else { 21 });
    let target = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target");
    let parent = std::env::var_os("BENCH_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| target.join("bench-scratch"));
    fs::create_dir_all(&parent).expect("scratch dir");
    let exe = std::env::current_exe().expect("exe");

    println!(
        "| cache files | commit median (ms) | commit p90 (ms) | full copy (ms) | copy / commit |"
    );
    println!("|---:|---:|---:|---:|---:|");
    let mut rows = Vec::new();
    for &n in &sizes {
        let dir = tempfile::tempdir_in(&parent).expect("tempdir");
        let store = Store::open(dir.path()).expect("store");
        let layer = build_cache(dir.path(), n);
        let driver = Driver::new(
            store,
            Config {
                backend: BackendKind::Kernel,
                commit: CommitMode::Replace,
                exe: exe.clone(),
            },
        )
        .expect("driver");
        // Flush the tree we just wrote so commit's syncfs measures only the session's change.
        nix::unistd::sync();
        let mut times = Vec::new();
        for r in 0..rounds {
            let name = format!("bench-s{r}");
            driver.create(&name, &BTreeMap::new()).expect("create");
            let m = driver.mount(&name, "bench").expect("mount");
            fs::write(m.join(format!("g0000/h00/new-{r}.jar")), "changed").expect("write");
            let t = Instant::now();
            driver.unmount(&name, "bench").expect("unmount");
            times.push(t.elapsed());
        }
        let mut copies = Vec::new();
        for i in 0..3 {
            let dst = dir.path().join(format!("copy{i}"));
            nix::unistd::sync();
            let t = Instant::now();
            let ok = Command::new("cp")
                .arg("-a")
                .arg(&layer)
                .arg(&dst)
                .status()
                .map(|s| s.success())
                .unwrap_or(false);
            nix::unistd::sync();
            copies.push(t.elapsed());
            assert!(ok, "cp -a failed");
        }
        let med = median(&mut times);
        let p90 = times[(times.len() * 9 / 10).min(times.len() - 1)];
        let copy = median(&mut copies);
        println!(
            "| {n} | {:.2} | {:.2} | {:.1} | {:.0}x |",
            ms(med),
            ms(p90),
            ms(copy),
            copy.as_secs_f64() / med.as_secs_f64()
        );
        rows.push(serde_json::json!({"files": n, "commit_median_ms": ms(med), "commit_p90_ms": ms(p90), "full_copy_ms": ms(copy)}));
    }
    if rows.len() >= 2 {
        let first = rows[0]["commit_median_ms"].as_f64().unwrap_or(1.0);
        let last = rows[rows.len() - 1]["commit_median_ms"]
            .as_f64()
            .unwrap_or(1.0);
        println!(
            "\nflatness (largest / smallest cache commit median): {:.2} (target <= 1.5)",
            last / first
        );
    }
    let out = target.join("bench");
    let _ = fs::create_dir_all(&out);
    let _ = fs::write(
        out.join("commit.json"),
        serde_json::to_vec_pretty(&rows).unwrap_or_default(),
    );
    let get = |k: &str| rows.iter().map(|r| r[k].as_f64()).collect::<Vec<_>>();
    let svg = chart::BarChart {
        title: "Commit of a one-file change vs a full copy of the cache",
        y_label: "milliseconds (log scale)",
        groups: rows
            .iter()
            .map(|r| format!("{} files", r["files"]))
            .collect(),
        series: vec![
            (
                "cachedriver commit (median)".into(),
                get("commit_median_ms"),
            ),
            ("full copy (cp -a)".into(), get("full_copy_ms")),
        ],
        log: true,
        reference: None,
    }
    .svg();
    let _ = fs::write(out.join("commit.svg"), svg);
    println!("wrote {}", out.join("commit.svg").display());
}
