//! Slow burn (issue 21 item 3): the North Star falling behind revenue, seen before the
//! whole-window alerts can see it, from a comparison updated continuously.
//!
//! **The signal.** Each weekly North Star and revenue over the last 7 days, whatever the
//! weekday: the window so far plus what the previous window added after the same point (its
//! whole value less the baseline, `nsm:metric_trailing:sum`). Their ratio, revenue per North
//! Star, is steady while both grow alike, whatever traffic does: a holiday, a campaign or a
//! busy week move both and cancel. The slow burn compares that ratio now with its average at
//! the same moment of the three weeks before (`nsm:trailing_gap:revenue_minus_north_star`,
//! 0.03 = revenue per North Star 3% above its recent level): a ratio drifting up is revenue
//! coming from somewhere that will not compound. Three weeks, not one, because the last week
//! is as noisy as this one: against one week the gap carries the noise of two, against the
//! mean of three the noise of 1.33 (√(4/3) instead of √2).
//!
//! **Why not the pace of the window still filling** (the design this replaces): a gap between
//! two paces restarts at every rollover and swings more early in a window than late, so a
//! noise measured over whole past windows is wrong at most points of the window, and early
//! in a window it paged on noise. The 7-day comparison always spans the same length of data,
//! so its noise is one number, measured over every sample of the past windows.
//!
//! **What one week allows.** With revenue +4% a week and the North Star flat from the start
//! of a window, revenue per North Star is on average 1.6% above its level after 7 days, 3%
//! after 9, 3.5% after 10 and 4% after 11. Hourly swings alone (±10% an hour, each series its
//! own) move the gap by 0.9% (one standard deviation), and a product whose series swing ±5%
//! a week each by 4 to 6%. So no rule tells the 1.6% of the first week from noise without
//! paging on noise every few weeks: the slow burn pages from 3% (`MIN_GAP`), beyond
//! 2 × `noise_z` deviations of the measured noise, and only in products steady enough to
//! resolve 3% at `noise_z` deviations; noisier ones are left to the whole-window alerts, which
//! pool several windows. BENCHMARKS.md (alerting) shows the measurements.

use nsm_core::metric::{MetricDef, Role};
use nsm_core::window::CalendarUnit;

use super::noise::GAP;
use super::pace::fast_burn_kind;
use super::{Generator, Rule};
use crate::promql::{duration, metric_matcher, number};

const TRAILING: &str = "nsm:metric_trailing:sum";
const RATIO: &str = "nsm:revenue_per_north_star:trailing_ln";
const WEEK_OVER_WEEK: &str = "nsm:trailing_gap:week_over_week";
const TRAILING_GAP: &str = "nsm:trailing_gap:revenue_minus_north_star";
const TRAILING_GAP_NOISE: &str = "nsm:trailing_gap:noise";

/// The windows before the last 7 days whose mean the ratio is compared with.
const LEVEL_WINDOWS: u32 = 3;
/// The smallest divergence the slow burn pages on: revenue per North Star 3% above its level.
const MIN_GAP: f64 = 0.03;
/// The slow burn asks for this many times `noise_z` deviations of its noise. The noise is
/// measured over a few windows (`noise_windows` = 6: 5 degrees of freedom), where Student's t
/// puts the one-sided 0.5% point at 4.0 deviations (the normal 2.6), and the gap is judged at
/// every evaluation, where a whole-window alert judges once a window.
const Z_FACTOR: f64 = 2.0;
/// Windows of history the noise needs beyond `noise_min_windows`: its series is a
/// week-over-week change, and a 4-deviation gate on the noise of two or three weeks paged the
/// noisy product in the first weeks after a Prometheus started.
const EXTRA_NOISE_WINDOWS: u32 = 1;

