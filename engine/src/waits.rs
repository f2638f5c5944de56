//! What blocked faults wait on: their own requests on an urgent channel,
//! and pages a lane is already fetching. The governor holds the sweep
//! while a fault's request is outstanding; the huge-page view
//! (`scaled/channel.rs`) holds a bulk channel's next piece while a fault
//! waits on something else and on nothing that channel carries.

use std::sync::atomic::{fence, AtomicU32, AtomicUsize, Ordering};
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use pagewire_transport::PageRange;

/// Faults' requests outstanding and faults waiting on pages in flight,
/// shared by the fault services, the lanes, the governor and the
/// huge-page view.
#[derive(Debug, Default)]
pub struct FaultWaits {
    /// Faults' requests outstanding, over every fault service.
    urgent: AtomicU32,
    /// Faults waiting for a page a lane is fetching: (page, when read).
    waiters: Mutex<Vec<(u64, Instant)>>,
    /// `waiters.len()`, read without the lock.
    waiting: AtomicUsize,
    /// Wakes [`Self::wait_clear`] when a fault's wait ends.
    lock: Mutex<()>,
    cv: Condvar,
}

impl FaultWaits {
    /// Faults' requests outstanding now.
    pub fn urgent(&self) -> u32 {
        self.urgent.load(Ordering::Acquire)
    }

    /// A fault's request is going out; returns how many were outstanding
    /// before.
    pub(crate) fn urgent_begin(&self) -> u32 {
        self.urgent.fetch_add(1, Ordering::AcqRel)
    }

