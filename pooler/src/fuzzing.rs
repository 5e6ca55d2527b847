//! Entry points for the fuzz targets (`fuzz/`, `make fuzz`) and for the test that
//! replays their corpus on stable Rust (`pooler/tests/fuzz_corpus.rs`). Each takes
//! arbitrary bytes and runs them through code a client's bytes reach before or after
//! login; none may panic, and the classifier may not do more than a constant amount of
//! work per byte. Not an API: hidden from the docs, named here so the fuzzers and the
//! replay test call exactly the same code.

use bytes::BytesMut;

use crate::auth::scram::ServerExchange;
use crate::backend::statements::ServerStatements;
use crate::proto::frame::{self, Side};
use crate::proto::{frontend, startup};
use crate::session::Need;
use crate::session::prepared::{ClientStatements, Replies, Rewriter, StreamedText};
use crate::session::state;
use crate::verifier::ScramSecret;

/// A fuzz target's entry point.
pub type Target = fn(&[u8]);

/// The fuzz targets, by the name `cargo fuzz run` and the corpus directories use.
pub const TARGETS: &[(&str, Target)] = &[
    ("frame_splitter", frame_splitter),
    ("startup_packet", startup_packet),
    ("scram_client", scram_client),
    ("classifier", classifier),
    ("prepared_rewriter", prepared_rewriter),
];

/// Splits the bytes into messages, as the relay and the login do, both ways, fed in
/// two pieces (a message split across reads).
pub fn frame_splitter(data: &[u8]) {
    let cut = data.first().map_or(0, |&b| usize::from(b)).min(data.len());
    for side in [Side::Frontend, Side::Backend] {
        let mut buf = BytesMut::new();
        for piece in [&data[..cut], &data[cut..]] {
            buf.extend_from_slice(piece);
            while let Ok(Some(_)) = frame::split(&mut buf, side) {}
        }
        let _ = frame::for_each_message(data, side, |_, _| std::ops::ControlFlow::Continue(()));
        let scan = frame::scan(data, side);
        assert!(scan.complete() <= data.len());
    }
}

/// The untagged packets before login: SSLRequest, GSSENCRequest, CancelRequest and
/// the startup packet, one after another.
pub fn startup_packet(data: &[u8]) {
    let mut buf = BytesMut::from(data);
    while let Ok(Some(packet)) = startup::read(&mut buf) {
        let _ = packet.negotiation();
    }
}

/// A SCRAM exchange against a fixed verifier: the bytes are the SASLInitialResponse
/// body and the SASLResponse body, separated by the first `\n`.
pub fn scram_client(data: &[u8]) {
    let (first, last) = match data.iter().position(|&b| b == b'\n') {
        Some(at) => (&data[..at], &data[at + 1..]),
        None => (data, &[][..]),
    };
    let secret = ScramSecret::mock("fuzz", &[7; 32]);
    let Ok(mut exchange) = ServerExchange::new(secret, "fuzzservernonce") else {
        return;
    };
    let first = match frontend::parse_sasl_initial_response(first) {
        Ok(frontend::SaslInitialResponse {
            data: Some(data), ..
        }) => data,
        _ => first,
    };
    if exchange.client_first(first).is_err() {
        return;
    }
    let last = frontend::parse_sasl_response(last).unwrap_or(last);
    let _ = exchange.client_final(last);
}

/// What the classifier may cost per byte of text, whole and as a fragment together
/// (state/tests.rs holds it to less).
const CLASSIFIER_STEPS_PER_BYTE: u64 = 80;

/// The session-state classifier on the bytes as a statement text, and as a fragment.
pub fn classifier(data: &[u8]) {
    let mut customs = state::Customs::default();
    let _ = state::classify(data, &mut customs);
    let _ = state::classify_fragment(data, &mut customs);
    let steps = state::classify_steps(data, &mut state::Customs::default());
    assert!(
        steps <= CLASSIFIER_STEPS_PER_BYTE * (data.len() as u64 + 1),
        "{steps} steps for {} bytes",
        data.len()
    );
}

/// How much of a long message the rewriter target hands over as its head.
const HEAD: usize = 64;

/// The prepared-statement rewriter on the bytes as a stream of client messages (split
/// as the relay splits them), with a small server so evictions happen.
pub fn prepared_rewriter(data: &[u8]) {
    let mut client = ClientStatements::default();
    let mut server = ServerStatements::default();
    let mut replies = Replies::default();
    let mut customs = state::Customs::default();
    let mut streamed = StreamedText::default();
    let mut rewriter = Rewriter {
        client: &mut client,
        server: &mut server,
        replies: &mut replies,
        max_per_server: 4,
        max_per_client: 8,
        max_client_bytes: 64 * 1024,
        max_message: 16 * 1024,
        refused: Default::default(),
        effect: state::Effect::default(),
        customs: &mut customs,
        streamed: &mut streamed,
    };
    let mut buf = BytesMut::from(data);
    let mut out = BytesMut::new();
    while let Ok(Some((tag, body))) = frame::split(&mut buf, Side::Frontend) {
        let mut raw = BytesMut::with_capacity(5 + body.len());
        raw.extend_from_slice(&[tag][..]);
        raw.extend_from_slice(
            &i32::try_from(body.len() + 4)
                .unwrap_or(i32::MAX)
                .to_be_bytes(),
        );
        raw.extend_from_slice(&body);
        match Rewriter::need(tag) {
            Need::Header => {}
            Need::Whole => {
                let _ = rewriter.message(tag, &raw, &mut out);
            }
            // As the relay hands over a message too long to hold: its head, then
            // how much more is streaming.
            Need::Head => {
                let head = raw.len().min(HEAD);
                let _ = rewriter.head(tag, &raw[..head], raw.len() - head, &mut out);
            }
        }
        out.clear();
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::TARGETS;

    /// Every input of the committed corpus (`fuzz/corpus/<target>`) and every crash a
    /// fuzzer found (`fuzz/regressions/<target>`), through the fuzzers' entry points, on
    /// stable Rust: what `make fuzz` found once stays found.
    #[test]
    fn the_committed_corpus_and_regressions_replay_without_a_panic() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz");
        let mut failed = Vec::new();
        for (name, target) in TARGETS {
            let mut replayed = 0;
            for dir in ["corpus", "regressions"] {
                let Ok(entries) = std::fs::read_dir(root.join(dir).join(name)) else {
                    continue;
                };
                for entry in entries {
                    let path = entry.unwrap().path();
                    let data = std::fs::read(&path).unwrap();
                    if std::panic::catch_unwind(|| target(&data)).is_err() {
                        failed.push(path.display().to_string());
                    }
                    replayed += 1;
                }
            }
            assert!(replayed > 0, "no corpus for {name}");
        }
        assert!(failed.is_empty(), "panicked on {failed:?}");
    }
}
