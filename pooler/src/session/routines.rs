//! State the classifier cannot see: a plain `SELECT f()` whose function LISTENs,
//! creates a temporary table, takes a session advisory lock or calls
//! `set_config(…, false)`.
//!
//! The statements a client sends do not say what the functions they call do, but the
//! functions' own text does, and an app can only run functions it can see in the
//! catalog (its own schema's, or a schema it was granted). So the pooler looks at the
//! functions, not at each call, and learns which kinds of session state they may leave:
//! LISTEN channels, temporary objects, advisory locks, settings (custom ones by name),
//! prepared statements, holdable cursors, a changed role; all kinds for `EXECUTE` of
//! dynamic SQL, a language other than SQL and PL/pgSQL, or a body or a count too large
//! to read. For a role whose functions may leave some (a *risky* role), every
//! transaction of its clients is looked at once idle, before its server goes back, for
//! those kinds only (`state_left_sql` with that mask; the costly `pg_settings` scan
//! only when a function sets a built-in parameter), pipelined with the parameter
//! read-back when both are due: one round trip. What a function left pins its client,
//! and never reaches another. A role without such functions (most apps) pays nothing.
//!
//! The look runs when the role's first client logs in, after a client of this pooler
//! creates, alters or drops a function or procedure, and otherwise at least every
//! [`REFRESH`] (another replica, a migration). A role not yet looked at is risky.
//! What remains: for up to [`REFRESH`], a function created through another replica
//! and called here is not known to be risky.

use std::time::Duration;

use super::state::{self, ALL_STATE, Customs, kind};

/// How often a role's functions are looked at again at the latest.
pub const REFRESH: Duration = Duration::from_secs(60);
/// More functions than this that might leave state: risky without reading them.
pub const MAX_FUNCTIONS: usize = 100;
/// A body longer than this (bytes) is risky without reading it.
pub const MAX_BODY: usize = 16 * 1024;

/// The functions the role can run outside the system schemas whose text mentions
/// anything that could leave session state (a cheap filter; the text is read by
/// [`leaves_state`]), or whose language the pooler cannot read: language, and the body
/// unless it is too long. At most [`MAX_FUNCTIONS`] + 1 rows.
pub fn routines_sql() -> String {
    format!(
        "SELECT l.lanname, CASE WHEN length(p.prosrc) <= {MAX_BODY} THEN p.prosrc END \
         FROM pg_catalog.pg_proc p \
         JOIN pg_catalog.pg_namespace n ON n.oid = p.pronamespace \
         JOIN pg_catalog.pg_language l ON l.oid = p.prolang \
         WHERE n.nspname <> 'information_schema' AND n.nspname !~ '^pg_' \
         AND pg_catalog.has_schema_privilege(n.oid, 'USAGE') \
         AND (l.lanname NOT IN ('sql', 'plpgsql') \
              OR p.prosrc ~* '(listen|set_config|advisory|temp|prepare|execute|load|hold|dblink|\\mset\\M)') \
         LIMIT {}",
        MAX_FUNCTIONS + 1
    )
}

/// What the rows of [`routines_sql`] amount to: the kinds of state the functions may
/// leave (0: none), and the custom parameters they may set at session level.
pub fn judge<'a>(
    rows: impl ExactSizeIterator<Item = (&'a str, Option<&'a str>)>,
) -> (u16, Customs) {
    let mut customs = Customs::default();
    if rows.len() > MAX_FUNCTIONS {
        return (ALL_STATE, customs);
    }
    let mut kinds = 0;
    for (language, body) in rows {
        kinds |= leaves_state(language, body, &mut customs);
    }
    (kinds, customs)
}