impl Generator<'_> {
    /// The North Stars and the revenue metric the slow burn judges: weekly calendar windows
    /// of a count, sum, distinct count or conversion (a baseline that is the previous window
    /// at the same point, and a value that adds up over time). None without revenue.
    fn slow_burn_metrics(&self) -> Option<(Vec<&MetricDef>, &MetricDef)> {
        let eligible =
            |metric: &MetricDef| metric.window == CalendarUnit::Week && fast_burn_kind(metric);
        let revenue = self.revenue().filter(|metric| eligible(metric))?;
        let north_stars: Vec<&MetricDef> = self
            .metrics(Role::NorthStar)
            .into_iter()
            .filter(|metric| eligible(metric))
            .collect();
        (!north_stars.is_empty()).then_some((north_stars, revenue))
    }

    /// The slow burn's noise: the root mean square of the week-over-week change of the ratio
    /// over the noise windows before the last one, scaled to a comparison against the mean of
    /// `LEVEL_WINDOWS` (√((1 + 1/3) / 2) of it); `assumed_noise` until Prometheus holds
    /// `noise_min_windows` windows of it.
    fn slow_burn_noise(&self, window: u64) -> Rule {
        let noise = self.alerting.noise;
        let levels = f64::from(LEVEL_WINDOWS);
        let scale = ((1.0 + 1.0 / levels) / 2.0).sqrt();
        let range = format!(
            "{WEEK_OVER_WEEK}[{}] offset {}",
            duration(u64::from(noise.windows) * window),
            duration(window)
        );
        let oldest = window
            + u64::from((noise.min_windows + EXTRA_NOISE_WINDOWS).saturating_sub(1)) * window;
        Rule::record(
            TRAILING_GAP_NOISE,
            format!(
                "(\n  \
                   sqrt(\n    \
                     stddev_over_time({range}) ^ 2\n    \
                     + avg_over_time({range}) ^ 2\n  \
                   ) * {scale}\n  \
                   and\n  \
                   present_over_time({WEEK_OVER_WEEK}[{grace}] offset {oldest})\n\
                 )\n\
                 or\n\
                 {WEEK_OVER_WEEK} * 0 + {assumed}",
                scale = number((scale * 10_000.0).round() / 10_000.0),
                grace = duration(self.timing(CalendarUnit::Week).grace),
                oldest = duration(oldest),
                assumed = number(noise.assumed),
            ),
        )
        .comment(format!(
            "Noise of the slow burn's gap: the root mean square of the ratio's week-over-week\n\
             change (no drift is expected of it while both grow alike) over the {} windows\n\
             before the last one, scaled to a comparison with the mean of {LEVEL_WINDOWS} windows; {} until\n\
             Prometheus holds {} windows of it.",
            noise.windows,
            number(noise.assumed),
            noise.min_windows + EXTRA_NOISE_WINDOWS,
        ))
    }

    /// Recording rules of the slow burn (none unless a weekly North Star and weekly revenue).
    pub(super) fn slow_burn_records(&self) -> Vec<Rule> {
        let Some((north_stars, revenue)) = self.slow_burn_metrics() else {
            return Vec::new();
        };
        let window = self.timing(CalendarUnit::Week).window;
        let Some(matcher) = metric_matcher(north_stars.iter().copied().chain([revenue])) else {
            return Vec::new();
        };
        let Some(north_star_matcher) = metric_matcher(north_stars.iter().copied()) else {
            return Vec::new();
        };
        let part = |which: &str| {
            format!("sum without (window) (nsm:metric_value:sum{{{matcher}, window=\"{which}\"}})")
        };
        let back =
            |windows: u32| format!("{RATIO} offset {}", duration(u64::from(windows) * window));
        let levels: Vec<String> = (1..=LEVEL_WINDOWS).map(back).collect();
        vec![
            Rule::record(
                TRAILING,
                format!(
                    "{}\n+ {}\n- {}",
                    part("current"),
                    part("previous"),
                    part("baseline")
                ),
            )
            .comment(
                "Slow burn (see slow_burn.rs): each weekly North Star and revenue over the last 7 days,\n\
                 updated continuously: the window so far plus what the previous window added after the\n\
                 same point (its whole value less the baseline). Exact for counts and sums; a distinct\n\
                 count adds the entities first seen in each part, the same way every week.",
            ),
            Rule::record(
                RATIO,
                format!(
                    "(\n  \
                       ln({TRAILING}{{metric=\"{revenue}\"}})\n  \
                       - on () group_right ()\n  \
                       ln({TRAILING}{{{north_star_matcher}}})\n\
                     ) > -Inf < +Inf",
                    revenue = revenue.name,
                ),
            )
            .comment(
                "Revenue per North Star over the last 7 days, as a logarithm (0.01 = 1% more): steady\n\
                 while both grow alike, whatever traffic does (a holiday moves both).",
            ),
            Rule::record(WEEK_OVER_WEEK, format!("{RATIO}\n- {}", back(1))).comment(
                "Its change over a week, whose spread is the slow burn's noise.",
            ),
            Rule::record(
                TRAILING_GAP,
                format!("{RATIO}\n- ({}) / {LEVEL_WINDOWS}", levels.join(" + ")),
            )
            .comment(format!(
                "The slow burn's gap: revenue per North Star now against its mean at the same moment\n\
                 of the {LEVEL_WINDOWS} weeks before. Above 0 the North Star falls behind revenue."
            )),
            self.slow_burn_noise(window),
        ]
    }

    /// `NSMFallingBehindRevenue` (warning) and, once the last whole window agrees,
    /// `NSMFallingBehindRevenueConfirmed` (critical).
    pub(super) fn slow_burn_alerts(&self) -> Vec<Rule> {
        let Some((_, revenue)) = self.slow_burn_metrics() else {
            return Vec::new();
        };
        let timing = self.timing(CalendarUnit::Week);
        let hold_back = self.hold_back(timing);
        let noise_z = self.alerting.noise.z;
        let z = noise_z * Z_FACTOR;
        // A product noisier than this cannot tell MIN_GAP from a noisy week at noise_z
        // deviations: its whole-window alerts decide.
        let max_noise = if noise_z > 0.0 {
            MIN_GAP / noise_z
        } else {
            f64::INFINITY
        };
        let rounded = |value: f64| number((value * 10_000.0).round() / 10_000.0);
        let gate = format!(
            "({TRAILING_GAP} > {min_gap})\n\
             and on (metric)\n\
             ({TRAILING_GAP} > on (metric) group_left () {z} * {TRAILING_GAP_NOISE})\n\
             and on (metric)\n\
             ({TRAILING_GAP_NOISE} <= {max_noise})",
            min_gap = number(MIN_GAP),
            z = rounded(z),
            max_noise = if max_noise.is_finite() {
                rounded(max_noise)
            } else {
                "+Inf".to_string()
            },
        );
        let business = |rule: Rule| Rule {
            for_seconds: Some(timing.grace),
            keep_firing_seconds: Some(timing.keep_firing),
            ..rule
        };
        let noise_now = "{{ with query \"max(nsm:trailing_gap:noise)\" }}{{ . | first | value | humanizePercentage }}{{ else }}unknown{{ end }}";
        let mut rules = Vec::new();

        let rule = Rule::alert(
            "NSMFallingBehindRevenue",
            format!("(\n  {}\n)\n{hold_back}", gate.replace('\n', "\n  ")),
        )
        .comment(format!(
            "Slow burn, updated continuously: over the last 7 days {revenue} per North Star is more\n\
             than {}% above its level of the {LEVEL_WINDOWS} weeks before and beyond {} deviations of\n\
             its noise, in a product steady enough to tell (noise at most {}%: {} deviations of it\n\
             within the minimum gap; noisier products are left to the whole-window alerts).\n\
             A North Star that stops growing while revenue grows 4% a week shows 3% after about\n\
             9 days; a steeper divergence sooner.",
            number(MIN_GAP * 100.0),
            rounded(z),
            if max_noise.is_finite() {
                rounded(max_noise * 100.0)
            } else {
                "any".to_string()
            },
            number(noise_z),
            revenue = revenue.name,
        ));
        rules.push(business(self.annotate(
            rule,
            "warning",
            "North Star {{ $labels.metric }} falls behind revenue",
            format!(
                "Over the last 7 days {revenue} per {{{{ $labels.metric }}}} is {{{{ $value | humanizePercentage }}}} above its level of the {LEVEL_WINDOWS} weeks before (the gap's noise: {noise_now}). The North Star grows slower than revenue; if it lasts, growth is not compounding.{moved_most}",
                revenue = revenue.name,
                moved_most = self.moved_most(),
            ),
        )));

        let rule = Rule::alert(
            "NSMFallingBehindRevenueConfirmed",
            format!(
                "(\n  \
                   {gate}\n  \
                   and on (metric)\n  \
                   ({GAP} > 0)\n\
                 )\n\
                 {hold_back}",
                gate = gate.replace('\n', "\n  "),
            ),
        )
        .comment(format!(
            "The slow burn, and {} also outgrew the North Star over the last whole window: the\n\
             divergence is not this week's alone.",
            revenue.name
        ));
        rules.push(business(self.annotate(
            rule,
            "critical",
            "North Star {{ $labels.metric }} falls behind revenue, confirmed by the last window",
            format!(
                "Over the last 7 days {revenue} per {{{{ $labels.metric }}}} is {{{{ $value | humanizePercentage }}}} above its level of the {LEVEL_WINDOWS} weeks before, and {revenue} grew {revenue_growth} in the last whole window against {north_star_growth} for the North Star. Growth is not compounding.{moved_most}",
                revenue = revenue.name,
                revenue_growth = "{{ with query \"nsm:metric_growth{role=\\\"revenue\\\"}\" }}{{ . | first | value | humanizePercentage }}{{ else }}unknown{{ end }}",
                north_star_growth = "{{ with query \"max(nsm:metric_growth{role=\\\"north_star\\\"})\" }}{{ . | first | value | humanizePercentage }}{{ else }}unknown{{ end }}",
                moved_most = self.moved_most(),
            ),
        )));
        rules
    }
}
