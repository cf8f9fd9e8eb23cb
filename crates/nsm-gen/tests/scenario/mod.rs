//! The scenario library: weeks of series shaped like nsm's exports, generated for any config,
//! run through `promtool test rules` against that config's generated rules, and read back as
//! "which alert fired first when".
//!
//! A scenario is a product (trend, weekly seasonality, noise) plus what goes wrong in it (a
//! step in one role's rate, a change of trend, a pipeline fault). From it every metric of a
//! config gets a rate per minute, constant within each hour, and nsm's series follow from the
//! rates as nsm computes them: `current` is what the window holds so far, `previous` and
//! `before_previous` the whole windows before it (nsm keeps state from before the test, so
//! they exist from the first sample), ratio metrics as exact parts, and the pipeline's own
//! series (consumed, rejected, dead letters, lag, watermark, brokers, `up`).
//!
//! promtool only checks expected values, so each scenario ends with one probe whose expected
//! value can never match: the first time each alert was firing, read from the `ALERTS` series
//! the rules wrote. promtool prints what it got, and [`run`] parses that into [`Outcome`]s,
//! which the tests compare with what each scenario expects.

#![allow(dead_code)]

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;

use nsm_core::metric::{MetricDef, MetricKind, Role};
use nsm_core::window::CalendarUnit;
use nsm_core::Config;

use crate::support::promtool;

/// Minutes between two samples: nsm scraped every 2 minutes, rules evaluated as often.
pub const STEP: i64 = 2;
pub const HOUR: i64 = 60;
pub const DAY: i64 = 24 * HOUR;
pub const WEEK: i64 = 7 * DAY;

/// Which metrics a change applies to.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Target {
    /// Every metric, and the stream itself (messages consumed).
    Traffic,
    Role(Role),
}

/// What happens to the product.
#[derive(Debug, Clone, Copy)]
pub enum Change {
    /// From minute `from` until `until` (or the end), the rate of `target` is multiplied by
    /// `factor` (0: its events vanish).
    Step {
        target: Target,
        from: i64,
        until: Option<i64>,
        factor: f64,
    },
    /// From minute `from`, `target` grows `per_week` a week instead of the scenario's trend.
    Trend {
        target: Target,
        from: i64,
        per_week: f64,
    },
}

/// What happens to the pipeline.
#[derive(Debug, Clone, Copy)]
pub enum Fault {
    /// From `from`, a `share` of every message is rejected for `reason` (the producers
    /// renamed the timestamp field: `missing_timestamp`, share 1). With share 1 nothing is
    /// applied, so the watermark stops: the partition still receives messages, it is not idle.
    Rejected {
        from: i64,
        share: f64,
        reason: &'static str,
    },
    /// From `from` on, dead letters cannot be delivered.
    DeadLettersFail { from: i64 },
    /// nsm is not scraped from `from` until `until`: `up` is 0 and its series are missing.
    NsmDown { from: i64, until: i64 },
    /// No broker reachable: nothing consumed, values frozen; the idle partitions' clocks
    /// follow the wall clock.
    BrokerDown { from: i64, until: i64 },
    /// nsm falls behind: 300k messages of lag, events applied at 30% of their pace (the
    /// watermark with them) until `until`, when it catches up at once.
    Lag { from: i64, until: i64 },
}

