//! TCP backend: a page server on the source, a client on the destination.

mod client;
mod server;
pub mod sockopt;

pub use client::{TcpOptions, TcpTransport};
pub use server::{DoneHook, PageServer, RdmaAcceptor, ServerHandle, DEFAULT_MAX_CONNECTIONS};
