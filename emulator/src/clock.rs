//! Wall-clock helpers: every timestamp the emulator writes goes through here.

use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;
use time::macros::format_description;

/// Seconds since the Unix epoch, now.
pub fn now_unix() -> i64 {
    OffsetDateTime::now_utc().unix_timestamp()
}

/// RFC 3339 form of a Unix time, as Graph and the inspection records use it.
pub fn rfc3339(unix: i64) -> String {
    OffsetDateTime::from_unix_timestamp(unix).ok().and_then(|t| t.format(&Rfc3339).ok()).unwrap_or_default()
}

/// RFC 3339 form of the current time.
pub fn now_rfc3339() -> String {
    OffsetDateTime::now_utc().format(&Rfc3339).unwrap_or_default()
}

/// Entra ID's timestamp form, `2024-10-02 22:05:03Z`, used in its error bodies.
pub fn aad_timestamp(unix: i64) -> String {
    let format = format_description!("[year]-[month]-[day] [hour]:[minute]:[second]Z");
    OffsetDateTime::from_unix_timestamp(unix).ok().and_then(|t| t.format(&format).ok()).unwrap_or_default()
}

/// Graph's `innerError.date` form, `2024-10-02T22:05:03` (UTC, no zone suffix).
pub fn graph_date(unix: i64) -> String {
    let format = format_description!("[year]-[month]-[day]T[hour]:[minute]:[second]");
    OffsetDateTime::from_unix_timestamp(unix).ok().and_then(|t| t.format(&format).ok()).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_match_microsoft_shapes() {
        assert_eq!(aad_timestamp(1_700_000_000), "2023-11-14 22:13:20Z");
        assert_eq!(graph_date(1_700_000_000), "2023-11-14T22:13:20");
        assert_eq!(rfc3339(1_700_000_000), "2023-11-14T22:13:20Z");
    }
}
