//! The pass-through login against a fake server on a loopback socket: an honest one,
//! and ones that let the pooler in without proving they hold the role's verifier.

use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use postgres_protocol::authentication::sasl::{ChannelBinding, ScramSha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use super::{BackendError, LoginKeys, Target};
use crate::auth::scram::{ClientKey, ServerExchange};
use crate::proto::backend as msg;
use crate::proto::backend::TransactionStatus;
use crate::verifier::ScramSecret;

/// How the fake server ends the exchange.
#[derive(Clone, Copy, Debug)]
enum Server {
    /// SASLContinue, SASLFinal with the right signature, AuthenticationOk.
    Honest,
    /// AuthenticationOk straight after SASLContinue: no SASLFinal at all.
    SkipsFinal,
    /// A SASLFinal whose signature is not the verifier's, then AuthenticationOk.
    ForgesFinal,
    /// AuthenticationOk straight after the startup packet, as `trust` would.
    NoAuthentication,
}

/// One message from the pooler: tag and body (the startup packet has no tag).
async fn read_message(s: &mut TcpStream, tagged: bool) -> (u8, Vec<u8>) {
    let tag = if tagged {
        s.read_u8().await.unwrap()
    } else {
        0
    };
    let len = s.read_i32().await.unwrap() as usize;
    let mut body = vec![0; len - 4];
    s.read_exact(&mut body).await.unwrap();
    (tag, body)
}

/// Plays Postgres for one login as `how` says; the honest parts use our own SCRAM
/// server over the same verifier Postgres would hold.
async fn fake_server(listener: TcpListener, secret: ScramSecret, how: Server) {
    let (mut s, _) = listener.accept().await.unwrap();
    read_message(&mut s, false).await;
    let mut out = BytesMut::new();
    if let Server::NoAuthentication = how {
        msg::authentication_ok(&mut out);
    } else {
        msg::authentication_sasl(&mut out, &["SCRAM-SHA-256"]).unwrap();
        s.write_all(&out).await.unwrap();
        out.clear();
        let (tag, body) = read_message(&mut s, true).await;
        assert_eq!(tag, b'p');
        let first = crate::proto::frontend::parse_sasl_initial_response(&body).unwrap();
        let mut exchange = ServerExchange::new(secret, "fakeSERVERnonce").unwrap();
        let server_first = exchange.client_first(first.data.unwrap()).unwrap();
        msg::authentication_sasl_continue(&mut out, &server_first).unwrap();
        s.write_all(&out).await.unwrap();
        out.clear();
        let (tag, body) = read_message(&mut s, true).await;
        assert_eq!(tag, b'p');
        let (server_final, _) = exchange.client_final(&body).unwrap();
        match how {
            Server::Honest => msg::authentication_sasl_final(&mut out, &server_final).unwrap(),
            Server::ForgesFinal => {
                let forged = format!("v={}", "A".repeat(43) + "=");
                msg::authentication_sasl_final(&mut out, forged.as_bytes()).unwrap();
            }
            Server::SkipsFinal | Server::NoAuthentication => {}
        }
        msg::authentication_ok(&mut out);
    }
    msg::parameter_status(&mut out, "server_version", b"17.0").unwrap();
    msg::backend_key_data(&mut out, 4242, 99);
    msg::ready_for_query(&mut out, TransactionStatus::Idle);
    // The pooler may already have hung up; what it did is its result.
    let _ = s.write_all(&out).await;
    let mut rest = [0u8; 64];
    let _ = tokio::time::timeout(Duration::from_secs(5), s.read(&mut rest)).await;
}

/// The keys a client's login through the pooler would leave: its ClientKey, recovered
/// by our SCRAM server from an independent client (postgres-protocol's).
fn keys(password: &str) -> LoginKeys {
    let verifier = postgres_protocol::password::scram_sha_256(password.as_bytes());
    let secret = ScramSecret::parse(&verifier).unwrap();
    let mut client = ScramSha256::new(password.as_bytes(), ChannelBinding::unsupported());
    let mut server = ServerExchange::new(secret.clone(), "loginNONCE").unwrap();
    let server_first = server.client_first(client.message()).unwrap();
    client.update(&server_first).unwrap();
    let (_, client_key): (_, ClientKey) = server.client_final(client.message()).unwrap();
    LoginKeys {
        role: Arc::from("tk_t1_pfake_dev"),
        client_key: Arc::new(client_key),
        secret: Arc::new(secret),
        generation: 1,
    }
}

/// Logs in against a fake server behaving as `how` says; `Ok` once logged in, with
/// the BackendKeyData the server sent.
async fn login_against(how: Server) -> Result<(), BackendError> {
    let keys = keys("the-app's-password");
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let server = tokio::spawn(fake_server(listener, (*keys.secret).clone(), how));
    let target = Target {
        host: "127.0.0.1".into(),
        port,
        dbname: "talkide_dataplane".into(),
        tls: None,
        connect_timeout: Duration::from_secs(10),
        keepalive: None,
    };
    // Dropping the connection hangs up, which ends the fake server's last read.
    let outcome = target
        .connect(&keys)
        .await
        .map(|conn| assert_eq!((conn.key.pid, conn.key.secret), (4242, 99)));
    server.await.unwrap();
    outcome
}

#[tokio::test]
async fn an_honest_server_is_verified_and_logged_in() {
    login_against(Server::Honest).await.unwrap();
}

#[tokio::test]
async fn a_server_that_does_not_prove_itself_is_refused() {
    for (how, reason) in [
        (Server::SkipsFinal, "AuthenticationOk without a SASLFinal"),
        (
            Server::ForgesFinal,
            "its SASLFinal signature does not match the verifier",
        ),
        (
            Server::NoAuthentication,
            "AuthenticationOk without authentication",
        ),
    ] {
        let err = login_against(how).await.unwrap_err();
        assert!(err.is_unverified_server(), "{how:?}: {err}");
        assert!(!err.is_unavailable(), "{how:?}: {err}");
        match &err {
            BackendError::ServerUnverified { role, reason: r } => {
                assert_eq!((role.as_str(), *r), ("tk_t1_pfake_dev", reason), "{how:?}");
            }
            other => panic!("{how:?}: {other}"),
        }
        // What is logged names the role and the reason, never a key.
        let text = err.to_string();
        assert!(
            text.contains("tk_t1_pfake_dev") && text.contains(reason),
            "{text}"
        );
    }
}
