//! The pagewire TCP wire protocol.
//!
//! Every message is a frame: `u32` little-endian length of what follows,
//! one type byte, then the payload. All integers are little endian. A
//! connection starts with the client's [`Hello`] and the source's
//! [`Welcome`]; then the client sends requests and the source answers each
//! in order, echoing its request id.
//!
//! A `Pages` reply carries raw page bytes after its header; readers take
//! the header with [`read_frame_header`] and read the bytes straight into
//! their own buffer, so pages are not copied twice.

use std::io::{self, Read, Write};

use crate::dirty::PageSet;
use crate::error::{LayoutError, RemoteCode, TransportError};
use crate::layout::{MemoryLayout, PageRange, RegionInfo, SourceInfo, ZeroMap, MAX_REGIONS};

/// The four bytes that open every hello and welcome.
pub const MAGIC: [u8; 4] = *b"PGWR";
/// Protocol version spoken by this build (3: pre-copy rounds).
pub const VERSION: u16 = 3;
/// Largest frame body accepted (type byte + payload).
pub const MAX_FRAME: u32 = 80 << 20;
/// Most page ranges in one fetch request.
pub const MAX_RANGES: usize = 1024;
/// Most pages in one fetch request (16 MiB at 4 KiB).
pub const MAX_FETCH_PAGES: u64 = 4096;
/// Most checksums in one request.
pub const MAX_CHECKSUMS: u32 = 1 << 20;

/// Client to source: hello.
pub const T_HELLO: u8 = 0x01;
/// Client to source: fetch pages.
pub const T_FETCH: u8 = 0x02;
/// Client to source: page checksums.
pub const T_CHECKSUMS: u8 = 0x03;
/// Client to source: source counters.
pub const T_STATS: u8 = 0x04;
/// Client to source: set up an RDMA queue pair.
pub const T_RDMA_CONNECT: u8 = 0x05;
/// Destination's proof of the key (authenticated sources only).
pub const T_AUTH: u8 = 0x06;
/// The destination has every page (no reply).
pub const T_DONE: u8 = 0x07;
/// Client to source: pages written since the last pre-copy round.
pub const T_DIRTY: u8 = 0x08;
/// Source to client: welcome.
pub const T_WELCOME: u8 = 0x81;
/// Source to client: page data.
pub const T_PAGES: u8 = 0x82;
/// Source to client: checksum list.
pub const T_CHECKSUM_LIST: u8 = 0x83;
/// Source to client: counters.
pub const T_STATS_REPLY: u8 = 0x84;
/// Source to client: error.
pub const T_ERROR: u8 = 0x85;
/// Source to client: RDMA queue pair and memory regions.
pub const T_RDMA_ACCEPT: u8 = 0x86;
/// Source's nonce and proof of the key, instead of a welcome, when it
/// requires authentication.
pub const T_CHALLENGE: u8 = 0x87;
/// Source to client: the pages of a pre-copy round, as a bitmap.
pub const T_DIRTY_MAP: u8 = 0x88;

/// Size of a `Pages` reply's fixed part: type, request id, page count.
pub const PAGES_HEADER: usize = 1 + 8 + 4;

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

/// The source's answer to [`Request::RdmaConnect`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RdmaAccept {
    /// The source's queue pair, connected to the requester's.
    pub ep: QpEndpoint,
    /// One entry per layout region, in order.
    pub regions: Vec<RemoteRegion>,
}

fn put_ep(v: &mut Vec<u8>, ep: &QpEndpoint) {
    v.extend_from_slice(&ep.qpn.to_le_bytes());
    v.extend_from_slice(&ep.psn.to_le_bytes());
    v.extend_from_slice(&ep.gid);
    v.extend_from_slice(&ep.lid.to_le_bytes());
    v.push(ep.mtu);
    v.push(ep.rd_atomic);
}

fn get_ep(d: &mut Decoder<'_>) -> Result<QpEndpoint, TransportError> {
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

/// Work the source's data path did, as counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SourceStats {
    /// Fetch requests served.
    pub requests_served: u64,
    /// Pages sent.
    pub pages_served: u64,
}

/// A fixed-size little-endian decoder over a payload that never panics.
pub struct Decoder<'a> {
    buf: &'a [u8],
}

impl<'a> Decoder<'a> {
    /// Decodes `buf`.
    pub fn new(buf: &'a [u8]) -> Self {
        Self { buf }
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], TransportError> {
        if self.buf.len() < n {
            return Err(TransportError::Protocol(format!(
                "message truncated: need {n} more bytes, have {}",
                self.buf.len()
            )));
        }
        let (head, tail) = self.buf.split_at(n);
        self.buf = tail;
        Ok(head)
    }

