//! Byte encodings of keys and values. Integers in keys are big-endian with the sign bit
//! flipped, so RocksDB's byte order is numeric order.

use nsm_core::decimal::Decimal;
use nsm_core::engine::{member_shard_of, AggValue, Epoch, Mark, Progress, Upstream, FUNNEL_WINDOW};
use nsm_core::table::entity_key;
use nsm_core::PartitionKey;

pub fn encode_i64(value: i64) -> [u8; 8] {
    ((value as u64) ^ (1 << 63)).to_be_bytes()
}

pub fn decode_i64(bytes: [u8; 8]) -> i64 {
    (u64::from_be_bytes(bytes) ^ (1 << 63)) as i64
}

/// `<topic> 0x00 <partition i32 BE>`; topic names cannot contain 0x00.
pub fn partition_prefix(key: &PartitionKey) -> Vec<u8> {
    let mut prefix = Vec::with_capacity(key.topic.len() + 5);
    prefix.extend_from_slice(key.topic.as_bytes());
    prefix.push(0);
    prefix.extend_from_slice(&key.partition.to_be_bytes());
    prefix
}

/// The inverse of [`partition_prefix`], with the bytes that follow it.
pub fn split_partition_prefix(key: &[u8]) -> Option<(PartitionKey, &[u8])> {
    let separator = key.iter().position(|byte| *byte == 0)?;
    let topic = std::str::from_utf8(&key[..separator]).ok()?;
    let partition: [u8; 4] = key.get(separator + 1..separator + 5)?.try_into().ok()?;
    Some((
        PartitionKey::new(topic, i32::from_be_bytes(partition)),
        &key[separator + 5..],
    ))
}

pub fn window_metric_prefix(partition_prefix: &[u8], metric: &str) -> Vec<u8> {
    let mut key = Vec::with_capacity(partition_prefix.len() + metric.len() + 9);
    push_metric_prefix(&mut key, partition_prefix, metric);
    key
}

pub fn window_key(partition_prefix: &[u8], metric: &str, start_ms: i64) -> Vec<u8> {
    let mut key = Vec::new();
    entry_key_into(&mut key, partition_prefix, metric, start_ms, &[]);
    key
}

/// Sets `out` to a window's key followed by `entry` (a member, a segment, ...): the same
/// bytes as [`window_key`] then `entry`, built in a buffer the caller reuses, since a
/// checkpoint or a read builds one per entry.
pub fn entry_key_into(
    out: &mut Vec<u8>,
    partition_prefix: &[u8],
    metric: &str,
    start_ms: i64,
    entry: &[u8],
) {
    window_key_into(out, partition_prefix, metric, start_ms, entry.len());
    out.extend_from_slice(entry);
}

/// Sets `out` to a window's key, with room for `more` bytes after it.
fn window_key_into(
    out: &mut Vec<u8>,
    partition_prefix: &[u8],
    metric: &str,
    start_ms: i64,
    more: usize,
) {
    out.clear();
    out.reserve(partition_prefix.len() + metric.len() + 9 + more);
    push_metric_prefix(out, partition_prefix, metric);
    out.extend_from_slice(&encode_i64(start_ms));
}

/// The checkpoint shards of member entries (nsm-core's): a shard is a key range of every place
/// (window, or funnel period), so a checkpoint can read one shard of a partition back.
pub const MEMBER_SHARDS: usize = nsm_core::engine::MEMBER_SHARDS as usize;

/// Bits of a digest that name its checkpoint shard (`nsm_core::engine::member_shard_of`).
const SHARD_BITS: u32 = MEMBER_SHARDS.trailing_zeros();

/// Bytes of the digest that ends a member key (format 8).
const DIGEST_BYTES: usize = 16;

/// The checkpoint shard of a member entry.
#[cfg(test)]
fn member_shard(entry: &[u8]) -> u16 {
    member_shard_of(entity_key(0, entry))
}

/// How many bytes of a member entry name its place before the entry itself: a funnel entry's
/// period (its first 8 bytes), so that deleting the periods before a bound stays one key range;
/// none in any other window.
fn period_len(start_ms: i64, entry_len: usize) -> usize {
    if start_ms == FUNNEL_WINDOW {
        entry_len.min(8)
    } else {
        0
    }
}

