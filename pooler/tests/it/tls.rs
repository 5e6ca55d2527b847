//! TLS between clients and the pooler (verify-full with a CA the test makes), and
//! between the pooler and Postgres (require).

use tokio::process::Command;

use dataplane_tests::{PgCluster, StartOptions};
use pooler::config::TlsMode;

use crate::common::{env, env_on};

pub(crate) struct Pki {
    pub ca_pem: String,
    pub cert_pem: String,
    pub key_pem: String,
}

/// A CA and a certificate for 127.0.0.1/localhost signed by it.
pub(crate) fn pki() -> Pki {
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "dataplane test CA");
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let key = rcgen::KeyPair::generate().unwrap();
    let params =
        rcgen::CertificateParams::new(vec!["localhost".to_owned(), "127.0.0.1".to_owned()])
            .unwrap();
    let cert = params.signed_by(&key, &ca, &ca_key).unwrap();
    Pki {
        ca_pem: ca.pem(),
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
    }
}

pub(crate) async fn psql(
    bindir: &std::path::Path,
    port: u16,
    user: &str,
    password: &str,
    db: &str,
    sslmode: &str,
    root: &str,
) -> std::process::Output {
    Command::new(bindir.join("psql"))
        .args(["-X", "-A", "-t", "-c", "SELECT current_user"])
        .arg(format!(
            "host=localhost port={port} user={user} dbname={db} sslmode={sslmode} sslrootcert={root}"
        ))
        .env("PGPASSWORD", password)
        .output()
        .await
        .unwrap()
}

#[tokio::test]
async fn clients_verify_the_pooler_and_require_refuses_plaintext() {
    let pki = pki();
    let dir = tempfile_dir();
    let (cert, key, ca) = (
        dir.join("cert.pem"),
        dir.join("key.pem"),
        dir.join("ca.pem"),
    );
    std::fs::write(&cert, &pki.cert_pem).unwrap();
    std::fs::write(&key, &pki.key_pem).unwrap();
    std::fs::write(&ca, &pki.ca_pem).unwrap();
    let e = env(|c| {
        c.client_tls.mode = TlsMode::Require;
        c.client_tls.cert_file = Some(cert.clone());
        c.client_tls.key_file = Some(key.clone());
    })
    .await;
    let app = e.app(Default::default()).await;
    let bindir = e.fixture.cluster.bindir().to_owned();
    let port = e.pooler.addr.port();
    let root = ca.display().to_string();

    let out = psql(
        &bindir,
        port,
        &app.role,
        &app.password,
        &e.fixture.db,
        "verify-full",
        &root,
    )
    .await;
    assert!(
        out.status.success(),
        "verify-full: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), app.role);

    let out = psql(
        &bindir,
        port,
        &app.role,
        &app.password,
        &e.fixture.db,
        "disable",
        &root,
    )
    .await;
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("TLS is required"), "{stderr}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn the_pooler_reaches_postgres_over_tls() {
    let pki = pki();
    let cluster: &'static PgCluster = Box::leak(Box::new(
        tokio::task::spawn_blocking(move || {
            PgCluster::start(StartOptions {
                tls: Some((pki.cert_pem, pki.key_pem)),
                ..Default::default()
            })
        })
        .await
        .unwrap()
        .unwrap(),
    ));
    let fixture = dataplane_tests::fixtures::migrated_database(cluster).await;
    let e = env_on(fixture, |c| c.server_tls.mode = TlsMode::Require).await;
    let app = e.app(Default::default()).await;
    let client = e.connect(&app).await;
    let ssl: bool = client
        .query_one(
            "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(ssl, "the pooler's server connection is not encrypted");
    // Its auth lookup and LISTEN connections too.
    let admin = e.fixture.admin().await;
    let row = admin
        .query_one(
            "SELECT count(*), count(*) FILTER (WHERE s.ssl) FROM pg_stat_activity a \
             JOIN pg_stat_ssl s USING (pid) WHERE a.usename = 'dp_pooler'",
            &[],
        )
        .await
        .unwrap();
    let (all, encrypted): (i64, i64) = (row.get(0), row.get(1));
    assert!(
        all >= 1 && all == encrypted,
        "{encrypted} of {all} auth connections are encrypted"
    );
    drop(client);
    cluster.stop();
}

pub(crate) fn tempfile_dir() -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "pooler-tls-{}-{}",
        std::process::id(),
        dataplane_tests::unique_tenant_id()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}
