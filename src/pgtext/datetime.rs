//! Dates, times and intervals as PostgreSQL prints them under `DateStyle=ISO`,
//! `IntervalStyle=iso_8601` and `TimeZone=UTC`, and the proleptic Gregorian calendar
//! arithmetic that turns them into days or microseconds since 1970-01-01.

use super::cursor::Cursor;
use super::Fault;

const MICROS_PER_SECOND: i64 = 1_000_000;
const MICROS_PER_MINUTE: i64 = 60 * MICROS_PER_SECOND;
pub(super) const MICROS_PER_HOUR: i64 = 60 * MICROS_PER_MINUTE;
const MICROS_PER_DAY: i64 = 24 * MICROS_PER_HOUR;

const BEYOND_I64_MICROS: &str =
    "beyond the microseconds since 1970 that 64 bits hold (about 292277 BC to 294247 AD)";

/// `[-]HH:MM:SS[.f]` → signed microseconds: a time of day as PostgreSQL prints a `time`
/// (`00:00:00` to `24:00:00`), or a span beyond it as `copy_text`'s `write_time` writes one
/// (`838:59:59`, `-00:00:00.5`: a `-`, and as many hour digits as the span needs).
///
/// The spans are MySQL's TIME (-838:59:59 to 838:59:59), which shares `ValueType::Time` with
/// PostgreSQL's `time` because it lands in a `time` column; the MySQL snapshot keeps its rows
/// in the log in `write_time`'s text, and reading them back must give the microseconds the
/// binlog gives. The type cannot tell the two apart, the text does: every span beyond a time of
/// day is text PostgreSQL neither prints for a `time` nor accepts as one, so what a PostgreSQL
/// source reads is unchanged, and the sinks still write such a span as text a `time` refuses.
pub(super) fn parse_time(text: &str) -> Result<i64, Fault> {
    let mut cursor = Cursor::new(text);
    let negative = cursor.eat(b'-');
    // 19 digits: every hour count a u64 holds, beyond the 10 an i64 of microseconds needs,
    // so a longer span is out of range rather than malformed.
    let clock = clock(&mut cursor, 19)?;
    cursor.finish()?;
    let magnitude = (i128::from(clock.hour) * 3600 + i128::from(clock.minute * 60 + clock.second))
        * i128::from(MICROS_PER_SECOND)
        + i128::from(clock.fraction);
    i64::try_from(if negative { -magnitude } else { magnitude })
        .map_err(|_| Fault::OutOfRange("beyond the microseconds that 64 bits hold"))
}

/// `YYYY-MM-DD[ BC]` or `±infinity` → days since 1970-01-01.
pub(super) fn parse_date(text: &str) -> Result<i32, Fault> {
    match text {
        "infinity" => return Ok(i32::MAX),
        "-infinity" => return Ok(i32::MIN),
        _ => {}
    }
    let mut cursor = Cursor::new(text);
    let date = calendar_date(&mut cursor)?;
    let bc = cursor.eat_str(" BC");
    cursor.finish()?;
    let days = date.days_since_epoch(bc)?;
    match i32::try_from(days) {
        Ok(days) if days != i32::MAX && days != i32::MIN => Ok(days),
        _ => Err(Fault::OutOfRange(
            "beyond the days since 1970 that 32 bits hold",
        )),
    }
}

/// `HH:MM:SS[.f]±HH[:MM[:SS]]` → the local time of day in microseconds since midnight and
/// the offset in seconds east of UTC, as written (no normalisation).
pub(super) fn parse_timetz(text: &str) -> Result<(i64, i32), Fault> {
    let mut cursor = Cursor::new(text);
    let local = time_of_day(&mut cursor, true)?;
    let offset = utc_offset_seconds(&mut cursor)?;
    cursor.finish()?;
    Ok((local, offset))
}

/// `YYYY-MM-DD HH:MM:SS[.f][±HH[:MM[:SS]]][ BC]` or `±infinity` → microseconds since
/// 1970-01-01 (in UTC when `with_zone`; PostgreSQL writes ` BC` after the offset).
pub(super) fn parse_timestamp(text: &str, with_zone: bool) -> Result<i64, Fault> {
    match text {
        "infinity" => return Ok(i64::MAX),
        "-infinity" => return Ok(i64::MIN),
        _ => {}
    }
    let mut cursor = Cursor::new(text);
    let date = calendar_date(&mut cursor)?;
    cursor.expect(b' ', "expected a space between date and time")?;
    let time = time_of_day(&mut cursor, false)?;
    let offset = if with_zone {
        utc_offset_micros(&mut cursor)?
    } else {
        0
    };
    let bc = cursor.eat_str(" BC");
    cursor.finish()?;
    let days = date.days_since_epoch(bc)?;
    match days
        .checked_mul(MICROS_PER_DAY)
        .and_then(|micros| micros.checked_add(time))
        .and_then(|micros| micros.checked_sub(offset))
    {
        Some(micros) if micros != i64::MAX && micros != i64::MIN => Ok(micros),
        _ => Err(Fault::OutOfRange(BEYOND_I64_MICROS)),
    }
}

