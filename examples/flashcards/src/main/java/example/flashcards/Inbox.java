package example.flashcards;

import java.nio.charset.StandardCharsets;
import java.time.Duration;
import java.util.Optional;
import java.util.UUID;

import org.apache.kafka.clients.consumer.ConsumerRecord;
import org.apache.kafka.common.header.Header;
import org.springframework.jdbc.core.JdbcTemplate;
import org.springframework.transaction.PlatformTransactionManager;
import org.springframework.transaction.support.TransactionTemplate;

/**
 * The consumer side of outbox-relay: process each event exactly once in spite of at-least-once
 * delivery. Self-contained; copy it into your service.
 *
 * <p>Needs {@code sql/inbox.sql} applied to the service's database. outbox-relay sends every
 * record with the header {@code id} (the outbox event id). {@link #process} runs, in ONE
 * database transaction, {@code inbox.accept(consumer, id)} and, only when that returns true
 * (first delivery), your effects. A redelivered record finds its id already recorded and is
 * dropped: {@link Result#DUPLICATE}. If the effects throw, the transaction rolls back, the id
 * with it, and the retried record is processed again.
 *
 * <pre>{@code
 * Inbox inbox = new Inbox(jdbcTemplate, transactionManager, "billing");
 *
 * // in the Kafka listener method, for each ConsumerRecord<String, String> record:
 * inbox.process(record, () -> jdbcTemplate.update("...", record.value()));
 * // the container commits the offset after the method returns, so after the transaction
 * }</pre>
 *
 * <p>Commit the Kafka offset only after {@code process} returned (Spring Kafka's default
 * listener container does; never {@code enable.auto.commit=true}). The effects must use the
 * same {@code DataSource} as the transaction manager (a {@link JdbcTemplate} on it does), or they
 * are not part of the transaction.
 *
 * <p>Retention: ids only need to be kept longer than any redelivery can come late (the relay
 * redelivers within minutes; 7 days is plenty): {@link #purge}.
 */
public final class Inbox {
    /** What {@link #process} did with a record. */
    public enum Result {
        /** First delivery: the effects ran and committed with the id. */
        APPLIED,
        /** Seen before: nothing ran. */
        DUPLICATE,
        /**
         * A dead-letter record (headers {@code dlq_reason}, {@code dlq_error}, {@code dlq_topic}):
         * a row the relay could not publish as an event; nothing ran and no id was recorded.
         * Route these to whoever fixes the producing service, not to the event handler.
         */
        DEAD_LETTER
    }

    private final JdbcTemplate jdbc;
    private final TransactionTemplate tx;
    private final String consumer;

    /**
     * @param consumer the name this consumer records ids under ({@code inbox.received.consumer}):
     *                 services sharing one database use different names
     */
    public Inbox(JdbcTemplate jdbc, PlatformTransactionManager transactions, String consumer) {
        this.jdbc = jdbc;
        this.tx = new TransactionTemplate(transactions);
        this.consumer = consumer;
    }

    /** Runs {@code effects} in one transaction with the record's id, unless the id was seen. */
    public Result process(ConsumerRecord<?, ?> record, Runnable effects) {
        if (isDeadLetter(record)) {
            return Result.DEAD_LETTER;
        }
        UUID id = eventId(record);
        return tx.execute(status -> {
            Boolean first = jdbc.queryForObject("SELECT inbox.accept(?, ?)", Boolean.class, consumer, id);
            if (!Boolean.TRUE.equals(first)) {
                return Result.DUPLICATE;
            }
            effects.run();
            return Result.APPLIED;
        });
    }

    /** Deletes the ids received longer than {@code retention} ago; returns how many. */
    public int purge(Duration retention) {
        return jdbc.update(
                "DELETE FROM inbox.received WHERE consumer = ? "
                        + "AND received_at < now() - make_interval(secs => ?)",
                consumer, (double) retention.toSeconds());
    }

    /** The outbox event id of a record (header {@code id}); a record without one is refused. */
    public static UUID eventId(ConsumerRecord<?, ?> record) {
        return header(record, "id").map(UUID::fromString).orElseThrow(() -> new IllegalArgumentException(
                "record " + record.topic() + "-" + record.partition() + "@" + record.offset()
                        + " has no header id: not published by outbox-relay"));
    }

    /** True for a dead-letter record: outbox-relay marks those with {@code dlq_*} headers. */
    public static boolean isDeadLetter(ConsumerRecord<?, ?> record) {
        for (Header header : record.headers()) {
            if (header.key().startsWith("dlq_")) {
                return true;
            }
        }
        return false;
    }

    /** A header's value as text (outbox-relay's headers are UTF-8). */
    public static Optional<String> header(ConsumerRecord<?, ?> record, String name) {
        Header header = record.headers().lastHeader(name);
        return header == null || header.value() == null
                ? Optional.empty()
                : Optional.of(new String(header.value(), StandardCharsets.UTF_8));
    }
}
