//! Server connections: open one, log in *as the app's role* with its ClientKey (SCRAM
//! pass-through: no password anywhere), and remember what the server reported.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use fallible_iterator::FallibleIterator;
use postgres_protocol::message::backend::{ErrorFields, Message};
use postgres_protocol::message::frontend;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::auth::scram::{ClientExchange, ClientKey, ScramError};
use crate::net::stream::Stream;
use crate::proto::startup;
use crate::verifier::ScramSecret;

pub mod params;
pub mod statements;

use params::ServerParams;
use statements::ServerStatements;

/// Where and how servers are opened.
#[derive(Clone)]
pub struct Target {
    pub host: String,
    pub port: u16,
    pub dbname: String,
    pub tls: Option<Arc<rustls::ClientConfig>>,
    pub connect_timeout: Duration,
    /// TCP keepalive idle time and probe interval (`tcp_keepalive_*`), if on.
    pub keepalive: Option<(Duration, Duration)>,
}

#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    #[error("connecting to Postgres: {0}")]
    Io(#[from] std::io::Error),
    #[error("Postgres refused TLS, and server TLS is required")]
    TlsRefused,
    #[error("Postgres said {code}: {message}")]
    Server { code: String, message: String },
    #[error("protocol error from Postgres: {0}")]
    Protocol(String),
    /// The credentials table and `pg_authid` disagree: the server's salt or iteration
    /// count is not the verifier's, so no key we hold can log in.
    #[error(
        "role {role}: the server's SCRAM salt/iterations differ from the credentials table's verifier ({detail})"
    )]
    VerifierMismatch { role: String, detail: String },
    #[error("SCRAM with Postgres failed: {0}")]
    Scram(ScramError),
    /// What answered at Postgres's address let us in without proving that it holds
    /// the role's verifier (its ServerKey): whatever it is, it is not to be trusted
    /// with a client's queries.
    #[error(
        "role {role}: the server did not prove it holds the role's verifier ({reason}); refused"
    )]
    ServerUnverified { role: String, reason: &'static str },
    #[error("Postgres asked for {0} authentication; only SCRAM-SHA-256 can be passed through")]
    UnsupportedAuth(&'static str),
    #[error("timed out after {0:?} opening a server connection")]
    Timeout(Duration),
}

impl BackendError {
    /// Whether the cause is on Postgres's side of the network (down, restarting, full)
    /// rather than in the role's credentials.
    pub fn is_unavailable(&self) -> bool {
        match self {
            BackendError::Io(_) | BackendError::Timeout(_) => true,
            BackendError::Server { code, .. } => {
                code.starts_with("08") || code.starts_with("57P") || code == "53300"
            }
            _ => false,
        }
    }

    /// Whether the server failed to prove itself (see [`BackendError::ServerUnverified`]).
    pub fn is_unverified_server(&self) -> bool {
        matches!(self, BackendError::ServerUnverified { .. })
    }
}

/// How far a login's authentication has come. The server must prove itself (a
/// SASLFinal whose signature matches the verifier's ServerKey) before its
/// AuthenticationOk counts: otherwise anything that answers at Postgres's address
/// could skip the proof, say "Ok", and be handed a client's queries.
enum Auth {
    /// Nothing asked yet.
    Start,
    /// SCRAM under way; [`ClientExchange::verified`] once its SASLFinal checked out.
    Scram(ClientExchange),
    /// AuthenticationOk after a verified server.
    Done,
}

/// The key Postgres gave a server connection, for cancelling its queries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BackendKey {
    pub pid: i32,
    pub secret: i32,
}

/// A logged-in server connection.
pub struct ServerConn {
    pub stream: Stream,
    pub role: Arc<str>,
    pub key: BackendKey,
    /// ParameterStatus values reported at login.
    pub params: Vec<(String, String)>,
    /// The session's parameters now, as the relay has changed them.
    pub state: ServerParams,
    /// The pooler-named prepared statements this server holds.
    pub statements: ServerStatements,
    pub generation: i64,
    pub created: Instant,
    /// Bytes read past the last message the login consumed (normally none).
    pub buf: BytesMut,
    /// The read buffer a linked client borrows for its stretch, so an idle client
    /// holds only a small one (10,000 idle clients must cost little memory).
    pub client_buf: BytesMut,
    /// Its entry in `SHOW SERVERS` while it lives (set by the pool's connector).
    pub registered: Option<crate::registry::Registered<crate::registry::ServerInfo>>,
    /// A client ran `LOAD` on it: a library may be loaded, which only closing the
    /// connection undoes (`DISCARD ALL` does not), so it is never handed on.
    pub loaded: bool,
}

