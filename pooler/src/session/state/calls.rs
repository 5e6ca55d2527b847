//! The function calls in a statement text, token by token: the advisory-lock functions
//! anywhere, and each `set_config(name, value, is_local)` read argument by argument on
//! a bounded stack of open calls (exact mode), or by a short pattern (raw mode). Each
//! token costs a bounded amount of work, however deep the calls nest.

use super::lex::{Lexed, Token, contains_ci, undouble};
use super::{Effect, Out, is, is_tracked, read_back};

/// Built-in functions that run a query given as text.
const DYNAMIC: [&[u8]; 4] = [
    b"query_to_xml",
    b"query_to_xmlschema",
    b"query_to_xml_and_xmlschema",
    b"ts_stat",
];

/// `set_config(` calls open inside one another that are read argument by argument;
/// a deeper one counts as unreadable (the safe side: a check, and its name unknown).
const MAX_NESTED_CALLS: usize = 16;

/// One `set_config(` call being read (exact mode): the depth of its parentheses, the
/// argument being read, and what its first and third arguments look like.
#[derive(Debug)]
struct Call<'a> {
    depth: u32,
    arg: u32,
    name: NameArg<'a>,
    local: LocalArg,
}

/// The first argument: a plain literal, optionally cast (`'x'::text`).
#[derive(Debug)]
enum NameArg<'a> {
    Empty,
    Literal(&'a [u8]),
    Colon(&'a [u8]),
    Cast(&'a [u8]),
    Other,
}

/// The third argument: exactly `true`, `'true'`, `'t'` or `'on'`.
#[derive(Debug, PartialEq, Eq)]
enum LocalArg {
    Empty,
    True,
    Other,
}

impl<'a> NameArg<'a> {
    fn feed(&mut self, t: Token<'a>) {
        *self = match (std::mem::replace(self, NameArg::Other), t) {
            (NameArg::Empty, Token::Str { body, plain: true }) => NameArg::Literal(body),
            (NameArg::Literal(b), Token::Punct(b':')) => NameArg::Colon(b),
            (NameArg::Colon(b), Token::Punct(b':')) => NameArg::Cast(b),
            (NameArg::Cast(b), _) => NameArg::Cast(b),
            _ => NameArg::Other,
        };
    }

    /// The literal's value (`''` undoubled).
    fn value(&self) -> Option<Vec<u8>> {
        match self {
            NameArg::Literal(b) | NameArg::Cast(b) => Some(undouble(b, b'\'')),
            _ => None,
        }
    }
}

impl LocalArg {
    fn feed(&mut self, t: Token<'_>) {
        let truthy = match t {
            Token::Word(w) => is(w, b"true"),
            Token::Str { body, plain: true } => {
                is(body, b"true") || is(body, b"t") || is(body, b"on")
            }
            _ => false,
        };
        *self = if *self == LocalArg::Empty && truthy {
            LocalArg::True
        } else {
            LocalArg::Other
        };
    }
}

/// A `set_config(` call in raw mode: only `('app.x'` then `,` or `)` is read; the
/// third argument is never trusted (the call may be longer than it looks).
#[derive(Debug, Clone, Copy)]
enum RawCall {
    /// After `(`: the opening quote.
    Open,
    /// After the quote: a word.
    Quote,
    /// The name so far (its byte range), and whether a `.` was the last part.
    Name { start: usize, end: usize, dot: bool },
    /// After the closing quote: `,` or `)`.
    Closed { start: usize, end: usize },
}

/// The function calls in a text: advisory locks anywhere, and `set_config` calls read
/// argument by argument on a stack (exact mode) or by a short pattern (raw mode).
pub(super) struct Calls<'a> {
    text: &'a [u8],
    pub(super) raw: bool,
    depth: u32,
    stack: Vec<Call<'a>>,
    raw_call: Option<RawCall>,
    /// The previous token named `set_config`: a `(` now opens a call.
    call_next: bool,
}

impl<'a> Calls<'a> {
    pub(super) fn new(text: &'a [u8], raw: bool) -> Self {
        Calls {
            text,
            raw,
            depth: 0,
            stack: Vec::new(),
            raw_call: None,
            call_next: false,
        }
    }

    pub(super) fn token(&mut self, t: Lexed<'a>, out: &mut Out<'_>) {
        let opens = std::mem::take(&mut self.call_next) && t.token == Token::Punct(b'(');
        if self.raw {
            self.raw_token(t, opens, out);
        } else if !t.comment {
            self.exact_token(t.token, opens, out);
        }
        if let Token::Quoted(_) = t.token {
            // `U&"pg!005fadvisory!005flock" UESCAPE '!'`: a name spelled with escapes
            // that no check here reads. It may be any function, with any argument.
            if self
                .text
                .get(t.start)
                .is_some_and(|b| b.eq_ignore_ascii_case(&b'u'))
            {
                finish(&NameArg::Other, false, out);
            }
        }
        if let Token::Word(n) | Token::Quoted(n) = t.token {
            // Functions that run SQL given as text, which no look here reads (it may
            // set anything): `query_to_xml('select set_config(…)', …)`, `ts_stat(…)`.
            if DYNAMIC.iter().any(|f| is(n, f)) {
                finish(&NameArg::Other, false, out);
            }
            // Every name looked for below has at least ten bytes.
            if n.len() >= 10 {
                if contains_ci(n, b"advisory_lock", &mut out.steps) {
                    // pg_advisory_lock, pg_try_advisory_lock (and _shared) hold past
                    // commit; pg_advisory_xact_lock does not, and is not matched.
                    out.effect.merge(Effect::PROBE);
                }
                if contains_ci(n, b"advisory_unlock", &mut out.steps) {
                    out.effect.merge(Effect::CHECK);
                }
                self.call_next = contains_ci(n, b"set_config", &mut out.steps);
            }
        }
    }

    fn exact_token(&mut self, t: Token<'a>, opens: bool, out: &mut Out<'_>) {
        match t {
            Token::Punct(b')') => {
                if self.stack.last().is_some_and(|c| c.depth == self.depth) {
                    if let Some(call) = self.stack.pop() {
                        finish(
                            &call.name,
                            call.arg >= 2 && call.local == LocalArg::True,
                            out,
                        );
                    }
                }
                self.depth = self.depth.saturating_sub(1);
            }
            Token::Punct(b',') => {
                if let Some(c) = self.stack.last_mut().filter(|c| c.depth == self.depth) {
                    c.arg = c.arg.saturating_add(1);
                }
            }
            _ => {
                if let Some(c) = self.stack.last_mut().filter(|c| c.depth == self.depth) {
                    match c.arg {
                        0 => c.name.feed(t),
                        2 => c.local.feed(t),
                        _ => {}
                    }
                }
                if t == Token::Punct(b'(') {
                    self.depth = self.depth.saturating_add(1);
                    if opens {
                        if self.stack.len() < MAX_NESTED_CALLS {
                            self.stack.push(Call {
                                depth: self.depth,
                                arg: 0,
                                name: NameArg::Empty,
                                local: LocalArg::Empty,
                            });
                        } else {
                            finish(&NameArg::Other, false, out);
                        }
                    }
                }
            }
        }
    }

    fn raw_token(&mut self, t: Lexed<'a>, opens: bool, out: &mut Out<'_>) {
        let adjacent = |end: usize| t.start == end;
        let next = match (self.raw_call.take(), t.token) {
            (None, _) => None,
            (Some(RawCall::Open), Token::Punct(b'\'')) => Some(RawCall::Quote),
            (Some(RawCall::Quote), Token::Word(_)) => Some(RawCall::Name {
                start: t.start,
                end: t.end,
                dot: false,
            }),
            (Some(RawCall::Name { start, end, dot }), Token::Punct(b'.'))
                if adjacent(end) && !dot =>
            {
                Some(RawCall::Name {
                    start,
                    end: t.end,
                    dot: true,
                })
            }
            (
                Some(RawCall::Name {
                    start,
                    end,
                    dot: true,
                }),
                Token::Word(_),
            ) if adjacent(end) => Some(RawCall::Name {
                start,
                end: t.end,
                dot: false,
            }),
            (
                Some(RawCall::Name {
                    start,
                    end,
                    dot: false,
                }),
                Token::Punct(b'\''),
            ) if adjacent(end) => Some(RawCall::Closed { start, end }),
            (Some(RawCall::Closed { start, end }), Token::Punct(b',' | b')')) => {
                let name = self.text.get(start..end).map(<[u8]>::to_vec);
                finish_named(name, false, out);
                None
            }
            (Some(_), _) => {
                finish(&NameArg::Other, false, out);
                None
            }
        };
        self.raw_call = next;
        if opens {
            if self.raw_call.is_some() {
                finish(&NameArg::Other, false, out);
            }
            self.raw_call = Some(RawCall::Open);
        }
    }

    /// The lexer left exact mode: the calls open now cannot be read to their end.
    pub(super) fn go_raw(&mut self, out: &mut Out<'_>) {
        for call in std::mem::take(&mut self.stack) {
            finish(&call.name, false, out);
        }
        self.raw = true;
        self.call_next = false;
    }

    pub(super) fn end_statement(&mut self, out: &mut Out<'_>) {
        for call in std::mem::take(&mut self.stack).into_iter().rev() {
            finish(
                &call.name,
                call.arg >= 2 && call.local == LocalArg::True,
                out,
            );
        }
        if self.raw_call.take().is_some() {
            finish(&NameArg::Other, false, out);
        }
        self.depth = 0;
        self.call_next = false;
    }
}

/// The effect of one `set_config(name, value, is_local)` call.
fn finish(name: &NameArg<'_>, local: bool, out: &mut Out<'_>) {
    finish_named(name.value(), local, out);
}

fn finish_named(name: Option<Vec<u8>>, local: bool, out: &mut Out<'_>) {
    if local {
        // Gone at the end of the transaction, like SET LOCAL.
        return;
    }
    let effect = match name {
        Some(name) if is_tracked(&name) => read_back(&name),
        Some(name) => {
            if name.contains(&b'.') {
                out.customs.note(&name);
            }
            Effect::PROBE
        }
        // A name the pooler cannot read (a parameter, an expression): it may be
        // tracked (read back) or custom (invisible to the check).
        None => {
            out.customs.unknown = true;
            Effect {
                read_back: true,
                ..Effect::PROBE
            }
        }
    };
    out.effect.merge(effect);
}
