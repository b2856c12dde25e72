package example.flashcards;

import java.util.UUID;

/** A live card as the HTTP API shows it; (version, origin) is its version (see {@link CardStore}). */
public record Card(UUID id, String question, String answer, long version, String origin) {}
