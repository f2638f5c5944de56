//! A real KVM guest (several vCPUs, hand-written 64-bit code) paused at a
//! source VMM and resumed at once in a destination VMM whose memory
//! pagewire fills post-copy: the guest's faults are raised by KVM (kernel
//! context) and served over TCP while the pusher runs; its results must
//! equal the same guest's without migration.

mod common;

use std::time::Duration;

use common::{pagewire, run_bounded};

fn kvm_available() -> bool {
    match pagewire_minivm::kvm_unavailable() {
        Some(why) => {
            eprintln!("SKIPPED: {why}");
            false
        }
        None => true,
    }
}

fn vm_demo(args: &[&str]) -> serde_json::Value {
    let (out, _) = run_bounded(
        pagewire()
            .args(["vm-demo", "--json", "--transport", "tcp"])
            .args(args),
        Duration::from_secs(180),
    );
    assert!(
        out.status.success(),
        "vm-demo failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("vm-demo --json prints JSON")
}

#[test]
fn a_kvm_guest_migrated_post_copy_computes_what_it_computes_locally() {
    if !kvm_available() {
        return;
    }
    for args in [
        &["--memory", "66MiB", "--vcpus", "2", "--passes", "3"][..],
        &[
            "--memory",
            "40MiB",
            "--vcpus",
            "3",
            "--passes",
            "2",
            "--no-bubble",
            "--lanes",
            "1",
        ],
    ] {
        let r = vm_demo(args);
        assert_eq!(r["results_match"], true, "{r}");
        let local = r["local_results"].as_array().unwrap();
        assert_eq!(local, r["migrated_results"].as_array().unwrap());
        assert!(local.iter().all(|v| v.as_u64() != Some(0)), "{r}");
        let e = &r["engine"];
        assert_eq!(e["duplicate_pages"], 0, "{r}");
        // The vCPUs really faulted on memory that was not there yet.
        assert!(e["network_faults"].as_u64().unwrap() > 0, "{r}");
        assert!(r["downtime_ms"].as_f64().unwrap() > 0.0, "{r}");
    }
}

#[test]
fn bad_vm_demo_settings_are_refused() {
    for (args, want) in [
        (&["--vcpus", "0"][..], "vCPUs"),
        (&["--memory", "1MiB"], "at least"),
        (
            &["--passes", "2", "--pause-after", "2"],
            "before the last pass",
        ),
    ] {
        let (out, _) = run_bounded(
            pagewire()
                .args(["vm-demo", "--transport", "tcp"])
                .args(args),
            Duration::from_secs(60),
        );
        let e = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success() && e.contains(want), "{args:?}: {e}");
    }
}
