//! TCP keepalive on the pooler's sockets, both ways: a client pod or a database node
//! that vanished without a FIN (evicted, partitioned) is noticed in about a minute
//! instead of the kernel's two hours, and whatever it held (a client slot, a server
//! linked to a client) is let go.

use std::time::Duration;

use socket2::{SockRef, TcpKeepalive};
use tokio::net::TcpStream;

/// Unanswered probes after which the kernel closes the socket.
pub const PROBES: u32 = 3;

/// Turns keepalive on with `idle` before the first probe and `interval` between
/// probes; `None` leaves the socket as it is.
pub fn set(tcp: &TcpStream, keepalive: Option<(Duration, Duration)>) -> std::io::Result<()> {
    let Some((idle, interval)) = keepalive else {
        return Ok(());
    };
    let settings = TcpKeepalive::new()
        .with_time(idle)
        .with_interval(interval)
        .with_retries(PROBES);
    SockRef::from(tcp).set_tcp_keepalive(&settings)
}
