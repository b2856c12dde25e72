//! Column values in Postgres's text output format, as pgoutput sends them.
//!
//! Only what the record mapping needs: timestamps (for the record timestamp) and `bytea`
//! (published as raw bytes). Everything else (jsonb, json, text) is passed through as it is.

/// Microseconds between the Unix epoch and Postgres's epoch (2000-01-01).
pub const PG_EPOCH_UNIX_MICROS: i64 = 946_684_800_000_000;

/// Milliseconds since the Unix epoch from a Postgres timestamp in microseconds since 2000.
pub fn pg_micros_to_unix_ms(pg_micros: i64) -> i64 {
    (pg_micros + PG_EPOCH_UNIX_MICROS).div_euclid(1000)
}

/// Milliseconds since the Unix epoch, now.
pub fn unix_ms_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// The monotonic instant matching a wall-clock time (ms since the Unix epoch), for latency
/// measurements.
pub fn instant_of(unix_ms: i64) -> std::time::Instant {
    let age = std::time::Duration::from_millis(unix_ms_now().saturating_sub(unix_ms).max(0) as u64);
    let now = std::time::Instant::now();
    now.checked_sub(age).unwrap_or(now)
}

/// Parses `timestamptz` text (`2026-11-22 01:02:03.123456+00`, ISO `T` separator and
/// `+05:30` offsets too) into milliseconds since the Unix epoch. `None` for anything else
/// (`infinity`, BC dates): the caller falls back to the commit time.
pub fn parse_timestamp_ms(text: &str) -> Option<i64> {
    let b = text.as_bytes();
    if b.len() < 19 {
        return None;
    }
    let num = |range: std::ops::Range<usize>| -> Option<i64> {
        let s = text.get(range)?;
        if s.bytes().all(|c| c.is_ascii_digit()) {
            s.parse().ok()
        } else {
            None
        }
    };
    let year = num(0..4)?;
    let month = num(5..7)?;
    let day = num(8..10)?;
    if b[4] != b'-' || b[7] != b'-' || !(b[10] == b' ' || b[10] == b'T') {
        return None;
    }
    let hour = num(11..13)?;
    let minute = num(14..16)?;
    let second = num(17..19)?;
    if b[13] != b':' || b[16] != b':' {
        return None;
    }
    if !(1..=12).contains(&month) || !(1..=31).contains(&day) || hour > 23 || minute > 59 {
        return None;
    }
    let mut i = 19;
    let mut millis = 0i64;
    if b.get(i) == Some(&b'.') {
        i += 1;
        let start = i;
        while i < b.len() && b[i].is_ascii_digit() {
            i += 1;
        }
        let frac = &text[start..i];
        let digits: String = frac.chars().chain("000".chars()).take(3).collect();
        millis = digits.parse().ok()?;
    }
    let mut offset_secs = 0i64;
    if let Some(&sign) = b.get(i) {
        let sign = match sign {
            b'+' => 1,
            b'-' => -1,
            b'Z' => 0,
            _ => return None,
        };
        if sign != 0 {
            let rest = text.get(i + 1..)?;
            let mut parts = rest.split(':');
            let h: i64 = parts.next()?.parse().ok()?;
            let m: i64 = parts.next().map_or(Some(0), |p| p.parse().ok())?;
            let s: i64 = parts.next().map_or(Some(0), |p| p.parse().ok())?;
            offset_secs = sign * (h * 3600 + m * 60 + s);
        }
    }
    let days = days_from_civil(year, month, day);
    let secs = days * 86_400 + hour * 3600 + minute * 60 + second - offset_secs;
    Some(secs * 1000 + millis)
}

/// Days since 1970-01-01 of a proleptic Gregorian date.
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// Decodes `bytea` hex output (`\x0a0b`). `None` when it is not hex output.
pub fn parse_bytea(text: &[u8]) -> Option<Vec<u8>> {
    let hex = text.strip_prefix(b"\\x")?;
    if hex.len() % 2 != 0 {
        return None;
    }
    let nibble = |c: u8| match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    };
    hex.chunks_exact(2)
        .map(|pair| Some(nibble(pair[0])? << 4 | nibble(pair[1])?))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_postgres_timestamps() {
        assert_eq!(parse_timestamp_ms("1970-01-01 00:00:00+00"), Some(0));
        assert_eq!(
            parse_timestamp_ms("2026-11-22 01:02:03.123456+00"),
            Some(1_795_309_323_123)
        );
        assert_eq!(
            parse_timestamp_ms("2026-11-22T01:02:03.1+00:00"),
            Some(1_795_309_323_100)
        );
        assert_eq!(
            parse_timestamp_ms("2026-11-22 06:32:03.123+05:30"),
            Some(1_795_309_323_123)
        );
        assert_eq!(
            parse_timestamp_ms("2000-02-29 00:00:00-01"),
            Some(951_786_000_000)
        );
        assert_eq!(parse_timestamp_ms("infinity"), None);
        assert_eq!(parse_timestamp_ms("2026-13-01 00:00:00+00"), None);
        assert_eq!(parse_timestamp_ms("2026-11-22 01:02:03 BC"), None);
    }

    #[test]
    fn converts_postgres_epoch() {
        assert_eq!(pg_micros_to_unix_ms(0), 946_684_800_000);
        assert_eq!(pg_micros_to_unix_ms(1_500), 946_684_800_001);
    }

    #[test]
    fn decodes_bytea_hex() {
        assert_eq!(parse_bytea(b"\\x00ff0A"), Some(vec![0, 255, 10]));
        assert_eq!(parse_bytea(b"\\x"), Some(vec![]));
        assert_eq!(parse_bytea(b"\\x0"), None);
        assert_eq!(parse_bytea(b"abc"), None);
        assert_eq!(parse_bytea(b"\\xzz"), None);
    }
}
