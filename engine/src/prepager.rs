//! Adaptive prepaging ("bubbling", Hines et al. 2009), per stream.
//!
//! The last faulted page is the pivot. After a fault, pages around it are
//! claimed in runs that alternate forward and backward, each run further
//! out than the last in its direction, until the bubble's radius is spent.
//! A new fault moves the pivot at once and starts a new bubble.
//!
//! Faults are grouped into streams (several vCPUs each walking their own
//! memory): a fault near a stream's last fault belongs to it, and each
//! stream keeps its own bubble, so one vCPU's faults do not cancel the
//! bubble of another. A stream whose faults keep moving one way gets a
//! bubble only that way, twice as deep.

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
    /// A strided bubble instead: the distance between its pages (0: a
    /// contiguous bubble), the next page (`fwd`) and how many are left,
    /// within `[bwd_end, fwd_end)`.
    stride: i64,
    left: u64,
}

impl Bubble {
    fn open(&self) -> bool {
        if self.stride != 0 {
            self.left > 0
        } else {
            self.fwd < self.fwd_end || self.bwd > self.bwd_end
        }
    }
}

/// Streams tracked at once.
const MAX_STREAMS: usize = 8;

/// Faults of one stream, and its bubble.
#[derive(Debug)]
struct Stream {
    last: u64,
    /// +1 forward, -1 backward, 0 unknown.
    dir: i8,
    /// The last deltas between its faults, newest first.
    deltas: [i64; 3],
    bubble: Bubble,
}

/// The bubbles around recent faults, shared by the fault handler (which
/// moves the pivots) and the pusher lanes (which take runs from them).
#[derive(Debug)]
pub struct Prepager {
    radius: u64,
    /// Most recent first.
    streams: Mutex<Vec<Stream>>,
    wake_tx: Sender<()>,
    wake_rx: Receiver<()>,
}

