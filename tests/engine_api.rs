//! The engine driven through its API against a real `pagewire source`
//! process: concurrent faults are served concurrently, oversized batches
//! are split to what the transport accepts, and a failed migration never
//! lets a blocked thread read a zero page.

mod common;

use common::*;
use pagewire_engine::placement::PlacementError;
use pagewire_engine::{DestMemory, EngineError, Migration, MigrationConfig};
use pagewire_transport::tcp::{TcpOptions, TcpTransport};
use pagewire_transport::{page_checksum, PageRange, Transport};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Barrier};
use std::thread;
use std::time::Duration;

fn connect(addr: &str, io_timeout: Duration) -> Arc<dyn Transport> {
    Arc::new(
        TcpTransport::connect(
            addr,
            TcpOptions {
                io_timeout,
                ..TcpOptions::default()
            },
        )
        .expect("connect"),
    )
}

/// Checks every 4 KiB page of `mem` against the source behind `t`;
/// returns the source's checksums. `what` names the case in a failure.
fn assert_equals_source(t: &dyn Transport, mem: &DestMemory, what: &str) -> Vec<u64> {
    let pages = t.info().layout.total_pages();
    let want = t.checksums(PageRange::new(0, pages as u32)).unwrap();
    for (p, w) in want.iter().enumerate() {
        assert_eq!(
            page_checksum(mem.small_page(p as u64).unwrap()),
            *w,
            "{what}: page {p}"
        );
    }
    want
}

fn demand_only() -> MigrationConfig {
    MigrationConfig {
        lanes: 1,
        bubble: 0,
        push: false,
        ..MigrationConfig::default()
    }
}

/// Non-zero pages of the source, the first `n` of them from `from` on.
fn nonzero_pages(t: &Arc<dyn Transport>, from: u64, n: usize) -> Vec<u64> {
    let zero = &t.info().zero;
    (from..t.info().layout.total_pages())
        .filter(|&p| !zero.is_zero(p))
        .take(n)
        .collect()
}

#[test]
fn concurrent_faults_are_served_concurrently() {
    concurrent_faults(Vec::new());
}

#[test]
fn concurrent_faults_are_served_concurrently_by_several_fault_services() {
    // Two services, on two CPUs where there are two: every fault wakes
    // both, whichever reads it serves it, and each page still comes once.
    let allowed = pagewire_engine::placement::allowed_cpus();
    let two = vec![allowed[0], *allowed.last().unwrap()];
    concurrent_faults(two);
}

fn concurrent_faults(fault_cpus: Vec<usize>) {
    let services = pagewire_engine::placement::fault_service_cpus(&fault_cpus)
        .expect("a few services")
        .len();
    let src = start_source("2MiB", 21);
    // Every reply takes 50 ms longer: faults served one after another
    // would never overlap; served concurrently, they all wait together.
    // A long link: every chunk from the source held 50 ms.
    let relay = slow_relay(src.addr.clone(), 1 << 16, Duration::from_millis(50));
    let t = connect(&relay, Duration::from_secs(10));
    let threads = 8;
    let pages = nonzero_pages(&t, 100, threads);
    let sums: Vec<u64> = pages
        .iter()
        .map(|&p| t.checksums(PageRange::new(p, 1)).unwrap()[0])
        .collect();
    // The push after the faults crosses the relay too; flow control would
    // pace it for a 50 ms round trip, which only makes the test slow.
    let config = MigrationConfig {
        flow_control: false,
        fault_cpus,
        ..demand_only()
    };
    let h = Migration::start(t.clone(), config).expect("start");
    let mem = h.memory().clone();
    let barrier = Arc::new(Barrier::new(threads));
    let workers: Vec<_> = pages
        .iter()
        .map(|&p| {
            let (mem, barrier) = (mem.clone(), barrier.clone());
            thread::spawn(move || {
                barrier.wait();
                page_checksum(mem.page(p).unwrap())
            })
        })
        .collect();
    let got: Vec<u64> = workers.into_iter().map(|w| w.join().unwrap()).collect();
    assert_eq!(got, sums, "pages differ from the source");
    h.release_push();
    let r = h.wait().expect("migration");
    assert_eq!(r.duplicate_pages, 0);
    assert!(
        r.max_concurrent_faults >= 2,
        "{threads} threads faulting at once never had two requests outstanding: {r:?}"
    );
    assert_eq!(r.network_faults as usize, threads, "{r:?}");
    assert_eq!(r.fault_services, services, "{r:?}");
}

