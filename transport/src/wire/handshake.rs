//! The handshake that opens every connection: the client's [`Hello`]
//! naming the [`ChannelKind`], the source's [`Welcome`], and, when the
//! source requires authentication, its challenge and the destination's
//! proof in between.

use super::framing::{frame, seal, Decoder};
use super::{MAGIC, T_AUTH, T_CHALLENGE, T_HELLO, T_WELCOME, VERSION};
use crate::error::{LayoutError, TransportError};
use crate::layout::{MemoryLayout, RegionInfo, SourceInfo, ZeroMap, MAX_REGIONS};

/// What a connection is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChannelKind {
    /// Handshake with the full layout, checksums, counters.
    Control,
    /// Fault fetches; latency first.
    Urgent,
    /// Bulk fetches of one pusher lane.
    Bulk(u16),
}

impl ChannelKind {
    fn to_wire(self) -> (u8, u16) {
        match self {
            Self::Control => (0, 0),
            Self::Urgent => (1, 0),
            Self::Bulk(l) => (2, l),
        }
    }

    fn from_wire(kind: u8, lane: u16) -> Option<Self> {
        match kind {
            0 => Some(Self::Control),
            1 => Some(Self::Urgent),
            2 => Some(Self::Bulk(lane)),
            _ => None,
        }
    }
}

/// The client's opening message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Hello {
    /// Protocol version the client speaks.
    pub version: u16,
    /// What the connection is for.
    pub kind: ChannelKind,
    /// A fresh nonce for authentication (see [`crate::auth`]).
    pub nonce: [u8; 32],
}

/// The source's answer to a hello.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Welcome {
    /// Protocol version the source speaks.
    pub version: u16,
    /// Random per source process: a destination that reconnects checks it
    /// reached the same source (the same memory), not a restarted one.
    pub session: u64,
    /// Layout and zero map; sent on control connections only.
    pub info: Option<SourceInfo>,
}

/// Encodes a hello.
pub fn encode_hello(h: &Hello) -> Vec<u8> {
    let mut v = frame(T_HELLO);
    let (kind, lane) = h.kind.to_wire();
    v.extend_from_slice(&MAGIC);
    v.extend_from_slice(&h.version.to_le_bytes());
    v.push(kind);
    v.extend_from_slice(&lane.to_le_bytes());
    v.extend_from_slice(&h.nonce);
    seal(v, 0)
}

/// Reads the magic every handshake body starts with, so a stranger gets
/// a precise error, and the protocol version after it.
fn magic_and_version(d: &mut Decoder<'_>) -> Result<u16, TransportError> {
    let magic = d.array::<4>()?;
    if magic != MAGIC {
        return Err(TransportError::NotPagewire(magic));
    }
    d.u16()
}

/// Decodes a hello body (after the type byte). Checks the magic first so a
/// stranger gets a precise error, then the version.
pub fn decode_hello(body: &[u8]) -> Result<Hello, TransportError> {
    let mut d = Decoder::new(body);
    let version = magic_and_version(&mut d)?;
    if version != VERSION {
        // Report the version, whatever else a hello of another version
        // holds.
        return Ok(Hello {
            version,
            kind: ChannelKind::Control,
            nonce: [0; 32],
        });
    }
    let kind = d.u8()?;
    let lane = d.u16()?;
    let nonce = d.array::<32>()?;
    d.finish()?;
    let kind = ChannelKind::from_wire(kind, lane)
        .ok_or_else(|| TransportError::Protocol(format!("unknown channel kind {kind}")))?;
    Ok(Hello {
        version,
        kind,
        nonce,
    })
}

impl ChannelKind {
    /// The kind's byte, as authentication proofs bind it.
    pub fn auth_byte(self) -> u8 {
        self.to_wire().0
    }
}

/// Encodes a challenge: the source's nonce and its proof.
pub fn encode_challenge(nonce: &[u8; 32], proof: &[u8; 32]) -> Vec<u8> {
    let mut v = frame(T_CHALLENGE);
    v.extend_from_slice(nonce);
    v.extend_from_slice(proof);
    seal(v, 0)
}

/// Decodes a challenge body: (nonce, proof).
pub fn decode_challenge(body: &[u8]) -> Result<([u8; 32], [u8; 32]), TransportError> {
    let mut d = Decoder::new(body);
    let nonce = d.array::<32>()?;
    let proof = d.array::<32>()?;
    d.finish()?;
    Ok((nonce, proof))
}

/// Encodes the destination's proof.
pub fn encode_auth(proof: &[u8; 32]) -> Vec<u8> {
    let mut v = frame(T_AUTH);
    v.extend_from_slice(proof);
    seal(v, 0)
}

/// Decodes the destination's proof.
pub fn decode_auth(body: &[u8]) -> Result<[u8; 32], TransportError> {
    let mut d = Decoder::new(body);
    let proof = d.array::<32>()?;
    d.finish()?;
    Ok(proof)
}

