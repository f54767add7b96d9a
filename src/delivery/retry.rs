//! Retry policies: when, and whether, a failed delivery is attempted again (SPEC §6).
//!
//! Everything here is a pure function of the attempt number and the status code of the attempt that
//! just ended; the durable scheduler asks [`RetryPolicy::next_delay`] after each attempt and stores the
//! answer in sled. The built-in tables are `amocrm` (the default), `creatio` and `once`; custom
//! policies come from `[retry.policies.NAME]` in the config and are checked here when it is loaded.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use crate::config::{PolicyConfig, RetryConfig};

/// The code of an attempt that got no HTTP answer: connect error, TLS error, timeout, reset.
pub const NO_ANSWER: u16 = 0;

/// `410 Gone`: the receiver asks to be left alone. It ends the delivery whatever the policy says (and
/// the caller disables the subscription).
pub const GONE: u16 = 410;

/// Status codes are three digits; anything above this in a config is a typo, not a code.
const MAX_CODE: u16 = 999;

const MINUTE: Duration = Duration::from_secs(60);
const HOUR: Duration = Duration::from_secs(60 * 60);

/// Why a custom retry policy was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RetryError {
    /// One entry of an `on` list is not a code, a range or an open range.
    #[error("invalid status code {item:?}: {reason}")]
    InvalidCode { item: String, reason: String },
    /// `on = []` would make a step that never matches; omitting `on` means "any failure".
    #[error("empty code list (leave `on` out to retry on any failure)")]
    EmptyCodes,
    /// A step of a custom policy is invalid; `step` is its 0-based index in `steps`.
    #[error("step {step}: {source}")]
    InvalidStep {
        step: usize,
        #[source]
        source: Box<RetryError>,
    },
    /// `amocrm`, `creatio` and `once` mean the same thing on every installation.
    #[error("{name:?} is a built-in retry policy and cannot be redefined")]
    ReservedName { name: String },
    /// Policy names are referenced from subscriptions and the CLI, so they stay simple.
    #[error("invalid policy name {name:?}: use letters, digits, '-' and '_'")]
    InvalidName { name: String },
    /// Something is wrong inside the named custom policy.
    #[error("retry policy {name:?}: {source}")]
    InPolicy {
        name: String,
        #[source]
        source: Box<RetryError>,
    },
}

/// Whether an attempt that ended with `code` delivered the event (100–299).
pub fn is_success(code: u16) -> bool {
    (100..=299).contains(&code)
}

/// A set of HTTP status codes from config strings: `"499"`, `"500-599"`, `"300-"` (open range).
/// Codes are `u16`; [`NO_ANSWER`] (0) stands for no HTTP answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CodeSet {
    /// Inclusive ranges, in the order they were written.
    ranges: Vec<(u16, u16)>,
}

impl CodeSet {
    /// Parses every item; the first bad one is named in the error.
    pub fn parse(items: &[String]) -> Result<CodeSet, RetryError> {
        if items.is_empty() {
            return Err(RetryError::EmptyCodes);
        }
        let ranges = items
            .iter()
            .map(|item| parse_item(item))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(CodeSet { ranges })
    }

    /// A set from inclusive ranges; used for the built-in tables.
    fn from_ranges(ranges: &[(u16, u16)]) -> CodeSet {
        CodeSet {
            ranges: ranges.to_vec(),
        }
    }

    pub fn contains(&self, code: u16) -> bool {
        self.ranges
            .iter()
            .any(|&(lo, hi)| (lo..=hi).contains(&code))
    }
}

impl fmt::Display for CodeSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, &(lo, hi)) in self.ranges.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            match (lo, hi) {
                (lo, hi) if lo == hi => write!(f, "{lo}")?,
                (lo, u16::MAX) => write!(f, "{lo}-")?,
                (lo, hi) => write!(f, "{lo}-{hi}")?,
            }
        }
        Ok(())
    }
}

