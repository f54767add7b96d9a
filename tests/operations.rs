//! Operators' view through the real server: the delivery log with filters and pagination,
//! redelivery and recovery, the live stream, metrics, retention, health and what the logs show.

mod common;

use common::{Receiver, TestServer, wait_for, wait_for_async};
use futures_util::StreamExt;
use serde_json::{Value, json};
use std::collections::HashSet;
use std::time::{Duration, Instant};

const WAIT: Duration = Duration::from_secs(10);

/// Every page of a listing, following `next_cursor`.
async fn all_pages(server: &TestServer, query: &str) -> Vec<Value> {
    let mut out = Vec::new();
    let mut cursor: Option<String> = None;
    loop {
        let mut path = format!("/v1/deliveries?limit=3&{query}");
        if let Some(c) = &cursor {
            path.push_str(&format!("&cursor={c}"));
        }
        let (code, page) = server.get(&path).await;
        assert_eq!(code, 200, "{page}");
        let items = page["deliveries"].as_array().unwrap();
        assert!(items.len() <= 3);
        out.extend(items.iter().cloned());
        match page["next_cursor"].as_str() {
            Some(c) => cursor = Some(c.to_string()),
            None => return out,
        }
    }
}

async fn wait_ended(server: &TestServer, n: usize) {
    wait_for_async(&format!("{n} ended deliveries"), WAIT, || async {
        let (_, d) = server.get("/v1/deliveries?limit=1000").await;
        let items = d["deliveries"].as_array().unwrap().clone();
        (items.len() == n
            && items
                .iter()
                .all(|d| d["status"] == "delivered" || d["status"] == "failed"))
        .then_some(())
    })
    .await;
}

#[tokio::test]
async fn the_log_filters_and_pages_newest_first() {
    let server = TestServer::start("").await;
    let ok = Receiver::start(200).await;
    let bad = Receiver::start(500).await;
    let a = server
        .subscribe(json!({"url": ok.url("/"), "events": ["add_lead", "update_lead"], "name": "ok"}))
        .await;
    let b = server
        .subscribe(json!({"url": bad.url("/"), "events": ["add_lead"], "retry": "once"}))
        .await;
    let (a, b) = (a["id"].as_str().unwrap(), b["id"].as_str().unwrap());
    for i in 0..4 {
        server
            .emit(json!({"event": "add_lead", "data": {"id": i}}))
            .await;
    }
    // `since` compares whole milliseconds: `mid` is taken in a later millisecond than the earlier
    // events were created in, and the later events are created in a later one than `mid`.
    let t = Instant::now();
    wait_for("a new millisecond", WAIT, || {
        (t.elapsed() >= Duration::from_millis(2)).then_some(())
    })
    .await;
    let mid = humantime::format_rfc3339_millis(std::time::SystemTime::now()).to_string();
    let t = Instant::now();
    wait_for("a new millisecond", WAIT, || {
        (t.elapsed() >= Duration::from_millis(2)).then_some(())
    })
    .await;
    for i in 4..7 {
        server
            .emit(json!({"event": "update_lead", "data": {"id": i}}))
            .await;
    }
    wait_ended(&server, 4 * 2 + 3).await;

    let all = all_pages(&server, "").await;
    assert_eq!(all.len(), 11);
    let ids: Vec<&str> = all.iter().map(|d| d["id"].as_str().unwrap()).collect();
    let unique: HashSet<&&str> = ids.iter().collect();
    assert_eq!(unique.len(), 11, "no record twice across pages");
    let mut sorted = ids.clone();
    sorted.sort_unstable_by(|x, y| y.cmp(x));
    assert_eq!(ids, sorted, "newest first");

    let failed = all_pages(&server, "status=failed").await;
    assert_eq!(failed.len(), 4);
    assert!(
        failed
            .iter()
            .all(|d| d["subscription_id"] == b && d["status"] == "failed")
    );
    let a_delivered = all_pages(&server, &format!("subscription={a}&status=delivered")).await;
    assert_eq!(a_delivered.len(), 7);
    let b_all = all_pages(&server, &format!("subscription={b}")).await;
    assert_eq!(b_all.len(), 4);
    let updates = all_pages(&server, "event=update_lead").await;
    assert_eq!(updates.len(), 3);
    assert!(
        updates
            .iter()
            .all(|d| d["event"] == "update_lead" && d["subscription_id"] == a)
    );
    let since = all_pages(&server, &format!("since={mid}")).await;
    assert_eq!(since.len(), 3, "{since:?}");
    // The same instant with an offset.
    let t = time::OffsetDateTime::parse(&mid, &time::format_description::well_known::Rfc3339)
        .unwrap()
        .to_offset(time::UtcOffset::from_hms(3, 0, 0).unwrap())
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap();
    assert!(t.ends_with("+03:00"), "{t}");
    let since_offset = all_pages(&server, &format!("since={}", t.replace('+', "%2B"))).await;
    assert_eq!(since_offset, since);
    let none = all_pages(&server, &format!("subscription={b}&event=update_lead")).await;
    assert!(none.is_empty());
    let (code, body) = server.get("/v1/deliveries?status=lost").await;
    assert_eq!(code, 400, "{body}");
}

