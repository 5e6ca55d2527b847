// Test-only: declared under #[cfg(test)] in state/mod.rs.
use super::*;

fn classify(sql: &[u8]) -> Effect {
    super::classify(sql, &mut Customs::default())
}

fn pins(sql: &str) -> bool {
    classify(sql.as_bytes()).pin
}

/// Pins, or (a `LISTEN`) moves the client's channels: either way the statement was seen.
fn seen(sql: &str) -> bool {
    let e = classify(sql.as_bytes());
    e.pin || e.listen
}

#[test]
fn state_that_cannot_follow_a_client_pins() {
    for sql in [
        "SET work_mem = '64MB'",
        "set session work_mem to 1",
        "SET ROLE other",
        "SET SESSION AUTHORIZATION other",
        "SET SESSION CHARACTERISTICS AS TRANSACTION READ ONLY",
        "CREATE TEMP TABLE t (a int)",
        "create local temporary table t (a int)",
        "CREATE TEMPORARY VIEW v AS SELECT 1",
        "PREPARE p AS SELECT 1",
        "SELECT 1; SET enable_seqscan = off",
        "/* hi */ -- there\n SET my.var = 1",
        "DECLARE c CURSOR WITH HOLD FOR SELECT 1",
        "SELECT * INTO TEMP t FROM x",
        "CREATE FUNCTION pg_temp.f() RETURNS int AS 'SELECT 1' LANGUAGE sql",
    ] {
        let e = classify(sql.as_bytes());
        // A pin is checked too: the statement may fail or be rolled back.
        assert!(e.pin && e.check, "{sql}");
    }
}

#[test]
fn state_that_may_or_may_not_be_left_is_probed_without_a_pin() {
    for sql in [
        "SELECT pg_advisory_lock(42)",
        "select PG_TRY_ADVISORY_LOCK_SHARED(1, 2)",
        "SELECT set_config('my.var', 'x', false)",
        "SELECT set_config('work_mem', '1MB', false)",
        "SELECT pg_catalog.set_config($1, $2, $3)",
    ] {
        let e = classify(sql.as_bytes());
        assert!(e.probe && !e.pin, "{sql}");
    }
}

/// What a statement's words hide from a look at them is looked for once idle: the
/// statement EXPLAIN ANALYZE runs, a name spelled with Unicode escapes, SQL run from a
/// string. Each was state left on a server that the look did not see (a review found
/// them on PostgreSQL 15).
#[test]
fn what_the_words_hide_is_looked_for_once_idle() {
    let e = classify(b"EXPLAIN ANALYZE CREATE TEMP TABLE t AS SELECT 1");
    assert!(e.probe && e.read_back, "{e:?}");
    for sql in [
        r#"SELECT U&"pg!005fadvisory!005flock" UESCAPE '!'(7)"#,
        r#"SELECT u&"set\005fconfig"('app.x', '1', false)"#,
        "SELECT query_to_xml('select set_config(''app.x'', ''1'', false)', true, true, '')",
        "SELECT * FROM pg_catalog.ts_stat('select v from t')",
    ] {
        let mut customs = Customs::default();
        let e = super::classify(sql.as_bytes(), &mut customs);
        // The custom parameters it may set are unknown: every check reports state.
        assert!(e.probe && e.read_back && customs.unknown, "{sql}: {e:?}");
    }
    // A name that merely contains one of those functions' is nothing.
    for sql in [
        "SELECT posts_status, query_to_xml_cache FROM t",
        r#"SELECT "U&" FROM t"#,
    ] {
        assert!(classify(sql.as_bytes()).is_none(), "{sql}");
    }
}

