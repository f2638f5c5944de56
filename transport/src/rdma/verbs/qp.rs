//! Queue pairs: RC queue pairs, connected to a peer's over the control
//! connection, that post chains of one-sided RDMA READs.

use std::ptr;
use std::sync::Arc;

use rdma_sys::*;

use super::completion::CompletionWait;
use super::device::Device;
use super::err;
use crate::error::{RdmaError, TransportError};
use crate::wire::QpEndpoint;

/// One RDMA READ: `len` bytes from `remote`/`rkey` to `local`/`lkey`.
#[derive(Debug, Clone, Copy)]
pub struct Read {
    /// Local destination address (inside a registered MR).
    pub local: u64,
    /// Its MR's local key.
    pub lkey: u32,
    /// Bytes to read.
    pub len: u32,
    /// Remote source address.
    pub remote: u64,
    /// Remote MR key.
    pub rkey: u32,
}

/// An RC queue pair and its completion queue.
pub struct Qp {
    qp: *mut ibv_qp,
    pub(super) cq: *mut ibv_cq,
    /// Null when busy-polling.
    pub(super) channel: *mut ibv_comp_channel,
    dev: Arc<Device>,
    /// `wr_id` of the next READ posted, and of the next completion due.
    next_post: u64,
    pub(super) next_complete: u64,
}

// SAFETY: a QP is used by one thread at a time (`&mut self` for posting and
// polling); verbs objects may move between threads.
unsafe impl Send for Qp {}

impl Device {
    /// Creates an RC queue pair with its own completion queue, `depth`
    /// work requests deep, that waits for completions as `wait` says.
    pub fn create_qp(
        self: &Arc<Self>,
        depth: u32,
        wait: CompletionWait,
    ) -> Result<Qp, TransportError> {
        let channel = match wait {
            CompletionWait::Poll => ptr::null_mut(),
            CompletionWait::Event => {
                // SAFETY: `ctx` is open.
                let ch = unsafe { ibv_create_comp_channel(self.ctx()) };
                if ch.is_null() {
                    return Err(err("ibv_create_comp_channel"));
                }
                // SAFETY: `ch` is live; its fd is ours to make non-blocking
                // (we wait on it with poll(2) and a timeout).
                unsafe {
                    let fd = (*ch).fd;
                    libc::fcntl(
                        fd,
                        libc::F_SETFL,
                        libc::fcntl(fd, libc::F_GETFL) | libc::O_NONBLOCK,
                    );
                }
                ch
            }
        };
        // SAFETY: `ctx` is open; `channel` is null or live; vector 0.
        let cq = unsafe { ibv_create_cq(self.ctx(), depth as i32, ptr::null_mut(), channel, 0) };
        if cq.is_null() {
            if !channel.is_null() {
                // SAFETY: the channel was created above and is unused.
                unsafe { ibv_destroy_comp_channel(channel) };
            }
            return Err(err("ibv_create_cq"));
        }
        // SAFETY: zeroed init attributes are valid; the fields that matter
        // are set below.
        let mut init: ibv_qp_init_attr = unsafe { std::mem::zeroed() };
        init.send_cq = cq;
        init.recv_cq = cq;
        init.qp_type = ibv_qp_type::IBV_QPT_RC;
        init.cap.max_send_wr = depth;
        init.cap.max_recv_wr = 1;
        init.cap.max_send_sge = 1;
        init.cap.max_recv_sge = 1;
        // SAFETY: the PD and CQ are live; `init` is valid.
        let qp = unsafe { ibv_create_qp(self.pd(), &mut init) };
        // Built before the null check so that its Drop releases the CQ and
        // channel on failure too (it skips a null QP).
        let q = Qp {
            qp,
            cq,
            channel,
            next_post: 0,
            next_complete: 0,
            dev: self.clone(),
        };
        if q.qp.is_null() {
            return Err(err("ibv_create_qp"));
        }
        Ok(q)
    }
}

impl Qp {
    /// This QP's endpoint with starting PSN `psn`.
    pub fn endpoint(&self, psn: u32) -> QpEndpoint {
        QpEndpoint {
            // SAFETY: `qp` is live.
            qpn: unsafe { (*self.qp).qp_num },
            psn: psn & 0xff_ffff,
            gid: self.dev.gid,
            lid: self.dev.lid,
            mtu: self.dev.mtu as u8,
            rd_atomic: self.dev.max_rd_atomic,
        }
    }

    fn modify(
        &mut self,
        attr: &mut ibv_qp_attr,
        mask: ibv_qp_attr_mask,
        what: &str,
    ) -> Result<(), TransportError> {
        // SAFETY: `qp` is live and `attr` is a valid attribute struct.
        let rc = unsafe { ibv_modify_qp(self.qp, attr, mask.0 as i32) };
        if rc != 0 {
            return Err(RdmaError::Verbs {
                call: format!("ibv_modify_qp to {what}"),
                error: std::io::Error::from_raw_os_error(rc),
            }
            .into());
        }
        Ok(())
    }

