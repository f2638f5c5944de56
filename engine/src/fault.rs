//! A fault service: an event loop that reads userfaultfd events and
//! keeps several urgent requests outstanding at once, so concurrent faults
//! are served concurrently and never queue behind one another. Several
//! services may read the same userfaultfd (one per CPU, see
//! [`crate::placement`]): each serves the faults it reads, on its own
//! urgent channel.

use std::collections::VecDeque;
use std::time::Instant;

use pagewire_transport::{ChannelClass, PageChannel, PageRange, TransportError};
use userfaultfd::EventBuffer;

use crate::error::EngineError;
use crate::governor::Urgent;
use crate::link::reconnect;
use crate::metrics::Metrics;
use crate::shared::Shared;
use crate::state::{Claim, PageOrigin};
use crate::uffd::{OnBusy, UffdEvent};

/// A fault whose page was requested on the urgent channel.
struct Pending {
    page: u64,
    t0: Instant,
    urgent: Urgent,
}

/// How long an urgent reply may be late before the loop stops polling for
/// it and waits in the channel's receive, with the I/O timeout.
const STALLED: std::time::Duration = std::time::Duration::from_millis(50);

/// How long the loop sleeps on the userfaultfd when nothing is
/// outstanding, before it looks at the stop conditions again (the last
/// page's arrival and a stop wake it at once, through
/// [`Shared::done_fd`]).
const IDLE_POLL_MS: i32 = 20;

/// Reads userfaultfd events: removals are applied at once, faults wait
/// in `faults` for the loop. Only fault services read events, so an
/// install that finds the owner changing its mappings (EAGAIN) on a
/// service reads them there, and lanes just wait. With several services
/// the event may be another's: reading and applying happen under
/// [`Shared::events`], so a drain that finds nothing returns only once
/// whatever another service read is applied.
struct Events {
    buf: EventBuffer,
    read: Vec<UffdEvent>,
    faults: VecDeque<(usize, Instant)>,
}

impl Events {
    fn drain(&mut self, shared: &Shared) -> Result<(), EngineError> {
        let _applied = shared.events.lock().unwrap_or_else(|p| p.into_inner());
        shared
            .installer
            .read_events(&mut self.buf, &mut self.read)?;
        let now = Instant::now();
        for ev in self.read.drain(..) {
            match ev {
                UffdEvent::Fault(addr) => self.faults.push_back((addr, now)),
                UffdEvent::Remove { start, end } => shared.apply_remove(start, end),
            }
        }
        Ok(())
    }
}

pub(crate) fn fault_main(
    shared: &Shared,
    channel: Box<dyn PageChannel>,
) -> Result<(), EngineError> {
    let mut ev = Events {
        buf: EventBuffer::new(64),
        read: Vec::with_capacity(64),
        faults: VecDeque::new(),
    };
    let r = fault_loop(shared, channel, &mut ev);
    // Faults read but not served (the loop stopped): a resumed migration
    // fetches their pages first, as their threads are blocked on them.
    if !ev.faults.is_empty() {
        let mem = shared.installer.memory();
        let mut retry = shared.retry.lock().unwrap_or_else(|p| p.into_inner());
        retry.extend(ev.faults.iter().filter_map(|&(addr, _)| mem.page_of(addr)));
    }
    r
}

fn fault_loop(
    shared: &Shared,
    mut channel: Box<dyn PageChannel>,
    ev: &mut Events,
) -> Result<(), EngineError> {
    let channel = &mut channel;
    let mut pending: VecDeque<Pending> = VecDeque::new();
    let mut buf = vec![0u8; shared.page_size()];
    let max = channel.max_outstanding().max(1);
    let spin = shared.config.fault_spin;
    let reply_spin = shared.config.reply_spin;
    // When the loop last had a fault or a reply to handle.
    let mut active = Instant::now();
    // Since when the urgent link has been lost with no reply since.
    let mut outage: Option<Instant> = None;
    loop {
        if shared.aborted() || (pending.is_empty() && shared.states.all_present()) {
            return Ok(());
        }
        // Wait for a fault, or for a reply when requests are outstanding.
        let (faults, mut reply) = if !ev.faults.is_empty() {
            (false, false)
        } else if pending.is_empty() && active.elapsed() < spin {
            // Just served a fault: the next of a burst comes soon; look
            // for it without sleeping (no wake-up to pay).
            std::hint::spin_loop();
            shared.installer.wait_with(None, None, 0)?
        } else if pending.is_empty() {
            shared
                .installer
                .wait_with(None, Some(shared.done_fd()), IDLE_POLL_MS)?
        } else if let Some(fd) = channel.ready_fd() {
            // The oldest reply is still young: poll for it without
            // sleeping (its thread is blocked on it anyway).
            let young = pending.front().is_some_and(|p| p.t0.elapsed() < reply_spin);
            if young {
                std::hint::spin_loop();
            }
            shared.installer.wait_with(
                Some(fd),
                Some(shared.done_fd()),
                if young { 0 } else { IDLE_POLL_MS },
            )?
        } else {
            // No fd to sleep on (RDMA): busy-poll both.
            shared.installer.wait_with(None, None, 0)?
        };
        if faults {
            let before = ev.faults.len();
            ev.drain(shared)?;
            // Every service is woken by every fault: only the one that
            // read it counts as active (and spins for the next).
            if ev.faults.len() > before {
                active = Instant::now();
            }
        }
        while let Some((addr, t0)) = ev.faults.pop_front() {
            let page = serve_fault(shared, addr, t0, &mut || ev.drain(shared))?;
            if let Some(page) = page {
                while pending.len() >= max {
                    receive_one(shared, channel, &mut pending, &mut buf, ev, &mut outage)?;
                }
                let urgent = shared.governor.urgent_begin();
                pending.push_back(Pending { page, t0, urgent });
                if let Err(e) = shared.send(channel, &[PageRange::new(page, 1)]) {
                    // The request stays outstanding: sent again once the
                    // link is back.
                    recover(shared, channel, &pending, e, &mut outage)?;
                }
                // Over every fault service, not only this one's.
                let n = u64::from(urgent.outstanding());
                shared
                    .metrics
                    .max_concurrent_faults
                    .fetch_max(n, std::sync::atomic::Ordering::Relaxed);
            }
        }
        // The poll above may already have said a reply is there; ask the
        // channel only when it has not.
        while !pending.is_empty()
            && (reply
                || match channel.reply_ready() {
                    Ok(r) => r,
                    Err(e) => {
                        recover(shared, channel, &pending, e, &mut outage)?;
                        false
                    }
                })
        {
            receive_one(shared, channel, &mut pending, &mut buf, ev, &mut outage)?;
            reply = false;
            active = Instant::now();
        }
        // A reply this late means a stalled or dead source: wait for it in
        // the channel's own receive, which gives up after the I/O timeout
        // (polling for readiness never would).
        if pending.front().is_some_and(|p| p.t0.elapsed() >= STALLED) {
            receive_one(shared, channel, &mut pending, &mut buf, ev, &mut outage)?;
        }
    }
}

