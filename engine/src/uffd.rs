//! A thin, safe wrapper over userfaultfd for installing pages into
//! [`DestMemory`]. Every `unsafe` call of the engine lives here.

use std::os::fd::{AsRawFd, FromRawFd, IntoRawFd, OwnedFd, RawFd};
use std::sync::{Arc, OnceLock};

use nix::fcntl::{fcntl, FcntlArg, OFlag};
use pagewire_transport::{PageRange, PAGE_SIZE};
pub use userfaultfd::EventBuffer;
use userfaultfd::{Event, FeatureFlags, RegisterMode, Uffd, UffdBuilder};

use crate::error::{EngineError, RegionError};
use crate::memory::DestMemory;

fn uffd_err(context: &str) -> impl FnOnce(userfaultfd::Error) -> EngineError + '_ {
    move |error| EngineError::Uffd {
        context: context.to_string(),
        error,
    }
}

/// Waits a moment for another thread to read the pending events.
fn yield_busy() -> Result<(), EngineError> {
    std::thread::sleep(std::time::Duration::from_micros(20));
    Ok(())
}

/// What an install did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Installed {
    /// Pages this call mapped.
    pub pages: u64,
    /// Pages that were already mapped (EEXIST) and were left as they were.
    pub already_present: u64,
}

/// What the userfaultfd reported.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UffdEvent {
    /// A thread touched a missing page at this host address.
    Fault(usize),
    /// The owner dropped `[start, end)` (`madvise(MADV_DONTNEED)` or
    /// `MADV_REMOVE`, a balloon inflating): those pages now read as zeros.
    Remove {
        /// First byte.
        start: usize,
        /// One past the last byte.
        end: usize,
    },
}

/// A callback for when the owner of the memory is changing its mappings
/// (an event is pending and installs return EAGAIN): it must get the
/// pending events read, then the install is retried.
pub type OnBusy<'a> = &'a mut dyn FnMut() -> Result<(), EngineError>;

/// A userfaultfd bound to one [`DestMemory`]: registers its regions in
/// MISSING mode and installs pages into them.
#[derive(Debug)]
pub struct PageInstaller {
    uffd: Uffd,
    mem: Arc<DestMemory>,
    /// One zeroed huge page, for zero pages of hugetlbfs memory.
    zeros: OnceLock<Vec<u8>>,
    /// Shared memory registered for minor faults too (pagewire's own
    /// uffd): pages may be landed in the file and mapped with
    /// `UFFDIO_CONTINUE`. A VMM's uffd has missing faults only: pages are
    /// copied in, and a page already in the file is the guest's.
    minor: bool,
}

/// `UFFD_FEATURE_MINOR_SHMEM` (Linux 5.14): minor faults on shared memory,
/// resolved with `UFFDIO_CONTINUE`.
const FEATURE_MINOR_SHMEM: u64 = 1 << 10;

fn builder(user_mode_only: bool, shared: bool) -> UffdBuilder {
    let mut features = FeatureFlags::EVENT_REMOVE;
    if shared {
        features |= FeatureFlags::from_bits_retain(FEATURE_MINOR_SHMEM);
    }
    let mut b = UffdBuilder::new();
    b.close_on_exec(true)
        .non_blocking(true)
        .user_mode_only(user_mode_only)
        .require_features(features);
    b
}

impl PageInstaller {
    /// Opens a userfaultfd and registers every region of `mem` for missing
    /// faults, for memory touched from user space (the CLI's workloads).
    /// Kernel-mode faults are asked for first; where the process may not
    /// see them it falls back to user-mode-only faults, and logs so. A VMM
    /// whose guest runs under KVM uses [`Self::create_for_kvm`] instead.
    pub fn register(mem: Arc<DestMemory>) -> Result<Self, EngineError> {
        let shared = mem.is_shared();
        let uffd = match builder(false, shared).create() {
            Ok(u) => u,
            Err(e) => {
                tracing::info!("kernel-mode userfaultfd refused ({e:?}): user-mode faults only");
                builder(true, shared).create().map_err(uffd_err("create"))?
            }
        };
        Self::register_regions(uffd, mem)
    }

