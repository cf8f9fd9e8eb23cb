//! Window arithmetic: which window an event time belongs to.
//!
//! Calendar windows are aligned in the configured IANA time zone with jiff, so days and weeks
//! that contain a daylight-saving change are 23 or 25 hours long, exactly as a person in that
//! zone would count them. Offsets are never hand-rolled.
//!
//! A trailing window ([`Trailing`]) is kept as step buckets aligned to the Unix epoch, stored
//! as windows, so applying, storing, expiring and restoring are those of calendar windows;
//! only its view differs, summing the buckets of one length that end with the clock's.

use std::fmt;

use jiff::civil::{Date, Weekday};
use jiff::tz::TimeZone;
use jiff::{Timestamp, ToSpan};

use crate::EpochMillis;

/// The calendar unit of a window.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CalendarUnit {
    Hour,
    Day,
    Week,
    Month,
}

impl CalendarUnit {
    /// Parses the config spelling of a window (`"1h"`, `"1d"`, `"1w"`, `"1mo"`, or the
    /// unit's name).
    pub fn parse(text: &str) -> Option<Self> {
        match text.trim() {
            "1h" | "hour" | "hourly" => Some(Self::Hour),
            "1d" | "day" | "daily" => Some(Self::Day),
            "1w" | "week" | "weekly" => Some(Self::Week),
            "1mo" | "month" | "monthly" => Some(Self::Month),
            _ => None,
        }
    }

    /// The short label used in exported series and the API (`hour`, `day`, `week`, `month`).
    pub fn label(self) -> &'static str {
        match self {
            Self::Hour => "hour",
            Self::Day => "day",
            Self::Week => "week",
            Self::Month => "month",
        }
    }

    /// The longest a window of this unit can last, DST included: what retention and
    /// completeness checks must allow for.
    pub fn max_length_ms(self) -> i64 {
        const HOUR_MS: i64 = 3_600_000;
        match self {
            Self::Hour => HOUR_MS,
            Self::Day => 25 * HOUR_MS,
            Self::Week => 7 * 24 * HOUR_MS + HOUR_MS,
            Self::Month => 31 * 24 * HOUR_MS + HOUR_MS,
        }
    }
}

impl fmt::Display for CalendarUnit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.label())
    }
}

/// A half-open interval of event time, `[start_ms, end_ms)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct WindowBounds {
    pub start_ms: EpochMillis,
    pub end_ms: EpochMillis,
}

impl WindowBounds {
    pub fn contains(&self, time_ms: EpochMillis) -> bool {
        self.start_ms <= time_ms && time_ms < self.end_ms
    }
}

/// The calendar windows are aligned in: a time zone and the first day of the week.
#[derive(Debug, Clone)]
pub struct Calendar {
    zone: TimeZone,
    zone_name: String,
    week_start: Weekday,
}

impl Calendar {
    pub fn new(zone_name: &str, week_start: Weekday) -> Result<Self, jiff::Error> {
        let zone = TimeZone::get(zone_name)?;
        Ok(Self {
            zone,
            zone_name: zone_name.to_string(),
            week_start,
        })
    }

    pub fn utc() -> Self {
        Self {
            zone: TimeZone::UTC,
            zone_name: "UTC".to_string(),
            week_start: Weekday::Monday,
        }
    }

    pub fn zone_name(&self) -> &str {
        &self.zone_name
    }

    pub fn week_start(&self) -> Weekday {
        self.week_start
    }

