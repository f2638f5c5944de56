//! The messages of an open connection: the client's [`Request`]s and the
//! source's replies (pages, checksums, pre-copy dirty maps, counters,
//! errors), each answering one request and echoing its id.

use super::framing::{frame, seal, Decoder};
use super::rdma::{get_ep, put_ep, QpEndpoint};
use super::{
    MAX_CHECKSUMS, MAX_RANGES, T_CHECKSUMS, T_CHECKSUM_LIST, T_DIRTY, T_DIRTY_MAP, T_DONE, T_ERROR,
    T_FETCH, T_PAGES, T_RDMA_CONNECT, T_STATS, T_STATS_REPLY,
};
use crate::dirty::PageSet;
use crate::error::{RemoteCode, TransportError};
use crate::layout::PageRange;

/// A request from client to source.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    /// Send these pages, in this order.
    Fetch {
        /// Echoed in the reply.
        id: u64,
        /// The ranges.
        ranges: Vec<PageRange>,
    },
    /// Send the checksum of each page of a range.
    Checksums {
        /// Echoed in the reply.
        id: u64,
        /// The pages.
        range: PageRange,
    },
    /// Send the source's data-path counters.
    Stats {
        /// Echoed in the reply.
        id: u64,
    },
    /// The destination has every page and needs nothing more (no reply).
    Done {
        /// Request id.
        id: u64,
    },
    /// Pre-copy round `round`: the pages the guest wrote since the round
    /// before; `pause` pauses the guest first (the switch-over).
    Dirty {
        /// Echoed in the reply.
        id: u64,
        /// The round, from 1; the same round again is answered again.
        round: u32,
        /// Pause the source's guest for good before answering.
        pause: bool,
    },
    /// Connect an RDMA queue pair to this endpoint and say where guest
    /// memory is registered.
    RdmaConnect {
        /// Echoed in the reply.
        id: u64,
        /// The destination's queue pair.
        ep: QpEndpoint,
    },
}

/// Work the source's data path did, as counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SourceStats {
    /// Fetch requests served.
    pub requests_served: u64,
    /// Pages sent.
    pub pages_served: u64,
}

/// Encodes a request.
pub fn encode_request(r: &Request) -> Vec<u8> {
    match r {
        Request::Fetch { id, ranges } => {
            // Callers check FetchLimits first; a count that does not fit
            // is sent as 0, which the source refuses, never truncated.
            let n = u16::try_from(ranges.len()).unwrap_or(0);
            let mut v = frame(T_FETCH);
            v.extend_from_slice(&id.to_le_bytes());
            v.extend_from_slice(&n.to_le_bytes());
            for r in ranges {
                v.extend_from_slice(&r.first.to_le_bytes());
                v.extend_from_slice(&r.count.to_le_bytes());
            }
            seal(v, 0)
        }
        Request::Checksums { id, range } => {
            let mut v = frame(T_CHECKSUMS);
            v.extend_from_slice(&id.to_le_bytes());
            v.extend_from_slice(&range.first.to_le_bytes());
            v.extend_from_slice(&range.count.to_le_bytes());
            seal(v, 0)
        }
        Request::Stats { id } => {
            let mut v = frame(T_STATS);
            v.extend_from_slice(&id.to_le_bytes());
            seal(v, 0)
        }
        Request::Done { id } => {
            let mut v = frame(T_DONE);
            v.extend_from_slice(&id.to_le_bytes());
            seal(v, 0)
        }
        Request::Dirty { id, round, pause } => {
            let mut v = frame(T_DIRTY);
            v.extend_from_slice(&id.to_le_bytes());
            v.extend_from_slice(&round.to_le_bytes());
            v.push(u8::from(*pause));
            seal(v, 0)
        }
        Request::RdmaConnect { id, ep } => {
            let mut v = frame(T_RDMA_CONNECT);
            v.extend_from_slice(&id.to_le_bytes());
            put_ep(&mut v, ep);
            seal(v, 0)
        }
    }
}

