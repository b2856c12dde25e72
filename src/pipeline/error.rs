//! Why a session ended: the source's fault or the sink's.

use crate::sink::kafka::SinkError;
use crate::source::SourceError;

/// Why a session ended: the source failed (or an event it read cannot be published with
/// `on_invalid = "halt"`), or the sink did. What the relay does about it (retry, stand by,
/// halt) is [`crate::policy`]'s to decide. Each kind keeps its own text.
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    #[error(transparent)]
    Source(#[from] SourceError),
    /// A Kafka fault; [`SinkError::Definite`] (the dead-letter topic refused a record for
    /// good) halts like any definite fault (`crate::error::Definite`).
    #[error(transparent)]
    Sink(#[from] SinkError),
}

impl SessionError {
    /// True when only the operator can fix it, on either side: the session delivers and
    /// confirms what precedes the cause before it ends.
    pub fn is_definite(&self) -> bool {
        match self {
            Self::Source(e) => e.is_definite(),
            Self::Sink(e) => matches!(e, SinkError::Definite(_)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::Definite;

    #[test]
    fn a_refused_dead_letter_is_definite_and_other_sink_errors_are_not() {
        let refused = SessionError::from(SinkError::Definite(Definite::DeadLetterRefused {
            topic: "dlq".into(),
            error: "too large".into(),
        }));
        assert!(refused.is_definite(), "{refused}");
        // The text the operator reads is the definite fault's, problem and fix.
        assert!(refused.to_string().contains("; to fix: "), "{refused}");
        let delivery = SessionError::from(SinkError::Delivery("broker down".into()));
        assert!(!delivery.is_definite(), "{delivery}");
        let definite = SessionError::from(SourceError::from(Definite::StateTableMissing));
        assert!(definite.is_definite(), "{definite}");
        assert!(!SessionError::from(SourceError::StreamLost).is_definite());
    }
}
