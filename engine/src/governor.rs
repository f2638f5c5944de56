//! Flow control of the bulk (bubble and push) traffic.
//!
//! Faults must not queue behind bulk bytes at the bottleneck: socket
//! buffers, the qdisc, the NIC or the link's shaper. The destination asks
//! for every bulk byte, so it controls what is in flight: lanes ask the
//! governor before each request, and the governor keeps
//! - requests small: a request starts at one page and grows only while
//!   growing pays. Now and then one epoch runs at twice the size; the
//!   size is kept only if that epoch delivered clearly more than the
//!   best of the last few epochs before it and the one after it (the path
//!   was paying per request, as when the CPU is the limit; on a link,
//!   epochs that faults held back would make any probe look like a gain),
//!   and never beyond what takes [`CHUNK_TIME`] x 2 at the
//!   measured rate. On a link, where the rate does not grow with the size,
//!   requests stay at about [`CHUNK_TIME`] of wire time, so an urgent
//!   reply never waits behind a large one;
//! - bytes in flight near what the link needs, with a delay-based window
//!   (as Swift or TCP Vegas do, on whole requests): the window grows while
//!   requests come back within [`TARGET_DELAY`] of the minimum round trip
//!   for their size and shrinks when round trips grow past it, which means
//!   bytes are queueing somewhere;
//! - the sweep quiet while a fault's request is outstanding (faults
//!   preempt the push; bubbles, what the guest touches next, only wait for
//!   window room), and bulk under an optional bytes-per-second cap;
//! - while the guest does not fault (not yet, or not for [`IDLE_AFTER`]),
//!   there is no reply to protect: a window of its own lets the bulk queue
//!   up to [`IDLE_DRAIN`] at the bottleneck, so an idle guest's memory
//!   comes at the path's speed (where the CPU is the limit, small requests
//!   cost most of it) and the first fault after the pause waits behind at
//!   most about that much bulk. The idle window doubles each round trip
//!   while requests come back within half of [`IDLE_DRAIN`] of the
//!   path's smallest round trip, grows by about one request per round
//!   trip up to it, and past it is cut to what would have drained, by at
//!   most half per round trip; it grows only while the window was what
//!   held the bulk back. So it opens within a few round trips, and a
//!   shaper's burst allowance, which makes a link look fast until it runs
//!   out, costs a few cuts once the queue shows. Where that queue is in
//!   the faults' way (a link, not the CPU), the first fault after the
//!   pause comes back late ([`IDLE_HURT`] above the fastest fault): the
//!   idle window is halved and may not grow past that until faults after
//!   pauses come back on time. Round trips while idle are no samples for
//!   the delay-based window; the first fault puts that one back in charge. A wait on a page a lane is fetching does not: a
//!   guest walking memory behind the push gains more from the push's
//!   speed than from shorter waits.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use serde::Serialize;

/// Without a fault for this long, the guest is idle (see the module docs).
pub const IDLE_AFTER: Duration = Duration::from_millis(10);
/// While the guest is idle, bulk round trips are kept within this long of
/// the path's smallest: about what the first fault after the pause may
/// wait behind.
pub const IDLE_DRAIN: Duration = Duration::from_micros(500);
/// `last_urgent_us` before the first fault.
const NO_FAULT: u64 = u64::MAX;
/// A fault's round trip this much above the fastest one, right after an
/// idle period, means the idle bulk queued where the fault's reply had to
/// pass (a link): the idle window is halved, and may not grow past that.
/// Below it (the CPU was the limit, or the idle window was small) the
/// ceiling doubles again.
const IDLE_HURT: Duration = Duration::from_micros(80);
/// Wire time one bulk request should take at the measured rate.
pub const CHUNK_TIME: Duration = Duration::from_micros(40);
/// How often the delivery rate and the request size are reconsidered.
const EPOCH: Duration = Duration::from_millis(20);
/// A doubled request size is kept when its epoch delivered this much more
/// than the best of the last [`RECENT_EPOCHS`] at the current size and the
/// epoch after it.
const PROBE_GAIN: f64 = 1.4;
/// Epochs at the current request size a probe is judged against.
const RECENT_EPOCHS: usize = 4;
/// Wait before the next size probe after one that paid...
const PROBE_SOON: Duration = Duration::from_millis(60);
/// ...and the longest wait after probes that did not: a probe's epoch
/// runs larger requests that faults may wait behind, so where probes keep
/// failing (a link) they take 1 % of the time, which a p99 does not see.
const PROBE_LATEST: Duration = Duration::from_secs(2);
/// Request size classes: class `k` holds requests of `2^k..2^(k+1)` pages.
const CLASSES: usize = 13;
/// How long a size class's minimum round trip stays valid (it is the
/// reference queueing delay is measured from).
const MIN_RTT_AGE: Duration = Duration::from_secs(2);
/// Largest window, whatever the link.
const MAX_WINDOW: f64 = (64 << 20) as f64;
/// Round-trip samples of one request size needed before the window moves.
const MIN_SAMPLES: u32 = 3;
/// Queueing delay the bulk traffic may add, smoothed: above it the window
/// shrinks, below half of it the window grows. A fault's reply waits
/// behind about this much bulk at the bottleneck. Where the minimum round
/// trip is longer, that is the target instead.
pub const TARGET_DELAY: Duration = Duration::from_micros(40);

