//! Starting a migration and the handle that watches it.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::Instant;

use pagewire_transport::{ChannelClass, FetchLimits, Transport};
use serde::Serialize;
use tracing::info;

use crate::config::MigrationConfig;
use crate::error::EngineError;
use crate::fault::fault_main;
use crate::governor::{FlowStats, Governor};
use crate::lanes::lane_main;
use crate::memory::DestMemory;
use crate::metrics::{LatencyUs, Metrics};
use crate::prepager::Prepager;
use crate::shared::Shared;
use crate::state::{PageOrigin, PageStateMap};
use crate::uffd::PageInstaller;

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
    /// Most faults waiting for the network at once.
    pub max_concurrent_faults: u64,
    /// Pages fetched by bubbles around faults.
    pub prepaged_pages: u64,
    /// Pages fetched by the background sweep.
    pub pushed_pages: u64,
    /// Pages installed as zero pages without crossing the wire.
    pub zero_pages: u64,
    /// Pages the memory's owner removed (a balloon) before they arrived:
    /// never fetched, read as zeros.
    pub removed_pages: u64,
    /// Page bytes received.
    pub bytes_received: u64,
    /// Times a channel's link was lost.
    pub link_losses: u64,
    /// Times a lost channel was reopened.
    pub reconnects: u64,
    /// Pages asked for again because their reply was lost with a link
    /// (not duplicates: each was installed once).
    pub resent_pages: u64,
    /// Pages received more than once (must be 0).
    pub duplicate_pages: u64,
    /// Installs that found the page already mapped.
    pub install_conflicts: u64,
    /// Service time of every fault, from reading the fault event to waking
    /// the vCPU (as QEMU's postcopy blocktime measures it).
    pub fault_latency_us: LatencyUs,
    /// Faults fetched over the network.
    pub network_fault_us: LatencyUs,
    /// Faults that waited for a page a lane was fetching.
    pub inflight_wait_us: LatencyUs,
    /// Faults on zero pages.
    pub zero_fault_us: LatencyUs,
    /// Every fault's latency as a power-of-two distribution: element `n`
    /// counts faults of `[2^n, 2^(n+1))` µs, like QEMU's
    /// `postcopy-latency-dist`.
    pub fault_latency_dist: Vec<u64>,
    /// Fault latency (every fault) at 1 %, 2 %, ... 100 %, in µs.
    pub fault_latency_cdf_us: Vec<f64>,
    /// Bulk flow control.
    pub flow: FlowStats,
    /// Time from start (the VM resumed) to the last page installed.
    pub total_ms: f64,
    /// Time the engine took to start: page state map, metrics, opening
    /// every channel (the guest can fault from then on).
    pub setup_ms: f64,
    /// Pusher lanes.
    pub lanes: usize,
    /// Bubble radius (0 = off).
    pub bubble: u64,
    /// Whether the sweep ran from the start.
    pub push: bool,
    /// Bulk bytes-per-second cap, if any.
    pub push_rate: Option<u64>,
    /// Time from a link loss to the channel reopened (last in the
    /// report: scripts reading the first `p50` get the faults').
    pub recovery_us: LatencyUs,
}

/// A snapshot of a running migration, cheap enough to take at any time.
#[derive(Debug, Clone, Serialize)]
pub struct LiveMetrics {
    /// Pages installed (or settled as removed) so far.
    pub pages_present: u64,
    /// Pages in guest memory.
    pub pages_total: u64,
    /// Fault events handled.
    pub faults: u64,
    /// Faults fetched over the network.
    pub network_faults: u64,
    /// Pages removed by the memory's owner before they arrived.
    pub removed_pages: u64,
    /// Page bytes received.
    pub bytes_received: u64,
    /// Latency of every fault so far.
    pub fault_latency_us: LatencyUs,
    /// Every fault's latency as a power-of-two distribution (element `n`:
    /// `[2^n, 2^(n+1))` µs).
    pub fault_latency_dist: Vec<u64>,
    /// Time since the migration started.
    pub elapsed_ms: f64,
    /// Whether the migration failed or was aborted.
    pub failed: bool,
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

    /// Starts the migration into guest memory in this process, which
    /// must match the source's layout and be untouched; a userfaultfd is
    /// created for it (user-mode faults at least, see
    /// [`PageInstaller::register`]).
    pub fn start_with_memory(
        transport: Arc<dyn Transport>,
        mem: Arc<DestMemory>,
        config: MigrationConfig,
    ) -> Result<MigrationHandle, EngineError> {
        Self::check(&transport, &mem, &config)?;
        let installer = PageInstaller::register(mem)?;
        Self::start_with_installer(transport, installer, config)
    }

    fn check(
        transport: &Arc<dyn Transport>,
        mem: &DestMemory,
        config: &MigrationConfig,
    ) -> Result<(), EngineError> {
        if config.lanes == 0 || config.batch_pages == 0 || config.push_rate == Some(0) {
            return Err(EngineError::Memory(
                "at least one lane, a batch of at least one page and a push rate above 0 are needed"
                    .into(),
            ));
        }
        mem.check_source(&transport.info().layout)?;
        Ok(())
    }

