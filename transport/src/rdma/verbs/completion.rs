//! Completions: how a queue pair waits for its READs to complete (busy
//! polling or sleeping on a completion channel), and the polling of its
//! completion queue, which checks each completion in order.

use std::ffi::CStr;
use std::ptr;
use std::time::{Duration, Instant};

use rdma_sys::*;

use super::err;
use super::qp::Qp;
use crate::error::{RdmaError, TransportError};

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

impl Qp {
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
