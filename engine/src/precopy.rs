//! Pre-copy rounds before the switch-over: the hybrid migration and the
//! pre-copy baseline.
//!
//! While the guest still runs at the source, the destination copies every
//! page straight into its guest memory (not yet registered with
//! userfaultfd), then asks which pages the guest wrote meanwhile and
//! copies those again, round after round. At the switch-over the source
//! pauses the guest and answers the last round:
//! - hybrid ([`SwitchOver::PostCopy`]): pages written since they were
//!   copied are dropped (`MADV_DONTNEED`) and the post-copy migration
//!   starts with every other copied page present; only the dropped and
//!   the never-copied pages are left to fault or push (QEMU does the same
//!   with its "discard" bitmap);
//! - pre-copy ([`SwitchOver::StopAndCopy`]): the last round's pages are
//!   copied while the guest is paused, so nothing is left to fetch.
//!
//! The source's zero-page map is from the handshake: a page the guest
//! wrote after it is no longer known to be zero, which the post-copy phase
//! learns through a refreshed view of the source (`Refreshed`).

use std::sync::Arc;
use std::time::Instant;

use pagewire_transport::{
    ChannelClass, FetchLimits, Landing, PageChannel, PageRange, PageSet, SourceInfo, SourceStats,
    Transport, TransportError,
};
use serde::Serialize;

use crate::error::EngineError;
use crate::memory::DestMemory;

/// Most pages in one pre-copy request (1 MiB of 4 KiB pages).
const REQUEST_PAGES: u64 = 256;
/// Most pre-copy requests outstanding on the channel.
const OUTSTANDING: usize = 4;

/// What happens at the switch-over.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum SwitchOver {
    /// Resume at once; pages still dirty or never copied move post-copy.
    PostCopy,
    /// Copy the last dirty pages while the guest is paused, then resume
    /// with nothing left to fetch (classic pre-copy): every page present
    /// but the zero pages, which are mapped at their first touch.
    StopAndCopy,
}

/// How to pre-copy.
#[derive(Debug, Clone, Copy)]
pub struct PrecopyConfig {
    /// Most rounds before the switch-over. 0: none, the switch-over only
    /// (pure post-copy, or stop-and-copy of everything).
    pub rounds: u32,
    /// Switch over early once a round leaves at most this many dirty
    /// pages (pre-copy "converged").
    pub converge_pages: u64,
    /// What the switch-over does.
    pub switch_over: SwitchOver,
}

/// One pre-copy round.
#[derive(Debug, Clone, Serialize)]
pub struct RoundReport {
    /// Pages copied this round.
    pub pages: u64,
    /// Time the round's copying took.
    pub ms: f64,
    /// Pages the guest wrote during the round (copied again next round).
    pub dirtied: u64,
}

/// What pre-copy did, for the report.
#[derive(Debug, Clone, Serialize)]
pub struct PrecopyReport {
    /// The switch-over.
    pub switch_over: SwitchOver,
    /// Each round while the guest ran.
    pub rounds: Vec<RoundReport>,
    /// Pages copied while the guest ran, over all rounds.
    pub pages_sent: u64,
    /// Pages round 1 skipped: zero at the handshake.
    pub zero_at_handshake: u64,
    /// Pages the guest wrote after their last copy (the last round's
    /// answer): dropped (hybrid) or copied while paused (stop-and-copy).
    pub final_dirty: u64,
    /// Pages copied while the guest was paused (stop-and-copy).
    pub pages_sent_paused: u64,
    /// Pages present at the destination when it resumed.
    pub pages_present: u64,
    /// Copied pages dropped at the switch-over as stale (hybrid).
    pub discarded: u64,
    /// `MADV_DONTNEED` calls that dropped them (one per run of pages).
    pub discard_runs: u64,
    /// Time dropping them took, inside the downtime.
    pub discard_ms: f64,
    /// From asking the source to pause to having the last round's answer
    /// (and, for stop-and-copy, its pages): the downtime before the
    /// post-copy engine starts.
    pub switch_ms: f64,
    /// Time of all rounds while the guest ran.
    pub precopy_ms: f64,
}

/// The outcome of pre-copy, to start the post-copy phase with
/// ([`crate::Migration::start_after_precopy`]).
#[derive(Debug, Clone)]
pub struct Precopied {
    /// Pages in guest memory and current.
    pub present: PageSet,
    /// Pages the guest wrote at the source after the handshake (whatever
    /// the zero map said of them, they must be fetched).
    pub written: PageSet,
    /// What happened.
    pub report: PrecopyReport,
    /// When the source was asked to pause its guest.
    pub paused_at: Instant,
}

