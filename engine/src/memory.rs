//! Destination guest memory: regions laid out like the source's, either
//! mapped by the engine, handed in by a VMM in this process, or living in
//! another process (a VMM that hands over only its userfaultfd).

use std::sync::Arc;

use pagewire_transport::{
    Landing, LandingSpan, LayoutError, MemoryLayout, PageRange, SpanFile, PAGE_SIZE,
};
use vm_memory::{
    Bytes, FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion,
    GuestRegionMmap, MmapRegion,
};

use crate::error::{EngineError, RegionError};
pub use crate::region::{validate_regions, GuestRegion, HUGE_PAGE_SIZE, SUPPORTED_PAGE_SIZES};

/// One region's place in the host address space.
#[derive(Debug, Clone, Copy)]
struct HostRegion {
    host: usize,
    len: usize,
    first_page: u64,
}

/// Destination guest memory, laid out like the source's [`MemoryLayout`]
/// (or a finer split of it), with translation between host addresses and
/// global page indices.
#[derive(Debug)]
pub struct DestMemory {
    /// The vm-memory view, when the memory is in this process.
    guest: Option<GuestMemoryMmap>,
    layout: MemoryLayout,
    regions: Vec<HostRegion>,
    /// The process owning the memory, when it is not this one.
    owner: Option<u32>,
    /// Mapped by [`DestMemory::new`]: private anonymous memory, which
    /// `MADV_DONTNEED` empties (a VMM's shared memory it would not).
    private_anon: bool,
    /// Shared memory only: a second mapping of the same file that the
    /// guest cannot see, where a transport may land pages (RDMA-read
    /// straight into it, or received and written into its file) before
    /// `UFFDIO_CONTINUE` maps them into the guest.
    alias: Option<Arc<Landing>>,
}

/// Free 2 MiB huge pages not yet promised to a mapping, from the 2 MiB
/// pool in sysfs (0 when it cannot be read).
fn free_huge_pages() -> u64 {
    let read = |name: &str| {
        std::fs::read_to_string(format!("/sys/kernel/mm/hugepages/hugepages-2048kB/{name}"))
            .ok()
            .and_then(|v| v.trim().parse::<u64>().ok())
            .unwrap_or(0)
    };
    read("free_hugepages").saturating_sub(read("resv_hugepages"))
}

