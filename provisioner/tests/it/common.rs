//! Shared set-up: the binary's one cluster, a fresh migrated database per test, and a
//! provisioner serving as the least-privileged `dp_provisioner`, as in production.

use std::sync::Arc;

use axum::Router;
use axum::body::Body;
use axum::http::{HeaderMap, Request, StatusCode};
use dataplane_tests::PgCluster;
use http_body_util::BodyExt;
use provisioner::Provisioner;
use provisioner::config::{ApiToken, PublicEndpoint};
use provisioner::http::{AppState, app};
use provisioner::metrics::Metrics;
use tower::ServiceExt;

pub const TOKEN: &str = "test-token-0123456789";
pub use dataplane_tests::fixtures::{POOLER_PASSWORD, PROVISIONER_PASSWORD};

pub struct TestDb {
    pub cluster: &'static PgCluster,
    pub db: String,
    pub router: Router,
    pub metrics: Metrics,
}

pub async fn setup() -> TestDb {
    // Warnings and errors of the code under test show up in a failing test's output.
    let _ = tracing_subscriber::fmt()
        .with_test_writer()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .try_init();
    let fixture = dataplane_tests::fixtures::shared_migrated_database().await;
    let metrics = Metrics::new().unwrap();
    let router = router_for(fixture.provisioner(), metrics.clone());
    TestDb {
        cluster: fixture.cluster,
        db: fixture.db,
        router,
        metrics,
    }
}

pub fn router_for(provisioner: Provisioner, metrics: Metrics) -> Router {
    app(AppState {
        provisioner,
        token: Arc::new(ApiToken::new(TOKEN).unwrap()),
        public: Arc::new(PublicEndpoint {
            host: "pooler.test".into(),
            port: 6432,
            sslmode: "require".into(),
        }),
        metrics,
    })
}

pub async fn superuser(cluster: &PgCluster, db: &str) -> tokio_postgres::Client {
    dataplane_tests::connect(&cluster.superuser_config(db))
        .await
        .unwrap()
}

impl TestDb {
    pub async fn admin(&self) -> tokio_postgres::Client {
        superuser(self.cluster, &self.db).await
    }

    /// Logs in as `user` over TCP with SCRAM.
    pub async fn login(
        &self,
        user: &str,
        password: &str,
    ) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
        dataplane_tests::connect(&self.cluster.config(user, password, &self.db)).await
    }

    pub async fn call(&self, method: &str, uri: &str, body: Option<&str>) -> Reply {
        call(&self.router, method, uri, Some(TOKEN), body).await
    }

    /// PUT an app and return (status, body).
    pub async fn ensure(&self, tenant: u64, slug: &str, env: &str) -> Reply {
        self.call("PUT", &format!("/v1/apps/{tenant}/{slug}/{env}"), None)
            .await
    }
}

pub struct Reply {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub text: String,
}

impl Reply {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.text).unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.text))
    }

    pub fn str(&self, field: &str) -> String {
        self.json()[field]
            .as_str()
            .unwrap_or_else(|| panic!("no string {field} in {}", self.text))
            .to_owned()
    }
}

pub async fn call(
    router: &Router,
    method: &str,
    uri: &str,
    token: Option<&str>,
    body: Option<&str>,
) -> Reply {
    let mut req = Request::builder().method(method).uri(uri);
    if let Some(t) = token {
        req = req.header("authorization", format!("Bearer {t}"));
    }
    if body.is_some() {
        req = req.header("content-type", "application/json");
    }
    let req = req.body(Body::from(body.unwrap_or("").to_owned())).unwrap();
    let resp = router.clone().oneshot(req).await.unwrap();
    let status = resp.status();
    let headers = resp.headers().clone();
    let bytes = resp.into_body().collect().await.unwrap().to_bytes();
    Reply {
        status,
        headers,
        text: String::from_utf8_lossy(&bytes).into_owned(),
    }
}

/// The SQLSTATE of a failed statement.
pub fn sqlstate<T: std::fmt::Debug>(r: Result<T, tokio_postgres::Error>) -> String {
    match r {
        Ok(v) => panic!("expected an error, got {v:?}"),
        Err(e) => e
            .code()
            .map(|c| c.code().to_owned())
            .unwrap_or_else(|| format!("no code: {e}")),
    }
}
