package example.flashcards;

import java.util.LinkedHashMap;
import java.util.Map;
import java.util.concurrent.atomic.AtomicLong;

import org.springframework.stereotype.Component;

/** What the listener did since this process started (GET /inbox/stats). */
@Component
public class InboxStats {
    /** Other instances' events applied (first deliveries). */
    final AtomicLong applied = new AtomicLong();
    /** Of those, the ones a higher stored version made a no-op (they lost the conflict). */
    final AtomicLong superseded = new AtomicLong();
    /** Redeliveries the inbox dropped. */
    final AtomicLong duplicates = new AtomicLong();
    /** This instance's own events, skipped by their origin header. */
    final AtomicLong ownSkipped = new AtomicLong();

    public Map<String, Long> snapshot() {
        Map<String, Long> out = new LinkedHashMap<>();
        out.put("applied", applied.get());
        out.put("superseded", superseded.get());
        out.put("duplicates", duplicates.get());
        out.put("own_skipped", ownSkipped.get());
        return out;
    }
}
