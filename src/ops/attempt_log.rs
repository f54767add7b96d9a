//! The log line of an attempt (SPEC §8), written straight into the daemon's stderr queue.
//!
//! Every attempt logs one line, so its formatting is on the hot path: the whole line, through
//! `tracing` and `tracing-subscriber`'s formatter, cost up to about 2.4 µs of CPU per delivery in
//! the benchmark's fanout, a tenth of the daemon's (most of it `core::fmt` writing each field and
//! the timestamp); written here, about 1.5 µs less. The binary, whose log lines all go through
//! [`super::log`]'s queue, has [`write_directly`] called once its subscriber is installed: from
//! then on [`attempt`] writes the line itself, byte for byte the line `tracing-subscriber`
//! writes for the same event (text without colours, or JSON), when the subscriber's filter lets
//! the event through. A test checks the two against each other. Without it (a terminal's coloured lines, a program that embeds the
//! library with a subscriber of its own), the line is an ordinary `tracing` event.

use std::cell::RefCell;
use std::io::Write;
use std::sync::OnceLock;
use std::time::SystemTime;
use tracing::Level;
use uuid::Uuid;

/// The target of the attempt's event: the module that logged it before this one existed, so that
/// filters naming it (`log.level = "webhook_dispatcher::delivery=warn"`) keep working.
const TARGET: &str = "webhook_dispatcher::delivery";

/// The fields of an attempt's line.
#[derive(Debug, Clone, Copy)]
pub struct AttemptLine<'a> {
    pub delivery: &'a Uuid,
    pub subscription: &'a Uuid,
    pub event: &'a str,
    /// The destination's host only: never the URL's path or query.
    pub host: &'a str,
    pub attempt: u32,
    pub code: u16,
    pub duration_ms: u64,
    pub outcome: &'a str,
    /// RFC 3339, or `-` when there is none.
    pub next_attempt_at: &'a str,
}

/// How [`attempt`] writes lines once [`write_directly`] was called.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LineFormat {
    /// `tracing-subscriber`'s full text format, without ANSI colours.
    Text,
    /// `tracing-subscriber`'s JSON format with the event's fields flattened.
    Json,
}

static DIRECT: OnceLock<LineFormat> = OnceLock::new();

/// Has [`attempt`] write its lines into the process's stderr queue itself, in `format`, instead of
/// going through `tracing`. Only for a subscriber that formats exactly so (`fmt()` with that
/// format and no colours) and writes to [`super::log::stderr`]'s writer; its filter still decides.
pub fn write_directly(format: LineFormat) {
    let _ = DIRECT.set(format);
}

thread_local! {
    static LINE: RefCell<Vec<u8>> = RefCell::new(Vec::with_capacity(512));
}

/// Logs an attempt: one line.
pub fn attempt(line: &AttemptLine<'_>) {
    if let Some(format) = DIRECT.get()
        && tracing::enabled!(
            target: TARGET,
            Level::INFO,
            delivery,
            subscription,
            event,
            host,
            attempt,
            code,
            duration_ms,
            outcome,
            next_attempt_at
        )
        && LINE.with_borrow_mut(|buf| {
            buf.clear();
            format_line(buf, *format, SystemTime::now(), line);
            super::log::push_stderr(buf)
        })
    {
        return;
    }
    // Not written directly (or no stderr queue to write it to): an ordinary event.
    tracing::info!(
        target: TARGET,
        delivery = %line.delivery,
        subscription = %line.subscription,
        event = %line.event,
        host = %line.host,
        attempt = line.attempt,
        code = line.code,
        duration_ms = line.duration_ms,
        outcome = line.outcome,
        next_attempt_at = line.next_attempt_at,
        "attempt"
    );
}

