//! The untagged first packets.

use bytes::{BufMut, BytesMut};
use postgres_protocol::message::frontend as pgf;

use super::split_one;
use crate::proto::backend;
use crate::proto::error::{EncodeError, ParseError, SqlState};
use crate::proto::frame::Side;
use crate::proto::startup::{self, StartupError, StartupPacket};

#[test]
fn startup_round_trips_and_needs_the_whole_packet() {
    let mut buf = BytesMut::new();
    startup::write_startup(
        &mut buf,
        &[
            ("user", "tk_t1_pshop_prod"),
            ("database", "db"),
            ("application_name", "é"),
        ],
    )
    .unwrap();
    // postgres-protocol writes the same bytes.
    let mut theirs = BytesMut::new();
    pgf::startup_message(
        [
            ("user", "tk_t1_pshop_prod"),
            ("database", "db"),
            ("application_name", "é"),
        ],
        &mut theirs,
    )
    .unwrap();
    assert_eq!(buf, theirs);
    for cut in 0..buf.len() {
        let mut partial = BytesMut::from(&buf[..cut]);
        assert_eq!(startup::read(&mut partial), Ok(None));
        assert_eq!(partial.len(), cut);
    }
    buf.put_slice(b"next");
    let packet = startup::read(&mut buf).unwrap().unwrap();
    assert_eq!(&buf[..], b"next");
    let StartupPacket::Startup {
        major,
        minor,
        params,
        protocol_options,
    } = &packet
    else {
        panic!("{packet:?}")
    };
    assert_eq!((*major, *minor), (3, 0));
    assert_eq!(startup::param(params, "database"), Some("db"));
    assert_eq!(startup::param(params, "application_name"), Some("é"));
    assert!(protocol_options.is_empty());
    assert_eq!(packet.negotiation(), None);
}

#[test]
fn requests_round_trip() {
    let mut buf = BytesMut::new();
    startup::write_ssl_request(&mut buf);
    startup::write_cancel_request(&mut buf, 1234, -5);
    assert_eq!(startup::read(&mut buf), Ok(Some(StartupPacket::SslRequest)));
    assert_eq!(
        startup::read(&mut buf),
        Ok(Some(StartupPacket::Cancel {
            pid: 1234,
            secret: -5
        }))
    );
    let mut gss = BytesMut::from(&[0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x30][..]);
    assert_eq!(
        startup::read(&mut gss),
        Ok(Some(StartupPacket::GssEncRequest))
    );
}

fn raw_startup(code: u32, body: &[u8]) -> BytesMut {
    let mut b = BytesMut::new();
    b.put_u32(8 + body.len() as u32);
    b.put_u32(code);
    b.put_slice(body);
    b
}

#[test]
fn startup_rejects_what_postgres_rejects() {
    // Lengths are refused from the first four bytes alone.
    for len in [0u32, 7, 10_005, u32::MAX] {
        let mut b = BytesMut::from(&len.to_be_bytes()[..]);
        assert_eq!(startup::read(&mut b), Err(StartupError::BadLength { len }));
    }
    let mut ok_len = BytesMut::from(&10_004u32.to_be_bytes()[..]);
    assert_eq!(startup::read(&mut ok_len), Ok(None));

    let v30 = startup::PROTOCOL_3_0;
    let cases: Vec<(BytesMut, StartupError)> = vec![
        (
            raw_startup(v30, b"database\0db\0\0"),
            StartupError::MissingUser,
        ),
        (raw_startup(v30, b"user\0\0\0"), StartupError::MissingUser),
        (
            raw_startup(v30, b""),
            StartupError::Malformed(ParseError::MissingNul {
                what: "startup packet",
            }),
        ),
        (
            raw_startup(v30, b"user\0bob\0"),
            StartupError::Malformed(ParseError::MissingNul {
                what: "startup packet",
            }),
        ),
        (
            raw_startup(v30, b"user\0bob"),
            StartupError::Malformed(ParseError::MissingNul {
                what: "startup packet",
            }),
        ),
        (
            raw_startup(v30, b"user\0bob\0\0x"),
            StartupError::Malformed(ParseError::TrailingBytes {
                what: "startup packet",
            }),
        ),
        (
            raw_startup(v30, b"user\0\xff\0\0"),
            StartupError::Malformed(ParseError::NotUtf8 {
                what: "startup packet",
            }),
        ),
        (
            raw_startup(2 << 16, b"user\0bob\0\0"),
            StartupError::UnsupportedProtocol { major: 2, minor: 0 },
        ),
        (
            raw_startup(startup::SSL_REQUEST_CODE, b"xxxx"),
            StartupError::BadRequestLength {
                code: startup::SSL_REQUEST_CODE,
                len: 12,
            },
        ),
        (
            raw_startup(startup::CANCEL_REQUEST_CODE, b"1234"),
            StartupError::BadRequestLength {
                code: startup::CANCEL_REQUEST_CODE,
                len: 12,
            },
        ),
    ];
    for (mut packet, want) in cases {
        assert_eq!(startup::read(&mut packet), Err(want));
    }
    assert_eq!(
        StartupError::MissingUser.sqlstate(),
        SqlState::INVALID_AUTHORIZATION_SPECIFICATION
    );
    assert_eq!(
        StartupError::UnsupportedProtocol { major: 2, minor: 0 }.sqlstate(),
        SqlState::FEATURE_NOT_SUPPORTED
    );
}

