//! The destination side: one RC queue pair per channel, RDMA READs into a
//! registered staging buffer.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use crate::dirty::PageSet;
use crate::error::TransportError;
use crate::landing::Landing;
use crate::layout::{PageRange, SourceInfo};
use crate::tcp::TcpTransport;
use crate::wire::{RemoteRegion, SourceStats};
use crate::{ChannelClass, FetchLimits, PageChannel, Transport};

use super::verbs::{CompletionWait, Device, Mr, Qp, Read};

/// Pages from a pagewire source by one-sided RDMA READ. The TCP control
/// connection carries the handshake, queue pair set-up, checksums and
/// counters; page data never touches the source's CPU.
///
/// When RDMA stops working while TCP still does, the migration goes on
/// over TCP instead of failing (and [`Transport::name`] says so: `rdma,
/// fell back to tcp`): once a READ has completed, a channel that cannot
/// be set up over RDMA for a reason other than a lost link (the device or
/// its address went away, the queue pair will not connect), or READs
/// failing for [`FALLBACK_AFTER`] (at least twice the I/O timeout) with
/// none completing, opens that channel and every later one over TCP. A
/// shorter outage reconnects over RDMA.
pub struct RdmaTransport {
    control: TcpTransport,
    device: Arc<Device>,
    next_psn: AtomicU32,
    bulk_wait: CompletionWait,
    tcp_fallback: bool,
    /// RDMA's health, shared with every channel: whether a READ ever
    /// completed, and since when READs have been failing.
    health: Arc<Health>,
    fell_back: AtomicBool,
    /// Landing memory registered with the device, once offered.
    landing: OnceLock<Arc<RdmaLanding>>,
}

/// Landing memory registered for local writes: READs land in it directly.
struct RdmaLanding {
    // Declared first so they are dropped (deregistered) before the
    // landing memory's owner may unmap it.
    mrs: Vec<Mr>,
    landing: Arc<Landing>,
}

impl std::fmt::Debug for RdmaTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RdmaTransport")
            .field("device", &self.device)
            .finish_non_exhaustive()
    }
}

impl RdmaTransport {
    /// Uses `device` for pages of the source behind `control`.
    pub fn new(control: TcpTransport, device: Arc<Device>) -> Self {
        Self {
            control,
            device,
            next_psn: AtomicU32::new(std::process::id().wrapping_mul(7919)),
            bulk_wait: CompletionWait::Poll,
            tcp_fallback: true,
            health: Arc::new(Health::default()),
            fell_back: AtomicBool::new(false),
            landing: OnceLock::new(),
        }
    }

    /// Whether channels RDMA cannot carry any more are opened over TCP
    /// (the default) or the error is returned.
    pub fn with_tcp_fallback(mut self, on: bool) -> Self {
        self.tcp_fallback = on;
        self
    }

    /// Whether this transport fell back to TCP.
    pub fn fell_back(&self) -> bool {
        self.fell_back.load(Ordering::Acquire)
    }

    /// Opens `class` over TCP for the rest of the migration.
    fn fall_back(
        &self,
        class: ChannelClass,
        why: &dyn std::fmt::Display,
    ) -> Result<Box<dyn PageChannel>, TransportError> {
        // Only once TCP carries this channel: a link that is down for
        // both is a lost link, retried by the caller, not a reason.
        let ch = self.control.open(class)?;
        if !self.fell_back.swap(true, Ordering::AcqRel) {
            tracing::warn!(
                "RDMA cannot carry pages any more ({why}): falling back to TCP for the rest \
                 of this migration"
            );
        }
        Ok(ch)
    }

    /// A channel over a new queue pair, connected through the control
    /// connection.
    fn open_rdma(&self, class: ChannelClass) -> Result<Box<dyn PageChannel>, TransportError> {
        let wait = match class {
            ChannelClass::Urgent => CompletionWait::Poll,
            ChannelClass::Bulk(_) => self.bulk_wait,
        };
        let mut qp = self.device.create_qp((SLOTS * SLOT_RANGES) as u32, wait)?;
        let psn = self.next_psn.fetch_add(1_000_003, Ordering::Relaxed) & 0xff_ffff;
        let accept = self.control.rdma_connect(qp.endpoint(psn))?;
        qp.connect(psn, &accept.ep, false)?;
        let info = self.control.info().clone();
        let slot_len = SLOT_PAGES as usize * info.layout.page_size();
        Ok(Box::new(RdmaChannel {
            qp,
            regions: accept.regions,
            staging: Staging::new(&self.device, SLOTS * slot_len)?,
            slot_len,
            free_slots: (0..SLOTS).rev().collect(),
            posted: VecDeque::new(),
            completions: 0,
            info,
            timeout: self.control.io_timeout(),
            landing: self.landing.get().cloned(),
            health: self.health.clone(),
        }))
    }

