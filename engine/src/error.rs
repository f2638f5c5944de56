//! Typed errors of the engine.

use pagewire_transport::{LayoutError, TransportError};

/// Everything that can stop a migration.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// userfaultfd could not be opened or an ioctl failed.
    #[error("userfaultfd: {context}: {error:?}")]
    Uffd {
        /// What was being done.
        context: String,
        /// The underlying error (its Display omits the errno, so it is
        /// shown with Debug and not chained).
        error: userfaultfd::Error,
    },
    /// Destination guest memory could not be set up.
    #[error("guest memory: {0}")]
    Memory(String),
    /// The layout from the source is unusable.
    #[error(transparent)]
    Layout(#[from] LayoutError),
    /// Fetching pages failed.
    #[error(transparent)]
    Transport(#[from] TransportError),
    /// A fault arrived for an address outside the migrating memory.
    #[error("fault at {0:#x} is outside the migrating guest memory")]
    StrayFault(usize),
    /// A thread could not be started.
    #[error("cannot start thread {name}: {error}")]
    Thread {
        /// Which thread.
        name: String,
        /// Why.
        error: std::io::Error,
    },
    /// Another part of the migration failed first; see the first error.
    #[error("migration aborted")]
    Aborted,
}
