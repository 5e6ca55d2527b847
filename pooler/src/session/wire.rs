//! The relay's side of the sockets while linked: the server's bytes walked for what
//! the pooler must see (ReadyForQuery, ParameterStatus, replies to what it added),
//! the client's written with the pooler's edits, and one stream polled both ways.

use std::ops::ControlFlow;
use std::pin::Pin;
use std::task::Poll;

use std::time::Duration;

use bytes::BytesMut;
use tokio::io::AsyncWrite;

use super::cursor::{Cursor, Event, Need};
use super::listen::{Filter, Verdict};
use super::prepared::{Action, Refusal, Replies, renamed_error};
use super::stall::write_all_within;
use super::tracker::Tracker;
use crate::backend::ServerConn;
use crate::metrics::Limit;
use crate::proto::frame::Side;
use crate::shared::{RoleShared, Shared};

/// What the relay knows about the server's side of a linked stretch.
#[derive(Default)]
pub(super) struct ServerScan {
    pub(super) cursor: Cursor,
    pub(super) tracker: Tracker,
    pub(super) replies: Replies,
    /// Changes to the bytes last scanned, for the client.
    pub(super) edits: Vec<Edit>,
    /// ReadyForQuery messages, and those that said idle (a transaction ended).
    pub(super) queries: u64,
    pub(super) transactions: u64,
    pub(super) bytes_in: u64,
    pub(super) bytes_out: u64,
    /// `max_message_bytes`: the most of one server message held whole.
    pub(super) max_message: usize,
    /// Named statements the rewriter refused, by `prepared::Refusal`.
    pub(super) refused: [u64; Refusal::KINDS],
    /// The bound that ended the stretch, if one did.
    pub(super) cut_off: Option<Limit>,
    /// The last ReadyForQuery was dropped: the client gets it once its new channels
    /// are on the listener (listen.rs).
    pub(super) held_ready: bool,
    /// The walk stopped before a notification whose sender must be looked up first.
    pub(super) unresolved: Option<i32>,
    /// The listener's word the client waits for before its held ReadyForQuery.
    pub(super) ack: Option<crate::notify::Ack>,
}

/// What the walk needs to know about notifications.
pub(super) struct Notes<'a> {
    pub(super) filter: Filter<'a>,
    /// The client's transaction may have changed its channels and nothing of its is
    /// unsent: hold back a ReadyForQuery that ends the stretch.
    pub(super) hold_ready: bool,
}

impl ServerScan {
    /// Adds this stretch's counts to the metrics: once per stretch, not per message.
    pub(super) fn count(&self, shared: &Shared, role: &RoleShared) {
        let m = &shared.metrics;
        m.transactions.inc_by(self.transactions);
        m.queries.inc_by(self.queries);
        m.bytes_received.inc_by(self.bytes_in);
        m.bytes_sent.inc_by(self.bytes_out);
        m.prepared_hits.inc_by(self.replies.hits);
        m.prepared_misses.inc_by(self.replies.misses);
        role.counts.add(self.transactions, self.queries);
        if self.refused != [0; Refusal::KINDS] {
            for (limit, refusal) in [
                (Limit::PreparedStatements, Refusal::Count),
                (Limit::PreparedBytes, Refusal::Bytes),
                (Limit::MessageTooLong, Refusal::TooLong),
            ] {
                m.limit(limit, self.refused[refusal as usize]);
            }
        }
        if let Some(limit) = self.cut_off {
            m.limit(limit, 1);
        }
    }

