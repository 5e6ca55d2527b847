//! The admin console: PgBouncer's virtual database (`psql -d pgbouncer`, also `admin`)
//! for the one configured admin role. It authenticates with SCRAM against the verifier
//! in the configuration (never `dataplane_auth`), never opens a server connection, and
//! answers [`command`]s itself: the simple query protocol, and Parse/Bind/Describe/
//! Execute of the same statements for drivers that only speak the extended one.
//! Errors are reported and the session goes on, as in PostgreSQL.

pub mod command;

use std::collections::HashMap;
use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use self::command::{Command, Show};
use super::tables::{self, Kind, Table};
use crate::backend::params::ClientParams;
use crate::control;
use crate::frontdoor::{
    Arrival, Proof, SessionError, encoded, fatal, password_failed, refused_attempt, scram_exchange,
    write_within,
};
use crate::metrics::{AuthResult, Limit};
use crate::net::stream::Stream;
use crate::proto::SqlState;
use crate::proto::backend::{self as msg, Diagnostic, Severity, TransactionStatus};
use crate::proto::frame::{self, Side};
use crate::proto::frontend;
use crate::registry::ClientIdent;
use crate::shared::Shared;
use crate::verifier::ScramSecret;

/// Parameters announced when no server has reported the cluster's own yet.
const FALLBACK_PARAMS: &[(&str, &str)] = &[
    ("server_encoding", "UTF8"),
    ("client_encoding", "UTF8"),
    ("DateStyle", "ISO, MDY"),
    ("integer_datetimes", "on"),
    ("standard_conforming_strings", "on"),
];

/// Logs the admin in and serves the console until the client leaves.
pub async fn serve(arrival: Arrival, shared: &Shared) -> Result<(), SessionError> {
    let refuse = SqlState::INVALID_AUTHORIZATION_SPECIFICATION;
    let user = arrival.param("user").map(str::to_owned);
    let database = arrival.param("database").map(str::to_owned);
    let Arrival {
        mut stream,
        peer,
        startup,
        mut buf,
        deadline,
        client,
        ..
    } = arrival;
    let Some(user) = user.as_deref() else {
        return fatal(
            &mut stream,
            refuse,
            "no user name in the startup packet".into(),
        )
        .await;
    };
    let database = database.unwrap_or_else(|| user.to_owned());
    let admin = shared.config().admin.clone();
    let Some((admin_user, secret)) = admin.credentials() else {
        let message = "the admin console is disabled: no admin.user and verifier are configured";
        return fatal(&mut stream, refuse, message.into()).await;
    };
    let attempt = match shared.limiter.admit(user, peer.ip(), deadline).await {
        Ok(a) => a,
        Err(e) => return refused_attempt(&mut stream, shared, e).await,
    };
    // Any other name runs the same exchange against a mock verifier and fails the same
    // way as a wrong admin password: the console never says which role is the admin.
    let is_admin = user == admin_user;
    let secret = if is_admin {
        secret
    } else {
        ScramSecret::mock(user, &shared.mock_secret)
    };
    let server_final = match scram_exchange(&mut stream, &mut buf, secret, deadline).await? {
        Proof::Valid { server_final, .. } if is_admin => {
            attempt.succeeded();
            server_final
        }
        Proof::Valid { .. } | Proof::Invalid => {
            attempt.failed();
            shared.metrics.auth(AuthResult::BadProof);
            tracing::info!(role = %user, "admin console authentication failed");
            return password_failed(&mut stream, user).await;
        }
    };
    let mut out = BytesMut::with_capacity(512);
    encoded(msg::authentication_sasl_final(&mut out, &server_final))?;
    msg::authentication_ok(&mut out);
    let params = ClientParams::from_startup(&startup);
    // The cluster's own parameters when a server has reported them, so clients see the
    // server_version they would see through the pooler.
    match shared.roles.all().iter().find_map(|r| r.params()) {
        Some(server) => {
            for (name, value) in server.announce(&params) {
                let _ = msg::parameter_status(&mut out, name, value.as_bytes());
            }
        }
        None => {
            for (name, value) in FALLBACK_PARAMS {
                let _ = msg::parameter_status(&mut out, name, value.as_bytes());
            }
        }
    }
    // No cancel key: nothing the console runs can be cancelled.
    msg::backend_key_data(&mut out, 0, 0);
    msg::ready_for_query(&mut out, TransactionStatus::Idle);
    write_within(&mut stream, &out, deadline).await?;
    out.clear();
    client.logged_in(ClientIdent {
        user: Arc::from(user),
        database: shared.names.get(&database),
        application_name: shared
            .names
            .get(params.get("application_name").unwrap_or_default()),
        tls: stream.tls_description().into_boxed_str(),
        admin: true,
    });
    shared.metrics.auth(AuthResult::Ok);
    tracing::info!(role = %user, "admin console session started");
    Console {
        shared,
        stream,
        buf,
        out,
        statements: HashMap::new(),
        portals: HashMap::new(),
        skipping: false,
    }
    .run()
    .await
}

