//! The one message Firecracker sends its page-fault handler: guest memory
//! mappings as JSON, and the userfaultfd.

use std::io::{IoSliceMut, Read};
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::time::Duration;

use nix::sys::socket::{getsockopt, recvmsg, sockopt, ControlMessageOwned, MsgFlags};
use pagewire_engine::GuestRegion;
use serde::Deserialize;

/// Largest handshake message accepted (Firecracker's is a few hundred
/// bytes per region).
pub const MAX_MESSAGE: usize = 1 << 20;

/// How long Firecracker may take to send the message once connected.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Why a handshake was refused.
#[derive(Debug, thiserror::Error)]
pub enum HandshakeError {
    /// Reading the socket failed.
    #[error("reading the handshake")]
    Io(#[from] std::io::Error),
    /// The VMM sent an incomplete message and then nothing for this long.
    #[error(
        "the VMM sent {0} bytes of an incomplete handshake, then nothing for {HANDSHAKE_TIMEOUT:?}"
    )]
    Timeout(usize),
    /// Receiving the message and its descriptor failed.
    #[error("receiving the handshake")]
    Recv(#[from] nix::Error),
    /// The peer closed the socket before a complete message arrived.
    #[error("the VMM closed the socket after {0} bytes, before a complete handshake")]
    Closed(usize),
    /// No file descriptor came with the message.
    #[error("no userfaultfd came with the handshake (SCM_RIGHTS)")]
    NoUffd,
    /// More than one file descriptor came with the message.
    #[error("{0} file descriptors came with the handshake, expected one userfaultfd")]
    TooManyFds(usize),
    /// The message is longer than [`MAX_MESSAGE`].
    #[error("handshake longer than {MAX_MESSAGE} bytes")]
    TooLarge,
    /// The message is not the JSON Firecracker sends.
    #[error("handshake is not a JSON array of guest memory mappings: {0}")]
    Json(#[from] serde_json::Error),
    /// A page size that is neither bytes nor KiB of a known page size.
    #[error("mapping {region}: page size {value} is not a page size in bytes or KiB")]
    PageSize {
        /// Index of the mapping.
        region: usize,
        /// The value sent.
        value: u64,
    },
}

/// One mapping as Firecracker sends it.
#[derive(Debug, Deserialize)]
struct Mapping {
    base_host_virt_addr: u64,
    size: u64,
    offset: u64,
    /// Since Firecracker 1.12: the page size in bytes.
    #[serde(default)]
    page_size: Option<u64>,
    /// Older releases: the page size (deprecated and, despite its name,
    /// in bytes since 1.12; KiB values are accepted too).
    #[serde(default)]
    page_size_kib: Option<u64>,
}

/// What the handshake delivered.
#[derive(Debug)]
pub struct Handshake {
    /// Guest memory regions; `guest_base` is the region's offset in the
    /// snapshot memory file (the protocol carries no guest addresses).
    pub regions: Vec<GuestRegion>,
    /// The VMM's userfaultfd, registered over every region.
    pub uffd: OwnedFd,
    /// The VMM's process id, from the socket's peer credentials.
    pub pid: Option<u32>,
}

/// Reads a page size sent in bytes or in KiB: a value below 4096 cannot be
/// bytes (no page is smaller), so it is KiB.
fn page_size(region: usize, value: u64) -> Result<usize, HandshakeError> {
    let bytes = if value < 4096 {
        value.checked_mul(1024)
    } else {
        Some(value)
    };
    match bytes {
        Some(b) if b >= 4096 && b.is_power_of_two() && b <= 1 << 30 => Ok(b as usize),
        _ => Err(HandshakeError::PageSize { region, value }),
    }
}

/// Parses the JSON message into guest regions. A mapping without any page
/// size (Firecracker before 1.7) has 4 KiB pages; `page_size` wins over
/// `page_size_kib` when both are sent.
pub fn parse_mappings(json: &[u8]) -> Result<Vec<GuestRegion>, HandshakeError> {
    let maps: Vec<Mapping> = serde_json::from_slice(json)?;
    maps.iter()
        .enumerate()
        .map(|(i, m)| {
            let ps = match m.page_size.or(m.page_size_kib) {
                Some(v) => page_size(i, v)?,
                None => 4096,
            };
            Ok(GuestRegion {
                guest_base: m.offset,
                host_addr: m.base_host_virt_addr,
                size: m.size,
                page_size: ps,
            })
        })
        .collect()
}

/// Receives the handshake on a freshly accepted connection: the message
/// with exactly one descriptor, then (if the message was split) the rest
/// of the JSON.
pub fn receive(stream: &UnixStream) -> Result<Handshake, HandshakeError> {
    stream.set_read_timeout(Some(HANDSHAKE_TIMEOUT))?;
    let pid = getsockopt(&stream.as_fd(), sockopt::PeerCredentials)
        .ok()
        .and_then(|c| u32::try_from(c.pid()).ok());
    let mut buf = vec![0u8; 64 * 1024];
    let mut cmsg = nix::cmsg_space!([RawFd; 4]);
    let (n, fds) = {
        let mut iov = [IoSliceMut::new(&mut buf)];
        let msg = recvmsg::<()>(
            stream.as_raw_fd(),
            &mut iov,
            Some(&mut cmsg),
            MsgFlags::MSG_CMSG_CLOEXEC,
        )?;
        let mut fds = Vec::new();
        for c in msg.cmsgs()? {
            if let ControlMessageOwned::ScmRights(v) = c {
                fds.extend(v);
            }
        }
        (msg.bytes, fds)
    };
    // Own every descriptor at once so that none leaks on an error below.
    let mut owned: Vec<OwnedFd> = fds
        .into_iter()
        // SAFETY: the kernel just installed these descriptors in this
        // process for this message; nothing else owns them.
        .map(|fd| unsafe { OwnedFd::from_raw_fd(fd) })
        .collect();
    buf.truncate(n);
    if n == 0 {
        return Err(HandshakeError::Closed(0));
    }
    let uffd = match owned.len() {
        0 => return Err(HandshakeError::NoUffd),
        1 => owned.remove(0),
        k => return Err(HandshakeError::TooManyFds(k)),
    };
    // The JSON normally arrives whole; a stream socket may split it. The
    // whole handshake has one deadline, however the bytes trickle.
    let until = std::time::Instant::now() + HANDSHAKE_TIMEOUT;
    let regions = loop {
        match parse_mappings(&buf) {
            Ok(r) => break r,
            Err(HandshakeError::Json(e)) if e.is_eof() => {
                if buf.len() >= MAX_MESSAGE {
                    return Err(HandshakeError::TooLarge);
                }
                let left = until.saturating_duration_since(std::time::Instant::now());
                if left.is_zero() {
                    return Err(HandshakeError::Timeout(buf.len()));
                }
                stream.set_read_timeout(Some(left))?;
                let mut more = [0u8; 4096];
                let k = match (&*stream).read(&mut more) {
                    Ok(k) => k,
                    Err(e)
                        if matches!(
                            e.kind(),
                            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                        ) =>
                    {
                        return Err(HandshakeError::Timeout(buf.len()))
                    }
                    Err(e) => return Err(e.into()),
                };
                if k == 0 {
                    return Err(HandshakeError::Closed(buf.len()));
                }
                buf.extend_from_slice(&more[..k]);
            }
            Err(e) => return Err(e),
        }
    };
    stream.set_read_timeout(None)?;
    Ok(Handshake { regions, uffd, pid })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fields_of_later_releases_are_ignored() {
        let r = parse_mappings(br#"[{"base_host_virt_addr":4096,"size":4096,"offset":0,"page_size":4096,"new_field":[1]}]"#);
        assert_eq!(r.unwrap().len(), 1);
    }

    #[test]
    fn every_release_s_page_size_fields_are_read() {
        // Firecracker >= 1.12: both fields, in bytes.
        let r = parse_mappings(
            br#"[{"base_host_virt_addr":140000000000000,"size":8388608,"offset":0,"page_size":2097152,"page_size_kib":2097152}]"#,
        )
        .unwrap();
        assert_eq!(r[0].page_size, 2 << 20);
        assert_eq!(r[0].guest_base, 0);
        // Older: page_size_kib only (bytes or KiB).
        let r = parse_mappings(
            br#"[{"base_host_virt_addr":4096,"size":4096,"offset":8192,"page_size_kib":4096},
                 {"base_host_virt_addr":65536,"size":4096,"offset":12288,"page_size_kib":4}]"#,
        )
        .unwrap();
        assert_eq!((r[0].page_size, r[1].page_size), (4096, 4096));
        assert_eq!((r[0].guest_base, r[1].guest_base), (8192, 12288));
        // Oldest: no page size at all.
        let r =
            parse_mappings(br#"[{"base_host_virt_addr":4096,"size":4096,"offset":0}]"#).unwrap();
        assert_eq!(r[0].page_size, 4096);
    }

    #[test]
    fn malformed_messages_are_refused_with_typed_errors() {
        for bad in [
            &br#"{"base_host_virt_addr":1}"#[..],
            br#"[{"base_host_virt_addr":-1,"size":4096,"offset":0}]"#,
            br#"[{"base_host_virt_addr":4096,"size":4096}]"#,
            br#"[{"base_host_virt_addr":4096,"size":4096,"offset":0,"page_size":18446744073709551616}]"#,
            b"not json",
        ] {
            assert!(matches!(parse_mappings(bad), Err(HandshakeError::Json(_))), "{:?}", std::str::from_utf8(bad));
        }
        for v in [3u64, 5000, 0, 1 << 40] {
            let m = format!(
                r#"[{{"base_host_virt_addr":4096,"size":4096,"offset":0,"page_size":{v}}}]"#
            );
            assert!(
                matches!(
                    parse_mappings(m.as_bytes()),
                    Err(HandshakeError::PageSize { region: 0, .. })
                ),
                "{v}"
            );
        }
    }
}
