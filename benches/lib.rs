//! Shared set-up for the pagewire benchmarks: sources, transports, and the
//! raw floors the engine is compared with.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::thread;
use std::time::{Duration, Instant};

use pagewire_engine::uffd::{EventBuffer, PageInstaller, UffdEvent};
use pagewire_engine::{DestMemory, Migration, MigrationConfig, MigrationHandle, SharedInstall};
use pagewire_transport::inproc::InProcTransport;
use pagewire_transport::tcp::{PageServer, ServerHandle, TcpOptions, TcpTransport};
use pagewire_transport::{MemoryLayout, PageRange, SourceMemory, Transport, PAGE_SIZE};
use pagewire_vmm_glue::workload::{Workload, WorkloadStats};

pub mod netlab;

/// A synthetic source with no zero pages, so every page crosses the wire.
pub fn source(bytes: u64) -> Arc<SourceMemory> {
    Arc::new(pagewire_vmm_glue::image::synthetic(bytes, 1, 0).expect("synthetic source"))
}

/// A transport under test, with whatever keeps it alive.
pub struct Bench {
    /// The transport.
    pub transport: Arc<dyn Transport>,
    fresh: Box<dyn Fn() -> Arc<dyn Transport>>,
    _server: Option<ServerHandle>,
}

impl Bench {
    fn new(fresh: impl Fn() -> Arc<dyn Transport> + 'static, server: Option<ServerHandle>) -> Self {
        Self::with_first(fresh(), fresh, server)
    }

    fn with_first(
        transport: Arc<dyn Transport>,
        fresh: impl Fn() -> Arc<dyn Transport> + 'static,
        server: Option<ServerHandle>,
    ) -> Self {
        Self {
            transport,
            fresh: Box::new(fresh),
            _server: server,
        }
    }

    /// A new transport to the same source. A transport lands pages in one
    /// memory only, so every migration that lands pages takes a fresh one (the
    /// shared one would copy into every memory after the first).
    pub fn fresh(&self) -> Arc<dyn Transport> {
        (self.fresh)()
    }

    /// The transport for a migration into `memory`: the shared one, or a
    /// fresh one where pages land (a transport lands in one memory).
    fn for_memory(&self, memory: Memory) -> Arc<dyn Transport> {
        if memory == Memory::MemfdLanded {
            self.fresh()
        } else {
            self.transport.clone()
        }
    }
}

/// The guest memory a bench migrates into, and how pages reach it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Memory {
    /// Private anonymous memory: UFFDIO_COPY.
    Private,
    /// A memfd, pages copied in with UFFDIO_COPY.
    MemfdCopied,
    /// A memfd, pages landed by the transport, then UFFDIO_CONTINUE.
    MemfdLanded,
}

impl Memory {
    /// The engine's setting for this memory.
    fn shared_install(self) -> SharedInstall {
        match self {
            Self::MemfdLanded => SharedInstall::Land,
            Self::Private | Self::MemfdCopied => SharedInstall::Copy,
        }
    }

    /// The install path a migration into this memory must report.
    fn path(self) -> pagewire_engine::InstallPath {
        use pagewire_engine::InstallPath;
        match self {
            Self::Private => InstallPath::Copy,
            Self::MemfdCopied => InstallPath::SharedCopy,
            Self::MemfdLanded => InstallPath::Landed,
        }
    }
}

/// Builds `kind` ("inproc" or "tcp") over `src`; tcp runs a page server on
/// loopback in this process.
pub fn transport(kind: &str, src: Arc<SourceMemory>) -> Bench {
    match kind {
        "tcp" => {
            let server = PageServer::bind("127.0.0.1:0".parse().expect("addr"), src)
                .expect("bind")
                .spawn()
                .expect("spawn server");
            let addr = server.addr();
            Bench::new(
                move || {
                    Arc::new(TcpTransport::connect(addr, TcpOptions::default()).expect("connect"))
                },
                Some(server),
            )
        }
        _ => Bench::new(move || Arc::new(InProcTransport::new(src.clone())), None),
    }
}

