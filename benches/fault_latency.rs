//! Fault latency per transport, beside the floors measured in the same
//! run: a bare uffd handler serving each fault with a memcpy, or with a
//! raw loopback TCP 4 KiB round trip, then one UFFDIO_COPY.
//!
//! Time is what the faulting thread sees per first touch of a page.
//! `engine/rdma` runs where an RDMA device exists (e.g. in the Soft-RoCE
//! guest) and is reported as skipped elsewhere.

use criterion::{criterion_group, criterion_main, Criterion};
use pagewire_benches::*;

fn faults(c: &mut Criterion) {
    let mut g = c.benchmark_group("fault_latency_4k");
    let src = source(16 << 20);
    for kind in ["inproc", "tcp"] {
        let b = transport(kind, src.clone());
        g.bench_function(format!("engine/{kind}"), |bench| {
            bench.iter_custom(|n| time_engine_faults(&b, n))
        });
        // Into a memfd: copied in, and landed then mapped with
        // UFFDIO_CONTINUE.
        for (name, memory) in [
            ("memfd", Memory::MemfdCopied),
            ("memfd/landed", Memory::MemfdLanded),
        ] {
            g.bench_function(format!("engine/{kind}/{name}"), |bench| {
                bench.iter_custom(|n| time_engine_faults_on(&b, n, memory))
            });
        }
    }
    match rdma_transport(src.clone()) {
        Ok(b) => {
            g.bench_function("engine/rdma", |bench| {
                bench.iter_custom(|n| time_engine_faults(&b, n))
            });
            // Zero-copy: READs land in the memfd, then UFFDIO_CONTINUE.
            g.bench_function("engine/rdma/memfd/landed", |bench| {
                bench.iter_custom(|n| time_engine_faults_on(&b, n, Memory::MemfdLanded))
            });
        }
        Err(why) => eprintln!("fault_latency_4k/engine/rdma: skipped ({why})"),
    }
    g.bench_function("floor/uffd_memcpy", |bench| {
        bench.iter_custom(|n| time_floor_faults(&Floor::Memcpy, n))
    });
    g.bench_function("floor/uffd_tcp_rtt", |bench| {
        bench.iter_custom(|n| time_floor_faults(&Floor::TcpRtt, n))
    });
    g.finish();
}

/// 1, 2, 4 and 8 threads faulting at once on different pages over TCP
/// loopback: the time per fault as the threads see it, and the engine's
/// p50/p99 per thread count (printed), beside the single-thread figure.
fn concurrent(c: &mut Criterion) {
    let mut g = c.benchmark_group("concurrent_faults_tcp");
    let src = source(16 << 20);
    let b = transport("tcp", src);
    for threads in [1usize, 2, 4, 8] {
        let rounds = 64;
        g.throughput(criterion::Throughput::Elements(threads as u64 * rounds));
        let mut last = None;
        g.bench_function(format!("threads{threads}"), |bench| {
            bench.iter_custom(|n| {
                let mut spent = std::time::Duration::ZERO;
                for _ in 0..n {
                    let (d, l) = time_concurrent_faults(&b.transport, threads, rounds);
                    spent += d;
                    last = Some(l);
                }
                spent
            })
        });
        if let Some(l) = last {
            eprintln!(
                "concurrent_faults_tcp/threads{threads}: engine network fault p50 {:.1} us, p99 {:.1} us ({} faults)",
                l.p50, l.p99, l.count
            );
        }
    }
    g.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .sample_size(20)
        .warm_up_time(std::time::Duration::from_secs(1))
        .measurement_time(std::time::Duration::from_secs(3));
    targets = faults, concurrent
}
criterion_main!(benches);
