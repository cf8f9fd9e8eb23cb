//! A metric added to a partition with state, backfilled over the partition's history by an
//! engine keeping only it, and swapped in (docs/design/backfill.md).

use std::collections::BTreeSet;

use super::*;

const WEEKLY_PAYERS: &str = "name = \"weekly_payers\"\nowner = \"team\"\nkind = \"distinct\"\n\
     field = \"user_id\"\nwhere = { event = \"payment\" }\nwindow = \"1w\"";

/// The history: messages and payments of 7 users, and a payment whose amount is no number,
/// which the revenue metric refuses: the event counts nowhere, not even as a payer.
fn history() -> Vec<Vec<u8>> {
    let mut events: Vec<Vec<u8>> = (0..40)
        .map(|n| {
            let name = if n % 3 == 0 {
                "payment"
            } else {
                "message_sent"
            };
            event(name, &format!("user-{}", n % 7), n)
        })
        .collect();
    let time = NOW - 3_600_000 + 10 * 60_000;
    events.insert(
        12,
        format!(r#"{{"event":"payment","user_id":"user-9","timestamp":{time},"amount":"x"}}"#)
            .into_bytes(),
    );
    events
}

/// Opens a store at `dir` with `plan`, takes partition 0, applies `events` from `offset` with
/// an engine of `engine_plan`, and writes them.
fn apply_and_write(
    dir: &Path,
    plan: &Plan,
    engine_plan: &Plan,
    offset: i64,
    events: &[Vec<u8>],
) -> Store {
    let store = Store::open(dir, plan, &options()).expect("open");
    adopt(&store, 0, &[]);
    let mut engine = engine_on(&store, engine_plan);
    engine.restore_partition(key(0), store.load_partition(&key(0)).expect("load"));
    for (index, payload) in events.iter().enumerate() {
        engine.apply(&key(0), offset + index as i64, payload, NOW);
    }
    store.write(&engine.take_changes()).expect("write");
    store
}

fn values_after_restore(store: &Store, plan: &Plan) -> Vec<MetricValues> {
    let mut engine = engine_on(store, plan);
    engine.restore_partition(key(0), store.load_partition(&key(0)).expect("load"));
    engine.metric_values(NOW)
}

#[test]
fn a_metric_backfilled_over_the_history_and_swapped_in_equals_one_there_from_the_start() {
    let events = history();
    let before = plan_from(CONFIG);
    let after = plan_with_input(WEEKLY_PAYERS);
    let added = after.metric_index("weekly_payers").expect("added");

    // Always there: the whole history with the metric.
    let always = tempfile::tempdir().expect("tempdir");
    let reference = apply_and_write(always.path(), &after, &after, 0, &events);
    let expected = values_after_restore(&reference, &after);
    assert_eq!(expected[added].current.value, AggValue::Distinct(7));

    // Live: the first 25 events before the metric was added, the rest after.
    let live_dir = tempfile::tempdir().expect("tempdir");
    drop(apply_and_write(
        live_dir.path(),
        &before,
        &before,
        0,
        &events[..25],
    ));
    let live = apply_and_write(live_dir.path(), &after, &after, 25, &events[25..]);
    let partial = values_after_restore(&live, &after);
    assert!(partial[added].current.partial, "added late: partial");
    assert_ne!(partial[added].current.value, expected[added].current.value);

    // The backfill reads the history with every metric validating, only the added one kept.
    let backfill_dir = tempfile::tempdir().expect("tempdir");
    let backfill = apply_and_write(
        backfill_dir.path(),
        &after,
        &after.clone().keeping_only(&[added]),
        0,
        &events,
    );
    let kept: BTreeSet<usize> = backfill
        .load_partition(&key(0))
        .expect("load")
        .windows
        .iter()
        .map(|window| window.metric)
        .collect();
    assert_eq!(kept, BTreeSet::from([added]), "only the added metric kept");

    live.replace_metric(&key(0), "weekly_payers", &backfill, None)
        .expect("swap");
    assert!(live.unfinished_swaps(&key(0)).expect("swaps").is_empty());
    let swapped = values_after_restore(&live, &after);
    assert_eq!(
        swapped, expected,
        "every metric as if it had always been there"
    );
    assert!(!swapped[added].current.partial);
    // Its members came too: a payer of the history is no new one.
    let mut engine = engine_on(&live, &after);
    engine.restore_partition(key(0), live.load_partition(&key(0)).expect("load"));
    feed(&mut engine, 0, 41, &[event("payment", "user-3", 41)]);
    assert_eq!(
        engine.metric_values(NOW)[added].current.value,
        AggValue::Distinct(7)
    );
    drop(engine);

    // A swap cut short (its marker left, as a crash between its batches leaves it) is
    // given up at the next take: the metric starts again, partial, to be backfilled again.
    let marker = crate::swap::swap_key(&partition_prefix(&key(0)), "weekly_payers");
    live.db
        .put_cf(live.cf(CF_FINGERPRINTS), marker, [])
        .expect("marker");
    assert_eq!(
        live.unfinished_swaps(&key(0)).expect("swaps"),
        ["weekly_payers"]
    );
    assert_eq!(
        live.abandon_unfinished_swaps(&key(0)).expect("abandon"),
        ["weekly_payers"]
    );
    assert!(live.unfinished_swaps(&key(0)).expect("swaps").is_empty());
    let snapshot = live.load_partition(&key(0)).expect("load");
    assert_eq!(
        snapshot
            .metric_since
            .iter()
            .map(|(metric, _)| *metric)
            .collect::<Vec<_>>(),
        [added],
        "backfilled again at the next take"
    );
    let abandoned = values_after_restore(&live, &after);
    assert!(abandoned[added].current.partial);
    assert_eq!(abandoned[added].current.value, AggValue::Distinct(0));
    assert_eq!(abandoned[0], expected[0], "the other metrics untouched");
}
