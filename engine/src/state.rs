//! The page state map: one atomic state per page, the single source of
//! truth that faults, bubbles and the pusher all consult.
//!
//! A page goes `Missing → Claimed → Present`, never back. Whoever moves it
//! from `Missing` to `Claimed` is the only one that fetches and installs
//! it; everyone else waits for it or skips it.

use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};

use pagewire_transport::{MemoryLayout, PageRange};

const MISSING: u8 = 0;
const CLAIMED: u8 = 1;
const PRESENT: u8 = 2;

/// Who installed a page; kept for the report (prepaged hits and so on).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum PageOrigin {
    /// Not installed yet.
    None = 0,
    /// Fetched because a vCPU faulted on it.
    Fault = 1,
    /// Prepaged by a bubble around the last fault.
    Bubble = 2,
    /// Sent by the background sweep.
    Push = 3,
    /// Dropped by the memory's owner (a balloon's `MADV_DONTNEED`) before
    /// or while it was fetched: never installed from the source, a touch
    /// maps a zero page.
    Removed = 4,
    /// Copied while the guest still ran at the source (pre-copy) and not
    /// written there since.
    Precopy = 5,
}

impl PageOrigin {
    fn from_u8(v: u8) -> Self {
        match v {
            1 => Self::Fault,
            2 => Self::Bubble,
            3 => Self::Push,
            4 => Self::Removed,
            5 => Self::Precopy,
            _ => Self::None,
        }
    }
}

/// What a removal found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Removal {
    /// The page was missing; it is now settled without a fetch.
    WasMissing,
    /// Someone is fetching it; their install must skip it.
    WasClaimed,
    /// It was installed; the kernel dropped it, a touch maps zeros.
    WasPresent,
}

/// Result of trying to claim one page.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Claim {
    /// The caller owns the page now and must install it.
    Won,
    /// Someone else is fetching it.
    InFlight,
    /// It is already installed.
    Present,
}

/// One atomic state (and origin) per page, plus a count of present pages.
#[derive(Debug)]
pub struct PageStateMap {
    states: Box<[AtomicU8]>,
    origins: Box<[AtomicU8]>,
    present: AtomicU64,
}

impl PageStateMap {
    /// A map of `pages` missing pages.
    pub fn new(pages: u64) -> Self {
        let make = || (0..pages).map(|_| AtomicU8::new(MISSING)).collect();
        Self {
            states: make(),
            origins: make(),
            present: AtomicU64::new(0),
        }
    }

    /// Number of pages.
    pub fn len(&self) -> u64 {
        self.states.len() as u64
    }

    /// Whether the map has no pages.
    pub fn is_empty(&self) -> bool {
        self.states.is_empty()
    }

    /// Tries to claim `page`. Out-of-range pages read as present.
    pub fn try_claim(&self, page: u64) -> Claim {
        let Some(s) = self.states.get(page as usize) else {
            return Claim::Present;
        };
        match s.compare_exchange(MISSING, CLAIMED, Ordering::AcqRel, Ordering::Acquire) {
            Ok(_) => Claim::Won,
            Err(CLAIMED) => Claim::InFlight,
            Err(_) => Claim::Present,
        }
    }

    /// Whether `page` is still missing (a hint: it may change at once).
    pub fn is_missing(&self, page: u64) -> bool {
        self.states
            .get(page as usize)
            .is_some_and(|s| s.load(Ordering::Acquire) == MISSING)
    }

    /// Whether `page` is installed.
    pub fn is_present(&self, page: u64) -> bool {
        self.states
            .get(page as usize)
            .is_none_or(|s| s.load(Ordering::Acquire) == PRESENT)
    }

    /// Claims up to `max` pages upwards from `start`, stopping at the first
    /// page that is not missing or at `limit`. Returns how many it claimed.
    pub fn claim_up(&self, start: u64, max: u64, limit: u64) -> u64 {
        let mut n = 0;
        while n < max && start + n < limit && self.try_claim(start + n) == Claim::Won {
            n += 1;
        }
        n
    }

