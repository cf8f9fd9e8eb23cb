"""The Quix Streams peer of `nsm-bench e2e`: the same topic, on the same broker, read whole by a
Quix Streams application computing, with Quix's own tumbling windows and RocksDB state, two of
the bench config's metrics (crates/nsm-bench/src/workload.rs).

What it computes, and how that differs from nsm:

- messages per day: a tumbling 1-day count of `message_sent` events. Quix groups every window
  by the message key, and the bench keys messages by user, so this is a count per user and
  UTC day; its sum over the users is what nsm's `messages_by_platform` (1d) sums to over its
  platforms. nsm keeps one counter per segment and partition; Quix keeps one per user.
- weekly active users: the exact distinct count of `user_id` over `message_sent` events, a
  week long (nsm's North Star, `weekly_active_users`). Counted per key it would be 1 for
  every user, so the peer counts it as Quix would have to: a tumbling 7-day count per user
  finds each user's first message of a week; those firsts are re-keyed to one key with
  `group_by` (Quix writes them to a repartition topic on the broker and reads them back)
  and a second tumbling 7-day window counts them. Quix's windows start at the Unix epoch, so
  its weeks start on Thursdays at 00:00 UTC where nsm's calendar weeks start on Mondays: the
  counts are of the same kind, not of the same days. The second window keeps a week of grace,
  as the firsts of four input partitions arrive interleaved.

Event time is the event's `timestamp` field, as nsm takes it. Changelog topics are on (Quix's
default; nsm runs with its changelog on too), and so is Quix's 5-second checkpoint.

It talks to the bench on stdin and stdout, one line each way, so the bench can read the
process' CPU from /proc at its first and its last message, as it does for nsm:
  `nsm-bench-peer first` once the first event is processed (then waits for a line);
  `nsm-bench-peer done {json}` once all N events and every first they re-keyed are processed
  (then waits for a line, and stops).
"""

import argparse
import json
import sys
from datetime import timedelta

from quixstreams import Application

DAY = timedelta(days=1)
WEEK = timedelta(days=7)
PROTOCOL = "nsm-bench-peer"


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--brokers", required=True)
    parser.add_argument("--topic", required=True)
    parser.add_argument("--events", type=int, required=True, help="events in the topic")
    parser.add_argument("--group", required=True, help="a consumer group new to the broker")
    parser.add_argument("--state-dir", required=True, help="an empty directory")
    return parser.parse_args()


def tell_bench(line):
    """Writes one line to the bench and waits for its answer: the bench samples /proc meanwhile."""
    print(f"{PROTOCOL} {line}", flush=True)
    sys.stdin.readline()


def event_time(value, _headers, _timestamp, _timestamp_type):
    return value["timestamp"]


class Progress:
    """Counts what the application has processed, and stops it once everything is."""

    def __init__(self, app, input_topic, events):
        self.app = app
        self.input_topic = input_topic
        self.events = events
        self.processed = 0
        self.firsts_sent = 0
        self.firsts_counted = 0
        self.late = 0
        self.weekly_active_users = {}
        self.done = False

    def on_first_of_week(self, _row):
        self.firsts_sent += 1

    def on_weekly_count(self, window):
        self.weekly_active_users[window["start"]] = window["value"]

    def on_late(self, *_args):
        # Counted, so the bench can refuse the run as it refuses nsm's late events; True
        # keeps Quix's own warning in the log.
        self.late += 1
        return True

    def on_message_processed(self, topic, _partition, _offset):
        """Quix calls this once a message went through every branch of the dataframe."""
        if topic == self.input_topic:
            self.processed += 1
            if self.processed == 1:
                tell_bench("first")
        else:
            self.firsts_counted += 1
        if self.processed >= self.events and self.firsts_counted >= self.firsts_sent:
            self.finish()

    def finish(self):
        if self.done:
            return
        self.done = True
        summary = {
            "events": self.processed,
            "firsts": self.firsts_counted,
            "late": self.late,
            "weekly_active_users": {
                str(start): count for start, count in sorted(self.weekly_active_users.items())
            },
        }
        tell_bench("done " + json.dumps(summary))
        self.app.stop()


def build(app, topic, progress):
    events = app.dataframe(topic)
    messages = events.filter(lambda event: event["event"] == "message_sent")

    # Messages per user and UTC day.
    messages.tumbling_window(DAY, name="messages_1d", on_late=progress.on_late).count().current()

    # Each user's first message of a week, re-keyed to one key and counted per week.
    firsts = (
        messages.tumbling_window(WEEK, name="user_week", on_late=progress.on_late)
        .count()
        .current()
        .filter(lambda window: window["value"] == 1)
        .update(progress.on_first_of_week)
    )
    (
        firsts.group_by(lambda _window: "all", name="all_users")
        .tumbling_window(WEEK, grace_ms=WEEK, name="weekly_active_users", on_late=progress.on_late)
        .count()
        .current()
        .update(progress.on_weekly_count)
    )


def main():
    args = parse_args()
    # The application takes the callback when it is made, and Progress needs the application
    # to stop it: the callback looks Progress up when it is called.
    progress = None
    app = Application(
        broker_address=args.brokers,
        consumer_group=args.group,
        auto_offset_reset="earliest",
        state_dir=args.state_dir,
        # As both other readers fetch: tansu answers a waiting fetch only when its wait ends.
        consumer_extra_config={"fetch.wait.max.ms": 100},
        loglevel="WARNING",
        on_message_processed=lambda *message: progress.on_message_processed(*message),
    )
    topic = app.topic(
        args.topic,
        key_deserializer="str",
        value_deserializer="json",
        timestamp_extractor=event_time,
    )
    progress = Progress(app, topic.name, args.events)
    build(app, topic, progress)
    app.run()


if __name__ == "__main__":
    main()
