//! Counts of long work (samples, bytes), drawn as bars on a terminal and as
//! nothing elsewhere. Stages and commands call [`Progress::start`] and
//! [`Bar::inc`]; a disabled [`Progress`] hands out bars that do nothing, so the
//! calls cost a branch when no one is watching.

use std::borrow::Cow;
use std::sync::{Mutex, OnceLock};

use indicatif::{
    MultiProgress, ProgressBar, ProgressDrawTarget, ProgressFinish, ProgressState, ProgressStyle,
};
use signal_hook::consts::{SIGINT, SIGTERM};
use signal_hook::iterator::Signals;

/// What a bar counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unit {
    Samples,
    Bytes,
}

/// Writes smaller than this show no bar: they take well under a second.
pub const WRITE_BAR_MIN: u64 = 64 << 20;

/// Where one stage's (or command's) bars go.
#[derive(Debug, Clone, Default)]
pub struct Progress {
    target: Option<(MultiProgress, String)>,
}

impl Progress {
    /// Draws nothing.
    pub fn disabled() -> Self {
        Progress { target: None }
    }

    /// Bars in `multi`, each line starting with `prefix` (a stage id).
    pub fn new(multi: &MultiProgress, prefix: &str) -> Self {
        Progress {
            target: Some((multi.clone(), prefix.to_string())),
        }
    }

    /// Bars on stderr for a command that is not a pipeline run (`qpipe eval`).
    pub fn stderr(prefix: &str) -> Self {
        Progress::new(&stderr_bars(), prefix)
    }

    pub fn is_enabled(&self) -> bool {
        self.target.is_some()
    }

    /// A bytes bar for writing `total` bytes, shown only from [`WRITE_BAR_MIN`] on.
    pub fn start_write(&self, label: &str, total: u64) -> Bar {
        if total < WRITE_BAR_MIN {
            return Bar::none();
        }
        self.start(label, total, Unit::Bytes)
    }

    /// A bar for `total` units of work described by `label` (without the stage
    /// name, which the line shows already). It is removed from the screen when
    /// finished or dropped, also on an error path.
    pub fn start(&self, label: &str, total: u64, unit: Unit) -> Bar {
        let Some((multi, prefix)) = &self.target else {
            return Bar(None);
        };
        let counts = match unit {
            Unit::Samples => "{human_pos}/{human_len} samples, {rate}/s, {eta} left",
            Unit::Bytes => "{bytes}/{total_bytes}, {bytes_per_sec}, {eta} left",
        };
        let template = format!("{{prefix}}: {{msg}} [{{bar:24}}] {counts}");
        let style = ProgressStyle::with_template(&template)
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> ")
            .with_key("rate", |s: &ProgressState, w: &mut dyn std::fmt::Write| {
                let _ = write!(w, "{:.0}", s.per_sec());
            });
        let bar = ProgressBar::new(total)
            .with_style(style)
            .with_prefix(Cow::Owned(prefix.clone()))
            .with_message(Cow::Owned(label.to_string()))
            .with_finish(ProgressFinish::AndClear);
        Bar(Some(multi.add(bar)))
    }
}

/// A [`MultiProgress`] drawing on stderr, which a Ctrl-C (SIGINT) or SIGTERM
/// clears before the process exits with 128 + the signal's number (130, 143),
/// so no stale frame is left on the terminal.
pub fn stderr_bars() -> MultiProgress {
    let multi = MultiProgress::with_draw_target(ProgressDrawTarget::stderr());
    clear_on_signal(&multi);
    multi
}

/// The bars a signal clears: the latest from [`stderr_bars`].
static ON_SIGNAL: Mutex<Option<MultiProgress>> = Mutex::new(None);

fn clear_on_signal(multi: &MultiProgress) {
    static INSTALLED: OnceLock<()> = OnceLock::new();
    *ON_SIGNAL.lock().unwrap_or_else(|e| e.into_inner()) = Some(multi.clone());
    INSTALLED.get_or_init(|| {
        let Ok(mut signals) = Signals::new([SIGINT, SIGTERM]) else {
            // Without the handler a signal kills us as before; the bars still work.
            return;
        };
        std::thread::spawn(move || {
            if let Some(signal) = signals.forever().next() {
                let multi = ON_SIGNAL.lock().unwrap_or_else(|e| e.into_inner()).clone();
                let exit = move || {
                    let _ = console::Term::stderr().show_cursor();
                    // Abrupt on purpose: cache writes are atomic (temp file +
                    // rename), so nothing needs cleaning up.
                    std::process::exit(128 + signal)
                };
                match multi {
                    // Clears the bars and holds their lock, so no other thread
                    // draws a frame again before the exit.
                    Some(m) => m.suspend(exit),
                    None => exit(),
                }
            }
        });
    });
}

/// One count on the screen; cloning shares it (e.g. across rayon threads).
#[derive(Debug, Clone, Default)]
pub struct Bar(Option<ProgressBar>);

impl Bar {
    /// A bar that draws nothing.
    pub fn none() -> Self {
        Bar(None)
    }

    /// Whether the bar is drawn (it counts nothing otherwise).
    pub fn is_shown(&self) -> bool {
        self.0.is_some()
    }

    /// The count so far (0 for a bar that is not shown).
    pub fn position(&self) -> u64 {
        self.0.as_ref().map_or(0, |b| b.position())
    }

    pub fn inc(&self, n: u64) {
        if let Some(b) = &self.0 {
            b.inc(n);
        }
    }

    /// Removes the bar from the screen.
    pub fn finish(&self) {
        if let Some(b) = &self.0 {
            b.finish_and_clear();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn write_bars_start_at_the_threshold_and_only_when_enabled() {
        let multi = MultiProgress::with_draw_target(ProgressDrawTarget::hidden());
        let p = Progress::new(&multi, "s");
        assert!(!p.start_write("w", WRITE_BAR_MIN - 1).is_shown());
        assert!(!p.start_write("w", 0).is_shown());
        assert!(p.start_write("w", WRITE_BAR_MIN).is_shown());
        assert!(p.start_write("w", 1 << 33).is_shown());
        assert!(!Progress::disabled().start_write("w", 1 << 33).is_shown());
    }
}
