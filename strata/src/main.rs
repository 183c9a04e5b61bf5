//! The `strata` command: wires the layers together. See `strata --help`.

mod cli;
mod generate;
mod retention;
mod verify;

use std::sync::Arc;

use anyhow::Context;
use clap::Parser;
use strata_batch::{BatchLayer, RunMode};
use strata_common::config::{Config, SpeedSource};
use strata_common::kafka;
use strata_serving::ServingState;
use strata_speed::SpeedLayer;
use tokio_util::sync::CancellationToken;

use cli::{Cli, Command};

/// mimalloc rather than glibc's malloc: see the workspace manifest. The `system-allocator`
/// feature leaves glibc's malloc in place, for heap profilers that hook it (heaptrack).
#[cfg(not(feature = "system-allocator"))]
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    strata_common::process::set_up();
    let cli = Cli::parse();
    init_logs(&cli.log_format);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    if let Command::Retention {
        common,
        dry_run,
        as_of,
        json,
    } = &cli.command
    {
        return match common
            .config()
            .and_then(|cfg| retention::run(&cfg, *dry_run, as_of.as_deref(), *json))
        {
            Ok(()) => std::process::ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("error: {e:#}");
                std::process::ExitCode::from(1)
            }
        };
    }
    if let Command::Verify {
        common,
        url,
        wait,
        show,
        ca_cert,
    } = &cli.command
    {
        let outcome = common.config().and_then(|cfg| {
            verify::run(
                &cfg,
                &verify::VerifyArgs {
                    url: url.clone(),
                    wait: *wait,
                    show: *show,
                    ca_cert: ca_cert.clone(),
                },
            )
        });
        return match outcome {
            Ok(r) if r.differences.is_empty() => std::process::ExitCode::SUCCESS,
            Ok(_) => std::process::ExitCode::from(1),
            Err(e) => {
                eprintln!("error: cannot verify: {e:#}");
                std::process::ExitCode::from(2)
            }
        };
    }
    match runtime.block_on(run(cli)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn init_logs(format: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    if format == "json" {
        builder.json().init();
    } else {
        builder.init();
    }
}

/// Layers still running, for the shutdown watchdog's last word.
static RUNNING: std::sync::Mutex<Vec<&'static str>> = std::sync::Mutex::new(Vec::new());

/// Exit code when stopping took longer than `shutdown-timeout-secs`.
const EXIT_SHUTDOWN_TIMEOUT: i32 = 3;
/// Exit code after a second signal.
const EXIT_SECOND_SIGNAL: i32 = 130;

/// Waits for SIGINT or SIGTERM.
async fn signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = ctrl_c => {},
                    _ = term.recv() => {},
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot listen for SIGTERM");
                let _ = ctrl_c.await;
            }
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}

/// Cancels `token` on SIGINT or SIGTERM, and bounds the shutdown that follows: a watchdog thread
/// exits the process after `timeout` (whatever a Kafka client's close is waiting for: the state
/// and offsets are written first, and a restart resumes there), and a second signal exits at
/// once.
fn on_signal(token: CancellationToken, timeout: std::time::Duration) {
    tokio::spawn(async move {
        signal().await;
        tracing::info!(
            timeout_secs = timeout.as_secs(),
            "shutting down: draining and flushing state (a second signal exits at once)"
        );
        token.cancel();
        let _ = std::thread::Builder::new()
            .name("shutdown-watchdog".into())
            .spawn(move || {
                std::thread::sleep(timeout);
                let running = RUNNING.lock().map(|r| r.join(", ")).unwrap_or_default();
                tracing::error!(
                    still_running = %running,
                    "shutdown did not finish within {} s; exiting anyway (a restart resumes at the stored offsets)",
                    timeout.as_secs()
                );
                std::process::exit(EXIT_SHUTDOWN_TIMEOUT);
            });
        signal().await;
        tracing::warn!("second signal: exiting at once (a restart resumes at the stored offsets)");
        std::process::exit(EXIT_SECOND_SIGNAL);
    });
}

fn shutdown_timeout(cfg: &Config) -> std::time::Duration {
    std::time::Duration::from_secs(cfg.shutdown_timeout_secs)
}