fn parse_item(item: &str) -> Result<(u16, u16), RetryError> {
    let invalid = |reason: &str| RetryError::InvalidCode {
        item: item.to_string(),
        reason: reason.to_string(),
    };
    let text = item.trim();
    if text.is_empty() {
        return Err(invalid(
            "expected a code (\"499\"), a range (\"500-599\") or an open range (\"300-\")",
        ));
    }
    match text.split_once('-') {
        None => {
            let code = parse_code(text).map_err(|reason| invalid(&reason))?;
            Ok((code, code))
        }
        // An open range reaches every code above its start, including ones no server sends today.
        Some((lo, "")) => {
            let lo = parse_code(lo.trim()).map_err(|reason| invalid(&reason))?;
            Ok((lo, u16::MAX))
        }
        Some((lo, hi)) => {
            let lo = parse_code(lo.trim()).map_err(|reason| invalid(&reason))?;
            let hi = parse_code(hi.trim()).map_err(|reason| invalid(&reason))?;
            if lo > hi {
                return Err(invalid("the range starts above its end"));
            }
            Ok((lo, hi))
        }
    }
}

fn parse_code(text: &str) -> Result<u16, String> {
    // `u16::from_str` would also take "+5"; a code is digits only.
    if text.is_empty() || !text.bytes().all(|b| b.is_ascii_digit()) {
        return Err(format!(
            "{text:?} is not a status code (expected a code, \"500-599\" or \"300-\")"
        ));
    }
    match text.parse::<u16>() {
        Ok(code) if code <= MAX_CODE => Ok(code),
        _ => Err(format!(
            "{text} is out of range (status codes are 0-{MAX_CODE})"
        )),
    }
}

/// One row of a policy: the attempt it schedules follows `after` the end of the previous attempt, if
/// that attempt's code is in `on` (`None`: any failure).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Step {
    pub after: Duration,
    pub on: Option<CodeSet>,
}

impl Step {
    fn any(after: Duration) -> Step {
        Step { after, on: None }
    }

    fn on(after: Duration, ranges: &[(u16, u16)]) -> Step {
        Step {
            after,
            on: Some(CodeSet::from_ranges(ranges)),
        }
    }
}

/// A named retry table: `steps[0]` decides attempt 2, `steps[1]` attempt 3, and so on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RetryPolicy {
    pub name: String,
    pub steps: Vec<Step>,
}

impl RetryPolicy {
    /// amoCRM's own schedule: two quick retries on any failure, then two more only for server errors
    /// (499 is nginx's "client closed request", which amoCRM treats as a server-side failure).
    pub fn amocrm() -> Self {
        let any_failure: &[(u16, u16)] = &[(0, 99), (300, u16::MAX)];
        let server_error: &[(u16, u16)] = &[(499, 499), (500, 599)];
        RetryPolicy {
            name: "amocrm".to_string(),
            steps: vec![
                Step::on(5 * MINUTE, any_failure),
                Step::on(15 * MINUTE, any_failure),
                Step::on(15 * MINUTE, server_error),
                Step::on(HOUR, server_error),
            ],
        }
    }

    /// A long tail for Creatio's webhook service: ten attempts over about ten days, on any failure.
    pub fn creatio() -> Self {
        let hours = |h: u32| HOUR * h;
        RetryPolicy {
            name: "creatio".to_string(),
            steps: [
                MINUTE,
                5 * MINUTE,
                60 * MINUTE,
                hours(6),
                hours(24),
                hours(36),
                hours(48),
                hours(60),
                hours(72),
            ]
            .into_iter()
            .map(Step::any)
            .collect(),
        }
    }

    /// A single attempt: digital pipeline webhooks are sent once.
    pub fn once() -> Self {
        RetryPolicy {
            name: "once".to_string(),
            steps: Vec::new(),
        }
    }

    /// `attempt` is the 1-based number of the attempt that just ended with `code`. `Some(delay)` if
    /// another attempt follows after `delay` (counted from the end of that attempt), `None` if the
    /// delivery ends: on success (100–299), on `410 Gone`, when the table has no further step, or when
    /// the next step does not list `code`. Attempt 0 does not exist and also gives `None`.
    pub fn next_delay(&self, attempt: u32, code: u16) -> Option<Duration> {
        if is_success(code) || code == GONE {
            return None;
        }
        let index = usize::try_from(attempt.checked_sub(1)?).ok()?;
        let step = self.steps.get(index)?;
        match &step.on {
            None => Some(step.after),
            Some(codes) => codes.contains(code).then_some(step.after),
        }
    }

    /// The most attempts this policy allows (the first one plus one per step).
    pub fn max_attempts(&self) -> u32 {
        u32::try_from(self.steps.len())
            .unwrap_or(u32::MAX)
            .saturating_add(1)
    }

