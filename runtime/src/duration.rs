//! One duration syntax for every flag and variable: `500ms`, `15s`, `2m`, `1h`, decimals allowed
//! (`1.5s`). A bare number is read in the flag's own unit — seconds by default, milliseconds for
//! the old `*_MS` spellings — so `--heartbeat-interval-seconds 5` and `--membership-refresh-ms 100`
//! keep their meaning beside `--heartbeat-interval 5s` and `--membership-refresh 100ms`.
//!
//! Needs no dependency: the agent's library validates its environment with it. With the `cli`
//! feature a [`DurationParser`] is also a clap value parser.

use std::fmt;
use std::time::Duration;

/// What a number without a unit means.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BareUnit {
    /// `15` is 15 seconds.
    Seconds,
    /// `250` is 250 milliseconds (the old `*_MS` flags and variables).
    Millis,
}

/// Parses a duration and checks its bounds. Built in `const` context, so a flag and its old
/// spelling can share one set of bounds:
///
/// ```
/// use std::time::Duration;
/// use apollo_runtime::duration::DurationParser;
/// const HEARTBEAT: DurationParser = DurationParser::new()
///     .at_least(Duration::from_secs(1))
///     .at_most(Duration::from_secs(3600))
///     .whole_seconds();
/// assert_eq!(HEARTBEAT.parse("2m"), Ok(Duration::from_secs(120)));
/// assert_eq!(HEARTBEAT.parse("15"), Ok(Duration::from_secs(15)));
/// assert!(HEARTBEAT.parse("1500ms").is_err());
/// assert_eq!(
///     DurationParser::new().bare_millis().parse("100"),
///     Ok(Duration::from_millis(100))
/// );
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DurationParser {
    bare: BareUnit,
    min: Duration,
    max: Option<Duration>,
    positive: bool,
    whole_seconds: bool,
}

impl Default for DurationParser {
    fn default() -> Self {
        Self::new()
    }
}

impl DurationParser {
    /// Any duration, bare numbers in seconds.
    pub const fn new() -> Self {
        Self {
            bare: BareUnit::Seconds,
            min: Duration::ZERO,
            max: None,
            positive: false,
            whole_seconds: false,
        }
    }

    /// Bare numbers are seconds (the default; for the old `*_SECONDS` spellings of a flag whose
    /// parser says otherwise).
    pub const fn bare_seconds(mut self) -> Self {
        self.bare = BareUnit::Seconds;
        self
    }

    /// Bare numbers are milliseconds (the old `*_MS` spellings).
    pub const fn bare_millis(mut self) -> Self {
        self.bare = BareUnit::Millis;
        self
    }

    /// Refuses zero.
    pub const fn positive(mut self) -> Self {
        self.positive = true;
        self
    }

    /// Refuses anything shorter than `min`.
    pub const fn at_least(mut self, min: Duration) -> Self {
        self.min = min;
        self
    }

    /// Refuses anything longer than `max`.
    pub const fn at_most(mut self, max: Duration) -> Self {
        self.max = Some(max);
        self
    }

    /// Refuses fractions of a second (values sent on in whole seconds: heartbeat intervals,
    /// long-poll waits, Lease durations).
    pub const fn whole_seconds(mut self) -> Self {
        self.whole_seconds = true;
        self
    }

    /// What bare numbers mean.
    pub const fn bare_unit(&self) -> BareUnit {
        self.bare
    }

    /// Parses `text` and checks the bounds. The error says what was wrong and what is accepted.
    pub fn parse(&self, text: &str) -> Result<Duration, String> {
        let value = parse_with_bare_unit(text, self.bare)?;
        if self.positive && value.is_zero() {
            return Err(format!("{:?} must be above zero", text.trim()));
        }
        if value < self.min {
            return Err(format!(
                "{:?} is below the least allowed, {}",
                text.trim(),
                Human(self.min)
            ));
        }
        if let Some(max) = self.max {
            if value > max {
                return Err(format!(
                    "{:?} is above the most allowed, {}",
                    text.trim(),
                    Human(max)
                ));
            }
        }
        if self.whole_seconds && value.subsec_nanos() != 0 {
            return Err(format!("{:?} must be whole seconds", text.trim()));
        }
        Ok(value)
    }
}