/// Decodes a request of type `ty`. Only structure is checked here; page
/// ranges are checked against the layout by the server.
pub fn decode_request(ty: u8, body: &[u8]) -> Result<Request, TransportError> {
    let mut d = Decoder::new(body);
    let req = match ty {
        T_FETCH => {
            let id = d.u64()?;
            let n = d.u16()? as usize;
            if n == 0 || n > MAX_RANGES {
                return Err(TransportError::Protocol(format!(
                    "fetch with {n} ranges (1..={MAX_RANGES} allowed)"
                )));
            }
            let mut ranges = Vec::with_capacity(n);
            for _ in 0..n {
                ranges.push(PageRange::new(d.u64()?, d.u32()?));
            }
            Request::Fetch { id, ranges }
        }
        T_CHECKSUMS => Request::Checksums {
            id: d.u64()?,
            range: PageRange::new(d.u64()?, d.u32()?),
        },
        T_STATS => Request::Stats { id: d.u64()? },
        T_DONE => Request::Done { id: d.u64()? },
        T_DIRTY => Request::Dirty {
            id: d.u64()?,
            round: d.u32()?,
            pause: match d.u8()? {
                0 => false,
                1 => true,
                f => return Err(TransportError::Protocol(format!("bad pause flag {f}"))),
            },
        },
        T_RDMA_CONNECT => Request::RdmaConnect {
            id: d.u64()?,
            ep: get_ep(&mut d)?,
        },
        t => {
            return Err(TransportError::Protocol(format!(
                "unknown request type {t:#04x}"
            )))
        }
    };
    d.finish()?;
    Ok(req)
}

/// Size of a `Pages` reply's fixed part: type, request id, page count.
pub const PAGES_HEADER: usize = 1 + 8 + 4;

/// Encodes the fixed part of a `Pages` reply; `data_len` bytes of pages follow.
pub fn encode_pages_header(id: u64, pages: u32, data_len: usize) -> Vec<u8> {
    let mut v = frame(T_PAGES);
    v.extend_from_slice(&id.to_le_bytes());
    v.extend_from_slice(&pages.to_le_bytes());
    seal(v, data_len)
}

/// Encodes a checksum list.
pub fn encode_checksums(id: u64, sums: &[u64]) -> Vec<u8> {
    let mut v = frame(T_CHECKSUM_LIST);
    v.reserve(12 + sums.len() * 8);
    v.extend_from_slice(&id.to_le_bytes());
    v.extend_from_slice(&(sums.len() as u32).to_le_bytes());
    for s in sums {
        v.extend_from_slice(&s.to_le_bytes());
    }
    seal(v, 0)
}

/// Decodes a checksum list body.
pub fn decode_checksums(body: &[u8]) -> Result<(u64, Vec<u64>), TransportError> {
    let mut d = Decoder::new(body);
    let id = d.u64()?;
    let n = d.u32()?;
    if n > MAX_CHECKSUMS {
        return Err(TransportError::Protocol(format!(
            "{n} checksums in a reply"
        )));
    }
    let mut sums = Vec::with_capacity(n as usize);
    for _ in 0..n {
        sums.push(d.u64()?);
    }
    d.finish()?;
    Ok((id, sums))
}

/// Encodes a pre-copy round's pages.
pub fn encode_dirty_map(id: u64, set: &PageSet) -> Vec<u8> {
    let mut v = frame(T_DIRTY_MAP);
    v.reserve(16 + set.words().len() * 8);
    v.extend_from_slice(&id.to_le_bytes());
    v.extend_from_slice(&set.pages().to_le_bytes());
    for w in set.words() {
        v.extend_from_slice(&w.to_le_bytes());
    }
    seal(v, 0)
}

/// Decodes a pre-copy round's pages; the set must be over `pages` pages
/// (the layout's), which also bounds what is allocated.
pub fn decode_dirty_map(body: &[u8], pages: u64) -> Result<(u64, PageSet), TransportError> {
    let mut d = Decoder::new(body);
    let id = d.u64()?;
    let n = d.u64()?;
    if n != pages {
        return Err(TransportError::Protocol(format!(
            "dirty map over {n} pages, the layout has {pages}"
        )));
    }
    let words = pages.div_ceil(64);
    // Checked before allocating: the body must hold every word.
    if body.len() as u64 != 16 + words * 8 {
        return Err(TransportError::Protocol(format!(
            "dirty map of {} bytes for {pages} pages",
            body.len()
        )));
    }
    let mut w = Vec::with_capacity(words as usize);
    for _ in 0..words {
        w.push(d.u64()?);
    }
    d.finish()?;
    let set = PageSet::from_words(w, pages)
        .ok_or_else(|| TransportError::Protocol("dirty map names pages past the layout".into()))?;
    Ok((id, set))
}

/// Encodes the source's counters.
pub fn encode_stats(id: u64, s: &SourceStats) -> Vec<u8> {
    let mut v = frame(T_STATS_REPLY);
    v.extend_from_slice(&id.to_le_bytes());
    v.extend_from_slice(&s.requests_served.to_le_bytes());
    v.extend_from_slice(&s.pages_served.to_le_bytes());
    seal(v, 0)
}

/// Decodes the source's counters.
pub fn decode_stats(body: &[u8]) -> Result<(u64, SourceStats), TransportError> {
    let mut d = Decoder::new(body);
    let id = d.u64()?;
    let s = SourceStats {
        requests_served: d.u64()?,
        pages_served: d.u64()?,
    };
    d.finish()?;
    Ok((id, s))
}

