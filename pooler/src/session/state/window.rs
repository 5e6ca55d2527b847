//! Classifying a statement text too long to hold whole (over `max_message_bytes`) as
//! it streams to the server, in windows that overlap.
//!
//! The head was classified as a text of its own, and the whole statement is looked at
//! once the server is idle ([`Effect::OPAQUE`]: the check sees temp objects, LISTEN,
//! advisory locks, cursors, SQL prepared statements, changed settings and role). What
//! the check can see only by name is a custom parameter, so the windows are there to
//! find every `SET app.x`, `set_config('app.x', …)` and pinning statement start in the
//! rest. Each window repeats the last [`OVERLAP`] bytes of the one before, so whatever
//! fits in that many bytes is seen whole in some window. A `set_config` call longer
//! than that reads as one whose name the pooler cannot read, which makes the state
//! check report state (`Customs`): a pin, never a leak. The one thing missed is a
//! `SET` whose custom name comes more than [`OVERLAP`] bytes after the keyword (a long
//! comment between them) in a text over `max_message_bytes` (README, "Limits and
//! abuse").

use super::{Customs, Effect, classify_fragment};

/// Bytes each window repeats from the one before.
pub const OVERLAP: usize = 4 * 1024;
/// New bytes per window: the classifier's work per window stays bounded whatever the
/// reads deliver.
const PIECE: usize = 60 * 1024;

/// The classification of one streamed text, window by window.
#[derive(Debug, Default)]
pub struct Windows {
    window: Vec<u8>,
}

impl Windows {
    /// Starts after the head (classified by the caller).
    pub fn start(&mut self, head: &[u8]) {
        self.window.clear();
        self.window
            .extend_from_slice(&head[head.len().saturating_sub(OVERLAP)..]);
    }

    /// The next piece of the text; `last` when the text ends with it (its trailing
    /// NUL and, for a Parse, the parameter types are part of the piece and harmless).
    pub fn feed(&mut self, mut bytes: &[u8], last: bool, customs: &mut Customs) -> Effect {
        let mut effect = Effect::default();
        while !bytes.is_empty() {
            let (piece, rest) = bytes.split_at(bytes.len().min(PIECE));
            bytes = rest;
            let keep = self.window.len().saturating_sub(OVERLAP);
            self.window.drain(..keep);
            self.window.extend_from_slice(piece);
            effect.merge(classify_fragment(&self.window, customs));
        }
        if last {
            // Nothing of it is kept: a long text costs its window only while it streams.
            self.window = Vec::new();
        }
        effect
    }
}
