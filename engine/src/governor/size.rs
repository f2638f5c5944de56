//! The size of bulk requests.
//!
//! A request starts at one page and grows only while growing pays. Now and
//! then one epoch runs at twice the size; the size is kept only if that
//! epoch delivered clearly more than the best of the last few epochs
//! before it and the one after it (the path was paying per request, as
//! when the CPU is the limit; on a link, epochs that faults held back
//! would make any probe look like a gain), if faults in it did not take
//! [`PROBE_FAULT_COST`] longer on average than around it (on a link
//! whose shaper's burst hides the wire time from the cap, larger requests
//! can push more between faults while each fault waits behind them), and
//! never beyond what takes
//! [`CHUNK_TIME`] x 2 at the measured rate. On a link, where the rate does
//! not grow with the size, requests stay at about [`CHUNK_TIME`] of wire
//! time, so an urgent reply never waits behind a large one.

use std::time::{Duration, Instant};

use super::epoch::EPOCH;
use super::window::MIN_RTT_AGE;
use super::{Governor, State};

/// Wire time one bulk request should take at the measured rate.
pub const CHUNK_TIME: Duration = Duration::from_micros(40);
/// A doubled request size is kept when its epoch delivered this much more
/// than the best of the last [`RECENT_EPOCHS`] at the current size and the
/// epoch after it (and faults paid at most [`PROBE_FAULT_COST`] for it).
const PROBE_GAIN: f64 = 1.4;
/// Epochs at the current request size a probe is judged against.
const RECENT_EPOCHS: usize = 4;
/// A doubled request size is not kept when faults in its epoch took this
/// much longer on average than around it: a fault then waits behind
/// larger bulk replies (on a 1 Gbit/s link, a page more is 33 µs of wire,
/// half of that on average), which a shaper's burst hides from the
/// wire-time cap.
pub const PROBE_FAULT_COST: Duration = Duration::from_micros(10);
/// Wait before the next size probe after one that paid...
const PROBE_SOON: Duration = Duration::from_millis(60);
/// ...and the longest wait after probes that did not: a probe's epoch
/// runs larger requests that faults may wait behind, so where probes keep
/// failing (a link) they take 1 % of the time, which a p99 does not see.
const PROBE_LATEST: Duration = Duration::from_secs(2);

/// Where the probe stands: an epoch at twice the size between two at the
/// current one.
#[derive(Debug, Clone, Copy)]
pub(super) enum Stage {
    /// Not probing.
    Idle,
    /// This epoch runs at twice the size `base`; `before` is the rate at
    /// `base`, `before_faults` the mean fault round trip then (if any).
    Doubled {
        base: u32,
        before: f64,
        before_faults: Option<f64>,
    },
    /// Back at `base`; the verdict waits for this epoch's rate.
    After {
        base: u32,
        before: f64,
        before_faults: Option<f64>,
        doubled: f64,
        doubled_faults: Option<f64>,
    },
}

/// The request-size probe.
#[derive(Debug)]
pub(super) struct SizeProbe {
    /// Where the probe stands.
    pub(super) stage: Stage,
    /// When the next probe may start...
    next: Instant,
    /// ...and the wait after a failed one.
    wait: Duration,
    /// Delivery rates of the last epochs at the current request size,
    /// bytes per second, newest first: what a size probe must beat.
    /// With each, its mean fault round trip in seconds (`None`: too few
    /// faults to tell).
    recent: [(f64, Option<f64>); RECENT_EPOCHS],
    /// The request size `recent` is of, and how many epochs it has had.
    recent_size: u32,
    recent_n: usize,
}

impl SizeProbe {
    /// No probe before one epoch from `now`, at requests of `chunk` pages.
    pub(super) fn new(now: Instant, chunk: u32) -> Self {
        Self {
            stage: Stage::Idle,
            next: now + EPOCH,
            wait: PROBE_SOON,
            recent: [(0.0, None); RECENT_EPOCHS],
            recent_size: chunk,
            recent_n: 0,
        }
    }
}

impl Governor {
    /// An epoch of samples ended, having delivered `rate` bytes per
    /// second: the request size for the next one.
    pub(super) fn resize(&self, st: &mut State, rate: f64, now: Instant) {
        let faults = self.take_fault_mean();
        let chunk = self.next_chunk(st, rate, faults, now);
        if chunk != st.chunk {
            // Queueing is now judged against the new size's minimum; the
            // window keeps its bytes.
            st.chunk = chunk;
            st.samples = 0;
            st.queue_delay = 0.0;
            st.window = st.window.max(2.0 * self.chunk_bytes(st) as f64);
        }
    }

