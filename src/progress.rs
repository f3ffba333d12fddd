//! Progress of long CLI runs (`compact`, `gc`, `rm`): a bar on a terminal (`indicatif`), plain
//! log lines otherwise, so CI logs and pipes stay readable.

use std::io::IsTerminal;

use indicatif::{ProgressBar, ProgressStyle};

/// Progress over a known number of items.
pub struct Progress {
    bar: Option<ProgressBar>,
    what: &'static str,
    len: u64,
    done: u64,
}

impl Progress {
    /// Starts progress over `len` items of `what` (e.g. "gc").
    pub fn new(len: usize, what: &'static str) -> Self {
        let bar = std::io::stderr().is_terminal().then(|| {
            let b = ProgressBar::new(len as u64);
            if let Ok(style) =
                ProgressStyle::with_template("{prefix} [{bar:30}] {pos}/{len} {wide_msg}")
            {
                b.set_style(style.progress_chars("=> "));
            }
            b.set_prefix(what);
            b
        });
        Progress {
            bar,
            what,
            len: len as u64,
            done: 0,
        }
    }

    /// Announces the item being worked on.
    pub fn start(&self, item: &str) {
        match &self.bar {
            Some(b) => b.set_message(item.to_string()),
            None => tracing::info!("{} {}/{}: {item}", self.what, self.done + 1, self.len),
        }
    }

    /// Marks one item done.
    pub fn inc(&mut self) {
        self.done += 1;
        if let Some(b) = &self.bar {
            b.inc(1);
        }
    }

    /// Prints a line without tearing the bar.
    pub fn println(&self, line: &str) {
        match &self.bar {
            Some(b) => b.println(line),
            None => println!("{line}"),
        }
    }

    /// Removes the bar.
    pub fn finish(self) {
        if let Some(b) = self.bar {
            b.finish_and_clear();
        }
    }
}
