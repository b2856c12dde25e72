package example.flashcards;

import org.apache.kafka.clients.consumer.ConsumerRecord;
import org.slf4j.Logger;
import org.slf4j.LoggerFactory;
import org.springframework.beans.factory.annotation.Value;
import org.springframework.jdbc.core.JdbcTemplate;
import org.springframework.kafka.annotation.KafkaListener;
import org.springframework.scheduling.annotation.Scheduled;
import org.springframework.stereotype.Component;
import org.springframework.transaction.PlatformTransactionManager;

import java.time.Duration;

/**
 * Applies the other instances' card events. One event = one database transaction holding
 * {@code inbox.accept} and the apply ({@link Inbox#process}); the listener container commits the
 * offset only after this method returned, so after that transaction committed (see
 * {@link KafkaConfig}). This instance's own events come back on the same topic and are skipped by
 * their {@code origin} header, without touching the database.
 */
@Component
public class CardEventListener {
    private static final Logger log = LoggerFactory.getLogger(CardEventListener.class);

    private final CardStore cards;
    private final Inbox inbox;
    private final InboxStats stats;
    private final Duration retention;

    public CardEventListener(CardStore cards, JdbcTemplate jdbc, PlatformTransactionManager transactions,
                             InboxStats stats, @Value("${flashcards.consumer}") String consumer,
                             @Value("${flashcards.inbox.retention}") Duration retention) {
        this.cards = cards;
        this.inbox = new Inbox(jdbc, transactions, consumer);
        this.stats = stats;
        this.retention = retention;
    }

    @KafkaListener(topics = "${flashcards.topic}")
    public void onCardEvent(ConsumerRecord<String, String> record) {
        if (cards.instance().equals(Inbox.header(record, "origin").orElse(null))) {
            stats.ownSkipped.incrementAndGet();
            return;
        }
        Inbox.Result result = inbox.process(record, () -> {
            // A null value (a tombstone record) carries no state: nothing to apply.
            if (record.value() != null && !cards.applyRemote(record.value())) {
                stats.superseded.incrementAndGet();
            }
        });
        switch (result) {
            case APPLIED -> stats.applied.incrementAndGet();
            case DUPLICATE -> {
                stats.duplicates.incrementAndGet();
                log.debug("dropped a redelivered event: {}", Inbox.eventId(record));
            }
            case DEAD_LETTER -> log.warn("skipped a dead-letter record at {}-{}@{}: {}", record.topic(),
                    record.partition(), record.offset(), Inbox.header(record, "dlq_error").orElse("?"));
        }
    }

    /** Inbox retention: forget ids older than {@code flashcards.inbox.retention}. */
    @Scheduled(fixedDelayString = "${flashcards.inbox.purge-interval}",
               initialDelayString = "${flashcards.inbox.purge-interval}")
    public void purgeInbox() {
        int purged = inbox.purge(retention);
        if (purged > 0) {
            log.info("inbox: purged {} event ids older than {}", purged, retention);
        }
    }
}
