//! A quick look that proves a whole statement text has no session effect, before the
//! classifier's full pass: most of what apps send (`SELECT … WHERE id = $1`,
//! `INSERT INTO …`, `UPDATE …`) is one statement whose first word changes nothing and
//! that names no function the classifier looks for. The full pass costs a few hundred
//! instructions per token; this is a memchr scan or two over the bytes, and every
//! transaction pays it.
//!
//! It only ever answers "plain" when the full pass would find nothing; anything it
//! cannot rule out goes to the full pass. What the full pass can find, and why this
//! rules it out:
//! - something from a statement's first word (first.rs `First`, the one list of
//!   those words): the text must be one statement (no `;` but at most a last one, and
//!   no comment before the first word), and that word none of them but `SELECT` and
//!   `WITH`;
//! - a temp table from `SELECT`/`WITH`: `INTO TEMP …` needs `into`, `pg_temp.t` needs
//!   `pg_`;
//! - a call (calls.rs): every name it looks for has a `_` after one of
//!   [`UNDERSCORED`], in any word, the first one too;
//! - an identifier spelled with Unicode escapes (`U&"…"`): it needs a `&`;
//! - raw mode (lex.rs): it needs a backslash.

use super::first::First;
use super::lex::{blank, ident_cont, ident_start};

/// Whether `sql`, a whole statement text, surely has no effect; and the bytes looked
/// at.
pub(super) fn plain(sql: &[u8]) -> (bool, u64) {
    let start = sql.iter().position(|&b| !blank(b)).unwrap_or(sql.len());
    let Some(&first) = sql.get(start) else {
        return (false, start as u64);
    };
    if !ident_start(first) {
        return (false, start as u64 + 1);
    }
    let end = sql[start..]
        .iter()
        .position(|&b| !ident_cont(b))
        .map_or(sql.len(), |n| start + n);
    let select = match First::of(&sql[start..end]) {
        None => false,
        Some(First::Select) => true,
        Some(_) => return (false, end as u64),
    };
    // From the first word on: calls.rs looks at every word, the first one too.
    let rest = &sql[start..];
    // memchr: a few instructions per 16 or 32 bytes, where a loop over the bytes
    // takes several per byte; every transaction's text goes through here.
    for n in memchr::memchr3_iter(b'\\', b';', b'_', rest) {
        let i = start + n;
        match sql[i] {
            b';' => {
                if sql[i + 1..].iter().all(|&b| blank(b)) {
                    // The last one, with nothing after it: one statement still.
                    break;
                }
                return (false, i as u64 + 1);
            }
            b'_' => {
                let before = &sql[..i];
                let after = &sql[i + 1..];
                if UNDERSCORED
                    .iter()
                    .any(|(b, a)| ends_ci(before, b) && starts_ci(after, a))
                {
                    return (false, i as u64 + 1);
                }
            }
            // A backslash.
            _ => return (false, i as u64 + 1),
        }
    }
    // `U&"…"`: an identifier spelled with escapes, which no name check can read.
    if let Some(n) = memchr::memchr(b'&', rest) {
        return (false, (start + n) as u64 + 1);
    }
    if select {
        for n in memchr::memchr2_iter(b'i', b'I', &sql[end..]) {
            let i = end + n;
            if starts_ci(&sql[i..], b"into") {
                return (false, i as u64 + 1);
            }
        }
    }
    // Each byte looked at by at most three scans.
    (true, 3 * sql.len() as u64)
}

/// What comes before and after the `_` of every name calls.rs looks for:
/// `pg_advisory_lock` and the rest, `set_config`, `pg_temp`, `query_to_xml…`,
/// `ts_stat`.
const UNDERSCORED: [(&[u8], &[u8]); 5] = [
    (b"advisory", b""),
    (b"set", b"config"),
    (b"pg", b""),
    (b"query", b"to"),
    (b"ts", b"stat"),
];

fn starts_ci(text: &[u8], prefix: &[u8]) -> bool {
    text.len() >= prefix.len() && text[..prefix.len()].eq_ignore_ascii_case(prefix)
}

fn ends_ci(text: &[u8], suffix: &[u8]) -> bool {
    text.len() >= suffix.len() && text[text.len() - suffix.len()..].eq_ignore_ascii_case(suffix)
}

#[cfg(test)]
mod tests {
    use super::super::classify::{Text, full_pass};
    use super::super::{Customs, Effect};
    use super::plain;

