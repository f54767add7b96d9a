//! One HTTP attempt: build the request of SPEC §7, send it, and reduce the answer to a code.
//!
//! Code 0 stands for no HTTP answer (connect error, TLS error, timeout, reset, an answer that does
//! not parse as HTTP/1.x: [`super::h1`]). Redirects are not followed. The first 1 KiB of the
//! answer's body is kept for the delivery log.
//!
//! An attempt goes out over its lane slot's own HTTP/1.1 connection ([`super::conn`]), which
//! caps a subscription's connections at `per_subscription`. With `delivery.proxy` set, attempts
//! go through one shared reqwest client instead (its pool, without that hard cap).

use super::conn::{ConnectError, Dialer, Origin, Slot};
use super::guard::{Guard, GuardedResolver};
use super::h1;
use super::signature::Signer;
use crate::store::Subscription;
use bytes::Bytes;
use http::header::{self, HeaderName, HeaderValue};
use std::sync::Arc;
use std::time::{Duration, Instant};
use uuid::Uuid;

const X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
const WEBHOOK_ID: HeaderName = HeaderName::from_static("webhook-id");
const WEBHOOK_TIMESTAMP: HeaderName = HeaderName::from_static("webhook-timestamp");
const WEBHOOK_SIGNATURE: HeaderName = HeaderName::from_static("webhook-signature");

/// How much of a response body the log keeps.
const KEPT_BODY: usize = 1024;
/// How much of a response body is read at most; past this the connection is dropped rather
/// than drained, so a receiver cannot keep an attempt busy by streaming.
const DRAINED_BODY: usize = 64 * 1024;

/// What one attempt came to.
#[derive(Debug, Clone)]
pub struct AttemptOutcome {
    pub code: u16,
    pub error: Option<String>,
    pub response_body: Option<String>,
    pub duration: Duration,
    /// The `Retry-After` of a 429 or 503 answer.
    pub retry_after: Option<Duration>,
}

/// How attempts reach receivers.
pub enum Client {
    /// Each lane slot dials and keeps its own connection.
    Direct {
        dialer: Dialer,
        user_agent: HeaderValue,
    },
    /// Through `delivery.proxy`, with one shared reqwest client.
    Proxied(reqwest::Client),
}

#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error(transparent)]
    Reqwest(#[from] reqwest::Error),
    #[error("TLS: {0}")]
    Tls(#[from] rustls::Error),
    #[error("delivery.user_agent is not a valid header value")]
    UserAgent,
}

/// Builds how attempts are sent: over the lanes' own connections, or with an egress proxy over a
/// shared reqwest client (connection pooling, no redirects, the guarded resolver).
pub fn build_client(
    guard: Arc<Guard>,
    user_agent: &str,
    max_idle_per_host: usize,
    proxy: Option<&url::Url>,
) -> Result<Client, BuildError> {
    let Some(proxy) = proxy else {
        return Ok(Client::Direct {
            dialer: Dialer::new(guard)?,
            user_agent: HeaderValue::from_str(user_agent).map_err(|_| BuildError::UserAgent)?,
        });
    };
    // A pool may dial a new connection while a finished one is still on its way back to it, so
    // through a proxy the per-subscription connection cap is not a hard one.
    let client = reqwest::Client::builder()
        .user_agent(user_agent)
        .redirect(reqwest::redirect::Policy::none())
        // Subscriptions often share a host (a CRM's one webhook endpoint): keep as many idle
        // connections as attempts may be in flight, so none is closed only to be opened again.
        .pool_max_idle_per_host(max_idle_per_host.max(1))
        .pool_idle_timeout(Duration::from_secs(60))
        .tcp_nodelay(true)
        .dns_resolver(Arc::new(GuardedResolver { guard }))
        .proxy(reqwest::Proxy::all(proxy.as_str())?)
        .build()?;
    Ok(Client::Proxied(client))
}

/// The request of one attempt.
pub struct AttemptRequest<'a> {
    pub sub: &'a Subscription,
    /// The subscription's secret as an HMAC key.
    pub signer: &'a Signer,
    pub url: &'a url::Url,
    pub delivery_id: Uuid,
    /// From the format's encoder: `creatio-form`'s names its multipart boundary.
    pub content_type: String,
    pub body: Bytes,
    pub timeout: Duration,
}

