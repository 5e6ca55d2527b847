//! The admin console (`psql -d pgbouncer`), pause and resume, kill, and reloads through
//! the console and the HTTP listener.

use std::collections::HashMap;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::process::Command;
use tokio_postgres::SimpleQueryMessage;

use crate::common::{
    ADMIN_PASSWORD, ADMIN_USER, Env, env, eventually, message, sqlstate, value, with_admin,
};

/// The rows of a console command, each as column → text.
async fn rows(console: &tokio_postgres::Client, sql: &str) -> Vec<HashMap<String, String>> {
    console
        .simple_query(sql)
        .await
        .unwrap()
        .into_iter()
        .filter_map(|m| match m {
            SimpleQueryMessage::Row(r) => Some(
                r.columns()
                    .iter()
                    .enumerate()
                    .map(|(i, c)| (c.name().to_owned(), r.get(i).unwrap_or("").to_owned()))
                    .collect(),
            ),
            _ => None,
        })
        .collect()
}

/// The SHOW POOLS row of `role`, if it has one.
pub(crate) async fn pool_row(
    console: &tokio_postgres::Client,
    role: &str,
) -> Option<HashMap<String, String>> {
    rows(console, "SHOW POOLS")
        .await
        .into_iter()
        .find(|r| r["user"] == role)
}