    /// The request size for the next epoch, given the one that ended
    /// delivered `rate` bytes per second with faults taking `faults`
    /// seconds on average (if enough of them): probe steps, and a cap at
    /// twice [`CHUNK_TIME`] of wire time at that rate.
    pub(super) fn next_chunk(
        &self,
        st: &mut State,
        rate: f64,
        faults: Option<f64>,
        now: Instant,
    ) -> u32 {
        let mut chunk = st.chunk;
        if !matches!(st.probe.stage, Stage::Doubled { .. }) {
            // An epoch at the current size; a new size starts afresh.
            if st.probe.recent_size != chunk {
                st.probe.recent = [(0.0, None); RECENT_EPOCHS];
                st.probe.recent_size = chunk;
                st.probe.recent_n = 0;
            }
            st.probe.recent.rotate_right(1);
            st.probe.recent[0] = (rate, faults);
            st.probe.recent_n += 1;
        }
        st.probe.stage = match st.probe.stage {
            // Only once the current size has a baseline.
            Stage::Idle
                if now >= st.probe.next
                    && chunk * 2 <= self.max_chunk
                    && st.probe.recent_n >= RECENT_EPOCHS =>
            {
                chunk *= 2;
                Stage::Doubled {
                    base: st.chunk,
                    // The best of the last epochs at this size: one
                    // that faults held back is no baseline.
                    before: st.probe.recent.iter().map(|e| e.0).fold(0.0, f64::max),
                    before_faults: mean(st.probe.recent.iter().filter_map(|e| e.1.as_ref())),
                }
            }
            Stage::Idle => Stage::Idle,
            Stage::Doubled {
                base,
                before,
                before_faults,
            } => {
                chunk = base;
                Stage::After {
                    base,
                    before,
                    before_faults,
                    doubled: rate,
                    doubled_faults: faults,
                }
            }
            Stage::After {
                base,
                before,
                before_faults,
                doubled,
                doubled_faults,
            } => {
                chunk = base;
                // What the larger size cost the faults around it.
                let around = mean(before_faults.iter().chain(faults.iter()));
                let faults_ok = match (doubled_faults, around) {
                    (Some(d), Some(a)) => d - a <= PROBE_FAULT_COST.as_secs_f64(),
                    _ => true,
                };
                if doubled >= PROBE_GAIN * before.max(rate) && faults_ok {
                    chunk = base * 2;
                    st.probe.wait = PROBE_SOON;
                } else {
                    st.probe.wait = (st.probe.wait * 2).min(PROBE_LATEST);
                }
                st.probe.next = now + st.probe.wait;
                Stage::Idle
            }
        };
        // Whatever the probes say, a request never takes more than twice
        // the budget on the wire: at the per-page wire time the minimum
        // round trips of two sizes show (their slope), or else at the rate
        // the path delivers (which understates the wire when requests are
        // held small, so the slope is preferred).
        let per_page = Self::wire_time_per_page(st, now);
        let cap = match per_page {
            Some(w) if w > 0.0 => 2.0 * CHUNK_TIME.as_secs_f64() / w,
            _ => rate * 2.0 * CHUNK_TIME.as_secs_f64() / self.page_size as f64,
        };
        // A probe epoch is the experiment that measures a larger size: it
        // runs uncapped (it lasts one epoch).
        let probing = matches!(st.probe.stage, Stage::Doubled { .. });
        while !probing && chunk > 1 && f64::from(chunk) > cap {
            chunk /= 2;
        }
        chunk.clamp(1, self.max_chunk)
    }

    /// Wire time of one page, from the minimum round trips of the two
    /// largest fresh size classes, when there are two.
    pub(super) fn wire_time_per_page(st: &State, now: Instant) -> Option<f64> {
        let fresh: Vec<(f64, f64)> = st
            .class_min
            .iter()
            .enumerate()
            .filter_map(|(k, m)| {
                m.filter(|&(_, at)| now.duration_since(at) < MIN_RTT_AGE)
                    .map(|(d, _)| (f64::from(1u32 << k), d.as_secs_f64()))
            })
            .collect();
        let [.., (p1, t1), (p2, t2)] = fresh[..] else {
            return None;
        };
        Some(((t2 - t1) / (p2 - p1)).max(0.0))
    }
}

