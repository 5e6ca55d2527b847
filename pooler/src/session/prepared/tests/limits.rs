//! What one client may make the pooler hold: texts shared by their names, the byte
//! bound, and messages too long to hold whole.
use super::*;

fn parse(name: &[u8], text: &[u8]) -> BytesMut {
    msg(b'P', &[name, b"\0", text, b"\0", &0u16.to_be_bytes()])
}

fn refusal(reply: Action) -> String {
    match reply {
        Action::Replace(error) => String::from_utf8_lossy(&error).into_owned(),
        other => panic!("{other:?}"),
    }
}

#[test]
fn a_thousand_names_of_one_text_hold_it_once() {
    let mut client = ClientStatements::default();
    let mut server = ServerStatements::default();
    let mut replies = Replies::default();
    let text = vec![b'x'; 64 * 1024];
    let mut rw = rewriter(&mut client, &mut server, &mut replies, 200);
    for i in 0..1_000 {
        let mut out = BytesMut::new();
        let name = format!("S_{i}");
        rw.message(b'P', &parse(name.as_bytes(), &text), &mut out)
            .unwrap();
    }
    assert_eq!(client.len(), 1_000);
    // One copy of the text, and about a hundred bytes per name.
    assert!(
        client.bytes() < text.len() + 1_000 * 128,
        "{}",
        client.bytes()
    );
    let first = client.get(b"S_0").unwrap().parse.as_ptr();
    assert!(client.by_name.values().all(|s| s.parse.as_ptr() == first));
    // Closing every name frees the text from the books.
    for i in 0..1_000 {
        client.remove(format!("S_{i}").as_bytes()).unwrap();
    }
    assert_eq!(client.bytes(), 0);
}

#[test]
fn a_client_past_its_statement_bytes_gets_53400_for_its_batch() {
    let mut client = ClientStatements::default();
    let mut server = ServerStatements::default();
    let mut replies = Replies::default();
    let mut rw = rewriter(&mut client, &mut server, &mut replies, 200);
    rw.max_client_bytes = 100_000;
    let mut out = BytesMut::new();
    for i in 0..3u8 {
        let text = vec![b'a' + i; 40_000];
        rw.message(b'P', &parse(&[b'n', b'0' + i], &text), &mut out)
            .unwrap();
    }
    rw.message(b'S', &msg(b'S', &[]), &mut out).unwrap();
    assert_eq!(rw.refused[Refusal::Bytes as usize], 1);
    assert_eq!(tags(&out), b"PPPS");
    assert!(out.windows(10).any(|w| w == b"dp_refused"));
    assert_eq!(client.len(), 2);
    let mut reply = |tag, body: &[u8]| replies.server(tag, body, &mut client, &mut server);
    reply(b'1', b"");
    reply(b'1', b"");
    let text = refusal(reply(b'E', b""));
    assert!(text.contains("C53400"), "{text}");
    assert!(
        text.contains("max_client_prepared_bytes = 100000"),
        "{text}"
    );
    reply(b'Z', b"I");
    assert!(replies.is_empty());
    assert_eq!(client.len(), 2);
}

#[test]
fn a_named_parse_over_the_cap_is_refused_and_its_rest_dropped() {
    let mut client = ClientStatements::default();
    let mut server = ServerStatements::default();
    let mut replies = Replies::default();
    let mut rw = rewriter(&mut client, &mut server, &mut replies, 200);
    let head = parse(b"big", &[b'y'; 1000]);
    let mut out = BytesMut::new();
    let rest = rw.head(b'P', &head[..500], 300_000_000, &mut out).unwrap();
    assert_eq!(rest, Rest::Drop);
    assert_eq!(rw.refused[Refusal::TooLong as usize], 1);
    assert!(out.windows(10).any(|w| w == b"dp_refused"));
    // The dp_refused Parse is a whole message of its own.
    assert_eq!(tags(&out), b"P");
    rw.message(b'S', &msg(b'S', &[]), &mut out).unwrap();
    assert!(client.is_empty());
    let text = refusal(replies.server(b'E', b"", &mut client, &mut server));
    assert!(
        text.contains("C54000") && text.contains("max_message_bytes"),
        "{text}"
    );
}

#[test]
fn an_unnamed_parse_or_query_over_the_cap_streams_and_is_looked_at_once_idle() {
    let mut client = ClientStatements::default();
    let mut server = ServerStatements::default();
    let mut replies = Replies::default();
    let mut rw = rewriter(&mut client, &mut server, &mut replies, 200);
    let head = parse(b"", b"INSERT INTO t VALUES ('");
    let mut out = BytesMut::new();
    let rest = rw
        .head(b'P', &head[..head.len() - 4], 1 << 28, &mut out)
        .unwrap();
    assert_eq!(rest, Rest::Classify);
    assert_eq!(&out[..], &head[..head.len() - 4], "passed as it came");
    assert!(rw.effect.probe && rw.effect.read_back);

    let query = msg(b'Q', &[b"SELECT 1, '"]);
    let mut out = BytesMut::new();
    let rest = rw.head(b'Q', &query, 1 << 28, &mut out).unwrap();
    assert_eq!(rest, Rest::Classify);
    // In the unsynced batch: the marker Close first (see `in_batch`), then the head.
    assert!(out.starts_with(b"C") && out.ends_with(&query), "{out:?}");
}

#[test]
fn a_bind_over_the_cap_is_renamed_with_its_full_length() {
    let mut client = ClientStatements::default();
    let mut server = ServerStatements::default();
    let mut replies = Replies::default();
    let mut rw = rewriter(&mut client, &mut server, &mut replies, 200);
    let mut out = BytesMut::new();
    rw.message(b'P', &parse(b"S_1", b"SELECT $1::bytea"), &mut out)
        .unwrap();
    // A Bind of a 100 MB parameter, of which the head is here.
    let tail = 100_000_000usize;
    let head = msg(
        b'B',
        &[b"\0S_1\0", &[0, 0, 0, 1], &(tail as u32).to_be_bytes()],
    );
    let declared = u32::from_be_bytes([head[1], head[2], head[3], head[4]]) as usize + tail;
    let mut out = BytesMut::new();
    let rest = rw.head(b'B', &head, tail, &mut out).unwrap();
    assert_eq!(rest, Rest::Pass);
    assert_eq!(out[0], b'B');
    let len = u32::from_be_bytes([out[1], out[2], out[3], out[4]]) as usize;
    let global = client.get(b"S_1").unwrap().global.clone();
    assert_eq!(len, declared - 3 + global.len());
    assert_eq!(
        out.len() + tail,
        1 + len,
        "the head, and the tail still to come"
    );
}
