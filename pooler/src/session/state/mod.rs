//! Session state a client may leave on its server, judged from a light look at the
//! statements it sends (design.md point 8). No SQL parser: the first words of each
//! statement, and a search for the advisory-lock and `set_config` functions.
//!
//! The look only has to be safe, not exact. A statement that creates state that cannot
//! follow the client to another server (an untracked `SET`, a temp table, SQL
//! `PREPARE`, `SET ROLE`, a holdable cursor) **pins** the client to its server before it
//! is forwarded, and asks for a check: the statement may fail or be rolled back. A
//! statement that only may create such state (an advisory lock function, a session-level
//! `set_config`) **probes**: no pin up front, a check afterwards that pins if state is
//! left. A statement that may remove state asks for a check. Once the server is idle the
//! pooler asks Postgres whether anything is left ([`state_left_sql`]), and only a clean
//! answer unpins. So a false "may create" costs a round trip (and a pin until it), and a
//! false "may remove" costs one round trip; neither leaks.
//!
//! `LISTEN`, `UNLISTEN` and `DISCARD ALL` do not pin: they mark the transaction as one
//! that may change the client's channels, which move to its role's listener server once
//! the transaction is over (notify/). A `LISTEN` the pooler cannot see (in a `DO` body)
//! leaves a channel the check finds, and pins as before.

mod sql;
mod window;
pub use sql::{read_back_sql, reset_read_sql, state_left_sql};
pub use window::Windows;

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
    /// Creates state that pins, unless it fails: pin before forwarding it.
    pub pin: bool,
    /// May leave state that pins, or may not (a try-lock, `set_config`): no pin up
    /// front; check once the server is idle, and pin if state is left.
    pub probe: bool,
    /// May remove (or, with `pin`, may not have made) pinning state: check the server
    /// once it is idle, if the client is pinned.
    pub check: bool,
    /// Changed a tracked parameter Postgres does not report: read it back.
    pub read_back: bool,
    /// `RESET ALL` or `DISCARD ALL`: parameters are back to the login's.
    pub reset_all: bool,
    /// `LISTEN`, `UNLISTEN`, `DISCARD ALL`: the client's channels may change; once the
    /// transaction is over they move from its server to the role's listener.
    pub listen: bool,
    /// `UNLISTEN`, `DISCARD ALL`: channels the client had may go, so its server must
    /// hold them first for Postgres to say what is left.
    pub unlisten: bool,
}

impl Effect {
    pub fn merge(&mut self, other: Effect) {
        self.pin |= other.pin;
        self.probe |= other.probe;
        self.check |= other.check;
        self.read_back |= other.read_back;
        self.reset_all |= other.reset_all;
        self.listen |= other.listen;
        self.unlisten |= other.unlisten;
    }

    pub fn is_none(&self) -> bool {
        *self == Effect::default()
    }

    /// Makes state, unless it fails or is rolled back: pin, then look, so a client
    /// whose state did not stick is unpinned at its next idle point.
    const PIN: Effect = Effect {
        pin: true,
        check: true,
        ..Effect::NONE
    };
    /// A library load: the check cannot see it, so pin and do not look (a later check
    /// may still unpin; DISCARD ALL does not unload a library either).
    const LOAD: Effect = Effect {
        pin: true,
        ..Effect::NONE
    };
    const CHECK: Effect = Effect {
        check: true,
        ..Effect::NONE
    };
    /// Might or might not leave state (a try-lock, `set_config`): look, then pin.
    const PROBE: Effect = Effect {
        probe: true,
        ..Effect::NONE
    };
    /// `RESET ALL`: parameters may be back to the login's, and pinning state may be
    /// gone.
    const RESET_ALL: Effect = Effect {
        check: true,
        read_back: true,
        reset_all: true,
        ..Effect::NONE
    };
    /// `DISCARD ALL`: as `RESET ALL`, and an `UNLISTEN *`.
    const DISCARD_ALL: Effect = Effect {
        check: true,
        read_back: true,
        reset_all: true,
        listen: true,
        unlisten: true,
        ..Effect::NONE
    };
    /// `LISTEN`: a channel more once the transaction commits.
    const LISTEN: Effect = Effect {
        listen: true,
        ..Effect::NONE
    };
    /// `UNLISTEN`: channels fewer once it commits; a pinned client's state may be gone.
    const UNLISTEN: Effect = Effect {
        check: true,
        listen: true,
        unlisten: true,
        ..Effect::NONE
    };
    /// Code the pooler cannot see into (`DO`, `CALL`, a FunctionCall): anything a
    /// session can hold may be left behind, so look once idle (pin if the check finds
    /// state) and read the tracked parameters back.
    pub const OPAQUE: Effect = Effect {
        probe: true,
        read_back: true,
        ..Effect::NONE
    };
    const NONE: Effect = Effect {
        pin: false,
        probe: false,
        check: false,
        read_back: false,
        reset_all: false,
        listen: false,
        unlisten: false,
    };
}

