//! The connections of a lane: a hard per-subscription connection cap.
//!
//! A lane has `per_subscription` [`Slots`]; an attempt holds one [`Slot`], and a slot holds at most
//! one HTTP/1.1 connection, dialled by the [`Dialer`] and kept while it stays open and ready. A
//! finished attempt hands its connection back to the lane with its slot, synchronously, so the
//! next attempt finds it: unlike a shared pool (which races a new connect against a connection
//! still on its way back), a subscription never has more connections than attempts it may have in
//! flight. A connection is replaced only when it is gone: closed by the receiver, dropped after a
//! timeout or an error (or a body past what is drained), or idle for [`IDLE_TIMEOUT`].
//!
//! A connection has no task of its own: the attempt holding it writes its request and reads the
//! answer ([`super::h1`]). While it sits unused, nothing reads it; whether the receiver closed it
//! meanwhile is checked when it is taken again, and the lane closes those idle past the timeout.
//!
//! The dialer resolves names through the SSRF guard and connects only to the addresses it allows;
//! `https` runs over rustls with the platform verifier, as the reqwest client of this build does.

use super::guard::{Guard, GuardError};
use super::h1;
use rustls::pki_types::ServerName;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;

/// How long a connection may sit unused before it is closed.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(60);

/// Where a connection goes: scheme, host and port of a destination URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Origin {
    pub https: bool,
    pub host: url::Host<String>,
    pub port: u16,
}

impl Origin {
    pub fn of(url: &url::Url) -> Option<Origin> {
        let https = match url.scheme() {
            "https" => true,
            "http" => false,
            _ => return None,
        };
        Some(Origin {
            https,
            host: url.host()?.to_owned(),
            port: url.port_or_known_default()?,
        })
    }
}

/// A connection's byte stream.
enum Io {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
}

impl AsyncRead for Io {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Io::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Io {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            Io::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Io::Plain(s) => Pin::new(s).poll_flush(cx),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Io::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

/// One HTTP/1.1 connection. Dropping it closes the socket.
pub struct Conn {
    origin: Origin,
    io: Io,
    reader: h1::Reader,
    /// Since when it has been unused (handed back after an answer read to its end).
    idle_since: Instant,
}

impl Conn {
    fn new(origin: &Origin, io: Io) -> Conn {
        Conn {
            origin: origin.clone(),
            io,
            reader: h1::Reader::default(),
            idle_since: Instant::now(),
        }
    }

    /// Writes a request in full.
    pub async fn write(&mut self, request: &[u8]) -> std::io::Result<()> {
        self.io.write_all(request).await?;
        self.io.flush().await
    }

    /// Reads an answer's head.
    pub async fn head(&mut self) -> Result<h1::Head, h1::Error> {
        self.reader.head(&mut self.io).await
    }

    /// Reads an answer's body (see [`h1::Reader::body`]).
    pub async fn body(
        &mut self,
        framing: h1::Framing,
        limit: usize,
        data: impl FnMut(&[u8]),
    ) -> Result<h1::BodyEnd, h1::Error> {
        self.reader.body(&mut self.io, framing, limit, data).await
    }

    /// Whether the connection can carry another request to `origin`: not idle too long, and
    /// neither closed by the receiver nor holding bytes nobody asked for. Reads without waiting.
    fn reusable_for(&mut self, origin: &Origin) -> bool {
        if self.origin != *origin
            || self.idle_since.elapsed() >= IDLE_TIMEOUT
            || self.reader.buffered() > 0
        {
            return false;
        }
        let mut byte = [0u8; 1];
        let mut buf = ReadBuf::new(&mut byte);
        let mut cx = Context::from_waker(std::task::Waker::noop());
        // Pending: nothing to read, the connection is open. Anything else (the end of the
        // stream, an error, bytes) means it cannot carry a request.
        Pin::new(&mut self.io)
            .poll_read(&mut cx, &mut buf)
            .is_pending()
    }
}

/// A lane's slots: at most `n` attempts in flight, and at most `n` connections between them.
pub struct Slots {
    permits: Arc<Semaphore>,
    /// The connections of the slots not in use, in the order they were handed back (each with
    /// the time it was: the oldest first).
    idle: Mutex<Vec<Conn>>,
    /// How many slots there are.
    size: usize,
}

impl Slots {
    pub fn new(n: usize) -> Arc<Slots> {
        Arc::new(Slots {
            permits: Arc::new(Semaphore::new(n)),
            idle: Mutex::new(Vec::with_capacity(n)),
            size: n,
        })
    }

