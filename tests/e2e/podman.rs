//! Podman against the same plugin socket (DESIGN §8, §9): the plugin named in a private
//! `containers.conf` `[engine.volume_plugins]`, Podman's own storage below the run directory,
//! the test image imported from the same tar.
//!
//! Podman differs from Docker in what it sends (DESIGN §4): it mounts a volume once per name with
//! one fixed ID however many containers use it, and gives every call 5 s. The scenario checks
//! the walkthrough's essentials under those rules: commit at the end of the session, isolation
//! from a running session, one shared session for two containers on one volume (committed once,
//! after the last stops), and refusal of invalid names with our message.

use super::harness::{expect_contains, expect_lacks, Harness, Scope, Skip, SLEEPER};
use super::plugin::{Backend, Plugin};
use super::util::{self, CmdOut};
use anyhow::{ensure, Context, Result};
use std::fs;
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

/// A private Podman configuration and storage; `Drop` removes its containers and unmounts.
struct Podman {
    dir: PathBuf,
    image: String,
}

impl Podman {
    /// Configures Podman below `h.run_dir/podman-<plugin>` with `p` as a volume plugin and
    /// imports the test image.
    fn new(h: &Harness, p: &Plugin) -> Result<Podman> {
        let dir = h.run_dir.join(format!("podman-{}", p.name));
        for d in ["root", "runroot", "tmp", "static"] {
            fs::create_dir_all(dir.join(d))?;
        }
        let driver = if h.dockerd.storage_driver == "vfs" {
            "vfs"
        } else {
            "overlay"
        };
        fs::write(
            dir.join("storage.conf"),
            format!(
                "[storage]\ndriver = \"{driver}\"\ngraphroot = \"{}\"\nrunroot = \"{}\"\n",
                dir.join("root").display(),
                dir.join("runroot").display()
            ),
        )?;
        // no systemd here (cgroupfs, no journald); the default 1M nofile/nproc limits exceed
        // what an unprivileged-looking CI sandbox allows
        fs::write(
            dir.join("containers.conf"),
            format!(
                "[containers]\ndefault_ulimits = [\"nofile=1024:1024\", \"nproc=1024:1024\"]\n\
                 [engine]\ncgroup_manager = \"cgroupfs\"\nevents_logger = \"none\"\n\
                 tmp_dir = \"{}\"\nstatic_dir = \"{}\"\n\
                 [engine.volume_plugins]\n{} = \"{}\"\n",
                dir.join("tmp").display(),
                dir.join("static").display(),
                p.name,
                p.sock.display()
            ),
        )?;
        let pm = Podman {
            dir,
            image: format!("localhost/{}", h.image.replace(':', "-podman:")),
        };
        let tar = h.image_tar.to_string_lossy().into_owned();
        pm.cli(&["import", &tar, &pm.image])?
            .check()
            .context("podman import of the test image")?;
        Ok(pm)
    }

    fn command(&self) -> Command {
        let mut c = Command::new("podman");
        c.arg("--root")
            .arg(self.dir.join("root"))
            .arg("--runroot")
            .arg(self.dir.join("runroot"))
            .arg("--tmpdir")
            .arg(self.dir.join("tmp"))
            .env("CONTAINERS_CONF", self.dir.join("containers.conf"))
            .env("CONTAINERS_STORAGE_CONF", self.dir.join("storage.conf"))
            .env_remove("CONTAINER_HOST")
            .env_remove("CONTAINER_CONNECTION");
        c
    }

    fn cli(&self, args: &[&str]) -> Result<CmdOut> {
        util::run(self.command().args(args), Duration::from_secs(120))
    }

    fn cli_ok(&self, args: &[&str]) -> Result<String> {
        Ok(self.cli(args)?.check()?.stdout)
    }

    /// `podman run --rm --network none -v VOL:/cache IMAGE sh -c SCRIPT`, which must succeed.
    fn sh(&self, vol: &str, script: &str) -> Result<String> {
        let v = format!("{vol}:/cache");
        self.cli_ok(&[
            "run",
            "--rm",
            "--network",
            "none",
            "-v",
            &v,
            &self.image,
            "sh",
            "-c",
            script,
        ])
    }

    /// A detached container `name` with `vol` at /cache.
    fn start(&self, name: &str, vol: &str) -> Result<()> {
        let v = format!("{vol}:/cache");
        self.cli_ok(&[
            "run",
            "-d",
            "--name",
            name,
            "--network",
            "none",
            "-v",
            &v,
            &self.image,
            "sh",
            "-c",
            SLEEPER,
        ])?;
        Ok(())
    }

