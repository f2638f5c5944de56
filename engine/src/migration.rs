//! The destination side of a post-copy migration: fault handler, pusher
//! lanes and prepager around one page state map.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use pagewire_transport::{ChannelClass, PageChannel, PageRange, Transport};
use serde::Serialize;
use tracing::{debug, info};
use userfaultfd::EventBuffer;

use crate::error::EngineError;
use crate::memory::DestMemory;
use crate::metrics::{LatencyUs, Metrics};
use crate::prepager::Prepager;
use crate::state::{Claim, PageOrigin, PageStateMap};
use crate::uffd::PageInstaller;

/// How a migration runs.
#[derive(Debug, Clone)]
pub struct MigrationConfig {
    /// Pusher lanes (threads with their own bulk channel). At least 1.
    pub lanes: usize,
    /// Bubble radius in pages each way around the last fault; 0 turns
    /// bubbling off.
    pub bubble: u64,
    /// Most pages a lane asks for in one request.
    pub batch_pages: u32,
    /// Run the background sweep from the start. When false the sweep waits
    /// for [`MigrationHandle::release_push`] (pure demand paging until then).
    pub push: bool,
    /// Pin lane `i` to core `i % cores`.
    pub pin_lanes: bool,
}

impl Default for MigrationConfig {
    fn default() -> Self {
        Self {
            lanes: thread::available_parallelism().map_or(2, |n| n.get()),
            bubble: 64,
            batch_pages: 64,
            push: true,
            pin_lanes: true,
        }
    }
}

/// What a migration did, in the paper's terms.
#[derive(Debug, Clone, Serialize)]
pub struct EngineReport {
    /// Transport that moved the pages.
    pub transport: String,
    /// Pages in guest memory.
    pub pages_total: u64,
    /// Fault events handled.
    pub faults: u64,
    /// Faults that fetched their page over the network.
    pub network_faults: u64,
    /// Faults that waited for a page a lane was already fetching.
    pub inflight_faults: u64,
    /// Faults on zero pages, served locally.
    pub zero_faults: u64,
    /// Pages fetched by bubbles around faults.
    pub prepaged_pages: u64,
    /// Pages fetched by the background sweep.
    pub pushed_pages: u64,
    /// Pages installed as zero pages without crossing the wire.
    pub zero_pages: u64,
    /// Page bytes received.
    pub bytes_received: u64,
    /// Pages received more than once (must be 0).
    pub duplicate_pages: u64,
    /// Installs that found the page already mapped.
    pub install_conflicts: u64,
    /// Fault service time, from reading the fault event to waking the
    /// vCPU (as QEMU's postcopy blocktime measures it).
    pub fault_latency_us: LatencyUs,
    /// Time from start (the VM resumed) to the last page installed.
    pub total_ms: f64,
    /// Pusher lanes.
    pub lanes: usize,
    /// Bubble radius (0 = off).
    pub bubble: u64,
    /// Whether the sweep ran from the start.
    pub push: bool,
}

struct Shared {
    states: PageStateMap,
    installer: PageInstaller,
    transport: Arc<dyn Transport>,
    prepager: Prepager,
    metrics: Metrics,
    config: MigrationConfig,
    sweep_cursor: std::sync::atomic::AtomicU64,
    push_released: AtomicBool,
    abort: AtomicBool,
    error: Mutex<Option<EngineError>>,
    started: Instant,
    finished: OnceLock<Instant>,
}

impl Shared {
    fn fail(&self, e: EngineError) {
        tracing::error!("migration failed: {e}");
        let mut slot = self.error.lock().unwrap_or_else(|p| p.into_inner());
        if slot.is_none() {
            *slot = Some(e);
        }
        self.abort.store(true, Ordering::SeqCst);
    }

    fn aborted(&self) -> bool {
        self.abort.load(Ordering::SeqCst)
    }

    fn page_size(&self) -> usize {
        self.installer.memory().layout().page_size()
    }

    fn mark_present(&self, range: PageRange, origin: PageOrigin) {
        self.states
            .mark_present(range.first, u64::from(range.count), origin);
        if self.states.all_present() {
            let _ = self.finished.set(Instant::now());
        }
    }

