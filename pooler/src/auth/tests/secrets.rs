//! Verifier parsing, mock verifiers, redaction and nonces.

use super::*;

#[test]
fn mock_secrets_are_stable_per_role_and_fail_like_a_wrong_password() {
    let process_secret = [42u8; 32];
    let a1 = ScramSecret::mock("tk_t1_pshop_prod", &process_secret);
    let a2 = ScramSecret::mock("tk_t1_pshop_prod", &process_secret);
    let b = ScramSecret::mock("tk_t1_pshop_dev", &process_secret);
    let a_other_process = ScramSecret::mock("tk_t1_pshop_prod", &[7u8; 32]);
    assert_eq!(a1.salt, a2.salt);
    assert_eq!(a1.stored_key, a2.stored_key);
    assert_ne!(a1.salt, b.salt);
    assert_ne!(a1.stored_key, b.stored_key);
    assert_ne!(a1.salt, a_other_process.salt);
    assert_eq!(a1.salt.len(), 16);
    assert_eq!(a1.iterations, 4096);
    // It is a well-formed verifier, indistinguishable in shape from a real one.
    let reparsed = ScramSecret::parse(&a1.to_verifier_string()).unwrap();
    assert_eq!(reparsed.salt, a1.salt);

    // The exchange gets as far as a real one, then fails at client-final with the same
    // error as a wrong password.
    let mut client = ScramSha256::new(b"any password", ChannelBinding::unsupported());
    let mut server = ServerExchange::new(a1, "SRV").unwrap();
    let server_first = server.client_first(client.message()).unwrap();
    client.update(&server_first).unwrap();
    assert_eq!(
        server.client_final(client.message()).map(|_| ()),
        Err(ScramError::InvalidProof)
    );
}

#[test]
fn verifier_parse_rejects_malformed() {
    let k = STANDARD.encode([1u8; 32]);
    let short = STANDARD.encode([1u8; 31]);
    let cases: Vec<(String, VerifierError)> = vec![
        ("md5abc".into(), VerifierError::WrongMechanism),
        (
            "SCRAM-SHA-1$4096:c2FsdA==$a:b".into(),
            VerifierError::WrongMechanism,
        ),
        (
            "SCRAM-SHA-256$4096:c2FsdA==".into(),
            VerifierError::Missing("keys"),
        ),
        (
            format!("SCRAM-SHA-256$4096${k}:{k}"),
            VerifierError::Missing("salt"),
        ),
        (
            format!("SCRAM-SHA-256$4096:c2FsdA==${k}"),
            VerifierError::Missing("ServerKey"),
        ),
        (
            format!("SCRAM-SHA-256$0:c2FsdA==${k}:{k}"),
            VerifierError::BadIterations,
        ),
        (
            format!("SCRAM-SHA-256$-1:c2FsdA==${k}:{k}"),
            VerifierError::BadIterations,
        ),
        (
            format!("SCRAM-SHA-256$+1:c2FsdA==${k}:{k}"),
            VerifierError::BadIterations,
        ),
        (
            format!("SCRAM-SHA-256$:c2FsdA==${k}:{k}"),
            VerifierError::BadIterations,
        ),
        (
            format!("SCRAM-SHA-256$4294967296:c2FsdA==${k}:{k}"),
            VerifierError::BadIterations,
        ),
        (
            format!("SCRAM-SHA-256$4096:!!${k}:{k}"),
            VerifierError::BadBase64("salt"),
        ),
        (
            format!("SCRAM-SHA-256$4096:${k}:{k}"),
            VerifierError::EmptySalt,
        ),
        (
            format!("SCRAM-SHA-256$4096:c2FsdA==$x:{k}"),
            VerifierError::BadBase64("StoredKey"),
        ),
        (
            format!("SCRAM-SHA-256$4096:c2FsdA==${k}:{short}"),
            VerifierError::BadKeyLength {
                field: "ServerKey",
                len: 31,
            },
        ),
        (
            format!("SCRAM-SHA-256$4096:c2FsdA==${k}:{k}:{k}"),
            VerifierError::BadBase64("ServerKey"),
        ),
    ];
    for (s, want) in cases {
        assert_eq!(ScramSecret::parse(&s).map(|_| ()), Err(want), "{s}");
    }
}

#[test]
fn secrets_never_print_their_keys() {
    let secret = ScramSecret::parse(&postgres_protocol::password::scram_sha_256(b"pw")).unwrap();
    let debug = format!("{secret:?}");
    assert!(!debug.contains(&STANDARD.encode(secret.stored_key)));
    assert!(!debug.contains(&STANDARD.encode(secret.server_key)));
    assert!(debug.contains(&secret.salt_b64));
    let key = ClientKey::from_bytes([9u8; 32]);
    assert_eq!(format!("{key:?}"), "ClientKey(<redacted>)");
    let client = ClientExchange::new(&key, &secret, "n").unwrap();
    assert!(!format!("{client:?}").contains("9"));
}

#[test]
fn random_nonces_are_printable_and_fresh() {
    let a = random_nonce().unwrap();
    let b = random_nonce().unwrap();
    assert_eq!(a.len(), 24);
    assert_ne!(a, b);
    let (secret, _) = verifier("pw", b"salt", 1);
    ServerExchange::new(secret, &a).unwrap();
}