/// Sets `out` to the stored key of a member entry (format 8):
/// `<window key> [<funnel period, 8 bytes>] <XXH3-128 digest of the entry, u128 BE>`.
/// The digest is the member index's key of the entry, and the identity of a member: nothing
/// reads a member's bytes back. Its top bits are the checkpoint shard, so a shard of a place is
/// one key range.
pub fn member_key_into(
    out: &mut Vec<u8>,
    partition_prefix: &[u8],
    metric: &str,
    start_ms: i64,
    entry: &[u8],
) {
    let period = &entry[..period_len(start_ms, entry.len())];
    member_key_of_digest(
        out,
        partition_prefix,
        metric,
        start_ms,
        period,
        entity_key(0, entry),
    );
}

/// Sets `out` to the stored key of a member entry known by its digest (as the member index
/// holds it), after `period`: a funnel entry's first 8 bytes, none in any other window.
pub fn member_key_of_digest(
    out: &mut Vec<u8>,
    partition_prefix: &[u8],
    metric: &str,
    start_ms: i64,
    period: &[u8],
    digest: u128,
) {
    window_key_into(out, partition_prefix, metric, start_ms, 8 + DIGEST_BYTES);
    out.extend_from_slice(period);
    out.extend_from_slice(&digest.to_be_bytes());
}

/// Sets `out` to the key of a place as the member index names it (metric, window start and
/// funnel period): its window key, then the period in a funnel window. Its member keys are this
/// place followed by a digest.
pub fn member_place_into(
    out: &mut Vec<u8>,
    partition_prefix: &[u8],
    metric: &str,
    start_ms: i64,
    period: u64,
) {
    window_key_into(out, partition_prefix, metric, start_ms, 8 + DIGEST_BYTES);
    if start_ms == FUNNEL_WINDOW {
        out.extend_from_slice(&period.to_be_bytes());
    }
}

/// Where a member key's window key ends, and the window's start.
fn split_member_key(key: &[u8]) -> Option<(usize, i64)> {
    let (_, rest) = split_partition_prefix(key)?;
    let separator = rest.iter().position(|byte| *byte == 0)?;
    let start: [u8; 8] = rest.get(separator + 1..separator + 9)?.try_into().ok()?;
    Some((key.len() - rest.len() + separator + 9, decode_i64(start)))
}

/// Where the digest of a stored member key (format 8) starts: the length of its place (window
/// key, and a funnel's period).
pub fn member_shard_position(key: &[u8]) -> Option<usize> {
    let (window_end, start_ms) = split_member_key(key)?;
    let period = (key.len() - window_end).checked_sub(DIGEST_BYTES)?;
    let valid = if start_ms == FUNNEL_WINDOW {
        period <= 8
    } else {
        period == 0
    };
    valid.then_some(window_end + period)
}

/// The shard a stored member key (format 8) names.
pub fn stored_member_shard(key: &[u8]) -> Option<u16> {
    let at = member_shard_position(key)?;
    let digest = key.get(at..at + DIGEST_BYTES)?.try_into().ok()?;
    Some(member_shard_of(u128::from_be_bytes(digest)))
}

/// The key range of `shard` in a place (a window key, and a funnel's period).
pub fn member_shard_range(place: &[u8], shard: u16) -> (Vec<u8>, Vec<u8>) {
    let bound = |shard: u16| {
        let mut key = place.to_vec();
        key.extend_from_slice(&(shard << (16 - SHARD_BITS)).to_be_bytes());
        key
    };
    let end = if usize::from(shard) + 1 < MEMBER_SHARDS {
        bound(shard + 1)
    } else {
        prefix_successor(place)
    };
    (bound(shard), end)
}

/// The stored key (format 8) of a member key in format 6's layout, `<window key> <entry>`: the
/// layout of an older nsm's `members` family and of its keyed changelog records.
pub fn current_member_key(legacy: &[u8]) -> Option<Vec<u8>> {
    let (window_end, start_ms) = split_member_key(legacy)?;
    let (prefix, rest) = legacy.split_at(window_end);
    let mut out = Vec::with_capacity(window_end + 8 + DIGEST_BYTES);
    out.extend_from_slice(prefix);
    out.extend_from_slice(&rest[..period_len(start_ms, rest.len())]);
    out.extend_from_slice(&entity_key(0, rest).to_be_bytes());
    Some(out)
}