    /// Installs runs the caller has claimed: zero pages locally, the rest
    /// fetched in one request on `channel`. Returns pages fetched.
    fn install_claimed(
        &self,
        runs: &[PageRange],
        origin: PageOrigin,
        channel: &mut dyn PageChannel,
        buf: &mut Vec<u8>,
    ) -> Result<u64, EngineError> {
        let zero = &self.transport.info().zero;
        let mut fetch = Vec::with_capacity(runs.len());
        for run in runs {
            // Split the run into maximal pieces of equal zero-ness.
            let mut start = run.first;
            while start < run.end() {
                let z = zero.is_zero(start);
                let mut end = start + 1;
                while end < run.end() && zero.is_zero(end) == z {
                    end += 1;
                }
                let piece = PageRange::new(start, (end - start) as u32);
                if z {
                    let done = self.installer.install_zero(piece, true)?;
                    Metrics::add(&self.metrics.zero_pages, done.pages);
                    Metrics::add(&self.metrics.install_conflicts, done.already_present);
                    self.mark_present(piece, origin);
                } else {
                    fetch.push(piece);
                }
                start = end;
            }
        }
        if fetch.is_empty() {
            return Ok(0);
        }
        let ps = self.page_size();
        let len = pagewire_transport::ranges_len(&fetch, ps);
        buf.resize(len, 0);
        channel.fetch(&fetch, &mut buf[..len])?;
        self.metrics.record_fetched(&fetch, ps);
        let mut off = 0;
        for piece in &fetch {
            let n = piece.count as usize * ps;
            let done = self.installer.install(*piece, &buf[off..off + n], true)?;
            Metrics::add(&self.metrics.install_conflicts, done.already_present);
            self.mark_present(*piece, origin);
            off += n;
        }
        Ok((len / ps) as u64)
    }

    /// Serves one fault at host address `addr`.
    fn handle_fault(
        &self,
        addr: usize,
        channel: &mut dyn PageChannel,
        buf: &mut Vec<u8>,
    ) -> Result<(), EngineError> {
        let mem = self.installer.memory();
        let page = mem.page_of(addr).ok_or(EngineError::StrayFault(addr))?;
        let range = PageRange::new(page, 1);
        Metrics::add(&self.metrics.faults, 1);
        self.prepager.on_fault(page, mem.layout());
        match self.states.try_claim(page) {
            Claim::Won => {
                let fetched = self.install_claimed(&[range], PageOrigin::Fault, channel, buf)?;
                let counter = if fetched > 0 {
                    &self.metrics.network_faults
                } else {
                    &self.metrics.zero_faults
                };
                Metrics::add(counter, 1);
            }
            Claim::InFlight => {
                // A lane is fetching it: wait rather than fetch it twice.
                Metrics::add(&self.metrics.inflight_faults, 1);
                let mut spins = 0u32;
                while !self.states.is_present(page) {
                    if self.aborted() {
                        return Err(EngineError::Aborted);
                    }
                    spins += 1;
                    if spins < 64 {
                        std::hint::spin_loop();
                    } else {
                        thread::yield_now();
                    }
                }
                self.installer.wake(range)?;
            }
            // Installed between the fault and now; the install woke the
            // thread already, waking again is harmless.
            Claim::Present => self.installer.wake(range)?,
        }
        Ok(())
    }

    /// Claims every missing page of the next sweep window, as runs.
    fn next_sweep_runs(&self, runs: &mut Vec<PageRange>) -> bool {
        let layout = self.installer.memory().layout();
        let total = layout.total_pages();
        let window = u64::from(self.config.batch_pages);
        loop {
            let start = self.sweep_cursor.fetch_add(window, Ordering::Relaxed);
            if start >= total {
                return false;
            }
            let end = (start + window).min(total);
            let mut p = start;
            while p < end {
                let Some(region) = layout.region_of(p) else {
                    break;
                };
                let limit = end.min(layout.region_pages(region).end);
                let n = self.states.claim_up(p, limit - p, limit);
                if n > 0 {
                    runs.push(PageRange::new(p, n as u32));
                }
                p += n.max(1);
            }
            if !runs.is_empty() {
                return true;
            }
        }
    }
}

