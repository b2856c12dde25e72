package example.flashcards;

import java.io.IOException;
import java.io.InputStream;
import java.nio.charset.StandardCharsets;

import org.slf4j.Logger;
import org.slf4j.LoggerFactory;
import org.springframework.jdbc.core.JdbcTemplate;
import org.springframework.stereotype.Component;

/**
 * Creates the schema at start, before the HTTP server and the Kafka listener start: the outbox
 * ({@code sql/outbox.sql}) and the inbox ({@code sql/inbox.sql}), both copied unchanged from the
 * repository's {@code sql/} into the jar at build time, then the cards table. All three scripts
 * are idempotent, so every start applies them.
 */
@Component
public class Schema {
    private static final Logger log = LoggerFactory.getLogger(Schema.class);

    static final String[] SCRIPTS = {"sql/outbox.sql", "sql/inbox.sql", "schema/flashcards.sql"};

    public Schema(JdbcTemplate jdbc) {
        for (String script : SCRIPTS) {
            // One call per file: the driver sends the statements of a script as one batch.
            jdbc.execute(read(script));
            log.info("applied {}", script);
        }
    }

    private static String read(String resource) {
        try (InputStream in = Schema.class.getClassLoader().getResourceAsStream(resource)) {
            if (in == null) {
                throw new IllegalStateException(resource + " is not in the jar: build it with Maven");
            }
            return new String(in.readAllBytes(), StandardCharsets.UTF_8);
        } catch (IOException e) {
            throw new IllegalStateException("reading " + resource, e);
        }
    }
}
