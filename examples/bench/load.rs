//! The load generator: keep-alive HTTP/1.1 connections of hyper's client API, one per worker,
//! POSTing bodies closed-loop (N workers, each sending its next request when the previous one
//! answered) or paced (open-loop: each request is sent at its scheduled time whatever the earlier
//! ones are doing, on a connection from a small pool). Every connection it opens is counted, so
//! the baseline's connections are exactly its concurrency.

use crate::stats::Clock;
use anyhow::{Context, Result};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::SendRequest;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU16, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// A reqwest client for the set-up calls (subscriptions, look-ups, /healthz, /metrics).
pub fn client(conns: usize) -> reqwest::Client {
    reqwest::Client::builder()
        .pool_max_idle_per_host(conns)
        .tcp_nodelay(true)
        .no_proxy()
        .timeout(Duration::from_secs(60))
        .build()
        .expect("the set-up client builds")
}

/// Where requests go: `http://ADDR/PATH`.
#[derive(Clone)]
pub struct Endpoint {
    addr: SocketAddr,
    authority: String,
    path: String,
}

impl Endpoint {
    pub fn parse(url: &str) -> Result<Endpoint> {
        let rest = url
            .strip_prefix("http://")
            .context("the load generator speaks http:// only")?;
        let (authority, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, "/"),
        };
        Ok(Endpoint {
            addr: authority
                .parse()
                .with_context(|| format!("{authority} is not an IP address and port"))?,
            authority: authority.to_string(),
            path: path.to_string(),
        })
    }
}

type Sender = SendRequest<Full<Bytes>>;

/// Opens one keep-alive connection (TCP_NODELAY) and drives it on its own task.
async fn connect(ep: &Endpoint, opened: &AtomicU64) -> Result<Sender> {
    let stream = tokio::net::TcpStream::connect(ep.addr).await?;
    stream.set_nodelay(true)?;
    let (tx, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream)).await?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    opened.fetch_add(1, Ordering::Relaxed);
    Ok(tx)
}

/// One POST on `tx`; the status once the whole answer is read.
async fn post(tx: &mut Sender, ep: &Endpoint, body: Bytes, content_type: &str) -> Result<u16> {
    tx.ready().await?;
    let req = hyper::Request::post(ep.path.as_str())
        .header(hyper::header::HOST, ep.authority.as_str())
        .header(hyper::header::CONTENT_TYPE, content_type)
        .body(Full::new(body))?;
    let resp = tx.send_request(req).await?;
    let status = resp.status().as_u16();
    resp.into_body().collect().await?;
    Ok(status)
}

/// Connections for open-loop requests: an idle one is reused, else a new one is opened.
struct Pool {
    ep: Endpoint,
    idle: Mutex<Vec<Sender>>,
    opened: AtomicU64,
}

impl Pool {
    async fn get(&self) -> Result<Sender> {
        loop {
            let Some(tx) = self.idle.lock().unwrap().pop() else {
                break;
            };
            if !tx.is_closed() {
                return Ok(tx);
            }
        }
        connect(&self.ep, &self.opened).await
    }

    fn put(&self, tx: Sender) {
        if !tx.is_closed() {
            self.idle.lock().unwrap().push(tx);
        }
    }
}

