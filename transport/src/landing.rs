//! Landing memory: destination memory a transport writes pages into
//! itself, each page at its own place, instead of into a buffer the caller
//! then copies from.
//!
//! A destination whose guest memory is shared memory (a memfd) maps it a
//! second time, where the guest cannot see it, and hands that mapping to
//! the transport as a [`Landing`]: RDMA READs land in it directly (it is
//! registered as a memory region), so no byte is copied on the
//! destination's CPU; TCP receives page bytes into it (or into its file,
//! below). The engine then maps each page into the guest with
//! `UFFDIO_CONTINUE`.
//!
//! Where the engine also names the file behind a span ([`SpanFile`]), a
//! transport that copies bytes on the CPU anyway (TCP, in-process) writes
//! them into the file (`pwrite`) instead of through the mapping: a page
//! written whole that way is neither zeroed first nor mapped here, which
//! a write through the mapping (a page fault per page) pays.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::sync::{Arc, OnceLock};

use crate::error::TransportError;
use crate::layout::PageRange;

/// One stretch of landing memory: pages `first_page..first_page + pages`
/// at host address `addr`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LandingSpan {
    /// Global index of the first page.
    pub first_page: u64,
    /// Pages in the span.
    pub pages: u64,
    /// Host address of the first byte.
    pub addr: usize,
}

/// The file a span of landing memory maps (shared), and where in it.
#[derive(Debug, Clone)]
pub struct SpanFile {
    /// The file: a memfd or a tmpfs file (hugetlbfs files take no
    /// `write`).
    pub file: Arc<File>,
    /// Offset in the file of the span's first byte.
    pub offset: u64,
}

/// Destination memory pages may be written into directly, in spans sorted
/// by page.
pub struct Landing {
    page_size: usize,
    spans: Vec<LandingSpan>,
    /// The file behind each span, where known (same order as `spans`).
    files: Vec<Option<SpanFile>>,
    /// Whatever owns the mapping; kept alive as long as this value.
    _owner: Arc<dyn Send + Sync>,
}

impl std::fmt::Debug for Landing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Landing")
            .field("page_size", &self.page_size)
            .field("spans", &self.spans)
            .finish_non_exhaustive()
    }
}

impl Landing {
    /// Takes `landing` as a transport's one landing memory (`held`), for
    /// pages of `page_size` bytes: the same memory offered again (a
    /// resumed migration) is taken, other memory or pages of another size
    /// are not. Returns whether it was taken.
    pub(crate) fn adopt(
        held: &OnceLock<Arc<Landing>>,
        landing: Arc<Landing>,
        page_size: usize,
    ) -> bool {
        if landing.page_size() != page_size {
            return false;
        }
        Arc::ptr_eq(held.get_or_init(|| landing.clone()), &landing)
    }

    /// Landing memory made of `spans` of `page_size` pages, kept mapped by
    /// `owner`.
    ///
    /// # Safety
    /// Every span must be memory of this process, readable and writable
    /// for `pages * page_size` bytes, that stays mapped as long as `owner`
    /// lives. While a request landing pages is outstanding nothing else
    /// may read or write those pages' bytes, except whole pages its
    /// channel has reported landed
    /// ([`crate::PageChannel::recv_landed_streaming`]), which the channel
    /// never writes again (the engine claims a page
    /// before asking for it, and the guest cannot see this mapping).
    pub unsafe fn new(
        page_size: usize,
        mut spans: Vec<LandingSpan>,
        owner: Arc<dyn Send + Sync>,
    ) -> Result<Self, TransportError> {
        spans.sort_by_key(|s| s.first_page);
        let bad = |why| Err(TransportError::Misuse(why));
        if page_size == 0 || spans.is_empty() {
            return bad("landing memory without pages");
        }
        for (i, s) in spans.iter().enumerate() {
            let end = s.first_page.checked_add(s.pages);
            let bytes = (s.pages as usize).checked_mul(page_size);
            if s.pages == 0
                || end.is_none()
                || bytes.is_none_or(|b| s.addr.checked_add(b).is_none())
            {
                return bad("landing span empty or overflowing");
            }
            if i > 0 && spans[i - 1].first_page + spans[i - 1].pages > s.first_page {
                return bad("landing spans overlap");
            }
        }
        Ok(Self {
            page_size,
            files: vec![None; spans.len()],
            spans,
            _owner: owner,
        })
    }