fn lane_main(
    shared: &Shared,
    lane: usize,
    channel: &mut dyn PageChannel,
) -> Result<(), EngineError> {
    let mut buf = Vec::new();
    let mut runs = Vec::new();
    let max = u64::from(shared.config.batch_pages);
    loop {
        if shared.aborted() || shared.states.all_present() {
            return Ok(());
        }
        runs.clear();
        let mut pages = 0;
        while pages < max {
            match shared.prepager.next_run(&shared.states, max - pages) {
                Some(r) => {
                    pages += u64::from(r.count);
                    runs.push(r);
                }
                None => break,
            }
        }
        let origin = if !runs.is_empty() {
            PageOrigin::Bubble
        } else if shared.config.push || shared.push_released.load(Ordering::SeqCst) {
            if !shared.next_sweep_runs(&mut runs) {
                debug!(lane, "sweep done");
                return Ok(());
            }
            PageOrigin::Push
        } else {
            shared.prepager.wait_for_pivot(Duration::from_millis(5));
            continue;
        };
        let fetched = shared.install_claimed(&runs, origin, channel, &mut buf)?;
        let counter = match origin {
            PageOrigin::Bubble => &shared.metrics.prepaged_pages,
            _ => &shared.metrics.pushed_pages,
        };
        Metrics::add(counter, fetched);
    }
}

fn fault_main(shared: &Shared, channel: &mut dyn PageChannel) -> Result<(), EngineError> {
    let mut events = EventBuffer::new(64);
    let mut addrs = Vec::with_capacity(64);
    let mut buf = Vec::new();
    loop {
        if shared.aborted() || shared.states.all_present() {
            return Ok(());
        }
        if !shared.installer.wait_readable(20)? {
            continue;
        }
        shared.installer.read_faults(&mut events, &mut addrs)?;
        for &addr in &addrs {
            let t0 = Instant::now();
            shared.handle_fault(addr, channel, &mut buf)?;
            shared.metrics.record_fault_latency(t0.elapsed());
        }
    }
}

/// Starts post-copy migrations.
#[derive(Debug)]
pub struct Migration;

impl Migration {
    /// Maps fresh guest memory laid out like the source and starts the
    /// migration into it. The guest may run as soon as this returns.
    pub fn start(
        transport: Arc<dyn Transport>,
        config: MigrationConfig,
    ) -> Result<MigrationHandle, EngineError> {
        let mem = Arc::new(DestMemory::new(&transport.info().layout)?);
        Self::start_with_memory(transport, mem, config)
    }

    /// Starts the migration into a VMM's guest memory, which must match
    /// the source's layout and be untouched.
    pub fn start_with_memory(
        transport: Arc<dyn Transport>,
        mem: Arc<DestMemory>,
        config: MigrationConfig,
    ) -> Result<MigrationHandle, EngineError> {
        if config.lanes == 0 || config.batch_pages == 0 {
            return Err(EngineError::Memory(
                "at least one lane and a batch of at least one page are needed".into(),
            ));
        }
        if mem.layout() != &transport.info().layout {
            return Err(EngineError::Memory(
                "guest memory layout differs from the source's".into(),
            ));
        }
        let pages = mem.layout().total_pages();
        let installer = PageInstaller::register(mem.clone())?;
        // Open every channel before the guest may fault: a source that is
        // unreachable fails here, not in the middle of a fault.
        let urgent = transport.open(ChannelClass::Urgent)?;
        let lanes = (0..config.lanes)
            .map(|l| transport.open(ChannelClass::Bulk(l as u16)))
            .collect::<Result<Vec<_>, _>>()?;
        let shared = Arc::new(Shared {
            states: PageStateMap::new(pages),
            installer,
            prepager: Prepager::new(config.bubble),
            metrics: Metrics::new(pages),
            transport,
            config,
            sweep_cursor: Default::default(),
            push_released: AtomicBool::new(false),
            abort: AtomicBool::new(false),
            error: Mutex::new(None),
            started: Instant::now(),
            finished: OnceLock::new(),
        });
        info!(
            pages,
            transport = shared.transport.name(),
            lanes = shared.config.lanes,
            bubble = shared.config.bubble,
            push = shared.config.push,
            "post-copy migration started"
        );
        let mut threads = Vec::new();
        let spawn = |name: String, f: Box<dyn FnOnce() + Send>| {
            thread::Builder::new()
                .name(name.clone())
                .spawn(f)
                .map_err(|error| EngineError::Thread { name, error })
        };
        let s = shared.clone();
        let mut urgent = urgent;
        let fault = spawn(
            "pw-fault".into(),
            Box::new(move || {
                if let Err(e) = fault_main(&s, urgent.as_mut()) {
                    s.fail(e);
                }
            }),
        );
        threads.push(fault);
        let cores = core_affinity::get_core_ids().unwrap_or_default();
        for (i, mut ch) in lanes.into_iter().enumerate() {
            let s = shared.clone();
            let core = (s.config.pin_lanes && !cores.is_empty()).then(|| cores[i % cores.len()]);
            threads.push(spawn(
                format!("pw-lane-{i}"),
                Box::new(move || {
                    if let Some(c) = core {
                        core_affinity::set_for_current(c);
                    }
                    if let Err(e) = lane_main(&s, i, ch.as_mut()) {
                        s.fail(e);
                    }
                }),
            ));
        }
        let mut handle = MigrationHandle {
            shared,
            threads: Vec::new(),
        };
        for t in threads {
            match t {
                Ok(t) => handle.threads.push(t),
                Err(e) => {
                    handle.shared.fail(e);
                }
            }
        }
        Ok(handle)
    }
}