#[test]
fn batches_past_the_request_limits_are_split() {
    // 4096-page batches over a guest whose every other page is zero: a
    // batch holds 2048 runs of one page, twice the ranges one request may
    // carry (1024), so every batch must be split for the source to accept
    // it. (A synthetic guest's zero pages cut a batch into fewer runs than
    // that, which let this test pass without any split.)
    let pages = 8192u64;
    /// Removes the directory however the test ends.
    struct TempDir(std::path::PathBuf);
    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
    let dir = TempDir(std::env::temp_dir().join(format!("pagewire-split-{}", std::process::id())));
    let _ = std::fs::remove_dir_all(&dir.0);
    std::fs::create_dir_all(&dir.0).expect("temp dir");
    let file = dir.0.join("every-other-page.mem");
    let bytes: Vec<u8> = (0..pages)
        .flat_map(|p| {
            let mut page = vec![0u8; 4096];
            if p % 2 == 0 {
                for (i, b) in page.iter_mut().enumerate() {
                    *b = (p as usize * 7 + i) as u8 | 1;
                }
            }
            page
        })
        .collect();
    std::fs::write(&file, &bytes).expect("memory file");
    let src = spawn_source(
        pagewire()
            .args(["source", "--listen", "127.0.0.1:0", "--memory"])
            .arg(&file),
    );
    let t = connect(&src.addr, Duration::from_secs(10));
    assert!(
        4096 / 2 > t.limits().max_ranges,
        "a batch must hold more runs than a request may carry"
    );
    let h = Migration::start(
        t.clone(),
        MigrationConfig {
            lanes: 2,
            batch_pages: 4096,
            flow_control: false,
            ..MigrationConfig::default()
        },
    )
    .expect("start");
    let r = h
        .wait()
        .expect("a 4096-page batch must not break the migration");
    assert_eq!(r.duplicate_pages, 0);
    assert_eq!(r.zero_pages, pages / 2, "{r:?}");
    assert_eq!(
        r.pushed_pages + r.zero_pages + r.network_faults + r.prepaged_pages,
        r.pages_total
    );
    let stats = t.source_stats().unwrap();
    assert_eq!(stats.pages_served, r.pages_total - r.zero_pages);
}

/// Runs `threads` threads that each touch a missing non-zero page after
/// the source died, and returns how many ever came back.
fn blocked_threads_after_source_death(drop_instead_of_wait: bool, shared: bool) -> usize {
    let mut src = start_source("16MiB", 9);
    let t = connect(&src.addr, Duration::from_secs(2));
    let pages = nonzero_pages(&t, 0, 40);
    let sums: Vec<u64> = pages
        .iter()
        .map(|&p| t.checksums(PageRange::new(p, 1)).unwrap()[0])
        .collect();
    let h = if shared {
        // Zero-copy into a memfd: registered for MISSING and MINOR faults.
        let m = DestMemory::new_shared(&t.info().layout).expect("memfd");
        Migration::start_with_memory(t.clone(), Arc::new(m), demand_only()).expect("start")
    } else {
        Migration::start(t.clone(), demand_only()).expect("start")
    };
    let mem = h.memory().clone();
    // A few pages arrive while the source lives.
    for (p, want) in pages.iter().zip(&sums).take(4) {
        assert_eq!(page_checksum(mem.page(*p).unwrap()), *want);
    }
    src.child.kill().unwrap();
    src.child.wait().unwrap();
    let returned = Arc::new(AtomicUsize::new(0));
    for &p in &pages[20..28] {
        let (mem, returned) = (mem.clone(), returned.clone());
        thread::spawn(move || {
            let bytes = mem.page(p).unwrap();
            // Reaching this line at all is the failure; a zero page
            // would be the silent corruption the engine must prevent.
            let _ = std::hint::black_box(bytes[0]);
            returned.fetch_add(1, Ordering::SeqCst);
        });
    }
    if drop_instead_of_wait {
        thread::sleep(Duration::from_millis(500));
        drop(h);
    } else {
        let err = h
            .wait()
            .expect_err("the source is gone: the migration must fail");
        eprintln!("engine reported: {err}");
    }
    // Give any wrongly woken thread ample time to come back.
    thread::sleep(Duration::from_secs(1));
    returned.load(Ordering::SeqCst)
}

