//! The bench's own receiver: an axum server on 127.0.0.1 behind a listener that counts every
//! accepted TCP connection (and how many are open at once). Each path is a [`Route`] with its own
//! answer (status, delay) and, optionally, a [`Recorder`] that notes when each event id arrived.
//!
//! An event's id is the `id` of its lead (`leads[ACTION][0][id]=N` in the amoCRM form body the
//! daemon sends), so an arrival is matched to the intake request that carried it.

use crate::stats::{Clock, wall_us};
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicI64, AtomicU16, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};

/// The sink's thread. The sink runs on a single-threaded Tokio runtime of its own, and the load
/// generator on a runtime with one worker (`main`): of the ways tried to run the two on two
/// cores, this one moved the most requests in the baseline (152,000–156,000/s in this
/// machine's trials, against 110,000–116,000/s for both on one runtime with a worker per core,
/// which used twice the CPU for them; README, Performance). The baseline is the ceiling of the
/// machine, so it is measured so; and the scenarios run the same client and sink.
pub const SINK_THREAD: &str = "sink";

/// Connection counters of the sink's listener.
#[derive(Default)]
pub struct Conns {
    pub accepted: AtomicU64,
    pub open: AtomicI64,
    pub peak_open: AtomicI64,
}

/// A reading of the connection counters, to take differences over a scenario.
#[derive(Debug, Clone, Copy)]
pub struct ConnSnapshot {
    pub accepted: u64,
}

/// When each event id arrived: the first request for it and, when `second` is kept, the next one
/// (a retry). Times are [`Clock`] readings; 0 means "not yet".
pub struct Recorder {
    first: Vec<AtomicU64>,
    second: Option<Vec<AtomicU64>>,
    pub count_first: AtomicU64,
    pub count_second: AtomicU64,
    /// Requests for an id that had all its arrivals already (at-least-once repeats).
    pub dups: AtomicU64,
    /// Requests whose body had no lead id, or an id outside the recorder.
    pub unknown: AtomicU64,
    /// Ids whose `webhook-id` and wall-clock arrival times are kept: every `sample_every`-th.
    sample_every: u64,
    pub samples: Mutex<HashMap<u64, Sample>>,
    /// The body of the first request, to compare with what the baseline sends.
    pub first_body: Mutex<Option<Bytes>>,
}

/// A sampled delivery: its `webhook-id` (the delivery id) and wall-clock arrivals in µs.
#[derive(Debug, Clone, Default)]
pub struct Sample {
    pub webhook_id: String,
    pub first_wall_us: u64,
    pub second_wall_us: u64,
}

impl Recorder {
    pub fn new(n: usize, keep_second: bool, sample_every: u64) -> Arc<Recorder> {
        let slots = |n: usize| (0..n).map(|_| AtomicU64::new(0)).collect::<Vec<_>>();
        Arc::new(Recorder {
            first: slots(n),
            second: keep_second.then(|| slots(n)),
            count_first: AtomicU64::new(0),
            count_second: AtomicU64::new(0),
            dups: AtomicU64::new(0),
            unknown: AtomicU64::new(0),
            sample_every,
            samples: Mutex::new(HashMap::new()),
            first_body: Mutex::new(None),
        })
    }

    /// The first arrival of `id`, if any.
    pub fn first(&self, id: usize) -> Option<u64> {
        self.first
            .get(id)
            .map(|a| a.load(Ordering::Acquire))
            .filter(|&t| t != 0)
    }

    pub fn second(&self, id: usize) -> Option<u64> {
        self.second
            .as_ref()?
            .get(id)
            .map(|a| a.load(Ordering::Acquire))
            .filter(|&t| t != 0)
    }