/// A fault's request on the wire, from [`Governor::urgent_begin`] to
/// [`Governor::urgent_end`].
#[derive(Debug, Clone, Copy)]
#[must_use = "a fault's request is ended with urgent_end"]
pub struct Urgent {
    at: Instant,
    /// Sent while the guest was idle: its round trip shows what the idle
    /// bulk cost it.
    after_idle: bool,
}

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

/// The request-size probe: an epoch at twice the size between two at the
/// current one.
#[derive(Debug, Clone, Copy)]
enum Probe {
    /// Not probing.
    Idle,
    /// This epoch runs at twice the size `base`; `before` is the rate at
    /// `base`.
    Doubled { base: u32, before: f64 },
    /// Back at `base`; the verdict waits for this epoch's rate.
    After {
        base: u32,
        before: f64,
        doubled: f64,
    },
}

#[derive(Debug)]
struct State {
    inflight: u64,
    window: f64,
    ssthresh: f64,
    chunk: u32,
    /// Minimum round trip per size class, and when it was last lowered or
    /// confirmed.
    class_min: [Option<(Duration, Instant)>; CLASSES],
    /// Samples of the current size class since it became current.
    samples: u32,
    /// Where the request-size probe stands.
    probe: Probe,
    /// When the next probe may start, and the wait after a failed one.
    next_probe: Instant,
    probe_wait: Duration,
    /// Delivery rates of the last epochs at the current request size,
    /// bytes per second, newest first: what a size probe must beat.
    recent: [f64; RECENT_EPOCHS],
    /// The request size `recent` is of, and how many epochs it has had.
    recent_size: u32,
    recent_n: usize,
    /// Smoothed queueing delay (round trip above the minimum), seconds.
    queue_delay: f64,
    /// Delivery of requests that are samples of the path.
    epoch: Epoch,
    /// Highest rate of an epoch, idle or not.
    peak_rate: f64,
    last_cut: Instant,
    tokens: f64,
    refill: Instant,
    holds: u64,
    /// Delivery of requests sent while idle, in epochs of their own (for
    /// the peak rate).
    idle_epoch: Epoch,
    idle_requests: u64,
    /// Bulk bytes allowed in flight while the guest is idle (never less
    /// than `window`).
    idle_window: f64,
    /// When the idle window was last cut.
    idle_cut: Instant,
    /// Smallest idle round trip: the path's base, queueing is measured
    /// from it.
    idle_base: Option<Duration>,
    /// Requests refused window room while idle (once per request).
    idle_refused: u64,
    /// Most the idle window may grow to: halved when a fault after an
    /// idle period came back late ([`IDLE_HURT`]).
    idle_ceiling: f64,
}

/// Bytes delivered since an epoch began: the delivery rate, one
/// [`EPOCH`] at a time.
#[derive(Debug)]
struct Epoch {
    start: Instant,
    bytes: u64,
}

impl Epoch {
    fn new(start: Instant) -> Self {
        Self { start, bytes: 0 }
    }

    /// Counts `bytes` delivered at `now`. Once the epoch has lasted
    /// [`EPOCH`], returns its rate in bytes per second and begins the next.
    fn add(&mut self, bytes: u64, now: Instant) -> Option<f64> {
        self.bytes += bytes;
        let span = now.duration_since(self.start);
        (span >= EPOCH).then(|| {
            let rate = self.bytes as f64 / span.as_secs_f64();
            *self = Self::new(now);
            rate
        })
    }
}

/// Admission control for bulk requests; see the module docs.
#[derive(Debug)]
pub struct Governor {
    page_size: u64,
    max_chunk: u32,
    enabled: bool,
    push_rate: Option<f64>,
    urgent: AtomicU32,
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
            urgent: AtomicU32::new(0),
            last_urgent_us: AtomicU64::new(NO_FAULT),
            born: now,
            idle_after_us: Some(IDLE_AFTER.as_micros() as u64),
            fault_base_ns: AtomicU64::new(NO_FAULT),
            state: Mutex::new(State {
                inflight: 0,
                window: 2.0 * (u64::from(chunk) * page_size as u64) as f64,
                ssthresh: MAX_WINDOW,
                chunk,
                class_min: [None; CLASSES],
                samples: 0,
                probe: Probe::Idle,
                next_probe: now + EPOCH,
                probe_wait: PROBE_SOON,
                recent: [0.0; RECENT_EPOCHS],
                recent_size: chunk,
                recent_n: 0,
                queue_delay: 0.0,
                epoch: Epoch::new(now),
                peak_rate: 0.0,
                last_cut: now,
                tokens: 0.0,
                refill: now,
                holds: 0,
                idle_epoch: Epoch::new(now),
                idle_requests: 0,
                idle_window: 0.0,
                idle_cut: now,
                idle_base: None,
                idle_refused: 0,
                idle_ceiling: MAX_WINDOW,
            }),
            cv: Condvar::new(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // Plain numbers: a panic elsewhere cannot leave them unusable.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn chunk_bytes(&self, st: &State) -> u64 {
        u64::from(st.chunk) * self.page_size
    }