#[tokio::test]
async fn redeliver_and_recover_schedule_attempts_that_arrive() {
    let server = TestServer::start("").await;
    let rx = Receiver::scripted(vec![500, 500, 500], 200).await;
    let sub = server
        .subscribe(json!({"url": rx.url("/"), "events": ["add_lead"], "retry": "once"}))
        .await;
    let sub_id = sub["id"].as_str().unwrap();
    for i in 0..3 {
        server
            .emit(json!({"event": "add_lead", "data": {"id": i}}))
            .await;
    }
    wait_ended(&server, 3).await;
    let failed = all_pages(&server, "status=failed").await;
    assert_eq!(failed.len(), 3);

    let first = failed[2]["id"].as_str().unwrap().to_string();
    let (code, d) = server
        .post(&format!("/v1/deliveries/{first}/redeliver"), &json!({}))
        .await;
    assert_eq!(code, 202, "{d}");
    assert_eq!(d["status"], "pending");
    let d = server.wait_delivery_status(&first, "delivered", WAIT).await;
    assert_eq!(d["attempts"].as_array().unwrap().len(), 2);
    assert_eq!(rx.count(), 4);

    let (code, r) = server
        .post(
            &format!("/v1/subscriptions/{sub_id}/recover"),
            &json!({"since": "2000-01-01T00:00:00Z"}),
        )
        .await;
    assert_eq!(code, 200, "{r}");
    assert_eq!(r["scheduled"], 2);
    rx.wait_requests(6, WAIT).await;
    wait_for_async("all delivered", WAIT, || async {
        let d = all_pages(&server, "status=delivered").await;
        (d.len() == 3).then_some(())
    })
    .await;

    // Nothing failed is left to recover; bad input is refused.
    let (code, r) = server
        .post(
            &format!("/v1/subscriptions/{sub_id}/recover"),
            &json!({"since": "2000-01-01T00:00:00Z"}),
        )
        .await;
    assert_eq!((code, r["scheduled"].clone()), (200, json!(0)));
    // A body that does not fit is 422, whether `since` is missing or not a time.
    let (code, r) = server
        .post(
            &format!("/v1/subscriptions/{sub_id}/recover"),
            &json!({"since": "yesterday"}),
        )
        .await;
    assert_eq!(code, 422, "{r}");
    assert!(r["detail"].as_str().unwrap().contains("since"), "{r}");
    let (code, r) = server
        .post(&format!("/v1/subscriptions/{sub_id}/recover"), &json!({}))
        .await;
    assert_eq!(code, 422, "{r}");
    assert!(
        r["detail"]
            .as_str()
            .unwrap()
            .starts_with("missing field `since`"),
        "{r}"
    );
    let (code, _) = server
        .post(
            "/v1/deliveries/00000000-0000-0000-0000-000000000000/redeliver",
            &json!({}),
        )
        .await;
    assert_eq!(code, 404);
}

