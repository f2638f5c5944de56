//! A thin wrapper over libibverbs (through `rdma-sys`): device, protection
//! domain, memory regions and RC queue pairs. Every `unsafe` block of the
//! RDMA backend lives here.

use std::ffi::CStr;
use std::ptr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rdma_sys::*;

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

/// How a queue pair waits for its completions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum CompletionWait {
    /// Busy-poll the completion queue: lowest latency, burns a core.
    #[default]
    Poll,
    /// Sleep on a completion channel until the device signals: frees the
    /// CPU for others (the kernel, the vCPUs) at some latency cost.
    Event,
}

/// An open RDMA device with one protection domain, bound to a port and GID.
pub struct Device {
    ctx: *mut ibv_context,
    pd: *mut ibv_pd,
    name: String,
    port: u8,
    gid_index: u8,
    gid: [u8; 16],
    lid: u16,
    mtu: ibv_mtu::Type,
    max_rd_atomic: u8,
}

// SAFETY: libibverbs contexts and PDs may be used from any thread; the
// library serializes internally where needed (rdma-core's thread-safety
// guarantee for the verbs API).
unsafe impl Send for Device {}
// SAFETY: as above; `Device` hands out no interior references.
unsafe impl Sync for Device {}

impl std::fmt::Debug for Device {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Device")
            .field("name", &self.name)
            .field("port", &self.port)
            .field("gid_index", &self.gid_index)
            .finish()
    }
}

fn is_ipv4_mapped(g: &[u8; 16]) -> bool {
    g[..10].iter().all(|&b| b == 0) && g[10] == 0xff && g[11] == 0xff
}

impl Device {
    /// Opens device `name` (or the first with an ACTIVE port 1) and picks
    /// GID `gid_index`, or the first IPv4-mapped GID, or the first non-zero
    /// one. "No RDMA device" (including a kernel without RDMA, where the
    /// device list fails with ENOSYS) is an error, never a crash.
    pub fn open(name: Option<&str>, gid_index: Option<u8>) -> Result<Arc<Self>, TransportError> {
        let mut n = 0i32;
        // SAFETY: `n` is a valid out-pointer; the returned list is freed below.
        let list = unsafe { ibv_get_device_list(&mut n) };
        if list.is_null() {
            return Err(no_device(format!(
                "no RDMA device ({})",
                std::io::Error::last_os_error()
            )));
        }
        let mut chosen = None;
        for i in 0..n.max(0) as usize {
            // SAFETY: the list holds `n` valid device pointers.
            let dev = unsafe { *list.add(i) };
            // SAFETY: `dev` is valid while the list is; the name is a C string.
            let dname = unsafe { CStr::from_ptr(ibv_get_device_name(dev)) }
                .to_string_lossy()
                .into_owned();
            if name.is_some_and(|want| want != dname) {
                continue;
            }
            match Self::open_one(dev, &dname, gid_index) {
                Ok(d) => {
                    chosen = Some(Ok(d));
                    break;
                }
                Err(e) => chosen = Some(Err(e)),
            }
        }
        // SAFETY: `list` came from ibv_get_device_list; opened contexts stay
        // valid after the list is freed.
        unsafe { ibv_free_device_list(list) };
        match chosen {
            Some(r) => r.map(Arc::new),
            None => Err(no_device(match name {
                Some(want) => format!("no RDMA device named {want}"),
                None => "no RDMA device".into(),
            })),
        }
    }

