//! Cache budgets and byte sizes: the one parser of sizes (`512MiB`, `2GB`, `1.5GiB`) and the two
//! ways of writing them back (exact, for budget strings that must parse again; approximate, for
//! reports), used by the CLI, the experiment files, the cache and every report.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

named_enum! {
    /// How a byte budget is shared between MoE layers.
    pub enum Pool {
        /// One pool over all layers: victims may come from any layer.
        #[default]
        Global = "global",
        /// The bytes are split equally, one pool per MoE layer.
        PerLayer = "per-layer",
    }
}

/// How much the cache may hold.
///
/// String form (for CLI and TOML, parsed by [`Budget::parse`], given back by `Display`):
/// `unlimited`; `8` (slots per layer); `512MiB/layer` (bytes per layer); `16GiB` (bytes, one
/// global pool). Byte units as [`parse_size`] reads them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum Budget {
    /// Nothing is ever evicted.
    Unlimited,
    /// Each MoE layer holds at most this many experts, whatever their size.
    SlotsPerLayer(usize),
    /// Each MoE layer holds at most this many bytes of experts.
    BytesPerLayer(u64),
    /// All layers together hold at most this many bytes (one shared pool).
    BytesGlobal(u64),
}

/// A budget string that does not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "bad cache budget `{given}`: {reason}; expected `unlimited`, slots per layer (`8`), \
     bytes per layer (`512MiB/layer`) or global bytes (`16GiB`)"
)]
pub struct BudgetError {
    /// The string as given.
    pub given: String,
    /// What is wrong.
    pub reason: String,
}

/// A size string that does not parse, or a size beyond 2^64 bytes.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("`{given}` is not a byte size: {reason} (examples: 512MiB, 2GB, 1.5GiB, 1048576)")]
pub struct SizeError {
    /// The string as given.
    pub given: String,
    /// What is wrong.
    pub reason: String,
}

/// Parses a byte size: a plain number of bytes, or a number with a unit `B`, `KB`/`MB`/`GB`/`TB`
/// (powers of 1000; `K`/`M`/`G`/`T` alone mean the same) or `KiB`/`MiB`/`GiB`/`TiB` (powers of
/// 1024), case-insensitive, spaces allowed, decimals allowed (`1.5GiB`). Negative, non-finite
/// and out-of-range sizes (≥ 2^64 bytes) are errors, never clamped.
pub fn parse_size(s: &str) -> Result<u64, SizeError> {
    let err = |reason: &str| SizeError {
        given: s.to_string(),
        reason: reason.to_string(),
    };
    let t = s.trim().to_ascii_lowercase();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    if num.is_empty() {
        return Err(err(if t.starts_with('-') {
            "sizes cannot be negative"
        } else {
            "no number"
        }));
    }
    let mult: u64 = match unit.trim() {
        "" | "b" => 1,
        "kb" | "k" => 1_000,
        "mb" | "m" => 1_000_000,
        "gb" | "g" => 1_000_000_000,
        "tb" | "t" => 1_000_000_000_000,
        "kib" => 1 << 10,
        "mib" => 1 << 20,
        "gib" => 1 << 30,
        "tib" => 1 << 40,
        _ => {
            return Err(err(&format!(
                "unknown size unit `{}` (known: B, KB, MB, GB, TB, KiB, MiB, GiB, TiB)",
                unit.trim()
            )))
        }
    };
    let too_big = || err("larger than 2^64 bytes");
    if let Ok(n) = num.parse::<u64>() {
        return n.checked_mul(mult).ok_or_else(too_big);
    }
    if num.bytes().all(|c| c.is_ascii_digit()) {
        // All digits but no u64: too many of them.
        return Err(too_big());
    }
    let x: f64 = num.parse().map_err(|_| err("not a number"))?;
    let bytes = (x * mult as f64).round();
    if !bytes.is_finite() || bytes >= u64::MAX as f64 {
        return Err(too_big());
    }
    Ok(bytes as u64)
}

