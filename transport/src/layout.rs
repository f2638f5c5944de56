//! The shape of guest memory as both ends agree on it: regions, pages, and
//! which pages are all zero.

use std::ops::Range;

use crate::error::LayoutError;

/// The base page size pagewire moves. Regions are multiples of it.
pub const PAGE_SIZE: usize = 4096;

/// Largest number of pages a layout may hold (2^29 pages = 2 TiB at 4 KiB).
/// Bounds the zero-page bitmap sent in the handshake.
pub const MAX_PAGES: u64 = 1 << 29;

/// Largest number of regions a layout may hold.
pub const MAX_REGIONS: usize = 256;

/// One contiguous guest-physical memory region.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RegionInfo {
    /// Guest-physical address of the first byte.
    pub guest_base: u64,
    /// Length in bytes, a multiple of the page size.
    pub len: u64,
}

/// A run of `count` pages starting at global page index `first`.
///
/// Global page indices number the pages of all regions one after the other,
/// in region order. A valid range never crosses a region boundary.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct PageRange {
    /// Global index of the first page.
    pub first: u64,
    /// Number of pages, at least one.
    pub count: u32,
}

impl PageRange {
    /// Creates a range of `count` pages starting at `first`.
    pub fn new(first: u64, count: u32) -> Self {
        Self { first, count }
    }

    /// One past the last page of the range.
    pub fn end(&self) -> u64 {
        self.first + u64::from(self.count)
    }
}

/// Guest memory layout: page size and regions, with global page numbering.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemoryLayout {
    page_size: usize,
    regions: Vec<RegionInfo>,
    /// `first_page[i]` is the global index of region i's first page;
    /// one extra entry holds the total.
    first_page: Vec<u64>,
}

impl MemoryLayout {
    /// Validates and builds a layout.
    ///
    /// Regions must be non-empty, page aligned, sorted by guest address and
    /// must not overlap; the page size must be a power of two from 4 KiB
    /// to 1 GiB. Sources serve 4 KiB pages; larger ones (2 MiB hugetlbfs)
    /// describe destination memory, each page a run of 4 KiB source pages.
    pub fn new(page_size: usize, regions: Vec<RegionInfo>) -> Result<Self, LayoutError> {
        if !(PAGE_SIZE..=1 << 30).contains(&page_size) || !page_size.is_power_of_two() {
            return Err(LayoutError::PageSize(page_size));
        }
        if regions.is_empty() || regions.len() > MAX_REGIONS {
            return Err(LayoutError::RegionCount(regions.len()));
        }
        let ps = page_size as u64;
        let mut first_page = Vec::with_capacity(regions.len() + 1);
        let mut total: u64 = 0;
        let mut prev_end: Option<u64> = None;
        for (i, r) in regions.iter().enumerate() {
            if r.len == 0 || !r.len.is_multiple_of(ps) || !r.guest_base.is_multiple_of(ps) {
                return Err(LayoutError::Misaligned { region: i });
            }
            let end = r
                .guest_base
                .checked_add(r.len)
                .ok_or(LayoutError::Overflow { region: i })?;
            if prev_end.is_some_and(|p| r.guest_base < p) {
                return Err(LayoutError::Overlap { region: i });
            }
            prev_end = Some(end);
            first_page.push(total);
            total += r.len / ps;
            if total > MAX_PAGES {
                return Err(LayoutError::TooLarge(total));
            }
        }
        first_page.push(total);
        Ok(Self {
            page_size,
            regions,
            first_page,
        })
    }

    /// A layout of one region at guest address 0.
    pub fn single(len: u64) -> Result<Self, LayoutError> {
        Self::new(PAGE_SIZE, vec![RegionInfo { guest_base: 0, len }])
    }

    /// Page size in bytes.
    pub fn page_size(&self) -> usize {
        self.page_size
    }

    /// The regions, in guest address order.
    pub fn regions(&self) -> &[RegionInfo] {
        &self.regions
    }

    /// Total number of pages in all regions.
    pub fn total_pages(&self) -> u64 {
        self.first_page[self.regions.len()]
    }

    /// Total bytes in all regions.
    pub fn total_bytes(&self) -> u64 {
        self.total_pages() * self.page_size as u64
    }

    /// Global page indices of region `region`.
    pub fn region_pages(&self, region: usize) -> Range<u64> {
        self.first_page[region]..self.first_page[region + 1]
    }

    /// The region holding global page `page`, or `None` if out of range.
    pub fn region_of(&self, page: u64) -> Option<usize> {
        if page >= self.total_pages() {
            return None;
        }
        // first_page is sorted; find the last start <= page.
        Some(self.first_page.partition_point(|&f| f <= page) - 1)
    }

    /// Checks that `range` is non-empty and inside one region; returns the
    /// region and the byte offset of the range's first page in it.
    pub fn locate(&self, range: PageRange) -> Result<(usize, usize), LayoutError> {
        if range.count == 0 {
            return Err(LayoutError::EmptyRange);
        }
        let region = self.region_of(range.first).ok_or(LayoutError::OutOfRange {
            first: range.first,
            count: range.count,
            total: self.total_pages(),
        })?;
        let pages = self.region_pages(region);
        if range.end() > pages.end {
            return Err(LayoutError::OutOfRange {
                first: range.first,
                count: range.count,
                total: self.total_pages(),
            });
        }
        Ok((
            region,
            ((range.first - pages.start) as usize) * self.page_size,
        ))
    }
}

