//! The delivery rate, measured one [`EPOCH`] at a time.

use std::time::{Duration, Instant};

/// How often the delivery rate and the request size are reconsidered.
pub(super) const EPOCH: Duration = Duration::from_millis(20);

/// Bytes delivered since an epoch began.
#[derive(Debug)]
pub(super) struct Epoch {
    /// When the epoch began.
    pub(super) start: Instant,
    bytes: u64,
}

impl Epoch {
    /// An epoch beginning at `start`.
    pub(super) fn new(start: Instant) -> Self {
        Self { start, bytes: 0 }
    }

    /// Counts `bytes` delivered at `now`. Once the epoch has lasted
    /// [`EPOCH`], returns its rate in bytes per second and begins the next.
    pub(super) fn add(&mut self, bytes: u64, now: Instant) -> Option<f64> {
        self.bytes += bytes;
        let span = now.duration_since(self.start);
        (span >= EPOCH).then(|| {
            let rate = self.bytes as f64 / span.as_secs_f64();
            *self = Self::new(now);
            rate
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_epoch_reports_its_rate_once_it_has_lasted() {
        let start = Instant::now();
        let mut e = Epoch::new(start);
        assert_eq!(e.add(1000, start + EPOCH / 2), None);
        let rate = e.add(1000, start + EPOCH).expect("a whole epoch");
        assert!((rate - 2000.0 / EPOCH.as_secs_f64()).abs() < 1e-6, "{rate}");
        // The next epoch starts empty where this one ended.
        assert_eq!(e.start, start + EPOCH);
        assert_eq!(e.add(10, start + EPOCH + EPOCH / 2), None);
    }
}
