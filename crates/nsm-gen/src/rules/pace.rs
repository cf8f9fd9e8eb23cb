//! Pages in minutes, not weeks (issue 21 items 2 and 3): the window still filling against its
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
//! - **Slow burn** (`NSMPaceBelowRevenue`, `NSMPaceBelowRevenueSustained`): the North Star's
//!   pace in its window so far (current over baseline) trails revenue's by a margin and beyond
//!   the week-to-week noise of the growth gap, scaled up for a window still filling.

use nsm_core::metric::{MetricDef, MetricKind, Role};
use nsm_core::window::CalendarUnit;

use super::noise::GAP_NOISE;
use super::{Generator, Rule, UNITS};
use crate::promql::{duration, metric_matcher, number};

pub(super) const PACE: &str = "nsm:metric_pace";
pub(super) const PACE_GAP: &str = "nsm:pace_gap:revenue_minus_north_star";
const PACE_GAP_NOISE: &str = "nsm:pace_gap:noise";
const ELAPSED: &str = "nsm:metric_window_elapsed:ratio";
const INCREASE: &str = "nsm:metric_increase";
/// The long and the short look-back of the fast burn, in seconds.
const LONG: u64 = 3_600;
const SHORT: u64 = 600;
/// How long a metric's value must not have moved before `EventsVanished`, and how long that
/// must hold: 25 minutes of silence in all, a page within 30.
const SILENCE: u64 = 1_200;
const SILENCE_FOR: u64 = 300;
/// The slow burn (`NSMPaceBelowRevenue`, `NSMPaceBelowRevenueSustained`) is not generated yet:
/// with the scenario library's noisy product (±5% a week) two example configs still got a
/// false warning early in a window (the pace gap swings more there than its measured noise).
pub(super) const SLOW_BURN: bool = false;

/// The slow burn judges a window once this share of it has elapsed (two days of a week):
/// before, a few days decide the pace, and healthy weeks swing beyond their noise.
const MIN_ELAPSED: f64 = 2.0 / 7.0;

