//! The HTTP/1.1 of an attempt, on the lane slot's own connection: the request written in one
//! piece, the answer's head parsed with `httparse` (hyper's parser), and its body framed by
//! RFC 9112 §6: a length, chunks (also `httparse`'s), or the connection's end.
//!
//! This is all an attempt needs of HTTP: one request, its answer, and whether the connection can
//! carry the next. Done inline by the attempt's own task, it costs no connection task, no channel
//! between the two and no header map per request. Hyper's client connection (a driver task per
//! connection, the request handed to it over a channel and the answer back over another) cost
//! the daemon about a fifth more CPU per delivery in the fanout benchmark.

use std::io;
use tokio::io::{AsyncRead, AsyncReadExt};

/// The most bytes an answer's head (status line and headers) may take.
pub const MAX_HEAD: usize = 64 * 1024;
/// The most headers an answer may have (hyper's limit).
const MAX_HEADERS: usize = 100;
/// The most bytes of a chunk-size line (with its extensions) or of the trailer section.
const MAX_LINE: usize = 4096;
/// A connection's read buffer starts at this size and grows (up to [`MAX_HEAD`]) for a long head.
const READ_BUF: usize = 8 * 1024;

/// Why an exchange failed. The text says what happened.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{0}")]
    Io(#[from] io::Error),
    #[error("connection closed {0}")]
    Closed(&'static str),
    #[error("invalid answer: {0}")]
    Invalid(String),
}

/// How an answer's body is delimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    /// No body: 204, 304.
    Empty,
    Length(u64),
    Chunked,
    /// Until the receiver closes the connection.
    UntilClose,
}

/// An answer's status line and the headers an attempt uses.
#[derive(Debug)]
pub struct Head {
    pub code: u16,
    pub framing: Framing,
    /// Whether the connection may carry another request once the body is read.
    pub keep_alive: bool,
    pub retry_after: Option<String>,
}

/// How reading a body ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyEnd {
    /// Read to its end.
    Complete,
    /// Stopped at the limit with more to come: the connection cannot be reused.
    Limit,
}

/// Writes a request: `POST target HTTP/1.1`, the headers in order (names in lower case, as hyper
/// and reqwest send them), `content-length`, the body. Names and values must have been checked
/// (as `http`'s `HeaderName` and `HeaderValue` do).
pub fn encode_request<'a>(
    out: &mut Vec<u8>,
    target: &str,
    headers: impl IntoIterator<Item = (&'a str, &'a [u8])>,
    body: &[u8],
) {
    out.extend_from_slice(b"POST ");
    out.extend_from_slice(target.as_bytes());
    out.extend_from_slice(b" HTTP/1.1\r\n");
    for (name, value) in headers {
        out.extend(name.bytes().map(|b| b.to_ascii_lowercase()));
        out.extend_from_slice(b": ");
        out.extend_from_slice(value);
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"content-length: ");
    out.extend_from_slice(itoa::Buffer::new().format(body.len()).as_bytes());
    out.extend_from_slice(b"\r\n\r\n");
    out.extend_from_slice(body);
}

/// The read side of a connection: bytes read and not yet used.
pub struct Reader {
    buf: Vec<u8>,
    start: usize,
    end: usize,
}

impl Default for Reader {
    fn default() -> Reader {
        Reader {
            buf: vec![0; READ_BUF],
            start: 0,
            end: 0,
        }
    }
}

impl Reader {
    /// Bytes read and not yet used: after an answer, anything here is more than was asked for.
    pub fn buffered(&self) -> usize {
        self.end - self.start
    }

    fn available(&self) -> &[u8] {
        &self.buf[self.start..self.end]
    }

