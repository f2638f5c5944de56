//! The destination's TCP client.

use std::collections::VecDeque;
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::os::fd::{AsRawFd, RawFd};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use crate::dirty::PageSet;
use crate::error::TransportError;
use crate::landing::Landing;
use crate::layout::{PageRange, SourceInfo};
use crate::wire::{self, ChannelKind, Hello, QpEndpoint, RdmaAccept, Request, SourceStats};
use crate::{ChannelClass, FetchLimits, PageChannel, Transport};

use super::sockopt;
use crate::auth::{self, AuthKey, Side};

/// Timeouts and credentials of the TCP client.
#[derive(Debug, Clone)]
pub struct TcpOptions {
    /// How long to wait for a connection to be accepted.
    pub connect_timeout: Duration,
    /// How long any single read or write may block. A source that stops
    /// answering is reported after this long instead of hanging a vCPU
    /// forever.
    pub io_timeout: Duration,
    /// Shared key: with it, every connection authenticates the source and
    /// itself before anything else (and refuses a source that does not).
    pub auth_key: Option<AuthKey>,
    /// How long a lost link may take to come back: control requests (and
    /// the engine's channels) reconnect with backoff until then (default
    /// 120 s, as the engine's). Zero: a lost link fails at once.
    pub recover_timeout: Duration,
}

impl Default for TcpOptions {
    fn default() -> Self {
        Self {
            connect_timeout: Duration::from_secs(5),
            io_timeout: Duration::from_secs(10),
            auth_key: None,
            recover_timeout: Duration::from_secs(120),
        }
    }
}

/// Most requests a TCP channel keeps outstanding.
const TCP_MAX_OUTSTANDING: usize = 64;

/// Bytes every reply to a fetch starts with: frame length, type, request
/// id, and either the page count (pages) or the error code and message
/// length (error). Reading exactly this much never consumes the next
/// reply.
const REPLY_HEAD: usize = 4 + wire::PAGES_HEADER;

/// Largest reply other than pages read in answer to a fetch: an error
/// frame with the longest message a source sends.
const MAX_ERROR_REPLY: usize = REPLY_HEAD + 1024;

/// A fetch on the wire.
struct Sent {
    id: u64,
    pages: u64,
    /// The ranges, when the reply lands in landing memory.
    landed: Option<Vec<PageRange>>,
}

/// One connection to the source, handshake done.
struct Conn {
    stream: TcpStream,
    next_id: u64,
    timeout: f64,
    /// Requests sent and not answered yet, oldest first.
    outstanding: VecDeque<Sent>,
}

