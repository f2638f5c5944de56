//! Recovery after link loss: a migration through a TCP proxy this test
//! controls, which at seeded random moments cuts every connection, stops
//! forwarding for a while, or stops the source process (SIGSTOP, then
//! SIGCONT). The migration must end with every page verified, none lost,
//! none installed twice; pages asked for again after a cut are counted
//! apart.

mod common;

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

/// A relay between destination and source that can be told to cut or
/// stall every connection.
struct Proxy {
    addr: String,
    pairs: Arc<Mutex<Vec<(TcpStream, TcpStream)>>>,
    paused: Arc<AtomicBool>,
}

fn pump(mut from: TcpStream, mut to: TcpStream, paused: Arc<AtomicBool>) {
    let mut buf = vec![0u8; 64 << 10];
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        while paused.load(Ordering::Relaxed) {
            std::thread::sleep(Duration::from_millis(2));
        }
        if to.write_all(&buf[..n]).is_err() {
            break;
        }
    }
    let _ = to.shutdown(Shutdown::Write);
}

impl Proxy {
    fn start(upstream: String) -> Self {
        let pairs: Arc<Mutex<Vec<(TcpStream, TcpStream)>>> = Arc::default();
        let paused = Arc::new(AtomicBool::new(false));
        let (p, z) = (pairs.clone(), paused.clone());
        let addr = relay(upstream, move |client, server| {
            let (c2, s2) = (client.try_clone().unwrap(), server.try_clone().unwrap());
            p.lock()
                .unwrap()
                .push((client.try_clone().unwrap(), server.try_clone().unwrap()));
            let (z1, z2) = (z.clone(), z.clone());
            std::thread::spawn(move || pump(client, server, z1));
            std::thread::spawn(move || pump(s2, c2, z2));
        });
        Self {
            addr,
            pairs,
            paused,
        }
    }

    /// Waits until the destination has opened `n` connections through the
    /// proxy (control, fault channel and one per lane: the migration is
    /// running, so a disruption tests recovery rather than the first
    /// connect, which has none), or until `ended` (the destination is
    /// gone: its own error is what the test reports). Panics after a
    /// minute without either.
    fn wait_for_connections(
        pairs: &Mutex<Vec<(TcpStream, TcpStream)>>,
        n: usize,
        ended: &AtomicBool,
    ) {
        wait_until(&format!("the destination's {n} connections"), || {
            ended.load(Ordering::SeqCst) || pairs.lock().unwrap().len() >= n
        });
    }

    /// Closes every connection, both ways (a link reset).
    fn cut(&self) -> usize {
        let mut pairs = self.pairs.lock().unwrap();
        for (c, s) in pairs.iter() {
            let _ = c.shutdown(Shutdown::Both);
            let _ = s.shutdown(Shutdown::Both);
        }
        let n = pairs.len();
        pairs.clear();
        n
    }
}

/// Pusher lanes of the destinations here...
const LANES: usize = 2;
/// ...and the connections they open: control, faults and one per lane.
const CONNECTIONS: usize = 2 + LANES;

#[test]
fn a_migration_survives_twenty_link_cuts_stalls_and_source_stops() {
    let src = start_source("48MiB", 5);
    let proxy = Proxy::start(src.addr.clone());
    let pid = Pid::from_raw(src.child.id() as i32);
    let done = Arc::new(AtomicBool::new(false));
    let events = Arc::new(AtomicU64::new(0));
    let chaos = {
        let (done, events) = (done.clone(), events.clone());
        let (pairs, paused) = (proxy.pairs.clone(), proxy.paused.clone());
        let proxy = Proxy {
            addr: proxy.addr.clone(),
            pairs,
            paused,
        };
        std::thread::spawn(move || {
            let mut x: u64 = 0x5eed_1234_abcd_0001;
            let mut next = move |n: u64| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x % n
            };
            let mut log = Vec::new();
            // Let the migration start first.
            Proxy::wait_for_connections(&proxy.pairs, CONNECTIONS, &done);
            while !done.load(Ordering::SeqCst) {
                std::thread::sleep(Duration::from_millis(40 + next(150)));
                if done.load(Ordering::SeqCst) {
                    break;
                }
                match next(10) {
                    0..=4 => {
                        let n = proxy.cut();
                        log.push(format!("cut {n}"));
                    }
                    5..=7 => {
                        let ms = 100 + next(400);
                        proxy.paused.store(true, Ordering::SeqCst);
                        std::thread::sleep(Duration::from_millis(ms));
                        proxy.paused.store(false, Ordering::SeqCst);
                        log.push(format!("stall {ms} ms"));
                    }
                    _ => {
                        let ms = 200 + next(900);
                        let _ = kill(pid, Signal::SIGSTOP);
                        std::thread::sleep(Duration::from_millis(ms));
                        let _ = kill(pid, Signal::SIGCONT);
                        log.push(format!("SIGSTOP {ms} ms"));
                    }
                }
                events.fetch_add(1, Ordering::SeqCst);
            }
            log
        })
    };
    let (out, took) = run_bounded(
        pagewire().args([
            "dest",
            "--connect",
            &proxy.addr,
            "--json",
            "--io-timeout",
            "1",
            "--recover-timeout",
            "60",
            "--lanes",
            &LANES.to_string(),
            // Slow enough that the pages no fault asks for take about
            // 4.6 s to come: the twenty events (the last about 8 s in,
            // with 5.3 s of stops, so 2.5 s of progress) land before the
            // migration ends, with room for a fast machine. (At 5 MB/s,
            // 2.8 s, the margin was 15 %.)
            "--push-rate",
            "3MB",
            "--workload",
            "random",
            "--think-us",
            "50",
        ]),
        Duration::from_secs(240),
    );
    done.store(true, Ordering::SeqCst);
    let log = chaos.join().unwrap();
    let _ = kill(pid, Signal::SIGCONT);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "dest failed after {log:?}: {stderr}");
    let r: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let n = events.load(Ordering::SeqCst);
    eprintln!(
        "{n} events in {took:?}: {log:?}\nlink losses {}, reconnects {}, resent pages {}, recovery {}",
        r["link_losses"], r["reconnects"], r["resent_pages"], r["recovery_us"]
    );
    assert!(
        n >= 20,
        "only {n} events before the migration ended: {log:?}"
    );
    assert_eq!(r["checksum_mismatches"], 0, "{r}");
    assert_eq!(r["duplicate_pages"], 0, "{r}");
    assert_eq!(r["pages_verified"], r["pages_total"], "{r}");
    assert!(u(&r, "link_losses") >= 1 && u(&r, "reconnects") >= 1, "{r}");
}

