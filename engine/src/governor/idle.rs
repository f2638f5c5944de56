//! The idle window: bulk traffic while the guest is not faulting.
//!
//! While the guest does not fault (not yet, or not for [`IDLE_AFTER`]),
//! there is no reply to protect: a window of its own lets the bulk queue
//! up to [`IDLE_DRAIN`] at the bottleneck, so an idle guest's memory comes
//! at the path's speed (where the CPU is the limit, small requests cost
//! most of it) and the first fault after the pause waits behind at most
//! about that much bulk.
//!
//! The idle window doubles each round trip while requests come back
//! within half of [`IDLE_DRAIN`] of the path's smallest round trip, grows
//! by about one request per round trip up to it, and past it is cut to
//! what would have drained, by at most half per round trip; it grows only
//! while the window was what held the bulk back. So it opens within a few
//! round trips, and a shaper's burst allowance, which makes a link look
//! fast until it runs out, costs a few cuts once the queue shows.
//!
//! Where that queue is in the faults' way (a link, not the CPU), the first
//! fault after the pause comes back late ([`IDLE_HURT`] above the fastest
//! fault): the idle window is halved and may not grow past that until
//! faults after pauses come back on time. Round trips while idle are no
//! samples for the delay-based window; the first fault puts that one back
//! in charge. A wait on a page a lane is fetching does not: a guest
//! walking memory behind the push gains more from the push's speed than
//! from shorter waits.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use super::epoch::{Epoch, EPOCH};
use super::urgent::NO_FAULT;
use super::{Governor, Sent, State, MAX_WINDOW};

/// Without a fault for this long, the guest is idle.
pub const IDLE_AFTER: Duration = Duration::from_millis(10);
/// While the guest is idle, bulk round trips are kept within this long of
/// the path's smallest: about what the first fault after the pause may
/// wait behind.
pub const IDLE_DRAIN: Duration = Duration::from_micros(500);
/// A fault's round trip this much above the fastest one, right after an
/// idle period, means the idle bulk queued where the fault's reply had to
/// pass (a link): the idle window is halved, and may not grow past that.
/// Below it (the CPU was the limit, or the idle window was small) the
/// ceiling doubles again.
pub const IDLE_HURT: Duration = Duration::from_micros(80);

/// Before any fault, a cut made by waits alone holds this long after the
/// last late wait; then the idle window may grow again as it likes.
pub const SOFT_HOLD: Duration = Duration::from_millis(20);

/// The idle window's state.
#[derive(Debug)]
pub(super) struct IdleWindow {
    /// Delivery of requests sent while idle, in epochs of their own (for
    /// the peak rate).
    epoch: Epoch,
    /// Bulk requests granted while idle.
    pub(super) requests: u64,
    /// Bulk bytes allowed in flight while the guest is idle (never less
    /// than the delay-based window).
    pub(super) window: f64,
    /// When the idle window was last cut.
    cut: Instant,
    /// Smallest idle round trip: the path's base, queueing is measured
    /// from it.
    base: Option<Duration>,
    /// Requests refused window room while idle (once per request).
    pub(super) refused: u64,
    /// Most the idle window may grow to: halved when a fault after an
    /// idle period came back late ([`IDLE_HURT`]).
    ceiling: f64,
    /// Until when a ceiling set by waits alone, before any fault, holds.
    soft_until: Option<Instant>,
}

impl IdleWindow {
    /// Closed (the delay-based window rules) at `now`.
    pub(super) fn new(now: Instant) -> Self {
        Self {
            epoch: Epoch::new(now),
            requests: 0,
            window: 0.0,
            cut: now,
            base: None,
            refused: 0,
            ceiling: MAX_WINDOW,
            soft_until: None,
        }
    }

    /// Something came back on time (a fault after a pause, a short wait):
    /// the window may grow twice as far again.
    fn raise_ceiling(&mut self) {
        self.ceiling = (self.ceiling * 2.0).min(MAX_WINDOW);
    }
}

impl Governor {
    /// The guest is idle: flow control on, no fault outstanding and none
    /// for [`IDLE_AFTER`] (a migration starts idle: until the guest faults
    /// there is no reply to protect, and the idle window starts from the
    /// delay-based one).
    pub(super) fn idle(&self) -> bool {
        let Some(after) = self.idle_after_us else {
            return false;
        };
        if !self.enabled || self.waits.urgent() != 0 {
            return false;
        }
        let last = self.last_urgent_us.load(Ordering::Acquire);
        last == NO_FAULT || self.born.elapsed().as_micros() as u64 >= last + after
    }

