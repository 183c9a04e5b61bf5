//! A Ballista scheduler and executors that know Strata's functions.
//!
//! Ballista's stock binaries cannot run a plan with `strata_fold` in it: the scheduler plans with
//! its session's functions and each executor decodes the tasks it is sent with its registry.
//! `strata-engine scheduler` and `strata-engine executor` are Ballista's own processes (linked
//! as libraries) with the two functions registered and the session settings the plan needs.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Result;
use ballista_core::registry::BallistaFunctionRegistry;
use ballista_core::utils::default_session_builder;
use ballista_executor::executor_process::{start_executor_process, ExecutorProcessConfig};
use ballista_scheduler::cluster::BallistaCluster;
use ballista_scheduler::config::SchedulerConfig;
use ballista_scheduler::scheduler_process::start_server;
use datafusion::execution::FunctionRegistry;
use datafusion::prelude::SessionConfig;

use crate::functions;
use crate::plan::{configure, configure_ballista, GRPC_MAX_MESSAGE};

fn session_config() -> SessionConfig {
    use ballista::prelude::SessionConfigExt;
    let config = SessionConfig::new_with_ballista();
    configure_ballista(config.clone()).unwrap_or_else(|e| {
        tracing::warn!(error = %e, "cannot set Ballista's settings for Strata");
        configure(config)
    })
}

/// Runs a scheduler on `bind` until the process is stopped.
pub async fn scheduler(bind: SocketAddr) -> Result<()> {
    let config = SchedulerConfig {
        bind_host: bind.ip().to_string(),
        bind_port: bind.port(),
        external_host: bind.ip().to_string(),
        grpc_server_max_decoding_message_size: GRPC_MAX_MESSAGE,
        grpc_server_max_encoding_message_size: GRPC_MAX_MESSAGE,
        grpc_client_max_message_size: GRPC_MAX_MESSAGE,
        ..Default::default()
    }
    .with_override_config_producer(Arc::new(session_config))
    .with_override_session_builder(Arc::new(|config: SessionConfig| {
        let mut state = default_session_builder(configure(config))?;
        for f in functions::all() {
            state.register_udaf(f)?;
        }
        Ok(state)
    }));
    let cluster = BallistaCluster::new_from_config(&config).await?;
    start_server(cluster, bind, Arc::new(config)).await?;
    Ok(())
}

/// Where an executor listens and what it offers.
pub struct ExecutorSettings {
    pub scheduler: SocketAddr,
    /// Host the executor binds and advertises.
    pub host: String,
    /// Arrow Flight port (shuffle data); the gRPC port is the next one.
    pub port: u16,
    /// Tasks run at once (0: one per core).
    pub slots: usize,
    /// Where shuffle files are written.
    pub work_dir: PathBuf,
}

/// Runs an executor until the process is stopped.
pub async fn executor(s: ExecutorSettings) -> Result<()> {
    let mut registry = BallistaFunctionRegistry::default();
    for f in functions::all() {
        registry
            .aggregate_functions
            .insert(f.name().to_string(), f.clone());
    }
    std::fs::create_dir_all(&s.work_dir)?;
    let config = ExecutorProcessConfig {
        bind_host: s.host.clone(),
        external_host: Some(s.host),
        port: s.port,
        grpc_port: s.port.saturating_add(1),
        scheduler_host: s.scheduler.ip().to_string(),
        scheduler_port: s.scheduler.port(),
        vcores: match s.slots {
            0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
            n => n,
        },
        work_dir: Some(s.work_dir.display().to_string()),
        grpc_max_decoding_message_size: GRPC_MAX_MESSAGE,
        grpc_max_encoding_message_size: GRPC_MAX_MESSAGE,
        override_function_registry: Some(Arc::new(registry)),
        override_config_producer: Some(Arc::new(session_config)),
        ..Default::default()
    };
    start_executor_process(Arc::new(config)).await?;
    Ok(())
}