/// An interval as `IntervalStyle=iso_8601` prints it (`P1Y2M3DT4H5M6.789S`, `PT0S`, each part
/// with its own sign, only seconds with a fraction) → (months, days, microseconds).
pub(super) fn parse_interval(text: &str) -> Result<(i32, i32, i64), Fault> {
    match text {
        "infinity" => return Ok((i32::MAX, i32::MAX, i64::MAX)),
        "-infinity" => return Ok((i32::MIN, i32::MIN, i64::MIN)),
        _ => {}
    }
    let mut cursor = Cursor::new(text);
    cursor.expect(
        b'P',
        "does not start with P (expected IntervalStyle iso_8601)",
    )?;
    let (mut months, mut days, mut micros) = (0_i128, 0_i128, 0_i128);
    let mut parts = 0;
    // Designators appear at most once each, in this order; `rank` is the last one seen.
    let mut rank = 0;
    while !cursor.is_done() && cursor.peek() != Some(b'T') {
        let (value, fraction) = interval_number(&mut cursor)?;
        let (part_rank, unit, total) = match cursor.next() {
            Some(b'Y') => (1, 12, &mut months),
            Some(b'M') => (2, 1, &mut months),
            Some(b'D') => (3, 1, &mut days),
            _ => return Err(Fault::Invalid("expected Y, M or D after a number")),
        };
        if fraction.is_some() {
            return Err(Fault::Invalid("only seconds may have a fraction"));
        }
        if part_rank <= rank {
            return Err(Fault::Invalid("parts repeated or out of order"));
        }
        rank = part_rank;
        *total += value * unit;
        parts += 1;
    }
    if cursor.eat(b'T') {
        let mut rank = 0;
        let mut time_parts = 0;
        while !cursor.is_done() {
            let (value, fraction) = interval_number(&mut cursor)?;
            let (part_rank, unit) = match cursor.next() {
                Some(b'H') => (1, MICROS_PER_HOUR),
                Some(b'M') => (2, MICROS_PER_MINUTE),
                Some(b'S') => (3, MICROS_PER_SECOND),
                _ => return Err(Fault::Invalid("expected H, M or S after a number")),
            };
            if fraction.is_some() && part_rank != 3 {
                return Err(Fault::Invalid("only seconds may have a fraction"));
            }
            if part_rank <= rank {
                return Err(Fault::Invalid("parts repeated or out of order"));
            }
            rank = part_rank;
            micros += value * i128::from(unit) + fraction.unwrap_or(0);
            time_parts += 1;
        }
        if time_parts == 0 {
            return Err(Fault::Invalid("no hours, minutes or seconds after T"));
        }
        parts += time_parts;
    }
    if parts == 0 {
        return Err(Fault::Invalid("no parts after P"));
    }
    match (
        i32::try_from(months),
        i32::try_from(days),
        i64::try_from(micros),
    ) {
        (Ok(months), Ok(days), Ok(micros)) => Ok((months, days, micros)),
        _ => Err(Fault::OutOfRange(
            "beyond 32-bit months and days or 64-bit microseconds",
        )),
    }
}

/// `[-]digits[.fraction]` of one interval part → (signed value, signed fraction in micros).
/// At most 19 digits, so the value times any unit fits an i128.
fn interval_number(cursor: &mut Cursor<'_>) -> Result<(i128, Option<i128>), Fault> {
    let sign = if cursor.eat(b'-') { -1 } else { 1 };
    let (value, _) = cursor
        .digits(1, 19)
        .ok_or(Fault::Invalid("expected a number"))?;
    let fraction = match cursor.peek() {
        Some(b'.') => Some(sign * i128::from(fraction_micros(cursor)?)),
        _ => None,
    };
    Ok((sign * i128::from(value), fraction))
}

/// A proleptic Gregorian date as written, before the era is applied.
struct CalendarDate {
    year: u64,
    month: u64,
    day: u64,
}

impl CalendarDate {
    /// Days since 1970-01-01, counting the year as BC when `bc` (1 BC is the leap year 0).
    fn days_since_epoch(&self, bc: bool) -> Result<i64, Fault> {
        if self.year == 0 {
            return Err(Fault::Invalid("year 0 does not exist (1 BC precedes 1 AD)"));
        }
        // At most 9 digits, so these conversions and the arithmetic below cannot overflow.
        let year = i64::try_from(self.year).map_err(|_| Fault::OutOfRange("year too large"))?;
        let year = if bc { 1 - year } else { year };
        if !(1..=12).contains(&self.month) {
            return Err(Fault::Invalid("month out of range"));
        }
        if self.day < 1 || self.day > days_in_month(year, self.month) {
            return Err(Fault::Invalid("day out of range for the month"));
        }
        Ok(days_from_civil(year, self.month, self.day))
    }
}

