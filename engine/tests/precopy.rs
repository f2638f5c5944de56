//! Pre-copy rounds with the source's writes tracked by userfaultfd
//! write-protection, then post-copy (hybrid) or stop-and-copy: a page
//! written during pre-copy is copied again, one not written is not, and
//! every page ends equal to the source's final bytes.

use std::io;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};

use memmap2::MmapMut;
use pagewire_engine::{
    precopy, Migration, MigrationConfig, PageOrigin, PrecopyConfig, SwitchOver, WriteTracker,
};
use pagewire_transport::inproc::InProcTransport;
use pagewire_transport::{
    page_checksum, DirtyLog, MemoryLayout, PageRange, PageSet, SourceMemory, Transport,
};

const PAGES: u64 = 512;
const PS: usize = 4096;

/// The source's guest, scripted: before round `k` is collected it writes
/// the pages `writes[k - 1]`, through write-protected memory, from its own
/// thread (a vCPU), so the tracker must see them.
struct ScriptedGuest {
    tracker: WriteTracker,
    base: usize,
    writes: Vec<Vec<u64>>,
    round: AtomicU32,
    paused: Mutex<bool>,
}

impl DirtyLog for ScriptedGuest {
    fn collect(&self, pause: bool) -> io::Result<PageSet> {
        let k = self.round.fetch_add(1, Ordering::SeqCst) as usize;
        let pages = self.writes.get(k).cloned().unwrap_or_default();
        let base = self.base;
        std::thread::spawn(move || {
            for p in pages {
                // SAFETY: the page lies inside the source's live mapping.
                unsafe {
                    std::ptr::write_volatile((base + p as usize * PS + 104) as *mut u64, p + 7)
                };
            }
        })
        .join()
        .map_err(|_| io::Error::other("guest thread panicked"))?;
        if pause {
            *self.paused.lock().unwrap() = true;
        }
        self.tracker.collect(pause)
    }
}

/// A source of `PAGES` pages, every 4th zero, whose guest writes
/// `writes[k]` during round `k + 1`.
fn source(writes: Vec<Vec<u64>>) -> (Arc<SourceMemory>, Arc<ScriptedGuest>) {
    let mut map = MmapMut::map_anon(PAGES as usize * PS).unwrap();
    for (i, page) in map.chunks_exact_mut(PS).enumerate() {
        if i % 4 != 0 {
            page[..8].copy_from_slice(&(i as u64 + 1).to_le_bytes());
        }
    }
    let base = map.as_mut_ptr() as usize;
    // SAFETY: `map` is private anonymous read-write memory; it is kept
    // alive by the SourceMemory below for as long as the tracker.
    let tracker =
        unsafe { WriteTracker::start(&[(base, PAGES as usize * PS)], PS, Box::new(|| {})) }
            .unwrap();
    let guest = Arc::new(ScriptedGuest {
        tracker,
        base,
        writes,
        round: AtomicU32::new(0),
        paused: Mutex::new(false),
    });
    let layout = MemoryLayout::single(PAGES * PS as u64).unwrap();
    let mem = SourceMemory::new(layout, vec![Arc::new(map)])
        .unwrap()
        .with_dirty_log(guest.clone());
    (Arc::new(mem), guest)
}

fn verify(t: &Arc<dyn Transport>, h: &pagewire_engine::MigrationHandle) {
    let sums = t.checksums(PageRange::new(0, PAGES as u32)).unwrap();
    let mem = h.memory();
    for p in 0..PAGES {
        assert_eq!(
            page_checksum(mem.page(p).unwrap()),
            sums[p as usize],
            "page {p}"
        );
    }
}

