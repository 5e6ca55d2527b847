//! What a client asks for at startup: the `options` parameter and the packet's own
//! settings are honoured and follow the client from server to server; what Postgres
//! refuses is refused with its own error; the notices Postgres gives are given. And a
//! client connecting straight to Postgres and one connecting through the session port
//! see the same parameters, notices and errors for the same packet.

use std::collections::BTreeMap;
use std::time::Duration;

use bytes::BytesMut;
use fallible_iterator::FallibleIterator;
use postgres_protocol::authentication::sasl::{ChannelBinding, ScramSha256};
use postgres_protocol::message::backend::{ErrorFields, Message};
use postgres_protocol::message::frontend;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_postgres::AsyncMessage;

use crate::common::{App, Env, env, message, sqlstate, value};

/// An error's or notice's fields a client reads (file, line and routine aside).
#[derive(Debug, Clone, PartialEq, Eq)]
struct Report {
    severity: String,
    code: String,
    message: String,
    detail: Option<String>,
    hint: Option<String>,
}

/// Everything a client sees from its startup packet to ReadyForQuery, or to the error
/// that ends it.
#[derive(Debug, Default, PartialEq, Eq)]
struct Seen {
    parameters: BTreeMap<String, String>,
    notices: Vec<Report>,
    error: Option<Report>,
    authenticated: bool,
    ready: bool,
    /// NegotiateProtocolVersion: the newest minor version, the options not recognised.
    negotiated: Option<(u32, Vec<String>)>,
}

fn report(mut fields: ErrorFields<'_>) -> Report {
    let mut r = Report {
        severity: String::new(),
        code: String::new(),
        message: String::new(),
        detail: None,
        hint: None,
    };
    while let Some(f) = fields.next().unwrap() {
        let value = String::from_utf8_lossy(f.value_bytes()).into_owned();
        match f.type_() {
            b'V' => r.severity = value,
            b'C' => r.code = value,
            b'M' => r.message = value,
            b'D' => r.detail = Some(value),
            b'H' => r.hint = Some(value),
            _ => {}
        }
    }
    r
}

/// Logs in over plain TCP with SCRAM, sending exactly `params` after user and database.
async fn log_in(port: u16, app: &App, db: &str, params: &[(&str, &str)]) -> Seen {
    let mut tcp = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    let mut out = BytesMut::new();
    // A packet that names its own database (or an empty one) sends that instead.
    let mut all = vec![("user", app.role.as_str())];
    if !params.iter().any(|(k, _)| *k == "database") {
        all.push(("database", db));
    }
    all.extend_from_slice(params);
    frontend::startup_message(all.iter().copied(), &mut out).unwrap();
    tcp.write_all(&out).await.unwrap();
    let mut buf = BytesMut::new();
    let mut seen = Seen::default();
    let mut scram = None;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        // NegotiateProtocolVersion, which postgres-protocol does not parse: the newest
        // minor version and the options not recognised.
        if buf.len() >= 5 && buf[0] == b'v' {
            let len = u32::from_be_bytes(buf[1..5].try_into().unwrap()) as usize;
            if buf.len() > len {
                let body = buf.split_to(1 + len).split_off(5);
                let minor = u32::from_be_bytes(body[..4].try_into().unwrap());
                let names = body[8..]
                    .split(|b| *b == 0)
                    .filter(|n| !n.is_empty())
                    .map(|n| String::from_utf8_lossy(n).into_owned())
                    .collect();
                seen.negotiated = Some((minor, names));
                continue;
            }
        }
        let message = match Message::parse(&mut buf).unwrap() {
            Some(m) => m,
            None => {
                let read = tokio::time::timeout_at(deadline, tcp.read_buf(&mut buf))
                    .await
                    .expect("an answer within the deadline")
                    .unwrap();
                if read == 0 {
                    return seen;
                }
                continue;
            }
        };
        out.clear();
        match message {
            Message::AuthenticationSasl(_) => {
                let s = ScramSha256::new(app.password.as_bytes(), ChannelBinding::unsupported());
                frontend::sasl_initial_response("SCRAM-SHA-256", s.message(), &mut out).unwrap();
                scram = Some(s);
            }
            Message::AuthenticationSaslContinue(body) => {
                let s = scram.as_mut().unwrap();
                s.update(body.data()).unwrap();
                frontend::sasl_response(s.message(), &mut out).unwrap();
            }
            Message::AuthenticationSaslFinal(body) => {
                scram.take().unwrap().finish(body.data()).unwrap();
            }
            Message::AuthenticationOk => seen.authenticated = true,
            Message::ParameterStatus(body) => {
                seen.parameters.insert(
                    body.name().unwrap().to_owned(),
                    body.value().unwrap().to_owned(),
                );
            }
            Message::NoticeResponse(body) => seen.notices.push(report(body.fields())),
            Message::ErrorResponse(body) => {
                seen.error = Some(report(body.fields()));
                return seen;
            }
            Message::ReadyForQuery(_) => {
                seen.ready = true;
                frontend::terminate(&mut out);
                let _ = tcp.write_all(&out).await;
                return seen;
            }
            _ => {}
        }
        if !out.is_empty() {
            tcp.write_all(&out).await.unwrap();
        }
    }
}