    /// How bulk (lane) channels wait for completions; the urgent channel
    /// always busy-polls.
    pub fn with_bulk_wait(mut self, wait: CompletionWait) -> Self {
        self.bulk_wait = wait;
        self
    }

    /// The device in use.
    pub fn device(&self) -> &Arc<Device> {
        &self.device
    }
}

/// How long READs may keep failing, with none completing (while the TCP
/// control connection answers), before channels fall back to TCP; at least
/// twice the I/O timeout. A short outage reconnects over RDMA instead.
pub const FALLBACK_AFTER: Duration = Duration::from_secs(3);

/// Whether RDMA works, as every channel of one transport sees it.
#[derive(Debug, Default)]
struct Health {
    /// A READ completed once: RDMA works here, so failing later is RDMA
    /// failing, not a configuration to fix.
    worked: AtomicBool,
    /// Since when READs fail with none completing (a lost link).
    failing_since: std::sync::Mutex<Option<std::time::Instant>>,
}

impl Health {
    fn completed(&self) {
        self.worked.store(true, Ordering::Release);
        let mut f = self.failing_since.lock().unwrap_or_else(|p| p.into_inner());
        *f = None;
    }

    fn lost(&self) {
        let mut f = self.failing_since.lock().unwrap_or_else(|p| p.into_inner());
        f.get_or_insert_with(std::time::Instant::now);
    }

    fn failing_for(&self) -> Option<Duration> {
        let f = self.failing_since.lock().unwrap_or_else(|p| p.into_inner());
        f.map(|t| t.elapsed())
    }
}

/// Requests an RDMA channel keeps outstanding, each in its own staging slot.
const SLOTS: usize = 8;
/// Most pages one RDMA request may ask for (the staging slot's size).
const SLOT_PAGES: u64 = 256;
/// Most ranges (READ work requests) in one RDMA request.
const SLOT_RANGES: usize = 32;

/// The limits of one RDMA request: a staging slot's worth.
pub const RDMA_LIMITS: FetchLimits = FetchLimits {
    max_ranges: SLOT_RANGES,
    max_pages: SLOT_PAGES,
};

/// Staging memory registered for local writes: one slot per outstanding
/// request, registered once when the channel opens so that no fault pays
/// for a registration.
struct Staging {
    // Declared first so it is dropped (deregistered) before `buf` is freed.
    mr: Mr,
    buf: Vec<u8>,
}

impl Staging {
    fn new(device: &Arc<Device>, len: usize) -> Result<Self, TransportError> {
        let mut buf = vec![0u8; len];
        // SAFETY: `buf` is owned by the returned value next to its MR and is
        // never reallocated while the MR lives (the MR is dropped first:
        // field order).
        let mr = unsafe { device.register_local_write(buf.as_mut_ptr(), len) }?;
        Ok(Self { mr, buf })
    }
}

/// A request posted and not yet received.
struct Posted {
    /// Its staging slot; `None` when it lands in landing memory.
    slot: Option<usize>,
    reads: usize,
    len: usize,
}

struct RdmaChannel {
    qp: Qp,
    regions: Vec<RemoteRegion>,
    info: SourceInfo,
    staging: Staging,
    slot_len: usize,
    free_slots: Vec<usize>,
    posted: VecDeque<Posted>,
    /// Completions polled and not yet consumed by `recv`.
    completions: usize,
    timeout: Duration,
    landing: Option<Arc<RdmaLanding>>,
    /// The transport's view of whether RDMA works.
    health: Arc<Health>,
}

