//! Parity with Docker's `local` driver (DESIGN §4 "Like a local volume, to the container").
//!
//! Every case runs the same container scripts twice, once on a `local` volume and once on a
//! cachedriver volume, and compares what the containers print (listings with modes, owners,
//! sizes, link counts, fixed mtimes, symlink targets, content hashes; error messages; exit
//! codes). Nothing is hard-coded: the `local` driver is the oracle. A few sanity checks on the
//! oracle's own output make sure each script really exercised what it claims (a broken script
//! that fails identically on both sides must not pass).
//!
//! The oracle self-test runs the cases `local` against `local`, proving the scripts are
//! deterministic, so any difference against cachedriver is the plugin's.

use super::harness::{expect_contains, Harness, Scope, Vol};
use super::plugin::Backend;
use super::util::{self, CmdOut};
use anyhow::{bail, Result};
use std::fs;

/// Shell prelude: `lst DIR` prints one line per entry below DIR, sorted, with what a container
/// can observe and that does not depend on when the test ran (mtimes before 2001 are printed,
/// newer ones show as `recent`).
const LST: &str = r#"
lst() {
  ( cd "$1" || exit 1
    find . | sort | while IFS= read -r p; do
      t=$(stat -c %Y "$p")
      if [ "$t" -lt 1000000000 ]; then t="mtime=@$t"; else t="mtime=recent"; fi
      if [ -L "$p" ]; then stat -c '%n %A %u:%g symlink %N' "$p"
      elif [ -d "$p" ]; then echo "$(stat -c '%n %A %u:%g dir' "$p") $t"
      elif [ -f "$p" ]; then
        echo "$(stat -c '%n %A %u:%g file size=%s links=%h' "$p") $t md5=$(md5sum < "$p" | cut -c1-12)"
      else echo "$(stat -c '%n %A %u:%g %F' "$p") $t"; fi
    done )
  echo "lst-rc=$?"
}
"#;

fn script(body: &str) -> String {
    format!("{LST}\n{body}")
}

/// One side of the comparison: which driver, and how volumes are named for it.
struct Side {
    /// `local` or the plugin's name.
    driver: String,
    /// Distinguishes the two sides' volumes/caches (`x`, `y`).
    tag: &'static str,
}

impl Side {
    /// The volume for `step` of case `id`. `local` always uses one volume per case; the plugin
    /// uses a new session per step (`<cache>-s<step>`) unless `reuse` asks for one volume name
    /// across steps (sequential sessions on the same volume).
    fn vol(&self, id: &str, step: usize, reuse: bool) -> Vol {
        if self.driver == "local" {
            Vol::new(&format!("{id}{}-local", self.tag), "local")
        } else if reuse {
            Vol::new(&format!("{id}{}-v", self.tag), &self.driver)
        } else {
            Vol::new(&format!("{id}{}-s{step}", self.tag), &self.driver)
        }
    }
}

/// What one step showed: compared across sides.
struct Observed {
    step: String,
    out: CmdOut,
}

impl Observed {
    fn key(&self) -> String {
        format!("exit={:?}\n{}", self.out.code, self.out.stdout)
    }
}

/// Which cases a parity scenario runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Group {
    /// (a)-(f) except hard links.
    Main,
    /// Hard links across sessions, kept apart so a FUSE inode-number regression shows by name.
    HardLinks,
}

/// A parity case: its id (cache name prefix), description, and body.
struct Case {
    group: Group,
    id: &'static str,
    what: &'static str,
    run: fn(&Scope, &Side) -> Result<Vec<Observed>>,
    /// (step index, text) that the ORACLE's output must contain: the script did its job.
    sanity: &'static [(usize, &'static str)],
}

/// How one step runs: its number (names the plugin session), where the volume is mounted, and
/// `docker run` flags.
#[derive(Clone, Copy)]
struct Step<'a> {
    n: usize,
    dst: &'a str,
    /// Use one volume name for every step instead of a new session name per step.
    reuse: bool,
    /// Mount the volume `:ro`.
    ro: bool,
    extra: &'a [&'a str],
}

fn step(n: usize, dst: &str) -> Step<'_> {
    Step {
        n,
        dst,
        reuse: false,
        ro: false,
        extra: &[],
    }
}

impl<'a> Step<'a> {
    fn reuse(self) -> Self {
        Step {
            reuse: true,
            ..self
        }
    }
    fn ro(self) -> Self {
        Step { ro: true, ..self }
    }
    fn extra(self, extra: &'a [&'a str]) -> Self {
        Step { extra, ..self }
    }
}

/// Runs the steps of case `id` on one side.
struct Runner<'a, 'h> {
    s: &'a Scope<'h>,
    side: &'a Side,
    id: &'static str,
}