    /// Claims the missing pages of `*at..end`, at most `max`, as runs
    /// that never cross a region of `layout`, appended to `runs`; `*at`
    /// moves past what was looked at. Returns how many it claimed.
    pub fn claim_runs(
        &self,
        layout: &MemoryLayout,
        at: &mut u64,
        end: u64,
        max: u64,
        runs: &mut Vec<PageRange>,
    ) -> u64 {
        let mut claimed = 0;
        while claimed < max && *at < end {
            let Some(region) = layout.region_of(*at) else {
                *at = end;
                break;
            };
            let limit = end.min(layout.region_pages(region).end);
            let n = self.claim_up(*at, (max - claimed).min(limit - *at), limit);
            if n > 0 {
                // At most `max` pages, which callers keep within a u32.
                runs.push(PageRange::new(*at, n as u32));
                claimed += n;
            }
            *at += n.max(1);
        }
        claimed
    }

    /// Claims up to `max` pages downwards from `end - 1`, stopping at the
    /// first page that is not missing or below `limit`. Returns how many it
    /// claimed: the run is `end - n .. end`.
    pub fn claim_down(&self, end: u64, max: u64, limit: u64) -> u64 {
        let mut n = 0;
        while n < max && end > limit + n && self.try_claim(end - 1 - n) == Claim::Won {
            n += 1;
        }
        n
    }

    /// Marks claimed pages `first..first + count` installed by `origin`.
    /// Call only after the pages are mapped, so that whoever sees
    /// `Present` may rely on it.
    pub fn mark_present(&self, first: u64, count: u64, origin: PageOrigin) {
        for p in first..first + count {
            self.origins[p as usize].store(origin as u8, Ordering::Relaxed);
            let prev = self.states[p as usize].swap(PRESENT, Ordering::AcqRel);
            debug_assert_eq!(prev, CLAIMED, "page {p} marked present without a claim");
        }
        self.present.fetch_add(count, Ordering::AcqRel);
    }

    /// Marks `page`, still missing, present from the start: its bytes were
    /// written before the memory was handed to the engine (pre-copy).
    /// Returns whether it was missing.
    pub fn preset_present(&self, page: u64, origin: PageOrigin) -> bool {
        let Some(s) = self.states.get(page as usize) else {
            return false;
        };
        if s.compare_exchange(MISSING, PRESENT, Ordering::AcqRel, Ordering::Acquire)
            .is_err()
        {
            return false;
        }
        self.origins[page as usize].store(origin as u8, Ordering::Relaxed);
        self.present.fetch_add(1, Ordering::AcqRel);
        true
    }

    /// The owner of the memory dropped `page` (UFFD_EVENT_REMOVE): it must
    /// never be installed from the source again.
    pub fn remove(&self, page: u64) -> Removal {
        let Some(s) = self.states.get(page as usize) else {
            return Removal::WasPresent;
        };
        loop {
            match s.load(Ordering::Acquire) {
                MISSING => {
                    self.origins[page as usize].store(PageOrigin::Removed as u8, Ordering::Relaxed);
                    if s.compare_exchange(MISSING, PRESENT, Ordering::AcqRel, Ordering::Acquire)
                        .is_ok()
                    {
                        self.present.fetch_add(1, Ordering::AcqRel);
                        return Removal::WasMissing;
                    }
                }
                CLAIMED => {
                    self.origins[page as usize].store(PageOrigin::Removed as u8, Ordering::Release);
                    // Claimed still: its installer will see the mark. If it
                    // turned present meanwhile, it was installed first.
                    if s.load(Ordering::Acquire) == CLAIMED {
                        return Removal::WasClaimed;
                    }
                    return Removal::WasPresent;
                }
                _ => return Removal::WasPresent,
            }
        }
    }

    /// Whether a claimed `page` was removed while it was being fetched.
    pub fn removed_while_claimed(&self, page: u64) -> bool {
        self.origins
            .get(page as usize)
            .is_some_and(|o| o.load(Ordering::Acquire) == PageOrigin::Removed as u8)
    }

