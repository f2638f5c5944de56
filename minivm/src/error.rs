//! Typed errors of the mini VMM.

/// What can go wrong running the guest.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    /// A KVM ioctl failed.
    #[error("KVM {what}: {error}")]
    Kvm {
        /// Which call.
        what: &'static str,
        /// The errno.
        error: kvm_ioctls::Error,
    },
    /// The guest program could not be assembled.
    #[error("assembling the guest: {0}")]
    Assemble(String),
    /// Guest memory is too small or too large for the guest.
    #[error("guest memory: {0}")]
    Memory(String),
    /// The guest did something the VMM does not model.
    #[error("vCPU {vcpu}: unexpected exit {exit}")]
    UnexpectedExit {
        /// Which vCPU.
        vcpu: usize,
        /// What it did.
        exit: String,
    },
    /// A vCPU thread could not start or panicked.
    #[error("vCPU thread: {0}")]
    Thread(String),
}

/// Maps a kvm-ioctls error with what was being done.
pub(crate) fn kvm(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VmError {
    move |error| VmError::Kvm { what, error }
}
