//! The guest on real KVM: it computes the reference results, and a pause
//! then restore in a second VM (memory copied over) computes them too.

use memmap2::MmapMut;
use pagewire_minivm::boot::write_boot;
use pagewire_minivm::guest::reference_result;
use pagewire_minivm::{GuestConfig, MiniVm, RunControl, VcpuState};

fn kvm_available() -> bool {
    match pagewire_minivm::kvm_unavailable() {
        Some(why) => {
            eprintln!("SKIPPED: {why}");
            false
        }
        None => true,
    }
}

const CFG: GuestConfig = GuestConfig {
    memory: 34 << 20,
    vcpus: 2,
    passes: 3,
};

fn reference() -> Vec<u64> {
    let share = CFG.share_len().unwrap();
    (0..CFG.vcpus)
        .map(|i| reference_result(i, share, CFG.passes))
        .collect()
}

/// Guest memory holding the boot image, and a VM booted over it. The VM
/// must be dropped before the memory.
fn booted() -> (MmapMut, MiniVm) {
    let mut mem = MmapMut::map_anon(CFG.memory as usize).unwrap();
    write_boot(&mut mem, &CFG).unwrap();
    // SAFETY: callers drop the VM before the memory.
    let mut vm = unsafe { MiniVm::new(mem.as_ptr() as u64, CFG) }.unwrap();
    vm.boot().unwrap();
    (mem, vm)
}

#[test]
fn the_guest_computes_the_reference_results() {
    if !kvm_available() {
        return;
    }
    let (_mem, mut vm) = booted();
    let out = vm.run(&RunControl::new(CFG.vcpus)).unwrap();
    assert_eq!(out.results().unwrap(), reference());
}

#[test]
fn a_paused_guest_resumes_in_another_vm_with_its_memory_and_state() {
    if !kvm_available() {
        return;
    }
    let (mem, mut vm) = booted();
    let ctl = RunControl {
        pause_after_pass: Some(1),
        ..RunControl::new(CFG.vcpus)
    };
    let out = vm.run(&ctl).unwrap();
    let states = out.states().expect("paused before finishing");
    assert!(states.iter().all(|s| s.filled && s.passes_done == 1));
    // The state crosses as JSON, as it would cross hosts.
    let wire = serde_json::to_vec(&states).unwrap();
    let states: Vec<VcpuState> = serde_json::from_slice(&wire).unwrap();
    drop(vm);
    let mut copy = MmapMut::map_anon(CFG.memory as usize).unwrap();
    copy.copy_from_slice(&mem);
    drop(mem);
    // SAFETY: `copy` outlives the VM.
    let mut vm2 = unsafe { MiniVm::new(copy.as_ptr() as u64, CFG) }.unwrap();
    vm2.restore(&states).unwrap();
    let out = vm2.run(&RunControl::new(CFG.vcpus)).unwrap();
    assert_eq!(out.results().unwrap(), reference());
}