/// Formats bytes exactly with the unit giving the smallest number (binary units win ties):
/// `512MiB`, `2GB`, `1000B`. [`parse_size`] reads every output back to the same value.
pub fn format_bytes(b: u64) -> String {
    const UNITS: [(&str, u64); 8] = [
        ("TiB", 1 << 40),
        ("GiB", 1 << 30),
        ("MiB", 1 << 20),
        ("KiB", 1 << 10),
        ("TB", 1_000_000_000_000),
        ("GB", 1_000_000_000),
        ("MB", 1_000_000),
        ("KB", 1_000),
    ];
    let mut best = (b, "B");
    for (unit, m) in UNITS {
        if b >= m && b.is_multiple_of(m) && b / m < best.0 {
            best = (b / m, unit);
        }
    }
    format!("{}{}", best.0, best.1)
}

/// Human-readable bytes for reports: powers of 1000, as model cards quote them, with MiB in
/// brackets (`13.27 MB (12.66 MiB)`).
pub fn human_bytes(b: u64) -> String {
    let f = b as f64;
    let dec = if f >= 1e9 {
        format!("{:.2} GB", f / 1e9)
    } else if f >= 1e6 {
        format!("{:.2} MB", f / 1e6)
    } else if f >= 1e3 {
        format!("{:.1} kB", f / 1e3)
    } else {
        format!("{b} B")
    };
    format!("{dec} ({:.2} MiB)", f / (1024.0 * 1024.0))
}

impl Budget {
    /// Parses the string form (see the type doc).
    pub fn parse(s: &str) -> Result<Budget, BudgetError> {
        let err = |reason: String| BudgetError {
            given: s.to_string(),
            reason,
        };
        let lower = s.trim().to_ascii_lowercase();
        if lower == "unlimited" || lower == "all" {
            return Ok(Budget::Unlimited);
        }
        if let Some(rest) = lower.strip_suffix("/layer") {
            let rest = rest.trim();
            if let Ok(n) = rest.parse::<usize>() {
                return Ok(Budget::SlotsPerLayer(n));
            }
            return parse_size(rest)
                .map(Budget::BytesPerLayer)
                .map_err(|e| err(e.reason));
        }
        let digits = lower.strip_suffix("slots").unwrap_or(&lower).trim();
        if let Ok(n) = digits.parse::<usize>() {
            return Ok(Budget::SlotsPerLayer(n));
        }
        // A byte budget needs its unit: a bare number is a slot count.
        if !lower.ends_with(|c: char| c.is_ascii_alphabetic()) {
            return Err(err(
                "not a slot count (a whole number) or a byte size with a unit".into(),
            ));
        }
        parse_size(&lower)
            .map(Budget::BytesGlobal)
            .map_err(|e| err(e.reason))
    }

    /// A byte budget of `bytes` shared as `pool` says over `moe_layers` layers.
    pub fn from_bytes(bytes: u64, pool: Pool, moe_layers: usize) -> Budget {
        match pool {
            Pool::Global => Budget::BytesGlobal(bytes),
            Pool::PerLayer => Budget::BytesPerLayer(bytes / moe_layers.max(1) as u64),
        }
    }

    /// True if every layer has its own pool.
    pub fn per_layer(&self) -> bool {
        !matches!(self, Budget::BytesGlobal(_))
    }

    /// The slot count of [`Budget::SlotsPerLayer`].
    pub fn slots(&self) -> Option<usize> {
        match self {
            Budget::SlotsPerLayer(n) => Some(*n),
            _ => None,
        }
    }

    /// The byte count of a byte budget (per layer or global).
    pub fn bytes(&self) -> Option<u64> {
        match self {
            Budget::BytesPerLayer(b) | Budget::BytesGlobal(b) => Some(*b),
            _ => None,
        }
    }

    /// Capacity of one pool in budget units (slots or bytes).
    pub(crate) fn pool_capacity(&self) -> u64 {
        match self {
            Budget::Unlimited => u64::MAX,
            Budget::SlotsPerLayer(n) => *n as u64,
            Budget::BytesPerLayer(b) | Budget::BytesGlobal(b) => *b,
        }
    }