/// The body of request `i`.
pub type BodyFn = Arc<dyn Fn(u64) -> (Bytes, &'static str) + Send + Sync>;

/// Status slot values besides HTTP codes.
pub const NOT_SENT: u16 = 0;
pub const TRANSPORT_ERROR: u16 = 1;

/// Every request of a run: when it started, when its answer was read, and its status.
pub struct Run {
    pub starts: Vec<u64>,
    pub ends: Vec<u64>,
    pub status: Vec<u16>,
    /// Paced runs: the most a request started after its scheduled time, ns.
    pub max_late_ns: u64,
    /// Paced runs: stopped early because too many requests were unanswered.
    pub overloaded: bool,
    /// Connections the generator opened.
    pub connections: u64,
}

impl Run {
    pub fn n(&self) -> usize {
        self.status.len()
    }

    pub fn count(&self, code: u16) -> usize {
        self.status.iter().filter(|&&s| s == code).count()
    }

    /// Indexes answered with `code`.
    pub fn with(&self, code: u16) -> Vec<usize> {
        (0..self.n()).filter(|&i| self.status[i] == code).collect()
    }

    /// Statuses other than `ok`, counted: "503×12, transport error×1, not sent×3".
    pub fn failures(&self, ok: u16) -> String {
        let mut m: BTreeMap<u16, usize> = BTreeMap::new();
        for &s in &self.status {
            if s != ok {
                *m.entry(s).or_default() += 1;
            }
        }
        m.iter()
            .map(|(s, n)| match *s {
                NOT_SENT => format!("not sent (deadline) ×{n}"),
                TRANSPORT_ERROR => format!("transport error ×{n}"),
                s => format!("HTTP {s} ×{n}"),
            })
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// The first request start and the last answer, over requests that were sent.
    pub fn window(&self) -> Option<(u64, u64)> {
        let first = self.starts.iter().copied().filter(|&t| t != 0).min()?;
        let last = self.ends.iter().copied().filter(|&t| t != 0).max()?;
        Some((first, last))
    }

    /// Request latencies (start to answer read) of the requests answered with `code`, ns.
    pub fn latencies(&self, code: u16) -> Vec<i64> {
        self.with(code)
            .into_iter()
            .map(|i| (self.ends[i] - self.starts[i]) as i64)
            .collect()
    }
}

struct Slots {
    starts: Vec<AtomicU64>,
    ends: Vec<AtomicU64>,
    status: Vec<AtomicU16>,
}

impl Slots {
    fn new(n: usize) -> Arc<Slots> {
        Arc::new(Slots {
            starts: (0..n).map(|_| AtomicU64::new(0)).collect(),
            ends: (0..n).map(|_| AtomicU64::new(0)).collect(),
            status: (0..n).map(|_| AtomicU16::new(NOT_SENT)).collect(),
        })
    }

    fn into_run(self: Arc<Slots>, max_late_ns: u64, overloaded: bool, connections: u64) -> Run {
        let s = Arc::try_unwrap(self).unwrap_or_else(|_| panic!("all request tasks have ended"));
        Run {
            starts: s.starts.into_iter().map(AtomicU64::into_inner).collect(),
            ends: s.ends.into_iter().map(AtomicU64::into_inner).collect(),
            status: s.status.into_iter().map(AtomicU16::into_inner).collect(),
            max_late_ns,
            overloaded,
            connections,
        }
    }
}

/// Sends request `i` (body of `id`) on `tx` and notes it in `slots`; `false` when the
/// connection failed (it is then dropped).
#[allow(clippy::too_many_arguments)]
async fn send_one(
    tx: &mut Sender,
    ep: &Endpoint,
    clock: &Clock,
    body: &BodyFn,
    i: usize,
    id: u64,
    slots: &Slots,
) -> bool {
    let (bytes, content_type) = body(id);
    let start = clock.now_ns();
    let result = post(tx, ep, bytes, content_type).await;
    let end = clock.now_ns();
    let ok = result.is_ok();
    slots.starts[i].store(start, Ordering::Relaxed);
    slots.ends[i].store(end, Ordering::Relaxed);
    slots.status[i].store(result.unwrap_or(TRANSPORT_ERROR), Ordering::Release);
    ok
}

/// `n` requests (ids `id_base..id_base+n`) from `workers` closed-loop workers, each on its own
/// connection; requests not started by `deadline` are left `NOT_SENT`.
#[allow(clippy::too_many_arguments)]
pub async fn closed(
    url: &str,
    workers: usize,
    n: usize,
    id_base: u64,
    deadline: Instant,
    clock: &Arc<Clock>,
    body: &BodyFn,
) -> Result<Run> {
    let ep = Endpoint::parse(url)?;
    let slots = Slots::new(n);
    let next = Arc::new(AtomicU64::new(0));
    let opened = Arc::new(AtomicU64::new(0));
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..workers.max(1) {
        let (ep, clock, body, slots, next, opened) = (
            ep.clone(),
            clock.clone(),
            body.clone(),
            slots.clone(),
            next.clone(),
            opened.clone(),
        );
        tasks.spawn(async move {
            let mut conn: Option<Sender> = None;
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed) as usize;
                if i >= n || Instant::now() > deadline {
                    return;
                }
                let mut tx = match conn.take() {
                    Some(tx) => tx,
                    None => match connect(&ep, &opened).await {
                        Ok(tx) => tx,
                        Err(_) => {
                            let now = clock.now_ns();
                            slots.starts[i].store(now, Ordering::Relaxed);
                            slots.ends[i].store(now, Ordering::Relaxed);
                            slots.status[i].store(TRANSPORT_ERROR, Ordering::Release);
                            tokio::time::sleep(Duration::from_millis(10)).await;
                            continue;
                        }
                    },
                };
                if send_one(&mut tx, &ep, &clock, &body, i, id_base + i as u64, &slots).await {
                    conn = Some(tx);
                }
            }
        });
    }
    while tasks.join_next().await.is_some() {}
    let opened = opened.load(Ordering::SeqCst);
    Ok(slots.into_run(0, false, opened))
}

