//! A client's life after the front door: authenticate as an app, then relay (a
//! transaction at a time, or the whole session), and leave nothing behind.

mod checkout;
mod client;
mod cursor;
mod listen;
mod login;
pub mod prepared;
mod relay;
mod signals;
mod state;
mod tracker;
mod upkeep;
mod wire;

pub use client::Session;

use crate::frontdoor::{Arrival, SessionError};
use crate::registry::ClientIdent;
use crate::shared::Shared;

/// Logs an app's client in and relays for it until it leaves. Never panics on client
/// input: every failure becomes an ErrorResponse (where the protocol still allows
/// one) and the caller's log line.
pub async fn serve(arrival: Arrival, shared: &Shared) -> Result<(), SessionError> {
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
        database: shared.config().upstream.dbname.clone(),
        application_name: session
            .params
            .get("application_name")
            .unwrap_or_default()
            .to_owned(),
        tls: session.stream.tls_description(),
        admin: false,
    });
    relay::run(session, shared, &client.entry).await
}