/// Runs pre-copy into `mem` (not yet registered with userfaultfd, mapped
/// by [`DestMemory::new`]) from `transport`, whose source tracks its
/// guest's writes. `on_round` is called before each round with its number
/// and page count (0 for the switch-over).
pub fn precopy(
    transport: &Arc<dyn Transport>,
    mem: &DestMemory,
    config: &PrecopyConfig,
    on_round: &mut dyn FnMut(u32, u64),
) -> Result<Precopied, EngineError> {
    let info = transport.info();
    // A bare switch-over (no rounds, then post-copy) copies nothing: the
    // memory may be on larger pages than the source's (hugetlbfs).
    let copies = config.rounds > 0 || config.switch_over == SwitchOver::StopAndCopy;
    if copies && mem.layout() != &info.layout {
        return Err(EngineError::Memory(
            "pre-copy needs guest memory laid out exactly like the source's".into(),
        ));
    }
    mem.check_source(&info.layout)?;
    if config.rounds > 0 && config.switch_over == SwitchOver::PostCopy && !mem.can_discard() {
        return Err(EngineError::Memory(
            "a hybrid migration needs guest memory mapped by pagewire (DestMemory::new) or \
             shared memory with a second mapping (DestMemory::new_shared)"
                .into(),
        ));
    }
    let pages = info.layout.total_pages();
    let mut channel = transport.open(ChannelClass::Bulk(0))?;
    let limits = crate::migration::limits_for(transport.as_ref());
    let mut present = PageSet::new(pages);
    let mut written = PageSet::new(pages);
    let mut rounds = Vec::new();
    let t0 = Instant::now();
    // Round 1 copies every page not known to be zero; later rounds what
    // the guest wrote during the round before.
    let mut todo: Vec<u64> = (0..pages).filter(|&p| !info.zero.is_zero(p)).collect();
    let mut round = 1u32;
    // Pages the last answer named that were not copied (converged early).
    let mut left: Vec<u64> = Vec::new();
    while round <= config.rounds {
        on_round(round, todo.len() as u64);
        let started = Instant::now();
        copy_pages(channel.as_mut(), mem, &todo, limits)?;
        for &p in &todo {
            present.insert(p);
        }
        let ms = started.elapsed().as_secs_f64() * 1000.0;
        if round == config.rounds {
            rounds.push(RoundReport {
                pages: todo.len() as u64,
                ms,
                dirtied: 0,
            });
            break;
        }
        let dirty = transport.dirty_round(round, false)?;
        written.union_with(&dirty);
        rounds.push(RoundReport {
            pages: todo.len() as u64,
            ms,
            dirtied: dirty.count(),
        });
        todo = dirty.iter().collect();
        round += 1;
        if todo.len() as u64 <= config.converge_pages {
            // Converged: what is left is small enough for the switch-over.
            left = std::mem::take(&mut todo);
            break;
        }
    }
    // `round` is now the switch-over's: the last round copied but not yet
    // asked (or the one after the last answer, when converged; 1 when
    // there were no rounds).
    let precopy_ms = t0.elapsed().as_secs_f64() * 1000.0;
    let pages_sent = rounds.iter().map(|r| r.pages).sum();
    on_round(0, 0);
    let paused_at = Instant::now();
    let mut last = transport.dirty_round(round, true)?;
    written.union_with(&last);
    for p in left {
        last.insert(p);
    }
    let final_dirty = last.count();
    // Copied, then written: stale.
    let stale: Vec<u64> = last.iter().filter(|&p| present.contains(p)).collect();
    let mut pages_sent_paused = 0;
    let (mut discard_runs, mut discard_ms) = (0, 0.0);
    match config.switch_over {
        SwitchOver::StopAndCopy => {
            // Everything not current and not a zero page, while paused.
            let list: Vec<u64> = (0..pages)
                .filter(|&p| {
                    (last.contains(p) || !present.contains(p))
                        && (written.contains(p) || !info.zero.is_zero(p))
                })
                .collect();
            copy_pages(channel.as_mut(), mem, &list, limits)?;
            pages_sent_paused = list.len() as u64;
            for p in list {
                present.insert(p);
            }
        }
        SwitchOver::PostCopy => {
            let t = Instant::now();
            let spans = runs(&stale, u64::from(u32::MAX), mem);
            discard_runs = spans.len() as u64;
            mem.discard_unregistered(&spans)?;
            discard_ms = t.elapsed().as_secs_f64() * 1000.0;
            let mut kept = PageSet::new(pages);
            for p in present.iter().filter(|&p| !last.contains(p)) {
                kept.insert(p);
            }
            present = kept;
        }
    }
    let switch_ms = paused_at.elapsed().as_secs_f64() * 1000.0;
    Ok(Precopied {
        report: PrecopyReport {
            switch_over: config.switch_over,
            rounds,
            pages_sent,
            zero_at_handshake: info.zero.count(),
            final_dirty,
            pages_sent_paused,
            pages_present: present.count(),
            discarded: stale.len() as u64,
            discard_runs,
            discard_ms,
            switch_ms,
            precopy_ms,
        },
        present,
        written,
        paused_at,
    })
}

