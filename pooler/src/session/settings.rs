//! What a client asks for at startup, checked as Postgres checks it.
//!
//! A startup packet sets parameters two ways: the `options` parameter (`-c name=value`,
//! `--name=value` and the server's other switches, read by [`crate::proto::options`]),
//! then every key that is not `user`, `database`, `options` or `replication`. Postgres
//! applies them in that order when the session starts, and ends the connection with the
//! first one it refuses (postinit.c, `process_startup_options`).
//!
//! The pooler cannot start a session per client, so it tries the settings on a server
//! of the role instead: in a transaction that is rolled back, with the role's defaults
//! restored first (`RESET ALL`), one `set_config` per setting, in order, each value a
//! bind parameter. What comes back is what a direct client would get: the error of the
//! first setting Postgres refuses (re-sent as FATAL), the notices each gives (an
//! `application_name` past 63 bytes is truncated with a NOTICE), and the reported values
//! as Postgres spells them. Settings a server accepted without a notice are remembered
//! per role, so a client asking for known ones (a driver's usual packet) logs in without
//! a check; a plain `application_name` (printable ASCII that fits), the one setting
//! that differs from process to process, needs none.
//!
//! One difference remains: a parameter that may only be set when a session starts
//! (`ignore_system_indexes`, `post_auth_delay`) cannot be carried from server to server,
//! so it is refused with 0A000 where Postgres would take it.

use std::collections::HashMap;
use std::time::Duration;

use bytes::{BufMut, Bytes, BytesMut};
use postgres_protocol::IsNull;
use postgres_protocol::message::frontend;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::backend::ServerConn;
use crate::proto::SqlState;
use crate::proto::backend as msg;
use crate::proto::frame::{self, Side};
use crate::proto::options::{self, OptionsError};
use crate::proto::startup::PROTOCOL_OPTION_PREFIX;
use crate::shared::{CheckedSetting, RoleShared};

/// Startup keys Postgres reads itself; every other one is a setting.
const NOT_SETTINGS: &[&str] = &["user", "database", "options", "replication"];

/// The longest `application_name` Postgres keeps as it is (NAMEDATALEN - 1).
const MAX_NAME_BYTES: usize = 63;

/// How long the check may take on the server before the login is refused.
const CHECK_DEADLINE: Duration = Duration::from_secs(5);

/// What a startup packet asks for.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Requested {
    /// `(name, value)` in the order Postgres applies them, up to the options' fault.
    pub settings: Vec<(String, String)>,
    /// Where Postgres stops reading the options, after the settings before it.
    pub fault: Option<OptionsError>,
}

/// What the client is told.
#[derive(Debug)]
pub enum Outcome {
    /// Let in: the reported values of its settings as Postgres spells them (by lower-case
    /// name), and the notices to send before its ParameterStatus messages.
    Accepted {
        reported: HashMap<String, String>,
        notices: Vec<Bytes>,
    },
    /// Refused: the notices Postgres sent first, then this FATAL ErrorResponse.
    Refused {
        notices: Vec<Bytes>,
        error: Bytes,
        code: SqlState,
        message: String,
    },
}

/// Reads a startup packet's settings.
pub fn requested(startup: &[(String, String)]) -> Requested {
    let mut settings = Vec::new();
    // Postgres keeps the last `options` of a packet (backend_startup.c).
    if let Some((_, value)) = startup.iter().rev().find(|(k, _)| k == "options") {
        let parsed = options::parse(value);
        settings.extend(parsed.settings.into_iter().map(|s| (s.name, s.value)));
        if parsed.error.is_some() {
            return Requested {
                settings,
                fault: parsed.error,
            };
        }
    }
    settings.extend(
        startup
            .iter()
            .filter(|(k, _)| {
                !NOT_SETTINGS.contains(&k.as_str()) && !k.starts_with(PROTOCOL_OPTION_PREFIX)
            })
            .cloned(),
    );
    Requested {
        settings,
        fault: None,
    }
}

impl Requested {
    /// The outcome without asking a server, when every setting is known to pass
    /// without a notice.
    pub fn known(&self, role: &RoleShared) -> Option<Outcome> {
        let mut reported = HashMap::new();
        for (name, value) in &self.settings {
            if plain_application_name(name, value) {
                reported.insert(name.to_ascii_lowercase(), value.clone());
                continue;
            }
            let checked = role.checked_setting(name, value)?;
            match &checked.reported {
                Some(v) => reported.insert(name.to_ascii_lowercase(), v.clone()),
                None => reported.remove(&name.to_ascii_lowercase()),
            };
        }
        Some(self.finish(reported, Vec::new()))
    }

