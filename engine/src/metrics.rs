//! Migration metrics: the paper's counters plus a fault latency histogram.

use std::sync::atomic::{AtomicU32, AtomicU64, AtomicU8, AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use hdrhistogram::Histogram;
use pagewire_transport::PageRange;
use serde::Serialize;

/// Buckets of the power-of-two latency distribution: bucket `n` counts
/// faults that took `[2^n, 2^(n+1))` µs (bucket 0 also holds faster ones),
/// as QEMU's `postcopy-latency-dist` reports them.
pub const DIST_BUCKETS: usize = 26;

/// A latency histogram: hdrhistogram for percentiles plus power-of-two
/// buckets.
#[derive(Debug)]
pub struct LatencyHist {
    hist: Mutex<Histogram<u64>>,
    dist: [AtomicU64; DIST_BUCKETS],
}

impl Default for LatencyHist {
    fn default() -> Self {
        Self {
            // 1 ns .. 60 s at 3 significant digits.
            hist: Mutex::new(
                Histogram::new_with_bounds(1, 60_000_000_000, 3)
                    .expect("constant histogram bounds are valid"),
            ),
            dist: std::array::from_fn(|_| AtomicU64::new(0)),
        }
    }
}

impl LatencyHist {
    /// Records one latency.
    pub fn record(&self, d: Duration) {
        let ns = (d.as_nanos().min(u128::from(u64::MAX)) as u64).clamp(1, 60_000_000_000);
        let us = ns / 1000;
        let bucket = if us == 0 {
            0
        } else {
            (63 - us.leading_zeros() as usize).min(DIST_BUCKETS - 1)
        };
        self.dist[bucket].fetch_add(1, Ordering::Relaxed);
        let mut h = self.hist.lock().unwrap_or_else(|p| p.into_inner());
        let _ = h.record(ns);
    }

    /// The summary so far.
    pub fn summary(&self) -> LatencyUs {
        let h = self.hist.lock().unwrap_or_else(|p| p.into_inner());
        if h.is_empty() {
            return LatencyUs::default();
        }
        let us = |ns: u64| ns as f64 / 1000.0;
        LatencyUs {
            count: h.len(),
            p50: us(h.value_at_quantile(0.50)),
            p90: us(h.value_at_quantile(0.90)),
            p99: us(h.value_at_quantile(0.99)),
            max: us(h.max()),
            mean: h.mean() / 1000.0,
        }
    }

    /// The power-of-two distribution, trailing empty buckets dropped.
    pub fn distribution(&self) -> Vec<u64> {
        let mut v: Vec<u64> = self
            .dist
            .iter()
            .map(|c| c.load(Ordering::Relaxed))
            .collect();
        while v.last() == Some(&0) {
            v.pop();
        }
        v
    }

    /// Latencies at the given quantiles (0..=1), in µs, for CDF plots.
    pub fn quantiles(&self, qs: &[f64]) -> Vec<f64> {
        let h = self.hist.lock().unwrap_or_else(|p| p.into_inner());
        qs.iter()
            .map(|&q| h.value_at_quantile(q) as f64 / 1000.0)
            .collect()
    }
}

/// Live counters, updated by the fault services and the lanes.
#[derive(Debug)]
pub struct Metrics {
    /// Fault events handled.
    pub faults: AtomicU64,
    /// Faults whose page this handler fetched over the transport.
    pub network_faults: AtomicU64,
    /// Faults on a page a lane (or another fault service) was already
    /// fetching (waited, not refetched).
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
    /// Most urgent requests outstanding at once.
    pub max_concurrent_faults: AtomicU64,
    /// Pages the memory's owner removed (balloon) before they arrived.
    pub removed_pages: AtomicU64,
    /// Times a channel's link was lost.
    pub link_losses: AtomicU64,
    /// Times a lost channel was reopened.
    pub reconnects: AtomicU64,
    /// Pages asked for again because their reply was lost with a link.
    pub resent_pages: AtomicU64,
    /// Pages installed before the rest of their bulk reply had arrived,
    /// because a fault waited on one of them.
    pub early_pages: AtomicU64,
    /// Time from a link loss to the channel reopened.
    pub recovery: LatencyHist,
    /// Every fault, from reading its event to waking its thread.
    pub all: LatencyHist,
    /// Faults fetched over the network.
    pub network: LatencyHist,
    /// Faults that waited for a page a lane was fetching.
    pub inflight: LatencyHist,
    /// Faults on zero pages.
    pub zero: LatencyHist,
    fetch_counts: Box<[AtomicU8]>,
    /// Faults and pages installed per [`TIMELINE_MS`] since the start.
    timeline_faults: Box<[AtomicU32]>,
    timeline_pages: Box<[AtomicU32]>,
    /// One past the last step anything was counted in.
    timeline_len: AtomicUsize,
    start: std::time::Instant,
}

/// Width of one step of the migration's timeline, in ms.
pub const TIMELINE_MS: u64 = 20;

/// Longest timeline kept (10 minutes); later events go to the last step.
const TIMELINE_STEPS: usize = 30_000;

/// Fault latency summary in microseconds.
#[derive(Debug, Clone, Copy, Default, Serialize, PartialEq)]
pub struct LatencyUs {
    /// Faults measured.
    pub count: u64,
    /// Median.
    pub p50: f64,
    /// 90th percentile.
    pub p90: f64,
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
            max_concurrent_faults: counter(),
            removed_pages: counter(),
            link_losses: counter(),
            reconnects: counter(),
            resent_pages: counter(),
            early_pages: counter(),
            recovery: LatencyHist::default(),
            all: LatencyHist::default(),
            network: LatencyHist::default(),
            inflight: LatencyHist::default(),
            zero: LatencyHist::default(),
            fetch_counts: (0..pages).map(|_| AtomicU8::new(0)).collect(),
            timeline_faults: (0..TIMELINE_STEPS).map(|_| AtomicU32::new(0)).collect(),
            timeline_pages: (0..TIMELINE_STEPS).map(|_| AtomicU32::new(0)).collect(),
            timeline_len: AtomicUsize::new(0),
            start: std::time::Instant::now(),
        }
    }

    fn step(&self) -> usize {
        ((self.start.elapsed().as_millis() as u64 / TIMELINE_MS) as usize).min(TIMELINE_STEPS - 1)
    }

    /// Counts on the timeline without a lock: faults and installs are hot.
    fn on_timeline(&self, column: &[AtomicU32], n: u32) {
        let i = self.step();
        column[i].fetch_add(n, Ordering::Relaxed);
        self.timeline_len.fetch_max(i + 1, Ordering::Relaxed);
    }

    /// Counts a fault on the timeline.
    pub fn timeline_fault(&self) {
        self.on_timeline(&self.timeline_faults, 1);
    }

    /// Counts installed pages on the timeline.
    pub fn timeline_pages(&self, pages: u64) {
        self.on_timeline(&self.timeline_pages, pages.min(u64::from(u32::MAX)) as u32);
    }

    /// (faults, pages installed) per [`TIMELINE_MS`] step so far.
    pub fn timeline(&self) -> Vec<(u32, u32)> {
        let n = self.timeline_len.load(Ordering::Relaxed);
        (0..n)
            .map(|i| {
                (
                    self.timeline_faults[i].load(Ordering::Relaxed),
                    self.timeline_pages[i].load(Ordering::Relaxed),
                )
            })
            .collect()
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
        assert_eq!(m.all.summary().count, 0);
        for us in [10u64, 20, 30, 1000] {
            m.all.record(Duration::from_micros(us));
        }
        let l = m.all.summary();
        assert_eq!(l.count, 4);
        // 10 and 20 µs fall in [8, 16) and [16, 32); 30 in [16, 32);
        // 1000 in [512, 1024).
        let d = m.all.distribution();
        assert_eq!(d.len(), 10);
        assert_eq!((d[3], d[4], d[9]), (1, 2, 1));
        assert!((l.p50 - 20.0).abs() < 0.1, "{l:?}");
        assert!((l.max - 1000.0).abs() < 1.0, "{l:?}");
    }
}
