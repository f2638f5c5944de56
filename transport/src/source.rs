//! The source's guest memory as the transports serve it.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use crate::dirty::{DirtyError, DirtyLog, DirtyRounds, PageSet};
use crate::error::LayoutError;
use crate::layout::{MemoryLayout, PageRange, SourceInfo, ZeroMap};
use crate::wire::SourceStats;

/// Bytes of one guest region, kept alive as long as the source serves it.
pub type RegionBytes = Arc<dyn AsRef<[u8]> + Send + Sync>;

/// Checksum of one page's bytes, as both ends compute it for verification.
pub fn page_checksum(page: &[u8]) -> u64 {
    xxhash_rust::xxh3::xxh3_64(page)
}

/// The source's guest memory: one byte slice per region, the zero-page map
/// and the data-path counters.
///
/// Post-copy serves memory that no longer changes: the VM stopped running
/// at the source. A hybrid migration serves it while the guest still runs
/// (pre-copy); the guest's writes are then tracked by a [`DirtyLog`]
/// (see [`SourceMemory::with_dirty_log`]). The page server only hands the
/// pages to the kernel (socket sends, RDMA), which copies whatever a page
/// holds at that moment, racing the guest's writes as every VMM's
/// migration thread does; a page written meanwhile is tracked and sent
/// again. Checksums are only taken after the guest is paused.
pub struct SourceMemory {
    info: SourceInfo,
    regions: Vec<RegionBytes>,
    dirty: Option<DirtyRounds>,
    requests: AtomicU64,
    pages: AtomicU64,
}

impl std::fmt::Debug for SourceMemory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SourceMemory")
            .field("layout", &self.info.layout)
            .field("zero_pages", &self.info.zero.count())
            .finish()
    }
}

impl SourceMemory {
    /// Wraps region bytes laid out as `layout`, and scans them for zero pages.
    pub fn new(layout: MemoryLayout, regions: Vec<RegionBytes>) -> Result<Self, LayoutError> {
        if regions.len() != layout.regions().len() {
            return Err(LayoutError::RegionCount(regions.len()));
        }
        for (i, (r, info)) in regions.iter().zip(layout.regions()).enumerate() {
            if (*r).as_ref().as_ref().len() as u64 != info.len {
                return Err(LayoutError::Misaligned { region: i });
            }
        }
        let ps = layout.page_size();
        let mut zero = ZeroMap::new(layout.total_pages());
        for (i, r) in regions.iter().enumerate() {
            let base = layout.region_pages(i).start;
            for (j, page) in (*r).as_ref().as_ref().chunks_exact(ps).enumerate() {
                if is_zero(page) {
                    zero.set(base + j as u64);
                }
            }
        }
        Ok(Self {
            info: SourceInfo { layout, zero },
            regions,
            dirty: None,
            requests: AtomicU64::new(0),
            pages: AtomicU64::new(0),
        })
    }

    /// Serves pre-copy rounds from `log`, which must have been tracking
    /// writes since before this memory was scanned for zero pages.
    pub fn with_dirty_log(mut self, log: Arc<dyn DirtyLog>) -> Self {
        self.dirty = Some(DirtyRounds::new(log));
        self
    }

    /// Pages written since pre-copy round `round - 1` (see
    /// [`DirtyRounds::round`]); `pause` pauses the guest first.
    pub fn dirty_round(&self, round: u32, pause: bool) -> Result<PageSet, DirtyError> {
        match &self.dirty {
            Some(d) => d.round(round, pause),
            None => Err(DirtyError::Unsupported),
        }
    }

    /// Layout and the zero map as scanned when this memory was wrapped.
    pub fn info(&self) -> &SourceInfo {
        &self.info
    }

    /// Layout and zero map as sent in a handshake now: pages a pre-copy
    /// round found written are no longer taken for zero (a destination
    /// that comes after the switch-over migrates the paused memory as it
    /// is, and must never map zeros over what the guest wrote).
    pub fn handshake_info(&self) -> SourceInfo {
        let mut info = self.info.clone();
        if let Some(written) = self.dirty.as_ref().and_then(DirtyRounds::written) {
            for p in written.iter() {
                info.zero.clear(p);
            }
        }
        info
    }

    /// The bytes of region `i`.
    pub fn region(&self, i: usize) -> &[u8] {
        (*self.regions[i]).as_ref()
    }

    /// The bytes of a range, after checking it against the layout.
    pub fn pages(&self, range: PageRange) -> Result<&[u8], LayoutError> {
        let (region, off) = self.info.layout.locate(range)?;
        let len = range.count as usize * self.info.layout.page_size();
        Ok(&self.region(region)[off..off + len])
    }

    /// Checksums of each page of a range.
    pub fn checksums(&self, range: PageRange) -> Result<Vec<u64>, LayoutError> {
        let bytes = self.pages(range)?;
        Ok(bytes
            .chunks_exact(self.info.layout.page_size())
            .map(page_checksum)
            .collect())
    }

    /// Counts one data-path request serving `pages` pages.
    pub fn count_served(&self, pages: u64) {
        self.requests.fetch_add(1, Ordering::Relaxed);
        self.pages.fetch_add(pages, Ordering::Relaxed);
    }

    /// The data-path counters so far.
    pub fn stats(&self) -> SourceStats {
        SourceStats {
            requests_served: self.requests.load(Ordering::Relaxed),
            pages_served: self.pages.load(Ordering::Relaxed),
        }
    }
}

fn is_zero(page: &[u8]) -> bool {
    let (head, words, tail) = {
        // SAFETY: u64 has no invalid bit patterns, so viewing aligned
        // bytes as u64 words is sound; align_to handles the unaligned ends.
        unsafe { page.align_to::<u64>() }
    };
    head.iter().all(|&b| b == 0) && words.iter().all(|&w| w == 0) && tail.iter().all(|&b| b == 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_pages_are_found_and_ranges_checked() {
        let mut bytes = vec![0u8; 4 * 4096];
        bytes[4096 + 17] = 1;
        bytes[3 * 4096 + 4095] = 1;
        let layout = MemoryLayout::single(bytes.len() as u64).unwrap();
        let m = SourceMemory::new(layout, vec![Arc::new(bytes)]).unwrap();
        let z = &m.info().zero;
        assert!(z.is_zero(0) && !z.is_zero(1) && z.is_zero(2) && !z.is_zero(3));
        assert_eq!(m.pages(PageRange::new(1, 2)).unwrap().len(), 8192);
        assert!(m.pages(PageRange::new(3, 2)).is_err());
        let sums = m.checksums(PageRange::new(0, 4)).unwrap();
        assert_eq!(sums[0], sums[2]);
        assert_ne!(sums[0], sums[1]);
    }

    #[test]
    fn region_sizes_must_match_the_layout() {
        let layout = MemoryLayout::single(8192).unwrap();
        assert!(SourceMemory::new(layout.clone(), vec![Arc::new(vec![0u8; 4096])]).is_err());
        assert!(SourceMemory::new(layout, vec![]).is_err());
    }
}