/// The mean of `xs`, if there are any.
fn mean<'a>(xs: impl Iterator<Item = &'a f64>) -> Option<f64> {
    let (sum, n) = xs.fold((0.0, 0u32), |(s, n), x| (s + x, n + 1));
    (n > 0).then(|| sum / f64::from(n))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::governor::testing::NEVER;

    /// Drives the size probe with synthetic epoch rates: `rate_at(pages)`
    /// is what an epoch at that request size delivers.
    fn settle(g: &Governor, rate_at: impl Fn(u32) -> f64) -> u32 {
        let mut st = g.lock();
        let mut now = Instant::now();
        for i in 0..410 {
            // The settled size, outside a probe (which runs one epoch at
            // twice the size, then one back at it).
            if i >= 400 && matches!(st.probe.stage, Stage::Idle) {
                break;
            }
            now += EPOCH;
            let rate = rate_at(st.chunk);
            st.chunk = g.next_chunk(&mut st, rate, None, now);
        }
        st.chunk
    }

    #[test]
    fn requests_grow_where_size_pays_and_stay_small_on_a_link() {
        // Per-request cost bound (the CPU): 5 µs per request plus 0.25 µs
        // per page; a size-independent 10 GB/s beyond. Sizes grow until
        // twice the budget at the delivered rate caps them.
        let g = Governor::new(4096, 256, true, None).with_idle_after(NEVER);
        let cpu = |pages: u32| {
            let t = 5e-6 + 0.25e-6 * f64::from(pages);
            (f64::from(pages) * 4096.0 / t).min(10e9)
        };
        let grown = settle(&g, cpu);
        assert!(grown >= 16, "CPU-bound path stayed at {grown} pages");
        let cap = cpu(grown) * 2.0 * CHUNK_TIME.as_secs_f64() / 4096.0;
        assert!(
            f64::from(grown) <= cap,
            "{grown} pages exceed the cap {cap}"
        );
        // A 1 Gbit/s link: the rate does not depend on the size.
        let g = Governor::new(4096, 256, true, None).with_idle_after(NEVER);
        assert_eq!(
            settle(&g, |_| 125e6),
            1,
            "a link must keep one-page requests"
        );
    }

    #[test]
    fn epochs_held_back_by_faults_do_not_make_a_probe_pay() {
        // A 1 Gbit/s link where faults hold two epochs in three back to
        // 80 MB/s; the others, and probes that run unhindered, deliver
        // 125 MB/s. A probe beats its neighbours by more than PROBE_GAIN,
        // but not what the current size did a few epochs ago, so the size
        // must stay.
        let g = Governor::new(4096, 256, true, None).with_idle_after(NEVER);
        {
            // The shaper's burst allowance makes round trips look like
            // loopback (3 µs a page), so the wire-time cap does not bind.
            let mut st = g.lock();
            let fresh = Instant::now() + Duration::from_secs(3600);
            st.class_min[0] = Some((Duration::from_micros(14), fresh));
            st.class_min[1] = Some((Duration::from_micros(17), fresh));
        }
        for phase in 0..3 {
            let base_epochs = std::cell::Cell::new(phase);
            let rate = |pages: u32| {
                if pages > 1 {
                    return 125e6;
                }
                base_epochs.set(base_epochs.get() + 1);
                if base_epochs.get() % 3 == 0 {
                    125e6
                } else {
                    80e6
                }
            };
            assert_eq!(settle(&g, rate), 1, "phase {phase}: must stay at one page");
        }
    }

    #[test]
    fn a_probe_that_makes_faults_wait_longer_does_not_pay() {
        // A 1 Gbit/s link whose shaper's burst hides the wire time, where
        // two-page requests deliver 1.5x more of the push between faults
        // (held back less), but each fault waits behind twice the bulk:
        // 60 µs on average against 45.
        let run = |cost: f64| {
            let g = Governor::new(4096, 256, true, None).with_idle_after(NEVER);
            let mut st = g.lock();
            let fresh = Instant::now() + Duration::from_secs(3600);
            st.class_min[0] = Some((Duration::from_micros(14), fresh));
            st.class_min[1] = Some((Duration::from_micros(17), fresh));
            let mut now = Instant::now();
            for _ in 0..400 {
                now += EPOCH;
                let big = st.chunk > 1;
                let faults = Some(45e-6 + if big { cost } else { 0.0 });
                let rate = if big { 90e6 } else { 60e6 };
                st.chunk = g.next_chunk(&mut st, rate, faults, now);
            }
            st.chunk
        };
        assert_eq!(run(15e-6), 1, "faults 15 µs slower: the size must stay");
        // The same gain at a cost below PROBE_FAULT_COST (as on a path
        // whose wire is fast) is taken.
        assert!(run(2e-6) > 1, "faults 2 µs slower: the size must grow");
    }

    #[test]
    fn the_wire_time_of_a_page_is_the_slope_of_minimum_round_trips() {
        let g = Governor::new(4096, 64, true, None).with_idle_after(NEVER);
        let now = Instant::now();
        let mut st = g.lock();
        assert_eq!(Governor::wire_time_per_page(&st, now), None);
        // A 1 Gbit/s link: 33 us more per page.
        st.class_min[0] = Some((Duration::from_micros(60), now));
        st.class_min[1] = Some((Duration::from_micros(93), now));
        let w = Governor::wire_time_per_page(&st, now).unwrap();
        assert!((w - 33e-6).abs() < 1e-9, "{w}");
        // Stale samples do not count.
        let later = now + MIN_RTT_AGE + Duration::from_millis(1);
        assert_eq!(Governor::wire_time_per_page(&st, later), None);
    }
}
