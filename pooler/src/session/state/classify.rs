//! The classifier proper: one pass of the lexer over a statement text, feeding a small
//! state machine per statement (its first words) and a tracker of function calls
//! (calls.rs: the advisory-lock functions, and `set_config(` with a stack of open
//! calls). Every token
//! costs a bounded amount of work, so the whole look is linear in the text's length
//! whatever the client sends: nested calls, unterminated quotes, comments or dollar
//! quotes, a megabyte of `set_config(`.

use super::calls::Calls;
use super::first::First;
use super::lex::{Lexer, Token, contains_ci, undouble};
use super::{Customs, Effect, MAX_CUSTOM_NAME, Out, is, is_tracked, read_back};

/// Where a text to classify comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Text {
    /// A whole statement text: it starts outside any quote.
    Whole,
    /// A piece cut from the middle of a longer text (a window of one that streams):
    /// it may start inside a string, a comment or a `DO` body, so it is read raw from
    /// its first byte, and every `SET app.x` in it is noted as if in a `DO` body.
    Fragment,
}

/// The effect of a statement text, and the bytes examined to learn it (a measure of
/// the work done, for the linearity tests).
pub(super) fn classify_counted(sql: &[u8], text: Text, customs: &mut Customs) -> (Effect, u64) {
    if text == Text::Whole {
        let (plain, looked) = super::plain::plain(sql);
        if plain {
            return (Effect::default(), looked);
        }
        let (effect, steps) = full_pass(sql, text, customs);
        return (effect, looked + steps);
    }
    full_pass(sql, text, customs)
}

/// The classifier proper, without the quick look (plain.rs), which its tests hold
/// against it.
pub(super) fn full_pass(sql: &[u8], text: Text, customs: &mut Customs) -> (Effect, u64) {
    let mut out = Out {
        effect: Effect::default(),
        customs,
        steps: 0,
    };
    let fragment = text == Text::Fragment;
    let mut lexer = if fragment {
        Lexer::raw(sql)
    } else {
        Lexer::new(sql)
    };
    let mut stmt = Statement::default();
    let mut calls = Calls::new(sql, fragment);
    let mut sets = SetScan::Idle;
    while let Some(t) = lexer.next_token() {
        if fragment {
            sets.token(t.token, &mut out);
        }
        if t.token == Token::Punct(b';') {
            stmt.end(&mut out);
            stmt = Statement::default();
            calls.end_statement(&mut out);
            continue;
        }
        if !t.comment {
            stmt.token(t.token, &mut out);
        }
        calls.token(t, &mut out);
        if lexer.is_raw() && !calls.raw {
            calls.go_raw(&mut out);
        }
    }
    stmt.end(&mut out);
    calls.end_statement(&mut out);
    sets.end(&mut out);
    (out.effect, lexer.steps() + out.steps)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Other,
    Create,
    Declare,
    Select,
    Opaque,
}

/// What the first words of a statement have said so far.
#[derive(Debug)]
enum Head<'a> {
    Start,
    Set,
    SetSession,
    SetName(Name<'a>),
    Prepare,
    Discard,
    /// `CREATE` and this many words after it (a `TEMP` among the first three pins).
    Create(u8),
    /// `ALTER` or `DROP`: a `FUNCTION`, `PROCEDURE` or `ROUTINE` next changes the app's
    /// functions.
    Routine,
    Done,
}

/// The statement being read: its head, and what its kind looks for in the rest.
#[derive(Debug)]
struct Statement<'a> {
    head: Head<'a>,
    kind: Kind,
    /// The previous word was `WITH` / `INTO` (for `WITH HOLD`, `INTO TEMP`).
    after_with: bool,
    after_into: bool,
    /// `DO` and `CALL`: custom parameters a body may `SET`.
    sets: SetScan<'a>,
}

impl Default for Statement<'_> {
    fn default() -> Self {
        Statement {
            head: Head::Start,
            kind: Kind::Other,
            after_with: false,
            after_into: false,
            sets: SetScan::Idle,
        }
    }
}

