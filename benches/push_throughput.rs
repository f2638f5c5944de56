//! Background push throughput (no workload, every page sent), beside a
//! single-stream loopback TCP transfer of the same bytes as the floor.

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use pagewire_benches::*;

const BYTES: u64 = 64 << 20;

fn push(c: &mut Criterion) {
    let mut g = c.benchmark_group("push_64MiB");
    g.throughput(Throughput::Bytes(BYTES));
    let src = source(BYTES);
    for kind in ["inproc", "tcp"] {
        let b = transport(kind, src.clone());
        for lanes in [1usize, 2] {
            g.bench_function(format!("engine/{kind}/lanes{lanes}"), |bench| {
                bench.iter_custom(|n| (0..n).map(|_| time_push(&b, lanes, true)).sum())
            });
        }
        g.bench_function(format!("engine/{kind}/lanes2/no_flow_control"), |bench| {
            bench.iter_custom(|n| (0..n).map(|_| time_push(&b, 2, false)).sum())
        });
        // Into a memfd: copied in (UFFDIO_COPY), and landed by the
        // transport (then UFFDIO_CONTINUE) with and without flow control.
        for (name, memory, fc) in [
            ("memfd", Memory::MemfdCopied, true),
            ("memfd/landed", Memory::MemfdLanded, true),
            ("memfd/landed/no_flow_control", Memory::MemfdLanded, false),
        ] {
            g.bench_function(format!("engine/{kind}/lanes2/{name}"), |bench| {
                bench.iter_custom(|n| (0..n).map(|_| time_push_on(&b, 2, fc, memory)).sum())
            });
        }
    }
    g.bench_function("floor/tcp_stream", |bench| {
        bench.iter_custom(|n| (0..n).map(|_| time_tcp_stream(BYTES)).sum())
    });
    g.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .sample_size(10)
        .warm_up_time(std::time::Duration::from_secs(1))
        .measurement_time(std::time::Duration::from_secs(5));
    targets = push
}
criterion_main!(benches);
