-- 0001_init: the roles, the dataplane_auth schema (credentials, audit log, lookup
-- function) and the database-wide REVOKEs after which an app role starts with nothing.
--
-- Applied by `provisioner migrate` in one transaction, as an administrator (a superuser,
-- or the admin login of a managed Postgres). The runner sets
-- `dataplane.provisioner_role` to the provisioner's login (default dp_provisioner) with
-- set_config(), so no value is ever spliced into this file. Roles are cluster-wide,
-- hence the IF NOT EXISTS checks: a second database on the same cluster reuses them.

DO $$
DECLARE
    prov text := current_setting('dataplane.provisioner_role');
    prov_row record;
BEGIN
    IF NOT EXISTS (SELECT FROM pg_catalog.pg_roles WHERE rolname = 'dataplane_auth_owner') THEN
        CREATE ROLE dataplane_auth_owner NOLOGIN;
    END IF;
    IF NOT EXISTS (SELECT FROM pg_catalog.pg_roles WHERE rolname = 'dp_pooler') THEN
        CREATE ROLE dp_pooler LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION NOBYPASSRLS NOINHERIT;
    END IF;

    SELECT rolsuper, rolcreaterole, rolcanlogin INTO prov_row
        FROM pg_catalog.pg_roles WHERE rolname = prov;
    IF NOT FOUND THEN
        -- INHERIT: it must hold pg_signal_backend's rights to end an app's sessions.
        EXECUTE format('CREATE ROLE %I LOGIN NOSUPERUSER NOCREATEDB CREATEROLE NOREPLICATION NOBYPASSRLS INHERIT', prov);
    ELSIF NOT (prov_row.rolsuper OR prov_row.rolcreaterole) THEN
        RAISE EXCEPTION 'provisioner role % exists but lacks CREATEROLE', prov
            USING HINT = 'ALTER ROLE ' || quote_ident(prov) || ' CREATEROLE, or choose another --provisioner-role';
    END IF;

    -- Ending an app's sessions on suspend and delete.
    IF NOT pg_catalog.pg_has_role(prov, 'pg_signal_backend', 'USAGE') THEN
        EXECUTE format('GRANT pg_signal_backend TO %I', prov);
    END IF;
    -- A non-superuser admin may only hand objects to a role it is a member of; the
    -- membership is revoked again at the end, so an admin that is also the provisioner
    -- (managed Postgres) cannot later rewrite the lookup function through it.
    IF NOT pg_catalog.pg_has_role(current_user, 'dataplane_auth_owner', 'MEMBER') THEN
        EXECUTE format('GRANT dataplane_auth_owner TO %I', current_user);
        PERFORM pg_catalog.set_config('dataplane.granted_owner', 'yes', true);
    END IF;

    -- Nobody but the roles we name may connect; app roles get CONNECT one by one.
    EXECUTE format('REVOKE ALL ON DATABASE %I FROM PUBLIC', current_database());
    EXECUTE format('GRANT CONNECT ON DATABASE %I TO dp_pooler', current_database());
    IF NOT EXISTS (SELECT FROM pg_catalog.pg_database d JOIN pg_catalog.pg_roles r ON r.oid = d.datdba
                   WHERE d.datname = current_database() AND r.rolname = prov) THEN
        -- CREATE for the app schemas it owns; GRANT OPTION to pass CONNECT on to apps.
        EXECUTE format('GRANT CONNECT, CREATE ON DATABASE %I TO %I WITH GRANT OPTION', current_database(), prov);
    END IF;
END
$$;

-- CVE-2018-1058: nobody may plant objects in public for others to resolve.
REVOKE ALL ON SCHEMA public FROM PUBLIC;

-- App roles reach no other database of the cluster. PUBLIC has CONNECT and TEMP on
-- every database by default (postgres, template1, ...): an app could log in there and
-- leave temp tables or large objects that DROP OWNED in this database cannot see,
-- blocking its own deletion. Where we are not the owner this is only a WARNING, and a
-- database created later starts open again: README, "Operations".
DO $$
DECLARE
    d record;
