//! A channel in large pages over one in small pages: each large page goes
//! as pieces (inner requests) sent in order, and a reply is reported page
//! by page as each large page is whole.
//!
//! A 2 MiB page takes 17 ms on a 1 Gbit/s link, and a fault's page cannot
//! overtake bulk bytes already queued ahead of it at the bottleneck. So a
//! paced bulk channel sends each large page in pieces of [`PIECE_PAGES`]
//! source pages, at most [`PIECES_IN_FLIGHT`] on the wire, and no new
//! piece while a fault waits on something else and on nothing it carries
//! ([`FaultWaits::holds`]); a channel carrying a page a fault waits on
//! sends all of it at once. A fault then waits behind at most a piece per
//! lane, not behind whole large pages of every lane.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use pagewire_transport::{PageChannel, PageRange, TransportError};

use crate::waits::FaultWaits;

/// Source pages in one piece of a bulk large page (128 KiB of 4 KiB
/// pages: 1 ms at 1 Gbit/s).
pub(super) const PIECE_PAGES: u64 = 32;
/// Pieces a bulk channel keeps on the wire at once.
pub(super) const PIECES_IN_FLIGHT: usize = 1;
/// Longest a bulk channel with nothing on the wire holds its next piece
/// for faults: a fault waiting longer (its request on a lost link) lets
/// the push go on, a piece at a time.
const HOLD_MAX: Duration = Duration::from_millis(100);

/// A channel in large pages over one in small pages. Each request becomes
/// inner requests of one range each (pieces), sent in order as the inner
/// channel (and, on a paced bulk channel, the faults) allow: every piece
/// is sent by the time its reply is received.
pub(super) struct ScaledChannel {
    inner: Box<dyn PageChannel>,
    factor: u64,
    /// Bytes of one source page.
    page_bytes: usize,
    /// Most source pages in one inner request.
    piece: u64,
    /// Bulk only: the faults it makes way for, and the most pieces on the
    /// wire at once.
    pace: Option<(Arc<FaultWaits>, usize)>,
    /// For every request outstanding: the byte length of each piece.
    parts: VecDeque<Vec<usize>>,
    /// For every request outstanding: its large pages.
    carried: VecDeque<Vec<PageRange>>,
    /// Pieces not sent yet, in order.
    unsent: VecDeque<PageRange>,
    /// Pieces sent whose replies are not received.
    on_wire: usize,
    max_outstanding: usize,
}

impl ScaledChannel {
    /// A channel over `inner` for large pages of `factor` source pages of
    /// `page_bytes` each, sending pieces of at most `piece` source pages;
    /// `pace` (bulk only): what faults wait on and the most pieces on the
    /// wire; at most `max_outstanding` requests.
    pub(super) fn new(
        inner: Box<dyn PageChannel>,
        factor: u64,
        page_bytes: usize,
        piece: u64,
        pace: Option<(Arc<FaultWaits>, usize)>,
        max_outstanding: usize,
    ) -> Self {
        Self {
            inner,
            factor,
            page_bytes,
            piece,
            pace,
            parts: VecDeque::new(),
            carried: VecDeque::new(),
            unsent: VecDeque::new(),
            on_wire: 0,
            max_outstanding,
        }
    }

    /// Sends the next pieces while the inner channel has room and, on a
    /// paced channel, fewer than its limit are on the wire and no fault
    /// waits on anything this channel does not carry. With `must`, sends
    /// at least one piece when none is on the wire (waiting up to
    /// [`HOLD_MAX`] for the faults first): a receive needs its piece sent.
    fn fill(&mut self, must: bool) -> Result<(), TransportError> {
        while let Some(&piece) = self.unsent.front() {
            let room = self.inner.outstanding() < self.inner.max_outstanding();
            if !room {
                break;
            }
            if let Some((waits, in_flight)) = &self.pace {
                if waits.urgent() > 0 || waits.has_waiters() {
                    let mine: Vec<PageRange> = self.carried.iter().flatten().copied().collect();
                    if waits.waits_in(&mine) {
                        // A fault waits on this channel's page: every
                        // piece before it is on its way anyway.
                        self.inner.send(&[piece])?;
                        self.unsent.pop_front();
                        self.on_wire += 1;
                        continue;
                    }
                    if waits.waits_elsewhere(&mine) {
                        if self.on_wire > 0 || !must {
                            break;
                        }
                        waits.wait_clear(&mine, HOLD_MAX);
                    }
                }
                if self.on_wire >= *in_flight {
                    break;
                }
            }
            self.inner.send(&[piece])?;
            self.unsent.pop_front();
            self.on_wire += 1;
        }
        Ok(())
    }
}