/// Whether a scenario's alert is asserted to fire, to stay silent, or left alone.
#[derive(Debug, Clone, Copy)]
pub enum Expect {
    /// Fires, first no earlier than the scenario's onset and no later than `within` minutes
    /// after it (`None`: any time after the onset).
    Fires {
        alert: &'static str,
        within: Option<i64>,
    },
    /// May fire or not; shown in the table only.
    Tolerated(&'static str),
}

/// What issue 21 asks of a scenario; reported, asserted once met (see the tests).
#[derive(Debug, Clone, Copy)]
pub enum Goal {
    /// No business alert over the whole scenario.
    Quiet,
    /// A pipeline alert within this many minutes of the onset, and no business alert.
    PipelineWithin(i64),
    /// A business alert within this many minutes of the onset.
    BusinessWithin(i64),
}

pub struct Scenario {
    pub name: &'static str,
    /// The product minute the test starts at: weeks of the product's life may lie before it,
    /// in nsm's state (its `previous` windows) but not in Prometheus.
    pub start: i64,
    /// Product minute the test ends at.
    pub end: i64,
    /// Minutes between two rule evaluations. Input samples are every [`STEP`] minutes, but
    /// promtool evaluates every rule at every interval, so scenarios of weeks evaluate
    /// every 3 hours (their alerts wait 6 hours and keep firing a day) and those of minutes
    /// every [`STEP`].
    pub evaluation: i64,
    /// Growth per week of every metric, unless a [`Change::Trend`] says otherwise.
    pub trend: f64,
    /// Weekdays busier than weekends, days busier than nights.
    pub seasonal: bool,
    /// Each metric's weekly level is off its trend by up to this fraction (0.05: ±5%), a
    /// different draw per metric and week.
    pub noise: f64,
    /// Every series' weekly level is also off its trend by up to this fraction, one draw per
    /// week shared by all (traffic: a busy or a quiet week moves every metric alike).
    pub shared_noise: f64,
    /// Which draws of the noise and the hourly jitter: 0 for the library, others for
    /// measurements over many products alike (`slow_burn_monte_carlo`).
    pub seed: u64,
    pub changes: Vec<Change>,
    pub faults: Vec<Fault>,
    /// The minute the trouble starts; none for healthy scenarios.
    pub onset: Option<i64>,
    /// Alerts expected; every other alert must stay silent.
    pub expect: Vec<Expect>,
    pub goal: Goal,
    /// The goal is asserted, not only reported: set once the rules meet it.
    pub goal_asserted: bool,
}

/// When an alert was first firing in a scenario, and on which metrics.
#[derive(Debug, Clone, Default)]
pub struct Fired {
    /// Minutes from the start of the scenario.
    pub first: i64,
    pub metrics: BTreeSet<String>,
    /// (label, value) of the alert's other routing labels (`owner`, `reason`, `severity`).
    pub labels: BTreeSet<(String, String)>,
}

/// A scenario run against one config's rules.
pub struct Outcome {
    pub config: String,
    pub scenario: &'static str,
    pub fired: BTreeMap<String, Fired>,
    pub business_alerts: BTreeSet<String>,
}

/// Hourly rate multipliers: weekdays 1.2, weekends 0.5; 08:00-20:00 1.5, else 0.5.
fn season(minute: i64) -> f64 {
    let day = minute.rem_euclid(WEEK) / DAY;
    let hour = minute.rem_euclid(DAY) / HOUR;
    let weekday = if day < 5 { 1.2 } else { 0.5 };
    let daytime = if (8..20).contains(&hour) { 1.5 } else { 0.5 };
    weekday * daytime
}

/// A deterministic draw in [-1, 1] for (a, b, c).
fn draw(a: u64, b: i64, c: u64) -> f64 {
    let mut x = a
        .wrapping_mul(0x9E37_79B9_7F4A_7C15)
        .wrapping_add((b as u64).wrapping_mul(0xC2B2_AE3D_27D4_EB4F))
        .wrapping_add(c.wrapping_mul(0x1656_67B1_9E37_79F9));
    x ^= x >> 33;
    x = x.wrapping_mul(0xFF51_AFD7_ED55_8CCD);
    x ^= x >> 33;
    (x >> 11) as f64 / (1u64 << 53) as f64 * 2.0 - 1.0
}

fn base_rate(role: Role) -> f64 {
    // Per minute: a North Star of ~5000 a week, inputs ~20000, guardrails ~200 (below every
    // example's absolute limits), revenue ~100000.
    match role {
        Role::NorthStar => 0.5,
        Role::Input => 2.0,
        Role::Guardrail => 0.02,
        Role::Revenue => 10.0,
    }
}

fn applies(target: Target, role: Option<Role>) -> bool {
    match target {
        Target::Traffic => true,
        Target::Role(wanted) => role == Some(wanted),
    }
}

impl Scenario {
    /// Test minutes from the first sample to the last.
    pub fn length(&self) -> i64 {
        self.end - self.start
    }

    /// The trend multiplier of a role at `minute` (hour-aligned by the caller).
    fn trend_factor(&self, role: Option<Role>, minute: i64) -> f64 {
        let mut changes: Vec<(i64, f64)> = self
            .changes
            .iter()
            .filter_map(|change| match *change {
                Change::Trend {
                    target,
                    from,
                    per_week,
                } if applies(target, role) => Some((from, per_week)),
                _ => None,
            })
            .collect();
        changes.sort_by_key(|(from, _)| *from);
        let mut exponent = 0.0;
        let mut at = 0i64;
        let mut growth = self.trend;
        // Before minute 0 the default trend runs backwards.
        if minute < 0 {
            return (1.0 + growth).powf(minute as f64 / WEEK as f64);
        }
        for (from, per_week) in changes {
            if from >= minute {
                break;
            }
            exponent += (1.0 + growth).ln() * (from - at) as f64 / WEEK as f64;
            at = from;
            growth = per_week;
        }
        exponent += (1.0 + growth).ln() * (minute - at) as f64 / WEEK as f64;
        exponent.exp()
    }

    fn step_factor(&self, role: Option<Role>, minute: i64) -> f64 {
        self.changes
            .iter()
            .filter_map(|change| match *change {
                Change::Step {
                    target,
                    from,
                    until,
                    factor,
                } if applies(target, role)
                    && minute >= from
                    && until.is_none_or(|until| minute < until) =>
                {
                    Some(factor)
                }
                _ => None,
            })
            .product()
    }

