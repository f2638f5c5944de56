//! Firecracker's UFFD page-fault-handler protocol, spoken as-is.
//!
//! Firecracker restores a snapshot with
//! `mem_backend: {backend_type: "Uffd", backend_path: SOCKET}`: it creates
//! the userfaultfd itself (non-blocking, with `UFFD_FEATURE_EVENT_REMOVE`,
//! not user-mode-only), registers guest memory, connects to the handler's
//! Unix socket and sends one message: a JSON array with one object per
//! region (`base_host_virt_addr`, `size`, `offset`, `page_size`,
//! `page_size_kib`) and the userfaultfd as `SCM_RIGHTS` ancillary data.
//! Nothing else is ever sent; Firecracker closing the socket means the VM
//! is gone.
//!
//! - [`handshake`]: receiving and checking that message.
//! - [`handler`]: serving the VM's memory post-copy from a pagewire source
//!   that serves the snapshot memory file.

pub mod handler;
pub mod handshake;

pub use handler::{FcHandler, FcOutcome};
pub use handshake::{parse_mappings, receive, Handshake, HandshakeError};

use pagewire_engine::EngineReport;

/// A human summary of a served VM's migration.
pub fn summary(e: &EngineReport) -> String {
    let l = &e.fault_latency_us;
    format!(
        "pagewire fc-handler: post-copy migration over {transport} complete\n\
         \x20 memory         {pages} pages, {zero} zero pages never sent, {removed} removed by the guest\n\
         \x20 total time     {total:.1} ms (resume to last page), {mib:.1} MiB received\n\
         \x20 faults         {faults} ({nf} network, {inf} waited on a lane, {zf} zero)\n\
         \x20 fault latency  p50 {p50:.1} us, p99 {p99:.1} us, max {max:.1} us\n\
         \x20 prepaged       {pre} pages by bubbles, {push} by the sweep\n\
         \x20 duplicates     {dup}",
        transport = e.transport,
        pages = e.pages_total,
        zero = e.zero_pages,
        removed = e.removed_pages,
        total = e.total_ms,
        mib = e.bytes_received as f64 / (1 << 20) as f64,
        faults = e.faults,
        nf = e.network_faults,
        inf = e.inflight_faults,
        zf = e.zero_faults,
        p50 = l.p50,
        p99 = l.p99,
        max = l.max,
        pre = e.prepaged_pages,
        push = e.pushed_pages,
        dup = e.duplicate_pages,
    )
}