async fn session_env() -> (Env, App) {
    let e = env(|c| c.session_listen = Some("127.0.0.1:0".parse().unwrap())).await;
    let app = e.app_with_pool(3).await;
    (e, app)
}

/// The same startup packet straight to Postgres and through the session port: the same
/// ParameterStatus set, notices and errors.
#[tokio::test]
async fn the_session_port_answers_a_startup_packet_as_postgres_does() {
    let (e, app) = session_env().await;
    let direct = e.fixture.cluster.port();
    let pooled = e.pooler.session_addr.unwrap().port();
    let long_name = "a".repeat(70);
    let long_accented = "é".repeat(40);
    let packets: Vec<Vec<(&str, &str)>> = vec![
        vec![],
        vec![("application_name", "compare")],
        vec![(
            "options",
            "-c default_transaction_read_only=on -c statement_timeout=5s",
        )],
        vec![(
            "options",
            "--search-path=public -c DateStyle=German\\,\\ YMD",
        )],
        vec![("options", "-e -c IntervalStyle=iso_8601")],
        vec![("options", "-c app.tenant=7 --app.other-key=x\\ y")],
        vec![("options", "-c")],
        vec![("options", "-c statement_timeout")],
        vec![("options", "--lock-timeout")],
        vec![("options", "-X")],
        vec![("options", "-Xe")],
        vec![("options", "-c statement_timeout=1s stray")],
        vec![("options", "-c log_statement=all")],
        vec![("options", "-c log_connections=on")],
        vec![("options", "-c shared_buffers=1MB")],
        vec![("options", "-c wal_level=minimal")],
        vec![("options", "-c server_version=1")],
        vec![("options", "-c no_such_parameter=1")],
        vec![("options", "-B 1MB")],
        vec![("options", "-c statement_timeout=soon")],
        vec![("application_name", long_name.as_str())],
        vec![("application_name", long_accented.as_str())],
        vec![
            ("options", "-c application_name=first"),
            ("application_name", long_name.as_str()),
        ],
        vec![("no_such_parameter", "1")],
        vec![("TimeZone", "Mars/Olympus_Mons")],
        vec![("TimeZone", "utc"), ("client_encoding", "utf8")],
        vec![
            ("DateStyle", "iso, mdy"),
            ("IntervalStyle", "postgres_verbose"),
        ],
        vec![("search_path", "a b")],
        vec![("extra_float_digits", "2"), ("app.custom", "yes")],
        vec![
            ("client_min_messages", "warning"),
            ("application_name", long_name.as_str()),
        ],
        // A walsender: refused after authentication, before the settings are read.
        vec![("replication", "database")],
        vec![("replication", "on"), ("options", "-c nonsense=1")],
        vec![("replication", "true"), ("replication", "no")],
        // Refused as the packet is read, before authentication.
        vec![("replication", "maybe")],
        vec![("options", "-c nonsense=1"), ("replication", "")],
        // Refused after authentication: no database is the user's name.
        vec![("database", "")],
        vec![
            ("database", "no_such_database"),
            ("options", "-c nonsense=1"),
        ],
        // Protocol options nobody knows: NegotiateProtocolVersion, then on as 3.0.
        vec![("_pq_.no_such_option", "1")],
        vec![("options", "-c role=postgres")],
        vec![("session_authorization", "postgres")],
        vec![("options", "-c transaction_isolation=serializable")],
        vec![("options", "-c lc_messages=C")],
        vec![("default_transaction_isolation", "serializable")],
    ];
    for packet in &packets {
        // Twice through the pooler: the second login may use what the first learned.
        for round in 0..2 {
            let theirs = log_in(direct, &app, &e.fixture.db, packet).await;
            let ours = log_in(pooled, &app, &e.fixture.db, packet).await;
            assert_eq!(ours, theirs, "{packet:?}, round {round}");
        }
    }
}

