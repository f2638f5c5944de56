//! A migration that stopped before every page arrived, kept so that it can
//! be finished later.

use std::sync::Arc;

use pagewire_transport::{ChannelClass, Transport};
use tracing::info;

use crate::error::{EngineError, RegionError};
use crate::memory::DestMemory;
use crate::migration::{launch, limits_for, view_for, MigrationHandle};
use crate::shared::Shared;

/// A failed or aborted migration whose guest memory stays registered:
/// threads on pages that never arrived stay blocked (they never read
/// zeros). Dropping it keeps it that way for the rest of the process;
/// [`ParkedMigration::resume`] finishes it over a new transport to the
/// same source.
pub struct ParkedMigration {
    shared: Option<Arc<Shared>>,
}

impl std::fmt::Debug for ParkedMigration {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let (present, total) = self.progress();
        f.debug_struct("ParkedMigration")
            .field("present", &present)
            .field("total", &total)
            .finish()
    }
}

impl ParkedMigration {
    pub(crate) fn new(shared: Arc<Shared>) -> Self {
        Self {
            shared: Some(shared),
        }
    }

    fn shared(&self) -> Option<&Arc<Shared>> {
        self.shared.as_ref()
    }

    /// (pages installed, pages in all).
    pub fn progress(&self) -> (u64, u64) {
        self.shared()
            .map_or((0, 0), |s| (s.states.present(), s.states.len()))
    }

    /// The guest memory.
    pub fn memory(&self) -> Option<&Arc<DestMemory>> {
        self.shared().map(|s| s.installer.memory())
    }

    /// Continues the migration over `transport`, which must reach the same
    /// source (the same layout and zero pages). Pages that were being
    /// fetched when it stopped are asked for again first (threads may be
    /// blocked on them); the sweep runs to the end. On failure the
    /// migration stays parked and comes back with the error.
    pub fn resume(
        mut self,
        transport: Arc<dyn Transport>,
    ) -> Result<MigrationHandle, (EngineError, ParkedMigration)> {
        let Some(arc) = self.shared.take() else {
            return Err((EngineError::Aborted, self));
        };
        let back = |e: EngineError, arc: Arc<Shared>| (e, ParkedMigration::new(arc));
        let mem = arc.installer.memory().clone();
        // Faults still wait on the pages they waited on.
        let waits = arc.governor.waits().clone();
        // After pre-copy the migration sees the source through the pages
        // its guest wrote (counted in the source's pages, so before any
        // huge-page view); so must the new transport.
        let transport: Arc<dyn Transport> = match &arc.written {
            Some(w) => Arc::new(crate::precopy::Refreshed::new(transport, w)),
            None => transport,
        };
        let transport = match view_for(transport, &mem, &arc.config, &waits) {
            Ok(t) => t,
            Err(e) => return Err(back(e, arc)),
        };
        let other_session = matches!(
            (transport.session(), arc.transport.session()),
            (Some(a), Some(b)) if a != b
        );
        if other_session || transport.info() != arc.transport.info() {
            let e = RegionError::LayoutMismatch(
                "the source offers other memory than the migration started from".into(),
            );
            return Err(back(e.into(), arc));
        }
        let landed = match crate::migration::offer_landing(
            transport.as_ref(),
            &mem,
            arc.config.shared_install,
            arc.installer.lands(),
        ) {
            Ok(l) => l,
            Err(e) => return Err(back(e, arc)),
        };
        let urgent = match crate::migration::open_urgent(transport.as_ref(), &arc.config) {
            Ok(c) => c,
            Err(e) => return Err(back(e, arc)),
        };
        let lanes = match (0..arc.config.lanes)
            .map(|l| transport.open(ChannelClass::Bulk(l as u16)))
            .collect::<Result<Vec<_>, _>>()
        {
            Ok(l) => l,
            Err(e) => return Err(back(e.into(), arc)),
        };
        // Every engine thread has ended: this is the only reference.
        let old = match Arc::try_unwrap(arc) {
            Ok(s) => s,
            Err(arc) => return Err(back(EngineError::Aborted, arc)),
        };
        // The stopped fault services' requests are asked for again.
        waits.forget_urgent();
        let limits = limits_for(transport.as_ref());
        let mut resumed = old.resumed(transport, limits, waits);
        resumed.landed = landed;
        let shared = Arc::new(resumed);
        let (present, total) = (shared.states.present(), shared.states.len());
        info!(present, total, "post-copy migration resumed");
        Ok(launch(shared, urgent, lanes))
    }
}

impl Drop for ParkedMigration {
    fn drop(&mut self) {
        if let Some(s) = self.shared.take() {
            // Keep the userfaultfd and the memory for the process's life.
            std::mem::forget(s);
        }
    }
}
