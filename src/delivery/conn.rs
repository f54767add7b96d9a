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
//! The dialer resolves names through the SSRF guard and connects only to the addresses it allows;
//! `https` runs over rustls with the platform verifier, as the reqwest client of this build does.

use super::guard::{Guard, GuardError};
use bytes::Bytes;
use http_body_util::Full;
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;
use rustls::pki_types::ServerName;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::net::TcpStream;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;

/// How long a connection may sit unused before it is closed.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(60);

/// The request body of an attempt.
pub type ReqBody = Full<Bytes>;

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

/// One HTTP/1.1 connection. Dropping it closes the socket.
pub struct Conn {
    origin: Origin,
    sender: http1::SendRequest<ReqBody>,
    /// When it was last handed back idle; `None` while an attempt uses it. Shared with the
    /// connection's driver task, which closes it after [`IDLE_TIMEOUT`] unused.
    idle_since: Arc<Mutex<Option<Instant>>>,
    driver: tokio::task::AbortHandle,
}

impl Drop for Conn {
    fn drop(&mut self) {
        self.driver.abort();
    }
}

impl Conn {
    pub fn sender(&mut self) -> &mut http1::SendRequest<ReqBody> {
        &mut self.sender
    }

    fn set_idle(&self, idle: bool) {
        *self.idle_since.lock().expect("idle lock poisoned") = idle.then(Instant::now);
    }

    /// Whether the connection can carry another request to `origin`, without waiting.
    fn reusable_for(&self, origin: &Origin) -> bool {
        self.origin == *origin
            && !self.sender.is_closed()
            && self
                .idle_since
                .lock()
                .expect("idle lock poisoned")
                .is_none_or(|t| t.elapsed() < IDLE_TIMEOUT)
    }
}

/// A lane's slots: at most `n` attempts in flight, and at most `n` connections between them.
pub struct Slots {
    permits: Arc<Semaphore>,
    /// The connections of the slots not in use.
    idle: Mutex<Vec<Conn>>,
}

impl Slots {
    pub fn new(n: usize) -> Arc<Slots> {
        Arc::new(Slots {
            permits: Arc::new(Semaphore::new(n)),
            idle: Mutex::new(Vec::with_capacity(n)),
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
}

/// One of a lane's slots, held for one attempt, with the connection it owns (if any).
pub struct Slot {
    slots: Arc<Slots>,
    conn: Option<Conn>,
    // Dropped after `Drop::drop` has handed the connection back, so the next holder finds it.
    _permit: OwnedSemaphorePermit,
}

impl Slot {
    /// The slot's connection if it can carry a request to `origin` now (waiting until it is
    /// ready); a closed one, or one to another origin (the subscription's URL changed), is dropped.
    pub async fn take_ready(&mut self, origin: &Origin) -> Option<Conn> {
        let mut conn = self.conn.take()?;
        if !conn.reusable_for(origin) {
            return None;
        }
        conn.set_idle(false);
        conn.sender.ready().await.ok()?;
        Some(conn)
    }

    /// Gives a connection whose last answer was read to its end back to the slot.
    pub fn keep(&mut self, conn: Conn) {
        conn.set_idle(true);
        self.conn = Some(conn);
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        if let Some(conn) = self.conn.take()
            && !conn.sender.is_closed()
        {
            self.slots
                .idle
                .lock()
                .expect("slots lock poisoned")
                .push(conn);
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
    #[error("http handshake error")]
    Handshake(#[source] hyper::Error),
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
            return handshake(origin, TokioIo::new(tcp)).await;
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
        handshake(origin, TokioIo::new(tls)).await
    }
}

/// Starts HTTP/1.1 on a connected stream; its driver task runs until the connection closes, the
/// [`Conn`] is dropped, or it has been idle for [`IDLE_TIMEOUT`].
async fn handshake<T>(origin: &Origin, io: T) -> Result<Conn, ConnectError>
where
    T: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let (sender, connection) = http1::handshake(io)
        .await
        .map_err(ConnectError::Handshake)?;
    let idle_since = Arc::new(Mutex::new(None::<Instant>));
    let idle = idle_since.clone();
    // On the runtime of the engine: connections are made only by its lanes' workers.
    let driver = tokio::spawn(async move {
        let mut connection = std::pin::pin!(connection);
        loop {
            let since = *idle.lock().expect("idle lock poisoned");
            let check_at = since.unwrap_or_else(Instant::now) + IDLE_TIMEOUT;
            tokio::select! {
                result = &mut connection => {
                    if let Err(e) = result {
                        tracing::debug!(error = %e, "receiver connection ended");
                    }
                    return;
                }
                _ = tokio::time::sleep_until(check_at) => {
                    let unused = idle
                        .lock()
                        .expect("idle lock poisoned")
                        .is_some_and(|t| t.elapsed() >= IDLE_TIMEOUT);
                    if unused {
                        return;
                    }
                }
            }
        }
    });
    Ok(Conn {
        origin: origin.clone(),
        sender,
        idle_since,
        driver: driver.abort_handle(),
    })
}
