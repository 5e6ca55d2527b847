//! The server exchange: an independent client, the RFC example, malformed input.

use super::*;

#[test]
fn rfc_7677_example_replays_exactly() {
    // RFC 7677 §3: user "user", password "pencil".
    let salt = STANDARD.decode("W22ZaJ0SNY7soEsUEjb6gQ==").unwrap();
    let (secret, client_key) = verifier("pencil", &salt, 4096);
    let mut server = ServerExchange::new(secret, "%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0").unwrap();
    let server_first = server
        .client_first(b"n,,n=user,r=rOprNGfwEbeRWgbNEkqO")
        .unwrap();
    assert_eq!(
        server_first,
        b"r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096"
    );
    let (server_final, key) = server
        .client_final(
            b"c=biws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,\
              p=dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ=",
        )
        .unwrap();
    assert_eq!(
        server_final,
        b"v=6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4="
    );
    assert_eq!(key.as_bytes(), &client_key);
}

#[test]
fn postgres_protocol_client_logs_in_and_we_recover_its_client_key() {
    let verifier_string = postgres_protocol::password::scram_sha_256(b"s3cret pw");
    let secret = ScramSecret::parse(&verifier_string).unwrap();
    assert_eq!(secret.to_verifier_string(), verifier_string);
    for cb in [ChannelBinding::unsupported(), ChannelBinding::unrequested()] {
        let key = pg_client_login("s3cret pw", &secret, cb).unwrap();
        let salted = salted_password(b"s3cret pw", &secret.salt, secret.iterations);
        assert_eq!(key.as_bytes(), &hmac(&salted, b"Client Key"));
    }
}

#[test]
fn wrong_password_is_invalid_proof() {
    let secret = ScramSecret::parse(&postgres_protocol::password::scram_sha_256(b"right")).unwrap();
    let err = pg_client_login("wrong", &secret, ChannelBinding::unsupported()).unwrap_err();
    assert_eq!(err, ScramError::InvalidProof);
    assert_eq!(err.sqlstate(), SqlState::INVALID_PASSWORD);
}

/// A fresh server exchange past client-first, with a well-formed client-final to mutate.
fn server_awaiting_final(gs2: &str) -> (ServerExchange, String) {
    let (secret, client_key) = verifier("pw", b"0123456789abcdef", 4096);
    server_awaiting_final_with(&secret, &client_key, gs2)
}

fn server_awaiting_final_with(
    secret: &ScramSecret,
    client_key: &[u8; 32],
    gs2: &str,
) -> (ServerExchange, String) {
    let mut server = ServerExchange::new(secret.clone(), "SRV").unwrap();
    server
        .client_first(format!("{gs2}n=,r=CLI").as_bytes())
        .unwrap();
    // Build the matching client-final by hand.
    let cbind = STANDARD.encode(gs2);
    let without_proof = format!("c={cbind},r=CLISRV");
    let auth = format!(
        "n=,r=CLI,r=CLISRV,s={},i={},{without_proof}",
        secret.salt_b64, secret.iterations
    );
    let sig = hmac(&secret.stored_key, auth.as_bytes());
    let proof: Vec<u8> = client_key.iter().zip(sig).map(|(a, b)| a ^ b).collect();
    (
        server,
        format!("{without_proof},p={}", STANDARD.encode(proof)),
    )
}

#[test]
fn server_accepts_both_gs2_flags_and_extensions() {
    for gs2 in ["n,,", "y,,"] {
        let (mut server, good) = server_awaiting_final(gs2);
        server.client_final(good.as_bytes()).unwrap();
        assert!(matches!(
            server.client_final(good.as_bytes()),
            Err(ScramError::State(_))
        ));
    }
    let (secret, _) = verifier("pw", b"salt", 4096);
    let mut server = ServerExchange::new(secret, "S").unwrap();
    server.client_first(b"n,,n=anyone,r=C,x=ext").unwrap();
}

