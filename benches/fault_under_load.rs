//! The guest's blocked time while the push runs, on a rate-shaped link
//! between two network namespaces (`netlab/two-hosts.sh`; 1 Gbit/s,
//! 10 Gbit/s and unshaped).
//!
//! For every workload, two migrations of a 256 MiB synthetic guest (a
//! quarter of its pages zero, as `pagewire source --synthetic`) are timed
//! by the workload's wall time:
//! - `push`: the push and the bubbles running, as by default;
//! - `demand_only`: `--no-push --no-bubble`.
//!
//! Beside them, on the same link in the same run, two floors:
//! - `floor/fault_rtt`: a bare userfaultfd handler serving each fault
//!   with one raw 4 KiB TCP round trip and one `UFFDIO_COPY`;
//! - `WORKLOAD/floor/working_set`: the workload's working set (its
//!   distinct non-zero pages) streamed over one TCP connection, before
//!   which no workload can finish.
//!
//! After each workload it prints the median runs' workload-time ratio
//! and fault p50/p99 (the engine's histogram, as `pagewire dest` reports
//! them), the figures issue 7's targets are stated in. The source's page
//! server runs in one namespace and the engine in the other, in this one
//! process; `netlab/fault-under-load.sh` measures the same with the CLI
//! in two. Needs root and iproute2: without them it says why and
//! measures nothing. As a smoke test (`cargo test`, each function once)
//! the guest is 32 MiB.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion, SamplingMode};
use pagewire_benches::netlab::{Link, Side, SOURCE_ADDR};
use pagewire_benches::*;
use pagewire_engine::MigrationConfig;
use pagewire_transport::tcp::{PageServer, TcpOptions, TcpTransport};
use pagewire_transport::{Transport, PAGE_SIZE};
use pagewire_vmm_glue::image::{synthetic, DEFAULT_ZERO_PERCENT};
use pagewire_vmm_glue::workload::{Pattern, Workload};

/// Link rates, as `two-hosts.sh --rate` takes them.
const RATES: [&str; 3] = ["1gbit", "10gbit", "none"];
/// Workloads, with `pagewire dest`'s default seed and stride.
const PATTERNS: [(Pattern, &str); 4] = [
    (Pattern::Hotset, "hotset"),
    (Pattern::Random, "random"),
    (Pattern::Seq, "seq"),
    (Pattern::Stride, "stride"),
];

/// Whether criterion measures (`cargo bench`), rather than running each
/// function once (`cargo test`).
fn benching() -> bool {
    std::env::args().any(|a| a == "--bench")
}

fn workload(pattern: Pattern) -> Workload {
    Workload {
        pattern,
        touches: None,
        seed: 42,
        stride: 16,
        think_us: 0,
        trace: None,
        cpus: Vec::new(),
    }
}

/// Bytes of the distinct non-zero pages `w` touches: what must cross the
/// link before it can finish.
fn working_set(t: &Arc<dyn Transport>, w: &Workload) -> u64 {
    let info = t.info();
    let pages = info.layout.total_pages();
    let mut seen = vec![false; pages as usize];
    let mut bytes = 0;
    for p in w.pages(pages) {
        if !std::mem::replace(&mut seen[p as usize], true) && !info.zero.is_zero(p) {
            bytes += PAGE_SIZE as u64;
        }
    }
    bytes
}

/// The mean time of the iterations a floor ran.
#[derive(Default)]
struct Average {
    total: Duration,
    n: u64,
}

impl Average {
    /// Counts `n` iterations that took `d`, and returns `d`.
    fn add(&mut self, d: Duration, n: u64) -> Duration {
        self.total += d;
        self.n += n;
        d
    }

    /// The mean, as text (`-` for a floor filtered out of this run).
    fn show(&self, unit: f64, suffix: &str) -> String {
        if self.n == 0 {
            return "-".into();
        }
        let mean = self.total.as_secs_f64() / self.n as f64;
        format!("{:.1} {suffix}", mean * unit)
    }
}

/// The run with the median workload time.
fn median(runs: &mut [LoadRun]) -> Option<&LoadRun> {
    runs.sort_by(|a, b| a.workload.ms.total_cmp(&b.workload.ms));
    runs.get(runs.len() / 2)
}

