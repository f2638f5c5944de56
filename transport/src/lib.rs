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

pub mod auth;
pub mod dirty;
pub mod error;
pub mod inproc;
pub mod landing;
pub mod layout;
#[cfg(feature = "rdma")]
pub mod rdma;
pub mod source;
pub mod tcp;
pub mod wire;

pub use auth::AuthKey;
pub use dirty::{DirtyError, DirtyLog, PageSet};
pub use error::{LayoutError, RdmaError, RemoteCode, TransportError};
pub use landing::{Landing, LandingSpan, SpanFile};
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

    /// The most one request may ask for.
    fn limits(&self) -> FetchLimits {
        FetchLimits::WIRE
    }

    /// Checksums of the source's pages of `range`, for verification.
    fn checksums(&self, range: PageRange) -> Result<Vec<u64>, TransportError>;

    /// How much work the source's data path has done so far.
    fn source_stats(&self) -> Result<SourceStats, TransportError>;

    /// The source's session id, when the transport has one: the same
    /// source process (the same memory) answers with the same id.
    fn session(&self) -> Option<u64> {
        None
    }

    /// Pre-copy round `round` (1, 2, ...): the pages the source's guest
    /// wrote since the round before (since tracking began, for round 1).
    /// With `pause` the source pauses its guest first: the switch-over.
    /// Asking the same round again is safe and loses no write.
    fn dirty_round(&self, round: u32, pause: bool) -> Result<PageSet, TransportError> {
        let _ = (round, pause);
        Err(TransportError::Remote {
            code: RemoteCode::Unsupported,
            message: format!("the {} transport carries no pre-copy rounds", self.name()),
        })
    }

    /// Offers destination memory to land pages in directly (see
    /// [`landing`]). Returns whether this transport will: channels opened
    /// afterwards then take [`PageChannel::send_landed`]. A transport that
    /// cannot (the default) answers false and the caller receives into
    /// buffers. A transport lands pages in one memory: the same landing
    /// offered again (a resumed migration) is taken, another is not.
    fn set_landing(&self, landing: std::sync::Arc<Landing>) -> Result<bool, TransportError> {
        let _ = landing;
        Ok(false)
    }

    /// Whether pages this transport lands reach memory without the
    /// destination's CPU copying them (an RDMA NIC writes them). Only
    /// then does landing save work over a `UFFDIO_COPY` from a buffer: a
    /// transport that copies on the CPU anyway (TCP, in-process) fills
    /// shared memory faster through `UFFDIO_COPY` (see the README). The
    /// default is false.
    fn lands_without_copy(&self) -> bool {
        false
    }

    /// Tells the source this destination has every page (and has
    /// verified them, if it does): the source may release the memory.
    fn done(&self) -> Result<(), TransportError> {
        Ok(())
    }
}

/// The most one fetch request may ask for. The engine splits its batches
/// so that no request exceeds them; a request that does is refused before
/// anything is sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FetchLimits {
    /// Most page ranges in one request.
    pub max_ranges: usize,
    /// Most pages in one request.
    pub max_pages: u64,
}

impl FetchLimits {
    /// The limits of the TCP wire protocol, which every backend shares.
    pub const WIRE: Self = Self {
        max_ranges: wire::MAX_RANGES,
        max_pages: wire::MAX_FETCH_PAGES,
    };

    /// Checks `ranges` against the limits.
    pub fn check(&self, ranges: &[PageRange]) -> Result<u64, TransportError> {
        let pages: u64 = ranges.iter().map(|r| u64::from(r.count)).sum();
        if ranges.is_empty() || ranges.len() > self.max_ranges || pages > self.max_pages {
            return Err(TransportError::TooLarge {
                ranges: ranges.len(),
                pages,
                limits: *self,
            });
        }
        Ok(pages)
    }
}

/// One thread's connection to the source's pages.
///
/// Requests are pipelined: [`PageChannel::send`] puts a request on the
/// wire and returns; [`PageChannel::recv`] takes the reply to the oldest
/// outstanding request. Up to [`PageChannel::max_outstanding`] requests may
/// be outstanding at once. [`PageChannel::fetch`] does one request and
/// waits for it.
pub trait PageChannel: Send {
    /// Sends a request for `ranges` (within [`FetchLimits::WIRE`]) without
    /// waiting for the reply.
    fn send(&mut self, ranges: &[PageRange]) -> Result<(), TransportError>;

