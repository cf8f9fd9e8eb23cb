//! A restore that takes long does not hold the group up. Instance a is given every partition
//! and its restore runs on (as one of a large changelog would); instance b joins meanwhile.
//! The consumer thread of a keeps polling, so it sees the rebalance at once, stops its restore
//! and hands partitions over: b gets its share within seconds, not once a's restore has ended
//! (before, the restore ran inside the rebalance callback, and the group waited for it).
//! librdkafka's mock cluster is the broker; the handler stands in for nsm's pipeline.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nsm_core::config::{DeadLetterOnFailure, KafkaProperties, StartFrom};
use nsm_core::event::RecordMeta;
use nsm_core::PartitionKey;
use nsm_kafka::{
    run_consumer, ClientSettings, ConsumerOptions, DeadLetterStats, Disposition, HandlerError,
    PartitionHandler, PartitionLag, Restore,
};

const TOPIC: &str = "events";
/// How long the first restore would run if nothing stopped it.
const SLOW_RESTORE: Duration = Duration::from_secs(40);

#[derive(Default)]
struct Seen {
    /// Partitions owned now (restored and assigned).
    owned: Mutex<Vec<PartitionKey>>,
    restores_started: AtomicUsize,
    /// Restores stopped by their flag before they ended.
    restores_cancelled: AtomicUsize,
}

struct Handler {
    seen: Arc<Seen>,
    /// Whether this instance's first restore is the slow one.
    slow_first: bool,
}

impl PartitionHandler for Handler {
    type Restored = Vec<PartitionKey>;

    fn start_restore(
        &mut self,
        partitions: &[PartitionKey],
    ) -> Result<Restore<Self::Restored>, HandlerError> {
        let first = self.seen.restores_started.fetch_add(1, Ordering::SeqCst) == 0;
        let slow = first && self.slow_first;
        let partitions = partitions.to_vec();
        let seen = self.seen.clone();
        Ok(Box::new(move |cancel: &AtomicBool| {
            let started = Instant::now();
            while slow && started.elapsed() < SLOW_RESTORE {
                if cancel.load(Ordering::Relaxed) {
                    seen.restores_cancelled.fetch_add(1, Ordering::SeqCst);
                    return Err(HandlerError("cancelled".into()));
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            Ok(partitions)
        }))
    }

    fn finish_restore(
        &mut self,
        restored: Self::Restored,
    ) -> Result<Vec<Option<i64>>, HandlerError> {
        let offsets = vec![None; restored.len()];
        self.seen.owned.lock().expect("owned").extend(restored);
        Ok(offsets)
    }

    fn revoked(&mut self, partitions: &[PartitionKey]) -> Result<(), HandlerError> {
        self.abandoned(partitions);
        Ok(())
    }

    fn abandoned(&mut self, partitions: &[PartitionKey]) {
        self.seen
            .owned
            .lock()
            .expect("owned")
            .retain(|key| !partitions.contains(key));
    }

    fn process(&mut self, _: &PartitionKey, _: i64, _: &[u8], _: &dyn RecordMeta) -> Disposition {
        Disposition::Done
    }

    fn checkpoint(&mut self) -> Result<Vec<(PartitionKey, i64)>, HandlerError> {
        Ok(Vec::new())
    }

    fn tick(&mut self) {}

    fn lag(&mut self, _: Vec<PartitionLag>) {}
}

fn start(
    brokers: &str,
    slow_first: bool,
) -> (
    Arc<Seen>,
    Arc<AtomicBool>,
    std::thread::JoinHandle<Result<(), nsm_kafka::KafkaError>>,
) {
    let mut properties = KafkaProperties::default();
    properties.insert("session.timeout.ms", "6000");
    properties.insert("heartbeat.interval.ms", "500");
    properties.insert("max.poll.interval.ms", "6000");
    let options = ConsumerOptions {
        client: ClientSettings {
            brokers: brokers.to_string(),
            properties,
        },
        topics: vec![TOPIC.to_string()],
        group_id: "long-restore".into(),
        dead_letter_topic: "events-dlq".into(),
        dead_letter_on_failure: DeadLetterOnFailure::Hold,
        checkpoint_interval: Duration::from_millis(200),
        start_from: StartFrom::Earliest,
        repartition_topic: None,
    };
    let seen = Arc::new(Seen::default());
    let stop = Arc::new(AtomicBool::new(false));
    let handler = Handler {
        seen: seen.clone(),
        slow_first,
    };
    let thread_stop = stop.clone();
    let thread = std::thread::spawn(move || {
        run_consumer(
            &options,
            handler,
            Arc::new(DeadLetterStats::default()),
            thread_stop,
        )
    });
    (seen, stop, thread)
}

fn owned(seen: &Seen) -> usize {
    seen.owned.lock().expect("owned").len()
}

fn wait_until(what: &str, timeout: Duration, mut done: impl FnMut() -> bool) -> Duration {
    let started = Instant::now();
    while !done() {
        assert!(
            started.elapsed() < timeout,
            "{what}: not within {timeout:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    started.elapsed()
}

#[test]
fn a_long_restore_is_stopped_by_the_next_rebalance_instead_of_holding_the_group() {
    let cluster = nsm_kafka::mock::start(&[(TOPIC, 4), ("events-dlq", 1)]).expect("mock cluster");
    let brokers = cluster.bootstrap_servers();
    let (a, a_stop, a_thread) = start(&brokers, true);
    wait_until("a's restore to start", Duration::from_secs(30), || {
        a.restores_started.load(Ordering::SeqCst) > 0
    });
    let (b, b_stop, b_thread) = start(&brokers, false);
    let taken = wait_until(
        "a and b to share the four partitions",
        SLOW_RESTORE / 2,
        || owned(&a) + owned(&b) == 4 && owned(&a) > 0 && owned(&b) > 0,
    );
    eprintln!("b joined; the partitions were shared {taken:?} later");
    assert_eq!(
        a.restores_cancelled.load(Ordering::SeqCst),
        1,
        "a's slow restore was stopped by the rebalance"
    );
    for (stop, thread) in [(a_stop, a_thread), (b_stop, b_thread)] {
        stop.store(true, Ordering::SeqCst);
        thread.join().expect("consumer thread").expect("consumer");
    }
}
