//! The VM: one memory slot over the caller's guest memory, its vCPUs, and
//! running them to the end or to a pause.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::time::Instant;

use kvm_bindings::{kvm_userspace_memory_region, KVM_MAX_CPUID_ENTRIES};
use kvm_ioctls::{Kvm, VcpuFd, VmFd};

use crate::boot;
use crate::error::{kvm, VmError};
use crate::guest::GuestConfig;
use crate::vcpu::{self, VcpuOutcome, VcpuState};

/// Why this host cannot run the guest, if it cannot: `/dev/kvm` missing or
/// not readable and writable by this process.
pub fn kvm_unavailable() -> Option<String> {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .err()
        .map(|e| format!("/dev/kvm: {e}"))
}

/// Shared between the vCPU threads and whoever watches them.
#[derive(Debug)]
pub struct RunControl {
    /// Set to pause every vCPU at its next exit.
    pub pause: AtomicBool,
    /// Per vCPU: 0 while filling, then 1 + passes done.
    pub progress: Vec<AtomicU32>,
    /// MiB of work done, all vCPUs together.
    pub heartbeats: AtomicU64,
    /// Cores to pin vCPU `i` to (`pin[i % len]`), if any.
    pub pin: Vec<usize>,
    /// Pause each vCPU as soon as it reports this many passes done.
    pub pause_after_pass: Option<u32>,
}

impl RunControl {
    /// Control for `vcpus` vCPUs.
    pub fn new(vcpus: usize) -> Self {
        Self {
            pause: AtomicBool::new(false),
            progress: (0..vcpus).map(|_| AtomicU32::new(0)).collect(),
            heartbeats: AtomicU64::new(0),
            pin: Vec::new(),
            pause_after_pass: None,
        }
    }

    pub(crate) fn report(&self, i: usize, filled: bool, passes: u32) {
        if let Some(p) = self.progress.get(i) {
            p.store(u32::from(filled) + passes, Ordering::SeqCst);
        }
    }

    /// Whether every vCPU reported at least `passes` passes done.
    pub fn all_passed(&self, passes: u32) -> bool {
        self.progress
            .iter()
            .all(|p| p.load(Ordering::SeqCst) > passes)
    }
}

/// How a run ended.
#[derive(Debug)]
pub struct RunOutcome {
    /// Per vCPU.
    pub vcpus: Vec<VcpuOutcome>,
    /// When the last vCPU stopped (paused or halted).
    pub stopped_at: Instant,
}

impl RunOutcome {
    /// Results of every vCPU, when all finished.
    pub fn results(&self) -> Option<Vec<u64>> {
        self.vcpus
            .iter()
            .map(|v| match v {
                VcpuOutcome::Finished(r) => Some(*r),
                VcpuOutcome::Paused(s) => s.result,
            })
            .collect()
    }

    /// Saved states of every vCPU (finished ones carry their result).
    pub fn states(&self) -> Option<Vec<VcpuState>> {
        self.vcpus
            .iter()
            .map(|v| match v {
                VcpuOutcome::Paused(s) => Some((**s).clone()),
                VcpuOutcome::Finished(_) => None,
            })
            .collect()
    }
}

/// A VM over guest memory the caller owns.
pub struct MiniVm {
    _kvm: Kvm,
    _vm: VmFd,
    vcpus: Vec<VcpuFd>,
    cfg: GuestConfig,
    /// Where each vCPU starts: (passes done, filled, finished result).
    start: Vec<(u32, bool, Option<u64>)>,
}

impl std::fmt::Debug for MiniVm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MiniVm").field("cfg", &self.cfg).finish()
    }
}

