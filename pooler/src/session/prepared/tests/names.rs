//! DEALLOCATE, DISCARD ALL, COPY and reused names: the books against what each server holds.
use super::*;

/// A client's `DEALLOCATE s1` sent while linked to a server that lacks `s1`: the
/// client's books, that server's, and the replies due.
fn deallocate_where_the_server_lacks_it() -> (ClientStatements, ServerStatements, Replies) {
    let mut client = ClientStatements::default();
    let (mut first, mut second) = (ServerStatements::default(), ServerStatements::default());
    let mut replies = Replies::default();
    let mut out = BytesMut::new();
    let mut rw = rewriter(&mut client, &mut first, &mut replies, 200);
    let parse = msg(b'P', &[b"s1\0", b"SELECT 1\0", &0u16.to_be_bytes()]);
    rw.message(b'P', &parse, &mut out).unwrap();
    // On another server: nothing is prepared there first.
    let mut replies = Replies::default();
    let mut out = BytesMut::new();
    let mut rw = rewriter(&mut client, &mut second, &mut replies, 200);
    rw.message(b'Q', &msg(b'Q', &[b"DEALLOCATE s1\0"]), &mut out)
        .unwrap();
    assert_eq!(&out[..], &msg(b'Q', &[b"\0"])[..]);
    assert_eq!(
        replies.server(b'I', b"", &mut client, &mut second),
        Action::Drop
    );
    (client, second, replies)
}

#[test]
fn deallocate_of_a_statement_the_server_lacks_is_an_empty_query() {
    let (mut client, mut second, mut replies) = deallocate_where_the_server_lacks_it();
    assert!(client.by_name.is_empty());
    assert_eq!(
        replies.server(b'Z', b"I", &mut client, &mut second),
        Action::Replace(Bytes::from_static(b"C\0\0\0\x0fDEALLOCATE\0Z\0\0\0\x05I"))
    );
    assert!(replies.is_empty());
    assert!(client.by_name.is_empty());
}

#[test]
fn deallocate_in_a_failed_transaction_is_25p02_and_keeps_the_statement() {
    let (mut client, mut second, mut replies) = deallocate_where_the_server_lacks_it();
    let Action::Replace(instead) = replies.server(b'Z', b"E", &mut client, &mut second) else {
        panic!("the ReadyForQuery is replaced");
    };
    assert_eq!(tags(&instead), b"EZ");
    assert!(instead.windows(5).any(|w| w == b"25P02"), "{instead:?}");
    assert!(instead.ends_with(b"Z\0\0\0\x05E"));
    assert!(replies.is_empty());
    // Postgres refused it: the client still has its statement.
    assert!(client.by_name.contains_key(&b"s1"[..]));
}