/// Custom parameters (`app.tenant`) a client set at session level. Postgres 15 keeps
/// them as placeholders that `pg_settings` does not show, so the state check can only see
/// them by name: it asks for each name the client ever set, and a value that is neither
/// unset (NULL) nor empty (what `RESET` leaves) is state. Names are kept for the client's
/// whole life (a prepared statement may set one again without being looked at again);
/// a custom name the pooler cannot read (`set_config($1, …, false)`) or one past the
/// bound makes every check report state, so a pinned client stays pinned until it
/// leaves: never a leak, at worst a pin.
///
/// A role default for a custom parameter (`ALTER ROLE … SET app.x`) also reads as state:
/// a client that set that parameter stays pinned (the safe side).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Customs {
    names: Vec<String>,
    unknown: bool,
}

/// Custom names remembered per client; more make every check report state.
const MAX_CUSTOMS: usize = 32;

impl Customs {
    fn note(&mut self, name: &[u8]) {
        let valid = !name.is_empty()
            && name
                .iter()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'$'));
        if !valid {
            self.unknown = true;
            return;
        }
        let name = String::from_utf8_lossy(name).to_ascii_lowercase();
        if self.names.contains(&name) {
            return;
        }
        if self.names.len() >= MAX_CUSTOMS {
            self.unknown = true;
        } else {
            self.names.push(name);
        }
    }
}

/// The effect of a statement text (a simple Query's, which may hold several
/// statements, or a Parse's); custom parameters it may set are noted in `customs`.
pub fn classify(sql: &[u8], customs: &mut Customs) -> Effect {
    let mut effect = Effect::default();
    // Every real statement starts at the text's start or after a `;`. Splitting on
    // every `;`, quoted ones too, only adds false starts, and those can only pin.
    for part in sql.split(|b| *b == b';') {
        effect.merge(statement(part, customs));
    }
    effect.merge(functions(sql, customs));
    effect
}

fn statement(text: &[u8], customs: &mut Customs) -> Effect {
    let mut words = Words::new(text);
    let Some(first) = words.next() else {
        return Effect::default();
    };
    // Every statement of every transaction comes through here: no allocation for the
    // first word (keywords are short; a longer word is none of them).
    let mut key = [0u8; 12];
    let first = match key.get_mut(..first.len()) {
        Some(k) => {
            k.copy_from_slice(first);
            k.make_ascii_uppercase();
            &*k
        }
        None => &[],
    };
    match first {
        b"SET" => set(&mut words, customs),
        b"RESET" => match words.next().map(upper).as_deref() {
            Some(b"ALL") => Effect::RESET_ALL,
            Some(name) if is_tracked(name) => read_back(name),
            _ => Effect::CHECK,
        },
        b"LISTEN" => Effect::LISTEN,
        b"LOAD" => Effect::LOAD,
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
            // `CREATE FUNCTION pg_temp.f`, `CREATE TABLE pg_temp.t`: temporary too.
            if temp || find_ci(text, b"pg_temp") {
                Effect::PIN
            } else {
                Effect::default()
            }
        }
        b"DECLARE" => {
            if contains_word_pair(text, b"WITH", b"HOLD") {
                Effect::PIN
            } else {
                Effect::default()
            }
        }
        b"DISCARD" => match words.next().map(upper).as_deref() {
            Some(b"ALL") => Effect::DISCARD_ALL,
            _ => Effect::CHECK,
        },
        b"UNLISTEN" => Effect::UNLISTEN,
        b"DEALLOCATE" | b"CLOSE" | b"DROP" => Effect::CHECK,
        b"DO" | b"CALL" => {
            custom_sets(text, customs);
            Effect::OPAQUE
        }
        // `SELECT ... INTO TEMP t` creates a temp table.
        b"SELECT" | b"WITH"
            if find_ci(text, b"temp") && contains_word_pair(text, b"INTO", b"TEMP") =>
        {
            Effect::PIN
        }
        _ => Effect::default(),
    }
}