    /// After the settings all passed: the options' fault, if any, is what ends it.
    fn finish(&self, reported: HashMap<String, String>, notices: Vec<Bytes>) -> Outcome {
        match &self.fault {
            None => Outcome::Accepted { reported, notices },
            Some(fault) => {
                let message = fault.to_string();
                let mut error = BytesMut::new();
                let mut d =
                    msg::Diagnostic::new(msg::Severity::Fatal, SqlState::SYNTAX_ERROR, &message);
                d.hint = fault.hint();
                msg::error_response(&mut error, &d);
                Outcome::Refused {
                    notices,
                    error: error.freeze(),
                    code: SqlState::SYNTAX_ERROR,
                    message,
                }
            }
        }
    }

    /// Tries the settings on `server` (idle, of the client's role) and remembers for the
    /// role those it accepted. An `Err` leaves the server in an unknown state: close it.
    pub async fn check(
        &self,
        server: &mut ServerConn,
        role: &RoleShared,
    ) -> Result<Outcome, std::io::Error> {
        if self.settings.is_empty() {
            return Ok(self.finish(HashMap::new(), Vec::new()));
        }
        let tried = tokio::time::timeout(CHECK_DEADLINE, self.try_on(server))
            .await
            .unwrap_or_else(|_| Err(std::io::ErrorKind::TimedOut.into()))?;
        let mut notices = Vec::new();
        // Whether each setting is the last of its name, in one pass from the end (a
        // rescan per setting would be quadratic in what the client sent).
        let mut seen = std::collections::HashSet::new();
        let mut last: Vec<bool> = self
            .settings
            .iter()
            .rev()
            .map(|(n, _)| seen.insert(n.to_ascii_lowercase()))
            .collect();
        last.reverse();
        for (i, (name, value)) in self.settings.iter().enumerate() {
            let theirs = tried.notices.get(i).cloned().unwrap_or_default();
            if tried.refused.as_ref().is_some_and(|(at, _)| *at == i) {
                notices.extend(theirs);
                break;
            }
            let lower = name.to_ascii_lowercase();
            let last_of_its_name = last.get(i).copied().unwrap_or(true);
            // One that gave a notice is checked every time: what a notice says, and
            // whether it is sent, depends on the settings before it (client_encoding,
            // lc_messages, client_min_messages).
            if last_of_its_name && theirs.is_empty() {
                let reported = tried.reported.get(&lower).cloned();
                role.remember_setting(name, value, CheckedSetting { reported });
            }
            notices.extend(theirs);
        }
        match tried.refused {
            None => Ok(self.finish(tried.reported, notices)),
            Some((at, body)) => {
                // `at` counts the server's replies: one that sent more than asked is
                // broken, not a reason to panic.
                let Some((name, _)) = self.settings.get(at) else {
                    return Err(std::io::Error::other(
                        "the server answered more settings than were sent",
                    ));
                };
                let (error, code, message) = refusal(server, name, &body).await?;
                Ok(Outcome::Refused {
                    notices,
                    error,
                    code,
                    message,
                })
            }
        }
    }

    /// One round trip: `BEGIN; RESET ALL`, a `set_config` per setting (extended
    /// protocol, so each value is a bind parameter and each gets its own
    /// CommandComplete), Sync, `ROLLBACK`.
    async fn try_on(&self, server: &mut ServerConn) -> Result<Tried, std::io::Error> {
        let mut out = BytesMut::new();
        frontend::query("BEGIN; RESET ALL", &mut out)?;
        frontend::parse(
            "",
            "SELECT pg_catalog.set_config($1, $2, false)",
            [25u32, 25],
            &mut out,
        )?;
        for (name, value) in &self.settings {
            bind_text(&[name, value], &mut out)?;
            frontend::execute("", 0, &mut out)?;
        }
        frontend::sync(&mut out);
        frontend::query("ROLLBACK", &mut out)?;
        server.stream.write_all(&out).await?;

        // Postgres reports a value only when it changes: one the client sets to what
        // the session had is known from what the reset reported, or from before.
        let before = server.state.clone();
        let mut after_reset: HashMap<String, String> = HashMap::new();
        let mut tried = Tried {
            notices: vec![Vec::new(); self.settings.len()],
            ..Tried::default()
        };
        // Replies to BEGIN/RESET ALL, to the settings, to ROLLBACK: one ReadyForQuery each.
        let mut ready = 0;
        let mut done = 0;
        loop {
            let (tag, body) = next_message(server).await?;
            match tag {
                b'S' => {
                    if let Ok(p) = msg::parse_parameter_status(&body) {
                        let value = String::from_utf8_lossy(p.value);
                        server.state.record(p.name, &value);
                        let seen = match ready {
                            0 => &mut after_reset,
                            1 => &mut tried.reported,
                            _ => continue,
                        };
                        seen.insert(p.name.to_ascii_lowercase(), value.into_owned());
                    }
                }
                b'N' if ready == 1 => {
                    if let Some(n) = tried.notices.get_mut(done) {
                        n.push(whole(tag, &body));
                    }
                }
                b'C' if ready == 1 => done += 1,
                b'E' if ready == 1 => tried.refused = Some((done, body)),
                b'E' => return Err(std::io::Error::other("the server refused the check")),
                b'Z' => {
                    ready += 1;
                    if ready < 3 {
                        continue;
                    }
                    if body.first() != Some(&b'I') {
                        return Err(std::io::Error::other("not idle after the check"));
                    }
                    for (name, _) in &self.settings {
                        let lower = name.to_ascii_lowercase();
                        if tried.reported.contains_key(&lower) {
                            continue;
                        }
                        let had = after_reset
                            .get(&lower)
                            .cloned()
                            .or_else(|| before.reported(name).map(str::to_owned));
                        if let Some(v) = had {
                            tried.reported.insert(lower, v);
                        }
                    }
                    return Ok(tried);
                }
                _ => {}
            }
        }
    }
}

