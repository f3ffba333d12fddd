//! Push and pull of a cache through a loopback registry (`cargo bench --bench remote`, as root).
//!
//! Builds a cache of `REMOTE_BENCH_MIB` MiB (default 200; 1024 for the 1 GiB) in
//! `REMOTE_BENCH_FILES` files (default 5000) of incompressible data (what jars and tarballs in a
//! real cache are), starts Debian's `docker-registry` on a free loopback port, and times:
//! - `push` of the cache (tar + zstd + upload), against `tar | zstd` of the same tree plus a raw
//!   upload of a blob of that size (oci-client, one PUT): the physical limit here;
//! - `pull` into an empty store (download + verify + unpack + syncfs), against a raw download of
//!   that blob;
//! - an incremental push after a one-file commit (digests recorded: nothing is tarred again).
//!
//! Prints ratios and writes `target/bench/remote.json`. `BENCH_DIR` sets the scratch parent;
//! `-- --quick` runs an 8 MiB, 200-file cache (the CI smoke run).

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use cachedriver::remote::{self, Access};
use cachedriver::state::XattrNs;
use cachedriver::store::Store;

fn env_usize(k: &str, d: usize) -> usize {
    std::env::var(k)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(d)
}

struct Reg(std::process::Child);
impl Drop for Reg {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start_registry(dir: &Path) -> (Reg, u16) {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("port");
    fs::write(
        dir.join("config.yml"),
        format!(
            "version: 0.1\nlog:\n  level: warn\n  accesslog:\n    disabled: true\nstorage:\n  filesystem:\n    rootdirectory: {}\nhttp:\n  addr: 127.0.0.1:{port}\n",
            dir.join("data").display()
        ),
    )
    .expect("config");
    let child = Command::new("/usr/bin/docker-registry")
        .arg("serve")
        .arg(dir.join("config.yml"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("docker-registry (apt-get install docker-registry)");
    let reg = Reg(child);
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "registry did not start");
        std::thread::sleep(Duration::from_millis(50));
    }
    (reg, port)
}

/// xorshift bytes: incompressible, cheap to make.
fn fill(buf: &mut [u8], seed: &mut u64) {
    for c in buf.chunks_mut(8) {
        *seed ^= *seed << 13;
        *seed ^= *seed >> 7;
        *seed ^= *seed << 17;
        let b = seed.to_le_bytes();
        c.copy_from_slice(&b[..c.len()]);
    }
}

fn build(store: &Store, mib: usize, files: usize) -> PathBuf {
    let _l = store.lock_cache("bench").expect("lock");
    store
        .ensure_cache("bench", XattrNs::for_this_process())
        .expect("cache");
    let layer = store.layer_dir("bench", "0");
    let per = (mib << 20) / files.max(1);
    let mut buf = vec![0u8; per];
    let mut seed = 0x9e37_79b9_7f4a_7c15u64;
    for i in 0..files {
        let d = layer.join(format!("g{:03}/h{:02}", i / 1000, (i / 100) % 10));
        if i % 100 == 0 {
            fs::create_dir_all(&d).expect("mkdir");
        }
        fill(&mut buf, &mut seed);
        fs::write(d.join(format!("a-{i}.jar")), &buf).expect("write");
    }
    layer
}

fn secs(d: Duration) -> f64 {
    d.as_secs_f64()
}

fn main() {
    // `--quick`: a small cache, so CI proves the bench still runs.
    let quick = std::env::args().any(|a| a == "--quick");
    let mib = env_usize("REMOTE_BENCH_MIB", if quick { 8 } else { 200 });
    let files = env_usize("REMOTE_BENCH_FILES", if quick { 200 } else { 5000 });
    let parent = std::env::var_os("BENCH_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/bench"));
    fs::create_dir_all(&parent).expect("bench dir");
    let scratch = tempfile::tempdir_in(&parent).expect("scratch");
    let s = scratch.path();
    fs::create_dir_all(s.join("reg")).expect("reg dir");
    let (_reg, port) = start_registry(&s.join("reg"));
    let repo = format!("127.0.0.1:{port}/bench/caches");
    fs::write(s.join("auth.json"), "{}").expect("auth");
    let access = Access {
        auth_file: Some(s.join("auth.json")),
        insecure: false,
        concurrency: 4,
    };

    let a = Store::open(s.join("a")).expect("store a");
    let layer = build(&a, mib, files);
    eprintln!("remote bench: {mib} MiB in {files} files");