    /// Opens a userfaultfd that also receives faults raised in kernel
    /// context (a KVM vCPU or vhost touching guest memory), and registers
    /// every region of `mem`. Fails with
    /// [`crate::RegionError::KernelFaultsRefused`] rather than fall back to
    /// user-mode-only faults, under which KVM's accesses fail with EFAULT.
    pub fn create_for_kvm(mem: Arc<DestMemory>) -> Result<Self, EngineError> {
        let uffd = builder(false, mem.is_shared())
            .create()
            .map_err(|e| RegionError::KernelFaultsRefused(format!("{e:?}")))?;
        Self::register_regions(uffd, mem)
    }

    fn register_regions(uffd: Uffd, mem: Arc<DestMemory>) -> Result<Self, EngineError> {
        if !mem.is_local() {
            return Err(EngineError::Memory(
                "memory of another process can only be reached through its own userfaultfd".into(),
            ));
        }
        // Shared memory: a page in the file but not yet mapped here faults
        // as MINOR (it was landed there, then is mapped with
        // UFFDIO_CONTINUE); one not in the file yet as MISSING (UFFDIO_COPY
        // fills both at once).
        let shared_minor = mem.is_shared();
        let mode = if shared_minor {
            RegisterMode::MISSING | RegisterMode::MINOR
        } else {
            RegisterMode::MISSING
        };
        for (start, len) in mem.host_ranges() {
            uffd.register_with_mode(start as *mut libc::c_void, len, mode)
                .map_err(uffd_err("register guest region"))?;
        }
        Ok(Self {
            uffd,
            mem,
            zeros: OnceLock::new(),
            minor: shared_minor,
        })
    }

    /// Uses a userfaultfd the VMM created and registered over every region
    /// of `mem` itself (MISSING mode). It is made non-blocking; its
    /// registration is checked against the owner's mappings where they can
    /// be read. Shared memory is then filled with `UFFDIO_COPY` only: it
    /// has no minor faults, so pages are never landed
    /// ([`crate::SharedInstall::Land`] is refused).
    pub fn with_uffd(mem: Arc<DestMemory>, fd: OwnedFd) -> Result<Self, EngineError> {
        let link = std::fs::read_link(format!("/proc/self/fd/{}", fd.as_raw_fd()))
            .map_err(|e| RegionError::BadUffd(format!("cannot inspect fd: {e}")))?;
        if link.to_string_lossy() != "anon_inode:[userfaultfd]" {
            return Err(RegionError::BadUffd(format!(
                "fd is {}, not a userfaultfd",
                link.display()
            ))
            .into());
        }
        let flags = fcntl(fd.as_raw_fd(), FcntlArg::F_GETFL)
            .map_err(|e| RegionError::BadUffd(format!("F_GETFL: {e}")))?;
        let mut flags = OFlag::from_bits_retain(flags);
        if !flags.contains(OFlag::O_NONBLOCK) {
            flags.insert(OFlag::O_NONBLOCK);
            fcntl(fd.as_raw_fd(), FcntlArg::F_SETFL(flags))
                .map_err(|e| RegionError::BadUffd(format!("F_SETFL O_NONBLOCK: {e}")))?;
        }
        match (mem.is_local(), mem.owner_pid()) {
            (true, _) => crate::vma::check_mapped(None, &mem.regions(), true)?,
            (false, Some(pid)) => crate::vma::check_mapped(Some(pid), &mem.regions(), true)?,
            (false, None) => {
                tracing::warn!("owner of guest memory unknown: registration not checked")
            }
        }
        // SAFETY: `fd` is an open userfaultfd (checked above) whose
        // ownership moves into the `Uffd`, which closes it on drop.
        let uffd = unsafe { Uffd::from_raw_fd(fd.into_raw_fd()) };
        Ok(Self {
            uffd,
            mem,
            zeros: OnceLock::new(),
            minor: false,
        })
    }

    /// The memory pages are installed into.
    pub fn memory(&self) -> &Arc<DestMemory> {
        &self.mem
    }

    /// Whether shared memory is registered for minor faults too, so that
    /// pages may be landed in its file and mapped with `UFFDIO_CONTINUE`.
    pub fn lands(&self) -> bool {
        self.minor
    }

    /// Host address and byte length of `range`, checked against the memory.
    fn span(&self, range: PageRange) -> Result<(usize, usize), EngineError> {
        Ok(self.mem.host_span(range)?)
    }

