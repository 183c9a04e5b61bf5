//! Scheduling the archiver and recomputes.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rdkafka::consumer::BaseConsumer;
use strata_common::batch_store::{self, Manifest};
use strata_common::config::Config;
use strata_common::kafka;
use tokio_util::sync::CancellationToken;

use crate::archive::{self, ArchiveStatus};
use crate::recompute::recompute;
use crate::{Error, Result};

/// How the batch layer runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RunMode {
    /// Archive up to the topic's current end, recompute once, return.
    Once,
    /// Archive continuously; recompute every `every` (if set) and on request.
    Continuous { every: Option<Duration> },
}

/// The batch layer of one data directory.
pub struct BatchLayer {
    cfg: Config,
    status: Arc<Mutex<ArchiveStatus>>,
}

impl BatchLayer {
    pub fn new(cfg: Config) -> Self {
        BatchLayer {
            cfg,
            status: Arc::default(),
        }
    }

    /// Runs until done (`Once`) or until `shutdown`. Blocking: run it on a thread of its own.
    pub fn run(&self, mode: RunMode, shutdown: CancellationToken) -> Result<()> {
        match mode {
            RunMode::Once => self.once(shutdown).map(|_| ()),
            RunMode::Continuous { every } => self.continuous(every, shutdown),
        }
    }

    /// Archives everything the topic holds now, then recomputes.
    pub fn once(&self, shutdown: CancellationToken) -> Result<Manifest> {
        let probe: BaseConsumer = kafka::client_config(&self.cfg.kafka)
            .create()
            .map_err(|e| strata_common::Error::kafka("create metadata client", e))?;
        let ends =
            kafka::with_retries("reading the topic's end", Duration::from_secs(120), || {
                kafka::high_watermarks(&probe, &self.cfg.kafka.topic)
            })?;
        tracing::info!(until = ?ends, "archiving up to the topic's current end");
        archive::run(&self.cfg, self.status.clone(), Some(ends), shutdown.clone())?;
        if shutdown.is_cancelled() {
            return Err(Error::Dataset(
                "stopped before the archive caught up".into(),
            ));
        }
        recompute(&self.cfg)
    }

    fn continuous(&self, every: Option<Duration>, shutdown: CancellationToken) -> Result<()> {
        let archiver_stop = shutdown.child_token();
        let archiver = {
            let cfg = self.cfg.clone();
            let status = self.status.clone();
            let stop = archiver_stop.clone();
            std::thread::Builder::new()
                .name("archiver".into())
                .spawn(move || archive::run(&cfg, status, None, stop))
                .map_err(|e| Error::io("archiver thread", e))?
        };
        let mut next_run = every.map(|e| Instant::now() + e);
        let outcome = loop {
            if shutdown.is_cancelled() {
                break Ok(());
            }
            if archiver.is_finished() {
                break Err(Error::Dataset("the archiver stopped".into()));
            }
            let requests = match batch_store::take_requests(&self.cfg.data_dir) {
                Ok(r) => r,
                Err(e) => break Err(e.into()),
            };
            let due = next_run.is_some_and(|t| Instant::now() >= t);
            if due || !requests.is_empty() {
                tracing::info!(requests = ?requests, scheduled = due, "batch recompute starting");
                if let Err(e) = recompute(&self.cfg) {
                    tracing::error!(error = %e, "batch recompute failed; the previous version stays served");
                }
                next_run = every.map(|e| Instant::now() + e);
            }
            std::thread::sleep(Duration::from_millis(200));
        };
        archiver_stop.cancel();
        match archiver.join() {
            Ok(Ok(())) => outcome,
            Ok(Err(e)) => Err(e),
            Err(_) => Err(Error::Dataset("the archiver panicked".into())),
        }
    }
}