#[test]
fn code_the_pooler_cannot_read_is_probed_and_read_back() {
    for sql in [
        "DO $$ BEGIN EXECUTE 'LISTEN x'; END $$",
        "do $$begin perform 1; end$$",
        "CALL app_proc(1)",
    ] {
        let e = classify(sql.as_bytes());
        assert!(e.probe && e.read_back && !e.pin, "{sql}");
    }
    let mut customs = Customs::default();
    super::classify(
        b"DO $$ BEGIN SET app.tenant = 'a'; SET LOCAL app.local = 1; \
          UPDATE t SET x = 1; SET SESSION app.Other TO 2; END $$",
        &mut customs,
    );
    assert_eq!(customs.names, vec!["app.tenant", "app.other"]);
    assert!(!customs.unknown);
}

#[test]
fn set_config_of_a_tracked_parameter_is_read_back() {
    for sql in [
        "SELECT set_config('statement_timeout', '1ms', false)",
        "select pg_catalog.SET_CONFIG ( 'search_path' , 'a, b', 'false')",
        "SELECT set_config('lock_timeout'::text, f(1, 2), false)",
        "SELECT set_config($1, $2, false)",
    ] {
        assert!(classify(sql.as_bytes()).read_back, "{sql}");
    }
    let local = classify(b"SELECT set_config('search_path', 'x', true)");
    assert!(local.is_none(), "transaction-local: {local:?}");
    let reported = classify(b"SELECT set_config('TimeZone', 'UTC', false)");
    assert!(reported.is_none(), "reported by Postgres: {reported:?}");
}

#[test]
fn custom_parameters_are_remembered_by_name() {
    let mut customs = Customs::default();
    for sql in [
        "SET app.tenant = 'x'",
        "SET SESSION \"App\".\"User\" TO 1",
        "SELECT set_config('app.role', 'r', false), set_config('app.local', 'l', true)",
        "SET LOCAL app.txn = 1",
        "SET work_mem = '1MB'",
        "SET app.tenant = 'y'",
    ] {
        super::classify(sql.as_bytes(), &mut customs);
    }
    assert_eq!(customs.names, ["app.tenant", "app.user", "app.role"]);
    assert!(!customs.unknown);
    super::classify(b"SELECT set_config(name, 'v', false) FROM t", &mut customs);
    assert!(customs.unknown, "a name the pooler cannot read");
    let sql = state_left_sql("'r'", &customs, &[], super::ALL_STATE);
    assert!(sql.contains(" + 1 + "), "{sql}");
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
    // One parameter goes back to the client's startup value, as read after RESET ALL.
    assert!(classify(b"RESET work_mem").reset_all);
    assert!(classify(b"DISCARD ALL").reset_all);
}

