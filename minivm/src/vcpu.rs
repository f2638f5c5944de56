//! A vCPU's saved state, and the loop that runs it until it halts or is
//! paused.

use std::sync::atomic::Ordering;

use kvm_bindings::{kvm_fpu, kvm_regs, kvm_sregs};
use kvm_ioctls::{VcpuExit, VcpuFd};
use serde::{Deserialize, Serialize};

use crate::error::{kvm, VmError};
use crate::guest::{PORT_HEARTBEAT, PORT_PROGRESS, PORT_RESULT_HI, PORT_RESULT_LO};
use crate::vm::RunControl;

/// Everything a paused vCPU needs to resume elsewhere: registers, special
/// registers, FPU/SSE state, and what it reported so far.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VcpuState {
    /// General registers.
    pub regs: kvm_regs,
    /// Segment, control and descriptor-table registers, EFER.
    pub sregs: kvm_sregs,
    /// x87/SSE state.
    #[serde(with = "fpu_bytes")]
    pub fpu: kvm_fpu,
    /// Passes reported done (0: still filling or fill done, see
    /// `filled`).
    pub passes_done: u32,
    /// Whether the fill was reported done.
    pub filled: bool,
    /// The result, when the vCPU already finished.
    pub result: Option<u64>,
}

/// `kvm_fpu` has no serde support: it travels as its raw bytes (plain
/// integers and arrays, any bytes are a valid value).
mod fpu_bytes {
    use kvm_bindings::kvm_fpu;
    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    const LEN: usize = std::mem::size_of::<kvm_fpu>();

    pub fn serialize<S: Serializer>(fpu: &kvm_fpu, s: S) -> Result<S::Ok, S::Error> {
        // SAFETY: `fpu` is a live, initialised plain-data struct of `LEN`
        // bytes without padding-dependent invariants; the slice borrows it.
        let bytes =
            unsafe { std::slice::from_raw_parts((fpu as *const kvm_fpu).cast::<u8>(), LEN) };
        bytes.serialize(s)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<kvm_fpu, D::Error> {
        let bytes = Vec::<u8>::deserialize(d)?;
        if bytes.len() != LEN {
            return Err(serde::de::Error::invalid_length(
                bytes.len(),
                &"the size of kvm_fpu",
            ));
        }
        // SAFETY: `bytes` holds exactly `LEN` bytes and every bit pattern
        // is a valid kvm_fpu (integers and arrays of integers).
        Ok(unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast::<kvm_fpu>()) })
    }
}

/// How a vCPU's run ended.
#[derive(Debug, Clone)]
pub enum VcpuOutcome {
    /// It reported its result and halted.
    Finished(u64),
    /// It was paused; this state resumes it.
    Paused(Box<VcpuState>),
}

fn u32_of(data: &[u8]) -> u32 {
    let mut b = [0u8; 4];
    let n = data.len().min(4);
    b[..n].copy_from_slice(&data[..n]);
    u32::from_le_bytes(b)
}

/// Saves the state of a vCPU stopped at an exit, after letting KVM
/// complete the I/O it exited for (so the saved RIP is past it).
fn save(vcpu: &mut VcpuFd, passes_done: u32, filled: bool) -> Result<VcpuState, VmError> {
    vcpu.set_kvm_immediate_exit(1);
    match vcpu.run() {
        Err(e) if e.errno() == libc::EINTR => {}
        Err(e) => return Err(kvm("KVM_RUN (complete I/O)")(e)),
        Ok(exit) => {
            return Err(VmError::UnexpectedExit {
                vcpu: usize::MAX,
                exit: format!("{exit:?} while pausing"),
            })
        }
    }
    vcpu.set_kvm_immediate_exit(0);
    Ok(VcpuState {
        regs: vcpu.get_regs().map_err(kvm("KVM_GET_REGS"))?,
        sregs: vcpu.get_sregs().map_err(kvm("KVM_GET_SREGS"))?,
        fpu: vcpu.get_fpu().map_err(kvm("KVM_GET_FPU"))?,
        passes_done,
        filled,
        result: None,
    })
}

/// Runs vCPU `i` until it reports its result, or until a pause is
/// asked for (checked at every port exit, at least every MiB of work).
pub(crate) fn run(
    i: usize,
    vcpu: &mut VcpuFd,
    ctl: &RunControl,
    mut passes_done: u32,
    mut filled: bool,
) -> Result<VcpuOutcome, VmError> {
    let mut lo: Option<u32> = None;
    loop {
        let exit = vcpu.run().map_err(kvm("KVM_RUN"))?;
        let port_progress;
        match exit {
            VcpuExit::IoOut(port, data) => {
                port_progress = port == PORT_PROGRESS;
                let v = u32_of(data);
                match port {
                    PORT_PROGRESS => {
                        if filled {
                            passes_done = v;
                        }
                        filled = true;
                        ctl.report(i, filled, passes_done);
                    }
                    PORT_HEARTBEAT => {
                        ctl.heartbeats.fetch_add(1, Ordering::Relaxed);
                    }
                    PORT_RESULT_LO => lo = Some(v),
                    PORT_RESULT_HI => {
                        let r = u64::from(v) << 32 | u64::from(lo.unwrap_or(0));
                        return Ok(VcpuOutcome::Finished(r));
                    }
                    other => {
                        return Err(VmError::UnexpectedExit {
                            vcpu: i,
                            exit: format!("out to port {other:#x}"),
                        })
                    }
                }
            }
            other => {
                return Err(VmError::UnexpectedExit {
                    vcpu: i,
                    exit: format!("{other:?}"),
                })
            }
        }
        let at_pass =
            filled && ctl.pause_after_pass.is_some_and(|n| passes_done >= n) && port_progress;
        if (ctl.pause.load(Ordering::SeqCst) || at_pass) && lo.is_none() {
            let state = save(vcpu, passes_done, filled)?;
            return Ok(VcpuOutcome::Paused(Box::new(state)));
        }
    }
}