    /// A fault's request is going out: lanes hold new requests until
    /// [`Governor::urgent_end`].
    pub fn urgent_begin(&self) -> Urgent {
        let after_idle = self.idle();
        // The time first: whoever sees the count sees the time too.
        self.last_urgent_us
            .store(self.born.elapsed().as_micros() as u64, Ordering::Release);
        self.urgent.fetch_add(1, Ordering::AcqRel);
        Urgent {
            at: Instant::now(),
            after_idle,
        }
    }

    /// The guest is idle: flow control on, no fault outstanding and none
    /// for [`IDLE_AFTER`] (a migration starts idle: until the guest faults
    /// there is no reply to protect, and the idle window starts from the
    /// delay-based one).
    fn idle(&self) -> bool {
        let Some(after) = self.idle_after_us else {
            return false;
        };
        if !self.enabled || self.urgent.load(Ordering::Acquire) != 0 {
            return false;
        }
        let last = self.last_urgent_us.load(Ordering::Acquire);
        last == NO_FAULT || self.born.elapsed().as_micros() as u64 >= last + after
    }

    /// The same governor with another idle threshold, or none: never idle
    /// (tests).
    #[cfg(test)]
    fn with_idle_after(mut self, d: Option<Duration>) -> Self {
        self.idle_after_us = d.map(|d| d.as_micros() as u64);
        self
    }

    /// Window and request size while the guest is idle: the idle window,
    /// never less than the delay-based one.
    fn idle_limits(&self, st: &State) -> (f64, u32) {
        let window = st.window.max(st.idle_window);
        // Two requests fill the window, so one can be sent while the
        // other's reply is coming.
        let pages = (window / 2.0 / self.page_size as f64) as u32;
        (window, pages.clamp(st.chunk, self.max_chunk))
    }

    /// Adapts the idle window to the round trip `rtt` of an idle request
    /// (see the module docs).
    fn adapt_idle(&self, st: &mut State, sent: &Sent, rtt: Duration, now: Instant) {
        let base = st.idle_base.map_or(rtt, |b| b.min(rtt));
        st.idle_base = Some(base);
        let drain = IDLE_DRAIN.as_secs_f64();
        let queued = (rtt - base).as_secs_f64();
        let bytes = sent.bytes as f64;
        st.idle_window = st.idle_window.max(st.window);
        if queued > drain {
            // Once per round trip, to what would have drained.
            if now.duration_since(st.idle_cut) > rtt {
                st.idle_window *= (drain / queued).max(0.5);
                st.idle_cut = now;
            }
        } else if st.idle_refused > sent.refused {
            // The window held a request back while this one was out: it
            // was the limit, so it grows.
            st.idle_window += if queued < drain / 2.0 {
                bytes
            } else {
                bytes * bytes / st.idle_window
            };
        }
        st.idle_window = st.idle_window.min(st.idle_ceiling).max(self.idle_floor(st));
    }

    /// A fault's request has been answered.
    pub fn urgent_end(&self, urgent: Urgent) {
        self.urgent_end_at(urgent, Instant::now());
    }

    /// [`Self::urgent_end`] at `now`.
    fn urgent_end_at(&self, urgent: Urgent, now: Instant) {
        let rtt = now.duration_since(urgent.at);
        let last = self.urgent.fetch_sub(1, Ordering::AcqRel) == 1;
        let rtt_ns = u64::try_from(rtt.as_nanos()).unwrap_or(u64::MAX - 1);
        let base = Duration::from_nanos(
            self.fault_base_ns
                .fetch_min(rtt_ns, Ordering::AcqRel)
                .min(rtt_ns),
        );
        if self.enabled && urgent.after_idle {
            let mut st = self.lock();
            if rtt - base > IDLE_HURT {
                self.cut_idle(&mut st, rtt, now);
            } else {
                st.idle_ceiling = (st.idle_ceiling * 2.0).min(MAX_WINDOW);
            }
        }
        if last {
            let _g = self.lock();
            self.cv.notify_all();
        }
    }

    /// The fastest fault round trip so far, if a fault has been answered.
    fn fault_base(&self) -> Option<Duration> {
        let ns = self.fault_base_ns.load(Ordering::Acquire);
        (ns != NO_FAULT).then(|| Duration::from_nanos(ns))
    }

