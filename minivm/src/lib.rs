//! A tiny KVM VMM on kvm-ioctls, to migrate a real multi-vCPU guest
//! post-copy with pagewire.
//!
//! The guest is written here, not booted: on these machines `/dev/kvm`
//! runs hand-written long-mode code but not a Linux kernel (the host is
//! itself a guest). Each vCPU fills its share of guest memory with a
//! pseudo-random sequence, then runs checksum passes over it that also
//! rewrite every word, reporting progress and its result through port
//! I/O. The result depends on every byte of its share, so a page lost,
//! corrupted or replaced by zeros in a migration changes it.
//!
//! - [`guest`]: the guest program, its memory map and a reference result.
//! - [`boot`]: GDT, page tables and the long-mode vCPU state it starts in.
//! - [`vcpu`]: a vCPU's saved state and its run loop.
//! - [`vm`]: the VM: memory slot, vCPUs, run, pause, restore.

#![deny(missing_docs)]

pub mod boot;
pub mod error;
pub mod guest;
pub mod vcpu;
pub mod vm;

pub use error::VmError;
pub use guest::GuestConfig;
pub use vcpu::{VcpuOutcome, VcpuState};
pub use vm::{kvm_unavailable, MiniVm, RunControl, RunOutcome};
