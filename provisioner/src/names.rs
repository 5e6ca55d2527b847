//! Validated app names: `tk_t<tenantId>_p<slug>_<env>` is both the role and the schema.
//!
//! PostgreSQL truncates identifiers longer than 63 bytes with only a NOTICE, after which
//! `WHERE rolname = '<too long>'` matches a different app's role (a dev name can alias
//! onto prod). So names are checked and rejected here, never truncated, and identifiers
//! reach SQL only through [`AppName::quoted`].

use std::fmt;

/// PostgreSQL's NAMEDATALEN - 1.
pub const MAX_IDENTIFIER_BYTES: usize = 63;
const MAX_TENANT_DIGITS: usize = 12;
const MAX_ENV_BYTES: usize = 16;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NameError {
    #[error("tenant id must be 1 to 12 decimal digits without a leading zero, got {0:?}")]
    TenantId(String),
    #[error("slug must start with a lowercase letter and contain only a-z, 0-9 and '-', got {0:?}")]
    Slug(String),
    #[error("env must start with a lowercase letter and be at most 16 of a-z and 0-9, got {0:?}")]
    Env(String),
    #[error(
        "the name {name:?} would be {bytes} bytes; PostgreSQL identifiers hold at most 63 (shorten the slug)"
    )]
    TooLong { name: String, bytes: usize },
    #[error("{0:?} is not an app role name of the form tk_t<tenant>_p<slug>_<env>")]
    RoleName(String),
}

/// A tenant id: 1 to 12 decimal digits, no leading zero.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct TenantId(u64);

impl TenantId {
    pub fn parse(s: &str) -> Result<Self, NameError> {
        let ok = !s.is_empty()
            && s.len() <= MAX_TENANT_DIGITS
            && s.bytes().all(|b| b.is_ascii_digit())
            && !s.starts_with('0');
        if !ok {
            return Err(NameError::TenantId(s.to_owned()));
        }
        s.parse()
            .map(TenantId)
            .map_err(|_| NameError::TenantId(s.to_owned()))
    }

    pub fn new(id: u64) -> Result<Self, NameError> {
        Self::parse(&id.to_string())
    }

    pub fn get(self) -> u64 {
        self.0
    }
}

impl fmt::Display for TenantId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// What the user typed: `[a-z][a-z0-9-]*`. No `_`, so the identifier mapping is
/// reversible (the env is the text after the last `_`).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Slug(String);

impl Slug {
    pub fn parse(s: &str) -> Result<Self, NameError> {
        let mut bytes = s.bytes();
        let ok = matches!(bytes.next(), Some(b'a'..=b'z'))
            && bytes.all(|b| matches!(b, b'a'..=b'z' | b'0'..=b'9' | b'-'))
            && s.len() <= MAX_IDENTIFIER_BYTES;
        if !ok {
            return Err(NameError::Slug(s.to_owned()));
        }
        Ok(Slug(s.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// An environment: `[a-z][a-z0-9]{0,15}` (dev, prod, and user-created ones).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Env(String);

impl Env {
    pub fn parse(s: &str) -> Result<Self, NameError> {
        let mut bytes = s.bytes();
        let ok = matches!(bytes.next(), Some(b'a'..=b'z'))
            && bytes.all(|b| matches!(b, b'a'..=b'z' | b'0'..=b'9'))
            && s.len() <= MAX_ENV_BYTES;
        if !ok {
            return Err(NameError::Env(s.to_owned()));
        }
        Ok(Env(s.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// One app environment, identified by its three parts and by the identifier they make.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct AppName {
    tenant: TenantId,
    slug: Slug,
    env: Env,
    ident: String,
}

impl AppName {
    pub fn new(tenant: TenantId, slug: Slug, env: Env) -> Result<Self, NameError> {
        let ident = format!("tk_t{}_p{}_{}", tenant, slug.0.replace('-', "_"), env.0);
        if ident.len() > MAX_IDENTIFIER_BYTES {
            return Err(NameError::TooLong {
                bytes: ident.len(),
                name: ident,
            });
        }
        Ok(AppName {
            tenant,
            slug,
            env,
            ident,
        })
    }

    /// Parses the three parts as they arrive in a URL path.
    pub fn parse(tenant: &str, slug: &str, env: &str) -> Result<Self, NameError> {
        Self::new(
            TenantId::parse(tenant)?,
            Slug::parse(slug)?,
            Env::parse(env)?,
        )
    }

    /// Parses a role name back into its parts (the inverse of [`AppName::ident`]).
    pub fn from_role_name(role: &str) -> Result<Self, NameError> {
        let bad = || NameError::RoleName(role.to_owned());
        let rest = role.strip_prefix("tk_t").ok_or_else(bad)?;
        let (tenant, rest) = rest.split_once("_p").ok_or_else(bad)?;
        let (slug, env) = rest.rsplit_once('_').ok_or_else(bad)?;
        let name = Self::parse(tenant, &slug.replace('_', "-"), env).map_err(|_| bad())?;
        if name.ident != role {
            return Err(bad());
        }
        Ok(name)
    }

    pub fn tenant(&self) -> TenantId {
        self.tenant
    }

    pub fn slug(&self) -> &Slug {
        &self.slug
    }

    pub fn env(&self) -> &Env {
        &self.env
    }

    /// The unquoted identifier: the role name, the schema name, and the value for
    /// catalog lookups (`WHERE rolname = $1`).
    pub fn ident(&self) -> &str {
        &self.ident
    }

    /// The identifier quoted for splicing into a utility statement.
    pub fn quoted(&self) -> String {
        postgres_protocol::escape::escape_identifier(&self.ident)
    }
}

impl fmt::Display for AppName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.ident)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builds_the_identifier() {
        let n = AppName::parse("7", "my-shop", "prod").unwrap();
        assert_eq!(n.ident(), "tk_t7_pmy_shop_prod");
        assert_eq!(n.quoted(), "\"tk_t7_pmy_shop_prod\"");
    }

    #[test]
    fn round_trips_through_the_role_name() {
        let n = AppName::parse("123456789012", "a-b-c9", "staging2").unwrap();
        assert_eq!(AppName::from_role_name(n.ident()).unwrap(), n);
        assert!(AppName::from_role_name("dp_pooler").is_err());
        assert!(AppName::from_role_name("tk_t07_pshop_dev").is_err());
    }

    #[test]
    fn rejects_bad_parts() {
        for t in ["", "0", "01", "1234567890123", "1a", "-1", " 1"] {
            assert!(TenantId::parse(t).is_err(), "{t:?}");
        }
        for s in [
            "", "1shop", "Shop", "sh_op", "sh op", "shöp", "-shop", "sh\"op",
        ] {
            assert!(Slug::parse(s).is_err(), "{s:?}");
        }
        for e in ["", "Dev", "1dev", "de-v", "de_v", "abcdefghijklmnopq"] {
            assert!(Env::parse(e).is_err(), "{e:?}");
        }
        assert!(Env::parse("abcdefghijklmnop").is_ok());
    }

    #[test]
    fn rejects_rather_than_truncates_long_names() {
        // tk_t1_p + slug + _prod: 7 + len + 5 bytes.
        let fits = "a".repeat(63 - 12);
        assert_eq!(
            AppName::parse("1", &fits, "prod").unwrap().ident().len(),
            63
        );
        let long = "a".repeat(63 - 11);
        match AppName::parse("1", &long, "prod") {
            Err(NameError::TooLong { bytes, .. }) => assert_eq!(bytes, 64),
            other => panic!("expected TooLong, got {other:?}"),
        }
    }
}
