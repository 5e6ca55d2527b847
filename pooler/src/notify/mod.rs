//! LISTEN/NOTIFY in transaction mode without pinning, and no app hearing another's
//! notifications (design.md, "LISTEN/NOTIFY").
//!
//! * [`channels`]: a role's listening clients and the union of their channels, with the
//!   batches of LISTEN/UNLISTEN its listener server owes (pure).
//! * [`inbox`]: a client's notifications waiting for it to be between transactions,
//!   bounded in bytes (pure).
//! * [`senders`]: the role of the backend that sent a notification, for the isolation
//!   check every notification passes before a client sees it.
//! * [`sql`]: what the listener server and a client's transaction server are asked.
//! * [`hub`]: per role with listening clients, one listener (its task, `listener.rs`,
//!   holds the server); each client's [`Subscription`] and its inbox.

pub mod channels;
pub mod hub;
pub mod inbox;
mod listener;
mod role;
pub mod senders;
pub mod sql;

pub use hub::{Ack, Hub, Limits, ListenError, Subscription};
pub use inbox::Inbox;