    fn consume(&mut self, n: usize) {
        self.start += n;
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
        }
    }

    /// Reads more; `Ok(0)` at the end of the stream. Room is made by moving what is left to the
    /// front, then by growing the buffer up to `max`.
    async fn fill<R: AsyncRead + Unpin>(&mut self, io: &mut R, max: usize) -> Result<usize, Error> {
        if self.end == self.buf.len() {
            if self.start > 0 {
                self.buf.copy_within(self.start..self.end, 0);
                self.end -= self.start;
                self.start = 0;
            } else if self.buf.len() < max {
                self.buf.resize((self.buf.len() * 2).min(max), 0);
            } else {
                return Err(Error::Invalid(format!(
                    "more than {max} bytes without an end"
                )));
            }
        }
        let n = io.read(&mut self.buf[self.end..]).await?;
        self.end += n;
        Ok(n)
    }

    /// Reads an answer's head; interim (1xx) answers are skipped.
    pub async fn head<R: AsyncRead + Unpin>(&mut self, io: &mut R) -> Result<Head, Error> {
        loop {
            if let Some((len, head)) = parse_head(self.available())? {
                self.consume(len);
                match head {
                    Some(head) => return Ok(head),
                    None => continue, // 1xx
                }
            }
            if self.fill(io, MAX_HEAD).await? == 0 {
                return Err(Error::Closed(if self.buffered() == 0 {
                    "before an answer"
                } else {
                    "in the middle of the answer's head"
                }));
            }
        }
    }

    /// Reads a body as `framing` says, giving its bytes to `data`, and stops once `limit` bytes
    /// are read if more would come.
    pub async fn body<R: AsyncRead + Unpin>(
        &mut self,
        io: &mut R,
        framing: Framing,
        limit: usize,
        mut data: impl FnMut(&[u8]),
    ) -> Result<BodyEnd, Error> {
        let mut read = 0usize;
        match framing {
            Framing::Empty => Ok(BodyEnd::Complete),
            Framing::Length(n) => self.exact(io, n, &mut read, limit, &mut data).await,
            Framing::UntilClose => loop {
                if self.buffered() == 0 && self.fill(io, READ_BUF).await? == 0 {
                    return Ok(BodyEnd::Complete);
                }
                let n = self.buffered();
                data(self.available());
                self.consume(n);
                read += n;
                if read >= limit {
                    return Ok(BodyEnd::Limit);
                }
            },
            Framing::Chunked => loop {
                let size = loop {
                    // A size line starts with a hex digit (`httparse` would take an empty one
                    // for the last chunk).
                    if self.buffered() > 0 && !self.available()[0].is_ascii_hexdigit() {
                        return Err(Error::Invalid("bad chunk size line".into()));
                    }
                    match httparse::parse_chunk_size(self.available()) {
                        Ok(httparse::Status::Complete((len, size))) => {
                            self.consume(len);
                            break size;
                        }
                        Ok(httparse::Status::Partial) if self.buffered() < MAX_LINE => {
                            self.need(io, "in a chunk size").await?;
                        }
                        _ => return Err(Error::Invalid("bad chunk size line".into())),
                    }
                };
                if size == 0 {
                    self.trailers(io).await?;
                    return Ok(BodyEnd::Complete);
                }
                if self.exact(io, size, &mut read, limit, &mut data).await? == BodyEnd::Limit {
                    return Ok(BodyEnd::Limit);
                }
                while self.buffered() < 2 {
                    self.need(io, "after a chunk").await?;
                }
                if &self.available()[..2] != b"\r\n" {
                    return Err(Error::Invalid("no CRLF after a chunk".into()));
                }
                self.consume(2);
                if read >= limit {
                    return Ok(BodyEnd::Limit);
                }
            },
        }
    }

    /// Reads more, where the end of the stream is an error.
    async fn need<R: AsyncRead + Unpin>(
        &mut self,
        io: &mut R,
        where_: &'static str,
    ) -> Result<(), Error> {
        if self.fill(io, READ_BUF).await? == 0 {
            return Err(Error::Closed(where_));
        }
        Ok(())
    }

    /// Reads `n` bytes of body (stopping at `limit` bytes of the whole body).
    async fn exact<R: AsyncRead + Unpin>(
        &mut self,
        io: &mut R,
        n: u64,
        read: &mut usize,
        limit: usize,
        data: &mut impl FnMut(&[u8]),
    ) -> Result<BodyEnd, Error> {
        let mut left = n;
        while left > 0 {
            if *read >= limit {
                return Ok(BodyEnd::Limit);
            }
            if self.buffered() == 0 {
                self.need(io, "before the end of the body").await?;
            }
            let take = (self.buffered() as u64).min(left) as usize;
            data(&self.available()[..take]);
            self.consume(take);
            left -= take as u64;
            *read += take;
        }
        Ok(BodyEnd::Complete)
    }

    /// Reads the trailer section after the last chunk, up to its empty line.
    async fn trailers<R: AsyncRead + Unpin>(&mut self, io: &mut R) -> Result<(), Error> {
        let mut seen = 0usize;
        loop {
            match self.available().windows(2).position(|w| w == b"\r\n") {
                Some(0) => {
                    self.consume(2);
                    return Ok(());
                }
                Some(i) => {
                    seen += i + 2;
                    self.consume(i + 2);
                }
                None => self.need(io, "in the trailers").await?,
            }
            if seen > MAX_LINE || self.buffered() > MAX_LINE {
                return Err(Error::Invalid("trailers too long".into()));
            }
        }
    }
}

