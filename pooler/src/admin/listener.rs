//! The admin HTTP listener: what keeps `/readyz` and `/metrics` answering probes and
//! scrapes while something else on the network misbehaves.
//!
//! - HTTP/1.1 only (probes and Prometheus speak nothing else), so no HTTP/2 state
//!   and no protocol sniffing before the request head's deadline starts.
//! - A request head must arrive whole within `admin_header_timeout_ms`, and so must
//!   the next one on a kept-alive connection: a client that trickles its headers a
//!   byte at a time (slowloris), or opens a connection and says nothing, is closed.
//! - A connection lives at most [`CONNECTION_LIFETIME`], whatever it does: a client
//!   that never reads its response, or trickles a body, is closed then.
//! - At most `admin_max_connections` at once. A connection past that does not wait
//!   and is not refused: it takes the place of the oldest connection of the source
//!   (IPv4 address, IPv6 /64) that holds the most. A flood from one source only ever
//!   closes its own connections, and a prober's connection, new when it sends its
//!   request, is the last to go.

use std::collections::{HashMap, VecDeque};
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Notify, watch};

use crate::metrics::{Limit, Metrics};

/// The longest an admin connection lives, whatever it is doing. Every answer the
/// listener gives takes milliseconds; a connection older than this is stuck or hostile
/// (a response never read, a body trickled). Kept-alive clients simply reconnect.
pub const CONNECTION_LIFETIME: Duration = Duration::from_secs(30);

/// The listener's bounds (`admin_max_connections`, `admin_header_timeout_ms`).
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_connections: usize,
    pub header_timeout: Duration,
}

/// One open connection, as its source's queue holds it.
struct Open {
    id: u64,
    close: Arc<Notify>,
}

/// The open connections by source, oldest first in each queue.
#[derive(Default)]
struct Table {
    by_source: HashMap<IpAddr, VecDeque<Open>>,
    total: usize,
    next_id: u64,
}

impl Table {
    /// Records a new connection from `source`; past `max`, first closes the oldest
    /// connection of the source that holds the most (ties: the oldest of them).
    /// Returns its id and its close signal, and whether one was closed for it. Linear in
    /// the number of sources, which `max` bounds.
    fn open(&mut self, source: IpAddr, max: usize) -> (u64, Arc<Notify>, bool) {
        let mut evicted = false;
        if self.total >= max.max(1) {
            let victim = self
                .by_source
                .iter()
                .filter_map(|(s, q)| q.front().map(|o| (q.len(), std::cmp::Reverse(o.id), *s)))
                .max()
                .map(|(_, _, s)| s);
            if let Some(source) = victim {
                if let Some(o) = self.remove_front(source) {
                    o.close.notify_one();
                    evicted = true;
                }
            }
        }
        let id = self.next_id;
        self.next_id += 1;
        let close = Arc::new(Notify::new());
        self.by_source.entry(source).or_default().push_back(Open {
            id,
            close: close.clone(),
        });
        self.total += 1;
        (id, close, evicted)
    }

    fn remove_front(&mut self, source: IpAddr) -> Option<Open> {
        let queue = self.by_source.get_mut(&source)?;
        let o = queue.pop_front()?;
        if queue.is_empty() {
            self.by_source.remove(&source);
        }
        self.total -= 1;
        Some(o)
    }

    /// A connection ended (or was already evicted: then nothing is left to remove).
    fn close(&mut self, source: IpAddr, id: u64) {
        let Some(queue) = self.by_source.get_mut(&source) else {
            return;
        };
        if let Some(at) = queue.iter().position(|o| o.id == id) {
            queue.remove(at);
            self.total -= 1;
        }
        if queue.is_empty() {
            self.by_source.remove(&source);
        }
    }
}

/// Takes the connection's place out of the table however its task ends.
struct Seat {
    table: Arc<Mutex<Table>>,
    source: IpAddr,
    id: u64,
}

impl Drop for Seat {
    fn drop(&mut self) {
        self.table
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .close(self.source, self.id);
    }
}

