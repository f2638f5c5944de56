//! Landing memory: destination memory a transport writes pages into
//! itself, each page at its own place, instead of into a buffer the caller
//! then copies from.
//!
//! A destination whose guest memory is shared memory (a memfd) maps it a
//! second time, where the guest cannot see it, and hands that mapping to
//! the transport as a [`Landing`]: TCP receives page bytes straight into
//! it, RDMA READs land in it directly (it is registered as a memory
//! region). The engine then maps each page into the guest with
//! `UFFDIO_CONTINUE`; no byte is copied on the destination's CPU.

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

/// Destination memory pages may be written into directly, in spans sorted
/// by page.
pub struct Landing {
    page_size: usize,
    spans: Vec<LandingSpan>,
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
            spans,
            _owner: owner,
        })
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
        let s = self.spans[i];
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
    pub fn populate(&self, range: PageRange) {
        let Some(addr) = self.locate(range) else {
            return;
        };
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

    /// The bytes of `range` to write into, when it lies in one span.
    ///
    /// # Safety
    /// The caller must hold the pages of `range` (a request landing them
    /// is outstanding on its channel, see [`Landing::new`]) and must not
    /// make two live slices over the same pages.
    #[allow(clippy::mut_from_ref)]
    pub unsafe fn bytes_mut(&self, range: PageRange) -> Option<&mut [u8]> {
        // SAFETY: the caller's contract, for the whole range.
        unsafe { self.bytes_mut_from(range, 0) }
    }

    /// The bytes of `range` from its `from`-th byte on, to write into,
    /// when the range lies in one span and `from` is inside it: the bytes
    /// before `from` may meanwhile be the guest's (pages reported landed
    /// and mapped).
    ///
    /// # Safety
    /// As [`Landing::bytes_mut`], for the bytes from `from` on.
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
}