    /// Rate per minute during the hour starting at `hour_start` of a series `seed` of `role`
    /// (`None`: the stream's traffic).
    fn rate(&self, seed: u64, role: Option<Role>, hour_start: i64) -> f64 {
        let base = role.map_or(100.0, base_rate);
        let week = hour_start.div_euclid(WEEK);
        let shared = 1.0 + self.shared_noise * draw(self.seed.wrapping_mul(10_007), week, 3);
        let seed = seed.wrapping_add(self.seed.wrapping_mul(10_007));
        let noise = (1.0 + self.noise * draw(seed, week, 1)) * shared;
        let jitter = 1.0 + 0.1 * draw(seed, hour_start / HOUR, 2);
        let season = if self.seasonal {
            season(hour_start)
        } else {
            1.0
        };
        base * self.trend_factor(role, hour_start)
            * self.step_factor(role, hour_start)
            * season
            * noise
            * jitter
    }

    fn fault_at(&self, minute: i64) -> impl Iterator<Item = &Fault> {
        self.faults.iter().filter(move |fault| match **fault {
            Fault::Rejected { from, .. } | Fault::DeadLettersFail { from } => minute >= from,
            Fault::NsmDown { from, until }
            | Fault::BrokerDown { from, until }
            | Fault::Lag { from, until } => minute >= from && minute < until,
        })
    }

    fn rejected_share(&self, minute: i64) -> f64 {
        self.fault_at(minute)
            .filter_map(|fault| match fault {
                Fault::Rejected { share, .. } => Some(*share),
                _ => None,
            })
            .sum::<f64>()
            .min(1.0)
    }

    fn broker_down(&self, minute: i64) -> bool {
        self.fault_at(minute)
            .any(|fault| matches!(fault, Fault::BrokerDown { .. }))
    }

    fn nsm_down(&self, minute: i64) -> bool {
        self.fault_at(minute)
            .any(|fault| matches!(fault, Fault::NsmDown { .. }))
    }

    fn lagging(&self, minute: i64) -> bool {
        self.fault_at(minute)
            .any(|fault| matches!(fault, Fault::Lag { .. }))
    }
}

/// A metric's window length in minutes, and whether it is trailing.
fn window_of(metric: &MetricDef) -> (i64, bool) {
    match &metric.trailing {
        Some(trailing) => (trailing.length_ms / 60_000, true),
        None => (
            match metric.window {
                CalendarUnit::Hour => HOUR,
                CalendarUnit::Day => DAY,
                CalendarUnit::Week => WEEK,
                CalendarUnit::Month => 30 * DAY,
            },
            false,
        ),
    }
}

/// Cumulative amounts of one series, every [`STEP`] minutes from `start` (negative: nsm's
/// state from before the test) to the end.
struct Cumulative {
    start: i64,
    values: Vec<f64>,
}

impl Cumulative {
    /// The amount applied up to `minute` (a multiple of [`STEP`]).
    fn at(&self, minute: i64) -> f64 {
        let index = usize::try_from((minute - self.start) / STEP).unwrap_or(0);
        self.values[index.min(self.values.len() - 1)]
    }

