//! `/metrics` on the admin listener: valid Prometheus text, and counters that move
//! with real traffic.

use std::collections::HashMap;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::common::env;

/// A GET on the admin listener: status code and body.
pub async fn http_get(addr: std::net::SocketAddr, path: &str) -> (u16, String) {
    let mut tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    tcp.write_all(format!("GET {path} HTTP/1.0\r\nHost: x\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut raw = String::new();
    tcp.read_to_string(&mut raw).await.unwrap();
    let (head, body) = raw.split_once("\r\n\r\n").unwrap();
    let status = head.split(' ').nth(1).unwrap().parse().unwrap();
    (status, body.to_owned())
}

/// Parses the text exposition format strictly enough to catch a broken one: every
/// sample is `name{labels} value` with a float value, every family has HELP and TYPE.
fn parse(text: &str) -> HashMap<String, f64> {
    let mut samples = HashMap::new();
    let mut typed = std::collections::HashSet::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').unwrap();
            assert!(
                ["counter", "gauge", "histogram", "summary", "untyped"].contains(&kind),
                "{line}"
            );
            typed.insert(name.to_owned());
            continue;
        }
        if line.starts_with('#') || line.is_empty() {
            continue;
        }
        let (series, value) = line.rsplit_once(' ').unwrap();
        let value: f64 = value
            .parse()
            .unwrap_or_else(|_| panic!("bad value: {line}"));
        let name = series.split('{').next().unwrap();
        let family = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|s| name.strip_suffix(s).filter(|f| typed.contains(*f)))
            .unwrap_or(name);
        assert!(typed.contains(family), "no TYPE for {name}");
        if series.contains('{') {
            assert!(series.ends_with('}'), "{line}");
        }
        samples.insert(series.to_owned(), value);
    }
    samples
}

async fn scrape(e: &crate::common::Env) -> HashMap<String, f64> {
    let (status, body) = http_get(e.pooler.admin_addr, "/metrics").await;
    assert_eq!(status, 200, "{body}");
    parse(&body)
}

fn get(m: &HashMap<String, f64>, series: &str) -> f64 {
    *m.get(series)
        .unwrap_or_else(|| panic!("no {series} in {:?}", m.keys().collect::<Vec<_>>()))
}

#[tokio::test]
async fn metrics_parse_and_move_with_traffic() {
    let e = env(|_| {}).await;
    let app = e.app_with_pool(2).await;
    let before = scrape(&e).await;
    let bad = r#"dataplane_pooler_auth_total{result="bad_proof"}"#;
    let unknown = r#"dataplane_pooler_auth_total{result="unknown_role"}"#;
    let ok = r#"dataplane_pooler_auth_total{result="ok"}"#;

    assert!(e.try_connect(&app.role, "wrong").await.is_err());
    assert!(e.try_connect("tk_t1_pnobody_dev", "x").await.is_err());
    let client = e.connect(&app).await;
    for _ in 0..10 {
        client.simple_query("SELECT 1").await.unwrap();
    }
    let stmt = client.prepare("SELECT $1::int").await.unwrap();
    for i in 0..5 {
        client.query_one(&stmt, &[&i]).await.unwrap();
    }

    let after = scrape(&e).await;
    assert_eq!(get(&after, bad) - get(&before, bad), 1.0);
    assert_eq!(get(&after, unknown) - get(&before, unknown), 1.0);
    assert_eq!(get(&after, ok) - get(&before, ok), 1.0);
    let tx = "dataplane_pooler_transactions_total";
    assert!(get(&after, tx) - get(&before, tx) >= 15.0);
    assert!(get(&after, "dataplane_pooler_client_bytes_sent_total") > 0.0);
    assert!(get(&after, "dataplane_pooler_checkout_wait_seconds_count") >= 15.0);
    assert!(
        get(
            &after,
            r#"dataplane_pooler_prepared_statements_total{result="hit"}"#
        ) >= 1.0
    );
    assert!(
        get(
            &after,
            r#"dataplane_pooler_server_logins_total{result="ok"}"#
        ) >= 1.0
    );
    assert_eq!(get(&after, "dataplane_pooler_budget_limit"), 40.0);
    assert!(get(&after, "dataplane_pooler_budget_in_use") >= 1.0);
    assert_eq!(
        get(&after, r#"dataplane_pooler_clients{state="idle"}"#),
        1.0
    );
    assert!(after.contains_key("process_resident_memory_bytes"));
    let refused = r#"dataplane_pooler_errors_total{kind="invalid_password"}"#;
    assert!(get(&after, refused) >= 2.0);
}

#[tokio::test]
async fn per_role_series_are_opt_in_and_bounded() {
    let e = env(|c| {
        c.metrics_per_role = true;
        c.metrics_max_roles = 1;
    })
    .await;
    let (a, b) = (e.app_with_pool(1).await, e.app_with_pool(1).await);
    let (ca, cb) = (e.connect(&a).await, e.connect(&b).await);
    for _ in 0..5 {
        ca.simple_query("SELECT 1").await.unwrap();
    }
    cb.simple_query("SELECT 1").await.unwrap();
    let m = scrape(&e).await;
    let per = |role: &str| format!("dataplane_pooler_role_transactions_total{{role=\"{role}\"}}");
    assert_eq!(get(&m, &per(&a.role)), 5.0);
    assert_eq!(get(&m, &per("_other")), 1.0, "past metrics_max_roles");
    assert!(!m.contains_key(&per(&b.role)));
}