impl MiniVm {
    /// Creates the VM with guest memory at guest address 0 backed by
    /// `host_addr`, and its vCPUs (with the host's supported CPUID).
    ///
    /// # Safety
    /// `host_addr .. host_addr + cfg.memory` must be a mapping of this
    /// process, readable and writable, that outlives the VM.
    pub unsafe fn new(host_addr: u64, cfg: GuestConfig) -> Result<Self, VmError> {
        cfg.share_len()?;
        let kvm_fd = Kvm::new().map_err(kvm("open /dev/kvm"))?;
        let vm = kvm_fd.create_vm().map_err(kvm("KVM_CREATE_VM"))?;
        let region = kvm_userspace_memory_region {
            slot: 0,
            guest_phys_addr: 0,
            memory_size: cfg.memory,
            userspace_addr: host_addr,
            flags: 0,
        };
        // SAFETY: the caller guarantees the mapping is valid for the VM's
        // life; KVM only accesses it while the VM runs.
        unsafe { vm.set_user_memory_region(region) }.map_err(kvm("KVM_SET_USER_MEMORY_REGION"))?;
        let cpuid = kvm_fd
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(kvm("KVM_GET_SUPPORTED_CPUID"))?;
        let vcpus = (0..cfg.vcpus)
            .map(|i| {
                let v = vm.create_vcpu(i as u64).map_err(kvm("KVM_CREATE_VCPU"))?;
                v.set_cpuid2(&cpuid).map_err(kvm("KVM_SET_CPUID2"))?;
                Ok(v)
            })
            .collect::<Result<Vec<_>, VmError>>()?;
        Ok(Self {
            _kvm: kvm_fd,
            _vm: vm,
            vcpus,
            start: vec![(0, false, None); cfg.vcpus],
            cfg,
        })
    }

    /// Puts every vCPU at the program's entry, in long mode (guest memory
    /// must hold what [`boot::write_boot`] writes).
    pub fn boot(&mut self) -> Result<(), VmError> {
        for (i, v) in self.vcpus.iter().enumerate() {
            let s = v.get_sregs().map_err(kvm("KVM_GET_SREGS"))?;
            v.set_sregs(&boot::long_mode_sregs(s))
                .map_err(kvm("KVM_SET_SREGS"))?;
            v.set_regs(&boot::entry_regs(i, &self.cfg)?)
                .map_err(kvm("KVM_SET_REGS"))?;
        }
        Ok(())
    }

    /// Restores every vCPU from states saved at a pause (possibly in
    /// another VM, on another host).
    pub fn restore(&mut self, states: &[VcpuState]) -> Result<(), VmError> {
        if states.len() != self.vcpus.len() {
            return Err(VmError::Memory(format!(
                "{} vCPU states for {} vCPUs",
                states.len(),
                self.vcpus.len()
            )));
        }
        for (i, (v, s)) in self.vcpus.iter().zip(states).enumerate() {
            v.set_sregs(&s.sregs).map_err(kvm("KVM_SET_SREGS"))?;
            v.set_regs(&s.regs).map_err(kvm("KVM_SET_REGS"))?;
            v.set_fpu(&s.fpu).map_err(kvm("KVM_SET_FPU"))?;
            self.start[i] = (s.passes_done, s.filled, s.result);
        }
        Ok(())
    }

    /// Runs every vCPU on its own thread until all halted or paused.
    pub fn run(&mut self, ctl: &RunControl) -> Result<RunOutcome, VmError> {
        let results: Vec<Result<VcpuOutcome, VmError>> = std::thread::scope(|scope| {
            let handles: Vec<_> = self
                .vcpus
                .iter_mut()
                .zip(self.start.iter().copied())
                .enumerate()
                .map(|(i, (v, (passes, filled, done)))| {
                    let pin = (!ctl.pin.is_empty()).then(|| ctl.pin[i % ctl.pin.len()]);
                    std::thread::Builder::new()
                        .name(format!("vcpu-{i}"))
                        .spawn_scoped(scope, move || {
                            if let Some(core) = pin {
                                core_pin(core);
                            }
                            if let Some(r) = done {
                                return Ok(VcpuOutcome::Finished(r));
                            }
                            ctl.report(i, filled, passes);
                            vcpu::run(i, v, ctl, passes, filled)
                        })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| match h {
                    Ok(h) => h
                        .join()
                        .unwrap_or_else(|_| Err(VmError::Thread("vCPU thread panicked".into()))),
                    Err(e) => Err(VmError::Thread(e.to_string())),
                })
                .collect()
        });
        let stopped_at = Instant::now();
        Ok(RunOutcome {
            vcpus: results.into_iter().collect::<Result<_, _>>()?,
            stopped_at,
        })
    }
}

/// Pins the calling thread to `core`; a core the kernel refuses (past
/// what a CPU set holds, or not the process's) is ignored: callers check
/// cores against the process's CPUs first.
fn core_pin(core: usize) {
    let mut set = nix::sched::CpuSet::new();
    if set.set(core).is_ok() {
        let _ = nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &set);
    }
}