/// An RDMA transport over `src` (page server with an RDMA export in this
/// process), or why there is none (no device, as on hosts without RDMA).
pub fn rdma_transport(src: Arc<SourceMemory>) -> Result<Bench, String> {
    use pagewire_transport::rdma::{Device, RdmaExport, RdmaTransport};
    let dev = Device::open(None, None).map_err(|e| e.to_string())?;
    let export = RdmaExport::new(dev.clone(), src.clone()).map_err(|e| e.to_string())?;
    let server = PageServer::bind("127.0.0.1:0".parse().expect("addr"), src)
        .expect("bind")
        .with_rdma(Arc::new(export))
        .spawn()
        .expect("spawn server");
    let addr = server.addr();
    // The first connection says why RDMA cannot be benched; the fresh ones
    // later reach a server that has answered already.
    let tcp = TcpTransport::connect(addr, TcpOptions::default()).map_err(|e| e.to_string())?;
    let first: Arc<dyn Transport> = Arc::new(RdmaTransport::new(tcp, dev.clone()));
    let connect = move || -> Arc<dyn Transport> {
        let tcp = TcpTransport::connect(addr, TcpOptions::default()).expect("connect");
        Arc::new(RdmaTransport::new(tcp, dev.clone()))
    };
    Ok(Bench::with_first(first, connect, Some(server)))
}

/// Demand-paging config: no sweep, no bubbles, so every touch is a fault.
pub fn demand_only() -> MigrationConfig {
    MigrationConfig {
        lanes: 1,
        bubble: 0,
        push: false,
        ..MigrationConfig::default()
    }
}

/// Starts a migration over `t` into fresh `memory` (where pages land, `t`
/// must not have landed pages in other memory).
pub fn start(t: &Arc<dyn Transport>, cfg: MigrationConfig, memory: Memory) -> MigrationHandle {
    if memory == Memory::Private {
        return Migration::start(t.clone(), cfg).expect("start");
    }
    let mem = DestMemory::new_shared(&t.info().layout).expect("memfd guest memory");
    let cfg = MigrationConfig {
        shared_install: memory.shared_install(),
        ..cfg
    };
    Migration::start_with_memory(t.clone(), Arc::new(mem), cfg).expect("start")
}

/// Touches `n` pages of fresh migrations (one page per fault) and returns
/// the time spent touching, as a vCPU sees it.
pub fn time_engine_faults(b: &Bench, n: u64) -> Duration {
    time_engine_faults_on(b, n, Memory::Private)
}

/// [`time_engine_faults`] into `memory`.
pub fn time_engine_faults_on(b: &Bench, n: u64, memory: Memory) -> Duration {
    let pages = b.transport.info().layout.total_pages();
    let mut left = n;
    let mut spent = Duration::ZERO;
    while left > 0 {
        let t = b.for_memory(memory);
        let h = start(&t, demand_only(), memory);
        let mem = h.memory().clone();
        let k = left.min(pages);
        let t0 = Instant::now();
        for p in 0..k {
            std::hint::black_box(mem.page(p).expect("page")[0]);
        }
        spent += t0.elapsed();
        left -= k;
        h.release_push();
        check_path(&h.wait().expect("migration"), memory);
    }
    spent
}

/// Panics unless a migration installed pages the way the bench claims to
/// measure for `memory`.
fn check_path(r: &pagewire_engine::EngineReport, memory: Memory) {
    assert_eq!(
        r.install_path,
        memory.path(),
        "the bench measured another install path"
    );
}

/// How a raw floor handler gets one page's bytes.
pub enum Floor {
    /// memcpy from a local buffer.
    Memcpy,
    /// A 4 KiB request/response round trip on a loopback TCP socket.
    TcpRtt,
    /// A 4 KiB request/response round trip to an [`rtt_server`] at this
    /// address (across a shaped link, say).
    TcpRttTo(SocketAddr),
}

/// A byte server listening on `bind`: for every 16-byte request, 4 KiB
/// back. Returns its address.
pub fn rtt_server(bind: SocketAddr) -> SocketAddr {
    let l = TcpListener::bind(bind).expect("bind");
    let addr = l.local_addr().expect("addr");
    thread::spawn(move || {
        for s in l.incoming() {
            let Ok(mut s) = s else { continue };
            let _ = s.set_nodelay(true);
            thread::spawn(move || {
                let page = vec![0x5au8; PAGE_SIZE];
                let mut req = [0u8; 16];
                while s.read_exact(&mut req).is_ok() {
                    if s.write_all(&page).is_err() {
                        break;
                    }
                }
            });
        }
    });
    addr
}

