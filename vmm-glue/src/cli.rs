//! The command line: every subcommand's flags, with the help `--help`
//! prints, and the parsers of sizes and rates.

use std::io::IsTerminal;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand, ValueEnum};
use pagewire_engine::{MigrationConfig, PrecopyConfig, PrepagerKind, SharedInstall, SwitchOver};
use pagewire_transport::rdma::Device;
use pagewire_transport::tcp::TcpOptions;
use pagewire_transport::AuthKey;
use pagewire_vmm_glue::image;
use pagewire_vmm_glue::run::{Backing, RunOptions};
use pagewire_vmm_glue::trace::Trace;
use pagewire_vmm_glue::workload::{Pattern, Workload};

/// pagewire moves a VM's memory after the VM resumed at the destination
/// (post-copy): faults are fetched at once, the rest is pushed in the
/// background, and every page is verified against the source.
#[derive(Debug, Parser)]
#[command(name = "pagewire", version, propagate_version = true)]
pub(crate) struct Cli {
    /// Log more (-v info, -vv debug). RUST_LOG overrides.
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    pub(crate) verbose: u8,
    #[command(subcommand)]
    pub(crate) command: Cmd,
}

#[derive(Debug, Subcommand)]
pub(crate) enum Cmd {
    /// Serve guest memory to destinations until killed.
    Source(SourceArgs),
    /// Pull guest memory from a source post-copy while a workload runs,
    /// verify every page and report.
    Dest(DestArgs),
    /// Run a source and a destination as two processes on loopback and
    /// print the report.
    Demo(DemoArgs),
    /// Be Firecracker's page-fault handler (its UFFD memory backend):
    /// accept one VM on a Unix socket and pull its snapshot memory
    /// post-copy from a pagewire source.
    FcHandler(FcHandlerArgs),
    /// Migrate a real KVM guest post-copy on loopback: a hand-written
    /// 64-bit guest on several vCPUs is run, paused, and resumed in a
    /// second VM whose memory pagewire fills; its results are checked
    /// against a run without migration.
    VmDemo(VmDemoArgs),
    /// Run a program and record the order in which it first touches its
    /// anonymous memory, as a trace for `--workload trace`.
    RecordTrace(RecordTraceArgs),
    /// Render experiment reports (the JSON lines `netlab/fault-under-load.sh`
    /// writes) as results.md with tables and SVG plots.
    Results(ResultsArgs),
}

#[derive(Debug, Args)]
pub(crate) struct RecordTraceArgs {
    /// Trace file to write.
    #[arg(long)]
    pub(crate) out: PathBuf,
    /// Sampling interval of /proc/PID/pagemap in microseconds: pages first
    /// touched within one interval are listed by address.
    #[arg(long, default_value_t = 500)]
    pub(crate) interval_us: u64,
    /// The program and its arguments (after `--`).
    #[arg(required = true, last = true)]
    pub(crate) command: Vec<String>,
}

#[derive(Debug, Args)]
pub(crate) struct ResultsArgs {
    /// Directory for results.md and plots/ (created if missing).
    #[arg(long, default_value = "docs")]
    pub(crate) out: PathBuf,
    /// Report files, one labelled report per line.
    #[arg(required = true)]
    pub(crate) files: Vec<PathBuf>,
}

#[derive(Debug, Args)]
pub(crate) struct VmDemoArgs {
    /// Guest memory (at least 2 MiB + 1 MiB per vCPU, at most 4 GiB).
    #[arg(long, default_value = "256MiB", value_parser = parse_size)]
    pub(crate) memory: u64,
    /// vCPUs; each fills and checksums its own share of guest memory.
    #[arg(long, default_value_t = 2)]
    pub(crate) vcpus: usize,
    /// Checksum passes each vCPU runs over its share after filling it.
    #[arg(long, default_value_t = 4)]
    pub(crate) passes: u32,
    /// Pause the guest at the source once every vCPU finished this many
    /// passes (must be fewer than --passes).
    #[arg(long, default_value_t = 1)]
    pub(crate) pause_after: u32,
    /// Pin vCPU i to core CORES[i % n] (comma-separated; default: not
    /// pinned).
    #[arg(long, value_delimiter = ',')]
    pub(crate) vcpu_cores: Vec<usize>,
    #[command(flatten)]
    pub(crate) path: TransportArgs,
    #[command(flatten)]
    pub(crate) engine: EngineArgs,
}

