//! Where the guest faults: fault counts per block of guest memory, so the
//! background sweep pushes the blocks the guest is using first.
//!
//! The paper's sweep walks memory in address order; QEMU restarts it at
//! each faulted page. Both spend the link on pages far from where the
//! guest works while faults keep landing in a few busy regions (a heap, a
//! hot set). Here every fault warms its block; the sweep takes the hottest
//! block that still has missing pages, whole, before anything colder, and
//! walks memory in address order only when no block with faults is left.
//! Bubbles of streams that have shown a pattern come first; bubbles around
//! faults with no pattern yet come after the hot blocks.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering};
use std::sync::Mutex;

use pagewire_transport::{MemoryLayout, PageRange};

use crate::state::PageStateMap;

/// Pages per block: 512 KiB of 4 KiB pages, about 4 ms of a 1 Gbit/s link.
pub const BLOCK_PAGES: u64 = 128;

/// Fault counts per block and the queue of blocks to push, hottest first.
#[derive(Debug)]
pub(crate) struct HeatMap {
    counts: Box<[AtomicU32]>,
    /// Blocks the sweep has finished (no missing page left when it looked).
    done: Box<[AtomicBool]>,
    queue: Mutex<Queue>,
    /// Blocks with faults the sweep has not finished.
    live: AtomicUsize,
    pages: u64,
}

#[derive(Debug, Default)]
struct Queue {
    /// (faults when queued, block); a block is queued again each time its
    /// count reaches a power of two, so stale entries are bounded.
    heap: BinaryHeap<(u32, Reverse<u64>)>,
    /// The block being pushed and the next page in it to look at.
    current: Option<(u64, u64)>,
}

impl HeatMap {
    /// No faults yet over `pages` pages.
    pub fn new(pages: u64) -> Self {
        let blocks = pages.div_ceil(BLOCK_PAGES) as usize;
        Self {
            counts: (0..blocks).map(|_| AtomicU32::new(0)).collect(),
            done: (0..blocks).map(|_| AtomicBool::new(false)).collect(),
            queue: Mutex::new(Queue::default()),
            live: AtomicUsize::new(0),
            pages,
        }
    }

    /// A fault on `page`: its block gets warmer.
    pub fn on_fault(&self, page: u64) {
        let b = page / BLOCK_PAGES;
        let (Some(count), Some(done)) = (self.counts.get(b as usize), self.done.get(b as usize))
        else {
            return;
        };
        if done.load(Ordering::Relaxed) {
            return;
        }
        let n = count.fetch_add(1, Ordering::Relaxed).saturating_add(1);
        if n == 1 {
            self.live.fetch_add(1, Ordering::AcqRel);
        }
        if n.is_power_of_two() {
            self.queue().heap.push((n, Reverse(b)));
        }
    }

    /// Whether some block with faults may still have missing pages.
    pub fn pending(&self) -> bool {
        self.live.load(Ordering::Acquire) > 0
    }

    fn queue(&self) -> std::sync::MutexGuard<'_, Queue> {
        // The queue is only ever left consistent (pushes and pops), so a
        // panic elsewhere while holding it leaves nothing half-done.
        self.queue.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Claims up to `max` missing pages of the hottest unfinished blocks
    /// as runs (never across a region boundary). Returns false when no
    /// block with faults has missing pages left.
    pub fn next_runs(
        &self,
        states: &PageStateMap,
        layout: &MemoryLayout,
        max: u64,
        runs: &mut Vec<PageRange>,
    ) -> bool {
        let mut q = self.queue();
        let mut left = max.max(1);
        while left > 0 {
            let (block, mut at) = match q.current {
                Some(c) => c,
                None => {
                    let Some((_, Reverse(b))) = q.heap.pop() else {
                        break;
                    };
                    if self.done[b as usize].load(Ordering::Relaxed) {
                        continue;
                    }
                    (b, b * BLOCK_PAGES)
                }
            };
            let end = ((block + 1) * BLOCK_PAGES).min(self.pages);
            left -= states.claim_runs(layout, &mut at, end, left, runs);
            if at >= end {
                if !self.done[block as usize].swap(true, Ordering::Relaxed) {
                    self.live.fetch_sub(1, Ordering::AcqRel);
                }
                q.current = None;
            } else {
                q.current = Some((block, at));
            }
        }
        !runs.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::Claim;

    fn layout(pages: u64) -> MemoryLayout {
        MemoryLayout::single(pages * 4096).unwrap()
    }

    #[test]
    fn the_hottest_block_is_pushed_first_and_whole() {
        let pages = 8 * BLOCK_PAGES;
        let (states, l) = (PageStateMap::new(pages), layout(pages));
        let heat = HeatMap::new(pages);
        let mut runs = Vec::new();
        assert!(!heat.next_runs(&states, &l, 16, &mut runs), "no faults yet");
        // Block 5 faults three times, block 2 once.
        let b5 = 5 * BLOCK_PAGES;
        for p in [b5 + 3, 2 * BLOCK_PAGES + 7, b5 + 40, b5 + 90] {
            assert_eq!(states.try_claim(p), Claim::Won);
            heat.on_fault(p);
        }
        let mut got = Vec::new();
        while heat.next_runs(&states, &l, 16, &mut runs) {
            got.append(&mut runs);
        }
        let claimed: Vec<u64> = got.iter().flat_map(|r| r.first..r.end()).collect();
        // Block 5 first (every page but the faulted ones), then block 2.
        let want: Vec<u64> = (b5..b5 + BLOCK_PAGES)
            .filter(|p| ![b5 + 3, b5 + 40, b5 + 90].contains(p))
            .chain((2 * BLOCK_PAGES..3 * BLOCK_PAGES).filter(|&p| p != 2 * BLOCK_PAGES + 7))
            .collect();
        assert_eq!(claimed, want);
        assert!(got.iter().all(|r| r.count <= 16));
        // Finished blocks take no more heat; other blocks are untouched.
        heat.on_fault(b5 + 1);
        assert!(!heat.next_runs(&states, &l, 16, &mut runs));
        assert!(states.is_missing(0) && states.is_missing(7 * BLOCK_PAGES));
    }

    #[test]
    fn blocks_never_cross_regions_or_the_end() {
        let l = MemoryLayout::new(
            4096,
            vec![
                pagewire_transport::RegionInfo {
                    guest_base: 0,
                    len: 100 * 4096,
                },
                pagewire_transport::RegionInfo {
                    guest_base: 1 << 30,
                    len: 100 * 4096,
                },
            ],
        )
        .unwrap();
        let states = PageStateMap::new(200);
        let heat = HeatMap::new(200);
        heat.on_fault(99);
        heat.on_fault(150);
        heat.on_fault(150);
        let mut runs = Vec::new();
        let mut all = Vec::new();
        while heat.next_runs(&states, &l, 1000, &mut runs) {
            all.append(&mut runs);
        }
        // Block 1 (pages 128..200) is hotter; block 0 spans both regions.
        assert_eq!(
            all,
            vec![
                PageRange::new(128, 72),
                PageRange::new(0, 100),
                PageRange::new(100, 28)
            ]
        );
        heat.on_fault(10_000);
    }
}
