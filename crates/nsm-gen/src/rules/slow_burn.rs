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
//! is as noisy as this one: against one week the gap's noise is √2 ≈ 1.41 times a week's,
//! against the mean of three √(1 + 1/3) ≈ 1.15 times. It needs Prometheus to keep 7 weeks
//! (3 for the level, 6 before the last for the noise), as the whole-window noise does.
//!
//! **Why not the pace of the window still filling** (the design this replaces): a gap between
//! two paces restarts at every rollover and swings more early in a window than late, so a
//! noise measured over whole past windows is wrong at most points of the window, and early
//! in a window it paged on noise. The 7-day comparison always spans the same length of data,
//! so its noise is one number, measured over every sample of the past windows.
//!
//! **What one week allows.** With revenue +4% a week and the North Star flat from the start
//! of a window, revenue per North Star is on average 1.7% above its level after 7 days, 3%
//! after 9 and 3.6% after 10. Hourly swings alone (±10% an hour, each series its
//! own) move the gap by 0.9% (one standard deviation), and a product whose series swing ±5%
//! a week each by 4 to 6%. So no rule tells the 1.7% of the first week from noise without
//! paging on noise every few weeks: the slow burn pages from 3% (`MIN_GAP`), beyond
//! 2 × `noise_z` deviations of the measured noise, and only in products steady enough to
//! resolve 3% at `noise_z` deviations; noisier ones are left to the whole-window alerts, which
//! pool several windows. Nor do the statistics tried next (a 6-week level, least-squares
//! fits of the hourly ratio over the last 7 days: its end, its slope, the matched filter of
//! the ramp): at best the flattening product's median held to day 7 stays below the highest a
//! quiet product held over 5 weeks. BENCHMARKS.md (alerting) shows the measurements.
//!
//! **Gaming, the same way.** Each guardrail per its `relative_to` metric (the North Star by
//! default) over the last 7 days, signed so that up is worse, against its level of the three
//! weeks before (`nsm:guardrail_trailing:worsening`): `GuardrailWorseningWhileNSMGrows` when
//! it is worse by more than `gaming_min_worsening`, beyond the same noise gate, while the North
//! Star's last 7 days grew by more than `nsm_flat_growth_threshold` over the 7 before.

use nsm_core::config::{GuardrailAlerting, WorseWhen};
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
const GUARDRAIL_RATIO: &str = "nsm:guardrail_per_base:trailing_ln";
const GUARDRAIL_WEEK_OVER_WEEK: &str = "nsm:guardrail_trailing:week_over_week";
const GUARDRAIL_GAP: &str = "nsm:guardrail_trailing:worsening";
const GUARDRAIL_NOISE: &str = "nsm:guardrail_trailing:noise";

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

/// A weekly calendar window of a count, sum, distinct count or conversion: a baseline that is
/// the previous window at the same point, and a value that adds up over time.
fn trailing_kind(metric: &MetricDef) -> bool {
    metric.window == CalendarUnit::Week && fast_burn_kind(metric)
}

/// The gates of a slow burn on `gap` (recorded with its `noise`): above `min_gap`, beyond
/// 2 × `noise_z` deviations of the noise, and only where the noise resolves `min_gap` at
/// `noise_z` deviations. `select` narrows both series (`{guardrail="x"}`, or nothing).
struct Gate {
    min_gap: f64,
    z: f64,
    max_noise: f64,
}

impl Gate {
    fn new(min_gap: f64, noise_z: f64) -> Gate {
        Gate {
            min_gap,
            z: noise_z * Z_FACTOR,
            // A product noisier than this cannot tell min_gap from a noisy week at noise_z
            // deviations: its whole-window alerts decide.
            max_noise: if noise_z > 0.0 {
                min_gap / noise_z
            } else {
                f64::INFINITY
            },
        }
    }

    fn expr(&self, gap: &str, noise: &str) -> String {
        format!(
            "({gap} > {min_gap})\n\
             and on (metric)\n\
             ({gap} > on (metric) group_left () {z} * {noise})\n\
             and on (metric)\n\
             ({noise} <= {max_noise})",
            min_gap = rounded(self.min_gap),
            z = rounded(self.z),
            max_noise = if self.max_noise.is_finite() {
                rounded(self.max_noise)
            } else {
                "+Inf".to_string()
            },
        )
    }