    /// Moves the QP through INIT, RTR and RTS towards `remote`.
    /// `remote_read` lets the peer read our registered memory.
    pub fn connect(
        &mut self,
        local_psn: u32,
        remote: &QpEndpoint,
        remote_read: bool,
    ) -> Result<(), TransportError> {
        use ibv_qp_attr_mask as m;
        // SAFETY: zeroed attributes are valid; fields are set per step.
        let mut a: ibv_qp_attr = unsafe { std::mem::zeroed() };
        a.qp_state = ibv_qp_state::IBV_QPS_INIT;
        a.pkey_index = 0;
        a.port_num = self.dev.port;
        a.qp_access_flags = if remote_read {
            ibv_access_flags::IBV_ACCESS_REMOTE_READ.0
        } else {
            0
        };
        self.modify(
            &mut a,
            m::IBV_QP_STATE | m::IBV_QP_PKEY_INDEX | m::IBV_QP_PORT | m::IBV_QP_ACCESS_FLAGS,
            "INIT",
        )?;

        // SAFETY: as above.
        let mut a: ibv_qp_attr = unsafe { std::mem::zeroed() };
        a.qp_state = ibv_qp_state::IBV_QPS_RTR;
        // Negotiated: the smaller MTU of the two ports.
        a.path_mtu = self.dev.mtu.min(u32::from(remote.mtu));
        a.dest_qp_num = remote.qpn;
        a.rq_psn = remote.psn;
        a.max_dest_rd_atomic = self.dev.max_rd_atomic;
        a.min_rnr_timer = 12;
        a.ah_attr.is_global = 1;
        a.ah_attr.dlid = remote.lid;
        a.ah_attr.port_num = self.dev.port;
        a.ah_attr.grh.dgid.raw = remote.gid;
        a.ah_attr.grh.sgid_index = self.dev.gid_index;
        a.ah_attr.grh.hop_limit = 64;
        self.modify(
            &mut a,
            m::IBV_QP_STATE
                | m::IBV_QP_AV
                | m::IBV_QP_PATH_MTU
                | m::IBV_QP_DEST_QPN
                | m::IBV_QP_RQ_PSN
                | m::IBV_QP_MAX_DEST_RD_ATOMIC
                | m::IBV_QP_MIN_RNR_TIMER,
            "RTR",
        )?;

        // SAFETY: as above.
        let mut a: ibv_qp_attr = unsafe { std::mem::zeroed() };
        a.qp_state = ibv_qp_state::IBV_QPS_RTS;
        a.sq_psn = local_psn & 0xff_ffff;
        a.timeout = 14; // 4.096 us * 2^14 = 67 ms per try
        a.retry_cnt = 7;
        a.rnr_retry = 7;
        // Never more READs in flight than the peer accepts as responder.
        a.max_rd_atomic = self.dev.max_rd_atomic.min(remote.rd_atomic);
        self.modify(
            &mut a,
            m::IBV_QP_STATE
                | m::IBV_QP_SQ_PSN
                | m::IBV_QP_TIMEOUT
                | m::IBV_QP_RETRY_CNT
                | m::IBV_QP_RNR_RETRY
                | m::IBV_QP_MAX_QP_RD_ATOMIC,
            "RTS",
        )
    }

    /// Posts `reads` as one chain of signaled RDMA READs. The caller keeps
    /// the READs not yet completed within the depth the QP was created
    /// with; the device keeps at most the negotiated `max_rd_atomic` of
    /// them on the wire and queues the rest.
    ///
    /// # Safety
    /// Each read's local range must lie in a live MR registered for local
    /// write, and stay valid until its completion is polled.
    pub unsafe fn post_reads(&mut self, reads: &[Read]) -> Result<(), TransportError> {
        let mut sges: Vec<ibv_sge> = reads
            .iter()
            .map(|r| ibv_sge {
                addr: r.local,
                length: r.len,
                lkey: r.lkey,
            })
            .collect();
        // SAFETY: zeroed work requests are valid; fields are set below.
        let mut wrs: Vec<ibv_send_wr> = reads
            .iter()
            .map(|_| unsafe { std::mem::zeroed() })
            .collect();
        let n = wrs.len();
        let base = wrs.as_mut_ptr();
        for (i, (wr, r)) in wrs.iter_mut().zip(reads).enumerate() {
            wr.wr_id = self.next_post + i as u64;
            wr.sg_list = &mut sges[i];
            wr.num_sge = 1;
            wr.opcode = ibv_wr_opcode::IBV_WR_RDMA_READ;
            wr.send_flags = ibv_send_flags::IBV_SEND_SIGNALED.0;
            wr.wr.rdma.remote_addr = r.remote;
            wr.wr.rdma.rkey = r.rkey;
            wr.next = if i + 1 < n {
                // SAFETY: `base + i + 1` is inside the vector when i + 1 < n.
                unsafe { base.add(i + 1) }
            } else {
                ptr::null_mut()
            };
        }
        let mut bad: *mut ibv_send_wr = ptr::null_mut();
        // SAFETY: the chain and its SGEs live until this call returns (the
        // provider copies them); the caller guarantees the memory.
        let rc = unsafe { ibv_post_send(self.qp, base, &mut bad) };
        if rc == 0 {
            self.next_post += n as u64;
        }
        if rc != 0 {
            return Err(RdmaError::Verbs {
                call: "ibv_post_send".into(),
                error: std::io::Error::from_raw_os_error(rc),
            }
            .into());
        }
        Ok(())
    }
}

impl Drop for Qp {
    fn drop(&mut self) {
        // SAFETY: the QP, CQ and channel are ours; each goes before what it
        // uses (QP, then CQ, then channel). Events were acked as taken.
        unsafe {
            if !self.qp.is_null() {
                ibv_destroy_qp(self.qp);
            }
            ibv_destroy_cq(self.cq);
            if !self.channel.is_null() {
                ibv_destroy_comp_channel(self.channel);
            }
        }
    }
}