/// ` offset 1h`, or nothing.
fn offset(back: Option<u64>) -> String {
    back.map(|back| format!(" offset {}", duration(back)))
        .unwrap_or_default()
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

    /// Recording rules of the pace: per metric over its window so far, the North Star's gap to
    /// revenue, and the fast burn's increases over the look-backs.
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
        if SLOW_BURN && self.revenue().is_some() {
            let north_stars = self.metrics(Role::NorthStar);
            if let Some(matcher) = metric_matcher(north_stars.iter().copied()) {
                rules.push(
                    Rule::record(
                        ELAPSED,
                        format!(
                            "max without (window) (\n  \
                               (time() - nsm:metric_window_start:max{{{matcher}, window=\"current\"}})\n  \
                               / ignoring (window)\n  \
                               (nsm:metric_window_end:max{{{matcher}, window=\"current\"}} - nsm:metric_window_start:max{{{matcher}, window=\"current\"}})\n\
                             )"
                        ),
                    )
                    .comment("How much of the North Star's window still filling has elapsed (0 to 1)."),
                );
            }
            rules.push(
                Rule::record(
                    PACE_GAP,
                    format!(
                        "(\n  \
                           -1 * {PACE}{{role=\"north_star\"}}\n  \
                           + on () group_left\n  \
                           {PACE}{{role=\"revenue\"}}\n\
                         ) > -Inf < +Inf"
                    ),
                )
                .comment(
                    "The divergence as it happens: revenue's pace minus the North Star's, each in its\n\
                     window so far. Once a window is whole it is that window's growth gap.",
                ),
            );
            // Its noise is measured on itself, over whole past windows: a window still filling
            // swings more than a whole one (a few days decide its pace), and that is the noise
            // the slow burn must not page on.
            let timing = self.north_star_timing();
            rules.push(self.noise_record(PACE_GAP_NOISE, PACE_GAP, timing, timing.window));
        }
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
            let value = |window: &str, back: Option<u64>| {
                format!(
                    "sum by (metric) (nsm_metric_value{{{matcher}, window=\"{window}\"}}{})",
                    offset(back)
                )
            };
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
            let value = |window: &str, back: Option<u64>| {
                format!(
                    "sum by (metric) (nsm_metric_value{{metric=\"{name}\", window=\"{window}\"}}{})",
                    offset(back)
                )
            };
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

    /// The slow burn: the North Star's pace trails revenue's within the window still filling
    /// (a warning), and did in the last whole window too (critical).
    pub(super) fn slow_burn_alerts(&self) -> Vec<Rule> {
        let Some(revenue) = self.revenue().filter(|_| SLOW_BURN) else {
            return Vec::new();
        };
        let timing = self.north_star_timing();
        let hold_back = self.hold_back(timing);
        let min_gap = number(self.alerting.pace.min_gap);
        let gate = |periods: u32| self.beyond_noise(PACE_GAP, PACE_GAP_NOISE, periods);
        let partial = format!(
            "({PACE_GAP} > {min_gap})\n\
             and on (metric)\n\
             ({ELAPSED} >= {elapsed})",
            elapsed = number((MIN_ELAPSED * 1000.0).round() / 1000.0),
        );
        let business = |rule: Rule| Rule {
            for_seconds: Some(timing.grace),
            keep_firing_seconds: Some(timing.keep_firing),
            ..rule
        };
        let revenue_pace = format!(
            "{{{{ with query \"{PACE}{{role=\\\"revenue\\\"}}\" }}}}{{{{ . | first | value | humanizePercentage }}}}{{{{ else }}}}unknown{{{{ end }}}}"
        );
        let north_star_pace = format!(
            "{{{{ with query \"max({PACE}{{role=\\\"north_star\\\"}})\" }}}}{{{{ . | first | value | humanizePercentage }}}}{{{{ else }}}}unknown{{{{ end }}}}"
        );
        let mut rules = Vec::new();

        let rule = Rule::alert(
            "NSMPaceBelowRevenue",
            format!(
                "(\n  \
                   {partial}\n\
                 )\n\
                 and on (metric)\n\
                 ({gate})\n\
                 {hold_back}",
                partial = partial.replace('\n', "\n  "),
                gate = gate(1),
            ),
        )
        .comment(format!(
            "Slow burn, within one window: the North Star's pace in its window so far trails\n\
             {}'s by more than {min_gap} and by more than its own noise over past windows (at\n\
             every point of them), once two sevenths of the window have elapsed.\n\
             The whole-window alerts above confirm it when the window closes.",
            revenue.name
        ));
        rules.push(business(self.annotate(
            rule,
            "warning",
            "North Star {{ $labels.metric }} falls behind revenue this window",
            format!(
                "In its window so far {{{{ $labels.metric }}}} runs at {north_star_pace} of its baseline (the previous window at the same point) while {revenue} runs at {revenue_pace}: {revenue}'s pace leads by {{{{ $value | humanizePercentage }}}}, beyond the noise of past windows. If it lasts, growth is not compounding.{moved_most}",
                revenue = revenue.name,
                moved_most = self.moved_most(),
            ),
        )));

        // Two windows in a row, each asked for z / sqrt(2) deviations (as the sustained
        // whole-window alerts).
        let rule = Rule::alert(
            "NSMPaceBelowRevenueSustained",
            format!(
                "(\n  \
                   {partial}\n\
                 )\n\
                 and on (metric)\n\
                 ({gate})\n\
                 and on (metric)\n\
                 (nsm:growth_gap:revenue_minus_north_star > {min_gap})\n\
                 and on (metric)\n\
                 ({whole})\n\
                 {hold_back}",
                partial = partial.replace('\n', "\n  "),
                gate = gate(2),
                whole = self.beyond_noise(super::noise::GAP, GAP_NOISE, 2),
            ),
        )
        .comment(
            "Slow burn, two windows: the last whole window's growth trailed revenue's and this\n\
             window's pace trails it still, each by the margin and beyond the noise.",
        );
        rules.push(business(self.annotate(
            rule,
            "critical",
            "North Star {{ $labels.metric }} falls behind revenue for a second window",
            format!(
                "{{{{ $labels.metric }}}} grew {north_star_growth} in its last window while {revenue} grew {revenue_growth}, and in this window so far it runs at {north_star_pace} of its baseline against {revenue_pace} for {revenue} (a lead of {{{{ $value | humanizePercentage }}}}). Growth is not compounding.{moved_most}",
                revenue = revenue.name,
                north_star_growth = "{{ with query \"max(nsm:metric_growth{role=\\\"north_star\\\"})\" }}{{ . | first | value | humanizePercentage }}{{ else }}unknown{{ end }}",
                revenue_growth = "{{ with query \"nsm:metric_growth{role=\\\"revenue\\\"}\" }}{{ . | first | value | humanizePercentage }}{{ else }}unknown{{ end }}",
                moved_most = self.moved_most(),
            ),
        )));
        rules
    }
}