/// Listens for signals, then makes sure the topics exist: a signal while the broker is slow to
/// answer stops the process cleanly (`false`) instead of killing it by the default action.
async fn start(cfg: &Config, shutdown: &CancellationToken) -> anyhow::Result<bool> {
    on_signal(shutdown.clone(), shutdown_timeout(cfg));
    tokio::select! {
        r = ensure_topics(cfg) => r.map(|()| true),
        () = shutdown.cancelled() => {
            tracing::info!("stopped during start-up, before consuming anything");
            Ok(false)
        }
    }
}

async fn ensure_topics(cfg: &Config) -> anyhow::Result<()> {
    kafka::ensure_topics(
        &cfg.kafka,
        &[
            (&cfg.kafka.topic, cfg.kafka.partitions),
            (&cfg.dlq_topic(), cfg.kafka.partitions),
        ],
    )
    .await
    .context("creating the topics")?;
    match kafka::topic_retention_ms(&cfg.kafka, &cfg.kafka.topic).await {
        Ok(ms) => {
            if let Some(w) = kafka::retention_warning(
                &cfg.kafka.topic,
                ms,
                cfg.batch.every_secs,
                cfg.retention.kafka_margin_secs,
            ) {
                tracing::warn!("{w}");
            }
        }
        Err(e) => tracing::warn!(error = %e, "cannot read the topic's retention.ms"),
    }
    Ok(())
}

/// Runs a blocking layer on a thread of its own; when it ends, for any reason, everything stops.
fn spawn_layer(
    name: &'static str,
    shutdown: CancellationToken,
    f: impl FnOnce(CancellationToken) -> anyhow::Result<()> + Send + 'static,
) -> anyhow::Result<std::thread::JoinHandle<anyhow::Result<()>>> {
    std::thread::Builder::new()
        .name(name.into())
        .spawn(move || {
            if let Ok(mut r) = RUNNING.lock() {
                r.push(name);
            }
            let r = f(shutdown.clone());
            if let Err(e) = &r {
                tracing::error!(layer = name, "{e:#}");
            }
            if let Ok(mut running) = RUNNING.lock() {
                running.retain(|n| *n != name);
            }
            shutdown.cancel();
            r
        })
        .with_context(|| format!("starting the {name} thread"))
}

