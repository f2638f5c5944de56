//! Real userfaultfd migrations over the in-process transport: a thread
//! touches guest memory while the engine fills it.

use std::sync::Arc;

use pagewire_engine::{Migration, MigrationConfig, PageOrigin};
use pagewire_transport::inproc::InProcTransport;
use pagewire_transport::{page_checksum, MemoryLayout, PageRange, SourceMemory, Transport};

fn source(pages: u64) -> Arc<SourceMemory> {
    let mut bytes = vec![0u8; pages as usize * 4096];
    for (i, page) in bytes.chunks_exact_mut(4096).enumerate() {
        if i % 5 != 0 {
            page[..8].copy_from_slice(&(i as u64 + 1).to_le_bytes());
            page[4000] = (i % 251) as u8;
        }
    }
    let layout = MemoryLayout::single(pages * 4096).unwrap();
    Arc::new(SourceMemory::new(layout, vec![Arc::new(bytes)]).unwrap())
}

fn run(config: MigrationConfig, touch: impl Fn(u64) -> u64) -> pagewire_engine::EngineReport {
    let pages = 2048;
    let src = source(pages);
    let t: Arc<dyn Transport> = Arc::new(InProcTransport::new(src.clone()));
    let h = Migration::start(t.clone(), config).unwrap();
    let mem = h.memory().clone();
    // The "vCPU": touches pages in the order `touch` gives.
    let mut seen = 0u64;
    for i in 0..pages {
        let p = touch(i) % pages;
        seen = seen.wrapping_add(mem.page(p).unwrap()[0] as u64);
    }
    std::hint::black_box(seen);
    h.release_push();
    // Nothing installed a page without recording who did.
    while !h.is_finished() {
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
    for p in 0..pages {
        assert_ne!(h.origin(p), PageOrigin::None, "page {p} has no origin");
    }
    let report = h.wait().unwrap();
    // The timeline counts every fault and every installed page once.
    let sum = |v: &[u32]| v.iter().map(|&n| u64::from(n)).sum::<u64>();
    assert_eq!(sum(&report.faults_over_time), report.faults);
    assert_eq!(sum(&report.pages_over_time), pages);
    let sums = t.checksums(PageRange::new(0, pages as u32)).unwrap();
    for p in 0..pages {
        assert_eq!(
            page_checksum(mem.page(p).unwrap()),
            sums[p as usize],
            "page {p}"
        );
    }
    report
}

#[test]
fn every_page_arrives_once_with_push_and_bubbles() {
    let r = run(MigrationConfig::default(), |i| i * 7);
    assert_eq!(r.pages_total, 2048);
    assert_eq!(r.duplicate_pages, 0);
    assert_eq!(r.install_conflicts, 0);
    // Every page is accounted for exactly once.
    assert_eq!(
        r.network_faults + r.prepaged_pages + r.pushed_pages + r.zero_pages,
        r.pages_total
    );
    assert_eq!(r.zero_pages, 2048 / 5 + 1);
    assert_eq!(r.bytes_received, (r.pages_total - r.zero_pages) * 4096);
}

#[test]
fn demand_only_faults_every_touched_page() {
    let cfg = MigrationConfig {
        push: false,
        bubble: 0,
        ..MigrationConfig::default()
    };
    let r = run(cfg, |i| i);
    // Pure demand paging during the workload: every non-zero page faulted.
    assert_eq!(r.network_faults, 2048 - (2048 / 5 + 1));
    assert_eq!(r.zero_faults, 2048 / 5 + 1);
    assert_eq!(r.pushed_pages + r.prepaged_pages, 0);
    assert_eq!(r.duplicate_pages, 0);
}
