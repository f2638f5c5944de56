//! The embedding API as a VMM uses it: its own guest memory (mapped by the
//! "VMM", this test), its own or pagewire's userfaultfd, a real TCP
//! source; and everything a VMM can hand in wrong, refused with a typed
//! error before anything is touched.

use std::os::fd::{AsFd, OwnedFd};
use std::sync::Arc;
use std::time::Duration;

use memmap2::MmapMut;
use pagewire_engine::{DestMemory, EngineError, GuestRegion, MigrationConfig, RegionError};
use pagewire_transport::tcp::{PageServer, ServerHandle, TcpOptions};
use pagewire_transport::{page_checksum, PageRange, SourceMemory, Transport};
use pagewire_vmm_glue::embed::{connect, Destination, EmbedError, TransportChoice, UffdSetup};
use pagewire_vmm_glue::image;
use userfaultfd::{FeatureFlags, UffdBuilder};

const MIB: usize = 1 << 20;

/// A source serving `size` bytes (guest 0..size) on loopback.
fn source(size: u64) -> (String, ServerHandle) {
    let mem: Arc<SourceMemory> = Arc::new(image::synthetic(size, 7, 20).expect("image"));
    let server = PageServer::bind("127.0.0.1:0".parse().unwrap(), mem).expect("bind");
    let addr = server.local_addr().unwrap().to_string();
    (addr, server.spawn().expect("serve"))
}

fn region(guest_base: u64, m: &MmapMut) -> GuestRegion {
    GuestRegion {
        guest_base,
        host_addr: m.as_ptr() as u64,
        size: m.len() as u64,
        page_size: 4096,
    }
}

fn tcp(addr: &str) -> Arc<dyn Transport> {
    connect(addr, TransportChoice::Tcp, TcpOptions::default()).expect("connect")
}

/// Every page of the VMM's mappings equals the source's.
fn verify(t: &Arc<dyn Transport>, maps: &[&MmapMut]) {
    let mut first = 0u64;
    for m in maps {
        let pages = (m.len() / 4096) as u64;
        let sums = t
            .checksums(PageRange::new(first, pages as u32))
            .expect("checksums");
        for (i, want) in sums.iter().enumerate() {
            let got = page_checksum(&m[i * 4096..(i + 1) * 4096]);
            assert_eq!(
                got,
                *want,
                "page {} differs from the source",
                first + i as u64
            );
        }
        first += pages;
    }
}

#[test]
fn a_vmm_s_memory_is_filled_through_pagewire_s_uffd_and_through_its_own() {
    let (addr, _server) = source(12 << 20);
    for own_uffd in [false, true] {
        let low = MmapMut::map_anon(8 * MIB).unwrap();
        let high = MmapMut::map_anon(4 * MIB).unwrap();
        let regions = [region(0, &low), region(8 << 20, &high)];
        let uffd = if own_uffd {
            let u = UffdBuilder::new()
                .close_on_exec(true)
                .non_blocking(false) // pagewire makes it non-blocking
                .user_mode_only(true)
                .require_features(FeatureFlags::EVENT_REMOVE)
                .create()
                .expect("uffd");
            for m in [&low, &high] {
                u.register(m.as_ptr() as *mut libc::c_void, m.len())
                    .unwrap();
            }
            // A duplicate: the crate's `into_raw_fd` still closes its fd.
            UffdSetup::Existing(u.as_fd().try_clone_to_owned().unwrap())
        } else {
            UffdSetup::Create
        };
        // SAFETY: both mappings outlive the migration (waited on below).
        let memory = unsafe { DestMemory::from_vmm(&regions) }.expect("regions");
        let m = Destination::new(addr.clone())
            .transport(TransportChoice::Tcp)
            .config(MigrationConfig {
                lanes: 2,
                ..MigrationConfig::default()
            })
            .start(memory, uffd)
            .expect("start");
        // Two "vCPUs" read their memory while it arrives.
        let ptrs = [
            (low.as_ptr() as usize, low.len()),
            (high.as_ptr() as usize, high.len()),
        ];
        let vcpus: Vec<_> = ptrs
            .into_iter()
            .map(|(b, l)| {
                std::thread::spawn(move || {
                    (0..l).step_by(4096 * 3).fold(0u64, |s, o| {
                        // SAFETY: inside a mapping that outlives the thread.
                        s.wrapping_add(u64::from(unsafe { *((b + o) as *const u8) }))
                    })
                })
            })
            .collect();
        let live = m.metrics();
        assert_eq!(live.pages_total, 3072);
        for v in vcpus {
            v.join().unwrap();
        }
        let report = m.wait().expect("migration");
        assert_eq!(report.duplicate_pages, 0);
        assert_eq!(report.pages_total, 3072);
        verify(&tcp(&addr), &[&low, &high]);
    }
}