/// The stored key (format 8) of a stored member key of format 7: format 7's `entries`, and its
/// frames, are read through it.
pub fn current_member_key_of_format_7(key: &[u8]) -> Option<Vec<u8>> {
    current_member_key(&format_7_legacy_key(key)?)
}

/// A stored member key of format 7, `<window key> [<funnel period>] <shard u16 BE> <entry>`, in
/// format 6's layout.
fn format_7_legacy_key(key: &[u8]) -> Option<Vec<u8>> {
    let (window_end, start_ms) = split_member_key(key)?;
    let entry_len = (key.len() - window_end).checked_sub(2)?;
    let shard = window_end + period_len(start_ms, entry_len);
    let mut out = Vec::with_capacity(key.len() - 2);
    out.extend_from_slice(&key[..shard]);
    out.extend_from_slice(&key[shard + 2..]);
    Some(out)
}

/// `<partition prefix> <metric name> 0x00`: the one place the layout of a metric's keys is
/// written down.
fn push_metric_prefix(out: &mut Vec<u8>, partition_prefix: &[u8], metric: &str) {
    out.extend_from_slice(partition_prefix);
    out.extend_from_slice(metric.as_bytes());
    out.push(0);
}

/// The smallest key greater than every key starting with `prefix`.
pub fn prefix_successor(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    // All 0xff: no finite successor; an empty upper bound never occurs for our keys, which
    // always contain a 0x00 separator.
    vec![0xff; prefix.len() + 1]
}

fn encode_optional(out: &mut Vec<u8>, value: Option<i64>) {
    match value {
        Some(value) => {
            out.push(1);
            out.extend_from_slice(&value.to_be_bytes());
        }
        None => {
            out.push(0);
            out.extend_from_slice(&[0; 8]);
        }
    }
}

fn decode_optional(bytes: &[u8]) -> Option<Option<i64>> {
    let flag = *bytes.first()?;
    let value = i64::from_be_bytes(bytes.get(1..9)?.try_into().ok()?);
    match flag {
        0 => Some(None),
        1 => Some(Some(value)),
        _ => None,
    }
}

/// A partition's offsets and time, the value of its meta record (and changelog end marker).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PartitionMeta {
    pub next_offset: Option<i64>,
    pub max_event_ms: Option<i64>,
    /// `None` when read from formats 3 and 4, which kept no watermark apart from the newest
    /// event (the engine takes the newest event then).
    pub event_watermark_ms: Option<i64>,
    pub idle_floor_ms: Option<i64>,
}

/// Formats 3 and 4: offset, newest event, idle floor.
const META_BYTES_FORMAT_4: usize = 27;
/// Format 5 adds the watermark.
const META_BYTES: usize = 36;

pub fn encode_partition_meta(meta: &PartitionMeta) -> Vec<u8> {
    let mut out = Vec::with_capacity(META_BYTES);
    encode_optional(&mut out, meta.next_offset);
    encode_optional(&mut out, meta.max_event_ms);
    encode_optional(&mut out, meta.idle_floor_ms);
    encode_optional(&mut out, meta.event_watermark_ms);
    out
}

pub fn decode_partition_meta(bytes: &[u8]) -> Option<PartitionMeta> {
    if bytes.len() != META_BYTES && bytes.len() != META_BYTES_FORMAT_4 {
        return None;
    }
    Some(PartitionMeta {
        next_offset: decode_optional(&bytes[0..9])?,
        max_event_ms: decode_optional(&bytes[9..18])?,
        idle_floor_ms: decode_optional(&bytes[18..27])?,
        event_watermark_ms: match bytes.get(27..36) {
            Some(watermark) => decode_optional(watermark)?,
            None => None,
        },
    })
}

