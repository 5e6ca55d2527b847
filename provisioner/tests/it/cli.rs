//! The break-glass subcommands of the real binary, against the real database: one JSON
//! object on stdout, the password only from ensure and rotate, stable error codes and
//! exit statuses.

use dataplane_tests::unique_tenant_id;
use serde_json::Value;

use crate::common::{PROVISIONER_PASSWORD, TestDb, setup};

struct Run {
    status: i32,
    json: Value,
    stderr: String,
}

/// Runs `provisioner <args>` as `dp_provisioner` on the test's database.
async fn provisioner(t: &TestDb, args: &[&str]) -> Run {
    let url = format!(
        "postgres://dp_provisioner:{PROVISIONER_PASSWORD}@127.0.0.1:{}/{}",
        t.cluster.port(),
        t.db
    );
    run_with_url(&url, args).await
}

async fn run_with_url(url: &str, args: &[&str]) -> Run {
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_provisioner"))
        .args(args)
        .env("DATABASE_URL", url)
        .env("PROVISIONER_PUBLIC_HOST", "pooler.test")
        .env("PROVISIONER_PUBLIC_SSLMODE", "require")
        .env_remove("RUST_LOG")
        .output()
        .await
        .unwrap();
    let stdout = String::from_utf8(out.stdout).unwrap();
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert_eq!(
        stdout.lines().count(),
        1,
        "exactly one line of output: {stdout}\n{stderr}"
    );
    let json = serde_json::from_str(&stdout).unwrap_or_else(|e| panic!("{e}: {stdout}"));
    Run {
        status: out.status.code().unwrap(),
        json,
        stderr,
    }
}

impl Run {
    fn ok(self) -> Value {
        assert_eq!(self.status, 0, "{}\n{}", self.json, self.stderr);
        self.json
    }

    fn failed(self, status: i32, code: &str) -> Value {
        assert_eq!(self.status, status, "{}\n{}", self.json, self.stderr);
        assert_eq!(self.json["code"], code, "{}", self.json);
        self.json
    }
}

fn role(tenant: u64, slug: &str, env: &str) -> String {
    format!("tk_t{tenant}_p{}_{env}", slug.replace('-', "_"))
}

#[tokio::test]
async fn ensure_prints_the_password_once_and_it_logs_in() {
    let t = setup().await;
    let tenant = unique_tenant_id().to_string();
    let created = provisioner(&t, &["ensure", &tenant, "break-glass", "prod"])
        .await
        .ok();
    let name = role(tenant.parse().unwrap(), "break-glass", "prod");
    assert_eq!(created["outcome"], "created");
    assert_eq!(created["role"], name.as_str());
    assert_eq!(created["host"], "pooler.test");
    let password = created["password"].as_str().unwrap().to_owned();
    assert!(
        created["connection_uri"]
            .as_str()
            .unwrap()
            .starts_with(&format!("postgresql://{name}:{password}@pooler.test:5432/")),
        "{created}"
    );
    t.login(&name, &password).await.unwrap();

    let again = provisioner(&t, &["ensure", &tenant, "break-glass", "prod"]).await;
    assert!(
        !again.stderr.contains(&password),
        "the password reached the log"
    );
    let again = again.ok();
    assert_eq!(again["outcome"], "existing");
    assert!(again.get("password").is_none(), "{again}");

    // The audit log tells break-glass changes apart.
    let request_id: Option<String> = t
        .admin()
        .await
        .query_one(
            "SELECT request_id FROM dataplane_auth.audit_log WHERE role_name = $1 AND action = 'create'",
            &[&name],
        )
        .await
        .unwrap()
        .get(0);
    assert!(request_id.unwrap().starts_with("cli-"));
}

#[tokio::test]
async fn ensure_takes_limits() {
    let t = setup().await;
    let tenant = unique_tenant_id().to_string();
    let app = provisioner(
        &t,
        &[
            "ensure",
            &tenant,
            "limited",
            "dev",
            "--pool-size",
            "3",
            "--connection-limit",
            "-1",
        ],
    )
    .await
    .ok();
    assert_eq!(app["limits"]["pool_size"], 3);
    assert_eq!(app["limits"]["connection_limit"], -1);
    assert_eq!(app["limits"]["pool_mode"], "transaction");
}

#[tokio::test]
async fn get_and_list_never_show_a_password() {
    let t = setup().await;
    let tenant = unique_tenant_id().to_string();
    provisioner(&t, &["ensure", &tenant, "one", "dev"])
        .await
        .ok();
    provisioner(&t, &["ensure", &tenant, "two", "dev"])
        .await
        .ok();

    let one = provisioner(&t, &["get", &tenant, "one", "dev"]).await.ok();
    assert_eq!(one["slug"], "one");
    assert!(one.get("password").is_none());

    let listed = provisioner(&t, &["list", "--tenant-id", &tenant])
        .await
        .ok();
    let apps = listed["apps"].as_array().unwrap();
    let roles: Vec<&str> = apps.iter().map(|a| a["role"].as_str().unwrap()).collect();
    let tenant_id: u64 = tenant.parse().unwrap();
    assert_eq!(
        roles,
        [role(tenant_id, "one", "dev"), role(tenant_id, "two", "dev")]
    );
    assert!(apps.iter().all(|a| a.get("password").is_none()));

    let all = provisioner(&t, &["list"]).await.ok();
    assert!(all["apps"].as_array().unwrap().len() >= 2);
}

