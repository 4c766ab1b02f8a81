-- Least-privilege roles of the processor (docs/security.md explains each choice).
--
-- Run as a superuser (or the owner of the Directus tables) in the processor's database,
-- after Directus has created its tables and `processor schema migrate` has run:
--
--     psql "$ADMIN_URL" -v ON_ERROR_STOP=1 -f deploy/roles.sql
--
-- Safe to run again (after every migration, for instance): roles are created only when
-- missing, ownership and grants are set again. No password is set here: give the login
-- role one out of band (`\password processor_app`) or use certificate authentication.
--
--   processor_owner      NOLOGIN. Owns positions, position_attributes (with every
--                        partition) and schema processor (migrations, outbox, shard
--                        bookkeeping). Creates partitions, so it may CREATE in public.
--   processor_app        LOGIN, member of processor_owner. What `processor run`, the
--                        dispatcher, export, replay and backfill connect as. Reads the
--                        Directus configuration collections; writes only timing_records,
--                        penalties, stage_results and anomalies among Directus tables.
--   processor_analytics  NOLOGIN, read-only: positions, attributes, configuration and
--                        results. Grant it to analysts' login roles.
--   (the gateway)        no database role at all: it reads Redis only.

DO $$
BEGIN
    IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'processor_owner') THEN
        CREATE ROLE processor_owner NOLOGIN;
    END IF;
    IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'processor_app') THEN
        CREATE ROLE processor_app LOGIN;
    END IF;
    IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'processor_analytics') THEN
        CREATE ROLE processor_analytics NOLOGIN;
    END IF;
END
$$;

-- The app acts as the owner for the owned tables (partition DDL needs ownership).
GRANT processor_owner TO processor_app;

-- Nobody else may create objects in public; the owner creates partitions there.
REVOKE CREATE ON SCHEMA public FROM PUBLIC;
GRANT USAGE, CREATE ON SCHEMA public TO processor_owner;
GRANT USAGE ON SCHEMA public TO processor_analytics;

-- Ownership of what the processor owns, partitions included (idempotent).
CREATE SCHEMA IF NOT EXISTS processor;
ALTER SCHEMA processor OWNER TO processor_owner;
DO $$
DECLARE
    item record;
BEGIN
    FOR item IN
        SELECT c.oid::regclass AS name, c.relkind
        FROM pg_class c
        JOIN pg_namespace n ON n.oid = c.relnamespace
        WHERE c.relkind IN ('r', 'p', 'v', 'm', 'f')
          AND (n.nspname = 'processor'
               OR c.oid IN ('public.positions'::regclass, 'public.position_attributes'::regclass)
               OR c.oid IN (SELECT inhrelid FROM pg_inherits
                            WHERE inhparent IN ('public.positions'::regclass,
                                                'public.position_attributes'::regclass)))
    LOOP
        EXECUTE format('ALTER TABLE %s OWNER TO processor_owner', item.name);
    END LOOP;
    FOR item IN
        SELECT c.oid::regclass AS name
        FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
        WHERE c.relkind = 'S' AND n.nspname = 'processor'
    LOOP
        EXECUTE format('ALTER SEQUENCE %s OWNER TO processor_owner', item.name);
    END LOOP;
END
$$;

-- Directus configuration collections: read only.
GRANT SELECT ON device_models, devices, entries, events, geofences, io_mappings, stages,
    start_times TO processor_app;

-- Directus result collections: the domain engine inserts, updates and removes its rows.
GRANT SELECT, INSERT, UPDATE, DELETE ON timing_records, penalties, stage_results, anomalies
    TO processor_app;
DO $$
DECLARE
    seq text;
    tab text;
BEGIN
    FOREACH tab IN ARRAY ARRAY['timing_records', 'penalties', 'stage_results', 'anomalies']
    LOOP
        seq := pg_get_serial_sequence(tab, 'id');
        IF seq IS NOT NULL THEN
            EXECUTE format('GRANT USAGE, SELECT ON SEQUENCE %s TO processor_app', seq);
        END IF;
    END LOOP;
END
$$;

-- Analytics: read positions, attributes, configuration and results; write nothing.
GRANT SELECT ON positions, position_attributes, device_models, devices, entries, events,
    geofences, io_mappings, stages, start_times, timing_records, penalties, stage_results,
    anomalies TO processor_analytics;
