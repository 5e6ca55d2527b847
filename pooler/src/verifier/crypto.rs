//! The two primitives SCRAM-SHA-256 is built from (RFC 5802 §2.2, RFC 7677): HMAC and
//! H, both SHA-256, over 32-byte keys.

use hmac::{Hmac, KeyInit, Mac};
use sha2::{Digest, Sha256};

/// SHA-256 block size: the HMAC key length `B` of RFC 2104.
const BLOCK: usize = 64;

/// HMAC-SHA-256 keyed with a 32-byte key, over the concatenation of `parts`.
///
/// RFC 2104 §2 pads a key shorter than the block with zeros, so keying with the
/// zero-padded block is the same function; it lets us use the infallible fixed-size
/// constructor instead of `new_from_slice` (whose error cannot happen for HMAC but
/// would need an `expect`).
pub(crate) fn hmac(key: &[u8; 32], parts: &[&[u8]]) -> [u8; 32] {
    let mut block = [0u8; BLOCK];
    block[..32].copy_from_slice(key);
    let mut mac = <Hmac<Sha256> as KeyInit>::new(&block.into());
    for part in parts {
        mac.update(part);
    }
    mac.finalize().into_bytes().into()
}

/// SHA-256.
pub(crate) fn sha256(data: &[u8]) -> [u8; 32] {
    Sha256::digest(data).into()
}

/// `a XOR b`.
pub(crate) fn xor(a: &[u8; 32], b: &[u8; 32]) -> [u8; 32] {
    let mut out = [0u8; 32];
    for (o, (x, y)) in out.iter_mut().zip(a.iter().zip(b)) {
        *o = x ^ y;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn padded_key_is_the_same_hmac() {
        let key = [7u8; 32];
        let mut reference = <Hmac<Sha256> as KeyInit>::new_from_slice(&key).unwrap();
        reference.update(b"abc");
        reference.update(b"def");
        let expected: [u8; 32] = reference.finalize().into_bytes().into();
        assert_eq!(hmac(&key, &[b"abc", b"def"]), expected);
    }

    #[test]
    fn rfc_4231_case_2_shape() {
        // RFC 4231 test case 2 uses a 4-byte key; pad it to 32 (zeros) to check the
        // function against a published vector.
        let mut key = [0u8; 32];
        key[..4].copy_from_slice(b"Jefe");
        let out = hmac(&key, &[b"what do ya want ", b"for nothing?"]);
        assert_eq!(out[..8], [0x5b, 0xdc, 0xc1, 0x46, 0xbf, 0x60, 0x75, 0x4e]);
    }
}
