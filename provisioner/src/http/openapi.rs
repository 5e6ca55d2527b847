//! `GET /openapi.json`: the OpenAPI 3 description of every route, kept as a JSON file
//! beside this one so it reads like the document it is; a test checks it against the
//! router.

use axum::http::header;
use axum::response::IntoResponse;

pub const SPEC: &str = include_str!("openapi.json");

pub async fn spec() -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "application/json")], SPEC)
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use serde_json::Value;

    use super::SPEC;
    use crate::ddl::{AppRecord, Limits, LimitsPatch};
    use crate::view::AppView;

    /// Every (path, method) that `app()` in mod.rs registers.
    const ROUTES: &[(&str, &str)] = &[
        ("/v1/apps", "get"),
        ("/v1/apps/{tenant_id}/{slug}/{env}", "put"),
        ("/v1/apps/{tenant_id}/{slug}/{env}", "get"),
        ("/v1/apps/{tenant_id}/{slug}/{env}", "patch"),
        ("/v1/apps/{tenant_id}/{slug}/{env}", "delete"),
        ("/v1/apps/{tenant_id}/{slug}/{env}/rotate-password", "post"),
        ("/v1/apps/{tenant_id}/{slug}/{env}/suspend", "post"),
        ("/v1/apps/{tenant_id}/{slug}/{env}/resume", "post"),
        ("/healthz", "get"),
        ("/readyz", "get"),
        ("/metrics", "get"),
        ("/openapi.json", "get"),
    ];

    const METHODS: &[&str] = &[
        "get", "put", "post", "delete", "options", "head", "patch", "trace",
    ];

    fn spec() -> Value {
        serde_json::from_str(SPEC).unwrap()
    }

    /// The (path, method, operation) triples the document describes.
    fn operations(doc: &Value) -> Vec<(String, String, Value)> {
        let mut out = Vec::new();
        for (path, item) in doc["paths"].as_object().unwrap() {
            for (key, op) in item.as_object().unwrap() {
                if METHODS.contains(&key.as_str()) {
                    out.push((path.clone(), key.clone(), op.clone()));
                }
            }
        }
        out
    }

    fn keys(v: &Value) -> BTreeSet<String> {
        v.as_object().unwrap().keys().cloned().collect()
    }

    fn collect_refs(v: &Value, out: &mut Vec<String>) {
        match v {
            Value::Object(map) => {
                for (k, child) in map {
                    match (k.as_str(), child) {
                        ("$ref", Value::String(r)) => out.push(r.clone()),
                        _ => collect_refs(child, out),
                    }
                }
            }
            Value::Array(items) => items.iter().for_each(|i| collect_refs(i, out)),
            _ => {}
        }
    }

    #[test]
    fn is_openapi_3() {
        let doc = spec();
        assert!(doc["openapi"].as_str().unwrap().starts_with("3."));
    }

    #[test]
    fn describes_exactly_the_routes_of_the_router() {
        let doc = spec();
        for (path, method) in ROUTES {
            assert!(
                doc["paths"][*path][*method].is_object(),
                "{} {path} is routed but not in openapi.json",
                method.to_uppercase()
            );
        }
        let routed: BTreeSet<(String, String)> = ROUTES
            .iter()
            .map(|(p, m)| ((*p).to_owned(), (*m).to_owned()))
            .collect();
        for (path, method, _) in operations(&doc) {
            assert!(
                routed.contains(&(path.clone(), method.clone())),
                "{} {path} is in openapi.json but not routed",
                method.to_uppercase()
            );
        }
    }

    #[test]
    fn every_operation_is_named_and_secured_as_routed() {
        let doc = spec();
        let mut ids = BTreeSet::new();
        for (path, method, op) in operations(&doc) {
            let id = op["operationId"].as_str().unwrap().to_owned();
            assert!(ids.insert(id), "duplicate operationId at {method} {path}");
            let security = op["security"].as_array().unwrap();
            if path.starts_with("/v1/") {
                assert_eq!(security.len(), 1, "{method} {path}");
                assert!(security[0].get("bearerAuth").is_some(), "{method} {path}");
                assert!(
                    op["responses"]["401"].is_object(),
                    "{method} {path} lacks its 401"
                );
            } else {
                assert!(
                    security.is_empty(),
                    "{method} {path} should be unauthenticated"
                );
            }
        }
    }

    #[test]
    fn every_ref_resolves() {
        let doc = spec();
        let mut refs = Vec::new();
        collect_refs(&doc, &mut refs);
        assert!(!refs.is_empty());
        for r in refs {
            assert!(
                r.starts_with("#/components/"),
                "{r} is not a local component"
            );
            assert!(doc.pointer(&r[1..]).is_some(), "{r} does not resolve");
        }
    }

    /// The statuses the HTTP layer gives before a handler runs are documented where
    /// they can happen: 400 on every operation whose path or query is decoded, 413 on
    /// every one that reads a body.
    #[test]
    fn statuses_the_http_layer_makes_are_documented() {
        let doc = spec();
        for (path, method, op) in operations(&doc) {
            let responses = &op["responses"];
            let decodes = path.contains('{') || path == "/v1/apps";
            assert_eq!(
                responses["400"].is_object(),
                decodes,
                "{method} {path}: 400 documented iff the request line is decoded"
            );
            let reads_body = method == "put" || method == "patch";
            assert_eq!(
                responses["413"].is_object(),
                reads_body,
                "{method} {path}: 413 documented iff a body is read"
            );
        }
    }

    #[test]
    fn problem_codes_are_exactly_the_codes_made() {
        let doc = spec();
        let listed: BTreeSet<String> =
            doc["components"]["schemas"]["Problem"]["properties"]["code"]["enum"]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_str().unwrap().to_owned())
                .collect();
        let made: BTreeSet<String> = super::super::error::CODES
            .iter()
            .map(|c| (*c).to_owned())
            .collect();
        assert_eq!(listed, made);
    }

    /// Path parameters state the bounds `names.rs` enforces, so a generated client
    /// refuses what the server would.
    #[test]
    fn path_parameters_have_patterns_and_bounds() {
        let doc = spec();
        let params = &doc["components"]["parameters"];
        let tenant = &params["TenantId"]["schema"];
        assert_eq!(tenant["pattern"], "^[1-9][0-9]{0,11}$");
        assert_eq!(tenant["maxLength"], 12);
        let schemas = &doc["components"]["schemas"];
        let slug = &schemas["Slug"];
        // The shortest role around a slug: tk_t1_p<slug>_a.
        let room = crate::names::MAX_IDENTIFIER_BYTES - "tk_t1_p_a".len();
        assert_eq!(slug["maxLength"], room);
        assert!(crate::names::Slug::parse(&"a".repeat(room)).is_ok());
        let name = crate::names::AppName::parse("1", &"a".repeat(room), "a");
        assert!(name.is_ok());
        let over = crate::names::AppName::parse("1", &"a".repeat(room + 1), "a");
        assert!(over.is_err());
        assert_eq!(schemas["Env"]["maxLength"], 16);
        assert!(schemas["Env"]["pattern"].is_string());
        for p in ["TenantId", "Slug", "Env"] {
            assert_eq!(params[p]["in"], "path");
            assert_eq!(params[p]["required"], true);
        }
    }

    #[test]
    fn schemas_match_the_serialized_types() {
        let doc = spec();
        let schemas = &doc["components"]["schemas"];

        let patch = serde_json::to_value(LimitsPatch::default()).unwrap();
        assert_eq!(keys(&schemas["LimitsPatch"]["properties"]), keys(&patch));

        let limits = serde_json::to_value(Limits::default()).unwrap();
        assert_eq!(keys(&schemas["Limits"]["properties"]), keys(&limits));

        let view = AppView {
            record: AppRecord {
                role: "tk_t1_pshop_dev".into(),
                schema: "tk_t1_pshop_dev".into(),
                database: "apps".into(),
                tenant_id: 1,
                slug: "shop".into(),
                env: "dev".into(),
                disabled: false,
                generation: 1,
                limits: Limits::default(),
                created_at: "2025-01-01T00:00:00.000000Z".into(),
                updated_at: "2025-01-01T00:00:00.000000Z".into(),
                rotated_at: None,
            },
            host: "localhost".into(),
            port: 5432,
            connection_uri: "postgresql://tk_t1_pshop_dev:pw@localhost:5432/apps?sslmode=prefer"
                .into(),
            jdbc_url: "jdbc:postgresql://localhost:5432/apps?sslmode=prefer".into(),
            password: Some("pw".into()),
        };
        let mut with_password = keys(&serde_json::to_value(view).unwrap());
        assert!(with_password.remove("password"));
        let app = keys(&schemas["App"]["properties"]);
        assert_eq!(app, with_password);
        let required: BTreeSet<String> = schemas["App"]["required"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_str().unwrap().to_owned())
            .collect();
        assert_eq!(required, app);
    }
}
