//! Adaptive prepaging ("bubbling", Hines et al. 2009), per stream.
//!
//! The last faulted page is the pivot. After a fault, pages around it are
//! claimed in runs that alternate forward and backward, each run further
//! out than the last in its direction, until the bubble's radius is spent.
//! A new fault moves the pivot at once and starts a new bubble.
//!
//! That is the paper's scheme ([`PrepagerKind::Paper`]): one pivot, a
//! bubble of fixed shape. pagewire's adaptive prepager
//! ([`PrepagerKind::Adaptive`], the default) goes further:
//! - Faults are grouped into streams (several vCPUs each walking their own
//!   memory): a fault near a stream's last fault belongs to it, and each
//!   stream keeps its own bubble, so one vCPU's faults do not cancel the
//!   bubble of another.
//! - A stream whose faults keep moving one way gets a bubble only that
//!   way, twice as deep.
//! - Its window grows: a fault past the far edge of the stream's last
//!   bubble, in its direction, means the guest ran through every page the
//!   bubble brought (they were hits), so the next bubble is twice as deep
//!   (up to 8 radii). A fault that turns back halves it.
//! - It shrinks where bubbles go untouched: a stream dropped without a
//!   single fault continuing it (random access) halves the window new
//!   streams start with (down to 1/16 of the radius); a stream that does
//!   continue doubles it again (up to the radius).
//! - Strides: the same jump between a stream's last three faults (Leap's
//!   majority vote, here unanimous) prefetches along the stride.

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
/// Deepest window, in radii.
const MAX_WINDOW_RADII: u64 = 8;
/// Smallest window a new stream starts with, as a fraction of the radius.
const MIN_INITIAL_DIVISOR: u64 = 16;

/// Which prepager.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum PrepagerKind {
    /// The paper's bubbling: one pivot, a fixed bubble of the radius each
    /// way around it.
    Paper,
    /// pagewire's: streams, directions, windows grown by hits and shrunk
    /// by misses, strides (see the module documentation).
    #[default]
    Adaptive,
}

/// Faults of one stream, and its bubble.
#[derive(Debug)]
struct Stream {
    last: u64,
    /// +1 forward, -1 backward, 0 unknown.
    dir: i8,
    /// The last deltas between its faults, newest first.
    deltas: [i64; 3],
    /// Pages its bubbles reach each way (or ahead, doubled, with a
    /// direction).
    window: u64,
    /// Faults that continued it.
    continued: u64,
    bubble: Bubble,
}

impl Stream {
    /// Whether its bubbles have shown they pay: it walks one way, strides,
    /// or its window grew past the radius (the guest ran through a bubble).
    fn confident(&self, radius: u64) -> bool {
        self.dir != 0 || self.bubble.stride != 0 || self.window > radius
    }
}

/// Streams and the window new ones start with.
#[derive(Debug)]
struct Streams {
    /// Most recent first.
    list: Vec<Stream>,
    initial: u64,
}

/// The bubbles around recent faults, shared by the fault handler (which
/// moves the pivots) and the pusher lanes (which take runs from them).
#[derive(Debug)]
pub struct Prepager {
    radius: u64,
    kind: PrepagerKind,
    streams: Mutex<Streams>,
    wake_tx: Sender<()>,
    wake_rx: Receiver<()>,
}

impl Prepager {
    /// An adaptive prepager whose bubbles start `radius` pages each way;
    /// 0 disables it.
    pub fn new(radius: u64) -> Self {
        Self::with_kind(radius, PrepagerKind::Adaptive)
    }

    /// A prepager of `kind` with bubbles of `radius` pages each way; 0
    /// disables it.
    pub fn with_kind(radius: u64, kind: PrepagerKind) -> Self {
        let (wake_tx, wake_rx) = channel::bounded(1);
        Self {
            radius,
            kind,
            streams: Mutex::new(Streams {
                list: Vec::with_capacity(MAX_STREAMS),
                initial: radius,
            }),
            wake_tx,
            wake_rx,
        }
    }

