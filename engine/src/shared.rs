//! State shared by the fault services and the pusher lanes of one
//! migration.

use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Instant;

use pagewire_transport::{FetchLimits, PageRange, Transport};
use vmm_sys_util::eventfd::{EventFd, EFD_CLOEXEC, EFD_NONBLOCK};

use crate::config::MigrationConfig;
use crate::error::EngineError;
use crate::governor::Governor;
use crate::heat::HeatMap;
use crate::metrics::Metrics;
use crate::prepager::Prepager;
use crate::state::{PageOrigin, PageStateMap, Removal};
use crate::uffd::{OnBusy, PageInstaller};
use crate::waits::FaultWaits;

/// Everything the threads of one migration share.
pub(crate) struct Shared {
    pub states: PageStateMap,
    pub installer: PageInstaller,
    pub transport: Arc<dyn Transport>,
    pub prepager: Prepager,
    pub metrics: Metrics,
    pub config: MigrationConfig,
    pub governor: Governor,
    /// What one request may carry on this transport.
    pub limits: FetchLimits,
    pub sweep_cursor: AtomicU64,
    /// Pages land in shared guest memory (the transport took its second
    /// mapping): channels send with `send_landed` and installs map them
    /// with UFFDIO_CONTINUE.
    pub landed: bool,
    /// Next page the lanes look at for zero pages to map.
    pub zero_cursor: AtomicU64,
    /// Fault counts per block: the sweep pushes hot blocks first.
    pub heat: HeatMap,
    pub push_released: AtomicBool,
    abort: AtomicBool,
    /// Readable once the migration has every page or is stopping: wakes
    /// fault services sleeping on the userfaultfd, so that the migration
    /// ends when its last page arrives, not when their poll times out.
    done: EventFd,
    pub error: Mutex<Option<EngineError>>,
    pub started: Instant,
    /// How long starting took.
    pub setup: OnceLock<std::time::Duration>,
    pub finished: OnceLock<Instant>,
    /// Pages to fetch before anything else: those that were being fetched
    /// when a migration stopped, before it was resumed.
    pub retry: Mutex<Vec<u64>>,
    /// Held by a fault service from reading userfaultfd events until it
    /// has applied them: with several services, one whose install waits
    /// on the owner's mapping change may find that another read the
    /// event; it then waits here until that one has applied it.
    pub events: Mutex<()>,
    /// Fault services running (each counts itself in).
    pub fault_services: AtomicUsize,
    /// After pre-copy: pages the source's guest wrote after the handshake
    /// (a transport the migration resumes over is seen through
    /// [`crate::precopy::Refreshed`] with them).
    pub written: Option<pagewire_transport::PageSet>,
}

impl Shared {
    /// A new eventfd to tell the fault services the migration is over
    /// (see [`Self::stop`]); fails only when the process is out of file
    /// descriptors.
    pub fn done_eventfd() -> Result<EventFd, EngineError> {
        EventFd::new(EFD_NONBLOCK | EFD_CLOEXEC).map_err(EngineError::EventFd)
    }

    #[allow(clippy::too_many_arguments)]
    pub fn new(
        states: PageStateMap,
        installer: PageInstaller,
        transport: Arc<dyn Transport>,
        prepager: Prepager,
        metrics: Metrics,
        config: MigrationConfig,
        governor: Governor,
        limits: FetchLimits,
        done: EventFd,
    ) -> Self {
        let heat = HeatMap::new(states.len());
        Self {
            heat,
            states,
            installer,
            transport,
            prepager,
            metrics,
            config,
            governor,
            limits,
            sweep_cursor: AtomicU64::new(0),
            landed: false,
            zero_cursor: AtomicU64::new(0),
            push_released: AtomicBool::new(false),
            abort: AtomicBool::new(false),
            error: Mutex::new(None),
            started: Instant::now(),
            setup: OnceLock::new(),
            finished: OnceLock::new(),
            retry: Mutex::new(Vec::new()),
            events: Mutex::new(()),
            fault_services: AtomicUsize::new(0),
            written: None,
            done,
        }
    }

