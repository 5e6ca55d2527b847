//! Session parameters that follow a client from server to server.
//!
//! A client states parameters at startup (client_encoding, DateStyle, TimeZone,
//! application_name, extra_float_digits, …) and may change reported ones later (the
//! server tells us with ParameterStatus). A server keeps whatever the previous client
//! left. On checkout the pooler sends one `SET`/`RESET` batch for the differences, so
//! every client sees its own values and nobody else's — and pays a round trip only
//! when something differs.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use postgres_protocol::escape::{escape_identifier, escape_literal};

/// Startup keys that are not session parameters.
const NOT_PARAMS: &[&str] = &["user", "database", "options", "replication"];

/// A set of parameter values, shared copy-on-write: clients of one driver send the
/// same startup values, and an idle client should not carry its own copy of them.
pub type ParamMap = Arc<BTreeMap<String, String>>;

/// What a client wants its session to look like.
#[derive(Debug, Default, Clone)]
pub struct ClientParams {
    wants: ParamMap,
    /// What the startup packet asked for: what `RESET ALL` returns to.
    startup: ParamMap,
}

impl ClientParams {
    /// The startup packet's parameters, as they are (the `options` parameter aside).
    pub fn from_startup(params: &[(String, String)]) -> Self {
        Self::from_settings(
            params
                .iter()
                .filter(|(k, _)| !NOT_PARAMS.contains(&k.as_str()) && !k.starts_with("_pq_."))
                .map(|(k, v)| (k.as_str(), v.as_str())),
        )
    }

    /// Settings in the order Postgres applies them: a later one of the same name wins.
    pub fn from_settings<'a>(settings: impl Iterator<Item = (&'a str, &'a str)>) -> Self {
        let wants: ParamMap = Arc::new(
            settings
                .map(|(k, v)| (canonical(k), v.to_owned()))
                .collect(),
        );
        ClientParams {
            startup: wants.clone(),
            wants,
        }
    }

    /// As `from_settings`, sharing the map with the role's previous client when it
    /// asked for the same values (`last` remembers that map).
    pub fn shared_from_settings<'a>(
        settings: impl Iterator<Item = (&'a str, &'a str)>,
        last: &Mutex<Option<ParamMap>>,
    ) -> Self {
        let mut made = Self::from_settings(settings);
        if let Ok(mut last) = last.lock() {
            match last.as_ref() {
                Some(known) if **known == *made.startup => {
                    made.startup = known.clone();
                    made.wants = known.clone();
                }
                _ => *last = Some(made.startup.clone()),
            }
        }
        made
    }

    /// After the client's `RESET ALL` or `DISCARD ALL`.
    pub fn reset_to_startup(&mut self) {
        self.wants = self.startup.clone();
    }

    /// One parameter back to what the startup packet asked for (or to the server's
    /// default, when it asked nothing), after a reset that took it back.
    pub fn back_to_startup(&mut self, name: &str) {
        let name = canonical(name);
        let startup = self.startup.get(&name);
        if self.wants.get(&name) == startup {
            return;
        }
        match startup.cloned() {
            Some(v) => {
                Arc::make_mut(&mut self.wants).insert(name, v);
            }
            None => {
                Arc::make_mut(&mut self.wants).remove(&name);
            }
        }
    }

    /// The client changed a reported parameter (ParameterStatus while linked).
    pub fn record(&mut self, name: &str, value: &str) {
        let name = canonical(name);
        if self.wants.get(&name).map(String::as_str) != Some(value) {
            Arc::make_mut(&mut self.wants).insert(name, value.to_owned());
        }
    }

    pub fn get(&self, name: &str) -> Option<&str> {
        self.wants.get(&canonical(name)).map(String::as_str)
    }

    pub fn iter(&self) -> impl Iterator<Item = (&str, &str)> {
        self.wants.iter().map(|(k, v)| (k.as_str(), v.as_str()))
    }
}

/// What one server's session currently has.
#[derive(Debug, Default, Clone)]
pub struct ServerParams {
    /// Reported values as of login: the role's defaults.
    defaults: BTreeMap<String, String>,
    /// Reported values now, plus unreported ones we set.
    current: BTreeMap<String, String>,
    /// The client values `current` was last made equal to, while nothing changed
    /// since: a client sharing that very map needs no comparison at checkout.
    synced_to: Option<ParamMap>,
}

impl ServerParams {
    pub fn from_login(reported: &[(String, String)]) -> Self {
        let defaults: BTreeMap<_, _> = reported
            .iter()
            .map(|(k, v)| (canonical(k), v.clone()))
            .collect();
        ServerParams {
            current: defaults.clone(),
            defaults,
            synced_to: None,
        }
    }

    /// A ParameterStatus from this server.
    pub fn record(&mut self, name: &str, value: &str) {
        let name = canonical(name);
        if self.current.get(&name).map(String::as_str) != Some(value) {
            self.synced_to = None;
            self.current.insert(name, value.to_owned());
        }
    }

    /// `sync_sql` found nothing to do for `client`: remember it, so the next checkout
    /// by a client with the same values (the same shared map) skips the comparison.
    pub fn matches(&mut self, client: &ClientParams) {
        self.synced_to = Some(client.wants.clone());
    }

    /// The value of `name` now, if Postgres reports it (ParameterStatus): as it spells it.
    pub fn reported(&self, name: &str) -> Option<&str> {
        let name = canonical(name);
        if !self.defaults.contains_key(&name) {
            return None;
        }
        self.current.get(&name).map(String::as_str)
    }