/// Handles one fault event. Returns the page when it must be fetched on
/// the urgent channel; everything else is settled here.
fn serve_fault(
    shared: &Shared,
    addr: usize,
    t0: Instant,
    busy: OnBusy<'_>,
) -> Result<Option<u64>, EngineError> {
    let mem = shared.installer.memory();
    let page = mem.page_of(addr).ok_or(EngineError::StrayFault(addr))?;
    let range = PageRange::new(page, 1);
    Metrics::add(&shared.metrics.faults, 1);
    shared.metrics.timeline_fault();
    shared.heat.on_fault(page);
    if shared.config.sweep_from_fault {
        shared
            .sweep_cursor
            .store(page + 1, std::sync::atomic::Ordering::Relaxed);
    }
    let claim = shared.states.try_claim(page);
    shared
        .prepager
        .on_fault(page, mem.layout(), &shared.states, claim == Claim::Won);
    match claim {
        Claim::Won => {
            if shared.transport.info().zero.is_zero(page) {
                shared.split_claimed(&[range], PageOrigin::Fault, &mut Vec::new(), busy)?;
                Metrics::add(&shared.metrics.zero_faults, 1);
                shared.metrics.zero.record(t0.elapsed());
                shared.metrics.all.record(t0.elapsed());
                return Ok(None);
            }
            Ok(Some(page))
        }
        Claim::InFlight => {
            // Someone is fetching it: their install wakes the thread.
            Metrics::add(&shared.metrics.inflight_faults, 1);
            shared.wait_for(page, t0);
            Ok(None)
        }
        Claim::Present => {
            // Installed between the fault and now (the install woke the
            // thread already; this finds it mapped and wakes again), or
            // installed and then removed by the owner (a balloon): a
            // removed page reads as zeros.
            shared.installer.map_present_with(range, busy)?;
            shared.metrics.all.record(t0.elapsed());
            Ok(None)
        }
    }
}

/// The urgent link broke: reopen it and ask again for every page whose
/// reply had not arrived (the faulting threads stay blocked meanwhile).
fn recover(
    shared: &Shared,
    channel: &mut Box<dyn PageChannel>,
    pending: &VecDeque<Pending>,
    lost: TransportError,
    outage: &mut Option<Instant>,
) -> Result<(), EngineError> {
    let mut lost = lost;
    loop {
        *channel = reconnect(shared, ChannelClass::Urgent, lost, outage)?;
        match pending
            .iter()
            .try_for_each(|p| shared.send(channel, &[PageRange::new(p.page, 1)]))
        {
            Ok(()) => {
                Metrics::add(&shared.metrics.resent_pages, pending.len() as u64);
                return Ok(());
            }
            Err(e) => lost = e,
        }
    }
}

/// Receives the oldest urgent reply, installs the page and wakes the
/// faulting thread. A broken link is recovered instead: the request stays
/// outstanding and is sent again.
fn receive_one(
    shared: &Shared,
    channel: &mut Box<dyn PageChannel>,
    pending: &mut VecDeque<Pending>,
    buf: &mut [u8],
    ev: &mut Events,
    outage: &mut Option<Instant>,
) -> Result<(), EngineError> {
    if pending.is_empty() {
        return Ok(());
    }
    if let Err(e) = shared.recv(channel, buf) {
        return recover(shared, channel, pending, e, outage);
    }
    *outage = None;
    let Some(p) = pending.pop_front() else {
        return Ok(());
    };
    shared.governor.urgent_end(p.urgent);
    let range = PageRange::new(p.page, 1);
    shared.install_fetched(&[range], buf, PageOrigin::Fault, &mut || ev.drain(shared))?;
    let d = p.t0.elapsed();
    Metrics::add(&shared.metrics.network_faults, 1);
    shared.metrics.network.record(d);
    shared.metrics.all.record(d);
    Ok(())
}
