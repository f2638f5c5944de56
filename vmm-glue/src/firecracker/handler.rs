//! Serving one Firecracker VM's memory post-copy: accept its handshake,
//! start a migration through its userfaultfd, watch its socket.

use std::io::Read;
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use pagewire_engine::{DestMemory, EngineError, EngineReport, LiveMetrics, MigrationConfig};
use pagewire_transport::tcp::TcpOptions;

use super::handshake::{receive, HandshakeError};
use crate::embed::{connect, Destination, EmbedError, TransportChoice, UffdSetup};

/// Why a VM could not be served at all.
#[derive(Debug, thiserror::Error)]
pub enum FcError {
    /// Accepting the VMM's connection failed.
    #[error("accepting the VMM's connection")]
    Accept(#[source] std::io::Error),
    /// The handshake was malformed.
    #[error(transparent)]
    Handshake(#[from] HandshakeError),
    /// The memory, the userfaultfd or the source were refused.
    #[error(transparent)]
    Start(#[from] EmbedError),
}

/// How serving one VM ended.
#[derive(Debug)]
pub enum FcOutcome {
    /// Every page arrived; guest memory is unregistered and the VM runs on
    /// its own.
    Complete(Box<EngineReport>),
    /// The VMM closed its socket before the migration finished: the VM is
    /// gone.
    VmGone {
        /// Pages that had arrived.
        present: u64,
        /// Pages in all.
        total: u64,
    },
    /// The migration failed. Guest memory stays registered, so the VM's
    /// vCPUs block on pages that never arrived instead of reading zeros;
    /// keep this process (and the socket) alive until the VM is stopped,
    /// see [`FcHandler::hold_until_vm_gone`].
    Failed {
        /// Why.
        error: EngineError,
        /// The VMM's connection.
        vmm: UnixStream,
    },
}

/// A page-fault handler for Firecracker, pulling the snapshot's memory
/// from a pagewire source.
#[derive(Debug, Clone)]
pub struct FcHandler {
    /// Address of the source serving the snapshot memory file.
    pub source: String,
    /// Transport to the source.
    pub transport: TransportChoice,
    /// Engine settings.
    pub config: MigrationConfig,
    /// Timeouts.
    pub tcp: TcpOptions,
}

impl FcHandler {
    /// Accepts one VMM on `listener`, serves its memory and reports how it
    /// ended; `progress` is called every 20 ms while pages arrive.
    pub fn serve(
        &self,
        listener: &UnixListener,
        mut progress: impl FnMut(&LiveMetrics),
    ) -> Result<FcOutcome, FcError> {
        let (vmm, _) = listener.accept().map_err(FcError::Accept)?;
        let hs = receive(&vmm)?;
        tracing::info!(
            regions = hs.regions.len(),
            pid = hs.pid,
            "Firecracker handshake received"
        );
        let memory = DestMemory::remote(&hs.regions, hs.pid).map_err(EmbedError::from)?;
        let transport = connect(&self.source, self.transport.clone(), self.tcp.clone())?;
        let handle = Destination::start_over(
            transport,
            memory,
            UffdSetup::Existing(hs.uffd),
            self.config.clone(),
        )?;
        // Firecracker never writes after the handshake: end of file (or an
        // error) on its socket means the VM is gone.
        let gone = Arc::new(AtomicBool::new(false));
        if let Ok(mut watch) = vmm.try_clone() {
            let gone = gone.clone();
            let _ = std::thread::Builder::new()
                .name("pw-fc-watch".into())
                .spawn(move || {
                    let mut b = [0u8; 64];
                    while matches!(watch.read(&mut b), Ok(n) if n > 0) {}
                    gone.store(true, Ordering::SeqCst);
                });
        }
        while !handle.is_finished() && !gone.load(Ordering::SeqCst) {
            progress(&handle.metrics());
            std::thread::sleep(Duration::from_millis(20));
        }
        progress(&handle.metrics());
        if gone.load(Ordering::SeqCst) && !handle.is_finished() {
            let (present, total) = handle.progress();
            let _ = handle.abort();
            return Ok(FcOutcome::VmGone { present, total });
        }
        let transport = handle.transport().clone();
        match handle.wait() {
            Ok(report) => {
                if let Err(e) = transport.done() {
                    tracing::warn!("could not tell the source we are done: {e}");
                }
                Ok(FcOutcome::Complete(Box::new(report)))
            }
            Err(error) => Ok(FcOutcome::Failed { error, vmm }),
        }
    }

    /// After a failure: blocks until the VMM closes its socket (the VM was
    /// stopped), keeping guest memory registered meanwhile.
    pub fn hold_until_vm_gone(mut vmm: UnixStream) {
        let _ = vmm.set_read_timeout(None);
        let mut b = [0u8; 64];
        while matches!(vmm.read(&mut b), Ok(n) if n > 0) {}
    }
}
