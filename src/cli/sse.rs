//! A server-sent events parser (the WHATWG `text/event-stream` format), fed with the chunks of a
//! response body as they arrive; `dispatcher tail` reads `GET /v1/deliveries/stream` with it.
//!
//! Written here rather than taken from a crate: the format is a dozen lines of rules, and the
//! crates that parse it either pin an older reqwest or have not been released in years.

/// One dispatched event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SseEvent {
    /// The `event:` field, `message` when absent.
    pub event: String,
    /// The `data:` lines joined by `\n`.
    pub data: String,
    /// The last `id:` seen, if any.
    pub id: Option<String>,
}

/// An incremental parser: [`SseParser::feed`] takes bytes in any chunking and returns the events
/// completed by them.
#[derive(Debug, Default)]
pub struct SseParser {
    /// The bytes of a line not yet ended.
    line: Vec<u8>,
    /// The last chunk ended with `\r`: a `\n` opening the next one belongs to that line end.
    after_cr: bool,
    /// At the very start of the stream (where a byte order mark is skipped).
    started: bool,
    event: String,
    data: String,
    has_data: bool,
    last_id: Option<String>,
    /// The `retry:` reconnection time the server asked for, in milliseconds.
    pub retry_ms: Option<u64>,
}

impl SseParser {
    pub fn new() -> SseParser {
        SseParser::default()
    }

    pub fn feed(&mut self, mut bytes: &[u8]) -> Vec<SseEvent> {
        let mut events = Vec::new();
        if !self.started && !bytes.is_empty() {
            self.started = true;
            if let Some(rest) = bytes.strip_prefix("\u{feff}".as_bytes()) {
                bytes = rest;
            }
        }
        if self.after_cr {
            self.after_cr = false;
            if let Some(rest) = bytes.strip_prefix(b"\n") {
                bytes = rest;
            }
        }
        while let Some(end) = bytes.iter().position(|&b| b == b'\n' || b == b'\r') {
            self.line.extend_from_slice(&bytes[..end]);
            let line = std::mem::take(&mut self.line);
            if let Some(e) = self.process_line(&String::from_utf8_lossy(&line)) {
                events.push(e);
            }
            let was_cr = bytes[end] == b'\r';
            bytes = &bytes[end + 1..];
            if was_cr {
                match bytes.first() {
                    Some(b'\n') => bytes = &bytes[1..],
                    None => self.after_cr = true,
                    Some(_) => {}
                }
            }
        }
        self.line.extend_from_slice(bytes);
        events
    }

    fn process_line(&mut self, line: &str) -> Option<SseEvent> {
        if line.is_empty() {
            return self.dispatch();
        }
        if line.starts_with(':') {
            return None; // a comment: the daemon's keep-alive
        }
        let (field, value) = match line.split_once(':') {
            Some((f, v)) => (f, v.strip_prefix(' ').unwrap_or(v)),
            None => (line, ""),
        };
        match field {
            "event" => self.event = value.to_string(),
            "data" => {
                if self.has_data {
                    self.data.push('\n');
                }
                self.data.push_str(value);
                self.has_data = true;
            }
            "id" if !value.contains('\0') => self.last_id = Some(value.to_string()),
            "retry" if !value.is_empty() && value.bytes().all(|b| b.is_ascii_digit()) => {
                self.retry_ms = value.parse().ok();
            }
            _ => {}
        }
        None
    }

    fn dispatch(&mut self) -> Option<SseEvent> {
        let event = std::mem::take(&mut self.event);
        if !std::mem::take(&mut self.has_data) {
            return None;
        }
        Some(SseEvent {
            event: if event.is_empty() {
                "message".to_string()
            } else {
                event
            },
            data: std::mem::take(&mut self.data),
            id: self.last_id.clone(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(event: &str, data: &str) -> SseEvent {
        SseEvent {
            event: event.into(),
            data: data.into(),
            id: None,
        }
    }

    #[test]
    fn events_as_the_daemon_sends_them() {
        let mut p = SseParser::new();
        let got = p.feed(b"event: attempt\ndata: {\"a\":1}\n\n:\n\nevent: attempt\ndata: {}\n\n");
        assert_eq!(got, vec![ev("attempt", "{\"a\":1}"), ev("attempt", "{}")]);
    }

    #[test]
    fn any_chunking_gives_the_same_events() {
        let stream = b"event: attempt\r\ndata: one\r\ndata:two\r\n\r\n: keep-alive\r\rdata: x\r\r";
        let whole = SseParser::new().feed(stream);
        assert_eq!(
            whole,
            vec![ev("attempt", "one\ntwo"), ev("message", "x")],
            "CRLF and CR line ends, multi-line data, the default event name"
        );
        for size in 1..stream.len() {
            let mut p = SseParser::new();
            let mut got = Vec::new();
            for chunk in stream.chunks(size) {
                got.extend(p.feed(chunk));
            }
            assert_eq!(got, whole, "chunks of {size}");
        }
    }

    #[test]
    fn comments_fields_without_value_ids_and_retry() {
        let mut p = SseParser::new();
        let got = p.feed(b"\xEF\xBB\xBFid: 7\nretry: 2500\nretry: soon\nfoo: bar\ndata\n\n");
        assert_eq!(
            got,
            vec![SseEvent {
                event: "message".into(),
                data: "".into(),
                id: Some("7".into()),
            }]
        );
        assert_eq!(p.retry_ms, Some(2500));
    }

    #[test]
    fn an_event_without_data_is_not_dispatched_and_its_name_does_not_leak() {
        let mut p = SseParser::new();
        assert!(p.feed(b"event: attempt\n\n").is_empty());
        assert_eq!(p.feed(b"data: d\n\n"), vec![ev("message", "d")]);
    }

    #[test]
    fn an_unfinished_event_waits_for_its_blank_line() {
        let mut p = SseParser::new();
        assert!(p.feed(b"event: attempt\ndata: {\"x\":").is_empty());
        assert!(p.feed(b"1}\n").is_empty());
        assert_eq!(p.feed(b"\n"), vec![ev("attempt", "{\"x\":1}")]);
    }

    #[test]
    fn utf8_split_across_chunks_survives() {
        let text = "data: Сделка №1\n\n".as_bytes();
        let mut p = SseParser::new();
        let mut got = p.feed(&text[..9]);
        got.extend(p.feed(&text[9..]));
        assert_eq!(got, vec![ev("message", "Сделка №1")]);
    }
}
