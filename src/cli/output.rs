//! What the client commands print: lines on stdout (a closed pipe ends the command quietly),
//! aligned tables, ANSI colour only when asked for or on a terminal, and times and durations the
//! way a person reads them (`in 5m`, `132ms`).

use super::{CliError, ColorChoice};
use std::io::{IsTerminal, Write};
use std::time::{Duration, SystemTime};

/// Whether to colour stdout: `auto` means a terminal and no `NO_COLOR` (<https://no-color.org>).
pub fn use_color(choice: ColorChoice) -> bool {
    match choice {
        ColorChoice::Always => true,
        ColorChoice::Never => false,
        ColorChoice::Auto => {
            std::io::stdout().is_terminal()
                && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty())
        }
    }
}

/// Writes one line to stdout and flushes it, so a follower sees it at once.
pub fn print_line(line: &str) -> Result<(), CliError> {
    let mut out = std::io::stdout().lock();
    writeln!(out, "{line}")
        .and_then(|()| out.flush())
        .map_err(|e| {
            if e.kind() == std::io::ErrorKind::BrokenPipe {
                CliError::StdoutClosed
            } else {
                CliError::Output(e)
            }
        })
}

/// A note for the person at the terminal: stderr, never mixed into the output.
pub fn note(msg: &str) {
    // Not eprintln!: a closed stderr must not turn a note into a panic.
    let _ = writeln!(std::io::stderr(), "dispatcher: {msg}");
}

/// ANSI styles used by the client.
pub mod style {
    pub const GREEN: &str = "32";
    pub const YELLOW: &str = "33";
    pub const RED: &str = "31";
    pub const BOLD_RED: &str = "1;31";
    pub const MAGENTA: &str = "35";
    pub const CYAN: &str = "36";
    pub const DIM: &str = "2";
    pub const BOLD: &str = "1";
}

/// `text` in the ANSI style `code` when `color` is on.
pub fn paint(color: bool, code: &str, text: &str) -> String {
    if color && !code.is_empty() && !text.is_empty() {
        format!("\x1b[{code}m{text}\x1b[0m")
    } else {
        text.to_string()
    }
}

/// The style of an HTTP status in a line: success green, no answer and 5xx red, the rest yellow.
pub fn code_style(code: u64) -> &'static str {
    match code {
        100..=299 => style::GREEN,
        0 | 500..=599 => style::RED,
        _ => style::YELLOW,
    }
}

/// The style of a delivery status or a stream outcome.
pub fn status_style(status: &str) -> &'static str {
    match status {
        "delivered" => style::GREEN,
        "retrying" | "pending" => style::YELLOW,
        "failed" => style::BOLD_RED,
        "held" => style::MAGENTA,
        "in_flight" => style::CYAN,
        _ => "",
    }
}

/// A table cell: its text and an optional style.
pub struct Cell {
    text: String,
    style: &'static str,
}

impl Cell {
    pub fn styled(text: impl Into<String>, style: &'static str) -> Cell {
        Cell {
            text: text.into(),
            style,
        }
    }
}

impl From<String> for Cell {
    fn from(text: String) -> Cell {
        Cell::styled(text, "")
    }
}

impl From<&str> for Cell {
    fn from(text: &str) -> Cell {
        Cell::styled(text, "")
    }
}

/// Columns aligned on the widest cell; the last column is not padded.
pub struct Table {
    header: Vec<&'static str>,
    /// Widths columns get even when their cells are narrower, so that tables printed page by
    /// page line up.
    min_widths: Vec<usize>,
    rows: Vec<Vec<Cell>>,
}

impl Table {
    pub fn new(header: Vec<&'static str>) -> Table {
        Table {
            header,
            min_widths: Vec::new(),
            rows: Vec::new(),
        }
    }

    pub fn min_widths(mut self, widths: Vec<usize>) -> Table {
        self.min_widths = widths;
        self
    }

    pub fn row(&mut self, cells: Vec<Cell>) {
        self.rows.push(cells);
    }

    /// The lines of the table, the header first when `header` is set.
    pub fn render(&self, color: bool, header: bool) -> Vec<String> {
        let n = self.header.len();
        let mut widths: Vec<usize> = self.header.iter().map(|h| h.chars().count()).collect();
        for (w, min) in widths.iter_mut().zip(&self.min_widths) {
            *w = (*w).max(*min);
        }
        for row in &self.rows {
            for (i, c) in row.iter().enumerate().take(n) {
                widths[i] = widths[i].max(c.text.chars().count());
            }
        }
        let line = |cells: Vec<(&str, &'static str)>| {
            let mut out = String::new();
            for (i, (text, style)) in cells.iter().enumerate() {
                if i > 0 {
                    out.push_str("  ");
                }
                out.push_str(&paint(color, style, text));
                if i + 1 < cells.len() {
                    let pad = widths[i].saturating_sub(text.chars().count());
                    out.extend(std::iter::repeat_n(' ', pad));
                }
            }
            out.trim_end().to_string()
        };
        let mut lines = Vec::new();
        if header {
            lines.push(line(
                self.header.iter().map(|h| (*h, style::BOLD)).collect(),
            ));
        }
        for row in &self.rows {
            lines.push(line(
                row.iter().map(|c| (c.text.as_str(), c.style)).collect(),
            ));
        }
        lines
    }

