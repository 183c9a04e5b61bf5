//! Scheduling the archiver and recomputes.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rdkafka::consumer::BaseConsumer;
use strata_common::batch_store::{self, Manifest, RunProgress, RunRecord, RunState};
use strata_common::config::Config;
use strata_common::kafka;
use strata_common::time::{format_rfc3339, now_millis};
use tokio_util::sync::CancellationToken;

use crate::archive::{self, ArchiveStatus};
use crate::recompute::recompute_with;
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
        // A one-off run reads every partition itself: in the group it would share them with
        // an archiver that is running continuously, and never reach the end of the others.
        let mut cfg = self.cfg.clone();
        cfg.kafka.assignment = kafka::Assignment::All;
        archive::run(&cfg, self.status.clone(), Some(ends), shutdown.clone())?;
        if shutdown.is_cancelled() {
            return Err(Error::Dataset(
                "stopped before the archive caught up".into(),
            ));
        }
        let _lock = crate::retention::lock(&self.cfg)?;
        self.tracked_recompute(Vec::new(), "once")
    }

    /// Rolls up what has aged (`retention.*`), if anything rolls up; `true` if a new generation
    /// was written, which the next recompute publishes. The archiver (or the caller) holds
    /// `master/.lock`, retention's lock.
    fn roll_up(&self) -> Result<bool> {
        if !self.cfg.retention.rolls_up() {
            return Ok(false);
        }
        let report = crate::retention::roll_up(&self.cfg, now_millis(), false)?;
        if let Some(why) = &report.nothing_because {
            tracing::info!(reason = %why, "retention: nothing to roll up");
        }
        Ok(report.generation.is_some())
    }

    /// Recomputes, keeping a run record for each request it serves (or one of its own) up to
    /// date: running with progress, then published or failed.
    fn tracked_recompute(&self, requests: Vec<String>, trigger: &str) -> Result<Manifest> {
        let now = || Some(format_rfc3339(now_millis()));
        let ids = if requests.is_empty() {
            vec![batch_store::new_run_id()]
        } else {
            requests
        };
        let mut runs: Vec<RunRecord> = ids
            .into_iter()
            .map(|id| {
                let mut r = batch_store::read_run(&self.cfg.data_dir, &id)
                    .ok()
                    .flatten()
                    .unwrap_or_else(|| RunRecord::new(id, RunState::Requested, trigger));
                r.state = RunState::Running;
                r.started_at = now();
                r
            })
            .collect();
        let save = |runs: &[RunRecord]| {
            for r in runs {
                if let Err(e) = batch_store::write_run(&self.cfg.data_dir, r) {
                    tracing::warn!(run = %r.id, error = %e, "cannot write the run record");
                }
            }
        };
        let _ = batch_store::prune_runs(&self.cfg.data_dir);
        save(&runs);
        let shared = Mutex::new((runs.clone(), Instant::now()));
        let outcome = recompute_with(&self.cfg, &|done, total| {
            if let Ok(mut g) = shared.lock() {
                if g.1.elapsed() >= Duration::from_millis(500) || done == total {
                    for r in &mut g.0 {
                        r.progress = Some(RunProgress { done, total });
                    }
                    save(&g.0);
                    g.1 = Instant::now();
                }
            }
        });
        if let Ok(g) = shared.into_inner() {
            runs = g.0;
        }
        for r in &mut runs {
            r.finished_at = now();
            match &outcome {
                Ok(m) => {
                    r.state = RunState::Published;
                    r.version = Some(m.version);
                    r.events = Some(m.events);
                }
                Err(e) => {
                    r.state = RunState::Failed;
                    r.error = Some(e.to_string());
                }
            }
        }
        save(&runs);
        if outcome.is_ok() {
            // Raw segments a published rollup replaced; a failure leaves them for the next run.
            if let Err(e) = crate::retention::purge(&self.cfg) {
                tracing::warn!(error = %e, "retention: cannot delete the replaced raw segments");
            }
        }
        outcome
    }

    fn continuous(&self, every: Option<Duration>, shutdown: CancellationToken) -> Result<()> {
        // The archiver holds `master/.lock` while this runs, which is also retention's lock.
        let retention_every = Duration::from_secs(self.cfg.retention.every_secs);
        let mut next_retention = Instant::now() + retention_every;
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
            let mut due = next_run.is_some_and(|t| Instant::now() >= t);
            if Instant::now() >= next_retention {
                next_retention = Instant::now() + retention_every;
                match self.roll_up() {
                    Ok(written) => due |= written,
                    Err(e) if e.is_disk() => break Err(e),
                    Err(e) => {
                        tracing::error!(error = %e, "retention rollup failed; the raw files stay")
                    }
                }
            }
            if due || !requests.is_empty() {
                tracing::info!(requests = ?requests, scheduled = due, "batch recompute starting");
                let trigger = if requests.is_empty() {
                    "schedule"
                } else {
                    "request"
                };
                match self.tracked_recompute(requests, trigger) {
                    // A full or read-only data directory: the archiver cannot write either, so
                    // the layer stops, as it does when the archiver meets it first.
                    Err(e) if e.is_disk() => break Err(e),
                    Err(e) => {
                        tracing::error!(error = %e, "batch recompute failed; the previous version stays served")
                    }
                    Ok(_) => {}
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