    fn open_one(
        dev: *mut ibv_device,
        name: &str,
        gid_index: Option<u8>,
    ) -> Result<Self, TransportError> {
        // SAFETY: `dev` is a valid device from the current list.
        let ctx = unsafe { ibv_open_device(dev) };
        if ctx.is_null() {
            return Err(err("ibv_open_device"));
        }
        let mut d = Self {
            ctx,
            pd: ptr::null_mut(),
            name: name.to_string(),
            port: 1,
            gid_index: 0,
            gid: [0; 16],
            lid: 0,
            mtu: ibv_mtu::IBV_MTU_1024,
            max_rd_atomic: 1,
        };
        // SAFETY: zeroed attribute structs are valid inputs for the query
        // calls, which fill them.
        let mut port: ibv_port_attr = unsafe { std::mem::zeroed() };
        // SAFETY: `ctx` is open; `port` is a valid out-pointer.
        if unsafe { ___ibv_query_port(ctx, 1, &mut port) } != 0 {
            return Err(err("ibv_query_port"));
        }
        if port.state != ibv_port_state::IBV_PORT_ACTIVE {
            return Err(no_device(format!("device {name} port 1 is not ACTIVE")));
        }
        d.lid = port.lid;
        d.mtu = port.active_mtu;
        // SAFETY: as above.
        let mut attr: ibv_device_attr = unsafe { std::mem::zeroed() };
        // SAFETY: `ctx` is open; `attr` is a valid out-pointer.
        if unsafe { ibv_query_device(ctx, &mut attr) } != 0 {
            return Err(err("ibv_query_device"));
        }
        d.max_rd_atomic = attr.max_qp_rd_atom.clamp(1, 16) as u8;
        let query = |i: i32| -> Option<[u8; 16]> {
            // SAFETY: a zeroed GID is a valid out-value.
            let mut g: ibv_gid = unsafe { std::mem::zeroed() };
            // SAFETY: `ctx` is open; `g` is a valid out-pointer.
            let rc = unsafe { ibv_query_gid(ctx, 1, i, &mut g) };
            // SAFETY: every bit pattern of the union is a valid byte array.
            let raw = unsafe { g.raw };
            (rc == 0).then_some(raw)
        };
        let (idx, gid) = match gid_index {
            Some(i) => (i, query(i32::from(i)).ok_or_else(|| err("ibv_query_gid"))?),
            None => {
                let table: Vec<(u8, [u8; 16])> = (0..port.gid_tbl_len.min(256))
                    .filter_map(|i| query(i).map(|g| (i as u8, g)))
                    .filter(|(_, g)| g.iter().any(|&b| b != 0))
                    .collect();
                table
                    .iter()
                    .find(|(_, g)| is_ipv4_mapped(g))
                    .or(table.first())
                    .copied()
                    .ok_or_else(|| no_device(format!("device {name} has no GID")))?
            }
        };
        d.gid_index = idx;
        d.gid = gid;
        // SAFETY: `ctx` is open.
        d.pd = unsafe { ibv_alloc_pd(ctx) };
        if d.pd.is_null() {
            return Err(err("ibv_alloc_pd"));
        }
        Ok(d)
    }

    /// Device name, e.g. `rxe0`.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The GID index in use.
    pub fn gid_index(&self) -> u8 {
        self.gid_index
    }

    /// Registers `len` bytes at `addr` for remote reads only (no local or
    /// remote write: the source's memory is never written through RDMA).
    ///
    /// # Safety
    /// `addr..addr + len` must stay mapped and readable for as long as the
    /// returned [`Mr`] lives.
    pub unsafe fn register_remote_read(
        self: &Arc<Self>,
        addr: *const u8,
        len: usize,
    ) -> Result<Mr, TransportError> {
        let access = ibv_access_flags::IBV_ACCESS_REMOTE_READ.0 as i32;
        self.register(addr as *mut u8, len, access)
    }

    /// Registers a local buffer that RDMA READs land in.
    ///
    /// # Safety
    /// `addr..addr + len` must stay mapped and writable for as long as the
    /// returned [`Mr`] lives.
    pub unsafe fn register_local_write(
        self: &Arc<Self>,
        addr: *mut u8,
        len: usize,
    ) -> Result<Mr, TransportError> {
        let access = ibv_access_flags::IBV_ACCESS_LOCAL_WRITE.0 as i32;
        self.register(addr, len, access)
    }

