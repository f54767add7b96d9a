//! A webhook receiver for trying the dispatcher locally: prints every request it gets and answers
//! with a status you choose, failing on demand.
//!
//! ```sh
//! cargo run --example receiver -- 9000            # answer 200 on 127.0.0.1:9000
//! cargo run --example receiver -- 9000 500        # answer 500 (watch the retries)
//! cargo run --example receiver -- 9000 500 2      # answer 500 twice, then 200
//! ```

use axum::body::Bytes;
use axum::http::{HeaderMap, StatusCode, Uri};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let port: u16 = args.next().as_deref().unwrap_or("9000").parse()?;
    let status: u16 = args.next().as_deref().unwrap_or("200").parse()?;
    let failures: Option<u64> = args.next().map(|n| n.parse()).transpose()?;
    let status = StatusCode::from_u16(status)?;
    let seen = Arc::new(AtomicU64::new(0));

    let app = axum::Router::new().fallback(move |uri: Uri, headers: HeaderMap, body: Bytes| {
        let seen = seen.clone();
        async move {
            let n = seen.fetch_add(1, Ordering::SeqCst) + 1;
            let answer = match failures {
                Some(f) if n > f => StatusCode::OK,
                _ => status,
            };
            let h = |k: &str| {
                headers
                    .get(k)
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("-")
                    .to_string()
            };
            println!(
                "#{n} POST {uri} webhook-id={} content-type={} -> {}\n{}\n",
                h("webhook-id"),
                h("content-type"),
                answer.as_u16(),
                String::from_utf8_lossy(&body)
            );
            answer
        }
    });
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port)).await?;
    println!("receiver on http://127.0.0.1:{port}/ answering {status}");
    axum::serve(listener, app).await?;
    Ok(())
}