#[derive(Debug, Args)]
pub(crate) struct FcHandlerArgs {
    /// Unix socket to listen on: Firecracker's
    /// `mem_backend.backend_path`. A stale socket there is replaced; any
    /// other file is left alone and refused.
    #[arg(long)]
    pub(crate) socket: PathBuf,
    /// Address of the pagewire source serving the snapshot memory file
    /// (`pagewire source --memory SNAPSHOT_MEM`): the offsets Firecracker
    /// sends are offsets in that file.
    #[arg(long)]
    pub(crate) source: String,
    #[command(flatten)]
    pub(crate) path: TransportArgs,
    #[command(flatten)]
    pub(crate) engine: EngineArgs,
}

#[derive(Debug, Args)]
pub(crate) struct SourceArgs {
    /// Address to listen on. The protocol has no authentication: keep it
    /// on loopback or a private migration network.
    #[arg(long, default_value = "127.0.0.1:7070")]
    pub(crate) listen: SocketAddr,
    /// Raw guest memory image to serve (guest address 0 = offset 0). It must
    /// not change while served.
    #[arg(
        long,
        conflicts_with = "synthetic",
        required_unless_present = "synthetic"
    )]
    pub(crate) memory: Option<PathBuf>,
    /// Serve a generated guest of this size instead (e.g. 256MiB, 1GiB).
    #[arg(long, value_parser = parse_size)]
    pub(crate) synthetic: Option<u64>,
    /// Seed of the synthetic guest's contents.
    #[arg(long, default_value_t = 1)]
    pub(crate) seed: u64,
    /// Share of the synthetic guest's pages that are all zero, in percent.
    #[arg(long, default_value_t = image::DEFAULT_ZERO_PERCENT, value_parser = clap::value_parser!(u8).range(0..=100))]
    pub(crate) zero_percent: u8,
    #[command(flatten)]
    pub(crate) rdma: RdmaArgs,
    /// Serve TCP only, even where an RDMA device exists.
    #[arg(long)]
    pub(crate) no_rdma: bool,
    /// Shared secret (at least 16 bytes): every destination must prove it
    /// holds it, and the source proves it too, before anything about guest
    /// memory is sent. Without it, anyone who reaches the port reads guest
    /// memory.
    #[arg(long)]
    pub(crate) auth_key_file: Option<PathBuf>,
    /// Exit (status 0) once a destination says it has every page: the
    /// memory is no longer needed.
    #[arg(long)]
    pub(crate) once: bool,
    /// Most connections served at once (a migration uses one per lane
    /// plus two); more are refused as busy.
    #[arg(long, default_value_t = pagewire_transport::tcp::DEFAULT_MAX_CONNECTIONS)]
    pub(crate) max_connections: usize,
    #[command(flatten)]
    pub(crate) guest: GuestArgs,
}

#[derive(Debug, Args, Clone)]
pub(crate) struct GuestArgs {
    /// Keep the synthetic guest running at the source, writing its memory
    /// in this pattern (one word per touched page), until a destination
    /// switches over: for pre-copy and hybrid migrations (`dest
    /// --precopy-rounds`). Its writes are tracked with userfaultfd
    /// write-protection. Needs --synthetic.
    #[arg(long, value_enum, requires = "synthetic")]
    pub(crate) guest_workload: Option<Pattern>,
    /// Busy time between the running guest's writes, in microseconds.
    #[arg(long, default_value_t = 2)]
    pub(crate) guest_think_us: u64,
    /// Seed of the running guest's write pattern.
    #[arg(long, default_value_t = 7)]
    pub(crate) guest_seed: u64,
}

