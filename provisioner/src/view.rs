//! How an app is shown to callers: the HTTP API's bodies and the CLI's output are the
//! same JSON, so scripts written against one work with the other.

use serde::Serialize;

use crate::config::PublicEndpoint;
use crate::ddl::AppRecord;
use crate::secret::Password;

/// An app as the API shows it: the record, where to connect, and the password only in
/// the one response that created or rotated it. No `Debug`: it may hold the password.
#[derive(Serialize)]
pub struct AppView {
    #[serde(flatten)]
    pub record: AppRecord,
    pub host: String,
    pub port: u16,
    pub connection_uri: String,
    pub jdbc_url: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub password: Option<String>,
}

impl AppView {
    pub fn new(record: AppRecord, public: &PublicEndpoint, password: Option<&Password>) -> Self {
        let db = percent_encode(&record.database);
        let userinfo = match password {
            Some(p) => format!("{}:{}", record.role, p.expose()),
            None => record.role.clone(),
        };
        let (host, port, ssl) = (&public.host, public.port, &public.sslmode);
        AppView {
            connection_uri: format!("postgresql://{userinfo}@{host}:{port}/{db}?sslmode={ssl}"),
            jdbc_url: format!("jdbc:postgresql://{host}:{port}/{db}?sslmode={ssl}"),
            host: host.clone(),
            port,
            password: password.map(|p| p.expose().to_owned()),
            record,
        }
    }
}

fn percent_encode(s: &str) -> String {
    use std::fmt::Write as _;
    s.bytes()
        .fold(String::with_capacity(s.len()), |mut out, b| {
            if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
                out.push(char::from(b));
            } else {
                let _ = write!(out, "%{b:02X}");
            }
            out
        })
}

/// Every app of a listing, without passwords.
#[derive(Serialize)]
pub struct AppList {
    pub apps: Vec<AppView>,
}

impl AppList {
    pub fn new(records: Vec<AppRecord>, public: &PublicEndpoint) -> Self {
        AppList {
            apps: records
                .into_iter()
                .map(|r| AppView::new(r, public, None))
                .collect(),
        }
    }
}