impl Runner<'_, '_> {
    /// `docker run --rm ... sh -c LST+BODY` for `st`.
    fn sh(&self, st: Step, body: &str) -> Result<Observed> {
        let v = self.side.vol(self.id, st.n, st.reuse);
        let out = self
            .s
            .sh(Some((&v, st.dst, st.ro)), st.extra, &script(body))?;
        let ro = if st.ro { ":ro" } else { "" };
        Ok(Observed {
            step: format!(
                "step {} (-v {}:{}{ro} {}): {body}",
                st.n,
                v.name,
                st.dst,
                st.extra.join(" ")
            ),
            out,
        })
    }
}

/// (a) image content copied into a new, empty volume.
fn case_image_copy(s: &Scope, side: &Side) -> Result<Vec<Observed>> {
    let r = Runner { s, side, id: "pa" };
    Ok(vec![
        r.sh(
            step(1, "/data"),
            "lst /data; cat /data/hello.txt; [ /data/hard-a -ef /data/hard-b ] && echo hard-linked",
        )?,
        r.sh(
            step(2, "/data"),
            "lst /data; { echo more >> /data/hello.txt; } 2>&1; echo rc=$?; \
             cat /data/sub/nested.txt",
        )?,
        r.sh(step(3, "/data"), "lst /data; cat /data/hello.txt")?,
    ])
}

/// (b) `--user 1000` writing its home cache in successive containers.
fn case_user_home_cache(s: &Scope, side: &Side) -> Result<Vec<Observed>> {
    let r = Runner { s, side, id: "pb" };
    let d = "/home/user/.cache";
    let u = ["--user", "1000"];
    Ok(vec![
        r.sh(
            step(1, d).extra(&u),
            &format!(
                "id -u; stat -c '%A %u:%g' {d}; {{ echo one >> {d}/log; }} 2>&1; echo rc=$?; \
                 mkdir -p {d}/sub/dir 2>&1; echo rc=$?; \
                 {{ echo f > {d}/sub/dir/f; }} 2>&1; echo rc=$?; lst {d}"
            ),
        )?,
        r.sh(
            step(2, d).extra(&u),
            &format!(
                "stat -c '%A %u:%g' {d}; cat {d}/log; {{ echo two >> {d}/log; }} 2>&1; \
                 echo rc=$?; cat {d}/log; rm -r {d}/sub 2>&1; echo rc=$?; \
                 touch {d}/new 2>&1; echo rc=$?; lst {d}"
            ),
        )?,
        r.sh(step(3, d), &format!("lst {d}; cat {d}/log"))?,
    ])
}

/// (c) a `--read-only` container writes to its volume.
fn case_read_only_container(s: &Scope, side: &Side) -> Result<Vec<Observed>> {
    let r = Runner { s, side, id: "pc" };
    Ok(vec![
        r.sh(
            step(1, "/cache").extra(&["--read-only"]),
            "{ echo w > /cache/f; } 2>&1; echo rc=$?; mkdir /cache/d 2>&1; echo rc=$?; \
             { echo x > /etc/x; } 2>&1; echo rc=$?; lst /cache",
        )?,
        r.sh(step(2, "/cache"), "cat /cache/f; lst /cache")?,
    ])
}

/// (d) a `:ro` mount refuses writes, and nothing leaks into the next container.
fn case_ro_mount(s: &Scope, side: &Side) -> Result<Vec<Observed>> {
    let r = Runner { s, side, id: "pd" };
    Ok(vec![
        r.sh(
            step(1, "/cache"),
            "echo seed > /cache/seed; mkdir /cache/dir; lst /cache",
        )?,
        r.sh(
            step(2, "/cache").ro(),
            "cat /cache/seed; { echo w > /cache/f; } 2>&1; echo rc=$?; \
             rm /cache/seed 2>&1; echo rc=$?; touch /cache/seed 2>&1; echo rc=$?; \
             rmdir /cache/dir 2>&1; echo rc=$?; lst /cache",
        )?,
        r.sh(step(3, "/cache"), "lst /cache; cat /cache/seed")?,
    ])
}