    /// Starts the migration through a userfaultfd already bound to the
    /// guest memory (created by [`PageInstaller::create_for_kvm`] or handed
    /// in by a VMM with [`PageInstaller::with_uffd`]). The memory must be
    /// untouched and match the source (see [`DestMemory::check_source`]).
    pub fn start_with_installer(
        transport: Arc<dyn Transport>,
        installer: PageInstaller,
        config: MigrationConfig,
    ) -> Result<MigrationHandle, EngineError> {
        let begun = Instant::now();
        let mem = installer.memory().clone();
        Self::check(&transport, &mem, &config)?;
        // Pages larger than the source's (2 MiB hugetlbfs): the engine
        // works in the memory's pages over a scaled view of the source.
        let transport: Arc<dyn Transport> =
            if mem.layout().page_size() != transport.info().layout.page_size() {
                Arc::new(crate::scaled::Scaled::new(
                    transport,
                    mem.layout().page_size(),
                )?)
            } else {
                transport
            };
        let pages = mem.layout().total_pages();
        let page_size = mem.layout().page_size();
        // Requests never exceed what the transport accepts (nor what both
        // the wire and the transport's own limits allow).
        let t = transport.limits();
        let limits = FetchLimits {
            max_ranges: t.max_ranges.clamp(1, FetchLimits::WIRE.max_ranges),
            max_pages: t.max_pages.clamp(1, FetchLimits::WIRE.max_pages),
        };
        let batch = u64::from(config.batch_pages).min(limits.max_pages) as u32;
        // Open every channel before the guest may fault: a source that is
        // unreachable fails here, not in the middle of a fault.
        let urgent = transport.open(ChannelClass::Urgent)?;
        let lanes = (0..config.lanes)
            .map(|l| transport.open(ChannelClass::Bulk(l as u16)))
            .collect::<Result<Vec<_>, _>>()?;
        let shared = Arc::new(Shared::new(
            PageStateMap::new(pages),
            installer,
            transport,
            Prepager::new(config.bubble),
            Metrics::new(pages),
            config.clone(),
            Governor::new(page_size, batch, config.flow_control, config.push_rate),
            limits,
        ));
        info!(
            pages,
            transport = shared.transport.name(),
            lanes = config.lanes,
            bubble = config.bubble,
            push = config.push,
            flow_control = config.flow_control,
            "post-copy migration started"
        );
        let spawn = |name: String, f: Box<dyn FnOnce() + Send>| {
            thread::Builder::new()
                .name(name.clone())
                .spawn(f)
                .map_err(|error| EngineError::Thread { name, error })
        };
        let mut threads = Vec::new();
        let s = shared.clone();
        threads.push(spawn(
            "pw-fault".into(),
            Box::new(move || {
                let _guard = FailOnPanic(&s, "pw-fault");
                if let Err(e) = fault_main(&s, urgent) {
                    s.fail(e);
                }
            }),
        ));
        let cores = core_affinity::get_core_ids().unwrap_or_default();
        for (i, ch) in lanes.into_iter().enumerate() {
            let s = shared.clone();
            let core = (s.config.pin_lanes && !cores.is_empty()).then(|| cores[i % cores.len()]);
            threads.push(spawn(
                format!("pw-lane-{i}"),
                Box::new(move || {
                    let _guard = FailOnPanic(&s, "pw-lane");
                    if let Some(c) = core {
                        core_affinity::set_for_current(c);
                    }
                    if let Err(e) = lane_main(&s, i, ch) {
                        s.fail(e);
                    }
                }),
            ));
        }
        let _ = shared.setup.set(begun.elapsed());
        let mut handle = MigrationHandle {
            shared,
            threads: Vec::new(),
        };
        for t in threads {
            match t {
                Ok(t) => handle.threads.push(t),
                Err(e) => handle.shared.fail(e),
            }
        }
        Ok(handle)
    }
}

/// Fails the migration if the thread holding it unwinds from a panic, so
/// the other threads stop and `wait()` reports it instead of waiting for
/// pages the dead thread had claimed.
struct FailOnPanic<'a>(&'a Shared, &'static str);

impl Drop for FailOnPanic<'_> {
    fn drop(&mut self) {
        if thread::panicking() {
            self.0.fail(EngineError::Panicked { thread: self.1 });
        }
    }
}

