//! The operator's cap on bulk bytes per second (`--push-rate`): a token
//! bucket with about 5 ms of burst.

use std::time::{Duration, Instant};

use super::{Governor, State};

/// The token bucket's state.
#[derive(Debug)]
pub(super) struct Bucket {
    /// Bytes that may be sent now.
    pub(super) tokens: f64,
    /// When `tokens` was last refilled.
    refill: Instant,
}

impl Bucket {
    /// An empty bucket at `now`.
    pub(super) fn new(now: Instant) -> Self {
        Self {
            tokens: 0.0,
            refill: now,
        }
    }
}

impl Governor {
    /// Refills the push-rate bucket; returns how long until it holds
    /// `need` bytes (zero when it does now, or without a cap).
    pub(super) fn refill(&self, st: &mut State, need: u64) -> Duration {
        let Some(rate) = self.push_rate else {
            return Duration::ZERO;
        };
        let b = &mut st.bucket;
        let now = Instant::now();
        let burst = (rate * 0.005).max(2.0 * need as f64);
        b.tokens = (b.tokens + rate * now.duration_since(b.refill).as_secs_f64()).min(burst);
        b.refill = now;
        if b.tokens >= need as f64 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64((need as f64 - b.tokens) / rate)
        }
    }

    /// Takes `bytes` out of the bucket (a request was granted), or puts
    /// them back (`-bytes`: room granted but not used).
    pub(super) fn spend(&self, st: &mut State, bytes: f64) {
        if self.push_rate.is_some() {
            st.bucket.tokens -= bytes;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_push_rate_cap_spaces_requests() {
        // 4 KiB/s with one-page requests: the bucket starts empty, so the
        // first request waits about a second (the time the first acquire
        // may take to come on a loaded machine).
        let g = Governor::new(4096, 1, false, Some(4 << 10));
        assert!(g.acquire(None).is_none(), "no tokens yet");
        let t = g.acquire(Some(Duration::from_secs(5)));
        assert!(t.is_some());
        // That request took the bucket's bytes: the next waits again.
        assert!(g.acquire(None).is_none(), "requests are spaced");
    }
}