    /// Receives the pages of the oldest outstanding request into `buf`,
    /// range after range. `buf` must be exactly as long as those pages.
    /// Waits up to the channel's I/O timeout.
    fn recv(&mut self, buf: &mut [u8]) -> Result<(), TransportError>;

    /// [`PageChannel::recv`], telling `arrived` about the bytes at the
    /// front of `buf` that hold their final contents while the rest is
    /// still coming (each call with a prefix no shorter than the last,
    /// never the whole of `buf`). The caller may use those bytes at once;
    /// the whole of `buf` is filled only when this returns `Ok`. A channel
    /// that receives a reply all at once (the default, and wrappers that
    /// do not forward this) never calls `arrived`.
    fn recv_streaming(
        &mut self,
        buf: &mut [u8],
        arrived: &mut dyn FnMut(&[u8]),
    ) -> Result<(), TransportError> {
        let _ = arrived;
        self.recv(buf)
    }

    /// Whether a reply can be received without waiting.
    fn reply_ready(&mut self) -> Result<bool, TransportError>;

    /// A file descriptor that polls readable when a reply may be ready,
    /// for callers that wait on several things at once; `None` when the
    /// channel can only be polled with [`PageChannel::reply_ready`].
    fn ready_fd(&self) -> Option<std::os::fd::RawFd> {
        None
    }

    /// Requests sent and not yet received.
    fn outstanding(&self) -> usize;

    /// Most requests this channel keeps outstanding.
    fn max_outstanding(&self) -> usize;

    /// Sends a request whose pages the channel writes itself, each to its
    /// place in the landing memory the transport accepted
    /// ([`Transport::set_landing`]); every range must lie in one landing
    /// span. Its reply is taken with [`PageChannel::recv_landed`].
    fn send_landed(&mut self, ranges: &[PageRange]) -> Result<(), TransportError> {
        let _ = ranges;
        Err(TransportError::Misuse("this channel has no landing memory"))
    }

    /// Waits for the oldest outstanding request, sent with
    /// [`PageChannel::send_landed`], to have landed its pages.
    fn recv_landed(&mut self) -> Result<(), TransportError> {
        Err(TransportError::Misuse("this channel has no landing memory"))
    }

    /// [`PageChannel::recv_landed`], telling `arrived` how many bytes of
    /// the reply (its ranges in request order, back to back) have landed
    /// while the rest is still coming, as
    /// [`PageChannel::recv_streaming`] does. Whole pages among those bytes
    /// are never written again: the caller may map them into the guest
    /// at once.
    fn recv_landed_streaming(
        &mut self,
        arrived: &mut dyn FnMut(usize),
    ) -> Result<(), TransportError> {
        let _ = arrived;
        self.recv_landed()
    }

    /// Fetches `ranges` into `buf`, one after another: range `i` lands right
    /// after range `i - 1`. Only valid with nothing outstanding.
    fn fetch(&mut self, ranges: &[PageRange], buf: &mut [u8]) -> Result<(), TransportError> {
        if self.outstanding() != 0 {
            return Err(TransportError::Misuse(
                "fetch on a channel with requests outstanding",
            ));
        }
        self.send(ranges)?;
        self.recv(buf)
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fetch_limits_accept_the_limit_and_refuse_past_it() {
        let l = FetchLimits::WIRE;
        let at: Vec<PageRange> = (0..l.max_ranges as u64)
            .map(|i| PageRange::new(i * 2, 1))
            .collect();
        assert_eq!(l.check(&at).unwrap(), l.max_ranges as u64);
        let mut past = at.clone();
        past.push(PageRange::new(1 << 20, 1));
        assert!(matches!(
            l.check(&past),
            Err(TransportError::TooLarge { ranges, .. }) if ranges == l.max_ranges + 1
        ));
        let big = [PageRange::new(0, l.max_pages as u32)];
        assert!(l.check(&big).is_ok());
        let bigger = [PageRange::new(0, l.max_pages as u32 + 1)];
        assert!(matches!(
            l.check(&bigger),
            Err(TransportError::TooLarge { .. })
        ));
        assert!(l.check(&[]).is_err());
    }
}
