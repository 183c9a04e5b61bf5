//! `strata-engine`: the batch recompute on Apache DataFusion, and the Ballista scheduler and
//! executors that run it on several hosts. See `strata-engine --help`.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};
use strata_common::config::Config;

/// mimalloc rather than glibc's malloc, as the `strata` binary.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Strata's batch recompute on Apache DataFusion, in process or on a Ballista cluster.
#[derive(Parser)]
#[command(name = "strata-engine", version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Recomputes every view from the master dataset on the engine `batch.engine` names
    /// (`datafusion` or a scheduler's `df://host:port`) and publishes the version. Prints the
    /// version's manifest as JSON on its last line.
    Recompute {
        /// Configuration file, as `strata --config` takes it (`STRATA__…` variables apply too).
        #[arg(long)]
        config: Option<PathBuf>,
        /// Overrides `batch.engine`.
        #[arg(long)]
        engine: Option<String>,
        /// Overrides `data-dir`.
        #[arg(long)]
        data_dir: Option<PathBuf>,
    },
    /// Runs a Ballista scheduler that plans Strata's recompute.
    Scheduler {
        /// Address to listen on (gRPC).
        #[arg(long, default_value = "127.0.0.1:50050")]
        bind: SocketAddr,
    },
    /// Runs a Ballista executor that runs Strata's recompute tasks.
    Executor {
        /// The scheduler's address.
        #[arg(long, default_value = "127.0.0.1:50050")]
        scheduler: SocketAddr,
        /// Host to bind and advertise.
        #[arg(long, default_value = "127.0.0.1")]
        host: String,
        /// Arrow Flight port (shuffle data); the executor's gRPC port is the next one.
        #[arg(long, default_value_t = 50051)]
        port: u16,
        /// Tasks run at once (0: one per core).
        #[arg(long, default_value_t = 0)]
        slots: usize,
        /// Directory for shuffle files.
        #[arg(long)]
        work_dir: PathBuf,
    },
}

fn main() -> std::process::ExitCode {
    strata_common::process::set_up();
    let cli = Cli::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr)
        .init();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_stack_size(32 * 1024 * 1024)
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli.command)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Recompute {
            config,
            engine,
            data_dir,
        } => {
            let mut cfg = Config::load(config.as_deref(), std::env::vars_os())?;
            if let Some(e) = engine {
                cfg.batch.engine = e;
            }
            if let Some(d) = data_dir {
                cfg.data_dir = d;
            }
            cfg.check()?;
            let manifest = strata_engine::recompute(&cfg).await?;
            println!(
                "{}",
                serde_json::to_string(&manifest).context("cannot write the manifest")?
            );
            Ok(())
        }
        Command::Scheduler { bind } => strata_engine::cluster::scheduler(bind).await,
        Command::Executor {
            scheduler,
            host,
            port,
            slots,
            work_dir,
        } => {
            strata_engine::cluster::executor(strata_engine::cluster::ExecutorSettings {
                scheduler,
                host,
                port,
                slots,
                work_dir,
            })
            .await
        }
    }
}
