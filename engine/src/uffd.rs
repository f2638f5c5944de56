//! A thin, safe wrapper over userfaultfd for installing pages into
//! [`DestMemory`]. Every `unsafe` call of the engine lives here.

use std::os::fd::{AsRawFd, RawFd};
use std::sync::Arc;

use pagewire_transport::PageRange;
pub use userfaultfd::EventBuffer;
use userfaultfd::{Event, Uffd, UffdBuilder};

use crate::error::EngineError;
use crate::memory::DestMemory;

fn uffd_err(context: &str) -> impl FnOnce(userfaultfd::Error) -> EngineError + '_ {
    move |error| EngineError::Uffd {
        context: context.to_string(),
        error,
    }
}

/// What an install did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Installed {
    /// Pages this call mapped.
    pub pages: u64,
    /// Pages that were already mapped (EEXIST) and were left as they were.
    pub already_present: u64,
}

/// A userfaultfd bound to one [`DestMemory`]: registers its regions in
/// MISSING mode and installs pages into them.
#[derive(Debug)]
pub struct PageInstaller {
    uffd: Uffd,
    mem: Arc<DestMemory>,
}

impl PageInstaller {
    /// Opens a userfaultfd and registers every region of `mem` for missing
    /// faults. Faults from the kernel (a KVM vCPU touching guest memory) are
    /// asked for first and the installer falls back to user-mode-only faults
    /// where the process may not see kernel ones.
    pub fn register(mem: Arc<DestMemory>) -> Result<Self, EngineError> {
        let build = |user_only| {
            UffdBuilder::new()
                .close_on_exec(true)
                .non_blocking(true)
                .user_mode_only(user_only)
                .create()
        };
        let uffd = build(false)
            .or_else(|_| build(true))
            .map_err(uffd_err("create"))?;
        for (start, len) in mem.host_ranges() {
            uffd.register(start as *mut libc::c_void, len)
                .map_err(uffd_err("register guest region"))?;
        }
        Ok(Self { uffd, mem })
    }

    /// The memory pages are installed into.
    pub fn memory(&self) -> &Arc<DestMemory> {
        &self.mem
    }

    /// Host address and byte length of `range`, checked against the memory.
    fn span(&self, range: PageRange) -> Result<(usize, usize), EngineError> {
        Ok(self.mem.host_span(range)?)
    }

    /// Copies `data` into the pages of `range` with UFFDIO_COPY. Pages that
    /// are already mapped (EEXIST) are skipped and counted, never
    /// overwritten. With `wake`, threads blocked on these pages resume.
    pub fn install(
        &self,
        range: PageRange,
        data: &[u8],
        wake: bool,
    ) -> Result<Installed, EngineError> {
        let (addr, len) = self.span(range)?;
        if data.len() != len {
            return Err(EngineError::Memory(format!(
                "{} bytes of data for {len} bytes of pages",
                data.len()
            )));
        }
        let ps = self.mem.layout().page_size();
        let mut done = Installed::default();
        let mut off = 0;
        while off < len {
            // SAFETY: `addr + off .. addr + len` lies inside a region of
            // `self.mem` (checked by `span`), which is registered with this
            // uffd and stays mapped while `self` holds the Arc; `data[off..]`
            // is a live slice of exactly `len - off` bytes. UFFDIO_COPY only
            // fills pages that are not mapped yet.
            let r = unsafe {
                self.uffd.copy(
                    data[off..].as_ptr().cast(),
                    (addr + off) as *mut libc::c_void,
                    len - off,
                    wake,
                )
            };
            match r {
                Ok(n) if n > 0 => {
                    done.pages += (n / ps) as u64;
                    off += n;
                }
                Err(userfaultfd::Error::PartiallyCopied(n)) if n > 0 => {
                    done.pages += (n / ps) as u64;
                    off += n;
                }
                Ok(_) | Err(userfaultfd::Error::PartiallyCopied(_)) => {
                    // Nothing copied: the next page is in the way.
                    return Err(EngineError::Memory(format!(
                        "UFFDIO_COPY made no progress at {:#x}",
                        addr + off
                    )));
                }
                Err(userfaultfd::Error::CopyFailed(errno)) if errno as i32 == libc::EEXIST => {
                    done.already_present += 1;
                    self.wake_span(addr + off, ps)?;
                    off += ps;
                }
                Err(e) => return Err(uffd_err("UFFDIO_COPY")(e)),
            }
        }
        Ok(done)
    }