impl ServerConn {
    /// The id `SHOW SERVERS` and `SHOW CLIENTS` know it by (0 if unregistered).
    pub fn id(&self) -> u64 {
        self.registered.as_ref().map_or(0, |r| r.id)
    }
}

/// The credentials to log in as one role without its password.
pub struct LoginKeys {
    pub role: Arc<str>,
    pub client_key: Arc<ClientKey>,
    pub secret: Arc<ScramSecret>,
    pub generation: i64,
}

impl Target {
    /// Opens and logs in a server connection, bounded by the connect timeout.
    ///
    /// Cancel-safe: dropping the future drops the half-open socket.
    pub async fn connect(&self, keys: &LoginKeys) -> Result<ServerConn, BackendError> {
        tokio::time::timeout(self.connect_timeout, self.connect_inner(keys))
            .await
            .map_err(|_| BackendError::Timeout(self.connect_timeout))?
    }

    async fn connect_inner(&self, keys: &LoginKeys) -> Result<ServerConn, BackendError> {
        let tcp = TcpStream::connect((self.host.as_str(), self.port)).await?;
        tcp.set_nodelay(true)?;
        crate::net::keepalive::set(&tcp, self.keepalive)?;
        let mut stream = match &self.tls {
            None => Stream::Plain(tcp),
            Some(config) => self.start_tls(tcp, config.clone()).await?,
        };
        let mut buf = BytesMut::with_capacity(1024);
        startup::write_startup(
            &mut buf,
            &[("user", &keys.role), ("database", &self.dbname)],
        )
        .map_err(|e| BackendError::Protocol(e.to_string()))?;
        stream.write_all(&buf).await?;
        buf.clear();

        let nonce =
            crate::auth::random_nonce().map_err(|e| BackendError::Protocol(e.to_string()))?;
        let mut auth = Auth::Start;
        let mut key = None;
        let mut params = Vec::new();
        let mut out = BytesMut::new();
        loop {
            let msg = read_message(&mut stream, &mut buf).await?;
            match msg {
                Message::AuthenticationSasl(body) => {
                    if !matches!(auth, Auth::Start) {
                        return Err(BackendError::Protocol("a second AuthenticationSASL".into()));
                    }
                    let mut mechanisms = body.mechanisms();
                    let mut has_scram = false;
                    while let Some(m) = fallible(mechanisms.next())? {
                        has_scram |= m == "SCRAM-SHA-256";
                    }
                    if !has_scram {
                        return Err(BackendError::UnsupportedAuth(
                            "a SASL mechanism other than SCRAM-SHA-256",
                        ));
                    }
                    let exchange = ClientExchange::new(&keys.client_key, &keys.secret, &nonce)
                        .map_err(BackendError::Scram)?;
                    frontend::sasl_initial_response(
                        "SCRAM-SHA-256",
                        &exchange.client_first(),
                        &mut out,
                    )?;
                    auth = Auth::Scram(exchange);
                }
                Message::AuthenticationSaslContinue(body) => {
                    let Auth::Scram(exchange) = &mut auth else {
                        return Err(BackendError::Protocol("SASLContinue out of turn".into()));
                    };
                    let reply = exchange.server_first(body.data()).map_err(|e| match e {
                        ScramError::VerifierMismatch { .. } => BackendError::VerifierMismatch {
                            role: keys.role.to_string(),
                            detail: e.to_string(),
                        },
                        other => BackendError::Scram(other),
                    })?;
                    frontend::sasl_response(&reply, &mut out)?;
                }
                Message::AuthenticationSaslFinal(body) => {
                    let Auth::Scram(exchange) = &mut auth else {
                        return Err(BackendError::Protocol("SASLFinal out of turn".into()));
                    };
                    exchange.server_final(body.data()).map_err(|e| match e {
                        ScramError::ServerSignatureMismatch => BackendError::ServerUnverified {
                            role: keys.role.to_string(),
                            reason: "its SASLFinal signature does not match the verifier",
                        },
                        other => BackendError::Scram(other),
                    })?;
                }
                Message::AuthenticationOk => {
                    let reason = match &auth {
                        Auth::Scram(exchange) if exchange.verified() => None,
                        Auth::Scram(_) => Some("AuthenticationOk without a SASLFinal"),
                        // Trust (or an impostor): no proof of anything.
                        Auth::Start => Some("AuthenticationOk without authentication"),
                        Auth::Done => Some("a second AuthenticationOk"),
                    };
                    if let Some(reason) = reason {
                        return Err(BackendError::ServerUnverified {
                            role: keys.role.to_string(),
                            reason,
                        });
                    }
                    auth = Auth::Done;
                }
                Message::AuthenticationMd5Password(_) => {
                    return Err(BackendError::UnsupportedAuth("MD5"));
                }
                Message::AuthenticationCleartextPassword => {
                    return Err(BackendError::UnsupportedAuth("cleartext"));
                }
                Message::AuthenticationGss
                | Message::AuthenticationKerberosV5
                | Message::AuthenticationScmCredential
                | Message::AuthenticationSspi
                | Message::AuthenticationGssContinue(_) => {
                    return Err(BackendError::UnsupportedAuth("GSS/SSPI"));
                }
                Message::ParameterStatus(body) => {
                    params.push((
                        fallible(body.name())?.to_owned(),
                        fallible(body.value())?.to_owned(),
                    ));
                }
                Message::BackendKeyData(body) => {
                    key = Some(BackendKey {
                        pid: body.process_id(),
                        secret: body.secret_key(),
                    });
                }
                Message::ReadyForQuery(_) if matches!(auth, Auth::Done) => break,
                Message::ErrorResponse(body) => return Err(server_error(&mut body.fields())),
                Message::NoticeResponse(_) => {}
                _ => {
                    return Err(BackendError::Protocol(
                        "unexpected message during login".into(),
                    ));
                }
            }
            if !out.is_empty() {
                stream.write_all(&out).await?;
                out.clear();
            }
        }
        let key = key.ok_or_else(|| BackendError::Protocol("no BackendKeyData".into()))?;
        Ok(ServerConn {
            stream,
            role: keys.role.clone(),
            key,
            state: ServerParams::from_login(&params),
            statements: Default::default(),
            params,
            generation: keys.generation,
            created: Instant::now(),
            buf,
            client_buf: BytesMut::new(),
            registered: None,
            loaded: false,
        })
    }

