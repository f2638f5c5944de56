//! The guest program, its memory map and the result it must compute.

use iced_x86::code_asm::*;

use crate::error::VmError;

/// Guest-physical address of the GDT.
pub const GDT_ADDR: u64 = 0x1000;
/// Guest-physical address of the PML4; PDPT and page directories follow.
pub const PML4_ADDR: u64 = 0x2000;
/// Guest-physical address of the program.
pub const CODE_ADDR: u64 = 0x8000;
/// Top of vCPU 0's stack; vCPU `i`'s is `i` pages higher.
pub const STACK_TOP: u64 = 0x1_0000;
/// Where the vCPUs' data shares start.
pub const DATA_START: u64 = 2 << 20;
/// Most vCPUs (stacks must stay below [`DATA_START`]).
pub const MAX_VCPUS: usize = 64;
/// Identity-mapped guest-physical memory (4 page directories of 2 MiB
/// pages).
pub const MAX_MEMORY: u64 = 4 << 30;

/// Port: a pass finished (`eax` = passes done; 0 = fill done).
pub const PORT_PROGRESS: u16 = 0x10;
/// Port: another MiB of the share was processed.
pub const PORT_HEARTBEAT: u16 = 0x11;
/// Port: low 32 bits of the result.
pub const PORT_RESULT_LO: u16 = 0x20;
/// Port: high 32 bits of the result (the vCPU is done).
pub const PORT_RESULT_HI: u16 = 0x21;

/// What the guest computes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GuestConfig {
    /// Guest memory in bytes.
    pub memory: u64,
    /// vCPUs, each with its own share of the data.
    pub vcpus: usize,
    /// Checksum passes over each share after filling it.
    pub passes: u32,
}

impl GuestConfig {
    /// Checks the configuration and returns each vCPU's share length (a
    /// whole number of MiB).
    pub fn share_len(&self) -> Result<u64, VmError> {
        if self.vcpus == 0 || self.vcpus > MAX_VCPUS {
            return Err(VmError::Memory(format!(
                "1 to {MAX_VCPUS} vCPUs, not {}",
                self.vcpus
            )));
        }
        if self.memory > MAX_MEMORY || self.memory < DATA_START + (1 << 20) * self.vcpus as u64 {
            return Err(VmError::Memory(format!(
                "{} bytes: need at least 2 MiB + 1 MiB per vCPU and at most {MAX_MEMORY}",
                self.memory
            )));
        }
        Ok(((self.memory - DATA_START) / self.vcpus as u64) & !((1 << 20) - 1))
    }

    /// Guest-physical address of vCPU `i`'s share.
    pub fn share_base(&self, i: usize) -> Result<u64, VmError> {
        Ok(DATA_START + i as u64 * self.share_len()?)
    }
}

/// Seed of vCPU `i`'s pseudo-random fill.
pub fn seed(i: usize) -> u64 {
    (i as u64 + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15)
}

