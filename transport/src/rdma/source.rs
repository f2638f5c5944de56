//! The source side: guest regions registered for remote reads, and a queue
//! pair per destination channel.

use std::sync::Arc;

use crate::error::TransportError;
use crate::source::SourceMemory;
use crate::tcp::RdmaAcceptor;
use crate::wire::{QpEndpoint, RdmaAccept, RemoteRegion};

use super::verbs::{CompletionWait, Device, Mr};

/// Queue pairs of the source only answer READs; a small send queue will do.
const SOURCE_QP_DEPTH: u32 = 16;

/// Guest memory exported over RDMA.
pub struct RdmaExport {
    device: Arc<Device>,
    regions: Vec<Mr>,
    // Keeps the registered memory mapped for as long as the MRs live.
    source: Arc<SourceMemory>,
}

impl std::fmt::Debug for RdmaExport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RdmaExport")
            .field("device", &self.device)
            .finish()
    }
}

impl RdmaExport {
    /// Registers every region of `source` on `device` for remote reads.
    pub fn new(device: Arc<Device>, source: Arc<SourceMemory>) -> Result<Self, TransportError> {
        let mut regions = Vec::new();
        for i in 0..source.info().layout.regions().len() {
            let bytes = source.region(i);
            // SAFETY: `source` keeps the region's memory mapped and
            // unchanged for as long as this export (and so the MR) lives.
            regions.push(unsafe { device.register_remote_read(bytes.as_ptr(), bytes.len()) }?);
        }
        Ok(Self {
            device,
            regions,
            source,
        })
    }

    /// The device in use.
    pub fn device(&self) -> &Arc<Device> {
        &self.device
    }
}

impl RdmaAcceptor for RdmaExport {
    fn accept(&self, ep: QpEndpoint) -> Result<(RdmaAccept, Box<dyn Send>), TransportError> {
        let mut qp = self
            .device
            .create_qp(SOURCE_QP_DEPTH, CompletionWait::Poll)?;
        let psn = ep.psn.wrapping_mul(2_654_435_761) & 0xff_ffff;
        qp.connect(psn, &ep, true)?;
        let accept = RdmaAccept {
            ep: qp.endpoint(psn),
            regions: self
                .regions
                .iter()
                .zip(self.source.info().layout.regions())
                .map(|(mr, r)| RemoteRegion {
                    addr: mr.addr(),
                    len: r.len,
                    rkey: mr.rkey(),
                })
                .collect(),
        };
        tracing::debug!(
            qpn = accept.ep.qpn,
            peer_qpn = ep.qpn,
            "RDMA queue pair connected"
        );
        Ok((accept, Box::new(qp)))
    }
}