/// Parses `500ms`, `15s`, `2m`, `1h`, or a bare number of seconds; decimals allowed.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    parse_with_bare_unit(text, BareUnit::Seconds)
}

/// Nanoseconds in one of each unit.
const NANOS_PER_MILLI: u128 = 1_000_000;
const NANOS_PER_SECOND: u128 = 1_000_000_000;

/// Parses the syntax, reading a bare number in `bare`. Decimal digits are taken exactly (no
/// floating point), down to the nanosecond.
pub fn parse_with_bare_unit(text: &str, bare: BareUnit) -> Result<Duration, String> {
    let text = text.trim();
    let not_a_duration = || format!("{text:?} is not a duration (e.g. 500ms, 15s, 2m, 1h)");
    let split = text
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    if number.is_empty() {
        return Err(not_a_duration());
    }
    let unit_nanos = match unit.trim_start() {
        "" => match bare {
            BareUnit::Seconds => NANOS_PER_SECOND,
            BareUnit::Millis => NANOS_PER_MILLI,
        },
        "ms" => NANOS_PER_MILLI,
        "s" => NANOS_PER_SECOND,
        "m" => 60 * NANOS_PER_SECOND,
        "h" => 3600 * NANOS_PER_SECOND,
        other => {
            return Err(format!(
                "{text:?}: unknown unit {other:?} (use ms, s, m or h)"
            ))
        }
    };
    let (whole, fraction) = number.split_once('.').unwrap_or((number, ""));
    let digits = |s: &str| s.bytes().all(|b| b.is_ascii_digit());
    if (whole.is_empty() && fraction.is_empty()) || !digits(whole) || !digits(fraction) {
        return Err(not_a_duration());
    }
    let too_long = || format!("{text:?} is too long a duration");
    let whole: u128 = if whole.is_empty() {
        0
    } else {
        whole.parse().map_err(|_| too_long())?
    };
    let mut nanos = whole.checked_mul(unit_nanos).ok_or_else(too_long)?;
    // Each fractional digit is worth a tenth of the one before; digits below a nanosecond drop.
    let mut place = unit_nanos;
    for digit in fraction.bytes() {
        place /= 10;
        if place == 0 {
            break;
        }
        nanos += u128::from(digit - b'0') * place;
    }
    let seconds = u64::try_from(nanos / NANOS_PER_SECOND).map_err(|_| too_long())?;
    // The remainder of a division by 10^9 always fits.
    let subsec = u32::try_from(nanos % NANOS_PER_SECOND).unwrap_or_default();
    Ok(Duration::new(seconds, subsec))
}

/// A duration written in the syntax [`parse_duration`] reads, in its largest exact unit
/// (`2m`, `1500ms`, `90s`), for messages and help texts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Human(pub Duration);

impl fmt::Display for Human {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let nanos = self.0.as_nanos();
        if nanos == 0 {
            return f.write_str("0s");
        }
        for (unit, size) in [
            ("h", 3600 * NANOS_PER_SECOND),
            ("m", 60 * NANOS_PER_SECOND),
            ("s", NANOS_PER_SECOND),
            ("ms", NANOS_PER_MILLI),
        ] {
            if nanos.is_multiple_of(size) {
                return write!(f, "{}{unit}", nanos / size);
            }
        }
        write!(f, "{:?}", self.0)
    }
}

#[cfg(feature = "cli")]
impl clap::builder::TypedValueParser for DurationParser {
    type Value = Duration;