#[tokio::test]
async fn the_stream_shows_each_attempt_as_it_happens() {
    let policy = "[retry.policies.quick]\nsteps = [ { after = \"50ms\" } ]\n";
    let server = TestServer::start(policy).await;
    let rx = Receiver::scripted(vec![503], 200).await;
    let sub = server
        .subscribe(json!({"url": rx.url("/secret/path?key=k"), "events": ["add_lead"], "retry": "quick", "name": "crm"}))
        .await;
    let other = Receiver::start(200).await;
    server
        .subscribe(json!({"url": other.url("/"), "events": ["update_lead"]}))
        .await;
    let resp = server
        .http
        .get(server.url(&format!(
            "/v1/deliveries/stream?subscription={}",
            sub["id"].as_str().unwrap()
        )))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["content-type"], "text/event-stream");
    let mut body = resp.bytes_stream();
    server
        .emit(json!({"event": "update_lead", "data": {"id": 1}}))
        .await;
    server
        .emit(json!({"event": "add_lead", "data": {"id": 2}}))
        .await;

    let mut buf = String::new();
    let mut events: Vec<Value> = Vec::new();
    let deadline = Instant::now() + WAIT;
    while events.len() < 4 {
        let chunk = tokio::time::timeout_at(deadline.into(), body.next())
            .await
            .expect("stream events within the deadline")
            .expect("stream open")
            .unwrap();
        buf.push_str(std::str::from_utf8(&chunk).unwrap());
        while let Some(end) = buf.find("\n\n") {
            let frame: String = buf.drain(..end + 2).collect();
            if let Some(data) = frame.lines().find_map(|l| l.strip_prefix("data: ")) {
                events.push(serde_json::from_str(data).unwrap());
            }
        }
    }
    let outcomes: Vec<&str> = events
        .iter()
        .map(|e| e["outcome"].as_str().unwrap())
        .collect();
    assert_eq!(
        outcomes,
        ["in_flight", "retrying", "in_flight", "delivered"]
    );
    let retry = &events[1];
    assert_eq!(retry["code"], 503);
    assert_eq!(retry["attempt"], 1);
    assert_eq!(retry["max_attempts"], 2);
    assert_eq!(retry["subscription_name"], "crm");
    assert_eq!(retry["host"], "127.0.0.1");
    assert_eq!(retry["event"], "add_lead");
    assert!(retry["next_attempt_at"].is_string());
    assert!(retry["duration_ms"].is_u64());
    humantime::parse_rfc3339(retry["at"].as_str().unwrap()).unwrap();
    let done = &events[3];
    assert_eq!(
        (done["attempt"].clone(), done["code"].clone()),
        (json!(2), json!(200))
    );
    assert_eq!(done["delivery_id"], retry["delivery_id"]);
    // Only the filtered subscription, and nothing of the URL beyond its host.
    assert!(events.iter().all(|e| e["subscription_id"] == sub["id"]));
    assert!(!serde_json::to_string(&events).unwrap().contains("secret"));
}

