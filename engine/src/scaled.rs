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
        // Every page travels as its own inner requests (one or more), so
        // that a reply of several pages can be reported page by page.
        let parts = self.factor.div_ceil(l.max_pages.max(1)) * self.limits.max_pages;
        Ok(Box::new(ScaledChannel {
            max_outstanding: (inner.max_outstanding() / parts.max(1) as usize).max(1),
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
        // Each large page becomes inner requests of at most the inner
        // limit of small pages, one range each: a large page is whole
        // once its last inner reply is in.
        let max = self.limits.max_pages.max(1);
        // Refused before anything is sent: a request the inner channel
        // cannot hold outstanding whole would be sent in part.
        let per_page = self.factor.div_ceil(max);
        let large: u64 = ranges.iter().map(|r| u64::from(r.count)).sum();
        let needed = large.saturating_mul(per_page);
        let room = self
            .inner
            .max_outstanding()
            .saturating_sub(self.inner.outstanding()) as u64;
        if needed > room {
            return Err(TransportError::Misuse(
                "a request needs more inner requests than the channel keeps outstanding",
            ));
        }
        let mut lens = Vec::new();
        for r in ranges {
            for page in r.first..r.end() {
                let mut first = page * self.factor;
                let end = first + self.factor;
                while first < end {
                    let n = (end - first).min(max);
                    self.inner.send(&[PageRange::new(first, n as u32)])?;
                    lens.push(n as usize * self.page_bytes);
                    first += n;
                }
            }
        }
        self.parts.push_back(lens);
        Ok(())
    }

    fn recv(&mut self, buf: &mut [u8]) -> Result<(), TransportError> {
        self.recv_streaming(buf, &mut |_| {})
    }

    /// Reports the reply after each inner reply but the last: whole
    /// large pages come in as their last inner reply does.
    fn recv_streaming(
        &mut self,
        buf: &mut [u8],
        arrived: &mut dyn FnMut(&[u8]),
    ) -> Result<(), TransportError> {
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
            if off < total {
                arrived(&buf[..off]);
            }
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

#[cfg(test)]
mod tests {
    use super::*;
    use pagewire_transport::inproc::InProcTransport;
    use pagewire_transport::SourceMemory;

    /// A reply of several large pages is reported as each page is whole,
    /// every report holding the source's bytes, never the whole reply.
    #[test]
    fn a_reply_of_large_pages_is_reported_page_by_page() {
        const MIB: usize = 1 << 20;
        let bytes: Vec<u8> = (0..8 * MIB).map(|i| (i / 4096 % 251) as u8).collect();
        let layout = MemoryLayout::single(8 * MIB as u64).unwrap();
        let src = Arc::new(SourceMemory::new(layout, vec![Arc::new(bytes.clone())]).unwrap());
        let inner: Arc<dyn Transport> = Arc::new(InProcTransport::new(src));
        let scaled = Scaled::new(inner, 2 * MIB).unwrap();
        assert_eq!(scaled.info().layout.total_pages(), 4);
        let mut ch = scaled.open(ChannelClass::Bulk(0)).unwrap();
        ch.send(&[PageRange::new(1, 3)]).unwrap();
        let mut buf = vec![0u8; 6 * MIB];
        let mut reports = Vec::new();
        ch.recv_streaming(&mut buf, &mut |prefix| {
            assert!(
                prefix == &bytes[2 * MIB..2 * MIB + prefix.len()],
                "a prefix reported before its bytes"
            );
            reports.push(prefix.len());
        })
        .unwrap();
        assert!(buf == bytes[2 * MIB..], "the reply's bytes");
        assert_eq!(reports, [2 * MIB, 4 * MIB]);
        // A request the inner channel cannot hold outstanding whole is
        // refused before any part of it is sent: fill the inner channel,
        // make room for one inner request, ask for two pages.
        let page = |p: usize| &bytes[p * 2 * MIB..(p + 1) * 2 * MIB];
        let mut sent = 0;
        while ch.send(&[PageRange::new(0, 1)]).is_ok() {
            sent += 1;
            assert!(sent <= 4096, "never refused");
        }
        let mut buf = vec![0u8; 2 * MIB];
        ch.recv(&mut buf).unwrap();
        let refused = ch.send(&[PageRange::new(1, 2)]).unwrap_err();
        assert!(matches!(refused, TransportError::Misuse(_)), "{refused}");
        for _ in 1..sent {
            ch.recv(&mut buf).unwrap();
            assert!(buf == page(0), "an earlier request's reply");
        }
        // Nothing of the refused request went out: the next reply is the
        // next request's.
        ch.send(&[PageRange::new(3, 1)]).unwrap();
        ch.recv(&mut buf).unwrap();
        assert!(buf == page(3), "a part of the refused request went out");
        // A plain receive gets the same bytes.
        ch.send(&[PageRange::new(0, 1)]).unwrap();
        let mut one = vec![0u8; 2 * MIB];
        ch.recv(&mut one).unwrap();
        assert!(one == bytes[..2 * MIB], "a plain receive's bytes");
    }
}
