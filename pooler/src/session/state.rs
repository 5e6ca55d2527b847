//! Session state a client may leave on its server, judged from a light look at the
//! statements it sends (design.md point 8). No SQL parser: the first words of each
//! statement, and a search for the advisory-lock and `set_config` functions.
//!
//! The look only has to be safe, not exact. A statement that may create state that
//! cannot follow the client to another server (an untracked `SET`, `LISTEN`, a temp
//! table, an advisory lock, SQL `PREPARE`, `SET ROLE`, a holdable cursor) **pins** the
//! client to its server. A statement that may remove such state asks for a check: once
//! the server is idle the pooler asks Postgres whether anything is left
//! ([`STATE_LEFT_SQL`]), and only a clean answer unpins. So a false "may create" costs a
//! pin until the next check, and a false "may remove" costs one round trip; neither leaks.

/// Parameters that follow a client from server to server (set on checkout when the
/// server's differ), in Postgres' lower-case spelling.
pub const TRACKED: &[&str] = &[
    "application_name",
    "client_encoding",
    "datestyle",
    "extra_float_digits",
    "intervalstyle",
    "lock_timeout",
    "search_path",
    "standard_conforming_strings",
    "statement_timeout",
    "timezone",
];

/// Tracked parameters PostgreSQL 15 does not report with ParameterStatus: after a
/// client changes one, the pooler reads the value back.
pub const READ_BACK: &[&str] = &[
    "search_path",
    "extra_float_digits",
    "statement_timeout",
    "lock_timeout",
];

/// What a statement may do to the session.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Effect {
    /// May create state that pins.
    pub pin: bool,
    /// May remove pinning state: check the server once it is idle.
    pub check: bool,
    /// Changed a tracked parameter Postgres does not report: read it back.
    pub read_back: bool,
    /// `RESET ALL` or `DISCARD ALL`: parameters are back to the login's.
    pub reset_all: bool,
}

impl Effect {
    pub fn merge(&mut self, other: Effect) {
        self.pin |= other.pin;
        self.check |= other.check;
        self.read_back |= other.read_back;
        self.reset_all |= other.reset_all;
    }

    pub fn is_none(&self) -> bool {
        *self == Effect::default()
    }

    const PIN: Effect = Effect {
        pin: true,
        check: false,
        read_back: false,
        reset_all: false,
    };
    const CHECK: Effect = Effect {
        pin: false,
        check: true,
        read_back: false,
        reset_all: false,
    };
    /// Might or might not leave state (a try-lock, `set_config`): pin, then look.
    const MAYBE: Effect = Effect {
        pin: true,
        check: true,
        read_back: false,
        reset_all: false,
    };
}

/// The effect of a statement text (a simple Query's, which may hold several
/// statements, or a Parse's).
pub fn classify(sql: &[u8]) -> Effect {
    let mut effect = Effect::default();
    // Every real statement starts at the text's start or after a `;`. Splitting on
    // every `;`, quoted ones too, only adds false starts, and those can only pin.
    for part in sql.split(|b| *b == b';') {
        effect.merge(statement(part));
    }
    effect.merge(functions(sql));
    effect
}

fn statement(text: &[u8]) -> Effect {
    let mut words = Words::new(text);
    let Some(first) = words.next() else {
        return Effect::default();
    };
    match upper(first).as_slice() {
        b"SET" => set(&mut words),
        b"RESET" => match words.next().map(upper).as_deref() {
            Some(b"ALL") => Effect {
                check: true,
                read_back: true,
                reset_all: true,
                pin: false,
            },
            Some(name) if is_tracked(name) => read_back(name),
            _ => Effect::CHECK,
        },
        b"LISTEN" | b"LOAD" => Effect::PIN,
        b"PREPARE" => match words.next().map(upper).as_deref() {
            // Two-phase commit, not a prepared statement.
            Some(b"TRANSACTION") => Effect::default(),
            _ => Effect::PIN,
        },
        b"CREATE" => {
            let temp = words
                .take(3)
                .map(upper)
                .any(|w| w.as_slice() == b"TEMP" || w.as_slice() == b"TEMPORARY");
            if temp { Effect::PIN } else { Effect::default() }
        }
        b"DECLARE" => {
            if contains_word_pair(text, b"WITH", b"HOLD") {
                Effect::PIN
            } else {
                Effect::default()
            }
        }
        b"DISCARD" => match words.next().map(upper).as_deref() {
            Some(b"ALL") => Effect {
                check: true,
                read_back: true,
                reset_all: true,
                pin: false,
            },
            _ => Effect::CHECK,
        },
        b"UNLISTEN" | b"DEALLOCATE" | b"CLOSE" | b"DROP" => Effect::CHECK,
        // `SELECT ... INTO TEMP t` creates a temp table.
        b"SELECT" | b"WITH" if contains_word_pair(text, b"INTO", b"TEMP") => Effect::PIN,
        _ => Effect::default(),
    }
}

