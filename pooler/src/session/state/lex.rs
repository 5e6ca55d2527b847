//! A forward-only lexer for the SQL text clients send: the one place the pooler reads
//! a statement's bytes, so every look at client SQL is one pass, linear in its length
//! (style.md, habit 15). Whatever a client sends, each byte is examined a bounded number
//! of times; [`Lexer::steps`] counts them, and the tests hold it to a constant per byte
//! on megabytes of adversarial text.
//!
//! Two modes:
//! - **exact**: PostgreSQL's own token boundaries (scan.l): `'…'` with `''`, `E'…'`,
//!   `B'…'`, `X'…'`, `N'…'`, `U&'…'`, `$tag$…$tag$`, `"…"`, `--` and nested `/* */`
//!   comments, `$1` parameters. A `;` inside any of them ends nothing.
//! - **raw**: entered for good at the first backslash inside a quoted string, the one
//!   place where the server's reading depends on what the pooler cannot be sure of
//!   (`standard_conforming_strings`, and client encodings such as SJIS whose second
//!   byte may be `\`). From there quotes mean nothing: every `;` may start a statement
//!   and every word may be code. Comments are still reported as such (the statement
//!   reader skips them) but end at the next `;`, and their words are still tokens (a
//!   function name may hide there if the comment was really inside a string).
//!
//! So the pooler sees at least every statement start and every function name the server
//! sees; a false one costs a check, never a leak.

/// One token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Token<'a> {
    /// An unquoted identifier or keyword, as written.
    Word(&'a [u8]),
    /// A quoted identifier: the text between its quotes, `""` still doubled.
    Quoted(&'a [u8]),
    /// A string constant: the text between its quotes (or dollar delimiters). `plain`:
    /// a `'…'` constant without prefix or backslash, whose value is its text with `''`
    /// undoubled.
    Str { body: &'a [u8], plain: bool },
    /// `$1`.
    Param,
    /// A numeric constant.
    Number,
    /// Any other byte, one at a time: `(`, `)`, `,`, `;`, `.`, `:`, operators.
    Punct(u8),
}

/// A token, where it lies in the text, and whether it lies in what reads as a comment
/// (raw mode only: exact mode skips comments).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Lexed<'a> {
    pub token: Token<'a>,
    pub start: usize,
    pub end: usize,
    pub comment: bool,
}

pub(crate) struct Lexer<'a> {
    text: &'a [u8],
    pos: usize,
    raw: bool,
    /// Raw mode: `/*` nesting since the last `;`, and whether a `--` comment is open.
    block: u32,
    line: bool,
    steps: u64,
}

pub(super) fn ident_start(b: u8) -> bool {
    b.is_ascii_alphabetic() || b == b'_' || b >= 0x80
}

pub(super) fn ident_cont(b: u8) -> bool {
    ident_start(b) || b.is_ascii_digit() || b == b'$'
}

/// PostgreSQL's whitespace (scan.l `space`).
pub(super) fn blank(b: u8) -> bool {
    matches!(b, b' ' | b'\t' | b'\n' | b'\r' | b'\x0b' | b'\x0c')
}

impl<'a> Lexer<'a> {
    pub fn new(text: &'a [u8]) -> Self {
        Lexer {
            text,
            pos: 0,
            raw: false,
            block: 0,
            line: false,
            steps: 0,
        }
    }

    /// A lexer that starts in raw mode: for text whose quoting the pooler cannot know
    /// (the body of a `DO` block, which is code inside a string).
    pub fn raw(text: &'a [u8]) -> Self {
        Lexer {
            raw: true,
            ..Lexer::new(text)
        }
    }

    /// Whether the lexer has left exact mode.
    pub fn is_raw(&self) -> bool {
        self.raw
    }

    /// Bytes examined so far (each lookahead counts).
    pub fn steps(&self) -> u64 {
        self.steps
    }

    fn at(&mut self, i: usize) -> Option<u8> {
        self.steps += 1;
        self.text.get(i).copied()
    }

    /// Advances while `pred` holds; returns the new position.
    fn run_while(&mut self, from: usize, pred: impl Fn(u8) -> bool) -> usize {
        let mut i = from;
        while self.at(i).is_some_and(&pred) {
            i += 1;
        }
        i
    }

