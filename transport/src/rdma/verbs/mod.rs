//! A thin wrapper over libibverbs (through `rdma-sys`): device, protection
//! domain, memory regions and RC queue pairs. Every `unsafe` block of the
//! RDMA backend lives here.
//!
//! One file per verbs object: the device and its protection domain, memory
//! regions, queue pairs, and their completions.

mod completion;
mod device;
mod mr;
mod qp;

pub use completion::CompletionWait;
pub use device::Device;
pub use mr::Mr;
pub use qp::{Qp, Read};

use crate::error::{RdmaError, TransportError};
pub use crate::wire::QpEndpoint;

fn err(what: &str) -> TransportError {
    RdmaError::Verbs {
        call: what.to_string(),
        error: std::io::Error::last_os_error(),
    }
    .into()
}

fn no_device(why: String) -> TransportError {
    RdmaError::NoDevice(why).into()
}