    /// Copies `data` into the pages of `range` with UFFDIO_COPY. Pages that
    /// are already mapped (EEXIST) are skipped and counted, never
    /// overwritten. The caller must hold the pages (claimed, not
    /// installed). In shared memory UFFDIO_COPY puts each page into the
    /// file and maps it; a page already in the file (not mapped) gets the
    /// bytes written into the file and is mapped with UFFDIO_CONTINUE, or,
    /// through a VMM's uffd without minor faults (where such a page is
    /// mapped from the file on the next touch), is counted as there.
    /// With `wake`, threads
    /// blocked on these pages resume.
    /// While the owner changes its mappings it yields and retries; use
    /// [`Self::install_with`] on the thread that reads the events.
    pub fn install(
        &self,
        range: PageRange,
        data: &[u8],
        wake: bool,
    ) -> Result<Installed, EngineError> {
        self.install_with(range, data, wake, &mut yield_busy)
    }

    /// [`Self::install`], calling `busy` when the kernel answers EAGAIN
    /// (an event such as a REMOVE is pending and must be read first).
    pub fn install_with(
        &self,
        range: PageRange,
        data: &[u8],
        wake: bool,
        busy: OnBusy<'_>,
    ) -> Result<Installed, EngineError> {
        self.install_with_progress(range, data, wake, busy, &mut 0)
    }

    /// [`Self::install_with`], keeping in `mapped` how many pages from the
    /// start of `range` are mapped in the guest so far, also when it
    /// fails: a caller that retries must never write those again.
    pub(crate) fn install_with_progress(
        &self,
        range: PageRange,
        data: &[u8],
        wake: bool,
        busy: OnBusy<'_>,
        mapped: &mut u64,
    ) -> Result<Installed, EngineError> {
        *mapped = 0;
        let (addr, len) = self.span(range)?;
        if data.len() != len {
            return Err(EngineError::Memory(format!(
                "{} bytes of data for {len} bytes of pages",
                data.len()
            )));
        }
        // Shared memory too: UFFDIO_COPY puts a missing page into the file
        // and maps it in one step (a region registered for minor faults is
        // registered for missing ones as well).
        let ps = self.mem.layout().page_size();
        let mut done = Installed::default();
        let mut off = 0;
        while off < len {
            // SAFETY: `addr + off .. addr + len` lies inside a region of
            // `self.mem` (checked by `span`), which is registered with this
            // uffd and stays mapped in its owner process while `self`
            // holds the Arc (parked on failure); `data[off..]` is a live
            // slice of exactly `len - off` bytes in this process.
            // UFFDIO_COPY only fills pages that are not mapped yet.
            let r = unsafe {
                self.uffd.copy(
                    data[off..].as_ptr().cast(),
                    (addr + off) as *mut libc::c_void,
                    len - off,
                    wake,
                )
            };
            match r {
                Ok(n) if n > 0 && n <= len - off => {
                    done.pages += (n / ps) as u64;
                    off += n;
                    *mapped = (off / ps) as u64;
                }
                // EAGAIN: a partial copy, or (a negative count read as a
                // huge one) none because the mappings are changing.
                Err(userfaultfd::Error::PartiallyCopied(n)) if n > 0 && n <= len - off => {
                    done.pages += (n / ps) as u64;
                    off += n;
                    *mapped = (off / ps) as u64;
                }
                Err(userfaultfd::Error::PartiallyCopied(_)) => busy()?,
                Ok(_) => {
                    return Err(EngineError::Memory(format!(
                        "UFFDIO_COPY made no progress at {:#x}",
                        addr + off
                    )));
                }
                Err(userfaultfd::Error::CopyFailed(errno))
                    if errno as i32 == libc::EEXIST
                        && self.minor
                        && !self.mem.is_mapped(range.first + (off / ps) as u64)? =>
                {
                    // In the file already but not mapped in the guest (a
                    // page landed there before a link loss): its bytes go
                    // into the file (the caller holds the page), then it is
                    // mapped. A page the guest has mapped is never written
                    // (the arm below counts it).
                    let one = PageRange::new(range.first + (off / ps) as u64, 1);
                    self.mem.write_alias(one, &data[off..off + ps])?;
                    let d = self.install_landed_with(one, wake, busy)?;
                    done.pages += d.pages;
                    done.already_present += d.already_present;
                    off += ps;
                    *mapped = (off / ps) as u64;
                }
                Err(userfaultfd::Error::CopyFailed(errno)) if errno as i32 == libc::EEXIST => {
                    done.already_present += 1;
                    self.wake_span(addr + off, ps)?;
                    off += ps;
                    *mapped = (off / ps) as u64;
                }
                Err(userfaultfd::Error::CopyFailed(errno)) if errno as i32 == libc::EAGAIN => {
                    busy()?
                }
                Err(e) => return Err(uffd_err("UFFDIO_COPY")(e)),
            }
        }
        Ok(done)
    }