    /// A custom policy from `[retry.policies.NAME]`. Built-in names and odd names are refused; a bad
    /// `on` list is reported with the index of its step.
    pub fn from_config(name: &str, cfg: &PolicyConfig) -> Result<Self, RetryError> {
        if BUILTIN_NAMES.contains(&name) {
            return Err(RetryError::ReservedName {
                name: name.to_string(),
            });
        }
        if name.is_empty()
            || !name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        {
            return Err(RetryError::InvalidName {
                name: name.to_string(),
            });
        }
        let steps =
            cfg.steps
                .iter()
                .enumerate()
                .map(|(index, step)| {
                    let on = match &step.on {
                        None => None,
                        Some(items) => Some(CodeSet::parse(items).map_err(|source| {
                            RetryError::InvalidStep {
                                step: index,
                                source: Box::new(source),
                            }
                        })?),
                    };
                    Ok(Step {
                        after: step.after,
                        on,
                    })
                })
                .collect::<Result<Vec<_>, RetryError>>()?;
        Ok(RetryPolicy {
            name: name.to_string(),
            steps,
        })
    }
}

/// The delay before the next attempt once the receiver's `Retry-After` is taken into account.
///
/// Only a 429 or 503 answer's `Retry-After` counts. It can push the attempt later than `scheduled`
/// (the policy's delay), but not by more than `max_retry_after`, and never earlier; whether there is a
/// next attempt at all is still the policy's decision, so call this only when `next_delay` said yes.
pub fn delay_with_retry_after(
    scheduled: Duration,
    code: u16,
    retry_after: Option<Duration>,
    max_retry_after: Duration,
) -> Duration {
    match retry_after {
        Some(asked) if code == 429 || code == 503 => scheduled.max(asked.min(max_retry_after)),
        _ => scheduled,
    }
}

/// The names that always mean the built-in tables.
pub const BUILTIN_NAMES: [&str; 3] = ["amocrm", "creatio", "once"];

/// The built-in and custom policies by name, shared by the API (to check a subscription's `retry`)
/// and the scheduler.
#[derive(Debug, Clone)]
pub struct Policies {
    by_name: BTreeMap<String, Arc<RetryPolicy>>,
    /// Built-ins first, then custom policies alphabetically: the order `names()` reports.
    order: Vec<String>,
}

impl Policies {
    /// Only `amocrm`, `creatio` and `once`.
    pub fn builtin() -> Self {
        let mut policies = Policies {
            by_name: BTreeMap::new(),
            order: Vec::new(),
        };
        for policy in [
            RetryPolicy::amocrm(),
            RetryPolicy::creatio(),
            RetryPolicy::once(),
        ] {
            policies.insert(policy);
        }
        policies
    }

    /// The built-ins plus every policy of `[retry.policies]`.
    pub fn from_config(cfg: &RetryConfig) -> Result<Self, RetryError> {
        let mut policies = Policies::builtin();
        for (name, policy) in &cfg.policies {
            let policy =
                RetryPolicy::from_config(name, policy).map_err(|err| RetryError::InPolicy {
                    name: name.clone(),
                    source: Box::new(err),
                })?;
            policies.insert(policy);
        }
        Ok(policies)
    }

    fn insert(&mut self, policy: RetryPolicy) {
        self.order.push(policy.name.clone());
        self.by_name.insert(policy.name.clone(), Arc::new(policy));
    }

    pub fn get(&self, name: &str) -> Option<Arc<RetryPolicy>> {
        self.by_name.get(name).cloned()
    }

    pub fn names(&self) -> Vec<String> {
        self.order.clone()
    }
}