#[tokio::test]
async fn rotate_prints_a_new_password_and_the_old_one_stops_working() {
    let t = setup().await;
    let tenant = unique_tenant_id().to_string();
    let created = provisioner(&t, &["ensure", &tenant, "rotated", "prod"])
        .await
        .ok();
    let old = created["password"].as_str().unwrap();
    let rotated = provisioner(&t, &["rotate", &tenant, "rotated", "prod"])
        .await
        .ok();
    let new = rotated["password"].as_str().unwrap();
    assert_ne!(old, new);
    assert_eq!(
        rotated["generation"],
        created["generation"].as_i64().unwrap() + 1
    );
    let name = role(tenant.parse().unwrap(), "rotated", "prod");
    assert!(t.login(&name, old).await.is_err());
    t.login(&name, new).await.unwrap();
}

#[tokio::test]
async fn limits_change_what_is_given_and_refuse_nothing_or_nonsense() {
    let t = setup().await;
    let tenant = unique_tenant_id().to_string();
    provisioner(&t, &["ensure", &tenant, "tuned", "prod"])
        .await
        .ok();
    let app = provisioner(
        &t,
        &[
            "limits",
            &tenant,
            "tuned",
            "prod",
            "--pool-mode",
            "session",
            "--statement-timeout-ms",
            "5000",
        ],
    )
    .await
    .ok();
    assert_eq!(app["limits"]["pool_mode"], "session");
    assert_eq!(app["limits"]["statement_timeout_ms"], 5000);
    assert_eq!(app["limits"]["connection_limit"], 20, "others unchanged");
    assert!(app.get("password").is_none());

    provisioner(&t, &["limits", &tenant, "tuned", "prod"])
        .await
        .failed(2, "invalid_arguments");
    let bad = provisioner(
        &t,
        &["limits", &tenant, "tuned", "prod", "--pool-size", "0"],
    )
    .await
    .failed(2, "invalid_limits");
    assert!(bad["detail"].as_str().unwrap().contains("pool_size"));
}

#[tokio::test]
async fn suspend_stops_logins_and_resume_restores_them() {
    let t = setup().await;
    let tenant = unique_tenant_id().to_string();
    let created = provisioner(&t, &["ensure", &tenant, "paused", "prod"])
        .await
        .ok();
    let password = created["password"].as_str().unwrap();
    let name = role(tenant.parse().unwrap(), "paused", "prod");
    let suspended = provisioner(&t, &["suspend", &tenant, "paused", "prod"])
        .await
        .ok();
    assert_eq!(suspended["disabled"], true);
    assert!(t.login(&name, password).await.is_err());
    let resumed = provisioner(&t, &["resume", &tenant, "paused", "prod"])
        .await
        .ok();
    assert_eq!(resumed["disabled"], false);
    t.login(&name, password).await.unwrap();
}

#[tokio::test]
async fn delete_removes_the_app_and_is_idempotent() {
    let t = setup().await;
    let tenant = unique_tenant_id().to_string();
    provisioner(&t, &["ensure", &tenant, "doomed", "dev"])
        .await
        .ok();
    let name = role(tenant.parse().unwrap(), "doomed", "dev");
    let deleted = provisioner(&t, &["delete", &tenant, "doomed", "dev"])
        .await
        .ok();
    assert_eq!(deleted["outcome"], "deleted");
    assert_eq!(deleted["role"], name.as_str());
    let again = provisioner(&t, &["delete", &tenant, "doomed", "dev"])
        .await
        .ok();
    assert_eq!(again["outcome"], "already_gone");
    let roles = t
        .admin()
        .await
        .query("SELECT 1 FROM pg_roles WHERE rolname = $1", &[&name])
        .await
        .unwrap();
    assert!(roles.is_empty());

    provisioner(&t, &["get", &tenant, "doomed", "dev"])
        .await
        .failed(3, "not_found");
    provisioner(&t, &["rotate", &tenant, "doomed", "dev"])
        .await
        .failed(3, "not_found");
}

#[tokio::test]
async fn bad_names_are_refused_before_connecting_and_a_dead_database_is_reported() {
    // Nothing listens on port 1: a name error must come before any connection attempt.
    let dead = "postgres://dp_provisioner:x@127.0.0.1:1/nowhere";
    let refused = run_with_url(dead, &["ensure", "007", "shop", "prod"])
        .await
        .failed(2, "invalid_name");
    assert!(refused["detail"].as_str().unwrap().contains("tenant id"));
    run_with_url(dead, &["ensure", "7", "Shop", "prod"])
        .await
        .failed(2, "invalid_name");
    run_with_url(dead, &["list", "--tenant-id", "x"])
        .await
        .failed(2, "invalid_name");
    run_with_url(dead, &["get", "7", "shop", "prod"])
        .await
        .failed(1, "database_unavailable");
    run_with_url("not a url", &["get", "7", "shop", "prod"])
        .await
        .failed(2, "invalid_arguments");
}