#[test]
fn a_failed_migration_never_hands_the_guest_zero_pages() {
    assert_eq!(
        blocked_threads_after_source_death(false, false),
        0,
        "a thread blocked on a missing page returned after the migration failed"
    );
}

#[test]
fn a_failed_migration_into_shared_memory_never_hands_the_guest_its_file_pages() {
    assert_eq!(
        blocked_threads_after_source_death(false, true),
        0,
        "a thread blocked on a missing page of a memfd returned after the migration failed"
    );
}

#[test]
fn an_abandoned_migration_never_hands_the_guest_zero_pages() {
    assert_eq!(
        blocked_threads_after_source_death(true, false),
        0,
        "a thread blocked on a missing page returned after the handle was dropped"
    );
}

#[test]
fn bad_configurations_are_refused_before_anything_is_touched() {
    let src = pagewire_vmm_glue::image::synthetic(1 << 20, 1, 25).unwrap();
    let t: Arc<dyn Transport> = Arc::new(pagewire_transport::inproc::InProcTransport::new(
        Arc::new(src),
    ));
    for bad in [
        MigrationConfig {
            push_rate: Some(0),
            ..MigrationConfig::default()
        },
        MigrationConfig {
            lanes: 0,
            ..MigrationConfig::default()
        },
        MigrationConfig {
            batch_pages: 0,
            ..MigrationConfig::default()
        },
    ] {
        let e = Migration::start(t.clone(), bad.clone()).expect_err("refused");
        assert!(e.to_string().contains("are needed"), "{bad:?}: {e}");
    }
    // More fault services than a migration runs: refused before the CPUs
    // are looked at.
    let many: Vec<usize> = (0..=pagewire_engine::placement::MAX_FAULT_SERVICES).collect();
    let e = Migration::start(
        t.clone(),
        MigrationConfig {
            fault_cpus: many,
            ..MigrationConfig::default()
        },
    )
    .expect_err("refused");
    assert!(
        e.to_string().contains("fault services are more than"),
        "{e}"
    );
    // CPUs the process may not run on, for the lanes or the fault service.
    let allowed = pagewire_engine::placement::allowed_cpus();
    let absent = pagewire_engine::placement::max_cpu() + 1;
    for (bad, what) in [
        (
            MigrationConfig {
                lane_cpus: vec![allowed[0], absent],
                ..MigrationConfig::default()
            },
            "lane_cpus",
        ),
        (
            MigrationConfig {
                fault_cpus: vec![absent],
                ..MigrationConfig::default()
            },
            "fault_cpus",
        ),
    ] {
        match Migration::start(t.clone(), bad) {
            Err(EngineError::Placement(PlacementError::NotAllowed { what: w, cpu, .. })) => {
                assert_eq!((w, cpu), (what, absent));
            }
            Err(e) => panic!("{what}: expected a placement error, got {e}"),
            Ok(_) => panic!("{what}: started on a CPU the process may not use"),
        }
    }
}

