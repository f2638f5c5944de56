//! Running the destination side: migration, workload, verification, report.

use std::sync::Arc;
use std::thread;
use std::time::Duration;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use pagewire_engine::{
    precopy, DestMemory, EngineError, EngineReport, Migration, MigrationConfig, PageOrigin,
    PrecopyConfig, PrecopyReport, SwitchOver,
};
use pagewire_transport::{
    page_checksum, PageRange, RemoteCode, SourceStats, Transport, TransportError, PAGE_SIZE,
};
use serde::Serialize;

use crate::workload::{Workload, WorkloadStats};

/// Most checksums asked for in one request.
const CHECKSUM_CHUNK: u64 = 1 << 16;

/// Why a destination run failed.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// The engine stopped.
    #[error(transparent)]
    Engine(#[from] EngineError),
    /// Verification or counters could not be fetched.
    #[error(transparent)]
    Transport(#[from] TransportError),
    /// The workload thread could not start or died.
    #[error("workload: {0}")]
    Workload(String),
}

/// The full report of a destination run.
#[derive(Debug, Clone, Serialize)]
pub struct RunReport {
    /// The engine's counters.
    #[serde(flatten)]
    pub engine: EngineReport,
    /// Pages (of the source's 4 KiB) whose checksum was compared with the
    /// source's.
    pub pages_verified: u64,
    /// Pages whose bytes differ from the source's (must be 0).
    pub checksum_mismatches: u64,
    /// Prepaged pages the workload touched afterwards (faults avoided).
    pub prepaged_hits: u64,
    /// Pushed pages the workload touched.
    pub pushed_hits: u64,
    /// What the workload did.
    pub workload: WorkloadStats,
    /// Work done by the source's data path.
    pub source_requests_served: u64,
    /// Pages the source's data path sent.
    pub source_pages_served: u64,
    /// Pages (of the source's 4 KiB) that crossed the wire, pre-copy
    /// rounds included.
    pub pages_transferred: u64,
    /// Pause of the guest at the source to resume here, when the source's
    /// guest was running (pre-copy or a switch-over).
    pub downtime_ms: Option<f64>,
    /// What pre-copy did, when it ran.
    pub precopy: Option<PrecopyReport>,
}

impl RunReport {
    /// Whether the migration moved every page intact and exactly once.
    pub fn is_clean(&self) -> bool {
        self.checksum_mismatches == 0
            && self.engine.duplicate_pages == 0
            && self.pages_verified == self.small_pages()
    }

    /// Touched pages counted in 4 KiB, said so where guest memory's
    /// pages are larger (the counts beside them are in those).
    fn touched(&self, hits: u64) -> String {
        if self.engine.page_size == PAGE_SIZE as u64 {
            hits.to_string()
        } else {
            format!("{hits} 4 KiB pages of them")
        }
    }

    /// Guest memory in the source's 4 KiB pages.
    fn small_pages(&self) -> u64 {
        self.engine.pages_total * (self.engine.page_size / PAGE_SIZE as u64)
    }

    /// A human summary.
    pub fn summary(&self) -> String {
        let e = &self.engine;
        let mib = |b: u64| b as f64 / (1 << 20) as f64;
        let gbps = if e.total_ms > 0.0 {
            e.bytes_received as f64 / (e.total_ms / 1000.0) / 1e9
        } else {
            0.0
        };
        let l = &e.fault_latency_us;
        format!(
            "pagewire post-copy migration over {transport}, pages installed with {install}\n\
             \x20 memory            {pages} pages{of} ({mem:.1} MiB), {zero} zero pages never sent\n\
             \x20 total time        {total:.1} ms (resume to last page), {recv:.1} MiB received, {gbps:.2} GB/s\n\
             \x20 workload          {pattern:?}: {touches} touches of {distinct} pages in {wms:.1} ms\n\
             \x20 guest stalls      {stalls} touches blocked, p50 {sp50:.1} us, p99 {sp99:.1} us, {stalled:.1} ms in all\n\
             \x20 faults            {faults} ({nf} network, {inflight} waited on a lane, {zf} zero)\n\
             \x20 fault latency     p50 {p50:.1} us, p99 {p99:.1} us, max {max:.1} us (all faults)\n\
             \x20   network         p50 {np50:.1} us, p99 {np99:.1} us ({ncount})\n\
             \x20   waited on lane  p50 {ip50:.1} us, p99 {ip99:.1} us ({icount}; {early} pages installed before the rest of their reply)\n\
             \x20   most at once    {conc} faults waiting on the network\n\
             \x20 flow control      {flow}\n\
             \x20 link              {losses} losses, {reconnects} reconnects (recovery p50 {rec50:.1} ms, max {recmax:.1} ms), {resent} pages asked again\n\
             \x20 prepaged (bubble) {pre} pages, {hits} later touched\n\
             \x20 pushed (sweep)    {pushed} pages, {phits} later touched\n\
             \x20 source data path  {sreq} requests, {spages} pages\n\
             \x20 verified          {ver}/{small} 4 KiB pages, {mis} mismatches, {dup} duplicates -> {verdict}{precopy}",
            transport = e.transport,
            install = e.install_path,
            stalls = self.workload.stalls.count,
            sp50 = self.workload.stalls.p50,
            sp99 = self.workload.stalls.p99,
            stalled = self.workload.stalled_ms,
            pages = e.pages_total,
            of = if e.page_size == PAGE_SIZE as u64 {
                String::new()
            } else {
                format!(" of {} KiB", e.page_size / 1024)
            },
            small = self.small_pages(),
            mem = mib(e.pages_total * e.page_size),
            zero = e.zero_pages,
            total = e.total_ms,
            recv = mib(e.bytes_received),
            pattern = self.workload.pattern,
            touches = self.workload.touches,
            distinct = self.workload.distinct_pages,
            wms = self.workload.ms,
            faults = e.faults,
            nf = e.network_faults,
            inflight = e.inflight_faults,
            zf = e.zero_faults,
            p50 = l.p50,
            p99 = l.p99,
            max = l.max,
            np50 = e.network_fault_us.p50,
            np99 = e.network_fault_us.p99,
            ncount = e.network_fault_us.count,
            ip50 = e.inflight_wait_us.p50,
            ip99 = e.inflight_wait_us.p99,
            icount = e.inflight_wait_us.count,
            conc = e.max_concurrent_faults,
            flow = if e.flow.enabled {
                format!(
                    "window {:.0} KiB, {} pages per request, peak {:.0} MB/s, lanes held {} times for faults, {} requests while the guest was idle (idle window {:.0} KiB){}",
                    e.flow.window_bytes as f64 / 1024.0,
                    e.flow.chunk_pages,
                    e.flow.peak_rate_mbps,
                    e.flow.urgent_holds,
                    e.flow.idle_requests,
                    e.flow.idle_window_bytes as f64 / 1024.0,
                    e.push_rate.map(|r| format!(", push capped at {:.1} MB/s", r as f64 / 1e6)).unwrap_or_default()
                )
            } else {
                "off".to_string()
            },
            losses = e.link_losses,
            reconnects = e.reconnects,
            rec50 = e.recovery_us.p50 / 1000.0,
            recmax = e.recovery_us.max / 1000.0,
            resent = e.resent_pages,
            early = e.early_pages,
            pre = e.prepaged_pages,
            hits = self.touched(self.prepaged_hits),
            pushed = e.pushed_pages,
            phits = self.touched(self.pushed_hits),
            sreq = self.source_requests_served,
            spages = self.source_pages_served,
            ver = self.pages_verified,
            mis = self.checksum_mismatches,
            dup = e.duplicate_pages,
            verdict = if self.is_clean() { "OK" } else { "FAILED" },
            precopy = self.precopy_summary(),
        )
    }
}

impl RunReport {
    fn precopy_summary(&self) -> String {
        let Some(p) = &self.precopy else {
            return String::new();
        };
        let rounds: Vec<String> = p.rounds.iter().map(|r| r.pages.to_string()).collect();
        format!(
            "\n  pre-copy          {n} rounds ({rounds} pages) in {ms:.1} ms, then {mode:?}: \
             {dirty} pages dirty at the pause, {paused} copied while paused, {present} present at resume\n\
             \x20 downtime          {down:.2} ms (source paused to guest resumed here)\n\
             \x20 transferred       {moved} pages in all ({x:.2}x guest size)",
            n = p.rounds.len(),
            rounds = if rounds.is_empty() { "no".into() } else { rounds.join(" + ") },
            ms = p.precopy_ms,
            mode = p.switch_over,
            dirty = p.final_dirty,
            paused = p.pages_sent_paused,
            present = p.pages_present,
            down = self.downtime_ms.unwrap_or(0.0),
            moved = self.pages_transferred,
            x = self.pages_transferred as f64 / self.small_pages().max(1) as f64,
        )
    }
}

/// Options of a destination run.
#[derive(Debug, Clone)]
pub struct RunOptions {
    /// Engine settings.
    pub config: MigrationConfig,
    /// What the "VM" does meanwhile.
    pub workload: Workload,
    /// Pre-copy rounds first, from a source whose guest still runs.
    pub precopy: Option<PrecopyConfig>,
    /// Show a progress bar on stderr.
    pub progress: bool,
    /// What backs guest memory.
    pub memory: Backing,
}

/// What backs the destination's guest memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Backing {
    /// Private anonymous memory, filled with UFFDIO_COPY (what most VMMs
    /// use).
    #[default]
    Anon,
    /// A memfd (shared memory), filled as the engine config's
    /// `shared_install` says.
    Memfd,
    /// Private memory on 2 MiB huge pages (hugetlbfs): each fault fetches
    /// a whole huge page.
    Hugetlb,
}