/// A running migration.
///
/// # Failure never hands the guest zero pages
/// When a migration fails (the source died, a protocol violation) or is
/// dropped before it finished, the userfaultfd and the guest memory stay
/// registered and mapped for the rest of the process's life: threads
/// blocked on pages that never arrived stay blocked, and later touches of
/// such pages block too. Closing the userfaultfd instead would let the
/// kernel fill those pages with zeros, silently. The embedder decides what
/// happens to the guest (stop its vCPUs, tear it down); the memory is not
/// reclaimed until the process exits.
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

    /// Live counters and the fault latency histogram so far.
    pub fn metrics(&self) -> LiveMetrics {
        let s = &self.shared;
        let m = &s.metrics;
        LiveMetrics {
            pages_present: s.states.present(),
            pages_total: s.states.len(),
            faults: Metrics::get(&m.faults),
            network_faults: Metrics::get(&m.network_faults),
            removed_pages: Metrics::get(&m.removed_pages),
            bytes_received: Metrics::get(&m.bytes_received),
            fault_latency_us: m.all.summary(),
            fault_latency_dist: m.all.distribution(),
            elapsed_ms: s.started.elapsed().as_secs_f64() * 1000.0,
            failed: s.aborted(),
        }
    }

    /// Stops the migration now. Pages that did not arrive never will:
    /// guest memory stays registered (see the type's docs), so threads
    /// touching them block until the process exits; the VMM must stop or
    /// tear down the guest. Returns the error that had stopped the
    /// migration already, if any.
    pub fn abort(mut self) -> Option<EngineError> {
        self.stop_threads();
        let failed = self
            .shared
            .error
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        failed
    }

    fn stop_threads(&mut self) {
        if !self.threads.is_empty() {
            self.shared.abort.store(true, Ordering::SeqCst);
            for t in self.threads.drain(..) {
                let _ = t.join();
            }
            if !self.shared.states.all_present() {
                self.park();
            }
        }
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

    /// Keeps the userfaultfd and guest memory alive for the rest of the
    /// process: blocked threads stay blocked instead of reading zeros.
    fn park(&self) {
        tracing::warn!(
            present = self.shared.states.present(),
            total = self.shared.states.len(),
            "migration did not finish: guest memory stays registered, threads on missing pages stay blocked"
        );
        std::mem::forget(self.shared.clone());
    }

    /// Waits until every page is installed, unregisters the memory and
    /// reports. On error the memory stays registered (see the type's
    /// docs): threads blocked on missing pages stay blocked and the VMM
    /// must stop the guest.
    pub fn wait(mut self) -> Result<EngineReport, EngineError> {
        for t in self.threads.drain(..) {
            if t.join().is_err() {
                self.shared.fail(EngineError::Thread {
                    name: "engine thread".into(),
                    error: std::io::Error::other("panicked"),
                });
            }
        }
        let s = self.shared.clone();
        let failed = s.error.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(e) = failed {
            self.park();
            return Err(e);
        }
        if !s.states.all_present() {
            self.park();
            return Err(EngineError::Aborted);
        }
        s.installer.unregister()?;
        let m = &s.metrics;
        let finished = s.finished.get().copied().unwrap_or_else(Instant::now);
        let cdf: Vec<f64> = (1..=100).map(|i| f64::from(i) / 100.0).collect();
        let all = m.all.summary();
        let report = EngineReport {
            transport: s.transport.name().to_string(),
            pages_total: s.states.len(),
            faults: Metrics::get(&m.faults),
            network_faults: Metrics::get(&m.network_faults),
            inflight_faults: Metrics::get(&m.inflight_faults),
            zero_faults: Metrics::get(&m.zero_faults),
            max_concurrent_faults: Metrics::get(&m.max_concurrent_faults),
            prepaged_pages: Metrics::get(&m.prepaged_pages),
            pushed_pages: Metrics::get(&m.pushed_pages),
            zero_pages: Metrics::get(&m.zero_pages),
            removed_pages: Metrics::get(&m.removed_pages),
            bytes_received: Metrics::get(&m.bytes_received),
            link_losses: Metrics::get(&m.link_losses),
            reconnects: Metrics::get(&m.reconnects),
            resent_pages: Metrics::get(&m.resent_pages),
            recovery_us: m.recovery.summary(),
            duplicate_pages: Metrics::get(&m.duplicate_pages),
            install_conflicts: Metrics::get(&m.install_conflicts),
            fault_latency_us: all,
            network_fault_us: m.network.summary(),
            inflight_wait_us: m.inflight.summary(),
            zero_fault_us: m.zero.summary(),
            fault_latency_dist: m.all.distribution(),
            fault_latency_cdf_us: if all.count > 0 {
                m.all.quantiles(&cdf)
            } else {
                Vec::new()
            },
            flow: s.governor.stats(),
            total_ms: finished.duration_since(s.started).as_secs_f64() * 1000.0,
            setup_ms: s.setup.get().map_or(0.0, |d| d.as_secs_f64() * 1000.0),
            lanes: s.config.lanes,
            bubble: s.config.bubble,
            push: s.config.push,
            push_rate: s.config.push_rate,
        };
        info!(total_ms = report.total_ms, "post-copy migration complete");
        Ok(report)
    }
}

impl Drop for MigrationHandle {
    fn drop(&mut self) {
        // Dropped without wait(): stop the threads.
        self.stop_threads();
    }
}
