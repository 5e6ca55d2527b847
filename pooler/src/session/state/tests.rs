// Test-only: declared under #[cfg(test)] in state/mod.rs.
use super::*;

fn classify(sql: &[u8]) -> Effect {
    super::classify(sql, &mut Customs::default())
}

fn pins(sql: &str) -> bool {
    classify(sql.as_bytes()).pin
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
    let sql = state_left_sql("'r'", &customs);
    assert!(sql.ends_with(" + 1"), "{sql}");
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