/// The alias mappings, unmapped when the last holder (the memory or a
/// transport's landing) lets go.
struct AliasMaps(#[allow(dead_code)] Vec<MmapRegion>);

fn alias_of(layout: &MemoryLayout, files: Vec<FileOffset>) -> Result<Arc<Landing>, EngineError> {
    let ps = layout.page_size();
    if ps != PAGE_SIZE {
        // Zero-copy installs take 4 KiB pages of shared memory only.
        return Err(RegionError::UnsupportedPageSize {
            region: 0,
            page_size: ps,
            supported: &[PAGE_SIZE],
        }
        .into());
    }
    let mut maps = Vec::with_capacity(files.len());
    let mut spans = Vec::with_capacity(files.len());
    let mut backing = Vec::with_capacity(files.len());
    for (i, (f, r)) in files.into_iter().zip(layout.regions()).enumerate() {
        let file = SpanFile {
            file: f.arc().clone(),
            offset: f.start(),
        };
        let m = MmapRegion::from_file(f, r.len as usize)
            .map_err(|e| EngineError::Memory(format!("map region {i} a second time: {e}")))?;
        let first_page = layout.region_pages(i).start;
        spans.push(LandingSpan {
            first_page,
            pages: r.len / ps as u64,
            addr: m.as_ptr() as usize,
        });
        backing.push((first_page, file));
        maps.push(m);
    }
    // SAFETY: each span is one of `maps`, a shared read-write mapping of
    // the region's bytes owned by the landing's owner below, so it stays
    // mapped as long as the landing. Pages are written there only by
    // whoever claimed them in the page state map (the contract the engine
    // keeps), and the guest sees a page only once UFFDIO_CONTINUE maps it.
    let mut landing = unsafe { Landing::new(ps, spans, Arc::new(AliasMaps(maps))) }
        .map_err(|e| EngineError::Memory(e.to_string()))?;
    for (first_page, file) in backing {
        // SAFETY: the span starting at `first_page` is a shared mapping
        // (`MmapRegion::from_file`) of this very file from this offset,
        // for the region's whole length.
        landing = unsafe { landing.with_file(first_page, file) }
            .map_err(|e| EngineError::Memory(e.to_string()))?;
    }
    Ok(Arc::new(landing))
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
        let mut m = Self::from_guest(guest, layout)?;
        m.private_anon = true;
        for (addr, len) in m.host_ranges() {
            // Pages are filled one by one (UFFDIO_COPY, or plain writes
            // during pre-copy): a transparent huge page would map 511
            // zero-filled neighbours with the first write, which then
            // never fault, and the guest would read zeros where the
            // source has data.
            // SAFETY: `addr..addr + len` is a mapping vm-memory just made
            // for this value; MADV_NOHUGEPAGE only changes its paging
            // policy.
            if unsafe { libc::madvise(addr as *mut libc::c_void, len, libc::MADV_NOHUGEPAGE) } != 0
            {
                return Err(EngineError::Memory(format!(
                    "madvise(MADV_NOHUGEPAGE): {}",
                    std::io::Error::last_os_error()
                )));
            }
        }
        Ok(m)
    }

    /// Maps fresh private memory on 2 MiB huge pages (hugetlbfs, as
    /// Firecracker's `huge_pages: "2M"` and QEMU's `hugetlb=on`) for every
    /// region of `layout`. The memory is laid out in huge pages: each
    /// fault fetches the 512 source pages of one huge page, which arrives
    /// whole (UFFDIO_COPY of 2 MiB). Every region's base and length must
    /// be multiples of 2 MiB, and the system must have a free huge page
    /// for each 2 MiB of guest ([`RegionError::NoHugePages`] otherwise),
    /// so that a lack of huge pages fails here rather than as a `SIGBUS`
    /// in the guest.
    pub fn new_hugetlb(layout: &MemoryLayout) -> Result<Self, EngineError> {
        let huge = HUGE_PAGE_SIZE as u64;
        for (i, r) in layout.regions().iter().enumerate() {
            if !r.len.is_multiple_of(huge) {
                return Err(RegionError::SizeNotPageMultiple {
                    region: i,
                    size: r.len,
                    page_size: HUGE_PAGE_SIZE,
                }
                .into());
            }
            if !r.guest_base.is_multiple_of(huge) {
                return Err(RegionError::Unaligned {
                    region: i,
                    what: "guest",
                    addr: r.guest_base,
                    page_size: HUGE_PAGE_SIZE,
                }
                .into());
            }
        }
        let huge_layout = MemoryLayout::new(HUGE_PAGE_SIZE, layout.regions().to_vec())
            .map_err(|e| RegionError::LayoutMismatch(e.to_string()))?;
        let mut mapped = Vec::with_capacity(layout.regions().len());
        for r in layout.regions() {
            // Without MAP_NORESERVE the kernel reserves every huge page
            // now: too few fail this mmap instead of a guest access later.
            let m = vm_memory::mmap::MmapRegionBuilder::new(r.len as usize)
                .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
                .with_mmap_flags(
                    libc::MAP_PRIVATE
                        | libc::MAP_ANONYMOUS
                        | libc::MAP_HUGETLB
                        | libc::MAP_HUGE_2MB,
                )
                .with_hugetlbfs(true)
                .build();
            let m = match m {
                Ok(m) => m,
                Err(vm_memory::mmap::MmapRegionError::Mmap(e))
                    if e.raw_os_error() == Some(libc::ENOMEM) =>
                {
                    return Err(RegionError::NoHugePages {
                        needed: layout.total_bytes() / huge,
                        free: free_huge_pages(),
                    }
                    .into())
                }
                Err(e) => return Err(EngineError::Memory(format!("map huge pages: {e}"))),
            };
            mapped.push((m, r.guest_base));
        }
        Self::from_mappings(mapped, &huge_layout)
    }

    /// Maps fresh shared memory (one memfd) for every region of `layout`
    /// (QEMU's `memory-backend-memfd`, Cloud Hypervisor's `shared=on`),
    /// with a second mapping of the memfd where a transport may land pages
    /// (then mapped into the guest with `UFFDIO_CONTINUE`); otherwise pages
    /// are copied in with `UFFDIO_COPY` (see
    /// [`crate::SharedInstall`]).
    pub fn new_shared(layout: &MemoryLayout) -> Result<Self, EngineError> {
        let fd = nix::sys::memfd::memfd_create(
            c"pagewire-guest",
            nix::sys::memfd::MemFdCreateFlag::MFD_CLOEXEC,
        )
        .map_err(|e| EngineError::Memory(format!("memfd_create: {e}")))?;
        let file = Arc::new(std::fs::File::from(fd));
        file.set_len(layout.total_bytes())
            .map_err(|e| EngineError::Memory(format!("size the memfd: {e}")))?;
        let mut at = 0u64;
        let mut files = Vec::with_capacity(layout.regions().len());
        for r in layout.regions() {
            files.push(FileOffset::from_arc(file.clone(), at));
            at += r.len;
        }
        let ranges: Vec<_> = layout
            .regions()
            .iter()
            .zip(&files)
            .map(|(r, f)| (GuestAddress(r.guest_base), r.len as usize, Some(f.clone())))
            .collect();
        let guest = GuestMemoryMmap::from_ranges_with_files(&ranges)
            .map_err(|e| EngineError::Memory(e.to_string()))?;
        let mut m = Self::from_guest(guest, layout)?;
        m.alias = Some(alias_of(layout, files)?);
        Ok(m)
    }

    /// Uses shared guest memory a VMM mapped in this process from files
    /// (a memfd, shmem), one [`FileOffset`] per region in the order given:
    /// pages are landed or copied in as for [`Self::new_shared`].
    ///
    /// # Safety
    /// As [`Self::from_vmm`]; besides, each region must be a shared
    /// mapping of its file at its offset.
    pub unsafe fn from_vmm_shared(
        regions: &[GuestRegion],
        files: &[FileOffset],
    ) -> Result<Self, EngineError> {
        if files.len() != regions.len() {
            return Err(RegionError::FileCount {
                files: files.len(),
                regions: regions.len(),
            }
            .into());
        }
        // SAFETY: forwarded to the caller.
        let mut m = unsafe { Self::from_vmm(regions) }?;
        // In guest address order, as the layout's regions.
        let mut order: Vec<usize> = (0..regions.len()).collect();
        order.sort_by_key(|&i| regions[i].guest_base);
        let sorted = order.iter().map(|&i| files[i].clone()).collect();
        m.alias = Some(alias_of(&m.layout, sorted)?);
        Ok(m)
    }

    /// Uses guest memory a VMM mapped in this process.
    ///
    /// The regions are validated (see [`validate_regions`]) and checked to
    /// be mapped; their pages must not have been touched yet.
    ///
    /// # Safety
    /// Every region must stay mapped, readable and writable at its host
    /// address for as long as the returned value (and any migration using
    /// it) lives: a failed migration keeps it until the process exits.
    pub unsafe fn from_vmm(regions: &[GuestRegion]) -> Result<Self, EngineError> {
        let (sorted, layout) = validate_regions(regions)?;
        crate::vma::check_mapped(None, regions, false)?;
        let mut mapped = Vec::with_capacity(sorted.len());
        for r in &sorted {
            // SAFETY: the caller guarantees the range is mapped read-write
            // for the life of the result; it was just found mapped in
            // /proc/self/smaps. vm-memory does not own (never unmaps) a
            // raw region.
            let m = unsafe {
                MmapRegion::build_raw(
                    r.host_addr as *mut u8,
                    r.size as usize,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_SHARED,
                )
            }
            .map_err(|e| EngineError::Memory(e.to_string()))?;
            mapped.push((m, r.guest_base));
        }
        Self::from_mappings(mapped, &layout)
    }

    /// Guest memory of `layout` from its regions' mappings, each with its
    /// guest address, in guest address order.
    fn from_mappings(
        mappings: Vec<(MmapRegion, u64)>,
        layout: &MemoryLayout,
    ) -> Result<Self, EngineError> {
        let regions = mappings
            .into_iter()
            .map(|(m, base)| {
                GuestRegionMmap::new(m, GuestAddress(base))
                    .ok_or_else(|| EngineError::Memory("region end overflows".into()))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let guest = GuestMemoryMmap::from_regions(regions)
            .map_err(|e| EngineError::Memory(e.to_string()))?;
        Self::from_guest(guest, layout)
    }

    /// Describes guest memory that lives in another process, which handed
    /// over a userfaultfd registered over it (Firecracker's page-fault
    /// handler protocol). Pages are installed through that userfaultfd;
    /// this process never reads them. `pid` is the owner, when known: its
    /// mappings are checked to cover every region.
    pub fn remote(regions: &[GuestRegion], pid: Option<u32>) -> Result<Self, EngineError> {
        let (sorted, layout) = validate_regions(regions)?;
        if let Some(pid) = pid {
            crate::vma::check_mapped(Some(pid), regions, false)?;
        }
        let mut m = Self::with_regions(None, layout, &sorted);
        m.owner = pid;
        Ok(m)
    }

    fn with_regions(
        guest: Option<GuestMemoryMmap>,
        layout: MemoryLayout,
        sorted: &[GuestRegion],
    ) -> Self {
        let regions = sorted
            .iter()
            .enumerate()
            .map(|(i, r)| HostRegion {
                host: r.host_addr as usize,
                len: r.size as usize,
                first_page: layout.region_pages(i).start,
            })
            .collect();
        Self {
            guest,
            layout,
            regions,
            owner: None,
            private_anon: false,
            alias: None,
        }
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
            regions.push(GuestRegion {
                guest_base: want.guest_base,
                host_addr: host as u64,
                size: want.len,
                page_size: layout.page_size(),
            });
        }
        let extra = ours.next().is_some();
        drop(ours);
        if extra {
            return Err(EngineError::Memory(
                "guest memory has more regions than the source".into(),
            ));
        }
        Ok(Self::with_regions(Some(guest), layout.clone(), &regions))
    }

    /// Checks that this memory can receive the source's: the same bytes,
    /// each at the same guest address, in pages that are whole multiples
    /// of the source's. The destination may split a source region in
    /// several (Firecracker registers a memory file in pieces) but never
    /// join or move one.
    pub fn check_source(&self, source: &MemoryLayout) -> Result<(), RegionError> {
        let mine = &self.layout;
        let sps = source.page_size();
        if !mine.page_size().is_multiple_of(sps) {
            return Err(RegionError::LayoutMismatch(format!(
                "page size {} here is not a multiple of the source's {sps}",
                mine.page_size()
            )));
        }
        if mine.total_bytes() != source.total_bytes() {
            return Err(RegionError::LayoutMismatch(format!(
                "{} bytes here, {} at the source",
                mine.total_bytes(),
                source.total_bytes()
            )));
        }
        let mut at_byte = 0u64;
        for (i, r) in mine.regions().iter().enumerate() {
            let count = u32::try_from(r.len / sps as u64)
                .map_err(|_| RegionError::LayoutMismatch(format!("region {i} is too large")))?;
            let range = PageRange::new(at_byte / sps as u64, count);
            let (region, off) = source.locate(range).map_err(|_| {
                RegionError::LayoutMismatch(format!(
                    "region {i} ({:#x}+{:#x}) spans two of the source's regions",
                    r.guest_base, r.len
                ))
            })?;
            let at = source.regions()[region].guest_base + off as u64;
            if at != r.guest_base {
                return Err(RegionError::LayoutMismatch(format!(
                    "region {i} starts at guest address {:#x}, the source has those bytes at {at:#x}",
                    r.guest_base
                )));
            }
            at_byte += r.len;
        }
        Ok(())
    }

    /// The process that owns remote memory, when known.
    pub fn owner_pid(&self) -> Option<u32> {
        self.owner
    }

    /// The regions in guest address order.
    pub fn regions(&self) -> Vec<GuestRegion> {
        self.layout
            .regions()
            .iter()
            .zip(&self.regions)
            .map(|(l, h)| GuestRegion {
                guest_base: l.guest_base,
                host_addr: h.host as u64,
                size: l.len,
                page_size: self.layout.page_size(),
            })
            .collect()
    }

    /// Whether the memory is mapped in this process (readable through
    /// [`Self::page`] and [`Self::guest`]).
    pub fn is_local(&self) -> bool {
        self.guest.is_some()
    }

    /// The layout.
    pub fn layout(&self) -> &MemoryLayout {
        &self.layout
    }

    /// The vm-memory view, for a VMM; `None` when the memory lives in
    /// another process.
    pub fn guest(&self) -> Option<&GuestMemoryMmap> {
        self.guest.as_ref()
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

    /// Writes whole pages `range` with `bytes`, before the memory is
    /// registered with userfaultfd (pre-copy): plain stores, no faults.
    /// Only for memory in this process.
    pub(crate) fn write_unregistered(
        &self,
        range: PageRange,
        bytes: &[u8],
    ) -> Result<(), EngineError> {
        let guest = self.guest.as_ref().ok_or_else(|| {
            EngineError::Memory("pre-copy needs guest memory in this process".into())
        })?;
        let (region, off) = self.layout.locate(range)?;
        let want = range.count as usize * self.layout.page_size();
        if bytes.len() != want {
            return Err(EngineError::Memory(format!(
                "{} bytes for {want} bytes of pages",
                bytes.len()
            )));
        }
        let at = GuestAddress(self.layout.regions()[region].guest_base + off as u64);
        guest
            .write_slice(bytes, at)
            .map_err(|e| EngineError::Memory(format!("write pre-copied pages: {e}")))
    }

    /// Whether pages copied before registration can be dropped again so
    /// that the next touch faults: private memory pagewire mapped itself
    /// ([`DestMemory::new`]), or shared memory with a second mapping.
    pub(crate) fn can_discard(&self) -> bool {
        self.private_anon || self.alias.is_some()
    }

    /// Whether this is shared memory with a second mapping, where pages
    /// may be landed ([`Self::new_shared`], [`Self::from_vmm_shared`]).
    pub fn is_shared(&self) -> bool {
        self.alias.is_some()
    }

    /// The second mapping as landing memory for a transport, for shared
    /// memory.
    pub fn landing(&self) -> Option<Arc<Landing>> {
        self.alias.clone()
    }

    /// Whether the guest's mapping of `page` has it mapped (a page table
    /// entry present or swapped), from `/proc/self/pagemap`; memory in this
    /// process only.
    pub(crate) fn is_mapped(&self, page: u64) -> Result<bool, EngineError> {
        use std::os::unix::fs::FileExt;
        let addr = self
            .host_addr(page)
            .filter(|_| self.is_local())
            .ok_or_else(|| EngineError::Memory(format!("page {page} is not local guest memory")))?;
        let f = std::fs::File::open("/proc/self/pagemap")
            .map_err(|e| EngineError::Memory(format!("open pagemap: {e}")))?;
        let mut entry = [0u8; 8];
        f.read_exact_at(&mut entry, (addr / PAGE_SIZE) as u64 * 8)
            .map_err(|e| EngineError::Memory(format!("read pagemap: {e}")))?;
        Ok(u64::from_le_bytes(entry) & (3 << 62) != 0)
    }

    /// The second mapping, for shared memory.
    fn alias(&self) -> Result<&Landing, EngineError> {
        self.alias
            .as_deref()
            .ok_or_else(|| EngineError::Memory("no second mapping: memory is not shared".into()))
    }

    /// Writes `data` into pages `range` of the shared memory, through its
    /// file or the second mapping (shared memory only); the caller holds
    /// the pages (claimed, not mapped in the guest).
    pub(crate) fn write_alias(&self, range: PageRange, data: &[u8]) -> Result<(), EngineError> {
        let len = range.count as usize * self.layout.page_size();
        if data.len() != len {
            return Err(EngineError::Memory(format!(
                "{} bytes of data for {len} bytes of pages",
                data.len()
            )));
        }
        // SAFETY: the caller holds these pages, so nothing else reads or
        // writes their bytes meanwhile.
        unsafe { self.alias()?.write(range, 0, data) }
            .map_err(|e| EngineError::Memory(format!("write pages {range:?}: {e}")))
    }

    /// Fills pages `range` of the shared memory with zeros (shared memory
    /// only): the caller holds them (claimed, not mapped in the guest), so
    /// nobody else reads or writes them meanwhile.
    pub(crate) fn zero_alias(&self, range: PageRange) -> Result<(), EngineError> {
        static ZEROS: [u8; 64 << 10] = [0; 64 << 10];
        let alias = self.alias()?;
        let len = range.count as usize * self.layout.page_size();
        let mut off = 0;
        while off < len {
            let n = (len - off).min(ZEROS.len());
            // SAFETY: the caller holds these pages, so nothing else reads
            // or writes their bytes meanwhile.
            unsafe { alias.write(range, off, &ZEROS[..n]) }
                .map_err(|e| EngineError::Memory(format!("zero pages {range:?}: {e}")))?;
            off += n;
        }
        Ok(())
    }

    /// Drops pages `ranges` so that they are missing again, before the
    /// memory is registered with userfaultfd: pre-copied pages the guest
    /// wrote at the source after they were copied.
    ///
    /// Private memory: `MADV_DONTNEED` frees the pages, up to 1024 ranges
    /// per `process_madvise` call (the guest is paused meanwhile: tens of
    /// thousands of single calls were most of the downtime). Shared
    /// memory: the stale bytes must leave the file too (DONTNEED would only
    /// unmap them here, and a page later marked removed would map them):
    /// `MADV_REMOVE` punches them out. The next touch faults either way.
    pub(crate) fn discard_unregistered(&self, ranges: &[PageRange]) -> Result<(), EngineError> {
        if ranges.is_empty() {
            return Ok(());
        }
        if !self.can_discard() {
            return Err(EngineError::Memory(
                "a hybrid migration needs guest memory mapped by pagewire (DestMemory::new) or \
                 shared memory with a second mapping (DestMemory::new_shared)"
                    .into(),
            ));
        }
        let spans = ranges
            .iter()
            .map(|r| self.host_span(*r))
            .collect::<Result<Vec<_>, _>>()?;
        let advise_each = |spans: &[(usize, usize)], advice: libc::c_int| {
            for &(addr, len) in spans {
                // SAFETY: `addr..addr + len` lies inside one region of
                // this process that pagewire mapped (checked by host_span
                // and `can_discard`); the advice only drops its pages,
                // which read as missing afterwards; no reference into them
                // is held (nothing runs on the memory before the migration
                // starts).
                let r = unsafe { libc::madvise(addr as *mut libc::c_void, len, advice) };
                if r != 0 {
                    return Err(EngineError::Memory(format!(
                        "discard stale pre-copied pages: {}",
                        std::io::Error::last_os_error()
                    )));
                }
            }
            Ok(())
        };
        if self.alias.is_some() {
            return advise_each(&spans, libc::MADV_REMOVE);
        }
        if let Err(e) = crate::madvise::dontneed_batched(&spans) {
            // An older kernel (no process_madvise, or not for DONTNEED), or
            // a batch cut short: one call per range (dropping a page twice
            // is harmless).
            tracing::debug!("process_madvise(MADV_DONTNEED): {e}; one call per range");
            return advise_each(&spans, libc::MADV_DONTNEED);
        }
        Ok(())
    }

    /// Guest memory's size in the source's 4 KiB pages.
    pub fn small_pages(&self) -> u64 {
        self.layout.total_bytes() / PAGE_SIZE as u64
    }

    /// The bytes of 4 KiB page `page`, numbered as the source numbers its
    /// pages whatever size of page backs this memory: on 2 MiB pages, a
    /// slice of memory page `page / 512`. `None` and faults as for
    /// [`Self::page`].
    pub fn small_page(&self, page: u64) -> Option<&[u8]> {
        let per = (self.layout.page_size() / PAGE_SIZE) as u64;
        let at = (page % per) as usize * PAGE_SIZE;
        self.page(page / per)?.get(at..at + PAGE_SIZE)
    }

    /// The bytes of page `page`; `None` when out of range or when the
    /// memory lives in another process. Touching a missing page faults, so
    /// call this only from a thread the fault handler can serve.
    pub fn page(&self, page: u64) -> Option<&[u8]> {
        self.guest.as_ref()?;
        let addr = self.host_addr(page)?;
        // SAFETY: `addr` is the start of a page inside a mapping of this
        // process described by `self.guest` (checked above), which stays
        // mapped as long as `&self` (owned by vm-memory, or guaranteed by
        // the caller of `from_vmm`); it is readable and nobody writes it
        // through a `&mut` while guest memory is shared.
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

    #[test]
    fn huge_page_memory_needs_whole_huge_pages_and_enough_of_them() {
        let layout = |len: u64| {
            MemoryLayout::new(PAGE_SIZE, vec![RegionInfo { guest_base: 0, len }]).unwrap()
        };
        let e = DestMemory::new_hugetlb(&layout(3 << 20)).unwrap_err();
        assert!(
            matches!(
                e,
                EngineError::Region(RegionError::SizeNotPageMultiple { size, .. }) if size == 3 << 20
            ),
            "{e}"
        );
        let read = |path: &str| std::fs::read_to_string(path).unwrap_or_default();
        let pool = "/sys/kernel/mm/hugepages/hugepages-2048kB";
        if read(&format!("{pool}/nr_overcommit_hugepages")).trim() != "0" {
            return; // surplus huge pages could be had
        }
        // One more than are free: refused when mapped, with the counts.
        let free = free_huge_pages();
        let e = DestMemory::new_hugetlb(&layout((free + 1) * HUGE_PAGE_SIZE as u64)).unwrap_err();
        assert!(
            matches!(
                e,
                EngineError::Region(RegionError::NoHugePages { needed, .. }) if needed == free + 1
            ),
            "{e}"
        );
        assert!(e.to_string().contains("vm.nr_hugepages"), "{e}");
    }
}