/// Sends one attempt over `slot`'s connection (dialling one when the slot has none open) and
/// never fails: every problem becomes code 0 with an error text.
pub async fn send(
    client: &Client,
    guard: &Guard,
    slot: &mut Slot,
    req: AttemptRequest<'_>,
) -> AttemptOutcome {
    let started = Instant::now();
    let AttemptRequest {
        sub,
        signer,
        url,
        delivery_id,
        content_type,
        body,
        timeout,
    } = req;
    if let Err(e) = guard.check_before_request(url).await {
        return no_answer(e.to_string(), started);
    }
    let timestamp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    let msg_id = delivery_id.to_string();
    let timestamp = timestamp.to_string();
    let sig = signer.sign(&msg_id, &timestamp, &body);
    let out = Outgoing {
        sub,
        url,
        headers: [
            (header::CONTENT_TYPE, content_type),
            (X_REQUEST_ID, Uuid::new_v4().to_string()),
            (WEBHOOK_ID, msg_id),
            (WEBHOOK_TIMESTAMP, timestamp),
            (WEBHOOK_SIGNATURE, sig),
        ],
        body,
        timeout,
        started,
    };
    match client {
        Client::Direct { dialer, user_agent } => send_direct(dialer, user_agent, slot, out).await,
        Client::Proxied(client) => send_proxied(client, out).await,
    }
}

/// An attempt's request, signed, ready to go out.
struct Outgoing<'a> {
    sub: &'a Subscription,
    url: &'a url::Url,
    /// The protocol's own headers (SPEC §7), before the subscription's.
    headers: [(HeaderName, String); 5],
    body: Bytes,
    timeout: Duration,
    started: Instant,
}

fn no_answer(error: String, started: Instant) -> AttemptOutcome {
    AttemptOutcome {
        code: 0,
        error: Some(error),
        response_body: None,
        duration: started.elapsed(),
        retry_after: None,
    }
}

fn timeout_text(timeout: Duration) -> String {
    format!(
        "timeout: no answer within {}",
        humantime::format_duration(timeout)
    )
}

/// What stopped a direct attempt before an answer.
enum Failure {
    Connect(ConnectError),
    Request(h1::Error),
}

/// Sends an attempt over the slot's connection. The per-attempt timeout covers everything from
/// the connect to the end of the body; on expiry the connection is dropped (closed).
async fn send_direct(
    dialer: &Dialer,
    user_agent: &HeaderValue,
    slot: &mut Slot,
    out: Outgoing<'_>,
) -> AttemptOutcome {
    let Outgoing {
        sub,
        url,
        headers,
        body,
        timeout,
        started,
    } = out;
    let deadline = tokio::time::Instant::from_std(started) + timeout;
    let Some(origin) = Origin::of(url) else {
        return no_answer("bad destination URL: not http(s)".into(), started);
    };
    let request = match encode_request(url, user_agent, &headers, sub, &body) {
        Ok(r) => r,
        Err(e) => return no_answer(format!("error: {e}"), started),
    };
    // The slot's connection if it is still open, else a new one. A request that could not be
    // written on a kept connection (the receiver had just closed it) goes once more on a new one.
    let exchange = async {
        loop {
            let kept = slot.take_ready(&origin);
            let reused = kept.is_some();
            let mut conn = match kept {
                Some(conn) => conn,
                None => dialer.connect(&origin).await.map_err(Failure::Connect)?,
            };
            if let Err(e) = conn.write(&request).await {
                if reused {
                    continue;
                }
                return Err(Failure::Request(e.into()));
            }
            return match conn.head().await {
                Ok(head) => Ok((conn, head)),
                Err(e) => Err(Failure::Request(e)),
            };
        }
    };
    let (mut conn, head) = match tokio::time::timeout_at(deadline, exchange).await {
        Err(_) => return no_answer(timeout_text(timeout), started),
        Ok(Err(Failure::Connect(e))) => {
            return no_answer(format!("connect error: {}", innermost(&e)), started);
        }
        Ok(Err(Failure::Request(e))) => {
            return no_answer(format!("request error: {}", innermost(&e)), started);
        }
        Ok(Ok(exchanged)) => exchanged,
    };
    let code = head.code;
    let retry_after = retry_after(code, head.retry_after.as_deref());
    let mut kept: Vec<u8> = Vec::new();
    let read = conn.body(head.framing, DRAINED_BODY, |chunk| {
        keep_start(&mut kept, chunk)
    });
    let (ended, body_error) = match tokio::time::timeout_at(deadline, read).await {
        Ok(Ok(end)) => (end == h1::BodyEnd::Complete, None),
        // The status arrived: the answer counts, whatever happened to its body.
        Ok(Err(e)) => (
            false,
            Some(format!(
                "reading the response body: error: {}",
                innermost(&e)
            )),
        ),
        Err(_) => (
            false,
            Some(format!(
                "reading the response body: {}",
                timeout_text(timeout)
            )),
        ),
    };
    // Only a connection whose answer was read to its end, and that the receiver keeps open, can
    // carry the next request; any other is dropped here, which closes it.
    if ended && head.keep_alive {
        slot.keep(conn);
    }
    AttemptOutcome {
        code,
        error: body_error,
        response_body: (!kept.is_empty()).then(|| String::from_utf8_lossy(&kept).into_owned()),
        duration: started.elapsed(),
        retry_after,
    }
}