/// One HTTP/1.1 request to the admin listener: status and body.
async fn http(e: &Env, method: &str, path: &str) -> (u16, String) {
    let mut tcp = tokio::net::TcpStream::connect(("127.0.0.1", e.pooler.admin_addr.port()))
        .await
        .unwrap();
    let request = format!(
        "{method} {path} HTTP/1.1\r\nHost: pooler\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    );
    tcp.write_all(request.as_bytes()).await.unwrap();
    let mut response = String::new();
    tcp.read_to_string(&mut response).await.unwrap();
    let status = response[9..12].parse().unwrap();
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    (status, body)
}

#[tokio::test]
async fn psql_show_pools_lists_each_active_role_and_the_other_commands_answer() {
    let e = env(with_admin).await;
    let (a, b) = (
        e.app(Default::default()).await,
        e.app(Default::default()).await,
    );
    let ca = e.connect(&a).await;
    let cb = e.connect(&b).await;
    ca.simple_query("SELECT 1").await.unwrap();
    cb.simple_query("SELECT 1").await.unwrap();

    let bindir = e.fixture.cluster.bindir().to_owned();
    let out = Command::new(bindir.join("psql"))
        .args(["-X", "-A", "-F", "|", "-P", "footer=off", "-h", "127.0.0.1"])
        .args(["-p", &e.pooler.addr.port().to_string()])
        .args(["-U", ADMIN_USER, "-d", "pgbouncer", "-c", "SHOW POOLS"])
        .env("PGPASSWORD", ADMIN_PASSWORD)
        .env("PGSSLMODE", "disable")
        .output()
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "psql: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    let mut lines = text.lines();
    let header: Vec<&str> = lines.next().unwrap().split('|').collect();
    assert_eq!(
        header,
        [
            "database",
            "user",
            "cl_active",
            "cl_waiting",
            "cl_active_cancel_req",
            "cl_waiting_cancel_req",
            "sv_active",
            "sv_active_cancel",
            "sv_being_canceled",
            "sv_idle",
            "sv_used",
            "sv_tested",
            "sv_login",
            "maxwait",
            "maxwait_us",
            "pool_mode"
        ]
    );
    let mut users: Vec<String> = Vec::new();
    for line in lines {
        let row: HashMap<&str, &str> = header.iter().copied().zip(line.split('|')).collect();
        assert_eq!(row["database"], e.fixture.db);
        assert_eq!(row["cl_active"], "1", "{line}");
        assert_eq!(row["cl_waiting"], "0", "{line}");
        assert_eq!(row["sv_idle"], "1", "{line}");
        assert_eq!(row["pool_mode"], "transaction");
        users.push(row["user"].to_owned());
    }
    users.sort();
    let mut expected = vec![a.role.clone(), b.role.clone()];
    expected.sort();
    assert_eq!(users, expected, "one row per active role");

    // The other commands, over tokio-postgres's simple protocol.
    let console = e.console().await;
    let clients = rows(&console, "SHOW CLIENTS").await;
    let apps: Vec<_> = clients
        .iter()
        .filter(|c| c["database"] == e.fixture.db)
        .collect();
    assert_eq!(apps.len(), 2);
    assert!(
        apps.iter()
            .all(|c| c["type"] == "C" && c["state"] == "idle")
    );
    assert!(
        clients
            .iter()
            .any(|c| c["user"] == ADMIN_USER && c["database"] == "pgbouncer")
    );
    let servers = rows(&console, "SHOW SERVERS").await;
    assert_eq!(servers.len(), 2);
    for s in &servers {
        assert_eq!(s["state"], "idle");
        let pid: i32 = s["remote_pid"].parse().unwrap();
        assert!(pid > 0, "{s:?}");
    }
    let stats = rows(&console, "show stats;").await;
    assert_eq!(stats[0]["database"], e.fixture.db);
    assert!(stats[0]["total_xact_count"].parse::<u64>().unwrap() >= 2);
    let config = rows(&console, "SHOW CONFIG").await;
    let key = |k: &str| config.iter().find(|r| r["key"] == k).unwrap().clone();
    assert_eq!(key("default_pool_size")["changeable"], "yes");
    assert_eq!(key("listen")["changeable"], "no");
    assert!(
        config
            .iter()
            .all(|r| !r["key"].contains("password") && !r["key"].contains("verifier")),
        "secrets are never shown"
    );
    assert_eq!(
        rows(&console, "SHOW DATABASES").await[0]["name"],
        e.fixture.db
    );
    assert!(rows(&console, "SHOW VERSION").await[0]["version"].contains("pooler"));
    let lists = rows(&console, "SHOW LISTS").await;
    assert!(
        lists
            .iter()
            .any(|r| r["list"] == "used_servers" && r["items"] == "2")
    );

    // Unknown commands are errors, and the session goes on.
    let err = console.simple_query("SELECT 1").await.unwrap_err();
    assert_eq!(sqlstate(&err), "42601", "{}", message(&err));
    let err = console.simple_query("SHOW FDS").await.unwrap_err();
    assert_eq!(sqlstate(&err), "0A000");
    // The extended protocol too, with typed columns.
    let row = console
        .query("SHOW POOLS", &[])
        .await
        .unwrap()
        .into_iter()
        .find(|r| r.get::<_, String>("user") == a.role)
        .unwrap();
    assert_eq!(row.get::<_, i64>("cl_active"), 1);

    // /v1/pools: the same numbers as JSON.
    let (status, body) = http(&e, "GET", "/v1/pools").await;
    assert_eq!(status, 200, "{body}");
    let pools: serde_json::Value = serde_json::from_str(&body).unwrap();
    let pools = pools.as_array().unwrap();
    assert_eq!(pools.len(), 2);
    let pa = pools.iter().find(|p| p["user"] == a.role.as_str()).unwrap();
    assert_eq!(pa["cl_active"], 1);
    assert_eq!(pa["sv_idle"], 1);
}

#[tokio::test]
async fn app_roles_and_wrong_passwords_are_refused_the_console_alike() {
    let e = env(with_admin).await;
    let app = e.app(Default::default()).await;
    let mut as_app = e.config(&app.role, &app.password);
    as_app.dbname("pgbouncer");
    // An app's role (with its right password) is refused exactly as a wrong admin
    // password is: the reply never tells which role is the admin.
    let err = dataplane_tests::connect(&as_app).await.unwrap_err();
    assert_eq!(sqlstate(&err), "28P01", "{}", message(&err));
    assert_eq!(
        message(&err),
        format!("password authentication failed for user \"{}\"", app.role)
    );
    as_app.dbname("admin");
    let err = dataplane_tests::connect(&as_app).await.unwrap_err();
    assert_eq!(sqlstate(&err), "28P01");
    assert!(!message(&err).contains(ADMIN_USER), "{}", message(&err));

    let err = dataplane_tests::connect(&e.admin_config("wrong"))
        .await
        .unwrap_err();
    assert_eq!(sqlstate(&err), "28P01", "{}", message(&err));
    assert_eq!(
        message(&err),
        format!("password authentication failed for user \"{ADMIN_USER}\"")
    );
    // The admin role is no app: on the apps' database it is an unknown role.
    let err = e.try_connect(ADMIN_USER, ADMIN_PASSWORD).await.unwrap_err();
    assert_eq!(sqlstate(&err), "28P01");
    // The console works, and opened no server.
    e.console()
        .await
        .simple_query("SHOW VERSION")
        .await
        .unwrap();
    assert_eq!(e.pooler.shared.servers.len(), 0);

    // Without an admin role configured, nobody gets in.
    let off = env(|_| {}).await;
    let err = dataplane_tests::connect(&off.admin_config(ADMIN_PASSWORD))
        .await
        .unwrap_err();
    assert_eq!(sqlstate(&err), "28000");
    assert!(message(&err).contains("disabled"), "{}", message(&err));
}

#[tokio::test]
async fn pause_holds_new_transactions_until_resume() {
    let e = env(with_admin).await;
    let app = e.app_with_pool(2).await;
    let busy = e.connect(&app).await;
    let later = e.connect(&app).await;
    let console = e.console().await;

    // PAUSE returns only once the running transaction has finished.
    busy.batch_execute("BEGIN; SELECT 1").await.unwrap();
    let pause = {
        let console = e.console().await;
        let sql = format!("PAUSE {}", app.role);
        tokio::spawn(async move { console.simple_query(&sql).await.map(|_| ()) })
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(!pause.is_finished(), "PAUSE returned during a transaction");
    busy.batch_execute("COMMIT").await.unwrap();
    pause.await.unwrap().unwrap();

    // A new transaction waits, counted as waiting, until RESUME.
    let held = tokio::spawn(async move {
        let rows = later.simple_query("SELECT 42").await;
        (later, rows)
    });
    eventually("the paused client to be counted as waiting", async || {
        pool_row(&console, &app.role)
            .await
            .is_some_and(|r| r["cl_waiting"] == "1")
    })
    .await;
    assert!(!held.is_finished());
    let err = console.simple_query("RESUME tk_nobody").await.unwrap_err();
    assert_eq!(sqlstate(&err), "55000", "{}", message(&err));
    console
        .simple_query(&format!("RESUME {}", app.role))
        .await
        .unwrap();
    let (_later, result) = held.await.unwrap();
    assert!(result.is_ok(), "{result:?}");
    busy.simple_query("SELECT 1").await.unwrap();

    // PAUSE of every role works the same way.
    console.simple_query("PAUSE").await.unwrap();
    assert!(e.pooler.shared.pause.is_paused(&app.role));
    console.simple_query("RESUME").await.unwrap();
    busy.simple_query("SELECT 1").await.unwrap();
}

/// PAUSE while clients sit idle on servers they keep between transactions: a session-
/// mode client lets its server go at its idle point and gets another (with its
/// parameters) after RESUME, so PAUSE completes; a pinned client whose state cannot
/// move keeps its server, and PAUSE says which client and what it holds.
#[tokio::test]
async fn pause_takes_servers_from_idle_clients_that_keep_them() {
    let e = env(|c| {
        with_admin(c);
        c.session_listen = Some("127.0.0.1:0".parse().unwrap());
        c.admin.pause_timeout_ms = 1_500;
    })
    .await;
    let app = e.app_with_pool(3).await;
    let session_port = e.pooler.session_addr.unwrap().port();
    let console = e.console().await;
    let in_session =
        dataplane_tests::connect(&e.config_on_port(&app.role, &app.password, session_port))
            .await
            .unwrap();
    in_session
        .batch_execute("SET TimeZone = 'Asia/Tokyo'; SET statement_timeout = '7s'")
        .await
        .unwrap();
    let pid = value(&in_session, "SELECT pg_backend_pid()").await;

    // Only an idle session-mode client: PAUSE completes.
    let pause = format!("PAUSE {}", app.role);
    console.simple_query(&pause).await.unwrap();
    console
        .simple_query(&format!("RESUME {}", app.role))
        .await
        .unwrap();
    assert_ne!(
        value(&in_session, "SELECT pg_backend_pid()").await,
        pid,
        "a new server after the pause"
    );
    assert_eq!(value(&in_session, "SHOW TimeZone").await, "Asia/Tokyo");
    assert_eq!(value(&in_session, "SHOW statement_timeout").await, "7s");

    // A client pinned by an SQL prepared statement cannot move, nor can a session-mode
    // client listening on a channel (in session mode LISTEN stays on its server): PAUSE
    // names both, and what each holds.
    let pinned = e.connect(&app).await;
    pinned
        .batch_execute("PREPARE mine AS SELECT 1")
        .await
        .unwrap();
    let listener = e.connect_on(&app, session_port).await;
    listener.batch_execute("LISTEN somewhere").await.unwrap();
    in_session.simple_query("SELECT 1").await.unwrap();
    let err = console.simple_query(&pause).await.unwrap_err();
    assert_eq!(sqlstate(&err), "55000");
    let text = message(&err);
    assert!(text.contains("2 held by idle clients"), "{text}");
    assert!(
        text.contains(&format!("of role \"{}\"", app.role)),
        "{text}"
    );
    assert!(text.contains("SQL prepared statements: 1"), "{text}");
    assert!(text.contains("LISTEN channels: 1"), "{text}");
    // Once they let go of what they hold, their servers go back.
    pinned.batch_execute("DEALLOCATE mine").await.unwrap();
    listener.batch_execute("UNLISTEN *").await.unwrap();
    console.simple_query(&pause).await.unwrap();
    console
        .simple_query(&format!("RESUME {}", app.role))
        .await
        .unwrap();
    pinned.simple_query("SELECT 1").await.unwrap();
    listener.simple_query("SELECT 1").await.unwrap();
    assert_eq!(value(&in_session, "SHOW TimeZone").await, "Asia/Tokyo");
}

#[tokio::test]
async fn kill_disconnects_a_roles_clients_and_closes_its_servers() {
    let e = env(with_admin).await;
    let app = e.app(Default::default()).await;
    let other = e.app(Default::default()).await;
    let victim = e.connect(&app).await;
    let bystander = e.connect(&other).await;
    victim.simple_query("SELECT 1").await.unwrap();
    bystander.simple_query("SELECT 1").await.unwrap();
    let console = e.console().await;
    console
        .simple_query(&format!("KILL {}", app.role))
        .await
        .unwrap();
    eventually("the killed client to be disconnected", async || {
        victim.is_closed()
    })
    .await;
    eventually("the role's servers to close", async || {
        e.backends(&app.role).await == 0
    })
    .await;
    bystander.simple_query("SELECT 1").await.unwrap();
    // Not a revocation: the role logs in again at once.
    e.connect(&app)
        .await
        .simple_query("SELECT 1")
        .await
        .unwrap();
    let err = console.simple_query("KILL tk_nobody").await.unwrap_err();
    assert_eq!(sqlstate(&err), "42704");
}

#[tokio::test]
async fn shutdown_asks_the_binary_to_drain() {
    let e = env(with_admin).await;
    let console = e.console().await;
    console.simple_query("SHUTDOWN").await.unwrap();
    tokio::time::timeout(Duration::from_secs(10), e.pooler.shutdown_requested())
        .await
        .expect("SHUTDOWN reached the binary's loop");
}

#[tokio::test]
async fn reload_lowers_a_pool_size_live_and_keeps_the_old_config_when_invalid() {
    let e = crate::common::env_with_file(|c| c.default_pool_size = 4).await;
    let path = e.config_file.clone().unwrap();
    let app = e.app(Default::default()).await;
    let mut clients = Vec::new();
    for _ in 0..4 {
        clients.push(e.connect(&app).await);
    }
    // Four transactions at once: four servers.
    for c in &clients {
        c.batch_execute("BEGIN; SELECT 1").await.unwrap();
    }
    for c in &clients {
        c.batch_execute("COMMIT").await.unwrap();
    }
    assert_eq!(e.backends(&app.role).await, 4);

    // RELOAD through the console.
    let mut config = (**e.pooler.shared.config()).clone();
    config.default_pool_size = 1;
    crate::common::write_config(&path, &config);
    let console = e.console().await;
    console.simple_query("RELOAD").await.unwrap();
    assert_eq!(e.pooler.shared.config().default_pool_size, 1);
    eventually("the surplus servers to close", async || {
        e.backends(&app.role).await == 1
    })
    .await;
    for c in &clients {
        c.simple_query("SELECT 1").await.unwrap();
        assert!(!c.is_closed());
    }
    let row = pool_row(&console, &app.role).await.unwrap();
    assert_eq!(row["cl_active"], "4");
    assert_eq!(row["sv_idle"], "1");

    // Invalid TOML is refused with the reason; the old configuration stays.
    std::fs::write(&path, "default_pool_size = [").unwrap();
    let err = console.simple_query("RELOAD").await.unwrap_err();
    assert_eq!(sqlstate(&err), "F0000", "{}", message(&err));
    assert!(message(&err).contains("parsing"), "{}", message(&err));
    assert_eq!(e.pooler.shared.config().default_pool_size, 1);
    clients[0].simple_query("SELECT 1").await.unwrap();

    // POST /v1/reload: a live key applies, a restart-only one is reported and kept.
    config.default_pool_size = 2;
    config.listen = "127.0.0.1:1".parse().unwrap();
    crate::common::write_config(&path, &config);
    let (status, body) = http(&e, "POST", "/v1/reload").await;
    assert_eq!(status, 200, "{body}");
    let report: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(report["applied"], serde_json::json!(["default_pool_size"]));
    assert_eq!(report["needs_restart"], serde_json::json!(["listen"]));
    let now = e.pooler.shared.config();
    assert_eq!(now.default_pool_size, 2);
    assert_eq!(now.listen.port(), 0, "listen keeps its old value");

    // A configuration that parses but cannot work: 400 problem+json.
    config.max_server_connections = 0;
    crate::common::write_config(&path, &config);
    let (status, body) = http(&e, "POST", "/v1/reload").await;
    assert_eq!(status, 400, "{body}");
    let problem: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert!(
        problem["detail"]
            .as_str()
            .unwrap()
            .contains("max_server_connections"),
        "{problem}"
    );
    assert_eq!(e.pooler.shared.config().max_server_connections, 40);
    clients[1].simple_query("SELECT 1").await.unwrap();
}

#[tokio::test]
async fn a_reload_picks_up_a_renewed_certificate() {
    use crate::tls::{pki, psql, tempfile_dir};
    use pooler::config::TlsMode;
    let (old, new) = (pki(), pki());
    let dir = tempfile_dir();
    let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
    let (old_ca, new_ca) = (dir.join("old-ca.pem"), dir.join("new-ca.pem"));
    std::fs::write(&cert, &old.cert_pem).unwrap();
    std::fs::write(&key, &old.key_pem).unwrap();
    std::fs::write(&old_ca, &old.ca_pem).unwrap();
    std::fs::write(&new_ca, &new.ca_pem).unwrap();
    let e = crate::common::env_with_file(|c| {
        c.client_tls.mode = TlsMode::Require;
        c.client_tls.cert_file = Some(cert.clone());
        c.client_tls.key_file = Some(key.clone());
    })
    .await;
    let app = e.app(Default::default()).await;
    let bindir = e.fixture.cluster.bindir().to_owned();
    let port = e.pooler.addr.port();
    let login = async |root: &std::path::Path| {
        let root = root.display().to_string();
        let db = &e.fixture.db;
        psql(
            &bindir,
            port,
            &app.role,
            &app.password,
            db,
            "verify-full",
            &root,
        )
        .await
    };
    assert!(login(&old_ca).await.status.success());
    assert!(!login(&new_ca).await.status.success());

    // The files are renewed in place, as a certificate manager does; a reload reads them.
    std::fs::write(&cert, &new.cert_pem).unwrap();
    std::fs::write(&key, &new.key_pem).unwrap();
    let (status, body) = http(&e, "POST", "/v1/reload").await;
    assert_eq!(status, 200, "{body}");
    let out = login(&new_ca).await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!login(&old_ca).await.status.success());

    // A key that does not parse is refused, and the renewed certificate stays in use.
    std::fs::write(&key, "not a key").unwrap();
    let (status, body) = http(&e, "POST", "/v1/reload").await;
    assert_eq!(status, 400, "{body}");
    assert!(login(&new_ca).await.status.success());
    let _ = std::fs::remove_dir_all(&dir);
}
