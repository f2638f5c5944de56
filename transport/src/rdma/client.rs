//! The destination side: one RC queue pair per channel, RDMA READs into a
//! registered staging buffer.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::error::TransportError;
use crate::layout::{PageRange, SourceInfo};
use crate::tcp::TcpTransport;
use crate::wire::{RemoteRegion, SourceStats};
use crate::{check_buffer, ChannelClass, PageChannel, Transport};

use super::verbs::{CompletionWait, Device, Mr, Qp, Read};

/// Pages from a pagewire source by one-sided RDMA READ. The TCP control
/// connection carries the handshake, queue pair set-up, checksums and
/// counters; page data never touches the source's CPU.
pub struct RdmaTransport {
    control: TcpTransport,
    device: Arc<Device>,
    next_psn: AtomicU32,
    bulk_wait: CompletionWait,
}

impl std::fmt::Debug for RdmaTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RdmaTransport")
            .field("device", &self.device)
            .finish_non_exhaustive()
    }
}

impl RdmaTransport {
    /// Uses `device` for pages of the source behind `control`.
    pub fn new(control: TcpTransport, device: Arc<Device>) -> Self {
        Self {
            control,
            device,
            next_psn: AtomicU32::new(std::process::id().wrapping_mul(7919)),
            bulk_wait: CompletionWait::Poll,
        }
    }

    /// How bulk (lane) channels wait for completions; the urgent channel
    /// always busy-polls.
    pub fn with_bulk_wait(mut self, wait: CompletionWait) -> Self {
        self.bulk_wait = wait;
        self
    }

    /// The device in use.
    pub fn device(&self) -> &Arc<Device> {
        &self.device
    }
}

/// A page-aligned staging buffer registered for local writes.
struct Staging {
    // Declared first so it is dropped (deregistered) before `buf` is freed.
    mr: Mr,
    buf: Vec<u8>,
}

impl Staging {
    fn new(device: &Arc<Device>, len: usize) -> Result<Self, TransportError> {
        let mut buf = vec![0u8; len];
        // SAFETY: `buf` is owned by the returned value next to its MR and is
        // never reallocated while the MR lives (the MR is dropped first:
        // field order).
        let mr = unsafe { device.register_local_write(buf.as_mut_ptr(), len) }?;
        Ok(Self { mr, buf })
    }
}

struct RdmaChannel {
    qp: Qp,
    regions: Vec<RemoteRegion>,
    info: SourceInfo,
    staging: Option<Staging>,
    device: Arc<Device>,
    timeout: Duration,
}

impl PageChannel for RdmaChannel {
    fn fetch(&mut self, ranges: &[PageRange], buf: &mut [u8]) -> Result<(), TransportError> {
        let ps = self.info.layout.page_size();
        let want = check_buffer(ranges, ps, buf)?;
        if self.staging.as_ref().is_none_or(|s| s.buf.len() < want) {
            // Drop the old registration before making a bigger one.
            self.staging = None;
            self.staging = Some(Staging::new(
                &self.device,
                want.next_power_of_two().max(64 << 10),
            )?);
        }
        let staging = self
            .staging
            .as_mut()
            .ok_or_else(|| TransportError::Rdma("no staging buffer".into()))?;
        let base = staging.buf.as_mut_ptr() as u64;
        let mut reads = Vec::with_capacity(ranges.len());
        let mut off = 0u64;
        for r in ranges {
            let (region, roff) = self.info.layout.locate(*r)?;
            let remote = self.regions[region];
            let len = r.count as usize * ps;
            reads.push(Read {
                local: base + off,
                lkey: staging.mr.lkey(),
                len: len as u32,
                remote: remote.addr + roff as u64,
                rkey: remote.rkey,
            });
            off += len as u64;
        }
        for chunk in reads.chunks(self.qp.max_outstanding()) {
            // SAFETY: every read lands inside `staging`, registered for
            // local write, which stays alive until the completions below.
            unsafe { self.qp.post_reads(chunk) }?;
            self.qp.poll(chunk.len(), self.timeout)?;
        }
        buf.copy_from_slice(&staging.buf[..want]);
        Ok(())
    }
}

impl Transport for RdmaTransport {
    fn name(&self) -> &'static str {
        "rdma"
    }

    fn info(&self) -> &SourceInfo {
        self.control.info()
    }

    fn open(&self, class: ChannelClass) -> Result<Box<dyn PageChannel>, TransportError> {
        let wait = match class {
            ChannelClass::Urgent => CompletionWait::Poll,
            ChannelClass::Bulk(_) => self.bulk_wait,
        };
        let mut qp = self.device.create_qp(64, wait)?;
        let psn = self.next_psn.fetch_add(1_000_003, Ordering::Relaxed) & 0xff_ffff;
        let accept = self.control.rdma_connect(qp.endpoint(psn))?;
        qp.connect(psn, &accept.ep, false)?;
        Ok(Box::new(RdmaChannel {
            qp,
            regions: accept.regions,
            info: self.control.info().clone(),
            staging: None,
            device: self.device.clone(),
            timeout: self.control.io_timeout(),
        }))
    }

    fn checksums(&self, range: PageRange) -> Result<Vec<u64>, TransportError> {
        self.control.checksums(range)
    }

    fn source_stats(&self) -> Result<SourceStats, TransportError> {
        self.control.source_stats()
    }
}