/// A transport plugin with a bug: its bulk channels panic on the third
/// reply any of them receives. The count is shared so the panic comes
/// whichever lane the push happens to keep busy: a count per channel let a
/// migration finish before the one channel counted reached it.
struct Panicky {
    inner: Arc<dyn Transport>,
    bulk_replies_left: Arc<std::sync::atomic::AtomicUsize>,
}

struct PanicAfter {
    inner: Box<dyn pagewire_transport::PageChannel>,
    left: Arc<std::sync::atomic::AtomicUsize>,
}

impl pagewire_transport::PageChannel for PanicAfter {
    fn send(&mut self, r: &[PageRange]) -> Result<(), pagewire_transport::TransportError> {
        self.inner.send(r)
    }
    fn recv(&mut self, buf: &mut [u8]) -> Result<(), pagewire_transport::TransportError> {
        let counted = self
            .left
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1));
        assert!(counted.is_ok(), "a transport bug");
        self.inner.recv(buf)
    }
    fn reply_ready(&mut self) -> Result<bool, pagewire_transport::TransportError> {
        self.inner.reply_ready()
    }
    fn ready_fd(&self) -> Option<std::os::fd::RawFd> {
        self.inner.ready_fd()
    }
    fn outstanding(&self) -> usize {
        self.inner.outstanding()
    }
    fn max_outstanding(&self) -> usize {
        self.inner.max_outstanding()
    }
}

impl Transport for Panicky {
    fn name(&self) -> &'static str {
        "panicky"
    }
    fn info(&self) -> &pagewire_transport::SourceInfo {
        self.inner.info()
    }
    fn open(
        &self,
        class: pagewire_transport::ChannelClass,
    ) -> Result<Box<dyn pagewire_transport::PageChannel>, pagewire_transport::TransportError> {
        let ch = self.inner.open(class)?;
        Ok(match class {
            pagewire_transport::ChannelClass::Bulk(_) => Box::new(PanicAfter {
                inner: ch,
                left: self.bulk_replies_left.clone(),
            }),
            _ => ch,
        })
    }
    fn limits(&self) -> pagewire_transport::FetchLimits {
        self.inner.limits()
    }
    fn checksums(&self, r: PageRange) -> Result<Vec<u64>, pagewire_transport::TransportError> {
        self.inner.checksums(r)
    }
    fn source_stats(
        &self,
    ) -> Result<pagewire_transport::SourceStats, pagewire_transport::TransportError> {
        self.inner.source_stats()
    }
}

/// A thread that panics inside the engine fails the migration: `wait()`
/// reports it, it never waits for the pages the dead thread had claimed.
#[test]
fn a_panicking_engine_thread_is_reported_not_a_hang() {
    let src = start_source("16MiB", 3);
    let t: Arc<dyn Transport> = Arc::new(Panicky {
        inner: connect(&src.addr, Duration::from_secs(5)),
        bulk_replies_left: Arc::new(std::sync::atomic::AtomicUsize::new(2)),
    });
    let handle = Migration::start(
        t,
        MigrationConfig {
            lanes: 2,
            ..MigrationConfig::default()
        },
    )
    .expect("start");
    let (tx, rx) = std::sync::mpsc::channel();
    thread::spawn(move || {
        let _ = tx.send(handle.wait().map(|_| ()));
    });
    match rx.recv_timeout(Duration::from_secs(60)) {
        Ok(Err(pagewire_engine::EngineError::Panicked { thread })) => assert_eq!(thread, "pw-lane"),
        other => panic!("expected the panic to be reported, got {other:?}"),
    }
}

/// A relay that can be cut for good: every connection closed and the port
/// no longer listening (a link that does not come back in time).
struct CutRelay {
    addr: String,
    dead: Arc<std::sync::atomic::AtomicBool>,
}

