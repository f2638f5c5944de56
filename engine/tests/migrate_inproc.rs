//! Real userfaultfd migrations over the in-process transport: a thread
//! touches guest memory while the engine fills it.

use std::sync::Arc;

use pagewire_engine::{
    DestMemory, InstallPath, Migration, MigrationConfig, PageOrigin, SharedInstall,
};
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
    run_on(false, config, touch)
}

/// A migration into private anonymous memory (UFFDIO_COPY) or, with
/// `shared`, into a memfd whose pages land in a second mapping and are
/// mapped with UFFDIO_CONTINUE.
fn run_on(
    shared: bool,
    config: MigrationConfig,
    touch: impl Fn(u64) -> u64,
) -> pagewire_engine::EngineReport {
    let pages = 2048;
    let src = source(pages);
    let t: Arc<dyn Transport> = Arc::new(InProcTransport::new(src.clone()));
    let h = if shared {
        let mem = DestMemory::new_shared(&t.info().layout).unwrap();
        Migration::start_with_memory(t.clone(), Arc::new(mem), config).unwrap()
    } else {
        Migration::start(t.clone(), config).unwrap()
    };
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
    every_page_once(MigrationConfig::default());
}

#[test]
fn every_page_arrives_once_with_two_fault_services() {
    let cpus = pagewire_engine::placement::allowed_cpus();
    every_page_once(MigrationConfig {
        fault_cpus: vec![cpus[0], *cpus.last().unwrap()],
        ..MigrationConfig::default()
    });
}