impl Prepager {
    /// A prepager whose bubbles reach `radius` pages each way; 0 disables it.
    pub fn new(radius: u64) -> Self {
        let (wake_tx, wake_rx) = channel::bounded(1);
        Self {
            radius,
            streams: Mutex::new(Vec::with_capacity(MAX_STREAMS)),
            wake_tx,
            wake_rx,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Stream>> {
        // The bubbles are plain data; a panic elsewhere cannot leave them
        // torn in a way that matters (worst case a run is skipped and
        // swept later).
        self.streams.lock().unwrap_or_else(|p| p.into_inner())
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
        let r = self.radius;
        let mut streams = self.lock();
        // The stream this fault continues, if any: one whose last fault is
        // near, in the same region.
        let near = streams
            .iter()
            .position(|s| s.last.abs_diff(page) <= 4 * r && pages.contains(&s.last));
        let mut stream = match near {
            Some(i) => streams.remove(i),
            None => {
                streams.truncate(MAX_STREAMS - 1);
                Stream {
                    last: page,
                    dir: 0,
                    deltas: [0; 3],
                    bubble: Bubble::default(),
                }
            }
        };
        let dir = match page.cmp(&stream.last) {
            std::cmp::Ordering::Greater => 1,
            std::cmp::Ordering::Less => -1,
            std::cmp::Ordering::Equal => 0,
        };
        // Two faults the same way in a row: the stream has a direction.
        let (ahead, behind) = if dir != 0 && dir == stream.dir {
            if dir > 0 {
                (2 * r, 0)
            } else {
                (0, 2 * r)
            }
        } else {
            (r, r)
        };
        let delta = page as i64 - stream.last as i64;
        stream.deltas = [delta, stream.deltas[0], stream.deltas[1]];
        stream.dir = dir;
        stream.last = page;
        // The same jump three times (Leap's majority vote over recent
        // deltas, here unanimous): a strided walk. Prefetch along it,
        // twice the radius deep; a stride of one is the contiguous case.
        let d = stream.deltas[0];
        stream.bubble = if d.abs() >= 2 && stream.deltas.iter().all(|&x| x == d) {
            Bubble {
                fwd: (page as i64 + d) as u64,
                fwd_end: pages.end,
                bwd: pages.start,
                bwd_end: pages.start,
                forward_next: true,
                stride: d,
                left: 2 * r,
            }
        } else {
            Bubble {
                fwd: page + 1,
                fwd_end: (page + 1 + ahead).min(pages.end),
                bwd: page,
                bwd_end: page.saturating_sub(behind).max(pages.start),
                forward_next: true,
                stride: 0,
                left: 0,
            }
        };
        streams.insert(0, stream);
        drop(streams);
        let _ = self.wake_tx.try_send(());
    }

    /// Claims the next run of at most `max` missing pages from the
    /// bubbles, the most recent stream's first, or `None` when all are
    /// spent.
    pub fn next_run(&self, states: &PageStateMap, max: u64) -> Option<PageRange> {
        if self.radius == 0 || max == 0 {
            return None;
        }
        let mut streams = self.lock();
        streams
            .iter_mut()
            .find_map(|s| Self::bubble_run(&mut s.bubble, states, max))
    }

    fn bubble_run(b: &mut Bubble, states: &PageStateMap, max: u64) -> Option<PageRange> {
        if b.stride != 0 {
            // One page at a time along the stride, inside the region
            // (`bwd_end ..fwd_end`).
            while b.left > 0 {
                let p = b.fwd;
                if p < b.bwd_end || p >= b.fwd_end {
                    b.left = 0;
                    break;
                }
                b.left -= 1;
                b.fwd = (p as i64 + b.stride) as u64;
                if states.try_claim(p) == crate::state::Claim::Won {
                    return Some(PageRange::new(p, 1));
                }
            }
            return None;
        }
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

    /// Whether some bubble still has pages to consider.
    pub fn has_open_bubble(&self) -> bool {
        self.radius > 0 && self.lock().iter().any(|s| s.bubble.open())
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
    fn each_stream_keeps_its_bubble_and_a_direction_deepens_it() {
        let layout = MemoryLayout::single(10_000 * 4096).unwrap();
        let s = PageStateMap::new(10_000);
        let p = Prepager::new(4);
        // Two vCPUs, far apart, faulting alternately.
        p.on_fault(100, &layout);
        p.on_fault(5000, &layout);
        assert_eq!(p.next_run(&s, 8), Some(PageRange::new(5001, 4)));
        assert_eq!(p.next_run(&s, 8), Some(PageRange::new(4996, 4)));
        // The other stream's bubble is still there.
        assert_eq!(p.next_run(&s, 8), Some(PageRange::new(101, 4)));
        // The first stream moves forward twice: a forward-only bubble of
        // twice the radius.
        p.on_fault(106, &layout);
        p.on_fault(108, &layout);
        assert_eq!(drain(&p, &s, 16), vec![(109, 8)]);
    }

    #[test]
    fn a_strided_walk_gets_a_strided_bubble() {
        let layout = MemoryLayout::single(10_000 * 4096).unwrap();
        let s = PageStateMap::new(10_000);
        let p = Prepager::new(4);
        for f in [100, 116, 132, 148] {
            assert_eq!(s.try_claim(f), crate::state::Claim::Won);
            p.on_fault(f, &layout);
        }
        // Three jumps of 16: the next 8 pages along the stride, one each.
        let runs = drain(&p, &s, 8);
        assert_eq!(runs, (1..=8).map(|k| (148 + 16 * k, 1)).collect::<Vec<_>>());
        // Backwards too, and never below the region.
        let p = Prepager::new(4);
        for f in [1060u64, 1056, 1052, 1048] {
            let _ = s.try_claim(f);
            p.on_fault(f, &layout);
        }
        let runs = drain(&p, &s, 8);
        assert_eq!(runs, (1..=8).map(|k| (1048 - 4 * k, 1)).collect::<Vec<_>>());
        let p = Prepager::new(4);
        for f in [12u64, 8, 4, 0] {
            let _ = s.try_claim(f);
            p.on_fault(f, &layout);
        }
        assert_eq!(drain(&p, &s, 8), vec![]);
        // A stride of one is the contiguous bubble.
        let p = Prepager::new(2);
        for f in [500u64, 501, 502, 503] {
            let _ = s.try_claim(f);
            p.on_fault(f, &layout);
        }
        assert_eq!(drain(&p, &s, 8), vec![(504, 4)]);
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
