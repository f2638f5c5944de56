//! The source's page server.

use std::io::{self, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::Duration;

use tracing::{debug, warn};

use crate::auth::{self, AuthKey, Side};
use crate::error::{LayoutError, RemoteCode, TransportError};
use crate::source::SourceMemory;
use crate::wire::{self, ChannelKind, QpEndpoint, RdmaAccept, Request, Welcome};

/// How long a new connection has for its whole handshake (hello, and
/// authentication when required), however it trickles its bytes.
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);
/// How long one reply may take to write: a destination that stops reading
/// for this long loses the connection (and reconnects if it is alive).
const WRITE_TIMEOUT: Duration = Duration::from_secs(60);

/// Reads from a stream until a fixed deadline, across reads.
struct Deadline<'a> {
    stream: &'a TcpStream,
    at: std::time::Instant,
}

impl io::Read for Deadline<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let left = self.at.saturating_duration_since(std::time::Instant::now());
        if left.is_zero() {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "handshake deadline passed",
            ));
        }
        self.stream.set_read_timeout(Some(left))?;
        let mut s = self.stream;
        s.read(buf)
    }
}
/// Largest request body accepted (a fetch with the most ranges fits).
const MAX_REQUEST: usize = 8 + 2 + 12 * wire::MAX_RANGES;

/// Connections served at once unless told otherwise (a migration uses one
/// per lane plus two).
pub const DEFAULT_MAX_CONNECTIONS: usize = 256;

/// Serves a [`SourceMemory`] to destinations.
pub struct PageServer {
    listener: TcpListener,
    source: Arc<SourceMemory>,
    rdma: Option<Arc<dyn RdmaAcceptor>>,
    key: Option<AuthKey>,
    max_connections: usize,
    live: Arc<AtomicUsize>,
    /// Random per server: reconnecting destinations check they reached
    /// the same source.
    session: u64,
    on_done: Option<DoneHook>,
}

/// Called when a destination says it has every page.
pub type DoneHook = Arc<dyn Fn() + Send + Sync>;

impl std::fmt::Debug for PageServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PageServer")
            .field("listener", &self.listener)
            .field("authenticated", &self.key.is_some())
            .field("max_connections", &self.max_connections)
            .finish_non_exhaustive()
    }
}

/// Counts a connection while its thread runs.
struct Live(Arc<AtomicUsize>);

impl Drop for Live {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Queue pairs one control connection keeps: more than a destination's
/// channels (one per lane and one per fault service) on most hosts; each
/// reconnect of a channel makes a new one, and the oldest go first.
const MAX_QUEUE_PAIRS: usize = 64;

/// Sets up RDMA queue pairs for destinations that ask (the source side of
/// the RDMA backend). The returned guard keeps the queue pair alive; it is
/// dropped when the control connection that asked for it closes, when the
/// destination says it is done, or when newer queue pairs of the same
/// connection push it past 64 (`MAX_QUEUE_PAIRS`).
pub trait RdmaAcceptor: Send + Sync {
    /// Creates a queue pair connected to `ep` and says where memory is.
    fn accept(&self, ep: QpEndpoint) -> Result<(RdmaAccept, Box<dyn Send>), TransportError>;
}

impl std::fmt::Debug for dyn RdmaAcceptor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("RdmaAcceptor")
    }
}