/// `YYYY-MM-DD`, the year with 1 to 9 digits (PostgreSQL pads to 4 and dates reach 5874897).
fn calendar_date(cursor: &mut Cursor<'_>) -> Result<CalendarDate, Fault> {
    const SHAPE: &str = "expected a date as YYYY-MM-DD";
    let (year, _) = cursor.digits(1, 9).ok_or(Fault::Invalid(SHAPE))?;
    cursor.expect(b'-', SHAPE)?;
    let (month, _) = cursor.digits(2, 2).ok_or(Fault::Invalid(SHAPE))?;
    cursor.expect(b'-', SHAPE)?;
    let (day, _) = cursor.digits(2, 2).ok_or(Fault::Invalid(SHAPE))?;
    Ok(CalendarDate { year, month, day })
}

fn is_leap_year(year: i64) -> bool {
    year.rem_euclid(4) == 0 && (year.rem_euclid(100) != 0 || year.rem_euclid(400) == 0)
}

fn days_in_month(year: i64, month: u64) -> u64 {
    match month {
        2 if is_leap_year(year) => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    }
}

/// Days since 1970-01-01 of a proleptic Gregorian date with astronomical year numbering
/// (Howard Hinnant's `days_from_civil`); valid for any year whose days fit an i64.
pub(crate) fn days_from_civil(year: i64, month: u64, day: u64) -> i64 {
    // Month and day are validated (1..=12, 1..=31), so the casts are lossless.
    let (month, day) = (month as i64, day as i64);
    let year = if month <= 2 { year - 1 } else { year };
    let era = year.div_euclid(400);
    let year_of_era = year - era * 400;
    let day_of_year = (153 * ((month + 9) % 12) + 2) / 5 + day - 1;
    let day_of_era = year_of_era * 365 + year_of_era / 4 - year_of_era / 100 + day_of_year;
    era * 146_097 + day_of_era - 719_468
}

/// `HH:MM:SS[.f]` → microseconds since midnight; `24:00:00` only when `allow_24` (the time
/// types allow it, timestamps do not).
fn time_of_day(cursor: &mut Cursor<'_>, allow_24: bool) -> Result<i64, Fault> {
    let Clock {
        hour,
        minute,
        second,
        fraction,
    } = clock(cursor, 2)?;
    let end_of_day = allow_24 && hour == 24 && minute == 0 && second == 0 && fraction == 0;
    if hour > 23 && !end_of_day {
        return Err(Fault::Invalid("time of day out of range"));
    }
    // Two digits each, so the cast is lossless.
    let seconds = (hour * 3600 + minute * 60 + second) as i64;
    Ok(seconds * MICROS_PER_SECOND + fraction)
}

/// The parts of `H…:MM:SS[.f]`.
struct Clock {
    hour: u64,
    minute: u64,
    second: u64,
    /// Microseconds.
    fraction: i64,
}

/// `H…:MM:SS[.f]` with 2 to `max_hour_digits` hour digits, minutes and seconds below 60.
fn clock(cursor: &mut Cursor<'_>, max_hour_digits: usize) -> Result<Clock, Fault> {
    const SHAPE: &str = "expected a time as HH:MM:SS";
    let (hour, _) = cursor
        .digits(2, max_hour_digits)
        .ok_or(Fault::Invalid(SHAPE))?;
    cursor.expect(b':', SHAPE)?;
    let (minute, _) = cursor.digits(2, 2).ok_or(Fault::Invalid(SHAPE))?;
    cursor.expect(b':', SHAPE)?;
    let (second, _) = cursor.digits(2, 2).ok_or(Fault::Invalid(SHAPE))?;
    let fraction = match cursor.peek() {
        Some(b'.') => fraction_micros(cursor)?,
        _ => 0,
    };
    if minute > 59 || second > 59 {
        return Err(Fault::Invalid("time of day out of range"));
    }
    Ok(Clock {
        hour,
        minute,
        second,
        fraction,
    })
}

/// `.` and 1 to 6 digits (PostgreSQL prints microseconds without trailing zeros) → micros.
fn fraction_micros(cursor: &mut Cursor<'_>) -> Result<i64, Fault> {
    cursor.expect(b'.', "expected a fraction")?;
    let (value, count) = cursor
        .digits(1, 6)
        .ok_or(Fault::Invalid("expected 1 to 6 digits after the point"))?;
    if cursor.peek().is_some_and(|b| b.is_ascii_digit()) {
        return Err(Fault::Invalid("more than 6 fractional digits"));
    }
    // At most 6 digits: both casts are lossless.
    Ok(value as i64 * 10_i64.pow(6 - count as u32))
}

/// `±HH[:MM[:SS]]` → the offset east of UTC in microseconds.
fn utc_offset_micros(cursor: &mut Cursor<'_>) -> Result<i64, Fault> {
    Ok(i64::from(utc_offset_seconds(cursor)?) * MICROS_PER_SECOND)
}

