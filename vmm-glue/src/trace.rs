//! Page-access traces of real programs, recorded and replayed.
//!
//! Post-copy faults on the first touch of each page, so a trace is the
//! order in which a program first touches its anonymous memory (heap,
//! anonymous mappings, stack). [`record`] runs the program and samples
//! `/proc/PID/pagemap` every few hundred microseconds: a page that turned
//! present since the last sample was first touched in between. Within one
//! sample the true order is unknown and pages are listed by address: the
//! trace is exact to one sampling interval. Addresses are then packed
//! into one page space, mapping by mapping in address order, so the
//! replay keeps the program's layout (its heap next to its heap).
//!
//! The file format is text: a `pagewire-trace 1 PAGES` header (PAGES is
//! the span of the page space), then one `FIRST COUNT` run per line in
//! touch order; `#` starts a comment line.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

/// Why a trace could not be recorded, read or written.
#[derive(Debug, thiserror::Error)]
pub enum TraceError {
    /// A file or `/proc` read failed.
    #[error("{what}: {error}")]
    Io {
        /// What was being done.
        what: String,
        /// Why.
        error: std::io::Error,
    },
    /// The file is not a trace.
    #[error("trace line {line}: {why}")]
    Format {
        /// 1-based line.
        line: usize,
        /// What is wrong.
        why: String,
    },
    /// The program did not succeed.
    #[error("the traced program failed: {0}")]
    Program(String),
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> TraceError {
    let what = what.into();
    move |error| TraceError::Io { what, error }
}

/// A recorded page-access order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Trace {
    /// Pages in the trace's page space.
    pub span: u64,
    /// Pages in first-touch order, each at most once, all below `span`.
    pub pages: Vec<u64>,
    /// What was traced (a comment in the file).
    pub command: String,
    /// The trace's name: its file name without extension.
    pub name: String,
}

impl Trace {
    /// Reads a trace file.
    pub fn load(path: &Path) -> Result<Self, TraceError> {
        let f = File::open(path).map_err(io(format!("open {}", path.display())))?;
        let mut t = Self::parse(BufReader::new(f))?;
        t.name = path
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default();
        Ok(t)
    }

    /// Parses a trace.
    pub fn parse(r: impl BufRead) -> Result<Self, TraceError> {
        let mut span = None;
        let mut pages = Vec::new();
        let mut command = String::new();
        // Bounded by the file, never by the span it claims.
        let mut seen: std::collections::HashSet<u64> = std::collections::HashSet::new();
        for (i, line) in r.lines().enumerate() {
            let line = line.map_err(io("read trace"))?;
            let bad = |why: String| TraceError::Format { line: i + 1, why };
            let line = line.trim();
            if let Some(c) = line.strip_prefix('#') {
                if command.is_empty() {
                    command = c.trim().trim_start_matches("command:").trim().to_string();
                }
                continue;
            }
            if line.is_empty() {
                continue;
            }
            let mut f = line.split_whitespace();
            let Some(s) = span else {
                if f.next() != Some("pagewire-trace") || f.next() != Some("1") {
                    return Err(bad("not a pagewire-trace 1 file".into()));
                }
                let n: u64 = f
                    .next()
                    .and_then(|n| n.parse().ok())
                    .filter(|&n| n > 0)
                    .ok_or_else(|| bad("bad page span".into()))?;
                span = Some(n);
                continue;
            };
            let (Some(first), Some(count), None) = (f.next(), f.next(), f.next()) else {
                return Err(bad("expected FIRST COUNT".into()));
            };
            let first: u64 = first.parse().map_err(|_| bad("bad first page".into()))?;
            let count: u64 = count.parse().map_err(|_| bad("bad count".into()))?;
            if count == 0 || first.checked_add(count).is_none_or(|end| end > s) {
                return Err(bad(format!("run {first}+{count} outside {s} pages")));
            }
            for p in first..first + count {
                if !seen.insert(p) {
                    return Err(bad(format!("page {p} twice")));
                }
                pages.push(p);
            }
        }
        let span = span.ok_or(TraceError::Format {
            line: 0,
            why: "empty trace".into(),
        })?;
        Ok(Self {
            span,
            pages,
            command,
            name: String::new(),
        })
    }

