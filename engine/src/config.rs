//! How a migration runs.

use std::thread;
use std::time::Duration;

use crate::prepager::PrepagerKind;

/// How long a lost link may take to come back unless told otherwise.
pub const DEFAULT_RECOVER_TIMEOUT: Duration = Duration::from_secs(120);

/// How a migration runs.
#[derive(Debug, Clone)]
pub struct MigrationConfig {
    /// Pusher lanes (threads with their own bulk channel). At least 1.
    pub lanes: usize,
    /// Bubble radius in pages each way around the last fault; 0 turns
    /// bubbling off.
    pub bubble: u64,
    /// The paper's fixed bubbles or pagewire's adaptive prepager.
    pub prepager: PrepagerKind,
    /// Most pages a lane asks for in one request. Clamped to what the
    /// transport accepts in one request; with flow control on, requests
    /// are usually smaller (sized to the link's rate).
    pub batch_pages: u32,
    /// On every fault, move the background sweep to the faulted page (as
    /// QEMU's post-copy restarts its background transfer at each page
    /// request), for comparison with bubbling.
    pub sweep_from_fault: bool,
    /// Push the blocks the guest faults in most first (see
    /// [`crate::heat`]); off, the sweep walks memory in address order.
    /// Ignored with `sweep_from_fault`.
    pub heat_sweep: bool,
    /// Run the background sweep from the start. When false the sweep waits
    /// for [`crate::MigrationHandle::release_push`] (pure demand paging
    /// plus bubbles until then).
    pub push: bool,
    /// Pin lane `i` to the `i % n`-th of the `n` CPUs the process may run
    /// on (ignored when `lane_cpus` is given).
    pub pin_lanes: bool,
    /// CPUs for the lanes (and the zero filler): lane `i` runs on
    /// `lane_cpus[i % len]`. Empty: as `pin_lanes` says. A VMM that pins
    /// its vCPUs names CPUs apart from theirs, so a lane never holds the
    /// CPU a vCPU is woken on.
    pub lane_cpus: Vec<usize>,
    /// CPUs for the fault services: one runs pinned on each CPU listed
    /// (before, this was one service allowed on all of them),
    /// with its own urgent channel, all reading the one userfaultfd. The
    /// service on a faulting vCPU's CPU is woken there, without a wake-up
    /// across CPUs, and usually reads the fault first; but every fault
    /// wakes every service. Empty: one service, unpinned. A VMM that pins
    /// its vCPUs lists their CPUs (and keeps the lanes off them with
    /// `lane_cpus`).
    pub fault_cpus: Vec<usize>,
    /// After each fault, how long a fault service keeps polling the
    /// userfaultfd without sleeping, so the next fault of a burst is read
    /// without a wake-up (zero: sleep at once). Costs a core while it
    /// spins; pays where wake-ups are slow and cores are spare.
    pub fault_spin: Duration,
    /// How long after a fault a fault service polls for its urgent
    /// reply without sleeping, before it sleeps on the channel (zero:
    /// sleep at once; a reply later than 50 ms is waited for in the
    /// channel's receive anyway). It saves the wake-up on the reply,
    /// dearest when every CPU is busy, and costs a CPU while the fault is
    /// out: nothing of the guest's only where a fault service shares a
    /// CPU with the one vCPU that faulted and no lane (`fault_cpus`,
    /// `lane_cpus`). Channels without a file descriptor (RDMA) always
    /// poll.
    pub reply_spin: Duration,
    /// Nice value of the lane threads (0 leaves it as inherited): above
    /// the vCPUs', so that on a busy host a vCPU woken from a fault, or a
    /// fault service, does not wait for a lane's time slice. The push still
    /// gets every cycle the guest leaves.
    pub lane_nice: i32,
    /// Keep bulk bytes in flight near what the link needs (delay-based
    /// flow control) so that faults never queue behind the push at the
    /// bottleneck. Off: lanes keep their channels full.
    pub flow_control: bool,
    /// Cap on bulk (push and bubble) bytes per second; `None` is unlimited,
    /// `Some(0)` is refused.
    pub push_rate: Option<u64>,
    /// How long a lost link may take to come back. Channels whose link
    /// breaks reconnect with backoff until then and send again what was
    /// outstanding; faulting threads stay blocked meanwhile. A source that
    /// refuses connections (gone) fails at once. Zero: fail at the first
    /// loss.
    pub recover_timeout: Duration,
    /// How pages reach guest memory that is shared (a memfd with a second
    /// mapping); private memory always takes `UFFDIO_COPY`.
    pub shared_install: SharedInstall,
}

/// How pages reach shared guest memory (a memfd the engine maps a second
/// time).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum SharedInstall {
    /// Landed where the transport writes them without a CPU copy (RDMA
    /// READs into the second mapping), copied in otherwise.
    #[default]
    Auto,
    /// Landed whenever the transport can land pages (TCP receives into
    /// the memory's file, RDMA READs into the second mapping), then
    /// mapped with `UFFDIO_CONTINUE`.
    Land,
    /// Received into a buffer and copied in with `UFFDIO_COPY`, which puts
    /// each page into the file and maps it in one step.
    Copy,
}

impl Default for MigrationConfig {
    fn default() -> Self {
        Self {
            lanes: thread::available_parallelism().map_or(2, |n| n.get()),
            bubble: 64,
            prepager: PrepagerKind::Adaptive,
            sweep_from_fault: false,
            heat_sweep: true,
            batch_pages: 64,
            push: true,
            pin_lanes: true,
            lane_cpus: Vec::new(),
            fault_cpus: Vec::new(),
            lane_nice: 10,
            fault_spin: Duration::ZERO,
            reply_spin: Duration::ZERO,
            flow_control: true,
            push_rate: None,
            recover_timeout: DEFAULT_RECOVER_TIMEOUT,
            shared_install: SharedInstall::Auto,
        }
    }
}