    /// The window of `unit` that contains `time_ms`.
    ///
    /// Returns `None` only for times near the ends of the representable range (years before
    /// -9999 or after 9999), which event validation rejects long before they get here.
    pub fn window_of(&self, unit: CalendarUnit, time_ms: EpochMillis) -> Option<WindowBounds> {
        let timestamp = Timestamp::from_millisecond(time_ms).ok()?;
        match unit {
            CalendarUnit::Hour => {
                // Subtract the local minutes and seconds rather than rebuilding a local 02:00,
                // which would be ambiguous in the repeated hour of a DST fall-back.
                let local = timestamp.to_zoned_datetime(self.zone.clone());
                let into_hour_ms = i64::from(local.minute()) * 60_000
                    + i64::from(local.second()) * 1_000
                    + i64::from(local.subsec_nanosecond()) / 1_000_000;
                let start_ms = time_ms - into_hour_ms;
                Some(WindowBounds {
                    start_ms,
                    end_ms: start_ms + 3_600_000,
                })
            }
            CalendarUnit::Day => {
                let date = timestamp.to_zoned_datetime(self.zone.clone()).date();
                self.days_from(date, 1)
            }
            CalendarUnit::Week => {
                let date = timestamp.to_zoned_datetime(self.zone.clone()).date();
                let days_into_week = self.week_start.until(date.weekday());
                let first = date.checked_sub(i64::from(days_into_week).days()).ok()?;
                self.days_from(first, 7)
            }
            CalendarUnit::Month => {
                let date = timestamp.to_zoned_datetime(self.zone.clone()).date();
                let first = date.first_of_month();
                self.days_from(first, i64::from(date.days_in_month()))
            }
        }
    }

    /// The window of `unit` that ends where `bounds` starts.
    pub fn previous(&self, unit: CalendarUnit, bounds: WindowBounds) -> Option<WindowBounds> {
        self.window_of(unit, bounds.start_ms - 1)
    }

    /// The window of `unit` holding the same local weekday and time as the start of `bounds`,
    /// `weeks` weeks earlier (the seasonal peer of an hourly or daily window). Calendar
    /// arithmetic in the zone, so a DST change in between keeps the local hour.
    pub fn weeks_before(
        &self,
        unit: CalendarUnit,
        bounds: WindowBounds,
        weeks: i64,
    ) -> Option<WindowBounds> {
        let start = Timestamp::from_millisecond(bounds.start_ms)
            .ok()?
            .to_zoned_datetime(self.zone.clone());
        let earlier = start.checked_sub(weeks.weeks()).ok()?;
        self.window_of(unit, earlier.timestamp().as_millisecond())
    }

    /// The interval from the start of local day `first` to the start of the day `days` later.
    fn days_from(&self, first: Date, days: i64) -> Option<WindowBounds> {
        let after = first.checked_add(days.days()).ok()?;
        let start = first
            .to_zoned_datetime(self.zone.clone())
            .ok()?
            .start_of_day()
            .ok()?;
        let end = after
            .to_zoned_datetime(self.zone.clone())
            .ok()?
            .start_of_day()
            .ok()?;
        Some(WindowBounds {
            start_ms: start.timestamp().as_millisecond(),
            end_ms: end.timestamp().as_millisecond(),
        })
    }
}

/// Parses an instant given as RFC 3339 (`2026-11-23T10:00:00Z`) or integer epoch milliseconds.
pub fn parse_instant(text: &str) -> Option<EpochMillis> {
    let text = text.trim();
    if let Ok(millis) = text.parse::<i64>() {
        return Some(millis);
    }
    text.parse::<Timestamp>()
        .ok()
        .map(Timestamp::as_millisecond)
}

impl Calendar {
    /// RFC 3339 text of an instant with the calendar zone's offset (`2026-11-23T00:00:00+01:00`).
    pub fn format_local(&self, time_ms: EpochMillis) -> String {
        match Timestamp::from_millisecond(time_ms) {
            Ok(timestamp) => {
                let offset = timestamp.to_zoned_datetime(self.zone.clone()).offset();
                timestamp.display_with_offset(offset).to_string()
            }
            Err(_) => time_ms.to_string(),
        }
    }
}