    /// Pieces that a random text is made of: the classifier's keywords and near-misses,
    /// quotes, comments, separators.
    const PIECES: &[&str] = &[
        "SELECT ",
        "select ",
        "WITH ",
        "INSERT ",
        "UPDATE ",
        "SET ",
        "set ",
        "RESET ",
        "LISTEN ",
        "CREATE ",
        "TEMP ",
        "DECLARE ",
        "HOLD ",
        "DO ",
        "CALL ",
        "DROP ",
        "DISCARD ",
        "DEALLOCATE ",
        "PREPARE ",
        "LOAD ",
        "UNLISTEN ",
        "CLOSE ",
        "ALTER ",
        "INTO ",
        "into",
        "In",
        "TO ",
        "pg_temp",
        "PG_TEMP.t ",
        "pg_",
        "pg",
        "temp",
        "set_config(",
        "Set_Config",
        "set_",
        "'app.x'",
        ", ",
        "false",
        "true",
        ")",
        "(",
        "pg_advisory_lock(1)",
        "advisory_unlock",
        "advisory",
        "_",
        "a_b",
        "x",
        "v ",
        "FROM kv ",
        "WHERE id = ",
        "$1",
        "42",
        ";",
        "; ",
        " ",
        "\n",
        "'",
        "''",
        "\"",
        "\"q\"",
        "E'\\''",
        "\\",
        "$$",
        "$t$",
        "--",
        "/*",
        "*/",
        "é",
        "U&\"",
        "sé_t",
        "U&\"pg!005ftemp\" UESCAPE '!'",
        "UESCAPE ",
        "query_to_xml(",
        "ts_stat(",
        "posts_status ",
        "EXPLAIN ",
        "ANALYZE ",
        ".",
    ];

    /// A small deterministic generator (no dependency for a test's randomness).
    fn next(seed: &mut u64) -> u64 {
        *seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        *seed >> 33
    }

    #[test]
    fn a_text_read_as_plain_has_no_effect_in_the_full_pass() {
        let mut seed = 7;
        let (mut plains, mut others) = (0, 0);
        for _ in 0..200_000 {
            let n = 1 + next(&mut seed) % 9;
            let text: String = (0..n)
                .map(|_| PIECES[(next(&mut seed) as usize) % PIECES.len()])
                .collect();
            let mut customs = Customs::default();
            let full = full_pass(text.as_bytes(), Text::Whole, &mut customs).0;
            if plain(text.as_bytes()).0 {
                plains += 1;
                assert_eq!(full, Effect::default(), "{text:?}");
                assert_eq!(customs, Customs::default(), "{text:?}");
            } else {
                others += 1;
            }
        }
        // Both sides were exercised.
        assert!(
            plains > 10_000 && others > 10_000,
            "{plains} plain, {others} not"
        );
    }

    #[test]
    fn what_apps_send_most_is_plain_and_what_matters_is_not() {
        for sql in [
            "SELECT v FROM kv WHERE id = $1",
            "SELECT v FROM kv WHERE id = 42;",
            "  insert into t (a, b) values ($1, 'x')",
            "UPDATE accounts SET balance = balance - $1 WHERE account_id = $2",
            "DELETE FROM sessions WHERE last_seen < now() - interval '1 day'",
            "BEGIN",
            "COMMIT",
            "with x as (select 1) select * from x",
        ] {
            assert!(plain(sql.as_bytes()).0, "{sql}");
            let full = full_pass(sql.as_bytes(), Text::Whole, &mut Customs::default());
            assert_eq!(full.0, Effect::default(), "{sql}");
        }
        for sql in [
            "SET search_path = x",
            "/* c */ SET ROLE x",
            "SELECT 1; LISTEN x",
            "SELECT x INTO TEMP t FROM y",
            "SELECT pg_advisory_lock(1)",
            "SELECT set_config('app.x', '1', false)",
            "SELECT E'\\'; SET ROLE r'",
            "CREATE TEMP TABLE t (a int)",
            "(SELECT 1)",
            // calls.rs looks at the first word too.
            "pg_advisory_lock(1)",
            "set_config('app.x','1',false)",
            "xadvisory_unlock",
            "SELECT U&\"pg!005fadvisory!005flock\" UESCAPE '!'(7)",
            "SELECT query_to_xml('select 1', true, true, '')",
            "SELECT ts_stat('select v from t')",
            // Not sure without the full pass: a `;` in a string.
            "SELECT 'a;b'",
            "",
        ] {
            assert!(!plain(sql.as_bytes()).0, "{sql}");
        }
    }
}