    /// The window new streams start with now (the radius, for the
    /// paper's scheme).
    pub fn initial_window(&self) -> u64 {
        self.lock().initial
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Streams> {
        // The bubbles are plain data; a panic elsewhere cannot leave them
        // torn in a way that matters (worst case a run is skipped and
        // swept later).
        self.streams.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Moves the pivot to `page` (a fault just happened there), bounded by
    /// the page's region, and wakes an idle lane. `missing`: the page was
    /// not being fetched yet. A fault on a page in flight says the bubble
    /// was right but late (it waits at the edge of each request in
    /// flight), so it moves the bubble but is no evidence of a stride.
    ///
    /// `states` tells whether the pages between a stream's faults are
    /// still missing: a stride skips them, a walk that outran the fetches
    /// (its faults as evenly spaced as the requests in flight) does not.
    pub fn on_fault(&self, page: u64, layout: &MemoryLayout, states: &PageStateMap, missing: bool) {
        if self.radius == 0 {
            return;
        }
        let Some(region) = layout.region_of(page) else {
            return;
        };
        let pages = layout.region_pages(region);
        let r = self.radius;
        let mut guard = self.lock();
        let st = &mut *guard;
        if self.kind == PrepagerKind::Paper {
            // One pivot, the same bubble every time.
            st.list.clear();
            st.list.push(Stream {
                last: page,
                dir: 0,
                deltas: [0; 3],
                window: r,
                continued: 0,
                bubble: Bubble {
                    fwd: page + 1,
                    fwd_end: (page + 1 + r).min(pages.end),
                    bwd: page,
                    bwd_end: page.saturating_sub(r).max(pages.start),
                    forward_next: true,
                    stride: 0,
                    left: 0,
                },
            });
            drop(guard);
            let _ = self.wake_tx.try_send(());
            return;
        }
        // The stream this fault continues, if any: one whose last fault is
        // near (for its window), in the same region.
        let near = st
            .list
            .iter()
            .position(|s| s.last.abs_diff(page) <= 4 * r.max(s.window) && pages.contains(&s.last));
        let mut stream = match near {
            Some(i) => st.list.remove(i),
            None => {
                // Streams dropped without one fault continuing them: their
                // bubbles went untouched. New streams start smaller.
                while st.list.len() >= MAX_STREAMS {
                    if let Some(old) = st.list.pop() {
                        if old.continued == 0 {
                            st.initial = (st.initial / 2).max((r / MIN_INITIAL_DIVISOR).max(1));
                        }
                    }
                }
                Stream {
                    last: page,
                    dir: 0,
                    deltas: [0; 3],
                    window: st.initial,
                    continued: 0,
                    bubble: Bubble::default(),
                }
            }
        };
        let dir = match page.cmp(&stream.last) {
            std::cmp::Ordering::Greater => 1,
            std::cmp::Ordering::Less => -1,
            std::cmp::Ordering::Equal => 0,
        };
        // Whether this fault ran past the stream's last bubble (below).
        let mut ran_through = false;
        if near.is_some() {
            if stream.continued == 0 {
                // A stream goes on: new ones may start bigger again.
                st.initial = (st.initial * 2).min(r);
            }
            stream.continued += 1;
            let b = &stream.bubble;
            if dir != 0 && dir == stream.dir && b.stride == 0 {
                // Just past the far edge of the last bubble: the guest ran
                // through all of it, every page a hit. Deepen. (A fault far
                // past it is a jump, maybe a stride, not a walk.)
                let slack = (stream.window / 8).max(1);
                let past = if dir > 0 {
                    page >= b.fwd_end && page < b.fwd_end + slack
                } else {
                    page < b.bwd_end && page + slack >= b.bwd_end
                };
                if past {
                    stream.window = (stream.window * 2).min(MAX_WINDOW_RADII * r);
                    ran_through = true;
                }
            } else if dir != 0 && stream.dir != 0 && dir != stream.dir {
                // Turned back: the bubble ahead was partly wasted.
                stream.window = (stream.window / 2).max((r / MIN_INITIAL_DIVISOR).max(1));
            }
        }
        let w = stream.window;
        // Two faults the same way in a row: the stream has a direction.
        let (ahead, behind) = if dir != 0 && dir == stream.dir {
            if dir > 0 {
                (2 * w, 0)
            } else {
                (0, 2 * w)
            }
        } else {
            (w, w)
        };
        let delta = page as i64 - stream.last as i64;
        // A walk through a bubble jumps by the bubble's depth each time:
        // not a stride.
        if ran_through {
            stream.deltas = [0; 3];
        } else if missing {
            stream.deltas = [delta, stream.deltas[0], stream.deltas[1]];
        }
        stream.dir = dir;
        stream.last = page;
        // The same jump three times (Leap's majority vote over recent
        // deltas, here unanimous): a strided walk. Prefetch along it,
        // twice the radius deep; a stride of one is the contiguous case.
        let d = stream.deltas[0];
        let skipped = [d / 4, d / 2, 3 * d / 4]
            .iter()
            .any(|&back| back != 0 && states.is_missing((page as i64 - back) as u64));
        stream.bubble = if d.abs() >= 2 && skipped && stream.deltas.iter().all(|&x| x == d) {
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
        st.list.insert(0, stream);
        drop(guard);
        let _ = self.wake_tx.try_send(());
    }

    /// Claims the next run of at most `max` missing pages from the
    /// bubbles, the most recent stream's first, or `None` when all are
    /// spent. With `confident_only`, only from bubbles that have shown
    /// they pay (see [`Self::has_open_bubble`]).
    pub fn next_run(
        &self,
        states: &PageStateMap,
        max: u64,
        confident_only: bool,
    ) -> Option<PageRange> {
        if self.radius == 0 || max == 0 {
            return None;
        }
        let mut streams = self.lock();
        streams
            .list
            .iter_mut()
            .filter(|s| self.counts(s, confident_only))
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

    /// Whether some bubble still has pages to consider; with
    /// `confident_only`, a bubble that has shown it pays: its stream walks
    /// one way, strides, or ran through a bubble before (the paper's
    /// bubbles always count). The others, around faults with no pattern
    /// yet, come after the blocks the guest faults in most.
    pub fn has_open_bubble(&self, confident_only: bool) -> bool {
        self.radius > 0
            && self
                .lock()
                .list
                .iter()
                .any(|s| s.bubble.open() && self.counts(s, confident_only))
    }

    /// Whether `stream`'s bubble counts: any does unless `confident_only`;
    /// then one that has shown it pays (the paper's bubbles always count).
    fn counts(&self, stream: &Stream, confident_only: bool) -> bool {
        !confident_only || self.kind == PrepagerKind::Paper || stream.confident(self.radius)
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
        std::iter::from_fn(|| p.next_run(s, max, false))
            .map(|r| (r.first, r.count))
            .collect()
    }

    #[test]
    fn bubbles_expand_forward_and_backward_from_the_pivot() {
        let layout = MemoryLayout::single(100 * 4096).unwrap();
        let s = PageStateMap::new(100);
        let p = Prepager::new(3);
        assert_eq!(p.next_run(&s, 1, false), None, "no fault, no bubble");
        assert_eq!(s.try_claim(50), crate::state::Claim::Won); // the fault's own page
        p.on_fault(50, &layout, &s, true);
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
        p.on_fault(10, &layout, &s, true);
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
        p.on_fault(10, &layout, &s, true);
        assert_eq!(p.next_run(&s, 2, false), Some(PageRange::new(11, 2)));
        p.on_fault(500, &layout, &s, true);
        assert_eq!(p.next_run(&s, 2, false), Some(PageRange::new(501, 2)));
        assert_eq!(p.next_run(&s, 2, false), Some(PageRange::new(498, 2)));
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
        p.on_fault(4, &layout, &s, true);
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
        p.on_fault(100, &layout, &s, true);
        p.on_fault(5000, &layout, &s, true);
        assert_eq!(p.next_run(&s, 8, false), Some(PageRange::new(5001, 4)));
        assert_eq!(p.next_run(&s, 8, false), Some(PageRange::new(4996, 4)));
        // The other stream's bubble is still there.
        assert_eq!(p.next_run(&s, 8, false), Some(PageRange::new(101, 4)));
        // The first stream moves forward twice: a forward-only bubble of
        // twice the radius.
        p.on_fault(106, &layout, &s, true);
        p.on_fault(108, &layout, &s, true);
        assert_eq!(drain(&p, &s, 16), vec![(109, 8)]);
    }

    #[test]
    fn a_strided_walk_gets_a_strided_bubble() {
        let layout = MemoryLayout::single(10_000 * 4096).unwrap();
        let s = PageStateMap::new(10_000);
        let p = Prepager::new(4);
        for f in [100, 116, 132, 148] {
            assert_eq!(s.try_claim(f), crate::state::Claim::Won);
            p.on_fault(f, &layout, &s, true);
        }
        // Three jumps of 16: the next 8 pages along the stride, one each.
        let runs = drain(&p, &s, 8);
        assert_eq!(runs, (1..=8).map(|k| (148 + 16 * k, 1)).collect::<Vec<_>>());
        // Backwards too, and never below the region.
        let p = Prepager::new(4);
        for f in [1060u64, 1056, 1052, 1048] {
            let _ = s.try_claim(f);
            p.on_fault(f, &layout, &s, true);
        }
        let runs = drain(&p, &s, 8);
        assert_eq!(runs, (1..=8).map(|k| (1048 - 4 * k, 1)).collect::<Vec<_>>());
        let p = Prepager::new(4);
        for f in [12u64, 8, 4, 0] {
            let _ = s.try_claim(f);
            p.on_fault(f, &layout, &s, true);
        }
        assert_eq!(drain(&p, &s, 8), vec![]);
        // A stride of one is the contiguous bubble.
        let p = Prepager::new(2);
        for f in [500u64, 501, 502, 503] {
            let _ = s.try_claim(f);
            p.on_fault(f, &layout, &s, true);
        }
        assert_eq!(drain(&p, &s, 8), vec![(504, 4)]);
    }

    #[test]
    fn a_stream_running_through_its_bubbles_deepens_them() {
        let layout = MemoryLayout::single(100_000 * 4096).unwrap();
        let s = PageStateMap::new(100_000);
        let p = Prepager::new(4);
        // A guest walking forward, faulting just past each bubble (it ran
        // through every prefetched page): the window doubles up to 8 radii.
        let mut page = 1000u64;
        let mut depths = Vec::new();
        for _ in 0..8 {
            let _ = s.try_claim(page);
            p.on_fault(page, &layout, &s, true);
            let runs = drain(&p, &s, 1000);
            let end = runs.iter().map(|&(f, c)| f + u64::from(c)).max().unwrap();
            depths.push(end - page - 1);
            page = end; // the next fault: the first page past the bubble
        }
        // (The second fault gives the stream its direction: a forward
        // bubble of twice the window, 8, from the third on.)
        assert_eq!(depths, vec![4, 4, 16, 32, 64, 64, 64, 64], "{depths:?}");
        // Turning back halves it.
        assert_eq!(p.lock().list[0].window, 32);
        let _ = s.try_claim(page - 100);
        p.on_fault(page - 100, &layout, &s, true);
        assert_eq!(p.lock().list[0].window, 16);
    }

    #[test]
    fn untouched_bubbles_shrink_what_new_streams_start_with() {
        let layout = MemoryLayout::single(1_000_000 * 4096).unwrap();
        let p = Prepager::new(64);
        let s = PageStateMap::new(1_000_000);
        assert_eq!(p.initial_window(), 64);
        // Random faults, far apart: every stream is dropped unfollowed.
        for k in 0..40u64 {
            p.on_fault(k * 10_007 % 1_000_000, &layout, &s, true);
        }
        assert_eq!(p.initial_window(), 4, "down to 1/16 of the radius");
        // A stream that goes on: new streams start bigger again.
        p.on_fault(500_000, &layout, &s, true);
        p.on_fault(500_003, &layout, &s, true);
        assert_eq!(p.initial_window(), 8);
    }

    #[test]
    fn waits_on_pages_in_flight_are_no_stride() {
        let layout = MemoryLayout::single(10_000 * 4096).unwrap();
        let s = PageStateMap::new(10_000);
        let p = Prepager::new(4);
        // A sequential guest waiting at the first page of each request in
        // flight (every 8 pages): the bubble stays contiguous.
        for f in [100u64, 108, 116, 124] {
            let _ = s.try_claim(f);
            p.on_fault(f, &layout, &s, f == 100);
        }
        assert_eq!(drain(&p, &s, 16), vec![(125, 8)]);
    }

    #[test]
    fn evenly_spaced_faults_over_fetched_pages_are_no_stride() {
        let layout = MemoryLayout::single(10_000 * 4096).unwrap();
        let s = PageStateMap::new(10_000);
        let p = Prepager::new(4);
        // A walk outrunning the fetches: it faults every 8 pages, but the
        // pages between were fetched (claimed) already.
        for f in [100u64, 108, 116, 124] {
            assert_eq!(s.claim_up(f, 8, 10_000), 8);
            p.on_fault(f, &layout, &s, true);
        }
        // A contiguous bubble (8 ahead, the pages already claimed count),
        // not single pages every 8.
        assert_eq!(drain(&p, &s, 16), vec![(132, 1)]);
    }

    #[test]
    fn the_papers_scheme_keeps_one_fixed_bubble() {
        let layout = MemoryLayout::single(10_000 * 4096).unwrap();
        let s = PageStateMap::new(10_000);
        let p = Prepager::with_kind(4, PrepagerKind::Paper);
        // A second fault replaces the first pivot's bubble.
        p.on_fault(100, &layout, &s, true);
        p.on_fault(5000, &layout, &s, true);
        assert_eq!(drain(&p, &s, 8), vec![(5001, 4), (4996, 4)]);
        // No direction, no stride, no growth: always 4 each way.
        for f in [6000u64, 6016, 6032, 6048] {
            let _ = s.try_claim(f);
            p.on_fault(f, &layout, &s, true);
        }
        assert_eq!(drain(&p, &s, 8), vec![(6049, 4), (6044, 4)]);
    }

    #[test]
    fn radius_zero_disables_bubbling() {
        let layout = MemoryLayout::single(10 * 4096).unwrap();
        let s = PageStateMap::new(10);
        let p = Prepager::new(0);
        p.on_fault(5, &layout, &s, true);
        assert_eq!(p.next_run(&s, 4, false), None);
    }
}