    /// This stopped migration, to run again over `transport`: claims that
    /// died with its threads are released and fetched first, the sweep
    /// starts over (skipping what is here) and is let run.
    pub fn resumed(
        self,
        transport: Arc<dyn Transport>,
        limits: FetchLimits,
        waits: Arc<FaultWaits>,
    ) -> Self {
        let (mut released, mut settled) = self.states.release_claimed();
        // Shared memory: a page an install had already mapped when the
        // migration stopped must not be written again through the second
        // mapping (the guest may have written it since): it is present.
        if self.installer.memory().is_shared() {
            let mem = self.installer.memory().clone();
            let mapped = |p: u64| mem.is_mapped(p).unwrap_or(false);
            released.retain(|&p| !(mapped(p) && self.states.preset_present(p, PageOrigin::Fault)));
            settled.retain(|&p| !mapped(p));
        }
        // Removed while being fetched: zeros, and their threads woken.
        for p in settled {
            if let Err(e) = self.installer.install_zero(PageRange::new(p, 1), true) {
                tracing::warn!(page = p, "cannot map a removed page: {e}");
            }
        }
        // Faults waiting on pages made present here (removed, or mapped
        // already) are over: their threads were woken by the zero install
        // or find the page mapped. Left on the list they would hold every
        // paced lane.
        let now = std::time::Instant::now();
        waits.settle_where(
            |p| self.states.is_present(p),
            |t0| {
                self.metrics.inflight.record(now - t0);
                self.metrics.all.record(now - t0);
            },
        );
        // Pages the stopped fault service had read faults for come first.
        let mut retry = std::mem::take(&mut *self.retry.lock().unwrap_or_else(|p| p.into_inner()));
        retry.extend(released);
        // Taken from the end: lowest pages first.
        retry.sort_unstable();
        retry.dedup();
        retry.reverse();
        let batch = u64::from(self.config.batch_pages).min(limits.max_pages) as u32;
        let governor = Governor::new(
            self.installer.memory().layout().page_size(),
            batch,
            self.config.flow_control,
            self.config.push_rate,
        )
        .with_waits(waits);
        // The stop rang the eventfd: quiet it for the new threads (a read
        // resets it; an error means it was not readable).
        let _ = self.done.read();
        let resumed = Self::new(
            self.states,
            self.installer,
            transport,
            self.prepager,
            self.metrics,
            self.config,
            governor,
            limits,
            self.done,
        );
        resumed.push_released.store(true, Ordering::Relaxed);
        Self {
            started: self.started,
            setup: self.setup,
            finished: self.finished,
            retry: Mutex::new(retry),
            written: self.written,
            ..resumed
        }
    }

    /// Records the first error and tells every thread to stop.
    pub fn fail(&self, e: EngineError) {
        tracing::error!("migration failed: {e}");
        let mut slot = self.error.lock().unwrap_or_else(|p| p.into_inner());
        if slot.is_none() {
            *slot = Some(e);
        }
        drop(slot);
        self.stop();
    }

    /// Tells every thread to stop (after an error, or on the owner's
    /// abort).
    pub fn stop(&self) {
        self.abort.store(true, Ordering::SeqCst);
        self.ring_done();
    }

    /// Wakes the fault services: the migration has every page or is
    /// stopping. The eventfd stays readable from then on.
    fn ring_done(&self) {
        // Only fails when the counter would overflow, which takes 2^64 - 1
        // rings; a ring already pending is enough either way.
        let _ = self.done.write(1);
    }

    /// The descriptor that becomes readable once the migration has every
    /// page or is stopping (see [`Self::stop`]).
    pub fn done_fd(&self) -> std::os::fd::RawFd {
        self.done.as_raw_fd()
    }

    /// Records that every page is here (first call only) and wakes the
    /// fault services.
    fn note_finished(&self) {
        if self.finished.set(Instant::now()).is_ok() {
            self.ring_done();
        }
    }

    /// Whether the migration is stopping on an error or an abort.
    pub fn aborted(&self) -> bool {
        self.abort.load(Ordering::SeqCst)
    }

    /// Whether the sweep pushes the blocks the guest faults in most first.
    pub fn heat_sweep(&self) -> bool {
        self.config.heat_sweep && !self.config.sweep_from_fault
    }

    /// Whether hot blocks are pushed now: the heat-ordered sweep, and the
    /// push let run.
    pub fn heat_active(&self) -> bool {
        self.heat_sweep() && self.push_allowed()
    }

    /// Whether the background sweep may run.
    pub fn push_allowed(&self) -> bool {
        self.config.push || self.push_released.load(Ordering::SeqCst)
    }

    pub fn page_size(&self) -> usize {
        self.installer.memory().layout().page_size()
    }

    /// Marks an installed range present and settles faults that waited
    /// for it.
    pub fn mark_present(&self, range: PageRange, origin: PageOrigin) {
        self.states
            .mark_present(range.first, u64::from(range.count), origin);
        self.metrics.timeline_pages(u64::from(range.count));
        if self.states.all_present() {
            self.note_finished();
        }
        // Pairs with the fence in `FaultWaits::wait_for`: a fault that
        // found the page in flight is seen, or it saw the page present.
        std::sync::atomic::fence(Ordering::SeqCst);
        if self.has_waiters() {
            let now = Instant::now();
            self.governor.waits().settle(range, |t0| {
                self.metrics.inflight.record(now - t0);
                self.metrics.all.record(now - t0);
                self.governor.waited(now - t0);
            });
        }
    }