/// The floor: a bare userfaultfd handler that serves each fault with one
/// memcpy or one TCP round trip and one UFFDIO_COPY, no engine at all.
/// Returns the time spent touching `n` pages.
pub fn time_floor_faults(floor: &Floor, n: u64) -> Duration {
    const PAGES: u64 = 4096;
    let conn = match floor {
        Floor::TcpRtt | Floor::TcpRttTo(_) => {
            let addr = match floor {
                Floor::TcpRttTo(addr) => *addr,
                _ => {
                    static LOOPBACK: OnceLock<SocketAddr> = OnceLock::new();
                    *LOOPBACK.get_or_init(|| rtt_server(loopback()))
                }
            };
            let s = TcpStream::connect(addr).expect("connect");
            s.set_nodelay(true).expect("nodelay");
            Some(s)
        }
        Floor::Memcpy => None,
    };
    let layout = MemoryLayout::single(PAGES * PAGE_SIZE as u64).expect("layout");
    let mut left = n;
    let mut spent = Duration::ZERO;
    let mut conn = conn;
    while left > 0 {
        let mem = Arc::new(DestMemory::new(&layout).expect("memory"));
        let inst = Arc::new(PageInstaller::register(mem.clone()).expect("uffd"));
        let k = left.min(PAGES);
        let done = Arc::new(AtomicBool::new(false));
        let handler = {
            let (inst, done) = (inst.clone(), done.clone());
            let mut conn = conn.take();
            thread::spawn(move || {
                let src = vec![0xa5u8; PAGE_SIZE];
                let mut buf = vec![0u8; PAGE_SIZE];
                let mut events = EventBuffer::new(16);
                let mut addrs = Vec::new();
                while !done.load(Ordering::Acquire) {
                    if !inst.wait_readable(10).expect("poll") {
                        continue;
                    }
                    inst.read_events(&mut events, &mut addrs).expect("read");
                    for ev in &addrs {
                        let UffdEvent::Fault(a) = *ev else { continue };
                        let page = inst.memory().page_of(a).expect("page");
                        match conn.as_mut() {
                            Some(s) => {
                                s.write_all(&[0u8; 16]).expect("send");
                                s.read_exact(&mut buf).expect("recv");
                            }
                            None => buf.copy_from_slice(&src),
                        }
                        inst.install(PageRange::new(page, 1), &buf, true)
                            .expect("install");
                    }
                }
                conn
            })
        };
        let t0 = Instant::now();
        for p in 0..k {
            std::hint::black_box(mem.page(p).expect("page")[0]);
        }
        spent += t0.elapsed();
        done.store(true, Ordering::Release);
        conn = handler.join().expect("handler");
        left -= k;
    }
    spent
}

/// Any free port on loopback.
fn loopback() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 0))
}

/// A stream server listening on `bind`: each connection says how many
/// bytes it wants (8 bytes, little-endian) and gets them in one stream.
/// Returns its address.
pub fn stream_server(bind: SocketAddr) -> SocketAddr {
    let l = TcpListener::bind(bind).expect("bind");
    let addr = l.local_addr().expect("addr");
    thread::spawn(move || {
        for s in l.incoming() {
            let Ok(mut s) = s else { continue };
            thread::spawn(move || {
                let mut want = [0u8; 8];
                if s.read_exact(&mut want).is_err() {
                    return;
                }
                let chunk = vec![1u8; 1 << 20];
                let mut left = u64::from_le_bytes(want);
                while left > 0 {
                    let n = left.min(chunk.len() as u64) as usize;
                    if s.write_all(&chunk[..n]).is_err() {
                        return;
                    }
                    left -= n as u64;
                }
            });
        }
    });
    addr
}