/// `±HH[:MM[:SS]]` → the offset east of UTC in seconds. Seconds appear for local mean time
/// offsets of old timestamps; PostgreSQL allows offsets up to 15:59:59.
fn utc_offset_seconds(cursor: &mut Cursor<'_>) -> Result<i32, Fault> {
    const SHAPE: &str = "expected a UTC offset as +HH, +HH:MM or +HH:MM:SS";
    let sign = match cursor.next() {
        Some(b'+') => 1,
        Some(b'-') => -1,
        _ => return Err(Fault::Invalid(SHAPE)),
    };
    let (hours, _) = cursor.digits(2, 2).ok_or(Fault::Invalid(SHAPE))?;
    let mut minutes = 0;
    let mut seconds = 0;
    if cursor.eat(b':') {
        (minutes, _) = cursor.digits(2, 2).ok_or(Fault::Invalid(SHAPE))?;
        if cursor.eat(b':') {
            (seconds, _) = cursor.digits(2, 2).ok_or(Fault::Invalid(SHAPE))?;
        }
    }
    if hours > 15 || minutes > 59 || seconds > 59 {
        return Err(Fault::Invalid("UTC offset out of range"));
    }
    // Two digits each, so the cast is lossless.
    Ok(sign * (hours * 3600 + minutes * 60 + seconds) as i32)
}

#[cfg(test)]
mod tests {
    use super::super::test_support::*;
    use super::*;
    // The encoder's calendar math, independent of `days_from_civil` under test.
    use crate::event::{Value, ValueType};
    use crate::pgtext::copy_text::civil_from_days;

    use chrono::Datelike;
    use proptest::prelude::*;

    /// 4714-11-24 00:00:00 BC, PostgreSQL's earliest timestamp (Julian day 0).
    const PG_MIN_TIMESTAMP: i64 = -210_866_803_200_000_000;
    /// PostgreSQL's earliest and latest dates as days since 1970.
    const PG_MIN_DATE: i32 = -2_440_588;
    const PG_MAX_DATE: i32 = 2_145_042_905;

    /// A date as PostgreSQL prints it with DateStyle=ISO: the year padded to 4 digits and
    /// the era as a ` BC` suffix, returned separately because it goes last.
    fn pg_date(year: i64, month: i64, day: i64) -> (String, &'static str) {
        let (year, era) = if year <= 0 {
            (1 - year, " BC")
        } else {
            (year, "")
        };
        (format!("{year:04}-{month:02}-{day:02}"), era)
    }

    /// `HH:MM:SS[.f]` with trailing zeros of the fraction trimmed, as PostgreSQL prints it.
    fn pg_time(micros: i64) -> String {
        let seconds = micros / 1_000_000;
        let fraction = micros % 1_000_000;
        let mut out = format!(
            "{:02}:{:02}:{:02}",
            seconds / 3600,
            seconds / 60 % 60,
            seconds % 60
        );
        if fraction != 0 {
            out.push('.');
            out.push_str(format!("{fraction:06}").trim_end_matches('0'));
        }
        out
    }

    /// `+HH`, `+HH:MM` or `+HH:MM:SS`, as PostgreSQL prints a UTC offset in seconds.
    fn pg_offset(offset_seconds: i64) -> String {
        let sign = if offset_seconds < 0 { '-' } else { '+' };
        let abs = offset_seconds.abs();
        let (hours, minutes, seconds) = (abs / 3600, abs / 60 % 60, abs % 60);
        match (minutes, seconds) {
            (0, 0) => format!("{sign}{hours:02}"),
            (_, 0) => format!("{sign}{hours:02}:{minutes:02}"),
            _ => format!("{sign}{hours:02}:{minutes:02}:{seconds:02}"),
        }
    }

    /// A timestamp as PostgreSQL prints it, with the offset when given: `utc_micros` shown in
    /// the zone `offset_seconds` east of UTC.
    fn pg_timestamp(utc_micros: i64, offset_seconds: Option<i64>) -> Option<String> {
        let local = utc_micros.checked_add(offset_seconds.unwrap_or(0) * 1_000_000)?;
        let (year, month, day) = civil_from_days(local.div_euclid(MICROS_PER_DAY));
        let (date, era) = pg_date(year, month, day);
        let time = pg_time(local.rem_euclid(MICROS_PER_DAY));
        let offset = offset_seconds.map(pg_offset).unwrap_or_default();
        Some(format!("{date} {time}{offset}{era}"))
    }