    /// Names `file` as what the span starting at page `first_page` maps:
    /// bytes for that span may then be written into the file
    /// ([`Landing::write`]) instead of through the mapping.
    ///
    /// # Safety
    /// The span's memory must be a shared mapping of `file` from
    /// `file.offset` on, for the whole span, so that a write at an offset
    /// changes exactly the bytes the mapping shows there.
    pub unsafe fn with_file(
        mut self,
        first_page: u64,
        file: SpanFile,
    ) -> Result<Self, TransportError> {
        let i = self
            .spans
            .iter()
            .position(|s| s.first_page == first_page)
            .ok_or(TransportError::Misuse(
                "a file for a span that does not exist",
            ))?;
        let bytes = self.spans[i].pages * self.page_size as u64;
        if file.offset.checked_add(bytes).is_none() {
            return Err(TransportError::Misuse("a span's file offset overflows"));
        }
        self.files[i] = Some(file);
        Ok(self)
    }

    /// Whether the span holding `range` has its file named, so
    /// [`Landing::write`] writes into the file.
    pub fn has_file(&self, range: PageRange) -> bool {
        self.locate_span(range)
            .is_some_and(|(i, _)| self.files[i].is_some())
    }

    /// Writes `data` into the bytes of `range` from its `from`-th byte on:
    /// into the span's file when it has one, else through the mapping.
    /// `data` must fit in the range past `from`.
    ///
    /// # Safety
    /// As [`Landing::bytes_mut_from`], for the bytes written.
    pub unsafe fn write(
        &self,
        range: PageRange,
        from: usize,
        data: &[u8],
    ) -> Result<(), TransportError> {
        let (i, _) = self.locate_span(range).ok_or(TransportError::Misuse(
            "a landed range outside the landing memory",
        ))?;
        let len = range.count as usize * self.page_size;
        if from.checked_add(data.len()).is_none_or(|end| end > len) {
            return Err(TransportError::BufferSize {
                want: len.saturating_sub(from),
                got: data.len(),
            });
        }
        if let Some(f) = &self.files[i] {
            let s = &self.spans[i];
            let at = f.offset + (range.first - s.first_page) * self.page_size as u64 + from as u64;
            return f
                .file
                .write_all_at(data, at)
                .map_err(TransportError::Landing);
        }
        // SAFETY: forwarded to the caller; the slice lives for this copy.
        let dst = unsafe { self.bytes_mut_from(range, from) }.ok_or(TransportError::Misuse(
            "a landed range outside the landing memory",
        ))?;
        dst[..data.len()].copy_from_slice(data);
        Ok(())
    }

    /// The spans, sorted by page.
    pub fn spans(&self) -> &[LandingSpan] {
        &self.spans
    }

    /// The page size.
    pub fn page_size(&self) -> usize {
        self.page_size
    }

    /// Host address of the first byte of `range`, when the whole range
    /// lies in one span.
    pub fn locate(&self, range: PageRange) -> Option<usize> {
        self.locate_span(range).map(|(_, addr)| addr)
    }

    /// The span holding all of `range` (its index) and the host address of
    /// the range's first byte.
    pub fn locate_span(&self, range: PageRange) -> Option<(usize, usize)> {
        let i = self
            .spans
            .partition_point(|s| s.first_page <= range.first)
            .checked_sub(1)?;
        let s = &self.spans[i];
        let end = range.first.checked_add(u64::from(range.count))?;
        (range.count > 0 && end <= s.first_page + s.pages).then(|| {
            (
                i,
                s.addr + (range.first - s.first_page) as usize * self.page_size,
            )
        })
    }