/// The request of SPEC §7 in origin form, in one piece, with the headers reqwest used to add
/// (`User-Agent`, `Host`, `Accept`) and its `Content-Length`; an error names a subscription header
/// that cannot be sent.
fn encode_request(
    url: &url::Url,
    user_agent: &HeaderValue,
    headers: &[(HeaderName, String); 5],
    sub: &Subscription,
    body: &[u8],
) -> Result<Vec<u8>, String> {
    let target = &url[url::Position::BeforePath..url::Position::AfterQuery];
    let target = if target.is_empty() { "/" } else { target };
    let host = url.host_str().unwrap_or_default();
    let host = match url.port() {
        Some(port) => format!("{host}:{port}"),
        None => host.to_string(),
    };
    // Checked as the API checks them when a subscription is stored (a record written otherwise
    // must not put a line break into the request).
    for (k, v) in &sub.headers {
        if HeaderName::from_bytes(k.as_bytes()).is_err() {
            return Err(format!("invalid header name {k:?}"));
        }
        if HeaderValue::from_str(v).is_err() {
            return Err(format!("invalid value of header {k}"));
        }
    }
    // reqwest's default, unless the subscription's own headers name one.
    let accept = (!sub.headers.keys().any(|k| k.eq_ignore_ascii_case("accept")))
        .then_some(("accept", &b"*/*"[..]));
    let all = headers
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_bytes()))
        .chain(sub.headers.iter().map(|(k, v)| (k.as_str(), v.as_bytes())))
        .chain([
            ("user-agent", user_agent.as_bytes()),
            ("host", host.as_bytes()),
        ])
        .chain(accept);
    let mut out = Vec::with_capacity(256 + body.len());
    h1::encode_request(&mut out, target, all, body);
    Ok(out)
}

/// The `Retry-After` of a 429 or 503 answer.
fn retry_after(code: u16, value: Option<&str>) -> Option<Duration> {
    if code != 429 && code != 503 {
        return None;
    }
    value.and_then(parse_retry_after)
}

/// Adds the start of `chunk` to the kept start of a body, up to [`KEPT_BODY`].
fn keep_start(kept: &mut Vec<u8>, chunk: &[u8]) {
    if kept.len() < KEPT_BODY {
        let take = (KEPT_BODY - kept.len()).min(chunk.len());
        kept.extend_from_slice(&chunk[..take]);
    }
}

