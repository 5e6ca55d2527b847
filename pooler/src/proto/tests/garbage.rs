//! Pseudo-random bytes through every parser: errors are fine, panics are not.

use std::ops::ControlFlow;

use bytes::{BufMut, BytesMut};

use crate::proto::backend;
use crate::proto::frame::{self, Side};
use crate::proto::frontend;
use crate::proto::startup;

#[test]
fn garbage_never_panics() {
    let mut seed: u64 = 0x2545_f491_4f6c_dd1d;
    let mut next = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    for _ in 0..50_000 {
        let len = (next() % 64) as usize;
        let mut g: Vec<u8> = (0..len).map(|_| next() as u8).collect();
        // Often start with a plausible header so the deeper paths run too.
        if next() % 2 == 0 && g.len() >= 5 {
            g[0] = b"QpSDZECRKTvd"[(next() % 12) as usize];
            g[1..5].copy_from_slice(&((next() % 70) as u32).to_be_bytes());
        }
        for side in [Side::Frontend, Side::Backend] {
            let _ = frame::scan(&g, side).count();
            let _ = frame::for_each_message(&g, side, |_, _| ControlFlow::Continue(()));
            let _ = frame::split(&mut BytesMut::from(&g[..]), side);
        }
        let _ = startup::read(&mut BytesMut::from(&g[..]));
        let mut s = BytesMut::new();
        s.put_u32(g.len() as u32 + 8);
        s.put_u32(if next() % 2 == 0 {
            startup::PROTOCOL_3_0
        } else {
            next() as u32
        });
        s.put_slice(&g);
        let _ = startup::read(&mut s);
        let _ = backend::parse_ready_for_query(&g);
        let _ = backend::parse_error_response(&g);
        let _ = backend::parse_parameter_status(&g);
        let _ = backend::parse_backend_key_data(&g);
        let _ = backend::parse_command_complete(&g);
        let _ = backend::parse_negotiate_protocol_version(&g);
        let _ = frontend::parse_sasl_initial_response(&g);
        let _ = frontend::parse_sasl_response(&g);
        let _ = frontend::parse_password_message(&g);
        let _ = frontend::parse_query(&g);
    }
}