/// One bit per page: set when the source page is all zeroes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ZeroMap {
    bits: Vec<u8>,
    pages: u64,
}

impl ZeroMap {
    /// An empty map (no zero pages) for `pages` pages.
    pub fn new(pages: u64) -> Self {
        Self {
            bits: vec![0; pages.div_ceil(8) as usize],
            pages,
        }
    }

    /// Builds a map from its wire bytes; `bits` must be exactly
    /// `ceil(pages / 8)` bytes long.
    pub fn from_bytes(bits: Vec<u8>, pages: u64) -> Option<Self> {
        (bits.len() as u64 == pages.div_ceil(8)).then_some(Self { bits, pages })
    }

    /// The wire bytes.
    pub fn as_bytes(&self) -> &[u8] {
        &self.bits
    }

    /// Marks `page` as zero.
    pub fn set(&mut self, page: u64) {
        if page < self.pages {
            self.bits[(page / 8) as usize] |= 1 << (page % 8);
        }
    }

    /// Marks `page` as not zero (written since the map was made).
    pub fn clear(&mut self, page: u64) {
        if page < self.pages {
            self.bits[(page / 8) as usize] &= !(1 << (page % 8));
        }
    }

    /// Whether `page` is a zero page (false when out of range).
    pub fn is_zero(&self, page: u64) -> bool {
        page < self.pages && self.bits[(page / 8) as usize] & (1 << (page % 8)) != 0
    }

    /// Number of zero pages.
    pub fn count(&self) -> u64 {
        self.bits.iter().map(|b| u64::from(b.count_ones())).sum()
    }
}

/// What a destination learns about the source at the handshake.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SourceInfo {
    /// Regions and page numbering.
    pub layout: MemoryLayout,
    /// Which pages need not cross the wire.
    pub zero: ZeroMap,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn two_regions() -> MemoryLayout {
        MemoryLayout::new(
            PAGE_SIZE,
            vec![
                RegionInfo {
                    guest_base: 0,
                    len: 4 * 4096,
                },
                RegionInfo {
                    guest_base: 1 << 20,
                    len: 2 * 4096,
                },
            ],
        )
        .unwrap()
    }

    #[test]
    fn pages_are_numbered_across_regions() {
        let l = two_regions();
        assert_eq!(l.total_pages(), 6);
        assert_eq!(l.region_of(0), Some(0));
        assert_eq!(l.region_of(3), Some(0));
        assert_eq!(l.region_of(4), Some(1));
        assert_eq!(l.region_of(5), Some(1));
        assert_eq!(l.region_of(6), None);
        assert_eq!(l.locate(PageRange::new(4, 2)).unwrap(), (1, 0));
        assert_eq!(l.locate(PageRange::new(1, 3)).unwrap(), (0, 4096));
    }

    #[test]
    fn ranges_must_stay_in_one_region() {
        let l = two_regions();
        assert!(matches!(
            l.locate(PageRange::new(3, 2)),
            Err(LayoutError::OutOfRange { .. })
        ));
        assert!(matches!(
            l.locate(PageRange::new(6, 1)),
            Err(LayoutError::OutOfRange { .. })
        ));
        assert!(matches!(
            l.locate(PageRange::new(u64::MAX, 1)),
            Err(LayoutError::OutOfRange { .. })
        ));
        assert!(matches!(
            l.locate(PageRange::new(0, 0)),
            Err(LayoutError::EmptyRange)
        ));
    }

    #[test]
    fn bad_layouts_are_rejected() {
        let r = |guest_base, len| RegionInfo { guest_base, len };
        assert!(MemoryLayout::new(3000, vec![r(0, 6000)]).is_err());
        assert!(MemoryLayout::new(1 << 31, vec![r(0, 1 << 31)]).is_err());
        assert!(MemoryLayout::new(2 << 20, vec![r(0, 4096)]).is_err());
        assert_eq!(
            MemoryLayout::new(2 << 20, vec![r(0, 4 << 20)]).map(|l| l.total_pages()),
            Ok(2)
        );
        assert!(MemoryLayout::new(PAGE_SIZE, vec![]).is_err());
        assert!(MemoryLayout::new(PAGE_SIZE, vec![r(0, 100)]).is_err());
        assert!(MemoryLayout::new(PAGE_SIZE, vec![r(0, 8192), r(4096, 4096)]).is_err());
        assert!(MemoryLayout::new(PAGE_SIZE, vec![r(u64::MAX - 4095, 8192)]).is_err());
        assert!(MemoryLayout::new(PAGE_SIZE, vec![r(0, (MAX_PAGES + 1) * 4096)]).is_err());
    }

    #[test]
    fn zero_map_round_trips() {
        let mut z = ZeroMap::new(20);
        z.set(0);
        z.set(19);
        z.set(25); // ignored: out of range
        assert!(z.is_zero(0) && z.is_zero(19) && !z.is_zero(1) && !z.is_zero(25));
        assert_eq!(z.count(), 2);
        let back = ZeroMap::from_bytes(z.as_bytes().to_vec(), 20).unwrap();
        assert_eq!(back, z);
        assert!(ZeroMap::from_bytes(vec![0; 2], 20).is_none());
    }
}
