//! Garbage on the wire closes that client with 08P01 and nothing else.

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::common::env;
use crate::raw::startup;

/// Sends `bytes` and returns what the pooler answered before closing.
async fn exchange(port: u16, bytes: &[u8]) -> Vec<u8> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    let _ = s.write_all(bytes).await;
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(20), s.read_to_end(&mut out)).await;
    out
}

fn sqlstate_of(reply: &[u8]) -> Option<String> {
    // ErrorResponse: 'E', length, then fields (type byte, cstring) ...
    let start = reply.iter().position(|b| *b == b'E')?;
    let body = reply.get(start + 5..)?;
    let mut fields = body.split(|b| *b == 0);
    fields.find_map(|f| {
        f.strip_prefix(b"C")
            .map(|c| String::from_utf8_lossy(c).into_owned())
    })
}

#[tokio::test]
async fn garbage_gets_08p01_and_the_pooler_keeps_serving() {
    let e = env(|c| c.client_login_timeout_ms = 2_000).await;
    let app = e.app(Default::default()).await;
    let port = e.pooler.addr.port();

    // An oversize startup length, a tiny one, random bytes.
    let oversize = [0x7f, 0xff, 0xff, 0xff, 0, 3, 0, 0];
    let reply = exchange(port, &oversize).await;
    assert_eq!(sqlstate_of(&reply).as_deref(), Some("08P01"), "{reply:?}");
    let tiny = [0, 0, 0, 2];
    assert_eq!(
        sqlstate_of(&exchange(port, &tiny).await).as_deref(),
        Some("08P01")
    );
    let mut seed = 0x2545_f491_4f6c_dd1du64;
    for _ in 0..20 {
        let junk: Vec<u8> = (0..64)
            .map(|_| {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                seed as u8
            })
            .collect();
        let _ = exchange(port, &junk).await;
    }
    // A valid startup followed by a SASL message with a lying length.
    let mut bad_sasl = startup(&app.role, &e.fixture.db);
    bad_sasl.extend_from_slice(&[b'p', 0x7f, 0xff, 0xff, 0xff]);
    let reply = exchange(port, &bad_sasl).await;
    assert_eq!(
        sqlstate_of(&reply).as_deref(),
        Some("08P01"),
        "{}",
        String::from_utf8_lossy(&reply)
    );
    // A truncated startup packet, then silence: the login timeout closes it.
    let truncated = &startup(&app.role, &e.fixture.db)[..10];
    let _ = exchange(port, truncated).await;

    // Everybody else is fine.
    let ok = e.connect(&app).await;
    let n: i32 = ok.query_one("SELECT 41 + 1", &[]).await.unwrap().get(0);
    assert_eq!(n, 42);
}