/// `SET [SESSION | LOCAL] ...`.
fn set(words: &mut Words<'_>) -> Effect {
    let Some(mut word) = words.next().map(upper) else {
        return Effect::default();
    };
    if word.as_slice() == b"LOCAL" {
        // Gone at the end of the transaction.
        return Effect::default();
    }
    if word.as_slice() == b"SESSION" {
        match words.next().map(upper) {
            // SET SESSION AUTHORIZATION, SET SESSION CHARACTERISTICS AS TRANSACTION.
            Some(w) if w.as_slice() == b"AUTHORIZATION" || w.as_slice() == b"CHARACTERISTICS" => {
                return Effect::PIN;
            }
            Some(w) => word = w,
            None => return Effect::default(),
        }
    }
    match word.as_slice() {
        b"TRANSACTION" | b"CONSTRAINTS" => Effect::default(),
        b"TIME" => read_back(b"TIMEZONE"),
        b"NAMES" => read_back(b"CLIENT_ENCODING"),
        b"SCHEMA" => read_back(b"SEARCH_PATH"),
        name if is_tracked(name) => read_back(name),
        // SET ROLE, SET XML OPTION, any other parameter.
        _ => Effect::PIN,
    }
}

fn read_back(upper_name: &[u8]) -> Effect {
    let unreported = READ_BACK
        .iter()
        .any(|n| n.as_bytes().eq_ignore_ascii_case(upper_name));
    Effect {
        read_back: unreported,
        ..Effect::default()
    }
}

fn is_tracked(upper_name: &[u8]) -> bool {
    let name = upper_name
        .strip_prefix(b"\"")
        .and_then(|n| n.strip_suffix(b"\""))
        .unwrap_or(upper_name);
    TRACKED
        .iter()
        .any(|t| t.as_bytes().eq_ignore_ascii_case(name))
}

/// Session-level advisory locks and `set_config` can hide anywhere in a statement.
fn functions(sql: &[u8]) -> Effect {
    let mut effect = Effect::default();
    // pg_advisory_xact_lock is gone at commit; these hold past it (`_shared` too).
    if find_ci(sql, b"pg_advisory_lock") || find_ci(sql, b"pg_try_advisory_lock") {
        effect.merge(Effect::MAYBE);
    }
    if find_ci(sql, b"advisory_unlock") {
        effect.merge(Effect::CHECK);
    }
    if find_ci(sql, b"set_config") {
        // is_local = true is gone at commit; false is session state. Look afterwards.
        effect.merge(Effect::MAYBE);
    }
    effect
}

/// The query that tells whether a pinned client's server is clean again: one row, one
/// column, the number of pieces of session state left (0 = clean). `role` is the login role,
/// as a quoted literal.
pub fn state_left_sql(role_literal: &str) -> String {
    let tracked = TRACKED
        .iter()
        .map(|t| format!("'{t}'"))
        .collect::<Vec<_>>()
        .join(",");
    format!(
        "SELECT (SELECT count(*) FROM pg_catalog.pg_settings \
             WHERE source = 'session' AND lower(name) NOT IN ({tracked})) \
         + (SELECT count(*) FROM pg_catalog.pg_listening_channels()) \
         + (SELECT count(*) FROM pg_catalog.pg_locks \
             WHERE locktype = 'advisory' AND pid = pg_catalog.pg_backend_pid()) \
         + (SELECT count(*) FROM pg_catalog.pg_prepared_statements WHERE from_sql) \
         + (SELECT count(*) FROM pg_catalog.pg_cursors WHERE is_holdable) \
         + (SELECT count(*) FROM pg_catalog.pg_class \
             WHERE relnamespace = pg_catalog.pg_my_temp_schema()) \
         + (current_user <> session_user OR session_user <> {role_literal})::int"
    )
}

/// The SQL that reads back the tracked parameters Postgres does not report, in
/// [`READ_BACK`] order.
pub fn read_back_sql() -> String {
    let columns = READ_BACK
        .iter()
        .map(|n| format!("pg_catalog.current_setting('{n}')"))
        .collect::<Vec<_>>()
        .join(", ");
    format!("SELECT {columns}")
}

/// The words at the start of a statement: identifiers and keywords, after whitespace
/// and comments; a quoted identifier is one word with its quotes.
struct Words<'a> {
    rest: &'a [u8],
}

impl<'a> Words<'a> {
    fn new(text: &'a [u8]) -> Self {
        Words { rest: text }
    }

    fn skip_blank(&mut self) {
        loop {
            let trimmed = self.rest.trim_ascii_start();
            if let Some(after) = trimmed.strip_prefix(b"--") {
                let end = after
                    .iter()
                    .position(|b| *b == b'\n')
                    .unwrap_or(after.len());
                self.rest = &after[end..];
            } else if let Some(after) = trimmed.strip_prefix(b"/*") {
                let end = after
                    .windows(2)
                    .position(|w| w == b"*/")
                    .map_or(after.len(), |p| p + 2);
                self.rest = &after[end..];
            } else {
                self.rest = trimmed;
                return;
            }
        }
    }
}

