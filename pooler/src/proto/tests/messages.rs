//! Backend writers through postgres-protocol's parser and ours; frontend parsers on
//! what postgres-protocol writes.

use bytes::BytesMut;
use postgres_protocol::message::{backend as pg, frontend as pgf};

use super::{parse_pg, split_one};
use crate::proto::backend::{self, Diagnostic, Severity, TransactionStatus};
use crate::proto::error::{EncodeError, ParseError, SqlState};
use crate::proto::frame::Side;
use crate::proto::frontend;

#[test]
fn backend_writers_parse_with_postgres_protocol() {
    let mut b = BytesMut::new();
    backend::authentication_ok(&mut b);
    assert!(matches!(parse_pg(&b), pg::Message::AuthenticationOk));

    b.clear();
    backend::authentication_sasl(&mut b, &["SCRAM-SHA-256"]).unwrap();
    assert!(matches!(parse_pg(&b), pg::Message::AuthenticationSasl(_)));
    let (_, raw) = split_one(&b, Side::Backend);
    assert_eq!(&raw[..], b"\0\0\0\x0aSCRAM-SHA-256\0\0");

    b.clear();
    backend::authentication_sasl_continue(&mut b, b"r=abc,s=c2FsdA==,i=4096").unwrap();
    let pg::Message::AuthenticationSaslContinue(body) = parse_pg(&b) else {
        panic!()
    };
    assert_eq!(body.data(), b"r=abc,s=c2FsdA==,i=4096");

    b.clear();
    backend::authentication_sasl_final(&mut b, b"v=xyz").unwrap();
    let pg::Message::AuthenticationSaslFinal(body) = parse_pg(&b) else {
        panic!()
    };
    assert_eq!(body.data(), b"v=xyz");

    b.clear();
    backend::parameter_status(&mut b, "client_encoding", b"UTF8").unwrap();
    let pg::Message::ParameterStatus(body) = parse_pg(&b) else {
        panic!()
    };
    assert_eq!(
        (body.name().unwrap(), body.value().unwrap()),
        ("client_encoding", "UTF8")
    );
    let (_, raw) = split_one(&b, Side::Backend);
    let ps = backend::parse_parameter_status(&raw).unwrap();
    assert_eq!((ps.name, ps.value), ("client_encoding", &b"UTF8"[..]));

    b.clear();
    backend::backend_key_data(&mut b, 77, -123_456);
    let pg::Message::BackendKeyData(body) = parse_pg(&b) else {
        panic!()
    };
    assert_eq!((body.process_id(), body.secret_key()), (77, -123_456));
    let (_, raw) = split_one(&b, Side::Backend);
    assert_eq!(
        backend::parse_backend_key_data(&raw),
        Ok(backend::BackendKey {
            pid: 77,
            secret: -123_456
        })
    );

    for status in [
        TransactionStatus::Idle,
        TransactionStatus::InTransaction,
        TransactionStatus::Failed,
    ] {
        b.clear();
        backend::ready_for_query(&mut b, status);
        let pg::Message::ReadyForQuery(body) = parse_pg(&b) else {
            panic!()
        };
        assert_eq!(body.status(), status.as_byte());
        let (_, raw) = split_one(&b, Side::Backend);
        assert_eq!(backend::parse_ready_for_query(&raw), Ok(status));
    }

    b.clear();
    backend::command_complete(&mut b, "SET").unwrap();
    let pg::Message::CommandComplete(body) = parse_pg(&b) else {
        panic!()
    };
    assert_eq!(body.tag().unwrap(), "SET");
    let (_, raw) = split_one(&b, Side::Backend);
    assert_eq!(backend::parse_command_complete(&raw), Ok("SET"));

    type Writer = fn(&mut BytesMut);
    type Check = fn(&pg::Message) -> bool;
    let fixed: [(Writer, Check); 4] = [
        (backend::parse_complete, |m| {
            matches!(m, pg::Message::ParseComplete)
        }),
        (backend::bind_complete, |m| {
            matches!(m, pg::Message::BindComplete)
        }),
        (backend::close_complete, |m| {
            matches!(m, pg::Message::CloseComplete)
        }),
        (backend::empty_query_response, |m| {
            matches!(m, pg::Message::EmptyQueryResponse)
        }),
    ];
    for (write, is) in fixed {
        b.clear();
        write(&mut b);
        assert!(is(&parse_pg(&b)));
    }
}