/// A repartition partition's sources (`nsm_core::engine::Upstream`): each input topic and its
/// partitions, then each source partition's mark.
pub fn encode_upstream(upstream: &Upstream) -> Vec<u8> {
    fn put_text(out: &mut Vec<u8>, text: &str) {
        let len = u16::try_from(text.len()).unwrap_or(u16::MAX);
        out.extend_from_slice(&len.to_be_bytes());
        out.extend_from_slice(&text.as_bytes()[..usize::from(len)]);
    }
    let mut out = Vec::with_capacity(8 + upstream.mark_count() * 64);
    out.extend_from_slice(
        &u32::try_from(upstream.topics.len())
            .unwrap_or(0)
            .to_be_bytes(),
    );
    for (topic, partitions) in &upstream.topics {
        put_text(&mut out, topic);
        out.extend_from_slice(&partitions.to_be_bytes());
    }
    out.extend_from_slice(
        &u32::try_from(upstream.mark_count())
            .unwrap_or(0)
            .to_be_bytes(),
    );
    for (topic, partition, group, mark) in upstream.marks() {
        put_text(&mut out, topic);
        out.extend_from_slice(&partition.to_be_bytes());
        put_text(&mut out, group);
        out.extend_from_slice(&mark.next_offset.to_be_bytes());
        out.extend_from_slice(&mark.epoch.resumed_from.to_be_bytes());
        out.extend_from_slice(&mark.epoch.taken_at_ms.to_be_bytes());
        encode_optional(&mut out, mark.watermark_ms);
        encode_optional(&mut out, mark.clock_ms);
    }
    out
}

pub fn decode_upstream(bytes: &[u8]) -> Option<Upstream> {
    struct Reader<'a>(&'a [u8]);
    impl<'a> Reader<'a> {
        fn take(&mut self, len: usize) -> Option<&'a [u8]> {
            let (head, rest) = (self.0.get(..len)?, self.0.get(len..)?);
            self.0 = rest;
            Some(head)
        }
        fn array<const N: usize>(&mut self) -> Option<[u8; N]> {
            self.take(N)?.try_into().ok()
        }
        fn text(&mut self) -> Option<String> {
            let len = u16::from_be_bytes(self.array()?);
            String::from_utf8(self.take(usize::from(len))?.to_vec()).ok()
        }
        fn optional(&mut self) -> Option<Option<i64>> {
            decode_optional(self.take(9)?)
        }
    }
    let mut reader = Reader(bytes);
    let mut upstream = Upstream::default();
    for _ in 0..u32::from_be_bytes(reader.array()?) {
        let topic = reader.text()?;
        upstream
            .topics
            .insert(topic, u32::from_be_bytes(reader.array()?));
    }
    for _ in 0..u32::from_be_bytes(reader.array()?) {
        let (topic, partition, group) = (
            reader.text()?,
            i32::from_be_bytes(reader.array()?),
            reader.text()?,
        );
        let mark = Mark {
            next_offset: i64::from_be_bytes(reader.array()?),
            epoch: Epoch {
                resumed_from: i64::from_be_bytes(reader.array()?),
                taken_at_ms: i64::from_be_bytes(reader.array()?),
            },
            watermark_ms: reader.optional()?,
            clock_ms: reader.optional()?,
        };
        upstream.insert_mark(&topic, partition, &group, mark);
    }
    reader.0.is_empty().then_some(upstream)
}

const TAG_COUNT: u8 = 1;
const TAG_SUM: u8 = 2;
const TAG_DISTINCT: u8 = 3;
/// Ratios are computed from their parts and never stored by the engine; the tag keeps the
/// codec total.
const TAG_RATIO: u8 = 4;

pub fn encode_window_value(end_ms: i64, value: AggValue) -> Vec<u8> {
    let mut out = Vec::with_capacity(25);
    out.extend_from_slice(&end_ms.to_be_bytes());
    match value {
        AggValue::Count(count) => {
            out.push(TAG_COUNT);
            out.extend_from_slice(&count.to_be_bytes());
        }
        AggValue::Sum(sum) => {
            out.push(TAG_SUM);
            out.extend_from_slice(&sum.0.to_be_bytes());
        }
        AggValue::Distinct(count) => {
            out.push(TAG_DISTINCT);
            out.extend_from_slice(&count.to_be_bytes());
        }
        AggValue::Ratio {
            numerator,
            denominator,
        } => {
            out.push(TAG_RATIO);
            out.extend_from_slice(&numerator.0.to_be_bytes());
            out.extend_from_slice(&denominator.0.to_be_bytes());
        }
    }
    out
}

/// A value of the `segments` family (or a window's without its progress record).
pub fn decode_window_value(bytes: &[u8]) -> Option<(i64, AggValue)> {
    match decode_window_record(bytes)? {
        (end_ms, value, None) => Some((end_ms, value)),
        (_, _, Some(_)) => None,
    }
}