impl Default for Policies {
    fn default() -> Self {
        Policies::builtin()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::StepConfig;

    const M5: Option<Duration> = Some(Duration::from_secs(5 * 60));
    const M15: Option<Duration> = Some(Duration::from_secs(15 * 60));
    const H1: Option<Duration> = Some(Duration::from_secs(60 * 60));

    fn strings(items: &[&str]) -> Vec<String> {
        items.iter().map(|s| s.to_string()).collect()
    }

    /// How many attempts a receiver that always answers `code` gets.
    fn attempts_until_end(policy: &RetryPolicy, code: u16) -> u32 {
        let mut attempt = 1;
        while policy.next_delay(attempt, code).is_some() {
            attempt += 1;
            assert!(attempt < 100, "policy {} never ends", policy.name);
        }
        attempt
    }

    #[test]
    fn success_codes() {
        assert!(!is_success(0));
        assert!(!is_success(99));
        assert!(is_success(100));
        assert!(is_success(200));
        assert!(is_success(299));
        assert!(!is_success(300));
    }

    #[test]
    fn amocrm_class_edges() {
        let p = RetryPolicy::amocrm();
        let codes = [0, 99, 100, 299, 300, 404, 498, 499, 500, 599, 600];
        // Expected delay after attempt n (rows) for each code above (columns).
        let n = None;
        let table: [[Option<Duration>; 11]; 5] = [
            // 0    99   100 299 300  404  498  499  500  599  600
            [M5, M5, n, n, M5, M5, M5, M5, M5, M5, M5],
            [M15, M15, n, n, M15, M15, M15, M15, M15, M15, M15],
            [n, n, n, n, n, n, n, M15, M15, M15, n],
            [n, n, n, n, n, n, n, H1, H1, H1, n],
            [n, n, n, n, n, n, n, n, n, n, n],
        ];
        for (row, expected) in table.iter().enumerate() {
            let attempt = row as u32 + 1;
            for (code, want) in codes.iter().zip(expected) {
                assert_eq!(
                    p.next_delay(attempt, *code),
                    *want,
                    "amocrm after attempt {attempt} with code {code}"
                );
            }
        }
        assert_eq!(p.next_delay(6, 500), None);
        assert_eq!(p.next_delay(0, 500), None);
        assert_eq!(p.next_delay(u32::MAX, 500), None);
    }

    #[test]
    fn amocrm_attempt_counts() {
        let p = RetryPolicy::amocrm();
        assert_eq!(p.max_attempts(), 5);
        assert_eq!(attempts_until_end(&p, 500), 5);
        assert_eq!(attempts_until_end(&p, 499), 5);
        assert_eq!(attempts_until_end(&p, 503), 5);
        assert_eq!(attempts_until_end(&p, 404), 3);
        assert_eq!(attempts_until_end(&p, 302), 3);
        assert_eq!(attempts_until_end(&p, 0), 3);
        assert_eq!(attempts_until_end(&p, 200), 1);
    }

    #[test]
    fn gone_ends_the_delivery_whatever_the_policy() {
        assert_eq!(RetryPolicy::amocrm().next_delay(1, GONE), None);
        assert_eq!(RetryPolicy::creatio().next_delay(1, GONE), None);
    }

    #[test]
    fn creatio_table() {
        let p = RetryPolicy::creatio();
        let expected_minutes = [1, 5, 60, 360, 1440, 2160, 2880, 3600, 4320];
        for (i, minutes) in expected_minutes.iter().enumerate() {
            let attempt = i as u32 + 1;
            let want = Some(Duration::from_secs(minutes * 60));
            for code in [0, 99, 300, 404, 429, 499, 500, 599, 600] {
                assert_eq!(
                    p.next_delay(attempt, code),
                    want,
                    "attempt {attempt} code {code}"
                );
            }
            assert_eq!(p.next_delay(attempt, 200), None);
        }
        assert_eq!(p.next_delay(10, 500), None);
        assert_eq!(p.max_attempts(), 10);
        assert_eq!(attempts_until_end(&p, 0), 10);
        assert_eq!(attempts_until_end(&p, 404), 10);
    }

    #[test]
    fn once_never_retries() {
        let p = RetryPolicy::once();
        assert_eq!(p.max_attempts(), 1);
        for attempt in 0..=5 {
            for code in [0, 200, 404, 500] {
                assert_eq!(p.next_delay(attempt, code), None);
            }
        }
    }

    #[test]
    fn code_set_parsing() {
        let set = CodeSet::parse(&strings(&["499", "500-599", "0-99"])).expect("valid set");
        for code in [0, 50, 99, 499, 500, 550, 599] {
            assert!(set.contains(code), "{code}");
        }
        for code in [100, 300, 498, 600] {
            assert!(!set.contains(code), "{code}");
        }
        let open = CodeSet::parse(&strings(&["300-"])).expect("open range");
        assert!(!open.contains(299));
        assert!(open.contains(300));
        assert!(open.contains(999));
        assert!(open.contains(u16::MAX));
        assert_eq!(
            CodeSet::parse(&strings(&[" 500 - 599 "])).expect("spaces"),
            CodeSet::parse(&strings(&["500-599"])).expect("plain")
        );
        assert_eq!(
            CodeSet::parse(&strings(&["499", "500-599", "300-"]))
                .expect("valid")
                .to_string(),
            "499,500-599,300-"
        );
    }

    #[test]
    fn code_set_errors_name_the_item() {
        for bad in [
            "abc", "600-500", "", "70000", "1000", "+5", "-99", "5-x", "1-2-3",
        ] {
            let err = CodeSet::parse(&strings(&["500", bad])).expect_err(bad);
            let message = err.to_string();
            assert!(
                message.contains(&format!("{bad:?}")),
                "error for {bad:?} does not name it: {message}"
            );
        }
        assert_eq!(CodeSet::parse(&[]), Err(RetryError::EmptyCodes));
    }

    #[test]
    fn custom_policy_from_config() {
        let cfg = PolicyConfig {
            steps: vec![
                StepConfig {
                    after: Duration::from_secs(30),
                    on: Some(strings(&["0-99", "300-"])),
                },
                StepConfig {
                    after: Duration::from_secs(600),
                    on: Some(strings(&["500-599"])),
                },
                StepConfig {
                    after: Duration::from_secs(3600),
                    on: None,
                },
            ],
        };
        let p = RetryPolicy::from_config("my-policy", &cfg).expect("valid policy");
        assert_eq!(p.max_attempts(), 4);
        assert_eq!(p.next_delay(1, 0), Some(Duration::from_secs(30)));
        assert_eq!(p.next_delay(1, 200), None);
        assert_eq!(p.next_delay(2, 404), None);
        assert_eq!(p.next_delay(2, 502), Some(Duration::from_secs(600)));
        assert_eq!(p.next_delay(3, 404), Some(Duration::from_secs(3600)));
        assert_eq!(p.next_delay(4, 500), None);
    }

    #[test]
    fn custom_policy_errors() {
        let empty = PolicyConfig { steps: Vec::new() };
        for name in BUILTIN_NAMES {
            assert_eq!(
                RetryPolicy::from_config(name, &empty),
                Err(RetryError::ReservedName {
                    name: name.to_string()
                })
            );
        }
        assert!(matches!(
            RetryPolicy::from_config("a.b", &empty),
            Err(RetryError::InvalidName { .. })
        ));
        let bad = PolicyConfig {
            steps: vec![
                StepConfig {
                    after: Duration::from_secs(1),
                    on: None,
                },
                StepConfig {
                    after: Duration::from_secs(1),
                    on: Some(strings(&["abc"])),
                },
            ],
        };
        let err = RetryPolicy::from_config("p", &bad).expect_err("bad code");
        assert!(
            matches!(err, RetryError::InvalidStep { step: 1, .. }),
            "{err:?}"
        );
        assert!(err.to_string().contains("\"abc\""), "{err}");
    }

    #[test]
    fn policies_by_name() {
        let mut cfg = RetryConfig::default();
        cfg.policies.insert(
            "zeta".to_string(),
            PolicyConfig {
                steps: vec![StepConfig {
                    after: Duration::from_secs(1),
                    on: None,
                }],
            },
        );
        let policies = Policies::from_config(&cfg).expect("valid");
        assert_eq!(policies.names(), ["amocrm", "creatio", "once", "zeta"]);
        assert_eq!(policies.get("amocrm").map(|p| p.max_attempts()), Some(5));
        assert_eq!(policies.get("zeta").map(|p| p.max_attempts()), Some(2));
        assert!(policies.get("nope").is_none());
        assert_eq!(Policies::default().names(), ["amocrm", "creatio", "once"]);
    }

    #[test]
    fn retry_after_only_delays() {
        let s = Duration::from_secs;
        let max = s(3600);
        // Longer than scheduled: honoured.
        assert_eq!(
            delay_with_retry_after(s(300), 429, Some(s(900)), max),
            s(900)
        );
        assert_eq!(
            delay_with_retry_after(s(300), 503, Some(s(900)), max),
            s(900)
        );
        // Capped at max_retry_after.
        assert_eq!(
            delay_with_retry_after(s(300), 503, Some(s(99_999)), max),
            max
        );
        // Shorter than scheduled: the schedule stands.
        assert_eq!(
            delay_with_retry_after(s(300), 429, Some(s(10)), max),
            s(300)
        );
        // Other codes ignore the header.
        assert_eq!(
            delay_with_retry_after(s(300), 500, Some(s(900)), max),
            s(300)
        );
        assert_eq!(delay_with_retry_after(s(300), 429, None, max), s(300));
        // A cap below the schedule never shortens it.
        assert_eq!(
            delay_with_retry_after(s(300), 429, Some(s(900)), s(60)),
            s(300)
        );
    }
}
