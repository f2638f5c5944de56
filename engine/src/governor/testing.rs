//! Helpers for the governor's tests: rounds of requests on synthetic times.

use std::time::{Duration, Instant};

use super::Governor;

/// No idle periods.
pub(super) const NEVER: Option<Duration> = None;

/// One round at the synthetic time `at`: sends what the window allows
/// (at most `most` requests), completes it all `rtt` later and moves
/// `at` on. Returns the pages of the first request.
pub(super) fn round(g: &Governor, at: &mut Instant, rtt: Duration, most: usize) -> u32 {
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
