//! The embedding API: how a VMM hands its guest memory to pagewire and
//! pulls it post-copy from a source.
//!
//! ```no_run
//! use std::os::fd::OwnedFd;
//! use pagewire_engine::{DestMemory, GuestRegion, MigrationConfig};
//! use pagewire_vmm_glue::embed::{Destination, TransportChoice, UffdSetup};
//!
//! # fn vmm(host_addr: u64, uffd: OwnedFd) -> Result<(), Box<dyn std::error::Error>> {
//! // The guest memory the VMM mapped, untouched since.
//! let regions = [GuestRegion { guest_base: 0, host_addr, size: 1 << 30, page_size: 4096 }];
//! // SAFETY: the VMM keeps these mappings for the life of the process.
//! let memory = unsafe { DestMemory::from_vmm(&regions)? };
//! let migration = Destination::new("192.0.2.1:7070")
//!     .transport(TransportChoice::default())
//!     .config(MigrationConfig::default())
//!     .start(memory, UffdSetup::Existing(uffd))?;
//! // ... resume the vCPUs now; faults are served over the network ...
//! let live = migration.metrics();
//! println!("{} of {} pages here", live.pages_present, live.pages_total);
//! let report = migration.wait()?;
//! # Ok(()) }
//! ```
//!
//! If the migration fails or is aborted, guest memory stays registered:
//! vCPUs touching pages that never arrived stay blocked (they never read
//! zeros), and the VMM decides what to do with the guest.

mod transport;

use std::os::fd::OwnedFd;
use std::sync::Arc;

use pagewire_engine::uffd::PageInstaller;
use pagewire_engine::{
    DestMemory, EngineError, Migration, MigrationConfig, MigrationHandle, RegionError,
};
use pagewire_transport::tcp::TcpOptions;
use pagewire_transport::{Transport, TransportError};

pub use transport::{connect, RdmaOptions, TransportChoice};

/// Where faults on guest memory are read from.
#[derive(Debug)]
pub enum UffdSetup {
    /// pagewire creates a userfaultfd and registers every region (memory
    /// in this process only). It receives faults raised in kernel context
    /// (KVM vCPUs, vhost), or fails with
    /// [`RegionError::KernelFaultsRefused`]; it never falls back to
    /// user-mode-only faults.
    Create,
    /// A userfaultfd the VMM created and registered in MISSING mode over
    /// every region (as Firecracker and QEMU do). pagewire takes
    /// ownership. Over shared memory pages are then copied in with
    /// UFFDIO_COPY, never landed; a uffd also registered for minor faults
    /// is refused.
    Existing(OwnedFd),
}

/// Why a migration could not start.
#[derive(Debug, thiserror::Error)]
pub enum EmbedError {
    /// The guest memory handed in is unusable.
    #[error(transparent)]
    Region(#[from] RegionError),
    /// The source could not be reached or refused us.
    #[error("cannot reach the source")]
    Connect(#[source] TransportError),
    /// RDMA was asked for and cannot be used.
    #[error("RDMA unavailable")]
    Rdma(#[source] TransportError),
    /// The engine refused to start.
    #[error(transparent)]
    Engine(EngineError),
}

impl From<EngineError> for EmbedError {
    fn from(e: EngineError) -> Self {
        match e {
            EngineError::Region(r) => Self::Region(r),
            e => Self::Engine(e),
        }
    }
}

/// A post-copy migration into a VMM's guest memory, configured and then
/// started with [`Destination::start`].
#[derive(Debug, Clone)]
pub struct Destination {
    source: String,
    transport: TransportChoice,
    config: MigrationConfig,
    tcp: TcpOptions,
}

impl Destination {
    /// A migration from the pagewire source at `source` (`host:port`).
    pub fn new(source: impl Into<String>) -> Self {
        Self {
            source: source.into(),
            transport: TransportChoice::default(),
            config: MigrationConfig::default(),
            tcp: TcpOptions::default(),
        }
    }

    /// Which transport to use (default: RDMA when a device is up, else
    /// TCP).
    pub fn transport(mut self, choice: TransportChoice) -> Self {
        self.transport = choice;
        self
    }

    /// Lanes, bubbles, push and flow control.
    pub fn config(mut self, config: MigrationConfig) -> Self {
        self.config = config;
        self
    }

    /// Connection timeouts (a source that stops answering is reported
    /// after `io_timeout`).
    pub fn tcp_options(mut self, opts: TcpOptions) -> Self {
        self.tcp = opts;
        self
    }

    /// Connects to the source, checks that `memory` matches what it serves,
    /// binds the userfaultfd and starts serving faults and pushing pages.
    /// Resume the guest once this returns.
    ///
    /// Everything that can be refused (regions, the userfaultfd, the
    /// source's layout) is checked before any page is installed.
    pub fn start(self, memory: DestMemory, uffd: UffdSetup) -> Result<MigrationHandle, EmbedError> {
        let transport = connect(&self.source, self.transport, self.tcp)?;
        Self::start_over(transport, memory, uffd, self.config)
    }

    /// [`Self::start`] over a transport the caller connected.
    pub fn start_over(
        transport: Arc<dyn Transport>,
        memory: DestMemory,
        uffd: UffdSetup,
        config: MigrationConfig,
    ) -> Result<MigrationHandle, EmbedError> {
        memory.check_source(&transport.info().layout)?;
        let memory = Arc::new(memory);
        let installer = match uffd {
            UffdSetup::Create => PageInstaller::create_for_kvm(memory)?,
            UffdSetup::Existing(fd) => PageInstaller::with_uffd(memory, fd)?,
        };
        Ok(Migration::start_with_installer(
            transport, installer, config,
        )?)
    }
}