#[test]
fn server_rejects_bad_client_final() {
    let (_, good) = server_awaiting_final("n,,");
    let proof = good.rsplit_once(",p=").unwrap().1.to_owned();
    let cases: Vec<(String, ScramError)> = vec![
        (
            good.replace("c=biws", "c=eSws"),
            ScramError::ChannelBindingMismatch,
        ),
        (
            good.replace("r=CLISRV", "r=CLISRX"),
            ScramError::NonceMismatch,
        ),
        (good.replace("r=CLISRV", "r=CLI"), ScramError::NonceMismatch),
        (
            good.replace(&proof, "AAAA"),
            ScramError::Malformed("invalid proof"),
        ),
        (
            good.replace(&proof, &"!".repeat(44)),
            ScramError::Malformed("invalid proof"),
        ),
        (
            good.replace(&proof, &STANDARD.encode([0u8; 32])),
            ScramError::InvalidProof,
        ),
        ("c=biws,r=CLISRV".into(), ScramError::MissingAttribute('p')),
        (
            format!("r=CLISRV,p={proof}"),
            ScramError::MissingAttribute('c'),
        ),
        (
            format!("c=biws,p={proof}"),
            ScramError::MissingAttribute('r'),
        ),
        (
            format!("c=biws,r=CLISRV,1=x,p={proof}"),
            ScramError::Malformed("invalid attribute"),
        ),
        (
            good[..good.len() - 1].to_owned(),
            ScramError::Malformed("invalid proof"),
        ),
        ("x".repeat(5000), ScramError::TooLong),
    ];
    for (msg, want) in cases {
        let (mut server, _) = server_awaiting_final("n,,");
        assert_eq!(
            server.client_final(msg.as_bytes()).map(|_| ()),
            Err(want),
            "{msg}"
        );
    }
    let (mut server, _) = server_awaiting_final("n,,");
    assert_eq!(
        server.client_final(&[0xff, 0xfe]).map(|_| ()),
        Err(ScramError::NotUtf8)
    );
}

#[test]
fn server_rejects_bad_client_first() {
    let cases: &[(&[u8], ScramError)] = &[
        (
            b"p=tls-server-end-point,,n=,r=abc",
            ScramError::ChannelBindingNotSupported,
        ),
        (b"n,a=admin,n=,r=abc", ScramError::AuthzidNotSupported),
        (b"n,,m=ext,n=,r=abc", ScramError::ExtensionNotSupported),
        (b"n,,n=,r=", ScramError::InvalidNonce),
        (b"n,,n=,r=a\x7fb", ScramError::InvalidNonce),
        (b"n,,n=,r=a b", ScramError::InvalidNonce),
        (b"n,,r=abc", ScramError::MissingAttribute('n')),
        (b"n,,n=", ScramError::MissingAttribute('r')),
        (b"n,,", ScramError::MissingAttribute('n')),
        (b"n,", ScramError::Malformed("truncated gs2 header")),
        (b"n", ScramError::Malformed("truncated gs2 header")),
        (b"", ScramError::Malformed("invalid channel binding flag")),
        (
            b"q,,n=,r=abc",
            ScramError::Malformed("invalid channel binding flag"),
        ),
        (
            b"n,,n=,r=abc,=x",
            ScramError::Malformed("invalid attribute"),
        ),
        (b"n,,n=\xff,r=abc", ScramError::NotUtf8),
    ];
    for (msg, want) in cases {
        let (secret, _) = verifier("pw", b"salt", 1);
        let mut server = ServerExchange::new(secret, "S").unwrap();
        assert_eq!(
            server.client_first(msg).as_ref(),
            Err(want),
            "{}",
            String::from_utf8_lossy(msg)
        );
    }
    let (secret, _) = verifier("pw", b"salt", 1);
    assert!(ServerExchange::new(secret.clone(), "").is_err());
    assert!(ServerExchange::new(secret.clone(), "a,b").is_err());
    let mut server = ServerExchange::new(secret, "S").unwrap();
    assert!(matches!(
        server.client_final(b"c=biws,r=x,p=y"),
        Err(ScramError::State(_))
    ));
    assert_eq!(
        server.client_first(&vec![b'n'; 2000]),
        Err(ScramError::State("client_first called twice"))
    );
}

/// xorshift64: deterministic pseudo-random bytes without a dependency.
fn garbage(seed: &mut u64, max_len: usize) -> Vec<u8> {
    let mut next = || {
        *seed ^= *seed << 13;
        *seed ^= *seed >> 7;
        *seed ^= *seed << 17;
        *seed
    };
    let len = (next() as usize) % (max_len + 1);
    // Bias toward SCRAM's alphabet so parsers get past their first checks.
    const ALPHABET: &[u8] = b"nyprcsiv=,ABC+/0129 \x00\xff";
    (0..len)
        .map(|_| {
            let r = next();
            if r % 3 == 0 {
                r as u8
            } else {
                ALPHABET[(r >> 8) as usize % ALPHABET.len()]
            }
        })
        .collect()
}

#[test]
fn garbage_never_panics() {
    let (secret, client_key) = verifier("pw", b"0123456789abcdef", 2);
    let key = ClientKey::from_bytes(client_key);
    let mut seed: u64 = 0x9e37_79b9_7f4a_7c15;
    for _ in 0..20_000 {
        let g = garbage(&mut seed, 200);
        let mut server = ServerExchange::new(secret.clone(), "S").unwrap();
        let _ = server.client_first(&g);
        let (mut server, _) = server_awaiting_final_with(&secret, &client_key, "y,,");
        let _ = server.client_final(&g);
        let mut client = ClientExchange::new(&key, &secret, "c").unwrap();
        let _ = client.server_first(&g);
        let _ = client.server_final(&g);
        let _ = ScramSecret::parse(&String::from_utf8_lossy(&g));
    }
}
