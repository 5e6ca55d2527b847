//! A logged-in client, as the relay carries it from transaction to transaction.

use std::sync::Arc;

use bytes::BytesMut;

use super::prepared::ClientStatements;
use super::state::{Customs, Effect};
use crate::auth::cache::{PoolMode, RoleAuth};
use crate::backend::params::ClientParams;
use crate::frontdoor::{SessionError, fatal};
use crate::net::stream::Stream;
use crate::notify::Subscription;
use crate::proto::SqlState;
use crate::shared::{CancelHandle, ClientSlot, PinSlot, RoleShared};

/// A logged-in client, ready to relay.
pub struct Session {
    pub stream: Stream,
    pub role: Arc<RoleShared>,
    pub auth: Arc<RoleAuth>,
    pub params: ClientParams,
    pub mode: PoolMode,
    pub cancel: CancelHandle,
    /// Fires when the role is revoked; subscribed during login, so a revocation that
    /// lands while the client authenticates is not missed.
    pub revoked: tokio::sync::watch::Receiver<u64>,
    /// This client's place under the app's max_client_conn.
    pub _slot: ClientSlot,
    /// The client's named prepared statements.
    pub statements: ClientStatements,
    /// Held while the client has session state on its server (state.rs).
    pub pin: Option<PinSlot>,
    /// What the client's messages since the last settle may have changed.
    pub pending: Effect,
    /// Custom parameters the client may have set, for the state check.
    pub customs: Customs,
    /// Its channels on its role's listener, and its inbox (transaction mode); boxed,
    /// so a client that never listens carries one pointer.
    pub listening: Option<Box<Subscription>>,
    /// Client bytes read past the login messages.
    pub buf: BytesMut,
}

impl Session {
    /// Notifications (or an overflow to report) wait in the client's inbox.
    pub fn notified(&self) -> bool {
        self.listening
            .as_deref()
            .is_some_and(|sub| sub.inbox().is_ready())
    }
}

/// What an idle client keeps for the start of its next request: the big buffers are
/// the server's, lent for the stretch (10,000 idle clients must cost little memory).
pub const IDLE_CHUNK: usize = 256;

/// Tells the client its server is gone. With a request of its unanswered (a COMMIT
/// perhaps) nobody knows whether its transaction committed: 08007, as libpq-based
/// drivers and JDBC expect for that case; with nothing in flight an open transaction
/// was certainly rolled back.
pub(super) async fn server_lost<T>(
    s: &mut Session,
    in_flight: bool,
    why: String,
) -> Result<T, SessionError> {
    tracing::warn!(role = %s.role.name, why = %why, "server connection lost");
    let (code, message) = if in_flight {
        (
            SqlState::TRANSACTION_RESOLUTION_UNKNOWN,
            format!(
                "the server connection was lost ({why}) while a request was unanswered; \
                 whether its transaction committed is unknown"
            ),
        )
    } else {
        (
            SqlState::ADMIN_SHUTDOWN,
            format!("the server connection was lost ({why}); an open transaction was rolled back"),
        )
    };
    fatal(&mut s.stream, code, message).await
}
