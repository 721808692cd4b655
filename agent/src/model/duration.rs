//! Durations as Istio reads them.
//!
//! Istio decodes its CRDs with the legacy `jsonpb` package, which parses `google.protobuf.Duration`
//! with Go's `time.ParseDuration`, and the CRDs' CEL rules (`duration(self) >= duration('1ms')`)
//! use the same syntax. So `5s`, `1.5s`, `100ms`, `1m`, `1h30m`, `250us`, `-2s` and `0` are all
//! accepted, and the canonical protobuf JSON form (`"1.500s"`) is a special case of it.

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use std::fmt;
use std::str::FromStr;

/// A signed duration with nanosecond resolution (Go's `time.Duration` range: ±~292 years).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Duration {
    nanos: i64,
}

pub const NANOS_PER_MILLI: i64 = 1_000_000;
pub const NANOS_PER_SEC: i64 = 1_000_000_000;

impl Duration {
    pub const ZERO: Duration = Duration { nanos: 0 };

    pub const fn from_nanos(nanos: i64) -> Self {
        Duration { nanos }
    }

    pub const fn from_millis(millis: i64) -> Self {
        Duration {
            nanos: millis * NANOS_PER_MILLI,
        }
    }

    pub const fn from_secs(secs: i64) -> Self {
        Duration {
            nanos: secs * NANOS_PER_SEC,
        }
    }

    pub const fn as_nanos(self) -> i64 {
        self.nanos
    }

    pub const fn is_negative(self) -> bool {
        self.nanos < 0
    }

    /// The duration as a `std::time::Duration`; `None` when negative.
    pub fn as_std(self) -> Option<std::time::Duration> {
        u64::try_from(self.nanos)
            .ok()
            .map(std::time::Duration::from_nanos)
    }
}

impl From<std::time::Duration> for Duration {
    /// Saturates at Go's maximum duration.
    fn from(d: std::time::Duration) -> Self {
        Duration {
            nanos: i64::try_from(d.as_nanos()).unwrap_or(i64::MAX),
        }
    }
}

/// Why a string is not a duration.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "invalid duration {input:?}: {reason} (expected a number with a unit: ns, us, ms, s, m or h, e.g. \"5s\", \"1.5s\", \"100ms\", \"1m\")"
)]
pub struct ParseDurationError {
    pub input: String,
    pub reason: &'static str,
}

impl FromStr for Duration {
    type Err = ParseDurationError;

    /// Go's `time.ParseDuration`: `[-+]?([0-9]*(\.[0-9]*)?[a-z]+)+`, or `0`.
    fn from_str(input: &str) -> Result<Self, Self::Err> {
        let err = |reason| ParseDurationError {
            input: input.to_string(),
            reason,
        };
        let mut s = input;
        let mut negative = false;
        if let Some(rest) = s.strip_prefix('-') {
            negative = true;
            s = rest;
        } else if let Some(rest) = s.strip_prefix('+') {
            s = rest;
        }
        if s == "0" {
            return Ok(Duration::ZERO);
        }
        if s.is_empty() {
            return Err(err("empty"));
        }
        // Total in nanoseconds; u128 leaves room to detect overflow after every step.
        let limit: u128 = if negative {
            1u128 << 63
        } else {
            (1u128 << 63) - 1
        };
        let mut total: u128 = 0;
        while !s.is_empty() {
            if !s.starts_with(|c: char| c == '.' || c.is_ascii_digit()) {
                return Err(err("expected a number"));
            }
            let int_len = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
            let (int_digits, rest) = s.split_at(int_len);
            s = rest;
            let mut frac_digits = "";
            if let Some(rest) = s.strip_prefix('.') {
                let frac_len = rest
                    .find(|c: char| !c.is_ascii_digit())
                    .unwrap_or(rest.len());
                frac_digits = &rest[..frac_len];
                s = &rest[frac_len..];
            }
            if int_digits.is_empty() && frac_digits.is_empty() {
                return Err(err("expected digits"));
            }
            let unit_len = s
                .find(|c: char| c == '.' || c.is_ascii_digit())
                .unwrap_or(s.len());
            if unit_len == 0 {
                return Err(err("missing unit"));
            }
            let (unit, rest) = s.split_at(unit_len);
            s = rest;
            let unit: u128 = match unit {
                "ns" => 1,
                "us" | "\u{b5}s" | "\u{3bc}s" => 1_000,
                "ms" => 1_000_000,
                "s" => 1_000_000_000,
                "m" => 60 * 1_000_000_000,
                "h" => 3_600 * 1_000_000_000,
                _ => return Err(err("unknown unit")),
            };
            let mut value: u128 = 0;
            for d in int_digits.bytes() {
                value = value * 10 + u128::from(d - b'0');
                if value > limit {
                    return Err(err("out of range"));
                }
            }
            let mut component = value * unit;
            // Fractional digits beyond nanosecond precision cannot change the result.
            let mut scale: u128 = 1;
            let mut frac: u128 = 0;
            for d in frac_digits.bytes().take(30) {
                frac = frac * 10 + u128::from(d - b'0');
                scale *= 10;
            }
            component += frac * unit / scale;
            total += component;
            if total > limit {
                return Err(err("out of range"));
            }
        }
        let nanos = if negative {
            (total as i128).wrapping_neg() as i64
        } else {
            total as i64
        };
        Ok(Duration { nanos })
    }
}