fn word(t: Token<'_>) -> Option<&[u8]> {
    match t {
        Token::Word(w) => Some(w),
        _ => None,
    }
}

impl<'a> Statement<'a> {
    fn token(&mut self, t: Token<'a>, out: &mut Out<'_>) {
        self.head(t, out);
        self.body(t, out);
    }

    fn head(&mut self, t: Token<'a>, out: &mut Out<'_>) {
        let w = word(t);
        let next = match std::mem::replace(&mut self.head, Head::Done) {
            Head::Start => self.first(t, out),
            Head::Set => match (t, w) {
                (_, Some(w)) if is(w, b"LOCAL") => Head::Done,
                (_, Some(w)) if is(w, b"SESSION") => Head::SetSession,
                (Token::Word(_) | Token::Quoted(_), _) => Head::SetName(Name::new(t)),
                _ => Head::Done,
            },
            Head::SetSession => match (t, w) {
                (_, Some(w)) if is(w, b"AUTHORIZATION") || is(w, b"CHARACTERISTICS") => {
                    out.effect.merge(Effect::PIN);
                    Head::Done
                }
                (Token::Word(_) | Token::Quoted(_), _) => Head::SetName(Name::new(t)),
                _ => Head::Done,
            },
            Head::SetName(mut name) => {
                if name.feed(t) {
                    Head::SetName(name)
                } else {
                    set_name(name, out);
                    Head::Done
                }
            }
            Head::Routine => {
                if w.is_some_and(|w| is(w, b"FUNCTION") || is(w, b"PROCEDURE") || is(w, b"ROUTINE"))
                {
                    out.effect.merge(Effect::ROUTINES);
                }
                Head::Done
            }
            Head::Prepare => {
                // PREPARE TRANSACTION is two-phase commit, not a prepared statement.
                if !w.is_some_and(|w| is(w, b"TRANSACTION")) {
                    out.effect.merge(Effect::PIN);
                }
                Head::Done
            }
            Head::Discard => {
                out.effect.merge(match w {
                    Some(w) if is(w, b"ALL") => Effect::DISCARD_ALL,
                    _ => Effect::CHECK,
                });
                Head::Done
            }
            Head::Create(n) => match w {
                Some(w) if is(w, b"TEMP") || is(w, b"TEMPORARY") => {
                    out.effect.merge(Effect::PIN);
                    Head::Done
                }
                // `CREATE [OR REPLACE] FUNCTION|PROCEDURE`: the app's functions change,
                // and the new one may run in the same text: probe, and look again.
                Some(w) if is(w, b"FUNCTION") || is(w, b"PROCEDURE") => {
                    out.effect.merge(Effect::OPAQUE);
                    out.effect.merge(Effect::ROUTINES);
                    Head::Done
                }
                Some(_) if n < 2 => Head::Create(n + 1),
                _ => Head::Done,
            },
            Head::Done => Head::Done,
        };
        self.head = next;
    }

