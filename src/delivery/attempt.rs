//! One HTTP attempt: build the request of SPEC §7, send it, and reduce the answer to a code.
//!
//! Code 0 stands for no HTTP answer (connect error, TLS error, timeout, reset). Redirects are not
//! followed. The first 1 KiB of the answer's body is kept for the delivery log.

use super::guard::{Guard, GuardedResolver};
use super::signature;
use crate::store::Subscription;
use bytes::Bytes;
use std::sync::Arc;
use std::time::{Duration, Instant};
use uuid::Uuid;

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

/// Builds the shared HTTP client: connection pooling, no redirects, the guarded resolver.
pub fn build_client(
    guard: Arc<Guard>,
    user_agent: &str,
    max_idle_per_host: usize,
    proxy: Option<&url::Url>,
) -> Result<reqwest::Client, reqwest::Error> {
    let mut b = reqwest::Client::builder()
        .user_agent(user_agent)
        .redirect(reqwest::redirect::Policy::none())
        // Subscriptions often share a host (a CRM's one webhook endpoint): keep as many idle
        // connections as attempts may be in flight, so none is closed only to be opened again.
        .pool_max_idle_per_host(max_idle_per_host.max(1))
        .pool_idle_timeout(Duration::from_secs(60))
        .tcp_nodelay(true)
        .dns_resolver(Arc::new(GuardedResolver { guard }));
    b = match proxy {
        Some(p) => b.proxy(reqwest::Proxy::all(p.as_str())?),
        None => b.no_proxy(),
    };
    b.build()
}

/// The request of one attempt.
pub struct AttemptRequest<'a> {
    pub sub: &'a Subscription,
    pub url: &'a url::Url,
    pub delivery_id: Uuid,
    /// From the format's encoder: `creatio-form`'s names its multipart boundary.
    pub content_type: String,
    pub body: Bytes,
    pub timeout: Duration,
}

/// Sends one attempt and never fails: every problem becomes code 0 with an error text.
pub async fn send(
    client: &reqwest::Client,
    guard: &Guard,
    req: AttemptRequest<'_>,
) -> AttemptOutcome {
    let started = Instant::now();
    let no_answer = |error: String, started: Instant| AttemptOutcome {
        code: 0,
        error: Some(error),
        response_body: None,
        duration: started.elapsed(),
        retry_after: None,
    };
    if let Err(e) = guard.check_before_request(req.url).await {
        return no_answer(e.to_string(), started);
    }
    let timestamp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    let msg_id = req.delivery_id.to_string();
    let sig = signature::sign(&req.sub.secret, &msg_id, timestamp, &req.body);
    let mut rb = client
        .post(req.url.clone())
        .timeout(req.timeout)
        .header(reqwest::header::CONTENT_TYPE, req.content_type)
        .header("x-request-id", Uuid::new_v4().to_string())
        .header("webhook-id", msg_id)
        .header("webhook-timestamp", timestamp.to_string())
        .header("webhook-signature", sig);
    for (k, v) in &req.sub.headers {
        rb = rb.header(k.as_str(), v.as_str());
    }
    let mut resp = match rb.body(req.body).send().await {
        Ok(r) => r,
        Err(e) => return no_answer(describe(&e, req.timeout), started),
    };
    let code = resp.status().as_u16();
    let retry_after = if code == 429 || code == 503 {
        resp.headers()
            .get(reqwest::header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(parse_retry_after)
    } else {
        None
    };
    let mut kept: Vec<u8> = Vec::new();
    let mut read = 0usize;
    let mut body_error = None;
    loop {
        match resp.chunk().await {
            Ok(Some(chunk)) => {
                read += chunk.len();
                if kept.len() < KEPT_BODY {
                    let take = (KEPT_BODY - kept.len()).min(chunk.len());
                    kept.extend_from_slice(&chunk[..take]);
                }
                if read >= DRAINED_BODY {
                    break;
                }
            }
            Ok(None) => break,
            Err(e) => {
                // The status arrived: the answer counts, whatever happened to its body.
                body_error = Some(format!(
                    "reading the response body: {}",
                    describe(&e, req.timeout)
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

/// A short description of a transport error, without the URL (its path may hold a key).
fn describe(e: &reqwest::Error, timeout: Duration) -> String {
    if e.is_timeout() {
        return format!(
            "timeout: no answer within {}",
            humantime::format_duration(timeout)
        );
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
    // Walk to the innermost cause: it says what happened ("Connection refused", the guard's text).
    let mut source: Option<&dyn std::error::Error> = std::error::Error::source(e);
    let mut last = None;
    while let Some(s) = source {
        last = Some(s.to_string());
        source = s.source();
    }
    match last {
        Some(cause) => format!("{kind}: {cause}"),
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
}