impl CutRelay {
    fn start(target: String) -> Self {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        l.set_nonblocking(true).unwrap();
        let addr = l.local_addr().unwrap().to_string();
        let dead = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let d = dead.clone();
        thread::spawn(move || {
            let mut pairs: Vec<(TcpStream, TcpStream)> = Vec::new();
            while !d.load(Ordering::SeqCst) {
                match l.accept() {
                    Ok((c, _)) => {
                        c.set_nonblocking(false).unwrap();
                        let Ok(s) = TcpStream::connect(&target) else {
                            continue;
                        };
                        pairs.push((c.try_clone().unwrap(), s.try_clone().unwrap()));
                        for (mut from, mut to) in
                            [(c.try_clone().unwrap(), s.try_clone().unwrap()), (s, c)]
                        {
                            thread::spawn(move || {
                                let _ = std::io::copy(&mut from, &mut to);
                                let _ = to.shutdown(std::net::Shutdown::Both);
                            });
                        }
                    }
                    Err(_) => thread::sleep(Duration::from_millis(5)),
                }
            }
            for (c, s) in pairs {
                let _ = c.shutdown(std::net::Shutdown::Both);
                let _ = s.shutdown(std::net::Shutdown::Both);
            }
            // The listener drops here: the port refuses from now on.
        });
        Self { addr, dead }
    }

    fn cut(&self) {
        self.dead.store(true, Ordering::SeqCst);
    }
}

/// Lets `handle` run for a while, cuts `relay` for good, and resumes the
/// parked migration over a direct connection to the source at `src`.
/// Checks it was parked before the end, that no page arrived twice and
/// that every page of `mem` equals the source's; `what` names the case
/// in a failure. Returns the resumed migration's report.
fn cut_and_resume(
    handle: pagewire_engine::MigrationHandle,
    relay: &CutRelay,
    src: &str,
    mem: &DestMemory,
    what: &str,
) -> pagewire_engine::EngineReport {
    thread::sleep(Duration::from_millis(300));
    relay.cut();
    let (_, parked) = handle.wait_resumable().expect_err("the link is gone");
    let (present, total) = parked.progress();
    assert!(present < total, "{what}: finished before the cut");
    let direct = connect(src, Duration::from_secs(5));
    let report = parked
        .resume(direct.clone())
        .expect("resume")
        .wait()
        .expect("resumed migration");
    assert_eq!(report.duplicate_pages, 0, "{what}");
    assert_equals_source(direct.as_ref(), mem, what);
    report
}

/// A migration into shared memory whose link is lost resumes the way it
/// installed: landed (pages populated for a reply that broke off are in
/// the file, not mapped, and land again) or copied in; every page
/// arrives once and matches the source.
#[test]
fn a_parked_migration_into_shared_memory_resumes_landed_or_copied() {
    use pagewire_engine::{InstallPath, SharedInstall};
    for (install, path) in [
        (SharedInstall::Land, InstallPath::Landed),
        (SharedInstall::Copy, InstallPath::SharedCopy),
    ] {
        let src = start_source("16MiB", 5);
        let relay = CutRelay::start(src.addr.clone());
        let t = connect(&relay.addr, Duration::from_secs(2));
        let mem = Arc::new(DestMemory::new_shared(&t.info().layout).expect("memfd"));
        let handle = Migration::start_with_memory(
            t,
            mem.clone(),
            MigrationConfig {
                lanes: 1,
                push_rate: Some(2_000_000),
                recover_timeout: Duration::from_millis(500),
                shared_install: install,
                ..MigrationConfig::default()
            },
        )
        .expect("start");
        let report = cut_and_resume(handle, &relay, &src.addr, &mem, &format!("{install:?}"));
        assert_eq!(report.install_path, path);
    }
}