    unsafe fn register(
        self: &Arc<Self>,
        addr: *mut u8,
        len: usize,
        access: i32,
    ) -> Result<Mr, TransportError> {
        // SAFETY: the PD is live; the caller guarantees the memory.
        let mr = unsafe { ibv_reg_mr(self.pd, addr.cast(), len, access) };
        if mr.is_null() {
            return Err(err("ibv_reg_mr"));
        }
        Ok(Mr {
            mr,
            _dev: self.clone(),
        })
    }

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
                let ch = unsafe { ibv_create_comp_channel(self.ctx) };
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
        let cq = unsafe { ibv_create_cq(self.ctx, depth as i32, ptr::null_mut(), channel, 0) };
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
        let qp = unsafe { ibv_create_qp(self.pd, &mut init) };
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

impl Drop for Device {
    fn drop(&mut self) {
        // SAFETY: every MR and QP holds an Arc to the device, so none is
        // left when it drops; the PD and context are ours.
        unsafe {
            if !self.pd.is_null() {
                ibv_dealloc_pd(self.pd);
            }
            ibv_close_device(self.ctx);
        }
    }
}

/// A registered memory region.
pub struct Mr {
    mr: *mut ibv_mr,
    _dev: Arc<Device>,
}

// SAFETY: an MR handle is an immutable kernel object reference; its keys
// may be read from any thread.
unsafe impl Send for Mr {}
// SAFETY: as above.
unsafe impl Sync for Mr {}

impl Mr {
    /// Start address.
    pub fn addr(&self) -> u64 {
        // SAFETY: `mr` is a live region.
        unsafe { (*self.mr).addr as u64 }
    }
    /// Local key.
    pub fn lkey(&self) -> u32 {
        // SAFETY: as above.
        unsafe { (*self.mr).lkey }
    }
    /// Remote key.
    pub fn rkey(&self) -> u32 {
        // SAFETY: as above.
        unsafe { (*self.mr).rkey }
    }
}

impl Drop for Mr {
    fn drop(&mut self) {
        // SAFETY: `mr` is ours and no work request uses it any more (QPs
        // that did are destroyed or idle).
        unsafe { ibv_dereg_mr(self.mr) };
    }
}

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
    cq: *mut ibv_cq,
    /// Null when busy-polling.
    channel: *mut ibv_comp_channel,
    dev: Arc<Device>,
    /// `wr_id` of the next READ posted, and of the next completion due.
    next_post: u64,
    next_complete: u64,
}

