//! Session state in transaction mode: what follows a client (tracked parameters),
//! what pins it to its server (temp tables, advisory locks, untracked SET; a LISTEN
//! follows it through its role's listener, listen.rs), and that none of it ever reaches
//! another client.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tokio_postgres::{AsyncMessage, Notification};

use provisioner::ddl::PROVISION_LOCK;

use crate::common::{App, Env, env, message, sqlstate, value};

/// A client whose notifications arrive on a channel.
async fn listening_client(
    e: &Env,
    app: &App,
) -> (
    tokio_postgres::Client,
    tokio::sync::mpsc::UnboundedReceiver<Notification>,
) {
    let (client, mut connection) = e
        .config(&app.role, &app.password)
        .connect(tokio_postgres::NoTls)
        .await
        .unwrap();
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Some(Ok(message)) = std::future::poll_fn(|cx| connection.poll_message(cx)).await {
            if let AsyncMessage::Notification(n) = message {
                let _ = tx.send(n);
            }
        }
    });
    (client, rx)
}

/// Everything another client could inherit, in one row: its pid, TimeZone,
/// statement_timeout, search_path, work_mem, channels, temp relations, advisory locks.
const LOOK: &str = "SELECT concat_ws('|', pg_backend_pid(), current_setting('TimeZone'), \
     current_setting('statement_timeout'), current_setting('search_path'), \
     current_setting('work_mem'), \
     (SELECT count(*) FROM pg_listening_channels()), \
     (SELECT count(*) FROM pg_class WHERE relnamespace = pg_my_temp_schema()), \
     (SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND pid = pg_backend_pid()))";

