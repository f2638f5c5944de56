//! End to end over loopback TCP with two real processes: a `pagewire
//! source` and a `pagewire dest`.

mod common;

use common::*;
use std::time::Duration;

/// Checks the invariants every clean migration must hold. Engine counts
/// are in guest memory's pages (2 MiB on hugetlbfs), the source's and the
/// verification's in 4 KiB pages.
fn assert_clean(r: &serde_json::Value) {
    let total = u(r, "pages_total");
    let per = u(r, "page_size") / 4096;
    assert_eq!(u(r, "pages_verified"), total * per, "{r}");
    assert_eq!(u(r, "checksum_mismatches"), 0, "{r}");
    assert_eq!(u(r, "duplicate_pages"), 0, "{r}");
    assert_eq!(u(r, "install_conflicts"), 0, "{r}");
    // Some pages are zero pages or pushed (a guest on huge pages may have
    // no zero huge page, and demand-only then faults on every one).
    assert!(u(r, "network_faults") < total || per > 1, "{r}");
    // Each page is accounted for once: fetched on a fault, by a bubble,
    // by the sweep, or installed as a zero page.
    assert_eq!(
        u(r, "network_faults") + u(r, "prepaged_pages") + u(r, "pushed_pages") + u(r, "zero_pages"),
        total,
        "{r}"
    );
    // The source sent every 4 KiB page of every non-zero page exactly
    // once, no more.
    let sent = (total - u(r, "zero_pages")) * per;
    assert_eq!(u(r, "source_pages_served"), sent, "{r}");
    assert_eq!(u(r, "bytes_received"), sent * 4096, "{r}");
    assert_eq!(u(r, "pages_transferred"), sent, "{r}");
    for k in ["p50", "p99", "max"] {
        assert!(r["fault_latency_us"][k].is_number(), "{r}");
    }
    assert_eq!(r["transport"], "tcp");
    assert!(r["total_ms"].as_f64().unwrap() > 0.0);
}

#[test]
fn every_workload_migrates_between_two_processes() {
    // One source serves every destination in turn (a fresh source memory
    // counter per run is not needed: each run checks its own delta).
    for (i, workload) in ["seq", "random", "hotset", "stride"].iter().enumerate() {
        let src = start_source("16MiB", 7 + i as u64);
        let r = dest_json(&src.addr, &["--workload", workload, "--lanes", "2"]);
        assert_clean(&r);
        assert_eq!(u(&r, "pages_total"), 4096);
        assert_eq!(r["workload"]["pattern"], *workload);
    }
}

#[test]
fn every_workload_migrates_into_shared_memory_landed_or_copied() {
    // A memfd-backed guest: pages are landed in the memfd by the transport
    // and mapped with UFFDIO_CONTINUE, or copied in with UFFDIO_COPY (what
    // `auto` picks over TCP).
    for (i, workload) in ["seq", "random", "hotset", "stride"].iter().enumerate() {
        for (install, path) in [
            ("land", "landed"),
            ("copy", "copy-shared"),
            ("auto", "copy-shared"),
        ] {
            for extra in [&[][..], &["--no-push", "--no-bubble"][..]] {
                if install == "auto" && !extra.is_empty() {
                    continue;
                }
                // A fresh source: its served-pages counter is per process.
                let src = start_source("16MiB", 17 + i as u64);
                let mut args = vec!["--workload", workload, "--memory-backend", "memfd"];
                args.extend_from_slice(&["--shared-install", install]);
                args.extend_from_slice(extra);
                let r = dest_json(&src.addr, &args);
                assert_clean(&r);
                assert_eq!(r["install_path"], path, "{r}");
            }
        }
    }
}

#[test]
fn every_workload_migrates_into_huge_pages() {
    // Guest memory on 2 MiB pages (hugetlbfs, as Firecracker's
    // huge_pages "2M"): the engine counts in huge pages, the workload
    // and the checksums in the source's 4 KiB pages.
    if !huge_pages_or_skip(16) {
        return;
    }
    for (i, workload) in ["seq", "random", "hotset", "stride"].iter().enumerate() {
        for extra in [&[][..], &["--no-push", "--no-bubble"][..]] {
            let src = start_source("32MiB", 27 + i as u64);
            let mut args = vec!["--workload", workload, "--memory-backend", "hugetlb"];
            args.extend_from_slice(extra);
            let r = dest_json(&src.addr, &args);
            assert_clean(&r);
            assert_eq!(u(&r, "pages_total"), 16, "{r}");
            assert_eq!(u(&r, "page_size"), 2 << 20, "{r}");
            assert_eq!(r["workload"]["pattern"], *workload);
            if extra.is_empty() {
                assert!(u(&r, "network_faults") < 16, "{r}");
            }
        }
    }
}