#[derive(Debug, Args, Clone)]
pub(crate) struct PrecopyArgs {
    /// Pre-copy rounds before the switch-over, while the guest still runs
    /// at the source (`source --guest-workload`): round 1 copies every
    /// page, each later round the pages written during the round before.
    /// Then the source pauses its guest and the destination resumes with
    /// post-copy for what is still dirty or never copied (hybrid). 0:
    /// switch over at once (pure post-copy from a running guest). Default:
    /// no pre-copy, the source's memory is static.
    #[arg(long)]
    pub(crate) precopy_rounds: Option<u32>,
    /// The pre-copy baseline: after the rounds, copy the last dirty pages
    /// while the guest is paused and resume with every page present (no
    /// post-copy). Needs --precopy-rounds.
    #[arg(long, requires = "precopy_rounds")]
    pub(crate) stop_and_copy: bool,
    /// Switch over before --precopy-rounds once a round leaves at most
    /// this many dirty pages (pre-copy converged).
    #[arg(long, default_value_t = 256, requires = "precopy_rounds")]
    pub(crate) converge_pages: u64,
}

impl PrecopyArgs {
    pub(crate) fn config(&self) -> Option<PrecopyConfig> {
        self.precopy_rounds.map(|rounds| PrecopyConfig {
            rounds,
            converge_pages: self.converge_pages,
            switch_over: if self.stop_and_copy {
                SwitchOver::StopAndCopy
            } else {
                SwitchOver::PostCopy
            },
        })
    }
}

#[derive(Debug, Args, Clone)]
pub(crate) struct RdmaArgs {
    /// RDMA device to use (default: the first with an ACTIVE port).
    #[arg(long)]
    pub(crate) rdma_device: Option<String>,
    /// GID index (default: the first IPv4-mapped GID, else the first one).
    #[arg(long)]
    pub(crate) gid_index: Option<u8>,
}

