//! Request bodies of the amoCRM-compatible APIs: JSON, or a form with PHP bracket keys as PHP's
//! `http_build_query` sends it (`subscribe[0][url]=…&subscribe[0][events][0]=add_lead`, brackets
//! percent-encoded or not), both read into the same JSON value. `serde_qs` does the parsing.

use super::ApiError;
use axum::http::{HeaderMap, header};
use serde_json::Value;

/// Deepest bracket nesting read from a form; the amoCRM APIs need three levels.
const MAX_DEPTH: usize = 8;

/// Reads a form body with PHP bracket keys: `a[0][b]=x` is `{"a": [{"b": "x"}]}`, indexes from 0
/// in any order are a list, every value is a string.
pub fn parse_form(bytes: &[u8]) -> Result<Value, ApiError> {
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Err(ApiError::bad_request(
            "the request body is empty; expected JSON or a form",
        ));
    }
    let value: Value = serde_qs::Config::new()
        .max_depth(MAX_DEPTH)
        .use_form_encoding(true)
        .deserialize_bytes(bytes)
        .map_err(|e| ApiError::bad_request(format!("invalid form body: {e}")))?;
    Ok(value)
}

/// Parses a query string the same way (`filter[destination]=…`); an empty one is `{}`.
pub fn parse_query(query: &str) -> Result<Value, ApiError> {
    if query.is_empty() {
        return Ok(Value::Object(Default::default()));
    }
    serde_qs::Config::new()
        .max_depth(MAX_DEPTH)
        .use_form_encoding(true)
        .deserialize_str(query)
        .map_err(|e| ApiError::bad_request(format!("invalid query string: {e}")))
}

/// A JSON or form body, told apart by `Content-Type`, or by the first byte when there is none
/// that says (`{` or `[` is JSON).
pub fn parse_json_or_form(headers: &HeaderMap, bytes: &[u8]) -> Result<Value, ApiError> {
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_ascii_lowercase();
    let mime = content_type.split(';').next().unwrap_or("").trim();
    let is_json = if mime == "application/json" || mime.ends_with("+json") {
        true
    } else if mime == "application/x-www-form-urlencoded" {
        false
    } else if mime.starts_with("multipart/") {
        return Err(ApiError::new(
            axum::http::StatusCode::UNSUPPORTED_MEDIA_TYPE,
            format!(
                "{mime} is not read here; send JSON or a form as http_build_query makes it (application/x-www-form-urlencoded)"
            ),
        ));
    } else {
        matches!(
            bytes.iter().find(|b| !b.is_ascii_whitespace()),
            Some(b'{' | b'[')
        )
    };
    if is_json {
        super::parse_json(bytes)
    } else {
        parse_form(bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn reads_what_http_build_query_sends() {
        // http_build_query(['subscribe' => [['url' => 'http://a.b/x?k=1', 'events' => ['add_lead', 'status_lead']]]])
        let body = "subscribe%5B0%5D%5Burl%5D=http%3A%2F%2Fa.b%2Fx%3Fk%3D1&subscribe%5B0%5D%5Bevents%5D%5B0%5D=add_lead&subscribe%5B0%5D%5Bevents%5D%5B1%5D=status_lead";
        assert_eq!(
            parse_form(body.as_bytes()).unwrap(),
            json!({"subscribe": [{"url": "http://a.b/x?k=1", "events": ["add_lead", "status_lead"]}]})
        );
    }

    #[test]
    fn reads_raw_brackets_nesting_spaces_and_utf8() {
        let body = "a[0][b][1]=x&a[0][b][0]=y&a[1][c]=%D0%A1%D0%B4+1&d=";
        assert_eq!(
            parse_form(body.as_bytes()).unwrap(),
            json!({"a": [{"b": ["y", "x"]}, {"c": "Сд 1"}], "d": ""})
        );
    }

    #[test]
    fn refuses_what_cannot_be_a_structure() {
        for bad in ["", "  ", "a=1&a[b]=2", "a[b=1", "a[1]=x&a[3]=y"] {
            assert!(parse_form(bad.as_bytes()).is_err(), "{bad:?}");
        }
        let deep = format!("a{}=1", "[x]".repeat(MAX_DEPTH + 2));
        // Deeper keys than MAX_DEPTH are not nested further; they never panic.
        let _ = parse_form(deep.as_bytes());
    }

    #[test]
    fn tells_json_from_form() {
        let mut h = HeaderMap::new();
        assert_eq!(
            parse_json_or_form(&h, br#" {"a": [1]}"#).unwrap(),
            json!({"a": [1]})
        );
        assert_eq!(parse_json_or_form(&h, b"a=1").unwrap(), json!({"a": "1"}));
        h.insert(
            header::CONTENT_TYPE,
            "application/x-www-form-urlencoded; charset=UTF-8"
                .parse()
                .unwrap(),
        );
        assert_eq!(
            parse_json_or_form(&h, b"a%5B0%5D=1").unwrap(),
            json!({"a": ["1"]})
        );
        h.insert(header::CONTENT_TYPE, "application/json".parse().unwrap());
        assert_eq!(
            parse_json_or_form(&h, b"a=1").unwrap_err().status,
            axum::http::StatusCode::BAD_REQUEST
        );
        h.insert(
            header::CONTENT_TYPE,
            "multipart/form-data; boundary=x".parse().unwrap(),
        );
        assert_eq!(
            parse_json_or_form(&h, b"--x").unwrap_err().status,
            axum::http::StatusCode::UNSUPPORTED_MEDIA_TYPE
        );
    }

    #[test]
    fn parses_query_strings() {
        assert_eq!(parse_query("").unwrap(), json!({}));
        assert_eq!(
            parse_query("filter%5Bdestination%5D=http%3A%2F%2Fa.b%2F").unwrap(),
            json!({"filter": {"destination": "http://a.b/"}})
        );
        assert_eq!(
            parse_query("filter[destination]=http://a.b/").unwrap(),
            json!({"filter": {"destination": "http://a.b/"}})
        );
    }
}