fn under_load(c: &mut Criterion) {
    if let Some(why) = Link::unavailable() {
        eprintln!("fault_under_load: skipped, network namespaces unavailable ({why})");
        return;
    }
    let bytes: u64 = if benching() { 256 << 20 } else { 32 << 20 };
    let src = Arc::new(synthetic(bytes, 1, DEFAULT_ZERO_PERCENT).expect("synthetic source"));
    for (i, rate) in RATES.into_iter().enumerate() {
        let link =
            Link::up(&format!("pwb{}r{i}", std::process::id() % 10_000), rate).expect("namespaces");
        // The servers' threads stay in the source's namespace.
        let (server, rtt, stream) = {
            let _in = link
                .enter(Side::Source)
                .expect("enter the source's namespace");
            let bind = SocketAddr::new(SOURCE_ADDR, 0);
            let server = PageServer::bind(bind, src.clone())
                .expect("bind")
                .spawn()
                .expect("page server");
            (server, rtt_server(bind), stream_server(bind))
        };
        // The engine's threads start in the destination's.
        let _in = link
            .enter(Side::Dest)
            .expect("enter the destination's namespace");
        let t: Arc<dyn Transport> =
            Arc::new(TcpTransport::connect(server.addr(), TcpOptions::default()).expect("connect"));
        let group = format!("fault_under_load_{rate}");
        let mut g = c.benchmark_group(&group);
        // Every sample one migration, however long it takes.
        g.sampling_mode(SamplingMode::Flat);
        // Each floor's time per fault or stream over all its samples.
        let mut raw_fault = Average::default();
        g.bench_function("floor/fault_rtt", |bench| {
            bench.iter_custom(|n| raw_fault.add(time_floor_faults(&Floor::TcpRttTo(rtt), n), n))
        });
        for (pattern, name) in PATTERNS {
            let w = workload(pattern);
            let set = working_set(&t, &w);
            let mut floor = Average::default();
            g.bench_function(format!("{name}/floor/working_set"), |bench| {
                bench.iter_custom(|n| {
                    floor.add((0..n).map(|_| time_tcp_stream_from(stream, set)).sum(), n)
                })
            });
            let demand = MigrationConfig {
                push: false,
                bubble: 0,
                ..MigrationConfig::default()
            };
            let (mut d, mut p) = (Vec::new(), Vec::new());
            for (mode, cfg, runs) in [
                ("demand_only", demand, &mut d),
                ("push", MigrationConfig::default(), &mut p),
            ] {
                g.bench_function(format!("{name}/{mode}"), |bench| {
                    bench.iter_custom(|n| {
                        (0..n)
                            .map(|_| {
                                let r = run_workload(&t, cfg.clone(), &w);
                                let d = Duration::from_secs_f64(r.workload.ms / 1e3);
                                runs.push(r);
                                d
                            })
                            .sum()
                    })
                });
            }
            let n = (d.len(), p.len());
            // The request size the flow control settled on (its probe
            // sometimes grows requests, and a fault then waits behind
            // larger ones), run by run.
            let mut chunks = std::collections::BTreeMap::new();
            for r in &p {
                *chunks.entry(r.report.flow.chunk_pages).or_insert(0) += 1;
            }
            if let (Some(d), Some(p)) = (median(&mut d), median(&mut p)) {
                let (df, pf) = (&d.report.fault_latency_us, &p.report.fault_latency_us);
                eprintln!(
                    "{group}/{name}, {} MiB guest, median of {} / {} runs: workload {:.0} ms with the push \
                     against {:.0} ms demand-only ({:.2}×); fault p50 {:.0} / p99 {:.0} µs against {:.0} / {:.0} µs \
                     (p99 {:.2}×); guest stall p99 {:.0} against {:.0} µs; waits on pages in flight p99 {:.0} µs; \
                     requests of {} pages at the end (runs ending with each size: {:?}); \
                     floors: working set {:.1} MB over the link {}, a raw fault {}",
                    bytes >> 20,
                    n.1,
                    n.0,
                    p.workload.ms,
                    d.workload.ms,
                    p.workload.ms / d.workload.ms.max(1e-9),
                    pf.p50,
                    pf.p99,
                    df.p50,
                    df.p99,
                    pf.p99 / df.p99.max(1e-9),
                    p.workload.stalls.p99,
                    d.workload.stalls.p99,
                    p.report.inflight_wait_us.p99,
                    p.report.flow.chunk_pages,
                    chunks,
                    set as f64 / 1e6,
                    floor.show(1e3, "ms"),
                    raw_fault.show(1e6, "µs"),
                );
            }
        }
        g.finish();
    }
}

criterion_group! {
    name = benches;
    // Each sample is one migration (seconds at 1 Gbit/s): ten of them,
    // after one to warm up.
    config = Criterion::default()
        .sample_size(10)
        .warm_up_time(Duration::from_millis(1))
        .measurement_time(Duration::from_secs(1));
    targets = under_load
}
criterion_main!(benches);
