//! Typed errors of the engine.

use pagewire_transport::{LayoutError, TransportError};

/// Everything that can stop a migration.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// userfaultfd could not be opened or an ioctl failed.
    #[error("userfaultfd: {context}: {error:?}")]
    Uffd {
        /// What was being done.
        context: String,
        /// The underlying error (its Display omits the errno, so it is
        /// shown with Debug and not chained).
        error: userfaultfd::Error,
    },
    /// Destination guest memory could not be set up.
    #[error("guest memory: {0}")]
    Memory(String),
    /// The layout from the source is unusable.
    #[error(transparent)]
    Layout(#[from] LayoutError),
    /// Fetching pages failed.
    #[error(transparent)]
    Transport(#[from] TransportError),
    /// A fault arrived for an address outside the migrating memory.
    #[error("fault at {0:#x} is outside the migrating guest memory")]
    StrayFault(usize),
    /// A thread could not be started.
    #[error("cannot start thread {name}: {error}")]
    Thread {
        /// Which thread.
        name: String,
        /// Why.
        error: std::io::Error,
    },
    /// The link to the source was lost and did not come back in time.
    #[error(
        "link to the source lost ({lost}) and not back within {secs:.0} s (last attempt: {last})"
    )]
    RecoveryTimedOut {
        /// The loss.
        lost: TransportError,
        /// The recovery timeout.
        secs: f64,
        /// Why the last reconnect failed.
        last: TransportError,
    },
    /// The link was lost and the source refuses connections: it is gone.
    #[error(
        "link to the source lost ({lost}) and reconnecting failed ({refused}): the source is gone"
    )]
    SourceGone {
        /// The loss.
        lost: TransportError,
        /// The refusal.
        refused: TransportError,
    },
    /// Guest memory handed in by a VMM is unusable.
    #[error(transparent)]
    Region(#[from] RegionError),
    /// The engine's threads cannot be placed on the CPUs configured.
    #[error(transparent)]
    Placement(#[from] crate::placement::PlacementError),
    /// An engine thread panicked (a bug, or a transport that panicked).
    #[error("engine thread {thread} panicked")]
    Panicked {
        /// Which thread.
        thread: &'static str,
    },
    /// The eventfd that wakes the fault services at the end could not be
    /// created (the process is out of file descriptors).
    #[error("cannot create the migration's eventfd: {0}")]
    EventFd(std::io::Error),
    /// Another part of the migration failed first; see the first error.
    #[error("migration aborted")]
    Aborted,
}

/// Why guest memory regions handed in by a VMM were refused. Every check
/// runs before anything is registered or installed.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RegionError {
    /// No regions at all.
    #[error("no guest memory regions")]
    Empty,
    /// A region of zero bytes.
    #[error("region {region} is empty")]
    EmptyRegion {
        /// Index of the region as handed in.
        region: usize,
    },
    /// A page size that is not a power of two of at least 4 KiB.
    #[error("region {region}: page size {page_size} is not a power of two of at least 4096")]
    BadPageSize {
        /// Index of the region.
        region: usize,
        /// The page size handed in.
        page_size: usize,
    },
    /// A page size pagewire cannot move (yet).
    #[error("region {region}: page size {page_size} is not supported (supported: {supported:?})")]
    UnsupportedPageSize {
        /// Index of the region.
        region: usize,
        /// The page size handed in.
        page_size: usize,
        /// What is supported.
        supported: &'static [usize],
    },
    /// Regions of different page sizes in one guest.
    #[error("region {region} has page size {page_size}, region 0 has {first}")]
    MixedPageSizes {
        /// Index of the region.
        region: usize,
        /// Its page size.
        page_size: usize,
        /// Region 0's.
        first: usize,
    },
    /// A size that is not a multiple of the page size.
    #[error("region {region}: size {size:#x} is not a multiple of the page size {page_size:#x}")]
    SizeNotPageMultiple {
        /// Index of the region.
        region: usize,
        /// The size handed in.
        size: u64,
        /// The page size.
        page_size: usize,
    },
    /// A host or guest address not aligned to the page size.
    #[error(
        "region {region}: {what} address {addr:#x} is not aligned to the page size {page_size:#x}"
    )]
    Unaligned {
        /// Index of the region.
        region: usize,
        /// "host" or "guest".
        what: &'static str,
        /// The address.
        addr: u64,
        /// The page size.
        page_size: usize,
    },
    /// Address arithmetic would overflow.
    #[error("region {region}: address + size overflows")]
    Overflow {
        /// Index of the region.
        region: usize,
    },
    /// Two regions overlap in guest-physical or host-virtual space.
    #[error("regions {a} and {b} overlap in {space} address space")]
    Overlap {
        /// One region.
        a: usize,
        /// The other.
        b: usize,
        /// "guest" or "host".
        space: &'static str,
    },
    /// The regions do not match the memory the source serves.
    #[error("guest memory does not match the source: {0}")]
    LayoutMismatch(String),
    /// Part of a region is not mapped in the process that owns it.
    #[error("region {region}: host address {addr:#x} is not mapped")]
    NotMapped {
        /// Index of the region.
        region: usize,
        /// First unmapped address.
        addr: u64,
    },
    /// Part of a region is mapped but not registered with userfaultfd for
    /// missing-page faults.
    #[error("region {region}: host range at {addr:#x} is not registered with userfaultfd (missing mode)")]
    NotRegistered {
        /// Index of the region.
        region: usize,
        /// Start of the unregistered mapping.
        addr: u64,
    },
    /// The userfaultfd handed in is not usable.
    #[error("the userfaultfd handed in is unusable: {0}")]
    BadUffd(String),
    /// Faults from kernel context (KVM, vhost) cannot be received: the
    /// process lacks the privilege and would silently see only user-mode
    /// faults, which makes KVM accesses fail.
    #[error("userfaultfd for kernel-mode faults refused ({0}): run with CAP_SYS_PTRACE or set vm.unprivileged_userfaultfd=1")]
    KernelFaultsRefused(String),
    /// Shared memory handed in with a file for each region: not as many
    /// files as regions.
    #[error("{files} files for {regions} regions: shared memory needs one file per region")]
    FileCount {
        /// Files handed in.
        files: usize,
        /// Regions handed in.
        regions: usize,
    },
    /// Guest memory on huge pages could not be mapped: the system has
    /// fewer free huge pages than the guest needs.
    #[error("{needed} free 2 MiB huge pages needed, {free} free: raise vm.nr_hugepages")]
    NoHugePages {
        /// Huge pages the guest needs.
        needed: u64,
        /// Huge pages free (and not reserved) when the mapping failed.
        free: u64,
    },
}