/// What a counted closed-loop run came to.
pub struct Counted {
    pub good: u64,
    pub bad: u64,
    pub elapsed: Duration,
    pub connections: u64,
}

/// Closed-loop requests for `duration`, only counted (answers `ok` vs the rest).
pub async fn closed_for(
    url: &str,
    workers: usize,
    duration: Duration,
    ok: u16,
    body: &BodyFn,
) -> Result<Counted> {
    let ep = Endpoint::parse(url)?;
    let good = Arc::new(AtomicU64::new(0));
    let bad = Arc::new(AtomicU64::new(0));
    let next = Arc::new(AtomicU64::new(0));
    let opened = Arc::new(AtomicU64::new(0));
    // Every worker connects first, so the clock starts with all connections open.
    let mut conns = Vec::new();
    for _ in 0..workers.max(1) {
        conns.push(connect(&ep, &opened).await?);
    }
    let t0 = Instant::now();
    let deadline = t0 + duration;
    let mut tasks = tokio::task::JoinSet::new();
    for mut tx in conns {
        let (ep, body, good, bad, next, opened) = (
            ep.clone(),
            body.clone(),
            good.clone(),
            bad.clone(),
            next.clone(),
            opened.clone(),
        );
        tasks.spawn(async move {
            while Instant::now() < deadline {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let (bytes, content_type) = body(i);
                match post(&mut tx, &ep, bytes, content_type).await {
                    Ok(code) if code == ok => {
                        good.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok(_) => {
                        bad.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(_) => {
                        bad.fetch_add(1, Ordering::Relaxed);
                        match connect(&ep, &opened).await {
                            Ok(new) => tx = new,
                            Err(_) => return,
                        }
                    }
                }
            }
        });
    }
    while tasks.join_next().await.is_some() {}
    Ok(Counted {
        good: good.load(Ordering::SeqCst),
        bad: bad.load(Ordering::SeqCst),
        elapsed: t0.elapsed(),
        connections: opened.load(Ordering::SeqCst),
    })
}

/// `n` requests at `rate` per second, open-loop: request `i` is started at `t0 + i/rate` in its
/// own task, on an idle pooled connection or a new one. Stops sending (and reports `overloaded`)
/// when more than `max_in_flight` requests are unanswered.
#[allow(clippy::too_many_arguments)]
pub async fn paced(
    url: &str,
    rate: f64,
    n: usize,
    id_base: u64,
    max_in_flight: usize,
    prewarm: usize,
    clock: &Arc<Clock>,
    body: &BodyFn,
) -> Result<Run> {
    let pool = Arc::new(Pool {
        ep: Endpoint::parse(url)?,
        idle: Mutex::new(Vec::new()),
        opened: AtomicU64::new(0),
    });
    // Connections opened before the schedule starts, so no measured request waits for one.
    for _ in 0..prewarm {
        let tx = connect(&pool.ep, &pool.opened).await?;
        pool.put(tx);
    }
    let slots = Slots::new(n);
    let in_flight = Arc::new(AtomicU64::new(0));
    let t0 = Instant::now() + Duration::from_millis(20);
    let mut max_late_ns = 0u64;
    let mut overloaded = false;
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..n {
        let at = t0 + Duration::from_secs_f64(i as f64 / rate);
        tokio::time::sleep_until(at.into()).await;
        max_late_ns =
            max_late_ns.max(Instant::now().saturating_duration_since(at).as_nanos() as u64);
        if in_flight.load(Ordering::SeqCst) as usize >= max_in_flight {
            overloaded = true;
            break;
        }
        in_flight.fetch_add(1, Ordering::SeqCst);
        let (pool, clock, body, slots, in_flight) = (
            pool.clone(),
            clock.clone(),
            body.clone(),
            slots.clone(),
            in_flight.clone(),
        );
        tasks.spawn(async move {
            match pool.get().await {
                Ok(mut tx) => {
                    if send_one(
                        &mut tx,
                        &pool.ep,
                        &clock,
                        &body,
                        i,
                        id_base + i as u64,
                        &slots,
                    )
                    .await
                    {
                        pool.put(tx);
                    }
                }
                Err(_) => {
                    let now = clock.now_ns();
                    slots.starts[i].store(now, Ordering::Relaxed);
                    slots.ends[i].store(now, Ordering::Relaxed);
                    slots.status[i].store(TRANSPORT_ERROR, Ordering::Release);
                }
            }
            in_flight.fetch_sub(1, Ordering::SeqCst);
        });
        // Reap finished tasks as we go so the set stays small.
        while tasks.try_join_next().is_some() {}
    }
    while tasks.join_next().await.is_some() {}
    let opened = pool.opened.load(Ordering::SeqCst);
    Ok(slots.into_run(max_late_ns, overloaded, opened))
}
