//! deploy/ against the code it deploys: the pooler's Kubernetes configuration is read
//! by the pooler's own parser and validation, so a renamed or removed key, or a value
//! the pooler refuses, fails here rather than in a crash-looping pod. (The manifests
//! themselves are checked by deploy/check/run.)

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::Path;

use pooler::config::{Config, TlsMode};

#[test]
fn the_kubernetes_pooler_config_is_one_the_pooler_accepts() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/k8s/base/pooler.toml");
    let config = Config::from_file(&path).unwrap_or_else(|e| panic!("{e}"));
    config.validate().unwrap_or_else(|e| panic!("{e}"));
    // What the Deployment's ports, probes and Service assume.
    assert_eq!(config.listen.port(), 5432);
    assert_eq!(config.admin_listen.port(), 9930);
    // Production stance: TLS on both sides, and no secret in the file.
    assert_eq!(config.client_tls.mode, TlsMode::Require);
    assert_eq!(config.server_tls.mode, TlsMode::VerifyFull);
    assert!(config.upstream.auth_password.is_none());
    assert!(config.auth_mock_secret.is_none());
}