    /// Least the idle window may be: the delay-based window, and two pages.
    fn idle_floor(&self, st: &State) -> f64 {
        st.window.max(2.0 * self.page_size as f64)
    }

    /// The guest waited `wait` for a page a lane was fetching. While idle,
    /// a wait [`IDLE_HURT`] longer than the fastest fault means the page's
    /// request queued behind idle bulk: the idle window is cut as for a
    /// late fault. (A short wait raises nothing: waits come many at a
    /// time; faults after pauses raise the ceiling.)
    pub fn waited(&self, wait: Duration) {
        if !self.idle() {
            return;
        }
        if self
            .fault_base()
            .is_some_and(|b| wait.saturating_sub(b) > IDLE_HURT)
        {
            self.cut_idle(&mut self.lock(), wait, Instant::now());
        }
    }

    /// Halves the idle window and keeps it from growing past that, once
    /// per `rtt` (the round trip or wait that showed the queue: the ones
    /// right after it saw the same queue).
    fn cut_idle(&self, st: &mut State, rtt: Duration, now: Instant) {
        if now.duration_since(st.idle_cut) <= rtt {
            return;
        }
        st.idle_cut = now;
        let floor = self.idle_floor(st);
        st.idle_ceiling = (st.window.max(st.idle_window) / 2.0).max(floor);
        st.idle_window = st.idle_window.min(st.idle_ceiling);
    }

    /// Refills the push-rate bucket; returns how long until it holds
    /// `need` bytes (zero when it does now).
    fn refill(&self, st: &mut State, need: u64) -> Duration {
        let Some(rate) = self.push_rate else {
            return Duration::ZERO;
        };
        let now = Instant::now();
        let burst = (rate * 0.005).max(2.0 * need as f64);
        st.tokens = (st.tokens + rate * now.duration_since(st.refill).as_secs_f64()).min(burst);
        st.refill = now;
        if st.tokens >= need as f64 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64((need as f64 - st.tokens) / rate)
        }
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
            let urgent = self.enabled && !bubble && self.urgent.load(Ordering::Acquire) > 0;
            let window_ok =
                !self.enabled || st.inflight == 0 || (st.inflight + cb) as f64 <= window;
            let pause = self.refill(&mut st, cb);
            if !urgent && window_ok && pause.is_zero() {
                st.inflight += cb;
                if self.push_rate.is_some() {
                    st.tokens -= cb as f64;
                }
                st.idle_requests += u64::from(idle);
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
                st.idle_refused += 1;
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
        if self.push_rate.is_some() {
            st.tokens += ticket.reserved as f64;
        }
        self.cv.notify_all();
    }

