//! One TCP connection to the source: the handshake (with the shared
//! key's authentication), requests and their replies, and fetches sent
//! ahead of their replies, which are checked before their pages are read.

use std::collections::VecDeque;
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};

use crate::error::TransportError;
use crate::landing::Landing;
use crate::layout::{PageRange, SourceInfo};
use crate::wire::{self, ChannelKind, Hello, Request};
use crate::FetchLimits;

use super::TcpOptions;
use crate::auth::{self, Side};
use crate::tcp::sockopt;

/// Most requests a TCP channel keeps outstanding.
pub(super) const TCP_MAX_OUTSTANDING: usize = 64;

/// Bytes every reply to a fetch starts with: frame length, type, request
/// id, and either the page count (pages) or the error code and message
/// length (error). Reading exactly this much never consumes the next
/// reply.
const REPLY_HEAD: usize = 4 + wire::PAGES_HEADER;

/// Largest reply other than pages read in answer to a fetch: an error
/// frame with the longest message a source sends.
const MAX_ERROR_REPLY: usize = REPLY_HEAD + 1024;

/// A fetch on the wire.
pub(super) struct Sent {
    id: u64,
    pages: u64,
    /// The ranges, when the reply lands in landing memory.
    landed: Option<Vec<PageRange>>,
}

/// One connection to the source, handshake done.
pub(super) struct Conn {
    pub(super) stream: TcpStream,
    next_id: u64,
    timeout: f64,
    /// Requests sent and not answered yet, oldest first.
    pub(super) outstanding: VecDeque<Sent>,
    /// Where replies bound for a landing span with a file are read before
    /// they are written into it (allocated on first use).
    bounce: Vec<u8>,
}

/// Bytes of a reply read at most before they are written into a landing
/// span's file: large enough for few writes, small enough to stay in the
/// CPU's cache between the read and the write.
const BOUNCE_BYTES: usize = 256 << 10;

impl Conn {
    pub(super) fn open(
        addr: SocketAddr,
        kind: ChannelKind,
        opts: &TcpOptions,
    ) -> Result<(Self, Option<SourceInfo>, u64), TransportError> {
        let timeout = opts.io_timeout.as_secs_f64();
        let ctx = format!("connect to {addr}");
        let stream = TcpStream::connect_timeout(&addr, opts.connect_timeout).map_err(|e| {
            TransportError::io(ctx.clone(), e, Some(opts.connect_timeout.as_secs_f64()))
        })?;
        let setup = |r: io::Result<()>| r.map_err(|e| TransportError::io(ctx.clone(), e, None));
        setup(stream.set_nodelay(true))?;
        setup(stream.set_read_timeout(Some(opts.io_timeout)))?;
        setup(stream.set_write_timeout(Some(opts.io_timeout)))?;
        sockopt::tune(&stream, kind);
        let mut conn = Self {
            stream,
            next_id: 1,
            timeout,
            outstanding: VecDeque::new(),
            bounce: Vec::new(),
        };
        let hello = Hello {
            version: wire::VERSION,
            kind,
            nonce: auth::nonce().map_err(|e| TransportError::io("draw a nonce", e, None))?,
        };
        conn.stream
            .write_all(&wire::encode_hello(&hello))
            .map_err(|e| conn.err("send hello", e))?;
        let (ty, body) =
            wire::read_frame(&mut conn.stream, wire::MAX_FRAME as usize).map_err(|e| {
                match e.kind() {
                    io::ErrorKind::InvalidData => {
                        TransportError::Protocol(format!("{addr} is not a pagewire source: {e}"))
                    }
                    _ => conn.err("wait for the source's welcome", e),
                }
            })?;
        let (ty, body) = match (ty, &opts.auth_key) {
            (wire::T_CHALLENGE, None) => return Err(TransportError::AuthRequired),
            (wire::T_CHALLENGE, Some(key)) => {
                let (ns, proof) = wire::decode_challenge(&body)?;
                let k = kind.auth_byte();
                if !key.verify(Side::Source, k, &hello.nonce, &ns, &proof) {
                    return Err(TransportError::AuthFailed(format!(
                        "{addr} does not hold the shared key"
                    )));
                }
                let mine = key.proof(Side::Destination, k, &hello.nonce, &ns);
                conn.stream
                    .write_all(&wire::encode_auth(&mine))
                    .map_err(|e| conn.err("send authentication", e))?;
                wire::read_frame(&mut conn.stream, wire::MAX_FRAME as usize)
                    .map_err(|e| conn.err("wait for the source's welcome", e))?
            }
            (wire::T_WELCOME, Some(_)) => {
                return Err(TransportError::AuthFailed(format!(
                    "{addr} does not authenticate (no key configured there?): refusing its memory"
                )))
            }
            _ => (ty, body),
        };
        match ty {
            wire::T_WELCOME => {
                let w = wire::decode_welcome(&body)?;
                if kind == ChannelKind::Control && w.info.is_none() {
                    return Err(TransportError::Protocol(
                        "welcome on the control connection carries no layout".into(),
                    ));
                }
                Ok((conn, w.info, w.session))
            }
            wire::T_ERROR => Err(match wire::decode_error(&body) {
                TransportError::Remote {
                    code: crate::RemoteCode::Auth,
                    message,
                } => TransportError::AuthFailed(format!("the source refused our key: {message}")),
                e => e,
            }),
            t => Err(TransportError::Protocol(format!(
                "{addr} is not a pagewire source: answered with message type {t:#04x}"
            ))),
        }
    }

