//! Destination guest memory: vm-memory regions laid out like the source.

use pagewire_transport::{LayoutError, MemoryLayout, PageRange};
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

use crate::error::EngineError;

/// One region's place in the host address space.
#[derive(Debug, Clone, Copy)]
struct HostRegion {
    host: usize,
    len: usize,
    first_page: u64,
}

/// Guest memory at the destination, laid out as the source's
/// [`MemoryLayout`], with translation between host addresses and global
/// page indices.
#[derive(Debug)]
pub struct DestMemory {
    guest: GuestMemoryMmap,
    layout: MemoryLayout,
    regions: Vec<HostRegion>,
}

impl DestMemory {
    /// Maps fresh anonymous memory for every region of `layout`. No page is
    /// populated: every first touch faults.
    pub fn new(layout: &MemoryLayout) -> Result<Self, EngineError> {
        let ranges: Vec<_> = layout
            .regions()
            .iter()
            .map(|r| (GuestAddress(r.guest_base), r.len as usize))
            .collect();
        let guest = GuestMemoryMmap::from_ranges(&ranges)
            .map_err(|e| EngineError::Memory(e.to_string()))?;
        Self::from_guest(guest, layout)
    }

    /// Uses a VMM's existing guest memory. Its regions must match `layout`
    /// exactly and must not have been touched yet.
    pub fn from_guest(guest: GuestMemoryMmap, layout: &MemoryLayout) -> Result<Self, EngineError> {
        let mut regions = Vec::with_capacity(layout.regions().len());
        let mut ours = guest.iter();
        for (i, want) in layout.regions().iter().enumerate() {
            let r = ours
                .next()
                .ok_or_else(|| EngineError::Memory(format!("guest memory lacks region {i}")))?;
            if r.start_addr().0 != want.guest_base || r.len() != want.len {
                return Err(EngineError::Memory(format!(
                    "guest region {i} is {:#x}+{:#x}, the source has {:#x}+{:#x}",
                    r.start_addr().0,
                    r.len(),
                    want.guest_base,
                    want.len
                )));
            }
            let host = guest
                .get_host_address(r.start_addr())
                .map_err(|e| EngineError::Memory(e.to_string()))?;
            regions.push(HostRegion {
                host: host as usize,
                len: want.len as usize,
                first_page: layout.region_pages(i).start,
            });
        }
        let extra = ours.next().is_some();
        drop(ours);
        if extra {
            return Err(EngineError::Memory(
                "guest memory has more regions than the source".into(),
            ));
        }
        Ok(Self {
            guest,
            layout: layout.clone(),
            regions,
        })
    }

    /// The layout.
    pub fn layout(&self) -> &MemoryLayout {
        &self.layout
    }

    /// The vm-memory view, for a VMM.
    pub fn guest(&self) -> &GuestMemoryMmap {
        &self.guest
    }

    /// Host address ranges of the regions, as (start, len).
    pub fn host_ranges(&self) -> impl Iterator<Item = (usize, usize)> + '_ {
        self.regions.iter().map(|r| (r.host, r.len))
    }

    /// Host address and byte length of `range`, which must lie inside one
    /// region.
    pub fn host_span(&self, range: PageRange) -> Result<(usize, usize), LayoutError> {
        let (region, off) = self.layout.locate(range)?;
        Ok((
            self.regions[region].host + off,
            range.count as usize * self.layout.page_size(),
        ))
    }

    /// Host address of the first byte of global page `page`, or `None` when
    /// out of range.
    pub fn host_addr(&self, page: u64) -> Option<usize> {
        self.host_span(PageRange::new(page, 1))
            .ok()
            .map(|(addr, _)| addr)
    }

    /// The global page holding host address `addr`, or `None` when the
    /// address is not guest memory.
    pub fn page_of(&self, addr: usize) -> Option<u64> {
        self.regions.iter().find_map(|r| {
            (addr >= r.host && addr < r.host + r.len)
                .then(|| r.first_page + ((addr - r.host) / self.layout.page_size()) as u64)
        })
    }

    /// The bytes of page `page`. Touching a missing page faults, so call
    /// this only from a thread the fault handler can serve.
    pub fn page(&self, page: u64) -> Option<&[u8]> {
        let addr = self.host_addr(page)?;
        // SAFETY: `addr` is the start of a page inside a mapping owned by
        // `self.guest`, which lives as long as `&self`; the page is
        // readable (anonymous private mapping) and nobody writes it through
        // a `&mut` while guest memory is shared.
        Some(unsafe { std::slice::from_raw_parts(addr as *const u8, self.layout.page_size()) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use pagewire_transport::{RegionInfo, PAGE_SIZE};

    #[test]
    fn addresses_and_pages_translate_both_ways() {
        let layout = MemoryLayout::new(
            PAGE_SIZE,
            vec![
                RegionInfo {
                    guest_base: 0,
                    len: 3 * 4096,
                },
                RegionInfo {
                    guest_base: 1 << 30,
                    len: 2 * 4096,
                },
            ],
        )
        .unwrap();
        let m = DestMemory::new(&layout).unwrap();
        for p in 0..5 {
            let a = m.host_addr(p).unwrap();
            assert_eq!(m.page_of(a), Some(p));
            assert_eq!(m.page_of(a + 4095), Some(p));
        }
        assert_eq!(m.host_addr(5), None);
        assert_eq!(m.page_of(1), None);
    }
}
