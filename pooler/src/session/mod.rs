//! A client's life after the front door: authenticate as an app, then relay (a
//! transaction at a time, or the whole session), and leave nothing behind.

mod checkout;
mod client;
mod cursor;
mod hold;
mod listen;
mod login;
pub mod park;
pub mod prepared;
mod link;
mod relay;
mod routines;
mod settings;
mod signals;
mod stall;
pub(crate) mod state;
mod tracker;
mod upkeep;
mod wire;

pub use client::Session;
pub use cursor::Need;

use std::sync::Arc;

use crate::frontdoor::{Arrival, SessionError};
use crate::net::Hold;
use crate::registry::ClientIdent;
use crate::registry::{ClientInfo, Registered};
use crate::shared::Shared;

/// Logs an app's client in and relays for it until it leaves. Never panics on client
/// input: every failure becomes an ErrorResponse (where the protocol still allows
/// one) and the caller's log line.
pub async fn serve(arrival: Arrival, shared: &Arc<Shared>) -> Result<(), SessionError> {
    let Arrival {
        stream,
        peer,
        listener,
        startup,
        buf,
        deadline,
        client,
        console: _,
    } = arrival;
    // Boxed: an async fn keeps a moved-in argument twice (as passed and as bound),
    // and the session lives as long as the client.
    let session = Box::new(
        Box::pin(login::login(
            stream, peer, shared, startup, buf, listener, deadline,
        ))
        .await?,
    );
    client.logged_in(ClientIdent {
        user: session.role.name.clone(),
        database: shared.names.get(&shared.config().upstream.dbname),
        application_name: shared
            .names
            .get(session.params.get("application_name").unwrap_or_default()),
        tls: session.stream.tls_description().into_boxed_str(),
        admin: false,
    });
    // Just logged in: it parks until it sends something.
    relay_or_park(session, shared, client, true).await
}

/// Relays until the client leaves, or parks it when the relay hands it back idle.
async fn relay_or_park(
    session: Box<Session>,
    shared: &Arc<Shared>,
    client: Registered<ClientInfo>,
    park_now: bool,
) -> Result<(), SessionError> {
    if let Some((session, client)) = relay::run(session, shared, client, park_now).await? {
        park::park(session, client, shared, resume);
    }
    Ok(())
}

/// A parked client with work: a task of its own again, counted by the tracker
/// before `hold` (its count while parked) goes.
fn resume(session: Box<Session>, client: Registered<ClientInfo>, shared: Arc<Shared>, hold: Hold) {
    let tasks = shared.tasks.clone();
    tasks.spawn(async move {
        drop(hold);
        let span = tracing::info_span!("client", id = client.id, peer = %client.addr);
        let run = relay_or_park(session, &shared, client, false);
        let result = tracing::Instrument::instrument(run, span.clone()).await;
        crate::frontdoor::report(&shared, &span, result);
    });
}