/// A server running on its own thread; dropping it does not stop it, call
/// [`ServerHandle::stop`].
#[derive(Debug)]
pub struct ServerHandle {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl ServerHandle {
    /// Address the server listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Stops accepting connections and waits for the accept loop to end.
    /// Connections already open finish on their own when their peer leaves.
    pub fn stop(mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wake the blocking accept.
        let _ = TcpStream::connect(self.addr);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl PageServer {
    /// Binds the listening socket. Without a key (see
    /// [`PageServer::with_auth`]) anyone who reaches it reads guest
    /// memory: bind to a loopback or private address.
    pub fn bind(addr: SocketAddr, source: Arc<SourceMemory>) -> io::Result<Self> {
        Ok(Self {
            listener: TcpListener::bind(addr)?,
            source,
            rdma: None,
            key: None,
            max_connections: DEFAULT_MAX_CONNECTIONS,
            live: Arc::new(AtomicUsize::new(0)),
            session: {
                let n = auth::nonce()?;
                u64::from_le_bytes([n[0], n[1], n[2], n[3], n[4], n[5], n[6], n[7]])
            },
            on_done: None,
        })
    }

    /// Requires every connection to prove it holds `key` (and proves it
    /// too) before anything about guest memory is sent.
    pub fn with_auth(mut self, key: AuthKey) -> Self {
        self.key = Some(key);
        self
    }

    /// Calls `hook` whenever a destination says it has every page (it no
    /// longer needs this memory).
    pub fn on_done(mut self, hook: DoneHook) -> Self {
        self.on_done = Some(hook);
        self
    }

    /// Serves at most `n` connections at once; more are refused with a
    /// "busy" error.
    pub fn with_max_connections(mut self, n: usize) -> Self {
        self.max_connections = n.max(1);
        self
    }

    /// Also serves RDMA queue pair set-up through `acceptor`.
    pub fn with_rdma(mut self, acceptor: Arc<dyn RdmaAcceptor>) -> Self {
        self.rdma = Some(acceptor);
        self
    }

    /// The address actually bound (useful with port 0).
    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Accepts connections forever, one thread each.
    pub fn serve(self) -> io::Result<()> {
        self.accept_loop(&AtomicBool::new(false))
    }

    /// Runs the accept loop on a new thread.
    pub fn spawn(self) -> io::Result<ServerHandle> {
        let addr = self.local_addr()?;
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = thread::Builder::new()
            .name("pagewire-server".into())
            .spawn(move || {
                if let Err(e) = self.accept_loop(&flag) {
                    warn!("page server stopped: {e}");
                }
            })?;
        Ok(ServerHandle {
            addr,
            stop,
            thread: Some(thread),
        })
    }

    fn accept_loop(&self, stop: &AtomicBool) -> io::Result<()> {
        for conn in self.listener.incoming() {
            if stop.load(Ordering::SeqCst) {
                break;
            }
            let stream = match conn {
                Ok(s) => s,
                Err(e) => {
                    warn!("accept failed: {e}");
                    continue;
                }
            };
            let peer = stream.peer_addr().ok();
            if self.live.fetch_add(1, Ordering::SeqCst) >= self.max_connections {
                self.live.fetch_sub(1, Ordering::SeqCst);
                warn!(
                    ?peer,
                    max = self.max_connections,
                    "refusing a connection: too many open"
                );
                let mut stream = stream;
                let _ = stream.set_write_timeout(Some(Duration::from_millis(100)));
                reply_error(
                    &mut stream,
                    0,
                    RemoteCode::Busy,
                    "the source serves as many connections as it allows",
                );
                continue;
            }
            let live = Live(self.live.clone());
            let ctx = Ctx {
                source: self.source.clone(),
                rdma: self.rdma.clone(),
                key: self.key.clone(),
                session: self.session,
                on_done: self.on_done.clone(),
            };
            let spawned = thread::Builder::new()
                .name("pagewire-conn".into())
                .spawn(move || {
                    let _live = live;
                    match serve_connection(stream, &ctx) {
                        Ok(()) => debug!(?peer, "connection closed"),
                        Err(e) => warn!(?peer, "connection ended: {e}"),
                    }
                });
            if let Err(e) = spawned {
                warn!("cannot start a connection thread: {e}");
            }
        }
        Ok(())
    }
}

/// Sends an error reply; failures to send are ignored because the
/// connection is being given up on anyway or the error is logged by the caller.
fn reply_error(stream: &mut TcpStream, id: u64, code: RemoteCode, msg: &str) {
    let _ = stream.write_all(&wire::encode_error(id, code, msg));
}

fn io_err(context: &str) -> impl FnOnce(io::Error) -> TransportError + '_ {
    move |e| TransportError::io(context, e, None)
}

/// Proves the key to the peer and checks its proof, before anything about
/// guest memory is sent (still under the hello timeout).
fn authenticate(
    stream: &mut TcpStream,
    key: &AuthKey,
    hello: &wire::Hello,
    until: std::time::Instant,
) -> Result<(), TransportError> {
    let ns = auth::nonce().map_err(io_err("draw a nonce"))?;
    let k = hello.kind.auth_byte();
    let mine = key.proof(Side::Source, k, &hello.nonce, &ns);
    stream
        .write_all(&wire::encode_challenge(&ns, &mine))
        .map_err(io_err("send challenge"))?;
    let (ty, body) = wire::read_frame(
        &mut Deadline {
            stream: &*stream,
            at: until,
        },
        64,
    )
    .map_err(io_err("read authentication"))?;
    let theirs = if ty == wire::T_AUTH {
        wire::decode_auth(&body).ok()
    } else {
        None
    };
    match theirs {
        Some(p) if key.verify(Side::Destination, k, &hello.nonce, &ns, &p) => Ok(()),
        _ => {
            reply_error(stream, 0, RemoteCode::Auth, "authentication failed");
            Err(TransportError::AuthFailed(
                "the peer does not hold the shared key".into(),
            ))
        }
    }
}

/// Serves one connection until the peer leaves or breaks the protocol.
/// What a connection's thread needs.
struct Ctx {
    source: Arc<SourceMemory>,
    rdma: Option<Arc<dyn RdmaAcceptor>>,
    key: Option<AuthKey>,
    session: u64,
    on_done: Option<DoneHook>,
}

fn serve_connection(mut stream: TcpStream, ctx: &Ctx) -> Result<(), TransportError> {
    let (source, rdma, key, session) = (
        &*ctx.source,
        ctx.rdma.as_deref(),
        ctx.key.as_ref(),
        ctx.session,
    );
    // RDMA queue pairs set up on this connection live as long as it does.
    let mut queue_pairs: Vec<Box<dyn Send>> = Vec::new();
    stream
        .set_nodelay(true)
        .map_err(io_err("set TCP_NODELAY"))?;
    let handshake_until = std::time::Instant::now() + HELLO_TIMEOUT;
    let (ty, body) = wire::read_frame(
        &mut Deadline {
            stream: &stream,
            at: handshake_until,
        },
        64,
    )
    .map_err(io_err("read hello"))?;
    if ty != wire::T_HELLO {
        reply_error(&mut stream, 0, RemoteCode::Malformed, "expected hello");
        return Err(TransportError::Protocol(format!(
            "first message has type {ty:#04x}, not hello"
        )));
    }
    let hello = match wire::decode_hello(&body) {
        Ok(h) => h,
        Err(e) => {
            reply_error(&mut stream, 0, RemoteCode::Malformed, &e.to_string());
            return Err(e);
        }
    };
    if hello.version != wire::VERSION {
        let msg = format!(
            "source speaks protocol version {}, client {}",
            wire::VERSION,
            hello.version
        );
        reply_error(&mut stream, 0, RemoteCode::Version, &msg);
        return Err(TransportError::Version {
            ours: wire::VERSION,
            theirs: hello.version,
        });
    }
    if let Some(key) = key {
        authenticate(&mut stream, key, &hello, handshake_until)?;
    }
    super::sockopt::tune(&stream, hello.kind);
    let info = (hello.kind == ChannelKind::Control).then(|| source.handshake_info());
    stream
        .write_all(&wire::encode_welcome(&Welcome {
            version: wire::VERSION,
            session,
            info,
        }))
        .map_err(io_err("send welcome"))?;
    // After the handshake a destination may stay idle for as long as its
    // migration runs; it leaves by closing the socket.
    stream
        .set_read_timeout(None)
        .map_err(io_err("clear read timeout"))?;
    stream
        .set_write_timeout(Some(WRITE_TIMEOUT))
        .map_err(io_err("set write timeout"))?;
    super::sockopt::keepalive(&stream);
    debug!(kind = ?hello.kind, "connection up");

    loop {
        let (ty, body) = match wire::read_frame(&mut stream, MAX_REQUEST) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(()),
            Err(e) if e.kind() == io::ErrorKind::InvalidData => {
                reply_error(&mut stream, 0, RemoteCode::Malformed, &e.to_string());
                return Err(TransportError::Protocol(e.to_string()));
            }
            Err(e) => return Err(TransportError::io("read request", e, None)),
        };
        let req = match wire::decode_request(ty, &body) {
            Ok(r) => r,
            Err(e) => {
                reply_error(&mut stream, 0, RemoteCode::Malformed, &e.to_string());
                return Err(e);
            }
        };
        if let Request::RdmaConnect { id, ep } = req {
            match rdma.map(|r| r.accept(ep)) {
                Some(Ok((accept, qp))) => {
                    // A destination uses its newest queue pair per channel;
                    // older ones (channels reconnected) go past a bound.
                    if queue_pairs.len() >= MAX_QUEUE_PAIRS {
                        queue_pairs.remove(0);
                    }
                    queue_pairs.push(qp);
                    stream
                        .write_all(&wire::encode_rdma_accept(id, &accept))
                        .map_err(io_err("send RDMA accept"))?;
                }
                Some(Err(e)) => reply_error(&mut stream, id, RemoteCode::Other, &e.to_string()),
                None => reply_error(
                    &mut stream,
                    id,
                    RemoteCode::Other,
                    "this source serves no RDMA",
                ),
            }
            continue;
        }
        if let Request::Done { .. } = req {
            tracing::info!(stats = ?source.stats(), "the destination has every page");
            // Its queue pairs (and, with the last, the memory
            // registration) are not needed any more.
            queue_pairs.clear();
            if let Some(hook) = &ctx.on_done {
                hook();
            }
            continue;
        }
        serve_request(&mut stream, source, req)?;
    }
}

fn layout_code(e: &LayoutError) -> RemoteCode {
    match e {
        LayoutError::OutOfRange { .. } | LayoutError::EmptyRange => RemoteCode::OutOfRange,
        _ => RemoteCode::Other,
    }
}

/// Answers one well-formed request. Requests that name bad pages get an
/// error reply and the connection goes on.
fn serve_request(
    stream: &mut TcpStream,
    source: &SourceMemory,
    req: Request,
) -> Result<(), TransportError> {
    match req {
        Request::Fetch { id, ranges } => {
            let total: u64 = ranges.iter().map(|r| u64::from(r.count)).sum();
            if total > wire::MAX_FETCH_PAGES {
                let msg = format!(
                    "fetch of {total} pages exceeds the limit of {}",
                    wire::MAX_FETCH_PAGES
                );
                reply_error(stream, id, RemoteCode::TooLarge, &msg);
                return Ok(());
            }
            let mut parts: Vec<&[u8]> = Vec::with_capacity(ranges.len() + 1);
            for r in &ranges {
                match source.pages(*r) {
                    Ok(bytes) => parts.push(bytes),
                    Err(e) => {
                        warn!(request = id, "rejected fetch: {e}");
                        reply_error(stream, id, layout_code(&e), &e.to_string());
                        return Ok(());
                    }
                }
            }
            let data_len: usize = parts.iter().map(|p| p.len()).sum();
            let header = wire::encode_pages_header(id, total as u32, data_len);
            parts.insert(0, &header);
            wire::write_all_vectored(stream, &parts).map_err(io_err("send pages"))?;
            source.count_served(total);
        }
        Request::Checksums { id, range } => {
            if range.count > wire::MAX_CHECKSUMS {
                reply_error(stream, id, RemoteCode::TooLarge, "too many checksums");
                return Ok(());
            }
            match source.checksums(range) {
                Ok(sums) => stream
                    .write_all(&wire::encode_checksums(id, &sums))
                    .map_err(io_err("send checksums"))?,
                Err(e) => reply_error(stream, id, layout_code(&e), &e.to_string()),
            }
        }
        Request::Stats { id } => stream
            .write_all(&wire::encode_stats(id, &source.stats()))
            .map_err(io_err("send stats"))?,
        Request::Done { .. } => {}
        Request::Dirty { id, round, pause } => match source.dirty_round(round, pause) {
            Ok(set) => stream
                .write_all(&wire::encode_dirty_map(id, &set))
                .map_err(io_err("send dirty map"))?,
            Err(e) => {
                let code = e.remote_code();
                if code == RemoteCode::Unsupported {
                    debug!(request = id, "no pre-copy here: {e}")
                } else {
                    warn!(request = id, round, "pre-copy round refused: {e}")
                }
                reply_error(stream, id, code, &e.to_string());
            }
        },
        Request::RdmaConnect { id, .. } => reply_error(
            stream,
            id,
            RemoteCode::Other,
            "RDMA set-up is handled by the connection",
        ),
    }
    Ok(())
}
