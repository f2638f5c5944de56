//! Where the engine's threads run: the CPUs they may use and their nice
//! value.
//!
//! A fault costs the guest more than its round trip: a fault service is
//! woken to read it, and the vCPU is woken when its page is installed. A
//! wake-up across CPUs onto a busy CPU waits its turn there; on the
//! vCPU's own CPU, which the blocked vCPU has just left, it does not.
//! [`MigrationConfig`]'s `fault_cpus` runs a fault service pinned on each
//! CPU it names, all reading the one userfaultfd: the service on the
//! faulting vCPU's CPU is woken there and usually reads the fault first.
//! Every fault wakes every service, though, which costs CPU the push may
//! need; so by default one unpinned service runs. `lane_cpus` keeps the
//! lanes off the vCPUs' CPUs.
//!
//! [`MigrationConfig`]: crate::MigrationConfig

use nix::sched::{sched_getaffinity, sched_setaffinity, CpuSet};
use nix::unistd::Pid;

/// Why a thread could not be placed as configured.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PlacementError {
    /// A CPU named in the configuration is not one this process may run
    /// on (absent, offline, or outside its affinity mask).
    #[error("{what}: CPU {cpu} is not one this process may run on (allowed: {allowed:?})")]
    NotAllowed {
        /// Which setting named it.
        what: &'static str,
        /// The CPU.
        cpu: usize,
        /// The CPUs the process may run on.
        allowed: Vec<usize>,
    },
    /// More fault services than a migration runs (see
    /// [`MAX_FAULT_SERVICES`]).
    #[error("{services} fault services are more than the {max} a migration runs")]
    TooManyServices {
        /// Services the configuration asks for.
        services: usize,
        /// The most a migration runs.
        max: usize,
    },
    /// The kernel refused the affinity change.
    #[error("cannot set the CPU affinity of {what}: {errno}")]
    Affinity {
        /// Which thread.
        what: &'static str,
        /// The error.
        errno: nix::Error,
    },
}

/// The CPUs the process may run on, ascending: its `Cpus_allowed_list`
/// (the main thread's mask, which a cpuset or `taskset -p` sets), or the
/// calling thread's mask if that cannot be read. Empty only if neither
/// can be read (logged).
pub fn allowed_cpus() -> Vec<usize> {
    let listed = std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))
                .and_then(|l| parse_cpu_list(l.trim()).ok())
        });
    let mut cpus = match listed {
        Some(c) => c,
        None => match sched_getaffinity(Pid::from_raw(0)) {
            Ok(set) => cpus_in(&set),
            Err(e) => {
                tracing::warn!("cannot read which CPUs this process may use: {e}");
                Vec::new()
            }
        },
    };
    cpus.sort_unstable();
    cpus
}

/// The CPUs set in `set`, ascending.
fn cpus_in(set: &CpuSet) -> Vec<usize> {
    (0..CpuSet::count())
        .filter(|&c| set.is_set(c).unwrap_or(false))
        .collect()
}

/// The highest CPU number a list may name (the kernel's affinity masks
/// here hold [`CpuSet::count`] CPUs).
pub fn max_cpu() -> usize {
    CpuSet::count() - 1
}

/// Parses a CPU list as the kernel prints it and `taskset -c` takes it:
/// numbers and ranges joined by commas (`1`, `0,2-3`). Order is kept,
/// repeats dropped.
pub fn parse_cpu_list(s: &str) -> Result<Vec<usize>, String> {
    let mut cpus = Vec::new();
    for part in s.split(',') {
        let part = part.trim();
        let bad = || format!("{part:?} is not a CPU number or range (like 0,2-3)");
        let num = |t: &str| t.trim().parse::<usize>().map_err(|_| bad());
        let (lo, hi) = match part.split_once('-') {
            Some((a, b)) => (num(a)?, num(b)?),
            None => (num(part)?, num(part)?),
        };
        if lo > hi {
            return Err(bad());
        }
        if hi > max_cpu() {
            return Err(format!("{part:?}: CPU numbers stop at {}", max_cpu()));
        }
        for c in lo..=hi {
            if !cpus.contains(&c) {
                cpus.push(c);
            }
        }
    }
    Ok(cpus)
}

