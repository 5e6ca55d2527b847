use super::*;

#[test]
fn defaults_are_valid_and_a_file_overrides_them() {
    Config::default().validate().unwrap();
    let c = Config::from_toml(
        "listen = '127.0.0.1:6432'\nmax_server_connections = 10\n[upstream]\nport = 5433\n",
    )
    .unwrap();
    c.validate().unwrap();
    assert_eq!(c.listen.port(), 6432);
    assert_eq!(c.max_server_connections, 10);
    assert_eq!(c.upstream.port, 5433);
    assert_eq!(c.upstream.dbname, "talkide_dataplane");
    assert_eq!(c.default_pool_size, 5);
}

#[test]
fn rejects_what_cannot_work() {
    assert!(
        Config::from_toml("max_server_conections = 3").is_err(),
        "typos are errors"
    );
    let mut c = Config::default();
    c.client_tls.mode = TlsMode::Require;
    assert!(c.validate().is_err());
    let mut c = Config::default();
    c.server_tls.mode = TlsMode::VerifyFull;
    assert!(c.validate().is_err());
    let c = Config {
        max_server_connections: 0,
        ..Config::default()
    };
    assert!(c.validate().is_err());
    let c = Config {
        max_client_prepared_statements: 0,
        ..Config::default()
    };
    assert!(c.validate().is_err());
    let c = Config {
        worker_threads: MAX_WORKER_THREADS + 1,
        ..Config::default()
    };
    assert!(c.validate().is_err());
    for c in [
        Config {
            max_listener_servers: Some(0),
            ..Config::default()
        },
        Config {
            max_client_listen_channels: 0,
            ..Config::default()
        },
        Config {
            max_client_notification_bytes: 1000,
            ..Config::default()
        },
    ] {
        assert!(c.validate().is_err());
    }
    assert_eq!(Config::default().max_listener_servers(), 10);
}

#[test]
fn the_advertised_address_is_checked_and_defaults_to_a_specific_listen() {
    assert_eq!(Config::default().advertised(), None, "0.0.0.0 names no one");
    let c = Config {
        listen: "10.1.2.3:6432".parse().unwrap(),
        ..Config::default()
    };
    assert_eq!(c.advertised().as_deref(), Some("10.1.2.3:6432"));
    assert_eq!(
        parse_advertise_addr("pod-1.pooler:5432"),
        Ok(("pod-1.pooler", 5432))
    );
    assert_eq!(
        parse_advertise_addr("[fd00::1]:5432"),
        Ok(("fd00::1", 5432))
    );
    for bad in ["", "host", "host:0", "host:x", ":5432", "a b:1", "h';--:1"] {
        let c = Config {
            advertise_addr: Some(bad.into()),
            ..Config::default()
        };
        assert!(c.validate().is_err(), "{bad:?}");
    }
    let c = Config {
        replica_lease_ms: 2_000,
        ..Config::default()
    };
    assert!(
        c.validate().is_err(),
        "a lease shorter than three heartbeats"
    );
}

#[test]
fn the_auth_password_is_never_written_back() {
    let mut c = Config::default();
    c.upstream.auth_password = Some(Secret::new("hunter2hunter2"));
    let text = toml::to_string(&c).unwrap();
    assert!(!text.contains("hunter2"));
    assert!(!format!("{c:?}").contains("hunter2"));
}

#[test]
fn the_old_name_of_the_per_role_throttle_is_still_read() {
    let c = Config::from_toml("auth_failures_per_role_per_minute = 7").unwrap();
    assert_eq!(c.auth_failures_per_role_per_address_per_minute, 7);
}
