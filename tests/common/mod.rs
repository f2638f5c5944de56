//! Helpers for the end-to-end tests: real `pagewire` processes with
//! bounded waits.

#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// The `pagewire` binary under test.
pub fn pagewire() -> Command {
    Command::new(env!("CARGO_BIN_EXE_pagewire"))
}

/// A source process, killed on drop.
pub struct Source {
    pub child: Child,
    pub addr: String,
}

impl Drop for Source {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts `pagewire source` serving a synthetic guest of `size` on a free
/// loopback port and returns once it listens.
pub fn start_source(size: &str, seed: u64) -> Source {
    let mut cmd = pagewire();
    cmd.args(["source", "--listen", "127.0.0.1:0", "--synthetic", size])
        .args(["--seed", &seed.to_string()]);
    spawn_source(&mut cmd)
}

/// Spawns a source command and returns once it printed where it listens.
pub fn spawn_source(cmd: &mut Command) -> Source {
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start source");
    let Some(line) = first_line_within(child.stdout.take().unwrap(), Duration::from_secs(60))
    else {
        let _ = child.kill();
        panic!("the source did not say where it listens within a minute");
    };
    let addr = line
        .trim()
        .strip_prefix("listening on ")
        .expect("listening line")
        .to_string();
    Source { child, addr }
}

/// Runs a command to completion, failing the test if it takes longer than
/// `limit` (a hang is a bug).
pub fn run_bounded(cmd: &mut Command, limit: Duration) -> (Output, Duration) {
    let t0 = Instant::now();
    let child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    let out = wait_bounded(child, limit, &format!("{cmd:?}"));
    (out, t0.elapsed())
}

/// Waits for a child started with piped stdout and stderr, failing the
/// test after `limit` (a hang is a bug); `what` names it in that failure.
pub fn wait_bounded(mut child: Child, limit: Duration, what: &str) -> Output {
    let t0 = Instant::now();
    // Drain pipes on threads so a chatty child cannot block.
    let mut so = child.stdout.take().expect("piped stdout");
    let mut se = child.stderr.take().expect("piped stderr");
    let out_t = std::thread::spawn(move || {
        let mut v = Vec::new();
        std::io::Read::read_to_end(&mut so, &mut v).ok();
        v
    });
    let err_t = std::thread::spawn(move || {
        let mut v = Vec::new();
        std::io::Read::read_to_end(&mut se, &mut v).ok();
        v
    });
    let status = loop {
        if let Some(s) = child.try_wait().expect("wait") {
            break s;
        }
        if t0.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            panic!("command did not finish within {limit:?}: {what}");
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    Output {
        status,
        stdout: out_t.join().unwrap(),
        stderr: err_t.join().unwrap(),
    }
}

/// Asserts a `--json` run exited 0 and returns its report.
pub fn json_report(out: &Output) -> serde_json::Value {
    assert!(
        out.status.success(),
        "failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("a JSON report")
}

/// Runs `pagewire dest --json` against `addr` with extra args and returns
/// the parsed report; fails the test on a non-zero exit.
pub fn dest_json(addr: &str, args: &[&str]) -> serde_json::Value {
    let (out, _) = run_bounded(
        pagewire()
            .args(["dest", "--connect", addr, "--json"])
            .args(args),
        Duration::from_secs(120),
    );
    assert!(
        out.status.success(),
        "dest failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("dest --json prints JSON")
}

pub fn u(v: &serde_json::Value, key: &str) -> u64 {
    v[key]
        .as_u64()
        .unwrap_or_else(|| panic!("report lacks {key}: {v}"))
}

/// The first line `from` gives, read on a thread so that a child that
/// says nothing fails the test after `limit` instead of hanging it;
/// `None` then.
pub fn first_line_within(
    from: impl std::io::Read + Send + 'static,
    limit: Duration,
) -> Option<String> {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut line = String::new();
        let _ = BufReader::new(from).read_line(&mut line);
        let _ = tx.send(line);
    });
    rx.recv_timeout(limit).ok()
}

/// Polls `done` every 20 ms until it holds; fails the test, naming
/// `what`, if it does not within a minute. Callers add to `done` whatever
/// says the wait is moot (the run they wait for has ended), so that its
/// own error is what the test reports.
pub fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while !done() {
        assert!(Instant::now() < deadline, "{what}: not within a minute");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// TCP connections established on this host from the local port of
/// `addr` (`host:port`, or a bare port): a server's accepted connections,
/// as `ss` (iproute2) lists them.
pub fn established_from_port(addr: &str) -> usize {
    let port = addr.rsplit(':').next().unwrap_or_default();
    let out = Command::new("ss")
        .args(["-Htn", "state", "established"])
        .arg(format!("( sport = :{port} )"))
        .output()
        .expect("run ss (iproute2)");
    assert!(out.status.success(), "ss failed: {out:?}");
    String::from_utf8_lossy(&out.stdout).lines().count()
}

/// A relay on loopback to `target`: each connection made to the returned
/// address is connected on to `target` (both with `TCP_NODELAY`), and
/// `pair` gets the two streams, client first, to pass bytes between.
/// Connections `target` refuses are dropped.
pub fn relay(
    target: String,
    pair: impl Fn(std::net::TcpStream, std::net::TcpStream) + Send + 'static,
) -> String {
    use std::net::{TcpListener, TcpStream};
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap().to_string();
    std::thread::spawn(move || {
        for client in l.incoming().flatten() {
            let Ok(server) = TcpStream::connect(&target) else {
                continue;
            };
            let _ = client.set_nodelay(true);
            let _ = server.set_nodelay(true);
            pair(client, server);
        }
    });
    addr
}

/// A relay on loopback to `target` that passes the source's bytes on at
/// most `chunk` at a time, each held for `pause` first: a long link
/// (large chunks, a delay) or a slow one (small chunks), without netem.
/// Requests go through as they come.
pub fn slow_relay(target: String, chunk: usize, pause: Duration) -> String {
    use std::io::{Read, Write};
    relay(target, move |client, server| {
        let (mut c_in, mut s_out) = (client.try_clone().unwrap(), server.try_clone().unwrap());
        std::thread::spawn(move || {
            let mut b = vec![0u8; 1 << 16];
            while let Ok(n @ 1..) = c_in.read(&mut b) {
                if s_out.write_all(&b[..n]).is_err() {
                    break;
                }
            }
        });
        let (mut s_in, mut c_out) = (server, client);
        std::thread::spawn(move || {
            let mut b = vec![0u8; chunk];
            while let Ok(n @ 1..) = s_in.read(&mut b) {
                std::thread::sleep(pause);
                if c_out.write_all(&b[..n]).is_err() {
                    break;
                }
            }
        });
    })
}

/// Makes sure `n` free 2 MiB huge pages exist (as root, by raising
/// vm.nr_hugepages); false when they cannot be had.
pub fn reserve_huge_pages(n: usize) -> bool {
    let free = || {
        let m = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
        let field = |name: &str| {
            m.lines()
                .find_map(|l| l.strip_prefix(name))
                .and_then(|v| v.trim().parse::<usize>().ok())
                .unwrap_or(0)
        };
        field("HugePages_Free:").saturating_sub(field("HugePages_Rsvd:"))
    };
    if free() >= n {
        return true;
    }
    let total: usize = std::fs::read_to_string("/proc/sys/vm/nr_hugepages")
        .ok()
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0);
    let _ = std::fs::write("/proc/sys/vm/nr_hugepages", (total + n).to_string());
    free() >= n
}

/// [`reserve_huge_pages`], or, where that fails for a user who is not
/// root, a note that the test is skipped (false). Root must get them.
pub fn huge_pages_or_skip(n: usize) -> bool {
    if reserve_huge_pages(n) {
        return true;
    }
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    assert_ne!(euid, 0, "root could not reserve {n} huge pages");
    eprintln!("SKIPPED: no free 2 MiB huge pages and not root to reserve them");
    false
}
