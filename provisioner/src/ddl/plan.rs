//! Request → statements, with no I/O.
//!
//! Every identifier is an [`AppName`] (validated, then `escape_identifier`) or the
//! database name (`escape_identifier`); the only value spliced in is a [`Verifier`],
//! validated and written with `escape_literal`, because `ALTER ROLE … PASSWORD` takes
//! no bind parameters. Numbers are `i32`s written with `Display`.

use postgres_protocol::escape::escape_identifier;

use super::RoleLimits;
use crate::names::AppName;
use crate::secret::Verifier;

/// The role and schema of a new app, and everything that isolates it (design.md,
/// "Isolation"). The caller runs these in its transaction, after the global lock.
pub fn create_app(
    name: &AppName,
    database: &str,
    limits: &RoleLimits,
    verifier: &Verifier,
) -> Vec<String> {
    let r = name.quoted();
    let db = escape_identifier(database);
    let mut steps = vec![
        format!(
            "CREATE ROLE {r} LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION NOBYPASSRLS \
             NOINHERIT CONNECTION LIMIT {} PASSWORD {}",
            limits.connection_limit,
            verifier.literal()
        ),
        // Owned by the provisioner, not the app: the app can use and create in its
        // schema but cannot drop it or grant it to another app.
        format!("CREATE SCHEMA {r} AUTHORIZATION CURRENT_USER"),
        format!("REVOKE ALL ON SCHEMA {r} FROM PUBLIC"),
        format!("GRANT USAGE, CREATE ON SCHEMA {r} TO {r}"),
        format!("GRANT CONNECT ON DATABASE {db} TO {r}"),
        format!("ALTER ROLE {r} IN DATABASE {db} SET search_path = {r}"),
    ];
    steps.extend(role_settings(name, limits));
    steps
}

/// `ALTER ROLE … SET` for the server-side timeouts (0 disables one, as in Postgres).
pub fn role_settings(name: &AppName, limits: &RoleLimits) -> Vec<String> {
    let r = name.quoted();
    [
        ("statement_timeout", limits.statement_timeout_ms),
        (
            "idle_in_transaction_session_timeout",
            limits.idle_in_transaction_session_timeout_ms,
        ),
        ("lock_timeout", limits.lock_timeout_ms),
    ]
    .into_iter()
    .map(|(setting, ms)| format!("ALTER ROLE {r} SET {setting} = {ms}"))
    .collect()
}

/// What changes when the limits Postgres enforces change.
pub fn change_limits(name: &AppName, old: &RoleLimits, new: &RoleLimits) -> Vec<String> {
    let mut steps = Vec::new();
    if old.connection_limit != new.connection_limit {
        steps.push(format!(
            "ALTER ROLE {} CONNECTION LIMIT {}",
            name.quoted(),
            new.connection_limit
        ));
    }
    let old_settings = role_settings(name, old);
    steps.extend(
        role_settings(name, new)
            .into_iter()
            .zip(old_settings)
            .filter(|(new, old)| new != old)
            .map(|(new, _)| new),
    );
    steps
}

pub fn set_password(name: &AppName, verifier: &Verifier) -> Vec<String> {
    vec![format!(
        "ALTER ROLE {} PASSWORD {}",
        name.quoted(),
        verifier.literal()
    )]
}

pub fn set_login(name: &AppName, login: bool) -> Vec<String> {
    let what = if login { "LOGIN" } else { "NOLOGIN" };
    vec![format!("ALTER ROLE {} {what}", name.quoted())]
}

/// What exists of an app, as the catalogs say; drives the idempotent delete.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Present {
    pub role: bool,
    pub schema: bool,
}

/// The destructive part of delete, after the role can no longer log in and its
/// sessions are gone. Each step only runs for what still exists, so a delete that
/// failed half-way is finished by the next one.
pub fn drop_app(name: &AppName, present: Present) -> Vec<String> {
    let r = name.quoted();
    let mut steps = Vec::new();
    if present.schema {
        steps.push(format!("DROP SCHEMA {r} CASCADE"));
    }
    if present.role {
        // DROP OWNED needs the privileges of the role it drops from (large objects,
        // grants on shared objects); a CREATEROLE provisioner may grant itself
        // membership in a non-superuser role, and DROP ROLE removes it again.
        steps.push(format!("GRANT {r} TO CURRENT_USER"));
        steps.push(format!("DROP OWNED BY {r}"));
        steps.push(format!("DROP ROLE {r}"));
    }
    steps
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::secret::Password;

    fn limits() -> RoleLimits {
        RoleLimits {
            connection_limit: 20,
            statement_timeout_ms: 30_000,
            idle_in_transaction_session_timeout_ms: 60_000,
            lock_timeout_ms: 0,
        }
    }

    #[test]
    fn create_quotes_identifiers_and_sends_only_the_verifier() {
        let name = AppName::parse("7", "shop", "prod").unwrap();
        let password = Password::generate().unwrap();
        let verifier = password.verifier();
        let steps = create_app(&name, "my\"db", &limits(), &verifier);
        let all = steps.join(";\n");
        assert!(steps[0].starts_with("CREATE ROLE \"tk_t7_pshop_prod\" LOGIN"));
        assert!(steps[0].ends_with(&format!("PASSWORD '{}'", verifier.as_str())));
        assert!(all.contains("GRANT CONNECT ON DATABASE \"my\"\"db\" TO \"tk_t7_pshop_prod\""));
        assert!(all.contains("SET search_path = \"tk_t7_pshop_prod\""));
        assert!(all.contains("ALTER ROLE \"tk_t7_pshop_prod\" SET lock_timeout = 0"));
        assert!(!all.contains(password.expose()));
    }

    #[test]
    fn change_limits_touches_only_what_changed() {
        let name = AppName::parse("7", "shop", "prod").unwrap();
        assert!(change_limits(&name, &limits(), &limits()).is_empty());
        let new = RoleLimits {
            connection_limit: 5,
            lock_timeout_ms: 100,
            ..limits()
        };
        assert_eq!(
            change_limits(&name, &limits(), &new),
            vec![
                "ALTER ROLE \"tk_t7_pshop_prod\" CONNECTION LIMIT 5".to_owned(),
                "ALTER ROLE \"tk_t7_pshop_prod\" SET lock_timeout = 100".to_owned(),
            ]
        );
    }

    #[test]
    fn drop_skips_what_is_gone() {
        let name = AppName::parse("7", "shop", "prod").unwrap();
        assert!(
            drop_app(
                &name,
                Present {
                    role: false,
                    schema: false
                }
            )
            .is_empty()
        );
        let all = drop_app(
            &name,
            Present {
                role: true,
                schema: true,
            },
        );
        assert_eq!(all.len(), 4);
        assert!(all[0].starts_with("DROP SCHEMA"));
        assert!(all[3].starts_with("DROP ROLE"));
    }
}