    /// An interval as PostgreSQL's `EncodeInterval` prints it with IntervalStyle=iso_8601.
    fn pg_interval(months: i32, days: i32, micros: i64) -> String {
        let (year, month) = (months / 12, months % 12);
        let hour = micros / MICROS_PER_HOUR;
        let minute = micros % MICROS_PER_HOUR / MICROS_PER_MINUTE;
        let second = micros % MICROS_PER_MINUTE / MICROS_PER_SECOND;
        let fraction = micros % MICROS_PER_SECOND;
        if year == 0 && month == 0 && days == 0 && micros == 0 {
            return "PT0S".to_owned();
        }
        let mut out = String::from("P");
        let mut part = |value: i64, designator: char| {
            if value != 0 {
                out.push_str(&format!("{value}{designator}"));
            }
        };
        part(year.into(), 'Y');
        part(month.into(), 'M');
        part(days.into(), 'D');
        if micros != 0 {
            out.push('T');
        }
        let mut part = |value: i64, designator: char| {
            if value != 0 {
                out.push_str(&format!("{value}{designator}"));
            }
        };
        part(hour, 'H');
        part(minute, 'M');
        if second != 0 || fraction != 0 {
            if second < 0 || fraction < 0 {
                out.push('-');
            }
            out.push_str(&second.abs().to_string());
            if fraction != 0 {
                out.push('.');
                out.push_str(format!("{:06}", fraction.abs()).trim_end_matches('0'));
            }
            out.push('S');
        }
        out
    }

    #[test]
    fn dates_count_days_from_1970() {
        let date = |s| parse(&ValueType::Date, s);
        assert_eq!(date("1970-01-01"), Value::Date(0));
        assert_eq!(date("1970-01-02"), Value::Date(1));
        assert_eq!(date("1969-12-31"), Value::Date(-1));
        assert_eq!(date("2000-01-01"), Value::Date(10_957));
        assert_eq!(date("2024-01-05"), Value::Date(19_727));
        assert_eq!(date("2024-02-29"), Value::Date(19_782));
        assert_eq!(date("10000-01-01"), Value::Date(2_932_897));
    }

    #[test]
    fn bc_dates_use_proleptic_gregorian_with_1_bc_as_a_leap_year() {
        // Expected values from PostgreSQL 15: `'…'::date - '1970-01-01'::date`.
        let date = |s| parse(&ValueType::Date, s);
        assert_eq!(date("0044-03-15 BC"), Value::Date(-735_160));
        assert_eq!(date("0001-01-01 BC"), Value::Date(-719_528));
        assert_eq!(date("0001-12-31 BC"), Value::Date(-719_163));
        assert_eq!(date("0001-01-01"), Value::Date(-719_162));
        assert_eq!(date("0001-02-29 BC"), Value::Date(-719_469));
        assert_eq!(date("0005-02-29 BC"), Value::Date(-720_930));
        assert_eq!(date("4714-11-24 BC"), Value::Date(PG_MIN_DATE));
        assert_eq!(date("5874897-12-31"), Value::Date(PG_MAX_DATE));
    }

    #[test]
    fn date_infinity_and_invalid_dates() {
        assert_eq!(parse(&ValueType::Date, "infinity"), Value::Date(i32::MAX));
        assert_eq!(parse(&ValueType::Date, "-infinity"), Value::Date(i32::MIN));
        for bad in [
            "2023-02-29",
            "2024-13-01",
            "2024-00-10",
            "2024-04-31",
            "2024-01-00",
            "0000-01-01",
            "2024-1-05",
            "2024-01-05 AD",
            "2024-01-05 BC ",
            "2024/01/05",
            "",
            "Infinity",
        ] {
            assert!(is_invalid(&ValueType::Date, bad), "{bad:?}");
        }
        // Well-formed, but not a 32-bit day count.
        assert!(is_out_of_range(&ValueType::Date, "999999999-01-01"));
        assert!(is_out_of_range(&ValueType::Date, "999999999-01-01 BC"));
    }

    #[test]
    fn times_count_micros_from_midnight() {
        let time = |s| parse(&ValueType::Time, s);
        assert_eq!(time("00:00:00"), Value::Time(0));
        assert_eq!(time("12:34:56"), Value::Time(45_296_000_000));
        assert_eq!(time("12:34:56.123456"), Value::Time(45_296_123_456));
        assert_eq!(time("12:34:56.5"), Value::Time(45_296_500_000));
        assert_eq!(time("12:34:56.000001"), Value::Time(45_296_000_001));
        assert_eq!(time("23:59:59.999999"), Value::Time(86_399_999_999));
        assert_eq!(time("24:00:00"), Value::Time(86_400_000_000));
        for bad in [
            "12:60:00",
            "12:00:60",
            "12:00",
            "12:00:00.",
            "12:00:00.1234567",
            "12:00:00+00",
            "1:00:00",
            "+12:00:00",
            "--12:00:00",
            "- 12:00:00",
            "12:00:00-",
        ] {
            assert!(is_invalid(&ValueType::Time, bad), "{bad:?}");
        }
    }

