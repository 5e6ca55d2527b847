//! The SQL of LISTEN multiplexing: what the listener server runs, and what the pooler
//! runs on a client's transaction server around a transaction that changed its
//! channels. Channel names reach SQL only through `escape_identifier` on a
//! [`Channel`], which Postgres itself reported.
//!
//! How a client's channels move (design.md, "LISTEN/NOTIFY"): its LISTEN and UNLISTEN
//! run on its transaction server as they are, so Postgres decides what takes effect
//! (commit, rollback, errors, quoting, case). Once the transaction is over the pooler
//! reads what the server listens on, takes it off the server, and gives it to the
//! role's listener. A transaction that may UNLISTEN first gets the client's current
//! channels (a "prime"), so that what the server reports afterwards is the client's
//! whole new set; a prime inside an open transaction also sets a marker, which is there
//! afterwards only if that transaction committed.

use std::collections::BTreeSet;

use postgres_protocol::escape::escape_identifier;

use super::channels::{Batch, Channel};

/// A custom setting that survives only a committed transaction: set with a prime
/// inside one, read back and reset after it.
const MARK: &str = "dp_pooler.listen_mark";

/// One simple query that applies a batch on the listener server (one transaction: all
/// of it or none).
pub fn batch(batch: &Batch) -> String {
    let mut sql = String::new();
    for c in &batch.unlisten {
        sql.push_str("UNLISTEN ");
        sql.push_str(&escape_identifier(c.as_str()));
        sql.push(';');
    }
    for c in &batch.listen {
        sql.push_str("LISTEN ");
        sql.push_str(&escape_identifier(c.as_str()));
        sql.push(';');
    }
    sql
}

/// Gives a transaction server the client's channels before a statement that may
/// UNLISTEN. `in_transaction`: the client's transaction is open, so the prime is part
/// of it, and the marker tells afterwards whether it committed.
pub fn prime<'a>(channels: impl IntoIterator<Item = &'a Channel>, in_transaction: bool) -> String {
    let mut sql = String::new();
    for c in channels {
        sql.push_str("LISTEN ");
        sql.push_str(&escape_identifier(c.as_str()));
        sql.push(';');
    }
    if in_transaction {
        sql.push_str("SELECT pg_catalog.set_config('");
        sql.push_str(MARK);
        sql.push_str("', 'on', false);");
    }
    sql
}

/// After a transaction that may have changed the client's channels: one row `m` with
/// the marker, one row `c` per channel (hex of its UTF-8 bytes, whatever the session's
/// client_encoding), at most `max` of them (a client may LISTEN on a million channels
/// in one transaction; the pooler reads one more than it allows, to know), then the
/// server forgets them all. `marked`: a prime set the marker, which is reset too.
pub fn read_back(marked: bool, max: usize) -> String {
    let limit = max.saturating_add(1);
    let mut sql = format!(
        "SELECT 'm', pg_catalog.current_setting('{MARK}', true) \
         UNION ALL (SELECT 'c', pg_catalog.encode(pg_catalog.convert_to(c, 'UTF8'), 'hex') \
         FROM pg_catalog.pg_listening_channels() c LIMIT {limit}); UNLISTEN *"
    );
    if marked {
        sql.push_str("; RESET ");
        sql.push_str(MARK);
    }
    sql
}

/// What [`read_back`] found.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct ReadBack {
    pub channels: BTreeSet<Channel>,
    /// The marker a prime inside a transaction set was there: that transaction committed.
    pub marked: bool,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("unexpected row from the channel read-back")]
pub struct BadReadBack;

/// Reads [`read_back`]'s rows (text values; NULL is `None`).
pub fn parse_read_back(rows: &[Vec<Option<String>>]) -> Result<ReadBack, BadReadBack> {
    let mut out = ReadBack::default();
    for row in rows {
        match row.as_slice() {
            [Some(kind), value] if kind == "m" => {
                out.marked = value.as_deref() == Some("on");
            }
            [Some(kind), Some(hex)] if kind == "c" => {
                let bytes = decode_hex(hex).ok_or(BadReadBack)?;
                let name = String::from_utf8(bytes).map_err(|_| BadReadBack)?;
                out.channels
                    .insert(Channel::new(&name).map_err(|_| BadReadBack)?);
            }
            _ => return Err(BadReadBack),
        }
    }
    Ok(out)
}

