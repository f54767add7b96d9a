//! Hardening through the real server and binary: tokens and roles, the SSRF guard at connect
//! time and through a proxy, idempotency keys, per-event size, and SIGTERM under load.

mod common;

use common::{Receiver, TestServer, wait_for, wait_for_async};
use serde_json::{Value, json};
use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

const WAIT: Duration = Duration::from_secs(15);

const TOKENS: &str = r#"
[api]
tokens = [
  { token = "admin-token-0123456789", role = "admin" },
  { token = "emitter-token-0123456789", role = "emitter" },
  { token = "reader-token-0123456789", role = "reader" },
]
"#;

async fn call(server: &TestServer, method: &str, path: &str, token: Option<&str>) -> (u16, Value) {
    let mut req = server
        .http
        .request(method.parse().unwrap(), server.url(path))
        .header("content-type", "application/json");
    if let Some(t) = token {
        req = req.header("authorization", format!("Bearer {t}"));
    }
    let body = match (method, path) {
        ("POST", "/v1/events") => json!({"event": "add_lead", "data": {"id": 1}}).to_string(),
        ("POST", "/v1/subscriptions") => {
            json!({"url": "http://127.0.0.1:9/x", "events": ["add_lead"]}).to_string()
        }
        ("PATCH", _) => json!({"name": "x"}).to_string(),
        _ => String::new(),
    };
    let r = req.body(body).send().await.unwrap();
    let code = r.status().as_u16();
    let ct = r
        .headers()
        .get("content-type")
        .map(|v| v.to_str().unwrap().to_string())
        .unwrap_or_default();
    let text = r.text().await.unwrap();
    if code == 401 || code == 403 {
        assert_eq!(ct, "application/problem+json", "{method} {path}");
    }
    (code, serde_json::from_str(&text).unwrap_or(Value::Null))
}

