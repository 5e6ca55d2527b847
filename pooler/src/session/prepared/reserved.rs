//! The pooler's own statement names, `dp_` and 32 hex digits, are out of SQL's reach.
//!
//! A client could name them in SQL (`DEALLOCATE dp_…`, `EXECUTE dp_…`, `PREPARE dp_…`)
//! and so drop, run or shadow a statement the pooler's books say a server holds for
//! every client of the app. Such a name is moved to the client's own space instead:
//! `dp_<hex>` becomes `dp_<hex>$client` on its way to the server, and the suffix is
//! taken out of the server's errors. So a client that never prepared that name gets
//! exactly what Postgres would tell it (26000 `prepared statement "dp_…" does not
//! exist`, its transaction failed as Postgres fails it), and one that `PREPARE`s it
//! itself can use it like any SQL prepared statement; the pooler's statement is never
//! touched, and the books never disagree with the server.
//!
//! The look is one forward pass that skips comments, string literals, quoted and
//! dollar-quoted text: only a name in the statement's own SQL is moved.

/// What a reserved name gets on its way to the server. `$` may follow the first
/// character of an unquoted name, and 35 + 7 bytes stays under NAMEDATALEN.
pub const CLIENT_SUFFIX: &[u8] = b"$client";

const PREFIX: &[u8] = b"dp_";
const HEX_DIGITS: usize = 32;

/// `name` (as Postgres reads it: unquoted names folded to lower case) is one the pooler
/// may give a statement.
pub fn is_reserved(name: &[u8]) -> bool {
    name.len() == PREFIX.len() + HEX_DIGITS
        && name.starts_with(PREFIX)
        && name[PREFIX.len()..]
            .iter()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(b))
}

/// The text with [`CLIENT_SUFFIX`] after every reserved name that follows `EXECUTE`,
/// `DEALLOCATE [PREPARE]` or `PREPARE`, or `None` if there is none.
pub fn rewrite(text: &[u8]) -> Option<Vec<u8>> {
    // Every Query and Parse comes through here: most texts have no `dp_` at all, and
    // finding that is one quick pass over the underscores.
    if !has_prefix(text) {
        return None;
    }
    let mut at = Vec::new();
    let mut lexer = Lexer { text, pos: 0 };
    // The keyword before the current token, if it introduces a statement name.
    let mut introduced = false;
    while let Some(token) = lexer.next() {
        match token {
            Token::Word(word) => {
                if introduced {
                    let folded = word.to_ascii_lowercase();
                    if is_reserved(&folded) {
                        at.push(lexer.pos);
                    }
                }
                // `DEALLOCATE PREPARE name`: PREPARE introduces the name too.
                introduced = word.eq_ignore_ascii_case(b"PREPARE")
                    || word.eq_ignore_ascii_case(b"EXECUTE")
                    || word.eq_ignore_ascii_case(b"DEALLOCATE");
            }
            Token::Quoted { name, end } => {
                if introduced && is_reserved(&name) {
                    // Before the closing quote.
                    at.push(end - 1);
                }
                introduced = false;
            }
            Token::Other => introduced = false,
        }
    }
    if at.is_empty() {
        return None;
    }
    let mut out = Vec::with_capacity(text.len() + at.len() * CLIENT_SUFFIX.len());
    let mut from = 0;
    for pos in at {
        out.extend_from_slice(&text[from..pos]);
        out.extend_from_slice(CLIENT_SUFFIX);
        from = pos;
    }
    out.extend_from_slice(&text[from..]);
    Some(out)
}

/// Whether the text of a message too long to hold whole (it streams past its head, so
/// nothing in it can be moved) may name a statement of the pooler's: `dp_` anywhere in
/// it, fed piece by piece. The server it reaches is then closed once its client is done
/// with it, so the books die with it rather than disagree with it.
#[derive(Debug, Default)]
pub struct Streamed {
    /// The last two bytes of the previous piece: `dp_` may straddle two.
    carry: [u8; 2],
    seen: bool,
}

impl Streamed {
    /// Feeds the next piece; `true` once `dp_` has been seen.
    pub fn feed(&mut self, piece: &[u8]) -> bool {
        if !self.seen {
            let mut joined = [0u8; 4];
            joined[..2].copy_from_slice(&self.carry);
            let head = piece.len().min(2);
            joined[2..2 + head].copy_from_slice(&piece[..head]);
            self.seen = has_prefix(&joined[..2 + head]) || has_prefix(piece);
            if let Some(tail) = piece.len().checked_sub(2) {
                self.carry.copy_from_slice(&piece[tail..]);
            } else if let Some(&last) = piece.last() {
                self.carry = [self.carry[1], last];
            }
        }
        self.seen
    }
}

