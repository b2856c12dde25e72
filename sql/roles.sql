-- outbox-relay: a least-privilege role for the relay.
--
-- Apply after sql/outbox.sql, as a superuser (only a superuser, or on PostgreSQL 16+ a role with
-- CREATEROLE and REPLICATION, may create a role with the REPLICATION attribute). Idempotent.
--
-- Who runs what:
--   * `outbox-relay init` creates the publication (CREATE PUBLICATION ... FOR TABLE needs
--     ownership of outbox.events, or a superuser), so run `init` as the table owner;
--   * `outbox-relay run` then needs only what is granted here, so run it as outbox_relay:
--     REPLICATION to open the replication stream and create/read its slot, SELECT on the outbox
--     (polling mode reads it; logical mode checks it), and its bookkeeping table.
--   * polling mode (source.mode = "polling") needs no REPLICATION (ALTER ROLE outbox_relay
--     NOREPLICATION is fine): SELECT on the outbox and the bookkeeping table (the polling cursor)
--     suffice; with source.retention add  GRANT DELETE ON outbox.events TO outbox_relay;
--     run `outbox-relay init` in polling mode as the table owner (it creates the notify trigger).
--
-- Give the role a password (or a client certificate) out of band, never in this file:
--     ALTER ROLE outbox_relay PASSWORD '...';
-- and allow it in pg_hba.conf for the outbox's database, e.g.
--     host  app  outbox_relay  10.0.0.0/8  scram-sha-256
-- (a logical replication connection is matched by its database name; the special "replication"
-- entry covers physical replication only).
--
-- Applications (not the relay) write events with their own rights: outbox.publish runs as the
-- caller, so they need the schema and INSERT on the table; outbox.emit needs the schema only.
--     GRANT USAGE ON SCHEMA outbox TO app_role;
--     GRANT INSERT ON outbox.events TO app_role;

DO $$
BEGIN
    IF NOT EXISTS (SELECT FROM pg_catalog.pg_roles WHERE rolname = 'outbox_relay') THEN
        CREATE ROLE outbox_relay WITH LOGIN REPLICATION;
    END IF;
END
$$;

COMMENT ON ROLE outbox_relay IS 'outbox-relay: reads the outbox (logical replication or polling).';

GRANT USAGE ON SCHEMA outbox TO outbox_relay;
GRANT SELECT ON outbox.events TO outbox_relay;
GRANT SELECT, INSERT, UPDATE ON outbox.relay_state TO outbox_relay;