fn decode_hex(hex: &str) -> Option<Vec<u8>> {
    let digit = |b: u8| (b as char).to_digit(16).and_then(|d| u8::try_from(d).ok());
    let bytes = hex.as_bytes();
    if bytes.len() % 2 != 0 {
        return None;
    }
    bytes
        .chunks(2)
        .map(|pair| Some(digit(pair[0])? << 4 | digit(pair[1])?))
        .collect()
}

/// How a client's new set follows from what the server reported.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Primed {
    /// No prime: nothing of the transaction could UNLISTEN what the client had, or the
    /// prime was impossible (a failed transaction, a pipeline in flight). The client
    /// keeps its channels and gains what the server reports.
    No,
    /// Primed outside any transaction: the server reports the client's whole new set.
    Outside,
    /// Primed inside the client's open transaction: the whole new set if it committed
    /// (the marker is there), else the channels from before.
    Inside,
}

/// The client's channels after a transaction, from those before and the read-back.
pub fn new_set(before: &BTreeSet<Channel>, primed: Primed, read: ReadBack) -> BTreeSet<Channel> {
    match primed {
        Primed::No => before.union(&read.channels).cloned().collect(),
        Primed::Outside => read.channels,
        Primed::Inside if read.marked => read.channels,
        Primed::Inside => before.union(&read.channels).cloned().collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(names: &[&str]) -> BTreeSet<Channel> {
        names.iter().map(|n| Channel::new(n).unwrap()).collect()
    }

    #[test]
    fn names_are_quoted_identifiers() {
        let b = Batch {
            listen: vec![Channel::new("Orders \"new\"").unwrap()],
            unlisten: vec![Channel::new("old").unwrap()],
            version: 1,
        };
        assert_eq!(batch(&b), "UNLISTEN \"old\";LISTEN \"Orders \"\"new\"\"\";");
        assert_eq!(prime(&set(&["a"]), false), "LISTEN \"a\";");
        assert!(prime(&set(&["a"]), true).ends_with("'dp_pooler.listen_mark', 'on', false);"));
        assert!(read_back(false, 3).ends_with("LIMIT 4); UNLISTEN *"));
        assert!(read_back(true, 3).ends_with("; RESET dp_pooler.listen_mark"));
    }

    #[test]
    fn the_read_back_is_parsed_and_checked() {
        let row = |k: &str, v: Option<&str>| vec![Some(k.to_owned()), v.map(str::to_owned)];
        // "Foo" and "é".
        let rows = vec![
            row("m", Some("on")),
            row("c", Some("466f6f")),
            row("c", Some("c3a9")),
        ];
        let r = parse_read_back(&rows).unwrap();
        assert!(r.marked);
        assert_eq!(r.channels, set(&["Foo", "é"]));
        let unmarked = parse_read_back(&[row("m", None)]).unwrap();
        assert!(!unmarked.marked && unmarked.channels.is_empty());
        assert_eq!(parse_read_back(&[row("c", Some("4"))]), Err(BadReadBack));
        assert_eq!(parse_read_back(&[row("c", Some("zz"))]), Err(BadReadBack));
        assert_eq!(parse_read_back(&[row("c", Some("ff"))]), Err(BadReadBack));
        assert_eq!(parse_read_back(&[row("x", Some(""))]), Err(BadReadBack));
        assert_eq!(parse_read_back(&[row("c", Some(""))]), Err(BadReadBack));
    }

    #[test]
    fn the_new_set_follows_the_prime() {
        let before = set(&["a", "b"]);
        let read = |names: &[&str], marked| ReadBack {
            channels: set(names),
            marked,
        };
        // LISTEN c without a prime: a and b stay.
        assert_eq!(
            new_set(&before, Primed::No, read(&["c"], false)),
            set(&["a", "b", "c"])
        );
        // UNLISTEN a, primed outside a transaction: exactly what the server has.
        assert_eq!(
            new_set(&before, Primed::Outside, read(&["b"], false)),
            set(&["b"])
        );
        assert_eq!(
            new_set(&before, Primed::Outside, read(&[], false)),
            set(&[])
        );
        // Inside a transaction that committed, and one rolled back.
        assert_eq!(
            new_set(&before, Primed::Inside, read(&["b"], true)),
            set(&["b"])
        );
        assert_eq!(new_set(&before, Primed::Inside, read(&[], false)), before);
    }
}
