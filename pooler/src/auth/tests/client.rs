//! The pass-through client exchange against our server over one verifier.

use super::*;

/// Runs our ClientExchange against our ServerExchange, as the pooler against PostgreSQL.
fn pass_through(
    key: &ClientKey,
    expected: &ScramSecret,
    server_secret: &ScramSecret,
) -> Result<ClientKey, ScramError> {
    let mut client = ClientExchange::new(key, expected, "cliNONCE2").unwrap();
    let mut server = ServerExchange::new(server_secret.clone(), "srvNONCE2").unwrap();
    let client_first = client.client_first();
    assert_eq!(client_first, b"n,,n=,r=cliNONCE2");
    let server_first = server.client_first(&client_first)?;
    let client_final = client.server_first(&server_first)?;
    let (server_final, key2) = server.client_final(&client_final)?;
    client.server_final(&server_final)?;
    Ok(key2)
}

#[test]
fn pass_through_logs_in_with_the_recovered_key() {
    let secret = ScramSecret::parse(&postgres_protocol::password::scram_sha_256(b"pw")).unwrap();
    let key = pg_client_login("pw", &secret, ChannelBinding::unsupported()).unwrap();
    let key2 = pass_through(&key, &secret, &secret).unwrap();
    assert!(bool::from(key.ct_eq(&key2)));
}

#[test]
fn pass_through_reports_a_verifier_mismatch() {
    let secret = ScramSecret::parse(&postgres_protocol::password::scram_sha_256(b"pw")).unwrap();
    let key = pg_client_login("pw", &secret, ChannelBinding::unsupported()).unwrap();

    // Same password, re-keyed with another salt on the server (pg_authid) side.
    let other = ScramSecret::parse(&postgres_protocol::password::scram_sha_256(b"pw")).unwrap();
    match pass_through(&key, &secret, &other) {
        Err(ScramError::VerifierMismatch {
            expected_iterations: 4096,
            server_iterations: 4096,
            expected_salt,
            server_salt,
        }) => {
            assert_eq!(expected_salt, secret.salt_b64);
            assert_eq!(server_salt, other.salt_b64);
        }
        other => panic!("expected VerifierMismatch, got {other:?}"),
    }

    let mut more_iterations = secret.clone();
    more_iterations.iterations = 8192;
    let err = pass_through(&key, &secret, &more_iterations).unwrap_err();
    assert!(matches!(
        err,
        ScramError::VerifierMismatch {
            expected_iterations: 4096,
            server_iterations: 8192,
            ..
        }
    ));
    assert_eq!(err.sqlstate(), SqlState::CONNECTION_FAILURE);
    assert!(!format!("{err}").contains(&STANDARD.encode(secret.stored_key)));
}

#[test]
fn client_checks_the_server_signature() {
    let (secret, client_key) = verifier("pw", b"0123456789abcdef", 4096);
    let key = ClientKey::from_bytes(client_key);
    let mut client = ClientExchange::new(&key, &secret, "abc").unwrap();
    assert!(matches!(
        client.server_final(b"v=x"),
        Err(ScramError::State(_))
    ));
    let mut server = ServerExchange::new(secret.clone(), "def").unwrap();
    let server_first = server.client_first(&client.client_first()).unwrap();
    let client_final = client.server_first(&server_first).unwrap();
    assert!(matches!(
        client.server_first(&server_first),
        Err(ScramError::State(_))
    ));
    let (server_final, _) = server.client_final(&client_final).unwrap();

    let mut forged = server_final.clone();
    let last = forged.len() - 2;
    forged[last] = if forged[last] == b'A' { b'B' } else { b'A' };
    assert_eq!(
        client.server_final(&forged),
        Err(ScramError::ServerSignatureMismatch)
    );
    assert_eq!(
        client.server_final(b"e=invalid-proof"),
        Err(ScramError::ServerError("invalid-proof".into()))
    );
    assert!(client.server_final(b"v=").is_err());
    assert!(client.server_final(b"x=1").is_err());
    assert!(!client.verified(), "no failed check verifies the server");
    client.server_final(&server_final).unwrap();
    assert!(client.verified());
    assert_eq!(
        client.server_final(&server_final),
        Err(ScramError::State("server_final called twice"))
    );
}

#[test]
fn client_rejects_bad_server_first() {
    let (secret, client_key) = verifier("pw", b"0123456789abcdef", 4096);
    let key = ClientKey::from_bytes(client_key);
    let salt = &secret.salt_b64;
    let cases: Vec<(String, ScramError)> = vec![
        (format!("r=abc,s={salt},i=4096"), ScramError::NonceMismatch),
        (
            format!("r=xyzdef,s={salt},i=4096"),
            ScramError::NonceMismatch,
        ),
        (format!("r=abc d,s={salt},i=4096"), ScramError::InvalidNonce),
        (
            format!("m=ext,r=abcdef,s={salt},i=4096"),
            ScramError::ExtensionNotSupported,
        ),
        (
            "r=abcdef,s=!!!,i=4096".into(),
            ScramError::Malformed("invalid salt"),
        ),
        (
            format!("r=abcdef,s={salt},i=0"),
            ScramError::Malformed("invalid iteration count"),
        ),
        (
            format!("r=abcdef,s={salt},i=+1"),
            ScramError::Malformed("invalid iteration count"),
        ),
        (
            format!("r=abcdef,s={salt},i=99999999999"),
            ScramError::Malformed("invalid iteration count"),
        ),
        (
            format!("r=abcdef,s={salt}"),
            ScramError::MissingAttribute('i'),
        ),
        ("r=abcdef".into(), ScramError::MissingAttribute('s')),
        ("".into(), ScramError::MissingAttribute('r')),
    ];
    for (msg, want) in cases {
        let mut client = ClientExchange::new(&key, &secret, "abc").unwrap();
        assert_eq!(client.server_first(msg.as_bytes()), Err(want), "{msg}");
    }
    assert_eq!(
        ClientExchange::new(&key, &secret, "a,b").unwrap_err(),
        ScramError::InvalidNonce
    );
}