/// Appends the line `tracing-subscriber` would write for the event at `now`, newline included.
pub fn format_line(buf: &mut Vec<u8>, format: LineFormat, now: SystemTime, line: &AttemptLine<'_>) {
    let mut ids = [Uuid::encode_buffer(), Uuid::encode_buffer()];
    let [d, s] = &mut ids;
    let delivery = line.delivery.hyphenated().encode_lower(d);
    let subscription = line.subscription.hyphenated().encode_lower(s);
    let mut numbers = [
        itoa::Buffer::new(),
        itoa::Buffer::new(),
        itoa::Buffer::new(),
    ];
    let [a, c, ms] = &mut numbers;
    let (attempt, code, duration_ms) = (
        a.format(line.attempt),
        c.format(line.code),
        ms.format(line.duration_ms),
    );
    match format {
        LineFormat::Text => {
            timestamp(buf, now);
            buf.extend_from_slice(b"  INFO ");
            buf.extend_from_slice(TARGET.as_bytes());
            buf.extend_from_slice(b": attempt");
            // `%` fields are written as they display, the others as they debug-print.
            for (name, value) in [
                ("delivery", &*delivery),
                ("subscription", subscription),
                ("event", line.event),
                ("host", line.host),
                ("attempt", attempt),
                ("code", code),
                ("duration_ms", duration_ms),
            ] {
                field(buf, name);
                buf.extend_from_slice(value.as_bytes());
            }
            for (name, value) in [
                ("outcome", line.outcome),
                ("next_attempt_at", line.next_attempt_at),
            ] {
                field(buf, name);
                let _ = write!(buf, "{value:?}");
            }
        }
        LineFormat::Json => {
            buf.extend_from_slice(b"{\"timestamp\":\"");
            timestamp(buf, now);
            buf.extend_from_slice(b"\",\"level\":\"INFO\",\"message\":\"attempt\"");
            for (name, value) in [
                ("delivery", &*delivery),
                ("subscription", subscription),
                ("event", line.event),
                ("host", line.host),
            ] {
                key(buf, name);
                string(buf, value);
            }
            for (name, value) in [
                ("attempt", attempt),
                ("code", code),
                ("duration_ms", duration_ms),
            ] {
                key(buf, name);
                buf.extend_from_slice(value.as_bytes());
            }
            for (name, value) in [
                ("outcome", line.outcome),
                ("next_attempt_at", line.next_attempt_at),
            ] {
                key(buf, name);
                string(buf, value);
            }
            key(buf, "target");
            string(buf, TARGET);
            buf.push(b'}');
        }
    }
    buf.push(b'\n');
}

fn field(buf: &mut Vec<u8>, name: &str) {
    buf.push(b' ');
    buf.extend_from_slice(name.as_bytes());
    buf.push(b'=');
}

fn key(buf: &mut Vec<u8>, name: &str) {
    buf.push(b',');
    string(buf, name);
    buf.push(b':');
}

/// A JSON string, escaped as `serde_json` escapes it.
fn string(buf: &mut Vec<u8>, s: &str) {
    let _ = serde_json::to_writer(&mut *buf, s);
}

/// `tracing-subscriber`'s timestamp: RFC 3339 in UTC with microseconds.
fn timestamp(buf: &mut Vec<u8>, now: SystemTime) {
    let t = time::OffsetDateTime::from(now);
    let (year, month, day) = t.to_calendar_date();
    if (0..=9999).contains(&year) {
        digits(buf, year as u32, 4);
    } else {
        // Not this side of the year 10,000: written as `tracing-subscriber` writes it all the same.
        let _ = if year > 9999 {
            write!(buf, "+{year}")
        } else {
            write!(buf, "{year:05}")
        };
    }
    for (sep, n) in [
        (b'-', u8::from(month)),
        (b'-', day),
        (b'T', t.hour()),
        (b':', t.minute()),
        (b':', t.second()),
    ] {
        buf.push(sep);
        digits(buf, u32::from(n), 2);
    }
    buf.push(b'.');
    digits(buf, t.microsecond(), 6);
    buf.push(b'Z');
}