/// A value of the `windows` family: end and value as [`encode_window_value`], then, from
/// format 6, the window's progress record when it keeps one ([`encode_progress`]). Values of
/// older formats end after the value: no record.
pub fn encode_window_record(end_ms: i64, value: AggValue, progress: Option<&Progress>) -> Vec<u8> {
    let mut out = encode_window_value(end_ms, value);
    if let Some(progress) = progress {
        encode_progress(&mut out, progress);
    }
    out
}

pub fn decode_window_record(bytes: &[u8]) -> Option<(i64, AggValue, Option<Progress>)> {
    let end_ms = i64::from_be_bytes(bytes.get(0..8)?.try_into().ok()?);
    let tag = *bytes.get(8)?;
    let payload_len = match tag {
        TAG_COUNT | TAG_DISTINCT => 8,
        TAG_SUM => 16,
        TAG_RATIO => 32,
        _ => return None,
    };
    let payload = bytes.get(9..9 + payload_len)?;
    let value = match tag {
        TAG_COUNT => AggValue::Count(u64::from_be_bytes(payload.try_into().ok()?)),
        TAG_SUM => AggValue::Sum(Decimal(i128::from_be_bytes(payload.try_into().ok()?))),
        TAG_DISTINCT => AggValue::Distinct(u64::from_be_bytes(payload.try_into().ok()?)),
        _ => AggValue::Ratio {
            numerator: Decimal(i128::from_be_bytes(payload[..16].try_into().ok()?)),
            denominator: Decimal(i128::from_be_bytes(payload[16..].try_into().ok()?)),
        },
    };
    let rest = &bytes[9 + payload_len..];
    let progress = if rest.is_empty() {
        None
    } else {
        Some(decode_progress(rest)?)
    };
    Some((end_ms, value, progress))
}

const PROGRESS_COUNTS: u8 = 1;
const PROGRESS_SUMS: u8 = 2;

/// A progress record: a kind byte, the number of steps (LEB128), then each step's count
/// (LEB128) or amount (zigzag LEB128 of its 1e-9 units). Most steps of a count take one or
/// two bytes, so a week of hourly steps is a few hundred bytes.
fn encode_progress(out: &mut Vec<u8>, progress: &Progress) {
    match progress {
        Progress::Counts(counts) => {
            out.push(PROGRESS_COUNTS);
            push_varint(out, counts.len() as u128);
            for count in counts {
                push_varint(out, u128::from(*count));
            }
        }
        Progress::Sums(sums) => {
            out.push(PROGRESS_SUMS);
            push_varint(out, sums.len() as u128);
            for sum in sums {
                push_varint(out, ((sum.0 << 1) ^ (sum.0 >> 127)) as u128);
            }
        }
    }
}

/// The inverse of [`encode_progress`]; `None` for anything else, trailing bytes included.
fn decode_progress(bytes: &[u8]) -> Option<Progress> {
    let (&kind, mut rest) = bytes.split_first()?;
    let steps = usize::try_from(take_varint(&mut rest)?).ok()?;
    // A step takes at least a byte: a damaged length cannot make a huge allocation.
    if steps > rest.len() {
        return None;
    }
    let progress = match kind {
        PROGRESS_COUNTS => Progress::Counts(
            (0..steps)
                .map(|_| u64::try_from(take_varint(&mut rest)?).ok())
                .collect::<Option<_>>()?,
        ),
        PROGRESS_SUMS => Progress::Sums(
            (0..steps)
                .map(|_| {
                    let zigzag = take_varint(&mut rest)?;
                    Some(Decimal((zigzag >> 1) as i128 ^ -((zigzag & 1) as i128)))
                })
                .collect::<Option<_>>()?,
        ),
        _ => return None,
    };
    rest.is_empty().then_some(progress)
}

fn push_varint(out: &mut Vec<u8>, mut value: u128) {
    while value >= 0x80 {
        out.push((value as u8) | 0x80);
        value >>= 7;
    }
    out.push(value as u8);
}