/// The length of `Content-Length` headers: decimal digits, in one value or a list, which must
/// all be the same.
fn content_length(values: &[&[u8]]) -> Result<Option<u64>, Error> {
    let mut length = None;
    for value in values {
        for item in value.split(|&b| b == b',') {
            let item = item.trim_ascii();
            let n = (!item.is_empty() && item.len() <= 19 && item.iter().all(u8::is_ascii_digit))
                .then(|| std::str::from_utf8(item).ok()?.parse::<u64>().ok())
                .flatten()
                .ok_or_else(|| Error::Invalid("bad content-length".into()))?;
            if length.is_some_and(|l| l != n) {
                return Err(Error::Invalid("content-lengths that differ".into()));
            }
            length = Some(n);
        }
    }
    Ok(length)
}

/// Parses a head from `buf`: `None` when incomplete; else its length, and the head, or `None`
/// for an interim (1xx) answer.
fn parse_head(buf: &[u8]) -> Result<Option<(usize, Option<Head>)>, Error> {
    if buf.is_empty() {
        return Ok(None);
    }
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut resp = httparse::Response::new(&mut headers);
    let len = match resp.parse(buf) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(e) => return Err(Error::Invalid(e.to_string())),
    };
    let code = resp.code.unwrap_or_default();
    if code < 100 {
        return Err(Error::Invalid(format!("status code {code:03}")));
    }
    if code == 101 {
        return Err(Error::Invalid(
            "101 Switching Protocols, which was not asked for".into(),
        ));
    }
    if (100..200).contains(&code) {
        return Ok(Some((len, None)));
    }
    let http11 = resp.version == Some(1);
    let (mut close, mut keep_alive_token) = (false, false);
    let mut lengths: Vec<&[u8]> = Vec::new();
    let mut chunked = None::<bool>;
    let mut retry_after = None;
    for h in resp.headers.iter() {
        let name = h.name;
        if name.eq_ignore_ascii_case("content-length") {
            lengths.push(h.value);
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            // Only the last coding counts: chunked must be it.
            let last = h.value.rsplit(|&b| b == b',').next().unwrap_or_default();
            chunked = Some(last.trim_ascii().eq_ignore_ascii_case(b"chunked"));
        } else if name.eq_ignore_ascii_case("connection") {
            for token in h.value.split(|&b| b == b',') {
                let token = token.trim_ascii();
                close |= token.eq_ignore_ascii_case(b"close");
                keep_alive_token |= token.eq_ignore_ascii_case(b"keep-alive");
            }
        } else if name.eq_ignore_ascii_case("retry-after") {
            retry_after = std::str::from_utf8(h.value).ok().map(str::to_string);
        }
    }
    // A transfer coding overrides a length (RFC 9112 §6.3), which is then not looked at.
    // A 204 or 304 has no body whatever its headers say (hyper reads no length for them).
    let length = match chunked {
        Some(_) => None,
        None if code == 204 || code == 304 => None,
        None => content_length(&lengths)?,
    };
    let framing = if code == 204 || code == 304 {
        Framing::Empty
    } else {
        match (chunked, length) {
            (Some(true), _) => Framing::Chunked,
            (Some(false), _) => Framing::UntilClose,
            (None, Some(n)) => Framing::Length(n),
            (None, None) => Framing::UntilClose,
        }
    };
    // `close` wins over `keep-alive`; HTTP/1.0 keeps a connection only when asked and never
    // with a transfer coding (RFC 9112 §6.1); with both a coding and a length the message is
    // suspect (§6.3).
    let keep_alive = !close
        && (http11 || (keep_alive_token && chunked.is_none()))
        && framing != Framing::UntilClose
        && (chunked.is_none() || lengths.is_empty());
    Ok(Some((
        len,
        Some(Head {
            code,
            framing,
            keep_alive,
            retry_after,
        }),
    )))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::pin::Pin;
    use std::task::{Context, Poll};

    /// A stream that gives its bytes `step` at a time, as a receiver's writes may arrive.
    struct Trickle {
        data: Vec<u8>,
        at: usize,
        step: usize,
    }

    impl AsyncRead for Trickle {
        fn poll_read(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
            buf: &mut tokio::io::ReadBuf<'_>,
        ) -> Poll<io::Result<()>> {
            let n = self
                .step
                .min(self.data.len() - self.at)
                .min(buf.remaining());
            let at = self.at;
            buf.put_slice(&self.data[at..at + n]);
            self.at += n;
            Poll::Ready(Ok(()))
        }
    }

    /// Reads one answer from `raw`, `step` bytes at a time: its head, its body, and what is left.
    async fn answer(
        raw: &[u8],
        step: usize,
        limit: usize,
    ) -> Result<(Head, Vec<u8>, BodyEnd, usize), Error> {
        let mut io = Trickle {
            data: raw.to_vec(),
            at: 0,
            step,
        };
        let mut r = Reader::default();
        let head = r.head(&mut io).await?;
        let mut body = Vec::new();
        let end = r
            .body(&mut io, head.framing, limit, |b| body.extend_from_slice(b))
            .await?;
        Ok((head, body, end, r.buffered()))
    }

    async fn each_step(raw: &[u8], limit: usize) -> (Head, Vec<u8>, BodyEnd, usize) {
        let whole = answer(raw, raw.len(), limit).await.unwrap();
        for step in [1, 2, 3, 7] {
            let part = answer(raw, step, limit).await.unwrap();
            assert_eq!(
                (part.1.clone(), part.2),
                (whole.1.clone(), whole.2),
                "step {step}"
            );
            assert_eq!(part.0.code, whole.0.code);
        }
        whole
    }

    #[tokio::test]
    async fn a_length_delimited_answer_keeps_the_connection() {
        let (head, body, end, left) =
            each_step(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello", 1024).await;
        assert_eq!((head.code, head.keep_alive), (200, true));
        assert_eq!(
            (body.as_slice(), end, left),
            (&b"hello"[..], BodyEnd::Complete, 0)
        );
    }

    #[tokio::test]
    async fn chunks_with_extensions_and_trailers_are_decoded() {
        let raw =
            b"HTTP/1.1 503 Busy\r\nTransfer-Encoding: gzip, chunked\r\nRetry-After: 7\r\n\r\n\
                    4;name=x\r\nRust\r\n10\r\n0123456789abcdef\r\n0\r\nX-Trailer: 1\r\n\r\n";
        let (head, body, end, left) = each_step(raw, 1024).await;
        assert_eq!(head.code, 503);
        assert_eq!(head.framing, Framing::Chunked);
        assert_eq!(head.retry_after.as_deref(), Some("7"));
        assert!(head.keep_alive);
        assert_eq!(body, b"Rust0123456789abcdef");
        assert_eq!((end, left), (BodyEnd::Complete, 0));
    }

    #[tokio::test]
    async fn interim_answers_are_skipped() {
        let raw = b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\nHTTP/1.1 201 Created\r\nContent-Length: 0\r\n\r\n";
        let (head, body, end, _) = each_step(raw, 1024).await;
        assert_eq!((head.code, body.len(), end), (201, 0, BodyEnd::Complete));
    }

    #[tokio::test]
    async fn a_body_until_close_ends_the_connection() {
        let (head, body, end, _) = each_step(b"HTTP/1.1 200 OK\r\n\r\nall of it", 1024).await;
        assert_eq!(head.framing, Framing::UntilClose);
        assert!(!head.keep_alive);
        assert_eq!(
            (body.as_slice(), end),
            (&b"all of it"[..], BodyEnd::Complete)
        );
    }

    #[tokio::test]
    async fn close_and_http_1_0_are_not_kept_unless_asked() {
        for (raw, keep) in [
            (&b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 0\r\n\r\n"[..], false),
            (b"HTTP/1.0 200 OK\r\nContent-Length: 0\r\n\r\n", false),
            (b"HTTP/1.0 200 OK\r\nConnection: Keep-Alive\r\nContent-Length: 0\r\n\r\n", true),
            (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n0\r\n\r\n", false),
            (b"HTTP/1.1 204 No Content\r\n\r\n", true),
            (b"HTTP/1.1 304 Not Modified\r\nContent-Length: junk\r\n\r\n", true),
            (b"HTTP/1.1 200 OK\r\nConnection: keep-alive, close\r\nContent-Length: 0\r\n\r\n", false),
            (b"HTTP/1.0 200 OK\r\nConnection: close\r\nConnection: keep-alive\r\nContent-Length: 0\r\n\r\n", false),
            (b"HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", false),
            (b"HTTP/1.1 200 OK\r\nContent-Length: 2, 2\r\nContent-Length: 2\r\n\r\nok", true),
            (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Length: bad\r\n\r\n0\r\n\r\n", false),
        ] {
            let (head, _, end, _) = each_step(raw, 1024).await;
            assert_eq!((head.keep_alive, end), (keep, BodyEnd::Complete), "{}", String::from_utf8_lossy(raw));
        }
    }

    #[tokio::test]
    async fn a_body_past_the_limit_stops_there() {
        let mut raw = b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n".to_vec();
        raw.extend(std::iter::repeat_n(b'x', 100_000));
        let (_, body, end, _) = answer(&raw, 4096, 65_536).await.unwrap();
        assert_eq!(end, BodyEnd::Limit);
        assert!(
            (65_536..65_536 + 4096).contains(&body.len()),
            "{}",
            body.len()
        );
        let mut chunked = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec();
        for _ in 0..100 {
            chunked.extend_from_slice(b"400\r\n");
            chunked.extend(std::iter::repeat_n(b'y', 1024));
            chunked.extend_from_slice(b"\r\n");
        }
        let (_, body, end, _) = answer(&chunked, 4096, 65_536).await.unwrap();
        assert_eq!((body.len(), end), (65_536, BodyEnd::Limit));
    }

    #[tokio::test]
    async fn broken_answers_are_errors_that_say_why() {
        for (raw, text) in [
            (&b""[..], "connection closed before an answer"),
            (
                b"HTTP/1.1 200 OK\r\nContent-Le",
                "connection closed in the middle of the answer's head",
            ),
            (
                b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\nshort",
                "connection closed before the end of the body",
            ),
            (
                b"HTTP/1.1 200 OK\r\nContent-Length: nine\r\n\r\n",
                "invalid answer: bad content-length",
            ),
            (
                b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
                "invalid answer: content-lengths that differ",
            ),
            (
                b"SMTP ready\r\n\r\n",
                "invalid answer: invalid HTTP version",
            ),
            (
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
                "invalid answer: bad chunk size line",
            ),
            (
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nabXY",
                "invalid answer: no CRLF after a chunk",
            ),
            (
                b"HTTP/1.1 101 Switching Protocols\r\n\r\n",
                "invalid answer: 101 Switching Protocols, which was not asked for",
            ),
            (
                b"HTTP/1.1 000 Zero\r\nContent-Length: 0\r\n\r\n",
                "invalid answer: status code 000",
            ),
            (
                b"HTTP/1.1 200 OK\r\nContent-Length: +5\r\n\r\nhello",
                "invalid answer: bad content-length",
            ),
            (
                b"HTTP/1.1 200 OK\r\nContent-Length: 5, 6\r\n\r\nhello",
                "invalid answer: content-lengths that differ",
            ),
            (
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n\r\nrest",
                "invalid answer: bad chunk size line",
            ),
            (
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n;ext\r\n\r\n",
                "invalid answer: bad chunk size line",
            ),
        ] {
            let e = answer(raw, 3, 1024).await.unwrap_err();
            assert_eq!(e.to_string(), text, "{}", String::from_utf8_lossy(raw));
        }
        let mut long = b"HTTP/1.1 200 OK\r\nX-Filler: ".to_vec();
        long.extend(std::iter::repeat_n(b'a', MAX_HEAD));
        long.extend_from_slice(b"\r\n\r\n");
        let e = answer(&long, 4096, 1024).await.unwrap_err();
        assert_eq!(
            e.to_string(),
            "invalid answer: more than 65536 bytes without an end"
        );
    }

    #[test]
    fn a_request_is_one_piece_with_its_length() {
        let mut out = Vec::new();
        encode_request(
            &mut out,
            "/hook?a=1",
            [
                ("host", &b"127.0.0.1:9"[..]),
                ("Content-Type", b"text/plain"),
            ],
            b"body",
        );
        assert_eq!(
            out,
            b"POST /hook?a=1 HTTP/1.1\r\nhost: 127.0.0.1:9\r\ncontent-type: text/plain\r\ncontent-length: 4\r\n\r\nbody"
        );
    }
}
