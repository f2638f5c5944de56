//! Memory regions: memory registered with the device's protection domain,
//! for the peer to read (the source's guest memory) or for READs to land
//! in (the destination's buffers).

use std::sync::Arc;

use rdma_sys::*;

use super::device::Device;
use super::err;
use crate::error::TransportError;

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

impl Device {
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
        let mr = unsafe { ibv_reg_mr(self.pd(), addr.cast(), len, access) };
        if mr.is_null() {
            return Err(err("ibv_reg_mr"));
        }
        Ok(Mr {
            mr,
            _dev: self.clone(),
        })
    }
}

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