    pub(super) fn err(&self, context: &str, e: io::Error) -> TransportError {
        TransportError::io(context, e, Some(self.timeout))
    }

    pub(super) fn send(
        &mut self,
        make: impl FnOnce(u64) -> Request,
    ) -> Result<u64, TransportError> {
        let id = self.next_id;
        self.next_id += 1;
        let frame = wire::encode_request(&make(id));
        self.stream
            .write_all(&frame)
            .map_err(|e| self.err("send request", e))?;
        Ok(id)
    }

    /// Reads a whole reply of type `want` for request `id`.
    pub(super) fn reply(&mut self, id: u64, want: u8) -> Result<Vec<u8>, TransportError> {
        let (ty, body) = wire::read_frame(&mut self.stream, wire::MAX_FRAME as usize)
            .map_err(|e| self.read_err(e))?;
        self.check_reply(ty, &body, id, want)?;
        Ok(body)
    }

    fn read_err(&self, e: io::Error) -> TransportError {
        match e.kind() {
            io::ErrorKind::InvalidData => TransportError::Protocol(e.to_string()),
            _ => self.err("read reply", e),
        }
    }

    fn check_reply(&self, ty: u8, body: &[u8], id: u64, want: u8) -> Result<(), TransportError> {
        if ty == wire::T_ERROR {
            return Err(wire::decode_error(body));
        }
        if ty != want {
            return Err(TransportError::Protocol(format!(
                "expected reply type {want:#04x}, got {ty:#04x}"
            )));
        }
        let got = wire::Decoder::new(body).u64()?;
        if got != id {
            return Err(TransportError::Protocol(format!(
                "reply for request {got}, expected {id}"
            )));
        }
        Ok(())
    }

    /// Sends a fetch without waiting for its reply; with `landed`, its
    /// reply is to land in landing memory.
    pub(super) fn send_fetch(
        &mut self,
        ranges: &[PageRange],
        landed: bool,
    ) -> Result<(), TransportError> {
        if self.outstanding.len() >= TCP_MAX_OUTSTANDING {
            return Err(TransportError::Misuse("too many requests outstanding"));
        }
        let pages = FetchLimits::WIRE.check(ranges)?;
        let id = self.send(|id| Request::Fetch {
            id,
            ranges: ranges.to_vec(),
        })?;
        self.outstanding.push_back(Sent {
            id,
            pages,
            landed: landed.then(|| ranges.to_vec()),
        });
        Ok(())
    }

    /// Receives the reply to the oldest outstanding fetch into `buf`.
    pub(super) fn recv_fetch(
        &mut self,
        buf: &mut [u8],
        page_size: usize,
        arrived: &mut dyn FnMut(&[u8]),
    ) -> Result<(), TransportError> {
        let front = self
            .outstanding
            .front()
            .ok_or(TransportError::Misuse("recv with no request outstanding"))?;
        if front.landed.is_some() {
            return Err(TransportError::Misuse("recv of a request sent to land"));
        }
        let want_len = front.pages as usize * page_size;
        if buf.len() != want_len {
            return Err(TransportError::BufferSize {
                want: want_len,
                got: buf.len(),
            });
        }
        self.reply_head(want_len)?;
        let mut filled = 0;
        while filled < buf.len() {
            filled += self.read_some(&mut buf[filled..])?;
            if filled < buf.len() {
                arrived(&buf[..filled]);
            }
        }
        Ok(())
    }

    /// Reads what the connection has of the current reply, at least one
    /// byte, into `buf`.
    fn read_some(&mut self, buf: &mut [u8]) -> Result<usize, TransportError> {
        loop {
            match self.stream.read(buf) {
                Ok(0) if !buf.is_empty() => {
                    return Err(self.read_err(io::ErrorKind::UnexpectedEof.into()))
                }
                Ok(n) => return Ok(n),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(self.read_err(e)),
            }
        }
    }

