//! What a scenario measured, the targets of issue 6 and how both are printed (table or JSON).

use serde_json::{Map, Value, json};
use std::collections::BTreeMap;

/// One figure of a scenario: a label that says exactly what the number is, its text, and (for
/// the JSON and the targets) its value.
pub struct Row {
    pub label: String,
    pub text: String,
}

/// New TCP connections the sink accepted during a scenario, against the daemon's cap.
#[derive(Clone)]
pub struct ConnFig {
    pub new: u64,
    pub cap: u64,
    pub cap_text: String,
    pub peak_open: i64,
}

pub struct Outcome {
    pub name: &'static str,
    pub title: String,
    pub rows: Vec<Row>,
    pub values: BTreeMap<&'static str, f64>,
    pub json: Map<String, Value>,
    /// Timeouts, missing deliveries, failed requests: shown under the scenario and in the verdicts.
    pub problems: Vec<String>,
    pub notes: Vec<String>,
    pub conns: Option<ConnFig>,
    pub secs: f64,
    /// CPU s that other processes on the machine used during the scenario, and steal.
    pub other_cpu: Option<(f64, f64)>,
}

impl Outcome {
    pub fn new(name: &'static str, title: impl Into<String>) -> Outcome {
        Outcome {
            name,
            title: title.into(),
            rows: Vec::new(),
            values: BTreeMap::new(),
            json: Map::new(),
            problems: Vec::new(),
            notes: Vec::new(),
            conns: None,
            secs: 0.0,
            other_cpu: None,
        }
    }

    /// A figure with a value.
    pub fn fig(&mut self, key: &'static str, label: impl Into<String>, value: f64, text: String) {
        self.rows.push(Row {
            label: label.into(),
            text,
        });
        self.values.insert(key, value);
        self.json.insert(key.to_string(), num(value));
    }

    /// A figure that is text only (a count with context, a config choice).
    pub fn text(&mut self, key: &'static str, label: impl Into<String>, text: String) {
        self.json.insert(key.to_string(), json!(text));
        self.rows.push(Row {
            label: label.into(),
            text,
        });
    }

    /// Latency percentiles as rows `p50`, `p99`, `max` under `what`, and in the JSON.
    pub fn pct(&mut self, key: &'static str, what: &str, p: Option<crate::stats::Pct>) {
        match p {
            Some(p) => {
                self.rows.push(Row {
                    label: format!("{what}, ms: p50 / p99 / p99.9 / max (n = {})", p.n),
                    text: format!(
                        "{} / {} / {} / {}",
                        ms(p.p50),
                        ms(p.p99),
                        ms(p.p999),
                        ms(p.max)
                    ),
                });
                self.values.insert(key, p.p99);
                self.json.insert(
                    key.to_string(),
                    json!({"n": p.n, "min_ms": p.min, "p50_ms": p.p50, "p99_ms": p.p99,
                           "p999_ms": p.p999, "max_ms": p.max}),
                );
                self.values.insert(leak(format!("{key}.p50")), p.p50);
            }
            None => {
                self.rows.push(Row {
                    label: format!("{what}, ms"),
                    text: "no samples".into(),
                });
            }
        }
    }

    pub fn problem(&mut self, p: impl Into<String>) {
        let p = p.into();
        eprintln!("  !! {p}");
        self.problems.push(p);
    }

    pub fn note(&mut self, n: impl Into<String>) {
        self.notes.push(n.into());
    }

    pub fn to_json(&self) -> Value {
        let mut m = self.json.clone();
        m.insert("title".into(), json!(self.title));
        m.insert("problems".into(), json!(self.problems));
        m.insert("notes".into(), json!(self.notes));
        m.insert("seconds".into(), num(self.secs));
        if let Some((other, steal)) = self.other_cpu {
            m.insert("other_processes_cpu_s".into(), num(other));
            m.insert("steal_s".into(), num(steal));
        }
        if let Some(c) = &self.conns {
            m.insert(
                "connections".into(),
                json!({"new": c.new, "cap": c.cap, "cap_is": c.cap_text, "peak_open": c.peak_open}),
            );
        }
        Value::Object(m)
    }
}

pub fn leak(s: String) -> &'static str {
    Box::leak(s.into_boxed_str())
}

pub fn num(v: f64) -> Value {
    if v.is_finite() {
        json!((v * 1000.0).round() / 1000.0)
    } else {
        Value::Null
    }
}

pub fn ms(v: f64) -> String {
    if v.abs() >= 100.0 {
        format!("{v:.0}")
    } else if v.abs() >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

/// 12345.6 → "12,346".
pub fn int(v: f64) -> String {
    if !v.is_finite() {
        return "-".into();
    }
    let n = v.round() as i64;
    let s = n.abs().to_string();
    let mut out = String::new();
    for (i, ch) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(ch);
    }
    if n < 0 { format!("-{out}") } else { out }
}

pub fn mib(kb: u64) -> String {
    format!("{:.1} MiB", kb as f64 / 1024.0)
}

#[derive(Clone, Debug, PartialEq)]
pub enum Verdict {
    Met,
    Missed,
    /// Not measured in this run (scenario not selected), or no baseline to take a ratio of.
    NotRun(String),
    /// The measurement did not complete (timeout, missing deliveries): no verdict.
    Incomplete(String),
}

impl Verdict {
    pub fn word(&self) -> &'static str {
        match self {
            Verdict::Met => "met",
            Verdict::Missed => "missed",
            Verdict::NotRun(_) => "n/a",
            Verdict::Incomplete(_) => "incomplete",
        }
    }
}

pub struct Target {
    pub target: String,
    pub required: String,
    pub measured: String,
    pub verdict: Verdict,
}

impl Target {
    pub fn to_json(&self) -> Value {
        let why = match &self.verdict {
            Verdict::NotRun(w) | Verdict::Incomplete(w) => Some(w.clone()),
            _ => None,
        };
        json!({"target": self.target, "required": self.required, "measured": self.measured,
               "verdict": self.verdict.word(), "why": why})
    }
}

/// Left-aligned columns.
pub fn table(rows: &[Vec<String>], indent: &str) -> String {
    let cols = rows.iter().map(Vec::len).max().unwrap_or(0);
    let mut width = vec![0usize; cols];
    for r in rows {
        for (i, c) in r.iter().enumerate() {
            width[i] = width[i].max(c.chars().count());
        }
    }
    let mut out = String::new();
    for r in rows {
        let mut line = String::from(indent);
        for (i, c) in r.iter().enumerate() {
            line.push_str(c);
            if i + 1 < r.len() {
                let pad = width[i] - c.chars().count() + 2;
                line.push_str(&" ".repeat(pad));
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}