    fn exec(&self, name: &str, script: &str) -> Result<String> {
        self.cli_ok(&["exec", name, "sh", "-c", script])
    }

    /// Stops and removes container `name`.
    fn stop(&self, name: &str) -> Result<()> {
        self.cli_ok(&["stop", "-t", "10", name])?;
        self.cli_ok(&["rm", name])?;
        Ok(())
    }
}

impl Drop for Podman {
    fn drop(&mut self) {
        // containers first (their volumes get unmounted through the still-running plugin)
        if let Ok(o) = self.cli(&["rm", "-a", "-f", "-t", "0"]) {
            if !o.success() {
                eprintln!("e2e: podman cleanup: {}", o.describe());
            }
        }
        let _ = self.cli(&["volume", "rm", "-a", "-f"]);
        let left = util::unmount_below(&self.dir);
        if !left.is_empty() {
            eprintln!("e2e: podman cleanup: still mounted: {left:?}");
        }
    }
}

/// Runs the Podman scenario on a fresh plugin with `backend`.
pub fn podman(h: &Harness, backend: Backend) -> Result<()> {
    if util::run(
        Command::new("podman").arg("--version"),
        Duration::from_secs(30),
    )
    .map(|o| !o.success())
    .unwrap_or(true)
    {
        return Err(
            Skip("podman is not installed (scripts/install-deps.sh installs it)".into()).into(),
        );
    }
    let mut s = Scope::with_plugin(h, &format!("podman-{}", backend.as_str()), backend, None)?;
    {
        let p = s.plugin();
        let pm = Podman::new(h, p)?;
        scenario(&pm, p)?;
    }
    s.ensure_plugin_alive()
}

fn scenario(pm: &Podman, p: &Plugin) -> Result<()> {
    let create = |v: &str| pm.cli_ok(&["volume", "create", "--driver", &p.name, v]);

    create("pod-one")?;
    pm.sh("pod-one", "echo one > /cache/one.txt")?;
    p.wait_session_ended("pod", "one")?;
    let latest = p.wait_latest("pod", |l| l == "one")?;
    ensure!(
        latest == "one",
        "podman session pod-one did not commit: latest={latest:?}"
    );

    // a running session is isolated from a new one
    create("pod-two")?;
    pm.start("pa", "pod-two")?;
    pm.exec("pa", "echo two > /cache/two.txt")?;
    create("pod-three")?;
    let l = pm.sh("pod-three", "ls -a /cache")?;
    expect_contains("podman pod-three's view", &l, "one.txt")?;
    expect_lacks("podman pod-three's view while pod-two runs", &l, "two.txt")?;

    // a second container on the same volume shares its one session
    pm.start("pb", "pod-two")?;
    let seen = pm.exec("pb", "cat /cache/two.txt")?;
    ensure!(
        seen == "two\n",
        "a second podman container on pod-two should share its session; it read {seen:?}"
    );
    pm.stop("pa")?;
    ensure!(
        util::is_mountpoint(&p.merged("pod", "two")),
        "pod-two's session ended while a second podman container still used it"
    );
    ensure!(
        p.latest("pod")? == "one",
        "pod-two committed while a second podman container still used it"
    );
    pm.exec("pb", "echo more > /cache/more.txt")?;
    pm.stop("pb")?;
    p.wait_session_ended("pod", "two")?;
    let latest = p.wait_latest("pod", |l| l == "two")?;
    ensure!(
        latest == "two",
        "pod-two did not commit after its last container: latest={latest:?}"
    );

    create("pod-four")?;
    let out = pm.sh(
        "pod-four",
        "cat /cache/one.txt /cache/two.txt /cache/more.txt",
    )?;
    ensure!(out == "one\ntwo\nmore\n", "podman pod-four read {out:?}");

    let drv = pm.cli_ok(&["volume", "inspect", "--format", "{{.Driver}}", "pod-one"])?;
    ensure!(
        drv.trim() == p.name,
        "podman volume inspect pod-one: driver {drv:?}, expected {}",
        p.name
    );

    let r = pm.cli(&["volume", "create", "--driver", &p.name, "foo..x-1"])?;
    ensure!(
        !r.success(),
        "podman volume create foo..x-1 succeeded: {}",
        r.describe()
    );
    expect_contains(
        "podman volume create foo..x-1 error",
        &r.stderr,
        "A-Za-z0-9",
    )?;

    pm.cli_ok(&["volume", "rm", "pod-one"])?;
    Ok(())
}