    /// Writes the trace in its text format.
    pub fn save(&self, path: &Path) -> Result<(), TraceError> {
        let mut out = String::new();
        out.push_str(&format!(
            "# command: {}\n# first-touch order of anonymous memory, sampled from /proc/PID/pagemap\npagewire-trace 1 {}\n",
            self.command, self.span
        ));
        let mut run: Option<(u64, u64)> = None;
        for &p in &self.pages {
            run = match run {
                Some((f, c)) if f + c == p => Some((f, c + 1)),
                Some((f, c)) => {
                    out.push_str(&format!("{f} {c}\n"));
                    Some((p, 1))
                }
                None => Some((p, 1)),
            };
        }
        if let Some((f, c)) = run {
            out.push_str(&format!("{f} {c}\n"));
        }
        let mut f = File::create(path).map_err(io(format!("create {}", path.display())))?;
        f.write_all(out.as_bytes())
            .map_err(io(format!("write {}", path.display())))
    }
}

/// One anonymous mapping of the traced process.
#[derive(Debug, Clone, Copy)]
struct Vma {
    start: u64,
    end: u64,
}

/// Anonymous, writable mappings of `pid` (heap, stack, anonymous mmaps).
fn anon_vmas(pid: u32) -> Result<Vec<Vma>, TraceError> {
    let mut s = String::new();
    File::open(format!("/proc/{pid}/maps"))
        .and_then(|mut f| f.read_to_string(&mut s))
        .map_err(io("read maps"))?;
    let mut v = Vec::new();
    for line in s.lines() {
        let mut f = line.split_whitespace();
        let (Some(range), Some(perms), Some(_off), Some(_dev), Some(inode)) =
            (f.next(), f.next(), f.next(), f.next(), f.next())
        else {
            continue;
        };
        let name = f.next().unwrap_or("");
        let anon = inode == "0" && (name.is_empty() || name == "[heap]" || name == "[stack]");
        if !anon || !perms.starts_with("rw") {
            continue;
        }
        let Some((a, b)) = range.split_once('-') else {
            continue;
        };
        if let (Ok(start), Ok(end)) = (u64::from_str_radix(a, 16), u64::from_str_radix(b, 16)) {
            v.push(Vma { start, end });
        }
    }
    Ok(v)
}

