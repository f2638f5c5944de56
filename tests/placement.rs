//! The engine's threads run where a VMM tells them to. Its own test
//! binary: it reads every thread of the process, which other tests'
//! migrations would add to.

mod common;

use common::*;
use pagewire_engine::{Migration, MigrationConfig};
use pagewire_transport::Transport;
use std::sync::Arc;

/// The CPUs each of this process's threads named `name*` may run on.
fn thread_cpus(name: &str) -> Vec<String> {
    let mut found = Vec::new();
    for t in std::fs::read_dir("/proc/self/task").unwrap().flatten() {
        let comm = std::fs::read_to_string(t.path().join("comm")).unwrap_or_default();
        if !comm.trim().starts_with(name) {
            continue;
        }
        let status = std::fs::read_to_string(t.path().join("status")).unwrap_or_default();
        if let Some(l) = status
            .lines()
            .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))
        {
            found.push(l.trim().to_string());
        }
    }
    found
}

#[test]
fn lanes_and_fault_services_run_on_the_cpus_configured() {
    let allowed = pagewire_engine::placement::allowed_cpus();
    let last = *allowed.last().unwrap();
    let first = allowed[0];
    let src = pagewire_vmm_glue::image::synthetic(4 << 20, 2, 25).unwrap();
    let t: Arc<dyn Transport> = Arc::new(pagewire_transport::inproc::InProcTransport::new(
        Arc::new(src),
    ));
    // The sweep held: the threads stay up until it is released.
    let h = Migration::start(
        t,
        MigrationConfig {
            lanes: 3,
            push: false,
            lane_cpus: vec![first],
            fault_cpus: vec![last, first],
            ..MigrationConfig::default()
        },
    )
    .unwrap();
    // One service per CPU named (one where the machine has one CPU).
    let services: Vec<usize> = if last == first {
        vec![last]
    } else {
        vec![last, first]
    };
    let lanes = first.to_string();
    let mut want: Vec<String> = services.iter().map(|c| c.to_string()).collect();
    want.sort();
    wait_until("lanes and fault services placed", || {
        let l = thread_cpus("pw-lane-");
        let mut f = thread_cpus("pw-fault-");
        f.sort();
        l.len() == 3 && l.iter().all(|c| *c == lanes) && f == want
    });
    h.release_push();
    let r = h.wait().unwrap();
    assert_eq!(r.lane_cpus, vec![first]);
    assert_eq!(r.fault_cpus, services);
    assert_eq!(r.fault_services, services.len());
}
