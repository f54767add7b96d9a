//! A Rust CRM backend embedding the dispatcher: it starts the daemon in-process, serves the API
//! (so integrators can subscribe), and hands its events to the in-process emitter. A receipt means
//! the event and its deliveries are on disk, exactly as a 202 from `POST /v1/events` does.
//!
//! ```sh
//! cargo run --example embedded                       # uses ./dispatcher.toml or the defaults
//! curl -XPOST localhost:8080/v1/subscriptions \
//!   -d '{"url":"http://127.0.0.1:9000/hook","events":["add_lead","status_lead"]}'
//! ```

use serde_json::json;
use std::time::Duration;
use webhook_dispatcher::Dispatcher;
use webhook_dispatcher::config::Config;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let config = Config::load(None)?;
    let listen = config.server.listen;
    let dispatcher = Dispatcher::start(config).await?;

    // The management API beside the backend's own work.
    let listener = tokio::net::TcpListener::bind(listen).await?;
    println!("dispatcher API on http://{}", listener.local_addr()?);
    let server = dispatcher.clone();
    tokio::spawn(async move {
        let _ = server
            .serve(listener, async {
                let _ = tokio::signal::ctrl_c().await;
            })
            .await;
    });

    // The backend's business: a lead is created, then moves through the pipeline.
    let emitter = dispatcher.emitter();
    let receipt = emitter
        .emit(json!({
            "event": "add_lead",
            "data": {"id": 1001, "name": "Website order", "pipeline_id": 752662, "status_id": 7039101},
        }))
        .await?;
    println!(
        "add_lead stored as {} with {} deliveries",
        receipt.id, receipt.deliveries
    );
    for status in [142, 143] {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let receipt = emitter
            .emit(json!({
                "event": "status_lead",
                "data": {"id": 1001, "status_id": status, "old_status_id": 7039101, "pipeline_id": 752662},
            }))
            .await?;
        println!("status_lead -> {status}: {} deliveries", receipt.deliveries);
    }
    println!("press Ctrl-C to stop");
    tokio::signal::ctrl_c().await?;
    dispatcher.shutdown().await;
    Ok(())
}
