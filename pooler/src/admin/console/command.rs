//! The console's language: PgBouncer's admin commands that this pooler has a meaning
//! for. Pure: text in, a [`Command`] out.

use crate::proto::SqlState;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    Show(Show),
    /// `PAUSE [role]`.
    Pause(Option<String>),
    /// `RESUME [role]`.
    Resume(Option<String>),
    /// `KILL role`.
    Kill(String),
    Reload,
    Shutdown,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Show {
    Pools,
    Clients,
    Servers,
    Stats,
    Config,
    Databases,
    Version,
    Lists,
    Peers,
    Help,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CommandError {
    #[error("syntax error at or near \"{0}\"; SHOW HELP lists the commands")]
    Syntax(String),
    #[error("{0} is not supported by this pooler; SHOW HELP lists the commands")]
    Unsupported(String),
    #[error("{0} needs a role name")]
    MissingRole(&'static str),
}

impl CommandError {
    pub fn sqlstate(&self) -> SqlState {
        match self {
            CommandError::Unsupported(_) => SqlState::FEATURE_NOT_SUPPORTED,
            _ => SqlState::SYNTAX_ERROR,
        }
    }
}

/// PgBouncer's console commands this pooler does not implement: refused as
/// unsupported (0A000) rather than as unknown (42601).
const UNSUPPORTED: &[&str] = &[
    "SET",
    "SUSPEND",
    "DISABLE",
    "ENABLE",
    "RECONNECT",
    "KILL_CLIENT",
    "WAIT_CLOSE",
];

/// The statements of a simple Query, without empty ones. The grammar has no quoted
/// `;`, so splitting on it is exact.
pub fn statements(query: &str) -> impl Iterator<Item = &str> {
    query.split(';').map(str::trim).filter(|s| !s.is_empty())
}

/// Parses one statement (no `;`).
pub fn parse(statement: &str) -> Result<Command, CommandError> {
    let mut words = statement.split_whitespace();
    let verb = words.next().unwrap_or_default().to_ascii_uppercase();
    if UNSUPPORTED.contains(&verb.as_str()) {
        return Err(CommandError::Unsupported(verb));
    }
    let arg = words.next();
    if let Some(extra) = words.next() {
        return Err(CommandError::Syntax(extra.to_owned()));
    }
    let role = |arg: Option<&str>| arg.map(unquote).transpose();
    let no_arg = |cmd: Command| match arg {
        None => Ok(cmd),
        Some(a) => Err(CommandError::Syntax(a.to_owned())),
    };
    match verb.as_str() {
        "SHOW" => {
            let Some(what) = arg else {
                return Err(CommandError::Syntax("SHOW".into()));
            };
            let show = match what.to_ascii_uppercase().as_str() {
                "POOLS" => Show::Pools,
                "CLIENTS" => Show::Clients,
                "SERVERS" => Show::Servers,
                "STATS" => Show::Stats,
                "CONFIG" => Show::Config,
                "DATABASES" => Show::Databases,
                "VERSION" => Show::Version,
                "LISTS" => Show::Lists,
                "PEERS" => Show::Peers,
                "HELP" => Show::Help,
                other => return Err(CommandError::Unsupported(format!("SHOW {other}"))),
            };
            Ok(Command::Show(show))
        }
        "PAUSE" => Ok(Command::Pause(role(arg)?)),
        "RESUME" => Ok(Command::Resume(role(arg)?)),
        "KILL" => match role(arg)? {
            Some(r) => Ok(Command::Kill(r)),
            None => Err(CommandError::MissingRole("KILL")),
        },
        "RELOAD" => no_arg(Command::Reload),
        // Both waits of PgBouncer's SHUTDOWN are what ours does anyway: stop accepting,
        // let transactions finish within the grace period.
        "SHUTDOWN" => match arg.map(str::to_ascii_uppercase).as_deref() {
            None | Some("WAIT_FOR_SERVERS") | Some("WAIT_FOR_CLIENTS") => Ok(Command::Shutdown),
            Some(_) => no_arg(Command::Shutdown),
        },
        _ => Err(CommandError::Syntax(
            statement
                .split_whitespace()
                .next()
                .unwrap_or_default()
                .to_owned(),
        )),
    }
}

/// A role name as written: bare, or double-quoted with `""` for a quote.
fn unquote(word: &str) -> Result<String, CommandError> {
    match word.strip_prefix('"') {
        None => Ok(word.to_owned()),
        Some(rest) => match rest.strip_suffix('"') {
            Some(inner) if !inner.is_empty() => Ok(inner.replace("\"\"", "\"")),
            _ => Err(CommandError::Syntax(word.to_owned())),
        },
    }
}

/// What `SHOW HELP` says.
pub const HELP: &str = "Console usage\n\
    \tSHOW [POOLS|CLIENTS|SERVERS|STATS|CONFIG|DATABASES|LISTS|PEERS|VERSION|HELP]\n\
    \tPAUSE [role]\n\
    \tRESUME [role]\n\
    \tKILL role\n\
    \tRELOAD\n\
    \tSHUTDOWN";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_commands() {
        assert_eq!(parse("show pools"), Ok(Command::Show(Show::Pools)));
        assert_eq!(parse("SHOW  Clients"), Ok(Command::Show(Show::Clients)));
        assert_eq!(parse("show peers"), Ok(Command::Show(Show::Peers)));
        assert_eq!(parse("PAUSE"), Ok(Command::Pause(None)));
        assert_eq!(parse("pause tk_1"), Ok(Command::Pause(Some("tk_1".into()))));
        assert_eq!(
            parse("RESUME \"tk_a\"\"b\""),
            Ok(Command::Resume(Some("tk_a\"b".into())))
        );
        assert_eq!(parse("kill tk_1"), Ok(Command::Kill("tk_1".into())));
        assert_eq!(parse("reload"), Ok(Command::Reload));
        assert_eq!(parse("SHUTDOWN WAIT_FOR_CLIENTS"), Ok(Command::Shutdown));
    }

    #[test]
    fn refuses_what_it_does_not_know() {
        assert_eq!(
            parse("SELECT 1").unwrap_err().sqlstate(),
            SqlState::SYNTAX_ERROR
        );
        assert_eq!(
            parse("SHOW FDS").unwrap_err().sqlstate(),
            SqlState::FEATURE_NOT_SUPPORTED
        );
        assert_eq!(
            parse("SET x = 1").unwrap_err().sqlstate(),
            SqlState::FEATURE_NOT_SUPPORTED
        );
        assert_eq!(
            parse("PAUSE a b").unwrap_err(),
            CommandError::Syntax("b".into())
        );
        assert_eq!(
            parse("SUSPEND").unwrap_err().sqlstate(),
            SqlState::FEATURE_NOT_SUPPORTED
        );
        assert_eq!(parse("KILL"), Err(CommandError::MissingRole("KILL")));
        assert!(parse("RELOAD now").is_err());
        assert!(parse("PAUSE \"\"").is_err());
        assert!(parse("SHOW").is_err());
    }

    #[test]
    fn splits_statements() {
        assert_eq!(
            statements(" SHOW POOLS; ;show stats;").collect::<Vec<_>>(),
            ["SHOW POOLS", "show stats"]
        );
    }
}
