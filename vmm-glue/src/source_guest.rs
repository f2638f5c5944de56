//! A guest that still runs at the source: it writes its memory in a
//! workload's pattern while the destination pre-copies it, until the
//! switch-over pauses it. Its writes are tracked with userfaultfd
//! write-protection ([`WriteTracker`]).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use memmap2::MmapMut;
use pagewire_engine::{EngineError, WriteTracker};
use pagewire_transport::source::RegionBytes;
use pagewire_transport::{DirtyLog, MemoryLayout, PageSet, SourceMemory, PAGE_SIZE};

use crate::image::{synthetic_map, ImageError};
use crate::workload::Workload;

/// Why a running source guest could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum SourceGuestError {
    /// The image could not be made.
    #[error(transparent)]
    Image(#[from] ImageError),
    /// Write tracking could not start.
    #[error("tracking the guest's writes: {0}")]
    Tracker(#[from] EngineError),
    /// The writer thread could not start.
    #[error("cannot start the guest thread: {0}")]
    Thread(std::io::Error),
}

/// The guest's vCPU: one thread writing pages.
struct Writer {
    stop: AtomicBool,
    writes: AtomicU64,
    thread: Mutex<Option<JoinHandle<()>>>,
}

impl Writer {
    /// Stops the writer and waits until it has: nothing writes after.
    fn pause(&self) {
        self.stop.store(true, Ordering::Release);
        let t = self.thread.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(t) = t {
            let _ = t.join();
        }
    }
}

/// A synthetic guest running at the source. Implements [`DirtyLog`]: the
/// switch-over pauses it.
pub struct SourceGuest {
    // Dropped in this order: the writer stops, tracking stops, then the
    // memory may be unmapped (the last holder of `_memory` unmaps it).
    writer: Arc<Writer>,
    tracker: WriteTracker,
    _memory: RegionBytes,
    started: Instant,
}

impl std::fmt::Debug for SourceGuest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SourceGuest")
            .field("writes", &self.writes())
            .finish_non_exhaustive()
    }
}

impl SourceGuest {
    /// Writes made so far.
    pub fn writes(&self) -> u64 {
        self.writer.writes.load(Ordering::Relaxed)
    }
}

impl DirtyLog for SourceGuest {
    fn collect(&self, pause: bool) -> std::io::Result<PageSet> {
        let set = self.tracker.collect(pause)?;
        if pause {
            tracing::info!(
                writes = self.writes(),
                write_faults = self.tracker.write_faults(),
                ran_ms = self.started.elapsed().as_millis() as u64,
                "source guest paused for the switch-over"
            );
        }
        Ok(set)
    }
}

impl Drop for SourceGuest {
    fn drop(&mut self) {
        self.writer.pause();
    }
}

/// Makes the synthetic guest of [`crate::image::synthetic`] and starts it
/// running `workload` as writes (one word per touched page, the pattern
/// repeated with a new seed each lap) at the source, its writes tracked
/// from before the memory is first scanned.
pub fn start_synthetic(
    size: u64,
    seed: u64,
    zero_percent: u8,
    workload: Workload,
) -> Result<(SourceMemory, Arc<SourceGuest>), SourceGuestError> {
    let mut map: MmapMut = synthetic_map(size, seed, zero_percent)?;
    let base = map.as_mut_ptr() as usize;
    let len = map.len();
    let memory: RegionBytes = Arc::new(map);
    let writer = Arc::new(Writer {
        stop: AtomicBool::new(false),
        writes: AtomicU64::new(0),
        thread: Mutex::new(None),
    });
    let w = writer.clone();
    // SAFETY: `base..base + len` is the private anonymous read-write
    // mapping held by `memory`, which the returned guest keeps alive
    // until after the tracker is dropped.
    let tracker =
        unsafe { WriteTracker::start(&[(base, len)], PAGE_SIZE, Box::new(move || w.pause())) }?;
    let pages = (len / PAGE_SIZE) as u64;
    let w = writer.clone();
    let thread = std::thread::Builder::new()
        .name("pw-src-guest".into())
        .spawn(move || write_loop(&w, base, pages, workload))
        .map_err(SourceGuestError::Thread)?;
    *writer.thread.lock().unwrap_or_else(|p| p.into_inner()) = Some(thread);
    let guest = Arc::new(SourceGuest {
        writer,
        tracker,
        _memory: memory.clone(),
        started: Instant::now(),
    });
    let mem = SourceMemory::new(
        MemoryLayout::single(size).map_err(ImageError::from)?,
        vec![memory],
    )
    .map_err(ImageError::from)?
    .with_dirty_log(guest.clone());
    Ok((mem, guest))
}

fn write_loop(w: &Writer, base: usize, pages: u64, workload: Workload) {
    let mut n = 0u64;
    let mut lap = 0u64;
    while !w.stop.load(Ordering::Relaxed) {
        let this = Workload {
            seed: workload.seed.wrapping_add(lap),
            ..workload.clone()
        };
        let before = n;
        for p in this.pages(pages) {
            if w.stop.load(Ordering::Relaxed) {
                return;
            }
            let at = base + p as usize * PAGE_SIZE + (n % 512) as usize * 8;
            // SAFETY: `p < pages`, so `at` is an aligned word inside the
            // guest's mapping, which outlives this thread (the guest joins
            // it before dropping the memory). While this guest runs, the
            // page server hands the same pages to the kernel to send
            // (concurrently, as any VMM's migration thread reads guest
            // memory a vCPU writes): a page sent while written may carry
            // either value of the word, and is sent again, since the
            // write is tracked. No Rust code reads the bytes until the
            // guest is paused (checksums come after the switch-over).
            unsafe { std::ptr::write_volatile(at as *mut u64, n) };
            n += 1;
            w.writes.store(n, Ordering::Relaxed);
            if this.think_us > 0 {
                let until = Instant::now() + Duration::from_micros(this.think_us);
                while Instant::now() < until {
                    std::hint::spin_loop();
                }
            }
        }
        lap += 1;
        if n == before {
            // A pattern with no pages: nothing to write, wait to be paused.
            while !w.stop.load(Ordering::Relaxed) {
                std::thread::sleep(Duration::from_millis(1));
            }
        }
    }
}
