//! The pagewire post-copy engine.
//!
//! At the destination, guest memory starts empty and registered with
//! userfaultfd. A vCPU touching a missing page faults; a fault service
//! claims the page in the [`state::PageStateMap`], fetches it on its
//! urgent channel, installs it with UFFDIO_COPY and wakes the vCPU. Meanwhile pusher lanes prepage the bubble around the last fault
//! and sweep the rest, so the migration ends in bounded time. Zero pages
//! never cross the wire. The engine sees only the
//! [`pagewire_transport::Transport`] trait, never a backend.

#![deny(missing_docs)]

mod arrival;
pub mod config;
pub mod error;
mod fault;
pub mod governor;
pub mod heat;
mod lanes;
mod link;
mod madvise;
pub mod memory;
pub mod metrics;
pub mod migration;
mod parked;
pub mod placement;
pub mod precopy;
pub mod prepager;
mod region;
pub mod report;
mod scaled;
mod shared;
pub mod state;
pub mod uffd;
mod vma;
pub mod waits;
pub mod write_tracker;
mod zeros;

pub use config::{MigrationConfig, SharedInstall};
pub use error::{EngineError, RegionError};
pub use governor::FlowStats;
pub use memory::{DestMemory, GuestRegion};
pub use metrics::LatencyUs;
pub use migration::{Migration, MigrationHandle};
pub use parked::ParkedMigration;
pub use precopy::{precopy, Precopied, PrecopyConfig, PrecopyReport, SwitchOver};
pub use prepager::PrepagerKind;
pub use report::{EngineReport, InstallPath, LiveMetrics};
pub use state::PageOrigin;
/// A file and offset backing a region of shared guest memory, as
/// [`DestMemory::from_vmm_shared`] takes it (vm-memory's own type).
pub use vm_memory::FileOffset;
pub use write_tracker::WriteTracker;