/// Parses a weekday name as written in the config (`"monday"`, `"sun"`, ...).
pub fn parse_weekday(text: &str) -> Option<Weekday> {
    let lower = text.trim().to_ascii_lowercase();
    let weekday = match lower.as_str() {
        "monday" | "mon" => Weekday::Monday,
        "tuesday" | "tue" => Weekday::Tuesday,
        "wednesday" | "wed" => Weekday::Wednesday,
        "thursday" | "thu" => Weekday::Thursday,
        "friday" | "fri" => Weekday::Friday,
        "saturday" | "sat" => Weekday::Saturday,
        "sunday" | "sun" => Weekday::Sunday,
        _ => return None,
    };
    Some(weekday)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(text: &str) -> EpochMillis {
        text.parse::<Timestamp>()
            .expect("test timestamp")
            .as_millisecond()
    }

    fn berlin(week_start: Weekday) -> Calendar {
        Calendar::new("Europe/Berlin", week_start).expect("zone")
    }

    #[test]
    fn day_containing_spring_forward_is_23_hours() {
        // Berlin moved from +01:00 to +02:00 at 2026-03-29 02:00 local time.
        let day = berlin(Weekday::Monday)
            .window_of(CalendarUnit::Day, ms("2026-03-29T12:00:00Z"))
            .expect("window");
        assert_eq!(day.start_ms, ms("2026-03-28T23:00:00Z"));
        assert_eq!(day.end_ms, ms("2026-03-29T22:00:00Z"));
        assert_eq!(day.end_ms - day.start_ms, 23 * 3_600_000);
    }

    #[test]
    fn day_containing_fall_back_is_25_hours() {
        // Berlin moved from +02:00 back to +01:00 at 2026-10-25 03:00 local time.
        let day = berlin(Weekday::Monday)
            .window_of(CalendarUnit::Day, ms("2026-10-25T01:30:00Z"))
            .expect("window");
        assert_eq!(day.start_ms, ms("2026-10-24T22:00:00Z"));
        assert_eq!(day.end_ms, ms("2026-10-25T23:00:00Z"));
    }

    #[test]
    fn repeated_fall_back_hour_gives_two_distinct_hour_windows() {
        let calendar = berlin(Weekday::Monday);
        // 02:30 local happens twice: first at 00:30Z (+02:00), then at 01:30Z (+01:00).
        let first = calendar.window_of(CalendarUnit::Hour, ms("2026-10-25T00:30:00Z"));
        let second = calendar.window_of(CalendarUnit::Hour, ms("2026-10-25T01:30:00Z"));
        let first = first.expect("first");
        let second = second.expect("second");
        assert_eq!(first.start_ms, ms("2026-10-25T00:00:00Z"));
        assert_eq!(second.start_ms, ms("2026-10-25T01:00:00Z"));
        assert_eq!(first.end_ms, second.start_ms);
    }

    #[test]
    fn hour_windows_follow_half_hour_zones() {
        let calendar = Calendar::new("Asia/Kolkata", Weekday::Monday).expect("zone");
        let hour = calendar
            .window_of(CalendarUnit::Hour, ms("2026-05-01T10:10:00Z"))
            .expect("w");
        // 10:10Z is 15:40 in Kolkata (+05:30): the local hour 15:00 started at 09:30Z.
        assert_eq!(hour.start_ms, ms("2026-05-01T09:30:00Z"));
        assert_eq!(hour.end_ms, ms("2026-05-01T10:30:00Z"));
    }

    #[test]
    fn week_respects_configured_week_start() {
        // 2026-11-25 is a Wednesday.
        let time = ms("2026-11-25T12:00:00Z");
        let monday = berlin(Weekday::Monday)
            .window_of(CalendarUnit::Week, time)
            .expect("w");
        assert_eq!(monday.start_ms, ms("2026-11-22T23:00:00Z")); // Mon 23 Nov 00:00 +01:00
        assert_eq!(monday.end_ms, ms("2026-11-29T23:00:00Z"));
        let sunday = berlin(Weekday::Sunday)
            .window_of(CalendarUnit::Week, time)
            .expect("w");
        assert_eq!(sunday.start_ms, ms("2026-11-21T23:00:00Z")); // Sun 22 Nov 00:00 +01:00
        assert_eq!(sunday.end_ms, ms("2026-11-28T23:00:00Z"));
    }

    #[test]
    fn week_across_dst_change_is_167_hours() {
        let week = berlin(Weekday::Monday)
            .window_of(CalendarUnit::Week, ms("2026-03-27T12:00:00Z"))
            .expect("window");
        assert_eq!(week.start_ms, ms("2026-03-22T23:00:00Z"));
        assert_eq!(week.end_ms, ms("2026-03-29T22:00:00Z"));
        assert_eq!(week.end_ms - week.start_ms, 167 * 3_600_000);
    }

    #[test]
    fn month_containing_spring_forward_is_one_hour_short() {
        let calendar = berlin(Weekday::Monday);
        let march = calendar
            .window_of(CalendarUnit::Month, ms("2026-03-15T12:00:00Z"))
            .expect("window");
        assert_eq!(march.start_ms, ms("2026-02-28T23:00:00Z")); // 1 March 00:00 +01:00
        assert_eq!(march.end_ms, ms("2026-03-31T22:00:00Z")); // 1 April 00:00 +02:00
        assert_eq!(march.end_ms - march.start_ms, (31 * 24 - 1) * 3_600_000);
        let february = calendar
            .previous(CalendarUnit::Month, march)
            .expect("previous");
        assert_eq!(february.start_ms, ms("2026-01-31T23:00:00Z"));
        assert_eq!(february.end_ms, march.start_ms);
    }

    #[test]
    fn months_have_their_calendar_length_leap_years_included() {
        let calendar = Calendar::utc();
        let february_2028 = calendar
            .window_of(CalendarUnit::Month, ms("2028-02-29T23:59:59.999Z"))
            .expect("window");
        assert_eq!(february_2028.start_ms, ms("2028-02-01T00:00:00Z"));
        assert_eq!(february_2028.end_ms, ms("2028-03-01T00:00:00Z"));
        // The first instant of a month starts it; the end belongs to the next one.
        let december = calendar
            .window_of(CalendarUnit::Month, ms("2026-12-01T00:00:00Z"))
            .expect("window");
        assert_eq!(december.start_ms, ms("2026-12-01T00:00:00Z"));
        assert_eq!(december.end_ms, ms("2027-01-01T00:00:00Z"));
        for unit in [
            CalendarUnit::Hour,
            CalendarUnit::Day,
            CalendarUnit::Week,
            CalendarUnit::Month,
        ] {
            assert_eq!(CalendarUnit::parse(unit.label()), Some(unit));
        }
        assert_eq!(CalendarUnit::parse("1mo"), Some(CalendarUnit::Month));
    }

    #[test]
    fn window_start_belongs_to_its_own_window_and_end_to_the_next() {
        let calendar = berlin(Weekday::Monday);
        let day = calendar
            .window_of(CalendarUnit::Day, ms("2026-06-10T08:00:00Z"))
            .expect("w");
        assert_eq!(
            calendar.window_of(CalendarUnit::Day, day.start_ms),
            Some(day)
        );
        let next = calendar
            .window_of(CalendarUnit::Day, day.end_ms)
            .expect("next");
        assert_eq!(next.start_ms, day.end_ms);
        assert_eq!(calendar.previous(CalendarUnit::Day, next), Some(day));
    }

    #[test]
    fn formats_local_time_and_parses_instants() {
        let calendar = berlin(Weekday::Monday);
        assert_eq!(
            calendar.format_local(ms("2026-11-22T23:00:00Z")),
            "2026-11-23T00:00:00+01:00"
        );
        assert_eq!(
            parse_instant("2026-11-22T23:00:00Z"),
            Some(ms("2026-11-22T23:00:00Z"))
        );
        assert_eq!(parse_instant("1795000000000"), Some(1_795_000_000_000));
        assert_eq!(parse_instant("next week"), None);
    }

    #[test]
    fn parses_units_and_weekdays() {
        assert_eq!(CalendarUnit::parse("1w"), Some(CalendarUnit::Week));
        assert_eq!(CalendarUnit::parse("day"), Some(CalendarUnit::Day));
        assert_eq!(CalendarUnit::parse("2h"), None);
        assert_eq!(parse_weekday("Sunday"), Some(Weekday::Sunday));
        assert_eq!(parse_weekday("funday"), None);
    }
}

