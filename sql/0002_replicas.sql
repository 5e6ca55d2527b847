-- 0002_replicas: the registry through which pooler replicas act as one pooler
-- (README, "Running several replicas"). Each replica heartbeats its demand and the
-- server connections it holds; every replica computes every replica's share of the
-- cluster's budget from the same rows; a replica grows only into what the others have
-- released, and this function is where that is checked, under one lock.
--
-- Reached only through two SECURITY DEFINER functions granted to dp_pooler: the pooler
-- role still cannot read or write any table, and nobody else may call them.

DO $$
BEGIN
    -- As in 0001: a non-superuser admin hands objects to dataplane_auth_owner only as
    -- a member of it, and only for this transaction.
    IF NOT pg_catalog.pg_has_role(current_user, 'dataplane_auth_owner', 'MEMBER') THEN
        EXECUTE format('GRANT dataplane_auth_owner TO %I', current_user);
        PERFORM pg_catalog.set_config('dataplane.granted_owner', 'yes', true);
    END IF;
END
$$;

SET LOCAL ROLE dataplane_auth_owner;

CREATE TABLE dataplane_auth.replicas (
    -- Small, because cancel keys carry it in a few bits of the pid the pooler mints.
    replica_id     integer PRIMARY KEY CHECK (replica_id BETWEEN 1 AND 255),
    -- A random name the process picks at start: a restarted replica is a new one.
    instance       text NOT NULL UNIQUE CHECK (instance ~ '^[0-9a-f]{32}$'),
    -- Where other replicas forward a CancelRequest for one of this replica's keys;
    -- NULL when it advertises none (its cancels then work only when they reach it).
    advertise_addr text CHECK (octet_length(advertise_addr) <= 261
                               AND advertise_addr ~ '^[A-Za-z0-9.:\[\]-]+:[0-9]{1,5}$'),
    started_at     timestamptz NOT NULL DEFAULT pg_catalog.clock_timestamp(),
    heartbeat_at   timestamptz NOT NULL DEFAULT pg_catalog.clock_timestamp(),
    -- The replica promises its next heartbeat within this; after it, it counts as dead
    -- and what it held is free for the others.
    lease_ms       integer NOT NULL CHECK (lease_ms BETWEEN 1000 AND 600000),
    -- Its configured max_server_connections: the cluster's budget is the least of them.
    budget         integer NOT NULL CHECK (budget BETWEEN 0 AND 1000000),
    -- Servers it wants (in use + waiting, at the peak since its last heartbeat).
    demand         integer NOT NULL CHECK (demand BETWEEN 0 AND 1000000),
    -- Servers it may have open: never below what it has, so the others never grow
    -- into a slot that is still in use.
    holding        integer NOT NULL CHECK (holding BETWEEN 0 AND 1000000)
);

-- One heartbeat. Registers the replica when its row is missing (first call, or reaped
-- after its lease ran out), records its demand and what it holds, grants it up to
-- p_claim out of what no live replica holds, and returns every live replica's row with
-- the database's clock, so all replicas judge liveness by one clock.
--
-- p_holding is what the replica may have open now (at most what it was granted last);
-- p_claim above it asks to grow. The grant never takes a slot another live replica
-- holds: Σ holding over live replicas stays within the least budget they declare.
CREATE FUNCTION dataplane_auth.replica_heartbeat(
    p_instance  text,
    p_addr      text,
    p_lease_ms  integer,
    p_budget    integer,
    p_demand    integer,
    p_holding   integer,
    p_claim     integer,
    p_prefer_id integer
)
RETURNS TABLE (
    replica_id     integer,
    advertise_addr text,
    started_ms     bigint,
    heartbeat_ms   bigint,
    lease_ms       integer,
    budget         integer,
    demand         integer,
    holding        integer,
    is_self        boolean,
    now_ms         bigint
)
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
-- A heartbeat that cannot have the lock soon fails and is retried: the replica keeps
-- its share meanwhile, which is always safe.
SET lock_timeout = 2000
AS $$
#variable_conflict use_column
DECLARE
    me        integer;
    others    bigint;
    least_budget integer;
    granted   integer;
    ts        timestamptz;
