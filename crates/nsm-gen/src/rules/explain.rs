//! Route and explain: an alert on an input or a guardrail carries the `owner` of its metric as
//! a label, so Alertmanager routes it to the team that can act; a North Star alert names, in
//! its description, the inputs (and segments) that moved most in their last window, so on
//! call starts from the lever that moved rather than from the dashboard.

use nsm_core::metric::{MetricDef, Role};

use super::{Generator, Rule};
use crate::promql::duration;

/// Inputs (and segments) named in a North Star alert: enough to point at the lever, few
/// enough to read on a phone.
const MOVED_MOST: usize = 3;

impl Generator<'_> {
    /// `rule` with the `owner` label of `metric`, when it has one.
    pub(super) fn owned_by(&self, rule: Rule, metric: &MetricDef) -> Rule {
        match &metric.owner {
            Some(owner) => rule.label("owner", owner.as_str()),
            None => rule,
        }
    }

    /// Growth of each exported segment of the North Stars with a breakdown: the last whole
    /// window over the one before, summed across instances, where the look-back found the
    /// window just before (as `nsm:metric_growth` checks it).
    pub(super) fn segment_growth_records(&self) -> Vec<Rule> {
        let mut rules = Vec::new();
        for metric in self.config.metrics_with_role(Role::NorthStar) {
            if metric.segments.is_none() {
                continue;
            }
            let name = &metric.name;
            let offset = duration(self.timing(metric.window).window);
            let segments = |offset: &str| {
                format!(
                    "sum by (metric, segment) (nsm_metric_segment_value{{metric=\"{name}\", window=\"previous\"}}{offset})"
                )
            };
            let mut rule = Rule::record(
                "nsm:segment_growth",
                format!(
                    "(\n  \
                       {now}\n  \
                       / {before}\n  \
                       - 1\n\
                     )\n\
                     and on (metric)\n\
                     (\n  \
                       nsm:metric_window_end:max{{metric=\"{name}\", window=\"previous\"}} offset {offset}\n  \
                       == on (metric)\n  \
                       nsm:metric_window_start:max{{metric=\"{name}\", window=\"previous\"}}\n\
                     )",
                    now = segments(""),
                    before = segments(&format!(" offset {offset}")),
                ),
            );
            if rules.is_empty() {
                rule = rule.comment(
                    "Growth of each exported segment of a North Star with a breakdown, for the\n\
                     North Star alerts to name the segments that moved most.",
                );
            }
            rules.push(rule);
        }
        rules
    }

    /// A sentence of a North Star alert's description naming what moved most, evaluated by
    /// Prometheus when the alert fires (`query` in the annotation template).
    pub(super) fn moved_most(&self) -> String {
        let inputs = "nsm:metric_growth{role=\"input\"}";
        // With its owner from nsm_metric_info when nsm exports it, without otherwise.
        let ranked = format!(
            "sort(\n  \
               ({inputs} * on (metric) group_left (owner) max by (metric, owner) (nsm_metric_info{{role=\"input\"}})\n  \
               or on (metric) {inputs})\n  \
               and on (metric) topk({MOVED_MOST}, abs({inputs}))\n\
             )"
        );
        let mut text = format!(
            " Inputs that moved most in their last window: {{{{ range query `{}` }}}}{{{{ .Labels.metric }}}}{{{{ with .Labels.owner }}}} (owner {{{{ . }}}}){{{{ end }}}} {{{{ .Value | humanizePercentage }}}}; {{{{ else }}}}none known yet; {{{{ end }}}}",
            one_line(&ranked)
        );
        for metric in self.config.metrics_with_role(Role::NorthStar) {
            if metric.segments.is_none() {
                continue;
            }
            let growth = format!("nsm:segment_growth{{metric=\"{}\"}}", metric.name);
            let ranked =
                format!("sort({growth} and on (segment) topk({MOVED_MOST}, abs({growth})))");
            text.push_str(&format!(
                " Segments of {} that moved most: {{{{ range query `{ranked}` }}}}{{{{ .Labels.segment }}}} {{{{ .Value | humanizePercentage }}}}; {{{{ else }}}}none known yet; {{{{ end }}}}",
                metric.name
            ));
        }
        text
    }
}

/// PromQL on one line, for an annotation template.
fn one_line(expr: &str) -> String {
    expr.lines().map(str::trim).collect::<Vec<_>>().join(" ")
}