impl PageChannel for ScaledChannel {
    fn send(&mut self, ranges: &[PageRange]) -> Result<(), TransportError> {
        if self.parts.len() >= self.max_outstanding {
            return Err(TransportError::Misuse(
                "more requests outstanding than the channel keeps",
            ));
        }
        // Each large page becomes pieces of at most `piece` small pages:
        // a large page is whole once its last piece is in.
        let mut lens = Vec::new();
        for r in ranges {
            for page in r.first..r.end() {
                let mut first = page * self.factor;
                let end = first + self.factor;
                while first < end {
                    let n = (end - first).min(self.piece);
                    self.unsent.push_back(PageRange::new(first, n as u32));
                    lens.push(n as usize * self.page_bytes);
                    first += n;
                }
            }
        }
        self.parts.push_back(lens);
        self.carried.push_back(ranges.to_vec());
        self.fill(false)
    }

    fn recv(&mut self, buf: &mut [u8]) -> Result<(), TransportError> {
        self.recv_streaming(buf, &mut |_| {})
    }

    /// Reports the reply after each large page but the last: whole large
    /// pages come in as their last piece does.
    fn recv_streaming(
        &mut self,
        buf: &mut [u8],
        arrived: &mut dyn FnMut(&[u8]),
    ) -> Result<(), TransportError> {
        // Both stay until the reply is in: a fault may wait on its pages.
        let lens = self
            .parts
            .front()
            .ok_or(TransportError::Misuse("recv without a request outstanding"))?
            .clone();
        let total: usize = lens.iter().sum();
        if buf.len() != total {
            return Err(TransportError::BufferSize {
                want: total,
                got: buf.len(),
            });
        }
        let large = self.factor as usize * self.page_bytes;
        let mut off = 0;
        for len in lens {
            let must = self.on_wire == 0;
            self.fill(must)?;
            if self.on_wire == 0 {
                return Err(TransportError::Misuse("a piece to receive was never sent"));
            }
            self.inner.recv(&mut buf[off..off + len])?;
            self.on_wire -= 1;
            off += len;
            if off < total && off.is_multiple_of(large) {
                arrived(&buf[..off]);
            }
            self.fill(false)?;
        }
        self.parts.pop_front();
        self.carried.pop_front();
        Ok(())
    }

    fn reply_ready(&mut self) -> Result<bool, TransportError> {
        self.inner.reply_ready()
    }

    fn ready_fd(&self) -> Option<std::os::fd::RawFd> {
        self.inner.ready_fd()
    }

    fn outstanding(&self) -> usize {
        self.parts.len()
    }

    fn max_outstanding(&self) -> usize {
        self.max_outstanding
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scaled::Scaled;
    use pagewire_transport::inproc::InProcTransport;
    use pagewire_transport::SourceMemory;
    use pagewire_transport::{
        ChannelClass, FetchLimits, MemoryLayout, SourceInfo, SourceStats, Transport,
    };
    use std::sync::Mutex;

    const MIB: usize = 1 << 20;

    /// One inner send as the test saw it: its range, the inner requests
    /// already on the wire, faults' requests outstanding.
    type Sent = (PageRange, usize, u32);
    /// Every inner send so far.
    type Sends = Arc<Mutex<Vec<Sent>>>;

    /// The in-process transport, with every inner send written down.
    struct Recording {
        inner: InProcTransport,
        sends: Sends,
        faults: Arc<FaultWaits>,
    }

    struct RecordingChannel {
        inner: Box<dyn PageChannel>,
        sends: Sends,
        faults: Arc<FaultWaits>,
    }

    impl PageChannel for RecordingChannel {
        fn send(&mut self, ranges: &[PageRange]) -> Result<(), TransportError> {
            let on_wire = self.inner.outstanding();
            self.inner.send(ranges)?;
            let mut log = self.sends.lock().unwrap();
            for r in ranges {
                log.push((
                    *r,
                    on_wire,
                    self.faults.urgent() + self.faults.has_waiters() as u32,
                ));
            }
            Ok(())
        }
        fn recv(&mut self, buf: &mut [u8]) -> Result<(), TransportError> {
            self.inner.recv(buf)
        }
        fn reply_ready(&mut self) -> Result<bool, TransportError> {
            self.inner.reply_ready()
        }
        fn outstanding(&self) -> usize {
            self.inner.outstanding()
        }
        fn max_outstanding(&self) -> usize {
            self.inner.max_outstanding()
        }
    }

    impl Transport for Recording {
        fn name(&self) -> &'static str {
            "recording"
        }
        fn info(&self) -> &SourceInfo {
            self.inner.info()
        }
        fn open(&self, class: ChannelClass) -> Result<Box<dyn PageChannel>, TransportError> {
            Ok(Box::new(RecordingChannel {
                inner: self.inner.open(class)?,
                sends: self.sends.clone(),
                faults: self.faults.clone(),
            }))
        }
        fn limits(&self) -> FetchLimits {
            self.inner.limits()
        }
        fn checksums(&self, range: PageRange) -> Result<Vec<u64>, TransportError> {
            self.inner.checksums(range)
        }
        fn source_stats(&self) -> Result<SourceStats, TransportError> {
            self.inner.source_stats()
        }
    }

