//! Tracking the source guest's writes with userfaultfd write-protection,
//! for the pre-copy rounds of a hybrid migration.
//!
//! Every page of the guest's memory is write-protected
//! (`UFFDIO_WRITEPROTECT`, with `UFFD_FEATURE_WP_UNPOPULATED` so pages
//! never touched are protected too). The first write to a protected page
//! blocks the writer and raises an event; a handler thread marks the page
//! dirty, lifts the protection on that page alone and wakes the writer,
//! which goes on at full speed until the next round. Collecting a round
//! takes the dirty set and protects exactly those pages again, under one
//! lock with the handler, so a write is always either in this round's set
//! or caught for the next one.

use std::io;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use pagewire_transport::{DirtyLog, PageSet};
use userfaultfd::{Event, EventBuffer, FaultKind, FeatureFlags, RegisterMode, Uffd, UffdBuilder};

use crate::error::EngineError;

/// `UFFD_FEATURE_WP_UNPOPULATED` (Linux 6.4): write-protect pages that
/// were never touched (the userfaultfd crate does not name it).
const FEATURE_WP_UNPOPULATED: u64 = 1 << 13;

/// One tracked range of host memory.
#[derive(Debug, Clone, Copy)]
struct Span {
    addr: usize,
    len: usize,
    /// Global page number of its first page.
    first: u64,
}

/// Called once, when the destination asks for the last round: it must
/// return only when the guest has stopped writing for good.
pub type PauseGuest = Box<dyn Fn() + Send + Sync>;

struct Inner {
    uffd: Uffd,
    spans: Vec<Span>,
    page_size: usize,
    pages: u64,
    /// Pages written since the last collect; the handler and collect
    /// both hold this lock while they change protections.
    dirty: Mutex<PageSet>,
    stop: AtomicBool,
    /// Tracking broke (the handler died, or a page could not be
    /// protected again): every later collect fails, so the destination
    /// never trusts an incomplete answer.
    failed: AtomicBool,
    /// Write faults handled, over all rounds.
    faults: AtomicU64,
    pause: PauseGuest,
    paused: AtomicBool,
}

/// Tracks writes to a guest's memory in this process (see the module
/// documentation). Dropping it lifts every protection and stops tracking.
pub struct WriteTracker {
    inner: Arc<Inner>,
    handler: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for WriteTracker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WriteTracker")
            .field("pages", &self.inner.pages)
            .field("faults", &self.write_faults())
            .finish_non_exhaustive()
    }
}

fn uffd_err(context: &'static str) -> impl FnOnce(userfaultfd::Error) -> EngineError {
    move |error| EngineError::Uffd {
        context: context.to_string(),
        error,
    }
}

fn io_err(e: userfaultfd::Error) -> io::Error {
    io::Error::other(format!("{e:?}"))
}

impl WriteTracker {
    /// Starts tracking writes to `regions` (host address, length), whose
    /// pages are numbered one after another from 0 in the order given.
    /// `pause` stops the guest (see [`PauseGuest`]).
    ///
    /// Start tracking before the memory is first read for sending (its
    /// zero-page scan included): writes before this call are not seen.
    ///
    /// # Safety
    /// Every region must be private anonymous memory mapped read-write in
    /// this process, page-aligned, and stay mapped for the tracker's life.
    pub unsafe fn start(
        regions: &[(usize, usize)],
        page_size: usize,
        pause: PauseGuest,
    ) -> Result<Self, EngineError> {
        let uffd = UffdBuilder::new()
            .close_on_exec(true)
            .non_blocking(true)
            .user_mode_only(false)
            .require_features(
                FeatureFlags::PAGEFAULT_FLAG_WP
                    | FeatureFlags::from_bits_retain(FEATURE_WP_UNPOPULATED),
            )
            .create()
            .map_err(uffd_err("create a write-protect userfaultfd"))?;
        let mut spans = Vec::with_capacity(regions.len());
        let mut first = 0u64;
        for &(addr, len) in regions {
            if addr % page_size != 0 || len % page_size != 0 || len == 0 {
                return Err(EngineError::Memory(format!(
                    "region {addr:#x}+{len:#x} is not whole pages of {page_size} bytes"
                )));
            }
            uffd.register_with_mode(addr as *mut libc::c_void, len, RegisterMode::WRITE_PROTECT)
                .map_err(uffd_err("register for write-protection"))?;
            uffd.write_protect(addr as *mut libc::c_void, len)
                .map_err(uffd_err("write-protect"))?;
            spans.push(Span { addr, len, first });
            first += (len / page_size) as u64;
        }
        let inner = Arc::new(Inner {
            uffd,
            spans,
            page_size,
            pages: first,
            dirty: Mutex::new(PageSet::new(first)),
            stop: AtomicBool::new(false),
            failed: AtomicBool::new(false),
            faults: AtomicU64::new(0),
            pause,
            paused: AtomicBool::new(false),
        });
        let i = inner.clone();
        let handler = std::thread::Builder::new()
            .name("pw-wp".into())
            .spawn(move || i.serve())
            .map_err(|error| EngineError::Thread {
                name: "pw-wp".into(),
                error,
            })?;
        Ok(Self {
            inner,
            handler: Some(handler),
        })
    }

