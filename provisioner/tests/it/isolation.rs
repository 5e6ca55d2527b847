//! The isolation matrix: with real logins, app A can do nothing to app B, nothing
//! outside its own schema, and neither app nor pooler can read credentials.

use dataplane_tests::unique_tenant_id;

use crate::common::{POOLER_PASSWORD, TestDb, setup, sqlstate};

const DENIED: &str = "42501";

async fn app(t: &TestDb, slug: &str) -> (String, tokio_postgres::Client) {
    let (role, _, client) = app_with_password(t, slug).await;
    (role, client)
}

async fn app_with_password(t: &TestDb, slug: &str) -> (String, String, tokio_postgres::Client) {
    let r = t.ensure(unique_tenant_id(), slug, "prod").await;
    assert_eq!(r.status, 201, "{}", r.text);
    let (role, password) = (r.str("role"), r.str("password"));
    let client = t.login(&role, &password).await.unwrap();
    (role, password, client)
}

#[tokio::test]
async fn app_a_cannot_touch_app_b_or_anything_shared() {
    let t = setup().await;
    let (a_role, a_password, a) = app_with_password(&t, "alpha").await;
    let (b_role, b) = app(&t, "beta").await;
    b.batch_execute("CREATE TABLE secrets (v text); INSERT INTO secrets VALUES ('b-only')")
        .await
        .unwrap();
    a.batch_execute("CREATE TABLE mine (v text)").await.unwrap();

    // Read, write, create in B's schema.
    assert_eq!(
        sqlstate(
            a.query(&format!("SELECT * FROM {b_role}.secrets"), &[])
                .await
        ),
        DENIED
    );
    assert_eq!(
        sqlstate(
            a.execute(&format!("INSERT INTO {b_role}.secrets VALUES ('x')"), &[])
                .await
        ),
        DENIED
    );
    assert_eq!(
        sqlstate(
            a.batch_execute(&format!("CREATE TABLE {b_role}.planted (x int)"))
                .await
        ),
        DENIED
    );
    assert_eq!(
        sqlstate(
            a.batch_execute(&format!("CREATE VIEW {b_role}.v AS SELECT 1"))
                .await
        ),
        DENIED
    );

    // A cannot open its schema to B: the schema belongs to the provisioner. (GRANT
    // without the right only warns, so the proof is B's access afterwards.)
    let _ = a
        .batch_execute(&format!("GRANT USAGE ON SCHEMA {a_role} TO {b_role}"))
        .await;
    a.batch_execute(&format!("GRANT SELECT ON mine TO {b_role}"))
        .await
        .unwrap();
    assert_eq!(
        sqlstate(b.query(&format!("SELECT * FROM {a_role}.mine"), &[]).await),
        DENIED
    );
    let admin = t.admin().await;
    let b_can: bool = admin
        .query_one(
            "SELECT has_schema_privilege($1, $2, 'USAGE')",
            &[&b_role, &a_role],
        )
        .await
        .unwrap()
        .get(0);
    assert!(!b_can);

    // Nor drop or rename its own schema.
    assert_eq!(
        sqlstate(
            a.batch_execute(&format!("DROP SCHEMA {a_role} CASCADE"))
                .await
        ),
        DENIED
    );
    assert_eq!(
        sqlstate(
            a.batch_execute(&format!("ALTER SCHEMA {a_role} RENAME TO x"))
                .await
        ),
        DENIED
    );
    // Nothing outside it.
    assert_eq!(
        sqlstate(a.batch_execute("CREATE SCHEMA planted").await),
        DENIED
    );
    assert_eq!(
        sqlstate(a.batch_execute("CREATE TEMP TABLE tmp (x int)").await),
        DENIED
    );
    assert_eq!(
        sqlstate(a.batch_execute("CREATE EXTENSION pgcrypto").await),
        DENIED
    );
    assert_eq!(
        sqlstate(a.batch_execute("CREATE TABLE public.planted (x int)").await),
        DENIED
    );
    assert_eq!(
        sqlstate(a.batch_execute(&format!("CREATE ROLE {a_role}_x")).await),
        DENIED
    );
    // No credentials, no lookup, no audit log.
    assert_eq!(
        sqlstate(
            a.query("SELECT * FROM dataplane_auth.credentials", &[])
                .await
        ),
        DENIED
    );
    assert_eq!(
        sqlstate(
            a.query("SELECT * FROM dataplane_auth.lookup($1)", &[&b_role])
                .await
        ),
        DENIED
    );
    assert_eq!(
        sqlstate(a.query("SELECT * FROM dataplane_auth.audit_log", &[]).await),
        DENIED
    );
    // No other database of the cluster either: a session there could leave temp
    // tables or large objects that block the app's deletion.
    let elsewhere = t.cluster.config(&a_role, &a_password, "postgres");
    let refused = dataplane_tests::connect(&elsewhere).await;
    assert_eq!(
        refused
            .err()
            .and_then(|e| e.code().map(|c| c.code().to_owned()))
            .as_deref(),
        Some(DENIED)
    );
    // And B's data is untouched.
    let v: String = b
        .query_one("SELECT v FROM secrets", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(v, "b-only");
}

#[tokio::test]
async fn the_pooler_role_can_only_look_up() {
    let t = setup().await;
    let (a_role, a) = app(&t, "gamma").await;
    a.batch_execute("CREATE TABLE data (x int)").await.unwrap();
    let pooler = t.login("dp_pooler", POOLER_PASSWORD).await.unwrap();

    let row = pooler
        .query_one(
            "SELECT role_name, scram_verifier, generation, pool_mode, status FROM dataplane_auth.lookup($1)",
            &[&a_role],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, String>(0), a_role);
    assert!(row.get::<_, String>(1).starts_with("SCRAM-SHA-256$4096:"));
    assert_eq!(row.get::<_, i64>(2), 1);
    assert_eq!(row.get::<_, String>(3), "transaction");
    assert_eq!(row.get::<_, String>(4), "ok");

    // One row, no secrets, for anything that is not a live app role.
    for (name, status) in [
        ("tk_t1_pnobody_dev", "unknown"),
        ("dp_pooler", "unknown"),
        ("postgres", "unknown"),
    ] {
        let rows = pooler
            .query(
                "SELECT scram_verifier, status FROM dataplane_auth.lookup($1)",
                &[&name],
            )
            .await
            .unwrap();
        assert_eq!(rows.len(), 1);
        assert_eq!(rows[0].get::<_, Option<String>>(0), None);
        assert_eq!(rows[0].get::<_, String>(1), status);
    }

    assert_eq!(
        sqlstate(
            pooler
                .query("SELECT * FROM dataplane_auth.credentials", &[])
                .await
        ),
        DENIED
    );
    assert_eq!(
        sqlstate(
            pooler
                .query("SELECT * FROM dataplane_auth.audit_log", &[])
                .await
        ),
        DENIED
    );
    assert_eq!(
        sqlstate(
            pooler
                .query(&format!("SELECT * FROM {a_role}.data"), &[])
                .await
        ),
        DENIED
    );
    assert_eq!(
        sqlstate(pooler.batch_execute("CREATE TABLE public.x (x int)").await),
        DENIED
    );

    // A suspended app's verifier is withheld, and says why.
    let tenant = a_role
        .trim_start_matches("tk_t")
        .split('_')
        .next()
        .unwrap()
        .to_owned();
    let s = t
        .call(
            "POST",
            &format!("/v1/apps/{tenant}/gamma/prod/suspend"),
            None,
        )
        .await;
    assert_eq!(s.status, 200, "{}", s.text);
    let row = pooler
        .query_one(
            "SELECT scram_verifier, status FROM dataplane_auth.lookup($1)",
            &[&a_role],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, Option<String>>(0), None);
    assert_eq!(row.get::<_, String>(1), "disabled");
}

#[tokio::test]
async fn the_provisioner_role_is_not_a_superuser() {
    let t = setup().await;
    let prov = t
        .login("dp_provisioner", crate::common::PROVISIONER_PASSWORD)
        .await
        .unwrap();
    let row = prov
        .query_one(
            "SELECT rolsuper, rolcreatedb, rolbypassrls FROM pg_roles WHERE rolname = current_user",
            &[],
        )
        .await
        .unwrap();
    assert!(!row.get::<_, bool>(0) && !row.get::<_, bool>(1) && !row.get::<_, bool>(2));
    // It can write credentials but not rewrite the lookup function it serves through.
    assert_eq!(
        sqlstate(
            prov.batch_execute(
                "CREATE OR REPLACE FUNCTION dataplane_auth.lookup(name text) RETURNS SETOF text \
                 LANGUAGE sql AS 'SELECT 1::text'"
            )
            .await
        ),
        DENIED
    );
}

const HEARTBEAT: &str = "SELECT replica_id, holding, is_self, now_ms - heartbeat_ms \
                         FROM dataplane_auth.replica_heartbeat($1, $2, $3, $4, $5, $6, $7, $8)";

/// One heartbeat as `dp_pooler`: (instance, lease, budget, demand, holding, claim) →
/// (own id, own holding, Σ holding of every live replica).
async fn heartbeat(
    c: &tokio_postgres::Client,
    instance: &str,
    budget: i32,
    holding: i32,
    claim: i32,
) -> Result<(i32, i32, i64), tokio_postgres::Error> {
    let addr = Some("127.0.0.1:6432");
    let rows = c
        .query(
            HEARTBEAT,
            &[
                &instance,
                &addr,
                &5000i32,
                &budget,
                &0i32,
                &holding,
                &claim,
                &None::<i32>,
            ],
        )
        .await?;
    let me = rows.iter().find(|r| r.get::<_, bool>(2)).unwrap();
    let sum = rows.iter().map(|r| i64::from(r.get::<_, i32>(1))).sum();
    assert_eq!(me.get::<_, i64>(3), 0, "times are the database's clock");
    Ok((me.get(0), me.get(1), sum))
}

#[tokio::test]
async fn the_replica_registry_grants_only_released_slots_and_only_to_the_pooler() {
    let t = setup().await;
    let pooler = t.login("dp_pooler", POOLER_PASSWORD).await.unwrap();
    let (a, b) = ("a".repeat(32), "b".repeat(32));

    // The first replica claims the whole budget; the second gets nothing until the
    // first publishes a release, and then no more than was released.
    let (a_id, a_held, _) = heartbeat(&pooler, &a, 10, 0, 10).await.unwrap();
    assert_eq!((a_id, a_held), (1, 10));
    let (b_id, b_held, sum) = heartbeat(&pooler, &b, 10, 0, 5).await.unwrap();
    assert_eq!((b_id, b_held, sum), (2, 0, 10));
    assert_eq!(heartbeat(&pooler, &a, 10, 4, 4).await.unwrap().1, 4);
    let (_, b_held, sum) = heartbeat(&pooler, &b, 10, 0, 9).await.unwrap();
    assert_eq!((b_held, sum), (6, 10));
    // A smaller budget declared by any live replica binds all of them.
    let (_, a_held, _) = heartbeat(&pooler, &a, 8, 4, 9).await.unwrap();
    assert_eq!(a_held, 4, "8 - 6 held by b leaves nothing to grow into");
    // A holding can be reported down, never up past a grant.
    assert_eq!(heartbeat(&pooler, &b, 10, 2, 2).await.unwrap().1, 2);

    // A replica whose lease ran out is gone: its slots and its id are free again.
    let admin = t.admin().await;
    admin
        .execute(
            "UPDATE dataplane_auth.replicas SET heartbeat_at = heartbeat_at - interval '1 hour' \
             WHERE instance = $1",
            &[&a],
        )
        .await
        .unwrap();
    let (_, b_held, sum) = heartbeat(&pooler, &b, 10, 2, 10).await.unwrap();
    assert_eq!((b_held, sum), (10, 10));
    let c = "c".repeat(32);
    let (c_id, c_held, _) = heartbeat(&pooler, &c, 10, 0, 3).await.unwrap();
    assert_eq!(
        (c_id, c_held),
        (a_id, 0),
        "the smallest free id, nothing to grow into"
    );

    // Leaving frees the slots at once; only the named instance leaves.
    let left: bool = pooler
        .query_one("SELECT dataplane_auth.replica_leave($1)", &[&b])
        .await
        .unwrap()
        .get(0);
    assert!(left);
    let (_, c_held, sum) = heartbeat(&pooler, &c, 10, 0, 3).await.unwrap();
    assert_eq!((c_held, sum), (3, 3));

    // Nonsense is refused, not stored.
    assert_eq!(
        sqlstate(heartbeat(&pooler, &c, 10, -1, 3).await),
        "22023",
        "negative holding"
    );
    assert_eq!(
        sqlstate(heartbeat(&pooler, "not-hex", 10, 0, 3).await),
        "23514",
        "instance names are 32 hex digits"
    );

    // The pooler reaches the table only through the functions; nobody else at all.
    for sql in [
        "SELECT * FROM dataplane_auth.replicas",
        "DELETE FROM dataplane_auth.replicas",
        "UPDATE dataplane_auth.replicas SET holding = 0",
    ] {
        assert_eq!(sqlstate(pooler.query(sql, &[]).await), DENIED, "{sql}");
    }
    let (_, app_client) = app(&t, "delta").await;
    let prov = t
        .login("dp_provisioner", crate::common::PROVISIONER_PASSWORD)
        .await
        .unwrap();
    for client in [&app_client, &prov] {
        assert_eq!(sqlstate(heartbeat(client, &c, 10, 0, 10).await), DENIED);
        assert_eq!(
            sqlstate(
                client
                    .query("SELECT dataplane_auth.replica_leave($1)", &[&c])
                    .await
            ),
            DENIED
        );
        assert_eq!(
            sqlstate(
                client
                    .query("SELECT * FROM dataplane_auth.replicas", &[])
                    .await
            ),
            DENIED
        );
    }
}

#[tokio::test]
async fn the_replica_registry_holds_at_most_255_replicas() {
    let t = setup().await;
    let admin = t.admin().await;
    admin
        .batch_execute(
            "INSERT INTO dataplane_auth.replicas (replica_id, instance, lease_ms, budget, demand, holding) \
             SELECT i, lpad(to_hex(i), 32, '0'), 600000, 10, 0, 0 FROM generate_series(1, 255) i",
        )
        .await
        .unwrap();
    let pooler = t.login("dp_pooler", POOLER_PASSWORD).await.unwrap();
    let err = heartbeat(&pooler, &"e".repeat(32), 10, 0, 1).await;
    assert_eq!(sqlstate(err), "53400");
}
