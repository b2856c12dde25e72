package example.flashcards;

import java.time.Duration;
import java.util.HashMap;
import java.util.Map;

import org.apache.kafka.clients.consumer.ConsumerConfig;
import org.apache.kafka.common.serialization.StringDeserializer;
import org.springframework.beans.factory.annotation.Value;
import org.springframework.context.annotation.Bean;
import org.springframework.context.annotation.Configuration;
import org.springframework.kafka.annotation.EnableKafka;
import org.springframework.kafka.config.ConcurrentKafkaListenerContainerFactory;
import org.springframework.kafka.core.ConsumerFactory;
import org.springframework.kafka.core.DefaultKafkaConsumerFactory;
import org.springframework.kafka.listener.ContainerProperties.AckMode;
import org.springframework.kafka.listener.DefaultErrorHandler;
import org.springframework.scheduling.annotation.EnableScheduling;
import org.springframework.util.backoff.FixedBackOff;

/**
 * The Kafka consumer behind {@link CardEventListener}.
 *
 * <p>Offsets: Kafka's auto-commit is off. The listener container commits a record's offset only
 * after the listener returned for it, i.e. after its database transaction committed; it does so
 * in batches ({@code AckMode.COUNT_TIME}): after {@code flashcards.commit.max-records} records or
 * {@code flashcards.commit.max-interval}, whichever comes first (an idle consumer commits too).
 * A crash between a transaction and the next commit redelivers those records; the inbox drops
 * them.
 *
 * <p>Failures: a record whose processing throws (the database is down, say) is retried every
 * second, for as long as it takes, without committing its offset: skipping it would leave the
 * instances out of sync. A record without the {@code id} header is not from outbox-relay and is
 * logged and skipped.
 */
@Configuration
@EnableKafka
@EnableScheduling
public class KafkaConfig {
    @Bean
    public ConsumerFactory<String, String> cardEventConsumerFactory(
            @Value("${flashcards.kafka-bootstrap}") String bootstrap,
            @Value("${flashcards.group-id}") String groupId,
            @Value("${flashcards.instance}") String instance) {
        Map<String, Object> props = new HashMap<>();
        props.put(ConsumerConfig.BOOTSTRAP_SERVERS_CONFIG, bootstrap);
        props.put(ConsumerConfig.GROUP_ID_CONFIG, groupId);
        props.put(ConsumerConfig.CLIENT_ID_CONFIG, "flashcards-" + instance);
        props.put(ConsumerConfig.ENABLE_AUTO_COMMIT_CONFIG, false);
        // A new instance (no committed offsets) reads the topic from its start.
        props.put(ConsumerConfig.AUTO_OFFSET_RESET_CONFIG, "earliest");
        // outbox-relay does not write transactionally by default; this is harmless then and
        // right when it does (exactly-once mode).
        props.put(ConsumerConfig.ISOLATION_LEVEL_CONFIG, "read_committed");
        props.put(ConsumerConfig.KEY_DESERIALIZER_CLASS_CONFIG, StringDeserializer.class);
        props.put(ConsumerConfig.VALUE_DESERIALIZER_CLASS_CONFIG, StringDeserializer.class);
        return new DefaultKafkaConsumerFactory<>(props);
    }

    /** The default container factory, so {@code @KafkaListener} needs no attribute for it. */
    @Bean
    public ConcurrentKafkaListenerContainerFactory<String, String> kafkaListenerContainerFactory(
            ConsumerFactory<String, String> cardEventConsumerFactory,
            @Value("${flashcards.commit.max-records}") int maxRecords,
            @Value("${flashcards.commit.max-interval}") Duration maxInterval) {
        var factory = new ConcurrentKafkaListenerContainerFactory<String, String>();
        factory.setConsumerFactory(cardEventConsumerFactory);
        factory.getContainerProperties().setAckMode(AckMode.COUNT_TIME);
        factory.getContainerProperties().setAckCount(maxRecords);
        factory.getContainerProperties().setAckTime(maxInterval.toMillis());
        var errors = new DefaultErrorHandler(new FixedBackOff(1000L, FixedBackOff.UNLIMITED_ATTEMPTS));
        errors.addNotRetryableExceptions(IllegalArgumentException.class);
        factory.setCommonErrorHandler(errors);
        return factory;
    }
}