    fn record(&self, now: u64, headers: &HeaderMap, body: &Bytes) {
        let Some(id) = lead_id(body) else {
            self.unknown.fetch_add(1, Ordering::Relaxed);
            return;
        };
        let Some(slot) = self.first.get(id as usize) else {
            self.unknown.fetch_add(1, Ordering::Relaxed);
            return;
        };
        let sampled = self.sample_every > 0 && id % self.sample_every == 0;
        if slot
            .compare_exchange(0, now, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
        {
            if self.count_first.fetch_add(1, Ordering::AcqRel) == 0 {
                *self.first_body.lock().unwrap() = Some(body.clone());
            }
            if sampled {
                let webhook_id = headers
                    .get("webhook-id")
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or_default()
                    .to_string();
                self.samples.lock().unwrap().insert(
                    id,
                    Sample {
                        webhook_id,
                        first_wall_us: wall_us(),
                        second_wall_us: 0,
                    },
                );
            }
            return;
        }
        if let Some(second) = &self.second
            && second[id as usize]
                .compare_exchange(0, now, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
        {
            self.count_second.fetch_add(1, Ordering::AcqRel);
            if sampled && let Some(s) = self.samples.lock().unwrap().get_mut(&id) {
                s.second_wall_us = wall_us();
            }
            return;
        }
        self.dups.fetch_add(1, Ordering::Relaxed);
    }
}

/// The lead id in an amoCRM form body: the digits after the first `…%5D%5Bid%5D=` (`…][id]=`).
pub fn lead_id(body: &[u8]) -> Option<u64> {
    const PAT: &[u8] = b"%5D%5Bid%5D=";
    let at = body.windows(PAT.len()).position(|w| w == PAT)? + PAT.len();
    let digits = body[at..].iter().take_while(|b| b.is_ascii_digit());
    let mut n: u64 = 0;
    let mut any = false;
    for d in digits {
        n = n.checked_mul(10)?.checked_add((d - b'0') as u64)?;
        any = true;
    }
    any.then_some(n)
}

/// How one path answers, and what it records.
pub struct Route {
    pub status: AtomicU16,
    pub delay_us: AtomicU64,
    pub recorder: Option<Arc<Recorder>>,
    pub hits: AtomicU64,
    /// Requests being answered right now (waiting out the delay).
    pub in_progress: AtomicI64,
}

impl Route {
    pub fn new(status: u16, delay: Duration, recorder: Option<Arc<Recorder>>) -> Arc<Route> {
        Arc::new(Route {
            status: AtomicU16::new(status),
            delay_us: AtomicU64::new(delay.as_micros() as u64),
            recorder,
            hits: AtomicU64::new(0),
            in_progress: AtomicI64::new(0),
        })
    }
}

pub struct Sink {
    pub addr: SocketAddr,
    pub conns: Arc<Conns>,
    routes: RwLock<HashMap<String, Arc<Route>>>,
    pub requests: AtomicU64,
    pub unmatched: AtomicU64,
    clock: Arc<Clock>,
}

impl Sink {
    /// Binds 127.0.0.1:0 and serves on a thread of its own, on a single-threaded runtime (see
    /// [`SINK_THREAD`]).
    pub fn start(clock: Arc<Clock>) -> anyhow::Result<Arc<Sink>> {
        let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
        listener.set_nonblocking(true)?;
        let addr = listener.local_addr()?;
        let conns = Arc::new(Conns::default());
        let sink = Arc::new(Sink {
            addr,
            conns: conns.clone(),
            routes: RwLock::new(HashMap::new()),
            requests: AtomicU64::new(0),
            unmatched: AtomicU64::new(0),
            clock,
        });
        let app = axum::Router::new()
            .fallback(handle)
            .with_state(sink.clone());
        // Serving (or why not) is reported before `start` returns: a bench whose sink failed
        // stops here rather than timing out in every scenario.
        let (ready_tx, ready_rx) = std::sync::mpsc::channel::<std::io::Result<()>>();
        std::thread::Builder::new()
            .name(SINK_THREAD.into())
            .spawn(move || {
                let runtime = match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(runtime) => runtime,
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                        return;
                    }
                };
                runtime.block_on(async move {
                    let inner = match TcpListener::from_std(listener) {
                        Ok(inner) => inner,
                        Err(e) => {
                            let _ = ready_tx.send(Err(e));
                            return;
                        }
                    };
                    let _ = ready_tx.send(Ok(()));
                    if let Err(e) = axum::serve(CountingListener { inner, conns }, app).await {
                        eprintln!("sink stopped: {e}");
                    }
                })
            })?;
        ready_rx
            .recv()
            .map_err(|_| anyhow::anyhow!("the sink's thread ended before it served"))?
            .map_err(|e| anyhow::anyhow!("the sink cannot serve: {e}"))?;
        Ok(sink)
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    pub fn route(&self, path: &str, route: Arc<Route>) -> Arc<Route> {
        self.routes
            .write()
            .unwrap()
            .insert(path.to_string(), route.clone());
        route
    }

    pub fn remove(&self, path: &str) {
        self.routes.write().unwrap().remove(path);
    }

    pub fn conn_snapshot(&self) -> ConnSnapshot {
        ConnSnapshot {
            accepted: self.conns.accepted.load(Ordering::SeqCst),
        }
    }

    /// Restarts the peak-open count from the connections open now.
    pub fn reset_peak(&self) {
        let open = self.conns.open.load(Ordering::SeqCst);
        self.conns.peak_open.store(open, Ordering::SeqCst);
    }

    pub fn peak_open(&self) -> i64 {
        self.conns.peak_open.load(Ordering::SeqCst)
    }
}

async fn handle(
    State(sink): State<Arc<Sink>>,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let now = sink.clock.now_ns();
    sink.requests.fetch_add(1, Ordering::Relaxed);
    let route = sink.routes.read().unwrap().get(uri.path()).cloned();
    let Some(route) = route else {
        sink.unmatched.fetch_add(1, Ordering::Relaxed);
        return StatusCode::NOT_FOUND.into_response();
    };
    route.hits.fetch_add(1, Ordering::Relaxed);
    if let Some(rec) = &route.recorder {
        rec.record(now, &headers, &body);
    }
    let delay = route.delay_us.load(Ordering::Relaxed);
    if delay > 0 {
        route.in_progress.fetch_add(1, Ordering::SeqCst);
        tokio::time::sleep(Duration::from_micros(delay)).await;
        route.in_progress.fetch_sub(1, Ordering::SeqCst);
    }
    StatusCode::from_u16(route.status.load(Ordering::Relaxed))
        .unwrap_or(StatusCode::OK)
        .into_response()
}

/// A TCP listener that counts each accepted connection and the connections open at once.
struct CountingListener {
    inner: TcpListener,
    conns: Arc<Conns>,
}

impl axum::serve::Listener for CountingListener {
    type Io = CountedStream;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (CountedStream, SocketAddr) {
        loop {
            match self.inner.accept().await {
                Ok((stream, addr)) => {
                    let _ = stream.set_nodelay(true);
                    self.conns.accepted.fetch_add(1, Ordering::SeqCst);
                    let open = self.conns.open.fetch_add(1, Ordering::SeqCst) + 1;
                    self.conns.peak_open.fetch_max(open, Ordering::SeqCst);
                    return (
                        CountedStream {
                            inner: stream,
                            conns: self.conns.clone(),
                        },
                        addr,
                    );
                }
                // EMFILE and the like: wait a moment, as axum's own listener does.
                Err(_) => tokio::time::sleep(Duration::from_millis(5)).await,
            }
        }
    }

    fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.inner.local_addr()
    }
}

/// An accepted connection; counts itself closed when dropped.
struct CountedStream {
    inner: TcpStream,
    conns: Arc<Conns>,
}

impl Drop for CountedStream {
    fn drop(&mut self) {
        self.conns.open.fetch_sub(1, Ordering::SeqCst);
    }
}

impl AsyncRead for CountedStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for CountedStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}
