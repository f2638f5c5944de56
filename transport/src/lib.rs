//! Page transports for pagewire.
//!
//! The engine asks a [`Transport`] for pages by global page index and gets
//! their bytes in a buffer it owns; it never learns how they travelled. A
//! transport knows nothing of userfaultfd or of how pages are installed.
//!
//! Backends:
//! - [`tcp`]: a page server on the source and a client with one urgent
//!   connection for faults and one bulk connection per pusher lane.
//! - [`inproc`]: memcpy from the source's memory in the same process, the
//!   floor every other transport is measured against.

#![deny(missing_docs)]

pub mod error;
pub mod inproc;
pub mod layout;
#[cfg(feature = "rdma")]
pub mod rdma;
pub mod source;
pub mod tcp;
pub mod wire;

pub use error::{LayoutError, RemoteCode, TransportError};
pub use layout::{MemoryLayout, PageRange, RegionInfo, SourceInfo, ZeroMap, PAGE_SIZE};
pub use source::{page_checksum, SourceMemory};
pub use wire::SourceStats;

/// Which path a channel is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChannelClass {
    /// Faults: a vCPU is blocked until the page arrives. Never queued
    /// behind bulk traffic.
    Urgent,
    /// Background push and prepaging, lane `n`.
    Bulk(u16),
}

/// A source of pages, as the destination sees it.
pub trait Transport: Send + Sync {
    /// Short name for reports: `tcp`, `inproc`, `rdma`.
    fn name(&self) -> &'static str;

    /// Layout and zero map learnt at the handshake.
    fn info(&self) -> &SourceInfo;

    /// Opens a channel for one thread's fetches.
    fn open(&self, class: ChannelClass) -> Result<Box<dyn PageChannel>, TransportError>;

    /// Checksums of the source's pages of `range`, for verification.
    fn checksums(&self, range: PageRange) -> Result<Vec<u64>, TransportError>;

    /// How much work the source's data path has done so far.
    fn source_stats(&self) -> Result<SourceStats, TransportError>;
}

/// One thread's connection to the source's pages.
pub trait PageChannel: Send {
    /// Fetches `ranges` into `buf`, one after another: range `i` lands right
    /// after range `i - 1`. `buf` must be exactly as long as the pages.
    fn fetch(&mut self, ranges: &[PageRange], buf: &mut [u8]) -> Result<(), TransportError>;
}

/// Bytes needed to hold `ranges`.
pub fn ranges_len(ranges: &[PageRange], page_size: usize) -> usize {
    ranges.iter().map(|r| r.count as usize).sum::<usize>() * page_size
}

/// Checks that `buf` holds exactly the pages of `ranges`; returns its length.
/// Every [`PageChannel::fetch`] starts with this.
pub fn check_buffer(
    ranges: &[PageRange],
    page_size: usize,
    buf: &[u8],
) -> Result<usize, TransportError> {
    let want = ranges_len(ranges, page_size);
    if buf.len() != want {
        return Err(TransportError::BufferSize {
            want,
            got: buf.len(),
        });
    }
    Ok(want)
}
