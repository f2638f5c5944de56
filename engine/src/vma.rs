//! What the kernel says about a process's mappings (`/proc/PID/smaps`):
//! whether guest memory a VMM hands in is mapped, and whether it is
//! registered with userfaultfd.

use crate::error::RegionError;
use crate::memory::GuestRegion;

/// One mapping: `[start, end)` and whether userfaultfd tracks missing
/// pages (`um` in `VmFlags`) and minor faults (`ui`) in it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Vma {
    start: u64,
    end: u64,
    uffd_missing: bool,
    uffd_minor: bool,
}

fn parse_smaps(text: &str) -> Vec<Vma> {
    let mut out: Vec<Vma> = Vec::new();
    for line in text.lines() {
        if let Some(flags) = line.strip_prefix("VmFlags:") {
            if let Some(last) = out.last_mut() {
                last.uffd_missing = flags.split_whitespace().any(|f| f == "um");
                last.uffd_minor = flags.split_whitespace().any(|f| f == "ui");
            }
            continue;
        }
        // A mapping header: "start-end perms offset dev inode [path]".
        let Some(range) = line.split_whitespace().next() else {
            continue;
        };
        let Some((a, b)) = range.split_once('-') else {
            continue;
        };
        if let (Ok(start), Ok(end)) = (u64::from_str_radix(a, 16), u64::from_str_radix(b, 16)) {
            out.push(Vma {
                start,
                end,
                uffd_missing: false,
                uffd_minor: false,
            });
        }
    }
    out
}

fn check(vmas: &[Vma], regions: &[GuestRegion], registered: bool) -> Result<(), RegionError> {
    for (i, r) in regions.iter().enumerate() {
        let end = r.host_addr.saturating_add(r.size);
        let mut at = r.host_addr;
        while at < end {
            let vma = vmas.iter().find(|v| v.start <= at && at < v.end).ok_or(
                RegionError::NotMapped {
                    region: i,
                    addr: at,
                },
            )?;
            if registered && !vma.uffd_missing {
                return Err(RegionError::NotRegistered {
                    region: i,
                    addr: vma.start.max(r.host_addr),
                });
            }
            // A VMM's uffd with minor faults too would raise them for pages
            // in the file that are not mapped, which pagewire (copying pages
            // in through it) could only answer by waking the thread again.
            if registered && vma.uffd_minor {
                return Err(RegionError::BadUffd(format!(
                    "region {i} is registered for minor faults: register missing faults only, \
                     or let pagewire create the userfaultfd"
                )));
            }
            at = vma.end;
        }
    }
    Ok(())
}

/// Checks that every region is mapped in process `pid` (this process when
/// `None`) and, with `registered`, that userfaultfd tracks missing pages
/// over all of it. When the process's mappings cannot be read (another
/// user's process), nothing is checked and a warning is logged.
pub(crate) fn check_mapped(
    pid: Option<u32>,
    regions: &[GuestRegion],
    registered: bool,
) -> Result<(), RegionError> {
    let path = match pid {
        Some(p) => format!("/proc/{p}/smaps"),
        None => "/proc/self/smaps".to_string(),
    };
    match std::fs::read_to_string(&path) {
        Ok(text) => check(&parse_smaps(&text), regions, registered),
        Err(e) => {
            tracing::warn!("cannot read {path} ({e}): guest memory mappings not checked");
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SMAPS: &str = "\
7f0000000000-7f0000004000 rw-p 00000000 00:00 0
Size:                 16 kB
VmFlags: rd wr mr mw me ac um
7f0000004000-7f0000008000 rw-p 00000000 00:00 0
Size:                 16 kB
VmFlags: rd wr mr mw me ac
7f0000010000-7f0000012000 rw-s 00000000 00:01 5     /memfd:guest (deleted)
VmFlags: rd wr sh mr mw me ms um
7f0000020000-7f0000022000 rw-s 00000000 00:01 6     /memfd:other (deleted)
VmFlags: rd wr sh mr mw me ms um ui
";

    fn region(host: u64, size: u64) -> GuestRegion {
        GuestRegion {
            guest_base: 0,
            host_addr: host,
            size,
            page_size: 4096,
        }
    }

    #[test]
    fn registered_mapped_and_missing_ranges_are_told_apart() {
        let v = parse_smaps(SMAPS);
        assert_eq!(v.len(), 4);
        assert!(v[0].uffd_missing && !v[1].uffd_missing && v[2].uffd_missing);
        assert!(!v[2].uffd_minor && v[3].uffd_minor);
        // Registered for minor faults as well: refused for a VMM's uffd.
        assert!(matches!(
            check(&v, &[region(0x7f00_0002_0000, 0x2000)], true),
            Err(RegionError::BadUffd(_))
        ));
        assert_eq!(
            check(&v, &[region(0x7f00_0002_0000, 0x2000)], false),
            Ok(())
        );
        let ok = [
            region(0x7f00_0000_0000, 0x4000),
            region(0x7f00_0001_0000, 0x2000),
        ];
        assert_eq!(check(&v, &ok, true), Ok(()));
        // Spans into the unregistered mapping.
        assert_eq!(
            check(&v, &[region(0x7f00_0000_0000, 0x8000)], true),
            Err(RegionError::NotRegistered {
                region: 0,
                addr: 0x7f00_0000_4000
            })
        );
        assert_eq!(
            check(&v, &[region(0x7f00_0000_0000, 0x8000)], false),
            Ok(())
        );
        // A hole between mappings.
        assert_eq!(
            check(&v, &[region(0x7f00_0000_4000, 0x8000)], false),
            Err(RegionError::NotMapped {
                region: 0,
                addr: 0x7f00_0000_8000
            })
        );
    }
}