impl<'a> Iterator for Words<'a> {
    type Item = &'a [u8];

    fn next(&mut self) -> Option<&'a [u8]> {
        self.skip_blank();
        let len = if self.rest.first() == Some(&b'"') {
            self.rest[1..]
                .iter()
                .position(|b| *b == b'"')
                .map_or(self.rest.len(), |p| p + 2)
        } else {
            self.rest
                .iter()
                .position(|b| !(b.is_ascii_alphanumeric() || *b == b'_' || *b == b'.'))
                .unwrap_or(self.rest.len())
        };
        if len == 0 {
            return None;
        }
        let (word, rest) = self.rest.split_at(len);
        self.rest = rest;
        Some(word)
    }
}

fn upper(word: &[u8]) -> Vec<u8> {
    word.to_ascii_uppercase()
}

fn find_ci(haystack: &[u8], needle: &[u8]) -> bool {
    haystack
        .windows(needle.len())
        .any(|w| w.eq_ignore_ascii_case(needle))
}

/// `a` followed (after blanks) by `b`, anywhere, case-insensitively.
fn contains_word_pair(text: &[u8], a: &[u8], b: &[u8]) -> bool {
    let mut words = Words::new(text);
    let mut previous: Option<&[u8]> = None;
    loop {
        // Skip over punctuation the word iterator does not take.
        words.skip_blank();
        let Some(word) = words.next() else {
            match words.rest.split_first() {
                Some((_, rest)) => {
                    words.rest = rest;
                    previous = None;
                    continue;
                }
                None => return false,
            }
        };
        if previous.is_some_and(|p| p.eq_ignore_ascii_case(a)) && word.eq_ignore_ascii_case(b) {
            return true;
        }
        previous = Some(word);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pins(sql: &str) -> bool {
        classify(sql.as_bytes()).pin
    }

    #[test]
    fn state_that_cannot_follow_a_client_pins() {
        for sql in [
            "LISTEN x",
            "  listen \"Chan\"",
            "SET work_mem = '64MB'",
            "set session work_mem to 1",
            "SET ROLE other",
            "SET SESSION AUTHORIZATION other",
            "SET SESSION CHARACTERISTICS AS TRANSACTION READ ONLY",
            "CREATE TEMP TABLE t (a int)",
            "create local temporary table t (a int)",
            "CREATE TEMPORARY VIEW v AS SELECT 1",
            "PREPARE p AS SELECT 1",
            "SELECT pg_advisory_lock(42)",
            "select PG_TRY_ADVISORY_LOCK_SHARED(1, 2)",
            "SELECT 1; SET enable_seqscan = off",
            "/* hi */ -- there\n SET my.var = 1",
            "DECLARE c CURSOR WITH HOLD FOR SELECT 1",
            "SELECT * INTO TEMP t FROM x",
            "SELECT set_config('my.var', 'x', false)",
        ] {
            assert!(pins(sql), "{sql}");
        }
    }

    #[test]
    fn transaction_scoped_and_tracked_state_does_not_pin() {
        for sql in [
            "SELECT 1",
            "SET LOCAL work_mem = '1MB'",
            "SET TRANSACTION ISOLATION LEVEL SERIALIZABLE",
            "SET CONSTRAINTS ALL DEFERRED",
            "SET TimeZone = 'UTC'",
            "SET TIME ZONE 'Europe/Paris'",
            "SET search_path = public",
            "SET statement_timeout = '1ms'",
            "SET SESSION \"DateStyle\" TO ISO",
            "SET NAMES 'UTF8'",
            "SELECT pg_advisory_xact_lock(1)",
            "PREPARE TRANSACTION 'x'",
            "CREATE TABLE t (temp int)",
            "DECLARE c CURSOR FOR SELECT 1",
            "INSERT INTO t VALUES ('LISTEN')",
        ] {
            assert!(!pins(sql), "{sql}");
        }
    }

    #[test]
    fn unreported_tracked_parameters_are_read_back() {
        assert!(classify(b"SET statement_timeout = 5").read_back);
        assert!(classify(b"set SCHEMA 'x'").read_back);
        assert!(classify(b"RESET search_path").read_back);
        assert!(!classify(b"SET TimeZone = 'UTC'").read_back, "reported");
        let all = classify(b"RESET ALL");
        assert!(all.read_back && all.reset_all && all.check);
        assert!(classify(b"DISCARD ALL").reset_all);
    }

    #[test]
    fn statements_that_may_remove_state_ask_for_a_check() {
        for sql in [
            "UNLISTEN *",
            "DISCARD TEMP",
            "DEALLOCATE p",
            "SELECT pg_advisory_unlock_all()",
            "DROP TABLE t",
            "RESET ROLE",
            "CLOSE c",
        ] {
            let e = classify(sql.as_bytes());
            assert!(e.check && !e.pin, "{sql}");
        }
    }
}