/// What `options` and the packet ask for holds in every transaction, on whichever
/// server it runs, in both modes; another client of the same app never sees it.
#[tokio::test]
async fn startup_settings_follow_the_client_from_server_to_server() {
    let (e, app) = session_env().await;
    let ports = [e.pooler.addr.port(), e.pooler.session_addr.unwrap().port()];
    for port in ports {
        let mut config = e.config_on_port(&app.role, &app.password, port);
        config.options(
            "-c default_transaction_read_only=on -c statement_timeout=4321 \
             --work-mem=5MB -c app.tenant=t\\ 7",
        );
        let reader = dataplane_tests::connect(&config).await.unwrap();
        let plain = dataplane_tests::connect(&e.config_on_port(&app.role, &app.password, port))
            .await
            .unwrap();
        plain
            .batch_execute("CREATE TABLE IF NOT EXISTS t (x int)")
            .await
            .unwrap();
        for round in 0..6 {
            // Interleaved, with a transaction held open, so servers change hands.
            let hold = dataplane_tests::connect(&e.config_on_port(&app.role, &app.password, port))
                .await
                .unwrap();
            if round % 2 == 0 {
                hold.batch_execute("BEGIN; SELECT 1").await.unwrap();
            }
            let err = reader
                .batch_execute("INSERT INTO t VALUES (1)")
                .await
                .unwrap_err();
            assert_eq!(sqlstate(&err), "25006", "port {port}: {}", message(&err));
            assert_eq!(value(&reader, "SHOW statement_timeout").await, "4321ms");
            assert_eq!(value(&reader, "SHOW work_mem").await, "5MB");
            assert_eq!(
                value(&reader, "SELECT current_setting('app.tenant')").await,
                "t 7"
            );
            plain
                .batch_execute("INSERT INTO t VALUES (2)")
                .await
                .unwrap();
            assert_ne!(value(&plain, "SHOW statement_timeout").await, "4321ms");
            assert_ne!(value(&plain, "SHOW work_mem").await, "5MB");
            assert_eq!(
                value(
                    &plain,
                    "SELECT coalesce(current_setting('app.tenant', true), '')"
                )
                .await,
                "",
                "port {port}"
            );
            drop(hold);
        }
        // The client changes a setting it started with: the new value follows it, and
        // it is not pinned for it (RESET takes it back to its startup value).
        reader.batch_execute("SET work_mem = '6MB'").await.unwrap();
        assert_eq!(value(&reader, "SHOW work_mem").await, "6MB");
        reader.batch_execute("RESET work_mem").await.unwrap();
        assert_eq!(value(&reader, "SHOW work_mem").await, "5MB");
        if port == e.pooler.addr.port() {
            assert_eq!(
                e.pooler.shared.roles.get(&app.role).unwrap().pinned(),
                0,
                "startup settings are no session state"
            );
        }
    }
}

/// Anything in `options` Postgres would refuse is refused at login with its error,
/// through both ports; nothing is ignored.
#[tokio::test]
async fn options_postgres_refuses_are_refused_at_login() {
    let (e, app) = session_env().await;
    let ports = [e.pooler.addr.port(), e.pooler.session_addr.unwrap().port()];
    for port in ports {
        for (options, code, text) in [
            (
                "-c log_statement=all",
                "42501",
                "permission denied to set parameter \"log_statement\"",
            ),
            (
                "-c nonsense=1",
                "42704",
                "unrecognized configuration parameter \"nonsense\"",
            ),
            (
                "-Z",
                "42601",
                "invalid command-line argument for server process: -Z",
            ),
            (
                "-c statement_timeout",
                "42601",
                "-c statement_timeout requires a value",
            ),
            (
                "-c ignore_system_indexes=on",
                "0A000",
                "parameter \"ignore_system_indexes\" can only be set when a session starts",
            ),
        ] {
            let mut config = e.config_on_port(&app.role, &app.password, port);
            config.options(options);
            let err = dataplane_tests::connect(&config).await.unwrap_err();
            assert_eq!(sqlstate(&err), code, "port {port}: {options}");
            assert!(
                message(&err).starts_with(text),
                "port {port}: {options}: {}",
                message(&err)
            );
        }
    }
}

/// An application_name past 63 bytes: truncated, with Postgres' own NOTICE, through
/// both ports, every time.
#[tokio::test]
async fn a_long_application_name_is_truncated_with_postgres_notice() {
    let (e, app) = session_env().await;
    let ports = [e.pooler.addr.port(), e.pooler.session_addr.unwrap().port()];
    let long = format!("worker-{}", "x".repeat(70));
    for port in ports {
        for _ in 0..2 {
            let mut config = e.config_on_port(&app.role, &app.password, port);
            config.application_name(&long);
            let (client, mut connection) = config.connect(tokio_postgres::NoTls).await.unwrap();
            let (tx, mut notices) = tokio::sync::mpsc::unbounded_channel();
            tokio::spawn(async move {
                while let Some(Ok(m)) = std::future::poll_fn(|cx| connection.poll_message(cx)).await
                {
                    if let AsyncMessage::Notice(n) = m {
                        let _ = tx.send(n);
                    }
                }
            });
            let name = value(&client, "SHOW application_name").await;
            assert_eq!(name, long[..63], "port {port}");
            let notice = notices.try_recv().expect("a notice at login");
            assert_eq!(notice.code().code(), "42622");
            assert_eq!(
                notice.message(),
                format!("identifier \"{long}\" will be truncated to \"{name}\"")
            );
        }
    }
}