struct Console<'a> {
    shared: &'a Shared,
    stream: Stream,
    buf: BytesMut,
    out: BytesMut,
    /// Extended protocol: statement text by prepared-statement name, and by portal
    /// with the portal's result format codes.
    statements: HashMap<Bytes, String>,
    portals: HashMap<Bytes, (String, Vec<i16>)>,
    /// After an error in an extended-protocol batch, everything up to Sync is skipped.
    skipping: bool,
}

/// A failed command: what the client is told.
type Failure = (SqlState, String);

impl Console<'_> {
    async fn run(mut self) -> Result<(), SessionError> {
        let mut shutdown = self.shared.shutdown.clone();
        loop {
            let (tag, body) = loop {
                // Held whole, so bounded like every message the pooler holds whole.
                let cap = self.shared.config().max_message_bytes;
                if let Ok(Some(header)) = frame::peek(&self.buf, Side::Frontend) {
                    if header.len - frame::HEADER_LEN > cap {
                        self.shared.metrics.limit(Limit::MessageTooLong, 1);
                        let message = format!(
                            "a console message of {} bytes is over max_message_bytes ({cap})",
                            header.len - frame::HEADER_LEN
                        );
                        return fatal(&mut self.stream, SqlState::PROGRAM_LIMIT_EXCEEDED, message)
                            .await;
                    }
                }
                match frame::split(&mut self.buf, Side::Frontend) {
                    Ok(Some(m)) => break m,
                    Ok(None) => {}
                    Err(e) => {
                        return fatal(
                            &mut self.stream,
                            SqlState::PROTOCOL_VIOLATION,
                            e.to_string(),
                        )
                        .await;
                    }
                }
                if !self.out.is_empty() {
                    self.stream.write_all(&self.out).await?;
                    self.out.clear();
                }
                tokio::select! {
                    n = self.stream.read_buf(&mut self.buf) => {
                        if n? == 0 {
                            return Ok(());
                        }
                    }
                    _ = shutdown.changed() => {
                        let message = "the pooler is shutting down".to_owned();
                        return fatal(&mut self.stream, SqlState::ADMIN_SHUTDOWN, message).await;
                    }
                }
            };
            match tag {
                b'Q' => {
                    self.skipping = false;
                    self.query(&body).await?;
                    msg::ready_for_query(&mut self.out, TransactionStatus::Idle);
                }
                b'X' => return Ok(()),
                b'S' => {
                    self.skipping = false;
                    msg::ready_for_query(&mut self.out, TransactionStatus::Idle);
                }
                b'H' => {}
                _ if self.skipping => {}
                b'P' | b'B' | b'D' | b'E' | b'C' => {
                    if let Err((code, message)) = self.extended(tag, &body).await? {
                        msg::write_error(&mut self.out, code, &message);
                        self.skipping = true;
                    }
                }
                other => {
                    let message = format!(
                        "the admin console does not take message type {:?}",
                        char::from(other)
                    );
                    return fatal(&mut self.stream, SqlState::PROTOCOL_VIOLATION, message).await;
                }
            }
        }
    }

    /// A simple Query: its statements in order, up to the first that fails.
    async fn query(&mut self, body: &[u8]) -> Result<(), SessionError> {
        let text = match frontend::parse_query(body) {
            Ok(t) => String::from_utf8_lossy(t).into_owned(),
            Err(e) => {
                return fatal(
                    &mut self.stream,
                    SqlState::PROTOCOL_VIOLATION,
                    e.to_string(),
                )
                .await;
            }
        };
        let mut any = false;
        for statement in command::statements(&text) {
            any = true;
            let result = match command::parse(statement) {
                Ok(cmd) => self.execute(cmd, &[], true).await?,
                Err(e) => Err((e.sqlstate(), e.to_string())),
            };
            if let Err((code, message)) = result {
                msg::write_error(&mut self.out, code, &message);
                break;
            }
        }
        if !any {
            msg::empty_query_response(&mut self.out);
        }
        Ok(())
    }

    /// Parse, Bind, Describe, Execute, Close. Statements are checked at Parse and run
    /// at Execute; nothing takes parameters.
    async fn extended(
        &mut self,
        tag: u8,
        body: &[u8],
    ) -> Result<Result<(), Failure>, SessionError> {
        let malformed =
            |e: crate::proto::error::ParseError| (SqlState::PROTOCOL_VIOLATION, e.to_string());
        let missing = |what: &str, name: &[u8]| {
            (
                SqlState::UNDEFINED_OBJECT,
                format!(
                    "{what} \"{}\" does not exist",
                    String::from_utf8_lossy(name)
                ),
            )
        };
        match tag {
            b'P' => {
                let (name, query) = match frontend::parse_parse_head(body) {
                    Ok(v) => v,
                    Err(e) => return Ok(Err(malformed(e))),
                };
                let query = String::from_utf8_lossy(query);
                let mut statements = command::statements(&query);
                let (Some(statement), None) = (statements.next(), statements.next()) else {
                    let message = "a prepared statement holds exactly one command";
                    return Ok(Err((SqlState::SYNTAX_ERROR, message.into())));
                };
                if let Err(e) = command::parse(statement) {
                    return Ok(Err((e.sqlstate(), e.to_string())));
                }
                self.statements
                    .insert(Bytes::copy_from_slice(name), statement.to_owned());
                msg::parse_complete(&mut self.out);
            }
            b'B' => {
                let frontend::Bind {
                    portal,
                    statement: name,
                    result_formats: formats,
                } = match frontend::parse_bind(body) {
                    Ok(v) => v,
                    Err(e) => return Ok(Err(malformed(e))),
                };
                let Some(text) = self.statements.get(name).cloned() else {
                    return Ok(Err(missing("prepared statement", name)));
                };
                self.portals
                    .insert(Bytes::copy_from_slice(portal), (text, formats));
                msg::bind_complete(&mut self.out);
            }
            b'D' => {
                let (kind, name) = match frontend::parse_target(body, "Describe") {
                    Ok(v) => v,
                    Err(e) => return Ok(Err(malformed(e))),
                };
                let text = if kind == b'S' {
                    self.statements.get(name)
                } else {
                    self.portals.get(name).map(|(text, _)| text)
                };
                let Some(text) = text.cloned() else {
                    return Ok(Err(missing("statement or portal", name)));
                };
                if kind == b'S' {
                    msg::no_parameters(&mut self.out);
                }
                match command::parse(&text) {
                    Ok(Command::Show(show)) if show != Show::Help => {
                        let table = self.table(show);
                        encoded(msg::row_description(&mut self.out, &describe(&table)))?;
                    }
                    _ => msg::no_data(&mut self.out),
                }
            }
            b'E' => {
                let portal = match frontend::parse_execute_portal(body) {
                    Ok(v) => v,
                    Err(e) => return Ok(Err(malformed(e))),
                };
                let Some((text, formats)) = self.portals.get(portal).cloned() else {
                    return Ok(Err(missing("portal", portal)));
                };
                return match command::parse(&text) {
                    Ok(cmd) => self.execute(cmd, &formats, false).await,
                    Err(e) => Ok(Err((e.sqlstate(), e.to_string()))),
                };
            }
            _ => {
                let (kind, name) = match frontend::parse_target(body, "Close") {
                    Ok(v) => v,
                    Err(e) => return Ok(Err(malformed(e))),
                };
                if kind == b'S' {
                    self.statements.remove(name);
                } else {
                    self.portals.remove(name);
                }
                msg::close_complete(&mut self.out);
            }
        }
        Ok(Ok(()))
    }

    fn table(&self, show: Show) -> Table {
        let shared = self.shared;
        match show {
            Show::Pools => tables::pools(shared),
            Show::Clients => tables::clients(shared),
            Show::Servers => tables::servers(shared),
            Show::Stats => tables::stats(shared),
            Show::Config => tables::config(shared),
            Show::Databases => tables::databases(shared),
            Show::Version => tables::version(),
            Show::Peers => tables::peers(shared),
            Show::Lists | Show::Help => tables::lists(shared),
        }
    }

    fn notice(&mut self, code: SqlState, message: &str) {
        msg::notice_response(
            &mut self.out,
            &Diagnostic::new(Severity::Notice, code, message),
        );
    }

    /// Runs one command. `simple`: the simple protocol, which describes the rows first;
    /// the extended one described them already and gives `formats`, the result format
    /// codes from Bind (none: all text; one: for every column; else one per column).
    async fn execute(
        &mut self,
        cmd: Command,
        formats: &[i16],
        simple: bool,
    ) -> Result<Result<(), Failure>, SessionError> {
        let shared = self.shared;
        let tag = match cmd {
            Command::Show(Show::Help) => {
                self.notice(SqlState::SUCCESSFUL_COMPLETION, command::HELP);
                "SHOW"
            }
            Command::Show(show) => {
                let table = self.table(show);
                if simple {
                    encoded(msg::row_description(&mut self.out, &describe(&table)))?;
                }
                let binary = |i: usize| match formats {
                    [] => false,
                    [one] => *one == 1,
                    many => many.get(i) == Some(&1),
                };
                for row in &table.rows {
                    let cells: Vec<Option<Vec<u8>>> = row
                        .iter()
                        .enumerate()
                        .map(|(i, c)| c.encode(binary(i)))
                        .collect();
                    let cells: Vec<Option<&[u8]>> = cells.iter().map(|c| c.as_deref()).collect();
                    encoded(msg::data_row(&mut self.out, &cells))?;
                }
                "SHOW"
            }
            Command::Pause(role) => match control::pause(shared, role.as_deref()).await {
                Ok(()) => "PAUSE",
                Err(e) => return Ok(Err((e.sqlstate(), e.to_string()))),
            },
            Command::Resume(role) => match control::resume(shared, role.as_deref()) {
                Ok(()) => "RESUME",
                Err(e) => return Ok(Err((e.sqlstate(), e.to_string()))),
            },
            Command::Kill(role) => match control::kill(shared, &role) {
                Ok(n) => {
                    let message = format!("disconnected {n} client(s) of role \"{role}\"");
                    self.notice(SqlState::SUCCESSFUL_COMPLETION, &message);
                    "KILL"
                }
                Err(e) => return Ok(Err((e.sqlstate(), e.to_string()))),
            },
            Command::Reload => match crate::reload::reload(shared).await {
                Ok(report) => {
                    if !report.applied.is_empty() {
                        let message = format!("applied: {}", report.applied.join(", "));
                        self.notice(SqlState::SUCCESSFUL_COMPLETION, &message);
                    }
                    if !report.needs_restart.is_empty() {
                        let message = format!(
                            "not applied, these take a restart (their old values stay): {}",
                            report.needs_restart.join(", ")
                        );
                        self.notice(SqlState::WARNING, &message);
                    }
                    "RELOAD"
                }
                Err(e) => return Ok(Err((SqlState::CONFIG_FILE_ERROR, e.to_string()))),
            },
            Command::Shutdown => {
                control::shutdown(shared);
                "SHUTDOWN"
            }
        };
        encoded(msg::command_complete(&mut self.out, tag))?;
        Ok(Ok(()))
    }
}

/// A table's RowDescription columns.
fn describe(table: &Table) -> Vec<(&str, u32)> {
    table
        .columns
        .iter()
        .map(|(name, kind)| {
            let oid = match kind {
                Kind::Int => msg::INT8_OID,
                Kind::Text => msg::TEXT_OID,
            };
            (*name, oid)
        })
        .collect()
}
