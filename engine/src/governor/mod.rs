//! Flow control of the bulk (bubble and push) traffic.
//!
//! Faults must not queue behind bulk bytes at the bottleneck: socket
//! buffers, the qdisc, the NIC or the link's shaper. The destination asks
//! for every bulk byte, so it controls what is in flight: lanes ask the
//! governor before each request ([`Governor::acquire`]), and the governor
//! keeps
//! - requests small: one page, growing only while growing pays
//!   (`size.rs`);
//! - bytes in flight near what the link needs, with a delay-based window
//!   (`window.rs`);
//! - the sweep quiet while a fault's request is outstanding (`urgent.rs`);
//! - while the guest does not fault, a larger window of its own that lets
//!   an idle guest's memory come at the path's speed, cut where faults
//!   after a pause show its queue was in their way (`idle.rs`);
//! - bulk under an optional bytes-per-second cap (`push_rate.rs`).

use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::waits::FaultWaits;

mod epoch;
mod idle;
mod push_rate;
mod size;
#[cfg(test)]
mod testing;
mod urgent;
mod window;

use epoch::Epoch;
use idle::IdleWindow;
pub use idle::{IDLE_AFTER, IDLE_DRAIN, IDLE_HURT, SOFT_HOLD};
use push_rate::Bucket;
use size::SizeProbe;
pub use size::{CHUNK_TIME, PROBE_FAULT_COST};
pub use urgent::Urgent;
use urgent::NO_FAULT;
pub use window::TARGET_DELAY;
use window::{class_of, CLASSES};

/// Largest window, whatever the link.
const MAX_WINDOW: f64 = (64 << 20) as f64;

/// Room to send one bulk request of up to `pages` pages.
#[derive(Debug)]
#[must_use = "a ticket holds window room until committed or released"]
pub struct Ticket {
    /// Most pages the request may ask for.
    pub pages: u32,
    reserved: u64,
    /// Granted while the guest was idle.
    idle: bool,
}

/// A bulk request on the wire, to be reported with
/// [`Governor::complete`] when its reply has arrived.
#[derive(Debug, Clone, Copy)]
pub struct Sent {
    pages: u32,
    bytes: u64,
    at: Instant,
    inflight: u64,
    /// Whether its round trip is a sample of the path.
    sample: bool,
    /// Sent while the guest was idle: sizes the idle window and counts
    /// towards the peak rate only.
    idle: bool,
    /// Requests refused window room before this one was sent.
    refused: u64,
}

/// What the flow control settled on, for the report.
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct FlowStats {
    /// Whether delay-based flow control ran.
    pub enabled: bool,
    /// Bulk bytes allowed in flight at the end.
    pub window_bytes: u64,
    /// Pages per bulk request at the end.
    pub chunk_pages: u32,
    /// Highest bulk delivery rate seen over one epoch, in MB/s.
    pub peak_rate_mbps: f64,
    /// Smallest bulk round trip seen for the final request size, in µs.
    pub min_rtt_us: f64,
    /// Times lanes held back because a fault's request was outstanding.
    pub urgent_holds: u64,
    /// Bulk requests sent while the guest was idle (not faulting), with
    /// the larger idle window.
    pub idle_requests: u64,
    /// Bulk bytes allowed in flight while the guest is idle, at the end.
    pub idle_window_bytes: u64,
    /// Smallest bulk round trip per request size measured, in µs, as
    /// (pages, µs): their slope is the wire time of a page.
    pub min_rtt_by_size_us: Vec<(u32, f64)>,
}

/// What the governor learns and holds, behind its lock.
#[derive(Debug)]
struct State {
    /// Bulk bytes granted and not yet arrived.
    inflight: u64,
    /// The delay-based window, bytes.
    window: f64,
    /// Where the window's growth turns from doubling to additive.
    ssthresh: f64,
    /// Pages per request.
    chunk: u32,
    /// Minimum round trip per size class, and when it was last lowered or
    /// confirmed.
    class_min: [Option<(Duration, Instant)>; CLASSES],
    /// Samples of the current size class since it became current.
    samples: u32,
    /// Smoothed queueing delay (round trip above the minimum), seconds.
    queue_delay: f64,
    /// When the window was last cut.
    last_cut: Instant,
    /// Delivery of requests that are samples of the path.
    epoch: Epoch,
    /// Highest rate of an epoch, idle or not.
    peak_rate: f64,
    /// The request-size probe.
    probe: SizeProbe,
    /// The idle window.
    idle: IdleWindow,
    /// The push-rate cap's bucket.
    bucket: Bucket,
    /// Times lanes held back behind a fault's request.
    holds: u64,
}