    /// A fault's request has been answered; returns whether it was the
    /// last outstanding.
    pub(crate) fn urgent_end(&self) -> bool {
        // Never below zero (a request forgotten on resume and ended late).
        let before = self
            .urgent
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                Some(n.saturating_sub(1))
            })
            .unwrap_or(0);
        let last = before == 1;
        if last {
            self.wake();
        }
        last
    }

    /// Forgets the requests of fault services that stopped (a migration
    /// resumed after it was parked): they are asked for again.
    pub(crate) fn forget_urgent(&self) {
        self.urgent.store(0, Ordering::Release);
        self.wake();
    }

    /// Whether any fault waits on a page a lane is fetching.
    pub fn has_waiters(&self) -> bool {
        self.waiting.load(Ordering::Acquire) > 0
    }

    /// Whether a fault waits on a page of `ranges`.
    pub fn waits_in(&self, ranges: &[PageRange]) -> bool {
        if !self.has_waiters() {
            return false;
        }
        self.waiters_lock()
            .iter()
            .any(|&(page, _)| ranges.iter().any(|r| page >= r.first && page < r.end()))
    }

    /// A fault read at `t0` found `page` being fetched: it waits, unless
    /// `present` says the page is already in. Returns whether the fault
    /// waits.
    pub(crate) fn wait_for(&self, page: u64, t0: Instant, present: impl FnOnce() -> bool) -> bool {
        let mut w = self.waiters_lock();
        w.push((page, t0));
        self.waiting.store(w.len(), Ordering::SeqCst);
        // An install marks its pages present, then looks for waiters
        // (with a fence between, see `Shared::mark_present`): either it
        // sees this wait or this sees the page present.
        fence(Ordering::SeqCst);
        let waits = !present();
        if !waits {
            w.pop();
            self.waiting.store(w.len(), Ordering::Release);
        }
        drop(w);
        // A bulk channel held back may carry the page (it goes on now), or
        // may have seen the wait that just ended.
        self.wake();
        waits
    }

    /// Pages `range` are in: ends the waits on them, calling `ended` with
    /// when each fault was read.
    pub(crate) fn settle(&self, range: PageRange, ended: impl FnMut(Instant)) {
        self.settle_where(|page| page >= range.first && page < range.end(), ended);
    }

    /// Ends the waits on every page `done` says is in, calling `ended`
    /// with when each fault was read.
    pub(crate) fn settle_where(&self, done: impl Fn(u64) -> bool, mut ended: impl FnMut(Instant)) {
        if !self.has_waiters() {
            return;
        }
        let mut w = self.waiters_lock();
        let before = w.len();
        w.retain(|&(page, t0)| {
            let done = done(page);
            if done {
                ended(t0);
            }
            !done
        });
        self.waiting.store(w.len(), Ordering::Release);
        let settled = w.len() < before;
        drop(w);
        if settled {
            self.wake();
        }
    }

    /// Whether a fault waits on something `mine` (pages a bulk channel
    /// carries) does not hold: a fault's request, or a page in flight
    /// elsewhere.
    pub fn waits_elsewhere(&self, mine: &[PageRange]) -> bool {
        if self.urgent() > 0 {
            return true;
        }
        if !self.has_waiters() {
            return false;
        }
        self.waiters_lock()
            .iter()
            .any(|&(page, _)| !mine.iter().any(|r| page >= r.first && page < r.end()))
    }

    /// Whether a bulk channel carrying `mine` must hold its next piece: a
    /// fault waits on something else and on nothing it carries (a channel
    /// carrying a page a fault waits on always goes on).
    pub fn holds(&self, mine: &[PageRange]) -> bool {
        self.waits_elsewhere(mine) && !self.waits_in(mine)
    }

    /// Waits until a channel carrying `mine` need not hold
    /// ([`Self::holds`]), at most `max`. Returns whether it need not.
    pub fn wait_clear(&self, mine: &[PageRange], max: Duration) -> bool {
        let deadline = Instant::now() + max;
        let mut g = self.lock.lock().unwrap_or_else(|p| p.into_inner());
        while self.holds(mine) {
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            g = self
                .cv
                .wait_timeout(g, deadline - now)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
        true
    }

    fn wake(&self) {
        // Under the lock: a waiter that found a wait is already asleep
        // on the condition variable and gets the notice.
        let _g = self.lock.lock().unwrap_or_else(|p| p.into_inner());
        self.cv.notify_all();
    }

    fn waiters_lock(&self) -> MutexGuard<'_, Vec<(u64, Instant)>> {
        // Plain data: a panic elsewhere cannot leave it unusable.
        self.waiters.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_channel_makes_way_only_for_waits_it_does_not_carry() {
        let w = FaultWaits::default();
        let mine = [PageRange::new(10, 2)];
        assert!(!w.waits_elsewhere(&mine));
        assert!(w.wait_for(11, Instant::now(), || false));
        assert!(!w.waits_elsewhere(&mine), "the page waited on is mine");
        assert!(w.waits_elsewhere(&[PageRange::new(0, 1)]));
        assert!(w.waits_in(&mine));
        assert!(!w.wait_for(3, Instant::now(), || true), "already present");
        let mut ended = 0;
        w.settle(PageRange::new(11, 1), |_| ended += 1);
        assert_eq!(ended, 1);
        assert!(!w.has_waiters());
        w.urgent_begin();
        assert!(w.waits_elsewhere(&mine), "a fault's request is everyone's");
        assert!(w.holds(&mine));
        assert!(!w.wait_clear(&mine, Duration::ZERO));
        // A channel carrying a page a fault waits on goes on, even beside
        // a fault's request or a wait on another lane's page.
        assert!(w.wait_for(10, Instant::now(), || false));
        assert!(w.wait_for(40, Instant::now(), || false));
        assert!(!w.holds(&mine));
        assert!(w.wait_clear(&mine, Duration::ZERO));
        assert!(w.holds(&[PageRange::new(0, 1)]));
        w.settle_where(|p| p == 10 || p == 40, |_| {});
        assert!(!w.has_waiters());
        assert!(w.urgent_end());
        assert!(w.wait_clear(&mine, Duration::ZERO));
        w.urgent_begin();
        w.forget_urgent();
        assert_eq!(w.urgent(), 0);
        // A request ended after it was forgotten leaves the count at zero.
        assert!(!w.urgent_end());
        assert_eq!(w.urgent(), 0);
    }
}