    /// 8 MiB of source pages, each 4 KiB page's bytes its index mod 251.
    fn source() -> (Vec<u8>, Arc<SourceMemory>) {
        let bytes: Vec<u8> = (0..8 * MIB).map(|i| (i / 4096 % 251) as u8).collect();
        let layout = MemoryLayout::single(8 * MIB as u64).unwrap();
        let src = Arc::new(SourceMemory::new(layout, vec![Arc::new(bytes.clone())]).unwrap());
        (bytes, src)
    }

    /// A paced view of 2 MiB pages over [`source`], its inner sends
    /// written down: the source's bytes, what faults wait on, the sends.
    fn recorded() -> (Vec<u8>, Arc<FaultWaits>, Sends, Scaled) {
        let (bytes, src) = source();
        let faults = Arc::new(FaultWaits::default());
        let sends = Arc::new(Mutex::new(Vec::new()));
        let inner: Arc<dyn Transport> = Arc::new(Recording {
            inner: InProcTransport::new(src),
            sends: sends.clone(),
            faults: faults.clone(),
        });
        let scaled = Scaled::new(inner, 2 * MIB, Some(faults.clone())).unwrap();
        (bytes, faults, sends, scaled)
    }

    /// A reply of several large pages is reported as each page is whole,
    /// every report holding the source's bytes, never the whole reply.
    #[test]
    fn a_reply_of_large_pages_is_reported_page_by_page() {
        let (bytes, src) = source();
        let inner: Arc<dyn Transport> = Arc::new(InProcTransport::new(src));
        let scaled = Scaled::new(inner, 2 * MIB, None).unwrap();
        assert_eq!(scaled.info().layout.total_pages(), 4);
        let mut ch = scaled.open(ChannelClass::Bulk(0)).unwrap();
        ch.send(&[PageRange::new(1, 3)]).unwrap();
        let mut buf = vec![0u8; 6 * MIB];
        let mut reports = Vec::new();
        ch.recv_streaming(&mut buf, &mut |prefix| {
            assert!(
                prefix == &bytes[2 * MIB..2 * MIB + prefix.len()],
                "a prefix reported before its bytes"
            );
            reports.push(prefix.len());
        })
        .unwrap();
        assert!(buf == bytes[2 * MIB..], "the reply's bytes");
        assert_eq!(reports, [2 * MIB, 4 * MIB]);
        // Requests past what the channel keeps outstanding are refused
        // with nothing sent; those before arrive in order, each whole.
        let page = |p: usize| &bytes[p * 2 * MIB..(p + 1) * 2 * MIB];
        let mut sent = 0;
        while ch.send(&[PageRange::new(sent % 4, 1)]).is_ok() {
            sent += 1;
            assert!(sent <= 4096, "never refused");
        }
        let mut buf = vec![0u8; 2 * MIB];
        for i in 0..sent {
            ch.recv(&mut buf).unwrap();
            assert!(buf == page(i as usize % 4), "reply {i}");
        }
        // Nothing of the refused request went out: the next reply is the
        // next request's.
        ch.send(&[PageRange::new(3, 1)]).unwrap();
        ch.recv(&mut buf).unwrap();
        assert!(buf == page(3), "a part of the refused request went out");
    }