#[test]
fn a_link_that_never_comes_back_fails_at_the_recovery_deadline() {
    let src = start_source("32MiB", 6);
    let proxy = Proxy::start(src.addr.clone());
    let pid = Pid::from_raw(src.child.id() as i32);
    let pairs = proxy.pairs.clone();
    let ended = Arc::new(AtomicBool::new(false));
    let gone = ended.clone();
    let stopper = std::thread::spawn(move || {
        Proxy::wait_for_connections(&pairs, CONNECTIONS, &gone);
        std::thread::sleep(Duration::from_millis(100));
        // Stopped for good (until the test ends): the link never answers.
        let _ = kill(pid, Signal::SIGSTOP);
    });
    let (out, took) = run_bounded(
        pagewire().args([
            "dest",
            "--connect",
            &proxy.addr,
            "--io-timeout",
            "1",
            "--recover-timeout",
            "3",
            "--lanes",
            &LANES.to_string(),
            "--push-rate",
            "5MB",
        ]),
        Duration::from_secs(60),
    );
    ended.store(true, Ordering::SeqCst);
    stopper.join().unwrap();
    let _ = kill(pid, Signal::SIGCONT);
    let e = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{e}");
    assert!(e.contains("not back within 3 s"), "{e}");
    assert!(took < Duration::from_secs(30), "took {took:?}");
}

/// A source that completes every handshake but never answers a fetch (an
/// MTU black hole, a hung disk): the channels reconnect, yet the recovery
/// deadline runs from the first loss with no reply since, so the
/// migration fails in bounded time instead of reconnecting forever.
#[test]
fn a_source_that_accepts_but_never_answers_fails_at_the_deadline() {
    use pagewire_transport::wire::{self, ChannelKind, Welcome};
    use pagewire_transport::{MemoryLayout, SourceInfo, ZeroMap};
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap().to_string();
    std::thread::spawn(move || {
        for s in l.incoming().flatten() {
            std::thread::spawn(move || {
                let mut s = s;
                let Ok((_, body)) = wire::read_frame(&mut s, 1 << 10) else {
                    return;
                };
                let Ok(hello) = wire::decode_hello(&body) else {
                    return;
                };
                let layout = MemoryLayout::single(64 * 4096).unwrap();
                let info = (hello.kind == ChannelKind::Control).then(|| SourceInfo {
                    zero: ZeroMap::new(layout.total_pages()),
                    layout,
                });
                let w = Welcome {
                    version: wire::VERSION,
                    session: 42,
                    info,
                };
                let _ = s.write_all(&wire::encode_welcome(&w));
                // Read requests forever, answer none.
                let mut sink = [0u8; 4096];
                while matches!(s.read(&mut sink), Ok(n) if n > 0) {}
            });
        }
    });
    let (out, took) = run_bounded(
        pagewire().args([
            "dest",
            "--connect",
            &addr,
            "--io-timeout",
            "1",
            "--recover-timeout",
            "3",
        ]),
        Duration::from_secs(60),
    );
    let e = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{e}");
    assert!(e.contains("not back within 3 s"), "{e}");
    assert!(took < Duration::from_secs(20), "took {took:?}");
}
