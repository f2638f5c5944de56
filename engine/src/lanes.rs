//! Pusher lanes: each takes runs from the bubbles around recent faults
//! that have shown a pattern, then from the blocks the guest faults in
//! most ([`crate::heat`]), then from other bubbles, then from the sweep in
//! address order, and keeps several requests outstanding on its own bulk
//! channel, within what the [`crate::governor::Governor`] allows.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use pagewire_transport::{ChannelClass, PageChannel, PageRange, TransportError};
use tracing::debug;

use crate::arrival::Arrival;
use crate::error::EngineError;
use crate::governor::Sent;
use crate::link::reconnect;
use crate::metrics::Metrics;
use crate::shared::Shared;
use crate::state::PageOrigin;

/// How long an idle lane waits for room or for a new pivot before it
/// looks at the stop conditions again.
const IDLE_WAIT: Duration = Duration::from_millis(5);

/// A bulk request on the wire.
struct Pending {
    pieces: Vec<PageRange>,
    len: usize,
    origin: PageOrigin,
    /// Set on the last request of one governor ticket.
    sent: Option<Sent>,
}

/// What a lane claimed for one ticket.
struct Claimed {
    runs: Vec<PageRange>,
    origin: PageOrigin,
}

/// Claims up to `max` pages: bubble runs first, then (unless the ticket
/// was for a bubble) the sweep. `None` when there is nothing to claim.
fn claim(shared: &Shared, max: u64, sweep_done: &mut bool, bubble_only: bool) -> Option<Claimed> {
    let mut runs: Vec<PageRange> = Vec::new();
    let mut pages = 0;
    // Pages a stopped migration was fetching come first (threads may be
    // blocked on them).
    {
        let mut retry = shared.retry.lock().unwrap_or_else(|p| p.into_inner());
        while pages < max && runs.len() < shared.limits.max_ranges {
            let Some(p) = retry.pop() else { break };
            if shared.states.try_claim(p) != crate::state::Claim::Won {
                continue;
            }
            pages += 1;
            // Runs of consecutive pages, never across a region boundary.
            let layout = shared.installer.memory().layout();
            match runs.last_mut() {
                Some(r) if r.end() == p && layout.region_of(r.first) == layout.region_of(p) => {
                    r.count += 1
                }
                _ => runs.push(PageRange::new(p, 1)),
            }
        }
    }
    if !runs.is_empty() {
        return Some(Claimed {
            runs,
            origin: PageOrigin::Fault,
        });
    }
    // Bubbles that have shown they pay, then the blocks the guest faults
    // in most, then other bubbles.
    for confident_only in [true, false] {
        if !confident_only && shared.heat_active() && !bubble_only {
            let layout = shared.installer.memory().layout();
            if shared
                .heat
                .next_runs(&shared.states, layout, max, &mut runs)
            {
                return Some(Claimed {
                    runs,
                    origin: PageOrigin::Push,
                });
            }
        }
        while pages < max && runs.len() < shared.limits.max_ranges {
            match shared
                .prepager
                .next_run(&shared.states, max - pages, confident_only)
            {
                Some(r) => {
                    pages += u64::from(r.count);
                    runs.push(r);
                }
                None => break,
            }
        }
        if !runs.is_empty() {
            return Some(Claimed {
                runs,
                origin: PageOrigin::Bubble,
            });
        }
    }
    if bubble_only || *sweep_done || !shared.push_allowed() {
        return None;
    }
    if shared.next_sweep_runs(max, &mut runs) {
        Some(Claimed {
            runs,
            origin: PageOrigin::Push,
        })
    } else {
        *sweep_done = true;
        None
    }
}

