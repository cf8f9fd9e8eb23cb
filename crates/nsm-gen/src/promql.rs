//! Small PromQL and YAML text helpers shared by the rules and the dashboard.

use nsm_core::metric::MetricDef;
use nsm_core::window::CalendarUnit;

/// The nominal length of a window, in seconds: what `offset` looks back to find the window
/// before. A calendar window can be an hour shorter or longer (DST) and months differ; the
/// rules check the window found really is the one before, so a mismatch gives no value
/// rather than a wrong one.
pub fn nominal_seconds(unit: CalendarUnit) -> u64 {
    match unit {
        CalendarUnit::Hour => 3_600,
        CalendarUnit::Day => 86_400,
        CalendarUnit::Week => 7 * 86_400,
        CalendarUnit::Month => 30 * 86_400,
    }
}

/// Timings of the alerts on metrics of one window length, scaled to it.
#[derive(Debug, Clone, Copy)]
pub struct Timing {
    /// The window's nominal length.
    pub window: u64,
    /// `for` of business alerts, and how long they stay held back after stale data: a
    /// 28th of the window (6h for a week), at least a minute.
    pub grace: u64,
    /// `keep_firing_for`: a 7th of the window (a day for a week), so an alert does not
    /// flap at a window boundary.
    pub keep_firing: u64,
}

impl Timing {
    pub fn of(unit: CalendarUnit) -> Timing {
        let window = nominal_seconds(unit);
        let whole_minutes = |seconds: u64| (seconds / 60).max(1) * 60;
        Timing {
            window,
            grace: whole_minutes(window / 28),
            keep_firing: whole_minutes(window / 7),
        }
    }

    /// Every duration divided by `scale`, rounded up to a whole second (1 leaves it as is).
    pub fn scaled(self, scale: u64) -> Timing {
        let scale = scale.max(1);
        let divide = |seconds: u64| seconds.div_ceil(scale).max(1);
        Timing {
            window: divide(self.window),
            grace: divide(self.grace),
            keep_firing: divide(self.keep_firing),
        }
    }

    /// The range over which growth must have stayed below (or above) a threshold for `periods`
    /// complete windows: the growth of the window before the current one is recorded during the
    /// whole current window, so `periods - 1` windows back plus the grace see `periods` values.
    pub fn sustained_range(&self, periods: u32) -> u64 {
        u64::from(periods.saturating_sub(1)) * self.window + self.grace
    }
}

/// A Prometheus duration: `7d`, `6h`, `1d1h`, `2m`.
pub fn duration(seconds: u64) -> String {
    if seconds == 0 {
        return "0s".to_string();
    }
    let mut rest = seconds;
    let mut out = String::new();
    for (unit, size) in [("d", 86_400), ("h", 3_600), ("m", 60), ("s", 1)] {
        if rest >= size {
            out.push_str(&format!("{}{unit}", rest / size));
            rest %= size;
        }
    }
    out
}

/// `metric="a"` or `metric=~"a|b"`. Metric names are validated snake_case, so they need no
/// escaping.
pub fn metric_matcher<'a>(metrics: impl IntoIterator<Item = &'a MetricDef>) -> Option<String> {
    let names: Vec<&str> = metrics
        .into_iter()
        .map(|metric| metric.name.as_str())
        .collect();
    match names.as_slice() {
        [] => None,
        [one] => Some(format!("metric=\"{one}\"")),
        many => Some(format!("metric=~\"{}\"", many.join("|"))),
    }
}

/// A YAML scalar: a JSON string is a valid YAML double-quoted scalar.
pub fn yaml_string(text: &str) -> String {
    serde_json::Value::String(text.to_string()).to_string()
}

/// A number as PromQL and YAML read it, without a trailing `.0` on whole numbers.
pub fn number(value: f64) -> String {
    if value.fract() == 0.0 && value.abs() < 1e15 {
        format!("{}", value as i64)
    } else {
        format!("{value}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_read_as_prometheus_writes_them() {
        assert_eq!(duration(7 * 86_400), "7d");
        assert_eq!(duration(25 * 3_600), "1d1h");
        assert_eq!(duration(128), "2m8s");
        assert_eq!(duration(0), "0s");
    }

    #[test]
    fn timings_scale_with_the_window() {
        let week = Timing::of(CalendarUnit::Week);
        assert_eq!(duration(week.grace), "6h");
        assert_eq!(duration(week.keep_firing), "1d");
        assert_eq!(duration(week.sustained_range(2)), "7d6h");
        assert_eq!(duration(week.sustained_range(1)), "6h");
        let hour = Timing::of(CalendarUnit::Hour);
        assert_eq!(duration(hour.grace), "2m");
        assert_eq!(duration(hour.keep_firing), "8m");
    }

    #[test]
    fn numbers_without_noise() {
        assert_eq!(number(120.0), "120");
        assert_eq!(number(0.25), "0.25");
        assert_eq!(number(-0.5), "-0.5");
    }
}