/// Runs `cmd` and records the order in which it first touches its
/// anonymous memory, sampling every `interval`.
///
/// Pages first touched in the last interval before the program exits are
/// not seen (its memory is gone by the next sample).
pub fn record(mut cmd: Command, interval: Duration) -> Result<Trace, TraceError> {
    const PAGE: u64 = 4096;
    /// Pagemap entries read at once.
    const CHUNK_PAGES: u64 = 1 << 16;
    let command = format!("{cmd:?}");
    let mut child = cmd.spawn().map_err(io("start the program"))?;
    let pid = child.id();
    let pagemap = File::open(format!("/proc/{pid}/pagemap")).map_err(io("open pagemap"))?;
    // Address page -> touched already.
    let mut present: std::collections::HashSet<u64> = std::collections::HashSet::new();
    let mut order: Vec<u64> = Vec::new();
    // Every anonymous mapping ever seen, by start (grown, never shrunk).
    let mut spans: BTreeMap<u64, u64> = BTreeMap::new();
    let mut buf: Vec<u8> = Vec::new();
    loop {
        let t0 = Instant::now();
        let exited = child.try_wait().map_err(io("wait for the program"))?;
        let Ok(vmas) = anon_vmas(pid) else { break };
        for vma in vmas {
            let e = spans.entry(vma.start).or_insert(vma.end);
            *e = (*e).max(vma.end);
            // In chunks: a large mapping (reserved, mostly untouched)
            // must not size the buffer.
            let pages = (vma.end - vma.start) / PAGE;
            let mut at = 0u64;
            while at < pages {
                let n = (pages - at).min(CHUNK_PAGES);
                buf.resize(n as usize * 8, 0);
                let first = vma.start / PAGE + at;
                at += n;
                // A mapping that went away mid-read only ends this sample.
                if pagemap.read_exact_at(&mut buf, first * 8).is_err() {
                    break;
                }
                for (i, e) in buf.chunks_exact(8).enumerate() {
                    let v = u64::from_le_bytes([e[0], e[1], e[2], e[3], e[4], e[5], e[6], e[7]]);
                    // Bit 63: present; bit 62: swapped (touched, then paged out).
                    if v & (3 << 62) != 0 {
                        let page = first + i as u64;
                        if present.insert(page) {
                            order.push(page);
                        }
                    }
                }
            }
        }
        if let Some(status) = exited {
            if !status.success() {
                return Err(TraceError::Program(format!("{command}: {status}")));
            }
            break;
        }
        if let Some(rest) = interval.checked_sub(t0.elapsed()) {
            std::thread::sleep(rest);
        }
    }
    let status = child.wait().map_err(io("wait for the program"))?;
    if !status.success() {
        return Err(TraceError::Program(format!("{command}: {status}")));
    }
    // Pack the mappings (merged where they overlap) into one page space.
    let mut packed: Vec<(u64, u64, u64)> = Vec::new(); // (start, end, base)
    let mut next = 0u64;
    for (&start, &end) in &spans {
        match packed.last_mut() {
            Some(last) if start <= last.1 => {
                if end > last.1 {
                    next += (end - last.1) / PAGE;
                    last.1 = end;
                }
            }
            _ => {
                packed.push((start, end, next));
                next += (end - start) / PAGE;
            }
        }
    }
    let index = |page: u64| {
        let addr = page * PAGE;
        let i = packed.partition_point(|s| s.0 <= addr).checked_sub(1)?;
        let (start, end, base) = packed[i];
        (addr < end).then(|| base + (addr - start) / PAGE)
    };
    let pages = order.into_iter().filter_map(index).collect();
    Ok(Trace {
        span: next.max(1),
        pages,
        command,
        name: String::new(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn traces_round_trip_and_bad_files_are_refused() {
        let t = Trace {
            span: 100,
            pages: vec![5, 6, 7, 1, 99, 8],
            command: "test".into(),
            name: String::new(),
        };
        let path = std::env::temp_dir().join(format!("pw-trace-{}", std::process::id()));
        t.save(&path).unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(text.contains("\n5 3\n1 1\n99 1\n8 1\n"), "{text}");
        let back = Trace::load(&path).unwrap();
        assert_eq!(
            (back.span, &back.pages, &back.command),
            (t.span, &t.pages, &t.command)
        );
        assert!(back.name.starts_with("pw-trace-"));
        std::fs::remove_file(&path).unwrap();
        for bad in [
            "",
            "pagewire-trace 2 10\n",
            "pagewire-trace 1 0\n",
            "pagewire-trace 1 10\n9 2\n",
            "pagewire-trace 1 10\n1 1\n0 2\n",
            "pagewire-trace 1 10\n1\n",
            "pagewire-trace 1 10\n18446744073709551615 2\n",
            "pagewire-trace 1 18446744073709551615\n18446744073709551614 2\n",
        ] {
            assert!(Trace::parse(bad.as_bytes()).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn a_real_program_is_recorded_in_touch_order() {
        // sort reads its input into a buffer it grows as it goes.
        let dir = std::env::temp_dir().join(format!("pw-rec-{}", std::process::id()));
        let mut lines = String::new();
        for i in 0..400_000u64 {
            lines.push_str(&format!("{:016x}\n", i.wrapping_mul(0x9E37_79B9_7F4A_7C15)));
        }
        std::fs::write(&dir, lines).unwrap();
        let mut cmd = Command::new("sort");
        cmd.arg("-S")
            .arg("64M")
            .arg(&dir)
            .stdout(std::process::Stdio::null());
        let t = record(cmd, Duration::from_micros(200)).unwrap();
        std::fs::remove_file(&dir).unwrap();
        // 6.8 MB of input in a sort buffer: well over a thousand pages.
        assert!(t.pages.len() > 1000, "{} pages", t.pages.len());
        assert!(t.pages.iter().all(|&p| p < t.span));
        let mut sorted = t.pages.clone();
        sorted.sort_unstable();
        sorted.dedup();
        assert_eq!(sorted.len(), t.pages.len(), "each page once");
    }
}