    /// Write-protect faults handled so far (a page faults once per round
    /// and writer at most).
    pub fn write_faults(&self) -> u64 {
        self.inner.faults.load(Ordering::Relaxed)
    }

    /// Pages tracked.
    pub fn pages(&self) -> u64 {
        self.inner.pages
    }
}

impl Inner {
    fn page_of(&self, addr: usize) -> Option<(u64, usize)> {
        self.spans.iter().find_map(|s| {
            (addr >= s.addr && addr < s.addr + s.len).then(|| {
                let off = (addr - s.addr) / self.page_size;
                (s.first + off as u64, s.addr + off * self.page_size)
            })
        })
    }

    fn addr_of(&self, page: u64) -> Option<usize> {
        self.spans.iter().find_map(|s| {
            let n = (s.len / self.page_size) as u64;
            (page >= s.first && page < s.first + n)
                .then(|| s.addr + (page - s.first) as usize * self.page_size)
        })
    }

    fn dirty(&self) -> std::sync::MutexGuard<'_, PageSet> {
        // A panic mid-update leaves a valid set: keep going.
        self.dirty.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn serve(&self) {
        let mut buf = EventBuffer::new(64);
        while !self.stop.load(Ordering::Acquire) {
            let mut pfd = libc::pollfd {
                fd: self.uffd.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one valid pollfd for the duration of the call.
            let n = unsafe { libc::poll(&mut pfd, 1, 100) };
            if n <= 0 {
                continue;
            }
            let events = match self.uffd.read_events(&mut buf) {
                Ok(ev) => ev,
                Err(userfaultfd::Error::SystemError(e)) if e as i32 == libc::EAGAIN => continue,
                Err(e) => {
                    tracing::error!("write tracker: reading events: {e:?}");
                    self.give_up();
                    return;
                }
            };
            for ev in events {
                match ev {
                    Ok(Event::Pagefault {
                        kind: FaultKind::WriteProtected,
                        addr,
                        ..
                    }) => self.on_write(addr as usize),
                    Ok(other) => tracing::debug!(?other, "write tracker: ignored event"),
                    Err(e) => tracing::error!("write tracker: bad event: {e:?}"),
                }
            }
        }
    }

    /// Tracking cannot go on: every later collect fails, and every span is
    /// unregistered, which lifts the protections and wakes writers blocked
    /// on them (they must never hang the guest).
    fn give_up(&self) {
        self.failed.store(true, Ordering::Release);
        for s in &self.spans {
            let _ = self.uffd.unregister(s.addr as *mut libc::c_void, s.len);
        }
    }

    fn on_write(&self, addr: usize) {
        let Some((page, page_addr)) = self.page_of(addr) else {
            tracing::error!(addr, "write tracker: fault outside the tracked memory");
            return;
        };
        let mut dirty = self.dirty();
        dirty.insert(page);
        self.faults.fetch_add(1, Ordering::Relaxed);
        // Lifting the protection wakes the writer.
        if let Err(e) =
            self.uffd
                .remove_write_protection(page_addr as *mut libc::c_void, self.page_size, true)
        {
            tracing::error!(page, "write tracker: cannot unprotect: {e:?}");
            drop(dirty);
            self.give_up();
        }
    }

    fn collect(&self, pause: bool) -> io::Result<PageSet> {
        let broken = || io::Error::other("write tracking broke: writes may have been missed");
        if self.failed.load(Ordering::Acquire) {
            return Err(broken());
        }
        if pause && !self.paused.swap(true, Ordering::AcqRel) {
            (self.pause)();
        }
        let mut dirty = self.dirty();
        if self.failed.load(Ordering::Acquire) {
            return Err(broken());
        }
        let set = std::mem::replace(&mut *dirty, PageSet::new(self.pages));
        if self.paused.load(Ordering::Acquire) {
            // Nothing writes any more: the protections stay (lifting them
            // all takes milliseconds, inside the downtime) until the
            // tracker is dropped, which unregisters the memory.
            return Ok(set);
        }
        // Protect again exactly the pages written, in runs.
        let protect = |first: u64, count: u64| -> io::Result<()> {
            let addr = self
                .addr_of(first)
                .ok_or_else(|| io::Error::other("dirty page outside the tracked memory"))?;
            // A run never crosses a span: spans are checked page by page.
            let len = count as usize * self.page_size;
            self.uffd
                .write_protect(addr as *mut libc::c_void, len)
                .map_err(io_err)
        };
        let protect_all = || -> io::Result<()> {
            let mut run: Option<(u64, u64)> = None;
            for p in set.iter() {
                let next = self.addr_of(p);
                run = match run {
                    Some((f, c))
                        if f + c == p
                            && next == self.addr_of(f).map(|a| a + c as usize * self.page_size) =>
                    {
                        Some((f, c + 1))
                    }
                    Some((f, c)) => {
                        protect(f, c)?;
                        Some((p, 1))
                    }
                    None => Some((p, 1)),
                };
            }
            match run {
                Some((f, c)) => protect(f, c),
                None => Ok(()),
            }
        };
        if let Err(e) = protect_all() {
            // Pages left unprotected would be written unseen: keep this
            // round's pages for a caller that retries, and fail for good.
            dirty.union_with(&set);
            drop(dirty);
            self.give_up();
            return Err(e);
        }
        Ok(set)
    }
}

impl DirtyLog for WriteTracker {
    fn collect(&self, pause: bool) -> io::Result<PageSet> {
        self.inner.collect(pause)
    }
}

impl Drop for WriteTracker {
    fn drop(&mut self) {
        self.inner.stop.store(true, Ordering::Release);
        for s in &self.inner.spans {
            // Unregistering lifts the protection and wakes any writer.
            let _ = self
                .inner
                .uffd
                .unregister(s.addr as *mut libc::c_void, s.len);
        }
        if let Some(h) = self.handler.take() {
            let _ = h.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use memmap2::MmapMut;

    const PS: usize = 4096;

    fn write(base: usize, page: usize, v: u8) {
        // SAFETY: the page lies inside the test's live mapping.
        unsafe { std::ptr::write_volatile((base + page * PS + 7) as *mut u8, v) }
    }

    #[test]
    fn a_page_written_is_reported_once_per_round_and_one_not_written_never() {
        let mut map = MmapMut::map_anon(64 * PS).unwrap();
        // Half the pages populated, half never touched.
        for p in 0..32 {
            map[p * PS] = 1;
        }
        let base = map.as_mut_ptr() as usize;
        let paused = Arc::new(AtomicBool::new(false));
        let p2 = paused.clone();
        // SAFETY: `map` is anonymous, read-write and outlives the tracker.
        let t = unsafe {
            WriteTracker::start(
                &[(base, 64 * PS)],
                PS,
                Box::new(move || p2.store(true, Ordering::Release)),
            )
        }
        .unwrap();
        // Writes from another thread, as a vCPU's would be.
        std::thread::spawn(move || {
            for p in [3, 40, 3, 63] {
                write(base, p, 9);
            }
        })
        .join()
        .unwrap();
        let r1 = t.collect(false).unwrap();
        assert_eq!(r1.iter().collect::<Vec<_>>(), [3, 40, 63]);
        assert_eq!(t.write_faults(), 3, "a page faults once per round");
        // Nothing written since: an empty round.
        assert!(t.collect(false).unwrap().is_empty());
        // Written again after the round: protected again, reported again.
        std::thread::spawn(move || write(base, 40, 1))
            .join()
            .unwrap();
        std::thread::spawn(move || write(base, 41, 1))
            .join()
            .unwrap();
        let last = t.collect(true).unwrap();
        assert!(paused.load(Ordering::Acquire));
        assert_eq!(last.iter().collect::<Vec<_>>(), [40, 41]);
        // Dropped: the memory is unregistered and writes go through.
        let before = t.write_faults();
        drop(t);
        write(base, 5, 1);
        assert_eq!(before, 5);
        assert_eq!(map[40 * PS + 7], 1);
        assert_eq!(map[5 * PS + 7], 1);
    }

    #[test]
    fn regions_that_are_not_whole_pages_are_refused() {
        let mut map = MmapMut::map_anon(4 * PS).unwrap();
        let base = map.as_mut_ptr() as usize;
        // SAFETY: `map` is anonymous, read-write and outlives the call.
        let r = unsafe { WriteTracker::start(&[(base + 1, PS)], PS, Box::new(|| {})) };
        assert!(matches!(r, Err(EngineError::Memory(_))));
    }
}
