-- outbox-relay: the consumer side (the "inbox").
--
-- The relay delivers at least once: around failures (a crash, a lost connection, a failover) a
-- consumer can see an event twice. Every record carries the header `id` (the outbox event id);
-- record it in the same transaction as the consumer's own effects and a redelivery becomes a
-- no-op:
--
--     BEGIN;
--     SELECT inbox.accept('billing', '<value of header id>');  -- false: seen before, skip
--     -- ... only when it returned true: apply the event's effects ...
--     COMMIT;                                                   -- then commit the Kafka offset
--
-- If the transaction rolls back the inbox row rolls back with it, so the retry is accepted.
-- `consumer` names the consuming service (or consumer group), so several services can share one
-- inbox. Rows only need to be kept longer than the longest possible redelivery window, which the
-- topic's `retention.ms` bounds (Kafka's default: 7 days), e.g. daily:
--     DELETE FROM inbox.received WHERE consumer = 'billing' AND received_at < now() - interval '8 days';
--
-- docs/CONSUMING.md is the consumer's guide; the Rust crate `outbox-inbox` (inbox/) runs this file
-- and wraps the transaction above.
--
-- Idempotent: safe to apply again.

CREATE SCHEMA IF NOT EXISTS inbox;

CREATE TABLE IF NOT EXISTS inbox.received (
    consumer    text        NOT NULL,               -- who consumed it
    event_id    uuid        NOT NULL,               -- Kafka header `id`
    received_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (consumer, event_id)
);

COMMENT ON TABLE inbox.received IS
    'Events already processed per consumer, keyed by the outbox event id (Kafka header "id").';

-- inbox.accept: true the first time (consumer, event_id) is seen, false for a redelivery.
-- A concurrent duplicate waits for the first transaction and then returns false.
CREATE OR REPLACE FUNCTION inbox.accept(consumer text, event_id uuid) RETURNS boolean
LANGUAGE sql
VOLATILE
AS $$
    WITH inserted AS (
        INSERT INTO inbox.received (consumer, event_id)
        VALUES (accept.consumer, accept.event_id)
        ON CONFLICT DO NOTHING
        RETURNING 1
    )
    SELECT EXISTS (SELECT 1 FROM inserted);
$$;

COMMENT ON FUNCTION inbox.accept(text, uuid) IS
    'Record an event as processed by a consumer; false means it was already processed: skip it.';