/// (e) `docker cp` into a running container (Docker mounts the volume again for the copy), the
/// container reads it, and after stop the next container sees it.
fn case_docker_cp(s: &Scope, side: &Side) -> Result<Vec<Observed>> {
    let r = Runner { s, side, id: "pe" };
    let v = side.vol(r.id, 1, true);
    let src =
        s.h.run_dir
            .join(format!("cp-src-{}-{}", side.tag, side.driver));
    fs::create_dir_all(src.join("cpdir/inner"))?;
    fs::write(src.join("copied.txt"), "copied in\n")?;
    fs::write(src.join("cpdir/inner/deep.txt"), "deep\n")?;
    fs::write(src.join("cpdir/top.txt"), "top\n")?;
    let ctr = format!("{}{}-{}", r.id, side.tag, side.driver);
    s.start(&ctr, &v, "/cache", &[])?;
    let mut obs = Vec::new();
    let out = s.exec(&ctr, "echo before > /cache/before.txt; echo rc=$?")?;
    obs.push(Observed {
        step: "exec write".into(),
        out,
    });
    for what in ["copied.txt", "cpdir"] {
        let from = src.join(what);
        let out =
            s.h.docker(&["cp", &from.to_string_lossy(), &format!("{ctr}:/cache/")])?;
        obs.push(Observed {
            step: format!("docker cp {what} in"),
            out,
        });
    }
    let out = s.exec(
        &ctr,
        &script("lst /cache; cat /cache/copied.txt /cache/cpdir/inner/deep.txt"),
    )?;
    obs.push(Observed {
        step: "exec sees the copy".into(),
        out,
    });
    let dst = src.join("out.txt");
    let from = format!("{ctr}:/cache/before.txt");
    let mut out = s.h.docker(&["cp", &from, &dst.to_string_lossy()])?;
    out.stdout = format!("copied out: {:?}\n", fs::read_to_string(&dst).ok());
    obs.push(Observed {
        step: "docker cp out".into(),
        out,
    });
    s.stop(&ctr)?;
    obs.push(r.sh(
        step(2, "/cache").reuse(),
        "lst /cache; cat /cache/copied.txt /cache/cpdir/top.txt",
    )?);
    Ok(obs)
}

/// (f) modes, owners, times, symlinks, special files; then rename and delete in the next
/// container; all seen identically by the one after (same volume name reused each time).
fn case_metadata(s: &Scope, side: &Side) -> Result<Vec<Observed>> {
    let r = Runner { s, side, id: "pf" };
    Ok(vec![
        r.sh(
            step(1, "/cache").reuse(),
            "cd /cache && mkdir -p d1/d2 d1/sub && echo hello > d1/f1 && echo data > f2 && \
             chmod 640 f2 && chown 1000:1000 f2 && chmod 751 d1 && echo x > d1/sub/x && \
             ln -s d1/f1 sym && ln -s /nowhere dangling && chown -h 1000:1000 sym && \
             mkfifo fifo && chmod 600 fifo && \
             dd if=/dev/zero of=big bs=1024 count=1536 2>/dev/null && \
             echo exe > exe && chmod 4755 exe && chmod 2770 d1/sub && \
             touch -d '2000-01-02 03:04:05' d1/f1 f2 exe && \
             touch -d '1999-12-31 23:59:59' d1/d2; echo rc=$?; lst /cache",
        )?,
        r.sh(
            step(2, "/cache").reuse(),
            "lst /cache; cd /cache && mv d1/f1 d1/f1.renamed && mv d1/d2 d3 && rm big && \
             echo more >> f2 && rm -r d1/sub && mkdir d1/sub && echo y > d1/sub/y && \
             echo new > tmp && mv tmp exe && chmod 600 d1/f1.renamed && chown 1000:0 d3 && \
             rm dangling fifo; echo rc=$?; lst /cache",
        )?,
        r.sh(
            step(3, "/cache").reuse(),
            "lst /cache; cat /cache/f2 /cache/d1/f1.renamed /cache/exe; cat /cache/sym",
        )?,
    ])
}

/// (f, hard links) hard links made in one session are one inode in the next: same file, same
/// content, the right link count. Writing through one name of a hard link that is already in the
/// cache splits it on both backends (overlayfs copy-up with `index=off`, which DESIGN requires so
/// uppers stay valid layers): a documented difference from `local` (README, "Differences from a
/// local volume"), checked against the kernel by the conformance suite, not here.
fn case_hard_links(s: &Scope, side: &Side) -> Result<Vec<Observed>> {
    let r = Runner { s, side, id: "pg" };
    Ok(vec![
        r.sh(
            step(1, "/cache"),
            "cd /cache && echo a > h1 && ln h1 h2 && ln h1 h3; echo rc=$?; lst /cache",
        )?,
        r.sh(
            step(2, "/cache"),
            "lst /cache; cat /cache/h1 /cache/h2; [ /cache/h1 -ef /cache/h2 ] && echo same-inode; \
             [ /cache/h2 -ef /cache/h3 ] && echo same-inode-3",
        )?,
    ])
}

