//! A source among hostile peers: authentication (a mutual HMAC challenge
//! before anything about guest memory is sent), a cap on connections, and
//! garbage, silent and well-behaved clients at the same time.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::time::Duration;

use common::*;
use pagewire_transport::wire::{self, ChannelKind, Hello};

const LIMIT: Duration = Duration::from_secs(60);

fn key_file(name: &str, bytes: &[u8]) -> PathBuf {
    let p = std::env::temp_dir().join(format!("pagewire-key-{name}-{}", std::process::id()));
    std::fs::write(&p, bytes).unwrap();
    p
}

fn source_with(args: &[&str]) -> Source {
    let mut cmd = pagewire();
    cmd.args(["source", "--listen", "127.0.0.1:0", "--synthetic", "8MiB"])
        .args(args);
    spawn_source(&mut cmd)
}

fn dest(addr: &str, args: &[&str]) -> std::process::Output {
    run_bounded(
        pagewire()
            .args(["dest", "--connect", addr, "--io-timeout", "3", "--json"])
            .args(args),
        LIMIT,
    )
    .0
}

/// A destination run with `args` that is retried, for up to 10 s, while
/// the source answers Busy: it frees a closed connection's slot when it
/// notices the close, which a loaded machine may take a while to do.
fn dest_once_not_busy(addr: &str, args: &[&str]) -> std::process::Output {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let o = dest(addr, args);
        let busy = !o.status.success() && String::from_utf8_lossy(&o.stderr).contains("Busy");
        if !busy || std::time::Instant::now() >= deadline {
            return o;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn failed_with(o: &std::process::Output, needle: &str) {
    let e = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{e}");
    assert!(e.contains(needle), "stderr lacks {needle:?}: {e}");
    assert!(!e.contains("panicked"), "{e}");
}

#[test]
fn only_peers_holding_the_key_migrate() {
    let key = key_file("good", b"a shared secret of 32 bytes.....\n");
    let wrong = key_file("wrong", b"another secret of 32 bytes......");
    let k = key.to_str().unwrap();
    let src = source_with(&["--auth-key-file", k]);
    // Same key: a clean migration.
    let r = json_report(&dest(&src.addr, &["--auth-key-file", k]));
    assert_eq!(r["checksum_mismatches"], 0);
    // No key, or the wrong one: refused.
    failed_with(&dest(&src.addr, &[]), "requires authentication");
    failed_with(
        &dest(&src.addr, &["--auth-key-file", wrong.to_str().unwrap()]),
        "does not hold the shared key",
    );
    // A destination with a key refuses a source without one (it could be
    // anyone's memory).
    let open = source_with(&[]);
    failed_with(
        &dest(&open.addr, &["--auth-key-file", k]),
        "does not authenticate",
    );
    // A key too short to be a secret.
    let short = key_file("short", b"tiny");
    failed_with(
        &dest(&src.addr, &["--auth-key-file", short.to_str().unwrap()]),
        "at least 16 are needed",
    );
    for f in [key, wrong, short] {
        let _ = std::fs::remove_file(f);
    }
}

#[test]
fn nothing_about_memory_is_sent_before_authentication() {
    let key = key_file("raw", b"0123456789abcdef0123456789abcdef");
    let src = source_with(&["--auth-key-file", key.to_str().unwrap()]);
    let mut s = TcpStream::connect(&src.addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(&wire::encode_hello(&Hello {
        version: wire::VERSION,
        kind: ChannelKind::Control,
        nonce: [9; 32],
    }))
    .unwrap();
    // A challenge: 32 bytes of nonce, 32 of proof, nothing else.
    let (ty, body) = wire::read_frame(&mut s, 1 << 20).unwrap();
    assert_eq!(ty, wire::T_CHALLENGE);
    assert_eq!(body.len(), 64);
    // A forged proof: refused, and the connection closes without a welcome.
    s.write_all(&wire::encode_auth(&[0; 32])).unwrap();
    let (ty, body) = wire::read_frame(&mut s, 1 << 20).unwrap();
    assert_eq!(ty, wire::T_ERROR);
    assert!(matches!(
        wire::decode_error(&body),
        pagewire_transport::TransportError::Remote {
            code: pagewire_transport::RemoteCode::Auth,
            ..
        }
    ));
    let mut rest = Vec::new();
    let _ = s.read_to_end(&mut rest);
    assert!(rest.is_empty(), "bytes after a failed authentication");
    let _ = std::fs::remove_file(key);
}

#[test]
fn a_source_on_a_public_address_without_a_key_warns() {
    let mut child = pagewire()
        .args(["source", "--listen", "0.0.0.0:0", "--synthetic", "1MiB"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Once it listens, it has said what it warns of.
    let listening = first_line_within(child.stdout.take().unwrap(), Duration::from_secs(60));
    let _ = child.kill();
    assert!(listening.is_some(), "the source never listened");
    let out = child.wait_with_output().unwrap();
    let e = String::from_utf8_lossy(&out.stderr);
    assert!(e.contains("WITHOUT authentication"), "{e}");
}

/// Opens a connection that says nothing (slowloris).
fn silent(addr: &str) -> TcpStream {
    TcpStream::connect(addr).unwrap()
}

#[test]
fn connections_past_the_cap_are_refused_as_busy() {
    let src = source_with(&["--max-connections", "3"]);
    let idle: Vec<TcpStream> = (0..3).map(|_| silent(&src.addr)).collect();
    std::thread::sleep(Duration::from_millis(200));
    // A migration needs more connections than are left: busy.
    failed_with(&dest(&src.addr, &["--lanes", "1"]), "Busy");
    drop(idle);
    // Room again once the source saw them close: control, urgent and one
    // lane fit.
    let ok = dest_once_not_busy(&src.addr, &["--lanes", "1"]);
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
}

#[test]
fn garbage_and_silent_clients_do_not_stop_a_good_migration() {
    let src = source_with(&[]);
    let addr = src.addr.clone();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    // Silent clients hold connections; others send garbage streams, hellos
    // followed by garbage, and oversized frame lengths, over and over.
    let _silent: Vec<TcpStream> = (0..20).map(|_| silent(&addr)).collect();
    let hostile: Vec<_> = (0..4u64)
        .map(|t| {
            let (addr, stop) = (addr.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut x = t.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
                let mut sent = 0u64;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let Ok(mut s) = TcpStream::connect(&addr) else {
                        continue;
                    };
                    let _ = s.set_write_timeout(Some(Duration::from_millis(200)));
                    let mut junk = Vec::new();
                    if x % 3 == 0 {
                        junk.extend(wire::encode_hello(&Hello {
                            version: wire::VERSION,
                            kind: ChannelKind::Urgent,
                            nonce: [0; 32],
                        }));
                    }
                    if x % 5 == 0 {
                        junk.extend(u32::MAX.to_le_bytes());
                    }
                    for _ in 0..(x % 200) {
                        x ^= x << 13;
                        x ^= x >> 7;
                        x ^= x << 17;
                        junk.push(x as u8);
                    }
                    let _ = s.write_all(&junk);
                    sent += 1;
                }
                sent
            })
        })
        .collect();
    let ok = dest(&addr, &["--workload", "random"]);
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let streams: u64 = hostile.into_iter().map(|h| h.join().unwrap()).sum();
    let r = json_report(&ok);
    assert_eq!(r["checksum_mismatches"], 0);
    assert_eq!(r["pages_verified"], r["pages_total"]);
    assert!(streams > 10, "only {streams} hostile streams were sent");
}

/// A destination killed mid-migration: the source notices (its
/// connection threads end) and serves the next destination whole.
#[test]
fn a_killed_destination_leaves_the_source_serving_others() {
    // Room for exactly one migration of two lanes (control, urgent and
    // two bulk connections).
    let src = source_with(&["--max-connections", "4"]);
    let mut victim = pagewire()
        .args([
            "dest",
            "--connect",
            &src.addr,
            "--lanes",
            "2",
            "--push-rate",
            "1MB",
            "--no-bubble",
        ])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    // Killed once it holds all four connections (or the test would pass
    // without a victim).
    wait_until("the victim's four connections", || {
        victim.try_wait().ok().flatten().is_some() || established_from_port(&src.addr) >= 4
    });
    assert!(
        victim.try_wait().expect("victim").is_none(),
        "the victim ended before it held its connections"
    );
    victim.kill().unwrap();
    victim.wait().unwrap();
    // Only if the victim's four connections were freed does this fit.
    let o = dest_once_not_busy(&src.addr, &["--lanes", "2"]);
    {
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let r: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        assert_eq!(r["checksum_mismatches"], 0);
    }
}
