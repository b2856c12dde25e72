package example.flashcards;

import java.util.List;
import java.util.Optional;
import java.util.UUID;

import org.springframework.beans.factory.annotation.Value;
import org.springframework.jdbc.core.JdbcTemplate;
import org.springframework.jdbc.core.RowMapper;
import org.springframework.stereotype.Repository;
import org.springframework.transaction.support.TransactionTemplate;

/**
 * The cards table and its events.
 *
 * <p>Local writes (the HTTP API) change the card and insert its event into {@code outbox.events}
 * in ONE transaction: either both commit or neither does, and outbox-relay publishes the event
 * once it committed. The event carries the card's whole new state and its version, so applying
 * it needs nothing else.
 *
 * <p>Versions and conflicts: a card's version is (counter, origin). A local write sets it to
 * (stored counter + 1, this instance), so it wins over everything this instance has seen of the
 * card. A remote event is applied only when its version is higher than the stored one (counter
 * first, then origin as the tie-break): last writer wins, and both instances end up with the same
 * row whatever order the events arrive in. A delete is such a write too: the row stays, marked
 * deleted (a tombstone), so an older update arriving later loses against it.
 */
@Repository
public class CardStore {
    /** The event of the card {@code id}'s current row: payload = its state, header origin. */
    private static final String INSERT_EVENT = """
            INSERT INTO outbox.events (aggregate_type, aggregate_id, event_type, payload, headers)
            SELECT 'card', c.id::text, ?,
                   jsonb_build_object('id', c.id, 'question', c.question, 'answer', c.answer,
                                      'deleted', c.deleted,
                                      'version', c.version_counter, 'origin', c.version_origin),
                   jsonb_build_object('origin', ?::text)
            FROM flashcards.cards c WHERE c.id = ?
            """;

    private static final String COLUMNS = "id, question, answer, version_counter, version_origin";

    /** Last writer wins: the upsert changes the row only for a higher version. */
    private static final String APPLY = """
            INSERT INTO flashcards.cards AS c
                (id, question, answer, deleted, version_counter, version_origin)
            SELECT e.id, e.question, e.answer, e.deleted, e.version, e.origin
            FROM jsonb_to_record(?::jsonb)
                 AS e(id uuid, question text, answer text, deleted boolean, version bigint, origin text)
            ON CONFLICT (id) DO UPDATE
            SET question = excluded.question, answer = excluded.answer, deleted = excluded.deleted,
                version_counter = excluded.version_counter, version_origin = excluded.version_origin,
                updated_at = now()
            WHERE (c.version_counter, c.version_origin) < (excluded.version_counter, excluded.version_origin)
            """;

    private static final RowMapper<Card> CARD = (rs, n) -> new Card(
            rs.getObject("id", UUID.class), rs.getString("question"), rs.getString("answer"),
            rs.getLong("version_counter"), rs.getString("version_origin"));

    private final JdbcTemplate jdbc;
    private final TransactionTemplate tx;
    private final String instance;

    public CardStore(JdbcTemplate jdbc, TransactionTemplate tx, Schema schema,
                     @Value("${flashcards.instance}") String instance) {
        if (instance.isBlank()) {
            throw new IllegalArgumentException("flashcards.instance must name this instance");
        }
        this.jdbc = jdbc;
        this.tx = tx;
        this.instance = instance;
    }

    public String instance() {
        return instance;
    }

    public List<Card> list() {
        return jdbc.query("SELECT " + COLUMNS + " FROM flashcards.cards WHERE NOT deleted ORDER BY id", CARD);
    }

    public Card create(String question, String answer) {
        return tx.execute(status -> {
            Card card = jdbc.queryForObject(
                    "INSERT INTO flashcards.cards (id, question, answer, version_counter, version_origin) "
                            + "VALUES (?, ?, ?, 1, ?) RETURNING " + COLUMNS,
                    CARD, UUID.randomUUID(), question, answer, instance);
            event("CardCreated", card.id());
            return card;
        });
    }

    /** The updated card, or empty when there is no such live card. */
    public Optional<Card> update(UUID id, String question, String answer) {
        return tx.execute(status -> {
            List<Card> updated = jdbc.query(
                    "UPDATE flashcards.cards SET question = ?, answer = ?, "
                            + "version_counter = version_counter + 1, version_origin = ?, updated_at = now() "
                            + "WHERE id = ? AND NOT deleted RETURNING " + COLUMNS,
                    CARD, question, answer, instance, id);
            updated.forEach(card -> event("CardUpdated", card.id()));
            return updated.stream().findFirst();
        });
    }

    /** Deletes a card (keeping its tombstone); false when there is no such live card. */
    public boolean delete(UUID id) {
        return Boolean.TRUE.equals(tx.execute(status -> {
            int n = jdbc.update(
                    "UPDATE flashcards.cards SET question = NULL, answer = NULL, deleted = true, "
                            + "version_counter = version_counter + 1, version_origin = ?, updated_at = now() "
                            + "WHERE id = ? AND NOT deleted",
                    instance, id);
            if (n == 1) {
                event("CardDeleted", id);
            }
            return n == 1;
        }));
    }

    /**
     * Applies another instance's event (its payload) in the caller's transaction; false when the
     * stored version is higher or equal, so the event changed nothing.
     */
    public boolean applyRemote(String payload) {
        return jdbc.update(APPLY, payload) == 1;
    }

    private void event(String type, UUID id) {
        jdbc.update(INSERT_EVENT, type, instance, id);
    }
}