/// Whether `dp_` (any case) occurs in `text`.
fn has_prefix(text: &[u8]) -> bool {
    memchr::memchr_iter(b'_', text)
        .any(|at| at >= 2 && text[at - 2..at].eq_ignore_ascii_case(&PREFIX[..2]))
}

enum Token<'a> {
    Word(&'a [u8]),
    /// A quoted identifier, unescaped, and the position just past its closing quote.
    Quoted {
        name: Vec<u8>,
        end: usize,
    },
    /// Anything else: punctuation, a literal, a number, a parameter.
    Other,
}

struct Lexer<'a> {
    text: &'a [u8],
    pos: usize,
}

fn is_word_start(b: u8) -> bool {
    b.is_ascii_alphabetic() || b == b'_' || b >= 0x80
}

fn is_word_byte(b: u8) -> bool {
    is_word_start(b) || b.is_ascii_digit() || b == b'$'
}

impl<'a> Lexer<'a> {
    fn peek(&self, ahead: usize) -> Option<u8> {
        self.text.get(self.pos + ahead).copied()
    }

    /// Skips blanks and comments (`--` to the line's end, `/* */` nested).
    fn skip_blank(&mut self) {
        loop {
            match (self.peek(0), self.peek(1)) {
                (Some(b), _) if b.is_ascii_whitespace() => self.pos += 1,
                (Some(b'-'), Some(b'-')) => {
                    while self.peek(0).is_some_and(|b| b != b'\n') {
                        self.pos += 1;
                    }
                }
                (Some(b'/'), Some(b'*')) => {
                    self.pos += 2;
                    let mut depth = 1usize;
                    while depth > 0 {
                        match (self.peek(0), self.peek(1)) {
                            (None, _) => return,
                            (Some(b'*'), Some(b'/')) => {
                                depth -= 1;
                                self.pos += 2;
                            }
                            (Some(b'/'), Some(b'*')) => {
                                depth += 1;
                                self.pos += 2;
                            }
                            _ => self.pos += 1,
                        }
                    }
                }
                _ => return,
            }
        }
    }

    /// Past a `quote`-delimited run whose opening quote is at `pos`; a doubled quote
    /// is one character, and with `backslashes` (E'…') a backslash escapes the next.
    fn skip_quoted(&mut self, quote: u8, backslashes: bool) -> Vec<u8> {
        let mut inner = Vec::new();
        self.pos += 1;
        while let Some(b) = self.peek(0) {
            self.pos += 1;
            if backslashes && b == b'\\' {
                if let Some(next) = self.peek(0) {
                    inner.push(next);
                    self.pos += 1;
                }
            } else if b == quote {
                if self.peek(0) == Some(quote) {
                    inner.push(quote);
                    self.pos += 1;
                } else {
                    break;
                }
            } else {
                inner.push(b);
            }
        }
        inner
    }

    /// Past `$tag$ … $tag$` whose opening `$` is at `pos`, if it is one.
    fn skip_dollar_quoted(&mut self) -> bool {
        let rest = &self.text[self.pos + 1..];
        let tag_len = rest
            .iter()
            .position(|b| !is_word_byte(*b) || *b == b'$')
            .unwrap_or(rest.len());
        let tag_ok = rest.get(tag_len) == Some(&b'$')
            && rest.first().is_none_or(|b| *b == b'$' || is_word_start(*b));
        if !tag_ok {
            return false;
        }
        let delimiter = &self.text[self.pos..self.pos + tag_len + 2];
        let body = self.pos + delimiter.len();
        self.pos = match self.text[body..]
            .windows(delimiter.len())
            .position(|w| w == delimiter)
        {
            Some(p) => body + p + delimiter.len(),
            None => self.text.len(),
        };
        true
    }