/// Assembles the program. On entry: `rdi` = vCPU index, `rsi` = share
/// base, `rdx` = share length in bytes, `rcx` = passes.
pub fn program() -> Result<Vec<u8>, VmError> {
    let e = |e: IcedError| VmError::Assemble(e.to_string());
    let mut a = CodeAssembler::new(64).map_err(e)?;
    let mut fill = a.create_label();
    let mut fill_next = a.create_label();
    let mut pass = a.create_label();
    let mut word = a.create_label();
    let mut word_next = a.create_label();
    let mut halt = a.create_label();
    (|| -> Result<(), IcedError> {
        a.mov(r9, rsi)?;
        a.add(r9, rdx)?; // end of the share
        a.mov(rax, rdi)?;
        a.add(rax, 1)?;
        a.mov(rbx, 0x9e37_79b9_7f4a_7c15u64)?;
        a.imul_2(rax, rbx)?; // xorshift state = seed(i)
        a.mov(r8, rsi)?;
        // Fill: one xorshift64 step per word.
        a.set_label(&mut fill)?;
        a.mov(rbx, rax)?;
        a.shl(rbx, 13)?;
        a.xor(rax, rbx)?;
        a.mov(rbx, rax)?;
        a.shr(rbx, 7)?;
        a.xor(rax, rbx)?;
        a.mov(rbx, rax)?;
        a.shl(rbx, 17)?;
        a.xor(rax, rbx)?;
        a.mov(qword_ptr(r8), rax)?;
        a.add(r8, 8)?;
        a.test(r8d, 0xf_ffff)?;
        a.jnz(fill_next)?;
        a.mov(r12, rax)?;
        a.mov(dx, PORT_HEARTBEAT as u32)?;
        a.out(dx, eax)?;
        a.mov(rax, r12)?;
        a.set_label(&mut fill_next)?;
        a.cmp(r8, r9)?;
        a.jb(fill)?;
        a.xor(eax, eax)?;
        a.mov(dx, PORT_PROGRESS as u32)?;
        a.out(dx, eax)?;
        // Passes: acc = rotl(acc, 5) ^ word + pass; word = acc.
        a.xor(r10, r10)?;
        a.xor(r11, r11)?;
        a.set_label(&mut pass)?;
        a.cmp(r10, rcx)?;
        a.jae(halt)?;
        a.mov(r8, rsi)?;
        a.set_label(&mut word)?;
        a.mov(rax, qword_ptr(r8))?;
        a.rol(r11, 5)?;
        a.xor(r11, rax)?;
        a.add(r11, r10)?;
        a.mov(qword_ptr(r8), r11)?;
        a.add(r8, 8)?;
        a.test(r8d, 0xf_ffff)?;
        a.jnz(word_next)?;
        a.mov(dx, PORT_HEARTBEAT as u32)?;
        a.out(dx, eax)?;
        a.set_label(&mut word_next)?;
        a.cmp(r8, r9)?;
        a.jb(word)?;
        a.inc(r10)?;
        a.mov(eax, r10d)?;
        a.mov(dx, PORT_PROGRESS as u32)?;
        a.out(dx, eax)?;
        a.jmp(pass)?;
        // Result, then spin for good (ring 3 cannot halt; the VMM stops
        // the vCPU at the result).
        a.set_label(&mut halt)?;
        a.mov(rax, r11)?;
        a.mov(dx, PORT_RESULT_LO as u32)?;
        a.out(dx, eax)?;
        a.shr(rax, 32)?;
        a.mov(dx, PORT_RESULT_HI as u32)?;
        a.out(dx, eax)?;
        let mut again = a.create_label();
        a.set_label(&mut again)?;
        a.pause()?;
        a.jmp(again)?;
        Ok(())
    })()
    .map_err(e)?;
    a.assemble(CODE_ADDR).map_err(e)
}

/// What vCPU `i` must report, computed on the host (a run whose result
/// differs lost or corrupted memory).
pub fn reference_result(i: usize, share_len: u64, passes: u32) -> u64 {
    let words = (share_len / 8) as usize;
    let mut data = vec![0u64; words];
    let mut x = seed(i);
    for w in data.iter_mut() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        *w = x;
    }
    let mut acc = 0u64;
    for pass in 0..u64::from(passes) {
        for w in data.iter_mut() {
            acc = (acc.rotate_left(5) ^ *w).wrapping_add(pass);
            *w = acc;
        }
    }
    acc
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_program_assembles_and_shares_are_whole_mib() {
        assert!(program().unwrap().len() > 64);
        let c = GuestConfig {
            memory: 256 << 20,
            vcpus: 3,
            passes: 2,
        };
        let s = c.share_len().unwrap();
        assert_eq!(s % (1 << 20), 0);
        assert!(c.share_base(2).unwrap() + s <= c.memory);
        assert!(GuestConfig { vcpus: 0, ..c }.share_len().is_err());
        assert!(GuestConfig {
            memory: 1 << 20,
            ..c
        }
        .share_len()
        .is_err());
    }
}