/// A trailing window: the last `length_ms`, moving in steps of `step_ms`. Events are kept in
/// step buckets aligned to the Unix epoch (trailing windows ignore the time zone); the value
/// at a clock is the aggregate of the buckets in `[end - length, end)`, where `end` is the end
/// of the bucket holding the clock. It is exact at step granularity and drains as the clock
/// moves on, even without events.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Trailing {
    pub length_ms: i64,
    pub step_ms: i64,
}

impl Trailing {
    /// Steps tried, smallest first: the first that divides the length into at most
    /// [`Trailing::MAX_BUCKETS`] buckets is used.
    const STEPS_MS: [i64; 12] = [
        60_000, 300_000, 600_000, 900_000, 1_800_000, 3_600_000, 7_200_000, 10_800_000, 14_400_000,
        21_600_000, 43_200_000, 86_400_000,
    ];
    pub const MAX_BUCKETS: i64 = 1000;

    /// A trailing window of `length_ms`; `None` unless it is a whole number of minutes
    /// between 1 minute and 1000 days.
    pub fn new(length_ms: i64) -> Option<Trailing> {
        let step_ms = Self::STEPS_MS.iter().copied().find(|step| {
            length_ms >= *step && length_ms % step == 0 && length_ms / step <= Self::MAX_BUCKETS
        })?;
        Some(Trailing { length_ms, step_ms })
    }

