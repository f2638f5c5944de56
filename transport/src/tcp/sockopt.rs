//! Socket options that give urgent traffic the lowest-latency path and
//! keep bulk traffic from piling up in socket buffers. The only `unsafe`
//! of the TCP backend lives here.

use std::io;
use std::os::fd::AsRawFd;
use std::time::Duration;

use crate::wire::ChannelKind;

/// `SO_PRIORITY` of urgent sockets: `TC_PRIO_INTERACTIVE`, the band that
/// priority-aware qdiscs (prio, pfifo_fast, mqprio) send first.
const URGENT_PRIORITY: libc::c_int = 6;
/// `SO_PRIORITY` of bulk sockets: `TC_PRIO_BULK`.
const BULK_PRIORITY: libc::c_int = 2;
/// IP TOS of urgent sockets: low delay.
const TOS_LOWDELAY: libc::c_int = 0x10;
/// IP TOS of bulk sockets: throughput.
const TOS_THROUGHPUT: libc::c_int = 0x08;
/// Unsent bytes a bulk socket may hold before a writer blocks: the
/// destination paces bulk requests itself, so the socket never needs more
/// than a few replies' worth queued.
const BULK_NOTSENT_LOWAT: libc::c_int = 128 << 10;

fn set(
    fd: &impl AsRawFd,
    level: libc::c_int,
    name: libc::c_int,
    value: libc::c_int,
) -> io::Result<()> {
    // SAFETY: `value` is a live c_int for the duration of the call and its
    // exact size is passed; the fd is borrowed from a live socket.
    let rc = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            level,
            name,
            (&value as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Marks a connected socket for its channel kind: urgent sockets get the
/// interactive priority and low-delay TOS, bulk sockets the bulk priority,
/// throughput TOS and a small unsent-bytes watermark. Options the kernel
/// refuses are logged and skipped: they are an optimisation, not a
/// requirement.
pub fn tune(sock: &impl AsRawFd, kind: ChannelKind) {
    let (prio, tos, lowat) = match kind {
        ChannelKind::Urgent => (URGENT_PRIORITY, TOS_LOWDELAY, None),
        ChannelKind::Bulk(_) => (BULK_PRIORITY, TOS_THROUGHPUT, Some(BULK_NOTSENT_LOWAT)),
        ChannelKind::Control => return,
    };
    let mut opts = vec![
        ("SO_PRIORITY", libc::SOL_SOCKET, libc::SO_PRIORITY, prio),
        ("IP_TOS", libc::IPPROTO_IP, libc::IP_TOS, tos),
    ];
    if let Some(l) = lowat {
        opts.push((
            "TCP_NOTSENT_LOWAT",
            libc::IPPROTO_TCP,
            libc::TCP_NOTSENT_LOWAT,
            l,
        ));
    }
    for (what, level, name, value) in opts {
        if let Err(e) = set(sock, level, name, value) {
            // IP_TOS fails on IPv6 sockets; nothing else is expected to.
            tracing::debug!(?kind, "{what} not set: {e}");
        }
    }
}

/// Turns on TCP keepalive so a peer that vanished without a FIN or RST
/// (a crashed host, a partition) is noticed in about 35 s: first probe
/// after 15 s idle, then every 5 s, given up after 4.
pub fn keepalive(sock: &impl AsRawFd) {
    for (what, level, name, value) in [
        ("SO_KEEPALIVE", libc::SOL_SOCKET, libc::SO_KEEPALIVE, 1),
        ("TCP_KEEPIDLE", libc::IPPROTO_TCP, libc::TCP_KEEPIDLE, 15),
        ("TCP_KEEPINTVL", libc::IPPROTO_TCP, libc::TCP_KEEPINTVL, 5),
        ("TCP_KEEPCNT", libc::IPPROTO_TCP, libc::TCP_KEEPCNT, 4),
    ] {
        if let Err(e) = set(sock, level, name, value) {
            tracing::debug!("{what} not set: {e}");
        }
    }
}

/// Waits up to `timeout` for `sock` to become readable; returns whether it
/// is.
pub fn wait_readable(sock: &impl AsRawFd, timeout: Duration) -> io::Result<bool> {
    let mut pfd = libc::pollfd {
        fd: sock.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    let ms = timeout.as_millis().min(i32::MAX as u128) as libc::c_int;
    // SAFETY: one valid pollfd, count 1.
    let n = unsafe { libc::poll(&mut pfd, 1, ms) };
    match n {
        n if n > 0 => Ok(pfd.revents & (libc::POLLIN | libc::POLLHUP | libc::POLLERR) != 0),
        0 => Ok(false),
        _ => {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                Ok(false)
            } else {
                Err(e)
            }
        }
    }
}
