//! In-process transport: memcpy from the source's memory. The floor other
//! transports are measured against; not a way to migrate between hosts.

use std::collections::VecDeque;
use std::sync::{Arc, OnceLock};

use crate::dirty::PageSet;
use crate::error::TransportError;
use crate::landing::Landing;
use crate::layout::{PageRange, SourceInfo};
use crate::source::SourceMemory;
use crate::wire::SourceStats;
use crate::{check_buffer, ChannelClass, FetchLimits, PageChannel, Transport};

/// A transport that copies pages straight out of a [`SourceMemory`].
#[derive(Debug, Clone)]
pub struct InProcTransport {
    source: Arc<SourceMemory>,
    landing: OnceLock<Arc<Landing>>,
    /// What the handshake would have said when this transport was made.
    info: SourceInfo,
}

impl InProcTransport {
    /// Serves pages from `source`.
    pub fn new(source: Arc<SourceMemory>) -> Self {
        let info = source.handshake_info();
        Self {
            source,
            info,
            landing: OnceLock::new(),
        }
    }
}

/// Most requests an in-process channel keeps outstanding.
const INPROC_MAX_OUTSTANDING: usize = 64;

struct InProcChannel {
    source: Arc<SourceMemory>,
    /// Requests not received yet, and whether each lands its pages.
    outstanding: VecDeque<(Vec<PageRange>, bool)>,
    landing: Option<Arc<Landing>>,
}

impl PageChannel for InProcChannel {
    fn send(&mut self, ranges: &[PageRange]) -> Result<(), TransportError> {
        if self.outstanding.len() >= INPROC_MAX_OUTSTANDING {
            return Err(TransportError::Misuse("too many requests outstanding"));
        }
        FetchLimits::WIRE.check(ranges)?;
        self.outstanding.push_back((ranges.to_vec(), false));
        Ok(())
    }

    fn recv(&mut self, buf: &mut [u8]) -> Result<(), TransportError> {
        match self.outstanding.pop_front() {
            Some((ranges, false)) => copy_ranges(&self.source, &ranges, buf),
            Some(_) => Err(TransportError::Misuse("recv of a request sent to land")),
            None => Err(TransportError::Misuse("recv with no request outstanding")),
        }
    }

    fn send_landed(&mut self, ranges: &[PageRange]) -> Result<(), TransportError> {
        Landing::of(&self.landing)?.check(ranges)?;
        if self.outstanding.len() >= INPROC_MAX_OUTSTANDING {
            return Err(TransportError::Misuse("too many requests outstanding"));
        }
        FetchLimits::WIRE.check(ranges)?;
        self.outstanding.push_back((ranges.to_vec(), true));
        Ok(())
    }

    fn recv_landed(&mut self) -> Result<(), TransportError> {
        let landing = Landing::of(&self.landing)?.clone();
        let ranges = match self.outstanding.pop_front() {
            Some((ranges, true)) => ranges,
            Some(_) => {
                return Err(TransportError::Misuse(
                    "recv_landed of a request sent to a buffer",
                ))
            }
            None => return Err(TransportError::Misuse("recv with no request outstanding")),
        };
        let mut pages = 0;
        for r in &ranges {
            let src = self.source.pages(*r)?;
            landing.populate(*r);
            if src.len() != r.count as usize * landing.page_size() {
                return Err(TransportError::BufferSize {
                    want: r.count as usize * landing.page_size(),
                    got: src.len(),
                });
            }
            // SAFETY: this channel's request holds these pages (their
            // fetcher claimed them, see `Landing::new`).
            unsafe { landing.write(*r, 0, src) }?;
            pages += u64::from(r.count);
        }
        self.source.count_served(pages);
        Ok(())
    }

    fn reply_ready(&mut self) -> Result<bool, TransportError> {
        Ok(!self.outstanding.is_empty())
    }

    fn outstanding(&self) -> usize {
        self.outstanding.len()
    }

    fn max_outstanding(&self) -> usize {
        INPROC_MAX_OUTSTANDING
    }
}

/// Copies `ranges` of `source` into `buf` back to back, counting the work
/// as served by the source's data path.
pub fn copy_ranges(
    source: &SourceMemory,
    ranges: &[PageRange],
    buf: &mut [u8],
) -> Result<(), TransportError> {
    let ps = source.info().layout.page_size();
    let want = check_buffer(ranges, ps, buf)?;
    let mut off = 0;
    for r in ranges {
        let src = source.pages(*r)?;
        buf[off..off + src.len()].copy_from_slice(src);
        off += src.len();
    }
    source.count_served(want as u64 / ps as u64);
    Ok(())
}

