//! Training progress: an indicatif bar per epoch (loss, img/s, ETA) on a
//! terminal, one plain line per epoch otherwise (logs, CI, pipes).

use std::io::IsTerminal;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

/// Reports the batches of one epoch.
pub struct EpochProgress {
    bar: Option<ProgressBar>,
    epoch: usize,
    epochs: usize,
    start: Instant,
    images: usize,
    loss_sum: f64,
    batches: usize,
    /// Seconds of this epoch that later epochs will not repeat (filling the
    /// feature cache), left out of the ETA.
    once_seconds: f64,
    /// The first epoch of the process also pays one-time costs (memory
    /// first touched, weights packed): its ETA is an upper bound.
    warm_up: bool,
}

impl EpochProgress {
    /// Starts reporting epoch `epoch` (1-based) of `epochs`, which has
    /// `n_batches` batches, with an optional note after the epoch number
    /// (e.g. "filling the feature cache").
    pub fn start(epoch: usize, epochs: usize, n_batches: usize, note: Option<&str>) -> Self {
        let prefix = match note {
            Some(note) => format!("epoch {epoch}/{epochs} ({note})"),
            None => format!("epoch {epoch}/{epochs}"),
        };
        if note.is_some() && !std::io::stdout().is_terminal() {
            println!("{prefix}");
        }
        let bar = std::io::stdout().is_terminal().then(|| {
            let bar =
                ProgressBar::with_draw_target(Some(n_batches as u64), ProgressDrawTarget::stdout());
            let style =
                ProgressStyle::with_template("{prefix} [{bar:20}] {pos}/{len} {msg} ETA {eta}")
                    .unwrap_or_else(|_| ProgressStyle::default_bar())
                    .progress_chars("=> ");
            bar.set_style(style);
            bar.set_prefix(prefix);
            bar.enable_steady_tick(Duration::from_millis(250));
            bar
        });
        Self {
            bar,
            epoch,
            epochs,
            start: Instant::now(),
            images: 0,
            loss_sum: 0.0,
            batches: 0,
            once_seconds: 0.0,
            warm_up: false,
        }
    }

    /// Marks `seconds` of this epoch as work later epochs skip (the backbone
    /// while the feature cache fills), so the ETA leaves them out.
    pub fn add_once_seconds(&mut self, seconds: f64) {
        self.once_seconds += seconds;
    }

    /// Marks this epoch as the process's first, whose ETA is printed as an
    /// upper bound (`ETA <= ...`).
    pub fn first_of_process(mut self) -> Self {
        self.warm_up = true;
        self
    }

    fn img_per_s(&self) -> f64 {
        self.images as f64 / self.start.elapsed().as_secs_f64().max(1e-9)
    }

    /// Records one finished batch of `images` images with loss `loss`.
    pub fn batch(&mut self, images: usize, loss: f64) {
        self.images += images;
        self.loss_sum += loss;
        self.batches += 1;
        if let Some(bar) = &self.bar {
            bar.set_message(format!("loss {loss:.3} | {:.1} img/s", self.img_per_s()));
            bar.inc(1);
        }
    }

    /// Mean loss over the epoch's batches.
    pub fn mean_loss(&self) -> f64 {
        self.loss_sum / self.batches.max(1) as f64
    }

    /// Ends the epoch: clears the bar and prints the epoch's summary line with
    /// an estimate of the run's remaining time (this epoch's duration, less
    /// the work later epochs skip, times the epochs left; evaluations not
    /// counted).
    pub fn finish(self) -> EpochSummary {
        let summary = EpochSummary {
            epoch: self.epoch,
            mean_loss: self.mean_loss(),
            img_per_s: self.img_per_s(),
            seconds: self.start.elapsed().as_secs_f64(),
        };
        let per_epoch = (summary.seconds - self.once_seconds).max(0.0);
        let remaining = per_epoch * (self.epochs - self.epoch.min(self.epochs)) as f64;
        let line = format!(
            "epoch {}/{}  loss {:.4}  {:.1} img/s  {:.1} s  ETA {}{}",
            self.epoch,
            self.epochs,
            summary.mean_loss,
            summary.img_per_s,
            summary.seconds,
            if self.warm_up && remaining > 0.0 {
                "<= "
            } else {
                ""
            },
            format_duration(remaining)
        );
        if let Some(bar) = self.bar {
            bar.finish_and_clear();
        }
        println!("{line}");
        summary
    }
}

/// `1h02m`, `3m05s` or `42s`.
pub fn format_duration(seconds: f64) -> String {
    let s = seconds.max(0.0).round() as u64;
    match (s / 3600, (s % 3600) / 60, s % 60) {
        (0, 0, sec) => format!("{sec}s"),
        (0, min, sec) => format!("{min}m{sec:02}s"),
        (h, min, _) => format!("{h}h{min:02}m"),
    }
}

/// What one epoch did, for logs.
#[derive(Debug, Clone, serde::Serialize)]
pub struct EpochSummary {
    pub epoch: usize,
    pub mean_loss: f64,
    pub img_per_s: f64,
    pub seconds: f64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_read_naturally() {
        assert_eq!(format_duration(42.4), "42s");
        assert_eq!(format_duration(185.0), "3m05s");
        assert_eq!(format_duration(3720.0), "1h02m");
        assert_eq!(format_duration(-1.0), "0s");
    }
}