#[tokio::test]
async fn state_never_leaks_and_its_maker_keeps_it() {
    let e = env(|c| {
        c.query_wait_timeout_ms = 120_000;
        c.max_pinned_per_role = Some(1);
    })
    .await;
    let app = e.app_with_pool(1).await;
    // Apps may not make temp tables by default (the isolation REVOKEs); this one may.
    let admin = e.fixture.admin().await;
    // Under the provisioner's global lock: concurrent GRANTs on the one pg_database row
    // (other tests provisioning apps) fail with "tuple concurrently updated".
    admin
        .batch_execute(&format!(
            "BEGIN; SELECT pg_advisory_xact_lock({PROVISION_LOCK}); \
             GRANT TEMPORARY ON DATABASE \"{}\" TO \"{}\"; COMMIT",
            e.fixture.db, app.role
        ))
        .await
        .unwrap();
    let (x, mut notes) = listening_client(&e, &app).await;
    let clean = value(&e.connect(&app).await, LOOK).await;
    let fields: Vec<String> = clean.split('|').map(str::to_owned).collect();
    let (pid, default_tz, default_timeout, default_path) = (
        fields[0].clone(),
        fields[1].clone(),
        fields[2].clone(),
        fields[3].clone(),
    );
    assert_ne!(default_tz, "Asia/Tokyo");

    // Tracked parameters follow X and nobody else; X is not pinned by them.
    x.batch_execute("SET TimeZone = 'Asia/Tokyo'; SET search_path = public")
        .await
        .unwrap();
    assert_eq!(value(&x, "SHOW search_path").await, "public");
    x.batch_execute("SET statement_timeout = '1ms'")
        .await
        .unwrap();
    let others = e.connect(&app).await;
    for _ in 0..10 {
        let seen = value(&others, LOOK).await;
        let f: Vec<&str> = seen.split('|').collect();
        assert_eq!(f[0], pid, "one server");
        assert_eq!(
            (f[1], f[2], f[3]),
            (
                default_tz.as_str(),
                default_timeout.as_str(),
                default_path.as_str()
            ),
            "{seen}"
        );
    }
    // X's 1 ms timeout can fire on X's own statements; retry until it is gone.
    for _ in 0..100 {
        if x.batch_execute("RESET statement_timeout").await.is_ok() {
            break;
        }
    }
    assert_eq!(value(&x, "SHOW TimeZone").await, "Asia/Tokyo");
    assert_eq!(value(&x, "SHOW search_path").await, "public");

    // State that cannot follow X pins it to the (only) server; its LISTEN goes to the
    // role's listener, not to that server.
    x.batch_execute(
        "LISTEN x_channel; CREATE TEMP TABLE x_temp (a int); SELECT pg_advisory_lock(4242); \
         SET work_mem = '77kB'",
    )
    .await
    .unwrap();
    let done = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for _ in 0..10 {
        let client = e.connect(&app).await;
        let done = done.clone();
        let (pid, tz, path) = (pid.clone(), default_tz.clone(), default_path.clone());
        let timeout = default_timeout.clone();
        tasks.push(tokio::spawn(async move {
            for _ in 0..10 {
                let seen = value(&client, LOOK).await;
                let f: Vec<&str> = seen.split('|').collect();
                assert_eq!(f[0], pid, "one server");
                assert_eq!(
                    (f[1], f[2], f[3], f[4], f[5], f[6], f[7]),
                    (
                        tz.as_str(),
                        timeout.as_str(),
                        path.as_str(),
                        "4MB",
                        "0",
                        "0",
                        "0"
                    ),
                    "another client saw X's state: {seen}"
                );
                done.fetch_add(1, Ordering::SeqCst);
            }
        }));
    }
    // X keeps what it made across its transactions while the others wait.
    for i in 0..5 {
        x.batch_execute(&format!("BEGIN; INSERT INTO x_temp VALUES ({i}); COMMIT"))
            .await
            .unwrap();
        assert_eq!(value(&x, "SHOW TimeZone").await, "Asia/Tokyo");
        assert_eq!(value(&x, "SHOW work_mem").await, "77kB");
    }
    assert_eq!(value(&x, "SELECT count(*) FROM x_temp").await, "5");
    let held: i64 = admin
        .query_one(
            "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND objid = 4242 AND granted",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(held, 1);
    // Only the app's own sessions reach it (the superuser's NOTIFY would not): X's own,
    // delivered while X keeps its pinned server between transactions.
    x.batch_execute("NOTIFY x_channel, 'hello'").await.unwrap();
    let note = tokio::time::timeout(Duration::from_secs(30), notes.recv())
        .await
        .expect("X's LISTEN followed it")
        .unwrap();
    assert_eq!(note.payload(), "hello");
    assert_eq!(
        done.load(Ordering::SeqCst),
        0,
        "X is pinned to the only server"
    );

    // DISCARD ALL drops it all: X is unpinned and the server serves the others clean.
    x.batch_execute("DISCARD ALL").await.unwrap();
    for t in tasks {
        tokio::time::timeout(Duration::from_secs(60), t)
            .await
            .expect("the others never got the server")
            .unwrap();
    }
    assert_eq!(done.load(Ordering::SeqCst), 100);
    let role = e.pooler.shared.roles.get(&app.role).unwrap();
    assert_eq!(role.pinned(), 0);
}

/// The pooler settles a session right after relaying its ReadyForQuery, so the
/// client can be a step ahead of the books: wait for them.
async fn pinned_becomes(role: &pooler::shared::RoleShared, n: usize) {
    for _ in 0..500 {
        if role.pinned() == n {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(role.pinned(), n);
}

#[tokio::test]
async fn pins_are_bounded_per_role_and_released_when_the_state_is_gone() {
    let e = env(|c| c.max_pinned_per_role = Some(1)).await;
    let app = e.app_with_pool(2).await;
    let a = e.connect(&app).await;
    a.batch_execute("SELECT pg_advisory_lock(1)").await.unwrap();
    let role = e.pooler.shared.roles.get(&app.role).unwrap();
    pinned_becomes(&role, 1).await;
    let b = e.connect(&app).await;
    let err = b.batch_execute("SET work_mem = '2MB'").await.unwrap_err();
    assert_eq!(sqlstate(&err), "53400");
    assert!(message(&err).contains("session mode"), "{}", message(&err));
    // A's state is gone: its pin goes back, and another client may pin.
    a.batch_execute("SELECT pg_advisory_unlock(1)")
        .await
        .unwrap();
    pinned_becomes(&role, 0).await;
    let c = e.connect(&app).await;
    c.batch_execute("SELECT pg_advisory_lock(7)").await.unwrap();
    pinned_becomes(&role, 1).await;
    c.batch_execute("SELECT pg_advisory_unlock(7)")
        .await
        .unwrap();
    pinned_becomes(&role, 0).await;
    // An untracked SET pins until RESET.
    a.batch_execute("SET work_mem = '99kB'").await.unwrap();
    pinned_becomes(&role, 1).await;
    assert_eq!(value(&a, "SHOW work_mem").await, "99kB");
    a.batch_execute("RESET work_mem").await.unwrap();
    pinned_becomes(&role, 0).await;
}

/// What a client sees of its session in one row: search_path, statement_timeout,
/// lock_timeout, TimeZone, and the custom app.tenant ('-' when unset).
const PARAMS: &str = "SELECT concat_ws('|', current_setting('search_path'), \
     current_setting('statement_timeout'), current_setting('lock_timeout'), \
     current_setting('TimeZone'), coalesce(current_setting('app.tenant', true), '-'))";

#[tokio::test]
async fn set_config_of_a_tracked_parameter_follows_its_client_and_nobody_else() {
    let e = env(|_| {}).await;
    let app = e.app_with_pool(1).await;
    let other = e.connect(&app).await;
    let defaults = value(&other, PARAMS).await;
    let x = e.connect(&app).await;
    x.batch_execute(
        "SELECT set_config('search_path', 'public', false), \
         set_config('statement_timeout', '43s', false); \
         SELECT pg_catalog.set_config('lock_timeout', '4321ms', false)",
    )
    .await
    .unwrap();
    // The only server goes to the other client with none of X's values...
    for _ in 0..3 {
        assert_eq!(
            value(&other, PARAMS).await,
            defaults,
            "X's set_config leaked"
        );
    }
    // ... and X gets them back on its next transaction.
    let mine = value(&x, PARAMS).await;
    let f: Vec<&str> = mine.split('|').collect();
    assert_eq!((f[0], f[1], f[2]), ("public", "43s", "4321ms"), "{mine}");
}

#[tokio::test]
async fn a_rolled_back_reset_all_changes_nothing() {
    let e = env(|_| {}).await;
    let app = e.app_with_pool(1).await;
    let other = e.connect(&app).await;
    let defaults = value(&other, PARAMS).await;
    assert!(!defaults.contains("Asia/Tokyo"), "{defaults}");
    let x = e.connect(&app).await;
    x.batch_execute("BEGIN; SET search_path = public; SET TimeZone = 'Asia/Tokyo'; COMMIT")
        .await
        .unwrap();
    x.batch_execute("BEGIN; RESET ALL; ROLLBACK").await.unwrap();
    x.batch_execute("BEGIN").await.unwrap();
    x.batch_execute("DISCARD ALL").await.unwrap_err();
    x.batch_execute("ROLLBACK").await.unwrap();
    // Nothing was reset: the next client is not handed X's values...
    for _ in 0..3 {
        assert_eq!(value(&other, PARAMS).await, defaults, "X's settings leaked");
    }
    // ... and X keeps them.
    assert_eq!(value(&x, "SHOW TimeZone").await, "Asia/Tokyo");
    assert_eq!(value(&x, "SHOW search_path").await, "public");
    // A reset that happens does reset, SETs after it in the same batch stay.
    x.batch_execute("RESET ALL; SET lock_timeout = '1234ms'")
        .await
        .unwrap();
    assert_eq!(value(&other, PARAMS).await, defaults);
    let mine = value(&x, PARAMS).await;
    let d: Vec<&str> = defaults.split('|').collect();
    let f: Vec<&str> = mine.split('|').collect();
    assert_eq!((f[0], f[2], f[3]), (d[0], "1234ms", d[3]), "{mine}");
}

#[tokio::test]
async fn state_that_did_not_stick_does_not_keep_a_pin() {
    let e = env(|c| c.max_pinned_per_role = Some(1)).await;
    let app = e.app_with_pool(2).await;
    let a = e.connect(&app).await;
    // Known to the pooler once a client logged in.
    let role = e.pooler.shared.roles.get(&app.role).unwrap();
    // Rolled back, or failed (this app may not create temp tables).
    for sql in [
        "BEGIN; LISTEN a_channel; ROLLBACK",
        "BEGIN; SET work_mem = '99kB'; ROLLBACK",
        "PREPARE p AS SELECT no_such_column",
        "CREATE TEMP TABLE t (a int)",
    ] {
        let _ = a.batch_execute(sql).await;
        pinned_becomes(&role, 0).await;
    }
    // The slot is free for a client with real state.
    let b = e.connect(&app).await;
    b.batch_execute("SET work_mem = '3MB'").await.unwrap();
    pinned_becomes(&role, 1).await;
    assert_eq!(value(&a, "SELECT 1").await, "1");
}

#[tokio::test]
async fn custom_parameters_pin_until_they_are_reset() {
    let e = env(|_| {}).await;
    let app = e.app_with_pool(1).await;
    let x = e.connect(&app).await;
    // Known to the pooler once a client logged in.
    let role = e.pooler.shared.roles.get(&app.role).unwrap();
    for (set, reset) in [
        (
            "SELECT set_config('app.tenant', 'x', false)",
            "RESET app.tenant",
        ),
        (
            "SET app.tenant = 'y'",
            "SELECT set_config('app.tenant', '', false)",
        ),
    ] {
        let other = e.connect(&app).await;
        x.batch_execute(set).await.unwrap();
        pinned_becomes(&role, 1).await;
        // The only server is X's while its tenant is set: the other client waits.
        let look = tokio::spawn(async move { value(&other, PARAMS).await });
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(!look.is_finished(), "another client got X's server");
        let tenant = value(&x, "SELECT current_setting('app.tenant')").await;
        assert!(tenant == "x" || tenant == "y", "{tenant}");
        x.batch_execute(reset).await.unwrap();
        let seen = tokio::time::timeout(Duration::from_secs(30), look)
            .await
            .expect("X was never unpinned")
            .unwrap();
        let tenant = seen.rsplit('|').next().unwrap();
        assert!(
            tenant == "-" || tenant.is_empty(),
            "X's tenant leaked: {seen}"
        );
        pinned_becomes(&role, 0).await;
    }
    // Transaction-local, the RLS way: no pin at all.
    x.batch_execute(
        "BEGIN; SELECT set_config('app.tenant', 'z', true); SET LOCAL app.who = 'u'; COMMIT",
    )
    .await
    .unwrap();
    assert_eq!(role.pinned(), 0);
}

#[tokio::test]
async fn what_may_leave_no_state_needs_no_pin_slot() {
    let e = env(|c| c.max_pinned_per_role = Some(1)).await;
    let app = e.app_with_pool(2).await;
    let a = e.connect(&app).await;
    // Known to the pooler once a client logged in.
    let role = e.pooler.shared.roles.get(&app.role).unwrap();
    a.batch_execute("SET work_mem = '5MB'").await.unwrap();
    pinned_becomes(&role, 1).await;
    // The role's only pin slot is A's; B's statements leave nothing behind.
    let b = e.connect(&app).await;
    b.batch_execute(
        "BEGIN; SELECT set_config('app.tenant', 'b', true), set_config('work_mem', '1MB', true); COMMIT",
    )
    .await
    .unwrap();
    b.batch_execute("SELECT pg_try_advisory_lock(77); SELECT pg_advisory_unlock(77)")
        .await
        .unwrap();
    b.batch_execute("SELECT set_config('work_mem', current_setting('work_mem'), true)")
        .await
        .unwrap();
    assert_eq!(value(&b, "SELECT 2").await, "2");
    assert_eq!(role.pinned(), 1);
    // A lock B keeps needs a slot it cannot have: B is told, and its server closed,
    // which releases the lock (nobody else inherits it).
    let admin = e.fixture.admin().await;
    let _ = b.batch_execute("SELECT pg_advisory_lock(78)").await;
    let err = b.batch_execute("SELECT 1").await.unwrap_err();
    assert!(
        sqlstate(&err) == "53400" || b.is_closed(),
        "{}",
        message(&err)
    );
    for _ in 0..500 {
        let held: i64 = admin
            .query_one(
                "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND objid = 78",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        if held == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let c = e.connect(&app).await;
    assert_eq!(
        value(&c, "SELECT pg_try_advisory_lock(78)::text").await,
        "true"
    );
    assert_eq!(role.pinned(), 1);
}

#[tokio::test]
async fn state_left_by_a_do_block_pins_and_never_leaks() {
    let e = env(|_| {}).await;
    let app = e.app_with_pool(2).await;
    let x = e.connect(&app).await;
    let role = e.pooler.shared.roles.get(&app.role).unwrap();
    // The pooler cannot read the body: it looks once X is idle.
    x.batch_execute("DO $$ BEGIN EXECUTE 'LISTEN from_do'; END $$")
        .await
        .unwrap();
    pinned_becomes(&role, 1).await;
    let other = e.connect(&app).await;
    for _ in 0..10 {
        let seen = value(
            &other,
            "SELECT count(*)::text || '|' || coalesce(current_setting('app.tenant', true), '-') \
             FROM pg_listening_channels()",
        )
        .await;
        assert!(seen.starts_with("0|"), "X's LISTEN leaked: {seen}");
    }
    // A body that leaves nothing costs no pin.
    let y = e.connect(&app).await;
    y.batch_execute("DO $$ BEGIN PERFORM 1; END $$")
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(role.pinned(), 1, "only X is pinned");
    x.batch_execute("UNLISTEN *").await.unwrap();
    pinned_becomes(&role, 0).await;
}