/// Splits sorted `pages` into runs of at most `max` pages that stay
/// inside one region of `mem`.
fn runs(pages: &[u64], max: u64, mem: &DestMemory) -> Vec<PageRange> {
    let layout = mem.layout();
    let mut out: Vec<PageRange> = Vec::new();
    for &p in pages {
        if let Some(r) = out.last_mut() {
            let same_region = layout.region_of(r.first) == layout.region_of(p);
            if r.end() == p && u64::from(r.count) < max && same_region {
                r.count += 1;
                continue;
            }
        }
        out.push(PageRange::new(p, 1));
    }
    out
}

/// Copies `pages` (sorted) from the source into `mem`, pipelined.
fn copy_pages(
    channel: &mut dyn PageChannel,
    mem: &DestMemory,
    pages: &[u64],
    limits: FetchLimits,
) -> Result<(), EngineError> {
    let ps = mem.layout().page_size();
    let max = REQUEST_PAGES.min(limits.max_pages);
    let all = runs(pages, max, mem);
    // Requests: groups of runs within the limits.
    let mut requests: Vec<Vec<PageRange>> = Vec::new();
    let mut cur: Vec<PageRange> = Vec::new();
    let mut cur_pages = 0u64;
    for r in all {
        if !cur.is_empty()
            && (cur.len() >= limits.max_ranges || cur_pages + u64::from(r.count) > max)
        {
            requests.push(std::mem::take(&mut cur));
            cur_pages = 0;
        }
        cur_pages += u64::from(r.count);
        cur.push(r);
    }
    if !cur.is_empty() {
        requests.push(cur);
    }
    let depth = OUTSTANDING.min(channel.max_outstanding()).max(1);
    let mut sent = 0;
    let mut buf = Vec::new();
    for i in 0..requests.len() {
        while sent < requests.len() && sent < i + depth {
            channel.send(&requests[sent])?;
            sent += 1;
        }
        let req = &requests[i];
        buf.resize(pagewire_transport::ranges_len(req, ps), 0);
        channel.recv(&mut buf)?;
        let mut off = 0;
        for r in req {
            let len = r.count as usize * ps;
            mem.write_unregistered(*r, &buf[off..off + len])?;
            off += len;
        }
    }
    Ok(())
}

/// The source as the post-copy phase sees it after pre-copy: pages the
/// guest wrote after the handshake are no longer zero pages.
pub(crate) struct Refreshed {
    inner: Arc<dyn Transport>,
    info: SourceInfo,
}

impl Refreshed {
    pub(crate) fn new(inner: Arc<dyn Transport>, written: &PageSet) -> Self {
        let mut info = inner.info().clone();
        let mut zero = pagewire_transport::ZeroMap::new(info.layout.total_pages());
        for p in 0..info.layout.total_pages() {
            if info.zero.is_zero(p) && !written.contains(p) {
                zero.set(p);
            }
        }
        info.zero = zero;
        Self { inner, info }
    }
}

impl Transport for Refreshed {
    fn name(&self) -> &'static str {
        self.inner.name()
    }

    fn info(&self) -> &SourceInfo {
        &self.info
    }

    fn open(&self, class: ChannelClass) -> Result<Box<dyn PageChannel>, TransportError> {
        self.inner.open(class)
    }

    fn limits(&self) -> FetchLimits {
        self.inner.limits()
    }

    fn checksums(&self, range: PageRange) -> Result<Vec<u64>, TransportError> {
        self.inner.checksums(range)
    }

    fn source_stats(&self) -> Result<SourceStats, TransportError> {
        self.inner.source_stats()
    }

    fn session(&self) -> Option<u64> {
        self.inner.session()
    }

    fn done(&self) -> Result<(), TransportError> {
        self.inner.done()
    }

    fn dirty_round(&self, round: u32, pause: bool) -> Result<PageSet, TransportError> {
        self.inner.dirty_round(round, pause)
    }

    fn set_landing(&self, landing: Arc<Landing>) -> Result<bool, TransportError> {
        self.inner.set_landing(landing)
    }

    fn lands_without_copy(&self) -> bool {
        self.inner.lands_without_copy()
    }
}