    fn between(&self, from: i64, to: i64) -> f64 {
        self.at(to) - self.at(from)
    }
}

/// What nsm applied of a series of `role`: the rate of each hour, less what was rejected,
/// nothing while the brokers are down, 30% while lagging and the rest when it catches up.
fn applied(scenario: &Scenario, seed: u64, role: Option<Role>, history: i64) -> Cumulative {
    let start = scenario.start - history;
    let end = scenario.end;
    let mut values = Vec::with_capacity(((end - start) / STEP + 1) as usize);
    let mut total = 0.0;
    let mut deferred = 0.0;
    let mut rate = 0.0;
    values.push(0.0);
    let mut minute = start;
    while minute < end {
        if minute.rem_euclid(HOUR) == 0 {
            rate = scenario.rate(seed, role, minute);
        }
        let mut amount = rate * STEP as f64 * (1.0 - scenario.rejected_share(minute));
        if scenario.broker_down(minute) {
            amount = 0.0;
        } else if scenario.lagging(minute) {
            deferred += amount * 0.7;
            amount *= 0.3;
        } else {
            amount += deferred;
            deferred = 0.0;
        }
        total += amount;
        values.push(total);
        minute += STEP;
    }
    Cumulative { start, values }
}

/// The baseline's step of a calendar window, in minutes: what nsm's progress record keeps
/// (1 minute for hours, 10 for days and weeks, an hour for months).
fn baseline_step(metric: &MetricDef) -> i64 {
    match metric.window {
        CalendarUnit::Hour => 1,
        CalendarUnit::Day | CalendarUnit::Week => 10,
        CalendarUnit::Month => HOUR,
    }
}

/// `nsm_metric_value{window="baseline_<weeks>w"}` of an hourly or daily metric at `minute`:
/// what the same window `weeks` weeks back held at the same elapsed point, on the step grid.
fn baseline_point(amounts: &Cumulative, metric: &MetricDef, minute: i64, weeks: i64) -> f64 {
    let (length, _) = window_of(metric);
    let start = minute.div_euclid(length) * length;
    let step = baseline_step(metric);
    let elapsed = (minute - start).div_euclid(step) * step;
    let past_start = start - weeks * WEEK;
    amounts.between(past_start, past_start + elapsed)
}

/// `nsm_metric_value{window="baseline"}` at `minute` as nsm exports it: what the comparable
/// past window held at the same elapsed point, on the step grid (the steps that ended by
/// then). Weekly and monthly windows: the previous window; hourly and daily ones: the median
/// of the same weekday (and hour) 1 to 4 weeks back (the mean of the middle two).
fn baseline(amounts: &Cumulative, metric: &MetricDef, minute: i64) -> f64 {
    let (length, _) = window_of(metric);
    let start = minute.div_euclid(length) * length;
    let step = baseline_step(metric);
    let elapsed = (minute - start).div_euclid(step) * step;
    let at = |past_start: i64| amounts.between(past_start, past_start + elapsed);
    match metric.window {
        CalendarUnit::Week | CalendarUnit::Month => at(start - length),
        CalendarUnit::Hour | CalendarUnit::Day => {
            let mut points: Vec<f64> = (1..=4).map(|weeks| at(start - weeks * WEEK)).collect();
            points.sort_by(f64::total_cmp);
            (points[1] + points[2]) / 2.0
        }
    }
}

/// What nsm exports of `metric` (by name) in `scenario` at product minute `minute`:
/// `(current, previous, baseline)`, as [`input_series`] writes them (ratios as their numerator).
/// For measurements outside promtool (the slow burn's signal distributions).
pub fn exported_at(
    scenario: &Scenario,
    config: &Config,
    name: &str,
) -> impl Fn(i64) -> (f64, f64, f64) {
    let (index, metric) = config
        .metrics
        .iter()
        .enumerate()
        .find(|(_, metric)| metric.name == name)
        .expect("metric of the config");
    let seed = index as u64 + 10;
    let (length, _) = window_of(metric);
    let history = (3 * length).max(5 * WEEK);
    let amounts = applied(scenario, seed, Some(metric.role), history);
    let metric = metric.clone();
    move |minute| {
        let start = minute.div_euclid(length) * length;
        (
            amounts.between(start, minute),
            amounts.between(start - length, start),
            baseline(&amounts, &metric, minute),
        )
    }
}

/// What nsm applied of `metric` (by name) in `scenario` between two product minutes
/// (multiples of [`STEP`], from 8 weeks before the test on): what `increase()` of its
/// `current` window reads over that span, across rollovers. For measurements outside
/// promtool (statistics of hourly amounts).
pub fn applied_between(
    scenario: &Scenario,
    config: &Config,
    name: &str,
) -> impl Fn(i64, i64) -> f64 {
    let (index, metric) = config
        .metrics
        .iter()
        .enumerate()
        .find(|(_, metric)| metric.name == name)
        .expect("metric of the config");
    // The same seed as `exported_at`: the same draws.
    let amounts = applied(scenario, index as u64 + 10, Some(metric.role), 8 * WEEK);
    move |from, to| {
        assert!(from >= amounts.start, "before the history");
        amounts.between(from, to)
    }
}

/// promtool's expanding notation of samples (`None`: missing), runs of equal steps merged.
fn notation(samples: &[Option<f64>]) -> String {
    let mut out: Vec<String> = Vec::new();
    let mut index = 0;
    while index < samples.len() {
        match samples[index] {
            None => {
                let run = samples[index..].iter().take_while(|s| s.is_none()).count();
                out.push(if run == 1 {
                    "_".to_string()
                } else {
                    format!("_x{run}")
                });
                index += run;
            }
            Some(first) => {
                let mut last = index;
                let mut step = None;
                while let Some(Some(next)) = samples.get(last + 1) {
                    let Some(Some(current)) = samples.get(last) else {
                        break;
                    };
                    let delta = next - current;
                    let tolerance = 1e-9 * next.abs().max(1.0);
                    match step {
                        None => step = Some(delta),
                        Some(step) if (delta - step).abs() <= tolerance => {}
                        Some(_) => break,
                    }
                    last += 1;
                }
                let run = last - index;
                let step = step.unwrap_or(0.0);
                out.push(match run {
                    0 => format!("{}", round(first)),
                    _ if step == 0.0 => format!("{}x{run}", round(first)),
                    _ if step > 0.0 => format!("{}+{}x{run}", round(first), round(step)),
                    _ => format!("{}-{}x{run}", round(first), round(-step)),
                });
                index = last + 1;
            }
        }
    }
    out.join(" ")
}

/// Twelve significant digits: enough for every rule, short in the test file.
fn round(value: f64) -> f64 {
    if value == 0.0 {
        return 0.0;
    }
    let digits = 12 - value.abs().log10().ceil() as i32;
    let scale = 10f64.powi(digits);
    (value * scale).round() / scale
}

/// The series of one scenario for one config, in a promtool test group.
fn input_series(scenario: &Scenario, config: &Config) -> String {
    let samples = (scenario.length() / STEP + 1) as usize;
    // Product minutes of the samples; exported timestamps are test seconds (promtool's
    // clock starts at 0), so the watermark compares with `time()`.
    let minutes = || (0..samples as i64).map(|index| scenario.start + index * STEP);
    let seconds = |minute: i64| ((minute - scenario.start) * 60) as f64;
    let down = |minute: i64| scenario.nsm_down(minute);
    let mut out = String::from("    input_series:\n");
    let mut series = |selector: String, values: Vec<Option<f64>>| {
        let _ = writeln!(
            out,
            "      - series: '{selector}'\n        values: '{}'",
            notation(&values)
        );
    };
    let exported = |value: &dyn Fn(i64) -> f64| -> Vec<Option<f64>> {
        minutes()
            .map(|minute| (!down(minute)).then(|| value(minute)))
            .collect()
    };

    for (seed, metric) in config.metrics.iter().enumerate() {
        let seed = seed as u64 + 10;
        let (length, trailing) = window_of(metric);
        let history = (3 * length).max(5 * WEEK);
        let amounts = applied(scenario, seed, Some(metric.role), history);
        // A ratio's denominator is the traffic it divides by: it follows the stream, not the
        // changes made to the metric's role.
        let ratio = matches!(
            metric.kind,
            MetricKind::Ratio { .. } | MetricKind::Retention { .. }
        );
        let denominators = ratio.then(|| applied(scenario, seed + 1000, None, history));
        let bounds = |minute: i64, back: i64| -> (i64, i64) {
            if trailing {
                (minute - (back + 1) * length, minute - back * length)
            } else {
                let start = minute.div_euclid(length) * length - back * length;
                (start, start + length)
            }
        };
        for (window, back) in [("current", 0), ("previous", 1), ("before_previous", 2)] {
            let name = &metric.name;
            let part = |cumulative: &Cumulative, minute: i64| {
                let (start, stop) = bounds(minute, back);
                cumulative.between(start, stop.min(minute))
            };
            match &denominators {
                None => series(
                    format!("nsm_metric_value{{metric=\"{name}\",window=\"{window}\"}}"),
                    exported(&|minute| part(&amounts, minute)),
                ),
                Some(denominators) => {
                    // The rate is 40% of the traffic, moved by the metric's own changes.
                    series(
                        format!("nsm_metric_ratio_part{{metric=\"{name}\",window=\"{window}\",part=\"numerator\"}}"),
                        exported(&|minute| {
                            0.4 * part(&amounts, minute) * 100.0 / base_rate(metric.role)
                        }),
                    );
                    series(
                        format!("nsm_metric_ratio_part{{metric=\"{name}\",window=\"{window}\",part=\"denominator\"}}"),
                        exported(&|minute| part(denominators, minute)),
                    );
                }
            }
            // Bounds only of the windows rules read (the growth look-back checks the previous
            // window's, the pace alerts the current one's); every series costs promtool time at
            // every evaluation.
            if back == 2 {
                continue;
            }
            for (series_name, which) in [
                ("nsm_metric_window_start_timestamp_seconds", 0),
                ("nsm_metric_window_end_timestamp_seconds", 1),
            ] {
                series(
                    format!("{series_name}{{metric=\"{name}\",window=\"{window}\"}}"),
                    exported(&|minute| {
                        let (start, stop) = bounds(minute, back);
                        seconds(if which == 0 { start } else { stop })
                    }),
                );
            }
        }
    }

    // The baseline of each calendar window still filling (see `baseline`).
    for (seed, metric) in config.metrics.iter().enumerate() {
        let seed = seed as u64 + 10;
        let (length, trailing) = window_of(metric);
        if trailing || matches!(metric.kind, MetricKind::Threshold { .. }) {
            continue;
        }
        let history = (3 * length).max(5 * WEEK);
        let amounts = applied(scenario, seed, Some(metric.role), history);
        let name = &metric.name;
        if matches!(
            metric.kind,
            MetricKind::Ratio { .. } | MetricKind::Retention { .. }
        ) {
            let denominators = applied(scenario, seed + 1000, None, history);
            series(
                format!("nsm_metric_ratio_part{{metric=\"{name}\",window=\"baseline\",part=\"numerator\"}}"),
                exported(&|minute| {
                    0.4 * baseline(&amounts, metric, minute) * 100.0 / base_rate(metric.role)
                }),
            );
            series(
                format!("nsm_metric_ratio_part{{metric=\"{name}\",window=\"baseline\",part=\"denominator\"}}"),
                exported(&|minute| baseline(&denominators, metric, minute)),
            );
        } else {
            series(
                format!("nsm_metric_value{{metric=\"{name}\",window=\"baseline\"}}"),
                exported(&|minute| baseline(&amounts, metric, minute)),
            );
            // An hourly or daily baseline's points, each week back (the rules take their
            // median: with several instances, the median of the summed points).
            if matches!(metric.window, CalendarUnit::Hour | CalendarUnit::Day) {
                for weeks in 1..=4 {
                    series(
                        format!(
                            "nsm_metric_value{{metric=\"{name}\",window=\"baseline_{weeks}w\"}}"
                        ),
                        exported(&|minute| baseline_point(&amounts, metric, minute, weeks)),
                    );
                }
            }
        }
    }

    // The stream: messages consumed, rejected and dead-lettered.
    let traffic = |minute: i64| {
        if scenario.broker_down(minute) {
            0.0
        } else {
            scenario.rate(1, None, minute.div_euclid(HOUR) * HOUR)
        }
    };
    let mut consumed = 0.0;
    let mut invalid: BTreeMap<&str, f64> = [("wrong_type", 0.0), ("missing_timestamp", 0.0)]
        .into_iter()
        .collect();
    let mut late = 0.0;
    let mut delivered = 0.0;
    let mut failed = 0.0;
    let mut stream: BTreeMap<String, Vec<Option<f64>>> = BTreeMap::new();
    let mut watermark = scenario.start as f64;
    for minute in minutes() {
        if minute > scenario.start {
            let messages = traffic(minute - STEP) * STEP as f64;
            consumed += messages;
            // Background: 0.1% of wrong types and 0.05% late, as every product has.
            let mut rejected_now = messages * 0.0015;
            *invalid.get_mut("wrong_type").expect("reason") += messages * 0.001;
            late += messages * 0.0005;
            for fault in scenario.fault_at(minute - STEP) {
                if let Fault::Rejected { share, reason, .. } = fault {
                    *invalid.entry(reason).or_insert(0.0) += messages * share;
                    rejected_now += messages * share;
                }
            }
            if scenario
                .fault_at(minute - STEP)
                .any(|fault| matches!(fault, Fault::DeadLettersFail { .. }))
            {
                failed += rejected_now;
            } else {
                delivered += rejected_now;
            }
            // The watermark: event time, stopped while nothing is applied, slowed by lag.
            let applied_fully = scenario.rejected_share(minute - STEP) < 1.0;
            if scenario.lagging(minute - STEP) {
                watermark += STEP as f64 * 0.3;
            } else if applied_fully || scenario.broker_down(minute - STEP) {
                watermark = minute as f64;
            }
        }
        let value = |v: f64| (!down(minute)).then_some(v);
        let mut push = |key: String, v: f64| stream.entry(key).or_default().push(value(v));
        let partition = "topic=\"events\",partition=\"0\"";
        push(
            format!("nsm_events_consumed_total{{{partition}}}"),
            consumed,
        );
        for (reason, count) in &invalid {
            push(
                format!("nsm_events_invalid_total{{reason=\"{reason}\"}}"),
                *count,
            );
        }
        push("nsm_events_late_total".to_string(), late);
        push(
            "nsm_dead_letters_total{result=\"delivered\"}".to_string(),
            delivered,
        );
        push(
            "nsm_dead_letters_total{result=\"failed\"}".to_string(),
            failed,
        );
        push(
            format!("nsm_consumer_lag_messages{{{partition}}}"),
            if scenario.lagging(minute) {
                300_000.0
            } else {
                0.0
            },
        );
        push(
            format!("nsm_watermark_timestamp_seconds{{{partition}}}"),
            (watermark - scenario.start as f64) * 60.0,
        );
        push(
            "nsm_kafka_brokers_up".to_string(),
            if scenario.broker_down(minute) {
                0.0
            } else {
                1.0
            },
        );
        push("nsm_partitions_owned".to_string(), 1.0);
        push(
            "nsm_last_publish_timestamp_seconds".to_string(),
            seconds(minute),
        );
    }
    for (selector, values) in stream {
        series(selector, values);
    }
    series(
        "up{job=\"nsm\",instance=\"nsm:9464\"}".to_string(),
        minutes()
            .map(|minute| Some(if down(minute) { 0.0 } else { 1.0 }))
            .collect(),
    );
    out
}

/// The generated rules without annotations: `ALERTS` carries labels only, and annotation
/// templates are checked by `promtool check rules`.
pub fn rules_without_annotations(rules: &str) -> String {
    let mut out = String::new();
    let mut in_annotations = false;
    for line in rules.lines() {
        let indent = line.len() - line.trim_start().len();
        if in_annotations && indent > 8 {
            continue;
        }
        in_annotations = line.trim() == "annotations:";
        if !in_annotations {
            out.push_str(line);
            out.push('\n');
        }
    }
    out
}

/// The alerts of the `nsm-business-alerts` group of a rule file.
pub fn business_alerts(rules: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let mut group = "";
    for line in rules.lines() {
        let trimmed = line.trim();
        if let Some(name) = trimmed.strip_prefix("- name: ") {
            group = if name == "nsm-business-alerts" {
                "business"
            } else {
                ""
            };
        } else if let Some(alert) = trimmed.strip_prefix("- alert: ") {
            if group == "business" {
                out.insert(alert.to_string());
            }
        }
    }
    out
}

/// Runs `scenario` against the rules of `config` (named `name`) in promtool.
pub fn run(name: &str, config: &Config, scenario: &Scenario) -> Outcome {
    let rules = nsm_gen::rules(config, name);
    let directory = tempfile::tempdir().expect("temporary directory");
    std::fs::write(
        directory.path().join("rules.yml"),
        rules_without_annotations(&rules),
    )
    .expect("write rules");
    let end = scenario.length();
    // Without an order promtool evaluates the groups in Go's random map order, so an alert
    // would see this evaluation's recorded values one run and the last one's the next.
    let groups: Vec<&str> = rules
        .lines()
        .filter_map(|line| line.trim().strip_prefix("- name: "))
        .collect();
    let mut test = format!(
        "rule_files:\n  - rules.yml\nevaluation_interval: {}m\ngroup_eval_order: [{}]\ntests:\n  # {}\n  - interval: {STEP}m\n",
        scenario.evaluation,
        groups.join(", "),
        scenario.name
    );
    test.push_str(&input_series(scenario, config));
    // The probe: when each alert was first firing, per metric and routing labels. The
    // sentinel series makes the result never empty, so promtool always prints it.
    let _ = write!(
        test,
        "    promql_expr_test:\n      - expr: 'min by (alertname, metric, severity, owner, reason) \
         (min_over_time(timestamp(ALERTS{{alertstate=\"firing\"}})[{end}m:{step}m])) \
         or label_replace(vector(-1), \"probe\", \"sentinel\", \"\", \"\")'\n        \
         eval_time: {end}m\n        exp_samples:\n          - labels: '{{probe=\"never\"}}'\n            \
         value: 0\n",
        step = scenario.evaluation
    );
    let path = directory.path().join("tests.yml");
    std::fs::write(&path, &test).expect("write tests");
    // NSM_SCENARIO_KEEP=DIR keeps each run's files there, to replay one by hand.
    if let Some(keep) = std::env::var_os("NSM_SCENARIO_KEEP") {
        let stem = format!("{}-{}", name.replace(['/', '.'], "_"), scenario.name)
            .replace(|c: char| !c.is_ascii_alphanumeric() && c != '-', "_");
        let keep = std::path::Path::new(&keep).join(stem);
        let _ = std::fs::create_dir_all(&keep);
        let _ = std::fs::copy(directory.path().join("rules.yml"), keep.join("rules.yml"));
        let _ = std::fs::copy(&path, keep.join("tests.yml"));
    }
    let output = std::process::Command::new(promtool())
        .args(["test", "rules", path.to_str().expect("utf-8 path")])
        .output()
        .expect("promtool runs");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    let got = text
        .lines()
        .find_map(|line| line.trim().strip_prefix("got: "))
        .filter(|got| got.contains("probe=\"sentinel\""))
        .unwrap_or_else(|| {
            panic!(
                "{name} / {}: promtool did not evaluate the probe:\n{}",
                scenario.name,
                text.lines().take(40).collect::<Vec<_>>().join("\n")
            )
        });
    let mut fired: BTreeMap<String, Fired> = BTreeMap::new();
    for (labels, value) in parse_samples(got) {
        let Some(alert) = labels.get("alertname") else {
            continue;
        };
        let entry = fired.entry(alert.clone()).or_insert_with(|| Fired {
            first: i64::MAX,
            ..Fired::default()
        });
        // Product minutes, as the scenario's onset.
        entry.first = entry
            .first
            .min((value / 60.0).round() as i64 + scenario.start);
        if let Some(metric) = labels.get("metric") {
            entry.metrics.insert(metric.clone());
        }
        for key in ["severity", "owner", "reason"] {
            if let Some(value) = labels.get(key) {
                entry.labels.insert((key.to_string(), value.clone()));
            }
        }
    }
    Outcome {
        config: name.to_string(),
        scenario: scenario.name,
        fired,
        business_alerts: business_alerts(&rules),
    }
}

/// `{a="1", b="2"} 9.6E+02, {c="3"} -1E+00` as label maps and values.
fn parse_samples(text: &str) -> Vec<(BTreeMap<String, String>, f64)> {
    let mut out = Vec::new();
    let mut rest = text.trim();
    while let Some(open) = rest.find('{') {
        let Some(close) = rest[open..].find('}') else {
            break;
        };
        let labels_text = &rest[open + 1..open + close];
        let after = &rest[open + close + 1..];
        let value_text = after.trim_start().split(',').next().unwrap_or("").trim();
        let mut labels = BTreeMap::new();
        for pair in labels_text.split(", ") {
            if let Some((key, value)) = pair.split_once('=') {
                labels.insert(key.trim().to_string(), value.trim_matches('"').to_string());
            }
        }
        out.push((labels, value_text.parse().unwrap_or(f64::NAN)));
        rest = after;
    }
    out
}

impl Outcome {
    /// Business alerts that fired.
    pub fn business_pages(&self) -> Vec<&str> {
        self.fired
            .keys()
            .filter(|alert| self.business_alerts.contains(*alert))
            .map(String::as_str)
            .collect()
    }