    /// Reads `N` raw bytes.
    pub fn array<const N: usize>(&mut self) -> Result<[u8; N], TransportError> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.take(N)?);
        Ok(a)
    }

    /// Reads a `u8`.
    pub fn u8(&mut self) -> Result<u8, TransportError> {
        Ok(self.array::<1>()?[0])
    }

    /// Reads a `u16`.
    pub fn u16(&mut self) -> Result<u16, TransportError> {
        Ok(u16::from_le_bytes(self.array()?))
    }

    /// Reads a `u32`.
    pub fn u32(&mut self) -> Result<u32, TransportError> {
        Ok(u32::from_le_bytes(self.array()?))
    }

    /// Reads a `u64`.
    pub fn u64(&mut self) -> Result<u64, TransportError> {
        Ok(u64::from_le_bytes(self.array()?))
    }

    /// Reads `n` raw bytes.
    pub fn bytes(&mut self, n: usize) -> Result<&'a [u8], TransportError> {
        self.take(n)
    }

    /// Fails unless every byte was consumed.
    pub fn finish(self) -> Result<(), TransportError> {
        if self.buf.is_empty() {
            Ok(())
        } else {
            Err(TransportError::Protocol(format!(
                "{} trailing bytes in message",
                self.buf.len()
            )))
        }
    }
}

/// Starts a frame of type `ty`; finish it with [`seal`].
fn frame(ty: u8) -> Vec<u8> {
    let mut v = Vec::with_capacity(64);
    v.extend_from_slice(&[0, 0, 0, 0, ty]);
    v
}

/// Writes the frame length into a frame built with [`frame`]; `extra` is
/// the length of data that will follow the returned bytes on the wire.
fn seal(mut v: Vec<u8>, extra: usize) -> Vec<u8> {
    let len = (v.len() - 4 + extra) as u32;
    v[..4].copy_from_slice(&len.to_le_bytes());
    v
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

/// Decodes a hello body (after the type byte). Checks the magic first so a
/// stranger gets a precise error, then the version.
pub fn decode_hello(body: &[u8]) -> Result<Hello, TransportError> {
    let mut d = Decoder::new(body);
    let magic = d.array::<4>()?;
    if magic != MAGIC {
        return Err(TransportError::NotPagewire(magic));
    }
    let version = d.u16()?;
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
    let magic = d.array::<4>()?;
    if magic != MAGIC {
        return Err(TransportError::NotPagewire(magic));
    }
    let version = d.u16()?;
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

/// Reads a frame's length and type byte; returns (type, body length
/// without the type byte). Rejects frames over [`MAX_FRAME`].
pub fn read_frame_header(r: &mut impl Read) -> io::Result<(u8, usize)> {
    let mut h = [0u8; 5];
    r.read_exact(&mut h)?;
    let len = u32::from_le_bytes([h[0], h[1], h[2], h[3]]);
    if len == 0 || len > MAX_FRAME {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("frame length {len} outside 1..={MAX_FRAME}"),
        ));
    }
    Ok((h[4], len as usize - 1))
}

/// Reads a whole frame whose body is at most `limit` bytes.
pub fn read_frame(r: &mut impl Read, limit: usize) -> io::Result<(u8, Vec<u8>)> {
    let (ty, len) = read_frame_header(r)?;
    if len > limit {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("message type {ty:#04x} of {len} bytes exceeds the limit of {limit}"),
        ));
    }
    let mut body = vec![0u8; len];
    r.read_exact(&mut body)?;
    Ok((ty, body))
}

/// Writes every byte of every slice, in order, with vectored writes.
pub fn write_all_vectored(w: &mut impl Write, parts: &[&[u8]]) -> io::Result<()> {
    let mut idx = 0;
    let mut off = 0;
    while idx < parts.len() {
        let mut iov = Vec::with_capacity(parts.len() - idx);
        iov.push(io::IoSlice::new(&parts[idx][off..]));
        for p in &parts[idx + 1..] {
            iov.push(io::IoSlice::new(p));
        }
        let mut n = match w.write_vectored(&iov) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        while idx < parts.len() && n >= parts[idx].len() - off {
            n -= parts[idx].len() - off;
            idx += 1;
            off = 0;
        }
        off += n;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn body(frame: &[u8]) -> (u8, &[u8]) {
        (frame[4], &frame[5..])
    }

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
    fn frame_reader_enforces_limits() {
        let mut big = (MAX_FRAME + 1).to_le_bytes().to_vec();
        big.push(T_FETCH);
        assert!(read_frame_header(&mut big.as_slice()).is_err());
        let mut zero = 0u32.to_le_bytes().to_vec();
        zero.push(T_FETCH);
        assert!(read_frame_header(&mut zero.as_slice()).is_err());
        let f = encode_request(&Request::Stats { id: 1 });
        assert!(read_frame(&mut f.as_slice(), 4).is_err());
        assert!(read_frame(&mut f.as_slice(), 64).is_ok());
    }

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

    #[test]
    fn vectored_write_writes_everything() {
        struct Dribble(Vec<u8>);
        impl Write for Dribble {
            fn write(&mut self, b: &[u8]) -> io::Result<usize> {
                let n = b.len().min(3);
                self.0.extend_from_slice(&b[..n]);
                Ok(n)
            }
            fn flush(&mut self) -> io::Result<()> {
                Ok(())
            }
        }
        let mut w = Dribble(Vec::new());
        write_all_vectored(&mut w, &[b"abcde", b"", b"fg", b"hijklmn"]).unwrap();
        assert_eq!(w.0, b"abcdefghijklmn");
    }
}