#[tokio::test]
async fn tokens_and_roles_are_enforced_everywhere() {
    let server = TestServer::start(TOKENS).await;
    let admin = Some("admin-token-0123456789");
    let emitter = Some("emitter-token-0123456789");
    let reader = Some("reader-token-0123456789");
    let (code, sub) = call(&server, "POST", "/v1/subscriptions", admin).await;
    assert_eq!(code, 201, "{sub}");
    let sub_path = format!("/v1/subscriptions/{}", sub["id"].as_str().unwrap());
    let recover = format!("{sub_path}/recover");
    let endpoints: Vec<(&str, &str)> = vec![
        ("POST", "/v1/events"),
        ("POST", "/v1/subscriptions"),
        ("GET", "/v1/subscriptions"),
        ("GET", &sub_path),
        ("PATCH", &sub_path),
        ("POST", &recover),
        ("GET", "/v1/deliveries"),
        ("GET", "/v1/deliveries/00000000-0000-0000-0000-000000000000"),
        (
            "POST",
            "/v1/deliveries/00000000-0000-0000-0000-000000000000/redeliver",
        ),
        ("GET", "/metrics"),
    ];
    for (method, path) in &endpoints {
        let (code, body) = call(&server, method, path, None).await;
        assert_eq!(code, 401, "{method} {path} without a token: {body}");
        assert!(body["detail"].as_str().unwrap().contains("Bearer"));
        let (code, _) = call(&server, method, path, Some("wrong-token")).await;
        assert_eq!(code, 401, "{method} {path} with a wrong token");
        // The admin may do everything (its answer is not an auth refusal).
        let (code, body) = call(&server, method, path, admin).await;
        assert!(
            code != 401 && code != 403,
            "{method} {path} as admin: {code} {body}"
        );
        let reader_allowed = *method == "GET";
        let (code, _) = call(&server, method, path, reader).await;
        assert_eq!(
            code == 403,
            !reader_allowed,
            "{method} {path} as reader: {code}"
        );
        let emitter_allowed = *method == "POST" && *path == "/v1/events";
        let (code, _) = call(&server, method, path, emitter).await;
        assert_eq!(
            code == 403,
            !emitter_allowed,
            "{method} {path} as emitter: {code}"
        );
    }
    // The signing secret is shown to the admin only.
    let (_, as_reader) = call(&server, "GET", &sub_path, reader).await;
    assert!(as_reader.get("secret").is_none());
    let (_, as_admin) = call(&server, "GET", &sub_path, admin).await;
    assert!(as_admin["secret"].as_str().unwrap().starts_with("whsec_"));
    // Health needs no token; the stream needs a reader.
    assert_eq!(call(&server, "GET", "/healthz", None).await.0, 200);
    let r = server
        .http
        .get(server.url("/v1/deliveries/stream"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    let r = server
        .http
        .get(server.url("/v1/deliveries/stream"))
        .header("authorization", "bearer reader-token-0123456789")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let (code, _) = call(&server, "DELETE", &sub_path, reader).await;
    assert_eq!(code, 403);
    let (code, _) = call(&server, "DELETE", &sub_path, admin).await;
    assert_eq!(code, 204);
}

/// Subscriptions made while loopback was allowed; then the daemon restarts without the allowance
/// and every attempt is refused inside the process, by literal address and by a name.
#[tokio::test]
async fn private_destinations_are_refused_at_connect_time() {
    let rx = Receiver::start(200).await;
    let port = rx.addr.port();
    let server = TestServer::start("").await;
    for url in [
        format!("http://127.0.0.1:{port}/a"),
        format!("http://localhost:{port}/b"),
    ] {
        server
            .subscribe(json!({"url": url, "events": ["add_lead"], "retry": "once"}))
            .await;
    }
    let dir = server.stop().await;
    let server = TestServer::start_in(dir, "[delivery]\nallow_private = []\n").await;
    let receipt = server
        .emit(json!({"event": "add_lead", "data": {"id": 1}}))
        .await;
    assert_eq!(receipt["deliveries"], 2);
    let failed = wait_for_async("both deliveries to fail", WAIT, || async {
        let (_, l) = server.get("/v1/deliveries?status=failed").await;
        let items = l["deliveries"].as_array().unwrap().clone();
        (items.len() == 2).then_some(items)
    })
    .await;
    for d in failed {
        let a = &d["attempts"][0];
        assert_eq!(a["code"], 0, "{d}");
        let err = a["error"].as_str().unwrap();
        assert!(
            err.contains("127.0.0.1") && err.contains("allow_private"),
            "{err}"
        );
    }
    assert_eq!(rx.count(), 0, "no request left the process");
}

#[tokio::test]
async fn a_proxy_carries_every_attempt_and_the_guard_still_applies() {
    let proxy = Receiver::start(200).await;
    let dest = Receiver::start(200).await;
    let conf = format!(
        "[delivery]\nallow_private = [\"127.0.0.0/8\"]\nproxy = \"http://{}\"\n",
        proxy.addr
    );
    let server = TestServer::start(&conf).await;
    let url = format!("http://localhost:{}/hook?k=1", dest.addr.port());
    server
        .subscribe(json!({"url": url, "events": ["add_lead"], "retry": "once"}))
        .await;
    server
        .emit(json!({"event": "add_lead", "data": {"id": 1}}))
        .await;
    let got = proxy.wait_requests(1, WAIT).await;
    // An HTTP proxy gets the absolute URL as the request target.
    assert_eq!(got[0].path, url);
    assert!(got[0].header("webhook-signature").starts_with("v1,"));
    assert_eq!(dest.count(), 0);

    // Without the allowance, a name resolving to loopback is refused before the proxy sees it.
    let dir = server.stop().await;
    let conf = format!(
        "[delivery]\nallow_private = []\nproxy = \"http://{}\"\n",
        proxy.addr
    );
    let server = TestServer::start_in(dir, &conf).await;
    server
        .emit(json!({"event": "add_lead", "data": {"id": 2}}))
        .await;
    let d = wait_for_async("the delivery to fail", WAIT, || async {
        let (_, l) = server.get("/v1/deliveries?status=failed").await;
        l["deliveries"].as_array().unwrap().first().cloned()
    })
    .await;
    assert_eq!(d["attempts"][0]["code"], 0);
    assert_eq!(proxy.count(), 1);
}

#[tokio::test]
async fn an_event_id_is_accepted_once_also_across_a_restart() {
    let server = TestServer::start("").await;
    let rx = Receiver::start(200).await;
    server
        .subscribe(json!({"url": rx.url("/"), "events": ["add_lead"]}))
        .await;
    let event = json!({"event": "add_lead", "id": "crm-42", "data": {"id": 42}});
    let first = server.emit(event.clone()).await;
    assert_eq!(first["deliveries"], 1);
    let again = server.emit(event.clone()).await;
    assert_eq!(again, first, "the first receipt is answered again");
    // In a batch: the repeat gets the first receipt, the new one is stored.
    let (code, body) = server
        .post(
            "/v1/events",
            &json!({"events": [event.clone(), {"event": "add_lead", "id": "crm-43", "data": {"id": 43}}, {"event": "add_lead", "id": "crm-43", "data": {"id": 43}}]}),
        )
        .await;
    assert_eq!(code, 202);
    assert_eq!(body["events"][0], first);
    assert_eq!(body["events"][1]["deliveries"], 1);
    assert_eq!(body["events"][2], body["events"][1]);
    rx.wait_requests(2, WAIT).await;
    let dir = server.stop().await;
    let server = TestServer::start_in(dir, "").await;
    assert_eq!(server.emit(event).await, first);
    let (_, l) = server.get("/v1/deliveries").await;
    assert_eq!(l["deliveries"].as_array().unwrap().len(), 2);
}

#[tokio::test]
async fn the_embedded_emitter_refuses_an_event_larger_than_max_body() {
    let server =
        TestServer::start("[server]\nlisten = \"127.0.0.1:0\"\nmax_body = \"1KiB\"\n").await;
    let err = server
        .dispatcher
        .emitter()
        .emit(json!({"event": "add_lead", "data": {"id": 1, "note": "x".repeat(2000)}}))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("max_body"), "{err}");
    let (_, l) = server.get("/v1/deliveries").await;
    assert!(l["deliveries"].as_array().unwrap().is_empty());
}

/// SIGTERM while attempts are in flight: exit 0 and nothing lost; the restart delivers the rest.
#[tokio::test]
async fn sigterm_under_load_exits_cleanly_and_loses_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let config = common::binary_config(dir.path(), &format!("per_subscription = 4\n{TOKENS}"));
    let rx = Receiver::slow(200, Duration::from_millis(200)).await;
    let stderr_path = dir.path().join("stderr.log");
    let start =
        || common::start_binary(&config, std::fs::File::create(&stderr_path).unwrap().into());
    let (mut child, base) = start();
    let http = reqwest::Client::new();
    let auth = "Bearer admin-token-0123456789";
    let r = http
        .post(format!("{base}/v1/subscriptions"))
        .header("authorization", auth)
        .body(json!({"url": rx.url("/"), "events": ["add_lead"]}).to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    let accepted = Arc::new(Mutex::new(HashSet::new()));
    let refused_503 = Arc::new(Mutex::new(0usize));
    let mut senders = Vec::new();
    for s in 0..2u64 {
        let (http, base, accepted, refused) = (
            http.clone(),
            base.clone(),
            accepted.clone(),
            refused_503.clone(),
        );
        senders.push(tokio::spawn(async move {
            for i in 0..2000u64 {
                let id = s * 10_000 + i;
                let r = http
                    .post(format!("{base}/v1/events"))
                    .header("authorization", auth)
                    .body(json!({"event": "add_lead", "data": {"id": id}}).to_string())
                    .send()
                    .await;
                match r {
                    Ok(r) if r.status() == 202 => {
                        accepted.lock().unwrap().insert(id);
                    }
                    Ok(r) if r.status() == 503 => {
                        assert!(r.headers().contains_key("retry-after"));
                        *refused.lock().unwrap() += 1;
                        return;
                    }
                    _ => return,
                }
            }
        }));
    }
    wait_for("events accepted and attempts in flight", WAIT, || {
        (accepted.lock().unwrap().len() >= 50 && rx.count() >= 4).then_some(())
    })
    .await;
    common::stop_binary(&mut child).await;
    for s in senders {
        s.await.unwrap();
    }
    let accepted = accepted.lock().unwrap().clone();
    let in_flight_at_stop = rx.count();
    eprintln!(
        "accepted {} events, {in_flight_at_stop} requests reached the receiver before the stop",
        accepted.len()
    );
    let log = std::fs::read_to_string(&stderr_path).unwrap();
    assert!(
        !log.contains("admin-token-0123456789"),
        "a token is in the logs"
    );

    let (mut child, _base) = start();
    let lead_id = |body: &str| -> Option<u64> {
        body.split('&')
            .find_map(|kv| kv.strip_prefix("leads%5Badd%5D%5B0%5D%5Bid%5D="))
            .and_then(|v| v.parse().ok())
    };
    wait_for(
        &format!("all {} accepted events delivered", accepted.len()),
        Duration::from_secs(60),
        || {
            let got: HashSet<u64> = rx
                .requests()
                .iter()
                .filter_map(|r| lead_id(&r.body_str()))
                .collect();
            accepted.is_subset(&got).then_some(())
        },
    )
    .await;
    child.kill().unwrap();
    child.wait().unwrap();
}

/// SIGTERM while an attempt is in flight: until it is done the daemon still answers, intake with
/// 503 and `Retry-After` (SPEC §6: "intake answers 503 at once"), on a new connection and on one
/// kept alive from before the signal; then it exits 0, the attempt delivered.
#[tokio::test]
async fn after_sigterm_intake_answers_503_while_the_attempts_in_flight_finish() {
    let dir = tempfile::tempdir().unwrap();
    // The attempt outlasts the checks below, and the daemon waits for its answer.
    let config = common::binary_config(dir.path(), "timeout = \"10s\"\n");
    let rx = Receiver::slow(200, Duration::from_secs(4)).await;
    let stderr_path = dir.path().join("stderr.log");
    let (mut child, base) =
        common::start_binary(&config, std::fs::File::create(&stderr_path).unwrap().into());
    let kept = reqwest::Client::new();
    // On the client that keeps its connection for the checks below.
    let sub = common::subscribe_binary(
        &kept,
        &base,
        json!({"url": rx.url("/"), "events": ["add_lead"]}),
    )
    .await;
    let event = json!({"event": "add_lead", "data": {"id": 1}});
    let receipt = common::emit_binary(&kept, &base, event.clone()).await;
    let event = event.to_string();
    let event_id = receipt["events"][0]["id"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    let delivery = webhook_dispatcher::store::delivery_id(&event_id, 0);
    rx.wait_requests(1, WAIT).await;
    common::sigterm(&child);

    // A new connection each time, until intake is closed (a 202 before that is a fair answer).
    let refused = wait_for_async("intake to answer 503", WAIT, || async {
        let r = reqwest::Client::new()
            .post(format!("{base}/v1/events"))
            .body(event.clone())
            .send()
            .await
            .unwrap_or_else(|e| panic!("intake after SIGTERM on a new connection: {e}"));
        match r.status().as_u16() {
            202 => None,
            503 => Some(r),
            other => panic!("intake after SIGTERM answered {other}"),
        }
    })
    .await;
    assert!(refused.headers().contains_key("retry-after"));
    let body: Value = refused.json().await.unwrap();
    assert!(
        body["detail"].as_str().unwrap().contains("shutting down"),
        "{body}"
    );
    let r = kept
        .post(format!("{base}/v1/events"))
        .body(event.clone())
        .send()
        .await
        .unwrap_or_else(|e| panic!("intake after SIGTERM on the kept-alive connection: {e}"));
    assert_eq!(r.status(), 503);
    assert!(r.headers().contains_key("retry-after"));
    // Not ready, and no attempts promised now: health, redeliver and recover say so too.
    let r = kept.get(format!("{base}/healthz")).send().await.unwrap();
    assert_eq!(r.status(), 503);
    let r = kept
        .post(format!("{base}/v1/deliveries/{delivery}/redeliver"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 503);
    assert!(r.headers().contains_key("retry-after"));
    let r = kept
        .post(format!(
            "{base}/v1/subscriptions/{}/recover",
            sub["id"].as_str().unwrap()
        ))
        .body(json!({"since": "2000-01-01T00:00:00Z"}).to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 503);
    assert!(r.headers().contains_key("retry-after"));
    assert!(
        child.try_wait().unwrap().is_none(),
        "the daemon exited with the attempt still in flight"
    );

    let status = wait_for("the daemon to exit", WAIT, || child.try_wait().unwrap()).await;
    assert!(status.success(), "exit status {status}");
    let log = std::fs::read_to_string(&stderr_path).unwrap();
    assert!(
        log.lines()
            .any(|l| l.contains(" attempt ") && l.contains("outcome=\"delivered\"")),
        "the attempt in flight ends delivered before the exit:\n{log}"
    );
}
