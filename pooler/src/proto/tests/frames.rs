//! Framing: limits checked from the header alone, partial messages, scanning.

use std::ops::ControlFlow;

use bytes::{BufMut, BytesMut};
use postgres_protocol::message::frontend as pgf;

use crate::proto::backend::{self, TransactionStatus};
use crate::proto::error::SqlState;
use crate::proto::frame::{self, FrameError, Header, Side};

#[test]
fn peek_needs_five_bytes_and_checks_limits_before_the_body() {
    assert_eq!(frame::peek(b"Q\0\0\0", Side::Frontend), Ok(None));
    assert_eq!(
        frame::peek(b"Q\0\0\0\x05x", Side::Frontend),
        Ok(Some(Header { tag: b'Q', len: 6 }))
    );
    // Only the header is present: the announced size alone is refused.
    let huge = |tag: u8, len: u32| {
        let mut v = vec![tag];
        v.extend_from_slice(&len.to_be_bytes());
        v
    };
    for (tag, side, max) in [
        (b'Q', Side::Frontend, frame::LARGE_MESSAGE_LIMIT),
        (b'S', Side::Frontend, frame::SMALL_MESSAGE_LIMIT),
        (b'p', Side::Frontend, frame::AUTH_MESSAGE_LIMIT),
        (b'D', Side::Backend, frame::LARGE_MESSAGE_LIMIT),
        (b'Z', Side::Backend, frame::BACKEND_SHORT_LIMIT),
    ] {
        assert!(frame::peek(&huge(tag, max as u32), side).unwrap().is_some());
        assert_eq!(
            frame::peek(&huge(tag, max as u32 + 1), side),
            Err(FrameError::TooLong {
                tag,
                len: max + 1,
                max
            })
        );
    }
    assert_eq!(
        frame::peek(&huge(b'Q', u32::MAX), Side::Frontend).unwrap_err(),
        FrameError::TooLong {
            tag: b'Q',
            len: u32::MAX as usize,
            max: frame::LARGE_MESSAGE_LIMIT
        }
    );
    assert_eq!(
        frame::peek(&huge(b'S', 3), Side::Frontend),
        Err(FrameError::BadLength { tag: b'S', len: 3 })
    );
    // DataRow exists only from servers, ReadyForQuery too; 'x' nowhere.
    assert!(matches!(
        frame::peek(&huge(b'Z', 5), Side::Frontend),
        Err(FrameError::UnknownTag { .. })
    ));
    assert!(matches!(
        frame::peek(&huge(b'x', 5), Side::Backend),
        Err(FrameError::UnknownTag { .. })
    ));
    assert_eq!(
        FrameError::BadLength { tag: 0, len: 0 }.sqlstate(),
        SqlState::PROTOCOL_VIOLATION
    );
}

#[test]
fn split_waits_for_the_whole_message_and_consumes_nothing_meanwhile() {
    let mut whole = BytesMut::new();
    pgf::query("SELECT 1", &mut whole).unwrap();
    pgf::sync(&mut whole);
    for cut in 0..whole.len() {
        let mut partial = BytesMut::from(&whole[..cut]);
        let before = partial.len();
        let first = frame::split(&mut partial, Side::Frontend).unwrap();
        if cut < 14 {
            assert!(first.is_none(), "cut {cut}");
            assert_eq!(partial.len(), before);
        }
    }
    let (tag, body) = frame::split(&mut whole, Side::Frontend).unwrap().unwrap();
    assert_eq!((tag, &body[..]), (b'Q', &b"SELECT 1\0"[..]));
    let (tag, body) = frame::split(&mut whole, Side::Frontend).unwrap().unwrap();
    assert_eq!((tag, body.len()), (b'S', 0));
    assert!(whole.is_empty());
}

#[test]
fn scan_walks_complete_messages_and_stops_at_a_partial_one() {
    let mut buf = BytesMut::new();
    backend::command_complete(&mut buf, "SELECT 1").unwrap();
    backend::ready_for_query(&mut buf, TransactionStatus::Idle);
    backend::parameter_status(&mut buf, "TimeZone", b"UTC").unwrap();
    let complete = buf.len();
    buf.put_slice(b"D\0\0\0\x20\0\x01"); // DataRow, incomplete

    let mut scan = frame::scan(&buf, Side::Backend);
    let tags: Vec<u8> = scan.by_ref().map(|f| f.unwrap().tag).collect();
    assert_eq!(tags, b"CZS");
    assert_eq!(scan.complete(), complete);
    assert_eq!(
        frame::peek(&buf[scan.complete()..], Side::Backend),
        Ok(Some(Header { tag: b'D', len: 33 }))
    );

    // Stop right after ReadyForQuery, as the relay does before releasing a server.
    let mut status = None;
    let n = frame::for_each_message(&buf, Side::Backend, |tag, body| {
        if tag == b'Z' {
            status = backend::parse_ready_for_query(body).ok();
            return ControlFlow::Break(());
        }
        ControlFlow::Continue(())
    })
    .unwrap();
    assert_eq!(status, Some(TransactionStatus::Idle));
    let first = frame::scan(&buf, Side::Backend).nth(1).unwrap().unwrap();
    assert_eq!((first.offset, first.end()), (14, n));

    let mut bad = buf[..complete].to_vec();
    bad.extend_from_slice(b"?\0\0\0\x04");
    let mut scan = frame::scan(&bad, Side::Backend);
    assert_eq!(scan.by_ref().filter(Result::is_ok).count(), 3);
    assert!(
        frame::for_each_message(&bad, Side::Backend, |_, _| ControlFlow::Continue(())).is_err()
    );
    assert!(scan.next().is_none(), "exhausted after the error");
}
