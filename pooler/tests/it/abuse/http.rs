//! The admin HTTP listener under a slowloris: many connections, each sending its
//! request head a byte at a time. Probes and scrapes from another caller are answered
//! throughout, the pooler never holds more than `admin_max_connections` (64) of them,
//! and every trickling connection is closed (for a newer one, or at
//! `admin_header_timeout_ms`, 5 s).

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::HANG_GUARD;
use crate::binary::Binary;
use crate::common::env;
use crate::metrics::http_get;

/// Connections the slowloris opens: four times the default bound, from four sources,
/// one of them the prober's own address.
const SLOW_CONNECTIONS: usize = 256;

/// Opens a connection from `source` and sends a request head a byte every 200 ms; returns
/// when the pooler closes it (or the head is all sent, which must not happen first).
async fn trickle(source: IpAddr, admin: SocketAddr, closed: Arc<AtomicUsize>) -> bool {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind(SocketAddr::new(source, 0)).unwrap();
    let Ok(mut s) = socket.connect(admin).await else {
        closed.fetch_add(1, Ordering::Relaxed);
        return true;
    };
    let head = format!(
        "GET /metrics HTTP/1.1\r\nHost: x\r\nX-Slow: {}\r\n\r\n",
        "s".repeat(200)
    );
    let mut sink = [0u8; 256];
    for byte in head.as_bytes() {
        if s.write_all(&[*byte]).await.is_err() {
            closed.fetch_add(1, Ordering::Relaxed);
            return true;
        }
        // A closed connection shows as EOF (or a reset) on a read.
        if let Ok(r) = tokio::time::timeout(Duration::from_millis(200), s.read(&mut sink)).await {
            if matches!(r, Ok(0) | Err(_)) {
                closed.fetch_add(1, Ordering::Relaxed);
                return true;
            }
        }
    }
    false
}

fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or(0)
}

#[tokio::test]
async fn a_slowloris_cannot_keep_readyz_and_metrics_from_answering() {
    let e = env(|_| {}).await;
    let mut bin = Binary::start(&e, super::SMALL_BUDGET, &[]).await;
    let admin = bin.admin;
    let pid = bin.pid();
    let before = open_fds(pid);
    let closed = Arc::new(AtomicUsize::new(0));
    let slow: Vec<_> = (0..SLOW_CONNECTIONS)
        .map(|i| {
            let source = IpAddr::from([127, 0, 0, 1 + (i % 4) as u8]);
            let closed = closed.clone();
            tokio::spawn(async move {
                // Staggered over about a second, as a client would open them.
                tokio::time::sleep(Duration::from_millis(4 * i as u64)).await;
                trickle(source, admin, closed).await
            })
        })
        .collect();

    // The prober: /readyz and /metrics every 100 ms while the slowloris runs, each
    // under the hang guard; the slowest answer is printed, never asserted.
    let done = Arc::new(AtomicBool::new(false));
    let sampler = {
        let done = done.clone();
        tokio::spawn(async move {
            let mut peak = 0;
            while !done.load(Ordering::Relaxed) {
                peak = peak.max(open_fds(pid));
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            peak
        })
    };
    let mut slowest = Duration::ZERO;
    let mut probes = 0;
    let until = Instant::now() + Duration::from_secs(8);
    while Instant::now() < until {
        for path in ["/readyz", "/metrics"] {
            let asked = Instant::now();
            let (status, body) = tokio::time::timeout(HANG_GUARD, http_get(admin, path))
                .await
                .unwrap_or_else(|_| panic!("{path} did not answer under the slowloris"));
            assert_eq!(status, 200, "{path}: {body}");
            slowest = slowest.max(asked.elapsed());
            probes += 1;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for s in slow {
        let was_closed = tokio::time::timeout(HANG_GUARD, s)
            .await
            .expect("a trickling connection was kept open")
            .unwrap();
        assert!(
            was_closed,
            "a slowloris sent its whole head before being closed"
        );
    }
    done.store(true, Ordering::Relaxed);
    let peak = sampler.await.unwrap();
    eprintln!(
        "{probes} probes answered, the slowest in {} ms; {} slow connections closed; \
         open descriptors {before} before, at most {peak} during",
        slowest.as_millis(),
        closed.load(Ordering::Relaxed)
    );
    // The pooler held at most its bound of them (plus the prober's and a few
    // accepted a moment before their eviction was seen).
    assert!(peak <= before + 64 + 8, "{before} → {peak} descriptors");
    let evicted = bin
        .metric("dataplane_pooler_limit_refusals_total{kind=\"admin_connections\"}")
        .await;
    let timed_out = bin
        .metric("dataplane_pooler_limit_refusals_total{kind=\"admin_header_timeout\"}")
        .await;
    eprintln!("closed for newer ones: {evicted}; at the head deadline: {timed_out}");
    assert!(evicted >= (SLOW_CONNECTIONS - 64) as f64, "{evicted}");
    assert!(timed_out >= 1.0, "{timed_out}");
    bin.assert_up().await;
}
