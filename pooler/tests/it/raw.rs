//! A raw protocol client: exact message sequences, logins by SCRAM by hand, and
//! whatever a misbehaving client does (half messages, never reading).

use std::time::Duration;

use postgres_protocol::authentication::sasl::{ChannelBinding, ScramSha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::common::{App, Env};

/// One whole backend message: tag and body.
pub type Msg = (u8, Vec<u8>);

pub fn msg(tag: u8, parts: &[&[u8]]) -> Vec<u8> {
    let len: usize = 4 + parts.iter().map(|p| p.len()).sum::<usize>();
    let mut out = vec![tag];
    out.extend_from_slice(&(len as i32).to_be_bytes());
    for p in parts {
        out.extend_from_slice(p);
    }
    out
}

pub fn parse(name: &str, sql: &str) -> Vec<u8> {
    msg(
        b'P',
        &[
            name.as_bytes(),
            b"\0",
            sql.as_bytes(),
            b"\0",
            &0u16.to_be_bytes(),
        ],
    )
}

/// Binds the unnamed portal to `statement`, no parameters, text results.
pub fn bind(statement: &str) -> Vec<u8> {
    msg(
        b'B',
        &[b"\0", statement.as_bytes(), b"\0", &[0, 0, 0, 0, 0, 0]],
    )
}

pub fn execute() -> Vec<u8> {
    msg(b'E', &[b"\0", &0i32.to_be_bytes()])
}

pub fn sync() -> Vec<u8> {
    msg(b'S', &[])
}

pub fn query(sql: &str) -> Vec<u8> {
    msg(b'Q', &[sql.as_bytes(), b"\0"])
}

pub fn batch(parts: &[Vec<u8>]) -> Vec<u8> {
    parts.concat()
}

pub fn sqlstate(body: &[u8]) -> String {
    body.split(|b| *b == 0)
        .find_map(|f| f.strip_prefix(b"C"))
        .map(|c| String::from_utf8_lossy(c).into_owned())
        .unwrap_or_default()
}

pub fn errors(msgs: &[Msg]) -> Vec<String> {
    msgs.iter()
        .filter(|(t, _)| *t == b'E')
        .map(|(_, b)| format!("{} {}", sqlstate(b), String::from_utf8_lossy(b)))
        .collect()
}

pub fn tags(msgs: &[Msg]) -> String {
    msgs.iter().map(|(t, _)| *t as char).collect()
}

/// A protocol 3.0 startup packet.
pub fn startup(user: &str, db: &str) -> Vec<u8> {
    let mut body = 196_608i32.to_be_bytes().to_vec();
    for (k, v) in [("user", user), ("database", db)] {
        body.extend_from_slice(k.as_bytes());
        body.push(0);
        body.extend_from_slice(v.as_bytes());
        body.push(0);
    }
    body.push(0);
    let mut out = ((body.len() + 4) as i32).to_be_bytes().to_vec();
    out.extend_from_slice(&body);
    out
}

pub struct Raw {
    pub stream: TcpStream,
    buf: Vec<u8>,
}

impl Raw {
    /// Logs in through the pooler with SCRAM and waits for ReadyForQuery.
    pub async fn connect(e: &Env, app: &App) -> Raw {
        Raw::connect_to(e.pooler.addr, &e.fixture.db, app).await
    }

    /// The same, to a pooler at `addr` (the binary's, say).
    pub async fn connect_to(addr: std::net::SocketAddr, db: &str, app: &App) -> Raw {
        let stream = TcpStream::connect(addr).await.unwrap();
        stream.set_nodelay(true).unwrap();
        let mut raw = Raw {
            stream,
            buf: Vec::new(),
        };
        raw.send(&startup(&app.role, db)).await;
        let mut scram = ScramSha256::new(app.password.as_bytes(), ChannelBinding::unsupported());
        loop {
            let (tag, body) = raw.next().await.expect("login");
            assert_ne!(
                tag,
                b'E',
                "login failed: {}",
                String::from_utf8_lossy(&body)
            );
            if tag == b'R' {
                match i32::from_be_bytes(body[..4].try_into().unwrap()) {
                    10 => {
                        let first = scram.message().to_vec();
                        let mut m = b"SCRAM-SHA-256\0".to_vec();
                        m.extend_from_slice(&(first.len() as i32).to_be_bytes());
                        m.extend_from_slice(&first);
                        raw.send(&msg(b'p', &[&m])).await;
                    }
                    11 => {
                        scram.update(&body[4..]).unwrap();
                        raw.send(&msg(b'p', &[scram.message()])).await;
                    }
                    12 => scram.finish(&body[4..]).unwrap(),
                    _ => {}
                }
            }
            if tag == b'Z' {
                return raw;
            }
        }
    }

    pub async fn send(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).await.unwrap();
    }

    /// The next whole message, or `None` at EOF.
    pub async fn next(&mut self) -> Option<Msg> {
        loop {
            if self.buf.len() >= 5 {
                let len = i32::from_be_bytes(self.buf[1..5].try_into().unwrap()) as usize;
                if self.buf.len() > len {
                    let m: Vec<u8> = self.buf.drain(..1 + len).collect();
                    return Some((m[0], m[5..].to_vec()));
                }
            }
            let mut chunk = [0u8; 8192];
            match self.stream.read(&mut chunk).await {
                Ok(0) | Err(_) => return None,
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
            }
        }
    }

    /// Messages up to and including the `n`th ReadyForQuery; panics after 10 s.
    pub async fn until_ready(&mut self, n: usize) -> Vec<Msg> {
        let mut out = Vec::new();
        let mut seen = 0;
        let read = async {
            while seen < n {
                let m = self.next().await.expect("the pooler closed the connection");
                if m.0 == b'Z' {
                    seen += 1;
                }
                out.push(m);
            }
        };
        if tokio::time::timeout(Duration::from_secs(10), read)
            .await
            .is_err()
        {
            panic!("no ReadyForQuery within 10 s; got {}", tags(&out));
        }
        out
    }

    /// Everything until the pooler closes the connection.
    pub async fn until_closed(&mut self) -> Vec<Msg> {
        let mut out = Vec::new();
        let read = async {
            while let Some(m) = self.next().await {
                out.push(m);
            }
        };
        tokio::time::timeout(Duration::from_secs(20), read)
            .await
            .expect("the pooler did not close the connection");
        out
    }
}