impl RdmaChannel {
    /// The READs of one request for `ranges`, each landing at the local
    /// address and key `local(range)` gives, and their total length.
    fn reads(
        &self,
        ranges: &[PageRange],
        mut local: impl FnMut(PageRange) -> Result<(u64, u32), TransportError>,
    ) -> Result<(Vec<Read>, usize), TransportError> {
        RDMA_LIMITS.check(ranges)?;
        let ps = self.info.layout.page_size();
        let mut reads = Vec::with_capacity(ranges.len());
        let mut total = 0usize;
        for r in ranges {
            let (region, roff) = self.info.layout.locate(*r)?;
            let remote = self.regions[region];
            // Bounded by SLOT_PAGES pages: fits u32.
            let len = r.count as usize * ps;
            let (addr, lkey) = local(*r)?;
            reads.push(Read {
                local: addr,
                lkey,
                len: len as u32,
                remote: remote.addr + roff as u64,
                rkey: remote.rkey,
            });
            total += len;
        }
        Ok((reads, total))
    }

    /// Waits for the oldest request's READs.
    fn complete(&mut self, p: &Posted) -> Result<(), TransportError> {
        match self
            .qp
            .poll_until(p.reads, &mut self.completions, self.timeout)
        {
            Ok(()) => {
                self.health.completed();
                self.completions -= p.reads;
                Ok(())
            }
            Err(e) => {
                if e.is_link_loss() {
                    self.health.lost();
                }
                Err(e)
            }
        }
    }
}

impl PageChannel for RdmaChannel {
    fn send(&mut self, ranges: &[PageRange]) -> Result<(), TransportError> {
        // Taken off the free list only once the READs are posted.
        let slot = *self
            .free_slots
            .last()
            .ok_or(TransportError::Misuse("too many requests outstanding"))?;
        let base = self.staging.buf.as_mut_ptr() as u64 + (slot * self.slot_len) as u64;
        let lkey = self.staging.mr.lkey();
        let mut off = 0u64;
        let (reads, len) = self.reads(ranges, |r| {
            let at = base + off;
            off += u64::from(r.count) * self.info.layout.page_size() as u64;
            Ok((at, lkey))
        })?;
        // SAFETY: every read lands inside this request's slot of `staging`,
        // registered for local write, which lives as long as the channel
        // (and so past every completion); the slot is not handed out again
        // before `recv` consumed this request's completions.
        unsafe { self.qp.post_reads(&reads) }?;
        self.free_slots.pop();
        self.posted.push_back(Posted {
            slot: Some(slot),
            reads: reads.len(),
            len,
        });
        Ok(())
    }

    fn recv(&mut self, buf: &mut [u8]) -> Result<(), TransportError> {
        let p = self
            .posted
            .pop_front()
            .ok_or(TransportError::Misuse("recv with no request outstanding"))?;
        let Some(slot) = p.slot else {
            return Err(TransportError::Misuse("recv of a request sent to land"));
        };
        if buf.len() != p.len {
            return Err(TransportError::BufferSize {
                want: p.len,
                got: buf.len(),
            });
        }
        self.complete(&p)?;
        let start = slot * self.slot_len;
        buf.copy_from_slice(&self.staging.buf[start..start + p.len]);
        self.free_slots.push(slot);
        Ok(())
    }

    fn send_landed(&mut self, ranges: &[PageRange]) -> Result<(), TransportError> {
        let landing = self
            .landing
            .as_ref()
            .ok_or(TransportError::Misuse("this channel has no landing memory"))?;
        if self.posted.len() >= SLOTS {
            return Err(TransportError::Misuse("too many requests outstanding"));
        }
        let (reads, len) = self.reads(ranges, |r| {
            let (span, addr) = landing
                .landing
                .locate_span(r)
                .ok_or(TransportError::Misuse("a range outside the landing memory"))?;
            Ok((addr as u64, landing.mrs[span].lkey()))
        })?;
        // SAFETY: every read lands inside one span of the landing memory,
        // registered for local write by the transport (the MR and the
        // memory outlive the channel, which holds the Arc); the caller
        // holds these pages until `recv_landed` (see `Landing::new`).
        unsafe { self.qp.post_reads(&reads) }?;
        self.posted.push_back(Posted {
            slot: None,
            reads: reads.len(),
            len,
        });
        Ok(())
    }