    #[test]
    fn times_beyond_a_day_or_below_zero_read_as_the_mysql_span_written() {
        let time = |s| parse(&ValueType::Time, s);
        assert_eq!(time("838:59:59"), Value::Time(3_020_399_000_000));
        assert_eq!(time("-838:59:59"), Value::Time(-3_020_399_000_000));
        assert_eq!(time("-00:00:00.5"), Value::Time(-500_000));
        assert_eq!(time("-00:00:00.000001"), Value::Time(-1));
        assert_eq!(time("-01:00:00.25"), Value::Time(-3_600_250_000));
        assert_eq!(time("24:00:00.000001"), Value::Time(86_400_000_001));
        assert_eq!(time("25:00:00"), Value::Time(90_000_000_000));
        // The extremes of 64 bits, as `write_time` writes them.
        assert_eq!(time("2562047788:00:54.775807"), Value::Time(i64::MAX));
        assert_eq!(time("-2562047788:00:54.775808"), Value::Time(i64::MIN));
        assert!(is_out_of_range(&ValueType::Time, "2562047788:00:54.775808"));
        assert!(is_out_of_range(
            &ValueType::Time,
            "9999999999999999999:00:00"
        ));
        assert!(is_invalid(&ValueType::Time, "99999999999999999999:00:00"));
        for bad in [
            "838:60:00",
            "-838:59:60",
            "-8:00:00",
            "-838:59",
            "838:59:59.1234567",
        ] {
            assert!(is_invalid(&ValueType::Time, bad), "{bad:?}");
        }
        // A span is never a time of day with a zone or in a timestamp.
        assert!(is_invalid(&ValueType::TimeTz, "25:00:00+00"));
        assert!(is_invalid(&ValueType::TimeTz, "-01:00:00+00"));
        assert!(is_invalid(&ValueType::Timestamp, "2024-01-01 24:00:01"));
    }

    /// A timetz value from its local time of day in seconds plus microseconds and its offset
    /// in seconds east of UTC.
    fn timetz_value(seconds: i64, fraction: i64, offset_secs: i32) -> Value {
        Value::TimeTz {
            micros: seconds * MICROS_PER_SECOND + fraction,
            offset_secs,
        }
    }

    #[test]
    fn timetz_keeps_its_local_time_and_offset() {
        let timetz = |s| parse(&ValueType::TimeTz, s);
        let hms = |h: i64, m: i64, s: i64| h * 3600 + m * 60 + s;
        assert_eq!(
            timetz("12:34:56.789+05:30"),
            timetz_value(hms(12, 34, 56), 789_000, 19_800)
        );
        assert_eq!(
            timetz("12:34:56.789+05:30:15"),
            timetz_value(hms(12, 34, 56), 789_000, 19_815)
        );
        assert_eq!(timetz("12:00:00+00"), timetz_value(hms(12, 0, 0), 0, 0));
        assert_eq!(
            timetz("12:00:00-08"),
            timetz_value(hms(12, 0, 0), 0, -28_800)
        );
        assert_eq!(
            timetz("12:00:00.000001+05"),
            timetz_value(hms(12, 0, 0), 1, 18_000)
        );
        assert_eq!(
            timetz("12:00:00.100000+00"),
            timetz_value(hms(12, 0, 0), 100_000, 0)
        );
        assert_eq!(
            timetz("23:59:59.999999-14:59"),
            timetz_value(hms(23, 59, 59), 999_999, -(14 * 3600 + 59 * 60))
        );
        assert_eq!(
            timetz("00:00:00-15:59:59"),
            timetz_value(0, 0, -(15 * 3600 + 59 * 60 + 59))
        );
        // Equal instants in different zones stay different values, as in PostgreSQL.
        assert_ne!(timetz("12:00:00+01"), timetz("11:00:00+00"));
    }

    #[test]
    fn timetz_allows_end_of_day_and_rejects_malformed_text() {
        let timetz = |s| parse(&ValueType::TimeTz, s);
        assert_eq!(timetz("24:00:00-08"), timetz_value(24 * 3600, 0, -28_800));
        assert_eq!(timetz("24:00:00+00"), timetz_value(24 * 3600, 0, 0));
        for bad in [
            "12:00:00",
            "12:00:00+16",
            "12:00:00+05:60",
            "12:00:00+05:30:60",
            "12:00:00+5",
            "12:00:00Z",
            "24:00:00.000001+00",
            "12:00:00+05:30 ",
        ] {
            assert!(is_invalid(&ValueType::TimeTz, bad), "{bad:?}");
        }
    }

