//! Session pooling, per app (its credentials row) and per port: a client keeps one
//! server for its whole session, and what it leaves behind is gone before the next.

use provisioner::ddl::{LimitsPatch, PoolMode};

use crate::common::{App, Env, env, value};

async fn keeps_its_server_and_leaves_nothing(e: &Env, app: &App, port: u16) {
    let connect = || {
        let config = e.config_on_port(&app.role, &app.password, port);
        async move { dataplane_tests::connect(&config).await.unwrap() }
    };
    let first = connect().await;
    let pid = value(&first, "SELECT pg_backend_pid()").await;
    first
        .batch_execute(
            "SET statement_timeout = 1234; LISTEN somewhere; SELECT pg_advisory_lock(42)",
        )
        .await
        .unwrap();
    for _ in 0..5 {
        assert_eq!(
            value(&first, "SELECT pg_backend_pid()").await,
            pid,
            "the session moved"
        );
    }
    assert_eq!(value(&first, "SHOW statement_timeout").await, "1234ms");
    drop(first);

    // pool_size 1: the next client gets the same server, reset.
    let next = connect().await;
    let mut same_server = false;
    for _ in 0..50 {
        if value(&next, "SELECT pg_backend_pid()").await == pid {
            same_server = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert!(same_server, "pool_size 1 should reuse the server");
    assert_ne!(value(&next, "SHOW statement_timeout").await, "1234ms");
    let channels = value(&next, "SELECT count(*)::text || ' ' || coalesce(string_agg(c, ','), '') FROM pg_listening_channels() c").await;
    assert_eq!(channels.trim(), "0", "listening on {channels} in pid {pid}");
    assert_eq!(
        value(
            &next,
            // This server's locks only: the other session-mode test runs beside this
            // one and takes the same lock.
            "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND pid = pg_backend_pid()"
        )
        .await,
        "0"
    );
}

#[tokio::test]
async fn an_app_whose_row_says_session_gets_session_pooling() {
    let e = env(|_| {}).await;
    let app = e
        .app(LimitsPatch {
            pool_size: Some(1),
            pool_mode: Some(PoolMode::Session),
            ..Default::default()
        })
        .await;
    keeps_its_server_and_leaves_nothing(&e, &app, e.pooler.addr.port()).await;
}

#[tokio::test]
async fn the_session_port_gives_any_app_session_pooling() {
    let e = env(|c| c.session_listen = Some("127.0.0.1:0".parse().unwrap())).await;
    let app = e.app_with_pool(1).await;
    let port = e.pooler.session_addr.unwrap().port();
    keeps_its_server_and_leaves_nothing(&e, &app, port).await;
}
