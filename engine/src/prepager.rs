//! Adaptive prepaging ("bubbling", Hines et al. 2009).
//!
//! The last faulted page is the pivot. After a fault, pages around it are
//! claimed in runs that alternate forward and backward, each run further
//! out than the last in its direction, until the bubble's radius is spent.
//! A new fault moves the pivot at once and starts a new bubble.

use std::sync::Mutex;
use std::time::Duration;

use crossbeam::channel::{self, Receiver, Sender};
use pagewire_transport::{MemoryLayout, PageRange};

use crate::state::PageStateMap;

#[derive(Debug, Default)]
struct Bubble {
    /// Next page to consider going forward.
    fwd: u64,
    /// Forward bound (exclusive).
    fwd_end: u64,
    /// One past the next page to consider going backward.
    bwd: u64,
    /// Backward bound (inclusive lowest page).
    bwd_end: u64,
    /// Whose turn it is.
    forward_next: bool,
}

/// The bubble around the last fault, shared by the fault handler (which
/// moves the pivot) and the pusher lanes (which take runs from it).
#[derive(Debug)]
pub struct Prepager {
    radius: u64,
    bubble: Mutex<Bubble>,
    wake_tx: Sender<()>,
    wake_rx: Receiver<()>,
}

impl Prepager {
    /// A prepager whose bubbles reach `radius` pages each way; 0 disables it.
    pub fn new(radius: u64) -> Self {
        let (wake_tx, wake_rx) = channel::bounded(1);
        Self {
            radius,
            bubble: Mutex::new(Bubble::default()),
            wake_tx,
            wake_rx,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Bubble> {
        // The bubble is plain data; a panic elsewhere cannot leave it torn
        // in a way that matters (worst case a run is skipped and swept later).
        self.bubble.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Moves the pivot to `page` (a fault just happened there), bounded by
    /// the page's region, and wakes an idle lane.
    pub fn on_fault(&self, page: u64, layout: &MemoryLayout) {
        if self.radius == 0 {
            return;
        }
        let Some(region) = layout.region_of(page) else {
            return;
        };
        let pages = layout.region_pages(region);
        *self.lock() = Bubble {
            fwd: page + 1,
            fwd_end: (page + 1 + self.radius).min(pages.end),
            bwd: page,
            bwd_end: page.saturating_sub(self.radius).max(pages.start),
            forward_next: true,
        };
        let _ = self.wake_tx.try_send(());
    }

    /// Claims the next run of at most `max` missing pages from the bubble,
    /// or `None` when the bubble is spent.
    pub fn next_run(&self, states: &PageStateMap, max: u64) -> Option<PageRange> {
        if self.radius == 0 || max == 0 {
            return None;
        }
        let mut b = self.lock();
        loop {
            let fwd_open = b.fwd < b.fwd_end;
            let bwd_open = b.bwd > b.bwd_end;
            if !fwd_open && !bwd_open {
                return None;
            }
            let forward = (b.forward_next && fwd_open) || !bwd_open;
            b.forward_next = !forward;
            if forward {
                // Skip pages someone else has; they still use up radius.
                while b.fwd < b.fwd_end && !states.is_missing(b.fwd) {
                    b.fwd += 1;
                }
                let n = states.claim_up(b.fwd, max, b.fwd_end);
                let run = PageRange::new(b.fwd, n as u32);
                b.fwd = (b.fwd + n.max(1)).min(b.fwd_end);
                if n > 0 {
                    return Some(run);
                }
            } else {
                while b.bwd > b.bwd_end && !states.is_missing(b.bwd - 1) {
                    b.bwd -= 1;
                }
                let n = states.claim_down(b.bwd, max, b.bwd_end);
                let end = b.bwd;
                b.bwd = b.bwd.saturating_sub(n.max(1)).max(b.bwd_end);
                if n > 0 {
                    return Some(PageRange::new(end - n, n as u32));
                }
            }
        }
    }

    /// Waits up to `timeout` for a new pivot; used by idle lanes.
    pub fn wait_for_pivot(&self, timeout: Duration) {
        let _ = self.wake_rx.recv_timeout(timeout);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn drain(p: &Prepager, s: &PageStateMap, max: u64) -> Vec<(u64, u32)> {
        std::iter::from_fn(|| p.next_run(s, max))
            .map(|r| (r.first, r.count))
            .collect()
    }

    #[test]
    fn bubbles_expand_forward_and_backward_from_the_pivot() {
        let layout = MemoryLayout::single(100 * 4096).unwrap();
        let s = PageStateMap::new(100);
        let p = Prepager::new(3);
        assert_eq!(p.next_run(&s, 1), None, "no fault, no bubble");
        assert_eq!(s.try_claim(50), crate::state::Claim::Won); // the fault's own page
        p.on_fault(50, &layout);
        assert_eq!(
            drain(&p, &s, 1),
            vec![(51, 1), (49, 1), (52, 1), (48, 1), (53, 1), (47, 1)]
        );
    }

    #[test]
    fn runs_are_coalesced_and_skip_taken_pages() {
        let layout = MemoryLayout::single(100 * 4096).unwrap();
        let s = PageStateMap::new(100);
        assert_eq!(s.claim_up(12, 1, 100), 1); // someone holds page 12
        let p = Prepager::new(8);
        p.on_fault(10, &layout);
        // Forward 11 then blocked by 12; backward 6..=9 (4 at most);
        // forward resumes past 12 at 13..=16; backward 2..=5; forward 17..=18.
        assert_eq!(
            drain(&p, &s, 4),
            vec![(11, 1), (6, 4), (13, 4), (2, 4), (17, 2)]
        );
    }

    #[test]
    fn a_new_fault_moves_the_pivot_at_once() {
        let layout = MemoryLayout::single(1000 * 4096).unwrap();
        let s = PageStateMap::new(1000);
        let p = Prepager::new(100);
        p.on_fault(10, &layout);
        assert_eq!(p.next_run(&s, 2), Some(PageRange::new(11, 2)));
        p.on_fault(500, &layout);
        assert_eq!(p.next_run(&s, 2), Some(PageRange::new(501, 2)));
        assert_eq!(p.next_run(&s, 2), Some(PageRange::new(498, 2)));
    }

    #[test]
    fn bubbles_stay_inside_the_fault_region() {
        let layout = pagewire_transport::MemoryLayout::new(
            4096,
            vec![
                pagewire_transport::RegionInfo {
                    guest_base: 0,
                    len: 4 * 4096,
                },
                pagewire_transport::RegionInfo {
                    guest_base: 1 << 20,
                    len: 4 * 4096,
                },
            ],
        )
        .unwrap();
        let s = PageStateMap::new(8);
        let p = Prepager::new(10);
        p.on_fault(4, &layout);
        // Forward within region 1 only (5..=7), backward nothing (4 is the
        // region's first page).
        assert_eq!(drain(&p, &s, 8), vec![(5, 3)]);
    }

    #[test]
    fn radius_zero_disables_bubbling() {
        let layout = MemoryLayout::single(10 * 4096).unwrap();
        let s = PageStateMap::new(10);
        let p = Prepager::new(0);
        p.on_fault(5, &layout);
        assert_eq!(p.next_run(&s, 4), None);
    }
}
