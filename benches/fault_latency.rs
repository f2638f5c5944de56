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
            bench.iter_custom(|n| time_engine_faults(&b.transport, n))
        });
    }
    match rdma_transport(src.clone()) {
        Ok(b) => {
            g.bench_function("engine/rdma", |bench| {
                bench.iter_custom(|n| time_engine_faults(&b.transport, n))
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

criterion_group! {
    name = benches;
    config = Criterion::default()
        .sample_size(20)
        .warm_up_time(std::time::Duration::from_secs(1))
        .measurement_time(std::time::Duration::from_secs(3));
    targets = faults
}
criterion_main!(benches);
