//! In-process transport: memcpy from the source's memory. The floor other
//! transports are measured against; not a way to migrate between hosts.

use std::sync::Arc;

use crate::error::TransportError;
use crate::layout::{PageRange, SourceInfo};
use crate::source::SourceMemory;
use crate::wire::SourceStats;
use crate::{ranges_len, ChannelClass, PageChannel, Transport};

/// A transport that copies pages straight out of a [`SourceMemory`].
#[derive(Debug, Clone)]
pub struct InProcTransport {
    source: Arc<SourceMemory>,
}

impl InProcTransport {
    /// Serves pages from `source`.
    pub fn new(source: Arc<SourceMemory>) -> Self {
        Self { source }
    }
}

struct InProcChannel {
    source: Arc<SourceMemory>,
}

impl PageChannel for InProcChannel {
    fn fetch(&mut self, ranges: &[PageRange], buf: &mut [u8]) -> Result<(), TransportError> {
        copy_ranges(&self.source, ranges, buf)
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
    let want = ranges_len(ranges, ps);
    if buf.len() != want {
        return Err(TransportError::BufferSize {
            want,
            got: buf.len(),
        });
    }
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
        self.source.info()
    }

    fn open(&self, _class: ChannelClass) -> Result<Box<dyn PageChannel>, TransportError> {
        Ok(Box::new(InProcChannel {
            source: self.source.clone(),
        }))
    }

    fn checksums(&self, range: PageRange) -> Result<Vec<u64>, TransportError> {
        Ok(self.source.checksums(range)?)
    }

    fn source_stats(&self) -> Result<SourceStats, TransportError> {
        Ok(self.source.stats())
    }
}
