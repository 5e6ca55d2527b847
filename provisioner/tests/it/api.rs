//! The HTTP contract: tokens, bad names, unknown apps, concurrency, an unreachable
//! database, metrics.

use std::collections::HashMap;

use dataplane_tests::unique_tenant_id;
use provisioner::Provisioner;
use provisioner::ddl::Limits;
use provisioner::metrics::Metrics;

use crate::common::{TOKEN, call, router_for, setup};

#[tokio::test]
async fn missing_or_wrong_token_is_401_problem_json() {
    let t = setup().await;
    let uri = format!("/v1/apps/{}/shop/dev", unique_tenant_id());
    for token in [None, Some("wrong-token-0123456789"), Some("")] {
        for (method, suffix) in [
            ("PUT", ""),
            ("GET", ""),
            ("DELETE", ""),
            ("PATCH", ""),
            ("POST", "/rotate-password"),
            ("POST", "/suspend"),
            ("POST", "/resume"),
        ] {
            let r = call(&t.router, method, &format!("{uri}{suffix}"), token, None).await;
            assert_eq!(r.status, 401, "{method} with {token:?}");
            assert_eq!(r.headers["content-type"], "application/problem+json");
            assert_eq!(r.headers["www-authenticate"], "Bearer");
            assert_eq!(r.json()["code"], "unauthorized");
        }
    }
    let list = call(&t.router, "GET", "/v1/apps", None, None).await;
    assert_eq!(list.status, 401);
    // Nothing was created by the refused PUTs.
    let admin = t.admin().await;
    let n: i64 = admin
        .query_one("SELECT count(*) FROM dataplane_auth.credentials", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 0);
}

#[tokio::test]
async fn names_past_63_bytes_are_refused_and_create_nothing() {
    let t = setup().await;
    let tenant = unique_tenant_id();
    // tk_t<tenant>_p + slug + _prod: one byte over the limit.
    let fixed = format!("tk_t{tenant}_p_prod").len();
    let slug = format!("a{}", "b".repeat(64 - fixed - 1));
    let r = t.ensure(tenant, &slug, "prod").await;
    assert_eq!(r.status, 422, "{}", r.text);
    assert_eq!(r.headers["content-type"], "application/problem+json");
    assert_eq!(r.json()["code"], "invalid_name");
    assert!(r.str("detail").contains("63"), "{}", r.text);

    for (tenant, slug, env) in [
        ("0", "shop", "dev"),
        ("12", "Shop", "dev"),
        ("12", "sh_op", "dev"),
        ("12", "shop", "d-v"),
        ("12", "shop", "abcdefghijklmnopq"),
        ("1234567890123", "shop", "dev"),
    ] {
        let r = t
            .call("PUT", &format!("/v1/apps/{tenant}/{slug}/{env}"), None)
            .await;
        assert_eq!(r.status, 422, "{tenant}/{slug}/{env}");
        assert_eq!(r.json()["code"], "invalid_name");
    }

    let admin = t.admin().await;
    let like = format!("tk_t{tenant}\\_%");
    let row = admin
        .query_one(
            "SELECT (SELECT count(*) FROM pg_roles WHERE rolname LIKE $1), \
                    (SELECT count(*) FROM pg_namespace WHERE nspname LIKE $1), \
                    (SELECT count(*) FROM pg_roles WHERE rolname LIKE 'tk\\_t12\\_%'), \
                    (SELECT count(*) FROM dataplane_auth.credentials)",
            &[&like],
        )
        .await
        .unwrap();
    for i in 0..4 {
        assert_eq!(row.get::<_, i64>(i), 0, "column {i}");
    }
}

#[tokio::test]
async fn fifty_concurrent_ensures_create_each_app_exactly_once() {
    let t = setup().await;
    let tenants: Vec<u64> = (0..10).map(|_| unique_tenant_id()).collect();
    let mut tasks = Vec::new();
    for i in 0..50 {
        let router = t.router.clone();
        let tenant = tenants[i % tenants.len()];
        let env = if (i / 10) % 2 == 0 { "prod" } else { "dev" };
        tasks.push(tokio::spawn(async move {
            let r = call(
                &router,
                "PUT",
                &format!("/v1/apps/{tenant}/race/{env}"),
                Some(TOKEN),
                None,
            )
            .await;
            (format!("{tenant}/{env}"), r.status.as_u16(), r.text)
        }));
    }
    let mut created: HashMap<String, usize> = HashMap::new();
    for task in tasks {
        let (app, status, text) = task.await.unwrap();
        assert!(status == 200 || status == 201, "{app}: {status} {text}");
        *created.entry(app).or_default() += usize::from(status == 201);
    }
    // 10 tenants x 2 envs, 50 requests cover all 20 apps.
    assert_eq!(created.len(), 20);
    assert!(created.values().all(|&n| n == 1), "{created:?}");

    let admin = t.admin().await;
    for tenant in &tenants {
        let like = format!("tk_t{tenant}\\_%");
        let n: i64 = admin
            .query_one(
                "SELECT count(*) FROM pg_roles WHERE rolname LIKE $1",
                &[&like],
            )
            .await
            .unwrap()
            .get(0);
        assert_eq!(n, 2, "tenant {tenant}");
    }
    let list = t
        .call("GET", &format!("/v1/apps?tenant_id={}", tenants[0]), None)
        .await;
    assert_eq!(list.status, 200);
    assert_eq!(list.json()["apps"].as_array().unwrap().len(), 2);
    assert!(!list.text.contains("password"));
}