/// Admission control for bulk requests; see the module docs.
#[derive(Debug)]
pub struct Governor {
    page_size: u64,
    max_chunk: u32,
    enabled: bool,
    push_rate: Option<f64>,
    /// What faults wait on (their requests outstanding, pages in flight).
    waits: Arc<FaultWaits>,
    /// When the last fault's request went out, in µs since `born`
    /// ([`NO_FAULT`] before the first).
    last_urgent_us: AtomicU64,
    born: Instant,
    /// No fault for this long: idle ([`IDLE_AFTER`]); `None`: never idle.
    idle_after_us: Option<u64>,
    /// Fastest fault round trip in ns ([`NO_FAULT`] before the first):
    /// kept outside the lock, which a fault's reply takes only when it
    /// has something to say about the idle window.
    fault_base_ns: AtomicU64,
    /// Fault round trips since the last epoch of samples ended (what a
    /// size probe costs faults): their sum in seconds and their count,
    /// under a lock of their own, so a sum and its count stay together.
    faults_since: Mutex<(f64, u32)>,
    state: Mutex<State>,
    cv: Condvar,
}

impl Governor {
    /// A governor for pages of `page_size` bytes and requests of at most
    /// `max_chunk` pages. `enabled` turns the delay-based window on;
    /// `push_rate` caps bulk bytes per second.
    pub fn new(page_size: usize, max_chunk: u32, enabled: bool, push_rate: Option<u64>) -> Self {
        let max_chunk = max_chunk.max(1);
        let chunk = if enabled { 1 } else { max_chunk };
        let now = Instant::now();
        Self {
            page_size: page_size as u64,
            max_chunk,
            enabled,
            push_rate: push_rate.map(|r| r.max(1) as f64),
            waits: Arc::default(),
            last_urgent_us: AtomicU64::new(NO_FAULT),
            born: now,
            idle_after_us: Some(IDLE_AFTER.as_micros() as u64),
            fault_base_ns: AtomicU64::new(NO_FAULT),
            faults_since: Mutex::new((0.0, 0)),
            state: Mutex::new(State {
                inflight: 0,
                window: 2.0 * (u64::from(chunk) * page_size as u64) as f64,
                ssthresh: MAX_WINDOW,
                chunk,
                class_min: [None; CLASSES],
                samples: 0,
                queue_delay: 0.0,
                last_cut: now,
                epoch: Epoch::new(now),
                peak_rate: 0.0,
                probe: SizeProbe::new(now, chunk),
                idle: IdleWindow::new(now),
                bucket: Bucket::new(now),
                holds: 0,
            }),
            cv: Condvar::new(),
        }
    }

    /// Counts faults' requests in `waits` (none outstanding), which the
    /// fault services, the lanes and the huge-page view share.
    pub fn with_waits(mut self, waits: Arc<FaultWaits>) -> Self {
        self.waits = waits;
        self
    }

