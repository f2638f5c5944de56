//! A TCP page channel: one connection of its own to the source, which
//! fetches pages into a buffer or straight into landing memory.

use std::os::fd::{AsRawFd, RawFd};
use std::sync::Arc;
use std::time::Duration;

use crate::error::TransportError;
use crate::landing::Landing;
use crate::layout::PageRange;
use crate::PageChannel;

use super::conn::{Conn, TCP_MAX_OUTSTANDING};
use crate::tcp::sockopt;

pub(super) struct TcpChannel {
    pub(super) conn: Conn,
    pub(super) page_size: usize,
    pub(super) landing: Option<Arc<Landing>>,
}

impl PageChannel for TcpChannel {
    fn send(&mut self, ranges: &[PageRange]) -> Result<(), TransportError> {
        self.conn.send_fetch(ranges, false)
    }

    fn recv(&mut self, buf: &mut [u8]) -> Result<(), TransportError> {
        self.conn.recv_fetch(buf, self.page_size, &mut |_| {})
    }

    fn recv_streaming(
        &mut self,
        buf: &mut [u8],
        arrived: &mut dyn FnMut(&[u8]),
    ) -> Result<(), TransportError> {
        self.conn.recv_fetch(buf, self.page_size, arrived)
    }

    fn send_landed(&mut self, ranges: &[PageRange]) -> Result<(), TransportError> {
        Landing::of(&self.landing)?.check(ranges)?;
        self.conn.send_fetch(ranges, true)
    }

    fn recv_landed(&mut self) -> Result<(), TransportError> {
        let landing = Landing::of(&self.landing)?.clone();
        self.conn.recv_fetch_landed(&landing, &mut |_| {})
    }

    fn recv_landed_streaming(
        &mut self,
        arrived: &mut dyn FnMut(usize),
    ) -> Result<(), TransportError> {
        let landing = Landing::of(&self.landing)?.clone();
        self.conn.recv_fetch_landed(&landing, arrived)
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
