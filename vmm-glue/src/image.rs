//! Source guest memory images: a file, or a generated synthetic guest.

use std::fs::File;
use std::path::Path;
use std::sync::Arc;

use memmap2::{MmapMut, MmapOptions};
use pagewire_transport::source::RegionBytes;
use pagewire_transport::{MemoryLayout, SourceMemory, PAGE_SIZE};

/// Why an image cannot be served.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    /// The file could not be opened or mapped.
    #[error("memory image {path}: {error}")]
    Io {
        /// The file.
        path: String,
        /// Why.
        error: std::io::Error,
    },
    /// The size is not a positive multiple of the page size.
    #[error("memory size {0} bytes is not a positive multiple of 4096")]
    Size(u64),
    /// The layout was rejected.
    #[error(transparent)]
    Layout(#[from] pagewire_transport::LayoutError),
}

/// Maps a raw memory image file (guest-physical address 0 = file offset 0),
/// privately: the source never writes it back.
pub fn from_file(path: &Path) -> Result<SourceMemory, ImageError> {
    let io = |error| ImageError::Io {
        path: path.display().to_string(),
        error,
    };
    let file = File::open(path).map_err(io)?;
    let len = file.metadata().map_err(io)?.len();
    if len == 0 || !len.is_multiple_of(PAGE_SIZE as u64) {
        return Err(ImageError::Size(len));
    }
    // SAFETY: a private copy-on-write mapping; the source only reads it.
    // Another process truncating the file while it is served would fault
    // (SIGBUS): serving a memory image that is being changed is a misuse
    // the caller is warned of in the CLI help.
    let map = unsafe { MmapOptions::new().map_copy(&file) }.map_err(io)?;
    let region: RegionBytes = Arc::new(map);
    Ok(SourceMemory::new(MemoryLayout::single(len)?, vec![region])?)
}

/// Share of a synthetic guest's pages that are all zero, in percent, unless
/// told otherwise.
pub const DEFAULT_ZERO_PERCENT: u8 = 25;

/// A deterministic synthetic guest of `size` bytes: each page is either all
/// zero (about `zero_percent` % of them) or filled with a pattern derived
/// from `seed` and the page number.
pub fn synthetic(size: u64, seed: u64, zero_percent: u8) -> Result<SourceMemory, ImageError> {
    let map = synthetic_map(size, seed, zero_percent)?
        .make_read_only()
        .map_err(anon_err)?;
    let region: RegionBytes = Arc::new(map);
    Ok(SourceMemory::new(
        MemoryLayout::single(size)?,
        vec![region],
    )?)
}

/// The bytes of [`synthetic`], writable: for a guest that still runs at
/// the source (pre-copy).
pub fn synthetic_map(size: u64, seed: u64, zero_percent: u8) -> Result<MmapMut, ImageError> {
    if size == 0 || !size.is_multiple_of(PAGE_SIZE as u64) {
        return Err(ImageError::Size(size));
    }
    let mut map = MmapOptions::new()
        .len(size as usize)
        .map_anon()
        .map_err(anon_err)?;
    for (i, page) in map.chunks_exact_mut(PAGE_SIZE).enumerate() {
        let mut x = splitmix(seed ^ (i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15));
        if x % 100 < u64::from(zero_percent) {
            continue; // anonymous memory is already zero
        }
        for w in page.chunks_exact_mut(8) {
            x = splitmix(x);
            w.copy_from_slice(&x.to_le_bytes());
        }
    }
    Ok(map)
}

fn anon_err(error: std::io::Error) -> ImageError {
    ImageError::Io {
        path: "<anonymous memory>".into(),
        error,
    }
}

fn splitmix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;
    use pagewire_transport::PageRange;

    #[test]
    fn synthetic_images_are_deterministic_with_a_share_of_zero_pages() {
        let a = synthetic(1 << 20, 7, 30).unwrap();
        let b = synthetic(1 << 20, 7, 30).unwrap();
        let c = synthetic(1 << 20, 8, 30).unwrap();
        let all = PageRange::new(0, 256);
        assert_eq!(a.checksums(all).unwrap(), b.checksums(all).unwrap());
        assert_ne!(a.checksums(all).unwrap(), c.checksums(all).unwrap());
        let zeros = a.info().zero.count();
        assert!((40..120).contains(&zeros), "{zeros} zero pages of 256");
        assert!(synthetic(1000, 1, 0).is_err());
    }

    #[test]
    fn files_must_be_page_multiples() {
        let dir = std::env::temp_dir().join(format!("pw-img-{}", std::process::id()));
        std::fs::write(&dir, vec![1u8; 5000]).unwrap();
        assert!(matches!(from_file(&dir), Err(ImageError::Size(5000))));
        std::fs::write(&dir, vec![1u8; 8192]).unwrap();
        assert_eq!(from_file(&dir).unwrap().info().layout.total_pages(), 2);
        std::fs::remove_file(&dir).unwrap();
        assert!(matches!(from_file(&dir), Err(ImageError::Io { .. })));
    }
}