    /// Walks the server's bytes: ReadyForQuery and copy starts feed the tracker,
    /// ParameterStatus updates both sides' parameters, replies to what the pooler
    /// added are dropped, and so are notifications the client must not see. Returns how
    /// many bytes may go to the client now.
    pub(super) fn server(
        &mut self,
        sbuf: &[u8],
        server: &mut ServerConn,
        params: &mut crate::backend::params::ClientParams,
        statements: &mut super::prepared::ClientStatements,
        notes: &Notes<'_>,
    ) -> Result<usize, String> {
        let ServerScan {
            cursor,
            tracker,
            replies,
            edits,
            queries,
            transactions,
            max_message,
            held_ready,
            unresolved,
            ..
        } = self;
        edits.clear();
        cursor
            .advance(
                sbuf,
                Side::Backend,
                *max_message,
                |tag| match tag {
                    b'Z' | b'S' | b'1' | b'3' | b'C' | b'A' => Need::Whole,
                    // An ErrorResponse can be as long as the client makes it (RAISE
                    // with a long message): its head has the fields the pooler reads.
                    b'E' => Need::Head,
                    _ => Need::Header,
                },
                |event| {
                    let Event::Message { tag, at, body, len } = event else {
                        return ControlFlow::Continue(());
                    };
                    match tag {
                        b'S' => {
                            if let Some((name, value)) = parameter_status(body) {
                                server.state.record(name, value);
                                params.record(name, value);
                            }
                        }
                        b'A' => match notes.filter.verdict(body) {
                            Verdict::Pass => {}
                            Verdict::Drop => edits.push(Edit {
                                at,
                                len: 5 + len,
                                with: None,
                            }),
                            Verdict::Resolve(pid) => {
                                *unresolved = Some(pid);
                                return ControlFlow::Break(());
                            }
                        },
                        _ => {
                            if tag == b'Z' {
                                *queries += 1;
                                if body.first() == Some(&b'I') {
                                    *transactions += 1;
                                }
                            }
                            tracker.server(tag, body);
                            let whole = body.len() == len;
                            let len = 5 + len;
                            let action =
                                replies.server(tag, body, statements, &mut server.statements);
                            if tag == b'E' {
                                // Queries the server skipped after an extended error.
                                tracker.skipped(replies.take_skipped());
                            }
                            if tag == b'Z'
                                && notes.hold_ready
                                && matches!(action, Action::Pass)
                                && tracker.idle()
                            {
                                *held_ready = true;
                                edits.push(Edit {
                                    at,
                                    len,
                                    with: None,
                                });
                                return ControlFlow::Continue(());
                            }
                            match action {
                                Action::Pass => {}
                                Action::Drop => edits.push(Edit {
                                    at,
                                    len,
                                    with: None,
                                }),
                                // Only errors are renamed or replaced, and only those
                                // of the pooler's own Parses, which are short: one too
                                // long to hold passes as the server wrote it.
                                Action::Replace(_) | Action::Rename { .. } if !whole => {}
                                Action::Replace(with) => edits.push(Edit {
                                    at,
                                    len,
                                    with: Some(with.to_vec()),
                                }),
                                Action::Rename { from, to } => {
                                    let with = renamed_error(&sbuf[at..at + len], &from, &to);
                                    edits.push(Edit {
                                        at,
                                        len,
                                        with: Some(with),
                                    });
                                }
                            }
                        }
                    }
                    ControlFlow::Continue(())
                },
            )
            .map_err(|e| format!("malformed message from the server: {e}"))
    }
}

/// A server message the client gets changed: dropped (`with: None`) or replaced.
pub(super) struct Edit {
    at: usize,
    len: usize,
    with: Option<Vec<u8>>,
}

/// What happened first while forwarding to the server.
pub(super) enum Relayed {
    Wrote(std::io::Result<usize>),
    Read(std::io::Result<usize>),
}

/// Writes to the server, or reads its replies if it answers (or stops reading) first.
/// One stream polled both ways: no split halves to allocate per batch.
pub(super) async fn write_or_read(
    stream: &mut crate::net::stream::Stream,
    bytes: &[u8],
    sbuf: &mut BytesMut,
) -> Relayed {
    std::future::poll_fn(|cx| {
        if let Poll::Ready(r) = Pin::new(&mut *stream).poll_write(cx, bytes) {
            return Poll::Ready(Relayed::Wrote(r));
        }
        tokio_util::io::poll_read_buf(Pin::new(&mut *stream), cx, sbuf).map(Relayed::Read)
    })
    .await
}