// SAFETY: a QP is used by one thread at a time (`&mut self` for posting and
// polling); verbs objects may move between threads.
unsafe impl Send for Qp {}

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

    /// Polls the completion queue once; fails on an error completion.
    fn poll_once(&mut self, wcs: &mut [ibv_wc; 16]) -> Result<usize, TransportError> {
        // SAFETY: `cq` is live; `wcs` has room for 16 entries.
        let n = unsafe { ibv_poll_cq(self.cq, 16, wcs.as_mut_ptr()) };
        if n < 0 {
            return Err(RdmaError::DeviceRemoved.into());
        }
        for wc in &wcs[..n as usize] {
            if wc.status != ibv_wc_status::IBV_WC_SUCCESS {
                // SAFETY: returns a static C string for any status.
                let why = unsafe { CStr::from_ptr(ibv_wc_status_str(wc.status)) };
                let status = why.to_string_lossy().into_owned();
                use ibv_wc_status as st;
                return Err(match wc.status {
                    // The path is gone: retries ran out, the queue pair
                    // was flushed, or (Soft-RoCE) the route to the peer's
                    // address vanished under a request being sent.
                    st::IBV_WC_RETRY_EXC_ERR
                    | st::IBV_WC_RNR_RETRY_EXC_ERR
                    | st::IBV_WC_WR_FLUSH_ERR
                    | st::IBV_WC_LOC_QP_OP_ERR => RdmaError::QpError { status },
                    st::IBV_WC_REM_ACCESS_ERR | st::IBV_WC_REM_INV_REQ_ERR => {
                        RdmaError::RemoteAccess { status }
                    }
                    _ => RdmaError::Completion { status },
                }
                .into());
            }
            // An RC queue pair completes its work requests in order.
            if wc.wr_id != self.next_complete {
                return Err(RdmaError::UnexpectedWrId {
                    got: wc.wr_id,
                    want: self.next_complete,
                }
                .into());
            }
            self.next_complete += 1;
        }
        Ok(n as usize)
    }

    /// Sleeps until the completion channel signals or `deadline` passes;
    /// returns false on timeout.
    fn sleep_for_event(&mut self, deadline: Instant) -> Result<bool, TransportError> {
        let left = deadline.saturating_duration_since(Instant::now());
        // SAFETY: `channel` is live (event mode).
        let fd = unsafe { (*self.channel).fd };
        let mut pfd = libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd.
        let n = unsafe { libc::poll(&mut pfd, 1, left.as_millis().min(i32::MAX as u128) as i32) };
        if n <= 0 {
            return Ok(
                n < 0 && std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted
            );
        }
        let mut cq = ptr::null_mut();
        let mut ctx = ptr::null_mut();
        // SAFETY: the channel is readable; out-pointers are valid.
        if unsafe { ibv_get_cq_event(self.channel, &mut cq, &mut ctx) } == 0 {
            // SAFETY: one event was taken from our own CQ.
            unsafe { ibv_ack_cq_events(self.cq, 1) };
        }
        Ok(true)
    }

    /// Takes whatever completions are ready without waiting, adding them
    /// to `have`; fails on an error completion.
    pub fn poll_ready(&mut self, have: &mut usize) -> Result<(), TransportError> {
        // SAFETY: zeroed work completions are valid out-values.
        let mut wcs: [ibv_wc; 16] = unsafe { std::mem::zeroed() };
        *have += self.poll_once(&mut wcs)?;
        Ok(())
    }

    /// Waits until `have` reaches `need` completions, all successful;
    /// completions beyond `need` stay counted in `have` for the next
    /// request. Fails on the first error completion or after `timeout`.
    pub fn poll_until(
        &mut self,
        need: usize,
        have: &mut usize,
        timeout: Duration,
    ) -> Result<(), TransportError> {
        let deadline = Instant::now() + timeout;
        let timed_out = || -> TransportError {
            RdmaError::CompletionTimeout {
                secs: timeout.as_secs_f64(),
            }
            .into()
        };
        // SAFETY: zeroed work completions are valid out-values.
        let mut wcs: [ibv_wc; 16] = unsafe { std::mem::zeroed() };
        let mut spins = 0u32;
        while *have < need {
            let n = self.poll_once(&mut wcs)?;
            *have += n;
            if n > 0 || *have >= need {
                continue;
            }
            if self.channel.is_null() {
                spins += 1;
                if spins.is_multiple_of(1024) {
                    if Instant::now() > deadline {
                        return Err(timed_out());
                    }
                    std::thread::yield_now();
                }
                continue;
            }
            // Arm, then poll again: a completion that arrived before the
            // arm raises no event.
            // SAFETY: `cq` is live and bound to our channel.
            if unsafe { ibv_req_notify_cq(self.cq, 0) } != 0 {
                return Err(err("ibv_req_notify_cq"));
            }
            let n = self.poll_once(&mut wcs)?;
            *have += n;
            if n == 0 && *have < need && !self.sleep_for_event(deadline)? {
                return Err(timed_out());
            }
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

#[cfg(test)]
mod tests {
    use super::*;

    /// Asking for a device that is not there is a typed error, on a host
    /// without RDMA (ENOSYS from the device list) and with it alike.
    #[test]
    fn a_missing_device_is_an_error_not_a_crash() {
        match Device::open(Some("pagewire-no-such-device"), None) {
            Err(TransportError::Rdma(RdmaError::NoDevice(m))) => {
                assert!(m.contains("no RDMA device"), "{m}")
            }
            Err(e) => panic!("unexpected error {e}"),
            Ok(d) => panic!("opened {d:?}"),
        }
    }

    #[test]
    fn ipv4_mapped_gids_are_recognised() {
        let mut g = [0u8; 16];
        g[10] = 0xff;
        g[11] = 0xff;
        g[12..].copy_from_slice(&[127, 0, 0, 1]);
        assert!(is_ipv4_mapped(&g));
        g[0] = 0xfe;
        assert!(!is_ipv4_mapped(&g));
    }
}