    fn lexed(&mut self, token: Token<'a>, start: usize, end: usize) -> Lexed<'a> {
        self.pos = end;
        Lexed {
            token,
            start,
            end,
            comment: self.raw && (self.block > 0 || self.line),
        }
    }

    pub fn next_token(&mut self) -> Option<Lexed<'a>> {
        if self.raw {
            self.next_raw()
        } else {
            self.next_exact()
        }
    }

    fn next_exact(&mut self) -> Option<Lexed<'a>> {
        loop {
            let start = self.run_while(self.pos, blank);
            self.pos = start;
            let c = self.at(start)?;
            let next = self.at(start + 1);
            return Some(match (c, next) {
                (b'-', Some(b'-')) => {
                    self.pos = self.run_while(start + 2, |b| b != b'\n' && b != b'\r');
                    continue;
                }
                (b'/', Some(b'*')) => {
                    self.pos = self.block_comment(start + 2);
                    continue;
                }
                (b'\'', _) => return Some(self.string(start, start, true)),
                (b'"', _) => self.quoted(start + 1, start),
                (b'$', _) => self.dollar(start),
                (c, _) if ident_start(c) => {
                    let end = self.run_while(start + 1, ident_cont);
                    let word = &self.text[start..end];
                    match (word, self.at(end), self.at(end + 1)) {
                        // E'…', B'…', X'…', N'…': a prefixed string (flex takes the
                        // longest match, so only a one-letter word is a prefix).
                        ([p], Some(b'\''), _) if b"eEbBxXnN".contains(p) => {
                            return Some(self.string(start, end, false));
                        }
                        ([b'u' | b'U'], Some(b'&'), Some(b'\'')) => {
                            return Some(self.string(start, end + 1, false));
                        }
                        ([b'u' | b'U'], Some(b'&'), Some(b'"')) => self.quoted(end + 2, start),
                        _ => self.lexed(Token::Word(word), start, end),
                    }
                }
                (c, _) if c.is_ascii_digit() => {
                    // Digits, a fraction, an exponent, PostgreSQL 16's `0x1F` and `1_000`;
                    // never `$` (`1$$…$$` is a number and a dollar-quoted string).
                    let end = self.run_while(start + 1, |b| {
                        b.is_ascii_alphanumeric() || b == b'_' || b == b'.'
                    });
                    self.lexed(Token::Number, start, end)
                }
                (c, _) => self.lexed(Token::Punct(c), start, start + 1),
            });
        }
    }

    /// A nested `/* */` comment whose opening is just before `from`; returns the
    /// position after it (or the end of the text).
    fn block_comment(&mut self, from: usize) -> usize {
        let (mut depth, mut i) = (1u32, from);
        while let Some(c) = self.at(i) {
            let next = self.at(i + 1);
            match (c, next) {
                (b'*', Some(b'/')) => {
                    depth -= 1;
                    i += 2;
                    if depth == 0 {
                        return i;
                    }
                }
                (b'/', Some(b'*')) => {
                    depth += 1;
                    i += 2;
                }
                _ => i += 1,
            }
        }
        i
    }

    /// A quoted string whose opening quote is at `quote`; `start` is where its token
    /// starts (the prefix). A backslash inside switches to raw mode just after it.
    fn string(&mut self, start: usize, quote: usize, plain: bool) -> Lexed<'a> {
        let mut i = quote + 1;
        loop {
            match self.at(i) {
                None => {
                    let body = &self.text[quote + 1..];
                    return self.lexed(Token::Str { body, plain }, start, i);
                }
                Some(b'\\') => {
                    let body = &self.text[quote + 1..i];
                    self.raw = true;
                    return self.lexed(Token::Str { body, plain: false }, start, i + 1);
                }
                Some(b'\'') if self.at(i + 1) == Some(b'\'') => i += 2,
                Some(b'\'') => {
                    let body = &self.text[quote + 1..i];
                    return self.lexed(Token::Str { body, plain }, start, i + 1);
                }
                Some(_) => i += 1,
            }
        }
    }

    /// A quoted identifier whose text starts at `from`; `start` is its token's start.
    fn quoted(&mut self, from: usize, start: usize) -> Lexed<'a> {
        let mut i = from;
        loop {
            match self.at(i) {
                None => return self.lexed(Token::Quoted(&self.text[from..]), start, i),
                Some(b'"') if self.at(i + 1) == Some(b'"') => i += 2,
                Some(b'"') => return self.lexed(Token::Quoted(&self.text[from..i]), start, i + 1),
                Some(_) => i += 1,
            }
        }
    }

    /// `$1`, a `$tag$…$tag$` string, or a lone `$`.
    fn dollar(&mut self, start: usize) -> Lexed<'a> {
        if self.at(start + 1).is_some_and(|b| b.is_ascii_digit()) {
            let end = self.run_while(start + 1, |b| b.is_ascii_digit());
            return self.lexed(Token::Param, start, end);
        }
        // A tag is an identifier without `$` (scan.l `dolq_start`, `dolq_cont`).
        let tag_end = match self.at(start + 1) {
            Some(b) if ident_start(b) => self.run_while(start + 1, |b| ident_cont(b) && b != b'$'),
            _ => start + 1,
        };
        if self.at(tag_end) != Some(b'$') {
            return self.lexed(Token::Punct(b'$'), start, start + 1);
        }
        let delimiter = &self.text[start..=tag_end];
        let from = tag_end + 1;
        let mut i = from;
        // Each candidate `$` is compared with the delimiter; the bytes a failed compare
        // read are tag characters, which hold no `$`, so compares never overlap: linear.
        while let Some(c) = self.at(i) {
            if c == b'$' {
                let matched = self.matches_at(i, delimiter);
                if matched == delimiter.len() {
                    let body = &self.text[from..i];
                    return self.lexed(Token::Str { body, plain: false }, start, i + matched);
                }
                i += matched.max(1);
            } else {
                i += 1;
            }
        }
        self.lexed(
            Token::Str {
                body: &self.text[from..],
                plain: false,
            },
            start,
            i,
        )
    }

    /// How many bytes of `needle` match the text at `at` (counted as steps).
    fn matches_at(&mut self, at: usize, needle: &[u8]) -> usize {
        let mut n = 0;
        while n < needle.len() && self.at(at + n) == Some(needle[n]) {
            n += 1;
        }
        n
    }

    fn next_raw(&mut self) -> Option<Lexed<'a>> {
        loop {
            let mut i = self.pos;
            loop {
                match self.at(i) {
                    Some(b'\n' | b'\r') => {
                        self.line = false;
                        i += 1;
                    }
                    Some(b) if blank(b) => i += 1,
                    _ => break,
                }
            }
            let start = i;
            self.pos = start;
            let c = self.at(start)?;
            let next = self.at(start + 1);
            let in_comment = self.block > 0 || self.line;
            match (c, next) {
                (b';', _) => {
                    // Whatever was open ends here: the statement reader never looks
                    // past a `;` (a comment or a quote may have been inside a string).
                    self.block = 0;
                    self.line = false;
                    return Some(self.lexed(Token::Punct(b';'), start, start + 1));
                }
                (b'-', Some(b'-')) if self.block == 0 && !self.line => {
                    self.line = true;
                    self.pos = start + 2;
                }
                (b'/', Some(b'*')) if !self.line => {
                    self.block += 1;
                    self.pos = start + 2;
                }
                (b'*', Some(b'/')) if self.block > 0 && !self.line => {
                    self.block -= 1;
                    self.pos = start + 2;
                }
                (b'"', _) if !in_comment => {
                    // Up to the closing quote, or to a `;` (not taken).
                    let mut i = start + 1;
                    loop {
                        match self.at(i) {
                            None | Some(b';') => break,
                            Some(b'"') if self.at(i + 1) == Some(b'"') => i += 2,
                            Some(b'"') => {
                                let t = Token::Quoted(&self.text[start + 1..i]);
                                return Some(self.lexed(t, start, i + 1));
                            }
                            Some(_) => i += 1,
                        }
                    }
                    let t = Token::Quoted(&self.text[start + 1..i]);
                    return Some(self.lexed(t, start, i));
                }
                (c, _) if ident_start(c) => {
                    let end = self.run_while(start + 1, ident_cont);
                    let t = Token::Word(&self.text[start..end]);
                    return Some(self.lexed(t, start, end));
                }
                (c, _) if c.is_ascii_digit() => {
                    let end = self.run_while(start + 1, |b| {
                        b.is_ascii_alphanumeric() || b == b'_' || b == b'.'
                    });
                    return Some(self.lexed(Token::Number, start, end));
                }
                (c, _) => return Some(self.lexed(Token::Punct(c), start, start + 1)),
            }
        }
    }
}