    /// The statement's first token.
    fn first(&mut self, t: Token<'a>, out: &mut Out<'_>) -> Head<'a> {
        let Some(w) = word(t) else {
            return Head::Done;
        };
        let Some(keyword) = First::of(w) else {
            return Head::Done;
        };
        match keyword {
            First::Set => Head::Set,
            // `RESET name` returns a parameter to the value the session started with,
            // which for a client of the pooler is its startup setting, not the
            // server's: read like a `RESET ALL`, which finds what went back.
            First::Reset => {
                out.effect.merge(Effect::RESET_ALL);
                Head::Done
            }
            First::Listen => {
                out.effect.merge(Effect::LISTEN);
                Head::Done
            }
            First::Load => {
                out.effect.merge(Effect::LOAD);
                Head::Done
            }
            First::Prepare => Head::Prepare,
            First::Create => {
                self.kind = Kind::Create;
                Head::Create(0)
            }
            First::Declare => {
                self.kind = Kind::Declare;
                Head::Done
            }
            First::Discard => Head::Discard,
            First::Unlisten => {
                out.effect.merge(Effect::UNLISTEN);
                Head::Done
            }
            First::Check => {
                out.effect.merge(Effect::CHECK);
                Head::Done
            }
            First::Drop => {
                out.effect.merge(Effect::CHECK);
                Head::Routine
            }
            First::Alter => Head::Routine,
            First::Opaque => {
                self.kind = Kind::Opaque;
                out.effect.merge(Effect::OPAQUE);
                Head::Done
            }
            // Whatever the statement it runs leaves is looked for once idle.
            First::Explain => {
                out.effect.merge(Effect::OPAQUE);
                Head::Done
            }
            // `SELECT … INTO TEMP t` creates a temp table.
            First::Select => {
                self.kind = Kind::Select;
                Head::Done
            }
        }
    }

    /// What the statement's kind looks for in every token after the first.
    fn body(&mut self, t: Token<'a>, out: &mut Out<'_>) {
        let w = word(t);
        match self.kind {
            Kind::Other => return,
            // `CREATE TABLE pg_temp.t`, `SELECT … INTO pg_temp.t`: temporary too.
            Kind::Create | Kind::Select => {
                if let Token::Word(n) | Token::Quoted(n) = t {
                    if contains_ci(n, b"pg_temp", &mut out.steps) {
                        out.effect.merge(Effect::PIN);
                    }
                }
                let temp = w.is_some_and(|w| {
                    is(w, b"TEMP") || is(w, b"TEMPORARY") || is(w, b"LOCAL") || is(w, b"GLOBAL")
                });
                if self.kind == Kind::Select && self.after_into && temp {
                    out.effect.merge(Effect::PIN);
                }
            }
            Kind::Declare => {
                if self.after_with && w.is_some_and(|w| is(w, b"HOLD")) {
                    out.effect.merge(Effect::PIN);
                }
            }
            Kind::Opaque => {
                self.sets.token(t, out);
                if let Token::Str { body, .. } = t {
                    // A `DO` body is code in a string: its `SET app.x` and
                    // `set_config('app.x', …)` are seen as raw text.
                    scan_body(body, out);
                }
            }
        }
        self.after_with = w.is_some_and(|w| is(w, b"WITH"));
        self.after_into = w.is_some_and(|w| is(w, b"INTO"));
    }

    fn end(&mut self, out: &mut Out<'_>) {
        match std::mem::replace(&mut self.head, Head::Done) {
            Head::SetName(name) => set_name(name, out),
            Head::Discard => out.effect.merge(Effect::CHECK),
            Head::Prepare => out.effect.merge(Effect::PIN),
            _ => {}
        }
        self.sets.end(out);
    }
}

/// A code body inside a string (`DO $$ … $$`), read raw for the custom parameters it
/// may set.
fn scan_body(body: &[u8], out: &mut Out<'_>) {
    let mut lexer = Lexer::raw(body);
    let mut sets = SetScan::Idle;
    let mut calls = Calls::new(body, true);
    for t in lexer.by_ref() {
        sets.token(t.token, out);
        calls.token(t, out);
    }
    sets.end(out);
    calls.end_statement(out);
    out.steps += lexer.steps();
}

/// `SET [SESSION] name …` after the statement's `SET`: its effect.
fn set_name(name: Name<'_>, out: &mut Out<'_>) {
    let effect = match name.finish(out.customs) {
        Named::Single(n) => {
            let bare = matches!(name.first, Token::Word(_));
            match n {
                n if bare && (is(n, b"TRANSACTION") || is(n, b"CONSTRAINTS")) => Effect::default(),
                n if bare && is(n, b"TIME") => read_back(b"TIMEZONE"),
                n if bare && is(n, b"NAMES") => read_back(b"CLIENT_ENCODING"),
                n if bare && is(n, b"SCHEMA") => read_back(b"SEARCH_PATH"),
                n if is_tracked(n) => read_back(n),
                // SET ROLE, SET XML OPTION, any other parameter.
                _ => Effect::PIN,
            }
        }
        // A custom parameter, noted by name for the state check.
        Named::Custom => Effect::PIN,
    };
    out.effect.merge(effect);
}