fn refused(regions: &[GuestRegion]) -> RegionError {
    // SAFETY: every call either fails validation before touching the
    // memory, or describes mappings alive for the whole test.
    match unsafe { DestMemory::from_vmm(regions) } {
        Err(EngineError::Region(r)) => r,
        other => panic!("accepted {regions:x?}: {other:?}"),
    }
}

#[test]
fn bad_regions_are_refused_with_typed_errors() {
    let a = MmapMut::map_anon(4 * MIB).unwrap();
    let b = MmapMut::map_anon(4 * MIB).unwrap();
    let ok = [region(0, &a), region(4 << 20, &b)];
    assert_eq!(refused(&[]), RegionError::Empty);
    let mut r = ok;
    r[1].guest_base = 2 << 20;
    assert!(matches!(
        refused(&r),
        RegionError::Overlap { space: "guest", .. }
    ));
    let mut r = ok;
    r[1].host_addr = r[0].host_addr + 4096;
    assert!(matches!(
        refused(&r),
        RegionError::Overlap { space: "host", .. }
    ));
    let mut r = ok;
    r[0].size = 4096 * 3 + 1;
    assert!(matches!(
        refused(&r),
        RegionError::SizeNotPageMultiple { region: 0, .. }
    ));
    let mut r = ok;
    r[1].host_addr += 100;
    assert!(matches!(
        refused(&r),
        RegionError::Unaligned {
            region: 1,
            what: "host",
            ..
        }
    ));
    let mut r = ok;
    r[1].guest_base += 512;
    assert!(matches!(
        refused(&r),
        RegionError::Unaligned {
            region: 1,
            what: "guest",
            ..
        }
    ));
    let mut r = ok;
    r[1].page_size = 2 * MIB;
    assert!(matches!(
        refused(&r),
        RegionError::MixedPageSizes { region: 1, .. }
    ));
    let mut r = ok;
    r[0].page_size = 3000;
    assert!(matches!(
        refused(&r),
        RegionError::BadPageSize { region: 0, .. }
    ));
    let mut r = ok;
    r[0].size = 0;
    assert!(matches!(
        refused(&r),
        RegionError::EmptyRegion { region: 0 }
    ));
    let mut r = ok;
    r[1].host_addr = u64::MAX - 4095;
    assert!(matches!(refused(&r), RegionError::Overflow { region: 1 }));
    // Addresses nothing is mapped at (a freed mapping).
    let gone = MmapMut::map_anon(MIB).unwrap();
    let r = [region(0, &gone)];
    drop(gone);
    assert!(matches!(
        refused(&r),
        RegionError::NotMapped { region: 0, .. }
    ));
}

#[test]
fn a_bad_uffd_or_a_layout_unlike_the_source_s_is_refused() {
    let (addr, _server) = source(8 << 20);
    let a = MmapMut::map_anon(8 * MIB).unwrap();
    let start = |regions: &[GuestRegion], uffd| {
        // SAFETY: `a` outlives every migration started here.
        let memory = unsafe { DestMemory::from_vmm(regions) }.expect("regions");
        Destination::start_over(tcp(&addr), memory, uffd, MigrationConfig::default())
    };
    // A uffd that is not registered over the memory.
    let u = UffdBuilder::new().user_mode_only(true).create().unwrap();
    let fd = u.as_fd().try_clone_to_owned().unwrap();
    match start(&[region(0, &a)], UffdSetup::Existing(fd)) {
        Err(EmbedError::Region(RegionError::NotRegistered { region: 0, .. })) => {}
        other => panic!("unregistered uffd accepted: {other:?}"),
    }
    // Not a userfaultfd at all.
    let (r, _w) = std::io::pipe().unwrap();
    let fd = OwnedFd::from(r);
    match start(&[region(0, &a)], UffdSetup::Existing(fd)) {
        Err(EmbedError::Region(RegionError::BadUffd(_))) => {}
        other => panic!("a pipe accepted as uffd: {other:?}"),
    }
    // The source serves guest 0..8 MiB; the VMM says 1 GiB..+8 MiB.
    match start(&[region(1 << 30, &a)], UffdSetup::Create) {
        Err(EmbedError::Region(RegionError::LayoutMismatch(_))) => {}
        other => panic!("moved region accepted: {other:?}"),
    }
    // Half the memory.
    let half = GuestRegion {
        size: 4 << 20,
        ..region(0, &a)
    };
    match start(&[half], UffdSetup::Create) {
        Err(EmbedError::Region(RegionError::LayoutMismatch(_))) => {}
        other => panic!("half the memory accepted: {other:?}"),
    }
}

