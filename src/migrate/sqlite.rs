//! Reading headscale's SQLite database: rows of any schema version since 0.23, and its
//! GORM-stored values (integers, texts, times, JSON lists) as Hydrascale reads them.

use std::collections::{BTreeMap, BTreeSet};

use rusqlite::types::ValueRef;
use rusqlite::Connection;

use super::MigrateError;

/// Column names of `table`, to read every schema version headscale has had since 0.23.
pub(super) fn columns(db: &Connection, table: &str) -> Result<BTreeSet<String>, MigrateError> {
    let mut stmt = db.prepare(&format!("PRAGMA table_info({table})"))?;
    let cols = stmt
        .query_map([], |r| r.get::<_, String>(1))?
        .collect::<Result<_, _>>()?;
    Ok(cols)
}

/// `SELECT` of `wanted` from `table`, with NULL for columns this schema lacks, leaving
/// out rows GORM soft-deleted; rows as maps from column name to value.
pub(super) fn rows(
    db: &Connection,
    table: &str,
    wanted: &[&str],
) -> Result<Vec<BTreeMap<String, Value>>, MigrateError> {
    let have = columns(db, table)?;
    if have.is_empty() {
        return Err(MigrateError::Query(format!("no table {table}")));
    }
    let select: Vec<String> = wanted
        .iter()
        .map(|c| {
            if have.contains(*c) {
                format!("\"{c}\"")
            } else {
                "NULL".into()
            }
        })
        .collect();
    let live = if have.contains("deleted_at") {
        " WHERE deleted_at IS NULL"
    } else {
        ""
    };
    let mut stmt = db.prepare(&format!(
        "SELECT {} FROM {table}{live} ORDER BY id",
        select.join(", ")
    ))?;
    let out = stmt
        .query_map([], |r| {
            let mut m = BTreeMap::new();
            for (i, c) in wanted.iter().enumerate() {
                m.insert((*c).to_string(), Value::from(r.get_ref(i)?));
            }
            Ok(m)
        })?
        .collect::<Result<_, _>>()?;
    Ok(out)
}

/// A column value, as SQLite stores headscale's GORM fields.
#[derive(Debug, Clone, PartialEq)]
pub(super) enum Value {
    Null,
    Int(i64),
    Text(String),
}

impl From<ValueRef<'_>> for Value {
    fn from(v: ValueRef<'_>) -> Self {
        match v {
            ValueRef::Null => Value::Null,
            ValueRef::Integer(i) => Value::Int(i),
            ValueRef::Real(f) => Value::Int(f as i64),
            ValueRef::Text(t) | ValueRef::Blob(t) => {
                Value::Text(String::from_utf8_lossy(t).into_owned())
            }
        }
    }
}

impl Value {
    pub(super) fn text(&self) -> Option<&str> {
        match self {
            Value::Text(t) if !t.is_empty() => Some(t),
            _ => None,
        }
    }

    pub(super) fn int(&self) -> Option<i64> {
        match self {
            Value::Int(i) => Some(*i),
            Value::Text(t) => t.parse().ok(),
            Value::Null => None,
        }
    }

    pub(super) fn id(&self) -> Option<u64> {
        self.int().and_then(|i| u64::try_from(i).ok())
    }

    pub(super) fn boolean(&self) -> bool {
        match self {
            Value::Int(i) => *i != 0,
            Value::Text(t) => matches!(t.as_str(), "1" | "true" | "TRUE" | "t"),
            Value::Null => false,
        }
    }

    /// A GORM time (`2006-01-02 15:04:05.999999999-07:00` and variants) as Unix
    /// milliseconds; NULL and Go's zero time are `None`.
    pub(super) fn time_ms(&self) -> Result<Option<i64>, MigrateError> {
        let Some(text) = self.text() else {
            return Ok(self.int().map(|s| s.saturating_mul(1000)));
        };
        parse_time_ms(text)
            .map_err(|e| MigrateError::Invalid(format!("unreadable time {text:?}: {e}")))
    }

    /// A JSON column (GORM's `serializer:json`) as a list of strings; NULL and `null` are empty.
    pub(super) fn string_list(&self) -> Result<Vec<String>, MigrateError> {
        match self.text() {
            None | Some("null") => Ok(Vec::new()),
            Some(t) => serde_json::from_str::<Option<Vec<String>>>(t)
                .map(Option::unwrap_or_default)
                .map_err(|e| MigrateError::Invalid(format!("unreadable list {t:?}: {e}"))),
        }
    }
}

fn parse_time_ms(text: &str) -> Result<Option<i64>, String> {
    use time::format_description::well_known::Rfc3339;
    let t = text.trim();
    // `2006-01-02 15:04:05.999 -0700 MST` (Go's String form) and `... +00:00`.
    let t = t.split(" +0000 UTC").next().unwrap_or(t);
    let mut s = t.replacen(' ', "T", 1);
    s = s.replace(' ', "");
    let has_offset = s.ends_with('Z') || {
        let tail = s.rsplit('T').next().unwrap_or("");
        tail.contains('+') || tail.contains('-')
    };
    if !has_offset {
        s.push('Z');
    }
    let dt = time::OffsetDateTime::parse(&s, &Rfc3339).map_err(|e| e.to_string())?;
    if dt.year() <= 1 {
        return Ok(None);
    }
    Ok(Some(
        i64::try_from(dt.unix_timestamp_nanos() / 1_000_000).unwrap_or(i64::MAX),
    ))
}

#[cfg(test)]
mod tests {
    use super::parse_time_ms;

    #[test]
    fn gorm_times_parse() {
        let ms = |s| parse_time_ms(s).expect(s);
        assert_eq!(ms("2026-11-27 15:30:00+00:00"), Some(1_795_793_400_000));
        assert_eq!(ms("2026-11-27 15:30:00.5+00:00"), Some(1_795_793_400_500));
        assert_eq!(ms("2026-11-27T16:30:00+01:00"), Some(1_795_793_400_000));
        assert_eq!(ms("2026-11-27 15:30:00"), Some(1_795_793_400_000));
        assert_eq!(
            ms("2026-11-27 15:30:00.123456789 +0000 UTC"),
            Some(1_795_793_400_123)
        );
        assert_eq!(ms("0001-01-01 00:00:00+00:00"), None);
        assert!(parse_time_ms("yesterday").is_err());
    }
}
