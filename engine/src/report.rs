//! What a migration reports: live counters while it runs, and the full
//! report when it ends.

use std::time::Instant;

use serde::Serialize;

use crate::governor::FlowStats;
use crate::metrics::{LatencyUs, Metrics};
use crate::shared::Shared;

/// How a migration installed pages (`install_path` in the report).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum InstallPath {
    /// UFFDIO_COPY from a buffer: private memory.
    #[serde(rename = "copy")]
    Copy,
    /// Landed in shared memory by the transport (RDMA-read straight into
    /// the second mapping, or received and written into the memory's
    /// file), then UFFDIO_CONTINUE.
    #[serde(rename = "landed")]
    Landed,
    /// Shared memory, pages received into a buffer and copied in with
    /// UFFDIO_COPY (into the file and mapped in one step).
    #[serde(rename = "copy-shared")]
    SharedCopy,
}

impl std::fmt::Display for InstallPath {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Copy => "UFFDIO_COPY",
            Self::Landed => "UFFDIO_CONTINUE after landing in shared memory",
            Self::SharedCopy => "UFFDIO_COPY into shared memory",
        })
    }
}

/// What a migration did, in the paper's terms.
#[derive(Debug, Clone, Serialize)]
pub struct EngineReport {
    /// Transport that moved the pages.
    pub transport: String,
    /// How pages were installed.
    pub install_path: InstallPath,
    /// Pages in guest memory.
    pub pages_total: u64,
    /// Size of guest memory's pages in bytes (4096; 2 MiB on hugetlbfs).
    /// Every page count in this report is in these pages.
    pub page_size: u64,
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
    /// Pages installed before the rest of their bulk reply had arrived,
    /// because a fault waited on one of them (the link delivers a reply a
    /// piece at a time).
    pub early_pages: u64,
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
    /// CPUs the lanes were given (empty: see `pin_lanes`).
    pub lane_cpus: Vec<usize>,
    /// Fault services that ran (each with its own urgent channel).
    pub fault_services: usize,
    /// CPUs the fault services were pinned to, one each (empty: one
    /// service, unpinned).
    pub fault_cpus: Vec<usize>,
    /// How long the fault service polled for a reply before sleeping, µs.
    pub reply_spin_us: u64,
    /// Width of one timeline step, in ms.
    pub timeline_step_ms: u64,
    /// Faults per timeline step, from the start.
    pub faults_over_time: Vec<u32>,
    /// Pages installed per timeline step, from the start.
    pub pages_over_time: Vec<u32>,
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

/// Builds the final report of a migration.
pub(crate) fn build(s: &Shared) -> EngineReport {
    let m = &s.metrics;
    let (faults_over_time, pages_over_time) = m.timeline().into_iter().unzip();
    let finished = s.finished.get().copied().unwrap_or_else(Instant::now);
    let cdf: Vec<f64> = (1..=100).map(|i| f64::from(i) / 100.0).collect();
    let all = m.all.summary();
    EngineReport {
        transport: s.transport.name().to_string(),
        install_path: match (s.installer.memory().is_shared(), s.landed) {
            (false, _) => InstallPath::Copy,
            (true, true) => InstallPath::Landed,
            (true, false) => InstallPath::SharedCopy,
        },
        pages_total: s.states.len(),
        page_size: s.installer.memory().layout().page_size() as u64,
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
        early_pages: Metrics::get(&m.early_pages),
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
        lane_cpus: s.config.lane_cpus.clone(),
        fault_services: s.fault_services.load(std::sync::atomic::Ordering::Relaxed),
        // The services' CPUs, as fault_service_cpus gives them (a CPU
        // named twice runs one).
        fault_cpus: crate::placement::fault_service_cpus(&s.config.fault_cpus)
            .unwrap_or_default()
            .into_iter()
            .flatten()
            .collect(),
        reply_spin_us: u64::try_from(s.config.reply_spin.as_micros()).unwrap_or(u64::MAX),
        timeline_step_ms: crate::metrics::TIMELINE_MS,
        faults_over_time,
        pages_over_time,
    }
}