fn every_page_once(config: MigrationConfig) {
    let want = pagewire_engine::placement::fault_service_cpus(&config.fault_cpus)
        .expect("a few services")
        .len();
    let r = run(config, |i| i * 7);
    assert_eq!(r.fault_services, want);
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

/// Waits (bounded) until `done` holds.
fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
    let until = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while !done() {
        assert!(std::time::Instant::now() < until, "never happened: {what}");
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
}

/// A migration of `pages` pages without bubbles, its push capped at
/// `push_rate` bytes a second; with `held`, the push waits for
/// `release_push`.
fn start_capped(pages: u64, push_rate: u64, held: bool) -> pagewire_engine::MigrationHandle {
    let t: Arc<dyn Transport> = Arc::new(InProcTransport::new(source(pages)));
    let cfg = MigrationConfig {
        bubble: 0,
        push: !held,
        push_rate: Some(push_rate),
        ..MigrationConfig::default()
    };
    Migration::start(t, cfg).unwrap()
}

#[test]
fn zero_pages_are_mapped_while_the_push_waits_for_the_link() {
    // A push capped far below what the path carries: the non-zero pages
    // trickle in while the zero filler maps every zero page.
    let pages = 2048u64;
    let h = start_capped(pages, 64 << 10, false);
    let zero: Vec<u64> = (0..pages).filter(|p| p % 5 == 0).collect();
    wait_until("every zero page mapped", || {
        zero.iter().all(|&p| h.origin(p) != PageOrigin::None)
    });
    // The non-zero pages are still streaming at 16 pages a second.
    assert!(h.progress().0 < pages, "{:?}", h.progress());
    // Touching the zero pages now raises no fault.
    let mem = h.memory().clone();
    for &p in &zero {
        assert_eq!(mem.page(p).unwrap()[0], 0);
    }
    assert_eq!(h.metrics().faults, 0);
    assert!(h.abort().is_none());
}

#[test]
fn the_sweep_pushes_the_block_the_guest_faults_in_first() {
    // 16 blocks of 128 pages; the guest faults three times in block 12,
    // then the push is let run. With it capped (32 pages a second), the
    // sweep must fill block 12 before it walks from page 0 (which would
    // reach block 12 last). The cap leaves the check two seconds after
    // block 12 is done before it could fail on a slow machine.
    let pages = 2048u64;
    let block = pagewire_engine::heat::BLOCK_PAGES;
    let h = start_capped(pages, 128 << 10, true);
    let mem = h.memory().clone();
    let hot = 12 * block..13 * block;
    for p in [hot.start + 4, hot.start + 50, hot.start + 99] {
        let _ = std::hint::black_box(mem.page(p).unwrap()[0]);
    }
    h.release_push();
    wait_until("block 12 pushed", || {
        hot.clone().all(|p| h.origin(p) != PageOrigin::None)
    });
    // Outside block 12, the linear sweep got at most what it took since
    // block 12 was done (zero pages are mapped without the network).
    let pushed_elsewhere = (0..pages)
        .filter(|p| !hot.contains(p) && p % 5 != 0)
        .filter(|&p| h.origin(p) == PageOrigin::Push)
        .count() as u64;
    assert!(
        pushed_elsewhere < block / 2,
        "{pushed_elsewhere} pages pushed outside the hot block first"
    );
    assert!(h.abort().is_none());
}

#[test]
fn shared_memory_is_filled_landed_or_copied_every_page_once() {
    for ((push, bubble), (install, path)) in [(true, 64), (false, 0)].into_iter().flat_map(|m| {
        [
            (SharedInstall::Land, InstallPath::Landed),
            (SharedInstall::Copy, InstallPath::SharedCopy),
            // In-process pages are copied on the CPU: copied in.
            (SharedInstall::Auto, InstallPath::SharedCopy),
        ]
        .map(|i| (m, i))
    }) {
        let cfg = MigrationConfig {
            push,
            bubble,
            shared_install: install,
            ..MigrationConfig::default()
        };
        let r = run_on(true, cfg, |i| i * 7);
        assert_eq!(r.install_path, path);
        assert_eq!(r.duplicate_pages, 0);
        assert_eq!(r.install_conflicts, 0);
        assert_eq!(
            r.network_faults + r.prepaged_pages + r.pushed_pages + r.zero_pages,
            r.pages_total
        );
        assert_eq!(r.bytes_received, (r.pages_total - r.zero_pages) * 4096);
        if !push {
            assert_eq!(r.network_faults, 2048 - (2048 / 5 + 1));
        }
    }
}

/// `madvise(advice)` over page `p` of `mem`.
fn advise(mem: &DestMemory, p: u64, advice: libc::c_int) {
    let addr = mem.host_addr(p).unwrap();
    // SAFETY: one page of guest memory this test mapped; dropping it is
    // what a balloon does, and the engine is told through userfaultfd.
    let r = unsafe { libc::madvise(addr as *mut libc::c_void, 4096, advice) };
    assert_eq!(r, 0, "madvise: {}", std::io::Error::last_os_error());
}

#[test]
fn shared_memory_dropped_by_its_owner_reads_as_its_file_says() {
    dropped_by_its_owner(Vec::new(), SharedInstall::Land);
    dropped_by_its_owner(Vec::new(), SharedInstall::Copy);
}

#[test]
fn shared_memory_dropped_by_its_owner_reads_as_its_file_says_with_two_fault_services() {
    // Either service may read the owner's REMOVE events, the other's
    // installs waiting on them.
    let cpus = pagewire_engine::placement::allowed_cpus();
    dropped_by_its_owner(vec![cpus[0], *cpus.last().unwrap()], SharedInstall::Land);
}

fn dropped_by_its_owner(fault_cpus: Vec<usize>, install: SharedInstall) {
    let pages = 2048u64;
    let src = source(pages);
    let t: Arc<dyn Transport> = Arc::new(InProcTransport::new(src.clone()));
    let mem = Arc::new(DestMemory::new_shared(&t.info().layout).unwrap());
    let cfg = MigrationConfig {
        push: false,
        bubble: 0,
        fault_cpus,
        shared_install: install,
        ..MigrationConfig::default()
    };
    let h = Migration::start_with_memory(t.clone(), mem.clone(), cfg).unwrap();
    let first = |p: u64| u64::from_le_bytes(mem.page(p).unwrap()[..8].try_into().unwrap());
    // Fetched, then dropped from the guest's mapping only (DONTNEED): the
    // file keeps the bytes, the next touch maps them again.
    assert_eq!(first(11), 12);
    advise(&mem, 11, libc::MADV_DONTNEED);
    assert_eq!(first(11), 12);
    // Fetched, then punched out of the file (REMOVE): zeros.
    assert_eq!(first(12), 13);
    advise(&mem, 12, libc::MADV_REMOVE);
    assert_eq!(first(12), 0);
    // Punched out before it arrived: never fetched, zeros.
    advise(&mem, 13, libc::MADV_REMOVE);
    assert_eq!(first(13), 0);
    assert_eq!(mem.page(13).unwrap()[4000], 0);
    h.release_push();
    let r = h.wait().unwrap();
    assert_eq!(
        r.install_path,
        if install == SharedInstall::Copy {
            InstallPath::SharedCopy
        } else {
            InstallPath::Landed
        }
    );
    assert_eq!(r.removed_pages, 1);
    assert_eq!(r.duplicate_pages, 0);
    let sums = t.checksums(PageRange::new(0, pages as u32)).unwrap();
    for p in (0..pages).filter(|p| ![12, 13].contains(p)) {
        assert_eq!(
            page_checksum(mem.page(p).unwrap()),
            sums[p as usize],
            "page {p}"
        );
    }
}

#[test]
fn a_copy_into_shared_memory_over_a_page_already_in_its_file_writes_and_maps_it() {
    use pagewire_engine::uffd::PageInstaller;
    let layout = MemoryLayout::single(16 * 4096).unwrap();
    let mem = Arc::new(DestMemory::new_shared(&layout).unwrap());
    let installer = PageInstaller::register(mem.clone()).unwrap();
    // Page 5 is in the memory's file (stale bytes, as a page populated for
    // a landing that broke off leaves it) but not mapped in the guest.
    let landing = mem.landing().expect("shared memory has a second mapping");
    // SAFETY: nothing else reads or writes page 5 here.
    unsafe { landing.write(PageRange::new(5, 1), 0, &[0xaa; 4096]) }.unwrap();
    let data: Vec<u8> = (0..3 * 4096).map(|i| (i / 4096 + 1) as u8).collect();
    let done = installer
        .install(PageRange::new(4, 3), &data, true)
        .expect("install");
    assert_eq!(done.pages, 3, "{done:?}");
    for (i, p) in (4..7).enumerate() {
        let page = mem.page(p).unwrap();
        assert!(
            page.iter().all(|&b| b == i as u8 + 1),
            "page {p} holds {:#x}",
            page[0]
        );
    }
    // A page the guest has mapped is counted, never written over.
    let again = installer
        .install(PageRange::new(5, 1), &[0xbb; 4096], true)
        .expect("install over a mapped page");
    assert_eq!((again.pages, again.already_present), (0, 1), "{again:?}");
    assert!(mem.page(5).unwrap().iter().all(|&b| b == 2));
}