    /// Maps the pages of `range` as zero pages with UFFDIO_ZEROPAGE, no
    /// data needed. Already-mapped pages are skipped and counted. The
    /// caller must hold the pages (claimed, not installed); in shared
    /// memory ZEROPAGE puts zeroed pages in the file (see
    /// `install_zero_shared` for pages already there).
    pub fn install_zero(&self, range: PageRange, wake: bool) -> Result<Installed, EngineError> {
        self.install_zero_with(range, wake, &mut yield_busy)
    }

    /// [`Self::install_zero`], calling `busy` on EAGAIN like
    /// [`Self::install_with`]. Huge pages (hugetlbfs has no
    /// UFFDIO_ZEROPAGE) are copied from a zeroed buffer instead.
    pub fn install_zero_with(
        &self,
        range: PageRange,
        wake: bool,
        busy: OnBusy<'_>,
    ) -> Result<Installed, EngineError> {
        let ps = self.mem.layout().page_size();
        if self.mem.is_shared() {
            return self.install_zero_shared(range, wake, busy);
        }
        if ps > PAGE_SIZE {
            let zeros = self.zeros.get_or_init(|| vec![0u8; ps]);
            let mut done = Installed::default();
            for p in range.first..range.end() {
                let d = self.install_with(PageRange::new(p, 1), zeros, wake, busy)?;
                done.pages += d.pages;
                done.already_present += d.already_present;
            }
            return Ok(done);
        }
        self.zeropage_with(range, wake, busy)
    }

    /// Zero pages of shared memory, one page at a time: UFFDIO_ZEROPAGE
    /// puts a zeroed page in the file and maps it; a page the file holds
    /// already (EEXIST: stale bytes of a pre-copied page dropped since, or
    /// pages pinned by an RDMA registration) gets its bytes zeroed through
    /// the second mapping and is mapped with UFFDIO_CONTINUE (through a
    /// VMM's uffd without minor faults it is counted as there). One page
    /// per call, and pages are left once mapped, so an EEXIST means "in
    /// the file, not mapped": the caller holds the pages (callers that
    /// retry start after what was mapped), nothing else maps them.
    fn install_zero_shared(
        &self,
        range: PageRange,
        wake: bool,
        busy: OnBusy<'_>,
    ) -> Result<Installed, EngineError> {
        let mut done = Installed::default();
        let mut p = range.first;
        while p < range.end() {
            let one = PageRange::new(p, 1);
            let (addr, len) = self.span(one)?;
            // SAFETY: one page inside a region of `self.mem` registered
            // with this uffd (checked by `span`); ZEROPAGE only fills a
            // page that is neither mapped nor in the file.
            let r = unsafe { self.uffd.zeropage(addr as *mut libc::c_void, len, wake) };
            match r {
                Ok(n) if n == len => {
                    done.pages += 1;
                    p += 1;
                }
                Err(userfaultfd::Error::ZeropageFailed(e))
                    if e as i32 == libc::EEXIST && !self.minor =>
                {
                    // Without minor faults a page in the file is mapped
                    // from it on the next touch: it is the guest's.
                    done.already_present += 1;
                    self.wake_span(addr, len)?;
                    p += 1;
                }
                Err(userfaultfd::Error::ZeropageFailed(e)) if e as i32 == libc::EEXIST => {
                    self.mem.zero_alias(one)?;
                    let d = self.install_landed_with(one, wake, busy)?;
                    done.pages += d.pages;
                    done.already_present += d.already_present;
                    p += 1;
                }
                Err(userfaultfd::Error::ZeropageFailed(e)) if e as i32 == libc::EAGAIN => busy()?,
                Ok(_) => {
                    return Err(EngineError::Memory(format!(
                        "UFFDIO_ZEROPAGE made no progress at {addr:#x}"
                    )))
                }
                Err(e) => return Err(uffd_err("UFFDIO_ZEROPAGE")(e)),
            }
        }
        Ok(done)
    }