impl fmt::Display for Duration {
    /// The canonical protobuf JSON form: seconds with as many fractional digits as needed
    /// (`1.5s`, `0.001s`, `300s`).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let sign = if self.nanos < 0 { "-" } else { "" };
        let abs = self.nanos.unsigned_abs();
        let secs = abs / NANOS_PER_SEC as u64;
        let frac = abs % NANOS_PER_SEC as u64;
        if frac == 0 {
            write!(f, "{sign}{secs}s")
        } else {
            let digits = format!("{frac:09}");
            write!(f, "{sign}{secs}.{}s", digits.trim_end_matches('0'))
        }
    }
}

impl Serialize for Duration {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Duration {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl serde::de::Visitor<'_> for Visitor {
            type Value = Duration;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a duration string such as \"5s\", \"1.5s\", \"100ms\" or \"1m\"")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Duration, E> {
                v.parse().map_err(E::custom)
            }
        }
        deserializer.deserialize_str(Visitor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ns(s: &str) -> i64 {
        s.parse::<Duration>()
            .unwrap_or_else(|e| panic!("{e}"))
            .as_nanos()
    }

    #[test]
    fn parses_what_go_parses() {
        assert_eq!(ns("5s"), 5 * NANOS_PER_SEC);
        assert_eq!(ns("1.5s"), 1_500_000_000);
        assert_eq!(ns("100ms"), 100 * NANOS_PER_MILLI);
        assert_eq!(ns("1m"), 60 * NANOS_PER_SEC);
        assert_eq!(ns("1h"), 3600 * NANOS_PER_SEC);
        assert_eq!(ns("1h30m"), 5400 * NANOS_PER_SEC);
        assert_eq!(ns("2m0.5s"), 120_500_000_000);
        assert_eq!(ns("0"), 0);
        assert_eq!(ns("0s"), 0);
        assert_eq!(ns("-2s"), -2 * NANOS_PER_SEC);
        assert_eq!(ns("+2s"), 2 * NANOS_PER_SEC);
        assert_eq!(ns(".5s"), 500_000_000);
        assert_eq!(ns("5.s"), 5 * NANOS_PER_SEC);
        assert_eq!(ns("250us"), 250_000);
        assert_eq!(ns("250µs"), 250_000);
        assert_eq!(ns("7ns"), 7);
        assert_eq!(ns("0.000000001s"), 1);
        assert_eq!(ns("1.0000000019s"), 1_000_000_001);
        assert_eq!(ns("1.500s"), 1_500_000_000);
        assert_eq!(ns("2562047h"), 2562047 * 3600 * NANOS_PER_SEC);
    }

    #[test]
    fn rejects_junk_with_a_clear_message() {
        for bad in [
            "",
            "s",
            "5",
            "1.5",
            "abc",
            "5 s",
            " 5s",
            "5sec",
            "1d",
            ".s",
            "-",
            "5s5",
            "1e3s",
            "9999999999h",
            "--1s",
        ] {
            let e = bad.parse::<Duration>().unwrap_err();
            assert!(e.to_string().contains("invalid duration"), "{bad}: {e}");
        }
        let e = serde_json::from_str::<Duration>("\"10 seconds\"").unwrap_err();
        assert!(e.to_string().contains("e.g. \"5s\""), "{e}");
        let e = serde_json::from_str::<Duration>("5").unwrap_err();
        assert!(e.to_string().contains("duration string"), "{e}");
    }

    #[test]
    fn displays_as_protobuf_json() {
        for (s, want) in [
            ("1.5s", "1.5s"),
            ("100ms", "0.1s"),
            ("1m", "60s"),
            ("-1.25s", "-1.25s"),
            ("0", "0s"),
            ("1ns", "0.000000001s"),
        ] {
            let d: Duration = s.parse().unwrap();
            assert_eq!(d.to_string(), want);
            assert_eq!(want.parse::<Duration>().unwrap(), d);
        }
        assert_eq!(
            serde_json::to_string(&Duration::from_millis(1500)).unwrap(),
            "\"1.5s\""
        );
    }

    #[test]
    fn converts_to_std() {
        assert_eq!(
            Duration::from_millis(5).as_std(),
            Some(std::time::Duration::from_millis(5))
        );
        assert_eq!(Duration::from_secs(-1).as_std(), None);
    }
}