/// Checks that every CPU in `cpus` is one the process may run on (see
/// [`allowed_cpus`]); `what` names the setting in the error.
pub fn check(what: &'static str, cpus: &[usize]) -> Result<(), PlacementError> {
    if cpus.is_empty() {
        return Ok(());
    }
    let allowed = allowed_cpus();
    match cpus.iter().find(|c| !allowed.contains(c)) {
        Some(&cpu) => Err(PlacementError::NotAllowed { what, cpu, allowed }),
        None => Ok(()),
    }
}

/// Restricts the calling thread to `cpus` (a VMM may call it for its vCPU
/// threads). An empty list leaves the thread where it is.
pub fn pin_current_thread(what: &'static str, cpus: &[usize]) -> Result<(), PlacementError> {
    if cpus.is_empty() {
        return Ok(());
    }
    let mut set = CpuSet::new();
    for &c in cpus {
        set.set(c).map_err(|_| PlacementError::NotAllowed {
            what,
            cpu: c,
            allowed: allowed_cpus(),
        })?;
    }
    sched_setaffinity(Pid::from_raw(0), &set)
        .map_err(|errno| PlacementError::Affinity { what, errno })
}

/// [`pin_current_thread`] for an engine thread at its start: the CPUs
/// were checked when the migration started, so a refusal (a mask changed
/// since) is logged and the thread runs where it is.
pub(crate) fn pin_or_warn(what: &'static str, cpus: &[usize]) {
    if let Err(e) = pin_current_thread(what, cpus) {
        tracing::warn!("{e}");
    }
}

/// Gives the calling thread nice value `nice`, so that the guest's vCPUs
/// (and the fault service) win the CPU over background work (lanes, the
/// zero filler) when they compete. A refusal is logged: it is an
/// optimisation, not a requirement.
pub(crate) fn set_current_nice(nice: i32) {
    // SAFETY: setpriority only reads its integer arguments; with
    // PRIO_PROCESS and 0 it changes the calling thread alone (Linux keeps
    // nice values per thread).
    let r = unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, nice) };
    if r != 0 {
        tracing::warn!(
            nice,
            "cannot set a thread's nice value: {}",
            std::io::Error::last_os_error()
        );
    }
}

/// The fault services to start, by the CPU each is pinned to: one on each
/// CPU of `fault_cpus` (a CPU named twice gets one), or a single one the
/// scheduler places when none are named. More than
/// [`MAX_FAULT_SERVICES`] are refused.
pub fn fault_service_cpus(fault_cpus: &[usize]) -> Result<Vec<Option<usize>>, PlacementError> {
    if fault_cpus.is_empty() {
        return Ok(vec![None]);
    }
    let mut cpus: Vec<Option<usize>> = Vec::new();
    for &c in fault_cpus {
        if !cpus.contains(&Some(c)) {
            cpus.push(Some(c));
        }
    }
    if cpus.len() > MAX_FAULT_SERVICES {
        return Err(PlacementError::TooManyServices {
            services: cpus.len(),
            max: MAX_FAULT_SERVICES,
        });
    }
    Ok(cpus)
}

/// Most fault services a migration runs: each has its own urgent channel
/// (an RDMA queue pair and its staging memory), and every fault wakes
/// every service.
pub const MAX_FAULT_SERVICES: usize = 16;