    async fn start_tls(
        &self,
        mut tcp: TcpStream,
        config: Arc<rustls::ClientConfig>,
    ) -> Result<Stream, BackendError> {
        let mut req = BytesMut::new();
        startup::write_ssl_request(&mut req);
        tcp.write_all(&req).await?;
        let answer = tcp.read_u8().await?;
        if answer != b'S' {
            return Err(BackendError::TlsRefused);
        }
        let name = rustls_pki_types::ServerName::try_from(self.host.clone())
            .map_err(|e| BackendError::Protocol(format!("server name {:?}: {e}", self.host)))?;
        let tls = tokio_rustls::TlsConnector::from(config)
            .connect(name, tcp)
            .await?;
        Ok(Stream::TlsClient(Box::new(tls)))
    }
}

fn fallible<T>(r: std::io::Result<T>) -> Result<T, BackendError> {
    r.map_err(|e| BackendError::Protocol(e.to_string()))
}

/// Reads one whole backend message (postgres-protocol frames and parses it).
async fn read_message(stream: &mut Stream, buf: &mut BytesMut) -> Result<Message, BackendError> {
    loop {
        if let Some(msg) = Message::parse(buf).map_err(|e| BackendError::Protocol(e.to_string()))? {
            return Ok(msg);
        }
        if buf.len() > 1 << 20 {
            return Err(BackendError::Protocol(
                "oversized message during login".into(),
            ));
        }
        if stream.read_buf(buf).await? == 0 {
            return Err(BackendError::Io(std::io::ErrorKind::UnexpectedEof.into()));
        }
    }
}

pub(crate) fn server_error(fields: &mut ErrorFields<'_>) -> BackendError {
    let (mut code, mut message) = (String::new(), String::new());
    while let Ok(Some(f)) = fields.next() {
        match f.type_() {
            b'C' => code = String::from_utf8_lossy(f.value_bytes()).into_owned(),
            b'M' => message = String::from_utf8_lossy(f.value_bytes()).into_owned(),
            _ => {}
        }
    }
    BackendError::Server { code, message }
}

/// Sends a CancelRequest for `key` on a fresh connection, as PostgreSQL expects.
pub async fn cancel(target: &Target, key: BackendKey) -> Result<(), BackendError> {
    let mut tcp = tokio::time::timeout(
        target.connect_timeout,
        TcpStream::connect((target.host.as_str(), target.port)),
    )
    .await
    .map_err(|_| BackendError::Timeout(target.connect_timeout))??;
    let mut buf = BytesMut::new();
    startup::write_cancel_request(&mut buf, key.pid, key.secret);
    tcp.write_all(&buf).await?;
    // Postgres closes the connection without a reply; wait for that, briefly.
    let mut sink = [0u8; 1];
    let _ = tokio::time::timeout(Duration::from_secs(1), tcp.read(&mut sink)).await;
    Ok(())
}

#[cfg(test)]
mod tests;