    /// The same governor with another idle threshold, or none: never idle
    /// (tests).
    #[cfg(test)]
    pub(super) fn with_idle_after(mut self, d: Option<Duration>) -> Self {
        self.idle_after_us = d.map(|d| d.as_micros() as u64);
        self
    }

    /// Window and request size while the guest is idle: the idle window,
    /// never less than the delay-based one.
    pub(super) fn idle_limits(&self, st: &State) -> (f64, u32) {
        let window = Self::idle_window(st);
        // Two requests fill the window, so one can be sent while the
        // other's reply is coming.
        let pages = (window / 2.0 / self.page_size as f64) as u32;
        (window, pages.clamp(st.chunk, self.max_chunk))
    }

    /// Adapts the idle window to the round trip `rtt` of an idle request
    /// (see the module docs).
    pub(super) fn adapt_idle(&self, st: &mut State, sent: &Sent, rtt: Duration, now: Instant) {
        if st.idle.soft_until.is_some_and(|t| now > t) {
            st.idle.soft_until = None;
            // Only what waits alone set lapses: once a fault has been
            // answered, its verdicts rule the ceiling.
            if self.fault_base().is_none() {
                st.idle.ceiling = MAX_WINDOW;
            }
        }
        let base = st.idle.base.map_or(rtt, |b| b.min(rtt));
        st.idle.base = Some(base);
        let drain = IDLE_DRAIN.as_secs_f64();
        let queued = (rtt - base).as_secs_f64();
        let bytes = sent.bytes as f64;
        st.idle.window = Self::idle_window(st);
        if queued > drain {
            // Once per round trip, to what would have drained.
            if now.duration_since(st.idle.cut) > rtt {
                st.idle.window *= (drain / queued).max(0.5);
                st.idle.cut = now;
            }
        } else if st.idle.refused > sent.refused {
            // The window held a request back while this one was out: it
            // was the limit, so it grows.
            st.idle.window += if queued < drain / 2.0 {
                bytes
            } else {
                bytes * bytes / st.idle.window
            };
        }
        st.idle.window = st.idle.window.min(st.idle.ceiling).max(self.idle_floor(st));
    }

    /// The idle window as it applies: never less than the delay-based
    /// one, which moves on its own.
    pub(super) fn idle_window(st: &State) -> f64 {
        st.window.max(st.idle.window)
    }

    /// Least the idle window may be: the delay-based window, and two pages.
    pub(super) fn idle_floor(&self, st: &State) -> f64 {
        st.window.max(2.0 * self.page_size as f64)
    }

    /// The guest waited `wait` for a page a lane was fetching. While idle,
    /// a wait [`IDLE_HURT`] longer than the fastest fault means the
    /// page's request queued behind idle bulk: the idle window is cut as
    /// for a late fault; a wait within half of that of it raises the
    /// ceiling again, as a fault on time does (waits come many at a time:
    /// where the CPU, not a queue, makes some long, the short ones keep
    /// the window open). Before any fault has been answered (a guest
    /// walking memory behind the push may never fault over the network),
    /// the fastest idle round trip stands in for the fastest fault, and
    /// the ceiling such waits set holds only [`SOFT_HOLD`] past the last
    /// late one: a guest that waits once and never again would otherwise
    /// keep a window cut before it had grown for good.
    pub fn waited(&self, wait: Duration) {
        self.waited_at(wait, Instant::now());
    }

    /// [`Self::waited`], the wait having ended at `now`.
    fn waited_at(&self, wait: Duration, now: Instant) {
        if !self.idle() {
            return;
        }
        let mut st = self.lock();
        // Read under the lock: a fault's verdict (taken under it too)
        // comes after its base is set, so a wait judged here sees both.
        let fault_base = self.fault_base();
        let Some(base) = fault_base.or(st.idle.base) else {
            return;
        };
        let late = wait.saturating_sub(base);
        if late > IDLE_HURT {
            self.cut_idle(&mut st, wait, now);
            if fault_base.is_none() {
                st.idle.soft_until = Some(now + SOFT_HOLD);
            }
        } else if late < IDLE_HURT / 2 {
            st.idle.raise_ceiling();
        }
    }

    /// Halves the idle window and keeps it from growing past that, once
    /// per `rtt` (the round trip or wait that showed the queue: the ones
    /// right after it saw the same queue).
    pub(super) fn cut_idle(&self, st: &mut State, rtt: Duration, now: Instant) {
        if now.duration_since(st.idle.cut) <= rtt {
            return;
        }
        st.idle.cut = now;
        let floor = self.idle_floor(st);
        st.idle.ceiling = (Self::idle_window(st) / 2.0).max(floor);
        st.idle.window = st.idle.window.min(st.idle.ceiling);
    }

