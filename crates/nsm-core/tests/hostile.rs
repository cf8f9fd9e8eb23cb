//! Replays the fuzz seed corpus (`fuzz/corpus/apply/`) through the engine on stable, with the
//! invariants of the fuzz target (`fuzz/harness.rs`): `make test` proves what the fuzzer
//! found and fixed stays fixed, without needing nightly or libFuzzer.

#[path = "../../../fuzz/harness.rs"]
mod harness;

use std::path::{Path, PathBuf};

use harness::Harness;
use nsm_core::engine::Outcome;
use nsm_core::reject::RejectReason;

fn corpus() -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fuzz/corpus/apply");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|error| panic!("cannot read {}: {error}", dir.display()))
        .map(|entry| entry.expect("corpus entry").path())
        .collect();
    files.sort();
    files
}

fn seed(name: &str) -> Vec<u8> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../fuzz/corpus/apply")
        .join(name);
    std::fs::read(&path).unwrap_or_else(|error| panic!("cannot read {}: {error}", path.display()))
}

/// The outcome of every message of a seed, in order.
fn outcomes(name: &str) -> Vec<Outcome> {
    let mut harness = Harness::new();
    seed(name)
        .split(|byte| *byte == b'\n')
        .map(|message| harness.feed(message))
        .collect()
}

fn reasons(outcomes: &[Outcome]) -> Vec<Option<RejectReason>> {
    outcomes
        .iter()
        .map(|outcome| match outcome {
            Outcome::Rejected(rejection) => Some(rejection.reason),
            _ => None,
        })
        .collect()
}

#[test]
fn every_seed_keeps_the_invariants() {
    let files = corpus();
    assert!(files.len() >= 6, "the seed corpus is in the repository");
    for file in files {
        let data = std::fs::read(&file).expect("seed");
        harness::run(&data);
    }
}

#[test]
fn the_valid_seed_is_applied_with_one_duplicate() {
    let outcomes = outcomes("valid-stream");
    let applied = outcomes
        .iter()
        .filter(|outcome| matches!(outcome, Outcome::Applied { .. }))
        .count();
    let duplicates = outcomes
        .iter()
        .filter(|outcome| matches!(outcome, Outcome::Duplicate { .. }))
        .count();
    assert_eq!(
        (applied, duplicates),
        (outcomes.len() - 1, 1),
        "{outcomes:?}"
    );
}

#[test]
fn every_hostile_message_is_rejected_with_its_reason() {
    use RejectReason::*;
    let outcomes = outcomes("rejected-kinds");
    let expected = [
        InvalidJson,
        NotAnObject,
        NotAnObject,
        NotAnObject,
        NotAnObject,
        InvalidJson,
        MissingTimestamp,
        MissingEventName,
        WrongType,
        InvalidTimestamp,
        InvalidTimestamp,
        // A fractional epoch number is read (1500000000000.0 ms is 2017): too old to count.
        TimestampOutOfRange,
        TimestampOutOfRange,
        TimestampOutOfRange,
        TimestampOutOfRange,
        TimestampOutOfRange,
        TimestampOutOfRange,
        MissingField,
        WrongType,
        WrongType,
        WrongType,
        MissingField,
        WrongType,
    ]
    .map(Some);
    let mut reasons = reasons(&outcomes);
    // Then a valid event sets the watermark, one three hours behind it is late, and an event
    // id that is an object is refused.
    let tail = reasons.split_off(expected.len());
    assert_eq!(reasons, expected, "{outcomes:?}");
    assert_eq!(tail, [None, Some(Late), Some(WrongType)], "{outcomes:?}");
}

#[test]
fn repeated_keys_the_engine_reads_are_rejected_and_others_ignored() {
    let reasons = reasons(&outcomes("repeated-keys"));
    let invalid = Some(RejectReason::InvalidJson);
    assert_eq!(reasons, [invalid, invalid, invalid, None, invalid]);
}

#[test]
fn a_sum_beyond_the_exact_range_is_rejected_not_dropped() {
    let reasons = reasons(&outcomes("sum-overflow"));
    let wrong = Some(RejectReason::WrongType);
    // The week's total and each plan's segment stay within the exact range, or the event is
    // refused whole: +max, +max (total), -max, -max, -max (total), +max, -max (segment team).
    assert_eq!(reasons, [None, wrong, None, None, wrong, None, wrong]);
}

#[test]
fn a_lone_surrogate_escape_is_refused_where_read_and_ignored_elsewhere() {
    let reasons = reasons(&outcomes("lone-surrogates"));
    let invalid = Some(RejectReason::InvalidJson);
    // Unread, read as a distinct member, read as a threshold entity, then a valid pair and an
    // escaped backslash (found by fuzzing: the engine applied the first while no
    // Unicode-checking parser accepts it, and refused the others as "object or array").
    assert_eq!(reasons, [None, invalid, invalid, None]);
}

#[test]
fn numbers_beyond_a_float_are_valid_json_refused_only_where_read() {
    use RejectReason::*;
    let reasons = reasons(&outcomes("huge-numbers"));
    // An unread amount; a summed one; a timestamp; then distinct and threshold members, which
    // are kept as exact text (found by fuzzing: the harness's own reader refused the first).
    assert_eq!(
        reasons,
        [None, Some(WrongType), Some(InvalidTimestamp), None]
    );
}
