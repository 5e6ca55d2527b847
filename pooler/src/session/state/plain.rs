//! A quick look that proves a whole statement text has no session effect, before the
//! classifier's full pass: most of what apps send (`SELECT … WHERE id = $1`,
//! `INSERT INTO …`, `UPDATE …`) is one statement whose first word changes nothing and
//! that names no function the classifier looks for. The full pass costs a few hundred
//! instructions per token; this is one scan over the bytes, and every transaction pays
//! it.
//!
//! It only ever answers "plain" when the full pass would find nothing; anything it
//! cannot rule out goes to the full pass. What the full pass can find, and why this
//! rules it out:
//! - something from a statement's first word (classify.rs `first`): the text must be one
//!   statement (no `;` but at most a last one, and no comment before the first word),
//!   and that word none of the keywords `first` acts on, but `SELECT` and `WITH`;
//! - a temp table from `SELECT`/`WITH`: `INTO TEMP …` needs `into`, `pg_temp.t` needs
//!   `pg_`;
//! - a call (calls.rs): every name it looks for has `advisory_` or `set_`;
//! - raw mode (lex.rs): it needs a backslash.

use super::lex::{blank, ident_cont, ident_start};

/// The bytes the scan stops at: always `\\`, `;` and `_`; `i` after `SELECT`/`WITH`.
/// A table, since the loop runs over every byte of nearly every query.
const STOP: [u8; 256] = {
    let mut t = [0; 256];
    t[b'\\' as usize] = ALWAYS;
    t[b';' as usize] = ALWAYS;
    t[b'_' as usize] = ALWAYS;
    t[b'i' as usize] = SELECT;
    t[b'I' as usize] = SELECT;
    t
};
const ALWAYS: u8 = 1;
const SELECT: u8 = 2;

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
    // The first word upper-cased, if it is short enough to be a keyword.
    let mut key = [0u8; 10];
    let word = match key.get_mut(..end - start) {
        Some(k) => {
            k.copy_from_slice(&sql[start..end]);
            k.make_ascii_uppercase();
            &*k
        }
        None => &[],
    };
    let select = match word {
        // The keywords classify.rs's `first` acts on, but SELECT and WITH, which
        // matter only with `INTO` or `pg_temp`.
        b"SET" | b"RESET" | b"LISTEN" | b"LOAD" | b"PREPARE" | b"CREATE" | b"DECLARE"
        | b"DISCARD" | b"UNLISTEN" | b"DEALLOCATE" | b"CLOSE" | b"DROP" | b"ALTER" | b"DO"
        | b"CALL" => return (false, end as u64),
        b"SELECT" | b"WITH" => true,
        _ => false,
    };
    let mask = ALWAYS | if select { SELECT } else { 0 };
    for (n, &b) in sql[end..].iter().enumerate() {
        if STOP[usize::from(b)] & mask == 0 {
            continue;
        }
        let i = end + n;
        let seen = i as u64 + 1;
        match b {
            b';' => {
                let rest = &sql[i + 1..];
                let only_blanks = rest.iter().all(|&b| blank(b));
                return (only_blanks, seen + rest.len() as u64);
            }
            b'_' => {
                let before = &sql[..i];
                if ends_ci(before, b"advisory") || ends_ci(before, b"set") || ends_ci(before, b"pg")
                {
                    return (false, seen);
                }
            }
            b'i' | b'I' => {
                if sql[i..].len() >= 4 && sql[i..i + 4].eq_ignore_ascii_case(b"into") {
                    return (false, seen);
                }
            }
            // A backslash.
            _ => return (false, seen),
        }
    }
    (true, sql.len() as u64)
}

fn ends_ci(text: &[u8], suffix: &[u8]) -> bool {
    text.len() >= suffix.len() && text[text.len() - suffix.len()..].eq_ignore_ascii_case(suffix)
}

#[cfg(test)]
mod tests {
    use super::super::{Customs, Effect, classify};
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
            let full = super::super::classify::classify_counted(
                text.as_bytes(),
                super::super::classify::Text::Whole,
                &mut customs,
            )
            .0;
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
            assert_eq!(
                classify(sql.as_bytes(), &mut Customs::default()),
                Effect::default()
            );
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
            // Not sure without the full pass: a `;` in a string.
            "SELECT 'a;b'",
            "",
        ] {
            assert!(!plain(sql.as_bytes()).0, "{sql}");
        }
    }
}