    /// Allocates and maps the pages of `range` ahead of the bytes that
    /// will be written into them (`MADV_POPULATE_WRITE`): one call for the
    /// range instead of one page fault per page when the bytes arrive,
    /// which is most of the cost of landing a batch in shared memory.
    /// Page contents are left as they are. Where the kernel lacks it
    /// (before 5.14) the writes fault the pages in as before, so failures
    /// are ignored.
    /// Spans with a file need none of this: [`Landing::write`] allocates
    /// their pages as it fills them.
    pub fn populate(&self, range: PageRange) {
        let Some((i, addr)) = self.locate_span(range) else {
            return;
        };
        if self.files[i].is_some() {
            return;
        }
        let len = range.count as usize * self.page_size;
        // SAFETY: `addr..addr + len` lies in one span, mapped by the owner
        // this value keeps alive (see `new`); populating only allocates
        // and maps pages, it changes no byte and no Rust reference is
        // made over them.
        let rc =
            unsafe { libc::madvise(addr as *mut libc::c_void, len, libc::MADV_POPULATE_WRITE) };
        if rc != 0 {
            tracing::trace!(
                error = %std::io::Error::last_os_error(),
                "populating landing pages failed; the writes fault them in"
            );
        }
    }

    /// Checks that every range of a request lies in one span.
    pub fn check(&self, ranges: &[PageRange]) -> Result<(), TransportError> {
        if ranges.iter().any(|r| self.locate(*r).is_none()) {
            return Err(TransportError::Misuse("a range outside the landing memory"));
        }
        Ok(())
    }

    /// The landing memory a channel was opened with, or the error for a
    /// channel opened before any was offered.
    pub(crate) fn of(landing: &Option<Arc<Landing>>) -> Result<&Arc<Landing>, TransportError> {
        landing
            .as_ref()
            .ok_or(TransportError::Misuse("this channel has no landing memory"))
    }

