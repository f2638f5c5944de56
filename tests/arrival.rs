//! Bulk replies installed as they arrive: a thread faulting on a page of a
//! reply that is still coming gets its page before the rest of the reply
//! is here, and a reply that breaks off after some of its pages were
//! installed asks again only for the others. Against a real `pagewire
//! source` process; a wrapper on the lane's channel holds the reply half
//! way (as a slow link does) until the faulting thread has its page. The
//! TCP channel itself reports a reply that trickles in, a piece at a time.

mod common;

use common::*;
use pagewire_engine::{DestMemory, InstallPath, Migration, MigrationConfig, SharedInstall};
use pagewire_transport::tcp::{TcpOptions, TcpTransport};
use pagewire_transport::{
    page_checksum, ChannelClass, FetchLimits, Landing, LandingSpan, PageChannel, PageRange,
    SourceInfo, SourceStats, SpanFile, Transport, TransportError,
};
use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread;
use std::time::{Duration, Instant};

/// How long the gate holds a reply at most: a bound for the failing case
/// only (the page arrives early or the test fails), never a measurement.
const HOLD_AT_MOST: Duration = Duration::from_secs(30);

/// What the test and the held lane tell each other.
#[derive(Default)]
struct Gate {
    /// Still to hold a reply (the first of two pages or more).
    armed: AtomicBool,
    /// The page whose bytes (and only the bytes before its reply's
    /// second page) have arrived.
    held: Mutex<Option<u64>>,
    held_cv: Condvar,
    /// The faulting thread has its page.
    touched: AtomicBool,
    /// The reply was let go because the faulting thread had its page
    /// (not because the bound ran out).
    released_by_touch: AtomicBool,
    /// The ranges of the held reply.
    held_ranges: Mutex<Vec<PageRange>>,
    /// After the hold, the reply breaks off (the link is lost).
    break_after: bool,
    /// Bulk requests sent once a reply was held (resends included).
    sent_after_hold: Mutex<Vec<PageRange>>,
}

struct Gated {
    inner: Arc<dyn Transport>,
    gate: Arc<Gate>,
}

struct GatedChannel {
    inner: Box<dyn PageChannel>,
    gate: Arc<Gate>,
    page_size: usize,
    sent: VecDeque<Vec<PageRange>>,
}