#[test]
fn hybrid_copies_written_pages_again_and_fetches_the_last_ones_post_copy() {
    // Round 1 dirties 3 pages (8 was a zero page); round 2 dirties 2; the
    // switch-over finds 2 more (one copied, one never: 12 is zero).
    let writes = vec![vec![5, 8, 9], vec![9, 10], vec![11, 12]];
    let (src, guest) = source(writes);
    let t: Arc<dyn Transport> = Arc::new(InProcTransport::new(src.clone()));
    let zero = t.info().zero.count();
    let mem = Arc::new(pagewire_engine::DestMemory::new(&t.info().layout).unwrap());
    let pre = precopy(
        &t,
        &mem,
        &PrecopyConfig {
            rounds: 3,
            converge_pages: 0,
            switch_over: SwitchOver::PostCopy,
        },
        &mut |_, _| {},
    )
    .unwrap();
    assert!(
        *guest.paused.lock().unwrap(),
        "the switch-over pauses the guest"
    );
    let r = &pre.report;
    let per_round: Vec<u64> = r.rounds.iter().map(|x| x.pages).collect();
    // Round 1: every non-zero page; then exactly the pages written.
    assert_eq!(per_round, vec![PAGES - zero, 3, 2]);
    assert_eq!(r.rounds[0].dirtied, 3);
    assert_eq!(r.final_dirty, 2);
    // 11 was copied and then written: dropped. 12 was never copied.
    assert!(!pre.present.contains(11) && !pre.present.contains(12));
    assert!(pre.present.contains(10) && pre.present.contains(8));
    assert_eq!(r.pages_present, PAGES - zero + 1 - 1);

    let h = Migration::start_after_precopy(
        t.clone(),
        mem.clone(),
        MigrationConfig {
            lanes: 1,
            ..MigrationConfig::default()
        },
        &pre,
    )
    .unwrap();
    // The "vCPU" reads everything at once on resume.
    let mut s = 0u64;
    for p in 0..PAGES {
        s = s.wrapping_add(u64::from(mem.page(p).unwrap()[100]));
    }
    std::hint::black_box(s);
    h.release_push();
    while !h.is_finished() {
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
    assert_eq!(h.origin(10), PageOrigin::Precopy);
    assert_ne!(h.origin(11), PageOrigin::Precopy);
    verify(&t, &h);
    let report = h.wait().unwrap();
    // Post-copy moved only the dropped page and the written zero page.
    assert_eq!(report.bytes_received, 2 * PS as u64);
    assert_eq!(report.duplicate_pages, 0);
}

#[test]
fn stop_and_copy_leaves_nothing_to_fetch_and_converges_early() {
    // Round 1 dirties 40 pages, round 2 only 1: converged (<= 4), so the
    // switch-over copies that page and the last writes while paused.
    let writes = vec![(20..60).collect(), vec![3], vec![70, 4]];
    let (src, _guest) = source(writes);
    let t: Arc<dyn Transport> = Arc::new(InProcTransport::new(src.clone()));
    let mem = Arc::new(pagewire_engine::DestMemory::new(&t.info().layout).unwrap());
    let pre = precopy(
        &t,
        &mem,
        &PrecopyConfig {
            rounds: 10,
            converge_pages: 4,
            switch_over: SwitchOver::StopAndCopy,
        },
        &mut |_, _| {},
    )
    .unwrap();
    let r = &pre.report;
    assert_eq!(r.rounds.len(), 2, "converged after round 2");
    assert_eq!(r.rounds[1].pages, 40);
    assert_eq!(
        r.pages_sent_paused, 3,
        "page 3 from round 2, 70 and 4 at the pause"
    );
    let h =
        Migration::start_after_precopy(t.clone(), mem.clone(), MigrationConfig::default(), &pre)
            .unwrap();
    h.release_push();
    while !h.is_finished() {
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
    verify(&t, &h);
    let report = h.wait().unwrap();
    assert_eq!(
        report.bytes_received, 0,
        "nothing left to fetch after stop-and-copy"
    );
}

#[test]
fn a_source_without_a_dirty_log_refuses_pre_copy() {
    let layout = MemoryLayout::single(16 * PS as u64).unwrap();
    let src = SourceMemory::new(layout, vec![Arc::new(vec![1u8; 16 * PS])]).unwrap();
    let t: Arc<dyn Transport> = Arc::new(InProcTransport::new(Arc::new(src)));
    let mem = pagewire_engine::DestMemory::new(&t.info().layout).unwrap();
    let cfg = PrecopyConfig {
        rounds: 2,
        converge_pages: 0,
        switch_over: SwitchOver::PostCopy,
    };
    assert!(precopy(&t, &mem, &cfg, &mut |_, _| {}).is_err());
}

#[test]
fn zero_rounds_only_switch_over() {
    // The guest wrote 6 (a copied page) and 8 (a zero page) before the
    // switch-over; with no rounds, post-copy fetches everything, and sees
    // 8 is no longer a zero page.
    for switch_over in [SwitchOver::PostCopy, SwitchOver::StopAndCopy] {
        let (src, _guest) = source(vec![vec![6, 8]]);
        let t: Arc<dyn Transport> = Arc::new(InProcTransport::new(src.clone()));
        let mem = Arc::new(pagewire_engine::DestMemory::new(&t.info().layout).unwrap());
        let cfg = PrecopyConfig {
            rounds: 0,
            converge_pages: 0,
            switch_over,
        };
        let pre = precopy(&t, &mem, &cfg, &mut |_, _| {}).unwrap();
        assert!(pre.report.rounds.is_empty());
        assert!(pre.written.contains(8));
        let h = Migration::start_after_precopy(
            t.clone(),
            mem.clone(),
            MigrationConfig::default(),
            &pre,
        )
        .unwrap();
        h.release_push();
        while !h.is_finished() {
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        verify(&t, &h);
        let report = h.wait().unwrap();
        let zero = t.info().zero.count();
        let moved = match switch_over {
            SwitchOver::PostCopy => report.bytes_received / PS as u64,
            SwitchOver::StopAndCopy => pre.report.pages_sent_paused,
        };
        assert_eq!(moved, PAGES - zero + 1, "{switch_over:?}");
    }
}