#[test]
fn error_and_notice_responses_round_trip() {
    let d = Diagnostic {
        severity: Severity::Fatal,
        code: SqlState::TOO_MANY_CONNECTIONS,
        message: "no server available",
        detail: Some("waited 5s"),
        hint: Some("raise pool_size"),
    };
    let mut b = BytesMut::new();
    backend::error_response(&mut b, &d);
    assert!(matches!(parse_pg(&b), pg::Message::ErrorResponse(_)));
    let (_, raw) = split_one(&b, Side::Backend);
    assert_eq!(
        &raw[..],
        &b"SFATAL\0VFATAL\0C53300\0Mno server available\0Dwaited 5s\0Hraise pool_size\0\0"[..]
    );
    let parsed = backend::parse_error_response(&raw).unwrap();
    assert_eq!(parsed.severity, "FATAL");
    assert_eq!(parsed.code, "53300");
    assert_eq!(parsed.message, "no server available");
    assert_eq!(parsed.detail.as_deref(), Some("waited 5s"));
    assert_eq!(parsed.hint.as_deref(), Some("raise pool_size"));

    b.clear();
    backend::notice_response(
        &mut b,
        &Diagnostic::new(Severity::Notice, SqlState::ADMIN_SHUTDOWN, "bye"),
    );
    assert!(matches!(parse_pg(&b), pg::Message::NoticeResponse(_)));

    // NULs are dropped and long text is cut at a character boundary.
    b.clear();
    let long = format!("a\0b{}", "é".repeat(10_000));
    crate::proto::backend::write_error(&mut b, SqlState::INTERNAL_ERROR, &long);
    let (_, raw) = split_one(&b, Side::Backend);
    let parsed = backend::parse_error_response(&raw).unwrap();
    assert!(parsed.message.starts_with("abé"));
    assert!(parsed.message.len() <= backend::MAX_DIAGNOSTIC_FIELD);
    assert_eq!(parsed.severity, "ERROR");
}

#[test]
fn backend_parsers_reject_malformed_bodies() {
    assert!(backend::parse_ready_for_query(b"").is_err());
    assert!(backend::parse_ready_for_query(b"X").is_err());
    assert!(backend::parse_ready_for_query(b"II").is_err());
    assert!(backend::parse_backend_key_data(b"1234567").is_err());
    assert!(backend::parse_backend_key_data(b"123456789").is_err());
    assert!(backend::parse_parameter_status(b"name\0value").is_err());
    assert!(backend::parse_parameter_status(b"name\0value\0x").is_err());
    assert!(backend::parse_command_complete(b"SELECT").is_err());
    assert!(
        backend::parse_error_response(b"SERROR\0C12345\0\0").is_err(),
        "no message"
    );
    assert!(backend::parse_error_response(b"SERROR\0C1234\0Mx\0\0").is_err());
    assert!(
        backend::parse_error_response(b"SERROR\0C12345\0Mx\0").is_err(),
        "no terminator"
    );
    assert!(backend::parse_error_response(b"SERROR\0C12345\0Mx\0\0\0").is_err());
    assert!(backend::parse_negotiate_protocol_version(b"\0\0\0\0\x7f\xff\xff\xff").is_err());
    assert!(backend::parse_negotiate_protocol_version(b"\0\0\0\0\xff\xff\xff\xff").is_err());
    let ok = backend::parse_error_response(b"SFEHLER\0C28P01\0Mfalsch\0Fauth.c\0\0").unwrap();
    assert_eq!((&*ok.severity, ok.code), ("FEHLER", "28P01"));
    assert_eq!(
        backend::authentication_sasl(&mut BytesMut::new(), &[""]),
        Err(EncodeError::InteriorNul {
            what: "SASL mechanism"
        })
    );
}

