//! The `kafka.topic` template and Kafka's rules for topic names: the one grammar, parsed once
//! (by config validation, and again for the [`super::Router`] at start), rendered per event.

/// Kafka's own limit on topic names.
pub const MAX_TOPIC_LEN: usize = 249;

#[derive(Debug, Clone, PartialEq, Eq)]
enum Segment {
    Literal(String),
    AggregateType,
    EventType,
}

/// A `kafka.topic` template, parsed once: literal topic characters and the placeholders
/// `{aggregate_type}` and `{event_type}`. Config validation parses it to check it; the
/// [`super::Router`] renders the parsed form per event. Whether a rendered name is legal depends on
/// the row and is checked per event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopicTemplate {
    segments: Vec<Segment>,
}

impl TopicTemplate {
    /// Parses a template. The error is a reason phrased to follow the field name.
    pub fn parse(template: &str) -> Result<Self, String> {
        let rule = "must contain only [a-zA-Z0-9._-] outside placeholders";
        let mut segments = Vec::new();
        // Every literal character, for the length rules; `run` is the literal being read.
        let mut fixed = String::new();
        let mut run = String::new();
        let mut rest = template;
        while let Some(c) = rest.chars().next() {
            match c {
                '{' => {
                    let Some(end) = rest.find('}') else {
                        return Err(format!("{rule}; unclosed '{{'"));
                    };
                    let placeholder = match &rest[1..end] {
                        "aggregate_type" => Segment::AggregateType,
                        "event_type" => Segment::EventType,
                        name => {
                            return Err(format!(
                                "{rule}; unknown placeholder {{{name}}} (known: {{aggregate_type}}, {{event_type}})"
                            ))
                        }
                    };
                    if !run.is_empty() {
                        segments.push(Segment::Literal(std::mem::take(&mut run)));
                    }
                    segments.push(placeholder);
                    rest = &rest[end + 1..];
                }
                c if is_topic_char(c) => {
                    fixed.push(c);
                    run.push(c);
                    rest = &rest[c.len_utf8()..];
                }
                c => return Err(format!("{rule}; found {c:?}")),
            }
        }
        if !run.is_empty() {
            segments.push(Segment::Literal(run));
        }
        let placeholders = segments
            .iter()
            .any(|segment| !matches!(segment, Segment::Literal(_)));
        if !placeholders && topic_name_error(&fixed).is_some() {
            return Err(format!(
                "must be a Kafka topic name (1 to {MAX_TOPIC_LEN} characters, not \".\" or \"..\") or a template"
            ));
        }
        if fixed.len() > MAX_TOPIC_LEN {
            return Err(format!(
                "must leave room for the placeholders: its fixed part exceeds {MAX_TOPIC_LEN} characters"
            ));
        }
        Ok(Self { segments })
    }

    /// The topic for an event with these values (placeholders are replaced as they are; the
    /// result may still be an illegal name).
    pub(super) fn render(&self, aggregate_type: &str, event_type: &str) -> String {
        let mut topic = String::with_capacity(64);
        for segment in &self.segments {
            match segment {
                Segment::Literal(s) => topic.push_str(s),
                Segment::AggregateType => topic.push_str(aggregate_type),
                Segment::EventType => topic.push_str(event_type),
            }
        }
        topic
    }

    pub(super) fn uses_event_type(&self) -> bool {
        self.segments.contains(&Segment::EventType)
    }
}

/// Why `name` is not a legal Kafka topic name, if it isn't.
pub fn topic_name_error(name: &str) -> Option<String> {
    if name.is_empty() {
        return Some("empty".into());
    }
    if name == "." || name == ".." {
        return Some(format!("{name:?} is reserved"));
    }
    if name.len() > MAX_TOPIC_LEN {
        return Some(format!("longer than {MAX_TOPIC_LEN} characters"));
    }
    if let Some(c) = name.chars().find(|&c| !is_topic_char(c)) {
        return Some(format!("character {c:?} is not one of [a-zA-Z0-9._-]"));
    }
    None
}

/// The characters Kafka allows in a topic name.
fn is_topic_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topic_name_rules() {
        assert_eq!(topic_name_error("outbox.event.order_v2-x"), None);
        assert!(topic_name_error("").is_some());
        assert!(topic_name_error(".").is_some());
        assert!(topic_name_error("..").is_some());
        assert!(topic_name_error("a b").is_some());
        assert!(topic_name_error("ä").is_some());
        assert!(topic_name_error(&"a".repeat(250)).is_some());
        assert_eq!(topic_name_error(&"a".repeat(249)), None);
    }

    #[test]
    fn templates_render_their_placeholders() {
        let template = TopicTemplate::parse("{aggregate_type}-x.{event_type}").unwrap();
        assert!(template.uses_event_type());
        assert_eq!(template.render("order", "Placed"), "order-x.Placed");
        let fixed = TopicTemplate::parse("fixed").unwrap();
        assert!(!fixed.uses_event_type());
        assert_eq!(fixed.render("order", "Placed"), "fixed");
        assert!(TopicTemplate::parse("a.{nope}").is_err());
        assert!(TopicTemplate::parse("a.{aggregate_type").is_err());
        assert!(TopicTemplate::parse("a b").is_err());
    }
}
