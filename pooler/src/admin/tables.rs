//! What the `SHOW` commands answer, as tables with PgBouncer's column names where the
//! concept is the same (its `usage.md`, "Admin console"), so that exporters and
//! operators' habits carry over. Columns PgBouncer has and this pooler has no data for
//! are 0 or empty rather than invented. `/v1/pools` serves the `SHOW POOLS` table as
//! JSON.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::time::SystemTime;

use crate::auth::cache::PoolMode;
use crate::registry::{ClientInfo, ClientState, unix_micros};
use crate::reload::{flatten, needs_restart};
use crate::shared::Shared;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Int,
    Text,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Cell {
    Int(i64),
    Text(String),
    Null,
}

impl Cell {
    /// The value on the wire, in text or (for `binary`) PostgreSQL's binary format:
    /// int8 big-endian, text as is.
    pub fn encode(&self, binary: bool) -> Option<Vec<u8>> {
        match self {
            Cell::Int(i) if binary => Some(i.to_be_bytes().to_vec()),
            Cell::Int(i) => Some(i.to_string().into_bytes()),
            Cell::Text(s) => Some(s.clone().into_bytes()),
            Cell::Null => None,
        }
    }

    fn json(&self) -> serde_json::Value {
        match self {
            Cell::Int(i) => serde_json::Value::from(*i),
            Cell::Text(s) => serde_json::Value::from(s.as_str()),
            Cell::Null => serde_json::Value::Null,
        }
    }
}

fn int(v: impl TryInto<i64>) -> Cell {
    Cell::Int(v.try_into().unwrap_or(i64::MAX))
}

fn text(s: impl Into<String>) -> Cell {
    Cell::Text(s.into())
}