/// The kinds of session state one function may leave behind (0: none); custom
/// parameters its body sets at session level are noted in `customs`. `body` is `None`
/// when too long.
pub fn leaves_state(language: &str, body: Option<&str>, customs: &mut Customs) -> u16 {
    let Some(body) = body else { return ALL_STATE };
    if !matches!(language, "sql" | "plpgsql") {
        return ALL_STATE;
    }
    let mut kinds = 0;
    // PL/pgSQL statements start after `;`, BEGIN, THEN, ELSE, LOOP…: look at words.
    let mut words = Tokens::new(body.as_bytes());
    let mut at_start = true;
    let mut set_config = false;
    while let Some(token) = words.next() {
        let Token::Word(word) = token else {
            at_start = matches!(token, Token::Semicolon);
            continue;
        };
        let upper = word.to_ascii_uppercase();
        kinds |= match upper.as_slice() {
            b"LISTEN" => kind::LISTEN,
            b"TEMP" | b"TEMPORARY" => kind::TEMPORARY,
            b"HOLD" => kind::CURSORS,
            b"PREPARE" if !words.peek_word_is(b"TRANSACTION") => kind::PREPARED,
            // Dynamic SQL, a library, another database: anything.
            b"EXECUTE" | b"LOAD" => ALL_STATE,
            w if w.starts_with(b"DBLINK") => ALL_STATE,
            w if contains(w, b"PG_TEMP") => kind::TEMPORARY,
            w if w.starts_with(b"PG_ADVISORY_LOCK") || w.starts_with(b"PG_TRY_ADVISORY_LOCK") => {
                kind::ADVISORY
            }
            _ => 0,
        };
        set_config |= upper.ends_with(b"SET_CONFIG");
        if at_start && upper == b"SET" {
            kinds |= match words.peek_word() {
                Some(next) if next.eq_ignore_ascii_case(b"LOCAL") => 0,
                Some(next) if next.contains(&b'.') => {
                    customs.noted(&String::from_utf8_lossy(next));
                    kind::CUSTOM
                }
                Some(next)
                    if next.eq_ignore_ascii_case(b"ROLE")
                        || next.eq_ignore_ascii_case(b"SESSION") =>
                {
                    kind::ROLE | kind::SETTINGS
                }
                _ => kind::SETTINGS,
            };
        }
        at_start = matches!(
            upper.as_slice(),
            b"BEGIN" | b"THEN" | b"ELSE" | b"LOOP" | b"DECLARE" | b"EXCEPTION"
        );
    }
    if set_config {
        // The classifier reads set_config's arguments: a local one leaves nothing; a
        // custom name is noted, one it cannot read is taken for any.
        let effect = state::classify(body.as_bytes(), customs);
        if effect.probe {
            kinds |= kind::SETTINGS | kind::CUSTOM;
        }
    }
    kinds
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

enum Token<'a> {
    Word(&'a [u8]),
    Semicolon,
    Other,
}

/// The words of a function body, comments and string literals skipped: one forward
/// pass.
struct Tokens<'a> {
    text: &'a [u8],
    pos: usize,
}

impl<'a> Tokens<'a> {
    fn new(text: &'a [u8]) -> Self {
        Tokens { text, pos: 0 }
    }