/// A guest on 2 MiB pages switched over from a running source (its
/// writes tracked, no pre-copy rounds) loses its link, is parked and
/// resumes over a new connection: every 4 KiB page ends equal to the
/// paused source's.
#[test]
fn a_parked_migration_into_huge_pages_after_a_switch_over_resumes() {
    use pagewire_engine::{precopy, PrecopyConfig, SwitchOver};
    if !huge_pages_or_skip(8) {
        return;
    }
    let mut cmd = pagewire();
    // Zero pages only, but for what the guest writes: what it wrote must
    // be fetched, never installed as zeros.
    cmd.args(["source", "--listen", "127.0.0.1:0", "--synthetic", "8MiB"])
        .args(["--zero-percent", "100"])
        .args(["--guest-workload", "hotset", "--guest-think-us", "1"]);
    let src = spawn_source(&mut cmd);
    let relay = CutRelay::start(src.addr.clone());
    let t = connect(&relay.addr, Duration::from_secs(2));
    let mem = Arc::new(DestMemory::new_hugetlb(&t.info().layout).expect("huge pages"));
    let switch = PrecopyConfig {
        rounds: 0,
        converge_pages: 0,
        switch_over: SwitchOver::PostCopy,
    };
    let pre = precopy(&t, &mem, &switch, &mut |_, _| {}).expect("switch-over");
    assert!(
        pre.written.count() > 0,
        "the guest wrote nothing before the pause"
    );
    let handle = Migration::start_after_precopy(
        t,
        mem.clone(),
        MigrationConfig {
            lanes: 1,
            push_rate: Some(2_000_000),
            recover_timeout: Duration::from_millis(500),
            ..MigrationConfig::default()
        },
        &pre,
    )
    .expect("start");
    let report = cut_and_resume(handle, &relay, &src.addr, &mem, "huge pages");
    assert_eq!(report.page_size, 2 << 20);
}

/// The link goes away for longer than the recovery timeout: the migration
/// stops and is parked (a blocked thread stays blocked); resumed later
/// over a new connection to the same source it finishes, every page equal
/// to the source's. A different source is refused.
#[test]
fn a_parked_migration_resumes_over_a_new_connection() {
    let src = start_source("16MiB", 4);
    let relay = CutRelay::start(src.addr.clone());
    let handle = Migration::start(
        connect(&relay.addr, Duration::from_secs(2)),
        MigrationConfig {
            lanes: 1,
            push_rate: Some(2_000_000),
            recover_timeout: Duration::from_millis(500),
            ..MigrationConfig::default()
        },
    )
    .expect("start");
    let mem = handle.memory().clone();
    let t = handle.transport().clone();
    let last = nonzero_pages(&t, 4000, 1)[0];
    thread::sleep(Duration::from_millis(300));
    relay.cut();
    let (e, parked) = handle.wait_resumable().expect_err("the link is gone");
    assert!(
        matches!(
            e,
            pagewire_engine::EngineError::SourceGone { .. }
                | pagewire_engine::EngineError::RecoveryTimedOut { .. }
        ),
        "{e}"
    );
    let (present, total) = parked.progress();
    assert!(present < total, "finished before the cut");
    // A vCPU touches a page that has not arrived: it blocks.
    let vcpu = {
        let mem = mem.clone();
        thread::spawn(move || page_checksum(mem.page(last).unwrap()))
    };
    thread::sleep(Duration::from_millis(200));
    assert!(
        !vcpu.is_finished(),
        "a thread read a page that never arrived"
    );
    // Another source's memory is refused; the migration stays parked.
    let other = start_source("16MiB", 99);
    let (e, parked) = parked
        .resume(connect(&other.addr, Duration::from_secs(5)))
        .expect_err("another source");
    assert!(e.to_string().contains("other memory"), "{e}");
    // The same source, directly: the migration finishes.
    let direct = connect(&src.addr, Duration::from_secs(5));
    let handle = parked.resume(direct.clone()).expect("resume");
    let report = handle.wait().expect("resumed migration");
    assert_eq!(report.duplicate_pages, 0);
    let want = assert_equals_source(direct.as_ref(), &mem, "resumed");
    assert_eq!(vcpu.join().unwrap(), want[last as usize]);
}