/// `n` in exactly `width` decimal digits, zero-padded (`n` has no more than `width` digits).
fn digits(buf: &mut Vec<u8>, mut n: u32, width: usize) {
    let start = buf.len();
    buf.resize(start + width, b'0');
    for d in buf[start..].iter_mut().rev() {
        *d = b'0' + (n % 10) as u8;
        n /= 10;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};
    use std::time::{Duration, UNIX_EPOCH};
    use tracing_subscriber::fmt::MakeWriter;

    /// Keeps what the subscriber writes.
    #[derive(Clone, Default)]
    struct Captured(Arc<Mutex<Vec<u8>>>);

    impl Write for Captured {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl<'a> MakeWriter<'a> for Captured {
        type Writer = Captured;
        fn make_writer(&'a self) -> Captured {
            self.clone()
        }
    }

    /// The line `tracing-subscriber`, set up as the binary sets it up, writes for the event.
    fn through_tracing(format: LineFormat, line: &AttemptLine<'_>) -> String {
        let out = Captured::default();
        let builder = tracing_subscriber::fmt()
            .with_env_filter("info")
            .with_writer(out.clone())
            .with_ansi(false);
        match format {
            LineFormat::Text => {
                tracing::subscriber::with_default(builder.finish(), || attempt(line))
            }
            LineFormat::Json => tracing::subscriber::with_default(
                builder.json().flatten_event(true).finish(),
                || attempt(line),
            ),
        }
        String::from_utf8(out.0.lock().unwrap().clone()).unwrap()
    }

    /// The time a line was stamped with, read back from it.
    fn stamped(line: &str, format: LineFormat) -> SystemTime {
        let ts = match format {
            LineFormat::Text => line.split(' ').next().unwrap().to_string(),
            LineFormat::Json => {
                serde_json::from_str::<serde_json::Value>(line).unwrap()["timestamp"]
                    .as_str()
                    .unwrap()
                    .to_string()
            }
        };
        let t = time::OffsetDateTime::parse(&ts, &time::format_description::well_known::Rfc3339)
            .unwrap_or_else(|e| panic!("{ts}: {e}"));
        t.into()
    }

    fn lines() -> Vec<AttemptLine<'static>> {
        static IDS: OnceLock<[Uuid; 2]> = OnceLock::new();
        let [d, s] = IDS.get_or_init(|| [Uuid::now_v7(), Uuid::new_v4()]);
        let first = AttemptLine {
            delivery: d,
            subscription: s,
            event: "add_lead",
            host: "127.0.0.1",
            attempt: 1,
            code: 200,
            duration_ms: 3,
            outcome: "delivered",
            next_attempt_at: "-",
        };
        vec![
            first,
            AttemptLine {
                event: "status_lead",
                host: "hooks.example.com",
                attempt: 3,
                code: 503,
                duration_ms: 1_999,
                outcome: "retrying",
                next_attempt_at: "2026-12-03T23:05:00.123Z",
                ..first
            },
            AttemptLine {
                event: "note_contact",
                host: "[::1]",
                attempt: 10,
                code: 0,
                duration_ms: 0,
                outcome: "failed",
                ..first
            },
            // Nothing the daemon logs needs escaping; written as the formatter writes it anyway.
            AttemptLine {
                host: "a\"b\\c\u{e9}\u{1}",
                attempt: u32::MAX,
                code: u16::MAX,
                duration_ms: u64::MAX,
                ..first
            },
        ]
    }

    #[test]
    fn lines_are_the_bytes_tracing_subscriber_writes_for_the_event() {
        for format in [LineFormat::Text, LineFormat::Json] {
            for line in lines() {
                let expected = through_tracing(format, &line);
                assert_eq!(expected.matches('\n').count(), 1, "{expected}");
                let mut ours = Vec::new();
                format_line(&mut ours, format, stamped(&expected, format), &line);
                assert_eq!(String::from_utf8(ours).unwrap(), expected, "{format:?}");
            }
        }
    }

    #[test]
    fn timestamps_are_rfc3339_in_utc_with_microseconds() {
        for (t, expected) in [
            (UNIX_EPOCH, "1970-01-01T00:00:00.000000Z"),
            (
                UNIX_EPOCH + Duration::new(1_795_354_589, 123_456_789),
                "2026-11-22T13:36:29.123456Z",
            ),
            (
                UNIX_EPOCH + Duration::new(951_782_400 - 1, 999_999_999),
                "2000-02-28T23:59:59.999999Z",
            ),
            (
                UNIX_EPOCH + Duration::new(253_402_300_799, 1_000),
                "9999-12-31T23:59:59.000001Z",
            ),
        ] {
            let mut buf = Vec::new();
            timestamp(&mut buf, t);
            assert_eq!(String::from_utf8(buf).unwrap(), expected);
            assert_eq!(humantime::format_rfc3339_micros(t).to_string(), expected);
        }
    }

    #[test]
    fn without_write_directly_the_line_is_a_tracing_event() {
        // No test in this process calls `write_directly`: `attempt` goes through the subscriber.
        assert!(DIRECT.get().is_none());
        let line = lines()[1];
        let text = through_tracing(LineFormat::Text, &line);
        assert!(
            text.contains(" INFO webhook_dispatcher::delivery: attempt delivery="),
            "{text}"
        );
        assert!(text.contains(" outcome=\"retrying\""), "{text}");
        // A filter that leaves the delivery module out leaves the line out.
        let out = Captured::default();
        let subscriber = tracing_subscriber::fmt()
            .with_env_filter("info,webhook_dispatcher::delivery=warn")
            .with_writer(out.clone())
            .finish();
        tracing::subscriber::with_default(subscriber, || attempt(&line));
        assert!(out.0.lock().unwrap().is_empty());
    }
}
