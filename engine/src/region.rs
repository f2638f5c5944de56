//! A VMM's guest memory regions and the checks they pass before the
//! engine takes them: page sizes, alignment, overlaps, and the layout they
//! form.

use pagewire_transport::{MemoryLayout, RegionInfo, PAGE_SIZE};

use crate::error::RegionError;

/// Page sizes of guest memory pagewire fills: 4 KiB, and 2 MiB
/// (hugetlbfs), each 2 MiB page a run of 512 source pages.
pub const SUPPORTED_PAGE_SIZES: &[usize] = &[PAGE_SIZE, HUGE_PAGE_SIZE];

/// The huge page size pagewire fills (hugetlbfs, Firecracker's
/// `huge_pages: "2M"`).
pub const HUGE_PAGE_SIZE: usize = 2 << 20;

/// One region of guest memory as a VMM has it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GuestRegion {
    /// Guest-physical address of the first byte. With Firecracker's
    /// protocol, which carries no guest addresses, this is the region's
    /// offset in the snapshot memory file.
    pub guest_base: u64,
    /// Host virtual address of the first byte, in the process that owns
    /// the memory.
    pub host_addr: u64,
    /// Length in bytes, a multiple of `page_size`.
    pub size: u64,
    /// Page size backing the region (4 KiB; 2 MiB for hugetlbfs).
    pub page_size: usize,
}

/// Checks what a VMM hands in and returns the regions sorted by guest
/// address with the layout they form.
pub fn validate_regions(
    regions: &[GuestRegion],
) -> Result<(Vec<GuestRegion>, MemoryLayout), RegionError> {
    let first = regions.first().ok_or(RegionError::Empty)?;
    for (i, r) in regions.iter().enumerate() {
        let ps = r.page_size;
        if ps < PAGE_SIZE || !ps.is_power_of_two() {
            return Err(RegionError::BadPageSize {
                region: i,
                page_size: ps,
            });
        }
        if ps != first.page_size {
            return Err(RegionError::MixedPageSizes {
                region: i,
                page_size: ps,
                first: first.page_size,
            });
        }
        if !SUPPORTED_PAGE_SIZES.contains(&ps) {
            return Err(RegionError::UnsupportedPageSize {
                region: i,
                page_size: ps,
                supported: SUPPORTED_PAGE_SIZES,
            });
        }
        if r.size == 0 {
            return Err(RegionError::EmptyRegion { region: i });
        }
        let ps64 = ps as u64;
        if !r.size.is_multiple_of(ps64) {
            return Err(RegionError::SizeNotPageMultiple {
                region: i,
                size: r.size,
                page_size: ps,
            });
        }
        for (what, addr) in [("host", r.host_addr), ("guest", r.guest_base)] {
            if !addr.is_multiple_of(ps64) {
                return Err(RegionError::Unaligned {
                    region: i,
                    what,
                    addr,
                    page_size: ps,
                });
            }
            if addr.checked_add(r.size).is_none() {
                return Err(RegionError::Overflow { region: i });
            }
        }
        if r.host_addr
            .checked_add(r.size)
            .is_none_or(|e| e > usize::MAX as u64)
        {
            return Err(RegionError::Overflow { region: i });
        }
    }
    for (space, key) in [
        (
            "guest",
            (|r: &GuestRegion| r.guest_base) as fn(&GuestRegion) -> u64,
        ),
        ("host", |r: &GuestRegion| r.host_addr),
    ] {
        let mut order: Vec<usize> = (0..regions.len()).collect();
        order.sort_by_key(|&i| key(&regions[i]));
        for w in order.windows(2) {
            let (a, b) = (&regions[w[0]], &regions[w[1]]);
            if key(a) + a.size > key(b) {
                return Err(RegionError::Overlap {
                    a: w[0].min(w[1]),
                    b: w[0].max(w[1]),
                    space,
                });
            }
        }
    }
    let mut sorted = regions.to_vec();
    sorted.sort_by_key(|r| r.guest_base);
    let layout = MemoryLayout::new(
        first.page_size,
        sorted
            .iter()
            .map(|r| RegionInfo {
                guest_base: r.guest_base,
                len: r.size,
            })
            .collect(),
    )
    .map_err(|e| RegionError::LayoutMismatch(e.to_string()))?;
    Ok((sorted, layout))
}