/// The CPU lane `lane` runs on: `lane_cpus` round robin when given,
/// otherwise every allowed CPU round robin when `pin` is set (the fault
/// service's CPUs too: name `lane_cpus` to keep lanes off them),
/// otherwise none (the scheduler places it).
pub(crate) fn lane_cpu(
    lane: usize,
    lane_cpus: &[usize],
    pin: bool,
    allowed: &[usize],
) -> Option<usize> {
    let set = if lane_cpus.is_empty() {
        if !pin {
            return None;
        }
        allowed
    } else {
        lane_cpus
    };
    (!set.is_empty()).then(|| set[lane % set.len()])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lanes_go_round_robin_over_the_given_cpus_or_every_allowed_one() {
        let allowed = [0, 1, 2, 3];
        assert_eq!(lane_cpu(0, &[], true, &allowed), Some(0));
        assert_eq!(lane_cpu(5, &[], true, &allowed), Some(1));
        assert_eq!(lane_cpu(1, &[], false, &allowed), None);
        assert_eq!(lane_cpu(0, &[2, 3], true, &allowed), Some(2));
        assert_eq!(lane_cpu(3, &[2, 3], false, &allowed), Some(3));
        assert_eq!(lane_cpu(0, &[], true, &[]), None);
    }

    #[test]
    fn a_fault_service_runs_on_each_cpu_named_or_one_anywhere() {
        assert_eq!(fault_service_cpus(&[5, 2]), Ok(vec![Some(5), Some(2)]));
        assert_eq!(fault_service_cpus(&[3]), Ok(vec![Some(3)]));
        assert_eq!(fault_service_cpus(&[3, 1, 3]), Ok(vec![Some(3), Some(1)]));
        assert_eq!(fault_service_cpus(&[]), Ok(vec![None]));
        let many: Vec<usize> = (0..=MAX_FAULT_SERVICES).collect();
        assert_eq!(
            fault_service_cpus(&many),
            Err(PlacementError::TooManyServices {
                services: MAX_FAULT_SERVICES + 1,
                max: MAX_FAULT_SERVICES
            })
        );
    }

    #[test]
    fn cpus_outside_the_affinity_mask_are_refused_by_name() {
        let allowed = allowed_cpus();
        assert!(!allowed.is_empty());
        assert_eq!(check("lane_cpus", &allowed), Ok(()));
        assert_eq!(check("lane_cpus", &[]), Ok(()));
        let Some(absent) = (0..=max_cpu()).find(|c| !allowed.contains(c)) else {
            return; // every CPU there is may be used: nothing to refuse
        };
        match check("fault_cpus", &[allowed[0], absent]) {
            Err(PlacementError::NotAllowed { what, cpu, .. }) => {
                assert_eq!((what, cpu), ("fault_cpus", absent));
            }
            other => panic!("expected NotAllowed, got {other:?}"),
        }
        assert!(pin_current_thread("test", &[max_cpu() + 3]).is_err());
    }

    #[test]
    fn cpu_lists_parse_like_taskset() {
        assert_eq!(parse_cpu_list("1"), Ok(vec![1]));
        assert_eq!(parse_cpu_list("0,2-3"), Ok(vec![0, 2, 3]));
        assert_eq!(parse_cpu_list(" 3 , 1-2,3"), Ok(vec![3, 1, 2]));
        for bad in ["", "a", "1,", "2-1", "-1", "1-", "0--1"] {
            let e = parse_cpu_list(bad).expect_err(bad);
            assert!(e.contains("not a CPU number or range"), "{bad:?}: {e}");
        }
        let past = (max_cpu() + 1).to_string();
        let e = parse_cpu_list(&past).expect_err("past the mask");
        assert!(e.contains("CPU numbers stop at"), "{e}");
        // What the kernel prints for this process parses.
        assert!(!allowed_cpus().is_empty());
    }

    #[test]
    fn a_pinned_thread_runs_only_on_its_cpu() {
        let allowed = allowed_cpus();
        let cpu = *allowed.last().expect("some CPU");
        std::thread::spawn(move || {
            pin_current_thread("test", &[cpu]).expect("pin");
            let mask = sched_getaffinity(Pid::from_raw(0)).expect("mask");
            assert_eq!(cpus_in(&mask), vec![cpu]);
        })
        .join()
        .expect("thread");
    }
}