impl PageChannel for GatedChannel {
    fn send(&mut self, r: &[PageRange]) -> Result<(), TransportError> {
        self.inner.send(r)?;
        self.note_sent(r);
        Ok(())
    }
    fn send_landed(&mut self, r: &[PageRange]) -> Result<(), TransportError> {
        self.inner.send_landed(r)?;
        self.note_sent(r);
        Ok(())
    }
    fn recv(&mut self, buf: &mut [u8]) -> Result<(), TransportError> {
        self.recv_streaming(buf, &mut |_| {})
    }
    fn recv_streaming(
        &mut self,
        buf: &mut [u8],
        arrived: &mut dyn FnMut(&[u8]),
    ) -> Result<(), TransportError> {
        self.inner.recv(buf)?;
        let ps = self.page_size;
        self.hold(&mut || arrived(&buf[..ps]))
    }
    fn recv_landed(&mut self) -> Result<(), TransportError> {
        self.recv_landed_streaming(&mut |_| {})
    }
    fn recv_landed_streaming(
        &mut self,
        arrived: &mut dyn FnMut(usize),
    ) -> Result<(), TransportError> {
        self.inner.recv_landed()?;
        let ps = self.page_size;
        self.hold(&mut || arrived(ps))
    }
    fn reply_ready(&mut self) -> Result<bool, TransportError> {
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

impl GatedChannel {
    fn note_sent(&mut self, r: &[PageRange]) {
        self.sent.push_back(r.to_vec());
        if self.gate.held.lock().unwrap().is_some() {
            self.gate
                .sent_after_hold
                .lock()
                .unwrap()
                .extend_from_slice(r);
        }
    }

    /// The reply to the oldest request is here: when it is the one to
    /// hold, tells the engine (with `first_page_arrived`) that only its
    /// first page is, again and again as each new read would, until the
    /// faulting thread has that page; then lets it go, or breaks it off.
    fn hold(&mut self, first_page_arrived: &mut dyn FnMut()) -> Result<(), TransportError> {
        let ranges = self.sent.pop_front().unwrap_or_default();
        let pages: u64 = ranges.iter().map(|r| u64::from(r.count)).sum();
        if pages < 2 || !self.gate.armed.swap(false, Ordering::SeqCst) {
            return Ok(());
        }
        let g = &self.gate;
        *g.held_ranges.lock().unwrap() = ranges.clone();
        *g.held.lock().unwrap() = Some(ranges[0].first);
        g.held_cv.notify_all();
        let t0 = Instant::now();
        while !g.touched.load(Ordering::SeqCst) && t0.elapsed() < HOLD_AT_MOST {
            first_page_arrived();
            thread::sleep(Duration::from_millis(1));
        }
        g.released_by_touch
            .store(g.touched.load(Ordering::SeqCst), Ordering::SeqCst);
        if g.break_after {
            return Err(TransportError::Closed {
                context: "the test broke the reply off".into(),
            });
        }
        Ok(())
    }
}

impl Transport for Gated {
    fn name(&self) -> &'static str {
        "gated"
    }
    fn info(&self) -> &SourceInfo {
        self.inner.info()
    }
    fn open(&self, class: ChannelClass) -> Result<Box<dyn PageChannel>, TransportError> {
        let ch = self.inner.open(class)?;
        Ok(match class {
            ChannelClass::Bulk(_) => Box::new(GatedChannel {
                inner: ch,
                gate: self.gate.clone(),
                page_size: self.inner.info().layout.page_size(),
                sent: VecDeque::new(),
            }),
            _ => ch,
        })
    }
    fn limits(&self) -> FetchLimits {
        self.inner.limits()
    }
    fn checksums(&self, r: PageRange) -> Result<Vec<u64>, TransportError> {
        self.inner.checksums(r)
    }
    fn source_stats(&self) -> Result<SourceStats, TransportError> {
        self.inner.source_stats()
    }
    fn set_landing(&self, landing: Arc<Landing>) -> Result<bool, TransportError> {
        self.inner.set_landing(landing)
    }
}

/// Holds the first bulk reply of two pages or more after its first page,
/// touches that page from another thread, and checks that the touch
/// returned while the reply was held; then the whole migration. Into
/// private memory, or (`shared`) a memfd filled as it says.
fn fault_on_a_page_still_arriving(break_after: bool, shared: Option<SharedInstall>) {
    let src = start_source("8MiB", 21);
    let inner: Arc<dyn Transport> = Arc::new(
        TcpTransport::connect(
            &src.addr,
            TcpOptions {
                io_timeout: Duration::from_secs(60),
                ..TcpOptions::default()
            },
        )
        .expect("connect"),
    );
    let gate = Arc::new(Gate {
        armed: AtomicBool::new(true),
        break_after,
        ..Gate::default()
    });
    let t: Arc<dyn Transport> = Arc::new(Gated {
        inner: inner.clone(),
        gate: gate.clone(),
    });
    let config = MigrationConfig {
        lanes: 1,
        bubble: 0,
        // Full batches from the first request on.
        flow_control: false,
        shared_install: shared.unwrap_or_default(),
        ..MigrationConfig::default()
    };
    let handle = if shared.is_some() {
        // A memfd: pages land in it and are mapped with UFFDIO_CONTINUE,
        // or are copied in with UFFDIO_COPY.
        let mem = DestMemory::new_shared(&inner.info().layout).expect("memfd memory");
        Migration::start_with_memory(t, Arc::new(mem), config).expect("start")
    } else {
        Migration::start(t, config).expect("start")
    };
    let mem = handle.memory().clone();
    let page = {
        let held = gate.held.lock().unwrap();
        let (held, _) = gate
            .held_cv
            .wait_timeout_while(held, HOLD_AT_MOST, |h| h.is_none())
            .unwrap();
        held.expect("no bulk reply of two pages or more")
    };
    let vcpu = {
        let (mem, gate) = (mem.clone(), gate.clone());
        thread::spawn(move || {
            let sum = page_checksum(mem.page(page).expect("page"));
            gate.touched.store(true, Ordering::SeqCst);
            sum
        })
    };
    let sum = vcpu.join().expect("vcpu");
    // Bounded: a page installed twice would leave the migration waiting
    // for a page count it never reaches.
    let (tx, rx) = std::sync::mpsc::channel();
    thread::spawn(move || {
        let _ = tx.send(handle.wait());
    });
    let report = rx
        .recv_timeout(HOLD_AT_MOST)
        .expect("the migration did not end")
        .expect("migration");
    assert!(
        gate.released_by_touch.load(Ordering::SeqCst),
        "the faulting thread got page {page} only when its whole reply had arrived"
    );
    let total = inner.info().layout.total_pages();
    let want = inner.checksums(PageRange::new(0, total as u32)).unwrap();
    assert_eq!(
        sum, want[page as usize],
        "page {page} as the thread read it"
    );
    for (p, w) in want.iter().enumerate() {
        assert_eq!(page_checksum(mem.page(p as u64).unwrap()), *w, "page {p}");
    }
    assert!(report.early_pages >= 1, "{report:?}");
    let path = match shared {
        None => InstallPath::Copy,
        Some(SharedInstall::Land) => InstallPath::Landed,
        Some(_) => InstallPath::SharedCopy,
    };
    assert_eq!(report.install_path, path);
    assert_eq!(report.duplicate_pages, 0, "a page fetched twice");
    assert_eq!(report.install_conflicts, 0);
    // The page the thread got early was never asked for again.
    let again = gate.sent_after_hold.lock().unwrap();
    assert!(
        !again.iter().any(|r| page >= r.first && page < r.end()),
        "page {page} asked for again: {again:?}"
    );
    if break_after {
        assert_eq!(report.link_losses, 1);
        // The rest of the held reply was (with whatever else was
        // outstanding on the channel).
        let held = gate.held_ranges.lock().unwrap();
        let held_pages: u64 = held.iter().map(|r| u64::from(r.count)).sum();
        assert!(report.resent_pages >= held_pages - 1, "{report:?}");
        // Its second page, the first it had not installed.
        let second = if held[0].count > 1 {
            held[0].first + 1
        } else {
            held[1].first
        };
        assert!(
            again.iter().any(|r| second >= r.first && second < r.end()),
            "page {second}, of the held reply, was not asked for again: {again:?}"
        );
    }
}

#[test]
fn a_fault_on_a_page_still_arriving_gets_it_before_the_rest_of_the_reply() {
    fault_on_a_page_still_arriving(false, None);
}

#[test]
fn a_reply_broken_off_after_an_early_page_asks_again_only_for_the_rest() {
    fault_on_a_page_still_arriving(true, None);
}

#[test]
fn a_page_landed_in_shared_memory_is_mapped_before_the_rest_of_its_reply() {
    fault_on_a_page_still_arriving(false, Some(SharedInstall::Land));
}

#[test]
fn a_page_copied_into_shared_memory_is_mapped_before_the_rest_of_its_reply() {
    fault_on_a_page_still_arriving(false, Some(SharedInstall::Copy));
}

#[test]
fn a_landed_reply_broken_off_after_an_early_page_asks_again_only_for_the_rest() {
    fault_on_a_page_still_arriving(true, Some(SharedInstall::Land));
}

#[test]
fn a_reply_into_shared_memory_broken_off_after_an_early_page_asks_again_only_for_the_rest() {
    fault_on_a_page_still_arriving(true, Some(SharedInstall::Copy));
}

/// What a channel reported while a reply trickled in: every report
/// covered more than none and less than all of it, none shorter than the
/// one before, and the bytes reported were final.
fn check_reports(reports: &[usize], total: usize) {
    assert!(
        !reports.is_empty(),
        "a {total}-byte reply that took 250 ms to arrive was never reported in part"
    );
    assert!(reports.windows(2).all(|w| w[0] <= w[1]), "{reports:?}");
    assert!(reports.iter().all(|&n| n > 0 && n < total), "{reports:?}");
}

/// A TCP transport to a source of 8 MiB (`seed`) over a slow link: the
/// source's bytes passed on 1000 at a time, 1 ms apart, so page
/// boundaries fall inside reads.
fn over_a_slow_link(seed: u64) -> (Source, TcpTransport) {
    let src = start_source("8MiB", seed);
    let relay = slow_relay(src.addr.clone(), 1000, Duration::from_millis(1));
    let t = TcpTransport::connect(
        &relay,
        TcpOptions {
            io_timeout: Duration::from_secs(60),
            ..TcpOptions::default()
        },
    )
    .expect("connect");
    (src, t)
}

/// The TCP channel reports a reply's bytes as they are read: into a
/// buffer (each prefix already holding the source's bytes) and into
/// landing memory.
#[test]
fn tcp_tells_the_caller_about_a_reply_as_it_arrives() {
    let (_src, t) = over_a_slow_link(22);
    let ps = t.info().layout.page_size();
    let pages = 64u32;
    let total = pages as usize * ps;
    let want = t.checksums(PageRange::new(0, pages)).unwrap();
    let sums = |bytes: &[u8]| -> Vec<u64> { bytes.chunks(ps).map(page_checksum).collect() };

    // Into a buffer: each prefix reported holds the source's pages.
    let mut ch = t.open(ChannelClass::Bulk(0)).expect("channel");
    ch.send(&[PageRange::new(0, pages)]).unwrap();
    let mut buf = vec![0u8; total];
    let mut reports = Vec::new();
    ch.recv_streaming(&mut buf, &mut |prefix| {
        let full = prefix.len() / ps;
        assert_eq!(
            sums(&prefix[..full * ps]),
            want[..full],
            "a page reported early"
        );
        reports.push(prefix.len());
    })
    .expect("recv");
    check_reports(&reports, total);
    assert_eq!(sums(&buf), want);

    // Into landing memory, a second request in the same landing.
    let mut map = memmap2::MmapMut::map_anon(total).unwrap();
    let addr = map.as_mut_ptr() as usize;
    let span = LandingSpan {
        first_page: 0,
        pages: u64::from(pages),
        addr,
    };
    let map = Arc::new(map);
    // SAFETY: `map` is this process's memory, readable and writable for
    // the span, kept mapped by the landing's owner; only the channel
    // writes it until the reply is in, and it is read after that.
    let landing = unsafe { Landing::new(ps, vec![span], map.clone()) }.expect("landing");
    assert!(t.set_landing(Arc::new(landing)).unwrap());
    let mut ch = t.open(ChannelClass::Bulk(1)).expect("channel");
    ch.send_landed(&[
        PageRange::new(0, pages / 2),
        PageRange::new(u64::from(pages / 2), pages / 2),
    ])
    .unwrap();
    let mut reports = Vec::new();
    ch.recv_landed_streaming(&mut |n| reports.push(n))
        .expect("recv landed");
    check_reports(&reports, total);
    assert_eq!(sums(&map[..]), want);
}

/// Pages of `len` bytes at `addr` that this process has mapped (a page
/// table entry present), from `/proc/self/pagemap`.
fn mapped_pages(addr: usize, len: usize, ps: usize) -> usize {
    use std::os::unix::fs::FileExt;
    let f = std::fs::File::open("/proc/self/pagemap").expect("pagemap");
    (0..len / ps)
        .filter(|i| {
            let mut e = [0u8; 8];
            f.read_exact_at(&mut e, ((addr / ps + i) * 8) as u64)
                .expect("read pagemap");
            u64::from_le_bytes(e) & (1 << 63) != 0
        })
        .count()
}

/// Landing memory whose span names the memfd it maps: the TCP channel
/// writes the reply into the file, whole pages at a time, and reports
/// only whole pages, each holding the source's bytes when reported; the
/// mapping itself is never written (its pages are never faulted in).
#[test]
fn tcp_writes_a_landed_reply_into_the_file_behind_its_span() {
    use std::os::unix::fs::FileExt;
    let (_src, t) = over_a_slow_link(23);
    let ps = t.info().layout.page_size();
    let pages = 48u32;
    let total = pages as usize * ps;
    let want = t.checksums(PageRange::new(0, pages)).unwrap();

    // The span maps the file from one page in, as a region at an offset.
    let fd = nix::sys::memfd::memfd_create(c"landing", nix::sys::memfd::MemFdCreateFlag::empty())
        .expect("memfd");
    let file = Arc::new(std::fs::File::from(fd));
    file.set_len((total + ps) as u64).unwrap();
    // SAFETY: a fresh memfd of this test; the mapping is shared and read
    // only after the reply is in.
    let map = unsafe {
        memmap2::MmapOptions::new()
            .offset(ps as u64)
            .len(total)
            .map_mut(&*file)
    }
    .expect("map the memfd");
    let addr = map.as_ptr() as usize;
    let span = LandingSpan {
        first_page: 0,
        pages: u64::from(pages),
        addr,
    };
    let map = Arc::new(map);
    // SAFETY: `map` is a shared mapping of `file` from byte `ps` on, kept
    // mapped by the landing's owner; only the channel writes it until the
    // reply is in.
    let landing = unsafe {
        Landing::new(ps, vec![span], map.clone())
            .expect("landing")
            .with_file(
                0,
                SpanFile {
                    file: file.clone(),
                    offset: ps as u64,
                },
            )
            .expect("file")
    };
    assert!(landing.has_file(PageRange::new(3, 2)));
    assert!(t.set_landing(Arc::new(landing)).unwrap());
    let mut ch = t.open(ChannelClass::Bulk(0)).expect("channel");
    let half = pages / 2;
    ch.send_landed(&[
        PageRange::new(u64::from(half), half),
        PageRange::new(0, half),
    ])
    .unwrap();
    // Where the n-th byte of the reply lands in the file: the second
    // range first.
    let page_of_reply = |i: usize| {
        if i < half as usize {
            i + half as usize
        } else {
            i - half as usize
        }
    };
    let mut reports = Vec::new();
    ch.recv_landed_streaming(&mut |n| {
        assert_eq!(n % ps, 0, "a part of a page reported landed");
        for i in 0..n / ps {
            let page = page_of_reply(i);
            let mut bytes = vec![0u8; ps];
            file.read_exact_at(&mut bytes, ((page + 1) * ps) as u64)
                .unwrap();
            assert_eq!(
                page_checksum(&bytes),
                want[page],
                "page {page} reported early"
            );
        }
        reports.push(n);
    })
    .expect("recv landed");
    check_reports(&reports, total);
    assert_eq!(
        mapped_pages(addr, total, ps),
        0,
        "bytes were written through the mapping, not the file"
    );
    let got: Vec<u64> = map.chunks(ps).map(page_checksum).collect();
    assert_eq!(got, want);
    // The file's first page, before the span, was never written.
    let mut first = vec![1u8; ps];
    file.read_exact_at(&mut first, 0).unwrap();
    assert!(first.iter().all(|&b| b == 0));
}