    // The reference: tar | zstd of the same tree, then a raw upload / download of that blob.
    let t = Instant::now();
    let tz = s.join("ref.tar.zst");
    let st = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "tar -C '{}' -cf - . | zstd -3 -q -T1 -o '{}'",
            layer.display(),
            tz.display()
        ))
        .status()
        .expect("tar | zstd");
    assert!(st.success());
    let tar_zstd = t.elapsed();
    let blob = fs::read(&tz).expect("read ref blob");
    let digest = remote::layer::bytes_digest(&blob);
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let (raw_up, raw_down) = rt.block_on(async {
        let c = oci_client::Client::new(oci_client::client::ClientConfig {
            protocol: oci_client::client::ClientProtocol::Http,
            use_monolithic_push: true,
            ..Default::default()
        });
        let r: oci_client::Reference = format!("127.0.0.1:{port}/bench/raw:x")
            .parse()
            .expect("ref");
        let t = Instant::now();
        c.push_blob(&r, blob.clone(), &digest)
            .await
            .expect("raw upload");
        let up = t.elapsed();
        let desc = oci_client::manifest::OciDescriptor {
            digest: digest.clone(),
            size: blob.len() as i64,
            media_type: "application/octet-stream".into(),
            ..Default::default()
        };
        // Each timed phase starts quiescent: no writeback of the previous one's gigabyte may
        // land in it (that alone moved the pull between 1.5x and 3x of the raw download).
        nix::unistd::sync();
        let t = Instant::now();
        let f = tokio::fs::File::create(s.join("raw.down"))
            .await
            .expect("create");
        c.pull_blob(&r, &desc, f).await.expect("raw download");
        (up, t.elapsed())
    });
    drop(blob);

    nix::unistd::sync();
    let t = Instant::now();
    let p = remote::push(&a, "bench", &repo, &access).expect("push");
    let push = t.elapsed();
    let b = Store::open(s.join("b")).expect("store b");
    nix::unistd::sync();
    let t = Instant::now();
    let q = remote::pull(&b, &repo, "bench", &access).expect("pull");
    let pull = t.elapsed();

    // One more commit of one file, then an incremental push.
    {
        let _l = a.lock_cache("bench").expect("lock");
        let mut st = a.load_state("bench").expect("state").expect("state");
        let d = a.layer_dir("bench", "one");
        fs::create_dir(&d).expect("layer");
        fs::File::create(d.join("changed.txt"))
            .and_then(|mut f| f.write_all(b"one change"))
            .expect("write");
        st.push_layer("one", "0", "bench-one");
        a.save_state("bench", &st).expect("save");
    }
    let t = Instant::now();
    let p2 = remote::push(&a, "bench", &repo, &access).expect("incremental push");
    let inc = t.elapsed();
    assert_eq!(p2.uploaded.len(), 1, "{p2:?}");

    let push_ref = tar_zstd + raw_up;
    println!(
        "remote bench: {mib} MiB, {files} files, blob {} MiB",
        p.bytes >> 20
    );
    println!("  tar|zstd        {:8.2} s", secs(tar_zstd));
    println!("  raw upload      {:8.2} s", secs(raw_up));
    println!("  raw download    {:8.2} s", secs(raw_down));
    println!(
        "  push            {:8.2} s   x{:.2} of tar|zstd + raw upload",
        secs(push),
        secs(push) / secs(push_ref)
    );
    println!(
        "  pull            {:8.2} s   x{:.2} of raw download ({} layer(s))",
        secs(pull),
        secs(pull) / secs(raw_down),
        q.downloaded.len()
    );
    println!("  incremental push{:8.3} s   (1 layer uploaded)", secs(inc));
    let json = serde_json::json!({
        "mib": mib, "files": files, "blob_bytes": p.bytes,
        "tar_zstd_s": secs(tar_zstd), "raw_upload_s": secs(raw_up), "raw_download_s": secs(raw_down),
        "push_s": secs(push), "pull_s": secs(pull), "incremental_push_s": secs(inc),
        "push_vs_tar_zstd_upload": secs(push) / secs(push_ref),
        "pull_vs_raw_download": secs(pull) / secs(raw_down),
    });
    let _ = fs::write(
        parent.join("remote.json"),
        serde_json::to_vec_pretty(&json).unwrap_or_default(),
    );
}
