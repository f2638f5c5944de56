//! Starting a migration and the handle that watches it.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::Instant;

use pagewire_transport::{ChannelClass, FetchLimits, PageChannel, Transport};
use tracing::info;

use crate::config::{MigrationConfig, SharedInstall};
use crate::error::{EngineError, RegionError};
use crate::fault::fault_main;
use crate::governor::Governor;
use crate::lanes::lane_main;
use crate::memory::DestMemory;
use crate::metrics::Metrics;
use crate::parked::ParkedMigration;
use crate::placement;
use crate::precopy::{Precopied, Refreshed};
use crate::prepager::Prepager;
use crate::report::{EngineReport, LiveMetrics};
use crate::shared::Shared;
use crate::state::{PageOrigin, PageStateMap};
use crate::uffd::PageInstaller;
use crate::waits::FaultWaits;

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
        placement::fault_service_cpus(&config.fault_cpus)?;
        placement::check("lane_cpus", &config.lane_cpus)?;
        placement::check("fault_cpus", &config.fault_cpus)?;
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
        Self::start_inner(transport, installer, config, None)
    }

    /// Starts the post-copy phase after [`crate::precopy::precopy`] filled
    /// `mem` (the memory it was given): its present pages are not fetched
    /// again, pages the source's guest wrote meanwhile are fetched even if
    /// they were zero pages at the handshake.
    pub fn start_after_precopy(
        transport: Arc<dyn Transport>,
        mem: Arc<DestMemory>,
        config: MigrationConfig,
        precopied: &Precopied,
    ) -> Result<MigrationHandle, EngineError> {
        // Pages copied before are counted in the source's pages; memory on
        // larger pages (hugetlbfs) can only follow a bare switch-over.
        if mem.layout() != &transport.info().layout && !precopied.present.is_empty() {
            return Err(EngineError::Memory(
                "pre-copied memory must be laid out exactly like the source's".into(),
            ));
        }
        let transport: Arc<dyn Transport> = Arc::new(Refreshed::new(transport, &precopied.written));
        Self::check(&transport, &mem, &config)?;
        let installer = PageInstaller::register(mem)?;
        Self::start_inner(transport, installer, config, Some(precopied))
    }

    fn start_inner(
        transport: Arc<dyn Transport>,
        installer: PageInstaller,
        config: MigrationConfig,
        precopied: Option<&Precopied>,
    ) -> Result<MigrationHandle, EngineError> {
        let begun = Instant::now();
        let mem = installer.memory().clone();
        Self::check(&transport, &mem, &config)?;
        // Pages larger than the source's (2 MiB hugetlbfs): the engine
        // works in the memory's pages over a scaled view of the source.
        let waits = Arc::new(FaultWaits::default());
        let transport = view_for(transport, &mem, &config, &waits)?;
        let pages = mem.layout().total_pages();
        let page_size = mem.layout().page_size();
        // Requests never exceed what the transport accepts (nor what both
        // the wire and the transport's own limits allow).
        let limits = limits_for(transport.as_ref());
        let batch = u64::from(config.batch_pages).min(limits.max_pages) as u32;
        let landed = offer_landing(
            transport.as_ref(),
            &mem,
            config.shared_install,
            installer.lands(),
        )?;
        // Open every channel before the guest may fault: a source that is
        // unreachable fails here, not in the middle of a fault.
        let urgent = open_urgent(transport.as_ref(), &config)?;
        let lanes = (0..config.lanes)
            .map(|l| transport.open(ChannelClass::Bulk(l as u16)))
            .collect::<Result<Vec<_>, _>>()?;
        let states = PageStateMap::new(pages);
        if let Some(pre) = precopied {
            for p in pre.present.iter() {
                states.preset_present(p, PageOrigin::Precopy);
            }
        }
        let mut shared = Shared::new(
            states,
            installer,
            transport,
            Prepager::with_kind(config.bubble, config.prepager),
            Metrics::new(pages),
            config.clone(),
            Governor::new(page_size, batch, config.flow_control, config.push_rate)
                .with_waits(waits),
            limits,
            Shared::done_eventfd()?,
        );
        shared.written = precopied.map(|p| p.written.clone());
        shared.landed = landed;
        let shared = Arc::new(shared);
        info!(
            pages,
            transport = shared.transport.name(),
            landed,
            lanes = config.lanes,
            bubble = config.bubble,
            push = config.push,
            flow_control = config.flow_control,
            "post-copy migration started"
        );
        let _ = shared.setup.set(begun.elapsed());
        Ok(launch(shared, urgent, lanes))
    }
}

/// Offers shared memory's second mapping to `transport` to land pages in
/// (before any channel is opened), as `policy` says, where the memory's
/// uffd has minor faults (`can_land`); returns whether it took it. Shared
/// memory it does not take, and all other memory, is filled with
/// UFFDIO_COPY.
pub(crate) fn offer_landing(
    transport: &dyn Transport,
    mem: &DestMemory,
    policy: SharedInstall,
    can_land: bool,
) -> Result<bool, EngineError> {
    let Some(landing) = mem.landing() else {
        return Ok(false);
    };
    if !can_land {
        if policy == SharedInstall::Land {
            return Err(RegionError::BadUffd(
                "landing pages in shared memory needs a userfaultfd registered for minor faults: \
                 let pagewire create it, or copy the pages in (SharedInstall::Copy)"
                    .into(),
            )
            .into());
        }
        return Ok(false);
    }
    let land = match policy {
        SharedInstall::Land => true,
        SharedInstall::Copy => false,
        SharedInstall::Auto => transport.lands_without_copy(),
    };
    if !land {
        return Ok(false);
    }
    let took = transport.set_landing(landing)?;
    if !took {
        tracing::info!(
            transport = transport.name(),
            "the transport does not land pages in this guest memory (it cannot, or it lands them \
             in another): each page is copied into it"
        );
    }
    Ok(took)
}

