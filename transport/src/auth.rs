//! Mutual authentication of a destination and a source: a challenge and
//! response with HMAC-SHA256 over both sides' nonces, before the source
//! sends anything about guest memory (layout, zero map, checksums, queue
//! pairs, rkeys).
//!
//! 1. hello (destination): a fresh 32-byte nonce `nd`;
//! 2. challenge (source): its nonce `ns` and
//!    `HMAC(key, "pagewire source" | kind | nd | ns)`, which proves it holds
//!    the key;
//! 3. auth (destination, after checking that): `HMAC(key, "pagewire
//!    destination" | kind | nd | ns)`;
//! 4. welcome (source, after checking that).
//!
//! Fresh nonces on both sides make every proof single-use; the labels
//! keep one side's proof from being replayed as the other's.

use std::path::Path;

use hmac::{Hmac, Mac};
use sha2::Sha256;

/// Bytes of a nonce and of a proof.
pub const PROOF_LEN: usize = 32;

/// Shortest key accepted.
pub const MIN_KEY_LEN: usize = 16;

/// Why a key could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    /// The file could not be read.
    #[error("auth key file {path}: {error}")]
    Io {
        /// The file.
        path: String,
        /// Why.
        error: std::io::Error,
    },
    /// Too short to be a secret.
    #[error("auth key file {path} holds {len} bytes, at least {MIN_KEY_LEN} are needed (e.g. head -c 32 /dev/urandom > FILE)")]
    TooShort {
        /// The file.
        path: String,
        /// Its length.
        len: usize,
    },
}

/// A shared secret both ends hold.
#[derive(Clone)]
pub struct AuthKey(Vec<u8>);

impl std::fmt::Debug for AuthKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AuthKey(..)")
    }
}

/// Which side a proof comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// The page source.
    Source,
    /// The destination.
    Destination,
}

impl AuthKey {
    /// A key from bytes (at least [`MIN_KEY_LEN`]).
    pub fn new(bytes: Vec<u8>) -> Result<Self, KeyError> {
        if bytes.len() < MIN_KEY_LEN {
            return Err(KeyError::TooShort {
                path: "(bytes)".into(),
                len: bytes.len(),
            });
        }
        Ok(Self(bytes))
    }

    /// Reads a key file: its bytes are the key (trailing newlines
    /// dropped, so `echo` and editors work).
    pub fn from_file(path: &Path) -> Result<Self, KeyError> {
        let mut bytes = std::fs::read(path).map_err(|error| KeyError::Io {
            path: path.display().to_string(),
            error,
        })?;
        while bytes.last().is_some_and(|b| *b == b'\n' || *b == b'\r') {
            bytes.pop();
        }
        let len = bytes.len();
        Self::new(bytes).map_err(|_| KeyError::TooShort {
            path: path.display().to_string(),
            len,
        })
    }

    fn mac(
        &self,
        side: Side,
        kind: u8,
        nd: &[u8; PROOF_LEN],
        ns: &[u8; PROOF_LEN],
    ) -> Hmac<Sha256> {
        // HMAC takes keys of any length.
        let mut m =
            <Hmac<Sha256> as Mac>::new_from_slice(&self.0).unwrap_or_else(|_| unreachable!());
        m.update(match side {
            Side::Source => b"pagewire source",
            Side::Destination => b"pagewire destination",
        });
        m.update(&[kind]);
        m.update(nd);
        m.update(ns);
        m
    }

    /// The proof `side` sends for a connection of `kind` with these
    /// nonces.
    pub fn proof(
        &self,
        side: Side,
        kind: u8,
        nd: &[u8; PROOF_LEN],
        ns: &[u8; PROOF_LEN],
    ) -> [u8; PROOF_LEN] {
        self.mac(side, kind, nd, ns).finalize().into_bytes().into()
    }

    /// Whether `proof` is `side`'s, in constant time.
    pub fn verify(
        &self,
        side: Side,
        kind: u8,
        nd: &[u8; PROOF_LEN],
        ns: &[u8; PROOF_LEN],
        proof: &[u8; PROOF_LEN],
    ) -> bool {
        self.mac(side, kind, nd, ns).verify_slice(proof).is_ok()
    }
}

/// A fresh random nonce from the kernel. Fails rather than hand out a
/// predictable one.
pub fn nonce() -> std::io::Result<[u8; PROOF_LEN]> {
    let mut n = [0u8; PROOF_LEN];
    let mut got = 0;
    while got < PROOF_LEN {
        // SAFETY: `n[got..]` is a writable buffer of `PROOF_LEN - got`
        // bytes.
        let r = unsafe { libc::getrandom(n[got..].as_mut_ptr().cast(), PROOF_LEN - got, 0) };
        if r < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        got += r as usize;
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proofs_verify_only_with_the_same_key_side_kind_and_nonces() {
        let k = AuthKey::new(b"0123456789abcdef".to_vec()).unwrap();
        let other = AuthKey::new(b"0123456789abcdeX".to_vec()).unwrap();
        let (nd, ns) = (nonce().unwrap(), nonce().unwrap());
        assert_ne!(nd, ns);
        let p = k.proof(Side::Source, 0, &nd, &ns);
        assert!(k.verify(Side::Source, 0, &nd, &ns, &p));
        assert!(!other.verify(Side::Source, 0, &nd, &ns, &p));
        assert!(
            !k.verify(Side::Destination, 0, &nd, &ns, &p),
            "a source proof replayed as a destination's"
        );
        assert!(!k.verify(Side::Source, 1, &nd, &ns, &p));
        assert!(!k.verify(Side::Source, 0, &ns, &nd, &p));
        assert!(AuthKey::new(b"short".to_vec()).is_err());
    }
}
