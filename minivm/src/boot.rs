//! What the guest starts with: GDT, identity-mapped page tables, the
//! program, and vCPU state already in 64-bit long mode.

use kvm_bindings::{kvm_regs, kvm_segment, kvm_sregs};

use crate::error::VmError;
use crate::guest::{self, GuestConfig, CODE_ADDR, GDT_ADDR, PML4_ADDR, STACK_TOP};

/// Flat descriptors after the null one. The guest runs in ring 3: this
/// host runs KVM guests under PVM, which executes guest user mode natively
/// but emulates a guest kernel that is not PVM-aware instruction by
/// instruction (measured: ~1 µs per instruction).
const GDT: [u64; 6] = [
    0,
    0x00af_9b00_0000_ffff, // 0x08: kernel code, long mode
    0x00cf_9300_0000_ffff, // 0x10: kernel data
    0x008f_8b00_0000_ffff, // 0x18: TSS (busy), low half
    0x00cf_f300_0000_ffff, // 0x20: user data
    0x00af_fb00_0000_ffff, // 0x28: user code, long mode
];

const CR0_PE: u64 = 1;
const CR0_ET: u64 = 1 << 4;
const CR0_NE: u64 = 1 << 5;
const CR0_PG: u64 = 1 << 31;
const CR4_PAE: u64 = 1 << 5;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;

fn put(mem: &mut [u8], addr: u64, bytes: &[u8]) -> Result<(), VmError> {
    let at = addr as usize;
    mem.get_mut(at..at + bytes.len())
        .ok_or_else(|| {
            VmError::Memory(format!(
                "{:#x}+{} is outside guest memory",
                addr,
                bytes.len()
            ))
        })?
        .copy_from_slice(bytes);
    Ok(())
}

/// Writes the GDT, page tables identity-mapping 4 GiB with 2 MiB pages,
/// and the program into guest memory (which starts at guest address 0).
pub fn write_boot(mem: &mut [u8], cfg: &GuestConfig) -> Result<(), VmError> {
    cfg.share_len()?;
    for (i, d) in GDT.iter().enumerate() {
        put(mem, GDT_ADDR + 8 * i as u64, &d.to_le_bytes())?;
    }
    let pdpt = PML4_ADDR + 0x1000;
    let pd = pdpt + 0x1000;
    // Present, writable, user.
    put(mem, PML4_ADDR, &(pdpt | 0x7).to_le_bytes())?;
    for g in 0..4u64 {
        put(mem, pdpt + 8 * g, &((pd + g * 0x1000) | 0x7).to_le_bytes())?;
        for j in 0..512u64 {
            let phys = (g << 30) | (j << 21);
            // Present, writable, user, 2 MiB page.
            put(mem, pd + g * 0x1000 + 8 * j, &(phys | 0x87).to_le_bytes())?;
        }
    }
    put(mem, CODE_ADDR, &guest::program()?)
}

fn segment(selector: u16, type_: u8, long: bool, dpl: u8) -> kvm_segment {
    kvm_segment {
        base: 0,
        limit: 0xf_ffff,
        selector,
        type_,
        present: 1,
        dpl,
        db: u8::from(!long),
        s: 1,
        l: u8::from(long),
        g: 1,
        avl: 0,
        unusable: 0,
        padding: 0,
    }
}

/// Special registers for 64-bit long mode with the tables [`write_boot`]
/// wrote, starting from what KVM reported (`base`).
pub fn long_mode_sregs(mut s: kvm_sregs) -> kvm_sregs {
    // Ring 3: user code and data selectors with RPL 3.
    s.cs = segment(0x28 | 3, 0xb, true, 3);
    let data = segment(0x20 | 3, 0x3, false, 3);
    (s.ds, s.es, s.fs, s.gs, s.ss) = (data, data, data, data, data);
    s.tr = kvm_segment {
        s: 0,
        db: 0,
        g: 0,
        limit: 0x67,
        ..segment(0x18, 0xb, false, 0)
    };
    s.gdt.base = GDT_ADDR;
    s.gdt.limit = (GDT.len() * 8 - 1) as u16;
    s.idt.base = 0;
    s.idt.limit = 0;
    s.cr3 = PML4_ADDR;
    s.cr4 |= CR4_PAE;
    // Set whole: KVM's reset value has caching disabled (CD, NW), which
    // makes every memory access of the guest uncached.
    s.cr0 = CR0_PE | CR0_ET | CR0_NE | CR0_PG;
    s.efer |= EFER_LME | EFER_LMA;
    s
}

/// General registers of vCPU `i` at the program's entry.
pub fn entry_regs(i: usize, cfg: &GuestConfig) -> Result<kvm_regs, VmError> {
    Ok(kvm_regs {
        rip: CODE_ADDR,
        rsp: STACK_TOP + (i as u64 + 1) * 0x1000,
        // IOPL 3: port I/O is allowed in ring 3.
        rflags: 0x2 | 0x3000,
        rdi: i as u64,
        rsi: cfg.share_base(i)?,
        rdx: cfg.share_len()?,
        rcx: u64::from(cfg.passes),
        ..Default::default()
    })
}
