//! What the pooler asks Postgres about a session: is anything left that pins, and
//! what are the tracked parameters now (and after a reset).

use postgres_protocol::escape::escape_literal;

use super::{Customs, READ_BACK, TRACKED};

/// The kinds of session state the check can look for, as bits of a mask: the full
/// check looks for all ([`ALL_STATE`]); the look after a transaction of an app whose
/// functions may leave state asks only for what they may leave (routines.rs).
pub mod kind {
    pub const SETTINGS: u16 = 1 << 0;
    pub const CUSTOM: u16 = 1 << 1;
    pub const LISTEN: u16 = 1 << 2;
    pub const ADVISORY: u16 = 1 << 3;
    pub const PREPARED: u16 = 1 << 4;
    pub const CURSORS: u16 = 1 << 5;
    pub const TEMPORARY: u16 = 1 << 6;
    pub const ROLE: u16 = 1 << 7;
}

/// Every kind of state the check knows.
pub const ALL_STATE: u16 = (1 << 8) - 1;

/// The pieces of session state the check counts, with the bit of each and what it is
/// called when PAUSE reports a client it cannot move (`{custom}` and `{role}` are
/// filled in).
///
/// What it sees: untracked settings changed in the session (`pg_settings`, which lists
/// every built-in parameter; the costly part, about 0.8 ms of server time), custom
/// parameters by name ([`Customs`]), LISTEN channels, advisory locks (session ones:
/// transaction ones are gone at idle), SQL prepared statements, holdable cursors,
/// anything in the session's temporary schema (tables, views, sequences, functions,
/// types, operators: every object there depends on the schema in `pg_depend`, whose
/// index makes this one lookup rather than scans of `pg_class`, `pg_proc` and
/// `pg_type`), and a changed role or session authorization.
const PARTS: &[(u16, &str, &str)] = &[
    (
        kind::SETTINGS,
        "changed settings",
        "(SELECT count(*) FROM pg_catalog.pg_settings \
         WHERE source = 'session' AND lower(name) NOT IN ({tracked}{carried}))",
    ),
    (kind::CUSTOM, "custom settings", "{custom}"),
    (
        kind::LISTEN,
        "LISTEN channels",
        "(SELECT count(*) FROM pg_catalog.pg_listening_channels())",
    ),
    (
        kind::ADVISORY,
        "session advisory locks",
        "(SELECT count(*) FROM pg_catalog.pg_locks \
         WHERE locktype = 'advisory' AND pid = pg_catalog.pg_backend_pid())",
    ),
    (
        kind::PREPARED,
        "SQL prepared statements",
        "(SELECT count(*) FROM pg_catalog.pg_prepared_statements WHERE from_sql)",
    ),
    (
        kind::CURSORS,
        "holdable cursors",
        "(SELECT count(*) FROM pg_catalog.pg_cursors WHERE is_holdable)",
    ),
    (
        kind::TEMPORARY,
        "temporary objects",
        "(SELECT count(*) FROM pg_catalog.pg_depend \
         WHERE refclassid = 'pg_catalog.pg_namespace'::pg_catalog.regclass \
         AND refobjid = pg_catalog.pg_my_temp_schema())",
    ),
    (
        kind::ROLE,
        "a changed role",
        "(current_user <> session_user OR session_user <> {role})::int",
    ),
];

/// Each part's SQL with its placeholders filled in. `carried`: the other parameters
/// the pooler sets for this client on every server (its startup settings), lower case:
/// not state, whatever their source.
fn parts(
    role_literal: &str,
    customs: &Customs,
    carried: &[String],
    kinds: u16,
) -> impl Iterator<Item = (&'static str, String)> {
    let tracked = TRACKED
        .iter()
        .map(|t| format!("'{t}'"))
        .collect::<Vec<_>>()
        .join(",");
    let carried_list: String = carried
        .iter()
        .map(|n| format!(",{}", escape_literal(n)))
        .collect();
    let own: Vec<&String> = customs
        .names
        .iter()
        .filter(|n| !carried.contains(n))
        .collect();
    let custom = if customs.unknown {
        "1".to_owned()
    } else if own.is_empty() {
        "0".to_owned()
    } else {
        let names = own
            .iter()
            .map(|n| escape_literal(n))
            .collect::<Vec<_>>()
            .join(",");
        format!(
            "(SELECT count(*) FROM pg_catalog.unnest(ARRAY[{names}]::text[]) AS c(name) \
             WHERE coalesce(pg_catalog.current_setting(c.name, true), '') <> '')"
        )
    };
    let role = role_literal.to_owned();
    PARTS
        .iter()
        .filter(move |(bit, _, _)| kinds & bit != 0)
        .map(move |(_, label, sql)| {
            let sql = sql
                .replace("{tracked}", &tracked)
                .replace("{carried}", &carried_list)
                .replace("{custom}", &custom)
                .replace("{role}", &role);
            (*label, sql)
        })
}

/// The query that tells whether a pinned client's server is clean again: one row, one
/// column, the number of pieces of session state left (0 = clean). `role` is the login
/// role, as a quoted literal; `kinds` what to look for ([`ALL_STATE`], or a part).
pub fn state_left_sql(
    role_literal: &str,
    customs: &Customs,
    carried: &[String],
    kinds: u16,
) -> String {
    let sum = parts(role_literal, customs, carried, kinds)
        .map(|(_, sql)| sql)
        .collect::<Vec<_>>()
        .join(" + ");
    if sum.is_empty() {
        return "SELECT 0".to_owned();
    }
    format!("SELECT {sum}")
}

/// The same look, one column per kind of state, for saying what is left; the labels
/// in column order come with it.
pub fn state_parts_sql(
    role_literal: &str,
    customs: &Customs,
    carried: &[String],
) -> (String, Vec<&'static str>) {
    let (labels, columns): (Vec<_>, Vec<_>) =
        parts(role_literal, customs, carried, ALL_STATE).unzip();
    (format!("SELECT {}", columns.join(", ")), labels)
}

/// The SQL that reads back the tracked parameters Postgres does not report, in
/// [`READ_BACK`] order, then the client's `carried` ones (NULL if unknown).
pub fn read_back_sql(carried: &[String]) -> String {
    let columns = READ_BACK
        .iter()
        .map(|n| format!("pg_catalog.current_setting('{n}')"))
        .chain(
            carried
                .iter()
                .map(|n| format!("pg_catalog.current_setting({}, true)", escape_literal(n))),
        )
        .collect::<Vec<_>>()
        .join(", ");
    format!("SELECT {columns}")
}

/// The SQL that reads every parameter in `names` after a `RESET ALL` or `DISCARD ALL`
/// that may have failed or been rolled back: two rows, one column per name (NULL if the
/// server has no such parameter): the values now, and the values a reset gives. The
/// reset happens in a transaction that is rolled back, so the session is unchanged.
/// (`pg_settings.source` would tell the same, but builds every setting's row: about
/// 0.8 ms of server time against 0.1, and drivers such as asyncpg send `RESET ALL`
/// each time a connection goes back to their pool.)
pub fn reset_read_sql<'a>(names: impl Iterator<Item = &'a str>) -> String {
    let columns = names
        .map(|n| format!("pg_catalog.current_setting({}, true)", escape_literal(n)))
        .collect::<Vec<_>>()
        .join(", ");
    format!("BEGIN; SELECT {columns}; RESET ALL; SELECT {columns}; ROLLBACK")
}
