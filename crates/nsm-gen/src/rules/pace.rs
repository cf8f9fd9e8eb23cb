//! Pages in minutes, not weeks (issue 21 item 2): the window still filling against its
//! baseline, `nsm_metric_value{window="baseline"}`, what the comparable past window(s) held at
//! the same elapsed point since their start.
//!
//! - **Fast burn** (`PaceCollapsed`, `EventsVanished`), per North Star and input: what the
//!   metric added over the last hour and the last 10 minutes against what its baseline added
//!   over the same stretch of the window. The baseline is a step function (1 minute steps for
//!   hourly windows, 10 minutes for daily and weekly, 1 hour for monthly): the past is known at
//!   step boundaries only, so the comparison ends at the last boundary (a subquery of one step
//!   evaluates the current value there) and never guesses the part of the past step still to
//!   come. A guess would page every evening: traffic falls at 20:00 in both weeks, and a
//!   baseline extrapolated from 19:00-20:00 would expect day traffic until the next step.
//!
//! The slow burn (issue 21 item 3) is not judged on the pace: see `slow_burn.rs` for why.

use nsm_core::metric::{MetricDef, MetricKind, Role};
use nsm_core::window::CalendarUnit;

use super::{Generator, Rule, UNITS};
use crate::promql::{duration, metric_matcher, number};

pub(super) const PACE: &str = "nsm:metric_pace";
const INCREASE: &str = "nsm:metric_increase";
/// The long and the short look-back of the fast burn, in seconds.
const LONG: u64 = 3_600;
const SHORT: u64 = 600;
/// How long a metric's value must not have moved before `EventsVanished`, and how long that
/// must hold: 25 minutes of silence in all, a page within 30.
const SILENCE: u64 = 1_200;
const SILENCE_FOR: u64 = 300;
/// ` offset 1h`, or nothing.
fn offset(back: Option<u64>) -> String {
    back.map(|back| format!(" offset {}", duration(back)))
        .unwrap_or_default()
}

/// `window` of the metrics of `matcher` (of window `unit`) summed across instances, `back`
/// seconds ago. A seasonal baseline (hourly and daily windows) is the median of its weekly
/// points, each summed across instances first.
fn summed(matcher: &str, unit: CalendarUnit, window: &str, back: Option<u64>) -> String {
    if window == "baseline" && matches!(unit, CalendarUnit::Hour | CalendarUnit::Day) {
        format!(
            "quantile by (metric) (0.5, sum by (metric, window) (nsm_metric_value{{{matcher}, window=~\"{}\"}}{}))",
            super::BASELINE_POINTS,
            offset(back)
        )
    } else {
        format!(
            "sum by (metric) (nsm_metric_value{{{matcher}, window=\"{window}\"}}{})",
            offset(back)
        )
    }
}

/// The baseline's step for a window unit, in seconds (see ARCHITECTURE.md, *Baselines*).
fn step(unit: CalendarUnit) -> u64 {
    match unit {
        CalendarUnit::Hour => 60,
        CalendarUnit::Day | CalendarUnit::Week => 600,
        CalendarUnit::Month => 3_600,
    }
}

/// Metrics the fast burn can judge: a calendar window whose value only grows within it and
/// which has a baseline. Not a ratio or a retention rate (a rate halving is no volume
/// collapse; its parts, as inputs, are), a threshold (no baseline) or a trailing range (its
/// value drains as it grows, so its increase is not what the last hour added).
pub(super) fn fast_burn_kind(metric: &MetricDef) -> bool {
    metric.trailing.is_none()
        && matches!(
            metric.kind,
            MetricKind::Count
                | MetricKind::Sum { .. }
                | MetricKind::Distinct { .. }
                | MetricKind::Conversion { .. }
        )
}

