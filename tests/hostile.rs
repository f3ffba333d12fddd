//! Hostile trees (issue 12 item 5) through the Driver, on both backends: a session writes a
//! 4,000-deep chain, a 100k-entry dir, symlinks to /etc and up `..` chains, device nodes, a
//! fifo, hard links and names with newlines and invalid UTF-8 through its merged view; then
//! commit (replace, merge), compact the chain and collect its old layers, discard with
//! RLIMIT_NOFILE at 64, remove the volumes and remove the compacted layer as GC would. Canaries
//! outside the root stay unchanged and the cache still mounts and shows the tree.

#[path = "support/driver_fixture.rs"]
mod driver_fixture;
#[path = "support/hostile.rs"]
mod hostile;

use std::time::Instant;

use cachedriver::names::CommitMode;
use driver_fixture::{backends, Fixture};
use hostile::{
    build_hostile_tree, build_hostile_tree_with, check_hostile_tree, extend_chain, HostileSpec,
};

/// Sets the soft RLIMIT_NOFILE for the guard's life (this binary has one test: the limit is
/// process-wide).
struct NofileLimit(u64);

impl NofileLimit {
    fn set(soft: u64) -> Self {
        // SAFETY: plain old data and valid pointers.
        unsafe {
            let mut rl: libc::rlimit = std::mem::zeroed();
            assert_eq!(libc::getrlimit(libc::RLIMIT_NOFILE, &mut rl), 0);
            let old = rl.rlim_cur;
            rl.rlim_cur = soft;
            assert_eq!(libc::setrlimit(libc::RLIMIT_NOFILE, &rl), 0);
            NofileLimit(old)
        }
    }
}

impl Drop for NofileLimit {
    fn drop(&mut self) {
        // SAFETY: plain old data and valid pointers.
        unsafe {
            let mut rl: libc::rlimit = std::mem::zeroed();
            libc::getrlimit(libc::RLIMIT_NOFILE, &mut rl);
            rl.rlim_cur = self.0;
            libc::setrlimit(libc::RLIMIT_NOFILE, &rl);
        }
    }
}

#[test]
fn hostile_trees_commit_discard_and_remove_safely() {
    for kind in backends("hostile") {
        eprintln!("-- backend {}", kind.as_str());
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("store");
        let fx = Fixture::at(&root, kind, CommitMode::Replace);
        let full = HostileSpec::default();

        // Replace: the whole tree becomes a layer by one rename.
        fx.create("h-rep", &[]);
        let v = fx.mount("h-rep", "1");
        let t = Instant::now();
        let canaries = build_hostile_tree(&v);
        eprintln!(
            "   built the tree through the view in {:?} (chain {} deep)",
            t.elapsed(),
            canaries.deep_reached
        );
        // Both views take any depth (the FUSE one resolves directories name by name, not as
        // paths from the layer root, which would stop at PATH_MAX).
        assert_eq!(
            canaries.deep_reached,
            full.depth,
            "the {} view takes any depth",
            kind.as_str()
        );
        let t = Instant::now();
        fx.unmount("h-rep", "1");
        eprintln!("   replace commit in {:?}", t.elapsed());
        canaries.check();
        assert_eq!(fx.latest("h"), "rep");
        check_hostile_tree(&root.join("lower/h/rep"), &full, &canaries);

        // The cache still mounts and shows the tree.
        fx.create("h-view", &[]);
        let v = fx.mount("h-view", "1");
        let t = Instant::now();
        check_hostile_tree(&v, &full, &canaries);
        eprintln!(
            "   checked the tree through a new view in {:?}",
            t.elapsed()
        );

        // Merge: another session adds a second hostile tree (without the 100k entries) below.
        fx.create("h-mrg", &[("commit", "merge")]);
        let m = fx.mount("h-mrg", "1");
        let sub = m.join("again");
        std::fs::create_dir(&sub).unwrap();
        let small = HostileSpec {
            wide: 100,
            ..HostileSpec::default()
        };
        let canaries2 = build_hostile_tree_with(&sub, &small);
        fx.unmount("h-mrg", "1");
        fx.unmount("h-view", "1"); // changed nothing
        canaries.check();
        canaries2.check();
        assert_eq!(fx.latest("h"), "mrg");
        fx.create("h-both", &[]);
        let b = fx.mount("h-both", "1");
        check_hostile_tree(&b, &full, &canaries);
        check_hostile_tree(&b.join("again"), &small, &canaries2);
        fx.unmount("h-both", "1");

        // Compaction flattens the chain below the top layer by hard links, then GC deletes the
        // old layers (the 4,000-deep tree and the 100k-entry dir included): nothing outside the
        // root is touched and a new view shows the same trees.
        let store = fx.driver.store();
        let t = Instant::now();
        let rep = cachedriver::compact::compact_cache(store, "h", 1, true)
            .unwrap()
            .expect("a two-layer chain is compacted when forced");
        eprintln!(
            "   compacted {:?} ({} entries) in {:?}",
            rep.flattened,
            rep.entries,
            t.elapsed()
        );
        let t = Instant::now();
        let g = cachedriver::gc::gc_cache(store, "h", false).unwrap();
        eprintln!("   gc deleted {:?} in {:?}", g.deleted, t.elapsed());
        assert!(g.deleted.iter().any(|l| l == "rep"), "{g:?}");
        canaries.check();
        canaries2.check();
        fx.create("h-after", &[]);
        let a = fx.mount("h-after", "1");
        check_hostile_tree(&a, &full, &canaries);
        check_hostile_tree(&a.join("again"), &small, &canaries2);
        fx.unmount("h-after", "1");

        // Discard: the upper is removed, with 64 descriptors for the whole process.
        fx.create("h-dis", &[("commit", "discard")]);
        let d = fx.mount("h-dis", "1").join("discarded");
        std::fs::create_dir(&d).unwrap();
        let canaries3 = build_hostile_tree(&d);
        if canaries3.deep_reached < full.depth {
            // What the view refused, written straight into the upper: the removal below must
            // still face the full 4,000 levels.
            let upper = root.join("upper/h/dis/discarded");
            extend_chain(&upper, canaries3.deep_reached, full.depth);
        }
        {
            let _limit = NofileLimit::set(64);
            let t = Instant::now();
            fx.unmount("h-dis", "1");
            eprintln!(
                "   discard (removing 104k entries, 4,000 deep) with RLIMIT_NOFILE 64 in {:?}",
                t.elapsed()
            );
        }
        canaries3.check();
        assert!(!root.join("upper/h/dis").exists(), "the upper is gone");
        assert!(!root.join("work/h/dis").exists(), "the work dir is gone");
        assert_eq!(fx.latest("h"), "mrg", "discard changed nothing");

        // Remove every volume; then remove the compacted layer as GC would.
        for name in ["h-rep", "h-view", "h-mrg", "h-both", "h-after", "h-dis"] {
            fx.driver.remove(name).unwrap();
        }
        let layer = root.join("lower/h").join(&rep.new_layer);
        let t = Instant::now();
        {
            let _limit = NofileLimit::set(64);
            cachedriver::fsutil::remove_tree(&layer).unwrap();
        }
        eprintln!("   removed the committed layer in {:?}", t.elapsed());
        assert!(!layer.exists());
        canaries.check();
        canaries2.check();
        canaries3.check();
        let (_, entries) = cachedriver::fsutil::tree_usage(&root);
        assert!(
            entries as usize > canaries2.deep_reached,
            "the merge layer is still there: {entries}"
        );
    }
}