/// What the server said to the settings.
#[derive(Debug, Default)]
struct Tried {
    /// Notices per setting, whole messages.
    notices: Vec<Vec<Bytes>>,
    /// ParameterStatus values after the settings, by lower-case name.
    reported: HashMap<String, String>,
    /// The setting the server refused, and its ErrorResponse body.
    refused: Option<(usize, Bytes)>,
}

/// A name any application_name check would keep as it is: printable ASCII that fits.
fn plain_application_name(name: &str, value: &str) -> bool {
    name.eq_ignore_ascii_case("application_name")
        && value.len() <= MAX_NAME_BYTES
        && value.bytes().all(|b| (0x20..0x7f).contains(&b))
}

fn whole(tag: u8, body: &[u8]) -> Bytes {
    let mut out = BytesMut::with_capacity(5 + body.len());
    out.put_u8(tag);
    // A body the frame reader accepted fits its length word again.
    out.put_u32(u32::try_from(4 + body.len()).unwrap_or(u32::MAX));
    out.put_slice(body);
    out.freeze()
}

/// The FATAL a direct client would get for the setting `name` the server refused with
/// `body`: the server's own error as FATAL, except for parameters only a session's
/// start may set, which `set_config` refuses for another reason than Postgres would.
async fn refusal(
    server: &mut ServerConn,
    name: &str,
    body: &[u8],
) -> Result<(Bytes, SqlState, String), std::io::Error> {
    let bad = |e: crate::proto::error::ParseError| std::io::Error::other(e.to_string());
    let diagnostic = msg::parse_error_response(body).map_err(bad)?;
    let start_only = diagnostic.code == SqlState::CANT_CHANGE_RUNTIME_PARAM.code()
        && diagnostic
            .message
            .ends_with("cannot be set after connection start");
    if start_only {
        let canonical = quoted(&diagnostic.message).unwrap_or(name).to_owned();
        let mut error = BytesMut::new();
        let (code, message) =
            if context_of(server, &canonical).await?.as_deref() == Some("superuser-backend") {
                // What Postgres says to a role that is not a superuser (app roles never are).
                (
                    SqlState::INSUFFICIENT_PRIVILEGE,
                    format!("permission denied to set parameter \"{canonical}\""),
                )
            } else {
                (
                    SqlState::FEATURE_NOT_SUPPORTED,
                    format!(
                        "parameter \"{canonical}\" can only be set when a session starts, and the \
                     pooler's server sessions are shared: connect to PostgreSQL directly to set it"
                    ),
                )
            };
        msg::write_fatal(&mut error, code, &message);
        return Ok((error.freeze(), code, message));
    }
    let mut error = BytesMut::new();
    msg::error_as_fatal(&mut error, body).map_err(bad)?;
    let code = SqlState::known(diagnostic.code).unwrap_or(SqlState::INVALID_PARAMETER_VALUE);
    Ok((error.freeze(), code, diagnostic.message.into_owned()))
}

/// The first `"…"` of a message.
fn quoted(message: &str) -> Option<&str> {
    let (_, rest) = message.split_once('"')?;
    rest.split_once('"').map(|(name, _)| name)
}