/// Streams `bytes` over one loopback TCP connection: the throughput floor.
pub fn time_tcp_stream(bytes: u64) -> Duration {
    static LOOPBACK: OnceLock<SocketAddr> = OnceLock::new();
    time_tcp_stream_from(*LOOPBACK.get_or_init(|| stream_server(loopback())), bytes)
}

/// Streams `bytes` from the [`stream_server`] at `addr` over one TCP
/// connection, timed from the request to the last byte.
pub fn time_tcp_stream_from(addr: SocketAddr, bytes: u64) -> Duration {
    let mut s = TcpStream::connect(addr).expect("connect");
    let mut buf = vec![0u8; 1 << 20];
    let t0 = Instant::now();
    s.write_all(&bytes.to_le_bytes()).expect("request");
    let mut got = 0u64;
    while got < bytes {
        let n = s.read(&mut buf).expect("read");
        if n == 0 {
            break;
        }
        got += n as u64;
    }
    let d = t0.elapsed();
    assert_eq!(got, bytes, "the stream ended early");
    d
}

/// Runs a whole push-only migration (no workload) and returns its time.
pub fn time_push(b: &Bench, lanes: usize, flow_control: bool) -> Duration {
    time_push_on(b, lanes, flow_control, Memory::Private)
}

/// [`time_push`] into `memory`.
pub fn time_push_on(b: &Bench, lanes: usize, flow_control: bool, memory: Memory) -> Duration {
    let cfg = MigrationConfig {
        lanes,
        flow_control,
        ..MigrationConfig::default()
    };
    let t = b.for_memory(memory);
    let t0 = Instant::now();
    let h = start(&t, cfg, memory);
    // The guest keeps its memory after the migration: unmapping it (the
    // engine's handle drops its share in `wait`) is not part of the push.
    let mem = h.memory().clone();
    let r = h.wait().expect("migration");
    let spent = t0.elapsed();
    drop(mem);
    check_path(&r, memory);
    spent
}

/// `threads` threads fault at once, each on its own pages, `rounds` times
/// in fresh demand-paging migrations over `t`. Returns the wall time the
/// threads spent and the engine's network-fault latency summary of the
/// last migration.
pub fn time_concurrent_faults(
    t: &Arc<dyn Transport>,
    threads: usize,
    rounds: u64,
) -> (Duration, pagewire_engine::LatencyUs) {
    let pages = t.info().layout.total_pages();
    let per = (pages / threads as u64).max(1);
    let h = Migration::start(t.clone(), demand_only()).expect("start");
    let mem = h.memory().clone();
    let barrier = Arc::new(std::sync::Barrier::new(threads + 1));
    let workers: Vec<_> = (0..threads as u64)
        .map(|i| {
            let (mem, barrier) = (mem.clone(), barrier.clone());
            thread::spawn(move || {
                barrier.wait();
                for r in 0..rounds.min(per) {
                    std::hint::black_box(mem.page(i * per + r).expect("page")[0]);
                }
            })
        })
        .collect();
    barrier.wait();
    let t0 = Instant::now();
    for w in workers {
        w.join().expect("worker");
    }
    let spent = t0.elapsed();
    h.release_push();
    let r = h.wait().expect("migration");
    (spent, r.network_fault_us)
}

/// A migration with a workload standing in for the resumed guest.
pub struct LoadRun {
    /// What the workload did (its wall time, its stalls).
    pub workload: WorkloadStats,
    /// The engine's report.
    pub report: pagewire_engine::EngineReport,
}

/// Migrates over `t` with `cfg` while `workload` touches the guest, as
/// `pagewire dest` does without the checksum pass. Panics unless every
/// page arrived exactly once.
pub fn run_workload(t: &Arc<dyn Transport>, cfg: MigrationConfig, workload: &Workload) -> LoadRun {
    let h = Migration::start(t.clone(), cfg).expect("start");
    let mem = h.memory().clone();
    let stats = workload.run(&mem);
    // A demand-only migration fetches the rest once the guest is done.
    h.release_push();
    let report = h.wait().expect("migration");
    assert_eq!(report.duplicate_pages, 0, "a page arrived twice");
    assert_eq!(report.install_conflicts, 0, "an install conflicted");
    LoadRun {
        workload: stats,
        report,
    }
}
