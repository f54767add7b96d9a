//! The HTTP side of the client commands: one reqwest client, the daemon's base URL and token, and
//! the translation of every failure into a [`CliError`] that says what to do about it.

use super::CliError;
use reqwest::{Method, StatusCode};
use serde_json::Value;
use std::time::Duration;

/// How long a connection may take to open.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a whole request may take (intake answers only after an fsync).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(60);
/// How long the stream may stay silent: the daemon sends a keep-alive every 15 s, so three missed
/// ones mean the connection is dead even if no FIN arrived.
pub const STREAM_IDLE_TIMEOUT: Duration = Duration::from_secs(45);

/// A client of one daemon.
pub struct Client {
    /// The base URL without a trailing slash, e.g. `http://127.0.0.1:8080`.
    base: String,
    token: Option<String>,
    http: reqwest::Client,
    /// Without a total timeout, for the endless stream.
    stream_http: reqwest::Client,
}

impl Client {
    pub fn new(server: &str, token: Option<&str>) -> Result<Client, CliError> {
        let base = normalize_server(server)?;
        if let Some(t) = token
            && reqwest::header::HeaderValue::from_str(&format!("Bearer {t}")).is_err()
        {
            return Err(CliError::Usage(
                "the token (--token or DISPATCHER_TOKEN) holds characters an HTTP header cannot carry"
                    .into(),
            ));
        }
        let build = |b: reqwest::ClientBuilder| {
            b.connect_timeout(CONNECT_TIMEOUT)
                .user_agent(concat!("dispatcher-cli/", env!("CARGO_PKG_VERSION")))
                .build()
                .map_err(|e| CliError::Setup(e.to_string()))
        };
        Ok(Client {
            base,
            token: token.map(str::to_string).filter(|t| !t.is_empty()),
            http: build(reqwest::Client::builder().timeout(REQUEST_TIMEOUT))?,
            stream_http: build(reqwest::Client::builder().read_timeout(STREAM_IDLE_TIMEOUT))?,
        })
    }

    pub fn base(&self) -> &str {
        &self.base
    }

    /// The absolute URL of an API path with its query (empty values left out).
    pub fn url(&self, path: &str, query: &[(&str, Option<&str>)]) -> String {
        let mut url = format!("{}{}", self.base, path);
        let pairs: Vec<_> = query
            .iter()
            .filter_map(|(k, v)| v.filter(|v| !v.is_empty()).map(|v| (*k, v)))
            .collect();
        if !pairs.is_empty() {
            let mut ser = url::form_urlencoded::Serializer::new(String::new());
            for (k, v) in pairs {
                ser.append_pair(k, v);
            }
            url.push('?');
            url.push_str(&ser.finish());
        }
        url
    }

    fn request(
        &self,
        http: &reqwest::Client,
        method: Method,
        url: &str,
    ) -> reqwest::RequestBuilder {
        let req = http.request(method, url);
        match &self.token {
            Some(t) => req.bearer_auth(t),
            None => req,
        }
    }

    /// Sends a request and returns the JSON answer of a 2xx (Null for an empty body, as a 204).
    pub async fn send(
        &self,
        method: Method,
        path: &str,
        query: &[(&str, Option<&str>)],
        body: Option<String>,
    ) -> Result<Value, CliError> {
        let url = self.url(path, query);
        let mut req = self.request(&self.http, method.clone(), &url);
        if let Some(body) = body {
            req = req.header("content-type", "application/json").body(body);
        }
        let resp = req.send().await.map_err(|e| self.unreachable(&e))?;
        let status = resp.status();
        let text = resp.text().await.map_err(|e| self.unreachable(&e))?;
        if !status.is_success() {
            return Err(refused(status, &text));
        }
        if text.trim().is_empty() {
            return Ok(Value::Null);
        }
        serde_json::from_str(&text).map_err(|e| CliError::BadAnswer {
            server: self.base.clone(),
            what: format!("{method} {path}"),
            reason: e.to_string(),
        })
    }

    pub async fn get(&self, path: &str, query: &[(&str, Option<&str>)]) -> Result<Value, CliError> {
        self.send(Method::GET, path, query, None).await
    }

    pub async fn post(&self, path: &str, body: String) -> Result<Value, CliError> {
        self.send(Method::POST, path, &[], Some(body)).await
    }

    /// Opens the live stream; the response's body is the event stream.
    pub async fn open_stream(
        &self,
        path: &str,
        query: &[(&str, Option<&str>)],
    ) -> Result<reqwest::Response, CliError> {
        let url = self.url(path, query);
        let resp = self
            .request(&self.stream_http, Method::GET, &url)
            .header("accept", "text/event-stream")
            .send()
            .await
            .map_err(|e| self.unreachable(&e))?;
        let status = resp.status();
        if !status.is_success() {
            let text = resp.text().await.unwrap_or_default();
            return Err(refused(status, &text));
        }
        Ok(resp)
    }

    /// A transport failure as "cannot reach the daemon at URL: reason".
    pub fn unreachable(&self, e: &reqwest::Error) -> CliError {
        CliError::Unreachable {
            server: self.base.clone(),
            reason: transport_reason(e),
        }
    }
}