/// `DEALLOCATE s1` by Parse/Bind/Execute on a server that lacks `s1`, once the
/// server said its transaction failed: the client's own Parse goes, for Postgres to
/// refuse it as it would (25P02 at Parse, the rest skipped), and the books keep `s1`.
/// With a reply still due (a ROLLBACK, say) the status may be stale: the empty Parse,
/// as outside a failed transaction.
#[test]
fn extended_deallocate_in_a_known_failed_transaction_goes_as_sent() {
    let mut client = ClientStatements::default();
    let (mut first, mut second) = (ServerStatements::default(), ServerStatements::default());
    let mut replies = Replies::default();
    let mut rw = rewriter(&mut client, &mut first, &mut replies, 200);
    let parse = msg(b'P', &[b"s1\0", b"SELECT 1\0", &0u16.to_be_bytes()]);
    rw.message(b'P', &parse, &mut BytesMut::new()).unwrap();
    let mut replies = Replies::default();
    let deallocate = msg(b'P', &[b"\0", b"DEALLOCATE s1\0", &0u16.to_be_bytes()]);
    let rest = [
        msg(b'B', &[b"\0\0", &[0, 0, 0, 0, 0, 0]]),
        msg(b'E', &[b"\0", &0i32.to_be_bytes()]),
        msg(b'S', &[]),
    ];
    let error = |code, text| {
        let mut e = BytesMut::new();
        crate::proto::backend::write_error(&mut e, code, text);
        e.split_off(5)
    };
    let failed = error(crate::proto::SqlState::INTERNAL_ERROR, "division by zero");
    let aborted = error(
        crate::proto::SqlState::IN_FAILED_SQL_TRANSACTION,
        "current transaction is aborted, commands ignored until end of transaction block",
    );
    let mut rw = rewriter(&mut client, &mut second, &mut replies, 200);
    rw.message(b'Q', &msg(b'Q', &[b"SELECT 1/0\0"]), &mut BytesMut::new())
        .unwrap();
    for (tag, body) in [(b'E', &failed[..]), (b'Z', b"E")] {
        rw.replies.server(tag, body, rw.client, rw.server);
    }
    // Nothing is due and the last ReadyForQuery said failed: as sent.
    let mut out = BytesMut::new();
    rw.message(b'P', &deallocate, &mut out).unwrap();
    assert_eq!(&out[..], &deallocate[..]);
    for m in &rest {
        rw.message(m[0], m, &mut BytesMut::new()).unwrap();
    }
    for (tag, body) in [(b'E', &aborted[..]), (b'Z', b"E")] {
        assert_eq!(
            rw.replies.server(tag, body, rw.client, rw.server),
            Action::Pass
        );
    }
    assert!(rw.replies.is_empty());
    assert!(rw.client.by_name.contains_key(&b"s1"[..]));

    // A ROLLBACK not answered yet ends the failed transaction first: the empty Parse,
    // and the DEALLOCATE is done.
    rw.message(b'Q', &msg(b'Q', &[b"ROLLBACK\0"]), &mut BytesMut::new())
        .unwrap();
    let mut out = BytesMut::new();
    rw.message(b'P', &deallocate, &mut out).unwrap();
    assert_eq!(&out[..], &msg(b'P', &[b"\0\0", &0u16.to_be_bytes()])[..]);
    for m in &rest {
        rw.message(m[0], m, &mut BytesMut::new()).unwrap();
    }
    for (tag, body) in [
        (b'C', &b"ROLLBACK\0"[..]),
        (b'Z', b"I"),
        (b'1', b""),
        (b'2', b""),
    ] {
        rw.replies.server(tag, body, rw.client, rw.server);
    }
    assert_eq!(
        rw.replies.server(b'I', b"", rw.client, rw.server),
        Action::Replace(Bytes::from_static(b"C\0\0\0\x0fDEALLOCATE\0"))
    );
    rw.replies.server(b'Z', b"I", rw.client, rw.server);
    assert!(rw.replies.is_empty());
    assert!(rw.client.by_name.is_empty());
}

#[test]
fn discard_all_spares_what_was_sent_after_it() {
    let mut client = ClientStatements::default();
    let mut server = ServerStatements::default();
    let mut replies = Replies::default();
    let mut out = BytesMut::new();
    let mut rw = rewriter(&mut client, &mut server, &mut replies, 200);
    let parse =
        |name: &[u8], sql: &[u8]| msg(b'P', &[name, b"\0", sql, b"\0", &0u16.to_be_bytes()]);
    rw.message(b'P', &parse(b"old", b"SELECT 0"), &mut out)
        .unwrap();
    rw.message(b'S', &msg(b'S', &[]), &mut out).unwrap();
    rw.message(b'Q', &msg(b'Q', &[b"DISCARD ALL\0"]), &mut out)
        .unwrap();
    rw.message(b'P', &parse(b"new", b"SELECT 1"), &mut out)
        .unwrap();
    rw.message(b'S', &msg(b'S', &[]), &mut out).unwrap();
    let mut reply = |tag, body: &[u8]| replies.server(tag, body, &mut client, &mut server);
    reply(b'1', b"");
    reply(b'Z', b"I");
    reply(b'C', b"DISCARD ALL\0");
    reply(b'Z', b"I");
    assert!(!client.by_name.contains_key(&b"old"[..]));
    assert!(client.by_name.contains_key(&b"new"[..]));
    assert!(server.has(&global_name(b"SELECT 1\0\0\0")));
    assert!(!server.has(&global_name(b"SELECT 0\0\0\0")));
}

/// Every Parse in `out` that names a `dp_` statement carries the text that name hashes.
fn assert_names_match_texts(out: &[u8]) {
    let mut rest = out;
    while rest.len() >= 5 {
        let len = i32::from_be_bytes([rest[1], rest[2], rest[3], rest[4]]) as usize;
        let (m, after) = rest.split_at(1 + len);
        if m[0] == b'P' {
            let (name, text) = cstr(&m[5..]).unwrap();
            if name.starts_with(b"dp_") && name != b"dp_refused" {
                assert_eq!(
                    name,
                    &global_name(text)[..],
                    "{:?} parsed with another text",
                    String::from_utf8_lossy(name)
                );
            }
        }
        rest = after;
    }
}