    /// Receives the reply to the oldest outstanding fetch, sent to land,
    /// straight into `landing`: each range's bytes at its own place.
    pub(super) fn recv_fetch_landed(
        &mut self,
        landing: &Landing,
        arrived: &mut dyn FnMut(usize),
    ) -> Result<(), TransportError> {
        let front = self
            .outstanding
            .front()
            .ok_or(TransportError::Misuse("recv with no request outstanding"))?;
        if front.landed.is_none() {
            return Err(TransportError::Misuse(
                "recv_landed of a request sent to a buffer",
            ));
        }
        let want_len = front.pages as usize * landing.page_size();
        for r in front.landed.iter().flatten() {
            landing.populate(*r);
        }
        let ranges = self.reply_head(want_len)?.landed.unwrap_or_default();
        let mut landed = 0;
        for r in ranges {
            if landing.has_file(r) {
                self.recv_into_file(landing, r, &mut landed, want_len, arrived)?;
                continue;
            }
            let len = r.count as usize * landing.page_size();
            let mut filled = 0;
            while filled < len {
                // SAFETY: this channel sent the request for these pages
                // (their fetcher holds them, see `Landing::new`); the slice
                // covers only bytes not yet reported landed (pages reported
                // may be the guest's now) and lives for this one read.
                let dst = unsafe { landing.bytes_mut_from(r, filled) }.ok_or(
                    TransportError::Misuse("a landed range outside the landing memory"),
                )?;
                let n = self.read_some(dst)?;
                filled += n;
                landed += n;
                if landed < want_len {
                    arrived(landed);
                }
            }
        }
        Ok(())
    }

    /// Receives the bytes of range `r` of a landed reply and writes them
    /// into its span's file, whole pages at a time (a page written whole
    /// into a shared-memory file is never zeroed first); `landed` counts
    /// the reply's bytes written so far, reported through `arrived` until
    /// the whole reply (`want_len`) is in.
    fn recv_into_file(
        &mut self,
        landing: &Landing,
        r: PageRange,
        landed: &mut usize,
        want_len: usize,
        arrived: &mut dyn FnMut(usize),
    ) -> Result<(), TransportError> {
        let ps = landing.page_size();
        let len = r.count as usize * ps;
        if self.bounce.len() < BOUNCE_BYTES.max(ps) {
            self.bounce = vec![0; BOUNCE_BYTES.max(ps)];
        }
        let mut bounce = std::mem::take(&mut self.bounce);
        let result = (|| {
            // Bytes of the range written into the file, and bytes read
            // after them (less than a page, unless the range ends there).
            let (mut written, mut held) = (0, 0);
            while written < len {
                let room = (bounce.len() - held).min(len - written - held);
                held += self.read_some(&mut bounce[held..held + room])?;
                let whole = if written + held == len {
                    held
                } else {
                    held / ps * ps
                };
                if whole == 0 {
                    continue;
                }
                // SAFETY: this channel sent the request for these pages
                // (their fetcher holds them, see `Landing::new`); the
                // write covers only bytes not yet reported landed.
                unsafe { landing.write(r, written, &bounce[..whole]) }?;
                bounce.copy_within(whole..held, 0);
                held -= whole;
                written += whole;
                *landed += whole;
                if *landed < want_len {
                    arrived(*landed);
                }
            }
            Ok(())
        })();
        self.bounce = bounce;
        result
    }

