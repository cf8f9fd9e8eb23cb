//! Pipeline faults that leave nsm up and consuming but its values wrong: events rejected
//! (invalid or late) beyond a share, values no longer published, instances whose windows
//! disagree. Each pages as a pipeline fault and is a reason of `nsm:data_stale`, which holds
//! the business alerts back: an ingestion break must never page as a collapse.

use super::{Generator, Rule};
use crate::promql::{duration, number};

/// The look-back of the rejection shares, in seconds: short enough to page within 15 minutes
/// with the `for` below, long enough that one odd scrape is not a share. The records are
/// named `rate5m` after it.
const SHARE_RANGE_SECONDS: u64 = 300;
const SHARE_RANGE: &str = "5m";
/// A share counts only with at least this many events rejected within [`SHARE_RANGE`]: at
/// night a handful of messages with one bad one is 10% of nothing.
const MIN_REJECTED: u32 = 20;
/// `for` of the rejection alert: a deploy's few bad minutes do not page, a lasting break pages
/// within 15 minutes of its start (the rate needs a scrape or two, then this).
const REJECTED_FOR_SECONDS: u64 = 300;
/// `for` of the publish stall: its limit already waited.
const PUBLISH_STALLED_FOR_SECONDS: u64 = 120;

impl Generator<'_> {
    /// Recording rules of the rejection shares, read by the alert and the staleness reason.
    pub(super) fn rejection_records(&self) -> Vec<Rule> {
        let alerting = self.alerting;
        vec![
            Rule::record(
                "nsm:events_rejected:rate5m",
                format!(
                    "sum by (reason) (rate(nsm_events_invalid_total[{SHARE_RANGE}]))\n\
                     or\n\
                     label_replace(sum(rate(nsm_events_late_total[{SHARE_RANGE}])), \"reason\", \"late\", \"\", \"\")"
                ),
            )
            .comment(
                "Rejected events per second by reason (the invalid reasons, and `late`), and the\n\
                 share of consumed messages they are.",
            ),
            Rule::record(
                "nsm:events_rejected:share",
                format!(
                    "nsm:events_rejected:rate5m\n\
                     / on () group_left\n\
                     sum(rate(nsm_events_consumed_total[{SHARE_RANGE}]))"
                ),
            ),
            Rule::record(
                "nsm:events_rejected:over_limit",
                format!(
                    "(\n  \
                       nsm:events_rejected:share{{reason!=\"late\"}} > {invalid}\n  \
                       or\n  \
                       nsm:events_rejected:share{{reason=\"late\"}} > {late}\n\
                     )\n\
                     and\n\
                     nsm:events_rejected:rate5m * {SHARE_RANGE_SECONDS} >= {MIN_REJECTED}",
                    invalid = number(alerting.max_invalid_share),
                    late = number(alerting.max_late_share),
                ),
            )
            .comment(format!(
                "The shares above their limit (alerting.max_invalid_share per invalid reason,\n\
                 alerting.max_late_share for late events), with at least {MIN_REJECTED} rejected in {SHARE_RANGE}."
            )),
        ]
    }

    /// The `nsm:data_stale:reason` series of these faults.
    pub(super) fn pipeline_fault_stale_reasons(&self) -> Vec<Rule> {
        vec![
            Rule::record(
                "nsm:data_stale:reason",
                "(max(nsm:events_rejected:over_limit) > bool 0) or on () vector(0)",
            )
            .label("reason", "events_rejected"),
            Rule::record(
                "nsm:data_stale:reason",
                format!(
                    "(max(time() - (nsm_last_publish_timestamp_seconds > 0)) > bool {}) or on () vector(0)",
                    self.alerting.max_publish_delay.as_secs()
                ),
            )
            .label("reason", "publish_stalled"),
            // Instances roll over within seconds of each other, or an idle one up to the idle
            // timeout later: only the alert, once its `for` passed, says they truly disagree.
            Rule::record(
                "nsm:data_stale:reason",
                "(max(ALERTS{alertname=\"WindowsDisagree\", alertstate=\"firing\"}) > bool 0) or on () vector(0)",
            )
            .label("reason", "windows_disagree"),
        ]
    }

    pub(super) fn pipeline_fault_alerts(&self) -> Vec<Rule> {
        let alerting = self.alerting;
        let mut rules = Vec::new();

        let mut rule = Rule::alert("EventsRejected", "nsm:events_rejected:over_limit").comment(
            "Events consumed but rejected (invalid, or later than the allowed lateness) beyond\n\
             their share: the values miss them, so business alerts are held back meanwhile.",
        );
        rule.for_seconds = Some(REJECTED_FOR_SECONDS);
        rules.push(self.annotate(
            rule,
            "critical",
            "nsm rejects {{ $value | humanizePercentage }} of events ({{ $labels.reason }})",
            format!(
                "{{{{ $value | humanizePercentage }}}} of the messages nsm consumed in the last {SHARE_RANGE} were rejected as {{{{ $labels.reason }}}} (limit {invalid} per invalid reason, {late} late). They are in the dead-letter topic with the reason in a header (`nsm read --topic <dead-letter topic>`); a producer change (a renamed field, another timestamp format) is the usual cause. The North Star and its inputs miss these events: business alerts are held back until the share is below the limit.",
                invalid = number(alerting.max_invalid_share),
                late = number(alerting.max_late_share),
            ),
        ));

        let limit = alerting.max_publish_delay.as_secs();
        let mut rule = Rule::alert(
            "PublishStalled",
            format!("time() - (nsm_last_publish_timestamp_seconds > 0) > {limit}"),
        )
        .comment(
            "An instance that is up but no longer publishes values: its checkpoints do not\n\
             complete (a hanging disk, a changelog that takes nothing), so /metrics shows old\n\
             values as if they were current.",
        );
        rule.for_seconds = Some(PUBLISH_STALLED_FOR_SECONDS);
        rules.push(self.annotate(
            rule,
            "critical",
            "nsm {{ $labels.instance }} stopped publishing values",
            format!(
                "{{{{ $labels.instance }}}} last published values {{{{ $value | humanizeDuration }}}} ago (limit {}). Its checkpoints do not complete: check its log and /healthz, the state directory's disk and the changelog topic. Business alerts are held back meanwhile.",
                duration(limit)
            ),
        ));

        // Partial windows are known at once (nsm marks them when it takes the partition):
        // a minute confirms the scrape.
        let mut rule = Rule::alert(
            "MetricWindowPartial",
            "max by (metric) (nsm_metric_window_partial{window=~\"current|previous\"}) == 1",
        )
        .comment(
            "A metric added to the config, or changed, while its windows were open: they lack\n\
             the events before the change, so their values and growth are not comparable and its\n\
             business alerts are held until its windows are whole again.",
        );
        rule.for_seconds = Some(60);
        rules.push(self.annotate(
            rule,
            "warning",
            "{{ $labels.metric }} has partial windows (added or changed mid-window)",
            "The windows of {{ $labels.metric }} that were open when it was added to the config or changed lack the events before that moment (nsm_metric_window_partial). Its values there are partial and its business alerts are held back until its windows are whole: a new window for the current one, two for growth. `nsm replay` computes it over the retained history in the meantime.",
        ));

        // An idle instance's clock follows the wall clock only after the idle timeout, so
        // windows may disagree that long at a rollover without anything being wrong.
        let for_seconds = self.config.time.idle_timeout.as_secs() + 300;
        let mut rule = Rule::alert(
            "WindowsDisagree",
            "max by (metric) (nsm_metric_window_start_timestamp_seconds{window=\"previous\"})\n\
             - on (metric)\n\
             min by (metric) (nsm_metric_window_start_timestamp_seconds{window=\"previous\"})\n\
             > 0",
        )
        .comment(
            "Instances export different windows as current: summed across instances, values mix\n\
             two windows. An instance whose clock is stuck behind (far behind on its partitions,\n\
             or its partitions idle without reaching the idle timeout) does this.",
        );
        rule.for_seconds = Some(for_seconds);
        rules.push(self.annotate(
            rule,
            "critical",
            "nsm instances disagree on the windows of {{ $labels.metric }}",
            format!(
                "Instances have exported different windows of {{{{ $labels.metric }}}} for {} (their starts {{{{ $value | humanizeDuration }}}} apart), so the sums across instances mix two windows. Compare nsm_watermark_timestamp_seconds of the instances: one is stuck or far behind. Business alerts are held back meanwhile.",
                duration(for_seconds)
            ),
        ));
        rules
    }
}
