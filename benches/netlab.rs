//! Two "hosts" for the benchmarks: network namespaces joined by a
//! rate-shaped veth pair, made and torn down by `netlab/two-hosts.sh` (the
//! script the namespace tests and `netlab/fault-under-load.sh` use). The
//! benchmark stays one process: its threads enter a namespace before they
//! open sockets, and the threads they start (the page server's, the
//! engine's) stay in it.

use std::fs::File;
use std::net::{IpAddr, Ipv4Addr};
use std::path::PathBuf;
use std::process::Command;

use nix::sched::{setns, CloneFlags};

/// The source's address, inside its namespace (`two-hosts.sh`).
pub const SOURCE_ADDR: IpAddr = IpAddr::V4(Ipv4Addr::new(192, 0, 2, 1));

/// Which end of the link.
#[derive(Debug, Clone, Copy)]
pub enum Side {
    /// The source's namespace (`PREFIX-src`, [`SOURCE_ADDR`]).
    Source,
    /// The destination's namespace (`PREFIX-dst`).
    Dest,
}

/// A shaped link between two namespaces, torn down when dropped.
pub struct Link {
    name: String,
}

fn script() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../netlab/two-hosts.sh")
}

impl Link {
    /// Why namespaces cannot be made here (not root, no iproute2), if
    /// they cannot.
    pub fn unavailable() -> Option<String> {
        if !nix::unistd::Uid::effective().is_root() {
            return Some("not root".into());
        }
        let tools = Command::new("sh")
            .args(["-c", "command -v ip && command -v tc"])
            .output();
        if !tools.is_ok_and(|o| o.status.success()) {
            return Some("ip or tc is missing (iproute2)".into());
        }
        None
    }

    /// Sets up namespaces `NAME-src` and `NAME-dst` joined by a veth pair
    /// shaped to `rate` (`1gbit`, `10gbit`, or `none`).
    pub fn up(name: &str, rate: &str) -> Result<Self, String> {
        let out = Command::new(script())
            .args(["up", "--rate", rate, "--name", name])
            .output()
            .map_err(|e| format!("cannot run two-hosts.sh: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "two-hosts.sh up failed: {}",
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        Ok(Self { name: name.into() })
    }

    /// Moves the calling thread into `side`'s namespace until the guard
    /// is dropped. Sockets it opens, and threads it starts, belong there.
    pub fn enter(&self, side: Side) -> Result<Entered, String> {
        let ns = match side {
            Side::Source => format!("{}-src", self.name),
            Side::Dest => format!("{}-dst", self.name),
        };
        let home = File::open("/proc/thread-self/ns/net")
            .map_err(|e| format!("cannot open this thread's namespace: {e}"))?;
        let there = File::open(format!("/var/run/netns/{ns}"))
            .map_err(|e| format!("cannot open namespace {ns}: {e}"))?;
        setns(&there, CloneFlags::CLONE_NEWNET).map_err(|e| format!("cannot enter {ns}: {e}"))?;
        Ok(Entered { home })
    }
}

impl Drop for Link {
    fn drop(&mut self) {
        let _ = Command::new(script())
            .args(["down", "--name", &self.name])
            .status();
    }
}

/// A thread inside a namespace; back in its own when dropped.
pub struct Entered {
    home: File,
}

impl Drop for Entered {
    fn drop(&mut self) {
        // A thread that cannot return would open every later socket in
        // the wrong namespace: stop the benchmark rather than mismeasure.
        if let Err(e) = setns(&self.home, CloneFlags::CLONE_NEWNET) {
            panic!("cannot return to this thread's network namespace: {e}");
        }
    }
}
