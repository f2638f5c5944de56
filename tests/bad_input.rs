//! Bad input and failing peers: each must give a clear error and a
//! non-zero exit in bounded time, never a hang or a panic; the source keeps
//! serving other clients after a bad request.

mod common;

use common::*;
use pagewire_transport::wire::{self, ChannelKind, Hello, Request, Welcome};
use pagewire_transport::{MemoryLayout, PageRange, SourceInfo, ZeroMap};
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::time::Duration;

const LIMIT: Duration = Duration::from_secs(60);

fn stderr(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Asserts a failed run: exit code 1, a clear message, no panic.
fn assert_clean_failure(o: &std::process::Output, needle: &str) {
    let e = stderr(o);
    assert_eq!(
        o.status.code(),
        Some(1),
        "expected exit 1, got {}: {e}",
        o.status
    );
    assert!(e.contains(needle), "stderr lacks {needle:?}: {e}");
    assert!(!e.contains("panicked"), "panic: {e}");
}

/// A fake peer on loopback that answers each connection with `reply`.
fn fake_peer(reply: Vec<u8>) -> String {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap().to_string();
    std::thread::spawn(move || {
        for s in l.incoming().flatten() {
            let reply = reply.clone();
            std::thread::spawn(move || {
                let mut s = s;
                let _ = s.write_all(&reply);
                // Hold the connection open; read until the peer leaves.
                let mut sink = [0u8; 256];
                while matches!(s.read(&mut sink), Ok(n) if n > 0) {}
            });
        }
    });
    addr
}

fn dest(addr: &str) -> std::process::Output {
    run_bounded(
        pagewire().args(["dest", "--connect", addr, "--io-timeout", "2"]),
        LIMIT,
    )
    .0
}

#[test]
fn a_silent_port_is_not_a_source() {
    let o = dest(&fake_peer(Vec::new()));
    assert_clean_failure(&o, "no answer within 2.0 s");
}

#[test]
fn a_port_speaking_another_protocol_is_not_a_source() {
    let o = dest(&fake_peer(b"HTTP/1.1 400 Bad Request\r\n\r\n".to_vec()));
    assert_clean_failure(&o, "not a pagewire source");
    // Framed but with the wrong magic.
    let mut f = wire::encode_welcome(&Welcome {
        version: wire::VERSION,
        session: 1,
        info: None,
    });
    f[5..9].copy_from_slice(b"XXXX");
    assert_clean_failure(&dest(&fake_peer(f)), "not a pagewire source");
}

#[test]
fn nothing_listening_is_a_clear_error() {
    let port = {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let o = dest(&format!("127.0.0.1:{port}"));
    assert_clean_failure(&o, "refused");
}

#[test]
fn a_source_with_another_version_is_refused() {
    let layout = MemoryLayout::single(4096).unwrap();
    let f = wire::encode_welcome(&Welcome {
        version: 99,
        session: 1,
        info: Some(SourceInfo {
            zero: ZeroMap::new(1),
            layout,
        }),
    });
    assert_clean_failure(
        &dest(&fake_peer(f)),
        &format!("version mismatch: we speak {}, the peer 99", wire::VERSION),
    );
}

#[test]
fn a_garbage_welcome_is_a_protocol_error() {
    // Right type and magic, then a layout with a misaligned region.
    let mut f = vec![0u8; 4];
    f.push(wire::T_WELCOME);
    f.extend_from_slice(&wire::MAGIC);
    f.extend_from_slice(&wire::VERSION.to_le_bytes());
    f.extend_from_slice(&7u64.to_le_bytes()); // session
    f.push(1);
    f.extend_from_slice(&4096u32.to_le_bytes());
    f.extend_from_slice(&1u32.to_le_bytes());
    f.extend_from_slice(&0u64.to_le_bytes());
    f.extend_from_slice(&100u64.to_le_bytes());
    f.extend_from_slice(&1u32.to_le_bytes());
    f.push(0);
    let len = (f.len() - 4) as u32;
    f[..4].copy_from_slice(&len.to_le_bytes());
    assert_clean_failure(&dest(&fake_peer(f)), "not page aligned");
}

/// Opens a raw bulk connection to a real source.
fn raw_conn(addr: &str) -> TcpStream {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(&wire::encode_hello(&Hello {
        version: wire::VERSION,
        kind: ChannelKind::Bulk(0),
        nonce: [0; 32],
    }))
    .unwrap();
    let (ty, _) = wire::read_frame(&mut s, 1 << 20).unwrap();
    assert_eq!(ty, wire::T_WELCOME);
    s
}

#[test]
fn out_of_range_requests_are_refused_and_the_source_keeps_serving() {
    let src = start_source("1MiB", 1); // 256 pages
    let mut s = raw_conn(&src.addr);
    for bad in [
        PageRange::new(256, 1),
        PageRange::new(250, 10),
        PageRange::new(u64::MAX, 1),
        PageRange::new(0, 0),
    ] {
        s.write_all(&wire::encode_request(&Request::Fetch {
            id: 5,
            ranges: vec![bad],
        }))
        .unwrap();
        let (ty, body) = wire::read_frame(&mut s, 1 << 20).unwrap();
        assert_eq!(ty, wire::T_ERROR, "{bad:?}");
        let e = wire::decode_error(&body).to_string();
        assert!(e.contains("out of range") || e.contains("empty"), "{e}");
    }
    // Too many pages in one request.
    s.write_all(&wire::encode_request(&Request::Fetch {
        id: 6,
        ranges: vec![PageRange::new(0, 200); 30],
    }))
    .unwrap();
    let (ty, _) = wire::read_frame(&mut s, 1 << 20).unwrap();
    assert_eq!(ty, wire::T_ERROR);
    // The same connection still serves a good request.
    s.write_all(&wire::encode_request(&Request::Fetch {
        id: 7,
        ranges: vec![PageRange::new(255, 1)],
    }))
    .unwrap();
    let (ty, body) = wire::read_frame(&mut s, 1 << 20).unwrap();
    assert_eq!(ty, wire::T_PAGES);
    assert_eq!(body.len(), 8 + 4 + 4096);

    // A malformed frame closes that connection only.
    let mut bad = raw_conn(&src.addr);
    bad.write_all(&[3, 0, 0, 0, 0x6e, 1, 2]).unwrap();
    let (ty, _) = wire::read_frame(&mut bad, 1 << 20).unwrap();
    assert_eq!(ty, wire::T_ERROR);
    let mut rest = Vec::new();
    let _ = bad.read_to_end(&mut rest);
    assert!(rest.is_empty(), "connection should be closed");
    // A stranger that sends garbage instead of a hello.
    let mut junk = TcpStream::connect(&src.addr).unwrap();
    junk.write_all(b"GET / HTTP/1.1\r\n\r\n").unwrap();
    drop(junk);

    // And a whole migration from the same source still works.
    let r = dest_json(&src.addr, &["--workload", "random"]);
    assert_eq!(u(&r, "checksum_mismatches"), 0);
    assert_eq!(u(&r, "pages_verified"), 256);
}

#[test]
fn a_source_killed_mid_migration_fails_the_destination_cleanly() {
    let mut src = start_source("64MiB", 2);
    let addr = src.addr.clone();
    // Slow demand paging so the migration is still running when the
    // source dies; it dies once the destination has opened all three
    // connections (control, faults, the one lane), so what fails is the
    // migration, not its start.
    let ended = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let gone = ended.clone();
    let killer = std::thread::spawn(move || {
        wait_until("the destination's three connections", || {
            gone.load(std::sync::atomic::Ordering::SeqCst) || established_from_port(&src.addr) >= 3
        });
        std::thread::sleep(Duration::from_millis(300));
        src.child.kill().unwrap();
        src.child.wait().unwrap();
    });
    let (o, took) = run_bounded(
        pagewire().args([
            "dest",
            "--connect",
            &addr,
            "--io-timeout",
            "5",
            "--lanes",
            "1",
            "--workload",
            "random",
            "--no-push",
            "--no-bubble",
            "--think-us",
            "200",
        ]),
        LIMIT,
    );
    ended.store(true, std::sync::atomic::Ordering::SeqCst);
    killer.join().unwrap();
    assert_clean_failure(&o, "migration failed");
    let e = stderr(&o);
    assert!(
        e.contains("closed the connection") || e.contains("Connection reset"),
        "{e}"
    );
    assert!(took < Duration::from_secs(30), "took {took:?}");
}

#[test]
fn a_zero_push_rate_is_refused_before_anything_starts() {
    let (o, _) = run_bounded(
        pagewire().args(["dest", "--connect", "127.0.0.1:9", "--push-rate", "0"]),
        LIMIT,
    );
    let e = stderr(&o);
    assert!(!o.status.success(), "accepted --push-rate 0: {e}");
    assert!(e.contains("push rate of 0"), "{e}");
    assert!(!e.contains("panicked"), "{e}");
}

#[test]
fn cpus_the_process_may_not_use_are_refused_before_anything_starts() {
    use pagewire_engine::placement::{allowed_cpus, max_cpu};
    let allowed = allowed_cpus();
    if let Some(absent) = (0..=max_cpu()).find(|c| !allowed.contains(c)) {
        let a = absent.to_string();
        let both = format!("{},{absent}", allowed[0]);
        let not_allowed = format!("CPU {absent} is not one this process may run on");
        for (cmd, flag, list) in [
            (
                &["dest", "--connect", "127.0.0.1:9"][..],
                "--lane-cpus",
                a.as_str(),
            ),
            (
                &["dest", "--connect", "127.0.0.1:9"][..],
                "--fault-cpus",
                both.as_str(),
            ),
            (
                &["dest", "--connect", "127.0.0.1:9"][..],
                "--workload-cpus",
                a.as_str(),
            ),
            (&["demo", "--size", "1MiB"][..], "--lane-cpus", a.as_str()),
        ] {
            let (o, _) = run_bounded(pagewire().args(cmd).args([flag, list]), LIMIT);
            assert_clean_failure(&o, &format!("{flag}: {not_allowed}"));
        }
        // vm-demo's vCPU cores, checked before any VM starts (a core past
        // a CPU set's size used to panic).
        for core in [a.clone(), (max_cpu() + 100).to_string()] {
            let (o, _) = run_bounded(pagewire().args(["vm-demo", "--vcpu-cores", &core]), LIMIT);
            assert_clean_failure(
                &o,
                &format!("vcpu_cores: CPU {core} is not one this process"),
            );
        }
    }
    // Lists that are not lists are usage errors (clap's exit code 2).
    let past = (max_cpu() + 1).to_string();
    for (list, needle) in [
        ("3-1", "not a CPU number or range"),
        ("x", "not a CPU number or range"),
        ("1,,2", "not a CPU number or range"),
        (past.as_str(), "CPU numbers stop at"),
    ] {
        let (o, _) = run_bounded(
            pagewire().args(["dest", "--connect", "127.0.0.1:9", "--lane-cpus", list]),
            LIMIT,
        );
        let e = stderr(&o);
        assert_eq!(o.status.code(), Some(2), "{list}: {e}");
        assert!(e.contains(needle), "{list}: {e}");
    }
}
