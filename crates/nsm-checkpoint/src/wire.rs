//! Byte primitives shared by the frame, body and local layouts: LEB128 varints, varint-length
//! prefixed byte strings and fixed big-endian integers.
//!
//! Decoding never trusts a length: every read checks what is left first, so a corrupt or
//! foreign record is a [`DecodeError`], never a panic or a huge allocation.

/// Why bytes could not be read in the layout expected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("truncated: {needed} more bytes needed, {left} left")]
    Truncated { needed: u64, left: usize },
    #[error("a varint runs past ten bytes")]
    VarintTooLong,
    #[error("format version {found} is not {expected}, the one this build reads")]
    UnknownFormat { found: u8, expected: u8 },
    #[error("unknown record kind {0:#04x}")]
    UnknownRecordKind(u8),
    #[error("{0} bytes follow the end of the layout")]
    TrailingBytes(usize),
    #[error("shard {shard} is not below the shard count {shards}")]
    ShardOutOfRange { shard: u64, shards: u32 },
    #[error("{what} is {found}, out of range")]
    OutOfRange { what: &'static str, found: u64 },
}

pub(crate) fn put_varint(out: &mut Vec<u8>, mut value: u64) {
    while value >= 0x80 {
        out.push((value as u8 & 0x7f) | 0x80);
        value >>= 7;
    }
    out.push(value as u8);
}

/// The bytes `put_varint` writes for `value`.
pub(crate) fn varint_len(value: u64) -> usize {
    (64 - (value | 1).leading_zeros() as usize).div_ceil(7)
}

pub(crate) fn put_bytes(out: &mut Vec<u8>, bytes: &[u8]) {
    put_varint(out, bytes.len() as u64);
    out.extend_from_slice(bytes);
}

/// A cursor over bytes being decoded.
#[derive(Debug, Clone)]
pub(crate) struct Reader<'a> {
    rest: &'a [u8],
}

impl<'a> Reader<'a> {
    pub(crate) fn new(bytes: &'a [u8]) -> Self {
        Reader { rest: bytes }
    }

    pub(crate) fn take(&mut self, len: u64) -> Result<&'a [u8], DecodeError> {
        let truncated = DecodeError::Truncated {
            needed: len,
            left: self.rest.len(),
        };
        let len = usize::try_from(len).map_err(|_| truncated.clone())?;
        if len > self.rest.len() {
            return Err(truncated);
        }
        let (taken, rest) = self.rest.split_at(len);
        self.rest = rest;
        Ok(taken)
    }

    pub(crate) fn u8(&mut self) -> Result<u8, DecodeError> {
        Ok(self.take(1)?[0])
    }

    pub(crate) fn u32_be(&mut self) -> Result<u32, DecodeError> {
        let mut bytes = [0; 4];
        bytes.copy_from_slice(self.take(4)?);
        Ok(u32::from_be_bytes(bytes))
    }

    pub(crate) fn u64_be(&mut self) -> Result<u64, DecodeError> {
        let mut bytes = [0; 8];
        bytes.copy_from_slice(self.take(8)?);
        Ok(u64::from_be_bytes(bytes))
    }

    pub(crate) fn varint(&mut self) -> Result<u64, DecodeError> {
        let mut value = 0u64;
        for index in 0..10 {
            let byte = self.u8()?;
            let bits = u64::from(byte & 0x7f);
            if index == 9 && bits > 1 {
                return Err(DecodeError::VarintTooLong);
            }
            value |= bits << (7 * index);
            if byte & 0x80 == 0 {
                return Ok(value);
            }
        }
        Err(DecodeError::VarintTooLong)
    }

    /// A count of items that each take at least one byte: refused when more than the bytes
    /// left, so a corrupt count never sizes an allocation.
    pub(crate) fn count(&mut self, what: &'static str) -> Result<u64, DecodeError> {
        let found = self.varint()?;
        if found > self.rest.len() as u64 {
            return Err(DecodeError::OutOfRange { what, found });
        }
        Ok(found)
    }

    pub(crate) fn bytes(&mut self) -> Result<&'a [u8], DecodeError> {
        let len = self.varint()?;
        self.take(len)
    }

    pub(crate) fn format(&mut self, expected: u8) -> Result<(), DecodeError> {
        let found = self.u8()?;
        if found != expected {
            return Err(DecodeError::UnknownFormat { found, expected });
        }
        Ok(())
    }

    pub(crate) fn finish(self) -> Result<(), DecodeError> {
        if self.rest.is_empty() {
            Ok(())
        } else {
            Err(DecodeError::TrailingBytes(self.rest.len()))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_varints_length_is_known_before_it_is_written() {
        for value in [0, 1, 127, 128, 16_383, 16_384, u64::MAX / 2, u64::MAX] {
            let mut out = Vec::new();
            put_varint(&mut out, value);
            assert_eq!(varint_len(value), out.len(), "{value}");
        }
    }

    #[test]
    fn varints_round_trip_at_every_length() {
        for value in [
            0,
            1,
            127,
            128,
            300,
            16_383,
            16_384,
            u64::from(u32::MAX),
            u64::MAX,
        ] {
            let mut out = Vec::new();
            put_varint(&mut out, value);
            assert_eq!(
                out.len(),
                (64 - value.leading_zeros()).max(1).div_ceil(7) as usize
            );
            let mut reader = Reader::new(&out);
            assert_eq!(reader.varint(), Ok(value));
            assert!(reader.finish().is_ok());
        }
    }

    #[test]
    fn an_eleven_byte_varint_is_refused() {
        let bytes = [0xff; 11];
        assert_eq!(
            Reader::new(&bytes).varint(),
            Err(DecodeError::VarintTooLong)
        );
    }

    #[test]
    fn a_length_beyond_the_bytes_is_refused_without_allocating() {
        let mut out = Vec::new();
        put_varint(&mut out, u64::MAX);
        assert!(matches!(
            Reader::new(&out).bytes(),
            Err(DecodeError::Truncated { .. })
        ));
        assert!(matches!(
            Reader::new(&out).count("rows"),
            Err(DecodeError::OutOfRange { .. })
        ));
    }
}
