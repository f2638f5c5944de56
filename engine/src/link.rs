//! Recovery after link loss: a channel whose link broke is reopened with
//! backoff until the recovery timeout, and what was outstanding on it is
//! sent again. Pages stay claimed by whoever had asked for them, so
//! faulting threads stay blocked (never failed, never zero-filled) and no
//! page is lost or installed twice; only replies that never arrived are
//! asked for again, and counted as resent.

use std::time::{Duration, Instant};

use pagewire_transport::{ChannelClass, PageChannel, TransportError};
use tracing::{info, warn};

use crate::error::EngineError;
use crate::metrics::Metrics;
use crate::shared::Shared;

/// Longest wait between reconnect attempts.
const MAX_BACKOFF: Duration = Duration::from_secs(1);

/// Reopens the channel of `class` after `lost` broke it, or returns the
/// error that ends the migration: `lost` itself when it is not a link
/// loss or recovery is off, [`EngineError::SourceGone`] when the source
/// refuses connections, [`EngineError::RecoveryTimedOut`] at the deadline.
///
/// `outage` is when this channel last lost its link without a reply
/// arriving since (the caller clears it on every reply): the deadline
/// runs from there, so a source that takes connections but never answers
/// cannot keep the channel reconnecting forever.
pub(crate) fn reconnect(
    shared: &Shared,
    class: ChannelClass,
    lost: TransportError,
    outage: &mut Option<Instant>,
) -> Result<Box<dyn PageChannel>, EngineError> {
    let timeout = shared.config.recover_timeout;
    if !lost.is_link_loss() || timeout.is_zero() {
        return Err(lost.into());
    }
    Metrics::add(&shared.metrics.link_losses, 1);
    warn!(
        ?class,
        "link lost ({lost}): reconnecting for up to {timeout:?}"
    );
    let t0 = Instant::now();
    let deadline = *outage.get_or_insert(t0) + timeout;
    if t0 >= deadline {
        return Err(EngineError::RecoveryTimedOut {
            secs: timeout.as_secs_f64(),
            last: TransportError::Protocol(
                "the source takes connections but has not answered since the link was first lost"
                    .into(),
            ),
            lost,
        });
    }
    let mut backoff = Duration::from_millis(5);
    loop {
        if shared.aborted() {
            return Err(EngineError::Aborted);
        }
        match shared.transport.open(class) {
            Ok(ch) => {
                Metrics::add(&shared.metrics.reconnects, 1);
                shared.metrics.recovery.record(t0.elapsed());
                info!(?class, after = ?t0.elapsed(), "link back");
                return Ok(ch);
            }
            Err(e) if !e.is_link_loss() => {
                return Err(match e {
                    TransportError::Io { ref error, .. }
                        if error.kind() == std::io::ErrorKind::ConnectionRefused =>
                    {
                        EngineError::SourceGone { lost, refused: e }
                    }
                    e => e.into(),
                })
            }
            Err(e) if Instant::now() + backoff >= deadline => {
                return Err(EngineError::RecoveryTimedOut {
                    lost,
                    secs: timeout.as_secs_f64(),
                    last: e,
                })
            }
            Err(e) => {
                tracing::debug!(?class, "reconnect failed ({e}), retrying in {backoff:?}");
                std::thread::sleep(backoff);
                backoff = (backoff * 2).min(MAX_BACKOFF);
            }
        }
    }
}