#[test]
fn demand_paging_and_no_bubble_variants_are_clean() {
    let src = start_source("8MiB", 3);
    let r = dest_json(
        &src.addr,
        &["--workload", "random", "--no-push", "--no-bubble"],
    );
    assert_clean(&r);
    assert_eq!(u(&r, "prepaged_pages"), 0);
    // Demand paging: every non-zero page the workload touched faulted.
    assert!(u(&r, "network_faults") > 0);
    // QEMU's scheme: no bubbles, the sweep restarts at every fault and
    // wraps around until every page is here.
    for (i, w) in ["random", "stride", "seq"].into_iter().enumerate() {
        // A source per run: assert_clean compares its per-process counters.
        let src = start_source("8MiB", 10 + i as u64);
        let r = dest_json(
            &src.addr,
            &["--workload", w, "--no-bubble", "--sweep-from-fault"],
        );
        assert_clean(&r);
        assert_eq!(u(&r, "prepaged_pages"), 0);
    }
}

#[test]
fn placed_threads_and_polled_replies_keep_every_page_clean() {
    // Lanes, the fault service and the workload pinned (all on the first
    // CPU, the one every machine has), replies polled: the placement a
    // host that pins its vCPUs uses, with and without the push.
    let cpu = pagewire_engine::placement::allowed_cpus()[0].to_string();
    let placed = [
        "--lane-cpus",
        &cpu,
        "--fault-cpus",
        &cpu,
        "--workload-cpus",
        &cpu,
        "--reply-spin-us",
        "200",
    ];
    for (i, extra) in [&[][..], &["--no-push", "--no-bubble"][..]]
        .iter()
        .enumerate()
    {
        let src = start_source("16MiB", 40 + i as u64);
        let mut args = vec!["--workload", "hotset", "--lanes", "2"];
        args.extend_from_slice(&placed);
        args.extend_from_slice(extra);
        let r = dest_json(&src.addr, &args);
        assert_clean(&r);
        // Without the push every page the workload touches is a network
        // fault (with it, a busy machine may let the push finish first).
        if i == 1 {
            assert!(u(&r, "network_faults") > 0, "{r}");
        }
        // The flags reached the engine.
        let cpus = serde_json::json!([cpu.parse::<u64>().unwrap()]);
        assert_eq!(r["lane_cpus"], cpus, "{r}");
        assert_eq!(r["fault_cpus"], cpus, "{r}");
        assert_eq!(u(&r, "reply_spin_us"), 200, "{r}");
    }
    // A fault service on each of two CPUs (one where there is one CPU):
    // every fault wakes both, each page still arrives once.
    let allowed = pagewire_engine::placement::allowed_cpus();
    let both = format!("{},{}", allowed[0], allowed.last().unwrap());
    let services = allowed.len().min(2) as u64;
    for (i, w) in ["random", "seq"].into_iter().enumerate() {
        let src = start_source("16MiB", 50 + i as u64);
        let r = dest_json(&src.addr, &["--workload", w, "--fault-cpus", &both]);
        assert_clean(&r);
        assert_eq!(u(&r, "fault_services"), services, "{r}");
    }
}

#[test]
fn bubbling_cuts_network_faults_on_sequential_access() {
    // The sweep is held (--no-push) so that only bubbles can prevent faults.
    let run = |extra: &[&str]| {
        let src = start_source("16MiB", 5);
        let mut args = vec!["--workload", "seq", "--no-push"];
        args.extend_from_slice(extra);
        let r = dest_json(&src.addr, &args);
        assert_clean(&r);
        u(&r, "network_faults")
    };
    let with = run(&[]);
    let without = run(&["--no-bubble"]);
    assert!(
        with < without,
        "bubbling should fault less: {with} faults with, {without} without"
    );
}

#[test]
fn demo_runs_both_transports() {
    for t in ["tcp", "inproc"] {
        let (out, _) = run_bounded(
            pagewire().args(["demo", "--size", "8MiB", "--transport", t, "--json"]),
            Duration::from_secs(120),
        );
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let r: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(r["transport"], t);
        assert_eq!(u(&r, "checksum_mismatches"), 0);
        assert_eq!(u(&r, "duplicate_pages"), 0);
    }
    // The human summary is the default.
    let (out, _) = run_bounded(
        pagewire().args(["demo", "--size", "4MiB"]),
        Duration::from_secs(120),
    );
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("0 mismatches, 0 duplicates -> OK"), "{text}");
}

/// A source started with `--once` exits, successfully, once its
/// destination has every page and has verified it.
#[test]
fn a_source_is_told_when_its_destination_is_done() {
    let mut cmd = pagewire();
    cmd.args([
        "source",
        "--listen",
        "127.0.0.1:0",
        "--synthetic",
        "8MiB",
        "--once",
    ]);
    let mut src = spawn_source(&mut cmd);
    let r = dest_json(&src.addr, &["--workload", "seq"]);
    assert_clean(&r);
    let t0 = std::time::Instant::now();
    let status = loop {
        if let Some(s) = src.child.try_wait().unwrap() {
            break s;
        }
        assert!(
            t0.elapsed() < std::time::Duration::from_secs(10),
            "the source did not exit after its destination was done"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    };
    assert!(status.success(), "{status}");
}