    #[test]
    fn timestamps_count_micros_from_1970() {
        let timestamp = |s| parse(&ValueType::Timestamp, s);
        assert_eq!(timestamp("1970-01-01 00:00:00"), Value::Timestamp(0));
        assert_eq!(
            timestamp("2024-01-05 12:34:56"),
            Value::Timestamp(1_704_458_096_000_000)
        );
        assert_eq!(
            timestamp("2024-01-05 12:34:56.5"),
            Value::Timestamp(1_704_458_096_500_000)
        );
        assert_eq!(
            timestamp("2024-01-05 12:34:56.000123"),
            Value::Timestamp(1_704_458_096_000_123)
        );
        assert_eq!(
            timestamp("1969-12-31 23:59:59.999999"),
            Value::Timestamp(-1)
        );
        assert_eq!(
            timestamp("0044-03-15 12:00:00 BC"),
            Value::Timestamp(-63_517_780_800_000_000)
        );
        assert_eq!(
            timestamp("4714-11-24 00:00:00 BC"),
            Value::Timestamp(PG_MIN_TIMESTAMP)
        );
        assert_eq!(timestamp("infinity"), Value::Timestamp(i64::MAX));
        assert_eq!(timestamp("-infinity"), Value::Timestamp(i64::MIN));
    }

    #[test]
    fn timestamps_beyond_64_bit_micros_are_out_of_range() {
        assert_eq!(
            parse(&ValueType::Timestamp, "294247-01-10 04:00:54.775806"),
            Value::Timestamp(i64::MAX - 1)
        );
        // i64::MAX itself is the infinity sentinel.
        assert!(is_out_of_range(
            &ValueType::Timestamp,
            "294247-01-10 04:00:54.775807"
        ));
        // PostgreSQL's latest timestamp is past what 64-bit micros since 1970 hold.
        assert!(is_out_of_range(
            &ValueType::Timestamp,
            "294276-12-31 23:59:59.999999"
        ));
        assert!(is_out_of_range(
            &ValueType::TimestampTz,
            "999999999-12-31 23:59:59+00"
        ));
        assert!(is_out_of_range(
            &ValueType::Timestamp,
            "999999999-12-31 23:59:59 BC"
        ));
    }

    #[test]
    fn malformed_timestamps_are_invalid() {
        for bad in [
            "2024-01-05T12:34:56",
            "2024-01-05 24:00:00",
            "2024-01-05 12:34",
            "2024-01-05",
            "2024-01-05 12:34:56+00",
            "2024-01-05 12:34:56 AD",
            "2024-02-30 00:00:00",
            "0000-01-01 00:00:00",
            "",
        ] {
            assert!(is_invalid(&ValueType::Timestamp, bad), "{bad:?}");
        }
        for bad in [
            "2024-01-05 12:34:56",
            "2024-01-05 12:34:56 BC+00",
            "2024-01-05 12:34:56 UTC",
            "2024-01-05 12:34:56+00:00:00:00",
        ] {
            assert!(is_invalid(&ValueType::TimestampTz, bad), "{bad:?}");
        }
    }

    #[test]
    fn timestamptz_applies_the_offset() {
        let timestamptz = |s| parse(&ValueType::TimestampTz, s);
        assert_eq!(
            timestamptz("2000-01-01 00:00:00+00"),
            Value::TimestampTz(946_684_800_000_000)
        );
        assert_eq!(
            timestamptz("2000-01-01 05:30:00+05:30"),
            Value::TimestampTz(946_684_800_000_000)
        );
        assert_eq!(
            timestamptz("2024-01-05 12:34:56.5-08"),
            Value::TimestampTz(1_704_486_896_500_000)
        );
        // A local mean time offset, as PostgreSQL prints 1900 in Europe/Amsterdam.
        assert_eq!(
            timestamptz("1900-01-01 00:00:00+00:19:32"),
            Value::TimestampTz(-2_208_989_972_000_000)
        );
        // The era follows the offset.
        assert_eq!(
            timestamptz("0044-03-15 12:00:00+00 BC"),
            Value::TimestampTz(-63_517_780_800_000_000)
        );
        assert_eq!(timestamptz("infinity"), Value::TimestampTz(i64::MAX));
        assert_eq!(timestamptz("-infinity"), Value::TimestampTz(i64::MIN));
    }

    #[test]
    fn intervals_in_iso_8601() {
        let interval = |s| parse(&ValueType::Interval, s);
        let expect = |months, days, micros| Value::Interval {
            months,
            days,
            micros,
        };
        assert_eq!(
            interval("P1Y2M3DT4H5M6.789S"),
            expect(14, 3, 14_706_789_000)
        );
        assert_eq!(interval("PT0S"), expect(0, 0, 0));
        assert_eq!(interval("P1D"), expect(0, 1, 0));
        assert_eq!(interval("PT55M"), expect(0, 0, 3_300_000_000));
        assert_eq!(interval("P-7M"), expect(-7, 0, 0));
        assert_eq!(
            interval("P-1Y-2M3DT-4H-5M-6.5S"),
            expect(-14, 3, -14_706_500_000)
        );
        assert_eq!(interval("PT-0.000001S"), expect(0, 0, -1));
        assert_eq!(interval("PT0.5S"), expect(0, 0, 500_000));
        assert_eq!(interval("PT2562047788H54.775807S"), expect(0, 0, i64::MAX));
        assert_eq!(
            interval("PT-2562047788H-54.775808S"),
            expect(0, 0, i64::MIN)
        );
        assert_eq!(
            interval("P-178956970Y-8M-2147483648D"),
            expect(i32::MIN, i32::MIN, 0)
        );
        assert_eq!(interval("infinity"), expect(i32::MAX, i32::MAX, i64::MAX));
        assert_eq!(interval("-infinity"), expect(i32::MIN, i32::MIN, i64::MIN));
    }