fn cases() -> Vec<Case> {
    vec![
        Case {
            group: Group::Main,
            id: "pa",
            what: "(a) image content copied into an empty volume",
            run: case_image_copy,
            sanity: &[
                (0, "./hello.txt"),
                (0, "hello from the image"),
                (0, "hard-linked"),
            ],
        },
        Case {
            group: Group::Main,
            id: "pb",
            what: "(b) --user 1000 home cache in successive containers",
            run: case_user_home_cache,
            sanity: &[(1, "one\ntwo\n"), (0, "rc=0")],
        },
        Case {
            group: Group::Main,
            id: "pc",
            what: "(c) --read-only container writes its volume",
            run: case_read_only_container,
            sanity: &[(0, "Read-only file system"), (1, "./f ")],
        },
        Case {
            group: Group::Main,
            id: "pd",
            what: "(d) :ro mount refuses writes",
            run: case_ro_mount,
            sanity: &[(1, "Read-only file system"), (2, "seed")],
        },
        Case {
            group: Group::Main,
            id: "pe",
            what: "(e) docker cp into a running container",
            run: case_docker_cp,
            sanity: &[
                (3, "copied in"),
                (4, "before"),
                (5, "copied in"),
                (5, "./cpdir/inner/deep.txt"),
            ],
        },
        Case {
            group: Group::Main,
            id: "pf",
            what: "(f) modes/owners/times/links, then rename and delete",
            run: case_metadata,
            sanity: &[(0, "rc=0"), (1, "rc=0"), (2, "./d1/f1.renamed")],
        },
        Case {
            group: Group::HardLinks,
            id: "pg",
            what: "(f) hard links across sessions",
            run: case_hard_links,
            sanity: &[(0, "links=3"), (1, "same-inode"), (1, "same-inode-3")],
        },
    ]
}

/// Compares two sides' observations; returns a readable report of every difference.
fn compare(
    oracle: &[Observed],
    oracle_name: &str,
    other: &[Observed],
    other_name: &str,
) -> Option<String> {
    let mut report = String::new();
    if oracle.len() != other.len() {
        report.push_str(&format!(
            "different number of steps: {} vs {}\n",
            oracle.len(),
            other.len()
        ));
    }
    for (a, b) in oracle.iter().zip(other) {
        if a.key() != b.key() {
            report.push_str(&format!(
                "step differs: {}\n{}--- {oracle_name} stderr:\n{}--- {other_name} stderr:\n{}\n",
                b.step,
                util::line_diff(oracle_name, &a.key(), other_name, &b.key()),
                a.out.stderr,
                b.out.stderr
            ));
        }
    }
    (!report.is_empty()).then_some(report)
}

/// Runs every case on `local` and on the plugin (`Some(backend)`), or on `local` twice (`None`:
/// the oracle self-test). Fails listing every case that differed.
pub fn parity(h: &Harness, backend: Option<Backend>, group: Group) -> Result<()> {
    let (mut s, other_name) = match backend {
        Some(b) => {
            let s = Scope::with_plugin(h, &format!("parity-{}-{group:?}", b.as_str()), b, None)?;
            let n = format!("cachedriver({})", b.as_str());
            (s, n)
        }
        None => (
            Scope::new(h, "parity-oracle"),
            "local(second volume)".to_string(),
        ),
    };
    let oracle = Side {
        driver: "local".into(),
        tag: "x",
    };
    let other = Side {
        driver: s.plugin.as_ref().map_or("local".into(), |p| p.name.clone()),
        tag: "y",
    };
    let mut failures = Vec::new();
    let selected: Vec<Case> = cases().into_iter().filter(|c| c.group == group).collect();
    let total = selected.len();
    for case in selected {
        util::check_interrupted();
        let t = std::time::Instant::now();
        let res = (|| -> Result<()> {
            let a = (case.run)(&s, &oracle)?;
            for (i, needle) in case.sanity {
                let got = a.get(*i).map(|o| o.key()).unwrap_or_default();
                expect_contains(
                    &format!("oracle (local) step {i} of {}", case.what),
                    &got,
                    needle,
                )?;
            }
            let b = (case.run)(&s, &other)?;
            if let Some(r) = compare(&a, "local", &b, &other_name) {
                bail!("{r}");
            }
            Ok(())
        })();
        match res {
            Ok(()) => println!(
                "    parity ok     {} ({:.1}s)",
                case.what,
                t.elapsed().as_secs_f64()
            ),
            Err(e) => {
                println!(
                    "    parity FAILED {} ({:.1}s)",
                    case.what,
                    t.elapsed().as_secs_f64()
                );
                failures.push(format!("{} [{}]: {e:#}", case.what, case.id));
            }
        }
    }
    s.ensure_plugin_alive()?;
    if failures.is_empty() {
        Ok(())
    } else {
        bail!(
            "{} of {} parity cases differ from the local driver:\n\n{}",
            failures.len(),
            total,
            failures.join("\n\n")
        )
    }
}