/// The text of an error's innermost cause: it says what happened ("Connection refused", the
/// guard's text).
fn innermost(e: &(dyn std::error::Error + 'static)) -> String {
    let mut last = e;
    while let Some(s) = last.source() {
        last = s;
    }
    last.to_string()
}

/// Sends an attempt through the egress proxy with the shared reqwest client.
async fn send_proxied(client: &reqwest::Client, out: Outgoing<'_>) -> AttemptOutcome {
    let Outgoing {
        sub,
        url,
        headers,
        body,
        timeout,
        started,
    } = out;
    let mut rb = client.post(url.clone()).timeout(timeout);
    for (k, v) in headers {
        rb = rb.header(k, v);
    }
    for (k, v) in &sub.headers {
        rb = rb.header(k.as_str(), v.as_str());
    }
    let mut resp = match rb.body(body).send().await {
        Ok(r) => r,
        Err(e) => return no_answer(describe(&e, timeout), started),
    };
    let code = resp.status().as_u16();
    let retry_after = retry_after(
        code,
        resp.headers()
            .get(header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok()),
    );
    let mut kept: Vec<u8> = Vec::new();
    let mut read = 0usize;
    let mut body_error = None;
    loop {
        match resp.chunk().await {
            Ok(Some(chunk)) => {
                read += chunk.len();
                keep_start(&mut kept, &chunk);
                if read >= DRAINED_BODY {
                    break;
                }
            }
            Ok(None) => break,
            Err(e) => {
                // The status arrived: the answer counts, whatever happened to its body.
                body_error = Some(format!(
                    "reading the response body: {}",
                    describe(&e, timeout)
                ));
                break;
            }
        }
    }
    AttemptOutcome {
        code,
        error: body_error,
        response_body: (!kept.is_empty()).then(|| String::from_utf8_lossy(&kept).into_owned()),
        duration: started.elapsed(),
        retry_after,
    }
}

/// A short description of a reqwest transport error, without the URL (its path may hold a key).
fn describe(e: &reqwest::Error, timeout: Duration) -> String {
    if e.is_timeout() {
        return timeout_text(timeout);
    }
    let kind = if e.is_connect() {
        "connect error"
    } else if e.is_request() {
        "request error"
    } else if e.is_body() {
        "body error"
    } else {
        "error"
    };
    match std::error::Error::source(e) {
        Some(cause) => format!("{kind}: {}", innermost(cause)),
        None => kind.to_string(),
    }
}

/// `Retry-After` as delay-seconds or an HTTP date.
pub fn parse_retry_after(v: &str) -> Option<Duration> {
    let v = v.trim();
    if let Ok(secs) = v.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let at = httpdate::parse_http_date(v).ok()?;
    Some(
        at.duration_since(std::time::SystemTime::now())
            .unwrap_or_default(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_after_forms() {
        assert_eq!(parse_retry_after("120"), Some(Duration::from_secs(120)));
        assert_eq!(
            parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT"),
            Some(Duration::ZERO)
        );
        assert_eq!(parse_retry_after("soon"), None);
    }

    #[test]
    fn a_direct_request_is_in_origin_form_with_the_host_and_one_accept_in_one_piece() {
        let sub: Subscription = serde_json::from_value(serde_json::json!({
            "id": Uuid::nil(), "url": "", "events": [], "name": null, "format": "amocrm",
            "retry": "amocrm", "timeout_ms": null, "enabled": true, "disabled_reason": null,
            "created_at": 0, "updated_at": 0, "secret": "whsec_",
            "headers": {"Accept": "application/json", "X-Api-Key": "k-1"},
        }))
        .unwrap();
        let headers = [
            (header::CONTENT_TYPE, "application/json".to_string()),
            (X_REQUEST_ID, "r".to_string()),
            (WEBHOOK_ID, "i".to_string()),
            (WEBHOOK_TIMESTAMP, "1".to_string()),
            (WEBHOOK_SIGNATURE, "v1,s".to_string()),
        ];
        let ua = HeaderValue::from_static("webhook-dispatcher/test");
        let url = url::Url::parse("http://[::1]:9000/amo/hook?key=abc#frag").unwrap();
        let req = encode_request(&url, &ua, &headers, &sub, b"{}").unwrap();
        let req = String::from_utf8(req).unwrap();
        let (head, body) = req.split_once("\r\n\r\n").unwrap();
        let mut lines = head.split("\r\n");
        assert_eq!(lines.next(), Some("POST /amo/hook?key=abc HTTP/1.1"));
        let lines: Vec<&str> = lines.collect();
        assert_eq!(
            lines,
            [
                "content-type: application/json",
                "x-request-id: r",
                "webhook-id: i",
                "webhook-timestamp: 1",
                "webhook-signature: v1,s",
                "accept: application/json",
                "x-api-key: k-1",
                "user-agent: webhook-dispatcher/test",
                "host: [::1]:9000",
                "content-length: 2",
            ]
        );
        assert_eq!(body, "{}");
        // A default port is left out of Host, an empty path is "/", and without a header of the
        // subscription's own the Accept is reqwest's.
        let url = url::Url::parse("https://hooks.example.com").unwrap();
        let mut plain = sub.clone();
        plain.headers.clear();
        let req = encode_request(&url, &ua, &headers, &plain, b"").unwrap();
        let req = String::from_utf8(req).unwrap();
        assert!(req.starts_with("POST / HTTP/1.1\r\n"), "{req}");
        assert!(
            req.contains("\r\nhost: hooks.example.com\r\naccept: */*\r\n"),
            "{req}"
        );
        assert!(req.ends_with("\r\ncontent-length: 0\r\n\r\n"), "{req}");
        // A header that could not be sent as it is (stored before headers were checked) is an
        // error naming it, not a request.
        let mut bad = sub.clone();
        bad.headers
            .insert("X-Bad".into(), "a\r\nInjected: 1".into());
        assert_eq!(
            encode_request(&url, &ua, &headers, &bad, b"").unwrap_err(),
            "invalid value of header X-Bad"
        );
    }
}
