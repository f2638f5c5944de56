//! RDMA backend: the destination fetches pages with one-sided RDMA READs
//! from the source's registered guest memory; the source CPU does no work
//! per page. Queue pairs are set up over the TCP control connection.

mod client;
mod source;
pub mod verbs;

pub use client::{RdmaTransport, FALLBACK_AFTER};
pub use source::RdmaExport;
pub use verbs::{CompletionWait, Device};
