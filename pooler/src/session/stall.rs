//! Deadlines on a linked client's progress: a client that holds a server must keep
//! the conversation moving. It stalls when it stops reading what the server sent
//! (the pooler's write to it makes no progress), or stops half-way through a message
//! or a COPY it started (the server waits for bytes that do not come); past
//! `client_stall_timeout` it loses its server. Idle in a transaction is a wait of its
//! own (`idle_transaction_timeout`, off by default).
//!
//! The relay's hot path pays nothing for this: a request that arrives whole and a
//! reply the client takes at once never arm a timer. Timers are allocated the first
//! time a stretch has to wait, and re-armed from "now" only after progress.

use std::io;
use std::pin::Pin;
use std::task::Poll;
use std::time::Duration;

use tokio::io::AsyncWrite;
use tokio::time::{Instant, Sleep, sleep_until};

use crate::net::stream::Stream;

/// What a linked stretch is waiting on the client for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Wait {
    /// The rest of a message or of a COPY the client started.
    Stall,
    /// The client's next request, inside a transaction.
    IdleTransaction,
}

/// The watch over a linked stretch's waits on its client.
#[derive(Default)]
pub(super) struct Watch {
    timer: Option<Pin<Box<Sleep>>>,
    /// What the timer is armed for, and the progress count when it was armed.
    armed: Option<(Wait, u64)>,
    /// Bumped on every read from the client and every write to it.
    pub(super) progress: u64,
}

impl Watch {
    /// Arms the watch for what the stretch waits on now (or disarms it). Armed for the
    /// same wait with no progress since, it keeps its deadline; after progress, the
    /// limit counts again from now.
    pub(super) fn arm(&mut self, wait: Option<(Wait, Duration)>) {
        let Some((kind, limit)) = wait else {
            self.armed = None;
            return;
        };
        if self.armed == Some((kind, self.progress)) {
            return;
        }
        let deadline = Instant::now() + limit;
        match &mut self.timer {
            Some(timer) => timer.as_mut().reset(deadline),
            None => self.timer = Some(Box::pin(sleep_until(deadline))),
        }
        self.armed = Some((kind, self.progress));
    }

    /// Resolves when the armed wait is over; never while disarmed. Cancel-safe.
    pub(super) async fn expired(&mut self) -> Wait {
        match (&mut self.timer, self.armed) {
            (Some(timer), Some((kind, _))) => {
                timer.as_mut().await;
                kind
            }
            _ => std::future::pending().await,
        }
    }
}

/// Writes all of `bytes` to the client; fails with `TimedOut` when the client accepts
/// nothing for `limit` (it is not reading). The limit counts from the last byte it
/// took, so a slow reader of a long result is not a stalled one. No timer unless the
/// client's socket is full.
///
/// Not cancel-safe: part of `bytes` may have been written when it is dropped.
pub(super) async fn write_all_within(
    stream: &mut Stream,
    bytes: &[u8],
    limit: Duration,
) -> io::Result<()> {
    let mut written = 0;
    let mut timer: Option<(Pin<Box<Sleep>>, usize)> = None;
    std::future::poll_fn(|cx| {
        loop {
            if written == bytes.len() {
                return Poll::Ready(Ok(()));
            }
            match Pin::new(&mut *stream).poll_write(cx, &bytes[written..]) {
                Poll::Ready(Ok(0)) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                Poll::Ready(Ok(n)) => written += n,
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => {
                    let (sleep, mark) = timer.get_or_insert_with(|| {
                        (Box::pin(sleep_until(Instant::now() + limit)), written)
                    });
                    if *mark != written {
                        sleep.as_mut().reset(Instant::now() + limit);
                        *mark = written;
                    }
                    return match sleep.as_mut().poll(cx) {
                        Poll::Ready(()) => Poll::Ready(Err(io::ErrorKind::TimedOut.into())),
                        Poll::Pending => Poll::Pending,
                    };
                }
            }
        }
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_wait_keeps_its_deadline_until_progress() {
        let mut watch = Watch::default();
        watch.arm(Some((Wait::Stall, Duration::from_secs(10))));
        tokio::time::advance(Duration::from_secs(6)).await;
        // Armed again for the same wait without progress: the deadline stands.
        watch.arm(Some((Wait::Stall, Duration::from_secs(10))));
        let started = Instant::now();
        assert_eq!(watch.expired().await, Wait::Stall);
        assert_eq!(started.elapsed(), Duration::from_secs(4));

        watch.progress += 1;
        watch.arm(Some((Wait::Stall, Duration::from_secs(10))));
        let started = Instant::now();
        watch.expired().await;
        assert_eq!(started.elapsed(), Duration::from_secs(10));
    }

    #[tokio::test(start_paused = true)]
    async fn a_disarmed_watch_never_fires() {
        let mut watch = Watch::default();
        watch.arm(Some((Wait::IdleTransaction, Duration::from_secs(1))));
        watch.arm(None);
        let fired = tokio::time::timeout(Duration::from_secs(3600), watch.expired()).await;
        assert!(fired.is_err());
    }
}