    fn recv_landed(&mut self) -> Result<(), TransportError> {
        match self.posted.front() {
            None => return Err(TransportError::Misuse("recv with no request outstanding")),
            Some(p) if p.slot.is_some() => {
                return Err(TransportError::Misuse(
                    "recv_landed of a request sent to a buffer",
                ))
            }
            Some(_) => {}
        }
        let p = self
            .posted
            .pop_front()
            .ok_or(TransportError::Misuse("recv with no request outstanding"))?;
        self.complete(&p)
    }

    fn reply_ready(&mut self) -> Result<bool, TransportError> {
        let Some(p) = self.posted.front() else {
            return Ok(false);
        };
        let need = p.reads;
        if self.completions < need {
            if let Err(e) = self.qp.poll_ready(&mut self.completions) {
                if e.is_link_loss() {
                    self.health.lost();
                }
                return Err(e);
            }
        }
        Ok(self.completions >= need)
    }

    fn outstanding(&self) -> usize {
        self.posted.len()
    }

    fn max_outstanding(&self) -> usize {
        SLOTS
    }
}

impl Transport for RdmaTransport {
    fn info(&self) -> &SourceInfo {
        self.control.info()
    }

    fn name(&self) -> &'static str {
        if self.fell_back() {
            "rdma, fell back to tcp"
        } else {
            "rdma"
        }
    }

    fn open(&self, class: ChannelClass) -> Result<Box<dyn PageChannel>, TransportError> {
        if self.fell_back() {
            return self.control.open(class);
        }
        let worked = self.health.worked.load(Ordering::Acquire);
        let patience = FALLBACK_AFTER.max(2 * self.control.io_timeout());
        if let Some(failing) = self.health.failing_for() {
            if worked && self.tcp_fallback && failing >= patience {
                return self.fall_back(
                    class,
                    &format_args!("no RDMA READ completed for {:.1} s", failing.as_secs_f64()),
                );
            }
        }
        match self.open_rdma(class) {
            Ok(ch) => Ok(ch),
            // Never worked: a configuration to fix, not to hide.
            Err(e) if !worked || !self.tcp_fallback || e.is_link_loss() => Err(e),
            Err(e) => self.fall_back(class, &e),
        }
    }

    fn limits(&self) -> FetchLimits {
        RDMA_LIMITS
    }

    fn lands_without_copy(&self) -> bool {
        true
    }

    fn set_landing(&self, landing: Arc<Landing>) -> Result<bool, TransportError> {
        if landing.page_size() != self.control.info().layout.page_size() {
            return Ok(false);
        }
        // One landing memory per transport: the same offered again (a
        // resumed migration) is registered already, other memory is not
        // taken.
        if let Some(held) = self.landing.get() {
            return Ok(Arc::ptr_eq(&held.landing, &landing));
        }
        // Channels that fall back to TCP land their pages as well.
        if !self.control.set_landing(landing.clone())? {
            return Ok(false);
        }
        let mut mrs = Vec::with_capacity(landing.spans().len());
        for s in landing.spans() {
            let len = s.pages as usize * landing.page_size();
            // SAFETY: the span is memory of this process mapped and
            // writable for `len` bytes while `landing` lives (its
            // contract); the MR is stored beside the Arc and dropped
            // first, so it never outlives the memory.
            match unsafe { self.device.register_local_write(s.addr as *mut u8, len) } {
                Ok(mr) => mrs.push(mr),
                Err(e) => {
                    // Registering pins the whole mapping (memlock limits,
                    // memory): without it READs go through staging.
                    tracing::warn!(
                        "cannot register guest memory for RDMA READs to land in ({e}): pages go \
                         through staging buffers"
                    );
                    return Ok(false);
                }
            }
        }
        let held = self.landing.get_or_init(|| {
            Arc::new(RdmaLanding {
                mrs,
                landing: landing.clone(),
            })
        });
        Ok(Arc::ptr_eq(&held.landing, &landing))
    }

    fn checksums(&self, range: PageRange) -> Result<Vec<u64>, TransportError> {
        self.control.checksums(range)
    }

    fn source_stats(&self) -> Result<SourceStats, TransportError> {
        self.control.source_stats()
    }

    fn done(&self) -> Result<(), TransportError> {
        self.control.done()
    }

    fn dirty_round(&self, round: u32, pause: bool) -> Result<PageSet, TransportError> {
        self.control.dirty_round(round, pause)
    }

    fn session(&self) -> Option<u64> {
        self.control.session()
    }
}
