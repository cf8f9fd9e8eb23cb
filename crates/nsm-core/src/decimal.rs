//! Exact fixed-point numbers for sums.
//!
//! Floating-point addition depends on order, and events arrive out of order, are split across
//! partitions and are replayed after restarts. Sums are therefore kept as integers of
//! nano-units (1e-9): addition is associative, so every order gives the same exact total, equal
//! to a batch recomputation. JSON number text is parsed directly, never through `f64`.

/// Number of decimal places kept; digits beyond are rounded half to even.
pub const SCALE_DIGITS: u32 = 9;
const SCALE: i128 = 1_000_000_000;

/// A decimal number stored as an integer count of 1e-9 units.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Decimal(pub i128);

/// Why a number could not be read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DecimalError {
    /// Not a JSON number.
    Syntax,
    /// Larger than about 1.7e29 in magnitude.
    OutOfRange,
}

impl Decimal {
    pub const ZERO: Decimal = Decimal(0);

    pub fn from_integer(value: i64) -> Decimal {
        Decimal(i128::from(value) * SCALE)
    }

    pub fn from_count(value: u64) -> Decimal {
        Decimal(i128::from(value) * SCALE)
    }

    /// Parses JSON number syntax (`-12.5`, `3e2`, `0.000000001`).
    pub fn parse(text: &str) -> Result<Decimal, DecimalError> {
        let bytes = text.as_bytes();
        let mut index = 0;
        let negative = bytes.first() == Some(&b'-');
        if negative {
            index += 1;
        }
        // All significant digits, with the decimal exponent they are scaled by.
        let mut digits: Vec<u8> = Vec::with_capacity(24);
        let mut exponent: i64 = 0;
        let integer_start = index;
        while index < bytes.len() && bytes[index].is_ascii_digit() {
            digits.push(bytes[index] - b'0');
            index += 1;
        }
        if index == integer_start {
            return Err(DecimalError::Syntax);
        }
        if index < bytes.len() && bytes[index] == b'.' {
            index += 1;
            let fraction_start = index;
            while index < bytes.len() && bytes[index].is_ascii_digit() {
                digits.push(bytes[index] - b'0');
                exponent -= 1;
                index += 1;
            }
            if index == fraction_start {
                return Err(DecimalError::Syntax);
            }
        }
        if index < bytes.len() && (bytes[index] == b'e' || bytes[index] == b'E') {
            index += 1;
            let exponent_text = &text[index..];
            let explicit: i64 = exponent_text.parse().map_err(|_| DecimalError::Syntax)?;
            if explicit.abs() > 1_000 {
                // Far beyond both our range and our precision: zero, or too large.
                let all_zero = digits.iter().all(|digit| *digit == 0);
                return if explicit < 0 || all_zero {
                    Ok(Decimal::ZERO)
                } else {
                    Err(DecimalError::OutOfRange)
                };
            }
            exponent += explicit;
            index = bytes.len();
        }
        if index != bytes.len() {
            return Err(DecimalError::Syntax);
        }
        let value = scale_digits(&digits, exponent + i64::from(SCALE_DIGITS))?;
        Ok(Decimal(if negative { -value } else { value }))
    }

    pub fn checked_add(self, other: Decimal) -> Option<Decimal> {
        self.0.checked_add(other.0).map(Decimal)
    }

    /// The value as `f64`, for exposition only: never fed back into arithmetic.
    pub fn to_f64(self) -> f64 {
        let whole = (self.0 / SCALE) as f64;
        let fraction = (self.0 % SCALE) as f64 / SCALE as f64;
        whole + fraction
    }
}

/// Turns `digits * 10^exponent` into an integer, rounding half to even when the exponent is
/// negative.
fn scale_digits(digits: &[u8], exponent: i64) -> Result<i128, DecimalError> {
    let kept_len = if exponent >= 0 {
        digits.len()
    } else {
        digits
            .len()
            .saturating_sub(exponent.unsigned_abs() as usize)
    };
    let mut value: i128 = 0;
    for digit in &digits[..kept_len] {
        value = value
            .checked_mul(10)
            .and_then(|v| v.checked_add(i128::from(*digit)))
            .ok_or(DecimalError::OutOfRange)?;
    }
    if exponent > 0 {
        for _ in 0..exponent {
            if value == 0 {
                break;
            }
            value = value.checked_mul(10).ok_or(DecimalError::OutOfRange)?;
        }
        return Ok(value);
    }
    let dropped = &digits[kept_len..];
    // Digits dropped beyond what the slice holds are zeros (the exponent reached past them).
    if let Some((first, rest)) = dropped.split_first() {
        let above_half = *first > 5 || (*first == 5 && rest.iter().any(|digit| *digit != 0));
        let exactly_half = *first == 5 && rest.iter().all(|digit| *digit == 0);
        if above_half || (exactly_half && value % 2 == 1) {
            value = value.checked_add(1).ok_or(DecimalError::OutOfRange)?;
        }
    }
    Ok(value)
}

impl std::fmt::Display for Decimal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let sign = if self.0 < 0 { "-" } else { "" };
        let magnitude = self.0.unsigned_abs();
        let whole = magnitude / SCALE as u128;
        let fraction = magnitude % SCALE as u128;
        if fraction == 0 {
            return write!(f, "{sign}{whole}");
        }
        let fraction_text = format!("{fraction:09}");
        write!(f, "{sign}{whole}.{}", fraction_text.trim_end_matches('0'))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Decimal {
        Decimal::parse(text).expect("valid number")
    }

    #[test]
    fn parses_integers_fractions_and_exponents_exactly() {
        assert_eq!(parse("19.99"), Decimal(19_990_000_000));
        assert_eq!(parse("-0.5"), Decimal(-500_000_000));
        assert_eq!(parse("3e2"), Decimal::from_integer(300));
        assert_eq!(parse("1.5E-3"), Decimal(1_500_000));
        assert_eq!(parse("0"), Decimal::ZERO);
        assert_eq!(parse("0.000000001"), Decimal(1));
    }

    #[test]
    fn rounds_half_to_even_beyond_nine_places() {
        assert_eq!(parse("0.0000000005"), Decimal(0));
        assert_eq!(parse("0.0000000015"), Decimal(2));
        assert_eq!(parse("0.00000000051"), Decimal(1));
        assert_eq!(parse("1e-2000"), Decimal::ZERO);
    }

    #[test]
    fn sums_are_independent_of_order() {
        let values = ["0.1", "0.2", "0.3", "1e10", "-1e10", "19.99"];
        let forward = values
            .iter()
            .fold(Decimal::ZERO, |acc, v| Decimal(acc.0 + parse(v).0));
        let backward = values
            .iter()
            .rev()
            .fold(Decimal::ZERO, |acc, v| Decimal(acc.0 + parse(v).0));
        assert_eq!(forward, backward);
        assert_eq!(forward.to_string(), "20.59");
    }

    #[test]
    fn rejects_what_json_would_reject_and_huge_values() {
        for bad in ["", "-", "1.", ".5", "1e", "abc", "1.2.3", "+1"] {
            assert_eq!(Decimal::parse(bad), Err(DecimalError::Syntax), "{bad}");
        }
        assert_eq!(Decimal::parse("1e40"), Err(DecimalError::OutOfRange));
        assert_eq!(Decimal::parse("1e5000"), Err(DecimalError::OutOfRange));
    }
}
