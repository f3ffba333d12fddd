//! Caches across hosts (issue 16) against a real registry: Debian's `docker-registry` (CNCF
//! distribution 2.8) started on a free loopback port with its own config and storage, with and
//! without basic auth. Host A and host B are two store roots; A commits through real mounts of
//! the Driver API and pushes, B pulls, and both merged views must be identical.

#[path = "support/driver_fixture.rs"]
mod driver_fixture;
#[path = "support/registry.rs"]
mod registry;
#[path = "support/xattr_io.rs"]
mod xattr_io;

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use cachedriver::remote::{self, Access};
use cachedriver::store::Store;
use driver_fixture::{backends, Fixture};
use registry::Registry;

fn access() -> Access {
    Access {
        auth_file: Some(PathBuf::from("/nonexistent/cachedriver-test-auth.json")),
        insecure: false,
        concurrency: 3,
    }
}

fn no_auth() -> Access {
    // An absent explicit file is an error; tests without auth read an empty config instead.
    let dir =
        std::env::temp_dir().join(format!("cachedriver-remote-noauth-{}", std::process::id()));
    fs::create_dir_all(&dir).unwrap();
    let f = dir.join("config.json");
    fs::write(&f, "{}").unwrap();
    Access {
        auth_file: Some(f),
        ..access()
    }
}

fn auth_file(dir: &Path, registry: &str, user: &str, pass: &str) -> PathBuf {
    use base64::Engine;
    let b = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{pass}"));
    let f = dir.join(format!("auth-{user}-{pass}.json"));
    fs::write(
        &f,
        serde_json::json!({"auths": {registry: {"auth": b}}}).to_string(),
    )
    .unwrap();
    f
}

/// Everything the merged view shows, path by path: type, mode, owner, size, content digest,
/// symlink target, mtime of files, user xattrs; and which paths share an inode.
fn snapshot(root: &Path) -> (BTreeMap<String, String>, Vec<Vec<String>>) {
    let mut out = BTreeMap::new();
    let mut inodes: BTreeMap<u64, Vec<String>> = BTreeMap::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(d) = stack.pop() {
        let mut names: Vec<_> = fs::read_dir(&d).unwrap().flatten().collect();
        names.sort_by_key(|e| e.file_name());
        for e in names {
            let p = e.path();
            let rel = p.strip_prefix(root).unwrap().to_string_lossy().to_string();
            let m = fs::symlink_metadata(&p).unwrap();
            let ft = m.file_type();
            let mut desc = format!("mode={:o} uid={} gid={}", m.mode(), m.uid(), m.gid());
            if ft.is_symlink() {
                desc += &format!(" -> {}", fs::read_link(&p).unwrap().display());
            } else if ft.is_file() {
                let data = fs::read(&p).unwrap();
                desc += &format!(
                    " size={} sum={} mtime={}",
                    data.len(),
                    cachedriver::remote::layer::bytes_digest(&data),
                    m.mtime()
                );
                if m.nlink() > 1 {
                    inodes.entry(m.ino()).or_default().push(rel.clone());
                }
            } else if ft.is_dir() {
                stack.push(p.clone());
            }
            if !ft.is_symlink() {
                if let Ok(list) = xattr_io::listxattr(&p) {
                    for x in list.into_iter().filter(|x| x.starts_with("user.")) {
                        let v = xattr_io::getxattr(&p, &x).unwrap_or_default();
                        desc += &format!(" {x}={:?}", String::from_utf8_lossy(&v));
                    }
                }
            }
            out.insert(rel, desc);
        }
    }
    let mut groups: Vec<Vec<String>> = inodes.into_values().filter(|g| g.len() > 1).collect();
    for g in &mut groups {
        g.sort();
    }
    groups.sort();
    (out, groups)
}

fn set_xattr(p: &Path, name: &str, v: &[u8]) {
    xattr_io::setxattr(p, name, v).unwrap_or_else(|e| panic!("setxattr {name}: {e}"));
}