    /// How the gate reads in a comment.
    fn text(&self, noise_z: f64) -> String {
        format!(
            "beyond {} deviations of its noise, in a product steady enough to tell (noise at\n\
             most {}%: {} deviations of it within the minimum; noisier products are left to\n\
             the whole-window alerts)",
            rounded(self.z),
            if self.max_noise.is_finite() {
                rounded(self.max_noise * 100.0)
            } else {
                "any".to_string()
            },
            number(noise_z),
        )
    }
}

fn rounded(value: f64) -> String {
    number((value * 10_000.0).round() / 10_000.0)
}

impl Generator<'_> {
    /// The North Stars and the revenue metric the slow burn judges (see [`trailing_kind`]).
    /// None without revenue.
    fn slow_burn_metrics(&self) -> Option<(Vec<&MetricDef>, &MetricDef)> {
        let revenue = self.revenue().filter(|metric| trailing_kind(metric))?;
        let north_stars = self.trailing_north_stars();
        (!north_stars.is_empty()).then_some((north_stars, revenue))
    }

    fn trailing_north_stars(&self) -> Vec<&MetricDef> {
        self.metrics(Role::NorthStar)
            .into_iter()
            .filter(|metric| trailing_kind(metric))
            .collect()
    }

    /// The guardrails judged over the last 7 days, with the metric each is relative to: both
    /// of a kind [`trailing_kind`] accepts, and a North Star that is too (it must grow).
    fn guardrail_slow_burns(&self) -> Vec<(&GuardrailAlerting, &MetricDef, Option<&MetricDef>)> {
        if self.trailing_north_stars().is_empty() {
            return Vec::new();
        }
        self.alerting
            .guardrails
            .iter()
            .filter_map(|guardrail| {
                let metric = self
                    .config
                    .metric(&guardrail.metric)
                    .filter(|m| trailing_kind(m))?;
                match &guardrail.relative_to {
                    None => Some((guardrail, metric, None)),
                    Some(base) => {
                        let base = self.config.metric(base).filter(|m| trailing_kind(m))?;
                        Some((guardrail, metric, Some(base)))
                    }
                }
            })
            .collect()
    }

    /// The level comparison of a ratio recorded as `ratio` (a logarithm): its week-over-week
    /// change, its gap to the mean of the `LEVEL_WINDOWS` weeks before, and that gap's noise.
    fn level_records(
        &self,
        ratio: &str,
        week_over_week: &str,
        gap: &str,
        noise_record: &str,
        what: &str,
    ) -> Vec<Rule> {
        let window = self.timing(CalendarUnit::Week).window;
        let back =
            |windows: u32| format!("{ratio} offset {}", duration(u64::from(windows) * window));
        let levels: Vec<String> = (1..=LEVEL_WINDOWS).map(back).collect();
        let noise = self.alerting.noise;
        let levels_count = f64::from(LEVEL_WINDOWS);
        let scale = ((1.0 + 1.0 / levels_count) / 2.0).sqrt();
        let range = format!(
            "{week_over_week}[{}] offset {}",
            duration(u64::from(noise.windows) * window),
            duration(window)
        );
        let oldest = window
            + u64::from((noise.min_windows + EXTRA_NOISE_WINDOWS).saturating_sub(1)) * window;
        vec![
            Rule::record(week_over_week, format!("{ratio}\n- {}", back(1)))
                .comment(format!("{what} over the last 7 days: its change over a week, whose\n\
                 spread is the noise below.")),
            Rule::record(
                gap,
                format!("{ratio}\n- ({}) / {LEVEL_WINDOWS}", levels.join(" + ")),
            )
            .comment(format!(
                "{what} over the last 7 days against its mean at the same\n\
                 moment of the {LEVEL_WINDOWS} weeks before (0.03: 3% above)."
            )),
            Rule::record(
                noise_record,
                format!(
                    "(\n  \
                       sqrt(\n    \
                         stddev_over_time({range}) ^ 2\n    \
                         + avg_over_time({range}) ^ 2\n  \
                       ) * {scale}\n  \
                       and\n  \
                       present_over_time({week_over_week}[{grace}] offset {oldest})\n\
                     )\n\
                     or\n\
                     {week_over_week} * 0 + {assumed}",
                    scale = number((scale * 10_000.0).round() / 10_000.0),
                    grace = duration(self.timing(CalendarUnit::Week).grace),
                    oldest = duration(oldest),
                    assumed = number(noise.assumed),
                ),
            )
            .comment(format!(
                "Noise of that gap: the root mean square of the week-over-week change (no drift is\n\
                 expected of it in a steady product) over the {} windows before the last one, scaled\n\
                 to a comparison with the mean of {LEVEL_WINDOWS} windows; {} until Prometheus holds {}\n\
                 windows of it.",
                noise.windows,
                number(noise.assumed),
                noise.min_windows + EXTRA_NOISE_WINDOWS,
            )),
        ]
    }

    /// Recording rules of the slow burns: the North Star against revenue (with a weekly North
    /// Star and weekly revenue) and each guardrail against its base.
    pub(super) fn slow_burn_records(&self) -> Vec<Rule> {
        let divergence = self.slow_burn_metrics();
        let guardrails = self.guardrail_slow_burns();
        let mut trailing: Vec<&MetricDef> = Vec::new();
        if let Some((north_stars, revenue)) = &divergence {
            trailing.extend(north_stars.iter().copied());
            trailing.push(revenue);
        }
        if !guardrails.is_empty() {
            trailing.extend(self.trailing_north_stars());
        }
        for (_, metric, base) in &guardrails {
            trailing.push(metric);
            trailing.extend(*base);
        }
        let mut seen = std::collections::BTreeSet::new();
        trailing.retain(|metric| seen.insert(metric.name.as_str()));
        let Some(matcher) = metric_matcher(trailing.iter().copied()) else {
            return Vec::new();
        };
        let part = |which: &str| {
            format!("sum without (window) (nsm:metric_value:sum{{{matcher}, window=\"{which}\"}})")
        };
        let mut rules = vec![Rule::record(
            TRAILING,
            format!(
                "{}\n+ {}\n- {}",
                part("current"),
                part("previous"),
                part("baseline")
            ),
        )
        .comment(
            "Slow burn (see slow_burn.rs): weekly metrics over the last 7 days, updated\n\
             continuously: the window so far plus what the previous window added after the same\n\
             point (its whole value less the baseline). Exact for counts and sums; a distinct\n\
             count adds the entities first seen in each part, the same way every week.",
        )];
        if let Some((north_stars, revenue)) = &divergence {
            if let Some(north_star_matcher) = metric_matcher(north_stars.iter().copied()) {
                rules.push(
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
                        "Revenue per North Star over the last 7 days, as a logarithm (0.01 = 1% more):\n\
                         steady while both grow alike, whatever traffic does (a holiday moves both).",
                    ),
                );
                rules.extend(self.level_records(
                    RATIO,
                    WEEK_OVER_WEEK,
                    TRAILING_GAP,
                    TRAILING_GAP_NOISE,
                    "Revenue per North Star",
                ));
            }
        }
        for (index, (guardrail, metric, base)) in guardrails.iter().enumerate() {
            let own = format!("ln({TRAILING}{{metric=\"{}\"}})", metric.name);
            let per_base = match base {
                Some(base) => format!(
                    "{own}\n- on () group_left ()\nln({TRAILING}{{metric=\"{}\"}})",
                    base.name
                ),
                None => own,
            };
            let signed = match guardrail.worse_when {
                WorseWhen::Higher => format!("(\n{}\n)", indent(&per_base)),
                WorseWhen::Lower => format!("-1 * (\n{}\n)", indent(&per_base)),
            };
            let mut rule = Rule::record(GUARDRAIL_RATIO, format!("{signed} > -Inf < +Inf"))
                .label("guardrail", guardrail.metric.as_str())
                .label("worse_when", guardrail.worse_when.label());
            if let Some(base) = base {
                rule = rule.label("relative_to", base.name.as_str());
            }
            if index == 0 {
                rule = rule.comment(
                    "Each guardrail per its base over the last 7 days, as a logarithm signed so that up\n\
                     is worse (complaints per booking: a busy week is not a worse one).",
                );
            }
            rules.push(rule);
        }
        if !guardrails.is_empty() {
            rules.extend(self.level_records(
                GUARDRAIL_RATIO,
                GUARDRAIL_WEEK_OVER_WEEK,
                GUARDRAIL_GAP,
                GUARDRAIL_NOISE,
                "Each guardrail per its base",
            ));
        }
        rules
    }

    fn business_timing(&self, rule: Rule) -> Rule {
        let timing = self.timing(CalendarUnit::Week);
        Rule {
            for_seconds: Some(timing.grace),
            keep_firing_seconds: Some(timing.keep_firing),
            ..rule
        }
    }

    /// `NSMFallingBehindRevenue` (warning) and, once the last whole window agrees,
    /// `NSMFallingBehindRevenueConfirmed` (critical); `GuardrailWorseningWhileNSMGrows` per
    /// guardrail.
    pub(super) fn slow_burn_alerts(&self) -> Vec<Rule> {
        let mut rules = self.divergence_alerts();
        rules.extend(self.guardrail_alerts());
        rules
    }

    fn divergence_alerts(&self) -> Vec<Rule> {
        let Some((_, revenue)) = self.slow_burn_metrics() else {
            return Vec::new();
        };
        let hold_back = self.hold_back(self.timing(CalendarUnit::Week));
        let noise_z = self.alerting.noise.z;
        let gate = Gate::new(MIN_GAP, noise_z);
        let gate_expr = gate.expr(TRAILING_GAP, TRAILING_GAP_NOISE);
        let noise_now = "{{ with query \"max(nsm:trailing_gap:noise)\" }}{{ . | first | value | humanizePercentage }}{{ else }}unknown{{ end }}";
        let mut rules = Vec::new();

        let rule = Rule::alert(
            "NSMFallingBehindRevenue",
            format!("(\n  {}\n)\n{hold_back}", gate_expr.replace('\n', "\n  ")),
        )
        .comment(format!(
            "Slow burn, updated continuously: over the last 7 days {revenue} per North Star is more\n\
             than {}% above its level of the {LEVEL_WINDOWS} weeks before,\n\
             {}.\n\
             A North Star that stops growing while revenue grows 4% a week shows 3% after about\n\
             9 days; a steeper divergence sooner.",
            number(MIN_GAP * 100.0),
            gate.text(noise_z),
            revenue = revenue.name,
        ));
        rules.push(self.business_timing(self.annotate(
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
                gate = gate_expr.replace('\n', "\n  "),
            ),
        )
        .comment(format!(
            "The slow burn, and {} also outgrew the North Star over the last whole window: the\n\
             divergence is not this week's alone.",
            revenue.name
        ));
        rules.push(self.business_timing(self.annotate(
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

    fn guardrail_alerts(&self) -> Vec<Rule> {
        let guardrails = self.guardrail_slow_burns();
        if guardrails.is_empty() {
            return Vec::new();
        }
        let hold_back = self.hold_back(self.timing(CalendarUnit::Week));
        let noise_z = self.alerting.noise.z;
        let min = self.alerting.gaming_min_worsening;
        let gate = Gate::new(min, noise_z);
        let threshold = number(self.alerting.nsm_flat_growth_threshold);
        let window = duration(self.timing(CalendarUnit::Week).window);
        let north_stars = metric_matcher(self.trailing_north_stars()).unwrap_or_default();
        let mut rules = Vec::new();
        for (index, (guardrail, metric, base)) in guardrails.into_iter().enumerate() {
            let select = format!("{{guardrail=\"{}\"}}", guardrail.metric);
            let gap = format!("{GUARDRAIL_GAP}{select}");
            let noise = format!("{GUARDRAIL_NOISE}{select}");
            let mut rule = Rule::alert(
                "GuardrailWorseningWhileNSMGrows",
                format!(
                    "(\n  \
                       {gate}\n  \
                       and on ()\n  \
                       (\n    \
                         max({TRAILING}{{{north_stars}}} / {TRAILING}{{{north_stars}}} offset {window})\n    \
                         - 1 > {threshold}\n  \
                       )\n\
                     )\n\
                     {hold_back}",
                    gate = gate.expr(&gap, &noise).replace('\n', "\n  "),
                ),
            );
            if index == 0 {
                rule = rule.comment(format!(
                    "Gaming, updated continuously: over the last 7 days a guardrail per its base is worse\n\
                     than its level of the {LEVEL_WINDOWS} weeks before by more than gaming_min_worsening ({}),\n\
                     {},\n\
                     while the North Star's last 7 days grew more than {threshold} over the 7 before.",
                    number(min),
                    gate.text(noise_z),
                ));
            }
            let rule = self.owned_by(rule, metric);
            let name = &guardrail.metric;
            let owner = metric.owner.as_deref().unwrap_or("no owner");
            let per = base
                .map(|base| format!(" per {}", base.name))
                .unwrap_or_default();
            rules.push(self.business_timing(self.annotate(
                rule,
                "warning",
                format!("North Star grows while guardrail {name} worsens"),
                format!(
                    "Over the last 7 days {name}{per} (owner {owner}) is {{{{ $value | humanizePercentage }}}} worse than its level of the {LEVEL_WINDOWS} weeks before (it is worse when {}), while the North Star grows. Check the North Star is not being won at customers' expense.",
                    guardrail.worse_when.label()
                ),
            )));
        }
        rules
    }
}

fn indent(text: &str) -> String {
    text.lines()
        .map(|line| format!("  {line}"))
        .collect::<Vec<_>>()
        .join("\n")
}
