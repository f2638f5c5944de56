//! Picking and connecting a transport by the source's address.

use std::sync::Arc;

use pagewire_transport::rdma::{CompletionWait, Device, RdmaTransport};
use pagewire_transport::tcp::{TcpOptions, TcpTransport};
use pagewire_transport::Transport;

use super::EmbedError;

/// Which RDMA device and how to use it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RdmaOptions {
    /// Device name, e.g. `rxe0` (`None`: the first with an ACTIVE port).
    pub device: Option<String>,
    /// GID index (`None`: the first IPv4-mapped GID, else the first).
    pub gid_index: Option<u8>,
    /// How pusher lanes wait for READ completions (faults always poll).
    pub bulk_wait: CompletionWait,
    /// Fail rather than go on over TCP when RDMA stops working mid-way
    /// (see [`RdmaTransport`]).
    pub no_tcp_fallback: bool,
}

/// Which transport moves the pages.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TransportChoice {
    /// RDMA when the device opens with an ACTIVE port, TCP otherwise.
    Auto(RdmaOptions),
    /// TCP only.
    Tcp,
    /// RDMA only: failing to open the device is an error.
    Rdma(RdmaOptions),
}

impl Default for TransportChoice {
    fn default() -> Self {
        Self::Auto(RdmaOptions::default())
    }
}

/// Connects to the source at `addr` (the control connection is TCP in
/// every case) and sets up the chosen transport.
pub fn connect(
    addr: &str,
    choice: TransportChoice,
    opts: TcpOptions,
) -> Result<Arc<dyn Transport>, EmbedError> {
    let tcp = TcpTransport::connect(addr, opts).map_err(EmbedError::Connect)?;
    let rdma = |dev: Arc<Device>, tcp, o: &RdmaOptions, how: &str| -> Arc<dyn Transport> {
        tracing::info!(
            device = dev.name(),
            gid_index = dev.gid_index(),
            "{how}: using RDMA"
        );
        Arc::new(
            RdmaTransport::new(tcp, dev)
                .with_bulk_wait(o.bulk_wait)
                .with_tcp_fallback(!o.no_tcp_fallback),
        )
    };
    match choice {
        TransportChoice::Tcp => Ok(Arc::new(tcp)),
        TransportChoice::Rdma(o) => {
            let dev = Device::open(o.device.as_deref(), o.gid_index).map_err(EmbedError::Rdma)?;
            Ok(rdma(dev, tcp, &o, "rdma"))
        }
        TransportChoice::Auto(o) => match Device::open(o.device.as_deref(), o.gid_index) {
            Ok(dev) => Ok(rdma(dev, tcp, &o, "auto")),
            Err(e) => {
                tracing::info!("auto: using TCP ({e})");
                Ok(Arc::new(tcp))
            }
        },
    }
}
