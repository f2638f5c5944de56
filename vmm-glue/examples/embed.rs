//! How a VMM plugs pagewire in: copy this.
//!
//! The VMM owns guest memory (here: two anonymous mappings, as a VMM would
//! map guest RAM below and above a PCI hole), resumes the guest at once
//! and lets pagewire fill the memory from the source host post-copy.
//!
//! Run a source first (`pagewire source --synthetic 96MiB` listens on
//! 127.0.0.1:7070 and serves guest memory at guest addresses 0..96 MiB),
//! then `cargo run --release --example embed -- 127.0.0.1:7070`.
//! With no argument, the example starts a source of its own in-process.

use std::sync::Arc;
use std::time::Duration;

use memmap2::MmapMut;
use pagewire_engine::{DestMemory, GuestRegion, MigrationConfig};
use pagewire_transport::tcp::PageServer;
use pagewire_vmm_glue::embed::{Destination, TransportChoice, UffdSetup};
use pagewire_vmm_glue::image;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    // 0. Where the source is (here: one started in-process if not given).
    let (addr, _server) = match std::env::args().nth(1) {
        Some(a) => (a, None),
        None => {
            let mem = Arc::new(image::synthetic(96 << 20, 1, image::DEFAULT_ZERO_PERCENT)?);
            let server = PageServer::bind("127.0.0.1:0".parse()?, mem)?;
            let addr = server.local_addr()?.to_string();
            (addr, Some(server.spawn()?))
        }
    };

    // 1. The VMM's guest memory: two regions, untouched since mapped.
    let low = MmapMut::map_anon(64 << 20)?;
    let high = MmapMut::map_anon(32 << 20)?;
    let regions = [
        GuestRegion {
            guest_base: 0,
            host_addr: low.as_ptr() as u64,
            size: low.len() as u64,
            page_size: 4096,
        },
        GuestRegion {
            guest_base: 64 << 20,
            host_addr: high.as_ptr() as u64,
            size: high.len() as u64,
            page_size: 4096,
        },
    ];
    // SAFETY: `low` and `high` stay mapped until the end of `main`, after
    // the migration finished (a failed one makes main return an error
    // and the process exit).
    let memory = unsafe { DestMemory::from_vmm(&regions)? };

    // 2. Start: checks regions against the source, creates a userfaultfd
    //    that also sees KVM's faults, opens every channel.
    let migration = Destination::new(addr)
        .transport(TransportChoice::default())
        .config(MigrationConfig::default())
        .start(memory, UffdSetup::Create)?;

    // 3. Resume the vCPUs now. Here two threads stand in for them.
    let vcpus: Vec<_> = [
        (low.as_ptr() as usize, low.len()),
        (high.as_ptr() as usize, high.len()),
    ]
    .into_iter()
    .map(|(base, len)| {
        std::thread::spawn(move || {
            let mut sum = 0u64;
            for off in (0..len).step_by(4096 * 7) {
                // SAFETY: inside a live mapping of this process; a
                // missing page blocks this thread until pagewire
                // installs it.
                sum = sum.wrapping_add(u64::from(unsafe { *((base + off) as *const u8) }));
            }
            sum
        })
    })
    .collect();

    // 4. Watch it while it runs.
    while !migration.is_finished() {
        let m = migration.metrics();
        eprintln!(
            "{:>6}/{} pages, {} network faults, fault p99 {:.0} us",
            m.pages_present, m.pages_total, m.network_faults, m.fault_latency_us.p99
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    for v in vcpus {
        let _ = v.join();
    }

    // 5. Done: memory is unregistered and is ordinary memory again.
    let report = migration.wait()?;
    println!(
        "migrated {} pages in {:.1} ms: {} faults, p50 {:.1} us, p99 {:.1} us, {} duplicates",
        report.pages_total,
        report.total_ms,
        report.faults,
        report.fault_latency_us.p50,
        report.fault_latency_us.p99,
        report.duplicate_pages
    );
    drop((low, high));
    Ok(())
}