/// An aborted migration keeps the VMM's memory registered: a vCPU on a
/// page that never arrived stays blocked, it never reads zeros.
#[test]
fn abort_leaves_vcpus_blocked_never_on_zero_pages() {
    let a = MmapMut::map_anon(8 * MIB).unwrap();
    // SAFETY: `a` is leaked by the check, so it outlives the migration.
    let memory = unsafe { DestMemory::from_vmm(&[region(0, &a)]) }.unwrap();
    abort_leaves_a_vcpu_blocked(a, memory, UffdSetup::Create);
}

/// The same through a VMM's own uffd over shared memory (missing faults
/// only, pages copied in): the vCPU never reads the memfd's hole as zeros.
#[test]
fn abort_through_a_vmm_s_uffd_over_shared_memory_leaves_vcpus_blocked() {
    let (shared, files) = vmm_memfd(8 << 20);
    let own = missing_only_uffd(&shared);
    // SAFETY: `shared` is leaked by the check, so it outlives the
    // migration.
    let memory = unsafe { DestMemory::from_vmm_shared(&[region(0, &shared)], &files) }.unwrap();
    let fd = own.as_fd().try_clone_to_owned().unwrap();
    abort_leaves_a_vcpu_blocked(shared, memory, UffdSetup::Existing(fd));
    // The VMM keeps its uffd, as it keeps its vCPUs.
    std::mem::forget(own);
}

/// Starts a demand-paging migration of 8 MiB into `mem` (the guest's
/// mapping of `memory`), aborts it, and checks that a vCPU touching a page
/// that never arrived stays blocked. Leaks `mem` and the vCPU.
fn abort_leaves_a_vcpu_blocked(mem: MmapMut, memory: DestMemory, uffd: UffdSetup) {
    let (addr, _server) = source(8 << 20);
    let m = Destination::new(addr)
        .transport(TransportChoice::Tcp)
        .config(MigrationConfig {
            lanes: 1,
            bubble: 0,
            push: false,
            ..MigrationConfig::default()
        })
        .start(memory, uffd)
        .unwrap();
    let t = tcp_nonzero_page(&m);
    assert!(m.abort().is_none());
    let base = mem.as_ptr() as usize;
    let vcpu = std::thread::spawn(move || {
        // SAFETY: `mem` is leaked, the mapping lives until the process
        // ends.
        unsafe { *((base + t as usize * 4096) as *const u8) }
    });
    std::thread::sleep(Duration::from_millis(300));
    assert!(!vcpu.is_finished(), "a vCPU read a page that never arrived");
    std::mem::forget(vcpu);
    std::mem::forget(mem);
}

/// A uffd as a VMM makes its own: registered over `mem` for missing
/// faults only.
fn missing_only_uffd(mem: &MmapMut) -> userfaultfd::Uffd {
    let own = UffdBuilder::new()
        .close_on_exec(true)
        .user_mode_only(true)
        .require_features(FeatureFlags::EVENT_REMOVE)
        .create()
        .expect("uffd");
    own.register(mem.as_ptr() as *mut libc::c_void, mem.len())
        .expect("register the mapping");
    own
}

/// A page the source has data on (not a zero page).
fn tcp_nonzero_page(m: &pagewire_engine::MigrationHandle) -> u64 {
    let info = m.transport().info();
    (0..info.layout.total_pages())
        .rev()
        .find(|&p| !info.zero.is_zero(p))
        .unwrap()
}

/// A VMM's guest memory of `len` bytes: a fresh memfd mapped shared, and
/// its file for [`DestMemory::from_vmm_shared`].
fn vmm_memfd(len: u64) -> (MmapMut, [pagewire_engine::FileOffset; 1]) {
    let fd =
        nix::sys::memfd::memfd_create(c"vmm-guest", nix::sys::memfd::MemFdCreateFlag::MFD_CLOEXEC)
            .expect("memfd");
    let file = Arc::new(std::fs::File::from(fd));
    file.set_len(len).unwrap();
    // SAFETY: the file is ours and outlives the mapping (the mapping holds
    // its own reference to the memory); nothing else resizes it.
    let shared = unsafe { MmapMut::map_mut(&*file) }.expect("map the memfd");
    (shared, [pagewire_engine::FileOffset::from_arc(file, 0)])
}