    /// UFFDIO_ZEROPAGE over the pages of `range` (4 KiB pages).
    fn zeropage_with(
        &self,
        range: PageRange,
        wake: bool,
        busy: OnBusy<'_>,
    ) -> Result<Installed, EngineError> {
        let (addr, len) = self.span(range)?;
        let ps = self.mem.layout().page_size();
        let mut done = Installed::default();
        let mut off = 0;
        while off < len {
            // SAFETY: as in `install_with`: the span is inside registered
            // memory described by `self.mem`; ZEROPAGE only fills unmapped
            // pages.
            let r = unsafe {
                self.uffd
                    .zeropage((addr + off) as *mut libc::c_void, len - off, wake)
            };
            match r {
                Ok(n) if n > 0 && n <= len - off => {
                    done.pages += (n / ps) as u64;
                    off += n;
                }
                Err(userfaultfd::Error::ZeropageFailed(errno)) if errno as i32 == libc::EAGAIN => {
                    busy()?
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
                        Ok(_) => {
                            done.pages += 1;
                            off += ps;
                        }
                        Err(userfaultfd::Error::ZeropageFailed(e)) if e as i32 == libc::EEXIST => {
                            done.already_present += 1;
                            self.wake_span(addr + off, ps)?;
                            off += ps;
                        }
                        Err(userfaultfd::Error::ZeropageFailed(e)) if e as i32 == libc::EAGAIN => {
                            busy()?
                        }
                        Err(e) => return Err(uffd_err("UFFDIO_ZEROPAGE")(e)),
                    }
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

    /// Maps pages `range` of shared memory whose bytes are already in the
    /// file (written through the second mapping) into the guest with
    /// UFFDIO_CONTINUE. Pages already mapped (EEXIST) are skipped and
    /// counted. A page missing from the file (the owner punched it out
    /// meanwhile) or a change of mappings (EAGAIN) calls `busy`, which
    /// must read the pending events (and may give up), then retries.
    pub fn install_landed_with(
        &self,
        range: PageRange,
        wake: bool,
        busy: OnBusy<'_>,
    ) -> Result<Installed, EngineError> {
        self.install_landed_progress(range, wake, busy, &mut 0)
    }

    /// [`Self::install_landed_with`], keeping in `mapped` how many pages
    /// from the start of `range` are mapped in the guest so far, also when
    /// it fails (see [`Self::install_with_progress`]).
    pub(crate) fn install_landed_progress(
        &self,
        range: PageRange,
        wake: bool,
        busy: OnBusy<'_>,
        mapped: &mut u64,
    ) -> Result<Installed, EngineError> {
        *mapped = 0;
        let (addr, len) = self.span(range)?;
        let ps = self.mem.layout().page_size();
        let mut done = Installed::default();
        let mut off = 0;
        let mut gone = 0u32;
        while off < len {
            // CONTINUE only maps pages already in the file into the span
            // (inside a region registered for minor faults: `span`).
            let r = self
                .uffd
                .r#continue((addr + off) as *mut libc::c_void, len - off, wake);
            match r {
                Ok(n) if n > 0 && n as usize <= len - off => {
                    done.pages += n / ps as u64;
                    off += n as usize;
                    *mapped = (off / ps) as u64;
                }
                Ok(_) => {
                    return Err(EngineError::Memory(format!(
                        "UFFDIO_CONTINUE made no progress at {:#x}",
                        addr + off
                    )))
                }
                Err(userfaultfd::Error::SystemError(e)) if e as i32 == libc::EEXIST => {
                    // The caller holds these pages: none should be mapped
                    // yet. Its bytes were written before this was seen.
                    tracing::warn!(
                        addr = addr + off,
                        "UFFDIO_CONTINUE: a page being installed was mapped already"
                    );
                    done.already_present += 1;
                    self.wake_span(addr + off, ps)?;
                    off += ps;
                    *mapped = (off / ps) as u64;
                }
                Err(userfaultfd::Error::SystemError(e)) if e as i32 == libc::EAGAIN => busy()?,
                Err(userfaultfd::Error::SystemError(e)) if e as i32 == libc::EFAULT => {
                    // Not in the file: removed by the owner since it was
                    // written. Its REMOVE event is pending; past a bound it
                    // is something else.
                    gone += 1;
                    if gone > 1000 {
                        return Err(EngineError::Memory(format!(
                            "UFFDIO_CONTINUE: page at {:#x} is not in the memory file",
                            addr + off
                        )));
                    }
                    busy()?
                }
                Err(e) => return Err(uffd_err("UFFDIO_CONTINUE")(e)),
            }
        }
        Ok(done)
    }

    /// Maps pages `range`, which the state map has as present, for a
    /// thread that faulted on them: installed since the fault (then they
    /// are mapped and it is only woken), or dropped by the owner
    /// afterwards. Dropped private memory reads as zeros; dropped shared
    /// memory maps what its file holds (zeros where it was punched out).
    pub fn map_present_with(
        &self,
        range: PageRange,
        busy: OnBusy<'_>,
    ) -> Result<Installed, EngineError> {
        if !self.mem.is_shared() || !self.minor {
            // Private memory, or shared memory without minor faults (a
            // missing fault there means the page left the file): zeros.
            return self.install_zero_with(range, true, busy);
        }
        let (addr, len) = self.span(range)?;
        loop {
            let r = self.uffd.r#continue(addr as *mut libc::c_void, len, true);
            return match r {
                Ok(n) => Ok(Installed {
                    pages: n / self.mem.layout().page_size() as u64,
                    already_present: 0,
                }),
                Err(userfaultfd::Error::SystemError(e)) if e as i32 == libc::EEXIST => {
                    self.wake(range)?;
                    Ok(Installed {
                        pages: 0,
                        already_present: u64::from(range.count),
                    })
                }
                // The owner is changing its mappings: let it, then retry.
                Err(userfaultfd::Error::SystemError(e)) if e as i32 == libc::EAGAIN => {
                    busy()?;
                    continue;
                }
                // Not in the file: punched out, reads as zeros (the kernel
                // allocates a zeroed page).
                Err(userfaultfd::Error::SystemError(e)) if e as i32 == libc::EFAULT => {
                    self.zeropage_with(range, true, busy)
                }
                Err(e) => Err(uffd_err("UFFDIO_CONTINUE")(e)),
            };
        }
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
        Ok(self.wait_with(None, None, timeout_ms)?.0)
    }

    /// Waits up to `timeout_ms` (0: just look) for fault events, for
    /// `other` to become readable, or for `done` to become readable (which
    /// only ends the wait: the caller looks at why itself); returns
    /// (faults ready, other ready).
    pub fn wait_with(
        &self,
        other: Option<RawFd>,
        done: Option<RawFd>,
        timeout_ms: i32,
    ) -> Result<(bool, bool), EngineError> {
        let pollfd = |fd: Option<RawFd>| libc::pollfd {
            // poll ignores a negative fd.
            fd: fd.unwrap_or(-1),
            events: libc::POLLIN,
            revents: 0,
        };
        let mut pfds = [
            pollfd(Some(self.uffd.as_raw_fd())),
            pollfd(other),
            pollfd(done),
        ];
        // SAFETY: `pfds` holds `pfds.len()` valid pollfds for the duration
        // of the call (a negative fd is ignored by poll).
        let n = unsafe { libc::poll(pfds.as_mut_ptr(), pfds.len() as libc::nfds_t, timeout_ms) };
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

    /// Reads pending events (non-blocking) into `out`: faults and
    /// removals. Other events are ignored.
    pub fn read_events(
        &self,
        buf: &mut EventBuffer,
        out: &mut Vec<UffdEvent>,
    ) -> Result<(), EngineError> {
        out.clear();
        let events = match self.uffd.read_events(buf) {
            Ok(ev) => ev,
            Err(userfaultfd::Error::SystemError(e)) if e as i32 == libc::EAGAIN => return Ok(()),
            Err(e) => return Err(uffd_err("read events")(e)),
        };
        for ev in events {
            match ev.map_err(uffd_err("decode event"))? {
                Event::Pagefault { addr, .. } => out.push(UffdEvent::Fault(addr as usize)),
                Event::Remove { start, end } => out.push(UffdEvent::Remove {
                    start: start as usize,
                    end: end as usize,
                }),
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
