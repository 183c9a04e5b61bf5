//! Event-time helpers: RFC 3339 parsing and formatting in milliseconds since the Unix epoch.

use chrono::{DateTime, SecondsFormat, Utc};

/// Milliseconds since the Unix epoch, UTC.
pub type Millis = i64;

/// Parses an RFC 3339 timestamp (`2026-11-25T14:00:00.123Z`) into epoch milliseconds.
pub fn parse_rfc3339(s: &str) -> Option<Millis> {
    DateTime::parse_from_rfc3339(s)
        .ok()
        .map(|t| t.with_timezone(&Utc).timestamp_millis())
}

/// Formats epoch milliseconds as RFC 3339 with millisecond precision and a `Z` suffix.
pub fn format_rfc3339(ms: Millis) -> String {
    DateTime::<Utc>::from_timestamp_millis(ms)
        .map(|t| t.to_rfc3339_opts(SecondsFormat::Millis, true))
        .unwrap_or_else(|| ms.to_string())
}

/// The wall clock, in epoch milliseconds.
pub fn now_millis() -> Millis {
    Utc::now().timestamp_millis()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips() {
        let ms = parse_rfc3339("2026-11-25T14:00:00.123Z").expect("valid");
        assert_eq!(ms, 1_795_615_200_123);
        assert_eq!(format_rfc3339(ms), "2026-11-25T14:00:00.123Z");
        assert_eq!(parse_rfc3339("2026-11-25T15:00:00.123+01:00"), Some(ms));
        assert_eq!(parse_rfc3339("yesterday"), None);
    }
}
