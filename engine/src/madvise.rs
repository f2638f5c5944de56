//! Dropping many ranges of this process's memory in few system calls
//! (`process_madvise`), for the switch-over of a hybrid migration, where
//! the guest is paused while stale pre-copied pages are dropped.

use std::os::fd::{AsRawFd, FromRawFd};

/// `MADV_DONTNEED` over many ranges of this process, up to 1024 per
/// `process_madvise` call (Linux 5.10; DONTNEED accepted since 6.x).
/// Any error (the kernel refuses, a batch cut short) is for the caller to
/// fall back on single calls.
pub(crate) fn dontneed_batched(spans: &[(usize, usize)]) -> std::io::Result<()> {
    const BATCH: usize = 1024;
    if spans.is_empty() {
        return Ok(());
    }
    // SAFETY: pidfd_open takes a pid and flags and returns a new fd or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, libc::getpid(), 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `fd` was just returned by pidfd_open and is owned here only.
    let pidfd = unsafe { std::os::fd::OwnedFd::from_raw_fd(fd as i32) };
    for chunk in spans.chunks(BATCH) {
        let iov: Vec<libc::iovec> = chunk
            .iter()
            .map(|&(addr, len)| libc::iovec {
                iov_base: addr as *mut libc::c_void,
                iov_len: len,
            })
            .collect();
        let want: usize = chunk.iter().map(|&(_, len)| len).sum();
        // SAFETY: `iov` holds `iov.len()` valid iovecs for the call; each
        // range is memory of this process the caller may drop (the
        // contract of `DestMemory::discard_unregistered`).
        let n = unsafe {
            libc::syscall(
                libc::SYS_process_madvise,
                pidfd.as_raw_fd(),
                iov.as_ptr(),
                iov.len(),
                libc::MADV_DONTNEED,
                0u32,
            )
        };
        if n < 0 {
            return Err(std::io::Error::last_os_error());
        }
        if n as usize != want {
            return Err(std::io::Error::other(format!(
                "process_madvise dropped {n} of {want} bytes"
            )));
        }
    }
    Ok(())
}