/// `replication`, as the server reads it: `database` or a boolean in `parse_bool`'s
/// spellings, the last one deciding; anything else refused where it stands, before the
/// user name is looked for, with the server's code and hint.
#[test]
fn the_replication_key_is_read_as_postgres_reads_it() {
    use startup::Replication::{self, Logical, Off, Physical};
    for (value, want) in [
        ("database", Some(Logical)),
        ("Database", None),
        ("true", Some(Physical)),
        ("T", Some(Physical)),
        ("tru", Some(Physical)),
        ("yes", Some(Physical)),
        ("on", Some(Physical)),
        ("ON", Some(Physical)),
        ("1", Some(Physical)),
        ("false", Some(Off)),
        ("f", Some(Off)),
        ("NO", Some(Off)),
        ("of", Some(Off)),
        ("off", Some(Off)),
        ("0", Some(Off)),
        ("o", None),
        ("offf", None),
        ("truex", None),
        ("10", None),
        ("", None),
        (" on", None),
    ] {
        assert_eq!(Replication::parse(value), want, "{value:?}");
    }
    let params = |pairs: &[(&str, &str)]| -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    };
    assert_eq!(Replication::of(&params(&[("user", "bob")])), Off);
    assert_eq!(
        Replication::of(&params(&[
            ("replication", "database"),
            ("replication", "off")
        ])),
        Off
    );
    assert_eq!(
        Replication::of(&params(&[("replication", "0"), ("replication", "on")])),
        Physical
    );

    let mut b = raw_startup(startup::PROTOCOL_3_0, b"replication\0maybe\0\0");
    let err = startup::read(&mut b).unwrap_err();
    assert_eq!(
        err,
        StartupError::InvalidReplication {
            value: "maybe".into()
        }
    );
    assert_eq!(
        err.to_string(),
        "invalid value for parameter \"replication\": \"maybe\""
    );
    assert_eq!(err.sqlstate(), SqlState::INVALID_PARAMETER_VALUE);
    assert_eq!(
        err.hint(),
        Some("Valid values are: \"false\", 0, \"true\", 1, \"database\".")
    );
    let mut b = raw_startup(startup::PROTOCOL_3_0, b"user\0bob\0replication\0off\0\0");
    assert!(startup::read(&mut b).unwrap().is_some());
}

#[test]
fn newer_minor_versions_and_protocol_options_are_reported() {
    let mut b = raw_startup((3 << 16) | 2, b"user\0bob\0_pq_.foo\0on\0\0");
    let packet = startup::read(&mut b).unwrap().unwrap();
    let StartupPacket::Startup { minor, params, .. } = &packet else {
        panic!()
    };
    assert_eq!(*minor, 2);
    assert_eq!(params.len(), 1, "protocol options are not parameters");
    let (newest, options) = packet.negotiation().unwrap();
    assert_eq!((newest, options), (0, &["_pq_.foo".to_owned()][..]));

    let mut out = BytesMut::new();
    backend::negotiate_protocol_version(&mut out, newest, options).unwrap();
    let (tag, body) = split_one(&out, Side::Backend);
    assert_eq!(tag, b'v');
    assert_eq!(
        backend::parse_negotiate_protocol_version(&body),
        Ok((0, vec!["_pq_.foo"]))
    );
}

#[test]
fn startup_writer_refuses_bad_input_and_leaves_the_buffer_alone() {
    let mut buf = BytesMut::from(&b"keep"[..]);
    let err = startup::write_startup(&mut buf, &[("user", "a\0b")]).unwrap_err();
    assert!(matches!(
        err,
        StartupError::Encode(EncodeError::InteriorNul { .. })
    ));
    assert_eq!(
        startup::write_startup(&mut buf, &[("", "x")]),
        Err(StartupError::EmptyParameterName)
    );
    let long = "x".repeat(10_000);
    assert_eq!(
        startup::write_startup(&mut buf, &[("user", &long)]),
        Err(StartupError::TooLong)
    );
    assert_eq!(&buf[..], b"keep");
}
