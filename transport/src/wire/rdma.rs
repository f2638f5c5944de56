//! The RDMA set-up messages, carried over the control connection: a queue
//! pair's [`QpEndpoint`], sent in a connect request, and the source's
//! [`RdmaAccept`] saying where each guest region is registered.

use super::framing::{frame, seal, Decoder};
use super::T_RDMA_ACCEPT;
use crate::error::TransportError;
use crate::layout::MAX_REGIONS;

/// A queue pair's address, as exchanged over the control connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QpEndpoint {
    /// Queue pair number.
    pub qpn: u32,
    /// First packet sequence number.
    pub psn: u32,
    /// Port GID (RoCE address).
    pub gid: [u8; 16],
    /// Port LID (0 on RoCE).
    pub lid: u16,
    /// Active path MTU of the sender's port (`ibv_mtu`: 1 = 256 bytes ..
    /// 5 = 4096); both ends use the smaller.
    pub mtu: u8,
    /// RDMA READs the sender accepts in flight as a responder (its
    /// `max_qp_rd_atom`); the requester issues no more than that.
    pub rd_atomic: u8,
}

/// Where one guest region is registered at the source.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RemoteRegion {
    /// Virtual address of the region's first byte at the source.
    pub addr: u64,
    /// Bytes registered.
    pub len: u64,
    /// Remote key for RDMA READ.
    pub rkey: u32,
}

/// The source's answer to [`Request::RdmaConnect`](super::Request::RdmaConnect).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RdmaAccept {
    /// The source's queue pair, connected to the requester's.
    pub ep: QpEndpoint,
    /// One entry per layout region, in order.
    pub regions: Vec<RemoteRegion>,
}

pub(super) fn put_ep(v: &mut Vec<u8>, ep: &QpEndpoint) {
    v.extend_from_slice(&ep.qpn.to_le_bytes());
    v.extend_from_slice(&ep.psn.to_le_bytes());
    v.extend_from_slice(&ep.gid);
    v.extend_from_slice(&ep.lid.to_le_bytes());
    v.push(ep.mtu);
    v.push(ep.rd_atomic);
}

pub(super) fn get_ep(d: &mut Decoder<'_>) -> Result<QpEndpoint, TransportError> {
    let ep = QpEndpoint {
        qpn: d.u32()?,
        psn: d.u32()?,
        gid: d.array()?,
        lid: d.u16()?,
        mtu: d.u8()?,
        rd_atomic: d.u8()?,
    };
    if !(1..=5).contains(&ep.mtu) || ep.rd_atomic == 0 {
        return Err(TransportError::Protocol(format!(
            "queue pair endpoint with MTU code {} and {} reads in flight",
            ep.mtu, ep.rd_atomic
        )));
    }
    Ok(ep)
}

/// Encodes an RDMA accept.
pub fn encode_rdma_accept(id: u64, a: &RdmaAccept) -> Vec<u8> {
    let mut v = frame(T_RDMA_ACCEPT);
    v.extend_from_slice(&id.to_le_bytes());
    put_ep(&mut v, &a.ep);
    v.extend_from_slice(&(a.regions.len() as u32).to_le_bytes());
    for r in &a.regions {
        v.extend_from_slice(&r.addr.to_le_bytes());
        v.extend_from_slice(&r.len.to_le_bytes());
        v.extend_from_slice(&r.rkey.to_le_bytes());
    }
    seal(v, 0)
}

/// Decodes an RDMA accept body.
pub fn decode_rdma_accept(body: &[u8]) -> Result<(u64, RdmaAccept), TransportError> {
    let mut d = Decoder::new(body);
    let id = d.u64()?;
    let ep = get_ep(&mut d)?;
    let n = d.u32()? as usize;
    if n == 0 || n > MAX_REGIONS {
        return Err(TransportError::Protocol(format!(
            "RDMA accept names {n} regions"
        )));
    }
    let mut regions = Vec::with_capacity(n);
    for _ in 0..n {
        regions.push(RemoteRegion {
            addr: d.u64()?,
            len: d.u64()?,
            rkey: d.u32()?,
        });
    }
    d.finish()?;
    Ok((id, RdmaAccept { ep, regions }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rdma_accept_round_trips_and_is_bounds_checked() {
        let a = RdmaAccept {
            ep: QpEndpoint {
                qpn: 1,
                psn: 2,
                gid: [0xff; 16],
                lid: 0,
                mtu: 5,
                rd_atomic: 1,
            },
            regions: vec![RemoteRegion {
                addr: 0x7f00_0000_0000,
                len: 1 << 20,
                rkey: 0x1234,
            }],
        };
        let f = encode_rdma_accept(5, &a);
        assert_eq!(decode_rdma_accept(&f[5..]).unwrap(), (5, a));
        assert!(decode_rdma_accept(&f[5..f.len() - 2]).is_err());
        let mut none = f[5..].to_vec();
        none[8 + 26..8 + 30].copy_from_slice(&0u32.to_le_bytes());
        assert!(decode_rdma_accept(&none[..8 + 30]).is_err());
    }
}