impl Generator<'_> {
    /// An event-time duration of the fast burn divided by the time scale (see
    /// [`super::rules_scaled`]).
    fn scaled(&self, seconds: u64) -> u64 {
        seconds.div_ceil(self.time_scale).max(1)
    }

    /// Fast-burn alerts are held while the data is stale and for their longest look-back
    /// after: what they compare must not span stale data.
    fn fast_burn_hold_back(&self, unit: CalendarUnit) -> String {
        format!(
            "unless on () (max_over_time(nsm:data_stale[{}]) == 1) {}",
            duration(self.scaled(LONG + step(unit))),
            super::PARTIAL_HOLD
        )
    }

    fn fast_burn_metrics(&self) -> Vec<&MetricDef> {
        self.config
            .metrics
            .iter()
            .filter(|metric| matches!(metric.role, Role::NorthStar | Role::Input))
            .filter(|metric| fast_burn_kind(metric))
            .filter(|metric| !self.alerting.pace.off.contains(&metric.name))
            .collect()
    }

    /// Recording rules of the pace: per metric over its window so far, and the fast burn's
    /// increases over the look-backs.
    pub(super) fn pace_records(&self) -> Vec<Rule> {
        let mut rules = vec![Rule::record(
            PACE,
            "max without (window) (\n  \
               nsm:metric_value:sum{window=\"current\"}\n  \
               / ignoring (window)\n  \
               nsm:metric_value:sum{window=\"baseline\"}\n\
             ) > -Inf < +Inf",
        )
        .comment(
            "The pace of each metric's window still filling: its value so far over its baseline,\n\
             what the comparable past window(s) held at the same elapsed point (1 = the usual pace,\n\
             0.5 = half of it). None without a baseline (a threshold, or no past window held).",
        )];
        let metrics = self.fast_burn_metrics();
        let mut first = true;
        for unit in UNITS {
            let of_unit = metrics
                .iter()
                .copied()
                .filter(|metric| metric.window == unit);
            let Some(matcher) = metric_matcher(of_unit) else {
                continue;
            };
            let step = self.scaled(step(unit));
            let value = |window: &str, back: Option<u64>| summed(&matcher, unit, window, back);
            let start = |back: Option<u64>| {
                format!(
                    "max by (metric) (nsm_metric_window_start_timestamp_seconds{{{matcher}, window=\"current\"}}{})",
                    offset(back)
                )
            };
            // The window began before the look-back (and the step before it): no rollover
            // inside, where both values restart.
            let same_window = |back: u64| format!("{} == {}", start(None), start(Some(back)));
            // The baseline read now holds the step that ended at the boundary (scraped after it).
            let fresh = format!(
                "min by (metric) (timestamp(nsm_metric_value{{{matcher}, window=\"baseline\"}}))\n  \
                 >= on () group_left () (time() - time() % {step})"
            );
            for (look_back, label) in [(LONG, "1h"), (SHORT, "10m")] {
                let look_back = self.scaled(look_back);
                // The current value's increase over the look-back, up to the last step boundary.
                let current = format!(
                    "last_over_time(\n  \
                       (\n    \
                         {now}\n    \
                         - {then}\n  \
                       )[{step_text}:{step_text}]\n\
                     )\n\
                     and on (metric) ({same})\n\
                     and on (metric) ({fresh})",
                    now = value("current", None),
                    then = value("current", Some(look_back)),
                    step_text = duration(step),
                    same = same_window(look_back + step),
                );
                // The baseline's over the same stretch: whole steps, pro-rated within the last
                // one when the look-back is shorter than a step.
                let span = look_back.max(step);
                let mut baseline = format!(
                    "(\n  {now}\n  - {then}\n)",
                    now = value("baseline", None),
                    then = value("baseline", Some(span)),
                );
                if span > look_back {
                    let share = (look_back as f64 / span as f64 * 10_000.0).round() / 10_000.0;
                    baseline = format!("{baseline} * {}", number(share));
                }
                baseline = format!("{baseline}\nand on (metric) ({})", same_window(span + step));
                let mut rule = Rule::record(INCREASE, current)
                    .label("window", "current")
                    .label("look_back", label)
                    .label("period", unit.label());
                if first {
                    rule = rule.comment(
                        "Fast burn: what each North Star and input added over the last hour and the last\n\
                         10 minutes of its window, up to the baseline's last step boundary, and what its\n\
                         baseline added over the same stretch. The baseline moves in steps (1m for hourly\n\
                         windows, 10m daily, 1h weekly and monthly), so the past is known only up to the\n\
                         last boundary: the comparison ends there, and never extrapolates the step to come.\n\
                         None across a window rollover.",
                    );
                    first = false;
                }
                rules.push(rule);
                rules.push(
                    Rule::record(INCREASE, baseline)
                        .label("window", "baseline")
                        .label("look_back", label)
                        .label("period", unit.label()),
                );
            }
        }
        rules
    }

    /// The fast-burn alerts of every North Star and input, one rule per metric for its owner.
    pub(super) fn fast_burn_alerts(&self) -> Vec<Rule> {
        let pace = &self.alerting.pace;
        let ratio = number(pace.collapse_ratio);
        let z = number(pace.z);
        let z_squared = number(pace.z * pace.z);
        let mut rules = Vec::new();
        for (index, metric) in self.fast_burn_metrics().into_iter().enumerate() {
            let name = &metric.name;
            let north_star = metric.role == Role::NorthStar;
            let severity = if north_star { "critical" } else { "warning" };
            let hold_back = self.fast_burn_hold_back(metric.window);
            let owner = metric.owner.as_deref().unwrap_or("no owner");
            let increase = |window: &str, look_back: &str| {
                format!(
                    "{INCREASE}{{metric=\"{name}\", window=\"{window}\", look_back=\"{look_back}\"}}"
                )
            };
            let pace_over = |look_back: &str| {
                format!(
                    "(\n  \
                       {current}\n  \
                       / ignoring (window)\n  \
                       {baseline}\n\
                     )",
                    current = increase("current", look_back),
                    baseline = increase("baseline", look_back),
                )
            };
            let expected = increase("baseline", "1h");
            let expr = format!(
                "max without (window, look_back, period) (\n  \
                   {long} < {ratio}\n\
                 )\n\
                 and on (metric)\n\
                 ({short} < {ratio})\n\
                 and on (metric)\n\
                 (\n  \
                   {expected}\n  \
                   - ignoring (window) {current}\n  \
                   > ignoring (window) {z} * sqrt({expected})\n\
                 )\n\
                 {hold_back}",
                long = pace_over("1h").replace('\n', "\n  "),
                short = pace_over("10m"),
                current = increase("current", "1h"),
            );
            let mut rule = Rule::alert("PaceCollapsed", expr)
                .label("metric", name.as_str())
                .label("role", metric.role.label());
            if index == 0 {
                rule = rule.comment(format!(
                    "Fast burn: the metric added less than {ratio} of what its baseline added over the\n\
                     last hour and over the last 10 minutes (up to the baseline's last step), short by\n\
                     more than {z} Poisson deviations (sqrt of the expected), so a quiet night never\n\
                     pages. A holiday (-25%) stays above {ratio}; a broken release (-50%) does not."
                ));
            }
            let rule = self.owned_by(rule, metric);
            rules.push(self.annotate(
                rule,
                severity,
                format!("{name} runs at {{{{ $value | humanizePercentage }}}} of its usual pace"),
                format!(
                    "{name} ({role}, owner {owner}) added {{{{ $value | humanizePercentage }}}} of what its baseline (the comparable past window at the same point) added over the last hour, and less than {ratio} of it over the last 10 minutes too. Something broke the {role} (a release, a campaign, a tracking change): check recent deploys and the events behind {name}.",
                    role = metric.role.label().replace('_', " "),
                ),
            ));

            let step = self.scaled(step(metric.window));
            let silence = self.scaled(SILENCE);
            let span = silence.max(step);
            let matcher = format!("metric=\"{name}\"");
            let value =
                |window: &str, back: Option<u64>| summed(&matcher, metric.window, window, back);
            let start = |back: Option<u64>| {
                format!(
                    "max by (metric) (nsm_metric_window_start_timestamp_seconds{{metric=\"{name}\", window=\"current\"}}{})",
                    offset(back)
                )
            };
            let expr = format!(
                "(\n  \
                   {current}\n  \
                   - {current_then}\n  \
                   <= 0\n\
                 )\n\
                 and on (metric)\n\
                 (\n  \
                   (\n    \
                     {baseline}\n    \
                     - {baseline_then}\n  \
                   ){pro_rata}\n  \
                   > {z_squared}\n\
                 )\n\
                 and on (metric)\n\
                 ({start_now} == {start_then})\n\
                 and on ()\n\
                 (sum(increase(nsm_events_consumed_total[{silence}])) > 0)\n\
                 {hold_back}",
                current = value("current", None),
                current_then = value("current", Some(silence)),
                baseline = value("baseline", None),
                baseline_then = value("baseline", Some(span)),
                start_now = start(None),
                start_then = start(Some(span + step)),
                silence = duration(silence),
                pro_rata = if span > silence {
                    format!(
                        " * {}",
                        number((silence as f64 / span as f64 * 10_000.0).round() / 10_000.0)
                    )
                } else {
                    String::new()
                },
            );
            let mut rule = Rule::alert("EventsVanished", expr)
                .label("metric", name.as_str())
                .label("role", metric.role.label());
            rule.for_seconds = Some(self.scaled(SILENCE_FOR));
            if index == 0 {
                rule = rule.comment(format!(
                    "Tracking broke: the metric has not moved for {} while its baseline's last step\n\
                     expected more than {z_squared} over as long (a chance silence is below e^-{z_squared}) and the\n\
                     stream still flows. Pages within 30 minutes of the last event.",
                    duration(SILENCE)
                ));
            }
            let rule = self.owned_by(rule, metric);
            rules.push(self.annotate(
                rule,
                severity,
                format!("{name} stopped counting while events flow"),
                format!(
                    "{name} ({role}, owner {owner}) has not moved for {silence} though its baseline expected events and nsm still consumes messages. Its events no longer match: a renamed event or property, a release that stopped sending it, or a filter that no longer matches. Compare the producers' events with the metric's `where` in the config.",
                    role = metric.role.label().replace('_', " "),
                    silence = duration(SILENCE + SILENCE_FOR),
                ),
            ));
        }
        rules
    }
}