    /// Whether any fault waits on a page a lane is fetching.
    pub fn has_waiters(&self) -> bool {
        self.governor.waits().has_waiters()
    }

    /// Whether a fault waits on a page of `ranges`.
    pub fn waits_in(&self, ranges: &[PageRange]) -> bool {
        self.governor.waits().waits_in(ranges)
    }

    /// A fault found `page` being fetched by someone else: its install
    /// wakes the faulting thread; this only times the wait.
    pub fn wait_for(&self, page: u64, t0: Instant) {
        let waits = self
            .governor
            .waits()
            .wait_for(page, t0, || self.states.is_present(page));
        if !waits {
            self.metrics.inflight.record(t0.elapsed());
            self.metrics.all.record(t0.elapsed());
        }
    }

    /// Installs the zero pages of claimed `runs` at once and appends the
    /// pieces that must be fetched to `fetch`.
    pub fn split_claimed(
        &self,
        runs: &[PageRange],
        origin: PageOrigin,
        fetch: &mut Vec<PageRange>,
        busy: OnBusy<'_>,
    ) -> Result<(), EngineError> {
        let zero = &self.transport.info().zero;
        for run in runs {
            // Split the run into maximal pieces of equal zero-ness.
            let mut start = run.first;
            while start < run.end() {
                let z = zero.is_zero(start);
                let mut end = start + 1;
                while end < run.end() && zero.is_zero(end) == z {
                    end += 1;
                }
                // A piece is part of a run, whose count is a u32.
                let piece = PageRange::new(start, (end - start) as u32);
                if z {
                    let done = self.installer.install_zero_with(piece, true, busy)?;
                    Metrics::add(&self.metrics.zero_pages, done.pages);
                    Metrics::add(&self.metrics.install_conflicts, done.already_present);
                    self.mark_present(piece, origin);
                } else {
                    fetch.push(piece);
                }
                start = end;
            }
        }
        Ok(())
    }

    /// Sends a request for `ranges` on `channel`, to land in guest memory
    /// when this migration lands pages.
    pub fn send(
        &self,
        channel: &mut Box<dyn pagewire_transport::PageChannel>,
        ranges: &[PageRange],
    ) -> Result<(), pagewire_transport::TransportError> {
        if self.landed {
            channel.send_landed(ranges)
        } else {
            channel.send(ranges)
        }
    }

    /// Receives the oldest reply on `channel`: into `buf`, or (when this
    /// migration lands pages) into guest memory.
    pub fn recv(
        &self,
        channel: &mut Box<dyn pagewire_transport::PageChannel>,
        buf: &mut [u8],
    ) -> Result<(), pagewire_transport::TransportError> {
        if self.landed {
            channel.recv_landed()
        } else {
            channel.recv(buf)
        }
    }

    /// [`Self::recv`], telling `arrived` how many bytes of the reply have
    /// arrived while the rest is still coming (with them, unless this
    /// migration lands pages: then they are in guest memory's file).
    pub fn recv_streaming(
        &self,
        channel: &mut Box<dyn pagewire_transport::PageChannel>,
        buf: &mut [u8],
        arrived: &mut dyn FnMut(usize, &[u8]),
    ) -> Result<(), pagewire_transport::TransportError> {
        if self.landed {
            channel.recv_landed_streaming(&mut |n| arrived(n, &[]))
        } else {
            channel.recv_streaming(buf, &mut |d| arrived(d.len(), d))
        }
    }

