//! Two byte strings in one stored key, unambiguous whatever bytes they hold:
//! `<tag> <first length u32 BE> <first> <second>`. Threshold progress and segment members use it.

pub(super) fn join(tag: &[u8], first: &[u8], second: &[u8]) -> Box<[u8]> {
    let length = u32::try_from(first.len()).unwrap_or(u32::MAX);
    let mut bytes = Vec::with_capacity(tag.len() + 4 + first.len() + second.len());
    bytes.extend_from_slice(tag);
    bytes.extend_from_slice(&length.to_be_bytes());
    bytes.extend_from_slice(first);
    bytes.extend_from_slice(second);
    bytes.into_boxed_slice()
}

/// The two parts of [`join`]'s bytes after the tag.
#[cfg(test)]
pub(super) fn split(bytes: &[u8]) -> Option<(&[u8], &[u8])> {
    let length = u32::from_be_bytes(bytes.get(..4)?.try_into().ok()?) as usize;
    Some((bytes.get(4..4 + length)?, bytes.get(4 + length..)?))
}
