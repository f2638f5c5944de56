//! `pagewire fc-handler` against Firecracker's side of the UFFD handler
//! protocol, played literally by this test process: it maps and registers
//! guest memory, creates the userfaultfd as Firecracker does, connects to
//! the handler's socket and sends the JSON mappings with the fd as
//! SCM_RIGHTS; then several threads touch the memory in several orders
//! and every byte is compared with the snapshot memory file served by a
//! real `pagewire source` process.

mod common;

use std::io::{BufRead, BufReader, IoSlice};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Output, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{huge_pages_or_skip, pagewire, spawn_source, Source};
use memmap2::MmapMut;
use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags};
use userfaultfd::{FeatureFlags, Uffd, UffdBuilder};

const PAGE: usize = 4096;

/// Deterministic guest contents: one page in five is all zero, and so is
/// the whole 2 MiB at 6 MiB (a zero huge page).
fn page_bytes(page: usize) -> Vec<u8> {
    if page % 5 == 3 || (1536..2048).contains(&page) {
        return vec![0; PAGE];
    }
    let mut x = (page as u64 + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    (0..PAGE)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// Writes the snapshot memory file: `pages` pages, regions packed.
fn memory_file(dir: &Path, pages: usize) -> (PathBuf, Vec<u8>) {
    let bytes: Vec<u8> = (0..pages).flat_map(page_bytes).collect();
    let path = dir.join("snapshot.mem");
    std::fs::write(&path, &bytes).expect("write memory file");
    (path, bytes)
}

fn tempdir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("pagewire-fc-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).expect("temp dir");
    d
}

/// Firecracker's side: guest memory regions and the userfaultfd over them.
struct Firecracker {
    regions: Vec<(MmapMut, u64)>,
    uffd: Uffd,
    page_size: usize,
}

const HUGE: usize = 2 << 20;

impl Firecracker {
    /// Maps one anonymous region per size and registers them all, as
    /// Firecracker does (non-blocking, EVENT_REMOVE, kernel faults too).
    fn new(sizes: &[usize]) -> Self {
        Self::with_pages(sizes, PAGE)
    }

    /// As [`Self::new`], backed by pages of `page_size` (2 MiB: hugetlbfs,
    /// as Firecracker's `huge_pages: "2M"`).
    fn with_pages(sizes: &[usize], page_size: usize) -> Self {
        let build = |user_only| {
            UffdBuilder::new()
                .close_on_exec(true)
                .non_blocking(true)
                .user_mode_only(user_only)
                .require_features(FeatureFlags::EVENT_REMOVE)
                .create()
        };
        let uffd = build(false).or_else(|_| build(true)).expect("userfaultfd");
        let mut off = 0u64;
        let regions = sizes
            .iter()
            .map(|&s| {
                let m = if page_size == HUGE {
                    memmap2::MmapOptions::new()
                        .len(s)
                        .huge(Some(21))
                        .map_anon()
                        .expect("map hugetlbfs guest region")
                } else {
                    MmapMut::map_anon(s).expect("map guest region")
                };
                uffd.register(m.as_ptr() as *mut libc::c_void, s)
                    .expect("register");
                let r = (m, off);
                off += s as u64;
                r
            })
            .collect();
        Self {
            regions,
            uffd,
            page_size,
        }
    }

    /// The JSON Firecracker sends, in one of its releases' shapes.
    fn mappings(&self, style: Style) -> String {
        let maps: Vec<serde_json::Value> = self
            .regions
            .iter()
            .map(|(m, off)| {
                let mut v = serde_json::json!({
                    "base_host_virt_addr": m.as_ptr() as u64,
                    "size": m.len(),
                    "offset": off,
                });
                match style {
                    Style::Current => {
                        v["page_size"] = self.page_size.into();
                        v["page_size_kib"] = self.page_size.into();
                    }
                    Style::KibOnly => v["page_size_kib"] = (self.page_size / 1024).into(),
                    Style::NoPageSize => {}
                }
                v
            })
            .collect();
        serde_json::Value::Array(maps).to_string()
    }

    /// Connects to the handler and sends the message with the fd.
    fn connect(&self, socket: &Path, json: &str, fd: Option<RawFd>) -> UnixStream {
        let t0 = Instant::now();
        let s = loop {
            match UnixStream::connect(socket) {
                Ok(s) => break s,
                Err(_) if t0.elapsed() < Duration::from_secs(20) => {
                    std::thread::sleep(Duration::from_millis(20))
                }
                Err(e) => panic!("handler socket never came up: {e}"),
            }
        };
        let iov = [IoSlice::new(json.as_bytes())];
        let fds = fd.map(|f| [f]);
        let cmsg: Vec<ControlMessage> = fds.iter().map(|f| ControlMessage::ScmRights(f)).collect();
        sendmsg::<()>(s.as_raw_fd(), &iov, &cmsg, MsgFlags::empty(), None).expect("sendmsg");
        s
    }

    fn page(&self, global: usize) -> &[u8] {
        let mut p = global;
        for (m, _) in &self.regions {
            let n = m.len() / PAGE;
            if p < n {
                return &m[p * PAGE..(p + 1) * PAGE];
            }
            p -= n;
        }
        panic!("page {global} out of range");
    }

    fn pages(&self) -> usize {
        self.regions.iter().map(|(m, _)| m.len() / PAGE).sum()
    }

    /// Drops `count` pages from region `region` at `first` (a balloon).
    fn dont_need(&self, region: usize, first: usize, count: usize) {
        let m = &self.regions[region].0;
        assert!((first + count) * PAGE <= m.len());
        // SAFETY: the range lies inside a live anonymous mapping this test
        // owns; MADV_DONTNEED only drops its contents, which are then
        // expected (and checked) to read as zeros.
        let r = unsafe {
            libc::madvise(
                m.as_ptr().add(first * PAGE) as *mut libc::c_void,
                count * PAGE,
                libc::MADV_DONTNEED,
            )
        };
        assert_eq!(r, 0, "madvise: {}", std::io::Error::last_os_error());
    }
}

#[derive(Clone, Copy, Debug)]
enum Style {
    Current,
    KibOnly,
    NoPageSize,
}

fn start_source(file: &Path) -> Source {
    let mut cmd = pagewire();
    cmd.args(["source", "--listen", "127.0.0.1:0", "--memory"])
        .arg(file);
    spawn_source(&mut cmd)
}

fn start_handler(socket: &Path, source: &str, extra: &[&str]) -> Child {
    pagewire()
        .args([
            "fc-handler",
            "--transport",
            "tcp",
            "--json",
            "--io-timeout",
            "2",
            "--source",
            source,
            "--socket",
        ])
        .arg(socket)
        .args(extra)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start fc-handler")
}

fn wait_bounded(child: Child, limit: Duration) -> Output {
    common::wait_bounded(child, limit, "fc-handler")
}

/// Touches every page from four threads in four orders and compares
/// each with the file; pages in `zeroed` must read as zeros.
fn touch_and_compare(fc: &Arc<Firecracker>, file: &Arc<Vec<u8>>, zeroed: &[usize]) {
    let n = fc.pages();
    let threads: Vec<_> = (0..4)
        .map(|t| {
            let (fc, file, zeroed) = (fc.clone(), file.clone(), zeroed.to_vec());
            std::thread::spawn(move || {
                let order: Vec<usize> = match t {
                    0 => (0..n).collect(),
                    1 => (0..n).rev().collect(),
                    2 => (0..n).map(|i| (i * 7919) % n).collect(),
                    _ => (0..n)
                        .map(|i| (i % 8) * n.div_ceil(8) + i / 8)
                        .filter(|&p| p < n)
                        .collect(),
                };
                let mut bad = Vec::new();
                for p in order {
                    let want: &[u8] = if zeroed.contains(&p) {
                        &[0u8; PAGE]
                    } else {
                        &file[p * PAGE..(p + 1) * PAGE]
                    };
                    if fc.page(p) != want {
                        bad.push(p);
                    }
                }
                bad
            })
        })
        .collect();
    for (t, h) in threads.into_iter().enumerate() {
        let bad = h.join().expect("toucher");
        assert!(
            bad.is_empty(),
            "thread {t}: {} pages differ from the file, first {:?}",
            bad.len(),
            &bad[..bad.len().min(8)]
        );
    }
}

fn serve_vm(style: Style, page_size: usize) {
    let dir = tempdir(&format!("{style:?}-{page_size}"));
    let sizes = if page_size == HUGE {
        [4 << 20, 2 << 20, 6 << 20, 4 << 20]
    } else {
        [4 << 20, 1 << 20, 3 << 20, 2 << 20]
    };
    let pages: usize = sizes.iter().sum::<usize>() / PAGE;
    // One guest page, in 4 KiB pages.
    let unit = page_size / PAGE;
    let (path, bytes) = memory_file(&dir, pages);
    let source = start_source(&path);
    let socket = dir.join("uffd.sock");
    // Capped so the push is seconds from the last region when the balloon
    // drops pages there.
    let handler = start_handler(&socket, &source.addr, &["--push-rate", "4MB"]);
    let fc = Arc::new(Firecracker::with_pages(&sizes, page_size));
    let vmm = fc.connect(&socket, &fc.mappings(style), Some(fc.uffd.as_raw_fd()));
    // A balloon drops pages the handler has not served yet: in the last
    // region, pushed last (the push is capped so it cannot be there yet).
    let first_balloon = (sizes[..3].iter().sum::<usize>()) / PAGE;
    let balloon = 64.max(unit);
    fc.dont_need(3, 0, balloon);
    let mut zeroed: Vec<usize> = (first_balloon..first_balloon + balloon).collect();
    touch_and_compare(&fc, &Arc::new(bytes.clone()), &zeroed);
    let out = wait_bounded(handler, Duration::from_secs(60));
    assert!(
        out.status.success(),
        "fc-handler failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON report");
    assert_eq!(
        report["pages_total"].as_u64(),
        Some((pages / unit) as u64),
        "{report}"
    );
    assert_eq!(report["duplicate_pages"].as_u64(), Some(0), "{report}");
    // The balloon's pages were never fetched from the source.
    assert!(
        report["removed_pages"].as_u64().unwrap_or(0) >= 1,
        "{report}"
    );
    // After the migration, memory is ordinary memory: dropped pages read
    // as zeros, the rest still matches the file.
    fc.dont_need(0, unit, unit);
    zeroed.extend(unit..2 * unit);
    touch_and_compare(&fc, &Arc::new(bytes), &zeroed);
    drop(vmm);
    drop(source);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_firecracker_vm_is_served_with_the_current_handshake() {
    serve_vm(Style::Current, PAGE);
}

#[test]
fn a_firecracker_vm_is_served_with_older_handshakes() {
    serve_vm(Style::KibOnly, PAGE);
    serve_vm(Style::NoPageSize, PAGE);
}

/// Guest memory on 2 MiB hugetlbfs pages (Firecracker supports those only
/// with a UFFD backend): each fault fetches a whole huge page, zero pages
/// are copied (hugetlbfs has no UFFDIO_ZEROPAGE), a balloon drops whole
/// huge pages.
#[test]
fn a_firecracker_vm_on_hugetlbfs_is_served() {
    if !huge_pages_or_skip(8) {
        return;
    }
    serve_vm(Style::Current, HUGE);
    serve_vm(Style::KibOnly, HUGE);
}

/// Runs the handler against a handshake that must be refused and returns
/// its stderr; the handler must exit non-zero, never hang.
fn refused(name: &str, sizes: &[usize], make: impl Fn(&Firecracker) -> (String, bool)) -> String {
    let dir = tempdir(name);
    let pages: usize = sizes.iter().sum::<usize>() / PAGE;
    let (path, _) = memory_file(&dir, pages);
    let source = start_source(&path);
    let socket = dir.join("uffd.sock");
    let handler = start_handler(&socket, &source.addr, &[]);
    let fc = Firecracker::new(sizes);
    let (json, with_fd) = make(&fc);
    let vmm = fc.connect(&socket, &json, with_fd.then(|| fc.uffd.as_raw_fd()));
    // Nothing more will come (a truncated message must not be waited on).
    vmm.shutdown(std::net::Shutdown::Write).expect("shutdown");
    let out = wait_bounded(handler, Duration::from_secs(30));
    assert!(
        !out.status.success(),
        "{name}: handler accepted a bad handshake"
    );
    let _ = std::fs::remove_dir_all(&dir);
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn bad_handshakes_are_refused_with_clear_errors() {
    let sizes = [1 << 20, 1 << 20];
    let e = refused("nofd", &sizes, |fc| (fc.mappings(Style::Current), false));
    assert!(e.contains("no userfaultfd"), "{e}");
    let e = refused("json", &sizes, |_| {
        ("[{\"base_host_virt_addr\": 1".into(), true)
    });
    assert!(e.contains("JSON") || e.contains("closed the socket"), "{e}");
    let e = refused("overlap", &sizes, |fc| {
        let mut v: serde_json::Value = serde_json::from_str(&fc.mappings(Style::Current)).unwrap();
        v[1]["base_host_virt_addr"] = v[0]["base_host_virt_addr"].clone();
        (v.to_string(), true)
    });
    assert!(e.contains("overlap"), "{e}");
    let e = refused("size", &sizes, |fc| {
        let mut v: serde_json::Value = serde_json::from_str(&fc.mappings(Style::Current)).unwrap();
        v[1]["size"] = (4096 * 10 + 100).into();
        (v.to_string(), true)
    });
    assert!(e.contains("not a multiple of the page size"), "{e}");
    let e = refused("hugepage", &sizes, |fc| {
        let mut v: serde_json::Value = serde_json::from_str(&fc.mappings(Style::Current)).unwrap();
        v[0]["page_size"] = 3000.into();
        (v.to_string(), true)
    });
    assert!(e.contains("page size"), "{e}");
    // Only part of the file is described: does not match the source.
    let e = refused("short", &sizes, |fc| {
        let mut v: serde_json::Value = serde_json::from_str(&fc.mappings(Style::Current)).unwrap();
        v.as_array_mut().unwrap().pop();
        (v.to_string(), true)
    });
    assert!(e.contains("does not match the source"), "{e}");
}

#[test]
fn memory_not_registered_with_the_uffd_is_refused() {
    let dir = tempdir("unreg");
    let sizes = [1 << 20, 1 << 20];
    let (path, _) = memory_file(&dir, 512);
    let source = start_source(&path);
    let socket = dir.join("uffd.sock");
    let handler = start_handler(&socket, &source.addr, &[]);
    let fc = Firecracker::new(&sizes);
    let (m, _) = &fc.regions[1];
    fc.uffd
        .unregister(m.as_ptr() as *mut libc::c_void, m.len())
        .expect("unregister");
    let _vmm = fc.connect(
        &socket,
        &fc.mappings(Style::Current),
        Some(fc.uffd.as_raw_fd()),
    );
    let out = wait_bounded(handler, Duration::from_secs(30));
    let e = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && e.contains("not registered with userfaultfd"),
        "{e}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// Firecracker closing its socket mid-migration means the VM is gone: the
/// handler stops and says so.
#[test]
fn the_handler_stops_when_firecracker_goes_away() {
    let dir = tempdir("gone");
    let sizes = [8 << 20];
    let (path, _) = memory_file(&dir, 2048);
    let source = start_source(&path);
    let socket = dir.join("uffd.sock");
    let handler = start_handler(&socket, &source.addr, &["--push-rate", "1MB"]);
    let fc = Firecracker::new(&sizes);
    let vmm = fc.connect(
        &socket,
        &fc.mappings(Style::Current),
        Some(fc.uffd.as_raw_fd()),
    );
    assert_eq!(fc.page(1), &page_bytes(1)[..]);
    drop(vmm);
    let out = wait_bounded(handler, Duration::from_secs(30));
    let e = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "{e}");
    assert!(e.contains("VM is gone"), "{e}");
    drop(source);
    let _ = std::fs::remove_dir_all(&dir);
}

/// The source dies mid-migration: the handler reports it, yet keeps the
/// VM's memory registered, so a vCPU blocked on a missing page stays
/// blocked instead of reading zeros, until the VM is stopped.
#[test]
fn a_dead_source_never_hands_the_vm_zero_pages() {
    let dir = tempdir("dead");
    let sizes = [8 << 20];
    let (path, _) = memory_file(&dir, 2048);
    let source = start_source(&path);
    let socket = dir.join("uffd.sock");
    let mut handler = start_handler(
        &socket,
        &source.addr,
        &["--push-rate", "1MB", "--no-bubble"],
    );
    let fc = Arc::new(Firecracker::new(&sizes));
    let vmm = fc.connect(
        &socket,
        &fc.mappings(Style::Current),
        Some(fc.uffd.as_raw_fd()),
    );
    assert_eq!(fc.page(1), &page_bytes(1)[..]);
    drop(source);
    // Read the handler's stderr until it reports the failure, on a thread
    // so a silent handler fails the test instead of hanging it.
    let err = BufReader::new(handler.stderr.take().expect("stderr"));
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in err.lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let t0 = Instant::now();
    let mut lines = String::new();
    // A vCPU touches a page that never arrived (late in the sweep and
    // not a zero page; the capped
    // push cannot have reached it).
    let toucher = {
        let fc = fc.clone();
        std::thread::spawn(move || fc.page(1534).to_vec())
    };
    while !lines.contains("stays registered") {
        let left = Duration::from_secs(30).saturating_sub(t0.elapsed());
        match rx.recv_timeout(left) {
            Ok(line) => {
                lines.push_str(&line);
                lines.push('\n');
            }
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                panic!("no failure reported within 30 s: {lines}")
            }
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
                panic!("handler exited without reporting: {lines}")
            }
        }
    }
    assert!(lines.contains("migration failed"), "{lines}");
    std::thread::sleep(Duration::from_millis(500));
    assert!(
        handler.try_wait().expect("wait").is_none(),
        "the handler exited and released the VM's memory: {lines}"
    );
    assert!(
        !toucher.is_finished(),
        "a vCPU read a page that never arrived"
    );
    // The VM is stopped: the handler ends.
    drop(vmm);
    let t0 = Instant::now();
    let status = loop {
        if let Some(s) = handler.try_wait().expect("wait") {
            break s;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "handler did not end after the VM went away"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(!status.success());
    // This process is "Firecracker": its own uffd copy keeps the toucher
    // blocked (it is never served). Leak both so it never reads zeros.
    assert!(
        !toucher.is_finished(),
        "a vCPU read a page that never arrived"
    );
    std::mem::forget(toucher);
    std::mem::forget(fc);
    let _ = std::fs::remove_dir_all(&dir);
}