#[test]
fn an_extended_copy_leaves_no_stale_reply_behind() {
    // tokio-postgres and libpq: Bind, Execute, Sync, CopyData, CopyDone, Sync; one
    // ReadyForQuery. Then, in the same transaction, a Parse of a text the server holds
    // (Close, Parse): the pooler's CloseComplete must not reach the client.
    for g_after in 0..=3 {
        let mut client = ClientStatements::default();
        let mut server = ServerStatements::default();
        let mut replies = Replies::default();
        let mut out = BytesMut::new();
        let mut rw = rewriter(&mut client, &mut server, &mut replies, 200);
        let parse = |name: &[u8]| msg(b'P', &[name, b"\0", b"SELECT 1\0", &0u16.to_be_bytes()]);
        rw.message(b'P', &parse(b"a"), &mut out).unwrap();
        rw.message(b'S', &msg(b'S', &[]), &mut out).unwrap();
        let copy: [(u8, BytesMut); 4] = [
            (b'B', msg(b'B', &[b"\0\0", &[0, 0, 0, 0, 0, 0]])),
            (b'E', msg(b'E', &[b"\0", &0i32.to_be_bytes()])),
            (b'S', msg(b'S', &[])),
            (b'c', msg(b'c', &[])),
        ];
        for (tag, m) in &copy[..1 + g_after] {
            rw.message(*tag, m, &mut out).unwrap();
        }
        let mut reply = |tag, body: &[u8]| replies.server(tag, body, &mut client, &mut server);
        reply(b'1', b"");
        reply(b'Z', b"T");
        reply(b'2', b"");
        reply(b'G', b"");
        let mut rw = rewriter(&mut client, &mut server, &mut replies, 200);
        for (tag, m) in &copy[1 + g_after..] {
            rw.message(*tag, m, &mut out).unwrap();
        }
        rw.message(b'S', &msg(b'S', &[]), &mut out).unwrap();
        let mut reply = |tag, body: &[u8]| replies.server(tag, body, &mut client, &mut server);
        assert_eq!(reply(b'C', b"COPY 1\0"), Action::Pass);
        assert_eq!(reply(b'Z', b"T"), Action::Pass);
        assert!(replies.is_empty(), "G after {g_after}");
        let mut rw = rewriter(&mut client, &mut server, &mut replies, 200);
        rw.message(b'P', &parse(b"b"), &mut out).unwrap();
        rw.message(b'S', &msg(b'S', &[]), &mut out).unwrap();
        let mut reply = |tag, body: &[u8]| replies.server(tag, body, &mut client, &mut server);
        assert_eq!(reply(b'3', b""), Action::Drop, "G after {g_after}");
        assert_eq!(reply(b'1', b""), Action::Pass);
        assert_eq!(reply(b'Z', b"T"), Action::Pass);
        assert!(replies.is_empty());
    }
}

#[test]
fn a_copy_end_for_a_copy_that_never_started_is_forgotten() {
    // COPY fails before it starts (a simple Query): the client's CopyDone is ignored
    // by Postgres; a re-prepare after it must still have its reply dropped.
    let mut client = ClientStatements::default();
    let (mut first, mut second) = (ServerStatements::default(), ServerStatements::default());
    let mut replies = Replies::default();
    let mut out = BytesMut::new();
    let parse = msg(b'P', &[b"a\0", b"SELECT 1\0", &0u16.to_be_bytes()]);
    rewriter(&mut client, &mut first, &mut replies, 200)
        .message(b'P', &parse, &mut out)
        .unwrap();
    let mut replies = Replies::default();
    let mut rw = rewriter(&mut client, &mut second, &mut replies, 200);
    rw.message(b'Q', &msg(b'Q', &[b"COPY nosuch FROM STDIN\0"]), &mut out)
        .unwrap();
    rw.message(b'c', &msg(b'c', &[]), &mut out).unwrap();
    rw.message(b'B', &msg(b'B', &[b"\0a\0", &[0, 0, 0, 0, 0, 0]]), &mut out)
        .unwrap();
    rw.message(b'S', &msg(b'S', &[]), &mut out).unwrap();
    let mut reply = |tag, body: &[u8]| replies.server(tag, body, &mut client, &mut second);
    assert_eq!(reply(b'E', b""), Action::Pass);
    assert_eq!(reply(b'Z', b"E"), Action::Pass);
    assert_eq!(reply(b'1', b""), Action::Drop, "the pooler's re-prepare");
    assert_eq!(reply(b'2', b""), Action::Pass);
    assert_eq!(reply(b'Z', b"E"), Action::Pass);
    assert!(replies.is_empty());
}

