//! Migrations between two network namespaces joined by a rate-shaped veth
//! pair (`netlab/two-hosts.sh`): the source in one "host", the destination
//! in the other, a 1 Gbit/s tbf link between them. Needs root and
//! iproute2; prints SKIPPED and passes where they are missing.

mod common;

use common::*;
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

fn script() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../netlab/two-hosts.sh")
}

/// Why namespaces cannot be made here, if they cannot.
fn unsupported() -> Option<String> {
    // SAFETY: getuid has no preconditions.
    if unsafe { libc::getuid() } != 0 {
        return Some("not root".into());
    }
    for tool in ["ip", "tc"] {
        let found = Command::new("sh")
            .args(["-c", &format!("command -v {tool}")])
            .output()
            .is_ok_and(|o| o.status.success());
        if !found {
            return Some(format!("{tool} is missing (iproute2)"));
        }
    }
    None
}

/// A link that is torn down when dropped, also when a test fails.
struct Link {
    name: String,
}

impl Link {
    fn up(name: &str, rate: &str) -> Self {
        let out = Command::new(script())
            .args(["up", "--rate", rate, "--name", name])
            .output()
            .expect("run two-hosts.sh");
        assert!(
            out.status.success(),
            "two-hosts.sh up failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Self { name: name.into() }
    }

    fn ns(&self, side: &str) -> String {
        format!("{}-{side}", self.name)
    }
}

impl Drop for Link {
    fn drop(&mut self) {
        let _ = Command::new(script())
            .args(["down", "--name", &self.name])
            .status();
    }
}

#[test]
fn migrations_cross_a_shaped_link_between_two_namespaces() {
    if let Some(why) = unsupported() {
        println!("SKIPPED: network namespaces unavailable ({why})");
        return;
    }
    let name = format!("pwt{}", std::process::id() % 10_000);
    let link = Link::up(&name, "1gbit");
    let src = spawn_source(
        Command::new("ip")
            .args(["netns", "exec", &link.ns("src")])
            .arg(env!("CARGO_BIN_EXE_pagewire"))
            .args(["source", "--listen", "192.0.2.1:0", "--synthetic", "16MiB"]),
    );
    let addr = src.addr.clone();
    assert!(addr.starts_with("192.0.2.1:"), "{addr}");
    let run = |args: &[&str]| {
        let (out, _) = run_bounded(
            Command::new("ip")
                .args(["netns", "exec", &link.ns("dst")])
                .arg(env!("CARGO_BIN_EXE_pagewire"))
                .args(["dest", "--connect", &addr, "--json", "--transport", "tcp"])
                .args(args),
            Duration::from_secs(120),
        );
        assert!(
            out.status.success(),
            "dest failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice::<serde_json::Value>(&out.stdout).expect("JSON report")
    };
    for workload in ["seq", "random", "hotset", "stride"] {
        for extra in [
            &[][..],
            &["--no-flow-control"][..],
            &["--push-rate", "50MB"][..],
        ] {
            let mut args = vec!["--workload", workload];
            args.extend_from_slice(extra);
            let r = run(&args);
            let total = u(&r, "pages_total");
            assert_eq!(u(&r, "pages_verified"), total, "{args:?}: {r}");
            assert_eq!(u(&r, "checksum_mismatches"), 0, "{args:?}: {r}");
            assert_eq!(u(&r, "duplicate_pages"), 0, "{args:?}: {r}");
            assert_eq!(
                u(&r, "network_faults")
                    + u(&r, "prepaged_pages")
                    + u(&r, "pushed_pages")
                    + u(&r, "zero_pages"),
                total,
                "{args:?}: {r}"
            );
            let flow_on = !extra.contains(&"--no-flow-control");
            assert_eq!(r["flow"]["enabled"], flow_on, "{args:?}: {r}");
        }
    }
    drop(src);
}

#[test]
fn a_hybrid_migration_crosses_the_shaped_link_from_a_running_guest() {
    if let Some(why) = unsupported() {
        println!("SKIPPED: network namespaces unavailable ({why})");
        return;
    }
    let name = format!("pwh{}", std::process::id() % 10_000);
    let link = Link::up(&name, "1gbit");
    for mode in [
        &["--precopy-rounds", "2"][..],
        &["--precopy-rounds", "8", "--stop-and-copy"][..],
    ] {
        // The guest writes at the source until the switch-over; a paused
        // guest is not migrated twice, so one source per run.
        let src = spawn_source(
            Command::new("ip")
                .args(["netns", "exec", &link.ns("src")])
                .arg(env!("CARGO_BIN_EXE_pagewire"))
                .args(["source", "--listen", "192.0.2.1:0", "--synthetic", "16MiB"])
                .args(["--guest-workload", "hotset"]),
        );
        let (out, _) = run_bounded(
            Command::new("ip")
                .args(["netns", "exec", &link.ns("dst")])
                .arg(env!("CARGO_BIN_EXE_pagewire"))
                .args([
                    "dest",
                    "--connect",
                    &src.addr,
                    "--json",
                    "--transport",
                    "tcp",
                ])
                .args(mode),
            Duration::from_secs(120),
        );
        assert!(
            out.status.success(),
            "dest failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let r: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON report");
        assert_eq!(u(&r, "checksum_mismatches"), 0, "{mode:?}: {r}");
        assert_eq!(
            u(&r, "pages_verified"),
            u(&r, "pages_total"),
            "{mode:?}: {r}"
        );
        assert_eq!(u(&r, "duplicate_pages"), 0, "{mode:?}: {r}");
        assert!(r["downtime_ms"].as_f64().is_some(), "{r}");
        assert!(
            !r["precopy"]["rounds"].as_array().unwrap().is_empty(),
            "{r}"
        );
    }
}

/// Runs `nft` in namespace `ns`.
fn nft(ns: &str, args: &[&str]) -> bool {
    Command::new("ip")
        .args(["netns", "exec", ns, "nft"])
        .args(args)
        .status()
        .is_ok_and(|s| s.success())
}

/// TCP connections established in the network namespace `ns`.
fn established(ns: &str) -> usize {
    Command::new("ip")
        .args(["netns", "exec", ns, "ss", "-Htn", "state", "established"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).lines().count())
        .expect("run ss (iproute2) in the namespace")
}

/// The link drops every packet, both ways, for a while (an nftables drop
/// policy in the destination's namespace), at seeded random moments, many
/// times in one migration: the migration recovers each time and ends with
/// every page verified.
#[test]
fn a_migration_survives_a_link_that_drops_every_packet_for_a_while() {
    if let Some(why) = unsupported() {
        println!("SKIPPED: network namespaces unavailable ({why})");
        return;
    }
    let has_nft = Command::new("sh")
        .args(["-c", "command -v nft"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !has_nft {
        println!("SKIPPED: nft (nftables) is missing");
        return;
    }
    let name = format!("pwd{}", std::process::id() % 10_000);
    let link = Link::up(&name, "1gbit");
    let src = spawn_source(
        Command::new("ip")
            .args(["netns", "exec", &link.ns("src")])
            .arg(env!("CARGO_BIN_EXE_pagewire"))
            .args([
                "source",
                "--listen",
                "192.0.2.1:0",
                "--synthetic",
                "16MiB",
                "--seed",
                "9",
            ]),
    );
    let dst = link.ns("dst");
    let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let chaos = {
        let (done, dst) = (done.clone(), dst.clone());
        std::thread::spawn(move || {
            let mut x: u64 = 0xd20b_5eed_0000_0077;
            let mut next = move |n: u64| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x % n
            };
            let mut drops = Vec::new();
            // The first connect has no recovery: drop packets only once
            // every channel is up (control, faults, two lanes).
            wait_until("the destination's four connections", || {
                done.load(std::sync::atomic::Ordering::SeqCst) || established(&dst) >= 4
            });
            // Twenty drops, then the link stays up so the migration ends.
            while !done.load(std::sync::atomic::Ordering::SeqCst) && drops.len() < 20 {
                let ms = 100 + next(1400);
                assert!(nft(&dst, &["add", "table", "inet", "pwdrop"]));
                assert!(nft(&dst, &["add chain inet pwdrop in { type filter hook input priority 0 ; policy drop ; }"]));
                assert!(nft(&dst, &["add chain inet pwdrop out { type filter hook output priority 0 ; policy drop ; }"]));
                std::thread::sleep(Duration::from_millis(ms));
                assert!(nft(&dst, &["delete", "table", "inet", "pwdrop"]));
                drops.push(ms);
                std::thread::sleep(Duration::from_millis(200 + next(400)));
            }
            drops
        })
    };
    let (out, _) = run_bounded(
        Command::new("ip")
            .args(["netns", "exec", &dst])
            .arg(env!("CARGO_BIN_EXE_pagewire"))
            .args([
                "dest",
                "--connect",
                &src.addr,
                "--json",
                "--transport",
                "tcp",
                "--io-timeout",
                "1",
                "--recover-timeout",
                "60",
                "--lanes",
                "2",
                "--push-rate",
                "500KB",
                "--workload",
                "hotset",
                "--think-us",
                "300",
            ]),
        Duration::from_secs(240),
    );
    done.store(true, std::sync::atomic::Ordering::SeqCst);
    let drops = chaos.join().expect("chaos thread");
    let _ = nft(&dst, &["delete", "table", "inet", "pwdrop"]);
    assert!(
        out.status.success(),
        "dest failed after drops {drops:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let r: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON report");
    println!(
        "{} drops ({:?} ms): link losses {}, reconnects {}, resent {}",
        drops.len(),
        drops,
        r["link_losses"],
        r["reconnects"],
        r["resent_pages"]
    );
    assert_eq!(
        drops.len(),
        20,
        "the migration ended after {} drops: {drops:?}",
        drops.len()
    );
    assert_eq!(u(&r, "checksum_mismatches"), 0, "{r}");
    assert_eq!(u(&r, "duplicate_pages"), 0, "{r}");
    assert_eq!(u(&r, "pages_verified"), u(&r, "pages_total"), "{r}");
    assert!(
        u(&r, "link_losses") >= 1,
        "no drop was long enough to lose the link: {r}"
    );
    drop(src);
}

#[test]
fn the_experiment_command_runs_a_reduced_matrix_and_renders_results() {
    if let Some(why) = unsupported() {
        println!("SKIPPED: network namespaces unavailable ({why})");
        return;
    }
    let out = std::env::temp_dir().join(format!("pw-exp-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&out);
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../netlab/experiment.sh");
    let (o, _) = run_bounded(
        Command::new("bash")
            .arg(script)
            .args(["--rates", "none", "--sizes", "8MiB", "--runs", "1"])
            .args(["--workloads", "hotset trace:gcc", "--guest", "hotset"])
            .args(["--sweep-radii", "8 64", "--sweep-workloads", "stride"])
            .arg("--out")
            .arg(&out)
            .env("PAGEWIRE", env!("CARGO_BIN_EXE_pagewire")),
        Duration::from_secs(600),
    );
    assert!(
        o.status.success(),
        "experiment failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    let md = std::fs::read_to_string(out.join("results.md")).unwrap();
    for want in [
        "## 8 MiB guest, link none",
        "| hotset | demand-only |",
        "| trace-gcc | push + paper's bubbles |",
        "| trace-gcc | push + bubbles |",
        "hybrid: 2 pre-copy rounds",
        "pre-copy baseline",
        "Network faults against bubble radius",
        "| stride | adaptive |",
    ] {
        assert!(md.contains(want), "results.md lacks {want:?}:\n{md}");
    }
    // Every migration of the matrix verified clean.
    let raw = std::fs::read_to_string(out.join("raw/8MiB-none.jsonl")).unwrap();
    let rows: Vec<serde_json::Value> = raw
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(rows.len(), 2 * 10, "2 workloads x 10 modes");
    for r in &rows {
        assert_eq!(u(r, "checksum_mismatches"), 0, "{r}");
        assert_eq!(u(r, "duplicate_pages"), 0, "{r}");
        assert!(r["downtime_ms"].as_f64().is_some(), "{r}");
    }
    for plot in [
        "plots/bubble-sweep-8mib-none.svg",
        "plots/faults-8mib-none.svg",
    ] {
        assert!(out.join(plot).exists(), "{plot}");
    }
    let _ = std::fs::remove_dir_all(&out);
}