/// Accepts `host:port` as well as a URL; refuses anything but http(s).
fn normalize_server(server: &str) -> Result<String, CliError> {
    let server = server.trim();
    let with_scheme = if server.contains("://") {
        server.to_string()
    } else {
        format!("http://{server}")
    };
    let url = url::Url::parse(&with_scheme)
        .map_err(|e| CliError::Usage(format!("--server {server:?} is not a URL: {e}")))?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err(CliError::Usage(format!(
            "--server {server:?}: the daemon speaks http or https, not {}",
            url.scheme()
        )));
    }
    if url.query().is_some() || url.fragment().is_some() {
        return Err(CliError::Usage(format!(
            "--server {server:?}: give the daemon's base URL, without a query or fragment"
        )));
    }
    Ok(url.as_str().trim_end_matches('/').to_string())
}

/// The daemon's problem+json `detail` (or its body, or its status) with a hint for the status.
pub fn refused(status: StatusCode, body: &str) -> CliError {
    let detail = serde_json::from_str::<Value>(body)
        .ok()
        .and_then(|v| v.get("detail").and_then(Value::as_str).map(str::to_string))
        .unwrap_or_else(|| {
            let body = body.trim();
            if body.is_empty() {
                "no details given".to_string()
            } else {
                // Not problem+json (a proxy in between?): its first line, kept short.
                body.lines()
                    .next()
                    .unwrap_or("")
                    .chars()
                    .take(200)
                    .collect()
            }
        });
    let hint = match status {
        StatusCode::UNAUTHORIZED => " (pass --token or set DISPATCHER_TOKEN)",
        StatusCode::FORBIDDEN => " (use a token with a role that allows it)",
        StatusCode::PAYLOAD_TOO_LARGE => " (send fewer events at once: a smaller --batch)",
        _ => "",
    };
    CliError::Refused {
        status,
        detail,
        hint,
    }
}

/// The root cause of a transport error in a few lowercase words: "connection refused",
/// "timed out", "failed to lookup address information: …".
pub fn transport_reason(e: &reqwest::Error) -> String {
    use std::error::Error as _;
    let mut io_kind = None;
    let mut innermost = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        if let Some(io) = s.downcast_ref::<std::io::Error>() {
            io_kind = Some(io.kind());
        }
        innermost = s.to_string();
        source = s.source();
    }
    use std::io::ErrorKind as K;
    match io_kind {
        Some(K::ConnectionRefused) => return "connection refused".into(),
        Some(K::ConnectionReset) => return "connection reset".into(),
        Some(K::ConnectionAborted) => return "connection aborted".into(),
        Some(K::TimedOut) => return "timed out".into(),
        _ => {}
    }
    if e.is_timeout() {
        return "timed out".into();
    }
    // "tcp connect error: Connection refused (os error 111)" reads better without the OS code.
    let reason = match innermost.find(" (os error") {
        Some(i) => innermost[..i].to_string(),
        None => innermost,
    };
    let mut chars = reason.chars();
    match chars.next() {
        Some(first) => first.to_lowercase().chain(chars).collect(),
        None => "unknown error".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_urls_are_normalized() {
        assert_eq!(
            normalize_server("http://127.0.0.1:8080/").unwrap(),
            "http://127.0.0.1:8080"
        );
        assert_eq!(
            normalize_server("127.0.0.1:9000").unwrap(),
            "http://127.0.0.1:9000"
        );
        assert_eq!(
            normalize_server("https://ops.example.com/dispatcher/").unwrap(),
            "https://ops.example.com/dispatcher"
        );
        assert!(normalize_server("ftp://x").is_err());
        assert!(normalize_server("http://x/?a=1").is_err());
    }

    #[test]
    fn queries_leave_out_empty_values_and_encode_the_rest() {
        let c = Client::new("http://h:1", None).unwrap();
        assert_eq!(c.url("/v1/deliveries", &[]), "http://h:1/v1/deliveries");
        assert_eq!(
            c.url(
                "/v1/deliveries",
                &[
                    ("status", Some("failed")),
                    ("event", None),
                    ("since", Some("2025-01-01T00:00:00+03:00"))
                ]
            ),
            "http://h:1/v1/deliveries?status=failed&since=2025-01-01T00%3A00%3A00%2B03%3A00"
        );
    }

    #[test]
    fn a_problem_shows_its_detail_and_status() {
        let e = refused(
            StatusCode::NOT_FOUND,
            r#"{"type":"about:blank","title":"Not Found","status":404,"detail":"no delivery with id x"}"#,
        );
        assert_eq!(
            e.to_string(),
            "the daemon answered 404 Not Found: no delivery with id x"
        );
        let e = refused(StatusCode::BAD_GATEWAY, "<html>bad gateway</html>\nmore");
        assert_eq!(
            e.to_string(),
            "the daemon answered 502 Bad Gateway: <html>bad gateway</html>"
        );
        let e = refused(StatusCode::UNAUTHORIZED, "");
        assert!(e.to_string().contains("DISPATCHER_TOKEN"), "{e}");
    }
}
