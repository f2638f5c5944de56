//! How a VMM plugs into pagewire, and the pieces of the `pagewire` CLI.
//!
//! - [`embed`]: the embedding API a VMM uses.
//! - [`firecracker`]: Firecracker's UFFD page-fault-handler protocol.
//! - [`image`]: source guest memory from a file or a synthetic generator.
//! - [`workload`]: touch patterns that stand in for a resumed guest.
//! - [`source_guest`]: a guest still running at the source (pre-copy).
//! - [`trace`]: page-access traces of real programs, recorded and replayed.
//! - [`vm_demo`]: a KVM guest migrated post-copy through the embedding API.
//! - [`results`]: experiment reports rendered as tables and plots.
//! - [`run`]: a destination run: migrate, run the workload, verify, report.

#![deny(missing_docs)]

pub mod embed;
pub mod firecracker;
pub mod image;
pub mod results;
pub mod run;
pub mod source_guest;
pub mod trace;
pub mod vm_demo;
pub mod workload;