    /// Reads and checks the head of the reply to the oldest outstanding
    /// fetch, which must carry `want_len` bytes of pages; they follow.
    /// Returns the fetch, answered now (or the channel is broken).
    fn reply_head(&mut self, want_len: usize) -> Result<Sent, TransportError> {
        let sent = self
            .outstanding
            .pop_front()
            .ok_or(TransportError::Misuse("recv with no request outstanding"))?;
        let (id, want_pages) = (sent.id, sent.pages);
        // Whatever happens next, this request is answered or the channel
        // is broken.
        let mut head = [0u8; REPLY_HEAD];
        self.stream
            .read_exact(&mut head)
            .map_err(|e| self.read_err(e))?;
        let mut d = wire::Decoder::new(&head);
        let len = d.u32()? as usize;
        let ty = d.u8()?;
        let got_id = d.u64()?;
        if len < REPLY_HEAD - 4 || len > wire::MAX_FRAME as usize {
            return Err(TransportError::Protocol(format!(
                "reply frame of {len} bytes"
            )));
        }
        match ty {
            wire::T_PAGES => {
                let pages = d.u32()?;
                if got_id != id
                    || u64::from(pages) != want_pages
                    || len != REPLY_HEAD - 4 + want_len
                {
                    return Err(TransportError::Protocol(format!(
                        "pages reply (request {got_id}, {pages} pages, {len} bytes) does not match request {id} for {want_pages} pages"
                    )));
                }
                Ok(sent)
            }
            ty => {
                // An error reply (or a stray message): its body is small;
                // read it, capped, and let check_reply type the error.
                if len > MAX_ERROR_REPLY {
                    return Err(TransportError::Protocol(format!(
                        "reply of type {ty:#04x} and {len} bytes to a fetch"
                    )));
                }
                let mut body = vec![0u8; len - 1];
                body[..REPLY_HEAD - 5].copy_from_slice(&head[5..]);
                self.stream
                    .read_exact(&mut body[REPLY_HEAD - 5..])
                    .map_err(|e| self.read_err(e))?;
                self.check_reply(ty, &body, id, wire::T_PAGES)?;
                Err(TransportError::Protocol("unexpected reply to fetch".into()))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layout::{MemoryLayout, ZeroMap};
    use crate::tcp::{TcpOptions, TcpTransport};
    use crate::wire::Welcome;
    use crate::{ChannelClass, Transport};
    use std::net::TcpListener;
    use std::time::Duration;

    /// A hostile source: a correct handshake, then `reply` to the first
    /// request on every page channel.
    fn hostile_source(reply: Vec<u8>) -> SocketAddr {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        std::thread::spawn(move || {
            for s in l.incoming().flatten() {
                let reply = reply.clone();
                std::thread::spawn(move || {
                    let mut s = s;
                    let Ok((_, body)) = wire::read_frame(&mut s, 64) else {
                        return;
                    };
                    let hello = wire::decode_hello(&body).unwrap();
                    let layout = MemoryLayout::single(16 * 4096).unwrap();
                    let info = (hello.kind == ChannelKind::Control).then(|| SourceInfo {
                        zero: ZeroMap::new(layout.total_pages()),
                        layout,
                    });
                    let welcome = Welcome {
                        version: wire::VERSION,
                        session: 7,
                        info,
                    };
                    s.write_all(&wire::encode_welcome(&welcome)).unwrap();
                    if wire::read_frame(&mut s, 1 << 16).is_ok() {
                        let _ = s.write_all(&reply);
                    }
                    // Hold the connection until the client leaves.
                    let mut sink = [0u8; 64];
                    while matches!(s.read(&mut sink), Ok(n) if n > 0) {}
                });
            }
        });
        addr
    }

    fn fetch_from(reply: Vec<u8>) -> TransportError {
        let t = TcpTransport::connect(
            hostile_source(reply),
            TcpOptions {
                io_timeout: Duration::from_secs(5),
                ..TcpOptions::default()
            },
        )
        .unwrap();
        let mut ch = t.open(ChannelClass::Urgent).unwrap();
        let mut buf = vec![0u8; 4096];
        ch.fetch(&[PageRange::new(3, 1)], &mut buf)
            .expect_err("a hostile reply must be refused")
    }

    #[test]
    fn a_huge_non_page_reply_is_refused_before_it_is_read() {
        // Claims an 80 MiB stats reply to a fetch: refused from its header.
        let mut f = wire::MAX_FRAME.to_le_bytes().to_vec();
        f.push(wire::T_STATS_REPLY);
        f.extend_from_slice(&[0u8; 12]);
        let e = fetch_from(f);
        assert!(
            matches!(e, TransportError::Protocol(ref m) if m.contains("to a fetch")),
            "{e}"
        );
    }

    #[test]
    fn page_replies_for_another_request_or_size_are_refused() {
        for (id, pages) in [(99u64, 1u32), (1, 2)] {
            let mut f = wire::encode_pages_header(id, pages, pages as usize * 4096);
            f.extend(std::iter::repeat_n(0u8, pages as usize * 4096));
            let e = fetch_from(f);
            assert!(
                matches!(e, TransportError::Protocol(ref m) if m.contains("does not match")),
                "{e}"
            );
        }
    }

    #[test]
    fn an_error_reply_to_a_fetch_is_typed() {
        let f = wire::encode_error(1, crate::RemoteCode::OutOfRange, "no such page");
        match fetch_from(f) {
            TransportError::Remote { code, message } => {
                assert_eq!(code, crate::RemoteCode::OutOfRange);
                assert_eq!(message, "no such page");
            }
            e => panic!("unexpected {e}"),
        }
    }
}
