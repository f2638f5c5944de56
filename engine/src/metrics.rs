//! Migration metrics: the paper's counters plus a fault latency histogram.

use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use hdrhistogram::Histogram;
use pagewire_transport::PageRange;
use serde::Serialize;

/// Live counters, updated by the fault handler and the lanes.
#[derive(Debug)]
pub struct Metrics {
    /// Fault events handled.
    pub faults: AtomicU64,
    /// Faults whose page this handler fetched over the transport.
    pub network_faults: AtomicU64,
    /// Faults on a page a lane was already fetching (waited, not refetched).
    pub inflight_faults: AtomicU64,
    /// Faults on zero pages, served with UFFDIO_ZEROPAGE.
    pub zero_faults: AtomicU64,
    /// Pages fetched by bubbles.
    pub prepaged_pages: AtomicU64,
    /// Pages fetched by the background sweep.
    pub pushed_pages: AtomicU64,
    /// Pages installed as zero pages, by anyone.
    pub zero_pages: AtomicU64,
    /// Page bytes received from the transport.
    pub bytes_received: AtomicU64,
    /// Pages whose bytes arrived more than once (must stay 0).
    pub duplicate_pages: AtomicU64,
    /// Installs that found the page already mapped (EEXIST).
    pub install_conflicts: AtomicU64,
    fetch_counts: Box<[AtomicU8]>,
    latency_ns: Mutex<Histogram<u64>>,
}

/// Fault latency summary in microseconds.
#[derive(Debug, Clone, Copy, Default, Serialize, PartialEq)]
pub struct LatencyUs {
    /// Faults measured.
    pub count: u64,
    /// Median.
    pub p50: f64,
    /// 99th percentile.
    pub p99: f64,
    /// Worst.
    pub max: f64,
    /// Mean.
    pub mean: f64,
}

impl Metrics {
    /// Counters for a migration of `pages` pages.
    pub fn new(pages: u64) -> Self {
        let counter = || AtomicU64::new(0);
        Self {
            faults: counter(),
            network_faults: counter(),
            inflight_faults: counter(),
            zero_faults: counter(),
            prepaged_pages: counter(),
            pushed_pages: counter(),
            zero_pages: counter(),
            bytes_received: counter(),
            duplicate_pages: counter(),
            install_conflicts: counter(),
            fetch_counts: (0..pages).map(|_| AtomicU8::new(0)).collect(),
            // 1 ns .. 60 s at 3 significant digits.
            latency_ns: Mutex::new(
                Histogram::new_with_bounds(1, 60_000_000_000, 3)
                    .expect("constant histogram bounds are valid"),
            ),
        }
    }

    /// Records that the bytes of `ranges` arrived; a page arriving twice is
    /// counted as a duplicate.
    pub fn record_fetched(&self, ranges: &[PageRange], page_size: usize) {
        let mut pages = 0u64;
        for r in ranges {
            for p in r.first..r.end() {
                pages += 1;
                if let Some(c) = self.fetch_counts.get(p as usize) {
                    if c.fetch_add(1, Ordering::Relaxed) > 0 {
                        self.duplicate_pages.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        }
        self.bytes_received
            .fetch_add(pages * page_size as u64, Ordering::Relaxed);
    }

    /// Records one fault's service time.
    pub fn record_fault_latency(&self, d: Duration) {
        let ns = (d.as_nanos() as u64).clamp(1, 60_000_000_000);
        let mut h = self.latency_ns.lock().unwrap_or_else(|p| p.into_inner());
        let _ = h.record(ns);
    }

    /// The fault latency summary so far.
    pub fn latency(&self) -> LatencyUs {
        let h = self.latency_ns.lock().unwrap_or_else(|p| p.into_inner());
        if h.is_empty() {
            return LatencyUs::default();
        }
        let us = |ns: u64| ns as f64 / 1000.0;
        LatencyUs {
            count: h.len(),
            p50: us(h.value_at_quantile(0.50)),
            p99: us(h.value_at_quantile(0.99)),
            max: us(h.max()),
            mean: h.mean() / 1000.0,
        }
    }

    /// Reads a counter.
    pub fn get(c: &AtomicU64) -> u64 {
        c.load(Ordering::Relaxed)
    }

    /// Adds to a counter.
    pub fn add(c: &AtomicU64, n: u64) {
        c.fetch_add(n, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn duplicates_are_counted_per_page() {
        let m = Metrics::new(10);
        m.record_fetched(&[PageRange::new(0, 3)], 4096);
        assert_eq!(Metrics::get(&m.duplicate_pages), 0);
        m.record_fetched(&[PageRange::new(2, 2), PageRange::new(9, 1)], 4096);
        assert_eq!(Metrics::get(&m.duplicate_pages), 1);
        assert_eq!(Metrics::get(&m.bytes_received), 6 * 4096);
    }

    #[test]
    fn latency_summary_is_in_microseconds() {
        let m = Metrics::new(1);
        assert_eq!(m.latency().count, 0);
        for us in [10u64, 20, 30, 1000] {
            m.record_fault_latency(Duration::from_micros(us));
        }
        let l = m.latency();
        assert_eq!(l.count, 4);
        assert!((l.p50 - 20.0).abs() < 0.1, "{l:?}");
        assert!((l.max - 1000.0).abs() < 1.0, "{l:?}");
    }
}
