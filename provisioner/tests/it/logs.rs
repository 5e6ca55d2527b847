//! The real binary, serving on a socket: passwords it hands out never reach its logs.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::Command;
use std::time::{Duration, Instant};

use dataplane_tests::unique_tenant_id;

use crate::common::{PROVISIONER_PASSWORD, setup};

/// One HTTP/1.1 request over a fresh connection, with `request_id` as its
/// `x-request-id`; returns (status, body).
fn http(port: u16, method: &str, path: &str, token: &str, request_id: &str) -> (u16, String) {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer {token}\r\n\
         X-Request-Id: {request_id}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut raw = String::new();
    s.read_to_string(&mut raw).unwrap();
    let status = raw.split(' ').nth(1).unwrap().parse().unwrap();
    let body = raw
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    (status, body)
}

/// The server process dies with the test, whatever way the test ends.
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn password_of(body: &str) -> String {
    // Bodies may be chunked; the JSON object is the part between the braces.
    let start = body.find('{').unwrap();
    let end = body.rfind('}').unwrap();
    let v: serde_json::Value = serde_json::from_str(&body[start..=end]).unwrap();
    v["password"].as_str().unwrap().to_owned()
}

#[tokio::test]
async fn passwords_never_reach_the_logs() {
    let t = setup().await;
    // So that the server log would show any password sent to it.
    t.admin()
        .await
        .batch_execute(&format!(
            "ALTER DATABASE {} SET log_statement = 'all'",
            t.db
        ))
        .await
        .unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let token = "logs-test-token-0123456789";
    let url = format!(
        "postgres://dp_provisioner:{PROVISIONER_PASSWORD}@127.0.0.1:{}/{}",
        t.cluster.port(),
        t.db
    );
    // A file, not a pipe: at trace level the logs would fill a pipe nobody reads yet
    // and block the server mid-request.
    let log_path =
        std::env::temp_dir().join(format!("provisioner-logs-test-{}.log", std::process::id()));
    let log_file = std::fs::File::create(&log_path).unwrap();
    let mut child = KillOnDrop(Command::new(env!("CARGO_BIN_EXE_provisioner"))
        .args([
            "--log-format",
            "json",
            "serve",
            "--listen",
            &format!("127.0.0.1:{port}"),
        ])
        .env("DATABASE_URL", &url)
        .env("PROVISIONER_API_TOKEN", token)
        // Everything, including tokio-postgres's and axum's own debug output, and the
        // statement-logging targets asked for by name.
        .env(
            "RUST_LOG",
            "trace,tokio_postgres::query=trace,tokio_postgres::simple_query=trace,tokio_postgres::prepare=trace",
        )
        .stdout(log_file.try_clone().unwrap())
        .stderr(log_file)
        .spawn()
        .unwrap());
    let deadline = Instant::now() + Duration::from_secs(30);
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "provisioner did not start");
        std::thread::sleep(Duration::from_millis(50));
    }

    let tenant = unique_tenant_id();
    let path = format!("/v1/apps/{tenant}/logged/prod");
    let (status, body) = tokio::task::spawn_blocking({
        let path = path.clone();
        move || http(port, "PUT", &path, token, "logs-test-ensure")
    })
    .await
    .unwrap();
    assert_eq!(status, 201, "{body}");
    let created = password_of(&body);
    let (status, body) = tokio::task::spawn_blocking({
        let path = format!("{path}/rotate-password");
        move || http(port, "POST", &path, token, "logs-test-rotate")
    })
    .await
    .unwrap();
    assert_eq!(status, 200, "{body}");
    let rotated = password_of(&body);
    let (status, _) = tokio::task::spawn_blocking(move || {
        http(
            port,
            "GET",
            "/v1/apps",
            "wrong-token-0123456789",
            "logs-test-list",
        )
    })
    .await
    .unwrap();
    assert_eq!(status, 401);

    // SIGTERM: a graceful stop, which flushes the logs.
    Command::new("kill")
        .arg(child.0.id().to_string())
        .status()
        .unwrap();
    let status = child.0.wait().unwrap();
    assert!(status.success(), "graceful exit: {status:?}");
    let logs = std::fs::read_to_string(&log_path).unwrap();
    let _ = std::fs::remove_file(&log_path);
    assert!(
        logs.contains("request done"),
        "the logs were captured: {logs}"
    );
    assert!(logs.contains(&format!("tk_t{tenant}_plogged_prod")));
    // Every line a request logs carries its request id: the summary line, and the
    // operation's own line from inside the handler.
    let lines: Vec<serde_json::Value> = logs
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    for (id, message) in [
        ("logs-test-ensure", "request done"),
        ("logs-test-ensure", "app changed"),
        ("logs-test-rotate", "app changed"),
        ("logs-test-list", "request done"),
    ] {
        assert!(
            lines
                .iter()
                .any(|l| l["fields"]["message"] == message && l["span"]["request_id"] == id),
            "no {message:?} line with request id {id}: {logs}"
        );
    }
    for secret in [
        created.as_str(),
        rotated.as_str(),
        token,
        PROVISIONER_PASSWORD,
    ] {
        assert!(
            !logs.contains(secret),
            "a secret reached the provisioner's log"
        );
    }
    // Nor the verifiers, though tokio-postgres logs statements and parameters at debug.
    let admin = t.admin().await;
    let verifier: String = admin
        .query_one(
            "SELECT rolpassword FROM pg_authid WHERE rolname = $1",
            &[&format!("tk_t{tenant}_plogged_prod")],
        )
        .await
        .unwrap()
        .get(0);
    let stored_key = verifier
        .rsplit('$')
        .next()
        .unwrap()
        .split(':')
        .next()
        .unwrap();
    assert!(
        !logs.contains(stored_key),
        "a verifier reached the provisioner's log"
    );
    assert!(
        !logs.contains("SCRAM-SHA-256$"),
        "a verifier reached the provisioner's log"
    );
    // Nor the server's: only verifiers were ever sent to it.
    let server_log = t.cluster.server_log();
    assert!(!server_log.contains(&created) && !server_log.contains(&rotated));
}
