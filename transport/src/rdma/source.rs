//! The source side: guest regions registered for remote reads, and a queue
//! pair per destination channel.

use std::sync::{Arc, Mutex, Weak};

use crate::error::TransportError;
use crate::source::SourceMemory;
use crate::tcp::RdmaAcceptor;
use crate::wire::{QpEndpoint, RdmaAccept, RemoteRegion};

use super::verbs::{CompletionWait, Device, Mr};

/// Queue pairs of the source only answer READs; a small send queue will do.
const SOURCE_QP_DEPTH: u32 = 16;

/// Guest memory exported over RDMA.
///
/// The regions stay registered only while some destination holds a queue
/// pair: every accepted queue pair keeps the registration alive, and when
/// the last one goes (its destination finished or left), the memory
/// regions are deregistered; the next destination registers them again.
pub struct RdmaExport {
    device: Arc<Device>,
    source: Arc<SourceMemory>,
    /// The registration while queue pairs use it.
    live: Mutex<Weak<Registration>>,
    /// The registration made at start (which checks that registering
    /// works), handed to the first destination.
    first: Mutex<Option<Arc<Registration>>>,
}

/// Every region registered for remote reads.
struct Registration {
    regions: Vec<Mr>,
    // Keeps the registered memory mapped for as long as the MRs live.
    _source: Arc<SourceMemory>,
}

impl Registration {
    fn new(device: &Arc<Device>, source: &Arc<SourceMemory>) -> Result<Self, TransportError> {
        let mut regions = Vec::new();
        for i in 0..source.info().layout.regions().len() {
            let bytes = source.region(i);
            // SAFETY: `source` keeps the region's memory mapped and
            // unchanged for as long as this registration (which holds it)
            // and so the MR lives.
            regions.push(unsafe { device.register_remote_read(bytes.as_ptr(), bytes.len()) }?);
        }
        tracing::info!(
            regions = regions.len(),
            "guest memory registered for RDMA READs"
        );
        Ok(Self {
            regions,
            _source: source.clone(),
        })
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        tracing::info!("no destination holds a queue pair: guest memory deregistered");
    }
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
        let first = Arc::new(Registration::new(&device, &source)?);
        Ok(Self {
            device,
            source,
            live: Mutex::new(Arc::downgrade(&first)),
            first: Mutex::new(Some(first)),
        })
    }

    /// The live registration, made again if every destination let go.
    fn registration(&self) -> Result<Arc<Registration>, TransportError> {
        let first = self.first.lock().unwrap_or_else(|p| p.into_inner()).take();
        let mut live = self.live.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(r) = live.upgrade() {
            drop(first);
            return Ok(r);
        }
        let r = Arc::new(Registration::new(&self.device, &self.source)?);
        *live = Arc::downgrade(&r);
        Ok(r)
    }

    /// The device in use.
    pub fn device(&self) -> &Arc<Device> {
        &self.device
    }
}

impl RdmaAcceptor for RdmaExport {
    fn accept(&self, ep: QpEndpoint) -> Result<(RdmaAccept, Box<dyn Send>), TransportError> {
        let reg = self.registration()?;
        let mut qp = self
            .device
            .create_qp(SOURCE_QP_DEPTH, CompletionWait::Poll)?;
        let psn = ep.psn.wrapping_mul(2_654_435_761) & 0xff_ffff;
        qp.connect(psn, &ep, true)?;
        let accept = RdmaAccept {
            ep: qp.endpoint(psn),
            regions: reg
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
        // The queue pair is dropped (destroyed) before the registration
        // it reads from: tuple fields drop in order.
        Ok((accept, Box::new((qp, reg))))
    }
}
