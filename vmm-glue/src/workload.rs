//! Workloads that touch guest memory the way a resumed VM would.

use std::time::{Duration, Instant};

use clap::ValueEnum;
use pagewire_engine::DestMemory;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use rand_distr::{Distribution, Zipf};
use serde::Serialize;
use std::sync::Arc;

use crate::trace::Trace;
use pagewire_engine::metrics::LatencyHist;
use pagewire_engine::LatencyUs;

/// A touch that takes at least this long blocked on a fault (a touch of a
/// present page takes well under a microsecond).
pub const STALL: Duration = Duration::from_micros(2);

/// A touch pattern.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Pattern {
    /// Every page in address order.
    Seq,
    /// Uniformly random pages.
    Random,
    /// Zipf-distributed over a hot region around a random base: a few
    /// pages take most touches, as in a real working set.
    Hotset,
    /// Every `stride`-th page, wrapping with an offset until all are hit.
    Stride,
    /// A real program's first-touch order, replayed from a trace file
    /// (see [`crate::trace`]); trace pages past the guest wrap around.
    Trace,
}

/// A workload: pattern plus its knobs.
#[derive(Debug, Clone)]
pub struct Workload {
    /// The pattern.
    pub pattern: Pattern,
    /// Number of touches; `None` means one per page.
    pub touches: Option<u64>,
    /// Seed for the random patterns.
    pub seed: u64,
    /// Distance between touches of `stride`, in pages.
    pub stride: u64,
    /// Busy work between touches, in microseconds, to model compute.
    pub think_us: u64,
    /// The trace [`Pattern::Trace`] replays.
    pub trace: Option<Arc<Trace>>,
    /// CPUs the workload's thread runs on, as a VMM pins a vCPU (empty:
    /// wherever the scheduler puts it).
    pub cpus: Vec<usize>,
}

/// What a workload did.
#[derive(Debug, Clone, Serialize)]
pub struct WorkloadStats {
    /// The pattern.
    pub pattern: Pattern,
    /// Touches made.
    pub touches: u64,
    /// Distinct pages touched.
    pub distinct_pages: u64,
    /// Wall time of the workload.
    pub ms: f64,
    /// Touches that blocked (took at least [`STALL`]): each such touch is
    /// a fault as the guest sees it, from the touch to running again
    /// (delivering the fault, waking the handler, the fetch, the install,
    /// being woken), which the engine's own fault latency (from reading
    /// the event to installing the page) does not wholly cover.
    pub stalls: LatencyUs,
    /// Time spent in those touches, in ms.
    pub stalled_ms: f64,
    /// The trace replayed, for [`Pattern::Trace`].
    #[serde(skip_serializing_if = "Option::is_none")]
    pub trace: Option<String>,
    /// Which pages were touched (not serialized).
    #[serde(skip)]
    pub touched: Vec<bool>,
}

impl Workload {
    /// The page sequence this workload touches in memory of `pages` pages.
    pub fn pages(&self, pages: u64) -> Box<dyn Iterator<Item = u64>> {
        let n = match (self.pattern, &self.trace) {
            // A trace is replayed once unless told otherwise.
            (Pattern::Trace, Some(t)) => self.touches.unwrap_or(t.pages.len() as u64),
            _ => self.touches.unwrap_or(pages),
        };
        let mut rng = SmallRng::seed_from_u64(self.seed);
        match self.pattern {
            Pattern::Seq => Box::new((0..n).map(move |i| i % pages)),
            Pattern::Random => Box::new((0..n).map(move |_| rng.gen_range(0..pages))),
            Pattern::Hotset => {
                let base = rng.gen_range(0..pages);
                // s = 1.1: roughly 20 % of the pages take 80 % of touches.
                match Zipf::new(pages, 1.1) {
                    Ok(zipf) => Box::new((0..n).map(move |_| {
                        let rank = zipf.sample(&mut rng) as u64; // 1..=pages
                        (base + rank - 1) % pages
                    })),
                    Err(_) => Box::new((0..n).map(move |i| i % pages)),
                }
            }
            Pattern::Trace => {
                let trace: Vec<u64> = self
                    .trace
                    .as_ref()
                    .map(|t| t.pages.iter().map(|p| p % pages).collect())
                    .unwrap_or_default();
                Box::new(trace.into_iter().cycle().take(n as usize))
            }
            Pattern::Stride => {
                // Lap `l` touches l, l + stride, l + 2 * stride, ... below
                // `pages`; laps 0..stride together hit every page once.
                let stride = self.stride.clamp(1, pages);
                let order = (0..stride).flat_map(move |lap| (lap..pages).step_by(stride as usize));
                Box::new(order.cycle().take(n as usize))
            }
        }
    }

