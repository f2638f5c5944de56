//! `pagewire`: serve guest memory as a source, pull it post-copy as a
//! destination, or run both as a demo.

use std::io::{BufRead, BufReader, IsTerminal, Write};
use std::net::SocketAddr;
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::UnixListener;
use std::path::PathBuf;
use std::process::{Child, Command, ExitCode, Stdio};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand, ValueEnum};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use pagewire_engine::{MigrationConfig, PrecopyConfig, PrepagerKind, SwitchOver};
use pagewire_minivm::GuestConfig;
use pagewire_transport::inproc::InProcTransport;
use pagewire_transport::rdma::{CompletionWait, Device, RdmaExport};
use pagewire_transport::tcp::{PageServer, TcpOptions};
use pagewire_transport::{AuthKey, SourceMemory, Transport};
use pagewire_vmm_glue::embed::{connect, RdmaOptions, TransportChoice};
use pagewire_vmm_glue::firecracker::{FcHandler, FcOutcome};
use pagewire_vmm_glue::run::{run_destination, RunOptions, RunReport};
use pagewire_vmm_glue::trace::{self, Trace};
use pagewire_vmm_glue::vm_demo::{run_vm_demo, VmDemoOptions};
use pagewire_vmm_glue::workload::{Pattern, Workload};
use pagewire_vmm_glue::{image, source_guest};

/// pagewire moves a VM's memory after the VM resumed at the destination
/// (post-copy): faults are fetched at once, the rest is pushed in the
/// background, and every page is verified against the source.
#[derive(Debug, Parser)]
#[command(name = "pagewire", version, propagate_version = true)]
struct Cli {
    /// Log more (-v info, -vv debug). RUST_LOG overrides.
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    verbose: u8,
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
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
struct RecordTraceArgs {
    /// Trace file to write.
    #[arg(long)]
    out: PathBuf,
    /// Sampling interval of /proc/PID/pagemap in microseconds: pages first
    /// touched within one interval are listed by address.
    #[arg(long, default_value_t = 500)]
    interval_us: u64,
    /// The program and its arguments (after `--`).
    #[arg(required = true, last = true)]
    command: Vec<String>,
}

#[derive(Debug, Args)]
struct ResultsArgs {
    /// Directory for results.md and plots/ (created if missing).
    #[arg(long, default_value = "docs")]
    out: PathBuf,
    /// Report files, one labelled report per line.
    #[arg(required = true)]
    files: Vec<PathBuf>,
}

#[derive(Debug, Args)]
struct VmDemoArgs {
    /// Guest memory (at least 2 MiB + 1 MiB per vCPU, at most 4 GiB).
    #[arg(long, default_value = "256MiB", value_parser = parse_size)]
    memory: u64,
    /// vCPUs; each fills and checksums its own share of guest memory.
    #[arg(long, default_value_t = 2)]
    vcpus: usize,
    /// Checksum passes each vCPU runs over its share after filling it.
    #[arg(long, default_value_t = 4)]
    passes: u32,
    /// Pause the guest at the source once every vCPU finished this many
    /// passes (must be fewer than --passes).
    #[arg(long, default_value_t = 1)]
    pause_after: u32,
    /// Pin vCPU i to core CORES[i % n] (comma-separated; default: not
    /// pinned).
    #[arg(long, value_delimiter = ',')]
    vcpu_cores: Vec<usize>,
    #[command(flatten)]
    path: TransportArgs,
    #[command(flatten)]
    engine: EngineArgs,
}

#[derive(Debug, Args)]
struct FcHandlerArgs {
    /// Unix socket to listen on: Firecracker's
    /// `mem_backend.backend_path`. A stale socket there is replaced; any
    /// other file is left alone and refused.
    #[arg(long)]
    socket: PathBuf,
    /// Address of the pagewire source serving the snapshot memory file
    /// (`pagewire source --memory SNAPSHOT_MEM`): the offsets Firecracker
    /// sends are offsets in that file.
    #[arg(long)]
    source: String,
    #[command(flatten)]
    path: TransportArgs,
    #[command(flatten)]
    engine: EngineArgs,
}

#[derive(Debug, Args)]
struct SourceArgs {
    /// Address to listen on. The protocol has no authentication: keep it
    /// on loopback or a private migration network.
    #[arg(long, default_value = "127.0.0.1:7070")]
    listen: SocketAddr,
    /// Raw guest memory image to serve (guest address 0 = offset 0). It must
    /// not change while served.
    #[arg(
        long,
        conflicts_with = "synthetic",
        required_unless_present = "synthetic"
    )]
    memory: Option<PathBuf>,
    /// Serve a generated guest of this size instead (e.g. 256MiB, 1GiB).
    #[arg(long, value_parser = parse_size)]
    synthetic: Option<u64>,
    /// Seed of the synthetic guest's contents.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Share of the synthetic guest's pages that are all zero, in percent.
    #[arg(long, default_value_t = image::DEFAULT_ZERO_PERCENT, value_parser = clap::value_parser!(u8).range(0..=100))]
    zero_percent: u8,
    #[command(flatten)]
    rdma: RdmaArgs,
    /// Serve TCP only, even where an RDMA device exists.
    #[arg(long)]
    no_rdma: bool,
    /// Shared secret (at least 16 bytes): every destination must prove it
    /// holds it, and the source proves it too, before anything about guest
    /// memory is sent. Without it, anyone who reaches the port reads guest
    /// memory.
    #[arg(long)]
    auth_key_file: Option<PathBuf>,
    /// Exit (status 0) once a destination says it has every page: the
    /// memory is no longer needed.
    #[arg(long)]
    once: bool,
    /// Most connections served at once (a migration uses one per lane
    /// plus two); more are refused as busy.
    #[arg(long, default_value_t = pagewire_transport::tcp::DEFAULT_MAX_CONNECTIONS)]
    max_connections: usize,
    #[command(flatten)]
    guest: GuestArgs,
}