#[tokio::test]
async fn an_open_stream_ends_when_the_daemon_stops() {
    let server = TestServer::start("").await;
    let resp = server
        .http
        .get(server.url("/v1/deliveries/stream"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let mut body = resp.bytes_stream();
    let dir = server.stop().await;
    let end = tokio::time::timeout(WAIT, async {
        while let Some(chunk) = body.next().await {
            if chunk.is_err() {
                break;
            }
        }
    })
    .await;
    assert!(end.is_ok(), "the stream ended");
    // Nothing holds the storage: sled's lock is released (its threads end shortly after the last
    // handle drops) and the same directory opens again in this process.
    let t0 = Instant::now();
    while let Err(e) = sled::open(dir.path().join("db.sled")) {
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "storage still locked: {e}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let again = TestServer::start_in(dir, "").await;
    assert_eq!(again.get("/healthz").await.0, 200);
}

fn metric(text: &str, line_start: &str) -> f64 {
    text.lines()
        .find(|l| l.starts_with(line_start))
        .unwrap_or_else(|| panic!("no metric {line_start} in\n{text}"))
        .rsplit(' ')
        .next()
        .unwrap()
        .parse()
        .unwrap()
}

#[tokio::test]
async fn metrics_move_after_deliveries() {
    let server = TestServer::start("").await;
    let ok = Receiver::start(200).await;
    let bad = Receiver::start(404).await;
    server
        .subscribe(json!({"url": ok.url("/"), "events": ["add_lead"]}))
        .await;
    server
        .subscribe(json!({"url": bad.url("/"), "events": ["add_lead"], "retry": "once"}))
        .await;
    server
        .subscribe(json!({"url": ok.url("/held"), "events": ["add_lead"], "enabled": false}))
        .await;
    let text = server.metrics().await;
    assert_eq!(metric(&text, "dispatcher_events_accepted_total"), 0.0);
    assert_eq!(metric(&text, "dispatcher_subscriptions_active"), 2.0);
    for i in 0..3 {
        server
            .emit(json!({"event": "add_lead", "data": {"id": i}}))
            .await;
    }
    ok.wait_requests(3, WAIT).await;
    bad.wait_requests(3, WAIT).await;
    let text = wait_for_async("the attempts to be counted", WAIT, || async {
        let text = server.metrics().await;
        (text.contains(r#"dispatcher_attempts_total{outcome="failed",code_class="4xx"} 3"#)
            && text
                .contains(r#"dispatcher_attempts_total{outcome="delivered",code_class="2xx"} 3"#))
        .then_some(text)
    })
    .await;
    assert_eq!(metric(&text, "dispatcher_events_accepted_total"), 3.0);
    assert_eq!(
        metric(&text, "dispatcher_attempt_duration_seconds_count"),
        6.0
    );
    // The held subscription's three deliveries wait.
    assert_eq!(metric(&text, "dispatcher_deliveries_pending"), 3.0);
    assert_eq!(metric(&text, "dispatcher_intake_backlog"), 0.0);
    assert!(metric(&text, "dispatcher_scheduler_lag_seconds") < 1.0);
    assert!(text.contains("# TYPE dispatcher_attempt_duration_seconds histogram"));
}

#[tokio::test]
async fn the_pending_gauge_counts_what_waited_across_a_restart() {
    let server = TestServer::start("").await;
    let rx = Receiver::start(200).await;
    server
        .subscribe(json!({"url": rx.url("/held"), "events": ["add_lead"], "enabled": false}))
        .await;
    for i in 0..4 {
        server
            .emit(json!({"event": "add_lead", "data": {"id": i}}))
            .await;
    }
    let dir = server.stop().await;
    let server = TestServer::start_in(dir, "").await;
    server
        .emit(json!({"event": "add_lead", "data": {"id": 9}}))
        .await;
    wait_for_async("the gauge to count 5", WAIT, || async {
        let text = server.metrics().await;
        (metric(&text, "dispatcher_deliveries_pending") == 5.0).then_some(())
    })
    .await;
}

#[tokio::test]
async fn retention_purges_ended_deliveries_and_keeps_pending_ones() {
    let server = TestServer::start("[retention]\ndelivered = \"200ms\"\nfailed = \"1h\"\n").await;
    let ok = Receiver::start(200).await;
    let bad = Receiver::start(500).await;
    server
        .subscribe(json!({"url": ok.url("/"), "events": ["add_lead"]}))
        .await;
    server
        .subscribe(json!({"url": bad.url("/"), "events": ["add_lead"], "retry": "once"}))
        .await;
    server
        .subscribe(json!({"url": ok.url("/held"), "events": ["add_lead"], "enabled": false}))
        .await;
    server
        .emit(json!({"event": "add_lead", "data": {"id": 1}}))
        .await;
    let delivered = ok.wait_requests(1, WAIT).await[0].header("webhook-id");
    let failed = bad.wait_requests(1, WAIT).await[0].header("webhook-id");
    server.wait_delivery_status(&failed, "failed", WAIT).await;
    wait_for_async("the delivered record to be purged", WAIT, || async {
        let (code, _) = server.get(&format!("/v1/deliveries/{delivered}")).await;
        (code == 404).then_some(())
    })
    .await;
    let (_, list) = server.get("/v1/deliveries").await;
    let statuses: Vec<&str> = list["deliveries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["status"].as_str().unwrap())
        .collect();
    let mut statuses = statuses;
    statuses.sort_unstable();
    assert_eq!(statuses, ["failed", "pending"]);
    assert_eq!(server.delivery(&failed).await["status"], "failed");
}

#[tokio::test]
async fn healthz_reports_storage_writable() {
    let server = TestServer::start("").await;
    let (code, body) = server.get("/healthz").await;
    assert_eq!(code, 200);
    assert_eq!(body, json!({"status": "ok", "storage": "writable"}));
}

/// A number on the line of /proc/PID/FILE that starts with `label`, at `column` (0: the first
/// after the label).
#[cfg(target_os = "linux")]
fn proc_figure(pid: &str, file: &str, label: &str, column: usize) -> usize {
    let text = std::fs::read_to_string(format!("/proc/{pid}/{file}")).unwrap();
    let line = text.lines().find(|l| l.starts_with(label)).unwrap();
    let figure = line[label.len()..].split_whitespace().nth(column).unwrap();
    figure
        .parse()
        .unwrap_or_else(|_| panic!("{label} {figure:?} in /proc/{pid}/{file}"))
}

/// The daemon grows its descriptor table before it starts a thread (`ops::fds`), so that no
/// connection it accepts or opens later waits for the table to grow, raising its soft
/// `RLIMIT_NOFILE` for it where the hard limit allows. A table grows only as descriptors are
/// opened: left alone, a daemon started here held 256 once serving.
#[cfg(target_os = "linux")]
#[tokio::test]
async fn the_daemon_starts_with_room_for_thousands_of_connections() {
    let dir = tempfile::tempdir().unwrap();
    let config = common::binary_config(dir.path(), "");
    let (mut child, base) = common::start_binary(&config, std::process::Stdio::null());
    // The daemon inherits this process's limits, and raises the soft one as far as the hard one.
    let hard = proc_figure("self", "limits", "Max open files", 1);
    let want = hard.min(webhook_dispatcher::ops::fds::SLOTS);
    assert!(
        want > 256,
        "a hard RLIMIT_NOFILE of {hard} leaves nothing to tell the grown table from the table the daemon would hold anyway"
    );
    let pid = child.id().to_string();
    let table = proc_figure(&pid, "status", "FDSize:", 0);
    assert!(
        table >= want,
        "the daemon's descriptor table holds {table}, want at least {want} (hard limit {hard})"
    );
    let soft = proc_figure(&pid, "limits", "Max open files", 0);
    assert!(
        soft >= want,
        "the daemon's soft RLIMIT_NOFILE is {soft}, want {want}"
    );
    // It serves as before.
    let health = reqwest::get(format!("{base}/healthz")).await.unwrap();
    assert_eq!(health.status(), 200);
    common::stop_binary(&mut child).await;
}

/// The real binary with JSON logs: one line per attempt, with the destination's host only.
#[tokio::test]
async fn logs_show_one_line_per_attempt_and_never_a_key_or_secret() {
    let dir = tempfile::tempdir().unwrap();
    let config = common::binary_config(dir.path(), "[log]\nformat = \"json\"\n");
    let rx = Receiver::scripted(vec![500], 200).await;
    let stderr_path = dir.path().join("stderr.log");
    let (mut child, base) =
        common::start_binary(&config, std::fs::File::create(&stderr_path).unwrap().into());
    let http = reqwest::Client::new();
    let sub = common::subscribe_binary(
        &http,
        &base,
        json!({
            "url": rx.url("/hooks/PATHKEY123?api_key=QUERYKEY456"),
            "events": ["add_lead"],
            "headers": {"Authorization": "Bearer HEADERSECRET789"},
            "retry": "once",
        }),
    )
    .await;
    let secret = sub["secret"].as_str().unwrap().to_string();
    common::emit_binary(
        &http,
        &base,
        json!({"event": "add_lead", "data": {"id": 1}}),
    )
    .await;
    let got = rx.wait_requests(1, WAIT).await;
    assert_eq!(got[0].header("authorization"), "Bearer HEADERSECRET789");
    let attempt = wait_for("the attempt's log line", WAIT, || {
        let log = std::fs::read_to_string(&stderr_path).ok()?;
        log.lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .find(|v| v["message"] == "attempt")
    })
    .await;
    common::stop_binary(&mut child).await;

    assert_eq!(attempt["host"], "127.0.0.1");
    assert_eq!(attempt["event"], "add_lead");
    assert_eq!(attempt["attempt"], 1);
    assert_eq!(attempt["code"], 500);
    assert_eq!(attempt["outcome"], "failed");
    assert_eq!(attempt["subscription"], sub["id"]);
    assert!(attempt["delivery"].is_string() && attempt["duration_ms"].is_u64());
    let log = std::fs::read_to_string(&stderr_path).unwrap();
    assert_eq!(
        log.lines()
            .filter(|l| l.contains(r#""message":"attempt""#))
            .count(),
        1
    );
    for leaked in [
        "PATHKEY123",
        "QUERYKEY456",
        "HEADERSECRET789",
        &secret,
        "/hooks",
    ] {
        assert!(
            !log.contains(leaked),
            "{leaked} appears in the logs:\n{log}"
        );
    }
}

/// The real binary's stderr once it delivered one `add_lead` and stopped, `log.level` = `level`.
async fn stderr_after_one_delivery(level: &str) -> String {
    let dir = tempfile::tempdir().unwrap();
    let config = common::binary_config(dir.path(), &format!("[log]\nlevel = {level:?}\n"));
    let rx = Receiver::start(200).await;
    let stderr_path = dir.path().join("stderr.log");
    let (mut child, base) =
        common::start_binary(&config, std::fs::File::create(&stderr_path).unwrap().into());
    let http = reqwest::Client::new();
    common::subscribe_binary(
        &http,
        &base,
        json!({"url": rx.url("/hook"), "events": ["add_lead"]}),
    )
    .await;
    common::emit_binary(
        &http,
        &base,
        json!({"event": "add_lead", "data": {"id": 1}}),
    )
    .await;
    let delivery = rx.wait_requests(1, WAIT).await[0].header("webhook-id");
    // Delivered means logged: the line is queued before the outcome is written.
    wait_for_async("the delivery to be delivered", WAIT, || {
        let (http, url) = (&http, format!("{base}/v1/deliveries/{delivery}"));
        async move {
            let d = http
                .get(url)
                .send()
                .await
                .ok()?
                .json::<Value>()
                .await
                .ok()?;
            (d["status"] == "delivered").then_some(())
        }
    })
    .await;
    // Exiting writes out what is queued.
    common::stop_binary(&mut child).await;
    std::fs::read_to_string(&stderr_path).unwrap()
}

/// Attempt lines follow `log.level` by their target, `webhook_dispatcher::delivery`, and are
/// `tracing`'s text lines.
#[tokio::test]
async fn attempt_lines_follow_the_log_filter() {
    let quiet = stderr_after_one_delivery("info,webhook_dispatcher::delivery=warn").await;
    // Its other lines are there: the filter leaves out the delivery module's alone.
    assert!(
        quiet.contains(" INFO dispatcher: dispatcher serving"),
        "{quiet}"
    );
    assert!(!quiet.contains(": attempt "), "{quiet}");
    let log = stderr_after_one_delivery("warn,webhook_dispatcher::delivery=info").await;
    let lines: Vec<&str> = log.lines().filter(|l| l.contains(": attempt ")).collect();
    assert_eq!(lines.len(), 1, "{log}");
    let (stamp, rest) = lines[0].split_once(' ').unwrap();
    assert!(
        stamp.len() == 27 && stamp.ends_with('Z') && stamp.as_bytes()[10] == b'T',
        "{stamp}"
    );
    let rest = rest
        .strip_prefix(" INFO webhook_dispatcher::delivery: attempt ")
        .unwrap_or_else(|| panic!("{rest}"));
    let fields: Vec<(&str, &str)> = rest
        .split(' ')
        .map(|f| f.split_once('=').unwrap())
        .collect();
    let names: Vec<&str> = fields.iter().map(|(k, _)| *k).collect();
    assert_eq!(
        names,
        [
            "delivery",
            "subscription",
            "event",
            "host",
            "attempt",
            "code",
            "duration_ms",
            "outcome",
            "next_attempt_at"
        ]
    );
    let value = |name: &str| fields.iter().find(|(k, _)| *k == name).unwrap().1;
    assert_eq!(value("event"), "add_lead");
    assert_eq!(value("host"), "127.0.0.1");
    assert_eq!(value("attempt"), "1");
    assert_eq!(value("code"), "200");
    assert_eq!(value("outcome"), "\"delivered\"");
    assert_eq!(value("next_attempt_at"), "\"-\"");
    assert!(value("delivery").parse::<uuid::Uuid>().is_ok());
}

/// The real binary with its stderr a pipe that nobody reads. Each attempt logs a line; once the
/// pipe's buffer (64 KiB on Linux, a few hundred lines) is full, a daemon that wrote its lines on
/// the delivery workers stopped delivering. The lines wait in memory instead, and every one of
/// them comes out once stderr is read.
#[tokio::test]
async fn deliveries_go_on_while_nobody_reads_stderr_and_its_lines_come_out_later() {
    const EVENTS: usize = 2_000;
    let dir = tempfile::tempdir().unwrap();
    let (mut child, base, rx, http) =
        common::binary_subscribed(dir.path(), std::process::Stdio::piped()).await;
    // Held, not read: the pipe stays open and fills up.
    let stderr = child.stderr.take().expect("stderr is piped");
    for batch in 0..EVENTS / 1_000 {
        let events: Vec<Value> = (0..1_000)
            .map(|i| json!({"event": "add_lead", "data": {"id": batch * 1_000 + i}}))
            .collect();
        common::emit_binary(&http, &base, json!({ "events": events })).await;
    }
    // About 250 bytes a line: 2,000 lines are several times what the pipe holds.
    rx.wait_requests(EVENTS, Duration::from_secs(60)).await;
    let metrics = http
        .get(format!("{base}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains("\ndispatcher_log_lines_dropped_total 0\n"),
        "none dropped: 2,000 lines fit the queue\n{metrics}"
    );

    // Now stderr is read: every attempt's line comes out.
    let (tx, lines) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
        {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let mut attempts = 0;
    let deadline = Instant::now() + WAIT;
    while attempts < EVENTS && Instant::now() < deadline {
        if let Ok(line) = lines.recv_timeout(Duration::from_millis(50))
            && line.contains(": attempt delivery=")
        {
            attempts += 1;
        }
    }
    assert_eq!(attempts, EVENTS, "one line per attempt came out");
    common::stop_binary(&mut child).await;
}

/// A subscription deleted while an attempt is in flight: the attempt's outcome does not bring its
/// delivery back, and the pending gauge counts it once.
#[tokio::test]
async fn deleting_a_subscription_during_an_attempt_ends_its_delivery_for_good() {
    let server =
        TestServer::start("[retry.policies.soon]\nsteps = [ { after = \"50ms\" } ]\n").await;
    let rx = Receiver::slow(500, Duration::from_millis(400)).await;
    let sub = server
        .subscribe(json!({"url": rx.url("/"), "events": ["add_lead"], "retry": "soon"}))
        .await;
    server
        .emit(json!({"event": "add_lead", "data": {"id": 1}}))
        .await;
    let id = rx.wait_requests(1, WAIT).await[0].header("webhook-id");
    assert_eq!(server.delivery(&id).await["status"], "in_flight");
    let (code, _) = server
        .delete(&format!(
            "/v1/subscriptions/{}",
            sub["id"].as_str().unwrap()
        ))
        .await;
    assert_eq!(code, 204);
    // The attempt ends after the delete: its 500 counts as the end of the delivery.
    wait_for_async("the attempt to end", WAIT, || async {
        let text = server.metrics().await;
        text.contains(r#"dispatcher_attempts_total{outcome="failed",code_class="5xx"} 1"#)
            .then_some(())
    })
    .await;
    let d = server.delivery(&id).await;
    assert_eq!(d["status"], "failed", "{d}");
    assert_eq!(d["error"], "subscription deleted");
    assert_eq!(
        metric(&server.metrics().await, "dispatcher_deliveries_pending"),
        0.0
    );
    assert_eq!(rx.count(), 1, "no retry for a deleted subscription");
}
