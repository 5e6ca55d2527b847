//! The provisioner: the control-plane API that creates, rotates, limits and deletes each
//! app's schema, login role and credentials row on the shared cluster.
//!
//! Modules, in the order a request meets them:
//! - [`http`]: `app()` builds the axum router: bearer-token auth, problem+json errors,
//!   request ids, metrics, OpenAPI.
//! - [`names`]: the validated `tk_t<tenant>_p<slug>_<env>` identifiers (reject, never
//!   truncate).
//! - [`ddl`]: [`ddl::plan`] turns a request into SQL (pure), [`ddl::execute`] runs it in
//!   one transaction under the global advisory lock.
//! - [`secret`]: passwords (returned once, never stored) and SCRAM verifiers.
//! - [`view`]: an app as callers see it, the same JSON from the API and the CLI.
//! - [`migrate`]: the versioned migrations in `sql/`.
//! - [`config`]: the serve settings and their defaults; [`logging`]: log set-up that
//!   keeps statements (and so verifiers) out of the logs.

pub mod config;
pub mod ddl;
pub mod http;
pub mod logging;
pub mod metrics;
pub mod migrate;
pub mod names;
pub mod secret;
pub mod view;

pub use config::{ApiToken, PublicEndpoint};
pub use ddl::Provisioner;