#[derive(Debug, Clone)]
pub struct Table {
    pub columns: Vec<(&'static str, Kind)>,
    pub rows: Vec<Vec<Cell>>,
}

const I: Kind = Kind::Int;
const T: Kind = Kind::Text;

impl Table {
    fn new(columns: &[(&'static str, Kind)]) -> Self {
        Table {
            columns: columns.to_vec(),
            rows: Vec::new(),
        }
    }

    /// One JSON object per row, keyed by column name.
    pub fn to_json(&self) -> serde_json::Value {
        self.rows
            .iter()
            .map(|row| {
                let object: serde_json::Map<String, serde_json::Value> = self
                    .columns
                    .iter()
                    .zip(row)
                    .map(|((name, _), cell)| ((*name).to_owned(), cell.json()))
                    .collect();
                serde_json::Value::Object(object)
            })
            .collect()
    }
}

fn pool_mode(shared: &Shared, role: &str) -> &'static str {
    match shared.cache.peek(role).map(|a| a.pool_mode) {
        Some(PoolMode::Session) => "session",
        _ => "transaction",
    }
}

/// How long a waiting client has waited, in µs (0 unless it waits).
fn waited_us(c: &ClientInfo, now_us: u64) -> u64 {
    if c.state() == ClientState::Waiting {
        now_us.saturating_sub(c.request_us())
    } else {
        0
    }
}

/// `SHOW POOLS`: one row per role with clients or servers now.
pub fn pools(shared: &Shared) -> Table {
    let mut t = Table::new(&[
        ("database", T),
        ("user", T),
        ("cl_active", I),
        ("cl_waiting", I),
        ("cl_active_cancel_req", I),
        ("cl_waiting_cancel_req", I),
        ("sv_active", I),
        ("sv_active_cancel", I),
        ("sv_being_canceled", I),
        ("sv_idle", I),
        ("sv_used", I),
        ("sv_tested", I),
        ("sv_login", I),
        ("maxwait", I),
        ("maxwait_us", I),
        ("pool_mode", T),
    ]);
    let database = shared.config().upstream.dbname.clone();
    let stats = shared.pools.stats();
    let servers: HashMap<&str, _> = stats.roles.iter().map(|r| (&*r.role, r)).collect();
    let now_us = unix_micros(SystemTime::now());
    // Per role: clients active or idle (PgBouncer's cl_active), waiting, longest wait.
    let mut clients: HashMap<Arc<str>, (u64, u64, u64)> = HashMap::new();
    for c in shared.clients.snapshot() {
        let Some(ident) = c.ident().filter(|i| !i.admin) else {
            continue;
        };
        let entry = clients.entry(ident.user.clone()).or_default();
        match c.state() {
            ClientState::Waiting => {
                entry.1 += 1;
                entry.2 = entry.2.max(waited_us(&c, now_us));
            }
            ClientState::Idle | ClientState::Active => entry.0 += 1,
            ClientState::Login => {}
        }
    }
    let names: BTreeSet<&str> = servers
        .keys()
        .copied()
        .chain(clients.keys().map(|k| &**k))
        .collect();
    for name in names {
        let (active, waiting, maxwait) = clients.get(name).copied().unwrap_or_default();
        // A role's listener server (LISTEN in transaction mode) is always in use.
        let (sv_active, sv_idle, sv_login) = servers
            .get(name)
            .map(|r| (r.active + r.listener, r.idle, r.opening))
            .unwrap_or_default();
        if active + waiting + u64::from(sv_active + sv_idle + sv_login) == 0 {
            continue;
        }
        t.rows.push(vec![
            text(&database),
            text(name),
            int(active),
            int(waiting),
            int(0),
            int(0),
            int(sv_active),
            int(0),
            int(0),
            int(sv_idle),
            int(0),
            int(0),
            int(sv_login),
            int(maxwait / 1_000_000),
            int(maxwait % 1_000_000),
            text(pool_mode(shared, name)),
        ]);
    }
    t
}

const CONNECTION_COLUMNS: &[(&str, Kind)] = &[
    ("type", T),
    ("user", T),
    ("database", T),
    ("replication", T),
    ("state", T),
    ("addr", T),
    ("port", I),
    ("local_addr", T),
    ("local_port", I),
    ("connect_time", T),
    ("request_time", T),
    ("wait", I),
    ("wait_us", I),
    ("close_needed", I),
    ("ptr", T),
    ("link", T),
    ("remote_pid", I),
    ("tls", T),
    ("application_name", T),
    ("id", I),
];

fn addr_cells(addr: Option<std::net::SocketAddr>) -> [Cell; 2] {
    match addr {
        Some(a) => [text(a.ip().to_string()), int(a.port())],
        None => [Cell::Null, Cell::Null],
    }
}

fn link_cell(id: u64) -> Cell {
    if id == 0 {
        Cell::Null
    } else {
        text(format!("{id:x}"))
    }
}

/// `SHOW CLIENTS`: every logged-in client, admin sessions included (as PgBouncer).
pub fn clients(shared: &Shared) -> Table {
    let mut t = Table::new(CONNECTION_COLUMNS);
    let now_us = unix_micros(SystemTime::now());
    for c in shared.clients.snapshot() {
        let Some(ident) = c.ident() else { continue };
        let wait = waited_us(&c, now_us);
        let connected = c.connected_us;
        let [addr, port] = addr_cells(Some(c.addr));
        let [local_addr, local_port] = addr_cells(c.local);
        t.rows.push(vec![
            text("C"),
            text(&*ident.user),
            text(&*ident.database),
            text("none"),
            text(c.state().as_str()),
            addr,
            port,
            local_addr,
            local_port,
            text(timestamp(connected)),
            text(timestamp(c.request_us().max(connected))),
            int(wait / 1_000_000),
            int(wait % 1_000_000),
            int(0),
            text(format!("{:x}", c.id)),
            link_cell(c.link()),
            int(0),
            text(&*ident.tls),
            text(&*ident.application_name),
            int(c.id),
        ]);
    }
    t
}

/// `SHOW SERVERS`: every logged-in server connection; active while a client is linked.
pub fn servers(shared: &Shared) -> Table {
    let mut t = Table::new(CONNECTION_COLUMNS);
    let config = shared.config();
    let linked: HashMap<u64, Arc<ClientInfo>> = shared
        .clients
        .snapshot()
        .into_iter()
        .filter(|c| c.link() != 0)
        .map(|c| (c.link(), c))
        .collect();
    for s in shared.servers.snapshot() {
        let client = linked.get(&s.id);
        let connected = unix_micros(s.connected_at);
        let request = client.map_or(connected, |c| c.request_us().max(connected));
        let [local_addr, local_port] = addr_cells(s.local);
        t.rows.push(vec![
            text("S"),
            text(&*s.role),
            text(&config.upstream.dbname),
            text("none"),
            text(if client.is_some() || s.is_listener() {
                "active"
            } else {
                "idle"
            }),
            text(&config.upstream.host),
            int(config.upstream.port),
            local_addr,
            local_port,
            text(timestamp(connected)),
            text(timestamp(request)),
            int(0),
            int(0),
            int(0),
            text(format!("{:x}", s.id)),
            link_cell(client.map_or(0, |c| c.id)),
            int(s.remote_pid),
            text(&s.tls),
            text(if s.is_listener() {
                // No client is linked: it listens for all of the role's.
                "(LISTEN for the role's clients)".to_owned()
            } else {
                client
                    .and_then(|c| c.ident())
                    .map(|i| i.application_name.to_string())
                    .unwrap_or_default()
            }),
            int(s.id),
        ]);
    }
    t
}

/// `SHOW STATS`: one row for the apps' database, from the metrics' counters (times in
/// µs, as PgBouncer). Query time, client-side Parse and Bind counts and the `avg_*`
/// rates are not kept and read 0.
pub fn stats(shared: &Shared) -> Table {
    let mut t = Table::new(&[
        ("database", T),
        ("total_server_assignment_count", I),
        ("total_xact_count", I),
        ("total_query_count", I),
        ("total_received", I),
        ("total_sent", I),
        ("total_xact_time", I),
        ("total_query_time", I),
        ("total_wait_time", I),
        ("total_client_parse_count", I),
        ("total_server_parse_count", I),
        ("total_bind_count", I),
        ("avg_server_assignment_count", I),
        ("avg_xact_count", I),
        ("avg_query_count", I),
        ("avg_recv", I),
        ("avg_sent", I),
        ("avg_xact_time", I),
        ("avg_query_time", I),
        ("avg_wait_time", I),
        ("avg_client_parse_count", I),
        ("avg_server_parse_count", I),
        ("avg_bind_count", I),
    ]);
    let m = &shared.metrics;
    // Histogram sums are seconds; whole microseconds fit an i64 for 292,000 years.
    let micros = |seconds: f64| int((seconds * 1e6) as i64);
    let mut row = vec![
        text(&shared.config().upstream.dbname),
        int(m.checkout_wait.get_sample_count()),
        int(m.transactions.get()),
        int(m.queries.get()),
        int(m.bytes_received.get()),
        int(m.bytes_sent.get()),
        micros(m.transaction_duration.get_sample_sum()),
        int(0),
        micros(m.checkout_wait.get_sample_sum()),
        int(0),
        int(m.prepared_misses.get()),
        int(0),
    ];
    row.extend((0..11).map(|_| int(0)));
    t.rows.push(row);
    t
}

/// `SHOW CONFIG`: every key in force (secrets left out), its default, and whether a
/// reload can change it.
pub fn config(shared: &Shared) -> Table {
    let mut t = Table::new(&[("key", T), ("value", T), ("default", T), ("changeable", T)]);
    let defaults = flatten(&crate::config::Config::default());
    for (key, value) in flatten(&shared.config()) {
        let default = defaults.get(&key).cloned().unwrap_or_default();
        let changeable = if needs_restart(&key) { "no" } else { "yes" };
        t.rows.push(vec![
            text(&key),
            text(value),
            text(default),
            text(changeable),
        ]);
    }
    t
}

/// `SHOW DATABASES`: the one database every app shares.
pub fn databases(shared: &Shared) -> Table {
    let mut t = Table::new(&[
        ("name", T),
        ("host", T),
        ("port", I),
        ("database", T),
        ("force_user", T),
        ("pool_size", I),
        ("min_pool_size", I),
        ("reserve_pool_size", I),
        ("server_lifetime", I),
        ("pool_mode", T),
        ("max_connections", I),
        ("current_connections", I),
        ("max_client_connections", I),
        ("current_client_connections", I),
        ("paused", I),
        ("disabled", I),
    ]);
    let config = shared.config();
    let stats = shared.pools.stats();
    let clients = shared
        .clients
        .snapshot()
        .iter()
        .filter(|c| c.ident().is_some_and(|i| !i.admin))
        .count();
    t.rows.push(vec![
        text(&config.upstream.dbname),
        text(&config.upstream.host),
        int(config.upstream.port),
        text(&config.upstream.dbname),
        Cell::Null,
        int(config.default_pool_size),
        int(0),
        int(0),
        int(config.server_lifetime_ms / 1000),
        text("transaction"),
        int(stats.max_server_connections),
        int(stats.servers_in_use),
        int(config.max_client_conn),
        int(clients),
        int(i64::from(shared.pause.snapshot().all)),
        int(0),
    ]);
    t
}

pub fn version() -> Table {
    let mut t = Table::new(&[("version", T)]);
    t.rows.push(vec![text(format!(
        "dataplane pooler {}",
        env!("CARGO_PKG_VERSION")
    ))]);
    t
}

/// `SHOW LISTS`: counts of the pooler's lists, one per row.
pub fn lists(shared: &Shared) -> Table {
    let mut t = Table::new(&[("list", T), ("items", I)]);
    let clients = shared.clients.snapshot();
    let login = clients
        .iter()
        .filter(|c| c.state() == ClientState::Login)
        .count();
    let items = [
        ("databases", 1),
        ("users", shared.roles.all().len()),
        ("pools", shared.pools.stats().roles.len()),
        ("free_clients", 0),
        ("used_clients", clients.len()),
        ("login_clients", login),
        ("free_servers", 0),
        ("used_servers", shared.servers.len()),
        ("dns_names", 0),
        ("dns_zones", 0),
        ("dns_queries", 0),
        ("dns_pending", 0),
    ];
    for (list, n) in items {
        t.rows.push(vec![text(list), int(n)]);
    }
    t
}

/// `SHOW PEERS`: the live replicas in the registry as this one last saw them, with
/// PgBouncer's columns first (`pool_size` is the replica's share of the budget).
pub fn peers(shared: &Shared) -> Table {
    let mut t = Table::new(&[
        ("peer_id", I),
        ("host", T),
        ("port", I),
        ("pool_size", I),
        ("self", I),
        ("demand", I),
        ("holding", I),
        ("heartbeat_age_ms", I),
        ("started", T),
    ]);
    let view = shared.replicas.view();
    let now_ms = view.now_ms();
    for p in &view.peers {
        let (host, port) = p
            .addr
            .as_deref()
            .and_then(|a| crate::config::parse_advertise_addr(a).ok())
            .map_or((Cell::Null, Cell::Null), |(h, port)| (text(h), int(port)));
        let started_us = u64::try_from(p.row.started_ms).unwrap_or(0) * 1000;
        t.rows.push(vec![
            int(p.row.id),
            host,
            port,
            int(view.shares.of(p.row.id).unwrap_or(0)),
            int(i64::from(p.row.id == view.me)),
            int(p.row.demand),
            int(p.row.holding),
            int(now_ms.saturating_sub(p.row.heartbeat_ms).max(0)),
            text(timestamp(started_us)),
        ]);
    }
    t
}

/// `/v1/replicas`: this replica's share and heartbeat, its cancel forwards, and
/// `SHOW PEERS`'s rows.
pub fn replicas_json(shared: &Shared) -> serde_json::Value {
    let r = shared.replicas.stats();
    let pools = shared.pools.stats();
    let forwards: serde_json::Map<String, serde_json::Value> = crate::replicas::Outcome::ALL
        .iter()
        .zip(r.forwards)
        .map(|(o, n)| (o.as_str().to_owned(), serde_json::Value::from(n)))
        .collect();
    serde_json::json!({
        "id": r.id,
        "budget": pools.cluster_budget,
        "share": r.share,
        "cap": pools.max_server_connections,
        "servers": pools.servers_in_use,
        "demand": r.demand,
        "heartbeat_age_ms": r.heartbeat_age.map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX)),
        "heartbeats": {"ok": r.heartbeats_ok, "failed": r.heartbeats_failed},
        "cancel_forwards": forwards,
        "replicas": peers(shared).to_json(),
    })
}

/// `YYYY-MM-DD HH:MM:SS UTC`, as PgBouncer prints times.
pub fn timestamp(unix_us: u64) -> String {
    let secs = i64::try_from(unix_us / 1_000_000).unwrap_or(i64::MAX);
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Civil date from days since 1970-01-01 (H. Hinnant, "chrono-Compatible Low-Level
    // Date Algorithms", days_from_civil's inverse).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02} {:02}:{:02}:{:02} UTC",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_are_utc_calendar_times() {
        assert_eq!(timestamp(0), "1970-01-01 00:00:00 UTC");
        assert_eq!(timestamp(1_700_000_000_000_000), "2023-11-14 22:13:20 UTC");
        assert_eq!(timestamp(951_782_400_000_000), "2000-02-29 00:00:00 UTC");
    }

    #[test]
    fn json_rows_are_keyed_by_column() {
        let mut t = Table::new(&[("user", T), ("cl_active", I)]);
        t.rows.push(vec![text("tk_1"), int(3)]);
        assert_eq!(
            t.to_json(),
            serde_json::json!([{"user": "tk_1", "cl_active": 3}])
        );
    }
}