    /// Installs fetched pages: `buf` holds `pieces` back to back, or, when
    /// this migration lands pages, they are in guest memory's file already
    /// (`buf` is ignored). Pages the owner removed while they were fetched
    /// get a zero page instead.
    pub fn install_fetched(
        &self,
        pieces: &[PageRange],
        buf: &[u8],
        origin: PageOrigin,
        busy: OnBusy<'_>,
    ) -> Result<(), EngineError> {
        let ps = self.page_size();
        self.metrics.record_fetched(pieces, ps);
        let mut off = 0;
        for piece in pieces {
            let n = piece.count as usize * ps;
            let data = if self.landed {
                &[][..]
            } else {
                buf.get(off..off + n).ok_or_else(|| {
                    EngineError::Memory(format!(
                        "{} bytes fetched for pages needing more",
                        buf.len()
                    ))
                })?
            };
            // Sub-runs of equal removed-ness: removed pages are never
            // installed from the source.
            let mut start = piece.first;
            while start < piece.end() {
                let removed = self.states.removed_while_claimed(start);
                let mut end = start + 1;
                while end < piece.end() && self.states.removed_while_claimed(end) == removed {
                    end += 1;
                }
                let sub = PageRange::new(start, (end - start) as u32);
                if removed {
                    self.installer.install_zero_with(sub, true, busy)?;
                    Metrics::add(&self.metrics.removed_pages, u64::from(sub.count));
                    self.mark_present(sub, PageOrigin::Removed);
                } else {
                    // The owner may remove pages while the install waits
                    // for its events to be read: then stop, and split
                    // again, so removed pages get zeros, never this data.
                    let mut removed_meanwhile = false;
                    let mut check = || {
                        busy()?;
                        if (sub.first..sub.end()).any(|p| self.states.removed_while_claimed(p)) {
                            removed_meanwhile = true;
                            return Err(EngineError::Aborted);
                        }
                        Ok(())
                    };
                    // Pages from `start` mapped in the guest so far: on a
                    // retry or an error they are present, never written
                    // again (in shared memory a write would reach the
                    // guest's page).
                    let mut mapped = 0u64;
                    let r = if self.landed {
                        self.installer
                            .install_landed_progress(sub, true, &mut check, &mut mapped)
                    } else {
                        let from = (start - piece.first) as usize * ps;
                        let data = &data[from..from + sub.count as usize * ps];
                        self.installer.install_with_progress(
                            sub,
                            data,
                            true,
                            &mut check,
                            &mut mapped,
                        )
                    };
                    match r {
                        Ok(done) => {
                            Metrics::add(&self.metrics.install_conflicts, done.already_present);
                            self.mark_present(sub, origin);
                        }
                        Err(e) => {
                            let mapped = mapped.min(u64::from(sub.count));
                            if mapped > 0 {
                                // Fits: at most the sub-run's u32 count.
                                self.mark_present(PageRange::new(start, mapped as u32), origin);
                            }
                            if matches!(e, EngineError::Aborted) && removed_meanwhile {
                                start += mapped;
                                continue;
                            }
                            return Err(e);
                        }
                    }
                }
                start = end;
            }
            off += n;
        }
        Ok(())
    }

    /// The owner dropped host range `[start, end)` (UFFD_EVENT_REMOVE):
    /// its pages are never fetched again and read as zeros when touched.
    pub fn apply_remove(&self, start: usize, end: usize) {
        let mem = self.installer.memory();
        let ps = self.page_size();
        let mut removed = 0;
        let mut addr = start - start % ps;
        while addr < end {
            if let Some(page) = mem.page_of(addr) {
                if self.states.remove(page) == Removal::WasMissing {
                    removed += 1;
                }
            }
            addr += ps;
        }
        Metrics::add(&self.metrics.removed_pages, removed);
        if self.states.all_present() {
            self.note_finished();
        }
        tracing::debug!(start, end, removed, "guest memory removed by its owner");
    }

    /// What a lane does when the owner is changing its mappings: wait for
    /// the fault service to read the event, unless the migration stops.
    pub fn lane_busy(&self) -> Result<(), EngineError> {
        if self.aborted() {
            return Err(EngineError::Aborted);
        }
        std::thread::sleep(std::time::Duration::from_micros(20));
        // An event a fault service has read but not yet applied is applied
        // by the time this returns.
        drop(self.events.lock().unwrap_or_else(|p| p.into_inner()));
        Ok(())
    }

    /// Claims missing pages of the next sweep window, up to `max` pages, as
    /// runs. Returns false when the sweep has passed the last page (when
    /// faults move the sweep, it wraps around until a whole pass finds
    /// nothing missing).
    pub fn next_sweep_runs(&self, max: u64, runs: &mut Vec<PageRange>) -> bool {
        let layout = self.installer.memory().layout();
        if self.heat_sweep() && self.heat.next_runs(&self.states, layout, max, runs) {
            return true;
        }
        let total = layout.total_pages();
        let window = max.max(1);
        let mut scanned = 0u64;
        loop {
            let start = self.sweep_cursor.fetch_add(window, Ordering::Relaxed);
            if start >= total {
                if self.config.sweep_from_fault && scanned < total {
                    self.sweep_cursor.store(0, Ordering::Relaxed);
                    scanned += window;
                    continue;
                }
                return false;
            }
            scanned += window;
            let end = (start + window).min(total);
            // At most `window` pages (a request's): fits the u32 count.
            let mut at = start;
            self.states.claim_runs(layout, &mut at, end, window, runs);
            if !runs.is_empty() {
                return true;
            }
        }
    }
}
