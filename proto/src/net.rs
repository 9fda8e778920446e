//! How every server of the project accepts TCP connections: TCP_NODELAY on each accepted socket.
//!
//! tonic's `tcp_nodelay` setting only applies to the listeners it binds itself, not to
//! `serve_with_incoming*`, and axum never sets it. Without it a response of a few hundred bytes waits
//! for Nagle's algorithm to meet the client's delayed ACK: ~40 ms per call on Linux. So the node's gRPC
//! and metrics listeners and the coordinator's gRPC and HTTP listeners (plain and TLS) all accept
//! through [`incoming`] or call [`set_nodelay`] on what they accept.

use std::io;

use tokio::net::{TcpListener, TcpStream};
use tokio_stream::{Stream, StreamExt, wrappers::TcpListenerStream};

/// Turns Nagle's algorithm off on an accepted socket (a failure is logged, the connection kept).
pub fn set_nodelay(stream: &TcpStream) {
    if let Err(e) = stream.set_nodelay(true) {
        tracing::warn!(error = %e, "could not set TCP_NODELAY on an accepted connection");
    }
}

/// The connections accepted on `listener`, each with TCP_NODELAY set: the incoming stream for
/// tonic's `serve_with_incoming*` (TLS, when configured, is layered on top by tonic).
pub fn incoming(listener: TcpListener) -> impl Stream<Item = io::Result<TcpStream>> + Send + 'static {
    TcpListenerStream::new(listener).map(|accepted| accepted.inspect(set_nodelay))
}
