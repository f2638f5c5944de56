//! The device: an open RDMA device with one protection domain, bound to a
//! port and GID. Memory regions and queue pairs are made from it.

use std::ffi::CStr;
use std::ptr;
use std::sync::Arc;

use rdma_sys::*;

use super::{err, no_device};
use crate::error::TransportError;

/// An open RDMA device with one protection domain, bound to a port and GID.
pub struct Device {
    /// Opened in [`Device::open`], closed only in `Drop`: private, so no
    /// other file can replace or free it.
    ctx: *mut ibv_context,
    /// Allocated with `ctx`, freed only in `Drop`.
    pd: *mut ibv_pd,
    name: String,
    pub(super) port: u8,
    pub(super) gid_index: u8,
    pub(super) gid: [u8; 16],
    pub(super) lid: u16,
    pub(super) mtu: ibv_mtu::Type,
    pub(super) max_rd_atomic: u8,
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
    /// The device context: valid while `self` lives (it is closed only
    /// when the device drops, and every MR and QP holds the device).
    pub(super) fn ctx(&self) -> *mut ibv_context {
        self.ctx
    }

    /// The protection domain: valid while `self` lives, as [`Self::ctx`].
    pub(super) fn pd(&self) -> *mut ibv_pd {
        self.pd
    }

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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::RdmaError;

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