    /// Waits for a free slot. Cancel-safe.
    pub async fn acquire(self: &Arc<Self>) -> Slot {
        let permit = self
            .permits
            .clone()
            .acquire_owned()
            .await
            .expect("lane semaphore is never closed");
        // The most recently used connection first: the others may then reach their idle timeout.
        let conn = self.idle.lock().expect("slots lock poisoned").pop();
        Slot {
            slots: self.clone(),
            conn,
            _permit: permit,
        }
    }

    /// Closes the connections unused for [`IDLE_TIMEOUT`], and tells when the next of those left
    /// will have been (`None`: none left).
    pub fn close_idle(&self) -> Option<Instant> {
        let mut idle = self.idle.lock().expect("slots lock poisoned");
        let expired = Self::expired(&mut idle);
        let next = idle.first().map(|c| c.idle_since + IDLE_TIMEOUT);
        drop(idle);
        // Closed once the lock is let go.
        drop(expired);
        next
    }

    /// Takes the connections unused for [`IDLE_TIMEOUT`] out of `idle` (its oldest: it is in
    /// the order they were handed back).
    fn expired(idle: &mut Vec<Conn>) -> Vec<Conn> {
        if idle.is_empty() {
            return Vec::new();
        }
        let now = Instant::now();
        let n = idle
            .iter()
            .take_while(|c| now >= c.idle_since + IDLE_TIMEOUT)
            .count();
        idle.drain(..n).collect()
    }

    /// For a lane with nothing to send: closes its connections once unused for
    /// [`IDLE_TIMEOUT`], on one timer (never ends). While attempts hold slots, whatever they hand
    /// back is unused for less than the timeout when it next fires, so it is looked at then
    /// again: no hand-back wakes the lane.
    pub async fn idle_expired(&self) {
        loop {
            let next = self.close_idle();
            let out = self.permits.available_permits() < self.size;
            let at = match (next, out) {
                (Some(at), false) => at,
                (next, true) => {
                    let later = Instant::now() + IDLE_TIMEOUT;
                    next.map_or(later, |at| at.min(later))
                }
                (None, false) => return std::future::pending().await,
            };
            tokio::time::sleep_until(at).await;
        }
    }
}

/// One of a lane's slots, held for one attempt, with the connection it owns (if any).
pub struct Slot {
    slots: Arc<Slots>,
    conn: Option<Conn>,
    // Dropped after `Drop::drop` has handed the connection back, so the next holder finds it.
    _permit: OwnedSemaphorePermit,
}

impl Slot {
    /// The slot's connection if it can carry a request to `origin` now; a closed one, one idle
    /// too long, or one to another origin (the subscription's URL changed), is dropped.
    pub fn take_ready(&mut self, origin: &Origin) -> Option<Conn> {
        let mut conn = self.conn.take()?;
        conn.reusable_for(origin).then_some(conn)
    }