#[tokio::test]
async fn unknown_apps_are_404() {
    let t = setup().await;
    let tenant = unique_tenant_id();
    for (method, suffix) in [
        ("GET", ""),
        ("POST", "/rotate-password"),
        ("POST", "/suspend"),
        ("POST", "/resume"),
    ] {
        let r = t
            .call(
                method,
                &format!("/v1/apps/{tenant}/ghost/dev{suffix}"),
                None,
            )
            .await;
        assert_eq!(r.status, 404, "{method} {suffix}");
        assert_eq!(r.json()["code"], "not_found");
    }
    let r = t
        .call(
            "PATCH",
            &format!("/v1/apps/{tenant}/ghost/dev"),
            Some(r#"{"pool_size": 2}"#),
        )
        .await;
    assert_eq!(r.status, 404);
    let r = t.call("GET", "/no/such/route", None).await;
    assert_eq!(r.status, 404);
}

#[tokio::test]
async fn errors_axum_makes_are_problem_json_too() {
    let t = setup().await;
    for (method, uri, status, code) in [
        ("POST", "/v1/apps/7/shop/dev", 405, "method_not_allowed"),
        ("GET", "/v1/apps/7/%FF/dev", 400, "bad_request"),
        (
            "GET",
            "/v1/apps?tenant_id=1&tenant_id=2",
            400,
            "bad_request",
        ),
    ] {
        let r = t.call(method, uri, None).await;
        assert_eq!(r.status, status, "{method} {uri}: {}", r.text);
        assert_eq!(
            r.headers["content-type"], "application/problem+json",
            "{method} {uri}"
        );
        assert_eq!(r.json()["code"], code, "{method} {uri}");
    }
}

#[tokio::test]
async fn an_unreachable_database_is_503() {
    let t = setup().await;
    // A port nothing listens on.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut config = tokio_postgres::Config::new();
    config
        .host("127.0.0.1")
        .port(port)
        .user("dp_provisioner")
        .password("x")
        .dbname(&t.db);
    let router = router_for(
        Provisioner::new(config, 2, Limits::default()).unwrap(),
        Metrics::new().unwrap(),
    );
    let r = call(
        &router,
        "PUT",
        &format!("/v1/apps/{}/shop/dev", unique_tenant_id()),
        Some(TOKEN),
        None,
    )
    .await;
    assert_eq!(r.status, 503, "{}", r.text);
    assert_eq!(r.json()["code"], "database_unavailable");
    let ready = call(&router, "GET", "/readyz", None, None).await;
    assert_eq!(ready.status, 503);
    let health = call(&router, "GET", "/healthz", None, None).await;
    assert_eq!(health.status, 200);
    let ok = call(&t.router, "GET", "/readyz", None, None).await;
    assert_eq!(ok.status, 200);
}

#[tokio::test]
async fn metrics_count_requests_and_operations() {
    let t = setup().await;
    let tenant = unique_tenant_id();
    t.ensure(tenant, "metered", "dev").await;
    t.ensure(tenant, "metered", "dev").await;
    call(&t.router, "GET", "/v1/apps", None, None).await;
    let m = call(&t.router, "GET", "/metrics", None, None).await;
    assert_eq!(m.status, 200);
    let text = &m.text;
    assert!(
        text.contains(r#"provisioner_operations_total{operation="ensure",outcome="created"} 1"#),
        "{text}"
    );
    assert!(
        text.contains(r#"provisioner_operations_total{operation="ensure",outcome="existing"} 1"#)
    );
    assert!(text.contains(
        r#"provisioner_http_requests_total{method="PUT",route="/v1/apps/{tenant_id}/{slug}/{env}",status="201"} 1"#
    ));
    assert!(text.contains(
        r#"provisioner_http_requests_total{method="GET",route="/v1/apps",status="401"} 1"#
    ));
    assert!(text.contains("provisioner_http_request_duration_seconds_bucket"));
    // The process collector: what an operator looks at first when the service is slow.
    for name in [
        "process_cpu_seconds_total",
        "process_resident_memory_bytes",
        "process_open_fds",
        "process_max_fds",
    ] {
        assert!(
            text.contains(&format!("\n{name} ")),
            "{name} missing: {text}"
        );
    }
    // Every line is a comment or `name{labels} value`.
    for line in text
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
    {
        let value = line.rsplit(' ').next().unwrap();
        assert!(value.parse::<f64>().is_ok(), "{line}");
    }
    let _ = &t.metrics;

    let spec = call(&t.router, "GET", "/openapi.json", None, None).await;
    assert_eq!(spec.status, 200);
    assert!(spec.json()["openapi"].as_str().unwrap().starts_with("3."));
}

/// The operation of `openapi.json` a request reaches: its path template and method.
fn operation_of(doc: &serde_json::Value, method: &str, uri: &str) -> serde_json::Value {
    let path = uri.split('?').next().unwrap();
    let segments: Vec<&str> = path.split('/').collect();
    for (template, item) in doc["paths"].as_object().unwrap() {
        let parts: Vec<&str> = template.split('/').collect();
        let fits = parts.len() == segments.len()
            && parts
                .iter()
                .zip(&segments)
                .all(|(t, s)| t.starts_with('{') || t == s);
        if fits {
            return item[method.to_lowercase()].clone();
        }
    }
    panic!("{method} {uri} matches no path of openapi.json");
}

/// Every status the API answers, for each kind of failure a client can cause, is one
/// the served OpenAPI document lists under that operation, with a problem code from
/// its `Problem.code` enum: generated clients and validators agree with the server.
#[tokio::test]
async fn every_status_answered_is_documented() {
    let t = setup().await;
    let doc = call(&t.router, "GET", "/openapi.json", None, None)
        .await
        .json();
    let codes = doc["components"]["schemas"]["Problem"]["properties"]["code"]["enum"].clone();
    let tenant = unique_tenant_id();
    let app = format!("/v1/apps/{tenant}/documented/dev");
    let big = format!("{{\"pool_size\": 1, \"x\": \"{}\"}}", "a".repeat(3 << 20));
    let too_long_slug = format!("/v1/apps/{tenant}/{}/dev", "a".repeat(60));
    let ensure_first = t.call("PUT", &app, None).await;
    assert_eq!(ensure_first.status, 201, "{}", ensure_first.text);
    let cases: Vec<(&str, String, Option<&str>, bool, u16)> = vec![
        ("PUT", app.clone(), None, true, 200),
        ("GET", app.clone(), None, true, 200),
        ("GET", app.clone(), None, false, 401),
        ("GET", "/v1/apps/7/%FF/dev".into(), None, true, 400),
        ("GET", "/v1/apps/07/shop/dev".into(), None, true, 422),
        ("GET", too_long_slug, None, true, 422),
        (
            "GET",
            format!("/v1/apps/{tenant}/ghost/dev"),
            None,
            true,
            404,
        ),
        (
            "GET",
            "/v1/apps?tenant_id=1&tenant_id=2".into(),
            None,
            true,
            400,
        ),
        ("GET", "/v1/apps?tenant_id=".into(), None, true, 422),
        ("GET", "/v1/apps?tenant_id=x".into(), None, true, 422),
        (
            "GET",
            format!("/v1/apps?tenant_id={tenant}"),
            None,
            true,
            200,
        ),
        ("PUT", "/v1/apps/7/%FF/dev".into(), None, true, 400),
        ("PUT", app.clone(), Some(big.as_str()), true, 413),
        ("PATCH", app.clone(), Some(big.as_str()), true, 413),
        ("PATCH", app.clone(), Some("{\"pool_size\": 0}"), true, 422),
        ("PATCH", app.clone(), Some("not json"), true, 422),
        ("PATCH", app.clone(), None, true, 422),
        ("PATCH", app.clone(), Some("{\"pool_size\": 2}"), true, 200),
        ("POST", format!("{app}/suspend"), None, true, 200),
        ("POST", format!("{app}/resume"), None, true, 200),
        ("POST", format!("{app}/rotate-password"), None, true, 200),
        ("POST", "/v1/apps/7/%FF/dev/suspend".into(), None, true, 400),
        ("DELETE", "/v1/apps/7/%FF/dev".into(), None, true, 400),
        ("DELETE", app.clone(), None, true, 204),
        ("GET", "/healthz".into(), None, false, 200),
        ("GET", "/readyz".into(), None, false, 200),
        ("GET", "/metrics".into(), None, false, 200),
    ];
    for (method, uri, body, authorized, status) in cases {
        let token = authorized.then_some(TOKEN);
        let r = call(&t.router, method, &uri, token, body).await;
        let short: String = uri.chars().take(60).collect();
        assert_eq!(r.status.as_u16(), status, "{method} {short}: {}", r.text);
        let op = operation_of(&doc, method, &uri);
        assert!(
            op["responses"][status.to_string()].is_object(),
            "{method} {short} answers {status}, which openapi.json does not list"
        );
        if status >= 400 {
            let code = r.json()["code"].clone();
            assert!(
                codes.as_array().unwrap().contains(&code),
                "{code} is not in Problem.code"
            );
        }
    }
    // A method a path lacks: 405 with Allow, a code the document lists.
    let r = call(&t.router, "POST", &app, Some(TOKEN), None).await;
    assert_eq!(r.status, 405);
    assert!(r.headers.contains_key("allow"));
    assert!(codes.as_array().unwrap().contains(&r.json()["code"]));
}