    /// A paced bulk channel sends a large page in pieces, at most
    /// [`PIECES_IN_FLIGHT`] on the wire, reports only whole large pages,
    /// and sends no piece beside another while a fault's request is
    /// outstanding.
    #[test]
    fn a_bulk_channel_sends_pieces_and_makes_way_for_faults() {
        let (bytes, faults, sends, scaled) = recorded();
        let mut ch = scaled.open(ChannelClass::Bulk(0)).unwrap();
        // A fault's request outstanding: nothing goes out yet.
        faults.urgent_begin();
        ch.send(&[PageRange::new(1, 2)]).unwrap();
        assert!(
            sends.lock().unwrap().is_empty(),
            "a piece went out beside a fault"
        );
        faults.urgent_end();
        let mut buf = vec![0u8; 4 * MIB];
        let mut reports = Vec::new();
        let mut ender = None;
        ch.recv_streaming(&mut buf, &mut |prefix| {
            reports.push(prefix.len());
            // A fault comes while the second large page is on its way;
            // its reply comes 10 ms later.
            faults.urgent_begin();
            let f = faults.clone();
            ender = Some(std::thread::spawn(move || {
                std::thread::sleep(Duration::from_millis(10));
                f.urgent_end();
            }));
        })
        .unwrap();
        ender.expect("a report").join().unwrap();
        assert!(buf == bytes[2 * MIB..6 * MIB], "the reply's bytes");
        assert_eq!(reports, [2 * MIB], "whole large pages only");
        let log = sends.lock().unwrap();
        let per_large = (2 * MIB / 4096) as u64 / PIECE_PAGES;
        assert_eq!(
            log.len() as u64,
            2 * per_large,
            "pieces of {PIECE_PAGES} pages"
        );
        for (i, &(r, on_wire, faults)) in log.iter().enumerate() {
            assert_eq!(
                r,
                PageRange::new(512 + i as u64 * PIECE_PAGES, PIECE_PAGES as u32),
                "piece {i}"
            );
            assert!(
                on_wire < PIECES_IN_FLIGHT,
                "piece {i}: {on_wire} on the wire"
            );
            assert!(
                faults == 0 || on_wire == 0,
                "piece {i} went out beside another while a fault's request was outstanding"
            );
        }
    }

    /// A fault waiting on a large page one lane is fetching lets that lane
    /// go on and holds the others until the page is in.
    #[test]
    fn a_wait_on_a_page_in_flight_holds_only_the_lanes_not_carrying_it() {
        let (bytes, faults, sends, scaled) = recorded();
        let mut a = scaled.open(ChannelClass::Bulk(0)).unwrap();
        let mut b = scaled.open(ChannelClass::Bulk(1)).unwrap();
        assert!(faults.wait_for(0, std::time::Instant::now(), || false));
        a.send(&[PageRange::new(0, 1)]).unwrap();
        b.send(&[PageRange::new(3, 1)]).unwrap();
        let mut buf = vec![0u8; 2 * MIB];
        a.recv(&mut buf).unwrap();
        assert!(buf == bytes[..2 * MIB], "lane a's page");
        let a_sent = sends.lock().unwrap().len() as u64;
        assert_eq!(a_sent, 512 / PIECE_PAGES, "lane a sent every piece");
        assert!(
            sends
                .lock()
                .unwrap()
                .iter()
                .any(|&(_, on_wire, _)| on_wire > 0),
            "lane a was held by the wait on its own page"
        );
        assert!(
            sends.lock().unwrap().iter().all(|(r, _, _)| r.first < 512),
            "lane b sent a piece while a fault waited on lane a's page"
        );
        faults.settle(PageRange::new(0, 1), |_| {});
        b.recv(&mut buf).unwrap();
        assert!(buf == bytes[6 * MIB..], "lane b's page");
        assert_eq!(sends.lock().unwrap().len() as u64, 2 * 512 / PIECE_PAGES);
    }

    /// Two faults, each waiting on a page another lane carries: neither
    /// lane holds for the other's wait.
    #[test]
    fn faults_waiting_on_pages_in_two_lanes_hold_neither() {
        let (bytes, faults, sends, scaled) = recorded();
        let mut a = scaled.open(ChannelClass::Bulk(0)).unwrap();
        let mut b = scaled.open(ChannelClass::Bulk(1)).unwrap();
        assert!(faults.wait_for(0, std::time::Instant::now(), || false));
        assert!(faults.wait_for(3, std::time::Instant::now(), || false));
        // A fault's own request outstanding too: carrying lanes go on.
        faults.urgent_begin();
        a.send(&[PageRange::new(0, 1)]).unwrap();
        b.send(&[PageRange::new(3, 1)]).unwrap();
        let per_large = 512 / PIECE_PAGES;
        assert_eq!(
            sends.lock().unwrap().len() as u64,
            2 * per_large,
            "each lane sends its whole page at once"
        );
        let mut buf = vec![0u8; 2 * MIB];
        a.recv(&mut buf).unwrap();
        assert!(buf == bytes[..2 * MIB], "lane a's page");
        b.recv(&mut buf).unwrap();
        assert!(buf == bytes[6 * MIB..], "lane b's page");
        faults.urgent_end();
    }
}
