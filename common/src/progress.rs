//! Progress lines for long work: done, rate and ETA, at most once a second, on standard error.

use std::time::{Duration, Instant};

/// A progress reporter for one piece of long work.
pub struct Progress {
    label: String,
    total: Option<u64>,
    done: u64,
    started: Instant,
    last_print: Instant,
    every: Duration,
}

impl Progress {
    pub fn new(label: impl Into<String>, total: Option<u64>) -> Self {
        let now = Instant::now();
        Progress {
            label: label.into(),
            total,
            done: 0,
            started: now,
            last_print: now,
            every: Duration::from_secs(1),
        }
    }

    /// Adds `n` units of work done; prints a line if a second has passed since the last one.
    pub fn inc(&mut self, n: u64) {
        self.done += n;
        if self.last_print.elapsed() >= self.every {
            self.last_print = Instant::now();
            eprintln!("{}", self.line());
        }
    }

    /// Units done so far.
    pub fn done(&self) -> u64 {
        self.done
    }

    /// Units per second so far.
    pub fn rate(&self) -> f64 {
        self.done as f64 / self.started.elapsed().as_secs_f64().max(1e-9)
    }

    /// The current line: `label: done/total (pct) rate/s ETA`.
    pub fn line(&self) -> String {
        let rate = self.rate();
        match self.total {
            Some(total) if total > 0 => {
                let left = total.saturating_sub(self.done) as f64;
                let eta = if rate > 0.0 {
                    left / rate
                } else {
                    f64::INFINITY
                };
                format!(
                    "{}: {}/{} ({:.1}%) {:.0}/s ETA {}",
                    self.label,
                    self.done,
                    total,
                    100.0 * self.done as f64 / total as f64,
                    rate,
                    fmt_secs(eta)
                )
            }
            _ => format!("{}: {} {:.0}/s", self.label, self.done, rate),
        }
    }

    /// Prints the final line with the elapsed time.
    pub fn finish(&self) {
        eprintln!(
            "{}: {} done in {:.2}s ({:.0}/s)",
            self.label,
            self.done,
            self.started.elapsed().as_secs_f64(),
            self.rate()
        );
    }
}

fn fmt_secs(s: f64) -> String {
    if !s.is_finite() {
        "?".into()
    } else if s < 60.0 {
        format!("{s:.0}s")
    } else {
        format!("{}m{:02}s", (s / 60.0) as u64, (s % 60.0) as u64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn line_shows_share_and_eta() {
        let mut p = Progress::new("generate", Some(200));
        p.inc(50);
        let line = p.line();
        assert!(line.starts_with("generate: 50/200 (25.0%)"), "{line}");
        assert!(line.contains("ETA"), "{line}");
    }
}