#[test]
fn frontend_parsers_read_what_postgres_protocol_writes() {
    let mut b = BytesMut::new();
    pgf::sasl_initial_response("SCRAM-SHA-256", b"n,,n=,r=abc", &mut b).unwrap();
    let (tag, body) = split_one(&b, Side::Frontend);
    assert_eq!(tag, b'p');
    let init = frontend::parse_sasl_initial_response(&body).unwrap();
    assert_eq!(
        (init.mechanism, init.data),
        ("SCRAM-SHA-256", Some(&b"n,,n=,r=abc"[..]))
    );

    b.clear();
    pgf::sasl_response(b"c=biws,r=abc,p=xyz", &mut b).unwrap();
    let (_, body) = split_one(&b, Side::Frontend);
    assert_eq!(
        frontend::parse_sasl_response(&body),
        Ok(&b"c=biws,r=abc,p=xyz"[..])
    );

    b.clear();
    pgf::password_message(b"hunter2", &mut b).unwrap();
    let (_, body) = split_one(&b, Side::Frontend);
    assert_eq!(frontend::parse_password_message(&body), Ok(&b"hunter2"[..]));

    b.clear();
    pgf::query("SET search_path = x", &mut b).unwrap();
    let (tag, body) = split_one(&b, Side::Frontend);
    assert_eq!(tag, b'Q');
    assert_eq!(
        frontend::parse_query(&body),
        Ok(&b"SET search_path = x"[..])
    );
}

#[test]
fn frontend_parsers_reject_malformed_bodies() {
    let none = frontend::parse_sasl_initial_response(b"SCRAM-SHA-256\0\xff\xff\xff\xff").unwrap();
    assert_eq!(none.data, None);
    assert!(frontend::parse_sasl_initial_response(b"SCRAM-SHA-256\0\xff\xff\xff\xfe").is_err());
    assert!(frontend::parse_sasl_initial_response(b"SCRAM-SHA-256\0\0\0\0\x05abc").is_err());
    assert!(frontend::parse_sasl_initial_response(b"SCRAM-SHA-256\0\0\0\0\x01ab").is_err());
    assert!(frontend::parse_sasl_initial_response(b"SCRAM-SHA-256").is_err());
    assert!(matches!(
        frontend::parse_sasl_response(&[b'x'; 1021]),
        Err(ParseError::TooLong { .. })
    ));
    assert!(frontend::parse_sasl_response(&[b'x'; 1020]).is_ok());
    assert!(frontend::parse_password_message(b"pw").is_err());
    assert!(frontend::parse_password_message(b"pw\0x\0").is_err());
    assert!(frontend::parse_query(b"SELECT 1").is_err());
}