    pub fn first(&self, alert: &str) -> Option<i64> {
        self.fired.get(alert).map(|fired| fired.first)
    }

    /// Whether the scenario's goal is met.
    pub fn goal_met(&self, scenario: &Scenario) -> bool {
        let onset = scenario.onset.unwrap_or(scenario.start);
        let first_business = self
            .business_pages()
            .iter()
            .filter_map(|alert| self.first(alert))
            .min();
        let first_pipeline = self
            .fired
            .iter()
            .filter(|(alert, _)| !self.business_alerts.contains(*alert))
            .map(|(_, fired)| fired.first)
            .min();
        match scenario.goal {
            Goal::Quiet => first_business.is_none(),
            Goal::PipelineWithin(within) => {
                first_business.is_none()
                    && first_pipeline.is_some_and(|first| first >= onset && first <= onset + within)
            }
            Goal::BusinessWithin(within) => {
                first_business.is_some_and(|first| first >= onset && first <= onset + within)
            }
        }
    }

    /// Problems with what the scenario expects, empty when all hold.
    pub fn check(&self, scenario: &Scenario) -> Vec<String> {
        let mut problems = Vec::new();
        let onset = scenario.onset.unwrap_or(scenario.start);
        let mut allowed = BTreeSet::new();
        for expect in &scenario.expect {
            match *expect {
                Expect::Fires { alert, within } => {
                    allowed.insert(alert);
                    match self.first(alert) {
                        None => problems.push(format!("{alert} never fired")),
                        Some(first) if first < onset => problems.push(format!(
                            "{alert} fired at {} before the onset at {}",
                            minutes(first),
                            minutes(onset)
                        )),
                        Some(first) => {
                            if let Some(within) = within {
                                if first > onset + within {
                                    problems.push(format!(
                                        "{alert} fired {} after the onset, later than {}",
                                        minutes(first - onset),
                                        minutes(within)
                                    ));
                                }
                            }
                        }
                    }
                }
                Expect::Tolerated(alert) => {
                    allowed.insert(alert);
                }
            }
        }
        // Issue 21 item 6: an alert on a guardrail goes to the team that owns it (every
        // guardrail of the example configs has an owner).
        for alert in [
            "GuardrailBreached",
            "NSMUpWhileGuardrailDown",
            "GuardrailWorseningWhileNSMGrows",
        ] {
            if let Some(fired) = self.fired.get(alert) {
                if !fired.labels.iter().any(|(label, _)| label == "owner") {
                    problems.push(format!("{alert} fired without an owner label"));
                }
                if fired.metrics.is_empty() {
                    problems.push(format!("{alert} fired without a metric label"));
                }
            }
        }
        if scenario.goal_asserted && !self.goal_met(scenario) {
            problems.push(format!("issue 21's goal {:?} is not met", scenario.goal));
        }
        for (alert, fired) in &self.fired {
            if !allowed.contains(alert.as_str()) {
                problems.push(format!(
                    "{alert} fired at {} on {:?}, unexpected",
                    minutes(fired.first),
                    fired.metrics
                ));
            }
        }
        problems
            .into_iter()
            .map(|problem| format!("{} / {}: {problem}", self.config, self.scenario))
            .collect()
    }

