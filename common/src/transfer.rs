//! Progress of a long transfer (a shard delivery, on both ends): a bar with the bytes, rate and
//! time left when stderr is a terminal, else a log line every few seconds, so logs and CI output
//! stay readable.

use std::io::IsTerminal;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use indicatif::{MultiProgress, ProgressBar, ProgressStyle};
use tracing::info;

/// How often a plain progress line is logged.
const LINE_PERIOD: Duration = Duration::from_secs(5);

/// Every bar of the process draws through one: concurrent transfers (one per worker) each get a
/// line of their own.
fn bars() -> &'static MultiProgress {
    static BARS: OnceLock<MultiProgress> = OnceLock::new();
    BARS.get_or_init(MultiProgress::new)
}

/// Progress of one transfer of a known number of bytes.
#[derive(Debug)]
pub struct TransferProgress {
    what: String,
    total: u64,
    done: u64,
    started: Instant,
    last_line: Instant,
    bar: Option<ProgressBar>,
}

impl TransferProgress {
    /// Starts showing the transfer of `total` bytes, described by `what` ("sending layers 0-11
    /// to ...").
    pub fn new(what: String, total: u64) -> Self {
        let bar = std::io::stderr().is_terminal().then(|| {
            let bar = bars().add(ProgressBar::new(total).with_message(what.clone()));
            if let Ok(style) = ProgressStyle::with_template(
                "{msg} {bar:30} {bytes}/{total_bytes} {binary_bytes_per_sec} ETA {eta}",
            ) {
                bar.set_style(style);
            }
            bar
        });
        let now = Instant::now();
        Self {
            what,
            total,
            done: 0,
            started: now,
            last_line: now,
            bar,
        }
    }

    pub fn advance(&mut self, bytes: u64) {
        self.done += bytes;
        if let Some(bar) = &self.bar {
            bar.set_position(self.done);
            return;
        }
        if self.last_line.elapsed() >= LINE_PERIOD {
            self.last_line = Instant::now();
            let secs = self.started.elapsed().as_secs_f64();
            let rate = self.done as f64 / secs.max(1e-9);
            let left = self.total.saturating_sub(self.done) as f64 / rate.max(1.0);
            info!(
                mib = self.done >> 20,
                of_mib = self.total >> 20,
                mib_per_s = (rate / (1 << 20) as f64).round(),
                eta_s = left.round(),
                "{}",
                self.what
            );
        }
    }

    /// Ends the display; logs the bytes, time and rate. Returns the seconds taken.
    pub fn finish(self) -> f64 {
        let secs = self.started.elapsed().as_secs_f64();
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
        info!(
            mib = self.done >> 20,
            secs = (secs * 100.0).round() / 100.0,
            mib_per_s = (self.done as f64 / secs.max(1e-9) / (1 << 20) as f64).round(),
            "{}: done",
            self.what
        );
        secs
    }

    /// Ends the display of a transfer that failed.
    pub fn abandon(&self) {
        if let Some(bar) = &self.bar {
            bar.abandon();
        }
    }
}