/// Migrates from `transport` while running the workload, then verifies
/// every page against the source's checksums.
pub fn run_destination(
    transport: Arc<dyn Transport>,
    opts: &RunOptions,
) -> Result<RunReport, RunError> {
    let layout = &transport.info().layout;
    let mem = Arc::new(match opts.memory {
        Backing::Anon => DestMemory::new(layout)?,
        Backing::Memfd => DestMemory::new_shared(layout)?,
        Backing::Hugetlb => DestMemory::new_hugetlb(layout)?,
    });
    // The engine counts in the memory's pages; the workload and the
    // checksums in the source's.
    let total = mem.layout().total_pages();
    let per = mem.layout().page_size() as u64 / PAGE_SIZE as u64;
    let bar = if opts.progress {
        ProgressBar::with_draw_target(Some(total), ProgressDrawTarget::stderr())
    } else {
        ProgressBar::hidden()
    };
    bar.set_style(
        ProgressStyle::with_template("{spinner} {msg} [{bar:40}] {pos}/{len} pages ({elapsed})")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    // A source whose guest still runs must be switched over (its guest
    // paused) before post-copy, even with no pre-copy rounds; a source
    // serving static memory says it tracks no writes.
    let cfg = opts.precopy.unwrap_or(PrecopyConfig {
        rounds: 0,
        converge_pages: 0,
        switch_over: SwitchOver::PostCopy,
    });
    let outcome = precopy(&transport, &mem, &cfg, &mut |round, pages| {
        bar.set_position(0);
        bar.set_message(if round == 0 {
            "switching over".to_string()
        } else {
            format!("pre-copy round {round}: {pages} pages")
        });
    });
    let (handle, pre) = match outcome {
        Ok(pre) => {
            let h =
                Migration::start_after_precopy(transport.clone(), mem, opts.config.clone(), &pre)?;
            let downtime = pre.paused_at.elapsed().as_secs_f64() * 1000.0;
            (h, Some((pre.report, downtime)))
        }
        Err(EngineError::Transport(TransportError::Remote {
            code: RemoteCode::Unsupported,
            ..
        })) if opts.precopy.is_none() => {
            // Static memory: plain post-copy.
            (
                Migration::start_with_memory(transport.clone(), mem, opts.config.clone())?,
                None,
            )
        }
        Err(e) => return Err(e.into()),
    };
    bar.set_message("migrating");
    bar.set_position(handle.progress().0);

    let mem = handle.memory().clone();
    let workload = opts.workload.clone();
    let worker = thread::Builder::new()
        .name("pw-workload".into())
        .spawn(move || workload.run(&mem))
        .map_err(|e| RunError::Workload(e.to_string()))?;

    // The workload blocks on faults; if the migration fails it may never
    // return, so watch the migration, not only the workload.
    while !worker.is_finished() {
        if handle.is_finished() && handle.progress().0 < total {
            break; // failed: wait() below returns the error
        }
        bar.set_position(handle.progress().0);
        thread::sleep(Duration::from_millis(20));
    }
    handle.release_push();
    while !handle.is_finished() {
        bar.set_position(handle.progress().0);
        thread::sleep(Duration::from_millis(20));
    }
    let origins: Vec<PageOrigin> = (0..total).map(|p| handle.origin(p)).collect();
    let mem = handle.memory().clone();
    let engine = match handle.wait() {
        Ok(r) => r,
        Err(e) => {
            bar.abandon_with_message("failed");
            return Err(e.into());
        }
    };
    bar.set_position(total);
    bar.set_message("verifying");
    let stats = worker
        .join()
        .map_err(|_| RunError::Workload("workload thread panicked".into()))?;

    let layout = &transport.info().layout;
    let mut verified = 0u64;
    let mut mismatches = 0u64;
    for region in 0..layout.regions().len() {
        let pages = layout.region_pages(region);
        let mut first = pages.start;
        while first < pages.end {
            let count = (pages.end - first).min(CHECKSUM_CHUNK);
            let sums = transport.checksums(PageRange::new(first, count as u32))?;
            for (i, want) in sums.iter().enumerate() {
                let p = first + i as u64;
                let ok = mem.small_page(p).map(page_checksum) == Some(*want);
                if !ok {
                    mismatches += 1;
                    tracing::error!(page = p, "page differs from the source");
                }
                verified += 1;
            }
            first += count;
        }
    }
    let hits = |origin| {
        stats
            .touched
            .iter()
            .enumerate()
            .filter(|&(p, t)| *t && origins[p / per as usize] == origin)
            .count() as u64
    };
    let SourceStats {
        requests_served,
        pages_served,
    } = transport.source_stats()?;
    // Every page is here and verified: the source may let go.
    if let Err(e) = transport.done() {
        tracing::warn!("could not tell the source we are done: {e}");
    }
    bar.finish_and_clear();
    let pages_transferred = engine.bytes_received / PAGE_SIZE as u64
        + pre
            .as_ref()
            .map_or(0, |(p, _)| p.pages_sent + p.pages_sent_paused);
    let (precopy, downtime_ms) = match pre {
        Some((p, d)) => (Some(p), Some(d)),
        None => (None, None),
    };
    Ok(RunReport {
        pages_transferred,
        downtime_ms,
        precopy,
        prepaged_hits: hits(PageOrigin::Bubble),
        pushed_hits: hits(PageOrigin::Push),
        engine,
        pages_verified: verified,
        checksum_mismatches: mismatches,
        workload: stats,
        source_requests_served: requests_served,
        source_pages_served: pages_served,
    })
}