impl Transport for InProcTransport {
    fn name(&self) -> &'static str {
        "inproc"
    }

    fn info(&self) -> &SourceInfo {
        &self.info
    }

    fn open(&self, _class: ChannelClass) -> Result<Box<dyn PageChannel>, TransportError> {
        Ok(Box::new(InProcChannel {
            source: self.source.clone(),
            outstanding: VecDeque::new(),
            landing: self.landing.get().cloned(),
        }))
    }

    fn set_landing(&self, landing: Arc<Landing>) -> Result<bool, TransportError> {
        Ok(Landing::adopt(
            &self.landing,
            landing,
            self.info.layout.page_size(),
        ))
    }

    fn dirty_round(&self, round: u32, pause: bool) -> Result<PageSet, TransportError> {
        self.source
            .dirty_round(round, pause)
            .map_err(|e| TransportError::Remote {
                code: e.remote_code(),
                message: e.to_string(),
            })
    }

    fn checksums(&self, range: PageRange) -> Result<Vec<u64>, TransportError> {
        Ok(self.source.checksums(range)?)
    }

    fn source_stats(&self) -> Result<SourceStats, TransportError> {
        Ok(self.source.stats())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layout::MemoryLayout;

    #[test]
    fn landed_requests_are_checked_and_kept_apart_from_buffered_ones() {
        let layout = MemoryLayout::single(4 * 4096).unwrap();
        let bytes: Vec<u8> = (0..4 * 4096).map(|i| (i / 4096) as u8 + 1).collect();
        let src = Arc::new(SourceMemory::new(layout, vec![Arc::new(bytes)]).unwrap());
        let t = InProcTransport::new(src);
        // No landing memory yet: landed requests are refused.
        let mut before = t.open(ChannelClass::Urgent).unwrap();
        let one = [PageRange::new(1, 1)];
        assert!(matches!(
            before.send_landed(&one),
            Err(TransportError::Misuse(_))
        ));
        // Landing memory for pages 0..2 only.
        let mem = Arc::new(std::sync::Mutex::new(vec![0u8; 2 * 4096]));
        let addr = mem.lock().unwrap().as_mut_ptr() as usize;
        let span = crate::landing::LandingSpan {
            first_page: 0,
            pages: 2,
            addr,
        };
        // SAFETY: the span is `mem`'s buffer, kept alive by the landing;
        // only this test's channel writes it, one request at a time.
        let landing = Arc::new(unsafe { Landing::new(4096, vec![span], mem.clone()) }.unwrap());
        assert!(t.set_landing(landing.clone()).unwrap());
        // The same memory offered again (a resumed migration) is taken;
        // other memory is not: channels land in the first.
        assert!(t.set_landing(landing.clone()).unwrap());
        // SAFETY: as above; this landing is refused and never written.
        let other = unsafe { Landing::new(4096, vec![span], mem.clone()) }.unwrap();
        assert!(!t.set_landing(Arc::new(other)).unwrap());
        let mut ch = t.open(ChannelClass::Urgent).unwrap();
        assert!(
            matches!(
                ch.send_landed(&[PageRange::new(1, 2)]),
                Err(TransportError::Misuse(_))
            ),
            "a range past the landing memory"
        );
        ch.send_landed(&one).unwrap();
        // A landed reply is not received into a buffer, nor the reverse.
        let mut buf = vec![0u8; 4096];
        assert!(matches!(ch.recv(&mut buf), Err(TransportError::Misuse(_))));
        ch.send_landed(&one).unwrap();
        ch.recv_landed().unwrap();
        assert!(mem.lock().unwrap()[4096..].iter().all(|&b| b == 2));
        ch.send(&one).unwrap();
        assert!(matches!(ch.recv_landed(), Err(TransportError::Misuse(_))));
    }

    #[test]
    fn a_buffer_of_the_wrong_size_is_refused() {
        let layout = MemoryLayout::single(4 * 4096).unwrap();
        let src = SourceMemory::new(layout, vec![Arc::new(vec![1u8; 4 * 4096])]).unwrap();
        let mut small = vec![0u8; 4096];
        let err = copy_ranges(&src, &[PageRange::new(0, 2)], &mut small).unwrap_err();
        assert!(
            matches!(
                err,
                TransportError::BufferSize {
                    want: 8192,
                    got: 4096
                }
            ),
            "{err}"
        );
        let mut ok = vec![0u8; 8192];
        copy_ranges(&src, &[PageRange::new(0, 2)], &mut ok).unwrap();
        assert!(ok.iter().all(|&b| b == 1));
    }
}
