//! Create, log in, ensure again, rotate, suspend, limit and delete: each proven with
//! real logins and the catalogs.

use dataplane_tests::unique_tenant_id;

use crate::common::{setup, sqlstate};

#[tokio::test]
async fn created_app_logs_in_to_its_own_schema_with_an_identical_verifier() {
    let t = setup().await;
    let tenant = unique_tenant_id();
    let r = t.ensure(tenant, "my-shop", "prod").await;
    assert_eq!(r.status, 201, "{}", r.text);
    assert_eq!(r.headers["cache-control"], "no-store");
    let role = r.str("role");
    assert_eq!(role, format!("tk_t{tenant}_pmy_shop_prod"));
    assert_eq!(r.str("schema"), role);
    assert_eq!(r.str("database"), t.db);
    let password = r.str("password");
    assert!(password.len() >= 43);
    assert_eq!(
        r.str("connection_uri"),
        format!(
            "postgresql://{role}:{password}@pooler.test:6432/{}?sslmode=require",
            t.db
        )
    );
    assert_eq!(
        r.str("jdbc_url"),
        format!(
            "jdbc:postgresql://pooler.test:6432/{}?sslmode=require",
            t.db
        )
    );

    let app = t.login(&role, &password).await.unwrap();
    let row = app
        .query_one("SELECT current_schema(), current_user", &[])
        .await
        .unwrap();
    assert_eq!(row.get::<_, String>(0), role);
    assert_eq!(row.get::<_, String>(1), role);
    // Unqualified names land in the app's schema.
    app.batch_execute("CREATE TABLE items (id int primary key); INSERT INTO items VALUES (1)")
        .await
        .unwrap();
    let schema: String = app
        .query_one(
            "SELECT schemaname::text FROM pg_tables WHERE tablename = 'items'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(schema, role);

    let admin = t.admin().await;
    let row = admin
        .query_one(
            "SELECT a.rolpassword, c.scram_verifier FROM pg_authid a \
             JOIN dataplane_auth.credentials c ON c.role_name = a.rolname WHERE a.rolname = $1",
            &[&role],
        )
        .await
        .unwrap();
    let (authid, stored): (String, String) = (row.get(0), row.get(1));
    assert!(authid.starts_with("SCRAM-SHA-256$4096:"));
    assert_eq!(authid.as_bytes(), stored.as_bytes());
    assert!(!authid.contains(&password));
}

#[tokio::test]
async fn ensure_twice_keeps_the_password_and_rotate_replaces_it() {
    let t = setup().await;
    let tenant = unique_tenant_id();
    let first = t.ensure(tenant, "shop", "dev").await;
    assert_eq!(first.status, 201);
    let (role, old) = (first.str("role"), first.str("password"));

    let second = t.ensure(tenant, "shop", "dev").await;
    assert_eq!(second.status, 200, "{}", second.text);
    assert!(second.json().get("password").is_none());
    assert!(!second.text.contains(&old));
    assert!(!second.str("connection_uri").contains(&old));
    t.login(&role, &old)
        .await
        .expect("old password still works");

    let rotated = t
        .call(
            "POST",
            &format!("/v1/apps/{tenant}/shop/dev/rotate-password"),
            None,
        )
        .await;
    assert_eq!(rotated.status, 200, "{}", rotated.text);
    assert_eq!(rotated.headers["cache-control"], "no-store");
    let new = rotated.str("password");
    assert_ne!(new, old);
    assert_eq!(rotated.json()["generation"], 2);
    assert_eq!(sqlstate(t.login(&role, &old).await), "28P01");
    t.login(&role, &new).await.expect("new password works");

    // Still byte-identical after the rotation.
    let admin = t.admin().await;
    let same: bool = admin
        .query_one(
            "SELECT a.rolpassword = c.scram_verifier FROM pg_authid a \
             JOIN dataplane_auth.credentials c ON c.role_name = a.rolname WHERE a.rolname = $1",
            &[&role],
        )
        .await
        .unwrap()
        .get(0);
    assert!(same);
}

#[tokio::test]
async fn delete_ends_open_sessions_and_removes_everything() {
    let t = setup().await;
    let tenant = unique_tenant_id();
    let r = t.ensure(tenant, "gone", "prod").await;
    let (role, password) = (r.str("role"), r.str("password"));
    let app = t.login(&role, &password).await.unwrap();
    app.batch_execute("CREATE TABLE t (x int); INSERT INTO t VALUES (1)")
        .await
        .unwrap();
    // A large object owned by the role would block DROP ROLE without DROP OWNED.
    app.query_one("SELECT lo_create(0)", &[]).await.unwrap();

    let d = t
        .call("DELETE", &format!("/v1/apps/{tenant}/gone/prod"), None)
        .await;
    assert_eq!(d.status, 204, "{}", d.text);
    assert!(
        app.simple_query("SELECT 1").await.is_err(),
        "the open session was terminated"
    );

    let admin = t.admin().await;
    let row = admin
        .query_one(
            "SELECT (SELECT count(*) FROM pg_roles WHERE rolname = $1), \
                    (SELECT count(*) FROM pg_namespace WHERE nspname = $1), \
                    (SELECT count(*) FROM dataplane_auth.credentials WHERE role_name = $1), \
                    (SELECT count(*) FROM pg_stat_activity WHERE usename = $1)",
            &[&role],
        )
        .await
        .unwrap();
    for i in 0..4 {
        assert_eq!(row.get::<_, i64>(i), 0, "column {i}");
    }
    let again = t
        .call("DELETE", &format!("/v1/apps/{tenant}/gone/prod"), None)
        .await;
    assert_eq!(again.status, 204);
    let get = t
        .call("GET", &format!("/v1/apps/{tenant}/gone/prod"), None)
        .await;
    assert_eq!(get.status, 404);
    let audit: i64 = admin
        .query_one(
            "SELECT count(*) FROM dataplane_auth.audit_log WHERE role_name = $1 AND action IN ('create', 'delete')",
            &[&role],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(audit, 2);
}

#[tokio::test]
async fn suspend_blocks_logins_and_resume_restores_them() {
    let t = setup().await;
    let tenant = unique_tenant_id();
    let r = t.ensure(tenant, "sleepy", "dev").await;
    let (role, password) = (r.str("role"), r.str("password"));
    let open = t.login(&role, &password).await.unwrap();

    let s = t
        .call(
            "POST",
            &format!("/v1/apps/{tenant}/sleepy/dev/suspend"),
            None,
        )
        .await;
    assert_eq!(s.status, 200, "{}", s.text);
    assert_eq!(s.json()["disabled"], true);
    assert!(
        open.simple_query("SELECT 1").await.is_err(),
        "suspend ends sessions"
    );
    assert_eq!(sqlstate(t.login(&role, &password).await), "28000");

    let r = t
        .call(
            "POST",
            &format!("/v1/apps/{tenant}/sleepy/dev/resume"),
            None,
        )
        .await;
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["disabled"], false);
    t.login(&role, &password)
        .await
        .expect("resumed app logs in with the same password");
}

#[tokio::test]
async fn limits_reach_the_role_and_the_row() {
    let t = setup().await;
    let tenant = unique_tenant_id();
    let body = r#"{"pool_size": 3, "connection_limit": 7, "statement_timeout_ms": 1500}"#;
    let r = t
        .call("PUT", &format!("/v1/apps/{tenant}/lim/dev"), Some(body))
        .await;
    assert_eq!(r.status, 201, "{}", r.text);
    assert_eq!(r.json()["limits"]["pool_size"], 3);
    let role = r.str("role");

    let p = t
        .call(
            "PATCH",
            &format!("/v1/apps/{tenant}/lim/dev"),
            Some(r#"{"connection_limit": 9, "pool_mode": "session", "lock_timeout_ms": 250}"#),
        )
        .await;
    assert_eq!(p.status, 200, "{}", p.text);
    let limits = &p.json()["limits"];
    assert_eq!(limits["connection_limit"], 9);
    assert_eq!(limits["pool_mode"], "session");
    assert_eq!(limits["pool_size"], 3);

    let admin = t.admin().await;
    let conn_limit: i32 = admin
        .query_one(
            "SELECT rolconnlimit FROM pg_roles WHERE rolname = $1",
            &[&role],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(conn_limit, 9);
    let settings: Vec<String> = admin
        .query_one(
            "SELECT setconfig::text[] FROM pg_db_role_setting s JOIN pg_roles r ON r.oid = s.setrole \
             WHERE r.rolname = $1 AND s.setdatabase = 0",
            &[&role],
        )
        .await
        .unwrap()
        .get(0);
    assert!(
        settings.contains(&"statement_timeout=1500".to_owned()),
        "{settings:?}"
    );
    assert!(
        settings.contains(&"lock_timeout=250".to_owned()),
        "{settings:?}"
    );

    let bad = t
        .call(
            "PATCH",
            &format!("/v1/apps/{tenant}/lim/dev"),
            Some(r#"{"pool_size": 0}"#),
        )
        .await;
    assert_eq!(bad.status, 422);
    assert_eq!(bad.json()["code"], "invalid_limits");
    let unknown = t
        .call(
            "PATCH",
            &format!("/v1/apps/{tenant}/lim/dev"),
            Some(r#"{"pool_sise": 2}"#),
        )
        .await;
    assert_eq!(unknown.status, 422);
    assert_eq!(unknown.json()["code"], "invalid_body");
}

#[tokio::test]
async fn every_change_notifies_the_poolers() {
    use futures_util::StreamExt;
    let t = setup().await;
    let (client, mut connection) = t
        .cluster
        .config("dp_pooler", crate::common::POOLER_PASSWORD, &t.db)
        .connect(tokio_postgres::NoTls)
        .await
        .unwrap();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        let mut messages = futures_util::stream::poll_fn(move |cx| connection.poll_message(cx));
        while let Some(Ok(msg)) = messages.next().await {
            if let tokio_postgres::AsyncMessage::Notification(n) = msg {
                let _ = tx.send((n.channel().to_owned(), n.payload().to_owned()));
            }
        }
    });
    client.batch_execute("LISTEN dataplane_auth").await.unwrap();

    let tenant = unique_tenant_id();
    let role = t.ensure(tenant, "noisy", "dev").await.str("role");
    let app = format!("/v1/apps/{tenant}/noisy/dev");
    t.call("POST", &format!("{app}/rotate-password"), None)
        .await;
    t.call("POST", &format!("{app}/suspend"), None).await;
    t.call("POST", &format!("{app}/resume"), None).await;
    t.call("PATCH", &app, Some(r#"{"pool_size": 3}"#)).await;
    t.call("DELETE", &app, None).await;
    // create, rotate, suspend, resume, limits, delete (disable + row removal).
    for _ in 0..7 {
        let (channel, payload) =
            tokio::time::timeout(std::time::Duration::from_secs(10), rx.recv())
                .await
                .expect("a notification arrives")
                .unwrap();
        assert_eq!(channel, "dataplane_auth");
        assert_eq!(payload, role);
    }
}

#[tokio::test]
async fn migrations_are_recorded_and_safe_to_rerun() {
    let t = setup().await;
    let mut admin = t.admin().await;
    let report = provisioner::migrate::run(&mut admin, "dp_provisioner")
        .await
        .unwrap();
    assert!(report.applied.is_empty());
    assert_eq!(report.skipped, vec!["0001_init", "0002_replicas"]);
    let n: i64 = admin
        .query_one("SELECT count(*) FROM dataplane_auth.schema_migrations", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 2);
}
