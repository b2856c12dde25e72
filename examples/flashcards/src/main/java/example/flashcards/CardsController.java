package example.flashcards;

import java.util.List;
import java.util.Map;
import java.util.UUID;

import org.springframework.http.HttpStatus;
import org.springframework.http.ResponseEntity;
import org.springframework.web.bind.annotation.DeleteMapping;
import org.springframework.web.bind.annotation.GetMapping;
import org.springframework.web.bind.annotation.PathVariable;
import org.springframework.web.bind.annotation.PostMapping;
import org.springframework.web.bind.annotation.PutMapping;
import org.springframework.web.bind.annotation.RequestBody;
import org.springframework.web.bind.annotation.RestController;

/** The HTTP API: the cards, and what the listener did. */
@RestController
public class CardsController {
    /** The body of POST and PUT /cards. */
    public record CardBody(String question, String answer) {}

    private final CardStore cards;
    private final InboxStats stats;

    public CardsController(CardStore cards, InboxStats stats) {
        this.cards = cards;
        this.stats = stats;
    }

    @GetMapping("/cards")
    public List<Card> list() {
        return cards.list();
    }

    @PostMapping("/cards")
    public ResponseEntity<Card> create(@RequestBody CardBody body) {
        return ResponseEntity.status(HttpStatus.CREATED).body(cards.create(body.question(), body.answer()));
    }

    @PutMapping("/cards/{id}")
    public ResponseEntity<Card> update(@PathVariable UUID id, @RequestBody CardBody body) {
        return ResponseEntity.of(cards.update(id, body.question(), body.answer()));
    }

    @DeleteMapping("/cards/{id}")
    public ResponseEntity<Void> delete(@PathVariable UUID id) {
        return cards.delete(id) ? ResponseEntity.noContent().build() : ResponseEntity.notFound().build();
    }

    @GetMapping("/inbox/stats")
    public Map<String, Long> inboxStats() {
        return stats.snapshot();
    }
}