BEGIN
    FOR d IN SELECT datname FROM pg_catalog.pg_database
             WHERE datallowconn AND datname <> current_database() LOOP
        EXECUTE format('REVOKE CONNECT, TEMPORARY ON DATABASE %I FROM PUBLIC', d.datname);
    END LOOP;
END
$$;

CREATE SCHEMA IF NOT EXISTS dataplane_auth AUTHORIZATION dataplane_auth_owner;
REVOKE ALL ON SCHEMA dataplane_auth FROM PUBLIC;

-- Everything below is created and owned by dataplane_auth_owner (NOLOGIN), so no login
-- role, the provisioner included, can alter the lookup function or the table's checks.
SET LOCAL ROLE dataplane_auth_owner;

CREATE TABLE dataplane_auth.schema_migrations (
    version    integer PRIMARY KEY,
    name       text NOT NULL,
    checksum   text NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE dataplane_auth.credentials (
    -- tk_t<tenant>_p<slug>_<env>; the same checks as the provisioner's names.rs, so even
    -- a hand-written INSERT cannot register a role the lookup would then serve.
    role_name       text PRIMARY KEY
                    CHECK (octet_length(role_name) <= 63
                           AND role_name ~ '^tk_t[1-9][0-9]{0,11}_p[a-z][a-z0-9_]*_[a-z][a-z0-9]{0,15}$'),
    tenant_id       bigint NOT NULL CHECK (tenant_id BETWEEN 1 AND 999999999999),
    slug            text NOT NULL CHECK (slug ~ '^[a-z][a-z0-9-]*$'),
    env             text NOT NULL CHECK (env ~ '^[a-z][a-z0-9]{0,15}$'),
    -- SCRAM-SHA-256$<iterations>:<salt>$<StoredKey>:<ServerKey>, byte-identical to
    -- pg_authid.rolpassword: SCRAM pass-through depends on it.
    scram_verifier  text NOT NULL
                    CHECK (scram_verifier ~ '^SCRAM-SHA-256\$[1-9][0-9]*:[A-Za-z0-9+/]+={0,2}\$[A-Za-z0-9+/]{43}=:[A-Za-z0-9+/]{43}=$'),
    generation      bigint NOT NULL DEFAULT 1 CHECK (generation >= 1),
    -- Limits the pooler reads; NULL means the pooler's configured default.
    pool_size       integer CHECK (pool_size BETWEEN 1 AND 10000),
    pool_mode       text NOT NULL DEFAULT 'transaction' CHECK (pool_mode IN ('transaction', 'session')),
    max_client_conn integer CHECK (max_client_conn BETWEEN 1 AND 1000000),
    -- Limits Postgres enforces (mirrored here so the API can report them).
    connection_limit integer NOT NULL CHECK (connection_limit BETWEEN -1 AND 100000),
    statement_timeout_ms integer NOT NULL CHECK (statement_timeout_ms >= 0),
    idle_in_transaction_session_timeout_ms integer NOT NULL CHECK (idle_in_transaction_session_timeout_ms >= 0),
    lock_timeout_ms integer NOT NULL CHECK (lock_timeout_ms >= 0),
    disabled        boolean NOT NULL DEFAULT false,
    created_at      timestamptz NOT NULL DEFAULT now(),
    updated_at      timestamptz NOT NULL DEFAULT now(),
    rotated_at      timestamptz,
    valid_until     timestamptz,
    UNIQUE (tenant_id, slug, env)
);

CREATE TABLE dataplane_auth.audit_log (
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    at          timestamptz NOT NULL DEFAULT now(),
    actor       text NOT NULL DEFAULT session_user,
    action      text NOT NULL,
    role_name   text NOT NULL,
    request_id  text,
    detail      jsonb NOT NULL DEFAULT '{}'
);
CREATE INDEX audit_log_role_name_at ON dataplane_auth.audit_log (role_name, at);

-- Every change to a credentials row tells the poolers at commit, so they drop cached
-- verifiers and keys at once instead of waiting for a TTL. A trigger rather than a
-- NOTIFY in each code path: no path (or hand-written fix) can forget it.
CREATE FUNCTION dataplane_auth.notify_credentials_change() RETURNS trigger
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    IF TG_OP = 'DELETE' THEN
        PERFORM pg_notify('dataplane_auth', OLD.role_name);
    ELSE
        PERFORM pg_notify('dataplane_auth', NEW.role_name);
        IF TG_OP = 'UPDATE' AND OLD.role_name <> NEW.role_name THEN
            PERFORM pg_notify('dataplane_auth', OLD.role_name);
        END IF;
    END IF;
    RETURN NULL;
END
$$;
REVOKE ALL ON FUNCTION dataplane_auth.notify_credentials_change() FROM PUBLIC;

CREATE TRIGGER credentials_notify
    AFTER INSERT OR UPDATE OR DELETE ON dataplane_auth.credentials
    FOR EACH ROW EXECUTE FUNCTION dataplane_auth.notify_credentials_change();

-- The pooler's auth_query. pg_authid is unreadable on managed Postgres, so the pooler
-- reads the verifier from here, and only through this function. Exactly one row, always:
-- the name and either the verifier with its limits, or NULLs and the reason, for a role
-- that is unknown, disabled, expired or not an app role.
CREATE FUNCTION dataplane_auth.lookup(name text)
RETURNS TABLE (
    role_name       text,
    scram_verifier  text,
    generation      bigint,
    pool_size       integer,
    pool_mode       text,
    max_client_conn integer,
    status          text
)
LANGUAGE sql STABLE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT lookup.name,
           CASE WHEN ok THEN c.scram_verifier END,
           CASE WHEN ok THEN c.generation END,
           CASE WHEN ok THEN c.pool_size END,
           CASE WHEN ok THEN c.pool_mode END,
           CASE WHEN ok THEN c.max_client_conn END,
           CASE WHEN c.role_name IS NULL THEN 'unknown'
                WHEN c.disabled THEN 'disabled'
                WHEN c.valid_until IS NOT NULL AND c.valid_until <= now() THEN 'expired'
                ELSE 'ok' END
    FROM (SELECT 1) AS one
    LEFT JOIN dataplane_auth.credentials c
           ON c.role_name = lookup.name AND starts_with(lookup.name, 'tk_')
    CROSS JOIN LATERAL (
        SELECT c.role_name IS NOT NULL AND NOT c.disabled
               AND (c.valid_until IS NULL OR c.valid_until > now()) AS ok
    ) AS v
$$;
REVOKE ALL ON FUNCTION dataplane_auth.lookup(text) FROM PUBLIC;
GRANT USAGE ON SCHEMA dataplane_auth TO dp_pooler;
GRANT EXECUTE ON FUNCTION dataplane_auth.lookup(text) TO dp_pooler;

RESET ROLE;

-- The provisioner reads and writes credentials and appends to the audit log; nothing
-- else in this schema.
DO $$
DECLARE
    prov text := current_setting('dataplane.provisioner_role');
BEGIN
    EXECUTE format('GRANT USAGE ON SCHEMA dataplane_auth TO %I', prov);
    EXECUTE format('GRANT SELECT, INSERT, UPDATE, DELETE ON dataplane_auth.credentials TO %I', prov);
    EXECUTE format('GRANT SELECT, INSERT ON dataplane_auth.audit_log TO %I', prov);
    EXECUTE format('GRANT SELECT ON dataplane_auth.schema_migrations TO %I', prov);
END
$$;

DO $$
BEGIN
    IF current_setting('dataplane.granted_owner', true) = 'yes' THEN
        -- The migration runner records each migration here; later migrations grant
        -- themselves the owner role for their own transaction, as this one did.
        EXECUTE format('GRANT USAGE ON SCHEMA dataplane_auth TO %I', current_user);
        EXECUTE format('GRANT SELECT, INSERT ON dataplane_auth.schema_migrations TO %I', current_user);
        EXECUTE format('REVOKE dataplane_auth_owner FROM %I', current_user);
    END IF;
END
$$;