#[derive(Debug, Args, Clone)]
struct GuestArgs {
    /// Keep the synthetic guest running at the source, writing its memory
    /// in this pattern (one word per touched page), until a destination
    /// switches over: for pre-copy and hybrid migrations (`dest
    /// --precopy-rounds`). Its writes are tracked with userfaultfd
    /// write-protection. Needs --synthetic.
    #[arg(long, value_enum, requires = "synthetic")]
    guest_workload: Option<Pattern>,
    /// Busy time between the running guest's writes, in microseconds.
    #[arg(long, default_value_t = 2)]
    guest_think_us: u64,
    /// Seed of the running guest's write pattern.
    #[arg(long, default_value_t = 7)]
    guest_seed: u64,
}

#[derive(Debug, Args, Clone)]
struct PrecopyArgs {
    /// Pre-copy rounds before the switch-over, while the guest still runs
    /// at the source (`source --guest-workload`): round 1 copies every
    /// page, each later round the pages written during the round before.
    /// Then the source pauses its guest and the destination resumes with
    /// post-copy for what is still dirty or never copied (hybrid). 0:
    /// switch over at once (pure post-copy from a running guest). Default:
    /// no pre-copy, the source's memory is static.
    #[arg(long)]
    precopy_rounds: Option<u32>,
    /// The pre-copy baseline: after the rounds, copy the last dirty pages
    /// while the guest is paused and resume with every page present (no
    /// post-copy). Needs --precopy-rounds.
    #[arg(long, requires = "precopy_rounds")]
    stop_and_copy: bool,
    /// Switch over before --precopy-rounds once a round leaves at most
    /// this many dirty pages (pre-copy converged).
    #[arg(long, default_value_t = 256, requires = "precopy_rounds")]
    converge_pages: u64,
}