    fn parse_ref(
        &self,
        cmd: &clap::Command,
        arg: Option<&clap::Arg>,
        value: &std::ffi::OsStr,
    ) -> Result<Duration, clap::Error> {
        // clap renders a function parser's error as "invalid value '..' for '--flag': <why>".
        let this = *self;
        let parse = move |text: &str| this.parse(text);
        parse.parse_ref(cmd, arg, value)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn units_and_decimals_parse_exactly() {
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("2s"), Ok(Duration::from_secs(2)));
        assert_eq!(parse_duration("1.5s"), Ok(Duration::from_millis(1500)));
        assert_eq!(parse_duration("0.1s"), Ok(Duration::from_millis(100)));
        assert_eq!(parse_duration("5m"), Ok(Duration::from_secs(300)));
        assert_eq!(parse_duration("1h"), Ok(Duration::from_secs(3600)));
        assert_eq!(parse_duration(" 7 "), Ok(Duration::from_secs(7)));
        assert_eq!(parse_duration("0.25"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration(".5s"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("0"), Ok(Duration::ZERO));
        assert_eq!(
            parse_duration("1.0000000019s"),
            Ok(Duration::new(1, 1)),
            "digits below a nanosecond are dropped"
        );
    }

    #[test]
    fn nonsense_is_refused_with_the_accepted_syntax() {
        for bad in [
            "5d", "soon", "", "-1", "1e3", "NaN", "inf", ".", "1..2s", "s",
        ] {
            assert!(parse_duration(bad).is_err(), "{bad}");
        }
        let error = parse_duration("soon").expect_err("refused");
        assert!(error.contains("15s"), "{error}");
        let error = parse_duration("5d").expect_err("refused");
        assert!(error.contains("ms, s, m or h"), "{error}");
        assert!(parse_duration("99999999999999999999999h").is_err());
    }

    #[test]
    fn a_bare_number_takes_the_flags_unit() {
        let millis = DurationParser::new().bare_millis();
        assert_eq!(millis.parse("100"), Ok(Duration::from_millis(100)));
        assert_eq!(millis.parse("2s"), Ok(Duration::from_secs(2)));
        assert_eq!(millis.bare_seconds().parse("3"), Ok(Duration::from_secs(3)));
        assert_eq!(
            parse_with_bare_unit("0.5", BareUnit::Millis),
            Ok(Duration::from_micros(500))
        );
    }

    #[test]
    fn bounds_are_checked_and_named() {
        const HEARTBEAT: DurationParser = DurationParser::new()
            .at_least(Duration::from_secs(1))
            .at_most(Duration::from_secs(3600))
            .whole_seconds();
        assert_eq!(HEARTBEAT.parse("15s"), Ok(Duration::from_secs(15)));
        let low = HEARTBEAT.parse("0").expect_err("too short");
        assert!(low.contains("1s"), "{low}");
        let high = HEARTBEAT.parse("2h").expect_err("too long");
        assert!(high.contains("1h"), "{high}");
        assert!(HEARTBEAT.parse("1500ms").is_err());
        let positive = DurationParser::new().positive();
        assert!(positive.parse("0").is_err());
        assert!(positive.parse("0ms").is_err());
        assert_eq!(positive.parse("1ms"), Ok(Duration::from_millis(1)));
        assert_eq!(DurationParser::new().parse("0"), Ok(Duration::ZERO));
    }

    #[test]
    fn human_form_reads_back() {
        for (d, text) in [
            (Duration::ZERO, "0s"),
            (Duration::from_millis(1500), "1500ms"),
            (Duration::from_secs(90), "90s"),
            (Duration::from_secs(120), "2m"),
            (Duration::from_secs(7200), "2h"),
        ] {
            assert_eq!(Human(d).to_string(), text);
            assert_eq!(parse_duration(text), Ok(d));
        }
        assert_eq!(Human(Duration::from_nanos(1500)).to_string(), "1.5µs");
    }
}