    /// The parameters this server's books hold a value for.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.current.keys().map(String::as_str)
    }

    /// The SQL that makes this server's session what `client` wants, or `None` when it
    /// already is. `RESET` undoes what an earlier client changed and this one did not ask for.
    pub fn sync_sql(&self, client: &ClientParams) -> Option<String> {
        if self
            .synced_to
            .as_ref()
            .is_some_and(|p| Arc::ptr_eq(p, &client.wants))
        {
            return None;
        }
        // set_config, not SET: it takes the value as the startup packet gives it, so a
        // list (`search_path = a, b`) stays a list rather than one quoted name.
        let mut sets = Vec::new();
        for (name, value) in client.wants.iter() {
            if self.current.get(name) != Some(value) {
                sets.push(format!(
                    "pg_catalog.set_config({}, {}, false)",
                    escape_literal(name),
                    escape_literal(value)
                ));
            }
        }
        let mut sql = if sets.is_empty() {
            String::new()
        } else {
            format!("SELECT {};", sets.join(", "))
        };
        for (name, value) in &self.current {
            if client.wants.contains_key(name) {
                continue;
            }
            if self.defaults.get(name) != Some(value) {
                sql.push_str(&format!("RESET {};", escape_identifier(name)));
            }
        }
        (!sql.is_empty()).then_some(sql)
    }

    /// After `sync_sql` ran: unreported values we set are now current; reset ones are
    /// back to their defaults (reported ones also arrive as ParameterStatus).
    pub fn synced(&mut self, client: &ClientParams) {
        let stale: Vec<String> = self
            .current
            .keys()
            .filter(|k| !client.wants.contains_key(*k))
            .cloned()
            .collect();
        self.synced_to = None;
        for name in stale {
            match self.defaults.get(&name) {
                Some(d) => {
                    let d = d.clone();
                    self.current.insert(name, d);
                }
                None => {
                    self.current.remove(&name);
                }
            }
        }
        for (name, value) in client.wants.iter() {
            self.current.insert(name.clone(), value.clone());
        }
    }

    /// The reported parameters (ParameterStatus) and their values now.
    pub fn reported_values(&self) -> impl Iterator<Item = (&str, &str)> {
        self.defaults
            .keys()
            .filter_map(|k| self.current.get(k).map(|v| (k.as_str(), v.as_str())))
    }

    /// The values a newly logged-in client should be told (ParameterStatus), with the
    /// client's own wishes applied.
    pub fn announce<'a>(
        &'a self,
        client: &'a ClientParams,
    ) -> impl Iterator<Item = (&'a str, &'a str)> + 'a {
        self.defaults
            .iter()
            .map(move |(k, v)| (k.as_str(), client.get(k).unwrap_or(v.as_str())))
    }
}

/// Parameter names are case-insensitive in Postgres, but reported with their canonical
/// spelling (`DateStyle`, `TimeZone`); keep that spelling for the ones it reports.
fn canonical(name: &str) -> String {
    const REPORTED: &[&str] = &[
        "application_name",
        "client_encoding",
        "DateStyle",
        "default_transaction_read_only",
        "in_hot_standby",
        "integer_datetimes",
        "IntervalStyle",
        "is_superuser",
        "server_encoding",
        "server_version",
        "session_authorization",
        "standard_conforming_strings",
        "TimeZone",
    ];
    REPORTED
        .iter()
        .find(|r| r.eq_ignore_ascii_case(name))
        .map(|r| (*r).to_owned())
        .unwrap_or_else(|| name.to_ascii_lowercase())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pairs(v: &[(&str, &str)]) -> Vec<(String, String)> {
        v.iter()
            .map(|(a, b)| (a.to_string(), b.to_string()))
            .collect()
    }

    #[test]
    fn only_differences_are_sent() {
        let server =
            ServerParams::from_login(&pairs(&[("TimeZone", "UTC"), ("client_encoding", "UTF8")]));
        let same = ClientParams::from_startup(&pairs(&[("user", "u"), ("timezone", "UTC")]));
        assert_eq!(server.sync_sql(&same), None);
        let other = ClientParams::from_startup(&pairs(&[
            ("TimeZone", "Europe/Paris"),
            ("extra_float_digits", "2"),
        ]));
        assert_eq!(
            server.sync_sql(&other).unwrap(),
            "SELECT pg_catalog.set_config('TimeZone', 'Europe/Paris', false), \
             pg_catalog.set_config('extra_float_digits', '2', false);"
        );
    }

    #[test]
    fn what_a_previous_client_left_is_reset() {
        let mut server = ServerParams::from_login(&pairs(&[("TimeZone", "UTC")]));
        let first = ClientParams::from_startup(&pairs(&[
            ("TimeZone", "Asia/Tokyo"),
            ("extra_float_digits", "3"),
        ]));
        server.synced(&first);
        let plain = ClientParams::default();
        assert_eq!(
            server.sync_sql(&plain).unwrap(),
            "RESET \"TimeZone\";RESET \"extra_float_digits\";"
        );
        server.synced(&plain);
        assert_eq!(server.sync_sql(&plain), None);
    }

    #[test]
    fn values_are_quoted() {
        let server = ServerParams::default();
        let evil =
            ClientParams::from_startup(&pairs(&[("application_name", "x'; DROP TABLE t; --")]));
        assert_eq!(
            server.sync_sql(&evil).unwrap(),
            "SELECT pg_catalog.set_config('application_name', 'x''; DROP TABLE t; --', false);"
        );
    }
}