    /// Turns a ticket into a request of `pages` pages (at most the
    /// ticket's) that is being sent now.
    pub fn commit(&self, ticket: Ticket, pages: u32) -> Sent {
        let bytes = u64::from(pages.min(ticket.pages)) * self.page_size;
        let mut st = self.lock();
        let unused = ticket.reserved.saturating_sub(bytes);
        st.inflight -= unused.min(st.inflight);
        if self.push_rate.is_some() {
            st.tokens += unused as f64;
        }
        if unused > 0 {
            self.cv.notify_all();
        }
        Sent {
            pages,
            bytes,
            at: Instant::now(),
            inflight: st.inflight,
            sample: !ticket.idle,
            idle: ticket.idle,
            refused: st.idle_refused,
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

    /// [`Self::complete`] at `now`.
    fn complete_at(&self, sent: Sent, now: Instant) {
        let rtt = now.duration_since(sent.at);
        let mut st = self.lock();
        st.inflight -= sent.bytes.min(st.inflight);
        self.cv.notify_all();
        if self.enabled && sent.idle {
            // Idle requests size the idle window, and their delivery rate
            // counts towards the peak, in epochs of their own (a pause
            // starts a new one).
            self.adapt_idle(&mut st, &sent, rtt, now);
            if now.duration_since(st.idle_epoch.start) > 2 * EPOCH {
                st.idle_epoch = Epoch::new(sent.at);
            }
            if let Some(rate) = st.idle_epoch.add(sent.bytes, now) {
                st.peak_rate = st.peak_rate.max(rate);
            }
        }
        if !self.enabled || !sent.sample {
            return;
        }
        let class = class_of(sent.pages);
        let fresh = |m: Option<(Duration, Instant)>| {
            m.filter(|&(_, at)| now.duration_since(at) < MIN_RTT_AGE)
        };
        let min = match fresh(st.class_min[class]) {
            Some((m, _)) if m <= rtt => m,
            _ => rtt,
        };
        st.class_min[class] = Some((min, now));
        if let Some(rate) = st.epoch.add(sent.bytes, now) {
            st.peak_rate = st.peak_rate.max(rate);
            let chunk = self.next_chunk(&mut st, rate, now);
            if chunk != st.chunk {
                // Queueing is now judged against the new size's minimum;
                // the window keeps its bytes.
                st.chunk = chunk;
                st.samples = 0;
                st.queue_delay = 0.0;
                st.window = st.window.max(2.0 * self.chunk_bytes(&st) as f64);
            }
        }
        if class != class_of(st.chunk) {
            return;
        }
        st.samples += 1;
        if st.samples < MIN_SAMPLES {
            return;
        }
        let cb = self.chunk_bytes(&st) as f64;
        let bytes = sent.bytes as f64;
        let qd = (rtt - min).as_secs_f64();
        st.queue_delay += (qd - st.queue_delay) / 8.0;
        // Queueing up to one base round trip is allowed on slow paths (BBR
        // keeps two bandwidth-delay products in flight); fast ones get the
        // fixed target.
        let target = TARGET_DELAY.as_secs_f64().max(min.as_secs_f64());
        let limited = sent.inflight as f64 + cb >= st.window;
        if st.queue_delay < target / 2.0 {
            if limited {
                st.window += if st.window < st.ssthresh {
                    bytes
                } else {
                    cb * bytes / st.window
                };
            }
        } else if st.queue_delay > target {
            st.ssthresh = st.ssthresh.min(st.window);
            // At most one multiplicative cut per round trip, in proportion
            // to how far past the target the delay is (as Swift does).
            if now.duration_since(st.last_cut) > rtt {
                let over = (st.queue_delay - target) / st.queue_delay;
                st.window *= 1.0 - 0.5 * over.min(1.0);
                st.last_cut = now;
            }
        }
        st.window = st.window.clamp(cb, MAX_WINDOW);
    }

    /// The request size for the next epoch, given the one that ended
    /// delivered `rate` bytes per second: probe steps, and a cap at twice
    /// [`CHUNK_TIME`] of wire time at that rate.
    fn next_chunk(&self, st: &mut State, rate: f64, now: Instant) -> u32 {
        let mut chunk = st.chunk;
        if !matches!(st.probe, Probe::Doubled { .. }) {
            // An epoch at the current size; a new size starts afresh.
            if st.recent_size != chunk {
                st.recent = [0.0; RECENT_EPOCHS];
                st.recent_size = chunk;
                st.recent_n = 0;
            }
            st.recent.rotate_right(1);
            st.recent[0] = rate;
            st.recent_n += 1;
        }
        st.probe = match st.probe {
            // Only once the current size has a baseline.
            Probe::Idle
                if now >= st.next_probe
                    && chunk * 2 <= self.max_chunk
                    && st.recent_n >= RECENT_EPOCHS =>
            {
                chunk *= 2;
                Probe::Doubled {
                    base: st.chunk,
                    // The best of the last epochs at this size: one
                    // that faults held back is no baseline.
                    before: st.recent.iter().copied().fold(0.0, f64::max),
                }
            }
            Probe::Idle => Probe::Idle,
            Probe::Doubled { base, before } => {
                chunk = base;
                Probe::After {
                    base,
                    before,
                    doubled: rate,
                }
            }
            Probe::After {
                base,
                before,
                doubled,
            } => {
                chunk = base;
                if doubled >= PROBE_GAIN * before.max(rate) {
                    chunk = base * 2;
                    st.probe_wait = PROBE_SOON;
                } else {
                    st.probe_wait = (st.probe_wait * 2).min(PROBE_LATEST);
                }
                st.next_probe = now + st.probe_wait;
                Probe::Idle
            }
        };
        // Whatever the probes say, a request never takes more than twice
        // the budget on the wire: at the per-page wire time the minimum
        // round trips of two sizes show (their slope), or else at the rate
        // the path delivers (which understates the wire when requests are
        // held small, so the slope is preferred).
        let per_page = Self::wire_time_per_page(st, now);
        let cap = match per_page {
            Some(w) if w > 0.0 => 2.0 * CHUNK_TIME.as_secs_f64() / w,
            _ => rate * 2.0 * CHUNK_TIME.as_secs_f64() / self.page_size as f64,
        };
        // A probe epoch is the experiment that measures a larger size: it
        // runs uncapped (it lasts one epoch).
        let probing = matches!(st.probe, Probe::Doubled { .. });
        while !probing && chunk > 1 && f64::from(chunk) > cap {
            chunk /= 2;
        }
        chunk.clamp(1, self.max_chunk)
    }

    /// Wire time of one page, from the minimum round trips of the two
    /// largest fresh size classes, when there are two.
    fn wire_time_per_page(st: &State, now: Instant) -> Option<f64> {
        let fresh: Vec<(f64, f64)> = st
            .class_min
            .iter()
            .enumerate()
            .filter_map(|(k, m)| {
                m.filter(|&(_, at)| now.duration_since(at) < MIN_RTT_AGE)
                    .map(|(d, _)| (f64::from(1u32 << k), d.as_secs_f64()))
            })
            .collect();
        let [.., (p1, t1), (p2, t2)] = fresh[..] else {
            return None;
        };
        Some(((t2 - t1) / (p2 - p1)).max(0.0))
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
            idle_requests: st.idle_requests,
            idle_window_bytes: st.window.max(st.idle_window) as u64,
            min_rtt_by_size_us: st
                .class_min
                .iter()
                .enumerate()
                .filter_map(|(k, m)| m.map(|(d, _)| (1u32 << k, d.as_secs_f64() * 1e6)))
                .collect(),
        }
    }
}

/// The size class of a request of `pages` pages.
fn class_of(pages: u32) -> usize {
    (31 - pages.max(1).leading_zeros() as usize).min(CLASSES - 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// No idle periods.
    const NEVER: Option<Duration> = None;

    /// One round at the synthetic time `at`: sends what the window allows
    /// (at most `most` requests), completes it all `rtt` later and moves
    /// `at` on. Returns the pages of the first request.
    fn round(g: &Governor, at: &mut Instant, rtt: Duration, most: usize) -> u32 {
        let mut sent = Vec::new();
        while sent.len() < most {
            let Some(t) = g.acquire(None) else { break };
            let pages = t.pages;
            sent.push(g.commit(t, pages));
        }
        let first = sent.first().map_or(0, |s| s.pages);
        for mut s in sent {
            s.at = *at;
            g.complete_at(s, *at + rtt);
        }
        *at += Duration::from_millis(10);
        first
    }

    #[test]
    fn an_idle_guest_gets_what_the_path_drains_until_it_faults() {
        let g = Governor::new(4096, 256, true, None).with_idle_after(Some(Duration::ZERO));
        let mut at = Instant::now();
        let base = Duration::from_micros(50);
        let all = usize::MAX;
        // Idle from the start: one-page requests, the delay-based window.
        assert_eq!(round(&g, &mut at, base, all), 1);
        // Round trips at the base double the idle window each time, and
        // the requests with it (two fill the window).
        let sizes: Vec<u32> = (0..5).map(|_| round(&g, &mut at, base, all)).collect();
        assert_eq!(sizes, [2, 4, 8, 16, 32], "{:?}", g.stats());
        // Idle round trips are no samples of the path.
        assert!(g.stats().min_rtt_by_size_us.is_empty());
        // Two requests a round, six rounds.
        assert_eq!(g.stats().idle_requests, 12);
        let window = || g.stats().idle_window_bytes;
        // A round that did not fill the window (nothing else to send)
        // does not grow it.
        let before = window();
        round(&g, &mut at, base, 1);
        assert_eq!(window(), before, "grew without being the limit");
        // Queueing past half the drain time: about a request per round.
        round(&g, &mut at, base + IDLE_DRAIN * 3 / 4, all);
        let after = window();
        assert!(
            after > before && after < before * 3 / 2,
            "{before} -> {after}"
        );
        // Past the drain time it is cut once per round trip, to what
        // would have drained, by at most half.
        round(&g, &mut at, base + IDLE_DRAIN * 3 / 2, all);
        let cut = window();
        assert_eq!(cut, after * 2 / 3, "{after} -> {cut}");
        round(&g, &mut at, base + IDLE_DRAIN * 4, all);
        assert_eq!(window(), cut / 2, "{cut} -> {}", window());
        // A migration starts idle; a fault puts the delay-based window
        // back (one-page requests) for the idle threshold's length.
        let pause = Duration::from_millis(500);
        let g = g.with_idle_after(Some(pause));
        let t = g.acquire(None).expect("request");
        assert!(t.pages > 1, "idle before the first fault: {t:?}");
        g.release(t);
        let u = g.urgent_begin();
        g.urgent_end(u);
        let t = g.acquire(None).expect("request");
        assert_eq!(t.pages, 1, "not idle right after a fault");
        g.release(t);
        std::thread::sleep(pause + Duration::from_millis(20));
        let t = g.acquire(None).expect("request");
        assert!(t.pages > 1, "idle again after the pause: {t:?}");
    }

    /// An always-idle governor after six rounds at round trip `rtt`, and
    /// the synthetic time after them.
    fn opened(rtt: Duration) -> (Governor, Instant) {
        let g = Governor::new(4096, 256, true, None).with_idle_after(Some(Duration::ZERO));
        let mut at = Instant::now();
        for _ in 0..6 {
            round(&g, &mut at, rtt, usize::MAX);
        }
        (g, at)
    }

    #[test]
    fn a_fault_that_waited_behind_idle_bulk_halves_the_idle_window() {
        let (g, mut at) = opened(Duration::from_micros(50));
        let open = g.stats().idle_window_bytes;
        assert_eq!(open, 128 * 4096);
        // Faults on synthetic times after the rounds, 10 ms apart.
        let when = std::cell::Cell::new(at + Duration::from_secs(1));
        let fault = |extra: Duration| {
            let mut u = g.urgent_begin();
            assert!(u.after_idle);
            u.at = when.get();
            when.set(u.at + Duration::from_millis(10));
            g.urgent_end_at(u, u.at + Duration::from_micros(60) + extra);
        };
        // The fastest fault sets the base; then one that came back 400 µs
        // late: the idle bulk was in its way.
        fault(Duration::ZERO);
        assert_eq!(g.stats().idle_window_bytes, open, "no cost, no cut");
        fault(Duration::from_micros(400));
        assert_eq!(g.stats().idle_window_bytes, open / 2);
        // Quick round trips no longer grow it past that...
        for _ in 0..3 {
            round(&g, &mut at, Duration::from_micros(50), usize::MAX);
        }
        assert_eq!(
            g.stats().idle_window_bytes,
            open / 2,
            "grew past the ceiling"
        );
        // ...until faults after idle periods come back on time.
        fault(IDLE_HURT / 2);
        round(&g, &mut at, Duration::from_micros(50), usize::MAX);
        assert_eq!(g.stats().idle_window_bytes, open);
    }

    #[test]
    fn the_idle_window_doubles_when_many_requests_fill_it() {
        // Requests of at most 4 pages: the window holds more than two.
        let g = Governor::new(4096, 4, true, None).with_idle_after(Some(Duration::ZERO));
        let mut at = Instant::now();
        let rtt = Duration::from_micros(50);
        let mut windows = Vec::new();
        for _ in 0..7 {
            round(&g, &mut at, rtt, usize::MAX);
            windows.push(g.stats().idle_window_bytes / 4096);
        }
        assert_eq!(windows, [4, 8, 16, 32, 64, 128, 256], "pages in the window");
    }

    #[test]
    fn a_long_path_is_not_taken_for_a_queue() {
        // A 2 ms base round trip, four times the drain time: only the
        // queueing above it counts, so the idle window opens all the same.
        let (g, _) = opened(Duration::from_millis(2));
        // Two pages doubled six times.
        assert_eq!(g.stats().idle_window_bytes, 128 * 4096, "{:?}", g.stats());
    }

    #[test]
    fn the_window_bounds_bytes_in_flight() {
        let g = Governor::new(4096, 64, true, None).with_idle_after(NEVER);
        let a = g.acquire(None).expect("first request always passes");
        assert_eq!(a.pages, 1, "flow control starts with one-page requests");
        let sa = g.commit(a, 1);
        let b = g.acquire(None).expect("the initial window holds two");
        let sb = g.commit(b, 1);
        assert!(g.acquire(None).is_none(), "window full");
        g.complete(sa);
        let c = g.acquire(None).expect("room again after a completion");
        g.release(c);
        g.complete(sb);
    }

    #[test]
    fn requests_sent_again_after_a_lost_link_stay_in_the_window() {
        let g = Governor::new(4096, 64, true, None).with_idle_after(NEVER);
        let sa = g.commit(g.acquire(None).unwrap(), 1);
        let sb = g.commit(g.acquire(None).unwrap(), 1);
        assert!(g.acquire(None).is_none(), "window full");
        // The link broke; both go out again on the new connection.
        let (ra, rb) = (g.resend(sa), g.resend(sb));
        assert!(
            g.acquire(None).is_none(),
            "still in flight: the window stays full"
        );
        g.complete(ra);
        g.complete(rb);
        assert!(g.acquire(None).is_some(), "room once they arrived");
        // Neither taught a round trip (an outage is no measure of the path).
        assert!(g.stats().min_rtt_by_size_us.is_empty(), "{:?}", g.stats());
    }

    #[test]
    fn an_outstanding_fault_holds_bulk_requests() {
        let g = Governor::new(4096, 64, true, None).with_idle_after(NEVER);
        let u = g.urgent_begin();
        assert!(g.acquire(Some(Duration::from_millis(5))).is_none());
        g.urgent_end(u);
        assert!(g.acquire(None).is_some());
        assert_eq!(g.stats().urgent_holds, 1);
    }

    #[test]
    fn without_flow_control_requests_are_full_size_and_unlimited() {
        let g = Governor::new(4096, 64, false, None);
        let _u = g.urgent_begin();
        let tickets: Vec<_> = (0..100).map(|_| g.acquire(None).unwrap()).collect();
        assert!(tickets.iter().all(|t| t.pages == 64));
    }

    #[test]
    fn growing_round_trips_shrink_the_window() {
        let g = Governor::new(4096, 64, true, None).with_idle_after(NEVER);
        // Round trips at the minimum grow the window (slow start)...
        for _ in 0..20 {
            let mut sent = Vec::new();
            while let Some(t) = g.acquire(None) {
                sent.push(g.commit(t, 1));
            }
            for s in sent {
                g.complete(s);
            }
        }
        let grown = g.stats().window_bytes;
        assert!(grown > 2 * 4096, "window did not grow: {grown}");
        // ...and round trips far above it (a queue) shrink it.
        for _ in 0..50 {
            let mut sent = Vec::new();
            while let Some(t) = g.acquire(None) {
                sent.push(g.commit(t, 1));
            }
            std::thread::sleep(Duration::from_millis(2));
            for s in sent {
                g.complete(s);
            }
        }
        let shrunk = g.stats().window_bytes;
        assert!(shrunk < grown, "window {grown} -> {shrunk}");
    }

    #[test]
    fn the_push_rate_cap_spaces_requests() {
        // 64 KiB/s with 4-page (16 KiB) requests: the bucket starts empty,
        // so the first request waits about 250 ms.
        let g = Governor::new(4096, 4, false, Some(64 << 10));
        assert!(g.acquire(None).is_none(), "no tokens yet");
        let t = g.acquire(Some(Duration::from_secs(5)));
        assert!(t.is_some());
    }

    /// Drives the size probe with synthetic epoch rates: `rate_at(pages)`
    /// is what an epoch at that request size delivers.
    fn settle(g: &Governor, rate_at: impl Fn(u32) -> f64) -> u32 {
        let mut st = g.lock();
        let mut now = Instant::now();
        for i in 0..410 {
            // The settled size, outside a probe (which runs one epoch at
            // twice the size, then one back at it).
            if i >= 400 && matches!(st.probe, Probe::Idle) {
                break;
            }
            now += EPOCH;
            let rate = rate_at(st.chunk);
            st.chunk = g.next_chunk(&mut st, rate, now);
        }
        st.chunk
    }

    #[test]
    fn requests_grow_where_size_pays_and_stay_small_on_a_link() {
        // Per-request cost bound (the CPU): 5 µs per request plus 0.25 µs
        // per page; a size-independent 10 GB/s beyond. Sizes grow until
        // twice the budget at the delivered rate caps them.
        let g = Governor::new(4096, 256, true, None).with_idle_after(NEVER);
        let cpu = |pages: u32| {
            let t = 5e-6 + 0.25e-6 * f64::from(pages);
            (f64::from(pages) * 4096.0 / t).min(10e9)
        };
        let grown = settle(&g, cpu);
        assert!(grown >= 16, "CPU-bound path stayed at {grown} pages");
        let cap = cpu(grown) * 2.0 * CHUNK_TIME.as_secs_f64() / 4096.0;
        assert!(
            f64::from(grown) <= cap,
            "{grown} pages exceed the cap {cap}"
        );
        // A 1 Gbit/s link: the rate does not depend on the size.
        let g = Governor::new(4096, 256, true, None).with_idle_after(NEVER);
        assert_eq!(
            settle(&g, |_| 125e6),
            1,
            "a link must keep one-page requests"
        );
    }

    #[test]
    fn epochs_held_back_by_faults_do_not_make_a_probe_pay() {
        // A 1 Gbit/s link where faults hold two epochs in three back to
        // 80 MB/s; the others, and probes that run unhindered, deliver
        // 125 MB/s. A probe beats its neighbours by more than PROBE_GAIN,
        // but not what the current size did a few epochs ago, so the size
        // must stay.
        let g = Governor::new(4096, 256, true, None).with_idle_after(NEVER);
        {
            // The shaper's burst allowance makes round trips look like
            // loopback (3 µs a page), so the wire-time cap does not bind.
            let mut st = g.lock();
            let fresh = Instant::now() + Duration::from_secs(3600);
            st.class_min[0] = Some((Duration::from_micros(14), fresh));
            st.class_min[1] = Some((Duration::from_micros(17), fresh));
        }
        for phase in 0..3 {
            let base_epochs = std::cell::Cell::new(phase);
            let rate = |pages: u32| {
                if pages > 1 {
                    return 125e6;
                }
                base_epochs.set(base_epochs.get() + 1);
                if base_epochs.get() % 3 == 0 {
                    125e6
                } else {
                    80e6
                }
            };
            assert_eq!(settle(&g, rate), 1, "phase {phase}: must stay at one page");
        }
    }

    #[test]
    fn the_wire_time_of_a_page_is_the_slope_of_minimum_round_trips() {
        let g = Governor::new(4096, 64, true, None).with_idle_after(NEVER);
        let now = Instant::now();
        let mut st = g.lock();
        assert_eq!(Governor::wire_time_per_page(&st, now), None);
        // A 1 Gbit/s link: 33 us more per page.
        st.class_min[0] = Some((Duration::from_micros(60), now));
        st.class_min[1] = Some((Duration::from_micros(93), now));
        let w = Governor::wire_time_per_page(&st, now).unwrap();
        assert!((w - 33e-6).abs() < 1e-9, "{w}");
        // Stale samples do not count.
        let later = now + MIN_RTT_AGE + Duration::from_millis(1);
        assert_eq!(Governor::wire_time_per_page(&st, later), None);
    }
}