    /// The reply to `sent`, an idle request, came after `rtt`: it sizes
    /// the idle window, and its delivery rate counts towards the peak, in
    /// epochs of their own (a pause starts a new one).
    pub(super) fn complete_idle(&self, st: &mut State, sent: &Sent, rtt: Duration, now: Instant) {
        self.adapt_idle(st, sent, rtt, now);
        if now.duration_since(st.idle.epoch.start) > 2 * EPOCH {
            st.idle.epoch = Epoch::new(sent.at);
        }
        if let Some(rate) = st.idle.epoch.add(sent.bytes, now) {
            st.peak_rate = st.peak_rate.max(rate);
        }
    }

    /// A fault sent while idle came back after `rtt`, the fastest fault so
    /// far after `base`: late, the idle bulk was in its way and the idle
    /// window is cut; on time, the window's ceiling doubles.
    pub(super) fn judge_after_idle(&self, rtt: Duration, base: Duration, now: Instant) {
        let mut st = self.lock();
        // A fault's verdict replaces what waits alone had set.
        st.idle.soft_until = None;
        if rtt - base > IDLE_HURT {
            self.cut_idle(&mut st, rtt, now);
        } else {
            st.idle.raise_ceiling();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::governor::testing::round;

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
        let pause = Duration::from_secs(1);
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

    /// An idle window opened at 50 µs round trips, then cut by a late
    /// wait 100 ms on, before any fault (the fastest idle round trip is
    /// the base); also the synthetic time before the wait and the window
    /// before the cut.
    fn cut_by_a_wait_before_any_fault() -> (Governor, Instant, u64) {
        let (g, at) = opened(Duration::from_micros(50));
        let open = g.stats().idle_window_bytes;
        assert_eq!(g.fault_base(), None);
        g.waited_at(Duration::from_millis(5), at + Duration::from_millis(100));
        assert_eq!(g.stats().idle_window_bytes, open / 2);
        (g, at, open)
    }

    #[test]
    fn waits_on_pages_in_flight_cut_the_idle_window_and_short_ones_reopen_it() {
        let (g, mut at, open) = cut_by_a_wait_before_any_fault();
        // The cut holds for a while (a round is 10 ms)...
        at += Duration::from_millis(100);
        round(&g, &mut at, Duration::from_micros(50), usize::MAX);
        assert_eq!(g.stats().idle_window_bytes, open / 2);
        // ...but not past SOFT_HOLD after the last one: it grows again.
        at += SOFT_HOLD;
        for _ in 0..2 {
            round(&g, &mut at, Duration::from_micros(50), usize::MAX);
        }
        assert!(g.stats().idle_window_bytes >= open, "{:?}", g.stats());
        let open = g.stats().idle_window_bytes;
        // A fault on time after a pause sets the base (60 µs).
        let mut u = g.urgent_begin();
        u.at = at + Duration::from_secs(2);
        g.urgent_end_at(u, u.at + Duration::from_micros(60));
        assert_eq!(g.stats().idle_window_bytes, open);
        // A wait within IDLE_HURT of it cuts nothing...
        g.waited_at(
            Duration::from_micros(60) + IDLE_HURT,
            at + Duration::from_secs(3),
        );
        assert_eq!(g.stats().idle_window_bytes, open);
        // ...one behind 400 µs of idle bulk halves the window, which does
        // not grow past that...
        g.waited_at(Duration::from_micros(460), at + Duration::from_secs(4));
        assert_eq!(g.stats().idle_window_bytes, open / 2);
        for _ in 0..3 {
            round(&g, &mut at, Duration::from_micros(50), usize::MAX);
        }
        assert_eq!(g.stats().idle_window_bytes, open / 2);
        // ...until a short wait raises the ceiling again.
        g.waited_at(Duration::from_micros(65), at);
        round(&g, &mut at, Duration::from_micros(50), usize::MAX);
        assert_eq!(g.stats().idle_window_bytes, open);
    }

    #[test]
    fn once_a_fault_is_answered_a_cut_by_waits_does_not_lapse() {
        let (g, mut at, open) = cut_by_a_wait_before_any_fault();
        // A fault is answered before SOFT_HOLD is over (not after a
        // pause: no verdict on the idle window, only a base).
        let mut u = g.urgent_begin();
        u.after_idle = false;
        u.at = at + Duration::from_millis(101);
        g.urgent_end_at(u, u.at + Duration::from_micros(60));
        assert!(g.fault_base().is_some());
        // Past SOFT_HOLD the cut stays: faults rule the ceiling now.
        at += Duration::from_millis(100) + SOFT_HOLD;
        for _ in 0..3 {
            round(&g, &mut at, Duration::from_micros(50), usize::MAX);
        }
        assert_eq!(g.stats().idle_window_bytes, open / 2);
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
}