/// Encodes a welcome.
pub fn encode_welcome(w: &Welcome) -> Vec<u8> {
    let mut v = frame(T_WELCOME);
    v.extend_from_slice(&MAGIC);
    v.extend_from_slice(&w.version.to_le_bytes());
    v.extend_from_slice(&w.session.to_le_bytes());
    match &w.info {
        None => v.push(0),
        Some(info) => {
            v.push(1);
            let l = &info.layout;
            v.extend_from_slice(&(l.page_size() as u32).to_le_bytes());
            v.extend_from_slice(&(l.regions().len() as u32).to_le_bytes());
            for r in l.regions() {
                v.extend_from_slice(&r.guest_base.to_le_bytes());
                v.extend_from_slice(&r.len.to_le_bytes());
            }
            let bits = info.zero.as_bytes();
            v.extend_from_slice(&(bits.len() as u32).to_le_bytes());
            v.extend_from_slice(bits);
        }
    }
    seal(v, 0)
}

/// Decodes a welcome body, validating the layout it carries.
pub fn decode_welcome(body: &[u8]) -> Result<Welcome, TransportError> {
    let mut d = Decoder::new(body);
    let version = magic_and_version(&mut d)?;
    if version != VERSION {
        return Err(TransportError::Version {
            ours: VERSION,
            theirs: version,
        });
    }
    let session = d.u64()?;
    let info = match d.u8()? {
        0 => None,
        1 => {
            let page_size = d.u32()? as usize;
            // Sources serve 4 KiB pages; a claim of larger ones would size
            // every buffer by it.
            if page_size != crate::PAGE_SIZE {
                return Err(LayoutError::PageSize(page_size).into());
            }
            let n = d.u32()? as usize;
            if n == 0 || n > MAX_REGIONS {
                return Err(TransportError::Protocol(format!(
                    "welcome names {n} regions"
                )));
            }
            let mut regions = Vec::with_capacity(n);
            for _ in 0..n {
                regions.push(RegionInfo {
                    guest_base: d.u64()?,
                    len: d.u64()?,
                });
            }
            let layout = MemoryLayout::new(page_size, regions)?;
            let nbits = d.u32()? as usize;
            let bits = d.bytes(nbits)?.to_vec();
            let zero = ZeroMap::from_bytes(bits, layout.total_pages()).ok_or_else(|| {
                TransportError::Protocol("zero-page bitmap does not match the layout".into())
            })?;
            Some(SourceInfo { layout, zero })
        }
        f => return Err(TransportError::Protocol(format!("bad welcome flag {f}"))),
    };
    d.finish()?;
    Ok(Welcome {
        version,
        session,
        info,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::framing::body;

    #[test]
    fn hello_round_trips_and_checks_magic() {
        let h = Hello {
            version: VERSION,
            kind: ChannelKind::Bulk(3),
            nonce: [7; 32],
        };
        let f = encode_hello(&h);
        let (ty, b) = body(&f);
        assert_eq!(ty, T_HELLO);
        assert_eq!(decode_hello(b).unwrap(), h);
        let mut bad = b.to_vec();
        bad[0] = b'X';
        assert!(matches!(
            decode_hello(&bad),
            Err(TransportError::NotPagewire(_))
        ));
        assert!(decode_hello(&b[..5]).is_err());
        // Without its nonce, a hello of this version is refused.
        assert!(decode_hello(&b[..b.len() - 1]).is_err());
        // A hello of another version reports the version, whatever follows.
        let mut other = b[..6].to_vec();
        other[4] = 9;
        assert_eq!(decode_hello(&other).unwrap().version, 9);
    }

    #[test]
    fn challenge_and_auth_round_trip() {
        let f = encode_challenge(&[1; 32], &[2; 32]);
        let (ty, b) = body(&f);
        assert_eq!(ty, T_CHALLENGE);
        assert_eq!(decode_challenge(b).unwrap(), ([1; 32], [2; 32]));
        assert!(decode_challenge(&b[1..]).is_err());
        let f = encode_auth(&[3; 32]);
        let (ty, b) = body(&f);
        assert_eq!(ty, T_AUTH);
        assert_eq!(decode_auth(b).unwrap(), [3; 32]);
        assert!(decode_auth(&[0; 33]).is_err());
    }

    #[test]
    fn welcome_round_trips_and_rejects_bad_layouts() {
        let layout = MemoryLayout::single(10 * 4096).unwrap();
        let mut zero = ZeroMap::new(10);
        zero.set(3);
        let w = Welcome {
            version: VERSION,
            session: 0x1234,
            info: Some(SourceInfo { layout, zero }),
        };
        let f = encode_welcome(&w);
        assert_eq!(decode_welcome(&f[5..]).unwrap(), w);
        // Wrong version is a typed error.
        let mut b = f[5..].to_vec();
        b[4] = 9;
        assert!(matches!(
            decode_welcome(&b),
            Err(TransportError::Version { theirs: 9, .. })
        ));
        // Region length that is not page aligned.
        let mut b = f[5..].to_vec();
        b[4 + 2 + 8 + 1 + 4 + 4 + 8] = 1;
        assert!(decode_welcome(&b).is_err());
        // Truncated.
        assert!(decode_welcome(&f[5..f.len() - 1]).is_err());
        // A source claiming pages other than 4 KiB (every buffer would be
        // sized by it).
        let big = Welcome {
            version: VERSION,
            session: 1,
            info: Some(SourceInfo {
                layout: MemoryLayout::new(
                    2 << 20,
                    vec![RegionInfo {
                        guest_base: 0,
                        len: 2 << 20,
                    }],
                )
                .unwrap(),
                zero: ZeroMap::new(1),
            }),
        };
        assert!(matches!(
            decode_welcome(&encode_welcome(&big)[5..]),
            Err(TransportError::Layout(LayoutError::PageSize(0x20_0000)))
        ));
    }
}