/// `pg_settings.context` of parameter `name`, asked with the name as a bind parameter.
async fn context_of(server: &mut ServerConn, name: &str) -> Result<Option<String>, std::io::Error> {
    let mut out = BytesMut::new();
    frontend::parse(
        "",
        "SELECT context FROM pg_catalog.pg_settings WHERE name = $1",
        [25u32],
        &mut out,
    )?;
    bind_text(&[name], &mut out)?;
    frontend::execute("", 0, &mut out)?;
    frontend::sync(&mut out);
    server.stream.write_all(&out).await?;
    let mut context = None;
    loop {
        let (tag, body) = next_message(server).await?;
        match tag {
            b'D' => context = data_row_text(&body),
            b'Z' => return Ok(context),
            _ => {}
        }
    }
}

/// A Bind of the unnamed statement to the unnamed portal, every value text.
fn bind_text(values: &[&str], out: &mut BytesMut) -> Result<(), std::io::Error> {
    frontend::bind(
        "",
        "",
        [0i16],
        values.iter().copied(),
        |v, buf: &mut BytesMut| {
            buf.put_slice(v.as_bytes());
            Ok(IsNull::No)
        },
        [0i16],
        out,
    )
    .map_err(|_| std::io::Error::other("a value could not be encoded"))
}

/// The server's next whole message: its tag and body.
async fn next_message(server: &mut ServerConn) -> Result<(u8, Bytes), std::io::Error> {
    loop {
        if let Some(message) = frame::split(&mut server.buf, Side::Backend)
            .map_err(|e| std::io::Error::other(e.to_string()))?
        {
            return Ok(message);
        }
        if server.stream.read_buf(&mut server.buf).await? == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
    }
}

/// The first column of a DataRow body, as text.
fn data_row_text(body: &[u8]) -> Option<String> {
    let len = i32::from_be_bytes(body.get(2..6)?.try_into().ok()?);
    let len = usize::try_from(len).ok()?;
    let value = body.get(6..6 + len)?;
    Some(String::from_utf8_lossy(value).into_owned())
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;

    /// A startup packet's parameters (login.rs's tests use it too).
    pub(in crate::session) fn packet(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    #[test]
    fn options_come_first_then_the_packets_own_settings() {
        let r = requested(&packet(&[
            ("user", "u"),
            ("database", "d"),
            ("application_name", "psql"),
            ("options", "-c statement_timeout=5s --search-path=a"),
            ("_pq_.x", "y"),
            ("replication", "false"),
        ]));
        assert_eq!(
            r.settings,
            packet(&[
                ("statement_timeout", "5s"),
                ("search_path", "a"),
                ("application_name", "psql"),
            ])
        );
        assert_eq!(r.fault, None);
    }

    #[test]
    fn an_options_fault_stops_the_settings_where_postgres_stops() {
        let r = requested(&packet(&[
            ("options", "-c a.b=1 -X"),
            ("application_name", "psql"),
        ]));
        assert_eq!(r.settings, packet(&[("a.b", "1")]));
        assert!(matches!(r.fault, Some(OptionsError::InvalidArgument(_))));
    }

    #[test]
    fn a_known_packet_needs_no_server() {
        let role = crate::shared::Roles::default().get_or_insert("tk_t1_pa_dev");
        let r = requested(&packet(&[("user", "u"), ("application_name", "worker 7")]));
        assert!(matches!(r.known(&role), Some(Outcome::Accepted { .. })));
        let r = requested(&packet(&[("TimeZone", "UTC")]));
        assert!(r.known(&role).is_none(), "never checked");
        role.remember_setting(
            "TimeZone",
            "UTC",
            CheckedSetting {
                reported: Some("UTC".into()),
            },
        );
        let Some(Outcome::Accepted { reported, .. }) = r.known(&role) else {
            panic!("known now");
        };
        assert_eq!(reported["timezone"], "UTC");
        // An application_name Postgres would truncate is checked.
        let long = "a".repeat(64);
        let r = requested(&packet(&[("application_name", &long)]));
        assert!(r.known(&role).is_none());
        // A fault in the options needs no server either.
        let r = requested(&packet(&[("options", "-c")]));
        let Some(Outcome::Refused { code, message, .. }) = r.known(&role) else {
            panic!("refused");
        };
        assert_eq!(code, SqlState::SYNTAX_ERROR);
        assert_eq!(
            message,
            "invalid command-line argument for server process: -c"
        );
    }

    #[test]
    fn a_quoted_name_is_read_from_a_message() {
        assert_eq!(
            quoted("parameter \"ignore_system_indexes\" cannot be set after connection start"),
            Some("ignore_system_indexes")
        );
        assert_eq!(quoted("no quotes"), None);
    }
}
