//! Destination pages larger than the source's: 2 MiB hugetlbfs guest
//! memory pulled from a source that serves 4 KiB pages. [`Scaled`]
//! presents every run of `factor` source pages as one page, so the rest of
//! the engine (claims, bubbles, lanes, installs) works in the
//! destination's pages; its channels (`channel.rs`) split each large page
//! into pieces the transport carries and, for bulk, pace them around
//! faults.

mod channel;

use std::sync::Arc;

use pagewire_transport::{
    ChannelClass, FetchLimits, MemoryLayout, PageChannel, PageRange, SourceInfo, SourceStats,
    Transport, TransportError, ZeroMap,
};

use crate::error::{EngineError, RegionError};
use crate::waits::FaultWaits;
use channel::{ScaledChannel, PIECES_IN_FLIGHT, PIECE_PAGES};

/// A transport seen in pages `factor` times the source's.
pub(crate) struct Scaled {
    inner: Arc<dyn Transport>,
    factor: u64,
    info: SourceInfo,
    limits: FetchLimits,
    /// What faults wait on, which bulk channels make way for (`None`:
    /// bulk is not paced, as without flow control).
    faults: Option<Arc<FaultWaits>>,
}

impl Scaled {
    /// Wraps `inner` for destination pages of `page_size` bytes. Bulk
    /// channels make way for what faults wait on, `faults`.
    pub fn new(
        inner: Arc<dyn Transport>,
        page_size: usize,
        faults: Option<Arc<FaultWaits>>,
    ) -> Result<Self, EngineError> {
        let src = &inner.info().layout;
        let sps = src.page_size();
        if page_size <= sps || !page_size.is_multiple_of(sps) {
            return Err(RegionError::LayoutMismatch(format!(
                "page size {page_size} is not a multiple of the source's {sps}"
            ))
            .into());
        }
        let factor = (page_size / sps) as u64;
        let layout = MemoryLayout::new(page_size, src.regions().to_vec()).map_err(|e| {
            RegionError::LayoutMismatch(format!(
                "the source's regions are not made of {page_size}-byte pages: {e}"
            ))
        })?;
        let mut zero = ZeroMap::new(layout.total_pages());
        let inner_zero = &inner.info().zero;
        for p in 0..layout.total_pages() {
            if (p * factor..(p + 1) * factor).all(|q| inner_zero.is_zero(q)) {
                zero.set(p);
            }
        }
        let l = inner.limits();
        let limits = FetchLimits {
            max_ranges: l.max_ranges.max(1),
            // Paced, a request is one large page: a fault waiting on a
            // page of a lane's request then waits behind no other page.
            max_pages: if faults.is_some() {
                1
            } else {
                (l.max_pages / factor).max(1)
            },
        };
        Ok(Self {
            inner,
            factor,
            info: SourceInfo { layout, zero },
            limits,
            faults,
        })
    }

    fn scale(&self, r: PageRange) -> Result<PageRange, TransportError> {
        let count = u64::from(r.count) * self.factor;
        Ok(PageRange::new(
            r.first * self.factor,
            u32::try_from(count).map_err(|_| TransportError::TooLarge {
                ranges: 1,
                pages: count,
                limits: self.inner.limits(),
            })?,
        ))
    }
}

impl Transport for Scaled {
    fn name(&self) -> &'static str {
        self.inner.name()
    }

    fn info(&self) -> &SourceInfo {
        &self.info
    }

    fn open(&self, class: ChannelClass) -> Result<Box<dyn PageChannel>, TransportError> {
        let inner = self.inner.open(class)?;
        let inner_max = self.inner.limits().max_pages.max(1);
        let (piece, pace) = match (class, &self.faults) {
            (ChannelClass::Bulk(_), Some(f)) => (
                PIECE_PAGES.min(inner_max),
                Some((f.clone(), PIECES_IN_FLIGHT)),
            ),
            _ => (inner_max, None),
        };
        // A paced bulk channel keeps one request outstanding: a fault that
        // waits on its page waits behind no later page of the same lane.
        let max_outstanding = if pace.is_some() {
            1
        } else {
            inner.max_outstanding().max(1)
        };
        Ok(Box::new(ScaledChannel::new(
            inner,
            self.factor,
            self.info.layout.page_size() / self.factor as usize,
            piece,
            pace,
            max_outstanding,
        )))
    }

    fn limits(&self) -> FetchLimits {
        self.limits
    }

    /// Checksums of the source's own (small) pages of `range`.
    fn checksums(&self, range: PageRange) -> Result<Vec<u64>, TransportError> {
        self.inner.checksums(self.scale(range)?)
    }

    fn source_stats(&self) -> Result<SourceStats, TransportError> {
        self.inner.source_stats()
    }

    fn session(&self) -> Option<u64> {
        self.inner.session()
    }

    fn done(&self) -> Result<(), TransportError> {
        self.inner.done()
    }
}
