//! Progress of a pass: one console line updated in place, and a kmsg/log line every 5 % (a busybox
//! initramfs rate-limits /dev/kmsg, and a serial console cannot take a line per chunk).

use std::io::Write;
use std::time::Instant;

pub struct Progress {
    name: String,
    start: Instant,
    start_bytes: Option<u64>,
    last_step: u64,
    /// Rewrite the line in place (a terminal); else only the 5 % lines.
    in_place: bool,
    /// Length of the in-place line on screen (to blank it before a log line), and when it was drawn.
    drawn: usize,
    last_draw: Option<Instant>,
}

fn gib(b: u64) -> f64 {
    b as f64 / (1u64 << 30) as f64
}

fn eta(secs: u64) -> String {
    match secs {
        s if s >= 3600 => format!("{}h{:02}m", s / 3600, (s % 3600) / 60),
        s if s >= 60 => format!("{}m{:02}s", s / 60, s % 60),
        s => format!("{s}s"),
    }
}

impl Progress {
    pub fn new(name: &str, in_place: bool) -> Progress {
        Progress {
            name: name.to_string(),
            start: Instant::now(),
            start_bytes: None,
            last_step: u64::MAX,
            in_place,
            drawn: 0,
            last_draw: None,
        }
    }

    /// The status line of design §5: `osencrypt  41%  12.3/30.0 GiB  187 MiB/s  ETA 1m37s`.
    pub fn line(&self, done: u64, total: u64) -> String {
        let pct = (done.saturating_mul(100)).checked_div(total).unwrap_or(100);
        let secs = self.start.elapsed().as_secs_f64().max(0.001);
        let moved = done.saturating_sub(self.start_bytes.unwrap_or(0));
        let rate = moved as f64 / secs;
        let left = if rate > 0.0 {
            (total.saturating_sub(done) as f64 / rate) as u64
        } else {
            0
        };
        format!(
            "{}  {pct}%  {:.1}/{:.1} GiB  {:.0} MiB/s  ETA {}",
            self.name,
            gib(done),
            gib(total),
            rate / (1u64 << 20) as f64,
            eta(left)
        )
    }

    /// The 5 % lines go through `log` (console and kmsg). Between them, on a terminal, the same
    /// line is redrawn in place at most once a second (a serial console is slow); it is blanked
    /// before every log line so the two never share a console line.
    pub fn update(&mut self, done: u64, total: u64) {
        self.start_bytes.get_or_insert(done);
        let line = self.line(done, total);
        let step = (done.saturating_mul(20)).checked_div(total).unwrap_or(20);
        if step != self.last_step {
            self.last_step = step;
            self.blank();
            log::info!("{line}");
            return;
        }
        let due = self.last_draw.is_none_or(|t| t.elapsed().as_secs() >= 1);
        if self.in_place && due {
            let text = format!("initcrypt: {line}");
            let pad = self.drawn.saturating_sub(text.len());
            let _ = write!(std::io::stderr(), "\r{text}{}", " ".repeat(pad));
            self.drawn = text.len();
            self.last_draw = Some(Instant::now());
        }
    }

    fn blank(&mut self) {
        if self.in_place && self.drawn > 0 {
            let _ = write!(std::io::stderr(), "\r{}\r", " ".repeat(self.drawn));
            self.drawn = 0;
        }
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        self.blank();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn line_format() {
        let p = Progress::new("osencrypt", false);
        let l = p.line(41 << 20, 100 << 20);
        assert!(l.starts_with("osencrypt  41%  0.0/0.1 GiB  "), "{l}");
        assert!(l.contains("MiB/s  ETA "));
        assert_eq!(eta(97), "1m37s");
        assert_eq!(eta(3725), "1h02m");
    }
}