#[test]
fn extended_protocol_heads_and_row_messages_round_trip() {
    // Bind as postgres-protocol writes it: one text parameter, binary results.
    let mut b = BytesMut::new();
    pgf::bind(
        "p1",
        "s1",
        [0i16],
        [Some("abc")],
        |v, buf| {
            buf.extend_from_slice(v.unwrap().as_bytes());
            Ok(postgres_protocol::IsNull::No)
        },
        [1i16],
        &mut b,
    )
    .map_err(|_| ())
    .unwrap();
    let (tag, body) = split_one(&b, Side::Frontend);
    assert_eq!(tag, b'B');
    let bind = frontend::parse_bind(&body).unwrap();
    assert_eq!(
        (bind.portal, bind.statement, bind.result_formats),
        (&b"p1"[..], &b"s1"[..], vec![1])
    );

    b.clear();
    pgf::parse("s1", "SHOW POOLS", [], &mut b).unwrap();
    let (_, body) = split_one(&b, Side::Frontend);
    assert_eq!(
        frontend::parse_parse_head(&body),
        Ok((&b"s1"[..], &b"SHOW POOLS"[..]))
    );
    b.clear();
    pgf::describe(b'S', "s1", &mut b).unwrap();
    let (_, body) = split_one(&b, Side::Frontend);
    assert_eq!(
        frontend::parse_target(&body, "Describe"),
        Ok((b'S', &b"s1"[..]))
    );
    b.clear();
    pgf::execute("p1", 0, &mut b).unwrap();
    let (_, body) = split_one(&b, Side::Frontend);
    assert_eq!(frontend::parse_execute_portal(&body), Ok(&b"p1"[..]));

    let mut out = BytesMut::new();
    backend::row_description(
        &mut out,
        &[("user", backend::TEXT_OID), ("n", backend::INT8_OID)],
    )
    .unwrap();
    match parse_pg(&out) {
        pg::Message::RowDescription(d) => {
            use fallible_iterator::FallibleIterator;
            let fields: Vec<(String, u32)> = d
                .fields()
                .map(|f| Ok((f.name().to_owned(), f.type_oid())))
                .collect()
                .unwrap();
            assert_eq!(fields, [("user".into(), 25), ("n".into(), 20)]);
        }
        _ => panic!("not a RowDescription"),
    }
    out.clear();
    backend::data_row(&mut out, &[Some(b"tk_1"), None]).unwrap();
    match parse_pg(&out) {
        pg::Message::DataRow(row) => {
            use fallible_iterator::FallibleIterator;
            let ranges: Vec<_> = row.ranges().collect().unwrap();
            assert_eq!(ranges.len(), 2);
            assert_eq!(&row.buffer()[ranges[0].clone().unwrap()], b"tk_1");
            assert!(ranges[1].is_none());
        }
        _ => panic!("not a DataRow"),
    }
}

#[test]
fn a_server_error_is_resent_as_fatal_with_its_other_fields() {
    let body = b"SERROR\0VERROR\0C42704\0Munrecognized configuration parameter \"x\"\0\
                 Dsome detail\0Fguc.c\0L42\0\0";
    let mut b = BytesMut::new();
    backend::error_as_fatal(&mut b, body).unwrap();
    let (tag, raw) = split_one(&b, Side::Backend);
    assert_eq!(tag, b'E');
    let parsed = backend::parse_error_response(&raw).unwrap();
    assert_eq!(parsed.severity, "FATAL");
    assert_eq!(parsed.code, "42704");
    assert_eq!(parsed.message, "unrecognized configuration parameter \"x\"");
    assert_eq!(parsed.detail.as_deref(), Some("some detail"));
    assert!(raw.windows(7).any(|w| w == b"Fguc.c\0"));
    // A malformed body leaves the buffer as it was.
    let mut b = BytesMut::from(&b"kept"[..]);
    assert!(backend::error_as_fatal(&mut b, b"SERROR").is_err());
    assert_eq!(&b[..], b"kept");
}

#[test]
fn notification_responses_round_trip_and_reject_malformed_bodies() {
    let mut b = BytesMut::new();
    backend::notification_response(&mut b, 4242, b"orders", "neu: é".as_bytes()).unwrap();
    let pg::Message::NotificationResponse(body) = parse_pg(&b) else {
        panic!()
    };
    assert_eq!(
        (
            body.process_id(),
            body.channel().unwrap(),
            body.message().unwrap()
        ),
        (4242, "orders", "neu: é")
    );
    let (tag, raw) = split_one(&b, Side::Backend);
    assert_eq!(tag, b'A');
    let n = backend::parse_notification_response(&raw).unwrap();
    assert_eq!(
        (n.pid, n.channel, n.payload),
        (4242, &b"orders"[..], "neu: é".as_bytes())
    );
    assert!(backend::parse_notification_response(b"\0\0\0\x01c\0").is_err());
    assert!(backend::parse_notification_response(b"\0\0\0\x01c\0p\0x").is_err());
    assert!(backend::parse_notification_response(b"\0\0\0").is_err());
    assert_eq!(
        backend::notification_response(&mut BytesMut::new(), 1, b"a\0b", b""),
        Err(EncodeError::InteriorNul {
            what: "channel name"
        })
    );
}
