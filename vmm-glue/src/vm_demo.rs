//! A KVM guest migrated post-copy: a source VMM runs the guest, pauses it
//! and serves its memory; a destination VMM hands fresh memory to pagewire
//! through the embedding API, restores the vCPUs and resumes at once, its
//! faults (raised by KVM, in kernel context) served over the network
//! while the pusher runs. The guest's results are compared with the same
//! guest run without migration.

use std::sync::Arc;
use std::time::{Duration, Instant};

use memmap2::MmapMut;
use pagewire_engine::{DestMemory, EngineReport, GuestRegion, MigrationConfig};
use pagewire_minivm::boot::write_boot;
use pagewire_minivm::{GuestConfig, MiniVm, RunControl, VcpuState, VmError};
use pagewire_transport::source::RegionBytes;
use pagewire_transport::tcp::{PageServer, TcpOptions};
use pagewire_transport::{MemoryLayout, SourceMemory};
use serde::Serialize;

use crate::embed::{Destination, EmbedError, TransportChoice, UffdSetup};

/// Why the demo could not run.
#[derive(Debug, thiserror::Error)]
pub enum VmDemoError {
    /// The VM failed.
    #[error(transparent)]
    Vm(#[from] VmError),
    /// The migration could not start.
    #[error(transparent)]
    Start(#[from] EmbedError),
    /// The migration failed.
    #[error(transparent)]
    Engine(#[from] pagewire_engine::EngineError),
    /// Memory, sockets or state transfer failed.
    #[error("{0}")]
    Setup(String),
    /// A vCPU core the process may not run on.
    #[error(transparent)]
    Placement(#[from] pagewire_engine::placement::PlacementError),
}

fn setup<E: std::fmt::Display>(what: &'static str) -> impl FnOnce(E) -> VmDemoError {
    move |e| VmDemoError::Setup(format!("{what}: {e}"))
}

/// What to run.
#[derive(Debug, Clone)]
pub struct VmDemoOptions {
    /// The guest.
    pub guest: GuestConfig,
    /// Pause the source once every vCPU finished this many passes.
    pub pause_after: u32,
    /// Engine settings.
    pub config: MigrationConfig,
    /// Transport.
    pub transport: TransportChoice,
    /// Timeouts.
    pub tcp: TcpOptions,
    /// Cores for vCPU `i` (`vcpu_cores[i % len]`); empty: unpinned.
    pub vcpu_cores: Vec<usize>,
}

/// What the demo measured.
#[derive(Debug, Clone, Serialize)]
pub struct VmDemoReport {
    /// Guest memory in bytes.
    pub memory: u64,
    /// vCPUs.
    pub vcpus: usize,
    /// Passes each vCPU runs.
    pub passes: u32,
    /// Per vCPU: the result of the guest run without migration.
    pub local_results: Vec<u64>,
    /// Per vCPU: the result of the migrated guest.
    pub migrated_results: Vec<u64>,
    /// Whether they are equal (the run is correct only if so).
    pub results_match: bool,
    /// Whole guest run without migration, in ms.
    pub local_ms: f64,
    /// Source: boot to pause, in ms.
    pub source_ms: f64,
    /// Passes each vCPU had done at the pause.
    pub passes_at_pause: Vec<u32>,
    /// Downtime: last source vCPU paused to first destination vCPU
    /// resumed (vCPU state transfer, destination VM and migration set-up),
    /// in ms.
    pub downtime_ms: f64,
    /// The rest of the guest's work after resume, with memory migrating,
    /// in ms.
    pub migrated_run_ms: f64,
    /// The same rest of the work resumed over a local copy of the memory
    /// (no migration), in ms.
    pub local_resume_ms: f64,
    /// `migrated_run_ms / local_resume_ms`.
    pub slowdown: f64,
    /// Where the vCPU threads ran.
    pub vcpu_cores: Vec<usize>,
    /// The engine's report.
    pub engine: EngineReport,
}

impl VmDemoReport {
    /// A human summary.
    pub fn summary(&self) -> String {
        let e = &self.engine;
        format!(
            "pagewire vm-demo: KVM guest ({vcpus} vCPUs, {mib} MiB) migrated post-copy over {t}\n\
             \x20 guest results     {verdict}: {results} (without migration: {local_results})\n\
             \x20 without migration {local:.1} ms for the whole run\n\
             \x20 source            paused after {src:.1} ms, passes done {pp:?} of {passes}\n\
             \x20 downtime          {down:.2} ms (last source vCPU paused -> destination vCPUs running)\n\
             \x20 after resume      {mig:.1} ms migrated vs {lr:.1} ms with all memory local: {slow:.2}x\n\
             \x20 faults            {faults} ({nf} network, {inf} waited on a lane, {zf} zero), most at once {conc}\n\
             \x20 fault latency     p50 {p50:.1} us, p99 {p99:.1} us, max {max:.1} us\n\
             \x20 pages             {pages} ({pre} by bubbles, {push} pushed, {zero} zero), {dup} duplicates\n\
             \x20 migration         {total:.1} ms resume to last page",
            vcpus = self.vcpus,
            mib = self.memory >> 20,
            t = e.transport,
            verdict = if self.results_match { "OK" } else { "DIFFER" },
            results = hex(&self.migrated_results),
            local_results = hex(&self.local_results),
            local = self.local_ms,
            src = self.source_ms,
            pp = self.passes_at_pause,
            passes = self.passes,
            down = self.downtime_ms,
            mig = self.migrated_run_ms,
            lr = self.local_resume_ms,
            slow = self.slowdown,
            faults = e.faults,
            nf = e.network_faults,
            inf = e.inflight_faults,
            zf = e.zero_faults,
            conc = e.max_concurrent_faults,
            p50 = e.fault_latency_us.p50,
            p99 = e.fault_latency_us.p99,
            max = e.fault_latency_us.max,
            pages = e.pages_total,
            pre = e.prepaged_pages,
            push = e.pushed_pages,
            zero = e.zero_pages,
            dup = e.duplicate_pages,
            total = e.total_ms,
        )
    }
}

fn hex(v: &[u64]) -> String {
    v.iter()
        .map(|r| format!("{r:#018x}"))
        .collect::<Vec<_>>()
        .join(" ")
}

fn map(len: u64) -> Result<MmapMut, VmDemoError> {
    MmapMut::map_anon(len as usize).map_err(setup("map guest memory"))
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// Runs a guest over `mem` from boot (or from `states`) to the end, or to
/// a pause once every vCPU did `pause_after` passes.
fn run_vm(
    mem: &mut MmapMut,
    cfg: GuestConfig,
    states: Option<&[VcpuState]>,
    pause_after: Option<u32>,
    cores: &[usize],
) -> Result<(pagewire_minivm::RunOutcome, Duration), VmDemoError> {
    // SAFETY: `mem` outlives the VM, dropped at the end of this function.
    let mut vm = unsafe { MiniVm::new(mem.as_ptr() as u64, cfg) }?;
    match states {
        Some(s) => vm.restore(s)?,
        None => {
            write_boot(mem, &cfg)?;
            vm.boot()?;
        }
    }
    // Each vCPU pauses right after its pass `pause_after`.
    let ctl = RunControl {
        pin: cores.to_vec(),
        pause_after_pass: pause_after,
        ..RunControl::new(cfg.vcpus)
    };
    let t0 = Instant::now();
    let out = vm.run(&ctl);
    Ok((out?, t0.elapsed()))
}

/// Runs the demo: local baseline, source run and pause, post-copy
/// migration into a destination VM, local resume baseline.
pub fn run_vm_demo(opts: &VmDemoOptions) -> Result<VmDemoReport, VmDemoError> {
    let cfg = opts.guest;
    cfg.share_len()?;
    if opts.pause_after >= cfg.passes {
        return Err(VmDemoError::Setup(format!(
            "the pause (after pass {}) must come before the last pass ({})",
            opts.pause_after, cfg.passes
        )));
    }
    let cores = &opts.vcpu_cores;
    pagewire_engine::placement::check("vcpu_cores", cores)?;
    // 1. The whole run without migration.
    let mut local = map(cfg.memory)?;
    let (out, local_took) = run_vm(&mut local, cfg, None, None, cores)?;
    let local_results = out
        .results()
        .ok_or_else(|| VmDemoError::Setup("local run did not finish".into()))?;
    drop(local);

    // 2. The source runs the guest and pauses it.
    let mut src = map(cfg.memory)?;
    let (out, source_took) = run_vm(&mut src, cfg, None, Some(opts.pause_after), cores)?;
    let paused_at = out.stopped_at;
    let states = out
        .states()
        .ok_or_else(|| VmDemoError::Setup("the guest finished before the pause".into()))?;
    let passes_at_pause = states.iter().map(|s| s.passes_done).collect();
    // The vCPU state crosses as bytes, as it would cross hosts.
    let wire = serde_json::to_vec(&states).map_err(setup("vCPU state"))?;
    // A copy of the paused memory for the local-resume baseline (made
    // before the clock for downtime matters less: it is not part of a
    // migration, so it is taken out of the downtime below).
    let t_copy = Instant::now();
    let mut resume_copy = map(cfg.memory)?;
    resume_copy.copy_from_slice(&src);
    let copy_took = t_copy.elapsed();
    // 3. The source serves its memory.
    let layout = MemoryLayout::single(cfg.memory).map_err(setup("layout"))?;
    let region: RegionBytes = Arc::new(src);
    let source = Arc::new(SourceMemory::new(layout, vec![region]).map_err(setup("source memory"))?);
    let mut server = PageServer::bind("127.0.0.1:0".parse().map_err(setup("address"))?, source)
        .map_err(setup("source listen"))?;
    if let Some(key) = &opts.tcp.auth_key {
        server = server.with_auth(key.clone());
    }
    let addr = server
        .local_addr()
        .map_err(setup("source address"))?
        .to_string();
    let _server = server.spawn().map_err(setup("source serve"))?;

    // 4. The destination: fresh memory through pagewire, vCPUs restored.
    let states: Vec<VcpuState> = serde_json::from_slice(&wire).map_err(setup("vCPU state"))?;
    let mut dst = map(cfg.memory)?;
    let region = GuestRegion {
        guest_base: 0,
        host_addr: dst.as_ptr() as u64,
        size: cfg.memory,
        page_size: 4096,
    };
    // SAFETY: `dst` lives until the migration is waited on below (on
    // failure, the error returns and the process exits).
    let memory = unsafe { DestMemory::from_vmm(&[region]) }?;
    let migration = Destination::new(addr)
        .transport(opts.transport.clone())
        .config(opts.config.clone())
        .tcp_options(opts.tcp.clone())
        .start(memory, UffdSetup::Create)?;
    // SAFETY: `dst` outlives the VM (dropped after it).
    let mut vm = unsafe { MiniVm::new(dst.as_mut_ptr() as u64, cfg) }?;
    vm.restore(&states)?;
    let ctl = RunControl {
        pin: cores.to_vec(),
        ..RunControl::new(cfg.vcpus)
    };
    let resumed = Instant::now();
    let out = vm.run(&ctl)?;
    let migrated_took = resumed.elapsed();
    let migrated_results = out
        .results()
        .ok_or_else(|| VmDemoError::Setup("the migrated guest did not finish".into()))?;
    // With --no-push the sweep waited for the guest; let it finish now.
    migration.release_push();
    let transport = migration.transport().clone();
    let engine = migration.wait()?;
    let _ = transport.done();
    drop(vm);
    drop(dst);

    // 5. The same rest of the work, all memory local.
    let (out, local_resume_took) = run_vm(&mut resume_copy, cfg, Some(&states), None, cores)?;
    let local_resume = out
        .results()
        .ok_or_else(|| VmDemoError::Setup("local resume did not finish".into()))?;
    let downtime = resumed.duration_since(paused_at).saturating_sub(copy_took);
    Ok(VmDemoReport {
        memory: cfg.memory,
        vcpus: cfg.vcpus,
        passes: cfg.passes,
        results_match: migrated_results == local_results && local_resume == local_results,
        local_results,
        migrated_results,
        local_ms: ms(local_took),
        source_ms: ms(source_took),
        passes_at_pause,
        downtime_ms: ms(downtime),
        migrated_run_ms: ms(migrated_took),
        local_resume_ms: ms(local_resume_took),
        slowdown: migrated_took.as_secs_f64() / local_resume_took.as_secs_f64().max(1e-9),
        vcpu_cores: cores.clone(),
        engine,
    })
}
