//! State a plain `SELECT f()` leaves when the function LISTENs, creates a temporary
//! table, takes a session advisory lock or calls `set_config(…, false)`: its client
//! keeps it (pinned to its server), and no other client of the app ever sees it, through
//! both ports.

use crate::common::{App, Env, env, value};

/// What another client could inherit from a server, in one row: channels, temporary
/// relations, advisory locks, and the custom setting the functions below make.
const LOOK: &str = "SELECT concat_ws('|', \
     (SELECT count(*) FROM pg_listening_channels()), \
     (SELECT count(*) FROM pg_class WHERE relnamespace = pg_my_temp_schema()), \
     (SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND pid = pg_backend_pid()), \
     coalesce(current_setting('app.secret', true), ''))";

const CLEAN: &str = "0|0|0|";

/// The app's functions, made through the pooler as the app would make them.
const FUNCTIONS: &str = "\
    CREATE FUNCTION f_listen() RETURNS void LANGUAGE plpgsql AS $$ BEGIN LISTEN jobs; END $$; \
    CREATE FUNCTION f_temp() RETURNS void LANGUAGE plpgsql AS \
        $$ BEGIN CREATE TEMP TABLE IF NOT EXISTS scratch (x int); END $$; \
    CREATE FUNCTION f_lock() RETURNS void LANGUAGE sql AS $$ SELECT pg_advisory_lock(77) $$; \
    CREATE FUNCTION f_config() RETURNS text LANGUAGE sql AS \
        $$ SELECT set_config('app.secret', 'mine', false) $$; \
    CREATE FUNCTION f_plain(x int) RETURNS int LANGUAGE sql AS $$ SELECT x + 1 $$";

async fn setup() -> (Env, App) {
    let e = env(|c| c.session_listen = Some("127.0.0.1:0".parse().unwrap())).await;
    let app = e.app_with_pool(1).await;
    // Apps may not make temp tables by default (the isolation REVOKEs); this one may.
    e.fixture
        .admin()
        .await
        .batch_execute(&format!(
            "GRANT TEMPORARY ON DATABASE \"{}\" TO \"{}\"",
            e.fixture.db, app.role
        ))
        .await
        .unwrap();
    let maker = e.connect(&app).await;
    maker.batch_execute(FUNCTIONS).await.unwrap();
    (e, app)
}

#[tokio::test]
async fn what_a_function_leaves_stays_with_its_client() {
    let (e, app) = setup().await;
    let role = e.pooler.shared.roles.get(&app.role).unwrap();
    let ports = [e.pooler.addr.port(), e.pooler.session_addr.unwrap().port()];
    for port in ports {
        for (call, left) in [
            ("SELECT f_listen()", "1|0|0|"),
            ("SELECT f_temp()", "0|1|0|"),
            ("SELECT f_lock()", "0|0|1|"),
            ("SELECT f_config()", "0|0|0|mine"),
        ] {
            let maker = e.connect_on(&app, port).await;
            let pid = value(&maker, "SELECT pg_backend_pid()").await;
            maker.batch_execute(call).await.unwrap();
            // Its maker keeps it, on its server, transaction after transaction.
            for _ in 0..3 {
                assert_eq!(value(&maker, LOOK).await, left, "port {port}: {call}");
                assert_eq!(value(&maker, "SELECT pg_backend_pid()").await, pid);
            }
            if port == e.pooler.addr.port() {
                assert_eq!(role.pinned(), 1, "{call} pins its client");
            }
            drop(maker);
            // pool_size 1: the next client gets that very server, clean.
            let next = e.connect_on(&app, port).await;
            let mut same = false;
            for _ in 0..100 {
                if value(&next, "SELECT pg_backend_pid()").await == pid {
                    same = true;
                    break;
                }
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            }
            assert!(same, "port {port}: the server was reused");
            assert_eq!(value(&next, LOOK).await, CLEAN, "port {port}: {call}");
        }
        // A function that leaves nothing pins nothing.
        let plain = e.connect_on(&app, port).await;
        assert_eq!(value(&plain, "SELECT f_plain(41)").await, "42");
        assert_eq!(value(&plain, LOOK).await, CLEAN);
        if port == e.pooler.addr.port() {
            assert_eq!(role.pinned(), 0);
        }
    }
}

/// An app without such functions is not looked at after each transaction; one with
/// them is, from the moment one is made through the pooler.
#[tokio::test]
async fn only_apps_whose_functions_may_leave_state_pay_for_the_look() {
    let e = env(|_| {}).await;
    let app = e.app_with_pool(1).await;
    let client = e.connect(&app).await;
    client
        .batch_execute(
            "CREATE FUNCTION add_one(x int) RETURNS int LANGUAGE sql AS $$ SELECT x + 1 $$",
        )
        .await
        .unwrap();
    assert_eq!(value(&client, "SELECT add_one(1)").await, "2");
    let role = e.pooler.shared.roles.get(&app.role).unwrap();
    assert!(!role.routines_risky(), "plain functions leave nothing");
    client
        .batch_execute(
            "CREATE FUNCTION remember(v text) RETURNS text LANGUAGE sql AS \
             $$ SELECT set_config('app.secret', v, false) $$",
        )
        .await
        .unwrap();
    assert_eq!(value(&client, "SELECT 1").await, "1");
    assert!(
        role.routines_risky(),
        "a function that sets a parameter for the session"
    );
    client
        .batch_execute("DROP FUNCTION remember(text)")
        .await
        .unwrap();
    assert_eq!(value(&client, "SELECT 1").await, "1");
    assert!(!role.routines_risky(), "looked at again after the DROP");
}