    fn peek_word(&self) -> Option<&'a [u8]> {
        let mut ahead = Tokens {
            text: self.text,
            pos: self.pos,
        };
        match ahead.next()? {
            Token::Word(w) => Some(w),
            _ => None,
        }
    }

    fn peek_word_is(&self, word: &[u8]) -> bool {
        self.peek_word()
            .is_some_and(|w| w.eq_ignore_ascii_case(word))
    }

    fn next(&mut self) -> Option<Token<'a>> {
        let text = self.text;
        loop {
            let b = *text.get(self.pos)?;
            let next = text.get(self.pos + 1).copied();
            match (b, next) {
                (b'-', Some(b'-')) => {
                    self.pos = text[self.pos..]
                        .iter()
                        .position(|c| *c == b'\n')
                        .map_or(text.len(), |p| self.pos + p);
                }
                (b'/', Some(b'*')) => {
                    self.pos = text[self.pos + 2..]
                        .windows(2)
                        .position(|w| w == b"*/")
                        .map_or(text.len(), |p| self.pos + 2 + p + 2);
                }
                (b'\'', _) => {
                    // A doubled quote inside is two literals back to back: same result.
                    self.pos = text[self.pos + 1..]
                        .iter()
                        .position(|c| *c == b'\'')
                        .map_or(text.len(), |p| self.pos + 1 + p + 1);
                }
                (b';', _) => {
                    self.pos += 1;
                    return Some(Token::Semicolon);
                }
                _ if b.is_ascii_alphabetic() || b == b'_' => {
                    let start = self.pos;
                    while text.get(self.pos).is_some_and(|c| {
                        c.is_ascii_alphanumeric() || matches!(c, b'_' | b'$' | b'.')
                    }) {
                        self.pos += 1;
                    }
                    return Some(Token::Word(&text[start..self.pos]));
                }
                _ if b.is_ascii_whitespace() => self.pos += 1,
                _ => {
                    self.pos += 1;
                    return Some(Token::Other);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn risky(language: &str, body: &str) -> bool {
        leaves_state(language, Some(body), &mut Customs::default()) != 0
    }

    fn kinds(body: &str) -> u16 {
        leaves_state("plpgsql", Some(body), &mut Customs::default())
    }

    #[test]
    fn bodies_that_may_leave_session_state_are_risky() {
        for body in [
            "BEGIN LISTEN jobs; END",
            "SELECT pg_advisory_lock(1)",
            "BEGIN PERFORM pg_try_advisory_lock(2); END",
            "SELECT set_config('app.user', $1, false)",
            "BEGIN CREATE TEMP TABLE t (x int); END",
            "BEGIN EXECUTE format('LISTEN %I', $1); END",
            "BEGIN IF true THEN SET app.mode = 'x'; END IF; END",
            "BEGIN SET search_path = other; END",
            "PREPARE p AS SELECT 1",
            "BEGIN DECLARE c CURSOR WITH HOLD FOR SELECT 1; END",
            "INSERT INTO pg_temp.t VALUES (1)",
        ] {
            assert!(risky("plpgsql", body), "{body}");
        }
        assert!(risky("plperl", "return 1;"));
        assert_eq!(
            leaves_state("sql", None, &mut Customs::default()),
            ALL_STATE,
            "too long"
        );
    }

    /// Each body is looked for only what it may leave: the costly settings scan only
    /// when it sets a built-in parameter.
    #[test]
    fn the_look_asks_only_for_what_functions_may_leave() {
        assert_eq!(kinds("BEGIN LISTEN jobs; END"), kind::LISTEN);
        assert_eq!(kinds("SELECT pg_advisory_lock(1)"), kind::ADVISORY);
        assert_eq!(
            kinds("BEGIN CREATE TEMP TABLE t (x int); END"),
            kind::TEMPORARY
        );
        assert_eq!(kinds("BEGIN SET app.x = 1; END"), kind::CUSTOM);
        assert_eq!(kinds("BEGIN SET work_mem = '1MB'; END"), kind::SETTINGS);
        assert_eq!(
            kinds("SELECT set_config('app.user', 'x', false)"),
            kind::SETTINGS | kind::CUSTOM
        );
        assert_eq!(kinds("BEGIN EXECUTE 'SELECT 1'; END"), ALL_STATE);
    }

    #[test]
    fn ordinary_bodies_are_not() {
        for body in [
            "SELECT $1 + 1",
            "BEGIN UPDATE t SET x = 1 WHERE id = $1; RETURN NEW; END",
            "SELECT set_config('request.jwt', $1, true)",
            "BEGIN SET LOCAL search_path = x; RETURN 1; END",
            "SELECT 'LISTEN is just text' -- and LISTEN in a comment",
            "BEGIN INSERT INTO t VALUES (1) ON CONFLICT DO UPDATE SET x = 2; END",
            "SELECT count(*) FROM settings /* temp */",
        ] {
            assert!(!risky("plpgsql", body), "{body}");
        }
    }

    #[test]
    fn custom_parameters_a_function_sets_are_noted() {
        let mut customs = Customs::default();
        let body = "BEGIN SET app.tenant = $1; PERFORM set_config('app.user', 'x', false); END";
        assert_ne!(leaves_state("plpgsql", Some(body), &mut customs), 0);
        let sql = state::state_left_sql("'r'", &customs, &[], ALL_STATE);
        assert!(sql.contains("'app.user'"), "{sql}");
        assert!(sql.contains("'app.tenant'"), "{sql}");
        let mut customs = Customs::default();
        let body = "BEGIN IF x THEN SET app.tenant = $1; END IF; END";
        assert_ne!(leaves_state("plpgsql", Some(body), &mut customs), 0);
        let sql = state::state_left_sql("'r'", &customs, &[], kind::CUSTOM);
        assert!(sql.contains("'app.tenant'"), "{sql}");
        assert!(!sql.contains("pg_settings"), "{sql}");
    }

    #[test]
    fn too_many_functions_are_risky_unread() {
        let rows: Vec<(&str, Option<&str>)> = vec![("sql", Some("SELECT 1")); MAX_FUNCTIONS + 1];
        assert_eq!(judge(rows.into_iter()).0, ALL_STATE);
        let rows: Vec<(&str, Option<&str>)> = vec![("sql", Some("SELECT 1")); MAX_FUNCTIONS];
        assert_eq!(judge(rows.into_iter()).0, 0);
    }

    #[test]
    fn the_scan_is_linear_in_the_worst_case() {
        for unit in ["BEGIN ", "/*", "'", "-- x\n", "SET "] {
            let text = unit.repeat((1 << 20) / unit.len());
            let started = std::time::Instant::now();
            let _ = leaves_state("plpgsql", Some(&text), &mut Customs::default());
            // A hang guard, not a timing assertion: quadratic work would take hours.
            assert!(started.elapsed() < std::time::Duration::from_secs(60));
        }
    }
}