/// Serves `app` on `listener` until `closing` turns true; connections open then get
/// a graceful shutdown (their current request is answered) within their lifetime.
pub async fn serve(
    listener: TcpListener,
    app: Router,
    limits: Limits,
    metrics: Arc<Metrics>,
    mut closing: watch::Receiver<bool>,
) {
    let table = Arc::new(Mutex::new(Table::default()));
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = closing.changed() => return,
        };
        let (tcp, peer) = match accepted {
            Ok(a) => a,
            Err(e) => {
                // Out of file descriptors, mostly: the pooler's clients come first, so
                // wait a moment rather than spin.
                tracing::warn!(error = %e, "admin listener: accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let source = crate::auth::limiter::source(peer.ip());
        let (id, close, evicted) = table
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .open(source, limits.max_connections);
        if evicted {
            metrics.limit(Limit::AdminConnections, 1);
        }
        let seat = Seat {
            table: table.clone(),
            source,
            id,
        };
        let conn = connection(
            tcp,
            peer,
            app.clone(),
            limits,
            metrics.clone(),
            close,
            closing.clone(),
        );
        tokio::spawn(async move {
            conn.await;
            drop(seat);
        });
    }
}

/// One connection: requests until the client leaves, its head deadline passes, it is
/// evicted, or its lifetime ends.
async fn connection(
    tcp: TcpStream,
    peer: SocketAddr,
    app: Router,
    limits: Limits,
    metrics: Arc<Metrics>,
    close: Arc<Notify>,
    mut closing: watch::Receiver<bool>,
) {
    let _ = tcp.set_nodelay(true);
    let served = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let counted = served.clone();
    let service = hyper::service::service_fn(move |req: hyper::Request<Incoming>| {
        counted.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        tower::ServiceExt::oneshot(app.clone(), req)
    });
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout);
    let conn = builder.serve_connection(TokioIo::new(tcp), service);
    let mut conn = std::pin::pin!(conn);
    let lifetime = tokio::time::sleep(CONNECTION_LIFETIME);
    let mut lifetime = std::pin::pin!(lifetime);
    let mut shutting_down = false;
    let result = loop {
        tokio::select! {
            result = conn.as_mut() => break Some(result),
            () = close.notified() => {
                tracing::debug!(%peer, "admin connection closed for a newer one (admin_max_connections)");
                break None;
            }
            () = lifetime.as_mut() => {
                tracing::debug!(%peer, "admin connection closed at the end of its lifetime");
                break None;
            }
            changed = closing.changed(), if !shutting_down => {
                shutting_down = true;
                if changed.is_err() || *closing.borrow() {
                    conn.as_mut().graceful_shutdown();
                }
            }
        }
    };
    if let Some(Err(e)) = result {
        // A slow head before any request was whole is what a slowloris does; a
        // kept-alive client's idle connection ends the same way after its requests.
        let first = served.load(std::sync::atomic::Ordering::Relaxed) == 0;
        if e.is_timeout() && first {
            metrics.limit(Limit::AdminHeaderTimeout, 1);
            tracing::debug!(%peer, "admin connection sent no whole request head in time");
        } else if !e.is_timeout() {
            tracing::debug!(%peer, error = %e, "admin connection ended");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(last: u8) -> IpAddr {
        IpAddr::from([127, 0, 0, last])
    }

    #[test]
    fn past_the_bound_the_busiest_source_loses_its_oldest() {
        let mut t = Table::default();
        let (prober, _, _) = t.open(ip(1), 4);
        let (a0, a0_close, _) = t.open(ip(2), 4);
        let (_a1, _, _) = t.open(ip(2), 4);
        let (_b0, _, evicted) = t.open(ip(3), 4);
        assert!(!evicted);
        // Full: the flood's source holds the most, so its oldest goes.
        let (_a2, _, evicted) = t.open(ip(2), 4);
        assert!(evicted);
        assert_eq!(t.total, 4);
        assert!(t.by_source[&ip(2)].iter().all(|o| o.id != a0));
        // Its close signal was given (a permit waits for the task).
        let notified = a0_close.notified();
        let mut notified = std::pin::pin!(notified);
        assert!(
            futures_util::FutureExt::now_or_never(notified.as_mut()).is_some(),
            "the evicted connection is told"
        );
        // Its task ending later removes nothing else.
        t.close(ip(2), a0);
        assert_eq!(t.total, 4);
        assert!(t.by_source[&ip(1)].iter().any(|o| o.id == prober));
    }

    #[test]
    fn among_equals_the_oldest_goes_and_a_bound_of_zero_still_admits_one() {
        let mut t = Table::default();
        let (first, _, _) = t.open(ip(1), 2);
        t.open(ip(2), 2);
        t.open(ip(3), 2);
        assert!(!t.by_source.contains_key(&ip(1)), "{first} was the oldest");
        assert_eq!(t.total, 2);
        let mut z = Table::default();
        z.open(ip(1), 0);
        let (_, _, evicted) = z.open(ip(1), 0);
        assert!(evicted);
        assert_eq!(z.total, 1);
    }

    #[test]
    fn ended_connections_leave_no_trace() {
        let mut t = Table::default();
        let ids: Vec<u64> = (0..10).map(|i| t.open(ip(i % 3), 100).0).collect();
        for (i, id) in ids.into_iter().enumerate() {
            t.close(ip(i as u8 % 3), id);
        }
        assert_eq!(t.total, 0);
        assert!(t.by_source.is_empty());
    }
}
