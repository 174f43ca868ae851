//! Progress of a long operator command: a bar on a terminal, a log line every
//! few seconds otherwise (under systemd, cron or a pipe).

use std::io::IsTerminal;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressStyle};

/// How often a log line reports progress when stderr is no terminal.
const LOG_EVERY: Duration = Duration::from_secs(5);

/// Counts work done, towards a total when one is known.
pub struct Progress {
    bar: Option<ProgressBar>,
    what: &'static str,
    done: u64,
    total: Option<u64>,
    logged: Instant,
}

impl Progress {
    /// Starts counting `what` (e.g. "documents"), out of `total` if known.
    pub fn new(what: &'static str, total: Option<u64>) -> Progress {
        let bar = std::io::stderr().is_terminal().then(|| {
            let bar = ProgressBar::new(total.unwrap_or(0));
            let template = match total {
                Some(_) => "{msg:>10} [{bar:40}] {pos}/{len} ({per_sec}, {eta} left)",
                None => "{msg:>10} {pos} ({per_sec})",
            };
            bar.set_style(
                ProgressStyle::with_template(template)
                    .unwrap_or_else(|_| ProgressStyle::default_bar())
                    .progress_chars("=> "),
            );
            bar.set_message(what);
            bar
        });
        Progress {
            bar,
            what,
            done: 0,
            total,
            logged: Instant::now(),
        }
    }

    /// Adds `n` done.
    pub fn inc(&mut self, n: u64) {
        self.done += n;
        if let Some(bar) = &self.bar {
            if self.total.is_some_and(|t| self.done > t) {
                bar.set_length(self.done);
            }
            bar.inc(n);
        } else if self.logged.elapsed() >= LOG_EVERY {
            self.logged = Instant::now();
            tracing::info!(
                what = self.what,
                done = self.done,
                total = self.total,
                "progress"
            );
        }
    }

    /// Clears the bar (the command prints its own summary).
    pub fn finish(self) {
        if let Some(bar) = self.bar {
            bar.finish_and_clear();
        }
    }
}
