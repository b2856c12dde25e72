//! Serde helpers for the config's own value syntaxes: durations, columns that may be switched
//! off, and `[kafka.properties]` with bare dotted keys.

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use serde::de::{self, Deserializer, MapAccess, Visitor};
use serde::Deserialize;

/// Parses `"200ms"`, `"1s"`, `"1.5s"`, `"2m"`, `"1h"`: a decimal number (at most nine decimal
/// places) and one unit, nothing else. The error is a reason to put after the field name.
pub(super) fn parse_duration(text: &str) -> Result<Duration, &'static str> {
    let split = text
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .ok_or("has no unit (use ms, s, m or h)")?;
    let (number, unit) = text.split_at(split);
    let nanos_per_unit: u128 = match unit {
        "ms" => 1_000_000,
        "s" => 1_000_000_000,
        "m" => 60_000_000_000,
        "h" => 3_600_000_000_000,
        _ => return Err("has an unknown unit (use ms, s, m or h)"),
    };
    let (whole, fraction) = number.split_once('.').unwrap_or((number, ""));
    let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    if !digits(whole) || (number.contains('.') && !digits(fraction)) {
        return Err("must start with a number like 200 or 1.5");
    }
    if fraction.len() > 9 {
        return Err("has more than nine decimal places");
    }
    let whole: u128 = whole.parse().map_err(|_| "is too large")?;
    // `fraction` has at most nine digits, so it and 10^len fit easily.
    let fraction_value: u128 = if fraction.is_empty() {
        0
    } else {
        fraction.parse().map_err(|_| "is not a number")?
    };
    let scale = 10u128.pow(fraction.len() as u32);
    let nanos = whole
        .checked_mul(nanos_per_unit)
        .and_then(|n| n.checked_add(fraction_value * nanos_per_unit / scale))
        .ok_or("is too large")?;
    let nanos = u64::try_from(nanos).map_err(|_| "is too large")?;
    Ok(Duration::from_nanos(nanos))
}

pub(super) fn deserialize_duration<'de, D: Deserializer<'de>>(
    deserializer: D,
) -> Result<Duration, D::Error> {
    let text = String::deserialize(deserializer)?;
    parse_duration(&text)
        .map_err(|reason| de::Error::custom(format!("invalid duration {text:?}: {reason}")))
}

pub(super) fn deserialize_optional_duration<'de, D: Deserializer<'de>>(
    deserializer: D,
) -> Result<Option<Duration>, D::Error> {
    deserialize_duration(deserializer).map(Some)
}

/// `""` means the table has no such column.
pub(super) fn deserialize_optional_column<'de, D: Deserializer<'de>>(
    deserializer: D,
) -> Result<Option<String>, D::Error> {
    let name = String::deserialize(deserializer)?;
    Ok(Some(name).filter(|name| !name.is_empty()))
}

/// A `[kafka.properties]` value: a scalar kept in its string form, or a nested table from a bare
/// dotted key.
enum PropertyNode {
    Leaf(String),
    Table(BTreeMap<String, PropertyNode>),
}

impl<'de> Deserialize<'de> for PropertyNode {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct NodeVisitor;
        impl<'de> Visitor<'de> for NodeVisitor {
            type Value = PropertyNode;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a string, number or boolean")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<PropertyNode, E> {
                Ok(PropertyNode::Leaf(v.to_owned()))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<PropertyNode, E> {
                Ok(PropertyNode::Leaf(v.to_string()))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<PropertyNode, E> {
                Ok(PropertyNode::Leaf(v.to_string()))
            }
            fn visit_f64<E: de::Error>(self, v: f64) -> Result<PropertyNode, E> {
                Ok(PropertyNode::Leaf(v.to_string()))
            }
            fn visit_bool<E: de::Error>(self, v: bool) -> Result<PropertyNode, E> {
                Ok(PropertyNode::Leaf(v.to_string()))
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<PropertyNode, A::Error> {
                let mut table = BTreeMap::new();
                while let Some((key, value)) = map.next_entry::<String, PropertyNode>()? {
                    table.insert(key, value);
                }
                Ok(PropertyNode::Table(table))
            }
        }
        deserializer.deserialize_any(NodeVisitor)
    }
}

pub(super) fn deserialize_properties<'de, D: Deserializer<'de>>(
    deserializer: D,
) -> Result<BTreeMap<String, String>, D::Error> {
    fn flatten(
        prefix: &str,
        table: BTreeMap<String, PropertyNode>,
        out: &mut BTreeMap<String, String>,
    ) -> Result<(), String> {
        for (key, node) in table {
            let key = if prefix.is_empty() {
                key
            } else {
                format!("{prefix}.{key}")
            };
            match node {
                PropertyNode::Leaf(value) => {
                    if out.insert(key.clone(), value).is_some() {
                        return Err(format!("kafka.properties.{key} is set twice"));
                    }
                }
                PropertyNode::Table(table) => flatten(&key, table, out)?,
            }
        }
        Ok(())
    }
    let tree = BTreeMap::<String, PropertyNode>::deserialize(deserializer)?;
    let mut out = BTreeMap::new();
    flatten("", tree, &mut out).map_err(de::Error::custom)?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        let ok = [
            ("200ms", Duration::from_millis(200)),
            ("1s", Duration::from_secs(1)),
            ("1.5s", Duration::from_millis(1500)),
            ("2m", Duration::from_secs(120)),
            ("1h", Duration::from_secs(3600)),
            ("0.5ms", Duration::from_micros(500)),
            ("0.000000001s", Duration::from_nanos(1)),
            ("0s", Duration::ZERO),
            ("007ms", Duration::from_millis(7)),
            ("5124095h", Duration::from_secs(5_124_095 * 3600)),
        ];
        for (text, expected) in ok {
            assert_eq!(parse_duration(text), Ok(expected), "{text}");
        }
        let bad = [
            ("", "has no unit"),
            ("200", "has no unit"),
            ("ms", "must start with a number"),
            ("-1s", "has an unknown unit"),
            ("1.s", "must start with a number"),
            (".5s", "must start with a number"),
            ("1.5.5s", "must start with a number"),
            ("1 s", "has an unknown unit"),
            (" 1s", "has an unknown unit"),
            ("1s ", "has an unknown unit"),
            ("1x", "has an unknown unit"),
            ("1sms", "has an unknown unit"),
            ("1S", "has an unknown unit"),
            ("1e3s", "has an unknown unit"),
            ("1.0000000001s", "more than nine decimal places"),
            ("5124096h", "is too large"),
            ("99999999999999999999999999999999999999999h", "is too large"),
        ];
        for (text, expected) in bad {
            let err = parse_duration(text).unwrap_err();
            assert!(err.contains(expected), "{text}: {err}");
        }
    }

    mod properties {
        use super::*;
        use proptest::prelude::*;

        proptest! {
            #[test]
            fn duration_parser_never_panics(text in "\\PC{0,24}") {
                let _ = parse_duration(&text);
            }

            #[test]
            fn whole_milliseconds_round_trip(ms in 0u64..=u64::MAX / 1_000_000) {
                prop_assert_eq!(parse_duration(&format!("{ms}ms")), Ok(Duration::from_millis(ms)));
            }
        }
    }
}
