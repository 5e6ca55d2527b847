//! The rewriter and its books, message by message.
use super::*;

pub(super) fn rewriter<'a>(
    client: &'a mut ClientStatements,
    server: &'a mut ServerStatements,
    replies: &'a mut Replies,
    max_per_server: usize,
) -> Rewriter<'a> {
    Rewriter {
        client,
        server,
        replies,
        max_per_server,
        max_per_client: 10_000,
        max_client_bytes: usize::MAX,
        max_message: 1 << 20,
        refused: Default::default(),
        effect: Effect::default(),
        // Leaked: a test's few bytes, for a 'a borrow without another parameter.
        customs: Box::leak(Box::default()),
        streamed: Box::leak(Box::default()),
    }
}

pub(super) fn msg(tag: u8, parts: &[&[u8]]) -> BytesMut {
    let mut out = BytesMut::new();
    message(&mut out, tag, parts);
    out
}

pub(super) fn tags(buf: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    let mut rest = buf;
    while rest.len() >= 5 {
        let len = i32::from_be_bytes([rest[1], rest[2], rest[3], rest[4]]) as usize;
        out.push(rest[0]);
        rest = &rest[1 + len..];
    }
    out
}

#[test]
fn a_statement_follows_its_client_to_another_server() {
    let mut client = ClientStatements::default();
    let (mut first, mut second) = (ServerStatements::default(), ServerStatements::default());
    let mut replies = Replies::default();
    let parse = msg(b'P', &[b"S_1\0", b"SELECT $1\0", &0u16.to_be_bytes()]);
    let bind = msg(b'B', &[b"\0S_1\0", &[0, 0, 0, 0, 0, 0]]);

    let mut out = BytesMut::new();
    let mut rw = rewriter(&mut client, &mut first, &mut replies, 200);
    rw.message(b'P', &parse, &mut out).unwrap();
    rw.message(b'B', &bind, &mut out).unwrap();
    assert_eq!(tags(&out), b"PB");
    assert!(!out.windows(3).any(|w| w == b"S_1"), "renamed");

    // Another transaction, another server: the statement is prepared there first,
    // and its ParseComplete is dropped.
    let mut out = BytesMut::new();
    let mut replies = Replies::default();
    let mut rw = rewriter(&mut client, &mut second, &mut replies, 200);
    rw.message(b'B', &bind, &mut out).unwrap();
    rw.message(b'S', &msg(b'S', &[]), &mut out).unwrap();
    assert_eq!(tags(&out), b"PBS");
    let mut reply = |tag| replies.server(tag, b"", &mut client, &mut second);
    assert_eq!(reply(b'1'), Action::Drop, "our ParseComplete is dropped");
    assert_eq!(reply(b'2'), Action::Pass);
    assert_eq!(reply(b'Z'), Action::Pass);
}

#[test]
fn reparsing_a_known_statement_closes_it_first() {
    let mut client = ClientStatements::default();
    let mut server = ServerStatements::default();
    let mut replies = Replies::default();
    let parse = msg(b'P', &[b"a\0", b"SELECT 1\0", &0u16.to_be_bytes()]);
    let mut out = BytesMut::new();
    let mut rw = rewriter(&mut client, &mut server, &mut replies, 200);
    rw.message(b'P', &parse, &mut out).unwrap();
    rw.message(
        b'P',
        &msg(b'P', &[b"b\0", b"SELECT 1\0", &0u16.to_be_bytes()]),
        &mut out,
    )
    .unwrap();
    assert_eq!(tags(&out), b"PCP");
    let mut reply = |tag| replies.server(tag, b"", &mut client, &mut server);
    assert_eq!(
        reply(b'1'),
        Action::Pass,
        "the client's first ParseComplete"
    );
    assert_eq!(reply(b'3'), Action::Drop, "our CloseComplete");
    assert_eq!(reply(b'1'), Action::Pass);
}