/// The limits requests keep to on `transport`: what it accepts, and never
/// more than the wire carries.
pub(crate) fn limits_for(transport: &dyn Transport) -> FetchLimits {
    let t = transport.limits();
    FetchLimits {
        max_ranges: t.max_ranges.clamp(1, FetchLimits::WIRE.max_ranges),
        max_pages: t.max_pages.clamp(1, FetchLimits::WIRE.max_pages),
    }
}

/// `transport` as the engine sees it for `mem`: scaled when the memory's
/// pages are larger than the source's (2 MiB hugetlbfs), its bulk
/// channels then making way for what faults wait on (`waits`), with flow
/// control on.
pub(crate) fn view_for(
    transport: Arc<dyn Transport>,
    mem: &DestMemory,
    config: &MigrationConfig,
    waits: &Arc<FaultWaits>,
) -> Result<Arc<dyn Transport>, EngineError> {
    Ok(
        if mem.layout().page_size() != transport.info().layout.page_size() {
            Arc::new(crate::scaled::Scaled::new(
                transport,
                mem.layout().page_size(),
                config.flow_control.then(|| waits.clone()),
            )?)
        } else {
            transport
        },
    )
}

/// A fault service's urgent channel, and the CPU the service is pinned to
/// (`None`: anywhere).
pub(crate) type UrgentChannel = (Option<usize>, Box<dyn PageChannel>);

/// Opens one urgent channel for each fault service `config` asks for.
pub(crate) fn open_urgent(
    transport: &dyn Transport,
    config: &MigrationConfig,
) -> Result<Vec<UrgentChannel>, EngineError> {
    placement::fault_service_cpus(&config.fault_cpus)?
        .into_iter()
        .map(|cpu| Ok((cpu, transport.open(ChannelClass::Urgent)?)))
        .collect()
}

/// Starts a fault service on each urgent channel, the lanes and the zero
/// filler over open channels.
pub(crate) fn launch(
    shared: Arc<Shared>,
    urgent: Vec<UrgentChannel>,
    lanes: Vec<Box<dyn PageChannel>>,
) -> MigrationHandle {
    let spawn = |name: String, f: Box<dyn FnOnce() + Send>| {
        thread::Builder::new()
            .name(name.clone())
            .spawn(f)
            .map_err(|error| EngineError::Thread { name, error })
    };
    let mut threads = Vec::new();
    for (i, (cpu, ch)) in urgent.into_iter().enumerate() {
        let s = shared.clone();
        threads.push(spawn(
            format!("pw-fault-{i}"),
            Box::new(move || {
                let _guard = FailOnPanic(&s, "pw-fault");
                s.fault_services
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if let Some(c) = cpu {
                    placement::pin_or_warn("a fault service", &[c]);
                }
                if let Err(e) = fault_main(&s, ch) {
                    s.fail(e);
                }
            }),
        ));
    }
    let allowed = placement::allowed_cpus();
    for (i, ch) in lanes.into_iter().enumerate() {
        let s = shared.clone();
        let cpu = placement::lane_cpu(i, &s.config.lane_cpus, s.config.pin_lanes, &allowed);
        threads.push(spawn(
            format!("pw-lane-{i}"),
            Box::new(move || {
                let _guard = FailOnPanic(&s, "pw-lane");
                if let Some(c) = cpu {
                    placement::pin_or_warn("a lane", &[c]);
                }
                if s.config.lane_nice != 0 {
                    placement::set_current_nice(s.config.lane_nice);
                }
                if let Err(e) = lane_main(&s, i, ch) {
                    s.fail(e);
                }
            }),
        ));
    }
    let s = shared.clone();
    threads.push(spawn(
        "pw-zero".into(),
        Box::new(move || {
            let _guard = FailOnPanic(&s, "pw-zero");
            // Background work, with the lanes when they have CPUs of their own.
            placement::pin_or_warn("the zero filler", &s.config.lane_cpus);
            placement::set_current_nice(19);
            if let Err(e) = crate::zeros::zero_main(&s) {
                s.fail(e);
            }
        }),
    ));
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
    handle
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
            self.shared.stop();
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
    pub fn wait(self) -> Result<EngineReport, EngineError> {
        // A parked migration dropped stays parked for the process's life.
        self.wait_resumable().map_err(|(e, _parked)| e)
    }

    /// Waits like [`Self::wait`]; on failure also returns the migration,
    /// parked: guest memory stays registered (blocked threads stay
    /// blocked) and [`ParkedMigration::resume`] can finish it later over a
    /// new connection to the same source, for example after the link was
    /// down longer than the recovery timeout.
    pub fn wait_resumable(mut self) -> Result<EngineReport, (EngineError, ParkedMigration)> {
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
        let failed = failed.or_else(|| (!s.states.all_present()).then_some(EngineError::Aborted));
        if let Some(e) = failed {
            tracing::warn!(
                present = s.states.present(),
                total = s.states.len(),
                "migration did not finish: guest memory stays registered, threads on missing pages stay blocked"
            );
            drop(self);
            return Err((e, ParkedMigration::new(s)));
        }
        if let Err(e) = s.installer.unregister() {
            drop(self);
            return Err((e, ParkedMigration::new(s)));
        }
        // An event queued before the unregister (a balloon's REMOVE between
        // the last install and now) would hold the owner's madvise until
        // read: read what is left. The pages are ordinary memory now.
        let mut buf = crate::uffd::EventBuffer::new(16);
        let mut left = Vec::new();
        while s.installer.read_events(&mut buf, &mut left).is_ok() && !left.is_empty() {}
        let report = crate::report::build(&s);
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