impl<'a> Iterator for Lexer<'a> {
    type Item = Lexed<'a>;

    fn next(&mut self) -> Option<Lexed<'a>> {
        self.next_token()
    }
}

/// A quoted token's text with its doubled quotes (`''`, `""`) made single.
pub(crate) fn undouble(text: &[u8], quote: u8) -> Vec<u8> {
    let mut out = Vec::with_capacity(text.len());
    let mut doubled = false;
    for &b in text {
        if b == quote && !std::mem::take(&mut doubled) {
            doubled = true;
            continue;
        }
        out.push(b);
    }
    out
}

/// Whether `hay` contains `needle` (lower-case ASCII), ignoring ASCII case; the bytes
/// compared are added to `steps` (at most `needle.len()` per byte of `hay`).
pub(crate) fn contains_ci(hay: &[u8], needle: &[u8], steps: &mut u64) -> bool {
    let Some(last) = hay.len().checked_sub(needle.len()) else {
        return false;
    };
    (0..=last).any(|i| {
        let mut n = 0;
        while n < needle.len() {
            *steps += 1;
            if !hay[i + n].eq_ignore_ascii_case(&needle[n]) {
                return false;
            }
            n += 1;
        }
        true
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tokens(sql: &str) -> Vec<Token<'_>> {
        Lexer::new(sql.as_bytes()).map(|l| l.token).collect()
    }

    #[test]
    fn strings_identifiers_and_comments_are_read_as_postgres_reads_them() {
        use Token::*;
        assert_eq!(
            tokens("SELECT 'a;''b', E'x', \"q;\"\"\" -- c; d\n/* a /* b; */ c */ $1;"),
            vec![
                Word(b"SELECT"),
                Str {
                    body: b"a;''b",
                    plain: true
                },
                Punct(b','),
                Str {
                    body: b"x",
                    plain: false
                },
                Punct(b','),
                Quoted(b"q;\"\""),
                Param,
                Punct(b';'),
            ]
        );
        assert_eq!(
            tokens("$a$ ; $b$ $ $a$x$$1"),
            vec![
                Str {
                    body: b" ; $b$ $ ",
                    plain: false
                },
                Word(b"x$$1"),
            ]
        );
        assert_eq!(
            tokens("1$$;$$ u&'x' a$b$"),
            vec![
                Number,
                Str {
                    body: b";",
                    plain: false
                },
                Str {
                    body: b"x",
                    plain: false
                },
                Word(b"a$b$"),
            ]
        );
    }

    #[test]
    fn a_backslash_in_a_string_makes_the_rest_raw() {
        let mut lexer = Lexer::new(b"SELECT 'a\\'; LISTEN x; /* ; */ y -- z");
        let all: Vec<_> = lexer.by_ref().map(|l| (l.token, l.comment)).collect();
        assert!(lexer.is_raw());
        use Token::*;
        assert_eq!(
            all,
            vec![
                (Word(b"SELECT"), false),
                (
                    Str {
                        body: b"a",
                        plain: false
                    },
                    false
                ),
                (Punct(b'\''), false),
                (Punct(b';'), false),
                (Word(b"LISTEN"), false),
                (Word(b"x"), false),
                (Punct(b';'), false),
                (Punct(b';'), false),
                (Punct(b'*'), false),
                (Punct(b'/'), false),
                (Word(b"y"), false),
                (Word(b"z"), true),
            ]
        );
    }
}