    /// Gives a connection whose last answer was read to its end back to the slot; one holding
    /// bytes past its answer is dropped.
    pub fn keep(&mut self, mut conn: Conn) {
        if conn.reader.buffered() > 0 {
            return;
        }
        conn.idle_since = Instant::now();
        self.conn = Some(conn);
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        if let Some(conn) = self.conn.take() {
            let mut idle = self.slots.idle.lock().expect("slots lock poisoned");
            // Those unused for the timeout are closed here too: a lane that is never idle
            // would otherwise keep them (it takes the most recent one).
            let expired = Slots::expired(&mut idle);
            // A connection taken and not used goes back where it was (in order of idleness).
            let at = idle.partition_point(|c| c.idle_since <= conn.idle_since);
            idle.insert(at, conn);
            drop(idle);
            drop(expired);
        }
    }
}

/// Why no connection was made; its [`std::error::Error::source`] chain ends at the cause.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("dns error")]
    Resolve(#[source] GuardError),
    #[error("destination refused")]
    Refused(#[source] GuardError),
    #[error("tcp connect error")]
    Tcp(#[source] std::io::Error),
    #[error("invalid server name {0}")]
    ServerName(String),
    #[error("tls error")]
    Tls(#[source] std::io::Error),
}

/// Dials the connections of the lanes.
pub struct Dialer {
    guard: Arc<Guard>,
    tls: tokio_rustls::TlsConnector,
}

impl Dialer {
    /// A dialer whose TLS trusts what the platform verifier trusts (the system's roots), with
    /// the crypto provider reqwest uses in this build (aws-lc-rs, unless one is installed).
    pub fn new(guard: Arc<Guard>) -> Result<Dialer, rustls::Error> {
        let provider = rustls::crypto::CryptoProvider::get_default()
            .cloned()
            .unwrap_or_else(|| Arc::new(rustls::crypto::aws_lc_rs::default_provider()));
        let verifier = rustls_platform_verifier::Verifier::new(provider.clone())?;
        let mut tls = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(verifier))
            .with_no_client_auth();
        tls.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(Dialer {
            guard,
            tls: tokio_rustls::TlsConnector::from(Arc::new(tls)),
        })
    }

    /// A new connection to `origin`, to an address the guard allows.
    pub async fn connect(&self, origin: &Origin) -> Result<Conn, ConnectError> {
        let addrs: Vec<SocketAddr> = match &origin.host {
            url::Host::Domain(name) => self
                .guard
                .resolve(name, origin.port)
                .await
                .map_err(ConnectError::Resolve)?,
            url::Host::Ipv4(ip) => vec![SocketAddr::new((*ip).into(), origin.port)],
            url::Host::Ipv6(ip) => vec![SocketAddr::new((*ip).into(), origin.port)],
        };
        let mut last = None;
        let mut tcp = None;
        for addr in addrs {
            self.guard
                .check_ip(addr.ip())
                .map_err(ConnectError::Refused)?;
            match TcpStream::connect(addr).await {
                Ok(s) => {
                    tcp = Some(s);
                    break;
                }
                Err(e) => last = Some(e),
            }
        }
        let tcp = match tcp {
            Some(s) => s,
            None => {
                return Err(ConnectError::Tcp(last.unwrap_or_else(|| {
                    std::io::Error::new(std::io::ErrorKind::NotFound, "no addresses")
                })));
            }
        };
        let _ = tcp.set_nodelay(true);
        if !origin.https {
            return Ok(Conn::new(origin, Io::Plain(tcp)));
        }
        let name = match &origin.host {
            url::Host::Domain(name) => ServerName::try_from(name.clone())
                .map_err(|_| ConnectError::ServerName(name.clone()))?,
            url::Host::Ipv4(ip) => ServerName::IpAddress(std::net::IpAddr::V4(*ip).into()),
            url::Host::Ipv6(ip) => ServerName::IpAddress(std::net::IpAddr::V6(*ip).into()),
        };
        let tls = self
            .tls
            .connect(name, tcp)
            .await
            .map_err(ConnectError::Tls)?;
        Ok(Conn::new(origin, Io::Tls(Box::new(tls))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt;
    use tokio::net::TcpListener;

    /// A connection to a listener on loopback, and the listener's end of it.
    async fn connection() -> (Origin, Conn, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let origin = Origin {
            https: false,
            host: url::Host::Ipv4(std::net::Ipv4Addr::LOCALHOST),
            port: addr.port(),
        };
        let client = TcpStream::connect(addr).await.unwrap();
        let (server, _) = listener.accept().await.unwrap();
        (
            origin.clone(),
            Conn::new(&origin, Io::Plain(client)),
            server,
        )
    }

    /// A connection kept by one of `slots`, and the listener's end of it.
    async fn kept(slots: &Arc<Slots>) -> (Origin, TcpStream) {
        let (origin, conn, server) = connection().await;
        let mut slot = slots.acquire().await;
        slot.keep(conn);
        (origin, server)
    }

    #[tokio::test(start_paused = true)]
    async fn an_idle_connection_is_closed_once_its_time_is_up() {
        let slots = Slots::new(2);
        let (_, mut receiver) = kept(&slots).await;
        let due = slots.close_idle().expect("the idle connection");
        assert_eq!(due - Instant::now(), IDLE_TIMEOUT);
        tokio::time::advance(IDLE_TIMEOUT - Duration::from_secs(1)).await;
        assert_eq!(slots.close_idle(), Some(due), "kept until its time");
        tokio::time::advance(Duration::from_secs(1)).await;
        assert_eq!(slots.close_idle(), None);
        // The receiver sees the connection end.
        let mut byte = [0u8; 1];
        assert_eq!(receiver.read(&mut byte).await.unwrap(), 0);
    }

    /// Waits until `receiver` sees its connection closed, and tells after how long.
    async fn closed_after(receiver: &mut TcpStream) -> Duration {
        let start = Instant::now();
        let mut byte = [0u8; 1];
        let read = tokio::time::timeout(Duration::from_secs(600), receiver.read(&mut byte));
        assert_eq!(read.await.expect("closed within 600 s").unwrap(), 0);
        start.elapsed()
    }

    /// A connection an attempt hands back while its lane already waits with nothing to send is
    /// closed once unused for the timeout (within one more), not kept until the lane's next
    /// delivery: used, or taken and given back unused.
    #[tokio::test(start_paused = true)]
    async fn a_connection_handed_back_to_a_waiting_lane_is_closed_in_time() {
        for used in [true, false] {
            let slots = Slots::new(2);
            let (origin, mut receiver) = kept(&slots).await;
            let mut slot = slots.acquire().await;
            let conn = slot.take_ready(&origin).expect("open and unused");
            let since = conn.idle_since;
            // The lane waits while the attempt holds its slot.
            assert_eq!(slots.close_idle(), None);
            let waiting = slots.clone();
            let lane = tokio::spawn(async move { waiting.idle_expired().await });
            tokio::time::advance(Duration::from_secs(10)).await;
            if used {
                slot.keep(conn);
            } else {
                slot.conn = Some(conn);
            }
            drop(slot);
            let after = closed_after(&mut receiver).await;
            let unused = if used {
                after
            } else {
                after + Duration::from_secs(10)
            };
            assert!(
                unused >= IDLE_TIMEOUT && unused <= 2 * IDLE_TIMEOUT,
                "used {used}: closed {unused:?} after it was last used (since {since:?})"
            );
            lane.abort();
        }
    }

    /// A lane that always has work takes its most recent connection: the older ones are closed
    /// when a slot is given back once they are unused for the timeout.
    #[tokio::test(start_paused = true)]
    async fn a_busy_lane_closes_the_connections_it_no_longer_uses() {
        let slots = Slots::new(4);
        // Two attempts at once hand two connections back.
        let (_, oldest, mut oldest_receiver) = connection().await;
        let (_, older, _older_receiver) = connection().await;
        let (mut a, mut b) = (slots.acquire().await, slots.acquire().await);
        a.keep(oldest);
        b.keep(older);
        drop((a, b));
        tokio::time::advance(IDLE_TIMEOUT).await;
        // An attempt takes the most recent one (replaced here by a new one) and hands its
        // connection back: the oldest, unused for the timeout, goes then.
        let (_, _receiver) = kept(&slots).await;
        let mut byte = [0u8; 1];
        let read = tokio::time::timeout(Duration::from_secs(1), oldest_receiver.read(&mut byte));
        assert_eq!(read.await.expect("closed").unwrap(), 0);
        assert_eq!(slots.idle.lock().unwrap().len(), 1);
    }

    #[tokio::test]
    async fn a_kept_connection_is_taken_only_while_the_receiver_keeps_it() {
        let slots = Slots::new(1);
        let (origin, _receiver) = kept(&slots).await;
        let mut slot = slots.acquire().await;
        let conn = slot.take_ready(&origin).expect("open and unused");
        slot.keep(conn);
        // Another origin (the subscription's URL changed) does not take it; it is dropped.
        let mut other = origin.clone();
        other.port = other.port.wrapping_add(1);
        assert!(slot.take_ready(&other).is_none());
        drop(slot);

        let (origin, receiver) = kept(&slots).await;
        drop(receiver);
        // The receiver closed it: once its end of stream arrives, the connection is not taken.
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            let mut slot = slots.acquire().await;
            match slot.take_ready(&origin) {
                None => break,
                Some(conn) => slot.keep(conn),
            }
            assert!(std::time::Instant::now() < deadline, "still taken");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        // Nothing is left to take.
        assert!(slots.acquire().await.take_ready(&origin).is_none());
    }
}
