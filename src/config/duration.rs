//! Duration settings ("90s", "15m", "1h", "7d", "0"), parsed once when the
//! configuration is read.

use serde::{Deserialize, Serialize};

/// A duration setting ("90s", "15m", "1h", "7d", or "0"), parsed once when the
/// configuration is read: a value [`parse_duration_ms`] refuses fails the load, with its
/// message and the setting's name. Written back (`Config::set`) as it was given.
#[derive(Debug, Clone, PartialEq)]
pub struct ConfigDuration {
    /// As given, for writing back; `pub(super)` for the tests.
    pub(super) text: String,
    ms: i64,
}

impl ConfigDuration {
    fn of(n: i64, unit: &str, ms_per_unit: i64) -> Self {
        Self {
            text: format!("{n}{unit}"),
            ms: n.saturating_mul(ms_per_unit),
        }
    }

    pub fn zero() -> Self {
        Self {
            text: "0".into(),
            ms: 0,
        }
    }

    pub fn millis(n: i64) -> Self {
        Self::of(n, "ms", 1)
    }

    pub fn seconds(n: i64) -> Self {
        Self::of(n, "s", 1_000)
    }

    pub fn minutes(n: i64) -> Self {
        Self::of(n, "m", 60_000)
    }

    pub fn days(n: i64) -> Self {
        Self::of(n, "d", 86_400_000)
    }

    /// In milliseconds (never negative).
    pub fn ms(&self) -> i64 {
        self.ms
    }

    pub fn duration(&self) -> std::time::Duration {
        std::time::Duration::from_millis(u64::try_from(self.ms).unwrap_or(0))
    }
}

impl std::str::FromStr for ConfigDuration {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        Ok(Self {
            ms: parse_duration_ms(text)?,
            text: text.to_string(),
        })
    }
}

impl Serialize for ConfigDuration {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.text)
    }
}

impl<'de> Deserialize<'de> for ConfigDuration {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        // The caller (toml) adds the setting's name to the message.
        String::deserialize(d)?
            .parse()
            .map_err(serde::de::Error::custom)
    }
}

/// Parses "250ms", "90s", "15m", "1h", "7d", "0" into milliseconds.
pub fn parse_duration_ms(text: &str) -> Result<i64, String> {
    let t = text.trim();
    if t == "0" {
        return Ok(0);
    }
    let split = t
        .find(|c: char| !c.is_ascii_digit())
        .ok_or_else(|| format!("{t:?} needs a unit: ms, s, m, h or d (e.g. 90d)"))?;
    let (num, unit) = t.split_at(split);
    let n: i64 = num
        .parse()
        .map_err(|_| format!("{t:?} is not a duration like 30m, 12h or 90d"))?;
    let mult = match unit {
        "ms" => 1,
        "s" => 1_000,
        "m" => 60_000,
        "h" => 3_600_000,
        "d" => 86_400_000,
        _ => {
            return Err(format!(
                "{t:?} has unknown unit {unit:?}; use ms, s, m, h or d"
            ))
        }
    };
    n.checked_mul(mult)
        .ok_or_else(|| format!("{t:?} is too long"))
}