    pub fn print(&self, color: bool, header: bool) -> Result<(), CliError> {
        for l in self.render(color, header) {
            print_line(&l)?;
        }
        Ok(())
    }
}

/// An RFC 3339 time from the daemon.
pub fn parse_time(s: &str) -> Option<SystemTime> {
    humantime::parse_rfc3339_weak(s).ok()
}

/// An RFC 3339 time to the second: `2025-06-01T10:42:07.123Z` → `2025-06-01T10:42:07Z`.
pub fn short_time(s: &str) -> String {
    match parse_time(s) {
        Some(t) => humantime::format_rfc3339_seconds(t).to_string(),
        None => s.to_string(),
    }
}

/// A duration for a person: milliseconds under a second, else its two largest units
/// (`5m`, `4m 59s`, `1day 12h`).
pub fn short_duration(d: Duration) -> String {
    if d < Duration::from_secs(1) {
        return format!("{}ms", d.as_millis());
    }
    let secs = Duration::from_secs((d.as_millis() as u64 + 500) / 1000);
    humantime::format_duration(secs)
        .to_string()
        .split(' ')
        .take(2)
        .collect::<Vec<_>>()
        .join(" ")
}

/// `in 5m` or `5m ago`: where `then` lies from `now`.
pub fn relative(then: SystemTime, now: SystemTime) -> String {
    match then.duration_since(now) {
        Ok(ahead) => format!("in {}", short_duration(ahead)),
        Err(e) => format!("{} ago", short_duration(e.duration())),
    }
}

/// A number of things with the right plural: `1 delivery`, `3 deliveries`.
pub fn count(n: u64, one: &str, many: &str) -> String {
    format!("{n} {}", if n == 1 { one } else { many })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_read_like_a_person_says_them() {
        assert_eq!(short_duration(Duration::from_millis(0)), "0ms");
        assert_eq!(short_duration(Duration::from_millis(132)), "132ms");
        assert_eq!(short_duration(Duration::from_millis(999)), "999ms");
        assert_eq!(short_duration(Duration::from_secs(300)), "5m");
        assert_eq!(short_duration(Duration::from_millis(299_600)), "5m");
        assert_eq!(short_duration(Duration::from_millis(299_400)), "4m 59s");
        assert_eq!(short_duration(Duration::from_secs(3600)), "1h");
        assert_eq!(
            short_duration(Duration::from_secs(36 * 3600 + 61)),
            "1day 12h"
        );
    }

    #[test]
    fn relative_times() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        assert_eq!(relative(now + Duration::from_secs(900), now), "in 15m");
        assert_eq!(relative(now - Duration::from_secs(90), now), "1m 30s ago");
        assert_eq!(relative(now, now), "in 0ms");
    }

    #[test]
    fn times_drop_their_milliseconds() {
        assert_eq!(
            short_time("2025-06-01T10:42:07.123Z"),
            "2025-06-01T10:42:07Z"
        );
        assert_eq!(short_time("not a time"), "not a time");
    }

    #[test]
    fn tables_align_and_colour_only_when_asked() {
        let mut t = Table::new(vec!["ID", "STATUS", "NAME"]);
        t.row(vec![
            "1".into(),
            Cell::styled("failed", style::RED),
            "x".into(),
        ]);
        t.row(vec!["22".into(), "ok".into(), "".into()]);
        assert_eq!(
            t.render(false, true),
            vec!["ID  STATUS  NAME", "1   failed  x", "22  ok"]
        );
        assert_eq!(t.render(false, false), vec!["1   failed  x", "22  ok"]);
        let coloured = t.render(true, true);
        assert_eq!(coloured[1], "1   \x1b[31mfailed\x1b[0m  x");
        assert!(coloured[0].starts_with("\x1b[1mID\x1b[0m"));
    }

    #[test]
    fn minimum_widths_keep_pages_aligned() {
        let mut t = Table::new(vec!["A", "B"]).min_widths(vec![5]);
        t.row(vec!["x".into(), "y".into()]);
        assert_eq!(t.render(false, true), vec!["A      B", "x      y"]);
    }

    #[test]
    fn plurals() {
        assert_eq!(count(1, "delivery", "deliveries"), "1 delivery");
        assert_eq!(count(0, "delivery", "deliveries"), "0 deliveries");
    }
}