impl PrecopyArgs {
    fn config(&self) -> Option<PrecopyConfig> {
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
struct RdmaArgs {
    /// RDMA device to use (default: the first with an ACTIVE port).
    #[arg(long)]
    rdma_device: Option<String>,
    /// GID index (default: the first IPv4-mapped GID, else the first one).
    #[arg(long)]
    gid_index: Option<u8>,
}

impl RdmaArgs {
    fn open(&self) -> Result<Arc<Device>, pagewire_transport::TransportError> {
        Device::open(self.rdma_device.as_deref(), self.gid_index)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum TransportKind {
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
struct WorkloadArgs {
    /// Touch pattern of the workload that stands in for the resumed VM.
    #[arg(long, value_enum, default_value = "hotset")]
    workload: Pattern,
    /// Number of touches (default: one per page).
    #[arg(long)]
    touches: Option<u64>,
    /// Seed of the random workloads.
    #[arg(long, default_value_t = 42)]
    workload_seed: u64,
    /// Distance between touches of the stride workload, in pages.
    #[arg(long, default_value_t = 16)]
    stride: u64,
    /// Busy time between touches in microseconds (models compute).
    #[arg(long, default_value_t = 0)]
    think_us: u64,
    /// Trace file the `trace` workload replays (`pagewire record-trace`
    /// writes them; traces/ has some).
    #[arg(long)]
    trace: Option<PathBuf>,
}

impl WorkloadArgs {
    fn workload(&self) -> Result<Workload> {
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
        })
    }
}

#[derive(Debug, Args, Clone)]
struct EngineArgs {
    /// Pusher lanes, each with its own bulk connection (default: one per core).
    #[arg(long)]
    lanes: Option<usize>,
    /// What backs the destination's guest memory: `anon`, private
    /// anonymous memory filled with UFFDIO_COPY (what most VMMs use), or
    /// `memfd`, shared memory whose pages are received (or RDMA-read)
    /// straight into a second mapping of the memfd and mapped with
    /// UFFDIO_CONTINUE: nothing is copied on the destination's CPU.
    #[arg(long, value_enum, default_value = "anon")]
    memory_backend: MemoryBackend,
    /// Bubble radius: pages prepaged each way around the last fault.
    #[arg(long, default_value_t = 64)]
    bubble: u64,
    /// Turn bubbling (adaptive prepaging) off.
    #[arg(long)]
    no_bubble: bool,
    /// Prepager: pagewire's adaptive one (streams per vCPU, windows that
    /// grow where the guest runs through them and shrink where bubbles go
    /// untouched, strides), or the paper's fixed bubbles (for comparison).
    #[arg(long, value_enum, default_value = "adaptive")]
    prepager: PrepagerArg,
    /// Move the background sweep to each faulted page, as QEMU's post-copy
    /// restarts its background transfer at every page request (for
    /// comparison; combine with --no-bubble for QEMU's scheme).
    #[arg(long)]
    sweep_from_fault: bool,
    /// Sweep memory in address order, as the paper does, instead of
    /// pushing first the 512 KiB blocks the guest faults in most (for
    /// comparison).
    #[arg(long)]
    linear_sweep: bool,
    /// Hold the background sweep until the workload ends (demand paging
    /// plus bubbles only while the workload runs).
    #[arg(long)]
    no_push: bool,
    /// Most pages a lane fetches in one request (clamped to what the
    /// transport accepts in one request: 4096 over TCP, 256 over RDMA).
    /// With flow control, requests are sized to the link and usually
    /// smaller.
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u32).range(1..=4096))]
    batch: u32,
    /// Turn off bulk flow control: lanes then keep their channels full,
    /// and faults queue behind the push wherever the link is the
    /// bottleneck. For comparison only.
    #[arg(long)]
    no_flow_control: bool,
    /// Cap the push (sweep and bubbles) at this many bytes per second, e.g.
    /// 50MB or 100MiB (default: unlimited). Faults are never capped.
    #[arg(long, value_parser = parse_rate)]
    push_rate: Option<u64>,
    /// Do not pin lanes to cores.
    #[arg(long)]
    no_pin: bool,
    /// Nice value of the lane threads (-20..19; 0 leaves it as inherited):
    /// by default 10, so that vCPUs and the fault service win the CPU over
    /// the push when they compete for it.
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(i32).range(-20..=19))]
    lane_nice: i32,
    /// Microseconds the fault service keeps polling for the next fault
    /// after each one before it sleeps (0: sleep at once): the next fault
    /// of a burst is then read without a wake-up, at the cost of a core
    /// while it spins.
    #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u64).range(0..=1_000_000))]
    fault_spin_us: u64,
    /// Seconds any network read or write may block before the migration
    /// fails (a hung source must not hang the VM forever).
    #[arg(long, default_value_t = 10.0)]
    io_timeout: f64,
    /// Print the report as JSON on stdout (no progress bar).
    #[arg(long)]
    json: bool,
    /// Seconds a lost link may take to come back: broken connections are
    /// reopened with backoff and what was outstanding is asked for again,
    /// while faulting threads stay blocked. A source that refuses
    /// connections (gone) fails the migration at once. 0: fail at the
    /// first loss.
    #[arg(long, default_value_t = 120.0)]
    recover_timeout: f64,
    /// Shared secret the source was given (--auth-key-file there): the
    /// source must prove it holds it, and so do we. A source that does not
    /// authenticate is then refused.
    #[arg(long)]
    auth_key_file: Option<PathBuf>,
}