/// `SET [SESSION | LOCAL] ...`.
fn set(words: &mut Words<'_>, customs: &mut Customs) -> Effect {
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
        name => {
            // A custom parameter (`app.tenant`, `"app"."tenant"`): the check must know
            // its name. The word stops at a quote, so a quoted part is read here.
            if name.contains(&b'.') || name.starts_with(b"\"") {
                match custom_name(name, words) {
                    Some(full) => customs.note(&full),
                    // `"work_mem"` is no custom name; a dotted one we cannot read is.
                    None if name.contains(&b'.') => customs.unknown = true,
                    None => {}
                }
            }
            // SET ROLE, SET XML OPTION, any other parameter.
            Effect::PIN
        }
    }
}

/// The dotted name of a custom parameter that starts with `first` (upper-cased by the
/// caller), quotes removed, or `None` if it cannot be read with confidence.
fn custom_name(first: &[u8], words: &mut Words<'_>) -> Option<Vec<u8>> {
    let mut name = Vec::new();
    let mut part = first;
    loop {
        let unquoted = match part.strip_prefix(b"\"") {
            Some(inner) => inner.strip_suffix(b"\"")?,
            None => part,
        };
        name.extend_from_slice(unquoted);
        // A bare word swallowed its dots (`app.tenant`); a quoted one is followed by
        // `.` and the next part.
        if words.rest.first() == Some(&b'.') {
            name.push(b'.');
            words.rest = &words.rest[1..];
            part = words.next()?;
            continue;
        }
        break;
    }
    (name.contains(&b'.') && !name.ends_with(b".")).then_some(name)
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
fn functions(sql: &[u8], customs: &mut Customs) -> Effect {
    let mut effect = Effect::default();
    // Every name looked for has an underscore; most statements have none.
    if !sql.contains(&b'_') {
        return effect;
    }
    // pg_advisory_xact_lock is gone at commit; these hold past it (`_shared` too).
    if find_ci(sql, b"pg_advisory_lock") || find_ci(sql, b"pg_try_advisory_lock") {
        effect.merge(Effect::PROBE);
    }
    if find_ci(sql, b"advisory_unlock") {
        effect.merge(Effect::CHECK);
    }
    let mut rest = sql;
    while let Some(at) = find_ci_at(rest, b"set_config") {
        rest = &rest[at + b"set_config".len()..];
        effect.merge(set_config(rest, customs));
    }
    effect
}

/// One `set_config(name, value, is_local)` call; `args` is the text after the name.
fn set_config(args: &[u8], customs: &mut Customs) -> Effect {
    let Some(args) = args.trim_ascii_start().strip_prefix(b"(") else {
        // Not a call (a column or a comment that names it): nothing happens.
        return Effect::default();
    };
    let parts = arguments(args);
    let name = parts.first().and_then(|a| string_literal(a));
    let local = parts.get(2).is_some_and(|a| {
        let a = a.trim_ascii();
        [&b"true"[..], b"'true'", b"'t'", b"'on'"]
            .iter()
            .any(|t| a.eq_ignore_ascii_case(t))
    });
    if local {
        // Gone at the end of the transaction, like SET LOCAL.
        return Effect::default();
    }
    match name {
        Some(name) if is_tracked(&name.to_ascii_uppercase()) => read_back(&name),
        Some(name) => {
            if name.contains(&b'.') {
                customs.note(&name);
            }
            Effect::PROBE
        }
        // A name the pooler cannot read (a parameter, an expression): it may be
        // tracked (read back) or custom (invisible to the check).
        None => {
            customs.unknown = true;
            Effect {
                read_back: true,
                ..Effect::PROBE
            }
        }
    }
}

/// The top-level arguments of a call, from just after its `(` to its `)`: split at
/// commas outside quotes and parentheses.
fn arguments(text: &[u8]) -> Vec<&[u8]> {
    let mut parts = Vec::new();
    let (mut depth, mut quote, mut start) = (0usize, None::<u8>, 0);
    for (i, &b) in text.iter().enumerate() {
        match quote {
            Some(q) if b == q => quote = None,
            Some(_) => {}
            None => match b {
                b'\'' | b'"' => quote = Some(b),
                b'(' => depth += 1,
                b')' if depth == 0 => {
                    parts.push(&text[start..i]);
                    return parts;
                }
                b')' => depth -= 1,
                b',' if depth == 0 => {
                    parts.push(&text[start..i]);
                    start = i + 1;
                }
                _ => {}
            },
        }
    }
    parts.push(&text[start..]);
    parts
}

/// The value of a plain `'...'` literal (with `''` for a quote, an optional cast after
/// it), or `None` for anything else.
fn string_literal(arg: &[u8]) -> Option<Vec<u8>> {
    let inner = arg.trim_ascii().strip_prefix(b"'")?;
    let mut value = Vec::new();
    let mut i = 0;
    while i < inner.len() {
        if inner[i] == b'\'' {
            if inner.get(i + 1) == Some(&b'\'') {
                value.push(b'\'');
                i += 2;
                continue;
            }
            let after = inner[i + 1..].trim_ascii();
            return (after.is_empty() || after.starts_with(b"::")).then_some(value);
        }
        value.push(inner[i]);
        i += 1;
    }
    None
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
    find_ci_at(haystack, needle).is_some()
}

fn find_ci_at(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    // Candidates by their first byte, then the rest compared: this runs over the text
    // of every statement.
    let (&first, rest) = needle.split_first()?;
    let (lower, upper) = (first.to_ascii_lowercase(), first.to_ascii_uppercase());
    let last = haystack.len().checked_sub(needle.len())?;
    (0..=last).find(|&i| {
        (haystack[i] == lower || haystack[i] == upper)
            && haystack[i + 1..i + needle.len()].eq_ignore_ascii_case(rest)
    })
}

/// `a` followed (after blanks) by `b`, anywhere, case-insensitively.
/// Notes the custom parameters a body may `SET` (`SET app.x = …` in PL/pgSQL): the
/// state check can see them only by name. `SET LOCAL` is gone at commit; a name the
/// pooler cannot read (quoted) makes every check report state (Customs).
fn custom_sets(text: &[u8], customs: &mut Customs) {
    let ident = |b: u8| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'$' | b'.' | b'"');
    let word = |t: &[u8]| -> usize { t.iter().take_while(|b| ident(**b)).count() };
    let mut from = 0;
    while let Some(at) = text.get(from..).and_then(|t| find_ci_at(t, b"set")) {
        let at = from + at;
        from = at + 3;
        let before = at.checked_sub(1).and_then(|i| text.get(i)).copied();
        let after = text.get(from..).unwrap_or_default();
        if before.is_some_and(ident) || after.first().is_some_and(|b| ident(*b)) {
            continue;
        }
        let mut rest = after.trim_ascii_start();
        let mut name = &rest[..word(rest)];
        if name.eq_ignore_ascii_case(b"LOCAL") {
            continue;
        }
        if name.eq_ignore_ascii_case(b"SESSION") {
            rest = rest[name.len()..].trim_ascii_start();
            name = &rest[..word(rest)];
        }
        if name.contains(&b'.') {
            customs.note(name);
        }
    }
}

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
mod tests;