    /// Releases every claim (their fetchers are gone): claimed pages go
    /// back to missing, or are settled if their owner removed them
    /// meanwhile. Returns (pages released to missing, pages settled as
    /// removed, which must be mapped with zeros to wake their threads).
    pub fn release_claimed(&self) -> (Vec<u64>, Vec<u64>) {
        let mut released = Vec::new();
        let mut settled = Vec::new();
        for (p, s) in self.states.iter().enumerate() {
            if s.load(Ordering::Acquire) != CLAIMED {
                continue;
            }
            if self.origins[p].load(Ordering::Acquire) == PageOrigin::Removed as u8 {
                s.store(PRESENT, Ordering::Release);
                self.present.fetch_add(1, Ordering::AcqRel);
                settled.push(p as u64);
            } else {
                s.store(MISSING, Ordering::Release);
                released.push(p as u64);
            }
        }
        (released, settled)
    }

    /// Who installed `page`.
    pub fn origin(&self, page: u64) -> PageOrigin {
        self.origins
            .get(page as usize)
            .map_or(PageOrigin::None, |o| {
                PageOrigin::from_u8(o.load(Ordering::Relaxed))
            })
    }

    /// Number of installed pages.
    pub fn present(&self) -> u64 {
        self.present.load(Ordering::Acquire)
    }

    /// Whether every page is installed.
    pub fn all_present(&self) -> bool {
        self.present() == self.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn a_page_is_claimed_once() {
        let m = PageStateMap::new(4);
        assert_eq!(m.try_claim(1), Claim::Won);
        assert_eq!(m.try_claim(1), Claim::InFlight);
        m.mark_present(1, 1, PageOrigin::Fault);
        assert_eq!(m.try_claim(1), Claim::Present);
        assert_eq!(m.origin(1), PageOrigin::Fault);
        assert_eq!(m.try_claim(99), Claim::Present);
        assert_eq!(m.present(), 1);
    }

    #[test]
    fn runs_stop_at_claimed_pages_and_limits() {
        let m = PageStateMap::new(10);
        assert_eq!(m.try_claim(5), Claim::Won);
        assert_eq!(m.claim_up(2, 8, 10), 3); // 2,3,4
        assert_eq!(m.claim_down(9, 8, 0), 3); // 8,7,6
        assert_eq!(m.claim_down(2, 8, 1), 1); // 1, stops at limit
        assert_eq!(m.claim_up(9, 8, 10), 1);
        assert_eq!(m.claim_up(0, 0, 10), 0);
    }

    /// Many threads race to claim every page, in different orders; each
    /// page must be won exactly once.
    #[test]
    fn contention_claims_each_page_exactly_once() {
        const PAGES: u64 = 20_000;
        for seed in [1u64, 7, 42] {
            let m = Arc::new(PageStateMap::new(PAGES));
            let wins: Vec<_> = (0..8u64)
                .map(|t| {
                    let m = m.clone();
                    std::thread::spawn(move || {
                        let mut won = Vec::new();
                        // A per-thread permutation: stride coprime with PAGES.
                        let stride = [1u64, 3, 7, 9, 11, 13, 17, 19][t as usize];
                        let off = seed * 131 + t * 977;
                        for i in 0..PAGES {
                            let p = (off + i * stride) % PAGES;
                            if t % 2 == 0 {
                                if m.try_claim(p) == Claim::Won {
                                    won.push(p);
                                }
                            } else {
                                let n = m.claim_up(p, 4, PAGES);
                                won.extend(p..p + n);
                            }
                        }
                        won
                    })
                })
                .map(|h| h.join().unwrap())
                .collect();
            let mut all: Vec<u64> = wins.into_iter().flatten().collect();
            all.sort_unstable();
            assert_eq!(
                all.len() as u64,
                PAGES,
                "seed {seed}: pages claimed twice or lost"
            );
            all.dedup();
            assert_eq!(
                all.len() as u64,
                PAGES,
                "seed {seed}: a page was claimed twice"
            );
        }
    }
}