/// Why a read from the server ended the link, if it did.
pub(super) fn server_gone(read: std::io::Result<usize>) -> Option<String> {
    match read {
        Ok(0) => Some("the server closed the connection".into()),
        Ok(_) => None,
        Err(e) => Some(e.to_string()),
    }
}

/// Writes `bytes` to the client with `edits` applied; `TimedOut` when the client
/// takes nothing for `stall` (stall.rs).
pub(super) async fn write_skipping(
    stream: &mut crate::net::stream::Stream,
    bytes: &[u8],
    edits: &[Edit],
    stall: Duration,
) -> std::io::Result<()> {
    let mut from = 0;
    for edit in edits {
        if edit.at > from {
            write_all_within(stream, &bytes[from..edit.at], stall).await?;
        }
        if let Some(with) = &edit.with {
            write_all_within(stream, with, stall).await?;
        }
        from = edit.at + edit.len;
    }
    if from < bytes.len() {
        write_all_within(stream, &bytes[from..], stall).await?;
    }
    Ok(())
}

fn parameter_status(body: &[u8]) -> Option<(&str, &str)> {
    let mut parts = body.split(|b| *b == 0);
    let name = std::str::from_utf8(parts.next()?).ok()?;
    let value = std::str::from_utf8(parts.next()?).ok()?;
    Some((name, value))
}

/// The parts of a session the server's bytes go to, borrowed apart from its read
/// buffer (which may hold what is being forwarded meanwhile).
pub(super) struct ClientSide<'a> {
    pub(super) stream: &'a mut crate::net::stream::Stream,
    pub(super) params: &'a mut crate::backend::params::ClientParams,
    pub(super) statements: &'a mut super::prepared::ClientStatements,
    pub(super) role: &'a str,
    pub(super) mine: Option<&'a std::collections::BTreeSet<crate::notify::channels::Channel>>,
    /// A ReadyForQuery ending the stretch is held back (listen.rs).
    pub(super) hold_ready: bool,
}

impl<'a> ClientSide<'a> {
    pub(super) fn of(s: &'a mut super::Session, hold_ready: bool) -> Self {
        ClientSide {
            stream: &mut s.stream,
            params: &mut s.params,
            statements: &mut s.statements,
            role: &s.role.name,
            mine: s.listening.as_deref().map(|sub| sub.channels()),
            hold_ready,
        }
    }
}

/// Why relaying the server's bytes stopped.
pub(super) enum Gone {
    /// The server broke the protocol.
    Server(String),
    /// Writing to the client failed (or timed out: `stall`).
    Client(std::io::Error),
}

/// Walks what the server sent and writes to the client what it may see, looking up
/// the senders of notifications as needed (each lookup is bounded); what is left in
/// `sbuf` is an incomplete message. Returns how many writes went out.
pub(super) async fn from_server(
    c: ClientSide<'_>,
    server: &mut ServerConn,
    sbuf: &mut BytesMut,
    scan: &mut ServerScan,
    shared: &Shared,
    stall: Duration,
) -> Result<u64, Gone> {
    let mut wrote = 0;
    loop {
        let notes = Notes {
            filter: Filter {
                role: c.role,
                senders: shared.notify.senders(),
                mine: c.mine,
                dropped: &shared.metrics.notifications_dropped,
            },
            hold_ready: c.hold_ready,
        };
        let to_client = scan
            .server(sbuf, server, c.params, c.statements, &notes)
            .map_err(Gone::Server)?;
        if to_client > 0 {
            write_skipping(c.stream, &sbuf[..to_client], &scan.edits, stall)
                .await
                .map_err(Gone::Client)?;
            scan.bytes_out += to_client as u64;
            bytes::Buf::advance(sbuf, to_client);
            wrote += 1;
        }
        match scan.unresolved.take() {
            Some(pid) => shared.notify.senders().resolve(&[pid]).await,
            None => return Ok(wrote),
        }
    }
}
