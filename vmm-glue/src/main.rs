//! `pagewire`: serve guest memory as a source, pull it post-copy as a
//! destination, or run both as a demo.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::UnixListener;
use std::process::{Child, Command, ExitCode, Stdio};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::{Parser, ValueEnum};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use pagewire_minivm::GuestConfig;
use pagewire_transport::inproc::InProcTransport;
use pagewire_transport::rdma::{CompletionWait, RdmaExport};
use pagewire_transport::tcp::PageServer;
use pagewire_transport::{AuthKey, SourceMemory, Transport};
use pagewire_vmm_glue::embed::{connect, RdmaOptions, TransportChoice};
use pagewire_vmm_glue::firecracker::{FcHandler, FcOutcome};
use pagewire_vmm_glue::run::{run_destination, RunReport};
use pagewire_vmm_glue::trace;
use pagewire_vmm_glue::vm_demo::{run_vm_demo, VmDemoOptions};
use pagewire_vmm_glue::workload::{Pattern, Workload};
use pagewire_vmm_glue::{image, source_guest};

use cli::{
    BulkWait, Cli, Cmd, DemoArgs, DestArgs, FcHandlerArgs, GuestArgs, RecordTraceArgs, ResultsArgs,
    SourceArgs, TransportArgs, TransportKind, VmDemoArgs,
};

mod cli;
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
        cpus: Vec::new(),
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