fn join(handle: std::thread::JoinHandle<anyhow::Result<()>>, name: &str) -> anyhow::Result<()> {
    handle
        .join()
        .map_err(|_| anyhow::anyhow!("the {name} layer panicked"))?
        .with_context(|| format!("the {name} layer failed"))
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let shutdown = CancellationToken::new();
    match cli.command {
        Command::Up {
            common,
            batch_every,
        } => {
            let mut cfg = common.config()?;
            if let Some(d) = batch_every {
                cfg.batch.every_secs = Some(d.as_secs().max(1));
            }
            if cfg.serve.speed == SpeedSource::Cluster {
                anyhow::bail!(
                    "invalid configuration: serve.speed: \"cluster\" is for `strata serve`; `strata up` serves its own speed layer"
                );
            }
            if cfg.speed.http.is_some() {
                anyhow::bail!(
                    "invalid configuration: speed.http: an instance of a speed cluster runs as `strata speed`; `strata up` serves its own speed layer"
                );
            }
            let batch_every = cfg.batch.every_secs.map(std::time::Duration::from_secs);
            if !start(&cfg, &shutdown).await? {
                return Ok(());
            }
            let speed = SpeedLayer::open(cfg.clone()).context("opening the speed layer")?;
            let state = Arc::new(ServingState::shared(cfg.clone(), speed.reader()));
            let speed_thread = spawn_layer("speed", shutdown.clone(), move |s| Ok(speed.run(s)?))?;
            let batch = BatchLayer::new(cfg.clone());
            let batch_thread = spawn_layer("batch", shutdown.clone(), move |s| {
                Ok(batch.run(RunMode::Continuous { every: batch_every }, s)?)
            })?;
            let served = strata_serving::server::serve(state, shutdown.clone()).await;
            shutdown.cancel();
            let speed_result = join(speed_thread, "speed");
            let batch_result = join(batch_thread, "batch");
            served?;
            speed_result?;
            batch_result
        }
        Command::Speed { common } => {
            let cfg = common.config()?;
            if !start(&cfg, &shutdown).await? {
                return Ok(());
            }
            let speed = SpeedLayer::open(cfg.clone()).context("opening the speed layer")?;
            let endpoint = match cfg.speed_url() {
                Some(url) => {
                    let members = strata_common::cluster::members_topic(&cfg.kafka.topic);
                    let topics = [(members.as_str(), 1)];
                    tokio::select! {
                        r = kafka::ensure_compacted_topics(&cfg.kafka, &topics) => r.context("creating the members topic")?,
                        () = shutdown.cancelled() => {
                            tracing::info!("stopped during start-up, before consuming anything");
                            return Ok(());
                        }
                    }
                    let peer = Arc::new(strata_serving::peer::Peer {
                        id: url,
                        db: speed.db(),
                        held: speed.held(),
                    });
                    Some(tokio::spawn(strata_serving::peer::run(
                        cfg.clone(),
                        peer,
                        shutdown.clone(),
                    )))
                }
                None => None,
            };
            let t = spawn_layer("speed", shutdown.clone(), move |s| Ok(speed.run(s)?))?;
            let ran = tokio::task::spawn_blocking(move || join(t, "speed")).await?;
            shutdown.cancel();
            if let Some(endpoint) = endpoint {
                endpoint.await?.context("the speed endpoint")?;
            }
            ran
        }
        Command::Batch {
            common,
            once,
            every,
        } => {
            let mut cfg = common.config()?;
            if let Some(d) = every {
                cfg.batch.every_secs = Some(d.as_secs().max(1));
            }
            if !start(&cfg, &shutdown).await? {
                return Ok(());
            }
            let mode = if once {
                RunMode::Once
            } else {
                RunMode::Continuous {
                    every: every.or(cfg.batch.every_secs.map(std::time::Duration::from_secs)),
                }
            };
            let batch = BatchLayer::new(cfg);
            let t = spawn_layer("batch", shutdown.clone(), move |s| Ok(batch.run(mode, s)?))?;
            tokio::task::spawn_blocking(move || join(t, "batch")).await?
        }
        Command::Serve { common } => {
            let cfg = common.config()?;
            on_signal(shutdown.clone(), shutdown_timeout(&cfg));
            if cfg.serve.speed == SpeedSource::Local {
                let state = Arc::new(ServingState::following(cfg));
                return Ok(strata_serving::server::serve(state, shutdown).await?);
            }
            let members = strata_common::cluster::members_topic(&cfg.kafka.topic);
            let topics = [(members.as_str(), 1)];
            tokio::select! {
                r = kafka::ensure_compacted_topics(&cfg.kafka, &topics) => r.context("creating the members topic")?,
                () = shutdown.cancelled() => return Ok(()),
            }
            let (mirror, path) =
                strata_serving::cluster::open_mirror(&cfg).context("opening the speed mirror")?;
            let reader = strata_common::speed_store::SpeedReader::shared(mirror.clone());
            let state = Arc::new(ServingState::shared(cfg, reader));
            let inputs = {
                let (a, b) = (state.clone(), state.clone());
                strata_serving::cluster::Inputs {
                    cutoffs: Box::new(move || {
                        a.batch()
                            .map(|v| v.manifest.cutoffs.clone())
                            .unwrap_or_default()
                    }),
                    partitions: Box::new(move || b.high_watermarks()),
                }
            };
            let sync = strata_serving::cluster::ClusterSync::new(state.cfg.clone(), inputs, mirror);
            let stop = shutdown.clone();
            let pulling = tokio::task::spawn_blocking(move || sync.run(stop));
            let served = strata_serving::server::serve(state, shutdown.clone()).await;
            shutdown.cancel();
            pulling.await?;
            if let Err(e) = std::fs::remove_dir_all(&path) {
                tracing::warn!(error = %e, path = %path.display(), "cannot remove the speed mirror");
            }
            Ok(served?)
        }
        Command::Verify { .. } | Command::Retention { .. } => {
            Err(anyhow::anyhow!("this command runs outside the runtime"))
        }
        Command::Config { common, check, .. } => cli::config_command(&common, check),
        Command::Generate {
            common,
            count,
            seed,
            rate,
            span,
            start,
            patterns,
            malformed_rate,
        } => {
            let cfg = common.config()?;
            generate::run(
                &cfg,
                generate::GenerateArgs {
                    count,
                    seed,
                    rate,
                    span,
                    start,
                    patterns,
                    malformed_rate,
                },
            )
            .await
        }
    }
}
