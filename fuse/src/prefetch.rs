//! Directory read-ahead for cold walks. Listing a directory queues its subdirectories; a
//! background thread lists them and stats their entries (never following a symlink, opening only
//! directories), a few levels deep, so the layers' own dentry and inode caches are warm by the
//! time the kernel asks us for those directories. Nothing it finds is used as an answer: it only
//! overlaps the disk reads with the round trips of the walk. The queue is a bounded stack, so
//! the most recently listed directory is read ahead first (the order of a depth-first walk).

use std::collections::{HashMap, VecDeque};
use std::ffi::CString;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::{Arc, Condvar, Mutex};

use crate::inode::lock;
use crate::sys;

/// How many directory levels below a listed directory are read ahead.
const DEPTH: u32 = 3;
/// Memory the read-ahead may hold: the queue and the set of directories already read ahead
/// each get half (bounded by bytes, not by a count picked for one tree shape).
const BUDGET: usize = 4 << 20;
/// Most directories waiting (each holds its parent's fd and its name, ~64 bytes with the
/// allocations); the oldest are dropped beyond. At most 1024: deeper queues only read ahead
/// what the walk reaches first anyway.
const MAX_QUEUE: usize = if BUDGET / 2 / 64 < 1024 {
    BUDGET / 2 / 64
} else {
    1024
};
/// Directories remembered as read ahead before the set is reset: the largest hash table (a
/// power of two of slots, each the key, the depth and a control byte, kept an eighth free) that
/// fits its half of the budget.
const MAX_SEEN: usize = {
    let slots = BUDGET / 2 / (std::mem::size_of::<((u64, u64), u32)>() + 1);
    (slots + 1).next_power_of_two() / 2 * 7 / 8
};
/// Background threads.
const THREADS: usize = 2;

struct Job {
    parent: Arc<OwnedFd>,
    name: CString,
    depth: u32,
}

#[derive(Default)]
struct State {
    jobs: VecDeque<Job>,
    /// (dev, ino) of directories read ahead, with the depth they were read ahead to.
    seen: HashMap<(u64, u64), u32>,
    started: bool,
}

#[derive(Default)]
struct Inner {
    state: Mutex<State>,
    cv: Condvar,
}

/// The read-ahead queue and its threads (started at the first use).
#[derive(Default)]
pub struct Prefetch {
    inner: Arc<Inner>,
}

impl Prefetch {
    /// Queues subdirectories `names` of the directory `parent` (an fd usable with openat).
    pub fn push(&self, parent: &Arc<OwnedFd>, names: Vec<CString>) {
        if names.is_empty() {
            return;
        }
        let mut st = lock(&self.inner.state);
        if !st.started {
            st.started = true;
            for _ in 0..THREADS {
                let inner = self.inner.clone();
                let _ = std::thread::Builder::new()
                    .name("readahead".into())
                    .spawn(move || run(&inner));
            }
        }
        // Reversed, so that the first name is the first popped.
        for name in names.into_iter().rev() {
            st.jobs.push_back(Job {
                parent: parent.clone(),
                name,
                depth: DEPTH,
            });
        }
        while st.jobs.len() > MAX_QUEUE {
            st.jobs.pop_front();
        }
        drop(st);
        self.inner.cv.notify_all();
    }
}

fn run(inner: &Inner) {
    loop {
        let job = {
            let mut st = lock(&inner.state);
            loop {
                if let Some(j) = st.jobs.pop_back() {
                    break j;
                }
                st = match inner.cv.wait(st) {
                    Ok(g) => g,
                    Err(p) => p.into_inner(),
                };
            }
        };
        read_ahead(inner, job);
    }
}

fn read_ahead(inner: &Inner, job: Job) {
    let flags = libc::O_RDONLY | libc::O_DIRECTORY | libc::O_NONBLOCK;
    let pfd = job.parent.as_raw_fd();
    // Reading ahead must not touch atimes (O_NOATIME needs ownership or CAP_FOWNER).
    let fd = match sys::openat(pfd, &job.name, flags | libc::O_NOATIME, 0) {
        Err(e) if e.raw_os_error() == Some(libc::EPERM) => sys::openat(pfd, &job.name, flags, 0),
        r => r,
    };
    let Ok(fd) = fd else {
        return;
    };
    let Ok(st) = sys::fstat(fd.as_raw_fd()) else {
        return;
    };
    {
        let mut s = lock(&inner.state);
        if s.seen.len() >= MAX_SEEN {
            s.seen.clear();
        }
        match s.seen.get(&(st.st_dev, st.st_ino)) {
            Some(&d) if d >= job.depth => return,
            _ => {
                s.seen.insert((st.st_dev, st.st_ino), job.depth);
            }
        }
    }
    let Ok(dup) = fd.try_clone() else {
        return;
    };
    let Ok(entries) = sys::list_dir(dup) else {
        return;
    };
    let mut subdirs = Vec::new();
    for (name, dtype) in entries {
        let Ok(c) = CString::new(name) else {
            continue;
        };
        let _ = sys::fstatat(fd.as_raw_fd(), &c);
        if dtype == libc::DT_DIR && job.depth > 1 {
            subdirs.push(c);
        }
    }
    if subdirs.is_empty() {
        return;
    }
    let parent = Arc::new(fd);
    let mut s = lock(&inner.state);
    for name in subdirs.into_iter().rev() {
        s.jobs.push_back(Job {
            parent: parent.clone(),
            name,
            depth: job.depth - 1,
        });
    }
    while s.jobs.len() > MAX_QUEUE {
        s.jobs.pop_front();
    }
    drop(s);
    inner.cv.notify_all();
}
