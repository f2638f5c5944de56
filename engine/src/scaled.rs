//! Destination pages larger than the source's: 2 MiB hugetlbfs guest
//! memory pulled from a source that serves 4 KiB pages. [`Scaled`]
//! presents every run of `factor` source pages as one page, so the rest of
//! the engine (claims, bubbles, lanes, installs) works in the
//! destination's pages; a request larger than the transport carries at
//! once is split and reassembled here.

use std::collections::VecDeque;
use std::sync::Arc;

use pagewire_transport::{
    ChannelClass, FetchLimits, MemoryLayout, PageChannel, PageRange, SourceInfo, SourceStats,
    Transport, TransportError, ZeroMap,
};

use crate::error::{EngineError, RegionError};

/// A transport seen in pages `factor` times the source's.
pub(crate) struct Scaled {
    inner: Arc<dyn Transport>,
    factor: u64,
    info: SourceInfo,
    limits: FetchLimits,
}

impl Scaled {
    /// Wraps `inner` for destination pages of `page_size` bytes.
    pub fn new(inner: Arc<dyn Transport>, page_size: usize) -> Result<Self, EngineError> {
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
            max_pages: (l.max_pages / factor).max(1),
        };
        Ok(Self {
            inner,
            factor,
            info: SourceInfo { layout, zero },
            limits,
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
        let l = self.inner.limits();
        let parts = self.factor.div_ceil(l.max_pages.max(1)).max(1) as usize;
        Ok(Box::new(ScaledChannel {
            max_outstanding: (inner.max_outstanding() / parts).max(1),
            inner,
            factor: self.factor,
            page_bytes: self.info.layout.page_size() / self.factor as usize,
            limits: l,
            parts: VecDeque::new(),
        }))
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

/// A channel in large pages over one in small pages.
struct ScaledChannel {
    inner: Box<dyn PageChannel>,
    factor: u64,
    /// Bytes of one source page.
    page_bytes: usize,
    limits: FetchLimits,
    /// For every request sent: the byte length of each inner request.
    parts: VecDeque<Vec<usize>>,
    max_outstanding: usize,
}

impl PageChannel for ScaledChannel {
    fn send(&mut self, ranges: &[PageRange]) -> Result<(), TransportError> {
        // Expand, then cut into inner requests within the inner limits.
        let mut lens = Vec::new();
        let mut req: Vec<PageRange> = Vec::new();
        let mut pages = 0u64;
        let max = self.limits.max_pages.max(1);
        let flush = |req: &mut Vec<PageRange>,
                     pages: &mut u64,
                     lens: &mut Vec<usize>,
                     inner: &mut Box<dyn PageChannel>|
         -> Result<(), TransportError> {
            if !req.is_empty() {
                inner.send(req)?;
                lens.push(*pages as usize);
                req.clear();
                *pages = 0;
            }
            Ok(())
        };
        for r in ranges {
            let mut first = r.first * self.factor;
            let end = r.end() * self.factor;
            while first < end {
                if pages == max || req.len() == self.limits.max_ranges {
                    flush(&mut req, &mut pages, &mut lens, &mut self.inner)?;
                }
                let n = (end - first).min(max - pages);
                req.push(PageRange::new(first, n as u32));
                pages += n;
                first += n;
            }
        }
        flush(&mut req, &mut pages, &mut lens, &mut self.inner)?;
        let page_bytes = self.page_bytes;
        self.parts
            .push_back(lens.into_iter().map(|p| p * page_bytes).collect());
        Ok(())
    }

    fn recv(&mut self, buf: &mut [u8]) -> Result<(), TransportError> {
        let lens = self
            .parts
            .pop_front()
            .ok_or(TransportError::Misuse("recv without a request outstanding"))?;
        let total: usize = lens.iter().sum();
        if buf.len() != total {
            return Err(TransportError::BufferSize {
                want: total,
                got: buf.len(),
            });
        }
        let mut off = 0;
        for len in lens {
            self.inner.recv(&mut buf[off..off + len])?;
            off += len;
        }
        Ok(())
    }

    fn reply_ready(&mut self) -> Result<bool, TransportError> {
        self.inner.reply_ready()
    }

    fn ready_fd(&self) -> Option<std::os::fd::RawFd> {
        self.inner.ready_fd()
    }

    fn outstanding(&self) -> usize {
        self.parts.len()
    }

    fn max_outstanding(&self) -> usize {
        self.max_outstanding
    }
}