    /// One line of the confusion table: each alert that fired, when, relative to the onset.
    pub fn row(&self, scenario: &Scenario) -> String {
        let onset = scenario.onset.unwrap_or(scenario.start);
        let fired: Vec<String> = self
            .fired
            .iter()
            .map(|(alert, fired)| {
                let when = if scenario.onset.is_some() {
                    let delta = fired.first - onset;
                    if delta >= 0 {
                        format!("+{}", minutes(delta))
                    } else {
                        format!("-{} (before onset)", minutes(-delta))
                    }
                } else {
                    format!("at {}", minutes(fired.first - scenario.start))
                };
                let metrics = if fired.metrics.is_empty() {
                    String::new()
                } else {
                    format!(
                        " [{}]",
                        fired.metrics.iter().cloned().collect::<Vec<_>>().join(",")
                    )
                };
                let kind = if self.business_alerts.contains(alert) {
                    "B"
                } else {
                    "P"
                };
                format!("{kind}:{alert} {when}{metrics}")
            })
            .collect();
        format!(
            "| {} | {} | {} | {} |",
            self.scenario,
            self.config,
            if fired.is_empty() {
                "none".to_string()
            } else {
                fired.join("; ")
            },
            if self.goal_met(scenario) {
                "met"
            } else {
                "NOT met"
            }
        )
    }
}

/// `5d2h30m` from minutes.
pub fn minutes(total: i64) -> String {
    if total == 0 {
        return "0m".to_string();
    }
    let mut out = String::new();
    let mut rest = total;
    for (unit, size) in [("d", DAY), ("h", HOUR), ("m", 1)] {
        if rest >= size {
            let _ = write!(out, "{}{unit}", rest / size);
            rest %= size;
        }
    }
    out
}