    /// What faults wait on.
    pub fn waits(&self) -> &Arc<FaultWaits> {
        &self.waits
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // Plain numbers: a panic elsewhere cannot leave them unusable.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Bytes of one request at the current size.
    fn chunk_bytes(&self, st: &State) -> u64 {
        u64::from(st.chunk) * self.page_size
    }

    /// Asks for room to send one bulk request. Without `wait` it answers at
    /// once; with it, it waits up to that long for room. `None`: no room.
    /// The sweep is held while a fault's request is outstanding.
    pub fn acquire(&self, wait: Option<Duration>) -> Option<Ticket> {
        self.acquire_for(wait, false)
    }

    /// [`Self::acquire`] for a bubble request: bubbles around a fault are
    /// what the guest touches next, so they are not held behind faults
    /// (a guest walking memory would otherwise fault on every page, each
    /// fault holding back the bubble that would have spared the next);
    /// the window still bounds them.
    pub fn acquire_for(&self, wait: Option<Duration>, bubble: bool) -> Option<Ticket> {
        let deadline = wait.map(|w| Instant::now() + w);
        let mut st = self.lock();
        let mut held = false;
        let mut refused = false;
        loop {
            let idle = self.idle();
            let (window, pages) = if idle {
                self.idle_limits(&st)
            } else {
                (st.window, st.chunk)
            };
            let cb = u64::from(pages) * self.page_size;
            let urgent = self.enabled && !bubble && self.waits.urgent() > 0;
            let window_ok =
                !self.enabled || st.inflight == 0 || (st.inflight + cb) as f64 <= window;
            let pause = self.refill(&mut st, cb);
            if !urgent && window_ok && pause.is_zero() {
                st.inflight += cb;
                self.spend(&mut st, cb as f64);
                return Some(Ticket {
                    pages,
                    reserved: cb,
                    idle,
                });
            }
            if urgent && !held {
                held = true;
                st.holds += 1;
            }
            if idle && !urgent && !window_ok && !refused {
                refused = true;
                st.idle.refused += 1;
            }
            let now = Instant::now();
            let left = match deadline {
                Some(d) if d > now => d - now,
                _ => return None,
            };
            let nap = if pause.is_zero() {
                left
            } else {
                left.min(pause)
            };
            st = self
                .cv
                .wait_timeout(st, nap)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }

    /// Gives back a ticket that was not used.
    pub fn release(&self, ticket: Ticket) {
        let mut st = self.lock();
        st.inflight -= ticket.reserved.min(st.inflight);
        self.spend(&mut st, -(ticket.reserved as f64));
        self.cv.notify_all();
    }

    /// Turns a ticket into a request of `pages` pages (at most the
    /// ticket's) that is being sent now.
    pub fn commit(&self, ticket: Ticket, pages: u32) -> Sent {
        let bytes = u64::from(pages.min(ticket.pages)) * self.page_size;
        let mut st = self.lock();
        let unused = ticket.reserved.saturating_sub(bytes);
        st.inflight -= unused.min(st.inflight);
        self.spend(&mut st, -(unused as f64));
        if unused > 0 {
            self.cv.notify_all();
        }
        st.idle.requests += u64::from(ticket.idle);
        Sent {
            pages,
            bytes,
            at: Instant::now(),
            inflight: st.inflight,
            sample: !ticket.idle,
            idle: ticket.idle,
            refused: st.idle.refused,
        }
    }

    /// A request whose reply was lost with its link, sent again on the new
    /// connection: its bytes stay in the window (they are in flight again)
    /// until [`Self::complete`], which then teaches nothing about round
    /// trips (a fresh connection's first exchange is no measure of the
    /// path).
    pub fn resend(&self, sent: Sent) -> Sent {
        Sent {
            at: Instant::now(),
            sample: false,
            idle: false,
            ..sent
        }
    }

    /// Reports that the reply to `sent` has fully arrived, and adapts the
    /// request size and the window.
    pub fn complete(&self, sent: Sent) {
        self.complete_at(sent, Instant::now());
    }

    /// [`Self::complete`], the reply having arrived at `now` (earlier
    /// than the call when the caller did other work meanwhile).
    pub fn complete_at(&self, sent: Sent, now: Instant) {
        let rtt = now.duration_since(sent.at);
        let mut st = self.lock();
        st.inflight -= sent.bytes.min(st.inflight);
        self.cv.notify_all();
        if !self.enabled {
            return;
        }
        if sent.idle {
            self.complete_idle(&mut st, &sent, rtt, now);
        }
        if sent.sample {
            self.adapt_window(&mut st, &sent, rtt, now);
        }
    }

    /// What the flow control settled on.
    pub fn stats(&self) -> FlowStats {
        let st = self.lock();
        FlowStats {
            enabled: self.enabled,
            window_bytes: st.window as u64,
            chunk_pages: st.chunk,
            peak_rate_mbps: st.peak_rate / 1e6,
            min_rtt_us: st.class_min[class_of(st.chunk)]
                .map_or(0.0, |(d, _)| d.as_secs_f64() * 1e6),
            urgent_holds: st.holds,
            idle_requests: st.idle.requests,
            idle_window_bytes: Self::idle_window(&st) as u64,
            min_rtt_by_size_us: st
                .class_min
                .iter()
                .enumerate()
                .filter_map(|(k, m)| m.map(|(d, _)| (1u32 << k, d.as_secs_f64() * 1e6)))
                .collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn without_flow_control_requests_are_full_size_and_unlimited() {
        let g = Governor::new(4096, 64, false, None);
        let _u = g.urgent_begin();
        let tickets: Vec<_> = (0..100).map(|_| g.acquire(None).unwrap()).collect();
        assert!(tickets.iter().all(|t| t.pages == 64));
    }

    #[test]
    fn a_request_smaller_than_its_ticket_gives_the_rest_back() {
        let g = Governor::new(4096, 64, false, None);
        let t = g.acquire(None).expect("no window");
        assert_eq!(t.pages, 64);
        let s = g.commit(t, 3);
        assert_eq!(g.lock().inflight, 3 * 4096);
        g.complete(s);
        assert_eq!(g.lock().inflight, 0);
    }
}