#[test]
fn an_error_undoes_what_the_server_skipped() {
    let mut client = ClientStatements::default();
    let mut server = ServerStatements::default();
    let mut replies = Replies::default();
    let parse = |name: &[u8]| msg(b'P', &[name, b"\0", b"SELECT 1\0", &0u16.to_be_bytes()]);
    let execute = msg(b'E', &[b"\0", &0i32.to_be_bytes()]);
    let mut out = BytesMut::new();
    let mut rw = rewriter(&mut client, &mut server, &mut replies, 200);
    // A batch whose Execute fails before its second Parse: S_2 never existed.
    rw.message(b'P', &parse(b"S_1"), &mut out).unwrap();
    rw.message(b'E', &execute, &mut out).unwrap();
    rw.message(b'P', &parse(b"S_2"), &mut out).unwrap();
    rw.message(b'S', &msg(b'S', &[]), &mut out).unwrap();
    let global = global_name(b"SELECT 1\0\0\0");
    assert_eq!(
        replies.server(b'1', b"", &mut client, &mut server),
        Action::Pass
    );
    assert_eq!(
        replies.server(b'E', b"", &mut client, &mut server),
        Action::Pass
    );
    assert!(!client.by_name.contains_key(&b"S_2"[..]), "skipped Parse");
    assert!(client.by_name.contains_key(&b"S_1"[..]));
    // S_2's Parse closed and re-parsed the shared statement: both were skipped,
    // so the server still holds it.
    assert!(server.has(&global));
    replies.server(b'Z', b"I", &mut client, &mut server);
    assert!(replies.is_empty());
}

#[test]
fn a_reused_name_gets_postgres_error_with_the_clients_name() {
    let mut client = ClientStatements::default();
    let mut server = ServerStatements::default();
    let mut replies = Replies::default();
    let mut out = BytesMut::new();
    let mut rw = rewriter(&mut client, &mut server, &mut replies, 200);
    let p1 = msg(b'P', &[b"S_1\0", b"SELECT 1\0", &0u16.to_be_bytes()]);
    let p2 = msg(b'P', &[b"S_1\0", b"SELECT 2\0", &0u16.to_be_bytes()]);
    rw.message(b'P', &p1, &mut out).unwrap();
    rw.message(b'P', &p2, &mut out).unwrap();
    rw.message(b'S', &msg(b'S', &[]), &mut out).unwrap();
    let global = global_name(b"SELECT 1\0\0\0");
    assert_eq!(tags(&out), b"PPS");
    assert_eq!(
        replies.server(b'1', b"", &mut client, &mut server),
        Action::Pass
    );
    assert_eq!(
        replies.server(b'E', b"", &mut client, &mut server),
        Action::Rename {
            from: global.clone(),
            to: Bytes::from_static(b"S_1")
        }
    );
    assert!(server.has(&global), "the first statement stays");
    let error = renamed_error(
        &msg(
            b'E',
            &[
                b"C42P05\0M",
                b"prepared statement \"",
                &global,
                b"\" already exists\0\0",
            ],
        ),
        &global,
        b"S_1",
    );
    assert_eq!(
        &error[5..],
        b"C42P05\0Mprepared statement \"S_1\" already exists\0\0"
    );
}

#[test]
fn deallocate_of_a_protocol_statement_uses_the_server_name() {
    assert_eq!(
        deallocated_name(b"DEALLOCATE _pg3_0"),
        Some(b"_pg3_0".to_vec())
    );
    assert_eq!(
        deallocated_name(b" deallocate prepare S_1 ;"),
        Some(b"s_1".to_vec())
    );
    assert_eq!(
        deallocated_name(b"DEALLOCATE \"S_1\""),
        Some(b"S_1".to_vec())
    );
    assert_eq!(deallocated_name(b"DEALLOCATE ALL"), None);
    assert_eq!(deallocated_name(b"DEALLOCATE a; SELECT 1"), None);
    let mut client = ClientStatements::default();
    let mut server = ServerStatements::default();
    let mut replies = Replies::default();
    let mut out = BytesMut::new();
    let mut rw = rewriter(&mut client, &mut server, &mut replies, 200);
    let parse = msg(b'P', &[b"_pg3_0\0", b"SELECT 1\0", &0u16.to_be_bytes()]);
    rw.message(b'P', &parse, &mut out).unwrap();
    rw.message(b'S', &msg(b'S', &[]), &mut out).unwrap();
    let mut out = BytesMut::new();
    rw.message(b'Q', &msg(b'Q', &[b"DEALLOCATE _pg3_0\0"]), &mut out)
        .unwrap();
    let global = global_name(b"SELECT 1\0\0\0");
    assert!(out.windows(global.len()).any(|w| w == &global[..]));
    assert!(client.by_name.is_empty());
    assert!(!server.has(&global));
}