/// A running migration.
pub struct MigrationHandle {
    shared: Arc<Shared>,
    threads: Vec<JoinHandle<()>>,
}

impl std::fmt::Debug for MigrationHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let (present, total) = self.progress();
        f.debug_struct("MigrationHandle")
            .field("present", &present)
            .field("total", &total)
            .finish()
    }
}

impl MigrationHandle {
    /// The guest memory pages are installed into.
    pub fn memory(&self) -> &Arc<DestMemory> {
        self.shared.installer.memory()
    }

    /// (pages installed, pages in all).
    pub fn progress(&self) -> (u64, u64) {
        (self.shared.states.present(), self.shared.states.len())
    }

    /// Whether every page is installed or the migration failed.
    pub fn is_finished(&self) -> bool {
        self.shared.states.all_present() || self.shared.aborted()
    }

    /// Lets the background sweep run (for migrations started without push).
    pub fn release_push(&self) {
        self.shared.push_released.store(true, Ordering::SeqCst);
    }

    /// Who installed `page`.
    pub fn origin(&self, page: u64) -> PageOrigin {
        self.shared.states.origin(page)
    }

    /// The transport in use.
    pub fn transport(&self) -> &Arc<dyn Transport> {
        &self.shared.transport
    }

    /// Waits until every page is installed, unregisters the memory and
    /// reports. On error, threads still blocked on missing pages stay
    /// blocked: the VMM must stop the guest.
    pub fn wait(mut self) -> Result<EngineReport, EngineError> {
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
        let s = &self.shared;
        if let Some(e) = s.error.lock().unwrap_or_else(|p| p.into_inner()).take() {
            return Err(e);
        }
        s.installer.unregister()?;
        let m = &s.metrics;
        let finished = s.finished.get().copied().unwrap_or_else(Instant::now);
        let report = EngineReport {
            transport: s.transport.name().to_string(),
            pages_total: s.states.len(),
            faults: Metrics::get(&m.faults),
            network_faults: Metrics::get(&m.network_faults),
            inflight_faults: Metrics::get(&m.inflight_faults),
            zero_faults: Metrics::get(&m.zero_faults),
            prepaged_pages: Metrics::get(&m.prepaged_pages),
            pushed_pages: Metrics::get(&m.pushed_pages),
            zero_pages: Metrics::get(&m.zero_pages),
            bytes_received: Metrics::get(&m.bytes_received),
            duplicate_pages: Metrics::get(&m.duplicate_pages),
            install_conflicts: Metrics::get(&m.install_conflicts),
            fault_latency_us: m.latency(),
            total_ms: finished.duration_since(s.started).as_secs_f64() * 1000.0,
            lanes: s.config.lanes,
            bubble: s.config.bubble,
            push: s.config.push,
        };
        info!(total_ms = report.total_ms, "post-copy migration complete");
        Ok(report)
    }
}

impl Drop for MigrationHandle {
    fn drop(&mut self) {
        if !self.threads.is_empty() {
            // Dropped without wait(): stop the threads.
            self.shared.abort.store(true, Ordering::SeqCst);
            for t in self.threads.drain(..) {
                let _ = t.join();
            }
        }
    }
}
