//! The delay-based window: bulk bytes in flight near what the path needs.
//!
//! As Swift or TCP Vegas do, on whole requests: the window grows while
//! requests come back within [`TARGET_DELAY`] of the minimum round trip
//! for their size and shrinks when round trips grow past it, which means
//! bytes are queueing somewhere (socket buffers, the qdisc, the NIC or the
//! link's shaper) where a fault's reply would wait behind them.

use std::time::{Duration, Instant};

use super::{Governor, Sent, State, MAX_WINDOW};

/// Request size classes: class `k` holds requests of `2^k..2^(k+1)` pages.
pub(super) const CLASSES: usize = 13;
/// How long a size class's minimum round trip stays valid (it is the
/// reference queueing delay is measured from).
pub(super) const MIN_RTT_AGE: Duration = Duration::from_secs(2);
/// Round-trip samples of one request size needed before the window moves.
const MIN_SAMPLES: u32 = 3;
/// Queueing delay the bulk traffic may add, smoothed: above it the window
/// shrinks, below half of it the window grows. A fault's reply waits
/// behind about this much bulk at the bottleneck. Where the minimum round
/// trip is longer, that is the target instead.
pub const TARGET_DELAY: Duration = Duration::from_micros(40);

/// The size class of a request of `pages` pages.
pub(super) fn class_of(pages: u32) -> usize {
    (31 - pages.max(1).leading_zeros() as usize).min(CLASSES - 1)
}

impl Governor {
    /// Learns from the round trip `rtt` of `sent`, a sample of the path:
    /// its size class's minimum, the delivery rate (and with it the
    /// request size), and the window.
    pub(super) fn adapt_window(&self, st: &mut State, sent: &Sent, rtt: Duration, now: Instant) {
        let class = class_of(sent.pages);
        let fresh = |m: Option<(Duration, Instant)>| {
            m.filter(|&(_, at)| now.duration_since(at) < MIN_RTT_AGE)
        };
        let min = match fresh(st.class_min[class]) {
            Some((m, _)) if m <= rtt => m,
            _ => rtt,
        };
        st.class_min[class] = Some((min, now));
        if let Some(rate) = st.epoch.add(sent.bytes, now) {
            st.peak_rate = st.peak_rate.max(rate);
            self.resize(st, rate, now);
        }
        if class != class_of(st.chunk) {
            return;
        }
        st.samples += 1;
        if st.samples < MIN_SAMPLES {
            return;
        }
        let cb = self.chunk_bytes(st) as f64;
        let bytes = sent.bytes as f64;
        let qd = (rtt - min).as_secs_f64();
        st.queue_delay += (qd - st.queue_delay) / 8.0;
        // Queueing up to one base round trip is allowed on slow paths (BBR
        // keeps two bandwidth-delay products in flight); fast ones get the
        // fixed target.
        let target = TARGET_DELAY.as_secs_f64().max(min.as_secs_f64());
        let limited = sent.inflight as f64 + cb >= st.window;
        if st.queue_delay < target / 2.0 {
            if limited {
                st.window += if st.window < st.ssthresh {
                    bytes
                } else {
                    cb * bytes / st.window
                };
            }
        } else if st.queue_delay > target {
            st.ssthresh = st.ssthresh.min(st.window);
            // At most one multiplicative cut per round trip, in proportion
            // to how far past the target the delay is (as Swift does).
            if now.duration_since(st.last_cut) > rtt {
                let over = (st.queue_delay - target) / st.queue_delay;
                st.window *= 1.0 - 0.5 * over.min(1.0);
                st.last_cut = now;
            }
        }
        st.window = st.window.clamp(cb, MAX_WINDOW);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::governor::testing::{round, NEVER};

    #[test]
    fn size_classes_are_powers_of_two() {
        assert_eq!(class_of(0), 0);
        assert_eq!(class_of(1), 0);
        assert_eq!(class_of(2), 1);
        assert_eq!(class_of(3), 1);
        assert_eq!(class_of(4096), 12);
        assert_eq!(class_of(u32::MAX), CLASSES - 1);
    }

    #[test]
    fn the_window_bounds_bytes_in_flight() {
        let g = Governor::new(4096, 64, true, None).with_idle_after(NEVER);
        let a = g.acquire(None).expect("first request always passes");
        assert_eq!(a.pages, 1, "flow control starts with one-page requests");
        let sa = g.commit(a, 1);
        let b = g.acquire(None).expect("the initial window holds two");
        let sb = g.commit(b, 1);
        assert!(g.acquire(None).is_none(), "window full");
        g.complete(sa);
        let c = g.acquire(None).expect("room again after a completion");
        g.release(c);
        g.complete(sb);
    }

    #[test]
    fn requests_sent_again_after_a_lost_link_stay_in_the_window() {
        let g = Governor::new(4096, 64, true, None).with_idle_after(NEVER);
        let sa = g.commit(g.acquire(None).unwrap(), 1);
        let sb = g.commit(g.acquire(None).unwrap(), 1);
        assert!(g.acquire(None).is_none(), "window full");
        // The link broke; both go out again on the new connection.
        let (ra, rb) = (g.resend(sa), g.resend(sb));
        assert!(
            g.acquire(None).is_none(),
            "still in flight: the window stays full"
        );
        g.complete(ra);
        g.complete(rb);
        assert!(g.acquire(None).is_some(), "room once they arrived");
        // Neither taught a round trip (an outage is no measure of the path).
        assert!(g.stats().min_rtt_by_size_us.is_empty(), "{:?}", g.stats());
    }

    #[test]
    fn growing_round_trips_shrink_the_window() {
        // On synthetic times: a loaded machine's real round trips would
        // show its scheduling, not the path.
        let g = Governor::new(4096, 64, true, None).with_idle_after(NEVER);
        let mut at = Instant::now();
        // Round trips at the minimum grow the window (slow start)...
        for _ in 0..20 {
            round(&g, &mut at, Duration::from_micros(20), usize::MAX);
        }
        let grown = g.stats().window_bytes;
        assert!(grown > 2 * 4096, "window did not grow: {grown}");
        // ...and round trips far above it (a queue) shrink it.
        for _ in 0..50 {
            round(&g, &mut at, Duration::from_millis(2), usize::MAX);
        }
        let shrunk = g.stats().window_bytes;
        assert!(shrunk < grown, "window {grown} -> {shrunk}");
    }
}
