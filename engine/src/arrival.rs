//! Bulk replies installed as they arrive: a fault waiting on a page of a
//! reply that is still coming gets its page once that page's bytes are
//! here, not when the whole reply is. On a slow link a reply of many pages
//! takes a while to cross; without this, a fault on its first page would
//! wait for its last.

use std::time::{Duration, Instant};

use pagewire_transport::PageRange;

use crate::error::EngineError;
use crate::metrics::Metrics;
use crate::shared::Shared;
use crate::state::PageOrigin;

/// One bulk reply being received: `pieces` back to back, of which the
/// first `installed` pages are in guest memory.
pub(crate) struct Arrival<'a> {
    shared: &'a Shared,
    pieces: &'a [PageRange],
    origin: PageOrigin,
    /// Pages at the front of the reply installed so far.
    installed: u64,
    /// The first install error: nothing more is installed after it.
    failed: Option<EngineError>,
    /// Time spent installing pages before the reply was complete: not
    /// part of the reply's round trip.
    spent: Duration,
}

impl<'a> Arrival<'a> {
    /// A reply to the request for `pieces`, fetched for `origin`.
    pub fn new(shared: &'a Shared, pieces: &'a [PageRange], origin: PageOrigin) -> Self {
        Self {
            shared,
            pieces,
            origin,
            installed: 0,
            failed: None,
            spent: Duration::ZERO,
        }
    }

    /// The first `bytes` of the reply have arrived (in `data`, unless the
    /// migration lands pages): installs the whole pages among them not yet
    /// installed when a fault waits on one of them.
    pub fn arrived(&mut self, bytes: usize, data: &[u8]) {
        let ps = self.shared.page_size();
        let full = (bytes / ps) as u64;
        if self.failed.is_some() || full <= self.installed || !self.shared.has_waiters() {
            return;
        }
        let fresh = slice(self.pieces, self.installed, full);
        if !self.shared.waits_in(&fresh) {
            return;
        }
        let (before, t0) = (self.installed, Instant::now());
        match self.install(&fresh, full, data) {
            Ok(()) => Metrics::add(&self.shared.metrics.early_pages, full - before),
            Err(e) => self.failed = Some(e),
        }
        self.spent += t0.elapsed();
    }

    /// Pages of the reply installed so far.
    pub fn installed(&self) -> u64 {
        self.installed
    }

    /// Time spent installing pages while the reply was still coming.
    pub fn spent(&self) -> Duration {
        self.spent
    }

    /// The whole reply is here (in `data`, unless the migration lands
    /// pages): installs what is left of it.
    pub fn finish(mut self, data: &[u8]) -> Result<(), EngineError> {
        if let Some(e) = self.failed.take() {
            return Err(e);
        }
        let total = pages(self.pieces);
        if total > self.installed {
            self.install(&slice(self.pieces, self.installed, total), total, data)?;
        }
        Ok(())
    }

    /// The reply broke off: the pieces still to fetch, or the install
    /// error that came first (which stops the migration).
    pub fn rest(mut self) -> Result<Vec<PageRange>, EngineError> {
        if let Some(e) = self.failed.take() {
            return Err(e);
        }
        Ok(slice(self.pieces, self.installed, pages(self.pieces)))
    }

    /// Installs `fresh`, the reply's pages from `self.installed` to `upto`.
    fn install(&mut self, fresh: &[PageRange], upto: u64, data: &[u8]) -> Result<(), EngineError> {
        let ps = self.shared.page_size();
        let bytes = if self.shared.landed {
            &[][..]
        } else {
            let (from, to) = (self.installed as usize * ps, upto as usize * ps);
            data.get(from..to).ok_or_else(|| {
                EngineError::Memory(format!(
                    "{} bytes received for pages needing {to}",
                    data.len()
                ))
            })?
        };
        let shared = self.shared;
        shared.install_fetched(fresh, bytes, self.origin, &mut || shared.lane_busy())?;
        self.installed = upto;
        Ok(())
    }
}

/// Pages in `pieces`.
fn pages(pieces: &[PageRange]) -> u64 {
    pieces.iter().map(|r| u64::from(r.count)).sum()
}

/// The pages of `pieces` (back to back) from the `from`-th to before the
/// `to`-th, as ranges.
fn slice(pieces: &[PageRange], from: u64, to: u64) -> Vec<PageRange> {
    let mut out = Vec::new();
    let mut at = 0u64;
    for r in pieces {
        let (start, end) = (at, at + u64::from(r.count));
        at = end;
        let (a, b) = (start.max(from), end.min(to));
        if a < b {
            // Fits: at most `r.count`, a u32.
            out.push(PageRange::new(r.first + (a - start), (b - a) as u32));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slice_cuts_across_pieces() {
        let p = [
            PageRange::new(10, 3),
            PageRange::new(20, 2),
            PageRange::new(40, 4),
        ];
        assert_eq!(slice(&p, 0, 9), p.to_vec());
        assert_eq!(slice(&p, 0, 0), vec![]);
        assert_eq!(slice(&p, 1, 2), vec![PageRange::new(11, 1)]);
        assert_eq!(
            slice(&p, 2, 6),
            vec![
                PageRange::new(12, 1),
                PageRange::new(20, 2),
                PageRange::new(40, 1)
            ]
        );
        assert_eq!(slice(&p, 5, 9), vec![PageRange::new(40, 4)]);
        assert_eq!(slice(&p, 7, 100), vec![PageRange::new(42, 2)]);
        assert_eq!(pages(&p), 9);
    }
}
