//! Progress on the console for the slow steps of starting a coordinator (loading the model,
//! assigning the shards): a spinner when stderr is a terminal, plain lines otherwise, so logs
//! and CI output stay readable.

use std::future::Future;
use std::io::IsTerminal;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressStyle};

/// Runs `work`, showing `what` while it runs and how long it took when it is done.
pub async fn step<T, E>(what: &str, work: impl Future<Output = Result<T, E>>) -> Result<T, E> {
    show(what, work, true).await
}

/// As [`step`], but silent when stderr is not a terminal: for commands whose output is read by
/// programs (`run`).
pub async fn step_on_terminal<T, E>(
    what: &str,
    work: impl Future<Output = Result<T, E>>,
) -> Result<T, E> {
    show(what, work, false).await
}

async fn show<T, E>(
    what: &str,
    work: impl Future<Output = Result<T, E>>,
    plain_lines: bool,
) -> Result<T, E> {
    let started = Instant::now();
    let bar = std::io::stderr().is_terminal().then(|| {
        let bar = ProgressBar::new_spinner().with_message(what.to_string());
        if let Ok(style) = ProgressStyle::with_template("{spinner} {msg} ({elapsed})") {
            bar.set_style(style);
        }
        bar.enable_steady_tick(Duration::from_millis(100));
        bar
    });
    let plain = bar.is_none() && plain_lines;
    if plain {
        eprintln!("{what}...");
    }
    let result = work.await;
    let outcome = match &result {
        Ok(_) => format!("{what}: done in {:.1} s", started.elapsed().as_secs_f64()),
        Err(_) => format!("{what}: failed"),
    };
    if let Some(bar) = &bar {
        bar.finish_and_clear();
    }
    if bar.is_some() || plain {
        eprintln!("{outcome}");
    }
    result
}