/// Session one on host A: every kind of entry a layer holds.
fn write_first(m: &Path) {
    fs::create_dir_all(m.join("repo/org/lib")).unwrap();
    fs::write(m.join("repo/org/lib/a.jar"), vec![7u8; 100_000]).unwrap();
    fs::write(m.join("repo/org/lib/gone.jar"), b"to be deleted").unwrap();
    fs::set_permissions(
        m.join("repo/org/lib/a.jar"),
        fs::Permissions::from_mode(0o640),
    )
    .unwrap();
    std::os::unix::fs::chown(m.join("repo/org/lib/a.jar"), Some(1000), Some(1001)).unwrap();
    fs::write(m.join("tool.sh"), b"#!/bin/sh\necho hi\n").unwrap();
    fs::set_permissions(m.join("tool.sh"), fs::Permissions::from_mode(0o4755)).unwrap();
    std::os::unix::fs::symlink("repo/org/lib/a.jar", m.join("link-rel")).unwrap();
    std::os::unix::fs::symlink("/etc/passwd", m.join("link-abs")).unwrap();
    fs::hard_link(m.join("tool.sh"), m.join("tool-hard.sh")).unwrap();
    fs::create_dir_all(m.join("opq/old/deeper")).unwrap();
    fs::write(m.join("opq/old/deeper/x"), b"old").unwrap();
    fs::write(m.join("opq/keep-not"), b"old too").unwrap();
    set_xattr(
        &m.join("repo/org/lib/a.jar"),
        "user.origin",
        b"maven-central",
    );
    set_xattr(&m.join("repo"), "user.dir-note", b"dir xattr");
    nix::unistd::mkfifo(
        &m.join("fifo"),
        nix::sys::stat::Mode::from_bits_truncate(0o620),
    )
    .unwrap();
    fs::create_dir(m.join("private")).unwrap();
    fs::set_permissions(m.join("private"), fs::Permissions::from_mode(0o700)).unwrap();
    std::os::unix::fs::chown(m.join("private"), Some(33), Some(33)).unwrap();
    let mut long = m.join("long");
    for i in 0..6 {
        long = long.join(format!("{i}-{}", "n".repeat(60)));
    }
    fs::create_dir_all(&long).unwrap();
    fs::write(long.join("deep.txt"), b"long path").unwrap();
}

/// Session two: a deletion (whiteout), an opaque dir (removed and made again), a change.
fn write_second(m: &Path) {
    fs::remove_file(m.join("repo/org/lib/gone.jar")).unwrap();
    fs::remove_dir_all(m.join("opq")).unwrap();
    fs::create_dir(m.join("opq")).unwrap();
    fs::write(m.join("opq/new"), b"new content").unwrap();
    fs::write(m.join("changed.txt"), b"changed").unwrap();
}

fn commit(fx: &Fixture, vol: &str, f: impl FnOnce(&Path)) {
    fx.create(vol, &[]);
    let m = fx.mount(vol, "m1");
    f(&m);
    fx.unmount(vol, "m1");
}

fn view(fx: &Fixture, vol: &str) -> (BTreeMap<String, String>, Vec<Vec<String>>) {
    fx.create(vol, &[]);
    let m = fx.mount(vol, "v1");
    let s = snapshot(&m);
    fx.unmount(vol, "v1");
    s
}

fn state(root: &Path, cache: &str) -> serde_json::Value {
    serde_json::from_slice(
        &fs::read(root.join("lower").join(cache).join("cache-state.json")).unwrap(),
    )
    .unwrap()
}

