-- The flashcards example's own table. Applied at start; idempotent.
--
-- One row per card ever seen, deleted ones included: a delete keeps the row as a tombstone
-- (deleted = true) with its version, so that an older update arriving later loses against it
-- instead of bringing the card back. The version is (version_counter, version_origin), compared
-- counter first, then origin: the highest version wins (last writer wins).
CREATE SCHEMA IF NOT EXISTS flashcards;

CREATE TABLE IF NOT EXISTS flashcards.cards (
    id              uuid        PRIMARY KEY,
    question        text,
    answer          text,
    deleted         boolean     NOT NULL DEFAULT false,
    version_counter bigint      NOT NULL,
    -- "C": both instances order origins the same way whatever their databases' locales.
    version_origin  text        COLLATE "C" NOT NULL,
    updated_at      timestamptz NOT NULL DEFAULT now()
);