/// A parameter name being read: `name`, `"Name"`, `app.tenant`, `"app"."x"`.
#[derive(Debug)]
struct Name<'a> {
    first: Token<'a>,
    /// Once a `.` follows: the dotted name so far, unquoted and lower-cased
    /// (PostgreSQL compares parameter names without case).
    dotted: Option<Vec<u8>>,
    /// After a `.`: a part must come next.
    want_part: bool,
    bad: bool,
}

enum Named<'a> {
    /// One part: its text (a quoted one without its quotes).
    Single(&'a [u8]),
    Custom,
}

fn push_part(into: &mut Vec<u8>, part: Token<'_>) -> bool {
    let text = match part {
        Token::Word(w) => w.to_vec(),
        Token::Quoted(q) => undouble(q, b'"'),
        _ => return false,
    };
    if into.len() + text.len() > MAX_CUSTOM_NAME {
        return false;
    }
    into.extend(text.iter().map(u8::to_ascii_lowercase));
    true
}

impl<'a> Name<'a> {
    fn new(first: Token<'a>) -> Self {
        Name {
            first,
            dotted: None,
            want_part: false,
            bad: false,
        }
    }

    /// Takes the next token if it continues the name.
    fn feed(&mut self, t: Token<'a>) -> bool {
        if self.want_part {
            self.want_part = false;
            if self.dotted.as_mut().is_some_and(|d| push_part(d, t)) {
                return true;
            }
            self.bad = true;
            return matches!(t, Token::Word(_) | Token::Quoted(_));
        }
        if t != Token::Punct(b'.') {
            return false;
        }
        if self.dotted.is_none() {
            let mut d = Vec::new();
            if !push_part(&mut d, self.first) {
                self.bad = true;
            }
            self.dotted = Some(d);
        }
        if let Some(d) = self.dotted.as_mut() {
            d.push(b'.');
        }
        self.want_part = true;
        true
    }

    /// Notes a custom name in `customs` (or marks it unreadable).
    fn finish(&self, customs: &mut Customs) -> Named<'a> {
        match &self.dotted {
            None => Named::Single(match self.first {
                Token::Word(w) | Token::Quoted(w) => w,
                _ => b"",
            }),
            Some(d) => {
                if self.bad || self.want_part {
                    customs.unknown = true;
                } else {
                    customs.note(d);
                }
                Named::Custom
            }
        }
    }
}

/// `SET [SESSION] app.x` anywhere in a `DO`/`CALL` statement or body (PL/pgSQL's
/// `SET`); `SET LOCAL` is gone at commit.
#[derive(Debug)]
enum SetScan<'a> {
    Idle,
    AfterSet,
    AfterSession,
    Name(Name<'a>),
}

impl<'a> SetScan<'a> {
    fn token(&mut self, t: Token<'a>, out: &mut Out<'_>) {
        let w = word(t);
        *self = match std::mem::replace(self, SetScan::Idle) {
            SetScan::Idle => match w {
                Some(w) if is(w, b"SET") => SetScan::AfterSet,
                _ => SetScan::Idle,
            },
            SetScan::AfterSet => match (t, w) {
                (_, Some(w)) if is(w, b"LOCAL") => SetScan::Idle,
                (_, Some(w)) if is(w, b"SESSION") => SetScan::AfterSession,
                (Token::Word(_) | Token::Quoted(_), _) => SetScan::Name(Name::new(t)),
                _ => SetScan::Idle,
            },
            SetScan::AfterSession => match t {
                Token::Word(_) | Token::Quoted(_) => SetScan::Name(Name::new(t)),
                _ => SetScan::Idle,
            },
            SetScan::Name(mut name) => {
                if name.feed(t) {
                    SetScan::Name(name)
                } else {
                    name.finish(out.customs);
                    // The token that ended the name may start another `SET`.
                    match w {
                        Some(w) if is(w, b"SET") => SetScan::AfterSet,
                        _ => SetScan::Idle,
                    }
                }
            }
        };
    }

    fn end(&mut self, out: &mut Out<'_>) {
        if let SetScan::Name(name) = std::mem::replace(self, SetScan::Idle) {
            name.finish(out.customs);
        }
    }
}