    fn next(&mut self) -> Option<Token<'a>> {
        self.skip_blank();
        let b = self.peek(0)?;
        let start = self.pos;
        if (b == b'E' || b == b'e') && self.peek(1) == Some(b'\'') {
            self.pos += 1;
            self.skip_quoted(b'\'', true);
            return Some(Token::Other);
        }
        if is_word_start(b) {
            while self.peek(0).is_some_and(is_word_byte) {
                self.pos += 1;
            }
            return Some(Token::Word(&self.text[start..self.pos]));
        }
        match b {
            b'\'' => {
                self.skip_quoted(b'\'', false);
                Some(Token::Other)
            }
            b'"' => {
                let name = self.skip_quoted(b'"', false);
                Some(Token::Quoted {
                    name,
                    end: self.pos,
                })
            }
            b'$' if self.skip_dollar_quoted() => Some(Token::Other),
            _ => {
                self.pos += 1;
                Some(Token::Other)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NAME: &str = "dp_0123456789abcdef0123456789abcdef";

    fn moved(text: &str) -> Option<String> {
        rewrite(text.as_bytes()).map(|t| String::from_utf8(t).unwrap())
    }

    #[test]
    fn reserved_names_are_exactly_the_poolers() {
        assert!(is_reserved(NAME.as_bytes()));
        assert!(!is_reserved(b"dp_refused"));
        assert!(!is_reserved(b"dp_0123456789abcdef0123456789abcdeg"));
        assert!(!is_reserved(b"dp_0123456789abcdef0123456789abcdef0"));
        assert!(!is_reserved(b"DP_0123456789abcdef0123456789abcdef"));
        assert!(!is_reserved(b"s1"));
    }

    #[test]
    fn statement_names_after_the_keywords_are_moved() {
        assert_eq!(
            moved(&format!("DEALLOCATE {NAME}")),
            Some(format!("DEALLOCATE {NAME}$client"))
        );
        assert_eq!(
            moved(&format!("deallocate prepare {}", NAME.to_uppercase())),
            Some(format!("deallocate prepare {}$client", NAME.to_uppercase()))
        );
        assert_eq!(
            moved(&format!("EXECUTE \"{NAME}\"(1, 2)")),
            Some(format!("EXECUTE \"{NAME}$client\"(1, 2)"))
        );
        assert_eq!(
            moved(&format!(
                "BEGIN; PREPARE {NAME} AS SELECT 1; EXPLAIN EXECUTE /* c */ {NAME}; COMMIT"
            )),
            Some(format!(
                "BEGIN; PREPARE {NAME}$client AS SELECT 1; EXPLAIN EXECUTE /* c */ {NAME}$client; COMMIT"
            ))
        );
    }

    #[test]
    fn other_mentions_are_left_alone() {
        // A quoted upper-case name is another name; literals, comments, dollar quotes
        // and columns are not statement names.
        for text in [
            format!("EXECUTE \"{}\"", NAME.to_uppercase()),
            format!("SELECT '{NAME}', E'\\' DEALLOCATE {NAME}'"),
            format!("SELECT 1 -- DEALLOCATE {NAME}"),
            format!("SELECT /* EXECUTE {NAME} */ 1"),
            format!("DO $x$ BEGIN EXECUTE {NAME}; END $x$"),
            format!("SELECT {NAME} FROM t"),
            format!("DEALLOCATE {NAME}0"),
            "PREPARE TRANSACTION 'dp_x'".to_owned(),
            "SELECT $1".to_owned(),
        ] {
            assert_eq!(moved(&text), None, "{text}");
        }
    }

    #[test]
    fn a_streamed_text_is_watched_across_pieces() {
        let mut s = Streamed::default();
        assert!(!s.feed(b"SELECT 1; DEALLOCATE d"));
        assert!(s.feed(b"p_0123"));
        let mut s = Streamed::default();
        assert!(!s.feed(b"x d"));
        assert!(!s.feed(b"p"));
        assert!(s.feed(b"_"));
        let mut s = Streamed::default();
        assert!(!s.feed(b"SELECT 1 -- nothing"));
    }

    #[test]
    fn the_scan_is_linear_in_the_worst_case() {
        // A megabyte of what makes the lexer work hardest.
        for unit in [
            format!("EXECUTE {NAME};"),
            "/*/*".to_owned(),
            "dp_'".to_owned(),
            "$a$dp_".to_owned(),
        ] {
            let text = unit.repeat((1 << 20) / unit.len());
            let started = std::time::Instant::now();
            let _ = rewrite(text.as_bytes());
            // A hang guard, not a timing assertion: quadratic work would take hours.
            assert!(started.elapsed() < std::time::Duration::from_secs(60));
        }
    }
}
