//! `PAUSE` and a client that keeps its server between transactions (session mode, or
//! pinned by session state): at its idle point it looks, once per pause (and again
//! after it sends anything), whether anything on its server cannot move to another
//! one. If not, it lets the server go (reset) and gets another after `RESUME`; if so,
//! it keeps it, and `PAUSE` reports it and what it holds.

use std::sync::Arc;

use bytes::BytesMut;

use super::client::Session;
use super::signals::paused;
use super::upkeep::what_holds;
use crate::backend::ServerConn;
use crate::registry::ClientInfo;
use crate::shared::{Held, Pause};

/// One linked stretch's side of the pause: what it looked at, and its entry on the
/// pause's list of holders, taken off when it acts or the stretch ends. Only a client
/// that was put on the list touches it (a lock every client shares).
pub(super) struct Hold<'a> {
    pause: &'a Pause,
    client: u64,
    role: Arc<str>,
    /// The pause (its version) looked at last.
    looked: Option<u64>,
    listed: bool,
}

impl<'a> Hold<'a> {
    pub(super) fn new(pause: &'a Pause, client: u64, role: Arc<str>) -> Self {
        Hold {
            pause,
            client,
            role,
            looked: None,
            listed: false,
        }
    }

    /// The client sent something: what it holds may change; look again.
    pub(super) fn acted(&mut self) {
        self.looked = None;
        if std::mem::take(&mut self.listed) {
            self.pause.let_go(self.client);
        }
    }

    /// A client idle on a server it keeps (`holds`) has a new pause to look at.
    pub(super) fn due(&self, holds: bool) -> bool {
        holds && self.looked != Some(self.pause.version()) && self.pause.is_paused(&self.role)
    }

    /// Resolves when a look is due for a client that keeps its server (`holds`), once
    /// its role is paused; never otherwise.
    pub(super) async fn wait(&self, holds: bool, client: &ClientInfo) {
        if holds && self.looked != Some(self.pause.version()) {
            paused(self.pause, &self.role, client).await
        } else {
            std::future::pending().await
        }
    }

    /// Looks (the server's buffer lent back for it: `sbuf`). `true`: nothing keeps the
    /// client on its server, so it lets it go.
    pub(super) async fn look(
        &mut self,
        s: &mut Session,
        server: &mut ServerConn,
        sbuf: &mut BytesMut,
    ) -> bool {
        self.looked = Some(self.pause.version());
        std::mem::swap(&mut server.buf, sbuf);
        let what = what_holds(s, server).await;
        std::mem::swap(&mut server.buf, sbuf);
        match what {
            None => true,
            Some(what) => {
                self.listed = true;
                self.pause.hold(
                    self.client,
                    Held {
                        role: self.role.clone(),
                        what,
                    },
                );
                false
            }
        }
    }
}

impl Drop for Hold<'_> {
    fn drop(&mut self) {
        if self.listed {
            self.pause.let_go(self.client);
        }
    }
}
