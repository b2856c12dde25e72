package example.flashcards;

import org.springframework.boot.SpringApplication;
import org.springframework.boot.autoconfigure.SpringBootApplication;

@SpringBootApplication
public class FlashcardsApplication {
    public static void main(String[] args) {
        SpringApplication.run(FlashcardsApplication.class, args);
    }
}