#[test]
fn servers_hold_a_bounded_number_of_statements() {
    let mut client = ClientStatements::default();
    let mut server = ServerStatements::default();
    let mut replies = Replies::default();
    let mut out = BytesMut::new();
    let mut rw = rewriter(&mut client, &mut server, &mut replies, 3);
    for i in 0..5 {
        let name = format!("s{i}\0");
        let query = format!("SELECT {i}\0");
        rw.message(
            b'P',
            &msg(
                b'P',
                &[name.as_bytes(), query.as_bytes(), &0u16.to_be_bytes()],
            ),
            &mut out,
        )
        .unwrap();
    }
    assert_eq!(server.len(), 3);
    assert_eq!(tags(&out), b"PPPCPCP");
}

#[test]
fn unnamed_statements_pass_through() {
    let mut client = ClientStatements::default();
    let mut server = ServerStatements::default();
    let mut replies = Replies::default();
    let parse = msg(b'P', &[b"\0", b"SELECT 1\0", &0u16.to_be_bytes()]);
    let mut out = BytesMut::new();
    let mut rw = rewriter(&mut client, &mut server, &mut replies, 3);
    rw.message(b'P', &parse, &mut out).unwrap();
    assert_eq!(&out[..], &parse[..]);
}

#[test]
fn a_query_in_a_failed_batch_is_skipped_with_it() {
    let mut client = ClientStatements::default();
    let mut server = ServerStatements::default();
    let mut replies = Replies::default();
    let mut out = BytesMut::new();
    let mut rw = rewriter(&mut client, &mut server, &mut replies, 200);
    let bind = msg(b'B', &[b"\0\0", &[0, 0, 0, 0, 0, 0]]);
    rw.message(b'B', &bind, &mut out).unwrap();
    rw.message(b'E', &msg(b'E', &[b"\0", &0i32.to_be_bytes()]), &mut out)
        .unwrap();
    rw.message(b'Q', &msg(b'Q', &[b"SELECT 1\0"]), &mut out)
        .unwrap();
    rw.message(
        b'P',
        &msg(b'P', &[b"S_1\0", b"SELECT 1\0", &0u16.to_be_bytes()]),
        &mut out,
    )
    .unwrap();
    rw.message(b'S', &msg(b'S', &[]), &mut out).unwrap();
    // A Close of the unnamed statement marks where the Query starts.
    assert_eq!(tags(&out), b"BECQPS");
    // The Execute fails: the Query and the Parse are skipped, one ReadyForQuery.
    let mut reply = |tag| replies.server(tag, b"", &mut client, &mut server);
    assert_eq!(reply(b'2'), Action::Pass);
    assert_eq!(reply(b'E'), Action::Pass);
    assert_eq!(replies.take_skipped(), 1);
    assert!(!client.by_name.contains_key(&b"S_1"[..]));
    replies.server(b'Z', b"I", &mut client, &mut server);
    assert!(replies.is_empty());
}

#[test]
fn a_query_outside_a_batch_gets_no_marker_and_its_own_error() {
    let mut client = ClientStatements::default();
    let mut server = ServerStatements::default();
    let mut replies = Replies::default();
    let mut out = BytesMut::new();
    let mut rw = rewriter(&mut client, &mut server, &mut replies, 200);
    rw.message(b'Q', &msg(b'Q', &[b"SELECT 1/0\0"]), &mut out)
        .unwrap();
    rw.message(
        b'P',
        &msg(b'P', &[b"S_1\0", b"SELECT 1\0", &0u16.to_be_bytes()]),
        &mut out,
    )
    .unwrap();
    rw.message(b'S', &msg(b'S', &[]), &mut out).unwrap();
    assert_eq!(tags(&out), b"QPS");
    let mut reply = |tag| replies.server(tag, b"", &mut client, &mut server);
    assert_eq!(reply(b'E'), Action::Pass);
    assert_eq!(replies.take_skipped(), 0);
    replies.server(b'Z', b"I", &mut client, &mut server);
    assert!(client.by_name.contains_key(&b"S_1"[..]), "not skipped");
    assert_eq!(
        replies.server(b'1', b"", &mut client, &mut server),
        Action::Pass
    );
}

mod limits;
mod names;
