//! Framing: every message is a `u32` little-endian length, a type byte
//! and a payload. Building frames, reading them off a stream, writing
//! several buffers as one, and the [`Decoder`] every payload is read with.

use std::io::{self, Read, Write};

use super::MAX_FRAME;
use crate::error::TransportError;

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
pub(super) fn frame(ty: u8) -> Vec<u8> {
    let mut v = Vec::with_capacity(64);
    v.extend_from_slice(&[0, 0, 0, 0, ty]);
    v
}

/// Writes the frame length into a frame built with [`frame`]; `extra` is
/// the length of data that will follow the returned bytes on the wire.
pub(super) fn seal(mut v: Vec<u8>, extra: usize) -> Vec<u8> {
    let len = (v.len() - 4 + extra) as u32;
    v[..4].copy_from_slice(&len.to_le_bytes());
    v
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

/// Splits a whole frame into its type byte and its body (for tests).
#[cfg(test)]
pub(super) fn body(frame: &[u8]) -> (u8, &[u8]) {
    (frame[4], &frame[5..])
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::{encode_request, Request, T_FETCH};

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
