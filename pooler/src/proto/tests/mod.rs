//! limits enforced before the body arrives, truncation, and garbage.

use bytes::BytesMut;
use postgres_protocol::message::backend as pg;

use crate::proto::frame::{self, Side};

mod frames;
mod garbage;
mod messages;
mod startup;

pub(super) fn parse_pg(buf: &[u8]) -> pg::Message {
    let mut b = BytesMut::from(buf);
    let msg = pg::Message::parse(&mut b).unwrap().unwrap();
    assert!(b.is_empty(), "postgres-protocol left bytes over");
    msg
}

pub(super) fn split_one(buf: &[u8], side: Side) -> (u8, bytes::Bytes) {
    let mut b = BytesMut::from(buf);
    let out = frame::split(&mut b, side).unwrap().unwrap();
    assert!(b.is_empty());
    out
}