#[test]
fn a_name_reused_after_discard_all_in_the_same_pipeline_never_renames_a_text() {
    // Parse S_1 'A', DISCARD ALL, Parse S_1 'B', Bind S_1, Execute, Sync, sent at once.
    let mut client = ClientStatements::default();
    let mut server = ServerStatements::default();
    let mut replies = Replies::default();
    let mut out = BytesMut::new();
    let mut rw = rewriter(&mut client, &mut server, &mut replies, 200);
    let parse = |sql: &[u8]| msg(b'P', &[b"S_1\0", sql, b"\0", &0u16.to_be_bytes()]);
    rw.message(b'P', &parse(b"SELECT 1"), &mut out).unwrap();
    rw.message(b'Q', &msg(b'Q', &[b"DISCARD ALL\0"]), &mut out)
        .unwrap();
    rw.message(b'P', &parse(b"SELECT 2"), &mut out).unwrap();
    rw.message(
        b'B',
        &msg(b'B', &[b"\0S_1\0", &[0, 0, 0, 0, 0, 0]]),
        &mut out,
    )
    .unwrap();
    rw.message(b'E', &msg(b'E', &[b"\0", &0i32.to_be_bytes()]), &mut out)
        .unwrap();
    rw.message(b'S', &msg(b'S', &[]), &mut out).unwrap();
    assert_names_match_texts(&out);
    let (a, b) = (
        global_name(b"SELECT 1\0\0\0"),
        global_name(b"SELECT 2\0\0\0"),
    );
    // The Bind runs what the client's name means once the Parse is accepted.
    assert!(out.windows(b.len()).any(|w| w == &b[..]));
    let mut reply = |tag, body: &[u8]| replies.server(tag, body, &mut client, &mut server);
    assert_eq!(reply(b'1', b""), Action::Pass);
    assert_eq!(reply(b'3', b""), Action::Drop, "the batch marker");
    assert_eq!(reply(b'C', b"DISCARD ALL\0"), Action::Pass);
    assert_eq!(reply(b'Z', b"I"), Action::Pass);
    // The name was free: the server accepts the re-parse of A's own text.
    assert_eq!(reply(b'1', b""), Action::Pass, "the client's ParseComplete");
    assert_eq!(reply(b'1', b""), Action::Drop, "B prepared for the Bind");
    assert_eq!(reply(b'2', b""), Action::Pass);
    assert_eq!(reply(b'C', b"SELECT 1\0"), Action::Pass);
    assert_eq!(reply(b'Z', b"I"), Action::Pass);
    assert!(replies.is_empty());
    assert_eq!(client.by_name[&b"S_1"[..]].global, b);
    assert!(server.has(&a) && server.has(&b));
}

#[test]
fn a_refused_reuse_restores_the_name() {
    let mut client = ClientStatements::default();
    let mut server = ServerStatements::default();
    let mut replies = Replies::default();
    let mut out = BytesMut::new();
    let mut rw = rewriter(&mut client, &mut server, &mut replies, 200);
    let parse = |sql: &[u8]| msg(b'P', &[b"S_1\0", sql, b"\0", &0u16.to_be_bytes()]);
    rw.message(b'P', &parse(b"SELECT 1"), &mut out).unwrap();
    rw.message(b'S', &msg(b'S', &[]), &mut out).unwrap();
    rw.message(b'P', &parse(b"SELECT 2"), &mut out).unwrap();
    rw.message(
        b'B',
        &msg(b'B', &[b"\0S_1\0", &[0, 0, 0, 0, 0, 0]]),
        &mut out,
    )
    .unwrap();
    rw.message(b'S', &msg(b'S', &[]), &mut out).unwrap();
    assert_names_match_texts(&out);
    let a = global_name(b"SELECT 1\0\0\0");
    let mut reply = |tag, body: &[u8]| replies.server(tag, body, &mut client, &mut server);
    reply(b'1', b"");
    reply(b'Z', b"I");
    assert!(matches!(reply(b'E', b""), Action::Rename { .. }));
    reply(b'Z', b"I");
    assert!(replies.is_empty());
    assert_eq!(client.by_name[&b"S_1"[..]].global, a, "S_1 is still A");
    assert!(
        !server.has(&global_name(b"SELECT 2\0\0\0")),
        "B was skipped"
    );
}

