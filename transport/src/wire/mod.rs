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
//!
//! The protocol lives in one file per part: framing (lengths, type bytes
//! and the body decoder), the handshake (hello, welcome, authentication),
//! the messages of a connection (requests and their replies) and the RDMA
//! set-up messages. Everything is re-exported here.

mod framing;
mod handshake;
mod messages;
mod rdma;

pub use framing::{read_frame, read_frame_header, write_all_vectored, Decoder};
pub use handshake::{
    decode_auth, decode_challenge, decode_hello, decode_welcome, encode_auth, encode_challenge,
    encode_hello, encode_welcome, ChannelKind, Hello, Welcome,
};
pub use messages::{
    decode_checksums, decode_dirty_map, decode_error, decode_request, decode_stats,
    encode_checksums, encode_dirty_map, encode_error, encode_pages_header, encode_request,
    encode_stats, Request, SourceStats, PAGES_HEADER,
};
pub use rdma::{decode_rdma_accept, encode_rdma_accept, QpEndpoint, RdmaAccept, RemoteRegion};

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