/// A VMM's guest memory in a memfd, mapped shared: filled through the
/// VMM's own uffd (missing faults only, pages copied in), and through
/// pagewire's (missing and minor faults, pages landed in the memfd by
/// TCP). Files that do not match the regions, a uffd not registered over
/// them, and landing through a uffd without minor faults are refused with
/// typed errors.
#[test]
fn a_vmm_s_shared_memory_is_filled_and_bad_files_are_refused() {
    let (addr, _server) = source(8 << 20);
    let (shared, files) = vmm_memfd(8 << 20);
    let regions = [region(0, &shared)];
    // SAFETY: refused before anything is mapped or registered.
    match unsafe { DestMemory::from_vmm_shared(&regions, &[]) } {
        Err(EngineError::Region(RegionError::FileCount {
            files: 0,
            regions: 1,
        })) => {}
        other => panic!("no file accepted: {other:?}"),
    }
    // SAFETY: `shared` outlives every migration started here.
    let memory = unsafe { DestMemory::from_vmm_shared(&regions, &files) }.expect("regions");
    // A VMM's uffd not registered over the memory is refused.
    let u = UffdBuilder::new().user_mode_only(true).create().unwrap();
    let fd = u.as_fd().try_clone_to_owned().unwrap();
    match Destination::start_over(
        tcp(&addr),
        memory,
        UffdSetup::Existing(fd),
        MigrationConfig::default(),
    ) {
        Err(EmbedError::Region(RegionError::NotRegistered { .. })) => {}
        other => panic!("an unregistered uffd accepted: {other:?}"),
    }
    // Registered for missing faults only (as QEMU registers its own), it
    // cannot land pages: asking to is refused.
    let own = missing_only_uffd(&shared);
    let own_fd = || UffdSetup::Existing(own.as_fd().try_clone_to_owned().unwrap());
    let land = MigrationConfig {
        shared_install: pagewire_engine::SharedInstall::Land,
        ..MigrationConfig::default()
    };
    // SAFETY: as above.
    let memory = unsafe { DestMemory::from_vmm_shared(&regions, &files) }.expect("regions");
    match Destination::start_over(tcp(&addr), memory, own_fd(), land) {
        Err(EmbedError::Region(RegionError::BadUffd(_))) => {}
        other => panic!("landing accepted without minor faults: {other:?}"),
    }
    // By default its pages are copied in through it; a "vCPU" reads the
    // memory while it arrives.
    // SAFETY: as above; this migration is waited on below.
    let memory = unsafe { DestMemory::from_vmm_shared(&regions, &files) }.expect("regions");
    let m = Destination::start_over(tcp(&addr), memory, own_fd(), MigrationConfig::default())
        .expect("a VMM's own uffd over shared memory");
    let (base, len) = (shared.as_ptr() as usize, shared.len());
    std::thread::spawn(move || {
        (0..len).step_by(4096 * 3).fold(0u64, |s, o| {
            // SAFETY: inside a mapping that outlives the thread (joined).
            s.wrapping_add(u64::from(unsafe { *((base + o) as *const u8) }))
        })
    })
    .join()
    .unwrap();
    let report = m.wait().expect("migration");
    assert_eq!(
        report.install_path,
        pagewire_engine::InstallPath::SharedCopy
    );
    assert_eq!(report.duplicate_pages, 0);
    // No page was found in the file already (which, without minor faults,
    // would be taken as the guest's).
    assert_eq!(report.install_conflicts, 0);
    verify(&tcp(&addr), &[&shared]);
    drop(own);
    // A fresh memfd for pagewire's own uffd: this one holds every page.
    let (shared, files) = vmm_memfd(8 << 20);
    let regions = [region(0, &shared)];
    // SAFETY: as above; this migration is waited on below.
    let memory = unsafe { DestMemory::from_vmm_shared(&regions, &files) }.expect("regions");
    // Landed: TCP writes the pages into the VMM's memfd itself.
    let m = Destination::new(addr.clone())
        .transport(TransportChoice::Tcp)
        .config(MigrationConfig {
            shared_install: pagewire_engine::SharedInstall::Land,
            ..MigrationConfig::default()
        })
        .start(memory, UffdSetup::Create)
        .expect("start");
    let base = shared.as_ptr() as usize;
    let len = shared.len();
    let sum = std::thread::spawn(move || {
        (0..len).step_by(4096 * 5).fold(0u64, |s, o| {
            // SAFETY: inside a mapping that outlives the thread (joined).
            s.wrapping_add(u64::from(unsafe { *((base + o) as *const u8) }))
        })
    });
    sum.join().unwrap();
    let report = m.wait().expect("migration");
    assert_eq!(report.install_path, pagewire_engine::InstallPath::Landed);
    assert_eq!(report.duplicate_pages, 0);
    verify(&tcp(&addr), &[&shared]);
}
