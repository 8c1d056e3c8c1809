//! PostgreSQL WAL positions: the source position every layer records.

use crate::error::{Error, Result};

/// A WAL position (log sequence number), printed as PostgreSQL does: `16/B374D848`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Lsn(pub u64);

impl Lsn {
    /// Parse PostgreSQL's `X/Y` text form.
    pub fn parse(text: &str) -> Result<Self> {
        let bad = || Error::BadLsn { text: text.to_string() };
        let (hi, lo) = text.split_once('/').ok_or_else(bad)?;
        let hi = u64::from_str_radix(hi, 16).map_err(|_| bad())?;
        let lo = u64::from_str_radix(lo, 16).map_err(|_| bad())?;
        if hi > u64::from(u32::MAX) || lo > u64::from(u32::MAX) {
            return Err(bad());
        }
        Ok(Lsn((hi << 32) | lo))
    }
}

impl Lsn {
    /// The position as the layers store it: Delta `txn` versions and the `_acme/` manifests
    /// hold a signed 64-bit integer (WAL positions stay far below 2^63).
    pub fn as_stored(self) -> i64 {
        self.0 as i64
    }

    /// A position as the layers store it (see [`Lsn::as_stored`]).
    pub fn from_stored(stored: i64) -> Self {
        Lsn(stored.max(0) as u64)
    }
}

impl std::fmt::Display for Lsn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:X}/{:X}", self.0 >> 32, self.0 & 0xffff_ffff)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lsn_round_trips_through_text() {
        let lsn = Lsn::parse("16/B374D848").expect("parses");
        assert_eq!(lsn.0, (0x16 << 32) | 0xB374_D848);
        assert_eq!(lsn.to_string(), "16/B374D848");
        assert!(Lsn::parse("nope").is_err());
    }
}
