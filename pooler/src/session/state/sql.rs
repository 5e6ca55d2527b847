//! What the pooler asks Postgres about a session: is anything left that pins, and
//! what are the tracked parameters now (and after a reset).

use postgres_protocol::escape::escape_literal;

use super::{Customs, READ_BACK, TRACKED};

/// The query that tells whether a pinned client's server is clean again: one row, one
/// column, the number of pieces of session state left (0 = clean). `role` is the login role,
/// as a quoted literal.
///
/// What it sees: untracked settings changed in the session (`pg_settings`, which lists
/// every built-in parameter), custom parameters by name ([`Customs`]), LISTEN channels,
/// advisory locks (session ones: transaction ones are gone at idle), SQL prepared
/// statements, holdable cursors, anything in the session's temporary schema (tables,
/// views, sequences, functions, types), and a changed role or session authorization.
pub fn state_left_sql(role_literal: &str, customs: &Customs) -> String {
    let tracked = TRACKED
        .iter()
        .map(|t| format!("'{t}'"))
        .collect::<Vec<_>>()
        .join(",");
    let custom = if customs.unknown {
        " + 1".to_owned()
    } else if customs.names.is_empty() {
        String::new()
    } else {
        let names = customs
            .names
            .iter()
            .map(|n| escape_literal(n))
            .collect::<Vec<_>>()
            .join(",");
        format!(
            " + (SELECT count(*) FROM pg_catalog.unnest(ARRAY[{names}]::text[]) AS c(name) \
             WHERE coalesce(pg_catalog.current_setting(c.name, true), '') <> '')"
        )
    };
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
         + (SELECT count(*) FROM pg_catalog.pg_proc \
             WHERE pronamespace = pg_catalog.pg_my_temp_schema()) \
         + (SELECT count(*) FROM pg_catalog.pg_type \
             WHERE typnamespace = pg_catalog.pg_my_temp_schema()) \
         + (current_user <> session_user OR session_user <> {role_literal})::int{custom}"
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
