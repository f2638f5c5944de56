//! Typed errors of the transport layer.

use std::io;

/// A layout or page range that does not fit the rules.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum LayoutError {
    /// A page size that is not a power of two between 4 KiB and 1 GiB
    /// (or, on the wire, not 4 KiB: sources serve 4 KiB pages).
    #[error("unsupported page size {0}")]
    PageSize(usize),
    /// No regions, or too many.
    #[error("a layout needs 1 to 256 regions, got {0}")]
    RegionCount(usize),
    /// A region's base or length is not page aligned, or it is empty.
    #[error("region {region} is empty or not page aligned")]
    Misaligned {
        /// Index of the offending region.
        region: usize,
    },
    /// A region's end overflows the guest address space.
    #[error("region {region} ends past the end of the address space")]
    Overflow {
        /// Index of the offending region.
        region: usize,
    },
    /// Regions are unsorted or overlap.
    #[error("region {region} overlaps or precedes the region before it")]
    Overlap {
        /// Index of the offending region.
        region: usize,
    },
    /// More pages than a layout may hold.
    #[error("layout has {0} pages, more than the supported maximum")]
    TooLarge(u64),
    /// A page range of zero pages.
    #[error("empty page range")]
    EmptyRange,
    /// A page range outside the layout or across a region boundary.
    #[error("pages {first}..+{count} are out of range (layout has {total} pages, a range must stay in one region)")]
    OutOfRange {
        /// First page asked for.
        first: u64,
        /// Number of pages asked for.
        count: u32,
        /// Pages in the layout.
        total: u64,
    },
}

/// Codes a source puts in an error reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u16)]
pub enum RemoteCode {
    /// The request was malformed; the source closes the connection.
    Malformed = 1,
    /// The request named pages outside the layout; the connection stays up.
    OutOfRange = 2,
    /// The client speaks a protocol version the source does not.
    Version = 3,
    /// The request exceeded a protocol limit; the connection stays up.
    TooLarge = 4,
    /// Authentication failed or was required; the connection closes.
    Auth = 5,
    /// The source serves as many connections as it allows.
    Busy = 6,
    /// The source cannot do what was asked: no pre-copy, its memory is
    /// static (its guest does not run there).
    Unsupported = 7,
    /// Any other failure.
    Other = 255,
}

impl RemoteCode {
    /// Decodes a wire value; unknown values map to [`RemoteCode::Other`].
    pub fn from_wire(v: u16) -> Self {
        match v {
            1 => Self::Malformed,
            2 => Self::OutOfRange,
            3 => Self::Version,
            4 => Self::TooLarge,
            5 => Self::Auth,
            6 => Self::Busy,
            7 => Self::Unsupported,
            _ => Self::Other,
        }
    }
}

/// Everything that can go wrong moving pages.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    /// A socket operation failed.
    #[error("{context}: {error}")]
    Io {
        /// What was being done.
        context: String,
        /// The underlying error.
        error: io::Error,
    },
    /// The peer did not answer within the I/O timeout.
    #[error("{context}: no answer within {secs:.1} s (peer hung or is not a pagewire source)")]
    Timeout {
        /// What was being waited for.
        context: String,
        /// The timeout that expired.
        secs: f64,
    },
    /// The peer closed the connection.
    #[error("{context}: the source closed the connection (did it exit or crash?)")]
    Closed {
        /// What was being done.
        context: String,
    },
    /// The peer is not a pagewire endpoint (wrong magic).
    #[error("the peer is not a pagewire source (bad handshake magic {0:02x?})")]
    NotPagewire([u8; 4]),
    /// The peer speaks another protocol version.
    #[error("protocol version mismatch: we speak {ours}, the peer {theirs}")]
    Version {
        /// Our version.
        ours: u16,
        /// Theirs.
        theirs: u16,
    },
    /// A message broke the protocol.
    #[error("protocol error: {0}")]
    Protocol(String),
    /// The source rejected a request.
    #[error("the source rejected the request ({code:?}): {message}")]
    Remote {
        /// Why.
        code: RemoteCode,
        /// The source's message.
        message: String,
    },
    /// A request broke a layout rule before it was sent.
    #[error(transparent)]
    Layout(#[from] LayoutError),
    /// The caller's buffer does not match the pages asked for.
    #[error("buffer of {got} bytes for {want} bytes of pages")]
    BufferSize {
        /// Bytes needed.
        want: usize,
        /// Bytes given.
        got: usize,
    },
    /// A request asks for more than one request may carry.
    #[error("a request of {ranges} ranges and {pages} pages exceeds the limits ({} ranges, {} pages)", limits.max_ranges, limits.max_pages)]
    TooLarge {
        /// Ranges asked for.
        ranges: usize,
        /// Pages asked for.
        pages: u64,
        /// The limits in force.
        limits: crate::FetchLimits,
    },
    /// More requests than the channel keeps outstanding, or a reply
    /// awaited with none outstanding.
    #[error("channel misuse: {0}")]
    Misuse(&'static str),
    /// The source requires authentication and no key was given.
    #[error("the source requires authentication: give the shared key with --auth-key-file")]
    AuthRequired,
    /// Authentication failed: the peer does not hold the key, or does not
    /// authenticate at all though we require it.
    #[error("authentication failed: {0}")]
    AuthFailed(String),
    /// Writing received pages into landing memory failed: the
    /// destination's memory refused them (out of memory, a file size
    /// limit), not the link.
    #[error("writing pages into landing memory: {0}")]
    Landing(io::Error),
    /// The RDMA backend failed.
    #[error("rdma: {0}")]
    Rdma(#[from] RdmaError),
    /// The control connection was lost and did not come back within the
    /// recovery timeout (reconnects were tried with backoff until then).
    #[error(
        "link to the source lost ({lost}) and not back within {secs:.0} s (last attempt: {last})"
    )]
    RecoveryTimedOut {
        /// The loss.
        lost: Box<TransportError>,
        /// The recovery timeout.
        secs: f64,
        /// Why the last attempt failed.
        last: Box<TransportError>,
    },
}

