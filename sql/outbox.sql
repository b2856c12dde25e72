-- outbox-relay: the transactional outbox.
--
-- Applications write their business rows and one outbox event in the SAME transaction, either by
-- inserting into outbox.events directly or by calling outbox.publish(...). The relay reads
-- committed events (from the logical replication stream, or by polling this table) and publishes
-- each one as a Kafka record: topic from aggregate_type, key = aggregate_id, value = payload,
-- header `id` = the row id, which consumers use to drop the rare duplicate.
--
-- This file is applied by `outbox-relay init` and is idempotent: running it again changes
-- nothing and loses no data. It needs PostgreSQL 13 or later (gen_random_uuid, xid8).
--
-- Housekeeping: the relay deletes no rows unless told to (polling mode's `source.retention`).
-- Once events are published (see `outbox-relay status`) old rows may be deleted at any time, e.g.
-- with a daily
--     DELETE FROM outbox.events WHERE created_at < now() - interval '7 days';
-- In polling mode a row is published only once the polling cursor has passed it: deleting it
-- before then loses the event, so prefer `source.retention`, which deletes only such rows.
-- In logical mode the table may even stay empty: deleting the row in the same transaction that
-- inserted it still publishes the event, because the relay reads the insert from the WAL.

CREATE SCHEMA IF NOT EXISTS outbox;

CREATE TABLE IF NOT EXISTS outbox.events (
    id             uuid        PRIMARY KEY DEFAULT gen_random_uuid(), -- the dedup key
    aggregate_type text        NOT NULL,  -- routes to a topic
    aggregate_id   text        NOT NULL,  -- the Kafka key: same aggregate, same partition, in order
    event_type     text        NOT NULL,
    payload        jsonb,                 -- the Kafka value; NULL publishes a tombstone
    headers        jsonb       NOT NULL DEFAULT '{}', -- extra Kafka headers, a JSON object
    created_at     timestamptz NOT NULL DEFAULT now(), -- the record timestamp
    seq            bigint      GENERATED ALWAYS AS IDENTITY, -- polling order within a transaction
    txid           xid8        NOT NULL DEFAULT pg_current_xact_id() -- polling commit horizon
);

COMMENT ON TABLE outbox.events IS
    'Transactional outbox: insert in the same transaction as the business change; outbox-relay publishes each committed row to Kafka.';
COMMENT ON COLUMN outbox.events.id IS 'Event id, sent as Kafka header "id": the consumer dedup key.';
COMMENT ON COLUMN outbox.events.aggregate_type IS 'Selects the Kafka topic (default outbox.event.{aggregate_type}).';
COMMENT ON COLUMN outbox.events.aggregate_id IS 'Kafka key: events of one aggregate keep their commit order on one partition.';
COMMENT ON COLUMN outbox.events.payload IS 'Kafka value; NULL publishes a tombstone.';
COMMENT ON COLUMN outbox.events.headers IS 'Extra Kafka headers, a JSON object.';
COMMENT ON COLUMN outbox.events.seq IS 'Insertion order; used by polling mode only.';
COMMENT ON COLUMN outbox.events.txid IS 'Inserting transaction; polling mode only reads rows whose transaction is no longer in progress.';

-- outbox.publish: insert one event, return its id.
--     SELECT outbox.publish('order', '42', 'OrderPlaced', '{"total": 10}');
CREATE OR REPLACE FUNCTION outbox.publish(
    aggregate_type text,
    aggregate_id   text,
    event_type     text,
    payload        jsonb,
    headers        jsonb DEFAULT '{}'
) RETURNS uuid
LANGUAGE sql
VOLATILE
AS $$
    INSERT INTO outbox.events (aggregate_type, aggregate_id, event_type, payload, headers)
    VALUES (publish.aggregate_type, publish.aggregate_id, publish.event_type,
            publish.payload, publish.headers)
    RETURNING id;
$$;

COMMENT ON FUNCTION outbox.publish(text, text, text, jsonb, jsonb) IS
    'Insert one outbox event in the current transaction; returns the event id.';

-- outbox.emit: same arguments and result as outbox.publish, but writes NO row. The event goes
-- into the WAL only, as a transactional logical decoding message (so it is relayed only if the
-- transaction commits, in commit order, and there is no table to clean up). Logical mode only:
-- a polling relay never sees these events.
--
-- The message prefix below is the relay's `source.message_prefix`. `outbox-relay init` replaces
-- the marked literal with the configured prefix, so keep the marker comment next to it.
CREATE OR REPLACE FUNCTION outbox.emit(
    aggregate_type text,
    aggregate_id   text,
    event_type     text,
    payload        jsonb,
    headers        jsonb DEFAULT '{}'
) RETURNS uuid
LANGUAGE plpgsql
VOLATILE
AS $$
DECLARE
    event_id uuid := gen_random_uuid();
BEGIN
    PERFORM pg_logical_emit_message(
        true,
        'outbox' /* message_prefix */,
        jsonb_build_object(
            'id',             event_id,
            'aggregate_type', emit.aggregate_type,
            'aggregate_id',   emit.aggregate_id,
            'event_type',     emit.event_type,
            'payload',        emit.payload,
            'headers',        emit.headers,
            'created_at',     now()
        )::text
    );
    RETURN event_id;
END;
$$;

COMMENT ON FUNCTION outbox.emit(text, text, text, jsonb, jsonb) IS
    'Emit one outbox event into the WAL without writing a row (logical mode only); returns the event id.';

-- outbox.notify_relay: wakes a polling relay (source.mode = "polling") as soon as new events
-- commit, so it need not wait for its next poll. A polling relay installs it on the outbox table as
-- a statement-level trigger (`outbox-relay init` in polling mode does, and so does the relay itself
-- at start when it may), which amounts to:
--     CREATE TRIGGER outbox_relay_notify AFTER INSERT ON outbox.events
--         FOR EACH STATEMENT EXECUTE FUNCTION outbox.notify_relay();
-- Logical mode needs no trigger and should not have one: a transaction that notifies takes a
-- database-wide lock while it commits, which serializes the commits of busy writers. The
-- notification is delivered only when the inserting transaction commits, and carries no data:
-- the relay reads the rows itself.
CREATE OR REPLACE FUNCTION outbox.notify_relay() RETURNS trigger
LANGUAGE plpgsql
AS $$
BEGIN
    PERFORM pg_notify('outbox_relay', '');
    RETURN NULL;
END;
$$;

COMMENT ON FUNCTION outbox.notify_relay() IS
    'Trigger function: NOTIFY outbox_relay, so a polling outbox-relay polls at once.';

-- outbox.relay_state: the relay's own bookkeeping, one row per relay (name). In logical mode it
-- records which replication slot it consumed, so a slot that later disappears (dropped by hand,
-- lost in a failover) is reported instead of silently recreated; in polling mode `position` is
-- the polling cursor. Do not edit it while a relay is running.
CREATE TABLE IF NOT EXISTS outbox.relay_state (
    name              text        PRIMARY KEY,      -- the slot name, or 'polling:<schema.table>'
    kind              text        NOT NULL,         -- 'logical-slot' or 'polling-cursor'
    position          text        NOT NULL,         -- last confirmed LSN, or the cursor 'txid/seq'
    system_identifier text,                         -- the cluster it was recorded on
    updated_at        timestamptz NOT NULL DEFAULT now()
);

COMMENT ON TABLE outbox.relay_state IS
    'outbox-relay bookkeeping: the slot each relay consumed and the polling cursor. Managed by the relay.';
