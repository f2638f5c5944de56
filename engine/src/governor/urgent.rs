//! Faults' requests: while one is outstanding the sweep holds its requests
//! (faults preempt the push; bubbles, what the guest touches next, only
//! wait for window room), and each one's round trip tells whether idle
//! bulk was in its way.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use super::Governor;

/// `last_urgent_us` and `fault_base_ns` before the first fault.
pub(super) const NO_FAULT: u64 = u64::MAX;
/// Fewest faults in an epoch whose mean round trip a size probe weighs.
pub(super) const PROBE_MIN_FAULTS: u32 = 8;

/// A fault's request on the wire, from [`Governor::urgent_begin`] to
/// [`Governor::urgent_end`].
#[derive(Debug, Clone, Copy)]
#[must_use = "a fault's request is ended with urgent_end"]
pub struct Urgent {
    /// When the request went out.
    pub(super) at: Instant,
    /// Sent while the guest was idle: its round trip shows what the idle
    /// bulk cost it.
    pub(super) after_idle: bool,
    /// Faults' requests outstanding with this one, over every service.
    outstanding: u32,
}

impl Urgent {
    /// Faults' requests outstanding when this one went out, this one
    /// included, over every fault service.
    pub fn outstanding(&self) -> u32 {
        self.outstanding
    }
}

impl Governor {
    /// A fault's request is going out: lanes hold new requests until
    /// [`Governor::urgent_end`].
    pub fn urgent_begin(&self) -> Urgent {
        let after_idle = self.idle();
        // The time first: whoever sees the count sees the time too.
        self.last_urgent_us
            .store(self.born.elapsed().as_micros() as u64, Ordering::Release);
        let before = self.waits.urgent_begin();
        Urgent {
            at: Instant::now(),
            after_idle,
            outstanding: before.saturating_add(1),
        }
    }

    /// A fault's request has been answered.
    pub fn urgent_end(&self, urgent: Urgent) {
        self.urgent_end_at(urgent, Instant::now());
    }

    /// [`Self::urgent_end`] at `now`.
    pub(super) fn urgent_end_at(&self, urgent: Urgent, now: Instant) {
        let rtt = now.duration_since(urgent.at);
        let last = self.waits.urgent_end();
        let rtt_ns = u64::try_from(rtt.as_nanos()).unwrap_or(NO_FAULT - 1);
        if !urgent.after_idle {
            // A fault after a pause measures the idle bulk, not the size.
            let mut f = self.faults_since.lock().unwrap_or_else(|p| p.into_inner());
            f.0 += rtt.as_secs_f64();
            f.1 = f.1.saturating_add(1);
        }
        let base = Duration::from_nanos(
            self.fault_base_ns
                .fetch_min(rtt_ns, Ordering::AcqRel)
                .min(rtt_ns),
        );
        if self.enabled && urgent.after_idle {
            self.judge_after_idle(rtt, base, now);
        }
        if last {
            let _g = self.lock();
            self.cv.notify_all();
        }
    }

    /// The mean round trip of the faults answered since the last call (not
    /// counting faults after a pause), in seconds, if there were at least
    /// [`PROBE_MIN_FAULTS`]: fewer are no measure.
    pub(super) fn take_fault_mean(&self) -> Option<f64> {
        let (sum, n) =
            std::mem::take(&mut *self.faults_since.lock().unwrap_or_else(|p| p.into_inner()));
        (n >= PROBE_MIN_FAULTS).then(|| sum / f64::from(n))
    }

    /// The fastest fault round trip so far, if a fault has been answered.
    pub(super) fn fault_base(&self) -> Option<Duration> {
        let ns = self.fault_base_ns.load(Ordering::Acquire);
        (ns != NO_FAULT).then(|| Duration::from_nanos(ns))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::governor::testing::NEVER;

    #[test]
    fn an_outstanding_fault_holds_bulk_requests() {
        let g = Governor::new(4096, 64, true, None).with_idle_after(NEVER);
        let u = g.urgent_begin();
        assert!(g.acquire(Some(Duration::from_millis(5))).is_none());
        g.urgent_end(u);
        assert!(g.acquire(None).is_some());
        assert_eq!(g.stats().urgent_holds, 1);
    }

    #[test]
    fn bubbles_are_not_held_behind_a_fault() {
        let g = Governor::new(4096, 64, true, None).with_idle_after(NEVER);
        let u = g.urgent_begin();
        let t = g.acquire_for(None, true).expect("a bubble passes");
        g.release(t);
        assert!(g.acquire(None).is_none(), "the sweep is held");
        g.urgent_end(u);
    }

    #[test]
    fn an_epochs_fault_mean_counts_only_faults_in_play_and_enough_of_them() {
        let g = Governor::new(4096, 64, true, None).with_idle_after(NEVER);
        let at = Instant::now();
        let fault = |us: u64, after_idle: bool| {
            let mut u = g.urgent_begin();
            u.at = at;
            u.after_idle = after_idle;
            g.urgent_end_at(u, at + Duration::from_micros(us));
        };
        for _ in 0..PROBE_MIN_FAULTS - 1 {
            fault(40, false);
        }
        assert_eq!(g.take_fault_mean(), None, "too few faults");
        // Taking empties the count.
        for _ in 0..PROBE_MIN_FAULTS {
            fault(40, false);
        }
        fault(60, false);
        fault(5000, true);
        let mean = g.take_fault_mean().expect("enough faults");
        let want = (40.0 * f64::from(PROBE_MIN_FAULTS) + 60.0) / f64::from(PROBE_MIN_FAULTS + 1);
        assert!((mean * 1e6 - want).abs() < 1e-6, "{mean}");
        assert_eq!(g.take_fault_mean(), None);
    }

    #[test]
    fn the_fastest_fault_is_the_base() {
        let g = Governor::new(4096, 64, true, None).with_idle_after(NEVER);
        assert_eq!(g.fault_base(), None);
        let at = Instant::now();
        for us in [90, 60, 120] {
            let mut u = g.urgent_begin();
            u.at = at;
            g.urgent_end_at(u, at + Duration::from_micros(us));
        }
        assert_eq!(g.fault_base(), Some(Duration::from_micros(60)));
    }
}