#[test]
fn a_client_past_its_statement_limit_gets_an_error_for_its_batch() {
    let mut client = ClientStatements::default();
    let mut server = ServerStatements::default();
    let mut replies = Replies::default();
    let mut out = BytesMut::new();
    let mut rw = rewriter(&mut client, &mut server, &mut replies, 200);
    rw.max_per_client = 1;
    let parse = |name: &[u8]| msg(b'P', &[name, b"\0", b"SELECT 1\0", &0u16.to_be_bytes()]);
    rw.message(b'P', &parse(b"a"), &mut out).unwrap();
    rw.message(b'P', &parse(b"a"), &mut out).unwrap();
    rw.message(b'S', &msg(b'S', &[]), &mut out).unwrap();
    let mut out = BytesMut::new();
    rw.message(b'P', &parse(b"b"), &mut out).unwrap();
    rw.message(b'P', &parse(b"c"), &mut out).unwrap();
    rw.message(b'S', &msg(b'S', &[]), &mut out).unwrap();
    assert!(out.starts_with(b"P") && out.windows(10).any(|w| w == b"dp_refused"));
    assert_eq!(client.by_name.len(), 1);
    let mut reply = |tag, body: &[u8]| replies.server(tag, body, &mut client, &mut server);
    reply(b'1', b"");
    // The reuse of `a` is refused by the server first (42P05), as Postgres would.
    assert!(matches!(reply(b'E', b""), Action::Rename { .. }));
    reply(b'Z', b"I");
    match reply(b'E', b"") {
        Action::Replace(error) => {
            let text = String::from_utf8_lossy(&error);
            assert!(text.contains("C53400"), "{text}");
            assert!(
                text.contains("max_client_prepared_statements = 1"),
                "{text}"
            );
        }
        other => panic!("{other:?}"),
    }
    reply(b'Z', b"I");
    assert!(replies.is_empty());
    assert_eq!(client.by_name.len(), 1);
}

#[test]
fn the_poolers_names_are_out_of_sqls_reach() {
    let mut client = ClientStatements::default();
    let mut server = ServerStatements::default();
    let mut replies = Replies::default();
    let mut out = BytesMut::new();
    let mut rw = rewriter(&mut client, &mut server, &mut replies, 200);
    // The pooler holds this statement on the server for the app's clients.
    let parse = msg(b'P', &[b"s1\0", b"SELECT 1\0", &0u16.to_be_bytes()]);
    rw.message(b'P', &parse, &mut out).unwrap();
    let global = rw.client.by_name[&b"s1"[..]].global.clone();
    let name = String::from_utf8(global.to_vec()).unwrap();
    for (tag, text) in [
        (b'Q', format!("DEALLOCATE {name}")),
        (b'Q', format!("EXECUTE {name}")),
        (b'P', format!("DEALLOCATE PREPARE {name}")),
    ] {
        let mut out = BytesMut::new();
        let raw = if tag == b'Q' {
            msg(b'Q', &[text.as_bytes(), b"\0"])
        } else {
            msg(b'P', &[b"\0", text.as_bytes(), b"\0", &0u16.to_be_bytes()])
        };
        rw.message(tag, &raw, &mut out).unwrap();
        let sent = String::from_utf8_lossy(&out).into_owned();
        assert!(sent.contains(&format!("{name}$client")), "{sent}");
    }
    // The server's error (to the first Query) names the moved name; the client reads
    // its own.
    assert_eq!(
        replies.server(b'1', b"", &mut client, &mut server),
        Action::Pass
    );
    let mut error = BytesMut::new();
    crate::proto::backend::write_error(
        &mut error,
        crate::proto::SqlState::INVALID_SQL_STATEMENT_NAME,
        &format!("prepared statement \"{name}$client\" does not exist"),
    );
    let action = replies.server(b'E', &error[5..], &mut client, &mut server);
    let Action::Rename { from, to } = action else {
        panic!("{action:?}");
    };
    let renamed = renamed_error(&error, &from, &to);
    let text = String::from_utf8_lossy(&renamed).into_owned();
    assert!(
        text.contains(&format!("prepared statement \"{name}\" does not exist")),
        "{text}"
    );
    // The pooler's statement is still in the books.
    assert!(server.has(&global));
    assert!(client.by_name.contains_key(&b"s1"[..]));
}