BEGIN
    IF p_instance IS NULL OR p_lease_ms IS NULL OR p_budget IS NULL OR p_demand IS NULL
       OR p_holding IS NULL OR p_claim IS NULL
       OR p_holding < 0 OR p_claim < 0 OR p_demand < 0 OR p_budget < 0 THEN
        RAISE EXCEPTION 'replica_heartbeat: invalid arguments' USING ERRCODE = '22023';
    END IF;
    -- One grant at a time, so two replicas never grow into the same released slot.
    -- Plain reads of the table do not wait (SHARE ROW EXCLUSIVE conflicts only with
    -- itself and writers).
    LOCK TABLE dataplane_auth.replicas IN SHARE ROW EXCLUSIVE MODE;
    ts := pg_catalog.clock_timestamp();

    -- Replicas whose lease ran out are gone: what they held is free, their id reusable.
    DELETE FROM dataplane_auth.replicas r
     WHERE r.instance <> p_instance
       AND r.heartbeat_at + pg_catalog.make_interval(secs => r.lease_ms / 1000.0) <= ts;

    SELECT r.replica_id INTO me FROM dataplane_auth.replicas r WHERE r.instance = p_instance;
    IF NOT FOUND THEN
        -- The id it had before when free (keys it minted stay routable), else the
        -- smallest free one.
        SELECT c INTO me
          FROM pg_catalog.generate_series(1, 255) AS c
         WHERE NOT EXISTS (SELECT FROM dataplane_auth.replicas r WHERE r.replica_id = c)
         ORDER BY c <> coalesce(p_prefer_id, 0), c
         LIMIT 1;
        IF me IS NULL THEN
            RAISE EXCEPTION 'replica_heartbeat: 255 replicas are registered' USING ERRCODE = '53400';
        END IF;
        -- It reports what it holds: after its row was reaped it may still hold servers.
        INSERT INTO dataplane_auth.replicas AS r
               (replica_id, instance, advertise_addr, started_at, heartbeat_at, lease_ms,
                budget, demand, holding)
        VALUES (me, p_instance, p_addr, ts, ts, p_lease_ms, p_budget, p_demand, p_holding);
    END IF;

    SELECT coalesce(sum(r.holding), 0) INTO others
      FROM dataplane_auth.replicas r WHERE r.replica_id <> me;
    SELECT least(min(r.budget), p_budget) INTO least_budget
      FROM dataplane_auth.replicas r WHERE r.replica_id <> me;
    least_budget := coalesce(least_budget, p_budget);
    granted := greatest(p_holding,
                        least(p_claim::bigint, least_budget::bigint - others))::integer;

    UPDATE dataplane_auth.replicas r
       SET advertise_addr = p_addr, heartbeat_at = ts, lease_ms = p_lease_ms,
           budget = p_budget, demand = p_demand, holding = granted
     WHERE r.replica_id = me;

    RETURN QUERY
        SELECT r.replica_id, r.advertise_addr,
               (extract(epoch FROM r.started_at) * 1000)::bigint,
               (extract(epoch FROM r.heartbeat_at) * 1000)::bigint,
               r.lease_ms, r.budget, r.demand, r.holding,
               r.replica_id = me,
               (extract(epoch FROM ts) * 1000)::bigint
          FROM dataplane_auth.replicas r
         ORDER BY r.replica_id;
END
$$;

-- A drained replica leaves at once instead of holding its share until its lease runs
-- out. Only its own row: the caller must know the instance name.
CREATE FUNCTION dataplane_auth.replica_leave(p_instance text)
RETURNS boolean
LANGUAGE sql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
    WITH gone AS (
        DELETE FROM dataplane_auth.replicas r WHERE r.instance = p_instance RETURNING 1
    )
    SELECT EXISTS (SELECT FROM gone)
$$;

REVOKE ALL ON TABLE dataplane_auth.replicas FROM PUBLIC;
REVOKE ALL ON FUNCTION dataplane_auth.replica_heartbeat(text, text, integer, integer, integer, integer, integer, integer) FROM PUBLIC;
REVOKE ALL ON FUNCTION dataplane_auth.replica_leave(text) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION dataplane_auth.replica_heartbeat(text, text, integer, integer, integer, integer, integer, integer) TO dp_pooler;
GRANT EXECUTE ON FUNCTION dataplane_auth.replica_leave(text) TO dp_pooler;

RESET ROLE;

DO $$
BEGIN
    IF current_setting('dataplane.granted_owner', true) = 'yes' THEN
        EXECUTE format('REVOKE dataplane_auth_owner FROM %I', current_user);
    END IF;
END
$$;
