//! The zero filler: zero pages need no network, so a thread of the
//! lowest priority maps them all (UFFDIO_ZEROPAGE, in runs) while the push
//! runs, and the guest rarely faults on one. It never holds up a lane's
//! replies (a fault may be waiting on one) and yields the CPU to anything
//! else that wants it.

use std::sync::atomic::Ordering;
use std::time::Duration;

use pagewire_transport::PageRange;

use crate::error::EngineError;
use crate::shared::Shared;
use crate::state::{Claim, PageOrigin};

/// Runs until every zero page is mapped or the migration stops; waits
/// while the push is held back (demand paging asked for no background
/// work).
pub(crate) fn zero_main(shared: &Shared) -> Result<(), EngineError> {
    loop {
        if shared.aborted() || shared.states.all_present() {
            return Ok(());
        }
        if !shared.push_allowed() {
            std::thread::sleep(Duration::from_millis(5));
            continue;
        }
        if !fill_zeros(shared)? {
            return Ok(());
        }
    }
}

/// Pages of the zero map one call of [`fill_zeros`] looks at.
const ZERO_SLICE: u64 = 1024;

/// Maps the zero pages (as the source's zero map has them) of the next
/// slice of memory that are still missing. Returns false once the whole
/// memory has been looked at.
fn fill_zeros(shared: &Shared) -> Result<bool, EngineError> {
    let layout = shared.installer.memory().layout();
    let total = layout.total_pages();
    let start = shared.zero_cursor.fetch_add(ZERO_SLICE, Ordering::Relaxed);
    if start >= total {
        return Ok(false);
    }
    let end = (start + ZERO_SLICE).min(total);
    let zero = &shared.transport.info().zero;
    let mut runs = Vec::new();
    let mut p = start;
    while p < end {
        if !zero.is_zero(p) {
            p += 1;
            continue;
        }
        let Some(region) = layout.region_of(p) else {
            break;
        };
        let limit = end.min(layout.region_pages(region).end);
        let mut n = 0;
        while p + n < limit && zero.is_zero(p + n) && shared.states.try_claim(p + n) == Claim::Won {
            n += 1;
        }
        if n > 0 {
            // At most ZERO_SLICE pages: fits the u32 count.
            runs.push(PageRange::new(p, n as u32));
        }
        p += n.max(1);
    }
    let mut fetch = Vec::new();
    shared.split_claimed(&runs, PageOrigin::Push, &mut fetch, &mut || {
        shared.lane_busy()
    })?;
    debug_assert!(fetch.is_empty());
    Ok(end < total)
}