    #[test]
    fn malformed_intervals_are_invalid() {
        for bad in [
            "1 day",
            "@ 1 day",
            "",
            "P",
            "PT",
            "P1DT",
            "P1H",
            "PT1Y",
            "PT1D",
            "P1M1Y",
            "P1Y1Y",
            "PT1S1M",
            "P1.5Y",
            "PT1.5H",
            "PT1.1234567S",
            "PT1.S",
            "P-Y",
            "P1Y ",
            "P1",
            "PT1H2",
        ] {
            assert!(is_invalid(&ValueType::Interval, bad), "{bad:?}");
        }
        assert!(is_out_of_range(&ValueType::Interval, "P178956971Y"));
        assert!(is_out_of_range(&ValueType::Interval, "P2147483648D"));
        assert!(is_out_of_range(&ValueType::Interval, "PT2562047788H55S"));
        assert!(is_out_of_range(
            &ValueType::Interval,
            "PT9999999999999999999H"
        ));
    }

    #[test]
    fn days_from_civil_agrees_with_chrono_at_the_edges() {
        for (year, month, day) in [
            (1970, 1, 1),
            (2000, 2, 29),
            (-262_143, 1, 1),
            (262_142, 12, 31),
            (0, 2, 29),
        ] {
            let Some(date) = chrono::NaiveDate::from_ymd_opt(year, month, day) else {
                panic!("chrono rejects {year}-{month}-{day}");
            };
            assert_eq!(
                days_from_civil(year.into(), month.into(), day.into()),
                i64::from(date.num_days_from_ce()) - 719_163,
                "{year}-{month}-{day}"
            );
        }
    }

    proptest! {
        #[test]
        fn timestamps_round_trip_through_postgres_text(
            micros in PG_MIN_TIMESTAMP..i64::MAX,
        ) {
            let Some(printed) = pg_timestamp(micros, None) else {
                return Err(TestCaseError::reject("unprintable"));
            };
            prop_assert_eq!(parse(&ValueType::Timestamp, &printed), Value::Timestamp(micros));
        }

        #[test]
        fn timestamptz_round_trips_in_any_zone(
            micros in PG_MIN_TIMESTAMP..i64::MAX - 16 * MICROS_PER_HOUR,
            offset_seconds in -(15 * 3600 + 59 * 60 + 59)..=(15 * 3600 + 59 * 60 + 59_i64),
        ) {
            let Some(printed) = pg_timestamp(micros, Some(offset_seconds)) else {
                return Err(TestCaseError::reject("unprintable"));
            };
            prop_assert_eq!(parse(&ValueType::TimestampTz, &printed), Value::TimestampTz(micros));
        }

        #[test]
        fn dates_round_trip_over_postgres_range(days in PG_MIN_DATE..=PG_MAX_DATE) {
            let (year, month, day) = civil_from_days(days.into());
            let (date, era) = pg_date(year, month, day);
            prop_assert_eq!(parse(&ValueType::Date, &format!("{date}{era}")), Value::Date(days));
        }

        #[test]
        fn dates_agree_with_chrono(days in -95_000_000..95_000_000_i32) {
            let Some(date) = chrono::NaiveDate::from_num_days_from_ce_opt(days + 719_163) else {
                return Err(TestCaseError::reject("beyond chrono"));
            };
            let (printed, era) = pg_date(date.year().into(), date.month().into(), date.day().into());
            prop_assert_eq!(parse(&ValueType::Date, &format!("{printed}{era}")), Value::Date(days));
        }

        #[test]
        fn times_round_trip(micros in 0..=MICROS_PER_DAY) {
            prop_assert_eq!(parse(&ValueType::Time, &pg_time(micros)), Value::Time(micros));
        }

        #[test]
        fn timetz_round_trips_through_postgres_text(
            local in 0..=MICROS_PER_DAY,
            offset_secs in -(15 * 3600 + 59 * 60 + 59)..=(15 * 3600 + 59 * 60 + 59_i32),
        ) {
            let printed = format!("{}{}", pg_time(local), pg_offset(offset_secs.into()));
            prop_assert_eq!(
                parse(&ValueType::TimeTz, &printed),
                Value::TimeTz { micros: local, offset_secs }
            );
        }

        #[test]
        fn intervals_round_trip(months in any::<i32>(), days in any::<i32>(), micros in any::<i64>()) {
            prop_assert_eq!(
                parse(&ValueType::Interval, &pg_interval(months, days, micros)),
                Value::Interval { months, days, micros }
            );
        }
    }
}
