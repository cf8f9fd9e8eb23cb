//! No cry-wolf: the signals the business alerts judge, made fair to traffic and to noise.
//!
//! - A guardrail that grows with traffic (complaints, cancellations) is judged relative to a
//!   metric of traffic, the North Star by default: complaints per booking. A holiday week and
//!   its rebound move both alike, so neither is a worsening.
//! - A signal must exceed `alerting.noise_z` standard deviations of its own past values (the
//!   `alerting.noise_windows` windows before the ones judged), so a product whose weeks swing
//!   ±5% pages on a change its noise does not explain, and a steady one on a small change.
//!   Until Prometheus holds `alerting.noise_min_windows` windows of the signal, its deviation
//!   is taken as `alerting.assumed_noise`.

use nsm_core::config::{GuardrailAlerting, WorseWhen};

use super::{Generator, Rule};
use crate::promql::{duration, number, Timing};

/// Keeps the finite samples only: a growth from an empty window (+Inf, or NaN from 0/0) is
/// no signal, and one such sample would make a standard deviation NaN for weeks.
const FINITE: &str = "> -Inf < +Inf";

pub(super) const GAP: &str = "nsm:growth_gap:revenue_minus_north_star";
pub(super) const GAP_NOISE: &str = "nsm:growth_gap:noise";
pub(super) const WORSENING: &str = "nsm:guardrail_worsening";
pub(super) const WORSENING_NOISE: &str = "nsm:guardrail_worsening:noise";

impl Generator<'_> {
    /// `nsm:guardrail_worsening` of one guardrail: its growth in the direction that hurts
    /// customers, relative to its `relative_to` metric's growth when it has one.
    pub(super) fn guardrail_worsening(&self, guardrail: &GuardrailAlerting) -> Rule {
        let name = &guardrail.metric;
        let growth = format!("nsm:metric_growth{{metric=\"{name}\"}}");
        let (expr, comment) = match &guardrail.relative_to {
            None => (
                match guardrail.worse_when {
                    WorseWhen::Higher => growth,
                    WorseWhen::Lower => format!("-1 * {growth}"),
                },
                format!(
                    "How much {name} worsened over the window before: its {} (it is worse when {}).",
                    match guardrail.worse_when {
                        WorseWhen::Higher => "growth",
                        WorseWhen::Lower => "decline",
                    },
                    guardrail.worse_when.label()
                ),
            ),
            Some(base) => {
                // (1 + g) / (1 + b) - 1 is the growth of the guardrail per unit of its base:
                // complaints +33% while bookings +33% is no worsening.
                let per_base = format!(
                    "(1 + {growth})\n/ on () group_left ()\n(1 + nsm:metric_growth{{metric=\"{base}\"}})"
                );
                (
                    match guardrail.worse_when {
                        WorseWhen::Higher => format!("{per_base}\n- 1"),
                        WorseWhen::Lower => format!("1 -\n{per_base}"),
                    },
                    format!(
                        "How much {name} per {base} worsened over the window before (worse when {}):\n\
                         judged relative to {base}, so a busy week is not a worse one.",
                        guardrail.worse_when.label()
                    ),
                )
            }
        };
        // `guardrail` tells one guardrail's record from another's (promtool refuses two rules
        // of one name and the same labels).
        let mut rule = Rule::record(WORSENING, format!("(\n{}\n) {FINITE}", indent(&expr)))
            .label("guardrail", name.as_str())
            .label("worse_when", guardrail.worse_when.label())
            .comment(comment);
        if let Some(base) = &guardrail.relative_to {
            rule = rule.label("relative_to", base.as_str());
        }
        rule
    }

    /// The divergence signal, revenue growth minus North Star growth.
    pub(super) fn growth_gap(&self) -> Rule {
        Rule::record(
            GAP,
            format!(
                "(\n  \
                   -1 * nsm:metric_growth{{role=\"north_star\"}}\n  \
                   + on () group_left\n  \
                   nsm:metric_growth{{role=\"revenue\"}}\n\
                 ) {FINITE}"
            ),
        )
        .comment(
            "The divergence signal: revenue growth minus North Star growth. Above 0 the\n\
             North Star, the leading indicator, grows slower than revenue.",
        )
    }

    /// The standard deviation of `series` over the noise windows that end `judged` seconds
    /// ago (before the values an alert judges), or the assumed noise while Prometheus holds
    /// fewer than the minimum windows of it.
    pub(super) fn noise_record(
        &self,
        record: &str,
        series: &str,
        timing: Timing,
        judged: u64,
    ) -> Rule {
        let noise = self.alerting.noise;
        let oldest_needed = judged + u64::from(noise.min_windows.saturating_sub(1)) * timing.window;
        Rule::record(
            record,
            format!(
                "(\n  \
                   stddev_over_time({series}[{range}] offset {judged})\n  \
                   and\n  \
                   present_over_time({series}[{grace}] offset {oldest})\n\
                 )\n\
                 or\n\
                 {series} * 0 + {assumed}",
                range = duration(u64::from(noise.windows) * timing.window),
                judged = duration(judged),
                grace = duration(timing.grace),
                oldest = duration(oldest_needed),
                assumed = number(noise.assumed),
            ),
        )
        .comment(format!(
            "Week-to-week noise of {series}:\n\
             its standard deviation over the {} windows before the ones alerts judge, once\n\
             Prometheus holds {} windows of it; {} until then.",
            noise.windows,
            noise.min_windows,
            number(noise.assumed)
        ))
    }

    /// The noise records of the signals the business alerts judge.
    pub(super) fn noise_records(&self) -> Vec<Rule> {
        let mut rules = Vec::new();
        if self.revenue().is_some() {
            // The divergence alerts judge the last `periods` windows of the gap.
            let timing = self.north_star_timing();
            let periods = self
                .alerting
                .sustained_periods
                .max(self.alerting.slower_than_revenue_periods);
            rules.push(self.noise_record(
                GAP_NOISE,
                GAP,
                timing,
                u64::from(periods) * timing.window,
            ));
        }
        for guardrail in &self.alerting.guardrails {
            let Some(metric) = self.config.metric(&guardrail.metric) else {
                continue;
            };
            // A guardrail alert judges the last window's worsening only.
            let timing = self.timing(metric.window);
            rules.push(
                self.noise_record(
                    WORSENING_NOISE,
                    &format!("{WORSENING}{{metric=\"{}\"}}", guardrail.metric),
                    timing,
                    timing.window,
                )
                .label("guardrail", guardrail.metric.as_str()),
            );
        }
        rules
    }

    /// `value` above `z` times `noise`, matched on the metric: the z-score gate. An alert
    /// sustained over `periods` windows asks each of them for z / sqrt(periods) deviations:
    /// several windows beyond the noise together are as unlikely by chance as one window
    /// far beyond it, and a steady divergence is seen from its first windows. `group_left`
    /// keeps every label of `value` (a comparison `on` labels keeps only those).
    pub(super) fn beyond_noise(&self, value: &str, noise: &str, periods: u32) -> String {
        let z = self.alerting.noise.z / f64::from(periods.max(1)).sqrt();
        format!(
            "{value} > on (metric) group_left () {} * {noise}",
            number((z * 1000.0).round() / 1000.0)
        )
    }
}

fn indent(text: &str) -> String {
    text.lines()
        .map(|line| format!("  {line}"))
        .collect::<Vec<_>>()
        .join("\n")
}