impl Conn {
    fn open(
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

    fn err(&self, context: &str, e: io::Error) -> TransportError {
        TransportError::io(context, e, Some(self.timeout))
    }

    fn send(&mut self, make: impl FnOnce(u64) -> Request) -> Result<u64, TransportError> {
        let id = self.next_id;
        self.next_id += 1;
        let frame = wire::encode_request(&make(id));
        self.stream
            .write_all(&frame)
            .map_err(|e| self.err("send request", e))?;
        Ok(id)
    }

    /// Reads a whole reply of type `want` for request `id`.
    fn reply(&mut self, id: u64, want: u8) -> Result<Vec<u8>, TransportError> {
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
    fn send_fetch(&mut self, ranges: &[PageRange], landed: bool) -> Result<(), TransportError> {
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
    fn recv_fetch(&mut self, buf: &mut [u8], page_size: usize) -> Result<(), TransportError> {
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
        self.stream.read_exact(buf).map_err(|e| self.read_err(e))
    }

    /// Receives the reply to the oldest outstanding fetch, sent to land,
    /// straight into `landing`: each range's bytes at its own place.
    fn recv_fetch_landed(&mut self, landing: &Landing) -> Result<(), TransportError> {
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
        for r in ranges {
            // SAFETY: this channel sent the request for these pages (their
            // fetcher holds them, see `Landing::new`) and no other slice
            // over them is live: each range is read, then dropped.
            let dst = unsafe { landing.bytes_mut(r) }.ok_or(TransportError::Misuse(
                "a landed range outside the landing memory",
            ))?;
            self.stream.read_exact(dst).map_err(|e| self.read_err(e))?;
        }
        Ok(())
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

/// Pages from a pagewire source over TCP.
pub struct TcpTransport {
    addr: SocketAddr,
    opts: TcpOptions,
    info: SourceInfo,
    /// The source's session: every later connection must reach the same.
    session: u64,
    control: Mutex<Conn>,
    /// Where channels may land pages, once the engine offered it.
    landing: OnceLock<Arc<Landing>>,
}

impl std::fmt::Debug for TcpTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TcpTransport")
            .field("addr", &self.addr)
            .finish_non_exhaustive()
    }
}

impl TcpTransport {
    /// Connects the control channel and learns the source's layout.
    pub fn connect(addr: impl ToSocketAddrs, opts: TcpOptions) -> Result<Self, TransportError> {
        let addr = addr
            .to_socket_addrs()
            .map_err(|e| TransportError::io("resolve source address", e, None))?
            .next()
            .ok_or_else(|| TransportError::Protocol("source address resolves to nothing".into()))?;
        let (control, info, session) = Conn::open(addr, ChannelKind::Control, &opts)?;
        let info = info.ok_or_else(|| TransportError::Protocol("no layout".into()))?;
        Ok(Self {
            addr,
            opts,
            info,
            session,
            control: Mutex::new(control),
            landing: OnceLock::new(),
        })
    }

    /// Opens a connection of `kind` and checks it reached the same source.
    fn open_conn(&self, kind: ChannelKind) -> Result<(Conn, Option<SourceInfo>), TransportError> {
        let (conn, info, session) = Conn::open(self.addr, kind, &self.opts)?;
        if session != self.session {
            return Err(TransportError::Protocol(format!(
                "{} answers as another source (session {session:#x}, was {:#x}): a restarted \
                 source's memory is not this migration's",
                self.addr, self.session
            )));
        }
        Ok((conn, info))
    }

    /// Runs a request on the control connection; if the link is lost, the
    /// connection is reopened (with backoff, up to the recovery timeout)
    /// and the request run again.
    fn on_control<T>(
        &self,
        f: impl Fn(&mut Conn) -> Result<T, TransportError>,
    ) -> Result<T, TransportError> {
        let mut c = self.control();
        let first = match f(&mut c) {
            Ok(v) => return Ok(v),
            Err(e) if e.is_link_loss() && !self.opts.recover_timeout.is_zero() => e,
            Err(e) => return Err(e),
        };
        tracing::warn!("control connection lost ({first}): reconnecting");
        let deadline = std::time::Instant::now() + self.opts.recover_timeout;
        let mut backoff = Duration::from_millis(10);
        let mut last: Option<TransportError> = None;
        while std::time::Instant::now() < deadline {
            std::thread::sleep(backoff);
            backoff = (backoff * 2).min(Duration::from_secs(1));
            match self.open_conn(ChannelKind::Control) {
                Ok((conn, info)) => {
                    if info.as_ref() != Some(&self.info) {
                        return Err(TransportError::Protocol(
                            "the source's layout changed across a reconnect".into(),
                        ));
                    }
                    *c = conn;
                    match f(&mut c) {
                        Ok(v) => return Ok(v),
                        Err(e) if e.is_link_loss() => last = Some(e),
                        Err(e) => return Err(e),
                    }
                }
                Err(e) if e.is_link_loss() => last = Some(e),
                Err(e) => return Err(e),
            }
        }
        let secs = self.opts.recover_timeout.as_secs_f64();
        Err(match last {
            Some(last) => TransportError::RecoveryTimedOut {
                lost: Box::new(first),
                secs,
                last: Box::new(last),
            },
            None => first,
        })
    }

    /// The source's address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The I/O timeout in force.
    pub fn io_timeout(&self) -> Duration {
        self.opts.io_timeout
    }

    /// Asks the source, over the control connection, to connect a queue
    /// pair to `ep` and to say where guest memory is registered.
    pub fn rdma_connect(&self, ep: QpEndpoint) -> Result<RdmaAccept, TransportError> {
        let body = self.on_control(|c| {
            let id = c.send(|id| Request::RdmaConnect { id, ep })?;
            c.reply(id, wire::T_RDMA_ACCEPT)
        })?;
        let (_, accept) = wire::decode_rdma_accept(&body)?;
        if accept.regions.len() != self.info.layout.regions().len() {
            return Err(TransportError::Protocol(format!(
                "RDMA accept names {} regions, the layout {}",
                accept.regions.len(),
                self.info.layout.regions().len()
            )));
        }
        for (r, l) in accept.regions.iter().zip(self.info.layout.regions()) {
            if r.len != l.len {
                return Err(TransportError::Protocol(
                    "RDMA region sizes differ from the layout".into(),
                ));
            }
        }
        Ok(accept)
    }

    fn control(&self) -> std::sync::MutexGuard<'_, Conn> {
        // A poisoned lock only means another thread panicked mid-request;
        // the connection state is then unknown but requests carry ids, so
        // a mismatch is detected, not silently accepted.
        self.control.lock().unwrap_or_else(|p| p.into_inner())
    }
}

struct TcpChannel {
    conn: Conn,
    page_size: usize,
    landing: Option<Arc<Landing>>,
}

impl PageChannel for TcpChannel {
    fn send(&mut self, ranges: &[PageRange]) -> Result<(), TransportError> {
        self.conn.send_fetch(ranges, false)
    }

    fn recv(&mut self, buf: &mut [u8]) -> Result<(), TransportError> {
        self.conn.recv_fetch(buf, self.page_size)
    }

    fn send_landed(&mut self, ranges: &[PageRange]) -> Result<(), TransportError> {
        Landing::of(&self.landing)?.check(ranges)?;
        self.conn.send_fetch(ranges, true)
    }

    fn recv_landed(&mut self) -> Result<(), TransportError> {
        let landing = Landing::of(&self.landing)?.clone();
        self.conn.recv_fetch_landed(&landing)
    }

    fn reply_ready(&mut self) -> Result<bool, TransportError> {
        sockopt::wait_readable(&self.conn.stream, Duration::ZERO)
            .map_err(|e| self.conn.err("poll the connection", e))
    }

    fn ready_fd(&self) -> Option<RawFd> {
        Some(self.conn.stream.as_raw_fd())
    }

    fn outstanding(&self) -> usize {
        self.conn.outstanding.len()
    }

    fn max_outstanding(&self) -> usize {
        TCP_MAX_OUTSTANDING
    }
}

impl Transport for TcpTransport {
    fn name(&self) -> &'static str {
        "tcp"
    }

    fn info(&self) -> &SourceInfo {
        &self.info
    }

    fn open(&self, class: ChannelClass) -> Result<Box<dyn PageChannel>, TransportError> {
        let kind = match class {
            ChannelClass::Urgent => ChannelKind::Urgent,
            ChannelClass::Bulk(l) => ChannelKind::Bulk(l),
        };
        let (conn, _) = self.open_conn(kind)?;
        Ok(Box::new(TcpChannel {
            conn,
            page_size: self.info.layout.page_size(),
            landing: self.landing.get().cloned(),
        }))
    }

    fn checksums(&self, range: PageRange) -> Result<Vec<u64>, TransportError> {
        let body = self.on_control(|c| {
            let id = c.send(|id| Request::Checksums { id, range })?;
            c.reply(id, wire::T_CHECKSUM_LIST)
        })?;
        let (_, sums) = wire::decode_checksums(&body)?;
        if sums.len() != range.count as usize {
            return Err(TransportError::Protocol(format!(
                "{} checksums for {} pages",
                sums.len(),
                range.count
            )));
        }
        Ok(sums)
    }

    fn session(&self) -> Option<u64> {
        Some(self.session)
    }

    fn set_landing(&self, landing: Arc<Landing>) -> Result<bool, TransportError> {
        if landing.page_size() != self.info.layout.page_size() {
            return Ok(false);
        }
        // One landing memory per transport: the same offered again (a
        // resumed migration) is taken, other memory is not.
        let held = self.landing.get_or_init(|| landing.clone());
        Ok(Arc::ptr_eq(held, &landing))
    }

    fn dirty_round(&self, round: u32, pause: bool) -> Result<PageSet, TransportError> {
        // Asking a round again after a lost reply is safe: the source
        // answers it again with everything written since.
        let body = self.on_control(|c| {
            let id = c.send(|id| Request::Dirty { id, round, pause })?;
            c.reply(id, wire::T_DIRTY_MAP)
        })?;
        Ok(wire::decode_dirty_map(&body, self.info.layout.total_pages())?.1)
    }

    fn done(&self) -> Result<(), TransportError> {
        self.on_control(|c| c.send(|id| Request::Done { id }).map(|_| ()))
    }

    fn source_stats(&self) -> Result<SourceStats, TransportError> {
        let body = self.on_control(|c| {
            let id = c.send(|id| Request::Stats { id })?;
            c.reply(id, wire::T_STATS_REPLY)
        })?;
        Ok(wire::decode_stats(&body)?.1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layout::{MemoryLayout, ZeroMap};
    use crate::wire::Welcome;
    use std::net::TcpListener;

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