    /// The step bucket holding `time_ms`.
    pub fn bucket_of(&self, time_ms: EpochMillis) -> WindowBounds {
        let start_ms = time_ms.div_euclid(self.step_ms) * self.step_ms;
        WindowBounds {
            start_ms,
            end_ms: start_ms + self.step_ms,
        }
    }

    /// The window shown at `clock_ms`: the length ending with the bucket holding the clock.
    pub fn range_at(&self, clock_ms: EpochMillis) -> WindowBounds {
        let end_ms = self.bucket_of(clock_ms).end_ms;
        WindowBounds {
            start_ms: end_ms - self.length_ms,
            end_ms,
        }
    }

    /// The window of the same length just before `range`.
    pub fn previous(&self, range: WindowBounds) -> WindowBounds {
        WindowBounds {
            start_ms: range.start_ms - self.length_ms,
            end_ms: range.start_ms,
        }
    }

    /// The label in exported series and the API: `trailing_7d`, `trailing_90m`.
    pub fn label(&self) -> String {
        let minutes = self.length_ms / 60_000;
        if minutes % (24 * 60) == 0 {
            format!("trailing_{}d", minutes / (24 * 60))
        } else if minutes % 60 == 0 {
            format!("trailing_{}h", minutes / 60)
        } else {
            format!("trailing_{minutes}m")
        }
    }

    /// The calendar period a trailing window is compared over in generated rules.
    pub fn nominal_unit(&self) -> CalendarUnit {
        const HOUR_MS: i64 = 3_600_000;
        match self.length_ms {
            length if length <= HOUR_MS => CalendarUnit::Hour,
            length if length <= 24 * HOUR_MS => CalendarUnit::Day,
            length if length <= 7 * 24 * HOUR_MS => CalendarUnit::Week,
            _ => CalendarUnit::Month,
        }
    }
}

#[cfg(test)]
mod trailing_tests {
    use super::*;

    #[test]
    fn steps_divide_the_length_into_at_most_a_thousand_buckets() {
        let week = Trailing::new(7 * 86_400_000).expect("7d");
        assert_eq!(week.step_ms, 900_000, "15-minute steps: 672 buckets");
        assert_eq!(Trailing::new(3_600_000).map(|t| t.step_ms), Some(60_000));
        assert_eq!(
            Trailing::new(28 * 86_400_000).map(|t| t.step_ms),
            Some(3_600_000)
        );
        assert_eq!(Trailing::new(30_000), None, "under a minute");
        assert_eq!(Trailing::new(90_500), None, "not whole minutes");
        let range = Trailing::new(3_600_000)
            .expect("1h")
            .range_at(10 * 60_000 + 5);
        assert_eq!((range.start_ms, range.end_ms), (-49 * 60_000, 11 * 60_000));
        assert_eq!(week.label(), "trailing_7d");
    }
}