/// What went wrong in the RDMA backend, by what a caller can do about it.
#[derive(Debug, thiserror::Error)]
pub enum RdmaError {
    /// No usable device (none, not the one named, no active port or GID).
    #[error("{0}")]
    NoDevice(String),
    /// A verbs call failed.
    #[error("{call}: {error}")]
    Verbs {
        /// The call.
        call: String,
        /// The errno.
        error: io::Error,
    },
    /// No completion arrived in time: the source died or the link is down.
    #[error("no RDMA READ completion within {secs:.1} s (the source died or the link is down)")]
    CompletionTimeout {
        /// The timeout.
        secs: f64,
    },
    /// The peer's retries ran out or the queue pair went to the error state
    /// (the link or the peer is gone).
    #[error("RDMA READ failed: {status} (the source died, its queue pair went to error or the link dropped)")]
    QpError {
        /// The completion status.
        status: String,
    },
    /// The source refused the READ: address or key not valid for it.
    #[error("RDMA READ refused by the source: {status} (a region or rkey does not match)")]
    RemoteAccess {
        /// The completion status.
        status: String,
    },
    /// Any other error completion.
    #[error("RDMA READ failed: {status}")]
    Completion {
        /// The completion status.
        status: String,
    },
    /// A completion for a work request other than the next one posted.
    #[error("completion for work request {got}, expected {want}")]
    UnexpectedWrId {
        /// What completed.
        got: u64,
        /// What was due.
        want: u64,
    },
    /// The device stopped answering (removed, or its completion queue
    /// broke).
    #[error("RDMA device removed or its completion queue failed")]
    DeviceRemoved,
}

impl TransportError {
    /// Whether this is the link failing (a reset, a timeout, a closed
    /// connection, a busy source) rather than the source refusing us or
    /// breaking the protocol: a lost link may come back. A refused
    /// connection means nothing listens any more: the source is gone.
    pub fn is_link_loss(&self) -> bool {
        match self {
            Self::Timeout { .. } | Self::Closed { .. } => true,
            Self::Io { error, .. } => error.kind() != io::ErrorKind::ConnectionRefused,
            Self::Remote { code, .. } => *code == RemoteCode::Busy,
            Self::Rdma(RdmaError::CompletionTimeout { .. } | RdmaError::QpError { .. }) => true,
            _ => false,
        }
    }

    /// Maps an I/O error, telling timeouts and closed peers apart.
    pub fn io(context: impl Into<String>, error: io::Error, timeout: Option<f64>) -> Self {
        let context = context.into();
        match error.kind() {
            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => Self::Timeout {
                context,
                secs: timeout.unwrap_or(0.0),
            },
            io::ErrorKind::UnexpectedEof
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::BrokenPipe => Self::Closed { context },
            _ => Self::Io { context, error },
        }
    }
}