    /// Budget units charged for an expert of `size` bytes.
    #[inline]
    pub(crate) fn cost(&self, size: u64) -> u64 {
        match self {
            Budget::SlotsPerLayer(_) => 1,
            _ => size,
        }
    }

    /// `slots` or `bytes`.
    pub(crate) fn unit(&self) -> &'static str {
        match self {
            Budget::SlotsPerLayer(_) => "slots",
            _ => "bytes",
        }
    }
}

impl fmt::Display for Budget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Budget::Unlimited => f.write_str("unlimited"),
            Budget::SlotsPerLayer(n) => write!(f, "{n}"),
            Budget::BytesPerLayer(b) => write!(f, "{}/layer", format_bytes(*b)),
            Budget::BytesGlobal(b) => f.write_str(&format_bytes(*b)),
        }
    }
}

impl FromStr for Budget {
    type Err = BudgetError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Budget::parse(s)
    }
}

impl TryFrom<String> for Budget {
    type Error = BudgetError;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        Budget::parse(&s)
    }
}

impl From<Budget> for String {
    fn from(b: Budget) -> String {
        b.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("512MiB").unwrap(), 512 << 20);
        assert_eq!(parse_size("2GB").unwrap(), 2_000_000_000);
        assert_eq!(parse_size("2g").unwrap(), 2_000_000_000);
        assert_eq!(parse_size("1.5 KiB").unwrap(), 1536);
        assert_eq!(parse_size("77").unwrap(), 77);
        assert!(parse_size("12 parsecs")
            .unwrap_err()
            .to_string()
            .contains("unknown size unit"));
        assert!(parse_size("MiB").is_err());
        assert!(parse_size("-3GiB")
            .unwrap_err()
            .to_string()
            .contains("negative"));
        // Overflow is an error, never a silent "unlimited".
        for huge in [
            "99999999999999999999999GiB",
            "99999999999999999999999",
            "17179869184GiB",
            "1e300",
        ] {
            assert!(parse_size(huge).is_err(), "{huge} accepted");
        }
    }

    #[test]
    fn exact_format_parses_back() {
        for b in [
            0u64,
            1,
            999,
            1000,
            1024,
            1536 << 20,
            2_000_000_000,
            u64::MAX,
        ] {
            assert_eq!(parse_size(&format_bytes(b)).unwrap(), b, "{b}");
        }
        assert_eq!(format_bytes(512 << 20), "512MiB");
        assert_eq!(human_bytes(13_270_000), "13.27 MB (12.66 MiB)");
    }

    #[test]
    fn budget_strings_round_trip() {
        for (given, canonical, parsed) in [
            ("unlimited", "unlimited", Budget::Unlimited),
            ("8", "8", Budget::SlotsPerLayer(8)),
            ("8slots", "8", Budget::SlotsPerLayer(8)),
            ("16/layer", "16", Budget::SlotsPerLayer(16)),
            (
                "512MiB/layer",
                "512MiB/layer",
                Budget::BytesPerLayer(512 << 20),
            ),
            ("1.5GiB", "1536MiB", Budget::BytesGlobal(1536 << 20)),
            ("2GB", "2GB", Budget::BytesGlobal(2_000_000_000)),
            ("1000b", "1KB", Budget::BytesGlobal(1000)),
            ("4 KiB", "4KiB", Budget::BytesGlobal(4096)),
            ("100b", "100B", Budget::BytesGlobal(100)),
        ] {
            let b = Budget::parse(given).unwrap();
            assert_eq!(b, parsed, "{given}");
            assert_eq!(b.to_string(), canonical, "{given}");
            assert_eq!(Budget::parse(canonical).unwrap(), b);
        }
        for bad in [
            "",
            "lots",
            "12XB",
            "-3",
            "1.5",
            "99999999999999999999999GiB",
        ] {
            assert!(Budget::parse(bad).is_err(), "{bad} accepted");
        }
        let json = serde_json::to_string(&Budget::BytesPerLayer(1 << 30)).unwrap();
        assert_eq!(json, "\"1GiB/layer\"");
        assert_eq!(
            Budget::from_bytes(300, Pool::PerLayer, 3),
            Budget::BytesPerLayer(100)
        );
    }
}