    /// The bytes of `range` from its `from`-th byte on, to write into,
    /// when the range lies in one span and `from` is inside it: the bytes
    /// before `from` may meanwhile be the guest's (pages reported landed
    /// and mapped).
    ///
    /// # Safety
    /// The caller must hold the pages of `range` from `from` on (a request
    /// landing them is outstanding on its channel, see [`Landing::new`])
    /// and must not make two live slices over the same pages.
    #[allow(clippy::mut_from_ref)]
    pub unsafe fn bytes_mut_from(&self, range: PageRange, from: usize) -> Option<&mut [u8]> {
        let addr = self.locate(range)?;
        let len = (range.count as usize * self.page_size).checked_sub(from)?;
        // SAFETY: `addr + from..addr + from + len` lies in one span, which
        // the contract of `new` keeps mapped and writable while `self` (and
        // its owner) lives; the caller holds those pages and makes no other
        // slice over them.
        Some(unsafe { std::slice::from_raw_parts_mut((addr + from) as *mut u8, len) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_land_inside_one_span_or_nowhere() {
        let mem = Arc::new(vec![0u8; 8 * 4096]);
        let base = mem.as_ptr() as usize;
        let spans = vec![
            LandingSpan {
                first_page: 4,
                pages: 4,
                addr: base + 4 * 4096,
            },
            LandingSpan {
                first_page: 0,
                pages: 4,
                addr: base,
            },
        ];
        // SAFETY: both spans lie in `mem`, which the landing keeps alive.
        let l = unsafe { Landing::new(4096, spans, mem.clone()) }.unwrap();
        assert_eq!(l.locate(PageRange::new(0, 4)), Some(base));
        assert_eq!(l.locate(PageRange::new(5, 2)), Some(base + 5 * 4096));
        assert_eq!(l.locate(PageRange::new(3, 2)), None, "across two spans");
        assert_eq!(l.locate(PageRange::new(7, 2)), None, "past the end");
        assert_eq!(l.locate(PageRange::new(8, 1)), None);
        let over = vec![
            LandingSpan {
                first_page: 0,
                pages: 4,
                addr: base,
            },
            LandingSpan {
                first_page: 3,
                pages: 1,
                addr: base,
            },
        ];
        // SAFETY: refused before use.
        assert!(unsafe { Landing::new(4096, over, mem.clone()) }.is_err());
        // SAFETY: refused before use.
        assert!(unsafe { Landing::new(4096, vec![], mem) }.is_err());
    }

    #[test]
    fn writes_go_to_the_file_behind_a_span_or_through_the_mapping() {
        use std::os::unix::fs::FileExt;
        let ps = 4096;
        let mem = Arc::new(std::sync::Mutex::new(vec![0u8; 4 * ps]));
        let base = mem.lock().unwrap().as_ptr() as usize;
        let file = Arc::new(tempfile_in_memory());
        file.set_len(8 * ps as u64).unwrap();
        let spans = vec![
            LandingSpan {
                first_page: 0,
                pages: 2,
                addr: base,
            },
            LandingSpan {
                first_page: 2,
                pages: 2,
                addr: base + 2 * ps,
            },
        ];
        // SAFETY: both spans lie in `mem`, which the landing keeps alive;
        // the second is said to map `file` from page 5 on, which it does
        // not: the test checks where the bytes go, not what a mapping
        // shows.
        let l = unsafe {
            Landing::new(ps, spans, mem.clone())
                .unwrap()
                .with_file(
                    2,
                    SpanFile {
                        file: file.clone(),
                        offset: 5 * ps as u64,
                    },
                )
                .unwrap()
        };
        assert!(!l.has_file(PageRange::new(0, 2)));
        assert!(l.has_file(PageRange::new(3, 1)));
        let data = vec![7u8; ps];
        // SAFETY: nothing else uses these bytes.
        unsafe { l.write(PageRange::new(1, 1), 0, &data) }.unwrap();
        assert!(mem.lock().unwrap()[ps..2 * ps].iter().all(|&b| b == 7));
        // SAFETY: as above.
        unsafe { l.write(PageRange::new(2, 2), ps + 16, &data[..100]) }.unwrap();
        let mut back = vec![0u8; 100];
        file.read_exact_at(&mut back, (6 * ps + 16) as u64).unwrap();
        assert!(back.iter().all(|&b| b == 7));
        assert!(mem.lock().unwrap()[2 * ps..].iter().all(|&b| b == 0));
        // SAFETY: refused before any byte is written.
        let past = unsafe { l.write(PageRange::new(3, 1), 1, &data) };
        assert!(matches!(past, Err(TransportError::BufferSize { .. })));
        // SAFETY: refused before any byte is written.
        let outside = unsafe { l.write(PageRange::new(1, 2), 0, &data) };
        assert!(matches!(outside, Err(TransportError::Misuse(_))));
        // SAFETY: refused: no span starts at page 1.
        let none =
            unsafe { Landing::new(ps, vec![l.spans()[0]], mem.clone()) }.and_then(|l| unsafe {
                l.with_file(
                    1,
                    SpanFile {
                        file: file.clone(),
                        offset: 0,
                    },
                )
            });
        assert!(none.is_err());
        // SAFETY: refused before use: the offset overflows.
        let far = unsafe {
            Landing::new(ps, vec![l.spans()[1]], mem.clone()).and_then(|l| {
                l.with_file(
                    2,
                    SpanFile {
                        file: file.clone(),
                        offset: u64::MAX - 1,
                    },
                )
            })
        };
        assert!(matches!(far, Err(TransportError::Misuse(_))));
        // A file that refuses the write (opened read-only): a typed error,
        // not a link loss.
        let ro = Arc::new(
            File::open(format!(
                "/proc/self/fd/{}",
                std::os::fd::AsRawFd::as_raw_fd(&*file)
            ))
            .unwrap(),
        );
        // SAFETY: the span is said to map `ro`'s file; only the refused
        // write is tried.
        let l = unsafe {
            Landing::new(ps, vec![l.spans()[1]], mem.clone())
                .unwrap()
                .with_file(
                    2,
                    SpanFile {
                        file: ro,
                        offset: 0,
                    },
                )
                .unwrap()
        };
        // SAFETY: nothing else uses these bytes.
        let e = unsafe { l.write(PageRange::new(2, 1), 0, &data) }.unwrap_err();
        assert!(matches!(e, TransportError::Landing(_)), "{e}");
        assert!(!e.is_link_loss());
    }

    /// An anonymous in-memory file.
    fn tempfile_in_memory() -> File {
        // SAFETY: a valid NUL-terminated name and no flags; the returned
        // descriptor (checked) is owned by the `File`.
        let fd = unsafe { libc::memfd_create(c"landing-test".as_ptr(), 0) };
        assert!(fd >= 0, "memfd_create: {}", std::io::Error::last_os_error());
        // SAFETY: `fd` is a fresh descriptor nobody else owns.
        unsafe { <File as std::os::fd::FromRawFd>::from_raw_fd(fd) }
    }
}