fn leftovers(root: &Path, cache: &str) -> Vec<String> {
    fs::read_dir(root.join("lower").join(cache))
        .map(|rd| {
            rd.flatten()
                .map(|e| e.file_name().to_string_lossy().to_string())
                .filter(|n| n.starts_with(".tmp-"))
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn two_hosts_push_pull_incremental_on_every_backend() {
    let Some(reg) = Registry::start(None) else {
        return;
    };
    for kind in backends("remote") {
        let a_dir = tempfile::tempdir().unwrap();
        let b_dir = tempfile::tempdir().unwrap();
        let a = Fixture::at(a_dir.path(), kind, cachedriver::names::CommitMode::Replace);
        let b = Fixture::at(b_dir.path(), kind, cachedriver::names::CommitMode::Replace);
        let repo = reg.repo(&format!("team/{}", kind.as_str()));
        let acc = no_auth();

        commit(&a, "m2-one", write_first);
        commit(&a, "m2-two", write_second);
        let puts0 = reg.blob_puts();
        let r = remote::push(&Store::open(a_dir.path()).unwrap(), "m2", &repo, &acc).unwrap();
        assert_eq!(r.layers, 3, "{r:?}");
        assert_eq!(r.uploaded.len(), 3, "{r:?}");
        assert_eq!(
            reg.blob_puts() - puts0,
            4,
            "3 layers + config: {}",
            reg.log()
        );
        // Digests recorded: a second push tars nothing and uploads nothing but the config.
        let st = state(a_dir.path(), "m2");
        assert!(st["layers"]["one"]["remote"]["digest"]
            .as_str()
            .unwrap()
            .starts_with("sha256:"));
        let r2 = remote::push(
            &Store::open(a_dir.path()).unwrap(),
            "m2:default",
            &repo,
            &acc,
        )
        .unwrap();
        assert_eq!((r2.uploaded.len(), r2.exported), (0, 0), "{r2:?}");

        let rb = remote::pull(&Store::open(b_dir.path()).unwrap(), &repo, "m2", &acc).unwrap();
        assert_eq!(rb.downloaded.len(), 3, "{rb:?}");
        assert!(rb.switched);
        let va = view(&a, "m2-a1");
        let vb = view(&b, "m2-b1");
        assert_eq!(va, vb, "host B's view differs from host A's ({kind:?})");
        let files = &va.0;
        assert!(
            !files.contains_key("repo/org/lib/gone.jar"),
            "whiteout lost"
        );
        assert!(
            files.contains_key("opq/new") && !files.contains_key("opq/old"),
            "opaque lost"
        );
        assert!(
            files["repo/org/lib/a.jar"].contains("user.origin=\"maven-central\""),
            "{files:?}"
        );
        assert!(files["link-abs"].contains("-> /etc/passwd"));
        assert!(files["fifo"].starts_with("mode=10"), "{}", files["fifo"]);
        assert!(files["private"].contains("uid=33"));
        // The hard link travelled as one inode in B's layer.
        let sb = Store::open(b_dir.path()).unwrap();
        let bottom_up: Vec<String> = rb.downloaded.clone();
        let l1 = sb.layer_dir("m2", &bottom_up[1]);
        let (i1, i2) = (
            fs::symlink_metadata(l1.join("tool.sh")).unwrap().ino(),
            fs::symlink_metadata(l1.join("tool-hard.sh")).unwrap().ino(),
        );
        assert_eq!(i1, i2, "hard link split in transit");

        // One more commit on A: the next push uploads one layer (plus the config) only.
        commit(&a, "m2-three", |m| {
            fs::write(m.join("three.txt"), b"3").unwrap()
        });
        let puts1 = reg.blob_puts();
        let r3 = remote::push(&Store::open(a_dir.path()).unwrap(), "m2", &repo, &acc).unwrap();
        assert_eq!(
            (r3.layers, r3.uploaded.len(), r3.exported),
            (4, 1, 1),
            "{r3:?}"
        );
        assert_eq!(reg.blob_puts() - puts1, 2, "one layer + config");
        // B downloads only the new layer.
        let gets = reg.blob_gets();
        let rb2 = remote::pull(&Store::open(b_dir.path()).unwrap(), &repo, "m2", &acc).unwrap();
        assert_eq!((rb2.downloaded.len(), rb2.reused.len()), (1, 3), "{rb2:?}");
        assert_eq!(reg.blob_gets() - gets, 1, "one layer blob downloaded");
        assert_eq!(view(&a, "m2-a2"), view(&b, "m2-b2"));
        // Pulling the same snapshot again changes nothing.
        let rb3 = remote::pull(&Store::open(b_dir.path()).unwrap(), &repo, "m2", &acc).unwrap();
        assert!(!rb3.switched && rb3.downloaded.is_empty(), "{rb3:?}");
        assert!(leftovers(b_dir.path(), "m2").is_empty());
        drop(a);
        drop(b);
    }
}

/// A cache made by writing a bottom layer directly (no mount needed).
fn direct_cache(root: &Path, cache: &str, files: &[(&str, &[u8])]) -> Store {
    let store = Store::open(root).unwrap();
    let _lock = store.lock_cache(cache).unwrap();
    store
        .ensure_cache(cache, cachedriver::state::XattrNs::for_this_process())
        .unwrap();
    for (n, d) in files {
        let p = store.layer_dir(cache, "0").join(n);
        fs::create_dir_all(p.parent().unwrap()).unwrap();
        fs::write(p, d).unwrap();
    }
    store
}

#[test]
fn basic_auth_and_bad_credentials() {
    let Some(reg) = Registry::start(Some(("ci", "s3cret"))) else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let a = direct_cache(&tmp.path().join("a"), "npm", &[("x/y.txt", b"hello")]);
    let repo = reg.repo("auth/caches");
    let registry = format!("127.0.0.1:{}", reg.port);
    let e = remote::push(&a, "npm", &repo, &no_auth())
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("401") || e.to_lowercase().contains("unauthorized") || e.contains("credentials"),
        "{e}"
    );
    let wrong = Access {
        auth_file: Some(auth_file(tmp.path(), &registry, "ci", "wrong")),
        ..access()
    };
    let e = remote::push(&a, "npm", &repo, &wrong)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("401") || e.to_lowercase().contains("unauthorized") || e.contains("credentials"),
        "{e}"
    );
    let good = Access {
        auth_file: Some(auth_file(tmp.path(), &registry, "ci", "s3cret")),
        ..access()
    };
    let r = remote::push(&a, "npm", &repo, &good).unwrap();
    assert_eq!(r.uploaded.len(), 1);
    let b = Store::open(tmp.path().join("b")).unwrap();
    let e = remote::pull(&b, &repo, "npm", &wrong)
        .unwrap_err()
        .to_string();
    assert!(!e.is_empty());
    assert!(
        b.load_state("npm").unwrap().is_none(),
        "a failed pull made a cache"
    );
    remote::pull(&b, &repo, "npm", &good).unwrap();
    let latest = b.load_state("npm").unwrap().unwrap().state.latest;
    assert_eq!(
        fs::read(b.layer_dir("npm", &latest).join("x/y.txt")).unwrap(),
        b"hello"
    );
    // Scopes other than the default are refused clearly.
    let e = remote::push(&a, "npm:pr-1", &repo, &good)
        .unwrap_err()
        .to_string();
    assert!(e.contains("scopes are not supported yet"), "{e}");
}

#[test]
fn failures_leave_both_stores_unchanged() {
    let Some(mut reg) = Registry::start(None) else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let acc = no_auth();
    let a = direct_cache(
        &tmp.path().join("a"),
        "gradle",
        &[("one", b"1"), ("big", &vec![3u8; 3 << 20])],
    );
    let repo = reg.repo("fail/caches");
    remote::push(&a, "gradle", &repo, &acc).unwrap();
    let b_root = tmp.path().join("b");
    let b = direct_cache(&b_root, "gradle", &[("local", b"mine")]);
    let before = fs::read(b.state_path("gradle")).unwrap();

    // A manifest of another artifact type.
    let other = reg.repo("fail/other");
    {
        let rt = tokio::runtime::Runtime::new().unwrap();
        rt.block_on(async {
            let c = oci_client::Client::new(oci_client::client::ClientConfig {
                protocol: oci_client::client::ClientProtocol::Http,
                ..Default::default()
            });
            let r: oci_client::Reference = format!("{other}:gradle.default").parse().unwrap();
            let layer = oci_client::client::ImageLayer::new(
                b"x".to_vec(),
                "application/vnd.oci.image.layer.v1.tar".into(),
                None,
            );
            let cfg = oci_client::client::Config::new(
                b"{}".to_vec(),
                "application/vnd.oci.image.config.v1+json".into(),
                None,
            );
            c.push(
                &r,
                &[layer],
                cfg,
                &oci_client::secrets::RegistryAuth::Anonymous,
                None,
            )
            .await
            .unwrap();
        });
    }
    let e = remote::pull(&b, &other, "gradle", &acc)
        .unwrap_err()
        .to_string();
    assert!(e.contains("not a cachedriver snapshot"), "{e}");
    assert_eq!(fs::read(b.state_path("gradle")).unwrap(), before);

    // A blob whose stored bytes no longer match its digest.
    let st = a.load_state("gradle").unwrap().unwrap();
    let digest = st.layers["0"].ext("remote").unwrap()["digest"]
        .as_str()
        .unwrap()
        .to_string();
    let f = reg.blob_file(&digest);
    let saved = fs::read(&f).unwrap();
    let mut bad = saved.clone();
    let n = bad.len() / 2;
    bad[n] ^= 0xff;
    fs::write(&f, &bad).unwrap();
    let e = remote::pull(&b, &repo, "gradle", &acc)
        .unwrap_err()
        .to_string();
    assert!(e.contains("digest"), "{e}");
    assert_eq!(fs::read(b.state_path("gradle")).unwrap(), before);
    assert!(
        leftovers(&b_root, "gradle").is_empty(),
        "{:?}",
        leftovers(&b_root, "gradle")
    );
    fs::write(&f, &saved).unwrap();

    // The registry gone mid-transfer (its blob vanishes after the manifest was served, then
    // the whole registry stops): nothing changes on either side.
    fs::remove_file(&f).unwrap();
    let e = remote::pull(&b, &repo, "gradle", &acc)
        .unwrap_err()
        .to_string();
    assert!(!e.is_empty());
    assert_eq!(fs::read(b.state_path("gradle")).unwrap(), before);
    assert!(leftovers(&b_root, "gradle").is_empty());
    fs::write(&f, &saved).unwrap();
    let a_before = fs::read(a.state_path("gradle")).unwrap();
    reg.stop();
    let e = remote::pull(&b, &repo, "gradle", &acc)
        .unwrap_err()
        .to_string();
    assert!(e.contains("unreachable") || e.contains("connect"), "{e}");
    let e = remote::push(&a, "gradle", &repo, &acc)
        .unwrap_err()
        .to_string();
    assert!(e.contains("unreachable") || e.contains("connect"), "{e}");
    assert_eq!(fs::read(b.state_path("gradle")).unwrap(), before);
    assert_eq!(fs::read(a.state_path("gradle")).unwrap(), a_before);
    assert!(leftovers(&b_root, "gradle").is_empty());
    // Back up: the pull now lands.
    reg.spawn();
    let r = remote::pull(&b, &repo, "gradle", &acc).unwrap();
    assert!(r.switched);
    let latest = b.load_state("gradle").unwrap().unwrap().state.latest;
    assert_eq!(
        fs::read(b.layer_dir("gradle", &latest).join("big"))
            .unwrap()
            .len(),
        3 << 20
    );
}

/// The CLI end to end, and a failpoint at each state-changing step of pull: the step fails,
/// the cache's state is unchanged, and the next pull lands.
#[test]
fn cli_push_pull_and_pull_failpoints() {
    let Some(reg) = Registry::start(None) else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let a_root = tmp.path().join("a");
    direct_cache(&a_root, "sbt", &[("k/v", b"value")]);
    let repo = reg.repo("cli/caches");
    let cfg = tmp.path().join("config.json");
    fs::write(&cfg, "{}").unwrap();
    let run = |args: &[&str], fp: Option<&str>| {
        let mut c = std::process::Command::new(driver_fixture::exe());
        c.args(args)
            .arg("--remote-auth-file")
            .arg(&cfg)
            .env("CACHEDRIVER_LOG", "warn");
        if let Some(f) = fp {
            c.env("FAILPOINTS", f);
        }
        c.output().unwrap()
    };
    let out = run(
        &[
            "push",
            "--root",
            a_root.to_str().unwrap(),
            "--json",
            "sbt",
            &repo,
        ],
        None,
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let r: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(r["layers"], 1);
    let b_root = tmp.path().join("b");
    let b = direct_cache(&b_root, "sbt", &[("old", b"old")]);
    let before = fs::read(b.state_path("sbt")).unwrap();
    if cfg!(feature = "failpoints") {
        for fp in [
            "remote::pull_after_download",
            "remote::pull_after_unpack",
            "remote::pull_after_sync",
            "remote::pull_after_rename",
            "remote::pull_before_state",
        ] {
            for action in ["return", "return(abort)"] {
                let out = run(
                    &[
                        "pull",
                        "--root",
                        b_root.to_str().unwrap(),
                        &format!("{repo}:sbt.default"),
                        "sbt",
                    ],
                    Some(&format!("{fp}={action}")),
                );
                assert!(!out.status.success(), "{fp}={action} did not fire");
                if action == "return(abort)" {
                    assert_eq!(out.status.code(), Some(137), "{fp}: not killed");
                }
                assert_eq!(
                    fs::read(b.state_path("sbt")).unwrap(),
                    before,
                    "{fp}={action} changed the state"
                );
                if action == "return" {
                    assert!(
                        leftovers(&b_root, "sbt").is_empty(),
                        "{fp}: {:?}",
                        leftovers(&b_root, "sbt")
                    );
                }
            }
        }
        // After the state is written, a crash keeps the pulled snapshot whole.
        let out = run(
            &["pull", "--root", b_root.to_str().unwrap(), &repo, "sbt"],
            Some("remote::pull_after_state=return(abort)"),
        );
        assert_eq!(out.status.code(), Some(137));
        let latest = b.load_state("sbt").unwrap().unwrap().state.latest;
        assert_eq!(
            fs::read(b.layer_dir("sbt", &latest).join("k/v")).unwrap(),
            b"value"
        );
        // Digests recorded by push: a failure there leaves the state as it was.
        let a = Store::open(&a_root).unwrap();
        let a_before = fs::read(a.state_path("sbt")).unwrap();
        fs::write(a.layer_dir("sbt", "0").join("k/w"), b"more").unwrap();
        let mut st = a.load_state("sbt").unwrap().unwrap();
        st.layers
            .get_mut("0")
            .unwrap()
            .set_ext("remote", serde_json::json!(null));
        a.save_state("sbt", &st).unwrap();
        let mid = fs::read(a.state_path("sbt")).unwrap();
        let out = run(
            &["push", "--root", a_root.to_str().unwrap(), "sbt", &repo],
            Some("remote::push_before_record=return(abort)"),
        );
        assert_eq!(out.status.code(), Some(137));
        assert_eq!(fs::read(a.state_path("sbt")).unwrap(), mid);
        assert_ne!(mid, a_before);
    } else {
        eprintln!("remote: pull failpoints not compiled in (build with --features failpoints)");
    }
    let out = run(
        &[
            "pull",
            "--root",
            b_root.to_str().unwrap(),
            &repo,
            "sbt:default",
        ],
        None,
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let latest = b.load_state("sbt").unwrap().unwrap().state.latest;
    assert_eq!(
        fs::read(b.layer_dir("sbt", &latest).join("k/v")).unwrap(),
        b"value"
    );
    let out = run(
        &[
            "pull",
            "--root",
            b_root.to_str().unwrap(),
            &repo,
            "sbt:pr-7",
        ],
        None,
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("scopes are not supported yet"));
}