#[test]
fn listen_and_unlisten_do_not_pin_but_move_channels() {
    for sql in ["LISTEN x", "  listen \"Chan\"", "SELECT 1; LISTEN y"] {
        let e = classify(sql.as_bytes());
        assert!(e.listen && !e.unlisten && !e.pin && !e.check, "{sql}");
    }
    for sql in ["UNLISTEN *", "unlisten x", "DISCARD ALL"] {
        let e = classify(sql.as_bytes());
        assert!(e.listen && e.unlisten && !e.pin, "{sql}");
    }
    for sql in [
        "SELECT 'LISTEN x'",
        "NOTIFY x",
        "SELECT pg_notify('x', 'y')",
        "DISCARD TEMP",
        "RESET ALL",
    ] {
        assert!(!classify(sql.as_bytes()).listen, "{sql}");
    }
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

#[test]
fn quotes_comments_and_dollar_quotes_hide_nothing_and_invent_nothing() {
    for sql in [
        "SELECT 'a; LISTEN x'",
        "SELECT $$; LISTEN x; $$",
        "SELECT $t$ $$; LISTEN x; $$ $t$",
        "SELECT 1 /* ; LISTEN x; /* nested */ ; LISTEN y */",
        "SELECT \"a; LISTEN x\" FROM t",
        "SELECT 'set_config(''app.x'', ''1'', false)', 'pg_advisory_lock(1)'",
    ] {
        let e = classify(sql.as_bytes());
        assert!(e.is_none(), "{sql}: {e:?}");
    }
    for sql in [
        // After a backslash in a string the pooler cannot know where the string ends
        // (standard_conforming_strings, SJIS): every `;` may start a statement.
        "SELECT 'a\\'; LISTEN x; --'",
        "SELECT E'\\''; LISTEN x",
        "SELECT E'\\' /* '; LISTEN x; -- */",
        "SELECT 1 -- x\n; LISTEN x",
        "SELECT * INTO TEMPORARY TABLE t FROM x",
        "SELECT * INTO pg_temp.t FROM x",
    ] {
        assert!(seen(sql), "{sql}");
    }
}

#[test]
fn set_config_arguments_are_read_by_the_servers_rules() {
    // A dollar-quoted value that looks like `, true)`: the call is session-level.
    let mut customs = Customs::default();
    let e = super::classify(
        b"SELECT set_config('app.x', $$ , true) $$, false)",
        &mut customs,
    );
    assert!(e.probe, "{e:?}");
    assert_eq!(customs.names, ["app.x"]);
    // A backslash in the value: where the value ends is unsure, so `true` is not
    // trusted, but the name (read before it) is.
    let mut customs = Customs::default();
    let e = super::classify(
        b"SELECT set_config('app.y', E'\\', true) --', true)",
        &mut customs,
    );
    assert!(e.probe, "{e:?}");
    assert_eq!(customs.names, ["app.y"]);
    assert!(!customs.unknown);
    // Calls inside calls, each read for itself.
    let mut customs = Customs::default();
    let e = super::classify(
        b"SELECT set_config('app.a', set_config('app.b', 'v', true) || f(1, 2), false)",
        &mut customs,
    );
    assert!(e.probe && !customs.unknown, "{e:?}");
    assert_eq!(customs.names, ["app.a"]);
    // After a backslash, a call whose name reads plainly is still noted by name.
    let mut customs = Customs::default();
    super::classify(
        b"SELECT E'\\n'; SELECT set_config('app.z', 'v', true)",
        &mut customs,
    );
    assert_eq!(customs.names, ["app.z"]);
    assert!(!customs.unknown);
}

#[test]
fn do_bodies_are_read_for_what_they_set() {
    let mut customs = Customs::default();
    let e = super::classify(
        b"DO $body$ BEGIN PERFORM set_config('app.q', '1', false); \
          EXECUTE 'SET app.r = 2'; END $body$",
        &mut customs,
    );
    assert!(e.probe && e.read_back, "{e:?}");
    assert_eq!(customs.names, ["app.q", "app.r"]);
}

/// What the classifier's passes (whole and fragment, together) cost per byte of text,
/// at most, on any input: each byte is lexed once per pass, looked ahead at a few
/// times, and compared with a few short names.
const MAX_STEPS_PER_BYTE: u64 = 64;

fn steps(sql: &[u8]) -> u64 {
    let mut customs = Customs::default();
    classify::classify_counted(sql, classify::Text::Whole, &mut customs).1
        + classify::classify_counted(sql, classify::Text::Fragment, &mut customs).1
}

fn repeat(prefix: &str, unit: &str, suffix: &str, bytes: usize) -> Vec<u8> {
    let mut text = prefix.as_bytes().to_vec();
    while text.len() < bytes {
        text.extend_from_slice(unit.as_bytes());
    }
    text.extend_from_slice(suffix.as_bytes());
    text
}

/// The worst texts we could think of: each one once made some scan rescan the rest of
/// the text per occurrence (issue 11: a megabyte of `set_config(` took 35 s).
const ADVERSARIAL: &[(&str, &str, &str)] = &[
    ("SELECT ", "set_config(", ""),
    ("SELECT ", "set_config('a.b', ", ""),
    ("SELECT ", "pg_catalog.set_config($1, ", ""),
    ("SELECT ", "(", ""),
    ("SELECT ", "((((set_config)))) ", ""),
    ("SELECT '", "; SET a.b = 1 ", ""),
    ("SELECT \"", "; LISTEN x ", ""),
    ("SELECT 1 /*", " /* ; */ ", ""),
    ("SELECT 1 --", " ; /* x ", ""),
    ("SELECT $tag$", "$ta $tag $t$", ""),
    ("SELECT $", "a", "$ $aaaa"),
    ("SELECT '\\' ", "/* ; set_config('a.b', -- \" ", ""),
    ("SELECT '\\' ", ";SET a.b.c", ""),
    ("DO $$", " SET a.b SET SESSION set_config('x.y', ", "$$"),
    ("DO '", "set_config('a", "'"),
    ("SET ", "a.", ""),
    ("SET SESSION \"", "\"\"", "\""),
    ("CREATE ", "pg_tem", ""),
    ("SELECT ", "set_configset_config", ""),
    ("SELECT ", "advisory_locadvisory_unloc", ""),
    ("", ";", ""),
    ("DECLARE c ", "WITH WITH HOL ", ""),
    ("SELECT x ", "INTO INTO INT ", ""),
    ("SELECT ", "E'", ""),
    ("SELECT ", "U&'a''b' ", ""),
];

#[test]
fn classification_is_linear_in_the_text_on_adversarial_input() {
    // A long dollar tag, and a body of near-misses of it.
    let tag = "a".repeat(4000);
    let near = format!("${} ", &tag[1..]);
    let dollar = format!("SELECT ${tag}$");
    let cases = ADVERSARIAL
        .iter()
        .copied()
        .chain([(dollar.as_str(), near.as_str(), "")]);
    for (prefix, unit, suffix) in cases {
        let small = repeat(prefix, unit, suffix, 1 << 18);
        let large = repeat(prefix, unit, suffix, 1 << 20);
        let (s, l) = (steps(&small), steps(&large));
        let label = format!("{prefix}{unit}…{suffix}");
        assert!(
            l <= MAX_STEPS_PER_BYTE * large.len() as u64,
            "{label}: {l} steps for {} bytes",
            large.len()
        );
        // Four times the text, at most a little over four times the work.
        assert!(
            l * 10 <= s * 45,
            "{label}: {s} steps for {} bytes but {l} for {}",
            small.len(),
            large.len()
        );
    }
}

#[test]
fn adversarial_input_is_classified_on_the_safe_side() {
    // Four megabytes of the text that took 35 s per megabyte before.
    let text = repeat("SELECT ", "set_config(", "", 4 << 20);
    assert!(steps(&text) <= MAX_STEPS_PER_BYTE * text.len() as u64);
    let mut customs = Customs::default();
    let e = super::classify(&text, &mut customs);
    assert!(e.probe && e.read_back && customs.unknown, "{e:?}");
    let text = repeat("SELECT '\\' ", "/* ", "; LISTEN x", 1 << 20);
    assert!(classify(&text).listen);
    let text = repeat("SELECT '\\' ", "/* ", "; SET ROLE x", 1 << 20);
    assert!(classify(&text).pin);
}

#[test]
fn a_fragment_is_read_without_trusting_its_quotes() {
    // Cut from inside a string: the quote that ends the string would open one for an
    // exact reader, and hide what follows.
    let mut customs = Customs::default();
    let e = super::classify_fragment(
        b"abc'; LISTEN x; SET ROLE r; SELECT set_config('app.f', 'v', false",
        &mut customs,
    );
    assert!(e.listen && e.pin && e.probe, "{e:?}");
    assert_eq!(customs.names, ["app.f"]);
    // Cut from inside a DO body: its SETs are noted.
    let mut customs = Customs::default();
    super::classify_fragment(b" x := 1; SET app.g = 2; END $$", &mut customs);
    assert_eq!(customs.names, ["app.g"]);
}
