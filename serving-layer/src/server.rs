//! Running the API over TCP, with background upkeep, until shutdown.

use std::sync::Arc;
use std::time::Duration;

use rdkafka::consumer::BaseConsumer;
use strata_common::kafka;
use tokio_util::sync::CancellationToken;

use crate::api::routes;
use crate::state::ServingState;
use crate::{Error, Result};

/// Binds the listen address (failing clearly if it cannot), then serves until `shutdown`.
pub async fn serve(state: Arc<ServingState>, shutdown: CancellationToken) -> Result<()> {
    let addr = state.cfg.serve.http.clone();
    let listener = tokio::net::TcpListener::bind(&addr)
        .await
        .map_err(|source| Error::Bind {
            addr: addr.clone(),
            source,
        })?;
    let local = listener.local_addr().map_err(|source| Error::Bind {
        addr: addr.clone(),
        source,
    })?;
    tracing::info!(addr = %local, "serving layer listening");
    spawn_upkeep(state.clone(), shutdown.clone());
    let stop = shutdown.clone();
    warp::serve(routes(state))
        .incoming(listener)
        .graceful(async move { stop.cancelled().await })
        .run()
        .await;
    tracing::info!("serving layer stopped");
    Ok(())
}

/// Keeps the state fresh: follows the speed layer, reloads new batch versions, probes the broker
/// (reachability and high watermarks, for lag).
fn spawn_upkeep(state: Arc<ServingState>, shutdown: CancellationToken) {
    {
        let state = state.clone();
        let shutdown = shutdown.clone();
        tokio::task::spawn_blocking(move || {
            let mut ticks = 0u64;
            while !shutdown.is_cancelled() {
                state.catch_up();
                if ticks.is_multiple_of(10) {
                    if let Err(e) = state.refresh_batch() {
                        tracing::warn!(error = %e, "cannot load the newest batch version");
                    }
                }
                ticks += 1;
                std::thread::sleep(Duration::from_millis(20));
            }
        });
    }
    tokio::task::spawn_blocking(move || {
        let mut probe: Option<BaseConsumer> = None;
        while !shutdown.is_cancelled() {
            if probe.is_none() {
                match kafka::client_config(&state.cfg.kafka).create() {
                    Ok(p) => probe = Some(p),
                    Err(e) => state.broker_probed(Err(format!("cannot create a client: {e}"))),
                }
            }
            if let Some(p) = &probe {
                let hw = kafka::high_watermarks(p, &state.cfg.kafka.topic)
                    .map_err(|e| e.to_string())
                    .and_then(|hw| {
                        if hw.is_empty() {
                            Err(format!("topic {} not found", state.cfg.kafka.topic))
                        } else {
                            Ok(hw)
                        }
                    });
                state.broker_probed(hw);
            }
            for _ in 0..20 {
                if shutdown.is_cancelled() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    });
}
