//! webhook-dispatcher: an outbound webhook sender in the style of amoCRM (Kommo).
//!
//! The path of one event, top to bottom: [`intake`] validates it against the [`event`] catalogue,
//! the [`subscription`] registry matches it to subscriptions, and [`store`] writes the event and one
//! delivery per match in one atomic, flushed batch. The [`delivery`] engine then takes due
//! deliveries lane by lane, encodes each with its subscription's [`payload`] format, POSTs it, and
//! writes the outcome and the next due time its retry policy gives. [`api`] is the HTTP surface.
//!
//! Embedding: [`Dispatcher::start`] runs the whole daemon inside a Rust program (on its runtime;
//! [`Dispatcher::start_on`] puts the delivery engine on another), and [`Dispatcher::emitter`]
//! hands out the in-process intake handle.

pub mod api;
pub mod config;
pub mod delivery;
pub mod event;
pub mod intake;
pub mod ops;
pub mod payload;
pub mod store;
pub mod subscription;

use config::Config;
use delivery::guard::Guard;
use delivery::{Engine, EngineSettings};
use intake::Intake;
pub use intake::{Emitter, IntakeError, Receipt};
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;
use store::{Store, StoreError};
use subscription::Registry;

/// How long in-flight attempts may take to finish at shutdown.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("cannot build the HTTP client: {0}")]
    Client(#[from] delivery::attempt::BuildError),
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        addr: std::net::SocketAddr,
        source: std::io::Error,
    },
    #[error(
        "server.listen is {0}, which is not a loopback address, and api.tokens is empty: anyone who reaches the port could manage subscriptions. Add tokens to [api] (e.g. tokens = [{{ token = \"<long random string>\", role = \"admin\" }}]) or listen on 127.0.0.1"
    )]
    Unprotected(std::net::SocketAddr),
    #[error("server error: {0}")]
    Serve(std::io::Error),
}

/// The shared state behind the API and the engine.
pub struct App {
    pub config: Arc<Config>,
    pub store: Store,
    pub registry: Arc<Registry>,
    pub engine: Arc<Engine>,
    pub intake: Arc<Intake>,
    pub metrics: Arc<ops::metrics::Metrics>,
    /// Stops the background tasks (retention).
    pub stop: tokio_util::sync::CancellationToken,
}

/// A running dispatcher: storage open, lanes started. Serve its API with [`Dispatcher::serve`].
#[derive(Clone)]
pub struct Dispatcher {
    app: Arc<App>,
}

impl Dispatcher {
    /// Opens storage, resumes what was in flight when the process last stopped, and starts the
    /// delivery engine. Must be called inside a Tokio runtime, which runs the engine as well.
    pub async fn start(config: Config) -> Result<Dispatcher, StartError> {
        Self::start_on(config, tokio::runtime::Handle::current()).await
    }

    /// Like [`start`](Self::start), with the delivery engine (its lanes, their attempts and
    /// connections) on the runtime of `delivery`, so that its tasks do not share worker threads
    /// and task queues with the API's connections. The `dispatcher` binary runs it so (README,
    /// Design: "Two runtimes").
    ///
    /// That runtime must have time and I/O enabled (`enable_all`), be driven (a multi-thread
    /// runtime, or a current-thread one that a thread keeps in `block_on`), and outlive
    /// [`shutdown`](Self::shutdown): a task spawned on a runtime that has shut down is dropped
    /// without a word, so its deliveries would wait until the next start.
    pub async fn start_on(
        config: Config,
        delivery: tokio::runtime::Handle,
    ) -> Result<Dispatcher, StartError> {
        if config.api.tokens.is_empty() && !config.server.listen.ip().is_loopback() {
            return Err(StartError::Unprotected(config.server.listen));
        }
        let config = Arc::new(config);
        if let Some(parent) = config.storage.path.parent() {
            let _ = std::fs::create_dir_all(parent);
        }
        let store = Store::open(&config.storage.path)?;
        let metrics = Arc::new(ops::metrics::Metrics::new());
        let stream = ops::stream::AttemptStream::default();
        let guard = Arc::new(
            Guard::new(config.delivery.allow_private.clone())
                .proxied(config.delivery.proxy.is_some()),
        );
        let registry = Arc::new(Registry::load(
            store.clone(),
            guard.clone(),
            config.retry_policies(),
            config.limits.max_subscriptions,
            metrics.clone(),
        )?);
        let client = delivery::attempt::build_client(
            guard.clone(),
            &config.delivery.user_agent(),
            config.delivery.concurrency,
            config.delivery.proxy.as_ref(),
        )?;
        let account = event::account_block(
            &config.account.subdomain,
            &config.account.id,
            &config.account.link(),
        );
        let engine = Engine::new(
            store.clone(),
            registry.clone(),
            client,
            guard,
            EngineSettings {
                timeout: config.delivery.timeout,
                concurrency: config.delivery.concurrency,
                per_subscription: config.delivery.per_subscription,
                max_retry_after: config.delivery.max_retry_after,
                account,
                disable: config.disable.clone(),
                runtime: delivery,
            },
            stream,
            metrics.clone(),
        );
        engine.start(subscription::now_ms());
        let intake = Arc::new(Intake::new(
            store.clone(),
            registry.clone(),
            engine.clone(),
            config.limits.max_batch,
            config.server.max_body as usize,
            metrics.clone(),
        ));
        let stop = tokio_util::sync::CancellationToken::new();
        tokio::spawn(ops::retention::run(
            store.clone(),
            config.retention.clone(),
            stop.clone(),
        ));
        Ok(Dispatcher {
            app: Arc::new(App {
                config,
                store,
                registry,
                engine,
                intake,
                metrics,
                stop,
            }),
        })
    }

    /// The in-process intake handle.
    pub fn emitter(&self) -> Emitter {
        Emitter::new(self.app.intake.clone())
    }

    /// The HTTP API as an axum router.
    pub fn router(&self) -> axum::Router {
        api::router(self.app.clone())
    }

    /// Serves the API on `listener` until `signal` completes, then shuts down gracefully: intake
    /// answers 503 at once, attempts in flight get up to 10 s, storage is flushed. The API keeps
    /// answering meanwhile (intake with 503 and `Retry-After`, on new connections and kept-alive
    /// ones alike), and stops once the attempts are done.
    pub async fn serve(
        &self,
        listener: tokio::net::TcpListener,
        signal: impl Future<Output = ()> + Send + 'static,
    ) -> Result<(), StartError> {
        let intake = self.app.intake.clone();
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let server = axum::serve(listener, self.router()).with_graceful_shutdown(async move {
            let _ = stop_rx.await;
        });
        let server = tokio::spawn(server.into_future());
        signal.await;
        tracing::info!("shutting down: intake closed, finishing attempts in flight");
        intake.close();
        self.shutdown().await;
        let _ = stop_tx.send(());
        // Connections still open (a client holding keep-alive) do not hold the exit.
        let _ = tokio::time::timeout(Duration::from_secs(1), server).await;
        Ok(())
    }

    /// Closes intake, stops the engine (attempts in flight get up to 10 s) and flushes storage.
    pub async fn shutdown(&self) {
        self.app.intake.close();
        self.app.stop.cancel();
        self.app.engine.shutdown(SHUTDOWN_GRACE).await;
    }
}