/// Encodes an error reply.
pub fn encode_error(id: u64, code: RemoteCode, message: &str) -> Vec<u8> {
    let mut v = frame(T_ERROR);
    let msg = &message.as_bytes()[..message.len().min(1024)];
    v.extend_from_slice(&id.to_le_bytes());
    v.extend_from_slice(&(code as u16).to_le_bytes());
    v.extend_from_slice(&(msg.len() as u16).to_le_bytes());
    v.extend_from_slice(msg);
    seal(v, 0)
}

/// Decodes an error reply into the error it stands for.
pub fn decode_error(body: &[u8]) -> TransportError {
    let parse = || -> Result<TransportError, TransportError> {
        let mut d = Decoder::new(body);
        let _id = d.u64()?;
        let code = RemoteCode::from_wire(d.u16()?);
        let n = d.u16()? as usize;
        let message = String::from_utf8_lossy(d.bytes(n)?).into_owned();
        Ok(TransportError::Remote { code, message })
    };
    parse().unwrap_or_else(|e| e)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::framing::body;

    #[test]
    fn requests_round_trip() {
        for r in [
            Request::Fetch {
                id: 7,
                ranges: vec![PageRange::new(1, 2), PageRange::new(9, 1)],
            },
            Request::Checksums {
                id: 8,
                range: PageRange::new(0, 100),
            },
            Request::Stats { id: 9 },
            Request::Dirty {
                id: 11,
                round: 3,
                pause: true,
            },
            Request::RdmaConnect {
                id: 10,
                ep: QpEndpoint {
                    qpn: 0x11,
                    psn: 0xabcdef,
                    gid: [7; 16],
                    lid: 3,
                    mtu: 3,
                    rd_atomic: 16,
                },
            },
        ] {
            let f = encode_request(&r);
            let (ty, b) = body(&f);
            assert_eq!(
                u32::from_le_bytes(f[..4].try_into().unwrap()) as usize,
                f.len() - 4
            );
            assert_eq!(decode_request(ty, b).unwrap(), r);
        }
    }

    #[test]
    fn malformed_requests_are_errors_not_panics() {
        assert!(decode_request(T_FETCH, &[]).is_err());
        assert!(decode_request(0x7f, &[0; 8]).is_err());
        // Zero ranges.
        let mut b = 1u64.to_le_bytes().to_vec();
        b.extend_from_slice(&0u16.to_le_bytes());
        assert!(decode_request(T_FETCH, &b).is_err());
        // Claims more ranges than it carries.
        let mut b = 1u64.to_le_bytes().to_vec();
        b.extend_from_slice(&5u16.to_le_bytes());
        assert!(decode_request(T_FETCH, &b).is_err());
        // Trailing bytes.
        let mut f = encode_request(&Request::Stats { id: 1 });
        f.push(0);
        assert!(decode_request(T_STATS, &f[5..]).is_err());
    }

    #[test]
    fn dirty_maps_round_trip_and_are_checked_against_the_layout() {
        let mut set = PageSet::new(100);
        set.insert(3);
        set.insert(99);
        let f = encode_dirty_map(5, &set);
        let (ty, b) = body(&f);
        assert_eq!(ty, T_DIRTY_MAP);
        assert_eq!(decode_dirty_map(b, 100).unwrap(), (5, set));
        assert!(decode_dirty_map(b, 101).is_err());
        assert!(decode_dirty_map(&b[..b.len() - 1], 100).is_err());
        // A page past the layout in the last word.
        let mut bad = b.to_vec();
        let n = bad.len();
        bad[n - 1] = 0x80;
        assert!(decode_dirty_map(&bad, 100).is_err());
        // A huge page count allocates nothing.
        let mut huge = 1u64.to_le_bytes().to_vec();
        huge.extend_from_slice(&u64::MAX.to_le_bytes());
        assert!(decode_dirty_map(&huge, u64::MAX).is_err());
        let mut bad_flag = encode_request(&Request::Dirty {
            id: 1,
            round: 1,
            pause: false,
        });
        let n = bad_flag.len();
        bad_flag[n - 1] = 2;
        assert!(decode_request(T_DIRTY, &bad_flag[5..]).is_err());
    }

    #[test]
    fn error_reply_round_trips() {
        let f = encode_error(3, RemoteCode::OutOfRange, "nope");
        match decode_error(&f[5..]) {
            TransportError::Remote { code, message } => {
                assert_eq!(code, RemoteCode::OutOfRange);
                assert_eq!(message, "nope");
            }
            e => panic!("unexpected {e}"),
        }
        assert!(matches!(decode_error(&[1, 2]), TransportError::Protocol(_)));
    }
}