fn take_varint(bytes: &mut &[u8]) -> Option<u128> {
    let mut value = 0u128;
    for shift in (0..128).step_by(7) {
        let (&byte, rest) = bytes.split_first()?;
        *bytes = rest;
        value |= u128::from(byte & 0x7f).checked_shl(shift)?;
        if byte & 0x80 == 0 {
            return Some(value);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_repartition_partitions_sources_round_trip() {
        let mut upstream = Upstream::default();
        upstream.topics.insert("events".into(), 3);
        upstream.topics.insert("other".into(), 1);
        upstream.insert_mark(
            "events",
            2,
            "team_id",
            Mark {
                next_offset: 41,
                epoch: Epoch {
                    resumed_from: 17,
                    taken_at_ms: 1_795_435_200_000,
                },
                watermark_ms: Some(-5),
                clock_ms: None,
            },
        );
        let bytes = encode_upstream(&upstream);
        assert_eq!(decode_upstream(&bytes), Some(upstream));
        assert_eq!(
            decode_upstream(&bytes[..bytes.len() - 1]),
            None,
            "cut short"
        );
        assert_eq!(decode_upstream(&[bytes.as_slice(), &[0]].concat()), None);
    }

    #[test]
    fn signed_integers_sort_numerically_as_bytes() {
        let values = [i64::MIN, -5, -1, 0, 1, 1_700_000_000_000, i64::MAX];
        let encoded: Vec<[u8; 8]> = values.iter().map(|v| encode_i64(*v)).collect();
        assert!(encoded.windows(2).all(|pair| pair[0] < pair[1]));
        assert!(values.iter().all(|v| decode_i64(encode_i64(*v)) == *v));
    }

    #[test]
    fn values_round_trip() {
        for value in [
            AggValue::Count(7),
            AggValue::Sum(Decimal(-12_345)),
            AggValue::Distinct(u64::MAX),
            AggValue::Ratio {
                numerator: Decimal(3),
                denominator: Decimal(-4),
            },
        ] {
            assert_eq!(
                decode_window_value(&encode_window_value(99, value)),
                Some((99, value))
            );
        }
        let meta = PartitionMeta {
            next_offset: Some(10),
            max_event_ms: None,
            event_watermark_ms: Some(7),
            idle_floor_ms: Some(-3),
        };
        assert_eq!(
            decode_partition_meta(&encode_partition_meta(&meta)),
            Some(meta)
        );
        // Formats 3 and 4 wrote no watermark.
        let format_4 = &encode_partition_meta(&meta)[..27];
        assert_eq!(
            decode_partition_meta(format_4),
            Some(PartitionMeta {
                event_watermark_ms: None,
                ..meta
            })
        );
        assert_eq!(decode_window_value(&[1, 2, 3]), None);
    }

    #[test]
    fn progress_records_round_trip_and_older_windows_have_none() {
        let counts = Progress::Counts(vec![0, 1, 127, 128, 300, u64::MAX]);
        let sums = Progress::Sums(vec![
            Decimal::ZERO,
            Decimal(-1),
            Decimal(1_500_000_000),
            Decimal(i128::MIN),
            Decimal(i128::MAX),
        ]);
        for (value, progress) in [
            (AggValue::Count(7), Some(counts.clone())),
            (AggValue::Sum(Decimal(3)), Some(sums)),
            (AggValue::Distinct(2), Some(Progress::Counts(Vec::new()))),
            (AggValue::Count(4), None),
        ] {
            let bytes = encode_window_record(99, value, progress.as_ref());
            assert_eq!(decode_window_record(&bytes), Some((99, value, progress)));
        }
        // A window of format 5 and before: its value alone.
        let older = encode_window_value(5, AggValue::Count(1));
        assert_eq!(
            decode_window_record(&older),
            Some((5, AggValue::Count(1), None))
        );
        // Damaged records are refused, not read short.
        let mut bytes = encode_window_record(1, AggValue::Count(1), Some(&counts));
        bytes.push(0);
        assert_eq!(decode_window_record(&bytes), None);
        bytes.truncate(bytes.len() - 2);
        assert_eq!(decode_window_record(&bytes), None);
        // A segment value never has a record.
        let with_record = encode_window_record(0, AggValue::Count(1), Some(&counts));
        assert_eq!(decode_window_value(&with_record), None);
    }

    #[test]
    fn an_entry_key_is_its_window_key_then_the_entry() {
        let prefix = partition_prefix(&PartitionKey::new("events", 3));
        let mut expected = window_key(&prefix, "weekly_active_users", -5);
        expected.extend_from_slice(b"user-1");
        let mut key = b"left over from the last entry".to_vec();
        entry_key_into(&mut key, &prefix, "weekly_active_users", -5, b"user-1");
        assert_eq!(key, expected);
    }

    #[test]
    fn partition_prefix_round_trips_and_bounds_its_keys() {
        let key = PartitionKey::new("product-events", 11);
        let prefix = partition_prefix(&key);
        let (parsed, rest) = split_partition_prefix(&prefix).expect("parse");
        assert_eq!(parsed, key);
        assert!(rest.is_empty());
        let window = window_key(&prefix, "m", 5);
        let mut member = window.clone();
        member.extend_from_slice(&[0xff, 0xff]);
        assert!(member < prefix_successor(&window));
        assert!(window_key(&prefix, "m", 6) >= prefix_successor(&window));
    }

    #[test]
    fn member_keys_end_in_their_digest_after_their_place_and_are_read_from_older_layouts() {
        let prefix = partition_prefix(&PartitionKey::new("events", 3));
        let mut funnel_entry = 1_800_000_000_000i64.to_be_bytes().to_vec();
        funnel_entry.extend_from_slice(b"\x01ana");
        let cases: [(&str, i64, &[u8]); 5] = [
            ("weekly_active_users", 1_795_000_000_000, b"user-1"),
            ("weekly_active_users", -5, b""),
            ("", 1_795_000_000_000, b"event-id"),
            ("conversion", FUNNEL_WINDOW, &funnel_entry),
            ("conversion", FUNNEL_WINDOW, b"short"),
        ];
        for (metric, start_ms, entry) in cases {
            let mut key = Vec::new();
            member_key_into(&mut key, &prefix, metric, start_ms, entry);
            let window = window_key(&prefix, metric, start_ms);
            let place = window.len()
                + if start_ms == FUNNEL_WINDOW {
                    entry.len().min(8)
                } else {
                    0
                };
            assert!(key.starts_with(&window));
            assert_eq!(&key[window.len()..place], &entry[..place - window.len()]);
            let digest = entity_key(0, entry);
            assert_eq!(key[place..], digest.to_be_bytes());
            assert_eq!(member_shard_position(&key), Some(place));
            // The shard is the digest's top bits: 16 of them make one table shard.
            assert_eq!(stored_member_shard(&key), Some(member_shard(entry)));
            assert_eq!(
                usize::from(member_shard(entry)) >> 4,
                nsm_core::table::EntityTable::shard_of(digest)
            );
            let (start, end) = member_shard_range(&key[..place], member_shard(entry));
            assert!(start <= key && key < end);
            // Format 6's layout, and format 7's (the shard between place and entry), both give
            // the same key.
            let mut legacy = window.clone();
            legacy.extend_from_slice(entry);
            assert_eq!(current_member_key(&legacy).as_deref(), Some(&*key));
            let mut format_7 = key[..place].to_vec();
            format_7.extend_from_slice(&member_shard(entry).to_be_bytes());
            format_7.extend_from_slice(&entry[place - window.len()..]);
            assert_eq!(format_7_legacy_key(&format_7).as_deref(), Some(&*legacy));
            assert_eq!(
                current_member_key_of_format_7(&format_7).as_deref(),
                Some(&*key)
            );
        }
        // The shards of a place are adjacent ranges covering every digest.
        let place = window_key(&prefix, "m", 5);
        let ranges: Vec<_> = (0..MEMBER_SHARDS as u16)
            .map(|shard| member_shard_range(&place, shard))
            .collect();
        assert!(ranges.windows(2).all(|pair| pair[0].1 == pair[1].0));
        assert_eq!(ranges[0].0, [&place[..], &[0, 0]].concat());
        assert_eq!(ranges[MEMBER_SHARDS - 1].1, prefix_successor(&place));
        // A funnel period stays one key range: every digest of a period sorts before the next.
        let mut first = Vec::new();
        let mut next = Vec::new();
        member_key_into(
            &mut first,
            &prefix,
            "conversion",
            FUNNEL_WINDOW,
            &funnel_entry,
        );
        let mut next_period = 1_800_000_000_001i64.to_be_bytes().to_vec();
        next_period.push(0);
        member_key_into(
            &mut next,
            &prefix,
            "conversion",
            FUNNEL_WINDOW,
            &next_period,
        );
        let mut bound = window_key(&prefix, "conversion", FUNNEL_WINDOW);
        bound.extend_from_slice(&1_800_000_000_001i64.to_be_bytes());
        assert!(first < bound && bound <= next);
        assert_eq!(format_7_legacy_key(b"events"), None);
        assert_eq!(member_shard_position(&place), None, "no digest");
    }
}