impl RdmaArgs {
    pub(crate) fn open(&self) -> Result<Arc<Device>, pagewire_transport::TransportError> {
        Device::open(self.rdma_device.as_deref(), self.gid_index)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(crate) enum TransportKind {
    /// RDMA when a device with an ACTIVE port exists, TCP otherwise.
    Auto,
    /// One-sided RDMA READs from the source's registered memory.
    Rdma,
    /// TCP: an urgent connection for faults, one bulk connection per lane.
    Tcp,
    /// memcpy inside one process: the floor, demo only.
    Inproc,
}

#[derive(Debug, Args, Clone)]
pub(crate) struct WorkloadArgs {
    /// Touch pattern of the workload that stands in for the resumed VM.
    #[arg(long, value_enum, default_value = "hotset")]
    pub(crate) workload: Pattern,
    /// Number of touches (default: one per page).
    #[arg(long)]
    pub(crate) touches: Option<u64>,
    /// Seed of the random workloads.
    #[arg(long, default_value_t = 42)]
    pub(crate) workload_seed: u64,
    /// Distance between touches of the stride workload, in pages.
    #[arg(long, default_value_t = 16)]
    pub(crate) stride: u64,
    /// Busy time between touches in microseconds (models compute).
    #[arg(long, default_value_t = 0)]
    pub(crate) think_us: u64,
    /// Trace file the `trace` workload replays (`pagewire record-trace`
    /// writes them; traces/ has some).
    #[arg(long)]
    pub(crate) trace: Option<PathBuf>,
    /// CPUs the workload's thread runs on, as a VMM pins a vCPU: a list
    /// like 1 or 0,2-3 (default: wherever the scheduler puts it).
    #[arg(long, value_parser = parse_cpus)]
    pub(crate) workload_cpus: Option<CpuList>,
}

impl WorkloadArgs {
    pub(crate) fn workload(&self) -> Result<Workload> {
        let trace = match (self.workload, &self.trace) {
            (Pattern::Trace, Some(path)) => {
                Some(Arc::new(Trace::load(path).with_context(|| {
                    format!("cannot read trace {}", path.display())
                })?))
            }
            (Pattern::Trace, None) => bail!("--workload trace needs --trace FILE"),
            (_, Some(_)) => bail!("--trace is for --workload trace"),
            (_, None) => None,
        };
        Ok(Workload {
            pattern: self.workload,
            touches: self.touches,
            seed: self.workload_seed,
            stride: self.stride,
            think_us: self.think_us,
            trace,
            cpus: CpuList::checked(&self.workload_cpus, "--workload-cpus")?,
        })
    }
}

#[derive(Debug, Args, Clone)]
pub(crate) struct EngineArgs {
    /// Pusher lanes, each with its own bulk connection (default: one per core).
    #[arg(long)]
    pub(crate) lanes: Option<usize>,
    /// What backs the destination's guest memory: `anon`, private
    /// anonymous memory filled with UFFDIO_COPY (what most VMMs use), or
    /// `memfd`, shared memory (as QEMU's memory-backend-memfd), filled as
    /// --shared-install says; or `hugetlb`, private memory on 2 MiB huge
    /// pages (as Firecracker's huge_pages "2M"), each fault fetching a
    /// whole huge page, which needs a free huge page per 2 MiB of guest
    /// (vm.nr_hugepages).
    #[arg(long, value_enum, default_value = "anon")]
    pub(crate) memory_backend: MemoryBackend,
    /// How pages reach memfd-backed guest memory: `land` has the transport
    /// put them in the memory itself (RDMA READs straight into a second
    /// mapping of the memfd, nothing copied on this CPU; TCP receives and
    /// writes them into the memfd), then maps them with UFFDIO_CONTINUE;
    /// `copy` receives them into a buffer and copies them in with
    /// UFFDIO_COPY, which over TCP is the faster of the two; `auto` lands
    /// them over RDMA and copies them over TCP.
    #[arg(long, value_enum, default_value = "auto")]
    pub(crate) shared_install: SharedInstallArg,
    /// Bubble radius: pages prepaged each way around the last fault.
    #[arg(long, default_value_t = 64)]
    pub(crate) bubble: u64,
    /// Turn bubbling (adaptive prepaging) off.
    #[arg(long)]
    pub(crate) no_bubble: bool,
    /// Prepager: pagewire's adaptive one (streams per vCPU, windows that
    /// grow where the guest runs through them and shrink where bubbles go
    /// untouched, strides), or the paper's fixed bubbles (for comparison).
    #[arg(long, value_enum, default_value = "adaptive")]
    pub(crate) prepager: PrepagerArg,
    /// Move the background sweep to each faulted page, as QEMU's post-copy
    /// restarts its background transfer at every page request (for
    /// comparison; combine with --no-bubble for QEMU's scheme).
    #[arg(long)]
    pub(crate) sweep_from_fault: bool,
    /// Sweep memory in address order, as the paper does, instead of
    /// pushing first the 512 KiB blocks the guest faults in most (for
    /// comparison).
    #[arg(long)]
    pub(crate) linear_sweep: bool,
    /// Hold the background sweep until the workload ends (demand paging
    /// plus bubbles only while the workload runs).
    #[arg(long)]
    pub(crate) no_push: bool,
    /// Most pages a lane fetches in one request (clamped to what the
    /// transport accepts in one request: 4096 over TCP, 256 over RDMA).
    /// With flow control, requests are sized to the link and usually
    /// smaller.
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u32).range(1..=4096))]
    pub(crate) batch: u32,
    /// Turn off bulk flow control: lanes then keep their channels full,
    /// and faults queue behind the push wherever the link is the
    /// bottleneck. For comparison only.
    #[arg(long)]
    pub(crate) no_flow_control: bool,
    /// Cap the push (sweep and bubbles) at this many bytes per second, e.g.
    /// 50MB or 100MiB (default: unlimited). Faults are never capped.
    #[arg(long, value_parser = parse_rate)]
    pub(crate) push_rate: Option<u64>,
    /// Do not pin lanes to cores (by default lane i runs on the i-th CPU
    /// the process may use, round robin).
    #[arg(long, conflicts_with = "lane_cpus")]
    pub(crate) no_pin: bool,
    /// CPUs the lanes run on, round robin: a list like 0 or 0,2-3. A host
    /// that pins its vCPUs keeps the lanes off their CPUs, so that waking
    /// a vCPU or the fault service never has to preempt a lane.
    #[arg(long, value_parser = parse_cpus)]
    pub(crate) lane_cpus: Option<CpuList>,
    /// Run a fault service pinned on each of these CPUs (default: one,
    /// unpinned). The service on a faulting vCPU's CPU serves it without
    /// a wake-up across CPUs: name the vCPUs' CPUs. Every fault wakes every
    /// service, which costs CPU the push may need. Lanes still use every
    /// CPU unless --lane-cpus keeps them off.
    #[arg(long, value_parser = parse_cpus)]
    pub(crate) fault_cpus: Option<CpuList>,
    /// Nice value of the lane threads (-20..19; 0 leaves it as inherited):
    /// by default 10, so that vCPUs and the fault service win the CPU over
    /// the push when they compete for it.
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(i32).range(-20..=19))]
    pub(crate) lane_nice: i32,
    /// Microseconds the fault service keeps polling for the next fault
    /// after each one before it sleeps (0: sleep at once): the next fault
    /// of a burst is then read without a wake-up, at the cost of a core
    /// while it spins.
    #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u64).range(0..=1_000_000))]
    pub(crate) fault_spin_us: u64,
    /// Microseconds (at most 50000) the fault service polls for a fault's
    /// reply without sleeping, counted from the fault (0: sleep on the
    /// socket at once). Polling saves the wake-up on the reply at the cost
    /// of a CPU while the fault is out; it takes nothing from the guest
    /// only where a fault service shares a CPU with the one vCPU that
    /// faulted (--fault-cpus) and no lane (--lane-cpus).
    #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u64).range(0..=50_000))]
    pub(crate) reply_spin_us: u64,
    /// Seconds any network read or write may block before the migration
    /// fails (a hung source must not hang the VM forever).
    #[arg(long, default_value_t = 10.0)]
    pub(crate) io_timeout: f64,
    /// Print the report as JSON on stdout (no progress bar).
    #[arg(long)]
    pub(crate) json: bool,
    /// Seconds a lost link may take to come back: broken connections are
    /// reopened with backoff and what was outstanding is asked for again,
    /// while faulting threads stay blocked. A source that refuses
    /// connections (gone) fails the migration at once. 0: fail at the
    /// first loss.
    #[arg(long, default_value_t = 120.0)]
    pub(crate) recover_timeout: f64,
    /// Shared secret the source was given (--auth-key-file there): the
    /// source must prove it holds it, and so do we. A source that does not
    /// authenticate is then refused.
    #[arg(long)]
    pub(crate) auth_key_file: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub(crate) struct DestArgs {
    /// Address of the pagewire source.
    #[arg(long)]
    pub(crate) connect: String,
    #[command(flatten)]
    pub(crate) path: TransportArgs,
    #[command(flatten)]
    pub(crate) workload: WorkloadArgs,
    #[command(flatten)]
    pub(crate) precopy: PrecopyArgs,
    #[command(flatten)]
    pub(crate) engine: EngineArgs,
}