    /// Maps the pages of `range` as zero pages with UFFDIO_ZEROPAGE, no
    /// data needed. Already-mapped pages are skipped and counted.
    pub fn install_zero(&self, range: PageRange, wake: bool) -> Result<Installed, EngineError> {
        let (addr, len) = self.span(range)?;
        let ps = self.mem.layout().page_size();
        let mut done = Installed::default();
        let mut off = 0;
        while off < len {
            // SAFETY: as in `install`: the span is inside registered memory
            // owned by `self.mem`; ZEROPAGE only fills unmapped pages.
            let r = unsafe {
                self.uffd
                    .zeropage((addr + off) as *mut libc::c_void, len - off, wake)
            };
            match r {
                Ok(n) if n > 0 => {
                    done.pages += (n / ps) as u64;
                    off += n;
                }
                Err(userfaultfd::Error::ZeropageFailed(errno)) if errno as i32 == libc::EEXIST => {
                    // The kernel stops at the first mapped page; retry page by
                    // page from here so the others are still installed.
                    // SAFETY: one page inside the same registered span.
                    let one = unsafe {
                        self.uffd
                            .zeropage((addr + off) as *mut libc::c_void, ps, wake)
                    };
                    match one {
                        Ok(_) => done.pages += 1,
                        Err(userfaultfd::Error::ZeropageFailed(e)) if e as i32 == libc::EEXIST => {
                            done.already_present += 1;
                            self.wake_span(addr + off, ps)?;
                        }
                        Err(e) => return Err(uffd_err("UFFDIO_ZEROPAGE")(e)),
                    }
                    off += ps;
                }
                Ok(_) => {
                    return Err(EngineError::Memory(format!(
                        "UFFDIO_ZEROPAGE made no progress at {:#x}",
                        addr + off
                    )))
                }
                Err(e) => return Err(uffd_err("UFFDIO_ZEROPAGE")(e)),
            }
        }
        Ok(done)
    }

    fn wake_span(&self, addr: usize, len: usize) -> Result<(), EngineError> {
        self.uffd
            .wake(addr as *mut libc::c_void, len)
            .map_err(uffd_err("UFFDIO_WAKE"))
    }

    /// Wakes threads blocked on the pages of `range`.
    pub fn wake(&self, range: PageRange) -> Result<(), EngineError> {
        let (addr, len) = self.span(range)?;
        self.wake_span(addr, len)
    }

    /// Waits up to `timeout_ms` for fault events; returns whether any are
    /// ready to read.
    pub fn wait_readable(&self, timeout_ms: i32) -> Result<bool, EngineError> {
        Ok(self.wait_with(None, timeout_ms)?.0)
    }

    /// Waits up to `timeout_ms` (0: just look) for fault events or for
    /// `other` to become readable; returns (faults ready, other ready).
    pub fn wait_with(
        &self,
        other: Option<RawFd>,
        timeout_ms: i32,
    ) -> Result<(bool, bool), EngineError> {
        let mut pfds = [
            libc::pollfd {
                fd: self.uffd.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: other.unwrap_or(-1),
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        let count = if other.is_some() { 2 } else { 1 };
        // SAFETY: `pfds` holds `count` valid pollfds for the duration of
        // the call (a negative fd is ignored by poll).
        let n = unsafe { libc::poll(pfds.as_mut_ptr(), count, timeout_ms) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                return Ok((false, false));
            }
            return Err(EngineError::Memory(format!("poll on userfaultfd: {e}")));
        }
        let ready =
            |p: &libc::pollfd| p.revents & (libc::POLLIN | libc::POLLERR | libc::POLLHUP) != 0;
        Ok((
            n > 0 && pfds[0].revents & libc::POLLIN != 0,
            n > 0 && other.is_some() && ready(&pfds[1]),
        ))
    }

    /// Reads pending fault events (non-blocking) and returns the faulting
    /// host addresses. Other events are ignored.
    pub fn read_faults(
        &self,
        buf: &mut EventBuffer,
        out: &mut Vec<usize>,
    ) -> Result<(), EngineError> {
        out.clear();
        let events = match self.uffd.read_events(buf) {
            Ok(ev) => ev,
            Err(userfaultfd::Error::SystemError(e)) if e as i32 == libc::EAGAIN => return Ok(()),
            Err(e) => return Err(uffd_err("read events")(e)),
        };
        for ev in events {
            match ev.map_err(uffd_err("decode event"))? {
                Event::Pagefault { addr, .. } => out.push(addr as usize),
                other => tracing::debug!(?other, "ignoring userfaultfd event"),
            }
        }
        Ok(())
    }

    /// Unregisters every region; later touches are ordinary memory accesses.
    pub fn unregister(&self) -> Result<(), EngineError> {
        for (start, len) in self.mem.host_ranges() {
            self.uffd
                .unregister(start as *mut libc::c_void, len)
                .map_err(uffd_err("unregister"))?;
        }
        Ok(())
    }
}