    /// Runs the workload on `mem`, reading one word of each touched page
    /// (pages of 4 KiB, numbered as the source numbers them, whatever
    /// size of page backs `mem`).
    /// Blocks on faults like a vCPU would. With `cpus` set, the calling
    /// thread stays pinned to them afterwards.
    pub fn run(&self, mem: &DestMemory) -> WorkloadStats {
        let total = mem.small_pages();
        let mut touched = vec![false; total as usize];
        let mut touches = 0u64;
        let mut sink = 0u64;
        let stalls = LatencyHist::default();
        let mut stalled = Duration::ZERO;
        if let Err(e) = pagewire_engine::placement::pin_current_thread("the workload", &self.cpus) {
            tracing::warn!("{e}");
        }
        let t0 = Instant::now();
        for p in self.pages(total) {
            if let Some(page) = mem.small_page(p) {
                let before = Instant::now();
                // black_box keeps the compiler from eliding the load.
                sink = sink.wrapping_add(u64::from(std::hint::black_box(page[0])));
                let took = before.elapsed();
                if took >= STALL {
                    stalls.record(took);
                    stalled += took;
                }
                touched[p as usize] = true;
                touches += 1;
            }
            if self.think_us > 0 {
                let until = Instant::now() + Duration::from_micros(self.think_us);
                while Instant::now() < until {
                    std::hint::spin_loop();
                }
            }
        }
        std::hint::black_box(sink);
        WorkloadStats {
            pattern: self.pattern,
            touches,
            distinct_pages: touched.iter().filter(|&&t| t).count() as u64,
            ms: t0.elapsed().as_secs_f64() * 1000.0,
            stalls: stalls.summary(),
            stalled_ms: stalled.as_secs_f64() * 1000.0,
            trace: self.trace.as_ref().map(|t| t.name.clone()),
            touched,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn w(pattern: Pattern) -> Workload {
        Workload {
            pattern,
            touches: None,
            seed: 3,
            stride: 16,
            think_us: 0,
            trace: None,
            cpus: Vec::new(),
        }
    }

    #[test]
    fn traces_replay_in_order_and_wrap_into_the_guest() {
        let mut wl = w(Pattern::Trace);
        wl.trace = Some(Arc::new(Trace {
            span: 20,
            pages: vec![3, 4, 15, 1],
            command: String::new(),
            name: "t".into(),
        }));
        assert_eq!(wl.pages(10).collect::<Vec<_>>(), vec![3, 4, 5, 1]);
        wl.touches = Some(6);
        assert_eq!(wl.pages(100).collect::<Vec<_>>(), vec![3, 4, 15, 1, 3, 4]);
    }

    #[test]
    fn seq_and_stride_cover_every_page_once() {
        for p in [Pattern::Seq, Pattern::Stride] {
            let mut v: Vec<u64> = w(p).pages(1000).collect();
            v.sort_unstable();
            assert_eq!(v, (0..1000).collect::<Vec<_>>(), "{p:?}");
        }
        let s: Vec<u64> = w(Pattern::Stride).pages(40).take(4).collect();
        assert_eq!(s, vec![0, 16, 32, 1]);
    }

    #[test]
    fn hotset_concentrates_touches() {
        let v: Vec<u64> = w(Pattern::Hotset).pages(10_000).collect();
        let mut counts = std::collections::HashMap::new();
        for p in &v {
            *counts.entry(*p).or_insert(0u64) += 1;
        }
        let mut c: Vec<u64> = counts.values().copied().collect();
        c.sort_unstable_by(|a, b| b.cmp(a));
        let top: u64 = c.iter().take(2000).sum();
        assert!(
            top * 10 >= 6 * 10_000,
            "top 20% pages take {top} of 10000 touches"
        );
        assert!(v.iter().all(|&p| p < 10_000));
    }

    #[test]
    fn random_is_seeded() {
        let a: Vec<u64> = w(Pattern::Random).pages(500).collect();
        let b: Vec<u64> = w(Pattern::Random).pages(500).collect();
        assert_eq!(a, b);
        assert!(a.iter().all(|&p| p < 500));
    }
}
