//! The destination's TCP client: [`TcpTransport`], which keeps a control
//! connection to the source (layout, checksums, dirty rounds, RDMA set-up;
//! reconnected when the link is lost) and opens the page channels, and
//! [`TcpOptions`], its timeouts and credentials.

use std::net::{SocketAddr, ToSocketAddrs};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use crate::dirty::PageSet;
use crate::error::TransportError;
use crate::landing::Landing;
use crate::layout::{PageRange, SourceInfo};
use crate::wire::{self, ChannelKind, QpEndpoint, RdmaAccept, Request, SourceStats};
use crate::{ChannelClass, PageChannel, Transport};

use crate::auth::AuthKey;

mod channel;
mod conn;

use channel::TcpChannel;
use conn::Conn;

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
        Ok(Landing::adopt(
            &self.landing,
            landing,
            self.info.layout.page_size(),
        ))
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