#[derive(Debug, Args)]
struct DestArgs {
    /// Address of the pagewire source.
    #[arg(long)]
    connect: String,
    #[command(flatten)]
    path: TransportArgs,
    #[command(flatten)]
    workload: WorkloadArgs,
    #[command(flatten)]
    precopy: PrecopyArgs,
    #[command(flatten)]
    engine: EngineArgs,
}

#[derive(Debug, Args)]
struct TransportArgs {
    /// Transport to fetch pages with (inproc: the single-process floor,
    /// demo only).
    #[arg(long, value_enum, default_value = "auto")]
    transport: TransportKind,
    #[command(flatten)]
    rdma: RdmaArgs,
    /// How RDMA pusher lanes wait for READ completions (faults always
    /// busy-poll).
    #[arg(long, value_enum, default_value = "poll")]
    rdma_bulk_wait: BulkWait,
    /// When RDMA stops working mid-migration (the device or its address
    /// goes away, links keep failing while TCP works), fail instead of
    /// going on over TCP.
    #[arg(long)]
    rdma_no_fallback: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum MemoryBackend {
    /// Private anonymous memory, pages installed with UFFDIO_COPY.
    Anon,
    /// A memfd, pages landed in a second mapping and mapped with
    /// UFFDIO_CONTINUE (zero-copy).
    Memfd,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum PrepagerArg {
    /// Streams, growing and shrinking windows, strides.
    Adaptive,
    /// One pivot, a fixed bubble of --bubble pages each way (Hines et al.).
    Paper,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum BulkWait {
    /// Busy-poll the completion queue.
    Poll,
    /// Sleep on a completion channel.
    Event,
}

#[derive(Debug, Args)]
struct DemoArgs {
    /// Guest memory size.
    #[arg(long, default_value = "256MiB", value_parser = parse_size)]
    size: u64,
    /// Seed of the synthetic guest's contents.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Keep the guest running at the source in this write pattern until
    /// the switch-over (see `source --guest-workload`).
    #[arg(long, value_enum)]
    guest_workload: Option<Pattern>,
    #[command(flatten)]
    path: TransportArgs,
    #[command(flatten)]
    workload: WorkloadArgs,
    #[command(flatten)]
    precopy: PrecopyArgs,
    #[command(flatten)]
    engine: EngineArgs,
}

/// Parses sizes like `4096`, `64KiB`, `256MiB`, `1GiB` (K/M/G are binary
/// too; KB/MB/GB are decimal).
fn parse_size(s: &str) -> Result<u64, String> {
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

/// Parses a bytes-per-second rate like `parse_size`; zero would stop the
/// push for good and is refused.
fn parse_rate(s: &str) -> Result<u64, String> {
    match parse_size(s)? {
        0 => Err(
            "a push rate of 0 would never finish the migration; omit --push-rate for no cap".into(),
        ),
        n => Ok(n),
    }
}

impl EngineArgs {
    fn config(&self) -> Result<MigrationConfig> {
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
            lane_nice: self.lane_nice,
            fault_spin: std::time::Duration::from_micros(self.fault_spin_us),
            flow_control: !self.no_flow_control,
            push_rate: self.push_rate,
            recover_timeout: self.recover_timeout()?,
        })
    }

    fn options(&self, w: &WorkloadArgs, p: &PrecopyArgs) -> Result<RunOptions> {
        Ok(RunOptions {
            precopy: p.config(),
            config: self.config()?,
            workload: w.workload()?,
            progress: self.progress(),
            shared_memory: self.memory_backend == MemoryBackend::Memfd,
        })
    }

    fn progress(&self) -> bool {
        !self.json && std::io::stderr().is_terminal()
    }

    fn recover_timeout(&self) -> Result<Duration> {
        if !(self.recover_timeout >= 0.0 && self.recover_timeout < 86_400.0) {
            bail!("--recover-timeout must be between 0 and 86400 seconds");
        }
        Ok(Duration::from_secs_f64(self.recover_timeout))
    }

    fn tcp_options(&self) -> Result<TcpOptions> {
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

fn print_report(report: &RunReport, json: bool) -> Result<ExitCode> {
    if json {
        println!("{}", serde_json::to_string_pretty(report)?);
    } else {
        println!("{}", report.summary());
    }
    Ok(if report.is_clean() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(2)
    })
}

fn cmd_source(a: SourceArgs) -> Result<ExitCode> {
    let mem = match (&a.memory, a.synthetic) {
        (Some(path), _) => image::from_file(path)?,
        (None, Some(size)) if a.guest.guest_workload.is_some() => {
            start_source_guest(size, a.seed, a.zero_percent, &a.guest)?
        }
        (None, Some(size)) => image::synthetic(size, a.seed, a.zero_percent)?,
        (None, None) => bail!("give --memory FILE or --synthetic SIZE"),
    };
    let info = mem.info();
    let (pages, zeros) = (info.layout.total_pages(), info.zero.count());
    let mem = Arc::new(mem);
    let mut server = PageServer::bind(a.listen, mem.clone())
        .with_context(|| format!("cannot listen on {}", a.listen))?
        .with_max_connections(a.max_connections);
    if a.once {
        server = server.on_done(Arc::new(|| {
            eprintln!("source: the destination has every page; exiting (--once)");
            std::process::exit(0);
        }));
    }
    match &a.auth_key_file {
        Some(path) => server = server.with_auth(AuthKey::from_file(path)?),
        None if !a.listen.ip().is_loopback() => eprintln!(
            "WARNING: serving guest memory on {} WITHOUT authentication: anyone who reaches this \
             port can read the guest's memory. Give --auth-key-file (the same file at the destination).",
            a.listen
        ),
        None => {}
    }
    if !a.no_rdma {
        match a.rdma.open().and_then(|d| RdmaExport::new(d, mem.clone())) {
            Ok(export) => {
                tracing::info!(
                    device = export.device().name(),
                    gid_index = export.device().gid_index(),
                    "serving RDMA READs"
                );
                server = server.with_rdma(Arc::new(export));
            }
            Err(e) => tracing::info!("serving TCP only: {e}"),
        }
    }
    let addr = server.local_addr()?;
    // The first stdout line is for scripts (and `pagewire demo`).
    println!("listening on {addr}");
    std::io::stdout().flush()?;
    tracing::info!(%addr, pages, zero_pages = zeros, "pagewire source serving");
    server.serve()?;
    Ok(ExitCode::SUCCESS)
}

/// The synthetic guest, left running at the source (pre-copy); it stops
/// at the switch-over.
fn start_source_guest(
    size: u64,
    seed: u64,
    zero_percent: u8,
    g: &GuestArgs,
) -> Result<SourceMemory> {
    let pattern = g.guest_workload.context("no guest workload")?;
    if pattern == Pattern::Trace {
        bail!("--guest-workload trace is not supported: pick a synthetic pattern");
    }
    let workload = Workload {
        pattern,
        touches: None,
        seed: g.guest_seed,
        stride: 16,
        think_us: g.guest_think_us,
        trace: None,
    };
    let (mem, guest) = source_guest::start_synthetic(size, seed, zero_percent, workload)
        .context("cannot start the guest at the source")?;
    tracing::info!(
        ?guest,
        "guest running at the source until a destination switches over"
    );
    Ok(mem)
}

fn cmd_dest(a: DestArgs) -> Result<ExitCode> {
    let opts = a.engine.options(&a.workload, &a.precopy)?;
    let choice = a.path.choice()?;
    let transport = connect(&a.connect, choice, a.engine.tcp_options()?)
        .with_context(|| format!("cannot start migration from {}", a.connect))?;
    let report = run_destination(transport, &opts).context("migration failed")?;
    print_report(&report, a.engine.json)
}

impl TransportArgs {
    /// The library's transport choice; inproc is not one.
    fn choice(&self) -> Result<TransportChoice> {
        let rdma = RdmaOptions {
            device: self.rdma.rdma_device.clone(),
            gid_index: self.rdma.gid_index,
            bulk_wait: match self.rdma_bulk_wait {
                BulkWait::Poll => CompletionWait::Poll,
                BulkWait::Event => CompletionWait::Event,
            },
            no_tcp_fallback: self.rdma_no_fallback,
        };
        Ok(match self.transport {
            TransportKind::Tcp => TransportChoice::Tcp,
            TransportKind::Auto => TransportChoice::Auto(rdma),
            TransportKind::Rdma => TransportChoice::Rdma(rdma),
            TransportKind::Inproc => bail!(
                "--transport inproc needs the source in this process: use `pagewire demo --transport inproc`"
            ),
        })
    }
}

/// A source child process, killed when dropped.
struct SourceChild(Child);

impl Drop for SourceChild {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn spawn_source(
    size: u64,
    seed: u64,
    key: Option<&std::path::Path>,
    guest: Option<Pattern>,
) -> Result<(SourceChild, String)> {
    let exe = std::env::current_exe().context("cannot find the pagewire binary")?;
    let mut cmd = Command::new(exe);
    cmd.args(["source", "--listen", "127.0.0.1:0", "--synthetic"])
        .arg(size.to_string())
        .args(["--seed", &seed.to_string()]);
    if let Some(p) = guest {
        let name = p.to_possible_value().context("pattern name")?;
        cmd.args(["--guest-workload", name.get_name()]);
    }
    if let Some(k) = key {
        cmd.arg("--auth-key-file").arg(k);
    }
    let mut child = SourceChild(
        cmd.stdout(Stdio::piped())
            .spawn()
            .context("cannot start the source process")?,
    );
    let stdout = child.0.stdout.take().context("no stdout from the source")?;
    let mut line = String::new();
    BufReader::new(stdout)
        .read_line(&mut line)
        .context("reading the source's address")?;
    let addr = line
        .trim()
        .strip_prefix("listening on ")
        .with_context(|| format!("source did not start: {line:?}"))?
        .to_string();
    Ok((child, addr))
}

fn cmd_demo(a: DemoArgs) -> Result<ExitCode> {
    let opts = a.engine.options(&a.workload, &a.precopy)?;
    let (transport, _child): (Arc<dyn Transport>, Option<SourceChild>) = match a.path.transport {
        TransportKind::Tcp | TransportKind::Rdma | TransportKind::Auto => {
            let (child, addr) = spawn_source(
                a.size,
                a.seed,
                a.engine.auth_key_file.as_deref(),
                a.guest_workload,
            )?;
            eprintln!(
                "demo: source process {} serving {} MiB on {addr}",
                child.0.id(),
                a.size >> 20
            );
            let t = connect(&addr, a.path.choice()?, a.engine.tcp_options()?)
                .with_context(|| format!("cannot connect to the demo source at {addr}"))?;
            (t, Some(child))
        }
        TransportKind::Inproc => {
            let mem: SourceMemory = match a.guest_workload {
                Some(pattern) => {
                    let guest = GuestArgs {
                        guest_workload: Some(pattern),
                        guest_think_us: 2,
                        guest_seed: 7,
                    };
                    start_source_guest(a.size, a.seed, image::DEFAULT_ZERO_PERCENT, &guest)?
                }
                None => image::synthetic(a.size, a.seed, image::DEFAULT_ZERO_PERCENT)?,
            };
            (Arc::new(InProcTransport::new(Arc::new(mem))), None)
        }
    };
    let report = run_destination(transport, &opts).context("migration failed")?;
    print_report(&report, a.engine.json)
}

fn cmd_record_trace(a: RecordTraceArgs) -> Result<ExitCode> {
    let mut cmd = Command::new(&a.command[0]);
    cmd.args(&a.command[1..]);
    let t = trace::record(cmd, Duration::from_micros(a.interval_us.max(50)))?;
    t.save(&a.out)?;
    eprintln!(
        "record-trace: {} pages first touched, in a span of {} pages ({} MiB), written to {}",
        t.pages.len(),
        t.span,
        t.span >> 8,
        a.out.display()
    );
    Ok(ExitCode::SUCCESS)
}

fn cmd_fc_handler(a: FcHandlerArgs) -> Result<ExitCode> {
    if a.engine.no_push {
        bail!("--no-push would leave untouched pages unfetched forever: fc-handler always pushes");
    }
    match std::fs::symlink_metadata(&a.socket) {
        Ok(md) if md.file_type().is_socket() => std::fs::remove_file(&a.socket)
            .with_context(|| format!("cannot replace the stale socket {}", a.socket.display()))?,
        Ok(_) => bail!("{} exists and is not a socket", a.socket.display()),
        Err(_) => {}
    }
    let listener = UnixListener::bind(&a.socket)
        .with_context(|| format!("cannot listen on {}", a.socket.display()))?;
    eprintln!(
        "fc-handler: waiting for Firecracker on {}",
        a.socket.display()
    );
    let handler = FcHandler {
        source: a.source.clone(),
        transport: a.path.choice()?,
        config: a.engine.config()?,
        tcp: a.engine.tcp_options()?,
    };
    let bar = if a.engine.progress() {
        ProgressBar::with_draw_target(None, ProgressDrawTarget::stderr())
    } else {
        ProgressBar::hidden()
    };
    bar.set_style(
        ProgressStyle::with_template(
            "{spinner} migrating [{bar:40}] {pos}/{len} pages ({elapsed}) {msg}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> "),
    );
    let outcome = handler.serve(&listener, |m| {
        bar.set_length(m.pages_total);
        bar.set_position(m.pages_present);
        bar.set_message(format!(
            "{} faults, p99 {:.0} us",
            m.faults, m.fault_latency_us.p99
        ));
    });
    bar.finish_and_clear();
    let _ = std::fs::remove_file(&a.socket);
    match outcome.context("cannot serve the VM")? {
        FcOutcome::Complete(report) => {
            if a.engine.json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                println!("{}", pagewire_vmm_glue::firecracker::summary(&report));
            }
            Ok(if report.duplicate_pages == 0 {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(2)
            })
        }
        FcOutcome::VmGone { present, total } => {
            eprintln!("error: Firecracker closed its socket after {present} of {total} pages: the VM is gone");
            Ok(ExitCode::from(3))
        }
        FcOutcome::Failed { error, vmm } => {
            eprintln!(
                "error: migration failed: {error}\n\
                 guest memory stays registered, so the VM's vCPUs stay blocked instead of reading zeros;\n\
                 stop the VM (Firecracker) to end this handler"
            );
            FcHandler::hold_until_vm_gone(vmm);
            Ok(ExitCode::FAILURE)
        }
    }
}

fn cmd_vm_demo(a: VmDemoArgs) -> Result<ExitCode> {
    let opts = VmDemoOptions {
        guest: GuestConfig {
            memory: a.memory,
            vcpus: a.vcpus,
            passes: a.passes,
        },
        pause_after: a.pause_after,
        config: a.engine.config()?,
        transport: a.path.choice()?,
        tcp: a.engine.tcp_options()?,
        vcpu_cores: a.vcpu_cores.clone(),
    };
    if !a.engine.json {
        eprintln!(
            "vm-demo: {} vCPUs, {} MiB: local run, source run and pause, post-copy migration, local resume",
            a.vcpus,
            a.memory >> 20
        );
    }
    let report = run_vm_demo(&opts).context("vm-demo failed")?;
    if a.engine.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        println!("{}", report.summary());
    }
    Ok(
        if report.results_match && report.engine.duplicate_pages == 0 {
            ExitCode::SUCCESS
        } else {
            ExitCode::from(2)
        },
    )
}

fn cmd_results(a: ResultsArgs) -> Result<ExitCode> {
    let runs = pagewire_vmm_glue::results::load(&a.files)?;
    let command = std::env::var("PAGEWIRE_RESULTS_COMMAND")
        .unwrap_or_else(|_| "pagewire results".to_string());
    let path = pagewire_vmm_glue::results::render(&runs, &a.out, &command)?;
    eprintln!("results: {} migrations -> {}", runs.len(), path.display());
    Ok(ExitCode::SUCCESS)
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let level = match cli.verbose {
        0 => "warn",
        1 => "info",
        _ => "debug",
    };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(level)),
        )
        .with_writer(std::io::stderr)
        .init();
    let result = match cli.command {
        Cmd::Source(a) => cmd_source(a),
        Cmd::Dest(a) => cmd_dest(a),
        Cmd::Demo(a) => cmd_demo(a),
        Cmd::FcHandler(a) => cmd_fc_handler(a),
        Cmd::RecordTrace(a) => cmd_record_trace(a),
        Cmd::VmDemo(a) => cmd_vm_demo(a),
        Cmd::Results(a) => cmd_results(a),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            // Exit at once: a vCPU thread blocked on a page that will never
            // arrive must not keep the process alive.
            std::process::exit(1);
        }
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
