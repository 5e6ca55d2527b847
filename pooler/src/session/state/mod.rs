//! Session state a client may leave on its server, judged from a light look at the
//! statements it sends (design.md point 8). No SQL parser: a lexer (lex.rs) and, in one
//! pass over its tokens (classify.rs), the first words of each statement and the
//! advisory-lock and `set_config` calls anywhere in it.
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

mod calls;
mod classify;
mod first;
pub(crate) mod lex;
mod plain;
mod sql;
mod window;
pub use sql::{ALL_STATE, kind, read_back_sql, reset_read_sql, state_left_sql, state_parts_sql};
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
    /// `LOAD`: the server can never be made clean again; close it once its client is
    /// done with it.
    pub discard: bool,
    /// Created, changed or dropped a function or procedure: what the app's functions
    /// may leave on a session is looked at again (session/routines.rs).
    pub routines: bool,
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
        self.discard |= other.discard;
        self.routines |= other.routines;
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
    /// A library load: the check cannot see it and DISCARD ALL does not undo it, so
    /// pin for good, and close the server when its client is done with it.
    const LOAD: Effect = Effect {
        pin: true,
        discard: true,
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
    /// Made, changed or dropped a function: look at the app's functions again.
    const ROUTINES: Effect = Effect {
        routines: true,
        ..Effect::NONE
    };
    const NONE: Effect = Effect {
        pin: false,
        probe: false,
        check: false,
        read_back: false,
        reset_all: false,
        discard: false,
        routines: false,
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
/// The longest custom name remembered (two identifiers of PostgreSQL's 63 bytes and a
/// dot, with room to spare); a longer one makes every check report state, so a client
/// cannot make the pooler keep megabytes of names.
const MAX_CUSTOM_NAME: usize = 160;

impl Customs {
    /// Notes a custom parameter something other than the client's statements may set
    /// (the app's functions: session/routines.rs); an empty name is one it cannot read.
    pub fn noted(&mut self, name: &str) {
        self.note(name.as_bytes());
    }

    /// The names noted, and an empty one if a name could not be read: what
    /// [`Customs::noted`] takes back.
    pub fn to_names(&self) -> Vec<String> {
        let mut names = self.names.clone();
        if self.unknown {
            names.push(String::new());
        }
        names
    }

    fn note(&mut self, name: &[u8]) {
        let valid = !name.is_empty()
            && name.len() <= MAX_CUSTOM_NAME
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
/// One pass of the lexer (lex.rs): linear in the text's length, whatever it holds.
pub fn classify(sql: &[u8], customs: &mut Customs) -> Effect {
    classify::classify_counted(sql, classify::Text::Whole, customs).0
}

/// The effect of a piece cut from the middle of a statement text (a window of one too
/// long to hold whole): read without trusting any quote, since the piece may start
/// inside one, and with every `SET app.x` noted, since it may lie in a `DO` body.
/// Linear like [`classify`].
pub fn classify_fragment(sql: &[u8], customs: &mut Customs) -> Effect {
    classify::classify_counted(sql, classify::Text::Fragment, customs).0
}

/// The bytes [`classify`] and [`classify_fragment`] examine for `sql` (for the fuzz
/// target's linearity check).
pub fn classify_steps(sql: &[u8], customs: &mut Customs) -> u64 {
    let mut fragment = customs.clone();
    classify::classify_counted(sql, classify::Text::Whole, customs).1
        + classify::classify_counted(sql, classify::Text::Fragment, &mut fragment).1
}

/// What a classifying pass learns (classify.rs, calls.rs), and the work it did beyond
/// the lexer's.
struct Out<'c> {
    effect: Effect,
    customs: &'c mut Customs,
    steps: u64,
}

/// A keyword, as SQL compares them.
fn is(word: &[u8], keyword: &[u8]) -> bool {
    word.eq_ignore_ascii_case(keyword)
}

fn read_back(name: &[u8]) -> Effect {
    let unreported = READ_BACK
        .iter()
        .any(|n| n.as_bytes().eq_ignore_ascii_case(name));
    Effect {
        read_back: unreported,
        ..Effect::default()
    }
}

fn is_tracked(name: &[u8]) -> bool {
    TRACKED
        .iter()
        .any(|t| t.as_bytes().eq_ignore_ascii_case(name))
}

#[cfg(test)]
mod tests;