#[derive(Debug, Args)]
pub(crate) struct TransportArgs {
    /// Transport to fetch pages with (inproc: the single-process floor,
    /// demo only).
    #[arg(long, value_enum, default_value = "auto")]
    pub(crate) transport: TransportKind,
    #[command(flatten)]
    pub(crate) rdma: RdmaArgs,
    /// How RDMA pusher lanes wait for READ completions (faults always
    /// busy-poll).
    #[arg(long, value_enum, default_value = "poll")]
    pub(crate) rdma_bulk_wait: BulkWait,
    /// When RDMA stops working mid-migration (the device or its address
    /// goes away, links keep failing while TCP works), fail instead of
    /// going on over TCP.
    #[arg(long)]
    pub(crate) rdma_no_fallback: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(crate) enum MemoryBackend {
    /// Private anonymous memory, pages installed with UFFDIO_COPY.
    Anon,
    /// A memfd (shared memory), filled as --shared-install says.
    Memfd,
    /// Private memory on 2 MiB huge pages (hugetlbfs, as Firecracker's
    /// huge_pages "2M"): each fault fetches a whole 2 MiB page. Needs a
    /// free huge page per 2 MiB of guest (vm.nr_hugepages).
    Hugetlb,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(crate) enum SharedInstallArg {
    /// Land over RDMA, copy over TCP.
    Auto,
    /// Let the transport land pages in the memory, then UFFDIO_CONTINUE.
    Land,
    /// Receive into a buffer, then UFFDIO_COPY.
    Copy,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(crate) enum PrepagerArg {
    /// Streams, growing and shrinking windows, strides.
    Adaptive,
    /// One pivot, a fixed bubble of --bubble pages each way (Hines et al.).
    Paper,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(crate) enum BulkWait {
    /// Busy-poll the completion queue.
    Poll,
    /// Sleep on a completion channel.
    Event,
}

#[derive(Debug, Args)]
pub(crate) struct DemoArgs {
    /// Guest memory size.
    #[arg(long, default_value = "256MiB", value_parser = parse_size)]
    pub(crate) size: u64,
    /// Seed of the synthetic guest's contents.
    #[arg(long, default_value_t = 1)]
    pub(crate) seed: u64,
    /// Keep the guest running at the source in this write pattern until
    /// the switch-over (see `source --guest-workload`).
    #[arg(long, value_enum)]
    pub(crate) guest_workload: Option<Pattern>,
    #[command(flatten)]
    pub(crate) path: TransportArgs,
    #[command(flatten)]
    pub(crate) workload: WorkloadArgs,
    #[command(flatten)]
    pub(crate) precopy: PrecopyArgs,
    #[command(flatten)]
    pub(crate) engine: EngineArgs,
}

/// Parses sizes like `4096`, `64KiB`, `256MiB`, `1GiB` (K/M/G are binary
/// too; KB/MB/GB are decimal).
pub(crate) fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num.parse().map_err(|_| format!("bad size {s:?}"))?;
    let mul: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kib" => 1 << 10,
        "m" | "mib" => 1 << 20,
        "g" | "gib" => 1 << 30,
        "kb" => 1_000,
        "mb" => 1_000_000,
        "gb" => 1_000_000_000,
        u => return Err(format!("unknown size unit {u:?} (use KiB, MiB, GiB)")),
    };
    n.checked_mul(mul)
        .ok_or_else(|| format!("size {s:?} is too large"))
}

/// A list of CPU numbers as given on the command line (`0,2-3`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct CpuList(pub(crate) Vec<usize>);

impl CpuList {
    /// The CPUs of `list` (none if absent), refused with the flag's name
    /// if the process may not run on one of them.
    fn checked(list: &Option<CpuList>, flag: &'static str) -> Result<Vec<usize>> {
        let cpus = list.as_ref().map(|l| l.0.clone()).unwrap_or_default();
        pagewire_engine::placement::check(flag, &cpus)?;
        Ok(cpus)
    }
}

/// Parses a CPU list like `taskset -c` takes: numbers and ranges joined by
/// commas (`1`, `0,2-3`).
pub(crate) fn parse_cpus(s: &str) -> Result<CpuList, String> {
    pagewire_engine::placement::parse_cpu_list(s).map(CpuList)
}

/// Parses a bytes-per-second rate like `parse_size`; zero would stop the
/// push for good and is refused.
pub(crate) fn parse_rate(s: &str) -> Result<u64, String> {
    match parse_size(s)? {
        0 => Err(
            "a push rate of 0 would never finish the migration; omit --push-rate for no cap".into(),
        ),
        n => Ok(n),
    }
}

impl EngineArgs {
    pub(crate) fn config(&self) -> Result<MigrationConfig> {
        let lanes = match self.lanes {
            Some(0) => bail!("--lanes must be at least 1"),
            Some(n) => n,
            None => MigrationConfig::default().lanes,
        };
        Ok(MigrationConfig {
            lanes,
            bubble: if self.no_bubble { 0 } else { self.bubble },
            prepager: match self.prepager {
                PrepagerArg::Adaptive => PrepagerKind::Adaptive,
                PrepagerArg::Paper => PrepagerKind::Paper,
            },
            sweep_from_fault: self.sweep_from_fault,
            heat_sweep: !self.linear_sweep,
            batch_pages: self.batch,
            push: !self.no_push,
            pin_lanes: !self.no_pin,
            lane_cpus: CpuList::checked(&self.lane_cpus, "--lane-cpus")?,
            fault_cpus: CpuList::checked(&self.fault_cpus, "--fault-cpus")?,
            lane_nice: self.lane_nice,
            fault_spin: std::time::Duration::from_micros(self.fault_spin_us),
            reply_spin: std::time::Duration::from_micros(self.reply_spin_us),
            flow_control: !self.no_flow_control,
            push_rate: self.push_rate,
            recover_timeout: self.recover_timeout()?,
            shared_install: match self.shared_install {
                SharedInstallArg::Auto => SharedInstall::Auto,
                SharedInstallArg::Land => SharedInstall::Land,
                SharedInstallArg::Copy => SharedInstall::Copy,
            },
        })
    }

    pub(crate) fn options(&self, w: &WorkloadArgs, p: &PrecopyArgs) -> Result<RunOptions> {
        Ok(RunOptions {
            precopy: p.config(),
            config: self.config()?,
            workload: w.workload()?,
            progress: self.progress(),
            memory: match self.memory_backend {
                MemoryBackend::Anon => Backing::Anon,
                MemoryBackend::Memfd => Backing::Memfd,
                MemoryBackend::Hugetlb => Backing::Hugetlb,
            },
        })
    }

    pub(crate) fn progress(&self) -> bool {
        !self.json && std::io::stderr().is_terminal()
    }

    pub(crate) fn recover_timeout(&self) -> Result<Duration> {
        if !(self.recover_timeout >= 0.0 && self.recover_timeout < 86_400.0) {
            bail!("--recover-timeout must be between 0 and 86400 seconds");
        }
        Ok(Duration::from_secs_f64(self.recover_timeout))
    }

    pub(crate) fn tcp_options(&self) -> Result<TcpOptions> {
        if !(self.io_timeout > 0.0 && self.io_timeout < 86_400.0) {
            bail!("--io-timeout must be between 0 and 86400 seconds");
        }
        Ok(TcpOptions {
            io_timeout: Duration::from_secs_f64(self.io_timeout),
            auth_key: self
                .auth_key_file
                .as_deref()
                .map(AuthKey::from_file)
                .transpose()?,
            recover_timeout: self.recover_timeout()?,
            ..TcpOptions::default()
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("256MiB"), Ok(256 << 20));
        assert_eq!(parse_size("1G"), Ok(1 << 30));
        assert!(parse_size("12XB").is_err());
        assert!(parse_size("MiB").is_err());
        assert!(parse_size("99999999999999GiB").is_err());
        assert_eq!(parse_rate("50MB"), Ok(50_000_000));
        assert!(parse_rate("0").is_err());
    }

    #[test]
    fn cli_is_well_formed() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }
}