pub(crate) fn lane_main(
    shared: &Shared,
    lane: usize,
    mut channel: Box<dyn PageChannel>,
) -> Result<(), EngineError> {
    let channel = &mut channel;
    // Since when this lane's link has been lost with no reply since.
    let mut outage: Option<Instant> = None;
    let max_out = channel.max_outstanding().max(1);
    let max_ranges = shared.limits.max_ranges.max(1);
    let max_pages = shared.limits.max_pages.max(1);
    let mut pending: VecDeque<Pending> = VecDeque::new();
    let mut pool: Vec<Vec<u8>> = Vec::new();
    let mut fetch = Vec::new();
    let mut sweep_done = false;
    let ps = shared.page_size();
    loop {
        if shared.aborted() {
            return Ok(());
        }
        // Fill the channel while the governor allows.
        while pending.len() < max_out {
            let wait = pending.is_empty().then_some(IDLE_WAIT);
            // A bubble ticket goes out even while a fault's request is
            // outstanding; the sweep's (hot blocks first) waits.
            let bubble = shared.prepager.has_open_bubble(true)
                || (shared.prepager.has_open_bubble(false)
                    && !(shared.heat_active() && shared.heat.pending()));
            let Some(ticket) = shared.governor.acquire_for(wait, bubble) else {
                break;
            };
            let Some(c) = claim(shared, u64::from(ticket.pages), &mut sweep_done, bubble) else {
                shared.governor.release(ticket);
                break;
            };
            fetch.clear();
            shared.split_claimed(&c.runs, c.origin, &mut fetch, &mut || shared.lane_busy())?;
            let counter = match c.origin {
                PageOrigin::Bubble => &shared.metrics.prepaged_pages,
                _ => &shared.metrics.pushed_pages,
            };
            let pages: u64 = fetch.iter().map(|r| u64::from(r.count)).sum();
            Metrics::add(counter, pages);
            if fetch.is_empty() {
                shared.governor.release(ticket);
                continue;
            }
            // Fits: at most the ticket's pages, a u32.
            let sent = shared.governor.commit(ticket, pages as u32);
            // Zero pages may have split the runs into more pieces than one
            // request carries: send several, the ticket rides on the last.
            let mut start = 0;
            while start < fetch.len() {
                let mut end = start;
                let mut n = 0u64;
                while end < fetch.len()
                    && end - start < max_ranges
                    && n + u64::from(fetch[end].count) <= max_pages
                {
                    n += u64::from(fetch[end].count);
                    end += 1;
                }
                if end == start {
                    return Err(EngineError::Memory(format!(
                        "a run of {} pages exceeds the transport's request limit of {max_pages}",
                        fetch[start].count
                    )));
                }
                while pending.len() >= max_out {
                    receive_one(shared, lane, channel, &mut pending, &mut pool, &mut outage)?;
                }
                let pieces = fetch[start..end].to_vec();
                let sent_now = shared.send(channel, &pieces);
                pending.push_back(Pending {
                    len: n as usize * ps,
                    pieces,
                    origin: c.origin,
                    sent: (end == fetch.len()).then_some(sent),
                });
                if let Err(e) = sent_now {
                    recover(shared, lane, channel, &mut pending, e, &mut outage)?;
                }
                start = end;
            }
        }
        if pending.is_empty() {
            if sweep_done || shared.states.all_present() {
                debug!(lane, "sweep done");
                return Ok(());
            }
            if !shared.push_allowed() {
                shared.prepager.wait_for_pivot(IDLE_WAIT);
            }
            continue;
        }
        receive_one(shared, lane, channel, &mut pending, &mut pool, &mut outage)?;
    }
}

/// The lane's link broke: reopen the channel and send again every request
/// whose reply had not arrived (their pages stay claimed by this lane).
fn recover(
    shared: &Shared,
    lane: usize,
    channel: &mut Box<dyn PageChannel>,
    pending: &mut VecDeque<Pending>,
    lost: TransportError,
    outage: &mut Option<Instant>,
) -> Result<(), EngineError> {
    let mut lost = lost;
    loop {
        *channel = reconnect(shared, ChannelClass::Bulk(lane as u16), lost, outage)?;
        // Sent again: still in the window, no round-trip sample.
        for p in pending.iter_mut() {
            if let Some(s) = p.sent.take() {
                p.sent = Some(shared.governor.resend(s));
            }
        }
        let resend = pending.iter().try_for_each(|p| {
            shared.send(channel, &p.pieces)?;
            let pages: u64 = p.pieces.iter().map(|r| u64::from(r.count)).sum();
            Metrics::add(&shared.metrics.resent_pages, pages);
            Ok::<(), TransportError>(())
        });
        match resend {
            Ok(()) => return Ok(()),
            Err(e) => lost = e,
        }
    }
}

/// Receives the oldest outstanding reply and installs it; a broken link is
/// recovered (the request stays outstanding and is sent again).
fn receive_one(
    shared: &Shared,
    lane: usize,
    channel: &mut Box<dyn PageChannel>,
    pending: &mut VecDeque<Pending>,
    pool: &mut Vec<Vec<u8>>,
    outage: &mut Option<Instant>,
) -> Result<(), EngineError> {
    let Some(mut p) = pending.pop_front() else {
        return Ok(());
    };
    let mut buf = pool.pop().unwrap_or_default();
    if !shared.landed {
        buf.resize(p.len, 0);
    }
    // Pages a fault waits on are installed as soon as they are here.
    let mut arrival = Arrival::new(shared, &p.pieces, p.origin);
    let got = shared.recv_streaming(channel, &mut buf, &mut |n, d| arrival.arrived(n, d));
    if let Err(e) = got {
        pool.push(buf);
        if arrival.installed() > 0 {
            // The link carried pages since it was last lost.
            *outage = None;
        }
        // Pages installed before the reply broke off are here: ask again
        // only for the rest.
        let rest = arrival.rest().inspect_err(|_| {
            tracing::warn!(lane, "the reply broke off ({e}) after an install failed");
        })?;
        if rest.is_empty() {
            // Every page is here (a channel that reported the whole reply
            // as arrived before failing): nothing to ask again.
            if let Some(sent) = p.sent {
                shared.governor.complete(sent);
            }
        } else {
            p.len = rest.iter().map(|r| r.count as usize).sum::<usize>() * shared.page_size();
            p.pieces = rest;
            pending.push_front(p);
        }
        return recover(shared, lane, channel, pending, e, outage);
    }
    *outage = None;
    if let Some(sent) = p.sent {
        // The reply's round trip, without the installs done while it came.
        let now = Instant::now();
        shared
            .governor
            .complete_at(sent, now.checked_sub(arrival.spent()).unwrap_or(now));
    }
    let done = arrival.finish(&buf);
    pool.push(buf);
    done
}
