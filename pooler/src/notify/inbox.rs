//! A client's notifications waiting for it: filled by its role's listener task, emptied
//! by whoever serves the client when it is between transactions. Bounded in bytes; a
//! client that does not read its notifications overflows it and is disconnected with
//! an error saying so, while the listener task and every other client go on.
//!
//! The inbox knows nothing of tasks: [`Inbox::push`] says when the queue went from empty
//! to non-empty, and the caller wakes the client (its `ClientInfo::signal()`, the same
//! waker its stop signals use), so whatever waits on an idle client's socket also
//! notices a pending notification.

use std::collections::VecDeque;
use std::sync::Mutex;

use bytes::{Bytes, BytesMut};

use super::channels::Channel;

/// What one queued message costs beyond its bytes (the entry, its refcounts), so a flood
/// of tiny notifications is bounded as well as a few big ones.
pub const ITEM_OVERHEAD: usize = 64;

/// The queue passed `max_client_notification_bytes`: the client is not reading.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error(
    "more than {max} bytes of notifications were waiting for this client \
     (max_client_notification_bytes): it does not read them"
)]
pub struct Overflow {
    pub max: usize,
}

struct Item {
    /// A whole protocol message: a NotificationResponse, or a NoticeResponse.
    bytes: Bytes,
    /// The channel of a notification; `None` for a notice, which is never dropped.
    channel: Option<Channel>,
}

#[derive(Default)]
struct Queue {
    items: VecDeque<Item>,
    /// Bytes held, with [`ITEM_OVERHEAD`] per item.
    held: usize,
    overflowed: bool,
}

pub struct Inbox {
    max: usize,
    queue: Mutex<Queue>,
}

impl Inbox {
    /// An inbox holding at most `max` bytes (with per-item overhead).
    pub fn new(max: usize) -> Inbox {
        Inbox {
            max,
            queue: Mutex::new(Queue::default()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Queue> {
        self.queue.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Queues a message. `Ok(true)`: the queue was empty, wake the client. Never waits;
    /// past the bound the inbox is marked overflowed (the client is then disconnected)
    /// and keeps nothing more, and the caller wakes the client to learn it.
    pub fn push(&self, bytes: Bytes, channel: Option<&Channel>) -> Result<bool, Overflow> {
        let mut q = self.lock();
        if q.overflowed {
            return Err(Overflow { max: self.max });
        }
        let cost = bytes.len() + ITEM_OVERHEAD;
        if q.held + cost > self.max {
            q.overflowed = true;
            q.items.clear();
            q.held = 0;
            return Err(Overflow { max: self.max });
        }
        let was_empty = q.items.is_empty();
        q.held += cost;
        q.items.push_back(Item {
            bytes,
            channel: channel.cloned(),
        });
        Ok(was_empty)
    }

    /// Something to deliver, or an overflow to report.
    pub fn is_ready(&self) -> bool {
        let q = self.lock();
        q.overflowed || !q.items.is_empty()
    }

    /// Moves queued messages, oldest first and whole, into `out` until it holds at least
    /// `max_bytes` (one message more may go past it). Returns how many were moved, or the
    /// overflow once the bound has been passed.
    pub fn take(&self, out: &mut BytesMut, max_bytes: usize) -> Result<usize, Overflow> {
        let mut q = self.lock();
        if q.overflowed {
            return Err(Overflow { max: self.max });
        }
        let mut n = 0;
        while out.len() < max_bytes {
            let Some(item) = q.items.pop_front() else {
                break;
            };
            q.held -= item.bytes.len() + ITEM_OVERHEAD;
            out.extend_from_slice(&item.bytes);
            n += 1;
        }
        Ok(n)
    }

    /// Drops the undelivered notifications of channels the client stopped listening on,
    /// as Postgres does at UNLISTEN.
    pub fn forget(&self, channels: &[Channel]) {
        if channels.is_empty() {
            return;
        }
        let mut q = self.lock();
        let mut held = q.held;
        q.items.retain(|item| {
            let keep = item.channel.as_ref().is_none_or(|c| !channels.contains(c));
            if !keep {
                held -= item.bytes.len() + ITEM_OVERHEAD;
            }
            keep
        });
        q.held = held;
    }

    /// The bound was passed: the client is to be disconnected.
    pub fn overflowed(&self) -> bool {
        self.lock().overflowed
    }

    /// Bytes held now (with per-item overhead).
    pub fn held(&self) -> usize {
        self.lock().held
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(s: &str) -> Bytes {
        Bytes::copy_from_slice(s.as_bytes())
    }

    #[test]
    fn messages_come_out_in_order_and_only_the_first_push_asks_for_a_wake() {
        let inbox = Inbox::new(10_000);
        let x = Channel::new("x").unwrap();
        assert_eq!(inbox.push(msg("one"), Some(&x)), Ok(true));
        assert_eq!(inbox.push(msg("two"), Some(&x)), Ok(false));
        assert_eq!(inbox.push(msg("three"), None), Ok(false));
        assert!(inbox.is_ready());
        let mut out = BytesMut::new();
        assert_eq!(
            inbox.take(&mut out, 4),
            Ok(2),
            "whole messages up to the limit"
        );
        assert_eq!(&out[..], b"onetwo");
        out.clear();
        assert_eq!(inbox.take(&mut out, 1 << 20), Ok(1));
        assert_eq!(&out[..], b"three");
        assert!(!inbox.is_ready());
        assert_eq!(inbox.held(), 0);
        assert_eq!(inbox.push(msg("four"), None), Ok(true), "empty again");
    }

    #[test]
    fn a_client_that_does_not_read_overflows_and_stays_overflowed() {
        let inbox = Inbox::new(3 * (ITEM_OVERHEAD + 10));
        let x = Channel::new("x").unwrap();
        for _ in 0..3 {
            inbox.push(Bytes::from(vec![b'a'; 10]), Some(&x)).unwrap();
        }
        let full = inbox.push(Bytes::from(vec![b'a'; 10]), Some(&x));
        assert_eq!(full, Err(Overflow { max: inbox.max }));
        assert_eq!(inbox.held(), 0, "an overflowed inbox holds nothing");
        assert!(inbox.is_ready(), "the overflow is there to be reported");
        assert!(inbox.take(&mut BytesMut::new(), 100).is_err());
        assert!(inbox.push(msg("later"), None).is_err());
    }

    #[test]
    fn unlistened_channels_lose_their_undelivered_notifications_but_notices_stay() {
        let inbox = Inbox::new(10_000);
        let (x, y) = (Channel::new("x").unwrap(), Channel::new("y").unwrap());
        inbox.push(msg("x1"), Some(&x)).unwrap();
        inbox.push(msg("y1"), Some(&y)).unwrap();
        inbox.push(msg("notice"), None).unwrap();
        inbox.push(msg("x2"), Some(&x)).unwrap();
        inbox.forget(std::slice::from_ref(&x));
        let mut out = BytesMut::new();
        inbox.take(&mut out, 1 << 20).unwrap();
        assert_eq!(&out[..], b"y1notice");
        assert_eq!(inbox.held(), 0);
    }
}
